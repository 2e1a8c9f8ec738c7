"""torch.compile(fullgraph=True) through all six ELBO ops: one graph, same values as eager.

The only compile test of the ELBO ops (inductor takes tens of seconds on 2 cores): deselect with
``-m "not compile"``.
"""
import pytest
import torch

import pyvae
from conftest import DEVICES, grads, make


def vae_terms(logits, x, mu, logvar, prior_mu):
    z = pyvae.reparameterize(mu, logvar, samples=2)
    log_q = pyvae.gaussian_log_prob(z, mu, logvar)  # [2, B]
    return (pyvae.bernoulli_elbo(logits, x, mu, logvar)
            + pyvae.bernoulli_log_prob(logits, x).mean(0)
            + pyvae.continuous_bernoulli_log_prob(logits, x).mean(0)
            - pyvae.gaussian_kl(mu, logvar, prior_mu)
            - log_q.mean(0)).sum()


@pytest.mark.compile
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_all_ops(device):
    graphs = []

    def backend(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    inputs = [make(2, 3, 5, device=device, scale=2.0, seed=1, grad=True),
              make(3, 5, device=device, kind="binary", seed=2),
              make(3, 4, device=device, seed=3, grad=True),
              make(3, 4, device=device, seed=4, grad=True),
              make(4, device=device, seed=5, grad=True)]
    compiled = torch.compile(vae_terms, fullgraph=True, backend=backend)
    torch.manual_seed(0)
    out = compiled(*inputs)
    got = grads(out, inputs)
    torch.manual_seed(0)  # same seed for the eps draw
    expected = vae_terms(*inputs)
    want = grads(expected, inputs)

    assert len(graphs) == 1  # no graph break
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    for name in ("reparameterize", "gaussian_log_prob", "bernoulli_elbo", "bernoulli_log_prob",
                 "continuous_bernoulli_log_prob", "gaussian_kl"):
        assert f"pyvae.{name}" in targets, (name, targets)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

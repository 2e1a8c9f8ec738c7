"""pyvae's ops: ``torch.library`` custom ops (namespace ``pyvae``) with autograd and fake kernels.

Every op follows ``torch.distributions``: the last dim is the event dim and is summed; all leading
dims are kept and broadcast. The math lives in ``csrc/ops/*.h`` and runs unchanged on CPU and CUDA;
each op's module here (named after the op) validates inputs, allocates outputs and hands tensors to
the gate (``pyvae/_gate.py``), the one caller of the compiled core.

Public functions (also importable from ``pyvae``):

=========================================================  ==========================================
``gaussian_kl(mu, logvar, prior_mu=None, prior_logvar=None)``  KL(q || p) per row, ``[...]``
``bernoulli_log_prob(logits, x)``                          log Bern(x | sigmoid(logits)), ``[...]``
``continuous_bernoulli_log_prob(logits, x)``               log CB(x | sigmoid(logits)), ``[...]``
``continuous_bernoulli_mean(logits)``                      E[x] of CB(sigmoid(logits)), elementwise
``gaussian_log_prob(x, mean, logvar)``                     log N(x | mean, exp(logvar)), ``[...]``
``reparameterize(mu, logvar, *, samples=None, generator=None)``  z = mu + exp(logvar/2) * eps
``bernoulli_elbo(logits, x, mu, logvar)``                  fused SGVB estimator B, ``[...]``
``linear_act(x, weight, bias=None, activation="identity")``  act(x @ weight.T + bias)
=========================================================  ==========================================

``bernoulli_elbo_into_logits`` (not in ``__all__``: pyvae.VAE's) is ``bernoulli_elbo`` for a caller that owns
the logits: their gradient may be written over them (NOTE: [ELBO gradient into the logits] in
bernoulli_elbo.py). ``vae_elbo`` (not in ``__all__`` either) is pyvae.VAE's training objective as one autograd
node (NOTE: [One-node VAE step] in vae_step.py).

NaN in any input gives NaN in the affected rows of the result (and gradient); infinities follow
the limits of the formulas. CPU kernels take float32 and float64 (float16 and bfloat16 are computed
in float32 and cast back); CUDA kernels take float32, float64, float16 and bfloat16 and accumulate
in float32 or wider. Gradients are first order: differentiating them again (create_graph=True)
raises instead of silently dropping the second-order terms.

Layout: ``_registry.py`` (the one registration helper, the eager fast path, first-order-only
gradients), ``_rowwise.py`` (the row-reduction family's plumbing), ``_checks.py`` (input checks that
name the argument), then one module per op.
"""
from .bernoulli_elbo import bernoulli_elbo, bernoulli_elbo_into_logits  # noqa: F401 (pyvae.VAE's, not public)
from .bernoulli_log_prob import bernoulli_log_prob
from .continuous_bernoulli_log_prob import continuous_bernoulli_log_prob, continuous_bernoulli_mean
from .gaussian_kl import gaussian_kl
from .gather_binarize import gather_binarize
from .gaussian_log_prob import gaussian_log_prob
from .linear_act import ACTIVATIONS, forget_routes, fused_only, linear_act, release_workspace
from .reparameterize import draw_seed, reparameterize, reparameterize_shard, seed_for, seed_stays_tensor
# pyvae.VAE's one-node training step, not public
from .vae_step import vae_elbo, vae_elbo_layers_ok, vae_elbo_mode_ok  # noqa: F401

__all__ = [
    "gaussian_kl",
    "bernoulli_log_prob",
    "continuous_bernoulli_log_prob",
    "continuous_bernoulli_mean",
    "gaussian_log_prob",
    "reparameterize",
    "bernoulli_elbo",
    "linear_act",
    "ACTIVATIONS",
    "fused_only",
    "forget_routes",
    "release_workspace",
    "draw_seed",
    "reparameterize_shard",
    "seed_for",
    "seed_stays_tensor",
    "gather_binarize",
]

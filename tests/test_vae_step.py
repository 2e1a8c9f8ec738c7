"""pyvae.VAE's one-node training step (NOTE: [One-node VAE step] in pyvae/ops/vae_step.py).

The one node must compute what the layered graph computes, bit for bit, on every layer route, and must be
taken exactly where it applies."""
import copy
import json

import pytest
import torch

import pyvae
from pyvae import _tune
from pyvae.ops import forget_routes
from pyvae.ops.linear_act import ROUTES


def _model(dtype=torch.float32, activation="tanh", layers=1, D=13, H=9, Z=3, seed=0):
    torch.manual_seed(seed)
    return pyvae.VAE(D, z_dim=Z, hidden=H, activation=activation, layers=layers).to(dtype)


def _x(B, D, dtype=torch.float32, seed=1):
    return (torch.rand(B, D, generator=torch.Generator().manual_seed(seed)) < 0.4).to(dtype)


def _step(model, x, seed=5, upstream=None, amp=False):
    """(objective, elbo, kl, gradients, the next number of torch's global generator) of one step (its forward
    under CPU autocast to bfloat16 with ``amp``)."""
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        obj, elbo, kl = model(x)
    loss = -obj.mean() if upstream is None else -(obj * upstream).sum()
    loss.backward()
    return obj.detach(), elbo, kl, [p.grad.clone() for p in model.parameters()], torch.rand(1)


def _keys(model, x, monkeypatch, amp=False):
    """The layer-route keys a training step of ``model`` on ``x`` looks up (routes forgotten first)."""
    seen = []
    note = _tune.note
    monkeypatch.setattr(_tune, "note", lambda key, route: (seen.append(key), note(key, route)))
    forget_routes()
    _step(copy.deepcopy(model), x, amp=amp)
    monkeypatch.setattr(_tune, "note", note)
    keys = sorted({k for k in seen if k.startswith(("linear_act", "gaussian_kl"))})
    # 13->9, 9->9 (both second hidden layers), the head 9->6, 3->9, the logits 9->13, and the reported KL
    assert len(keys) == 6, keys
    return keys


def _bits(t):
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32)


def _layered(model):
    other = copy.deepcopy(model)
    other.one_node = False
    return other


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid", "softplus"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_one_node_equals_layered_bit_for_bit(route, activation, dtype, monkeypatch):
    """Every layer on the same route both ways: outputs, gradients and the global generator's state agree
    exactly (a wrong mask, term, order of a sum or draw shows as a difference)."""
    model = _model(dtype, activation, layers=2)
    x = _x(37, 13, dtype)
    keys = _keys(model, x, monkeypatch)
    try:
        # the KL (a row op: routes "torch" and "pyvae") on torch's where the layers are, else on pyvae's kernel
        pins = {k: route if k.startswith("linear_act") else ("torch" if route == "torch" else "pyvae") for k in keys}
        with _tune.pinned(pins):
            forget_routes()
            node = _step(model, x)
            assert model(x)[0].grad_fn.name() == "_VAEStepBackward"
            assert all(_tune.used()[k] == pins[k] for k in keys)
            layered = _step(_layered(model), x)
            assert all(_tune.used()[k] == pins[k] for k in keys)
    finally:
        forget_routes()
    for a, b in zip(node[:3], layered[:3]):
        assert torch.equal(_bits(a), _bits(b))
    for g, h in zip(node[3], layered[3]):
        assert torch.equal(_bits(g), _bits(h))  # bits: the sign of a zero too
    assert torch.equal(node[4], layered[4])  # one seed drawn from torch's generator, as the layered step
    assert all(bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0) for g in node[3])


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid", "softplus"])
def test_one_node_under_autocast_equals_layered_bit_for_bit(route, activation, monkeypatch):
    """CPU autocast to bfloat16 (NOTE: [One-node step under autocast] in pyvae/ops/vae_step.py): the node casts x
    and the parameters, widens the head's halves and narrows their gradients as the layered step's casts do."""
    model = _model(torch.float32, activation, layers=2)
    x = _x(37, 13)
    keys = _keys(model, x, monkeypatch, amp=True)
    assert all("bfloat16 autocast" in k for k in keys if k.startswith("linear_act"))
    try:
        pins = {k: route if k.startswith("linear_act") else ("torch" if route == "torch" else "pyvae") for k in keys}
        with _tune.pinned(pins):
            forget_routes()
            node = _step(model, x, amp=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert model(x)[0].grad_fn.name() == "_VAEStepBackward"
            assert all(_tune.used()[k] == pins[k] for k in keys)
            layered = _step(_layered(model), x, amp=True)
            assert all(_tune.used()[k] == pins[k] for k in keys)
    finally:
        forget_routes()
    for a, b in zip(node[:3], layered[:3]):
        assert a.dtype == torch.float32 and torch.equal(_bits(a), _bits(b))
    for g, h in zip(node[3], layered[3]):
        assert g.dtype == torch.float32 and torch.equal(_bits(g), _bits(h))
    assert torch.equal(node[4], layered[4])
    assert all(bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0) for g in node[3])
    # and the bfloat16 products are in it: not the float32 step's gradients
    plain = _step(model, x)
    assert not all(torch.equal(g, h) for g, h in zip(node[3], plain[3]))


def test_paper_model_equals_layered_on_the_cold_routes():
    model = pyvae.VAE(784, z_dim=20, hidden=500)
    x = _x(100, 784)
    assert _taken(model, x)
    node, layered = _step(model, x), _step(_layered(model), x)
    assert torch.equal(node[0], layered[0])
    for g, h in zip(node[3], layered[3]):
        assert torch.equal(g, h)


def test_other_upstream_gradients_rescale_as_the_layered_step():
    """A weighted sum of the ELBO (rows weighted differently) rescales the written gradients: equal to the
    layered step's bits, and to the two-pass gradient of elbo_into_logits=False within rounding."""
    model = _model(torch.float64)
    x = _x(11, 13, torch.float64)
    w = torch.linspace(0.5, 2.0, 11, dtype=torch.float64)
    assert _taken(model, x)
    node, layered = _step(model, x, upstream=w), _step(_layered(model), x, upstream=w)
    fresh = copy.deepcopy(model)
    fresh.elbo_into_logits = False
    two_pass = _step(fresh, x, upstream=w)
    for g, h, k in zip(node[3], layered[3], two_pass[3]):
        assert torch.equal(g, h)
        torch.testing.assert_close(g, k, rtol=1e-12, atol=1e-12)
    # and then the usual mean again: the gradients of a plain step, not of the weighted one
    again, plain = _step(model, x), _step(_layered(model), x)
    for g, h in zip(again[3], plain[3]):
        assert torch.equal(g, h)


def test_one_node_gradients_match_float64_autograd_of_the_formula():
    """Against torch's own autograd of the objective written with torch ops, with the node's eps."""
    model = _model(torch.float64, "tanh")
    x = _x(9, 13, torch.float64)
    torch.manual_seed(3)
    obj = model(x)[0]
    (-obj.mean()).backward()
    got = [p.grad.clone() for p in model.parameters()]
    # eps of that draw: z - mu over the std, from reparameterize's draw with the same seed
    mu, logvar = model.encode(x)
    torch.manual_seed(3)
    seed = pyvae.ops.draw_seed()
    z = pyvae.ops.reparameterize_shard(mu.detach(), logvar.detach(), 1, seed)[0]
    eps = (z - mu.detach()) / torch.exp(0.5 * logvar.detach())
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.grad = None
    h = torch.tanh(torch.nn.functional.linear(x, ref.encoder[0].weight, ref.encoder[0].bias))
    head = torch.nn.functional.linear(h, ref.enc_head.weight, ref.enc_head.bias)
    m, lv = head[:, :3], head[:, 3:]
    zz = m + eps * torch.exp(0.5 * lv)
    logits = torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(zz, ref.decoder[0].weight,
                                                                               ref.decoder[0].bias)),
                                        ref.dec_logits.weight, ref.dec_logits.bias)
    rec = -torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    kl = 0.5 * (m.pow(2) + lv.exp() - 1.0 - lv).sum(-1)
    torch.testing.assert_close(obj.detach(), (rec - kl).detach(), rtol=1e-10, atol=1e-10)
    (-(rec - kl).mean()).backward()
    for g, p in zip(got, ref.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-10)


def test_extreme_inputs_stay_finite():
    """Weights that drive the logits to +-1e4 and logvar to +-30: finite ELBO and gradients, both paths alike."""
    model = _model(torch.float32)
    with torch.no_grad():
        model.dec_logits.bias.copy_(torch.tensor([1e4, -1e4] * 6 + [0.0]))
        model.enc_head.bias[3:] = torch.tensor([30.0, -30.0, 0.0])
    x = _x(8, 13)
    assert _taken(model, x)
    node, layered = _step(model, x), _step(_layered(model), x)
    assert bool(torch.isfinite(node[0]).all())
    for g, h in zip(node[3], layered[3]):
        assert bool(torch.isfinite(g).all())
        assert torch.equal(g, h)


def _taken(model, x, **kw) -> bool:
    obj = model(x, **kw)[0]
    return obj.grad_fn is not None and obj.grad_fn.name() == "_VAEStepBackward"


def test_taken_exactly_where_it_applies():
    model = _model()
    x = _x(6, 13)
    assert _taken(model, x)
    assert _taken(model.double(), x.double())
    model.float()
    assert not _taken(model, x, samples=2)
    assert not _taken(model, x, estimator="mc")
    assert not _taken(model, x, kl_weight=0.5)
    assert not _taken(model, x, shard=(0, 6))
    assert not _taken(model, x.t().contiguous().t())  # strided x
    assert not _taken(model, x.clone().requires_grad_())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # NOTE: [One-node step under autocast]
        assert _taken(model, x)
        assert not _taken(model.double(), x.double())  # autocast leaves float64 alone: the layered graph
        model.float()
    with torch.autocast("cpu", dtype=torch.float16):
        assert not _taken(model, x)
    with torch.no_grad():
        assert model(x)[0].grad_fn is None
    off = _layered(model)
    assert not _taken(off, x)
    fresh = copy.deepcopy(model)
    fresh.elbo_into_logits = False
    assert not _taken(fresh, x)
    frozen = copy.deepcopy(model)
    frozen.decoder[0].bias.requires_grad_(False)
    assert not _taken(frozen, x)
    assert not _taken(pyvae.VAE(13, z_dim=3, hidden=9, fused=False), x)
    assert not _taken(pyvae.VAE(13, z_dim=3, hidden=9, likelihood="continuous-bernoulli"), x)
    hooked = copy.deepcopy(model)
    seen = []
    handle = hooked.decoder[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert not _taken(hooked, x) and seen == [(6, 9)]
    handle.remove()
    assert _taken(hooked, x)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, i: None)
    try:
        assert not _taken(model, x)
    finally:
        handle.remove()
    with torch.autograd.graph.save_on_cpu():  # saved-tensor hooks act on the layered graph's tensors
        assert not _taken(model, x)
    with torch.inference_mode(), torch.enable_grad():  # the layered graph's error, not a graph of the node
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved"):
            model(x)
    assert _taken(model, x)


def test_the_layers_are_not_gathered_where_the_mode_rules_the_node_out(monkeypatch):
    # Gathering the layers (_node_layers: ~20 us a step) only where x and the mode allow the node: under float16
    # autocast, without grad or with saved-tensor hooks a step would spend it for nothing.
    model, x = _model(), _x(6, 13)
    gathered = []
    real = pyvae.VAE._node_layers
    monkeypatch.setattr(pyvae.VAE, "_node_layers", lambda self: gathered.append(1) or real(self))
    with torch.autocast("cpu", dtype=torch.float16):
        model(x)
    with torch.no_grad():
        model(x)
    with torch.autograd.graph.save_on_cpu():
        model(x)
    model(x.clone().requires_grad_())
    assert gathered == []
    assert _taken(model, x) and gathered == [1]


def _same_as_layered(model, x):
    node, layered = _step(model, x), _step(_layered(model), x)
    assert torch.equal(node[0], layered[0])
    for g, h in zip(node[3], layered[3]):
        assert torch.equal(g, h)


def test_models_the_node_does_not_describe_take_the_layered_graph():
    """What the node would compute differently: an activation on the logits layer (whose output's storage the
    ELBO gradient takes), a subclass's encode or decoder input, a container subclass, an encoder deeper than
    ``layers`` says. Each takes the layered graph, and so gets its gradients."""
    x = _x(6, 13, torch.float64)
    act = _model(torch.float64)
    act.dec_logits.activation = "tanh"
    assert not _taken(act, x)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # the layered graph's refusal
        _step(act, x)
    act.elbo_into_logits = False
    _step(act, x)

    class Half(pyvae.VAE):
        def encode(self, x):
            return super().encode(x * 0.5)

    class Cast(pyvae.VAE):
        def _decoder_input(self, z):
            return super()._decoder_input(z) * 2.0

    class TanhSeq(torch.nn.Sequential):
        def forward(self, h):
            return torch.tanh(super().forward(h))

    for cls in (Half, Cast):
        torch.manual_seed(0)
        sub = cls(13, z_dim=3, hidden=9).double()
        assert not _taken(sub, x)
        _same_as_layered(sub, x)
    seq = _model(torch.float64)
    seq.encoder = TanhSeq(*seq.encoder)
    assert not _taken(seq, x)
    _same_as_layered(seq, x)
    # a deeper encoder than the constructor's: the node follows the modules, not ``layers``
    deep = _model(torch.float64)
    deep.encoder.append(pyvae.nn.FusedLinear(9, 9, "tanh").double())
    assert _taken(deep, x)
    _same_as_layered(deep, x)


def test_second_backward_and_create_graph_raise_naming_the_switch():
    model = _model()
    x = _x(6, 13)
    obj = model(x)[0]
    loss = -obj.mean()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one_node"):
        loss.backward()
    obj = model(x)[0]
    with pytest.raises(RuntimeError, match="one_node"):
        torch.autograd.grad(-obj.mean(), list(model.parameters()), create_graph=True)
    # with the switch off, a second backward works
    off = _layered(model)
    off.elbo_into_logits = False
    loss = -off(x)[0].mean()
    loss.backward(retain_graph=True)
    loss.backward()


def test_a_weight_changed_before_backward_is_an_error():
    model = _model()
    x = _x(6, 13)
    loss = -model(x)[0].mean()
    with torch.no_grad():
        model.decoder[0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def _mixed_layers_then(step_winner, races):
    """A fake ``_tune.measure``: the layer races pick torch's and pyvae's routes in turn (a mix), the step's race
    (NOTE: [Step routes] in pyvae/ops/vae_step.py) picks ``step_winner``; ``races`` receives each race's
    candidates."""
    n = [0]

    def measure(candidates, **kw):
        races.append(tuple(candidates))
        for fn in candidates.values():
            fn()  # every candidate runs
        if "layers" in candidates:
            win = step_winner
        else:
            n[0] += 1
            win = "torch" if n[0] % 2 else "pyvae"
        return {c: 0.001 if c == win else 0.002 for c in candidates}
    return measure


@pytest.mark.parametrize("winner", ["layers", "pyvae", "torch"])
def test_the_step_race_runs_its_pick_and_touches_nothing(tuning, monkeypatch, winner):
    """Where the layers' races picked a mix of routes, the step is raced as a whole and runs the pick: the same
    step, bit for bit, as the layered graph on those routes, so the race neither drew from torch's generator nor
    wrote to the parameters' gradients, and the pick is cached."""
    import pyvae.ops.vae_step as vae_step

    races, ran, noted = [], [], {}
    monkeypatch.setattr(_tune, "measure", _mixed_layers_then(winner, races))
    note = _tune.note
    monkeypatch.setattr(_tune, "note", lambda key, route: (noted.__setitem__(key, route), note(key, route)))
    model = _model(layers=2)
    x = _x(37, 13)
    node = _step(model, x)
    step_races = [r for r in races if "layers" in r]
    assert step_races == [("layers", "pyvae", "torch")]
    (skey,) = [k for k in noted if k.startswith("vae_step ")]
    assert noted[skey] == winner and _tune.entries()[skey]["choice"] == winner
    assert skey in json.loads(next(tuning.glob("routes-*.json")).read_text())["routes"]
    layer_keys = [k for k in noted if k.startswith("linear_act")]
    assert len(layer_keys) == 5  # 13->9, 9->9 (both second hidden layers), the head 9->6, 3->9, the logits 9->13
    picks = {noted[k] for k in layer_keys}
    assert picks == {"torch", "pyvae"}  # a mix, as the fake races made it

    forward_on_route = vae_step.forward_on_route
    monkeypatch.setattr(vae_step, "forward_on_route", lambda r, *a: (ran.append(r), forward_on_route(r, *a))[1])
    n = len(races)
    again = _step(model, x)  # the cached pick, no race
    assert len(races) == n
    assert len(ran) == 6 and (set(ran) == picks if winner == "layers" else set(ran) == {winner})
    for a, b in zip(node[3], again[3]):
        assert torch.equal(a, b)

    # the layered graph with every layer pinned to the route the node ran it on
    with _tune.pinned({k: noted[k] if winner == "layers" else winner for k in layer_keys}):
        forget_routes()
        layered = _step(_layered(model), x)
    forget_routes()
    for a, b in zip(node[:3], layered[:3]):
        assert torch.equal(_bits(a), _bits(b))
    for g, h in zip(node[3], layered[3]):
        assert torch.equal(_bits(g), _bits(h))
    assert torch.equal(node[4], layered[4])  # the race drew nothing from torch's generator


def test_no_step_race_where_a_layer_route_is_pinned(tuning, monkeypatch):
    """A resumed run pins its layers' routes (NOTE: [Routes of a run] in pyvae/_tune.py): its step runs them as
    they are, with no race."""
    races = []
    monkeypatch.setattr(_tune, "measure", _mixed_layers_then("torch", races))
    model = _model(layers=2)
    x = _x(37, 13)
    keys = _keys(model, x, monkeypatch)
    assert any("layers" in r for r in races)  # (unpinned, the step was raced)
    races.clear()
    pins = {k: ("torch", "pyvae")[i % 2] for i, k in enumerate(keys)}
    with _tune.pinned(pins):
        forget_routes()
        _step(model, x)
    forget_routes()
    assert not any("layers" in r for r in races)


def test_no_step_race_runs_the_layers_own_routes(tuning, monkeypatch):
    """``no_step_race`` (bench train's pyvae-no-step-race provider): the layers' picks, not the step's cached
    pick, and no race."""
    import pyvae.ops.vae_step as vae_step

    races, ran = [], []
    monkeypatch.setattr(_tune, "measure", _mixed_layers_then("torch", races))
    model = _model(layers=2)
    x = _x(37, 13)
    _step(model, x)  # raced: every layer on torch's route from now on
    forward_on_route = vae_step.forward_on_route
    monkeypatch.setattr(vae_step, "forward_on_route", lambda r, *a: (ran.append(r), forward_on_route(r, *a))[1])
    _step(model, x)
    assert set(ran) == {"torch"}
    ran.clear()
    n = len(races)
    with vae_step.no_step_race():
        _step(model, x)
    assert set(ran) == {"torch", "pyvae"} and len(races) == n
    ran.clear()
    _step(model, x)  # and the race's pick again after the block
    assert set(ran) == {"torch"}


def test_a_resumed_run_runs_its_steps_pinned_pick(tuning, monkeypatch):
    """A resumed run pins every route it noted, its step's pick among them (NOTE: [Routes of a run] in
    pyvae/_tune.py): its step runs that pick, not its layers' mix, and races nothing, so the continuation rounds as
    the uninterrupted run did."""
    import pyvae.ops.vae_step as vae_step

    races, ran, noted = [], [], {}
    monkeypatch.setattr(_tune, "measure", _mixed_layers_then("torch", races))
    note = _tune.note
    monkeypatch.setattr(_tune, "note", lambda key, route: (noted.__setitem__(key, route), note(key, route)))
    model = _model(layers=2)
    x = _x(37, 13)
    first = _step(model, x)  # the run: raced, every layer on torch's route
    pins = dict(noted)  # what its checkpoint holds
    assert any(k.startswith("vae_step ") and v == "torch" for k, v in pins.items())
    _tune.reset_for_tests()  # a new process, with an empty cache
    forget_routes()
    races.clear()
    forward_on_route = vae_step.forward_on_route
    monkeypatch.setattr(vae_step, "forward_on_route", lambda r, *a: (ran.append(r), forward_on_route(r, *a))[1])
    with _tune.pinned(pins):
        forget_routes()
        resumed = _step(model, x)
    forget_routes()
    assert set(ran) == {"torch"} and races == []
    for g, h in zip(first[3], resumed[3]):
        assert torch.equal(_bits(g), _bits(h))

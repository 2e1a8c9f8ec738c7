"""pyvae.ops.linear_act and the pyvae.nn modules against nn.Linear + activation."""
import contextlib
import importlib
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyvae
import pyvae._gemm
import pyvae.nn as pnn
from pyvae.ops import linear_act

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and pyvae.cuda_built() else [])
ACTS = {
    "identity": lambda t: t,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
}
# (in_features, out_features, leading shape): odd sizes, 1-element, 3-D inputs, the VAE's layers.
SHAPES = [(1, 1, (1,)), (3, 5, (7,)), (13, 11, (2, 3)), (784, 500, (4,)), (20, 1007, (3,)), (500, 40, (2, 1, 5))]


# Both CPU GEMM routes (NOTE: [CPU GEMM backend] in pyvae/_gemm.py), oneDNN for every size.
GEMMS = ["torch"] + (["onednn"] if pyvae._gemm.onednn_enabled() else [])


@pytest.fixture(autouse=True)
def fused(request):
    # The tests here are of pyvae's kernels: small layers would otherwise run torch's own ops
    # (NOTE: [Small layers run torch's ops] in pyvae/ops/linear_act.py). The routing has its own tests,
    # marked "routing", which run with it on.
    if "routing" in request.keywords:
        yield
        return
    with pyvae.ops.fused_only():
        yield


@pytest.fixture(params=GEMMS)
def cpu_gemm(request):
    with pyvae._gemm.override(request.param, min_flops=0):
        yield request.param


def _ref(x, w, b, act):
    return ACTS[act](F.linear(x, w, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_linear_plus_activation(device, act, dtype, shape, cpu_gemm):
    torch.manual_seed(0)
    fin, fout, lead = shape
    x = torch.randn(*lead, fin, dtype=torch.float64, device=device, requires_grad=True)
    w = (torch.randn(fout, fin, dtype=torch.float64, device=device) / fin**0.5).requires_grad_()
    b = torch.randn(fout, dtype=torch.float64, device=device, requires_grad=True)
    y_ref = _ref(x, w, b, act)
    g = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad(y_ref, (x, w, b), g)

    xs, ws, bs = (t.detach().to(dtype).requires_grad_() for t in (x, w, b))
    y = linear_act(xs, ws, bs, act)
    assert y.dtype == dtype and y.shape == y_ref.shape
    grads = torch.autograd.grad(y, (xs, ws, bs), g.to(dtype))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y.double(), y_ref, **tol)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got.double(), want, **(tol if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", list(ACTS))
def test_gradcheck(device, act):
    torch.manual_seed(1)
    x = torch.randn(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: linear_act(x, w, b, act), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: linear_act(x, w, None, act), (x, w))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ["identity", "tanh", "softplus"])
def test_opcheck(device, act):
    torch.manual_seed(2)
    x = torch.randn(6, 7, device=device, requires_grad=True)
    w = torch.randn(3, 7, device=device, requires_grad=True)
    b = torch.randn(3, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.pyvae.linear_act.default, (x, w, b, act))
    torch.library.opcheck(torch.ops.pyvae.linear_act.default, (x, w, None, act))


def test_activation_math_extremes():
    # The float32 tanh/sigmoid/softplus polynomials against float64 over a wide grid, inf and NaN.
    a = torch.cat([torch.linspace(-30, 30, 20001), torch.tensor([-1e4, 1e4, 1e-7, -1e-7, 0.0])])
    eye = torch.eye(1)
    for act, f in ACTS.items():
        y = linear_act(a[:, None], eye, None, act)[:, 0]
        want = f(a.double())
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y.double(), want, rtol=2e-6, atol=1e-7, msg=act)
        special = linear_act(torch.tensor([[float("nan")], [float("inf")], [-float("inf")]]), eye, None, act)[:, 0]
        assert torch.isnan(special[0]), act
        torch.testing.assert_close(special[1:].double(), f(torch.tensor([float("inf"), -float("inf")], dtype=torch.float64)))


def test_softplus_gradient_for_very_negative_inputs():
    # softplus' = sigmoid(a) is derived from y = softplus(a) as -expm1(-y): exact even where y ~ e^a.
    a = torch.tensor([[-20.0], [-50.0], [-80.0]], requires_grad=True)
    y = linear_act(a, torch.eye(1), None, "softplus")
    (g,) = torch.autograd.grad(y.sum(), a)
    torch.testing.assert_close(g.double(), torch.sigmoid(a.detach().double()), rtol=1e-5, atol=0)


@pytest.mark.parametrize("act", list(ACTS))
def test_bf16_autocast(act):
    torch.manual_seed(3)
    x = torch.randn(64, 784)
    lin = pnn.FusedLinear(784, 500, act)
    ref = _ref(x.double(), lin.weight.double(), lin.bias.double(), act)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    # Error at most ~2x that of torch's own bf16 autocast nn.Linear + activation.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_torch = ACTS[act](F.linear(x, lin.weight, lin.bias))
    err = (y.double() - ref).abs().max().item()
    err_torch = (y_torch.double() - ref).abs().max().item()
    assert err <= 2 * err_torch + 1e-3, (err, err_torch)
    y.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32 and lin.bias.grad.dtype == torch.float32
    assert torch.isfinite(lin.weight.grad).all()
    # The eager path (casts in Python, then the direct function) and the registered AutocastCPU kernel
    # (what torch.compile and modes see) run the same implementation: identical values and gradients.
    grads = (lin.weight.grad.clone(), lin.bias.grad.clone())
    lin.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_op = torch.ops.pyvae.linear_act(x, lin.weight, lin.bias, act)
    assert y_op.dtype == torch.bfloat16 and torch.equal(y_op, y)
    y_op.float().sum().backward()
    assert torch.equal(lin.weight.grad, grads[0]) and torch.equal(lin.bias.grad, grads[1])


@pytest.mark.parametrize("path", ["eager", "dispatcher"])
def test_bf16_autocast_stack_trains_every_layer(path):
    # Inner layers under autocast take bf16 inputs and fp32 weights: the gradient of a bf16 input
    # must flow back (a bug once dropped every gradient whose dtype already matched its input's, so
    # the first layer of a bf16 stack got none). Compared with nn.Linear stacks under autocast.
    torch.manual_seed(5)
    sizes = [(30, 20, "tanh"), (20, 16, "relu"), (16, 12, "identity")]
    fused = [pnn.FusedLinear(i, o, a) for i, o, a in sizes]
    ref = [nn.Linear(i, o) for i, o, _ in sizes]
    for f, r in zip(fused, ref):
        r.load_state_dict(f.state_dict())
    x = torch.randn(8, 30, requires_grad=True)
    xr = x.detach().clone().requires_grad_()

    def run(layers, h, is_ref):
        for layer, (_, _, a) in zip(layers, sizes):
            if is_ref:
                h = ACTS[a](layer(h))
            elif path == "eager":
                h = layer(h)
            else:
                h = torch.ops.pyvae.linear_act(h, layer.weight, layer.bias, a)
        return h

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, yr = run(fused, x, False), run(ref, xr, True)
    assert y.dtype == yr.dtype == torch.bfloat16
    g = torch.randn(8, 12)
    y.float().backward(g)
    yr.float().backward(g)
    assert x.grad is not None and x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, xr.grad, rtol=5e-2, atol=5e-2)
    for f, r in zip(fused, ref):
        assert f.weight.grad is not None and f.bias.grad is not None
        torch.testing.assert_close(f.weight.grad, r.weight.grad, rtol=5e-2, atol=5e-2)
        torch.testing.assert_close(f.bias.grad, r.bias.grad, rtol=5e-2, atol=5e-2)


def test_thread_count_does_not_change_bias_gradient():
    torch.manual_seed(4)
    x = torch.randn(1000, 64)
    lin = pnn.FusedLinear(64, 300, "tanh")
    grads = []
    n = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            lin.zero_grad()
            lin(x).sum().backward()
            grads.append(lin.bias.grad.clone())
    finally:
        torch.set_num_threads(n)
    assert torch.equal(grads[0], grads[1])


def test_compile_fullgraph():
    torch._dynamo.reset()
    mlp = pnn.FusedMLP([12, 9, 4], activation="tanh", out_activation="sigmoid")
    x = torch.randn(5, 12)
    compiled = torch.compile(mlp, fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, mlp(x))
    y.sum().backward()
    g_compiled = mlp[0].weight.grad.clone()
    mlp.zero_grad()
    mlp(x).sum().backward()
    torch.testing.assert_close(g_compiled, mlp[0].weight.grad)


def test_fused_linear_is_drop_in_for_nn_linear():
    torch.manual_seed(5)
    ref = nn.Sequential(nn.Linear(10, 6), nn.Tanh())
    torch.manual_seed(5)
    fused = pnn.FusedLinear(10, 6, "tanh")
    # Same default initialization from the same seed, same names and shapes.
    assert torch.equal(fused.weight, ref[0].weight) and torch.equal(fused.bias, ref[0].bias)
    fused2 = pnn.FusedLinear(10, 6, "tanh")
    fused2.load_state_dict(ref[0].state_dict())
    x = torch.randn(3, 10)
    torch.testing.assert_close(fused2(x), ref(x))
    assert list(fused2.state_dict()) == ["weight", "bias"]


def test_fused_mlp_and_gaussian_head():
    torch.manual_seed(6)
    mlp = pnn.FusedMLP([784, 500, 40], activation="tanh", out_activation="identity")
    x = torch.randn(7, 784)
    want = F.linear(torch.tanh(F.linear(x, mlp[0].weight, mlp[0].bias)), mlp[1].weight, mlp[1].bias)
    torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-5)
    head = pnn.GaussianHead(500, 20)
    h = torch.randn(3, 500)
    mu, logvar = head(h)
    full = F.linear(h, head.weight, head.bias)
    assert mu.shape == logvar.shape == (3, 20)
    torch.testing.assert_close(mu, full[:, :20])
    torch.testing.assert_close(logvar, full[:, 20:])


def test_bad_input():
    x, w, b = torch.randn(4, 5), torch.randn(3, 5), torch.randn(3)
    with pytest.raises(ValueError, match="in_features"):
        linear_act(torch.randn(4, 6), w, b, "tanh")
    with pytest.raises(ValueError, match="weight must be 2-D"):
        linear_act(x, torch.randn(3, 5, 1), b, "tanh")
    with pytest.raises(ValueError, match="bias must have shape"):
        linear_act(x, w, torch.randn(4), "tanh")
    with pytest.raises(ValueError, match="activation must be one of"):
        linear_act(x, w, b, "gelu")
    with pytest.raises(TypeError, match="x must be a floating-point"):
        linear_act(torch.ones(4, 5, dtype=torch.int64), w, b, "tanh")
    with pytest.raises(TypeError, match="weight has dtype"):
        linear_act(x, w.double(), b, "tanh")
    with pytest.raises(ValueError, match="activation must be one of"):
        pnn.FusedLinear(3, 4, activation="swish")
    with pytest.raises(ValueError, match="sizes"):
        pnn.FusedMLP([5])


def test_empty_batch_and_noncontiguous(cpu_gemm):
    w, b = torch.randn(3, 5, requires_grad=True), torch.randn(3, requires_grad=True)
    x = torch.randn(0, 5, requires_grad=True)
    y = linear_act(x, w, b, "tanh")
    assert y.shape == (0, 3)
    y.sum().backward()
    assert torch.equal(b.grad, torch.zeros(3)) and torch.equal(w.grad, torch.zeros(3, 5))
    xt = torch.randn(5, 8).t()  # non-contiguous
    torch.testing.assert_close(linear_act(xt, w, b, "sigmoid"), torch.sigmoid(F.linear(xt, w, b)))


def test_double_backward_raises():
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(2, 4, requires_grad=True)
    y = linear_act(x, w, None, "tanh")
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_modules_take_the_eager_fast_path():
    # nn.Parameter inputs must not push FusedLinear onto the slower dispatcher path (NOTE: [Eager fast
    # path] in pyvae/ops/_registry.py); under torch.compile or a dispatch mode the registered op runs instead.
    lin = pnn.FusedLinear(6, 4, "tanh")
    x = torch.randn(3, 6)
    assert type(lin(x).grad_fn).__name__ == "_LinearActFunctionBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(lin(x).grad_fn).__name__ == "_LinearActAutocastFunctionBackward"
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        y = lin(x)
    assert type(y.grad_fn).__name__ != "_LinearActFunctionBackward"
    torch.testing.assert_close(y, lin(x))


def test_double_backward_raises_under_autocast():
    lin = pnn.FusedLinear(4, 2, "tanh")
    x = torch.randn(3, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    (gx,) = torch.autograd.grad(y.float().sum(), x, create_graph=True)
    assert gx.dtype == torch.float32
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


@pytest.mark.parametrize("path", ["eager", "dispatcher"])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("act", ["tanh", "identity"])
@pytest.mark.parametrize("trained", ["x", "weight", "bias"])
def test_double_backward_raises_for_each_input_alone(path, autocast, act, trained):
    # With only one input trainable, differentiating its gradient again must raise (NOTE: [No double
    # backward] in pyvae/ops/_registry.py), not drop a term: once a trainable bias alone (x and weight
    # frozen) gave a gradient penalty without its second-order part, and under autocast the guard hung
    # from a leaf of its own, so torch.autograd.grad(penalty, x) gave None.
    torch.manual_seed(6)
    inputs = {"x": torch.randn(4, 6), "weight": torch.randn(5, 6), "bias": torch.randn(5)}
    inputs[trained].requires_grad_()
    fn = linear_act if path == "eager" else torch.ops.pyvae.linear_act

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fn(inputs["x"], inputs["weight"], inputs["bias"], act)
        return (y.float() ** 2).sum()

    (first,) = torch.autograd.grad(loss(), inputs[trained], create_graph=True)
    assert torch.equal(first, torch.autograd.grad(loss(), inputs[trained])[0])
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad((first ** 2).sum(), inputs[trained])


@pytest.mark.parametrize("path", ["eager", "dispatcher"])
def test_autocast_leaves_float64_alone(path):
    # Like nn.Linear under autocast: float64 inputs are not cast (autocast only lowers float32/16).
    lin = pnn.FusedLinear(5, 3, "tanh").double()
    x = torch.randn(4, 5, dtype=torch.float64)
    fn = lin if path == "eager" else (lambda t: torch.ops.pyvae.linear_act(t, lin.weight, lin.bias, "tanh"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(x)
        y_ref = torch.tanh(F.linear(x, lin.weight, lin.bias))
    assert y.dtype == y_ref.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------ NOTE: [Small layers run torch's ops] (the routing)
def _node(y):
    return type(y.grad_fn).__name__


@pytest.mark.routing
@pytest.mark.parametrize("act,dtype,rows,fin,fout,autocast,torch_ops", [
    ("identity", torch.float32, 100, 500, 40, False, True),    # 4 MFLOP: torch's mm either way
    ("identity", torch.float64, 100, 500, 40, False, True),    # no oneDNN float64 route
    ("identity", torch.float32, 2, 3, 5, False, True),
    ("identity", torch.float32, 100, 20, 500, True, True),     # bf16 GEMMs are torch's mm anyway
    ("identity", torch.bfloat16, 8192, 500, 784, True, True),
    ("identity", torch.float32, 1024, 500, 784, False, False),  # 800 MFLOP: oneDNN, fused
    ("tanh", torch.float32, 100, 500, 40, False, False),       # activations: always fused
    ("tanh", torch.float32, 3, 4, 5, True, False),
    ("softplus", torch.float64, 3, 4, 5, False, False),
])
def test_routing_picks_torch_ops_only_for_identity_layers_on_torchs_gemm(act, dtype, rows, fin, fout, autocast,
                                                                        torch_ops):
    lin = pnn.FusedLinear(fin, fout, act).to(dtype)
    x = torch.randn(rows, fin, dtype=dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = lin(x)
    if torch_ops or pyvae._gemm.onednn_enabled():
        assert _node(y).startswith("_LinearAct") != torch_ops, _node(y)
    else:  # no oneDNN route in this torch build: every identity layer is on torch's mm
        assert _node(y).startswith("_LinearAct") == (act != "identity")


@pytest.mark.routing
def test_identity_on_onednn_stays_fused():
    if not pyvae._gemm.onednn_enabled():
        pytest.skip("oneDNN's linear is not usable in this torch build")
    with pyvae._gemm.override("onednn", min_flops=0):
        y = pnn.FusedLinear(5, 3, "identity")(torch.randn(2, 5))
    assert _node(y) == "_LinearActFunctionBackward"


@pytest.mark.routing
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("lead", [(7,), (2, 3), (0,)])
@pytest.mark.parametrize("bias", [True, False])
def test_routes_agree(autocast, lead, bias):
    # Same values and gradients from torch's ops (auto routing) and pyvae's node (fused_only), with
    # an input of another dtype than the weights under autocast, as an inner layer of a network has.
    torch.manual_seed(0)
    lin = pnn.FusedLinear(13, 11, "identity", bias=bias)
    x0 = torch.randn(*lead, 13, dtype=torch.bfloat16 if autocast else torch.float32)
    g = torch.randn(*lead, 11)
    outs = []
    for fused in (False, True):
        x = x0.clone().requires_grad_()
        lin.zero_grad()
        ctx = pyvae.ops.fused_only() if fused else contextlib.nullcontext()
        with ctx, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = lin(x)
        assert _node(y).startswith("_LinearAct") == fused
        y.backward(g.to(y.dtype))
        outs.append((y, x.grad, lin.weight.grad) + ((lin.bias.grad,) if bias else ()))
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(*outs):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.routing
def test_routing_keeps_pyvae_errors():
    w, b = torch.randn(3, 5), torch.randn(3)
    with pytest.raises(ValueError, match="in_features = 5"):
        linear_act(torch.randn(2, 4), w, b, "identity")
    with pytest.raises(ValueError, match="bias must have shape"):
        linear_act(torch.randn(2, 5), w, torch.randn(4), "identity")
    with pytest.raises(ValueError, match="activation must be one of"):
        linear_act(torch.randn(2, 5), w, b, "gelu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match="in_features = 5"):
            linear_act(torch.randn(2, 4), w, b, "identity")
        with pytest.raises(ValueError, match="activation must be one of"):
            linear_act(torch.randn(2, 5), w, b, "gelu")


# ------------------------------------------------ the transposed gradient for the weight GEMM
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("act", ["identity", "tanh", "softplus"])
@pytest.mark.parametrize("rows,cols", [(1, 1), (63, 5), (64, 7), (65, 130), (1000, 33), (3001, 41)])
def test_act_bwd_writes_the_transposed_gradient(dtype, act, rows, cols):
    # act_bwd's grad_pre_t (NOTE: [CPU GEMM backend]): exactly grad_pre transposed (grad_y for
    # identity), whatever the row count relative to the kernel's 64-row chunks, with or without the
    # other outputs.
    from pyvae import _gate

    torch.manual_seed(rows + cols)
    gy = torch.randn(rows, cols).to(dtype)
    y = torch.rand(rows, cols).to(dtype)
    a = pyvae.ops.ACTIVATIONS[act]
    identity = a == pyvae.ops.ACTIVATIONS["identity"]
    gp, gb = torch.empty(rows, cols, dtype=dtype), torch.empty(cols, dtype=dtype)
    gt = torch.full((cols, rows), float("nan"), dtype=dtype)
    _gate.act_bwd(act=a, grad_y=gy, out=y, grad_pre=None if identity else gp, grad_bias=gb, grad_pre_t=gt)
    want = gy if identity else gp
    assert torch.equal(gt, want.t())
    gt_alone = torch.full((cols, rows), float("nan"), dtype=dtype)  # no grad_pre, no bias gradient
    _gate.act_bwd(act=a, grad_y=gy, out=y, grad_pre_t=gt_alone)
    assert torch.equal(gt_alone, gt)


def test_transposed_gradient_is_cpu_only():
    from pyvae import _C

    with pytest.raises(ValueError, match="CPU-only"):
        _C.act_bwd(device=1, dtype=0, act=0, rows=2, cols=2, y=0, bias=0, grad_y=1, out=0, grad_pre=0, grad_bias=0,
                   grad_pre_t=1, workspace=0, workspace_bytes=0, stream=0, device_index=0)


@pytest.mark.skipif(not pyvae._gemm.onednn_enabled(), reason="oneDNN's linear is not usable in this torch build")
@pytest.mark.parametrize("act", ["identity", "tanh"])
def test_weight_gradient_with_and_without_the_transposed_gradient(act, monkeypatch):
    # The oneDNN weight-gradient GEMM on the kernel's g.T gives what it gives on the view g.T.
    torch.manual_seed(9)
    x = torch.randn(300, 96)
    lin = pnn.FusedLinear(96, 70, act)
    g = torch.randn(300, 70)
    grads = []
    for use in (True, False):
        if not use:
            monkeypatch.setattr(pyvae._gemm, "wants_transposed_grad", lambda *a: False)
        lin.zero_grad()
        with pyvae._gemm.override("onednn", min_flops=0):
            lin(x).backward(g)
        grads.append(lin.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-6)
    ref = torch.autograd.grad(ACTS[act](F.linear(x, lin.weight, lin.bias)), lin.weight, g)[0]
    torch.testing.assert_close(grads[0], ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------ NOTE: [Backward workspace]
_la_mod = importlib.import_module("pyvae.ops.linear_act")


def _layer_grads(x0, w0, b0, act, g):
    x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
    y = pyvae.ops.linear_act(x, w, b, act)
    return torch.autograd.grad(y, (x, w, b), g)


@pytest.mark.parametrize("gemm", ["torch", "onednn"])
@pytest.mark.parametrize("rows,fin,fout,act", [(96, 160, 96, "tanh"), (40, 16, 40, "relu"), (64, 160, 20, "identity"),
                                               (128, 300, 200, "sigmoid")])
def test_backward_workspace_changes_no_gradient_and_is_reused(monkeypatch, gemm, rows, fin, fout, act):
    """The reused buffers give exactly the fresh-tensor gradients, over repeated calls (whose buffers hold
    the previous call's values) and with rows == out_features, where dL/d(pre) and its transpose (on
    oneDNN's weight-gradient path) have one shape and must not share a buffer."""
    if gemm == "onednn" and not pyvae._gemm.onednn_enabled():
        pytest.skip("torch build without a usable oneDNN linear")
    monkeypatch.setattr(pyvae._gemm, "_MIN_FLOPS", 0.0 if gemm == "onednn" else float("inf"))
    g = torch.Generator().manual_seed(rows)
    x0, w0, b0 = torch.randn(rows, fin, generator=g), torch.randn(fout, fin, generator=g), torch.randn(fout, generator=g)
    gy = [torch.randn(rows, fout, generator=g) for _ in range(3)]
    pyvae.ops.release_workspace()
    with pyvae.ops.fused_only():
        reused = [_layer_grads(x0, w0, b0, act, gi) for gi in gy]
        bufs = dict(getattr(_la_mod._WORKSPACE, "bufs", {}))
        ptrs = {k: v.data_ptr() for k, v in bufs.items()}
        _layer_grads(x0, w0, b0, act, gy[0])
        assert {k: v.data_ptr() for k, v in _la_mod._WORKSPACE.bufs.items()} == ptrs  # the same buffers again
        monkeypatch.setitem(_la_mod.WORKSPACE, "enabled", False)
        fresh = [_layer_grads(x0, w0, b0, act, gi) for gi in gy]
    for a, b in zip(reused, fresh):
        for ga, gb in zip(a, b):
            assert torch.equal(ga, gb)


def test_backward_workspace_is_bounded_per_thread(monkeypatch):
    monkeypatch.setitem(_la_mod.WORKSPACE, "max_buffers", 2)
    pyvae.ops.release_workspace()
    with pyvae.ops.fused_only():
        for rows in (5, 6, 7, 8):
            x, w = torch.randn(rows, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
            pyvae.ops.linear_act(x, w, None, "tanh").sum().backward()
    assert len(_la_mod._WORKSPACE.bufs) <= 2
    seen = {}

    def other():
        seen["bufs"] = getattr(_la_mod._WORKSPACE, "bufs", None)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen["bufs"] is None  # another thread has its own (empty) workspace
    pyvae.ops.release_workspace()
    assert _la_mod._WORKSPACE.bufs == {}


@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("activation", ["tanh", "identity"])
def test_flop_counter_counts_the_layers_products(activation, x_grad):
    """torch.utils.flop_counter counts a FusedLinear as an nn.Linear of the same shape, forward and backward
    (x's gradient or not), and a pyvae VAE's step its products: it counted 0 for pyvae's ops (NOTE: [FLOP
    counts] in pyvae/ops/linear_act.py)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    x = torch.randn(3, 16, 784, requires_grad=x_grad)
    counts = []
    for layer in (torch.nn.Linear(784, 50), pyvae.nn.FusedLinear(784, 50, activation)):
        with FlopCounterMode(display=False) as fwd:
            y = layer(x)
        with FlopCounterMode(display=False) as bwd:
            y.sum().backward()
        counts.append((fwd.get_total_flops(), bwd.get_total_flops()))
    assert counts[0] == counts[1] == (2 * 48 * 784 * 50, 2 * 48 * 784 * 50 * (2 if x_grad else 1)), counts
    model = pyvae.VAE(784, 20, 500)
    with FlopCounterMode(display=False) as step:
        model((torch.rand(8, 784) < 0.5).float())[0].sum().backward()
    products = 2 * 8 * (784 * 500 + 500 * 40 + 20 * 500 + 500 * 784)  # one pass over the four layers' products
    assert step.get_total_flops() == 3 * products - 2 * 8 * 784 * 500  # backward: no gradient for x

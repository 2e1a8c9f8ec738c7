"""The CUDA path on a GPU: float64 kernels, the vector and scalar row kernels, graph-safe randomness, tensors
on a non-current device, and device memory that stays flat. Skipped without a GPU (CONTRIBUTING.md,
"First GPU run", says how to run them and what each proves); the logic that needs no GPU is tested in
tests/test_cuda_code.py.
"""
import pytest
import torch

import pyvae
from pyvae import _gate
from pyvae.ops import bernoulli_elbo, bernoulli_log_prob, gaussian_kl, gaussian_log_prob, linear_act
from conftest import TOL, assert_close, make

GPU = torch.cuda.is_available() and pyvae.cuda_built()
pytestmark = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU and a CUDA build of pyvae")
TWO_GPUS = GPU and torch.cuda.device_count() >= 2

# (name, function, input makers): every row op, with the prior-free and prior KL separately.
ROW_OPS = [
    ("bernoulli_log_prob", bernoulli_log_prob, [dict(kind="normal", scale=3), dict(kind="binary")]),
    ("gaussian_log_prob", gaussian_log_prob, [dict(), dict(seed=1), dict(seed=2, scale=0.5)]),
    ("gaussian_kl_std", gaussian_kl, [dict(), dict(seed=1)]),
    ("gaussian_kl_prior", gaussian_kl, [dict(), dict(seed=1), dict(seed=2), dict(seed=3, scale=0.5)]),
]


def _inputs(makers, shape, dtype, device, grad=True):
    return [make(*shape, dtype=dtype, device=device, seed=m.get("seed", i), kind=m.get("kind", "normal"),
                 scale=m.get("scale", 1.0), grad=grad and m.get("kind") != "binary") for i, m in enumerate(makers)]


# ------------------------------------------------------------------------------------- float64
@pytest.mark.parametrize("name,fn,makers", ROW_OPS, ids=[o[0] for o in ROW_OPS])
@pytest.mark.parametrize("shape", [(3, 5), (2, 784), (4, 20)], ids=str)
def test_float64_gradcheck_row_ops(name, fn, makers, shape):
    """float64 reaches float64 kernels on CUDA (a float32 kernel would fail gradcheck's tolerance)."""
    inputs = _inputs(makers, shape, torch.float64, "cuda")
    assert fn(*inputs).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, inputs)


def test_float64_gradcheck_bernoulli_elbo():
    logits = make(2, 3, 784, dtype=torch.float64, device="cuda", scale=2, grad=True)
    x = make(3, 784, dtype=torch.float64, device="cuda", kind="binary", seed=1)
    mu = make(3, 20, dtype=torch.float64, device="cuda", seed=2, grad=True)
    lv = make(3, 20, dtype=torch.float64, device="cuda", seed=3, grad=True)
    assert torch.autograd.gradcheck(lambda l, m, v: bernoulli_elbo(l, x, m, v), (logits, mu, lv))


def test_float64_gradcheck_reparameterize():
    mu = make(3, 20, dtype=torch.float64, device="cuda", grad=True)
    lv = make(3, 20, dtype=torch.float64, device="cuda", seed=1, grad=True)
    fn = lambda m, v: pyvae.reparameterize(m, v, samples=2, generator=torch.Generator().manual_seed(3))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (mu, lv))


# ------------------------------------------------------------------- vector and scalar row kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,fn,makers", ROW_OPS, ids=[o[0] for o in ROW_OPS])
@pytest.mark.parametrize("cols", [784, 20, 1007, 1])
@pytest.mark.parametrize("offset", [0, 1])
def test_row_kernels_vector_and_scalar_paths(name, fn, makers, dtype, cols, offset):
    """784 and 20 columns take 16-byte loads when aligned (NOTE: [Row kernels on HBM]); 1007, 1 and a
    storage offset of one element take the scalar path. All match the float64 CPU result."""
    inputs = []
    for t in _inputs(makers, (33, cols), dtype, "cuda", grad=False):
        buf = torch.empty(t.numel() + offset, dtype=dtype, device="cuda")
        v = buf[offset:].view_as(t)
        v.copy_(t)
        inputs.append(v.requires_grad_(t.dtype.is_floating_point and makers[len(inputs)].get("kind") != "binary"))
    out = fn(*inputs)
    ref_inputs = [t.detach().double().cpu().requires_grad_(t.requires_grad) for t in inputs]
    expected = fn(*ref_inputs)
    assert_close(out, expected, dtype, scale=4)
    g = torch.randn(out.shape, dtype=torch.float64)
    wanted = [t for t in inputs if t.requires_grad]
    got = torch.autograd.grad(out, wanted, g.to(out))
    want = torch.autograd.grad(expected, [t for t in ref_inputs if t.requires_grad], g)
    for a, e in zip(got, want):
        assert_close(a, e, dtype, scale=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cols,offset", [(784, 0), (784, 1), (1007, 0)])
def test_bernoulli_elbo_vector_and_scalar_paths(dtype, cols, offset):
    buf = torch.empty(2 * 65 * cols + offset, dtype=dtype, device="cuda")
    logits = buf[offset:].view(2, 65, cols)
    logits.copy_(make(2, 65, cols, dtype=dtype, scale=2))
    logits.requires_grad_()
    x = make(65, cols, dtype=dtype, device="cuda", kind="binary", seed=1)
    mu = make(65, 20, dtype=dtype, device="cuda", seed=2, grad=True)
    lv = make(65, 20, dtype=dtype, device="cuda", seed=3, grad=True)
    out = bernoulli_elbo(logits, x, mu, lv)
    r = [t.detach().double().cpu().requires_grad_(t.requires_grad) for t in (logits, x, mu, lv)]
    expected = bernoulli_elbo(*r)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double().cpu(), expected, rtol=4 * rtol, atol=4 * atol * cols / 100)
    got = torch.autograd.grad(out.sum(), (logits, mu, lv))
    want = torch.autograd.grad(expected.sum(), (r[0], r[2], r[3]))
    for a, e in zip(got, want):
        assert_close(a, e, dtype, scale=4)


# ---------------------------------------------------------------------------- graph-safe seed
def test_reparameterize_capture_draws_anew_each_replay_and_matches_eager():
    mu = torch.randn(64, 20, device="cuda")
    lv = torch.randn(64, 20, device="cuda") * 0.1
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as torch's capture recipe does
        pyvae.reparameterize(mu, lv, samples=2)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        z = pyvae.reparameterize(mu, lv, samples=2)
    torch.cuda.manual_seed(1234)
    graph.replay()
    first = z.clone()
    graph.replay()
    second = z.clone()
    assert not torch.equal(first, second), "two replays drew the same eps (a seed frozen at capture)"
    torch.cuda.manual_seed(1234)
    eager_first = pyvae.reparameterize(mu, lv, samples=2)
    eager_second = pyvae.reparameterize(mu, lv, samples=2)
    assert torch.equal(first, eager_first)
    assert torch.equal(second, eager_second)


def test_cpu_generator_refused_under_capture():
    mu = torch.zeros(8, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="CPU generator cannot seed a draw under CUDA graph capture"):
        with torch.cuda.graph(graph):
            pyvae.reparameterize(mu, mu, generator=torch.Generator().manual_seed(1))


def test_device_seed_gives_the_cpu_stream():
    """The same seed value gives the same eps whether it is read on the host or by the kernel."""
    mu, lv = make(3, 1007, device="cuda"), make(3, 1007, device="cuda", seed=1)
    seed = torch.tensor([987654321, 5], dtype=torch.int64)
    on_host = torch.ops.pyvae.reparameterize(mu, lv, 2, seed)
    on_device = torch.ops.pyvae.reparameterize(mu, lv, 2, seed.cuda())
    assert torch.equal(on_host, on_device)
    cpu = torch.ops.pyvae.reparameterize(mu.cpu(), lv.cpu(), 2, seed)
    torch.testing.assert_close(on_device.cpu(), cpu, rtol=1e-6, atol=1e-6)


def _vae_step_setup():
    torch.manual_seed(0)
    model = pyvae.VAE(784, 20, hidden=200).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = (torch.rand(128, 784, device="cuda") < 0.5).float()
    return model, opt, x


def test_training_step_capture_draws_anew_and_matches_eager():
    """A whole training step (forward, backward, SGD update) captured in a CUDA graph: two replays draw
    different eps, and replays match eager steps from the same parameters and generator state."""
    model, opt, x = _vae_step_setup()

    def step():
        opt.zero_grad(set_to_none=False)
        objective, elbo, _ = model(x)
        (-objective.mean()).backward()
        opt.step()
        return elbo.mean()

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    model.load_state_dict(start)
    torch.cuda.manual_seed(7)
    graph.replay()
    a = out.item()
    graph.replay()
    b = out.item()
    captured = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(start)
    torch.cuda.manual_seed(7)
    ea, eb = step().item(), step().item()
    assert a != b
    assert a == pytest.approx(ea, rel=1e-5) and b == pytest.approx(eb, rel=1e-5)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(captured[k], v, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- tensors on another device
@pytest.mark.skipif(not TWO_GPUS, reason="needs two GPUs")
def test_tensors_on_the_non_current_device():
    """Every launcher runs on its tensors' device, not the current one (cuda:0 current, data on cuda:1)."""
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    l = make(8, 784, device=dev, scale=2, grad=True)
    x = make(8, 784, device=dev, kind="binary", seed=1)
    mu = make(8, 20, device=dev, seed=2, grad=True)
    lv = make(8, 20, device=dev, seed=3, grad=True)
    w = make(30, 784, device=dev, seed=4, scale=0.05, grad=True)
    b = make(30, device=dev, seed=5, grad=True)
    results = {}
    for d in (dev, torch.device("cuda", 0)):
        ins = [t.detach().to(d).requires_grad_(t.requires_grad) for t in (l, x, mu, lv, w, b)]
        tl, tx, tmu, tlv, tw, tb = ins
        outs = [bernoulli_log_prob(tl, tx), gaussian_kl(tmu, tlv), gaussian_log_prob(tl, tx, tl.detach() * 0),
                bernoulli_elbo(tl, tx, tmu, tlv),
                pyvae.reparameterize(tmu, tlv, samples=2, generator=torch.Generator().manual_seed(1)),
                linear_act(tl, tw, tb, "tanh")]
        total = sum(o.double().sum() for o in outs)
        grads = torch.autograd.grad(total, [t for t in ins if t.requires_grad])
        torch.cuda.synchronize(d)
        assert torch.cuda.current_device() == 0
        results[d.index] = [o.detach().cpu() for o in outs] + [g.cpu() for g in grads]
    for a, e in zip(results[1], results[0]):
        torch.testing.assert_close(a, e)


# ------------------------------------------------------------------------------ memory stays flat
def test_device_memory_flat_over_100_steps():
    """No allocation outside torch, and none that grows: torch's allocated and reserved bytes are the
    same after 100 training steps as after 10 (the act_bwd scratch and the cuBLASLt workspace come
    from torch and are reused)."""
    model, opt, x = _vae_step_setup()
    stats = {}
    for i in range(1, 101):
        opt.zero_grad(set_to_none=False)
        objective, _, _ = model(x)
        (-objective.mean()).backward()
        opt.step()
        if i in (10, 100):
            torch.cuda.synchronize()
            s = torch.cuda.memory_stats()
            stats[i] = (s["allocated_bytes.all.current"], s["reserved_bytes.all.current"])
    free, total = torch.cuda.mem_get_info()
    assert stats[10] == stats[100], stats
    assert free > 0 and total > 0


def test_act_bwd_bias_gradient_of_zero_rows_is_zero():
    g = torch.empty(0, 7, device="cuda")
    gb = torch.full((7,), 5.0, device="cuda")
    _gate.act_bwd(act=0, grad_y=g, grad_bias=gb, workspace=_gate.act_bwd_workspace(g))
    assert torch.equal(gb, torch.zeros(7, device="cuda"))


@pytest.mark.parametrize("rows", [1, 255, 256, 257, 70_000])
def test_act_bwd_bias_gradient_with_torch_workspace(rows):
    g = torch.randn(rows, 37, device="cuda", dtype=torch.float64)
    ws = _gate.act_bwd_workspace(g)
    assert ws is not None and ws.numel() == -(-rows // 256) * 37 * 8
    gb = torch.empty(37, device="cuda", dtype=torch.float64)
    _gate.act_bwd(act=0, grad_y=g, grad_bias=gb, workspace=ws)
    torch.testing.assert_close(gb, g.sum(0))
    with pytest.raises(RuntimeError, match="workspace must be"):
        _gate.act_bwd(act=0, grad_y=g, grad_bias=gb, workspace=ws[:-1])


# ------------------------------------------------------------------------------ cuBLASLt plan cache
@pytest.mark.skipif(not (GPU and pyvae._cublaslt.available()), reason="needs the cuBLASLt path")
def test_cublaslt_cached_plan_takes_each_calls_pointers():
    """Plans are cached per problem (NOTE: [cuBLASLt plan cache]); the bias pointer is per call: the same
    shape with another bias, from several threads at once, gives each call its own result."""
    import threading

    from pyvae import _cublaslt

    x = torch.randn(64, 96, device="cuda")
    w = torch.randn(40, 96, device="cuda") / 10
    biases = [torch.randn(40, device="cuda") for _ in range(8)]
    want = [torch.relu(x @ w.t() + b) for b in biases]
    results = [None] * len(biases)
    torch.cuda.synchronize()  # the inputs are ready before other streams read them

    def work(i):
        with torch.cuda.stream(torch.cuda.Stream()):
            y, _ = _cublaslt.linear_fwd(x, w, biases[i], _gate.ACTIVATIONS["relu"])
            torch.cuda.current_stream().synchronize()
            results[i] = y

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(biases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, exp in zip(results, want):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not (GPU and pyvae._cublaslt.available()), reason="needs the cuBLASLt path")
def test_cublaslt_cached_plan_takes_a_less_aligned_bias_and_mask():
    """The heuristic chose the first call's algorithm for its bias and mask pointers' alignment
    (cublasLt.h); the plan key holds those alignments (NOTE: [cuBLASLt plan cache]), so the same problem
    with a bias 16 bytes off a 256-byte boundary, or a ReLU mask at an odd byte offset, gets an algorithm
    that can read it (or the DEFAULT fallback) and the same numbers."""
    from pyvae import _cublaslt

    relu = _gate.ACTIVATIONS["relu"]
    x = make(64, 96, device="cuda", seed=1)
    w1 = make(48, 96, device="cuda", seed=2, scale=0.1)
    b1 = make(48, device="cuda", seed=3)
    w2 = make(40, 48, device="cuda", seed=4, scale=0.1)
    gz = make(64, 40, device="cuda", seed=5)
    # The bias again, 16 bytes past the start of a fresh (>= 256-byte-aligned) buffer: _aligned keeps it.
    bias_buf = torch.empty(4 + 48, device="cuda")
    b_view = bias_buf[4:]
    b_view.copy_(b1)
    assert b_view.data_ptr() % 256 == 16

    want_y = torch.relu(x @ w1.t() + b1)
    y_fresh, _ = _cublaslt.linear_fwd(x, w1, b1, relu)
    y_view, _ = _cublaslt.linear_fwd(x, w1, b_view, relu)
    torch.cuda.synchronize()  # a misaligned access is reported here, not at the launch
    torch.testing.assert_close(y_fresh, want_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y_view, want_y, rtol=1e-4, atol=1e-4)

    x2, aux = _cublaslt.linear_fwd(x, w1, b1, relu, want_aux=True)
    assert aux is not None, "cuBLASLt wrote no ReLU mask for a float32 problem"
    # The same mask one byte into a larger buffer: contiguous, of the shape linear_dgrad_relu checks.
    aux_buf = torch.empty(aux.numel() + 1, dtype=torch.uint8, device="cuda")
    aux_view = aux_buf[1:].view(aux.shape)
    aux_view.copy_(aux)
    want_h = (gz @ w2) * (x2 > 0)
    for mask in (aux, aux_view):
        got = _cublaslt.linear_dgrad_relu(gz, w2, x2, mask, True)
        assert got is not None, "linear_dgrad_relu declined a float32 problem"
        torch.cuda.synchronize()
        torch.testing.assert_close(got[0], want_h, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[1], want_h.sum(0), rtol=1e-4, atol=1e-4)

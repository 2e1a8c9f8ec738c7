"""``reparameterize(mu, logvar, *, samples=None, generator=None)``: z = mu + exp(logvar / 2) * eps with eps
drawn inside the kernel (Philox4x32-10, counter-based), and the placement of a data-parallel shard's
draw inside the draw of the whole batch.

Math: csrc/ops/reparameterize.h and csrc/ops/philox.h; kernels: csrc/cpu/reparameterize.cpp,
csrc/cuda/reparameterize.cu; tests: tests/test_reparameterize.py, tests/test_philox.py; benchmark key
``reparam`` of ``pyvae bench elbo``.
"""
from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch

from .. import _gate
from . import _checks as V
from ._registry import call, eager_ok, first_order_only, register, remember, tracing
from ._rowwise import checked_plan, plan, reduce_grad

__all__ = ["reparameterize", "draw_seed", "seed_for", "seed_stays_tensor", "reparameterize_shard"]

_OP = "reparameterize"


def _plan(mu, logvar, samples, seed, fake: bool = False):
    # (the fake kernels without plan's fast path: NOTE: [Fake kernels plan without the fast path] in _rowwise.py)
    shape, dtype, device = (checked_plan if fake else plan)(_OP, [("mu", mu), ("logvar", logvar)])
    if not isinstance(samples, int) or samples < 0:
        raise ValueError(f"pyvae.{_OP}: samples must be a non-negative int (0: no sample dim), got {samples!r}")
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.shape != (2,):
        raise ValueError(f"pyvae.{_OP}: seed must be an int64 tensor of shape [2] (seed, offset)")
    if not (seed.is_cpu or seed.device == device):
        raise ValueError(f"pyvae.{_OP}: seed must be on the CPU or on mu's device {device}, got {seed.device}")
    if seed.device.type != "cpu" and seed.device != device:
        raise ValueError(f"pyvae.{_OP}: seed must be on the CPU or on mu's device {device}, got {seed.device}")
    shape = tuple(shape)
    return shape, ((samples, *shape) if samples > 0 else shape), dtype, device


# NOTE: [Graph-safe seed]
# A draw is keyed by (seed, offset) (csrc/ops/philox.h, NOTE: [Counter-based eps]). On the CPU the op
# reads both from its int64 [2] seed tensor on the host and passes them by value. For CUDA inputs the
# seed tensor may instead live on the inputs' device; the kernels then read it through a pointer
# (ReparamParams.seed_ptr) and nothing is read on the host. That is what makes the op usable under
# CUDA graph capture: ``seed_for`` draws the seed with torch.randint on the device's CUDA generator,
# which torch makes graph-safe (a captured graph advances the generator on every replay and the
# captured randint writes that replay's value), so each replay draws new eps, and a replay after
# ``torch.cuda.manual_seed(s)`` draws the eps an eager call after the same seeding draws. A host seed
# would be frozen into the captured kernel's arguments (every replay the same eps, silently), and a
# host read of a CUDA generator's draw (.item()) synchronizes, which capture forbids: a CPU generator
# is therefore refused under capture. The seed value -> eps mapping is the same on both paths, so a
# given seed gives the same eps on the CPU and on a GPU.
_SEED_BOUND = 2**62


def _seed_words(seed: torch.Tensor):
    s, off = seed.tolist()
    return s & 0xFFFFFFFFFFFFFFFF, off & 0xFFFFFFFFFFFFFFFF


def _key(seed: torch.Tensor, device: torch.device):
    """``(seed, offset, seed_tensor)`` for the gate: the words by value from a host seed, or the device
    tensor itself (read by the kernel, NOTE: [Graph-safe seed])."""
    if seed.device.type == "cpu":
        s, off = _seed_words(seed)
        return s, off, None
    return 0, 0, seed.contiguous()


def _dense(t: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
    """``t`` as a contiguous ``dtype`` tensor of ``shape`` (itself when it already is one)."""
    if t.dtype == dtype and t.shape == shape and t.is_contiguous():
        return t
    return t.to(dtype).expand(shape).contiguous()


def _impl(mu, logvar, samples, seed):
    shape, out_shape, dtype, device = _plan(mu, logvar, samples, seed)
    _gate.check_device(_OP, device)
    z = torch.empty(out_shape, dtype=dtype, device=device)
    if z.numel() == 0:
        return z
    cd = _gate.kernel_dtype(dtype, device)
    zc = z if cd == dtype else torch.empty(out_shape, dtype=cd, device=device)
    s, off, seed_t = _key(seed, device)
    _gate.reparameterize_fwd(mu=_dense(mu, cd, shape), logvar=_dense(logvar, cd, shape), z=zc,
                             samples=max(samples, 1), seed=s, offset=off, seed_tensor=seed_t)
    if zc is not z:
        z.copy_(zc)
    return z


def _check_backward(grad, mask, out_shape, device):
    V.grad_of(_OP + "_backward", grad, out_shape, device)
    V.output_mask(_OP + "_backward", mask, 2)


def _bwd_impl(grad, mu, logvar, samples, seed, mask):
    shape, out_shape, dtype, device = _plan(mu, logvar, samples, seed)
    _check_backward(grad, mask, out_shape, device)
    _gate.check_device(_OP, device)
    cd = _gate.kernel_dtype(dtype, device)
    n = V.numel(shape)
    # The kernel writes every element of each gradient it is given (its first sample assigns), so
    # they need no zero fill unless it does not run.
    runs = n > 0 and (mask[0] or mask[1]) and V.numel(out_shape) > 0
    alloc = torch.empty if runs else torch.zeros
    g_mu = alloc(shape, dtype=cd, device=device) if mask[0] else None
    g_lv = alloc(shape, dtype=cd, device=device) if mask[1] else None
    if runs:
        s, off, seed_t = _key(seed, device)
        _gate.reparameterize_bwd(logvar=_dense(logvar, cd, shape), grad_out=_dense(grad, cd, out_shape), grad_mu=g_mu,
                                 grad_logvar=g_lv, samples=max(samples, 1), seed=s, offset=off, seed_tensor=seed_t)
    return (
        reduce_grad(g_mu, mu) if mask[0] else mu.new_zeros(1),
        reduce_grad(g_lv, logvar) if mask[1] else logvar.new_zeros(1),
    )


def _fake(mu, logvar, samples, seed):
    return mu.new_empty(_plan(mu, logvar, samples, seed, fake=True)[1])


def _bwd_fake(grad, mu, logvar, samples, seed, mask):
    _, out_shape, _, device = _plan(mu, logvar, samples, seed, fake=True)
    _check_backward(grad, mask, out_shape, device)
    return tuple(t.new_empty(t.shape) if m else t.new_zeros(1) for t, m in zip((mu, logvar), mask))


register(
    _OP,
    "reparameterize(Tensor mu, Tensor logvar, int samples, Tensor seed) -> Tensor",
    "reparameterize_backward(Tensor grad, Tensor mu, Tensor logvar, int samples, Tensor seed, bool[] output_mask)"
    " -> (Tensor, Tensor)",
    impl=_impl, bwd_impl=_bwd_impl, fake=_fake, bwd_fake=_bwd_fake, n_tensors=2,
)


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"pyvae.reparameterize: generator must be a torch.Generator or None, "
                        f"got {type(generator).__name__}")


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """One Philox seed in [0, 2**62) drawn from ``generator`` (default: torch's global CPU generator), read
    on the host. For a draw on a GPU, ``seed_for`` keeps the seed on the device (NOTE: [Graph-safe seed])."""
    _check_generator(generator)
    return int(_host_draw(generator).item())


def _host_draw(generator: Optional[torch.Generator]) -> torch.Tensor:
    """The ``[1]`` int64 tensor ``draw_seed`` reads (on the generator's device; torch's CPU one by default)."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, _SEED_BOUND, (1,), dtype=torch.int64, device=device, generator=generator)


def _seed_tensor(seed: int, offset: int = 0) -> torch.Tensor:
    return torch.tensor([seed, offset], dtype=torch.int64)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def seed_source(device: torch.device, generator: Optional[torch.Generator], capturing: bool) -> str:
    """Where a draw for inputs on ``device`` takes its seed (NOTE: [Graph-safe seed]): ``"host"`` (read
    on the CPU, passed by value) or ``"device"`` (drawn into a device tensor the kernel reads). Raises
    for a CPU generator under CUDA graph capture, whose draw every replay would repeat."""
    _check_generator(generator)
    if device.type != "cuda":
        return "host"
    if generator is None or generator.device.type == "cuda":
        return "device"
    if capturing:
        raise RuntimeError("pyvae.reparameterize: a CPU generator cannot seed a draw under CUDA graph capture "
                           "(every replay would repeat the captured draw); pass a CUDA generator or None")
    return "host"


# NOTE: [Seeds under torch.compile]
# Eager CPU draws read their seed on the host (``draw_seed``: randint, then ``.item()``). Traced by
# torch.compile, that ``.item()`` is a graph break (a data-dependent error under fullgraph=True when the int goes
# on into Python arithmetic, as pyvae.VAE's does; torch.export fails on it too), and the int it returns enters the
# next graph as a constant that is guarded on: each call's new seed recompiles until torch's limit, then the frame
# runs eagerly. So while tracing the seed stays a tensor: ``seed_for`` makes the op's ``[seed, 0]`` from the same
# randint draw (the same value, the generator advanced as in eager) by tensor ops, and ``reparameterize_shard``
# treats a CPU seed tensor as it does a device one (NOTE: [Graph-safe seed]). Its unsharded draw mixes the seed
# where B * Z is off a counter boundary (NOTE: [Sharded draws]); a Python test of B * Z % k would guard on the
# batch size (a recompile when B * Z % k changes, a violated constraint for torch.export), so while tracing
# the mixed or the plain seed is chosen by tensor ops (``_mix_seed_where``). Same z as eager for the same seed;
# eager calls never take these paths. torch.jit.trace takes them too (a host seed would be frozen into its
# graph, every call of the traced module drawing the same eps), and so does a call under a torch dispatch mode
# (FakeTensorMode's tensors have no value to read; a real-tensor mode, a FLOP counter, sees the same draw):
# ``seed_stays_tensor()``.
def seed_stays_tensor() -> bool:
    """Whether a CPU draw keeps its seed a tensor (NOTE: [Seeds under torch.compile])."""
    return tracing() or torch._C._len_torch_dispatch_stack() > 0


def _traced_host_seed(generator: Optional[torch.Generator]) -> torch.Tensor:
    """``seed_for``'s host seed ``[seed, 0]`` with no host read (NOTE: [Seeds under torch.compile])."""
    s = _host_draw(generator)
    return torch.cat([s, torch.zeros_like(s)])


def seed_for(device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The op's int64 ``[2]`` seed tensor ``(seed, 0)``, seed in [0, 2**62), for a draw on ``device``.

    CPU inputs, or a CPU generator: drawn from ``generator`` (default torch's global CPU generator) and
    held on the host, as ``draw_seed``. CUDA inputs with a CUDA generator or none (then the device's
    default CUDA generator): drawn on the device with no host read, graph-safe (NOTE: [Graph-safe seed]).
    """
    device = torch.device(device)
    if seed_source(device, generator, device.type == "cuda" and _capturing()) == "host":
        if seed_stays_tensor():
            return _traced_host_seed(generator)
        return _seed_tensor(draw_seed(generator))
    gen_device = generator.device if generator is not None else device
    seed = torch.randint(0, _SEED_BOUND, (2,), dtype=torch.int64, device=gen_device, generator=generator)
    seed[1:].zero_()  # the offset; two draws rather than one plus a host-made zero (no host tensor)
    return seed if gen_device == device else seed.to(device)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, *, samples: Optional[int] = None,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * eps with eps ~ N(0, I) drawn inside the kernel (Philox4x32-10).

    Args:
        mu: ``[...]`` float tensor.
        logvar: float tensor broadcastable with ``mu``.
        samples: ``None`` for one draw of ``mu``'s shape, or ``L >= 1`` for ``[L, *shape]``.
        generator: torch generator to seed from. Default: torch's global CPU generator for CPU inputs,
            the device's default CUDA generator for CUDA inputs (so ``torch.manual_seed`` makes pyvae
            reproducible, and a CUDA graph capture draws anew on every replay: NOTE: [Graph-safe seed]).
            The same seed value gives the same z on every device and thread count: a CPU generator
            seeded alike gives CPU and CUDA inputs the same draw.

    Returns:
        ``z``, differentiable in ``mu`` and ``logvar``. CPU eager calls keep their eps for backward (4 bytes
        per element of z, 8 for float64: NOTE: [Saved eps] in csrc/cpu/reparameterize.cpp); elsewhere
        backward draws them again.
    """
    if samples is not None:
        try:  # integer-like (numpy integers too); not bool, float or str
            n = operator.index(samples) if not isinstance(samples, bool) else None
        except TypeError:
            n = None
        if n is None or not 1 <= n < 2**62:
            raise ValueError(f"pyvae.reparameterize: samples must be None or an int in [1, 2**62), got {samples!r}")
        samples = n
    samples = 0 if samples is None else samples
    lean = _lean(mu, logvar, samples, generator)
    if lean is not None:
        return lean.run(mu, logvar, draw_seed(generator), 0)
    seed = seed_for(mu.device, generator) if isinstance(mu, torch.Tensor) else _seed_tensor(draw_seed(generator))
    return call(_OP, mu, logvar, samples, seed)


# NOTE: [Lean reparameterize]
# As for the row ops (NOTE: [Lean row calls] in _rowwise.py): at the paper's batch the kernel runs in a
# microsecond or two and the Python around it was most of the op (B=100, Z=20: 133 us forward + backward
# against eager's 110, bench/RESULTS.md stop 10), including a host seed that went int -> tensor -> int. So
# an eager CPU call with mu and logvar of one shape, float32/float64 (strided ones copied first, as the
# general path does), seeded from a CPU generator, is planned once per key (everything the op's checks look
# at): the two kernel calls (and, where logvar's gradient is wanted, their twins that keep and read eps:
# NOTE: [Saved eps] in csrc/cpu/reparameterize.cpp) are prepared by the gate and a call draws the seed as an
# int, allocates and runs the kernel. The seed is the same draw from the same generator as the general
# path's and the kernels are the same, so z and its gradients are bit for bit the general path's
# (tests/test_reparameterize.py).
_LEAN: dict = {}
_LEAN_MAX = 1024
_U64 = 0xFFFFFFFFFFFFFFFF


def _lean(mu, logvar, samples: int, generator) -> Optional["_LeanDraw"]:
    """The lean plan of this call, or None where the general path must run."""
    if (type(mu) is not torch.Tensor and type(mu) is not torch.nn.Parameter) or \
            (type(logvar) is not torch.Tensor and type(logvar) is not torch.nn.Parameter) or not mu.is_cpu:
        return None
    if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != "cpu"):
        return None
    # Before the key: under torch.compile, hashing the shapes into it would specialize them to constants
    # (a recompile per batch size, an error under mark_dynamic); the registered op runs there.
    if not eager_ok(mu, logvar):
        return None
    train = torch.is_grad_enabled() and (mu.requires_grad or logvar.requires_grad)
    k = (samples, train, mu.dtype, mu.shape, mu.requires_grad, mu.is_contiguous(), logvar.dtype, logvar.shape,
         logvar.requires_grad, logvar.is_contiguous(), logvar.device)
    lean = _LEAN.get(k)
    if lean is None:
        _plan(mu, logvar, samples, _seed_tensor(0))  # the op's checks, once per key
        ok = (mu.dtype in (torch.float32, torch.float64) and logvar.dtype == mu.dtype and logvar.is_cpu
              and mu.shape == logvar.shape and mu.numel() > 0)
        mask = (train and mu.requires_grad, train and logvar.requires_grad)
        lean = remember(_LEAN, k, _LeanDraw(mu.shape, mu.dtype, samples, mask) if ok else False, _LEAN_MAX)
    return lean or None


class _LeanDraw:
    """The kernel calls of one key (NOTE: [Lean reparameterize])."""

    __slots__ = ("shape", "out_shape", "dtype", "train", "mask", "fwd", "bwd", "fwd_keep", "bwd_kept")

    def __init__(self, shape, dtype: torch.dtype, samples: int, mask):
        """CPU draws of ``samples`` samples (0: no sample dim) from mu, logvar of ``shape`` and ``dtype``; ``mask``:
        (mu's, logvar's) gradient wanted (neither: no backward)."""
        self.shape, self.dtype, self.mask = tuple(shape), dtype, (bool(mask[0]), bool(mask[1]))
        self.train = train = any(self.mask)
        self.out_shape = (samples, *self.shape) if samples > 0 else self.shape
        n, k, cpu = V.numel(self.shape), max(samples, 1), torch.device("cpu")
        self.fwd = _gate.prepare_reparameterize("fwd", dtype=dtype, device=cpu, numel=n, samples=k)
        self.bwd = (_gate.prepare_reparameterize("bwd", dtype=dtype, device=cpu, numel=n, samples=k,
                                                 grads=self.mask) if train else None)
        # NOTE: [Saved eps] in csrc/cpu/reparameterize.cpp: the logvar gradient reads the forward's normals
        keep = self.mask[1]
        self.fwd_keep = (_gate.prepare_reparameterize("fwd", dtype=dtype, device=cpu, numel=n, samples=k,
                                                      eps=True) if keep else None)
        self.bwd_kept = (_gate.prepare_reparameterize("bwd", dtype=dtype, device=cpu, numel=n, samples=k,
                                                      grads=self.mask, eps=True) if keep else None)

    def forward(self, mu, logvar, seed: int, offset: int) -> torch.Tensor:
        z = torch.empty(self.out_shape, dtype=self.dtype)
        self.fwd(mu, logvar, z, seed, offset)
        return z

    def forward_keeping_eps(self, mu, logvar, seed: int, offset: int):
        """(z, eps): the draw and its normals (NOTE: [Saved eps]), where the logvar gradient is wanted."""
        if self.fwd_keep is None:
            return self.forward(mu, logvar, seed, offset), None
        z = torch.empty(self.out_shape, dtype=self.dtype)
        eps = torch.empty(self.out_shape, dtype=self.dtype)
        self.fwd_keep(mu, logvar, z, eps, seed, offset)
        return z, eps

    def backward(self, grad, inputs, seed: int, offset: int, eps=None):
        mu, logvar = inputs
        if grad.dtype != self.dtype:
            grad = grad.to(self.dtype)
        if not grad.is_contiguous():
            grad = grad.contiguous()
        grads = [torch.empty(self.shape, dtype=self.dtype) for m in self.mask if m]
        if eps is not None:
            self.bwd_kept(logvar.contiguous(), grad, *grads, eps, seed, offset)
        else:
            self.bwd(logvar.contiguous(), grad, *grads, seed, offset)
        if torch.is_grad_enabled():  # NOTE: [No double backward]
            grads = list(first_order_only(_OP, tuple(grads), (mu, logvar)))
        return tuple(grads.pop(0) if m else None for m in self.mask)

    def run(self, mu, logvar, seed: int, offset: int) -> torch.Tensor:
        """z for the draw (seed, offset): Philox counter words as the general path passes them."""
        if self.train:
            return _LeanDrawFn.apply(self, (seed, offset), mu, logvar)
        return self.forward(mu.contiguous(), logvar.contiguous(), seed, offset)


class _LeanDrawFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lean, key, mu, logvar):
        ctx.lean, ctx.key = lean, key
        ctx.save_for_backward(mu, logvar)  # mu for NOTE: [No double backward]: its edge
        # (strided views, e.g. GaussianHead's mu and logvar, are copied for the kernel)
        z, ctx.eps = lean.forward_keeping_eps(mu.contiguous(), logvar.contiguous(), *key)
        return z

    @staticmethod
    def backward(ctx, grad):
        return (None, None) + ctx.lean.backward(grad, ctx.saved_tensors, *ctx.key, eps=ctx.eps)


# NOTE: [Sharded draws]
# Element i of a draw depends only on (seed, i) (csrc/ops/philox.h, NOTE: [Counter-based eps]): it
# takes lane i % NORMALS_PER_COUNTER of counter offset + i // NORMALS_PER_COUNTER. So a process that
# holds rows [row0, row0 + B) of a global batch of ``rows`` rows can draw exactly the eps a single
# process would use for those rows by starting each sample's draw at the counter of its first
# element. That needs the shard's first element, and each sample's, on a counter boundary; when
# they are not, the ranks fall back to independent seeds (same distribution, different draws).
_MIX = 0x9E3779B97F4A7C15


def _to_int64(v: int) -> int:
    """``v mod 2**64`` as a signed int64 (what a device int64 add wraps with)."""
    v &= 0xFFFFFFFFFFFFFFFF
    return v - 2**64 if v >= 2**63 else v


def _mix_seed(seed: torch.Tensor, row0: int) -> torch.Tensor:
    """``[(seed[0] + _MIX * (row0 + 1)) mod 2**62, 0]`` with int64 tensor arithmetic on seed's device (no
    host read): the int64 add wraps mod 2**64, and 2**62 divides 2**64, so the masked result equals the
    host path's Python-integer one."""
    s = (seed[:1] + _to_int64(_MIX * (row0 + 1))).bitwise_and_(_SEED_BOUND - 1)
    return torch.cat([s, torch.zeros_like(s)])


def _mix_seed_where(seed: torch.Tensor, misaligned) -> torch.Tensor:
    """The op's ``[seed, 0]`` of an unsharded draw: ``_mix_seed(seed, 0)``'s where ``misaligned`` (an int, or
    a symbolic one under torch.compile) is nonzero, else ``seed``'s own, chosen by tensor ops (no guard on
    ``misaligned``)."""
    m = torch.full((1,), misaligned, dtype=torch.int64, device=seed.device)
    s = torch.where(m != 0, _mix_seed(seed, 0)[:1], seed[:1])
    return torch.cat([s, torch.zeros_like(s)])


def _mixed_host_seed(seed: int, row0: int) -> int:
    return (seed + _MIX * (row0 + 1)) % _SEED_BOUND


def host_draw_seed(seed: int, rows: int, z_dim: int) -> int:
    """The kernel's seed word of ``reparameterize_shard``'s unsharded draw of ``[rows, z_dim]`` (one sample)
    from a host seed in [0, 2**62) (``draw_seed``'s): the seed, mixed where rows * z_dim is off a counter
    boundary (NOTE: [Sharded draws]); its counter offset is 0."""
    return (_mixed_host_seed(seed, 0) if (rows * z_dim) % _gate.NORMALS_PER_COUNTER else seed) & _U64


def kept_draw(shape, dtype: torch.dtype) -> "_LeanDraw":
    """The lean draw (NOTE: [Lean reparameterize]) of one sample of z for contiguous CPU ``mu, logvar`` of
    ``shape`` ``[rows, Z]`` and ``dtype`` (float32 or float64), both differentiated, its normals kept (NOTE:
    [Saved eps] in csrc/cpu/reparameterize.cpp): ``forward_keeping_eps(mu, logvar, seed, 0)`` and
    ``backward(grad_z, (None, logvar), seed, 0, eps)``, ``seed`` the kernel's seed word (``host_draw_seed``).
    The draw of a one-node VAE step (NOTE: [One-node VAE step] in pyvae/ops/vae_step.py): the kernels and
    Philox words of ``reparameterize``, so the same z for the same seed."""
    k = ("kept", tuple(shape), dtype)
    d = _LEAN.get(k)
    return d if d is not None else remember(_LEAN, k, _LeanDraw(shape, dtype, 0, (True, True)), _LEAN_MAX)


def reparameterize_shard(mu: torch.Tensor, logvar: torch.Tensor, samples: int, seed,
                         shard: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """``[samples, B, Z]`` z for ``mu, logvar [B, Z]`` from ``seed``; with ``shard = (row0, rows)`` the
    eps of row b of sample l is the one a single process drawing ``[samples, rows, Z]`` would use for
    row ``row0 + b`` (NOTE: [Sharded draws]). Runs the op as ``reparameterize`` does (NOTE: [Eager fast path]).

    ``seed``: an int, or an op seed tensor from ``seed_for`` (on mu's device for a graph-safe draw; its
    offset word is ignored). The same seed value gives the same z either way."""
    B, Z = mu.shape[-2], mu.shape[-1]
    row0, rows = (0, B) if shard is None else shard
    k = _gate.NORMALS_PER_COUNTER
    on_device = isinstance(seed, torch.Tensor) and seed.device.type != "cpu"
    if isinstance(seed, torch.Tensor) and not on_device:
        if seed_stays_tensor():  # kept a tensor: NOTE: [Seeds under torch.compile]
            on_device = True
        else:
            seed = int(seed[0])
    if shard is None and on_device and seed_stays_tensor():
        # the seed mixed as below, chosen by tensor ops (NOTE: [Seeds under torch.compile])
        return call(_OP, mu, logvar, samples, _mix_seed_where(seed, (B * Z) % k))
    if (row0 * Z) % k or (rows * Z) % k:
        seed = _mix_seed(seed, row0) if on_device else _mixed_host_seed(seed, row0)
        row0, rows = 0, B

    def key(offset: int):
        if not on_device:
            return _seed_tensor(seed, offset)
        t = seed.clone()
        t[1:].fill_(offset)
        return t

    # The lean path (NOTE: [Lean reparameterize]) for a host seed the general path's int64 seed tensor holds
    # (a Python int in [-2**63, 2**63)), as the same 64-bit words.
    host = not on_device and type(seed) is int and -2**63 <= seed < 2**63
    if row0 == 0 and rows == B:
        lean = _lean(mu, logvar, samples, None) if host else None
        return lean.run(mu, logvar, seed & _U64, 0) if lean is not None else call(_OP, mu, logvar, samples, key(0))
    lean = _lean(mu, logvar, 0, None) if host else None
    zs = [lean.run(mu, logvar, seed & _U64, (l * rows + row0) * Z // k) if lean is not None
          else call(_OP, mu, logvar, 0, key((l * rows + row0) * Z // k)) for l in range(samples)]
    return torch.stack(zs)

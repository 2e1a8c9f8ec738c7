"""The one door to pyvae's compiled core, ``pyvae._C``.

NOTE: [The gate]
``pyvae._C`` takes raw pointers (it does not link libtorch, DESIGN.md decision 2), so a tensor whose
layout differs from what a kernel assumes is read wrongly or out of bounds, silently. Every call into
``_C`` therefore goes through this module, and only this module (``tests/test_layers.py`` keeps it so):
each entry takes tensors, checks for each one the dtype, device, contiguity and element count its
kernel assumes, and only then passes ``data_ptr()``s to ``_C``, by keyword (or, for a prepared call,
in the positions the binding's own signature gives those names: NOTE: [Prepared kernel calls]). The
ops validate user input first and name the user's argument; a check that fails here means pyvae's own
op code handed over a wrong tensor, so it raises ``RuntimeError`` naming the kernel and the tensor
instead of running the kernel.

The codes (device, dtype, activation) and which dtypes each kernel family takes on each device are
defined once in C++ (NOTE: [Codes are defined here] in csrc/bindings.cpp) and read here.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Sequence, Tuple

import torch

from . import _C

__all__ = [
    "ACTIVATIONS", "DTYPE_CODES", "NORMALS_PER_COUNTER", "cuda_built", "cublaslt_built", "kernel_dtype", "check_device",
    "stream", "rowwise", "prepare_rowwise", "prepare_reparameterize", "KernelCall", "gather_binarize", "advise_huge_pages",
    "reparameterize_fwd", "reparameterize_bwd", "bias_act_fwd", "act_bwd", "act_bwd_workspace",
    "act_bwd_workspace_bytes", "device_index", "cublaslt_linear", "CUDA_KERNEL_DTYPES",
]

_BY_NAME = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}

DTYPE_CODES = {_BY_NAME[name]: code for name, code in _C.dtype_codes.items()}
ACTIVATIONS = dict(_C.activation_codes)  # name -> code, e.g. "tanh" -> 2
DEVICE_CODES = dict(_C.device_codes)  # "cpu" / "cuda" -> code
ROWWISE_DTYPES = {dev: tuple(_BY_NAME[n] for n in names) for dev, names in _C.rowwise_dtypes.items()}
LINEAR_DTYPES = {dev: tuple(_BY_NAME[n] for n in names) for dev, names in _C.linear_dtypes.items()}
# Standard normals per Philox counter: element i of a draw uses counter offset + i // this
# (csrc/ops/philox.h, NOTE: [Counter-based eps]).
NORMALS_PER_COUNTER = int(_C.normals_per_counter)

# The dtypes the CUDA launchers instantiate kernels for, per family ("rowwise", "reparameterize",
# "linear"), read from the launchers' own dispatch lists (NOTE: [CUDA kernel dtypes] in
# csrc/cuda/common.cuh); None in a build without CUDA.
CUDA_KERNEL_DTYPES = (None if _C.cuda_kernel_dtypes is None else
                      {fam: tuple(_BY_NAME[n] for n in names) for fam, names in _C.cuda_kernel_dtypes.items()})

# PYVAE_CPU_ARCH picks the CPU kernel build when _C loads (csrc/cpu/dispatch.cpp), capped at what the
# processor runs. A name no build has (a typo: "avx-512", "AVX2") was silently the best build, so a run
# meant to measure avx2 kernels measured avx512 ones: refused here, as PYVAE_TUNE and PYVAE_CPU_GEMM are.
CPU_ARCH_NAMES = ("avx512", "avx2", "base")  # the builds of kTables in csrc/cpu/dispatch.cpp
_ARCH_ENV = os.environ.get("PYVAE_CPU_ARCH")
if _ARCH_ENV and _ARCH_ENV not in CPU_ARCH_NAMES:  # (empty: unset, as for the C++ side)
    raise ValueError(f"PYVAE_CPU_ARCH must be one of {', '.join(CPU_ARCH_NAMES)} (or unset: the best this CPU "
                     f"runs), got {_ARCH_ENV!r}")

cuda_built = bool(_C.cuda_built)
cublaslt_built = bool(_C.cublaslt_built)
cublaslt_header_version = int(_C.cublaslt_header_version)

_CPU = DEVICE_CODES["cpu"]
_CUDA = DEVICE_CODES["cuda"]


def kernel_dtype(dtype: torch.dtype, device: torch.device, family: str = "rowwise") -> torch.dtype:
    """The dtype a kernel of ``family`` ("rowwise": row ops and reparameterize; "linear": the linear
    epilogues) computes ``dtype`` inputs in on ``device``: the dtype itself where a kernel for it is
    built, else float32 (the CPU's half types)."""
    table = ROWWISE_DTYPES if family == "rowwise" else LINEAR_DTYPES
    return dtype if dtype in table[device.type] else torch.float32


def stream(device: torch.device) -> int:
    """The current CUDA stream of ``device`` as an integer handle (0 on CPU)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def device_index(device: torch.device) -> int:
    """The CUDA ordinal of ``device``, which the launchers make current (0 on CPU). A tensor's device
    always has its index; a bare ``cuda`` means the current device, as in torch."""
    if device.type != "cuda":
        return 0
    return device.index if device.index is not None else torch.cuda.current_device()


def _fail(kernel: str, name: str, t, want: str) -> None:
    got = (f"{t.dtype} {tuple(t.shape)} with strides {t.stride()} on {t.device}"
           if isinstance(t, torch.Tensor) else type(t).__name__)
    raise RuntimeError(f"pyvae._gate.{kernel}: {name} must be {want}, got {got} (a bug in pyvae: please report it)")


def _ptr(kernel: str, name: str, t: Optional[torch.Tensor], dtype: torch.dtype, device: torch.device, numel: int,
         optional: bool = False) -> int:
    """``t.data_ptr()`` after checking that ``t`` is a contiguous ``dtype`` tensor of ``numel`` elements on
    ``device`` (0 for an optional ``None``)."""
    if t is None:
        if optional:
            return 0
        _fail(kernel, name, t, "a tensor")
    if not isinstance(t, torch.Tensor) or t.dtype != dtype \
            or t.device != device or t.numel() != numel or not t.is_contiguous():
        _fail(kernel, name, t, f"a contiguous {dtype} tensor of {numel} elements on {device}")
    return t.data_ptr()


def check_device(op: str, device: torch.device) -> None:
    """Raises the error a user sees for CUDA tensors when this build has no CUDA kernels."""
    if device.type == "cuda" and not cuda_built:
        raise RuntimeError(f"pyvae.{op}: got CUDA tensors, but this pyvae was built without CUDA kernels "
                           "(rebuild with nvcc on PATH, or PYVAE_CUDA=ON)")


def _device_code(kernel: str, device: torch.device) -> int:
    if device.type == "cpu":
        return _CPU
    if device.type == "cuda":
        check_device(kernel, device)
        return _CUDA
    raise RuntimeError(f"pyvae._gate.{kernel}: no kernels for device {device}")


def _dtype_code(kernel: str, dtype: torch.dtype, device: torch.device, table) -> int:
    if dtype not in table[device.type]:
        raise RuntimeError(f"pyvae._gate.{kernel}: no {dtype} kernel on {device.type}")
    return DTYPE_CODES[dtype]


# ------------------------------------------------------------------------------ row reductions
# Operands a..d of each row kernel (csrc/cpu/kernels.h): how many of them are required, and whether
# the kernel's layout is the fused ELBO's (logits [samples * rows, cols], x [mod, cols],
# mu / logvar [rows, cols2]) or the plain one (each operand [mod, cols], row r reads row r % mod).
_ROWWISE = {
    "bernoulli_log_prob": 2,
    "continuous_bernoulli_log_prob": 2,
    "gaussian_log_prob": 3,
    "gaussian_kl": 2,  # c, d (the prior) optional, both or neither
    "bernoulli_elbo": 4,
}


def _arg_order(fn) -> Tuple[str, ...]:
    """The parameter names of binding ``fn`` in order, as pybind11 writes them into its signature (the
    names each binding declares with ``py::arg``)."""
    head = fn.__doc__.split("->")[0]
    return tuple(re.findall(r"(\w+):", head[head.index("(") + 1:]))


# NOTE: [Prepared kernel calls]
# At the paper's batch a row op's kernel runs in about a microsecond, and building and checking its call
# here took ~12 us (22 keyword arguments parsed by pybind11 alone: ~4 us). A prepared call splits the
# work: ``prepare_rowwise`` checks once what does not change between calls of one shape (op, direction,
# sizes, operand row counts, dtype and device codes, which operands and gradients take part) and fixes
# the binding's argument list, with the names mapped to positions by the binding's own signature
# (``_arg_order``), so nothing depends on a hand-written order. Each call then checks only the tensors
# (dtype, element count, contiguity, device: ``_ptr``) and passes their pointers in that list:
# ~0.3 us a tensor and one positional call (~2 us with the kernel). ``rowwise`` is a prepared call made
# and used once, so both ways run the same checks.
class KernelCall:
    """A kernel call prepared by ``prepare_rowwise`` / ``prepare_reparameterize``: ``call(*tensors,
    *values)`` with the tensors in the order of ``slots`` (name, position, dtype, device, element count)
    and then one int for each name in ``values`` (the reparameterize kernels' seed and offset)."""

    __slots__ = ("kernel", "fn", "template", "slots", "values")

    def __init__(self, kernel, fn, template, slots, values=()):
        self.kernel, self.fn, self.template, self.slots, self.values = kernel, fn, template, slots, values

    def __call__(self, *args) -> None:
        n = len(self.slots)
        if len(args) != n + len(self.values):
            raise RuntimeError(f"pyvae._gate.{self.kernel}: {n} tensors "
                               f"({', '.join(s[0] for s in self.slots)}) and {len(self.values)} ints expected, "
                               f"got {len(args)} arguments")
        call = list(self.template)
        for t, (name, pos, dtype, device, numel) in zip(args, self.slots):
            call[pos] = _ptr(self.kernel, name, t, dtype, device, numel)
        for v, pos in zip(args[n:], self.values):
            if type(v) is not int:
                raise RuntimeError(f"pyvae._gate.{self.kernel}: an int expected, got {type(v).__name__}")
            call[pos] = v
        self.fn(*call)


def _template(kernel: str, fixed: dict):
    """The binding of ``kernel``, a position for each of its argument names, and its argument list with
    ``fixed`` filled in (0 elsewhere: a null pointer or a zero size)."""
    fn = getattr(_C, kernel)
    order = _ARGS.get(kernel)
    if order is None:
        order = _ARGS[kernel] = _arg_order(fn)
    pos = {n: i for i, n in enumerate(order)}
    template = [0] * len(order)
    for name, v in fixed.items():
        template[pos[name]] = v
    return fn, pos, template


def prepare_rowwise(op: str, direction: str, *, dtype: torch.dtype, device: torch.device, rows: int, cols: int,
                    mods: Sequence[Optional[int]], grads: Sequence[bool] = (), grad_out: bool = False,
                    cols2: int = 0, samples: int = 1, logits_dtype: Optional[torch.dtype] = None) -> KernelCall:
    """Checks and prepares a call of ``<op>_fwd`` / ``<op>_bwd`` (see ``rowwise``; NOTE: [Prepared kernel
    calls]). ``mods``: the row count of each present operand a..d (None: absent); ``grads``: which of
    grad_a..d are written; ``grad_out``: whether a forward reads an expected upstream gradient. The CUDA
    stream is the current one when prepared: keep prepared calls only for CPU tensors (as the ops' lean
    paths do); a CUDA call is prepared anew each time (``rowwise``)."""
    kernel = f"{op}_{direction}"
    required = _ROWWISE[op]
    elbo = op == "bernoulli_elbo"
    mods_ = list(mods) + [None] * (4 - len(mods))
    grads_ = [bool(g) for g in grads] + [False] * (4 - len(grads))
    if len(mods_) != 4 or len(grads_) != 4 or direction not in ("fwd", "bwd"):
        raise RuntimeError(f"pyvae._gate.{kernel}: at most 4 operands and 4 gradients")
    if (mods_[2] is None) != (mods_[3] is None) and op == "gaussian_kl":
        raise RuntimeError(f"pyvae._gate.{kernel}: the prior's mean and log-variance come together")
    dev = _device_code(kernel, device)
    code = _dtype_code(kernel, dtype, device, ROWWISE_DTYPES)
    a_dtype = dtype
    if logits_dtype is not None and logits_dtype != dtype:
        if not (elbo and direction == "fwd" and device.type == "cpu" and dtype == torch.float32
                and logits_dtype == torch.bfloat16):
            raise RuntimeError(f"pyvae._gate.{kernel}: logits of another dtype ({logits_dtype}) only as bfloat16 "
                               "with float32 operands, in the CPU forward of the fused ELBO")
        code, a_dtype = DTYPE_CODES[torch.bfloat16], torch.bfloat16
    if rows < 0 or cols < 0 or cols2 < 0 or samples < 1:
        raise RuntimeError(f"pyvae._gate.{kernel}: bad sizes rows={rows} cols={cols} cols2={cols2} samples={samples}")
    fn, pos, template = _template(kernel, dict(device=dev, dtype=code, rows=rows, cols=cols, cols2=cols2,
                                               samples=samples, stream=stream(device),
                                               device_index=device_index(device)))
    slots = []
    for i, (letter, mod) in enumerate(zip("abcd", mods_)):
        width = cols2 if (elbo and i >= 2) else cols
        if mod is None:
            if i < required:
                _fail(kernel, letter, None, "a tensor")
            template[pos[letter + "_mod"]] = 1
            continue
        exact = (samples * rows) if (elbo and i == 0) else (rows if (elbo and i >= 2) else None)
        if type(mod) is not int or mod < 1 or (exact is not None and mod != exact):
            raise RuntimeError(f"pyvae._gate.{kernel}: operand {letter} has {mod!r} rows; expected "
                               f"{exact if exact is not None else 'an int >= 1'}")
        template[pos[letter + "_mod"]] = mod
        slots.append((letter, pos[letter], a_dtype if i == 0 else dtype, device, mod * width))
    writes = any(grads_)
    if direction == "fwd":
        slots.append(("out", pos["out"], dtype, device, rows))
        # NOTE: [ELBO in one pass] (csrc/cpu/kernels.cpp): the CPU forward of the fused ELBO can also write
        # the gradients of logits, mu and logvar for an expected upstream gradient ``grad_out [rows]``
        # (None: 1); no other forward writes gradients or reads an upstream gradient.
        if writes and not (elbo and device.type == "cpu" and not grads_[1]):
            raise RuntimeError(f"pyvae._gate.{kernel}: this forward writes no gradients")
        if grad_out and not writes:
            raise RuntimeError(f"pyvae._gate.{kernel}: grad_out is read only by a forward that writes gradients")
        if grad_out:
            slots.append(("grad_out", pos["grad_out"], dtype, device, rows))
    else:
        slots.append(("grad_out", pos["grad_out"], dtype, device, rows))
    if direction == "bwd" or writes:
        for i, (letter, g) in enumerate(zip("abcd", grads_)):
            if not g:
                continue
            if mods_[i] is None:
                raise RuntimeError(f"pyvae._gate.{kernel}: grad_{letter} must be None (operand {letter} is absent)")
            if elbo:
                n = samples * rows * cols if i == 0 else (rows * cols if i == 1 else rows * cols2)
            else:
                n = rows * cols
            slots.append(("grad_" + letter, pos["grad_" + letter], a_dtype if i == 0 else dtype, device, n))
    return KernelCall(kernel, fn, tuple(template), tuple(slots))


_ARGS: dict = {}


def rowwise(op: str, direction: str, *, dtype: torch.dtype, device: torch.device, rows: int, cols: int,
            operands: Sequence[Optional[Tuple[torch.Tensor, int]]], cols2: int = 0, samples: int = 1,
            out: Optional[torch.Tensor] = None, grad_out: Optional[torch.Tensor] = None,
            grads: Sequence[Optional[torch.Tensor]] = (), logits_dtype: Optional[torch.dtype] = None) -> None:
    """Runs ``<op>_fwd`` (``direction="fwd"``: writes ``out [rows]``) or ``<op>_bwd`` (``"bwd"``: reads
    ``grad_out [rows]``, writes the requested ``grads``). ``operands``: up to four ``(tensor, mod)``
    pairs, a ``[mod, width]`` block each. ``logits_dtype=torch.bfloat16`` (the fused ELBO's CPU forward,
    ``dtype`` float32): operand a and grad_a are bfloat16 (NOTE: [bfloat16 logits] in csrc/cpu/kernels.cpp)."""
    kernel = f"{op}_{direction}"
    if len(operands) > 4 or len(grads) > 4:
        raise RuntimeError(f"pyvae._gate.{kernel}: at most 4 operands and 4 gradients")
    for o in operands:
        if o is not None and (not isinstance(o, tuple) or len(o) != 2):
            raise RuntimeError(f"pyvae._gate.{kernel}: an operand is a (tensor, rows) pair, got {type(o).__name__}")
    call = prepare_rowwise(op, direction, dtype=dtype, device=device, rows=rows, cols=cols,
                           mods=[None if o is None else o[1] for o in operands],
                           grads=[g is not None for g in grads], grad_out=grad_out is not None and direction == "fwd",
                           cols2=cols2, samples=samples, logits_dtype=logits_dtype)
    tensors = [o[0] for o in operands if o is not None]
    if direction == "fwd":
        tensors.append(out)
        if grad_out is not None:
            tensors.append(grad_out)
    else:
        tensors.append(grad_out)
    tensors += [g for g in grads if g is not None]
    for name, t in zip((s[0] for s in call.slots), tensors):
        if t is None:
            _fail(kernel, name, t, "a tensor")
    call(*tensors)


# ------------------------------------------------------------------------------ reparameterize
def _seed_ptr(kernel: str, seed_tensor: Optional[torch.Tensor], device: torch.device) -> int:
    """The address of a ``(seed, offset)`` int64 pair in device memory (NOTE: [Graph-safe seed] in
    pyvae/ops/reparameterize.py), 0 for none. CUDA only: the CPU kernels take the words by value."""
    if seed_tensor is None:
        return 0
    if device.type != "cuda":
        _fail(kernel, "seed_tensor", seed_tensor, f"None on {device.type} (the seed is passed by value there)")
    return _ptr(kernel, "seed_tensor", seed_tensor, torch.int64, device, 2)


def reparameterize_fwd(*, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor, samples: int, seed: int,
                       offset: int, seed_tensor: Optional[torch.Tensor] = None) -> None:
    """``z [samples, n] = mu [n] + exp(logvar [n] / 2) * eps``, eps from Philox (seed, offset), or from the
    ``(seed, offset)`` the kernel reads in ``seed_tensor`` (int64 [2] on mu's CUDA device) when given."""
    kernel = "reparameterize_fwd"
    dtype, device, n = mu.dtype, mu.device, mu.numel()
    dev = _device_code(kernel, device)
    code = _dtype_code(kernel, dtype, device, ROWWISE_DTYPES)
    _C.reparameterize_fwd(
        device=dev, dtype=code, numel=n, samples=samples, mu=_ptr(kernel, "mu", mu, dtype, device, n),
        logvar=_ptr(kernel, "logvar", logvar, dtype, device, n), grad_out=0,
        z=_ptr(kernel, "z", z, dtype, device, samples * n), grad_mu=0, grad_logvar=0, eps=0, seed=seed, offset=offset,
        seed_ptr=_seed_ptr(kernel, seed_tensor, device), stream=stream(device), device_index=device_index(device))


def reparameterize_bwd(*, logvar: torch.Tensor, grad_out: torch.Tensor, grad_mu: Optional[torch.Tensor],
                       grad_logvar: Optional[torch.Tensor], samples: int, seed: int, offset: int,
                       seed_tensor: Optional[torch.Tensor] = None) -> None:
    """Gradients of ``reparameterize_fwd`` for ``grad_out [samples, n]`` (eps regenerated, not stored)."""
    kernel = "reparameterize_bwd"
    dtype, device, n = logvar.dtype, logvar.device, logvar.numel()
    dev = _device_code(kernel, device)
    code = _dtype_code(kernel, dtype, device, ROWWISE_DTYPES)
    _C.reparameterize_bwd(
        device=dev, dtype=code, numel=n, samples=samples, mu=0, logvar=_ptr(kernel, "logvar", logvar, dtype, device, n),
        grad_out=_ptr(kernel, "grad_out", grad_out, dtype, device, samples * n), z=0,
        grad_mu=_ptr(kernel, "grad_mu", grad_mu, dtype, device, n, optional=True),
        grad_logvar=_ptr(kernel, "grad_logvar", grad_logvar, dtype, device, n, optional=True), eps=0,
        seed=seed, offset=offset, seed_ptr=_seed_ptr(kernel, seed_tensor, device), stream=stream(device),
        device_index=device_index(device))


def prepare_reparameterize(direction: str, *, dtype: torch.dtype, device: torch.device, numel: int, samples: int,
                           grads: Sequence[bool] = (False, False), eps: bool = False) -> KernelCall:
    """A prepared (NOTE: [Prepared kernel calls]) host-seeded CPU ``reparameterize_fwd`` (tensors mu, logvar,
    z; then seed, offset) or ``reparameterize_bwd`` (logvar, grad_out, the requested grad_mu / grad_logvar;
    then seed, offset). With ``eps``, a last tensor ``[samples, numel]`` of ``dtype``: the forward stores its
    normals there, the backward reads them instead of drawing them again (NOTE: [Saved eps] in
    csrc/cpu/reparameterize.cpp). Draws seeded from device memory go through ``reparameterize_fwd`` / ``_bwd``."""
    kernel = f"reparameterize_{direction}"
    if direction not in ("fwd", "bwd") or device.type != "cpu":
        raise RuntimeError(f"pyvae._gate.{kernel}: prepared calls are CPU forward or backward calls")
    if numel < 1 or samples < 1:
        raise RuntimeError(f"pyvae._gate.{kernel}: bad sizes numel={numel} samples={samples}")
    fn, pos, template = _template(kernel, dict(
        device=_device_code(kernel, device), dtype=_dtype_code(kernel, dtype, device, ROWWISE_DTYPES), numel=numel,
        samples=samples))
    if direction == "fwd":
        names = (("mu", numel), ("logvar", numel), ("z", samples * numel))
    else:
        names = (("logvar", numel), ("grad_out", samples * numel)) + tuple(
            (n, numel) for n, g in zip(("grad_mu", "grad_logvar"), grads) if g)
        if not any(grads):
            raise RuntimeError(f"pyvae._gate.{kernel}: a backward call writes grad_mu, grad_logvar or both")
    if eps:
        names += (("eps", samples * numel),)
    slots = tuple((n, pos[n], dtype, device, k) for n, k in names)
    return KernelCall(kernel, fn, tuple(template), slots, (pos["seed"], pos["offset"]))


# ------------------------------------------------------------------------------ binarization
def gather_binarize(*, src: torch.Tensor, index: Optional[torch.Tensor], out: torch.Tensor, first_row: int,
                    seed: int) -> None:
    """``out[r] = [u < src[index[r]]]`` (float32; NOTE: [Counter-based binarization] in csrc/ops/philox.h).
    ``index`` (int64, or None for rows 0..) is checked to lie in ``src``'s rows: the kernel reads by it."""
    kernel = "gather_binarize"
    if src.dim() != 2:
        _fail(kernel, "src", src, "a 2-D [rows, cols] tensor")
    device, (src_rows, cols) = src.device, src.shape
    rows = out.shape[0] if out.dim() == 2 else -1
    if out.dim() != 2 or out.shape[1] != cols:
        _fail(kernel, "out", out, f"a [rows, {cols}] tensor")
    if index is not None:
        _ptr(kernel, "index", index, torch.int64, device, rows)
        if rows and (int(index.min()) < 0 or int(index.max()) >= src_rows):
            raise RuntimeError(f"pyvae._gate.{kernel}: index holds rows outside [0, {src_rows})")
    elif rows > src_rows:
        _fail(kernel, "out", out, f"at most {src_rows} rows without an index")
    if type(first_row) is not int or first_row < 0:
        raise RuntimeError(f"pyvae._gate.{kernel}: first_row must be an int >= 0, got {first_row!r}")
    _C.gather_binarize(
        device=_device_code(kernel, device), src=_ptr(kernel, "src", src, torch.float32, device, src_rows * cols),
        index=0 if index is None else index.data_ptr(),
        out=_ptr(kernel, "out", out, torch.float32, device, rows * cols), rows=rows, cols=cols, first_row=first_row,
        seed=seed & 0xFFFFFFFFFFFFFFFF, stream=stream(device), device_index=device_index(device))


def advise_huge_pages(t: torch.Tensor) -> None:
    """The CPU kernels' advice for their large fresh outputs (NOTE: [Huge pages for fresh outputs] in
    csrc/cpu/pages.h: the whole 2 MiB pages of a buffer of 4 MB or more, unless PYVAE_HUGE_PAGES=off) on
    ``t``, a contiguous CPU tensor. Changes no data."""
    kernel = "advise_huge_pages"
    if not isinstance(t, torch.Tensor) or not t.is_cpu or not t.is_contiguous():
        _fail(kernel, "t", t, "a contiguous CPU tensor")
    _C.advise_huge_pages(t.data_ptr(), t.numel() * t.element_size())


# ------------------------------------------------------------------------ linear-layer epilogues
def _act_code(kernel: str, act: int) -> int:
    if type(act) is not int or not 0 <= act < len(ACTIVATIONS):
        raise RuntimeError(f"pyvae._gate.{kernel}: unknown activation code {act!r}")
    return act


def bias_act_fwd(*, y: torch.Tensor, bias: Optional[torch.Tensor], act: int) -> None:
    """``y [rows, cols] = act(y + bias [cols])`` in place."""
    kernel = "bias_act_fwd"
    if y.dim() != 2:
        _fail(kernel, "y", y, "a 2-D [rows, cols] tensor")
    dtype, device, (rows, cols) = y.dtype, y.device, y.shape
    _C.bias_act_fwd(
        device=_device_code(kernel, device), dtype=_dtype_code(kernel, dtype, device, LINEAR_DTYPES),
        act=_act_code(kernel, act), rows=rows, cols=cols, y=_ptr(kernel, "y", y, dtype, device, rows * cols),
        bias=_ptr(kernel, "bias", bias, dtype, device, cols, optional=True), grad_y=0, out=0, grad_pre=0,
        grad_bias=0, grad_pre_t=0, workspace=0, workspace_bytes=0, stream=stream(device),
        device_index=device_index(device))


def act_bwd_workspace_bytes(dtype: torch.dtype, device: torch.device, rows: int, cols: int) -> int:
    """Bytes of device scratch ``act_bwd`` needs for the bias gradient of a ``[rows, cols]`` problem (0
    on CPU; NOTE: [act_bwd workspace] in csrc/cuda/linear.cu)."""
    kernel = "act_bwd_workspace_bytes"
    return int(_C.act_bwd_workspace_bytes(device=_device_code(kernel, device),
                                          dtype=_dtype_code(kernel, dtype, device, LINEAR_DTYPES), rows=rows, cols=cols))


def act_bwd_workspace(grad_y: torch.Tensor) -> Optional[torch.Tensor]:
    """The ``workspace`` argument of ``act_bwd`` for a bias gradient of ``grad_y``'s problem: a uint8 tensor
    from torch's allocator on its device, or None where none is needed (CPU, no rows)."""
    rows, cols = grad_y.shape
    n = act_bwd_workspace_bytes(grad_y.dtype, grad_y.device, rows, cols)
    return torch.empty(n, dtype=torch.uint8, device=grad_y.device) if n else None


def act_bwd(*, act: int, grad_y: torch.Tensor, out: Optional[torch.Tensor] = None,
            grad_pre: Optional[torch.Tensor] = None, grad_bias: Optional[torch.Tensor] = None,
            grad_pre_t: Optional[torch.Tensor] = None, workspace: Optional[torch.Tensor] = None) -> None:
    """From ``grad_y [rows, cols]`` and the forward's output ``out`` (not read for identity): writes
    ``grad_pre`` (dL/d(pre-activation), ``[rows, cols]``), ``grad_bias [cols]`` (its column sums) and,
    CPU only, ``grad_pre_t`` (``grad_pre`` transposed, ``[cols, rows]``), each when given. On CUDA a
    ``grad_bias`` needs ``workspace`` (``act_bwd_workspace(grad_y)``: uint8, at least
    ``act_bwd_workspace_bytes`` bytes on grad_y's device)."""
    kernel = "act_bwd"
    if grad_y.dim() != 2:
        _fail(kernel, "grad_y", grad_y, "a 2-D [rows, cols] tensor")
    dtype, device, (rows, cols) = grad_y.dtype, grad_y.device, grad_y.shape
    n = rows * cols
    code = _act_code(kernel, act)
    if grad_pre_t is not None and device.type != "cpu":
        _fail(kernel, "grad_pre_t", grad_pre_t, "None on CUDA (the transposed gradient is CPU-only)")
    ws, ws_bytes = 0, 0
    need = act_bwd_workspace_bytes(dtype, device, rows, cols) if (grad_bias is not None and device.type == "cuda") else 0
    if need or workspace is not None:
        if not (isinstance(workspace, torch.Tensor) and workspace.dtype == torch.uint8 and workspace.device == device
                and workspace.is_contiguous() and workspace.numel() >= need):
            _fail(kernel, "workspace", workspace, f"a contiguous torch.uint8 tensor of at least {need} elements on "
                  f"{device} (act_bwd_workspace)")
        ws, ws_bytes = workspace.data_ptr(), workspace.numel()
    _C.act_bwd(
        device=_device_code(kernel, device), dtype=_dtype_code(kernel, dtype, device, LINEAR_DTYPES), act=code,
        rows=rows, cols=cols, y=0, bias=0, grad_y=_ptr(kernel, "grad_y", grad_y, dtype, device, n),
        out=_ptr(kernel, "out", out, dtype, device, n, optional=code == ACTIVATIONS["identity"]),
        grad_pre=_ptr(kernel, "grad_pre", grad_pre, dtype, device, n, optional=True),
        grad_bias=_ptr(kernel, "grad_bias", grad_bias, dtype, device, cols, optional=True),
        grad_pre_t=_ptr(kernel, "grad_pre_t", grad_pre_t, dtype, device, n, optional=True), workspace=ws,
        workspace_bytes=ws_bytes, stream=stream(device), device_index=device_index(device))


# ----------------------------------------------------------------------------------- cuBLASLt
def cublaslt_linear(kind: str, *, act: int, rows: int, in_features: int, out_features: int,
                    x: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                    bias: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None,
                    grad_pre: Optional[torch.Tensor] = None, grad_x: Optional[torch.Tensor] = None,
                    grad_weight: Optional[torch.Tensor] = None, grad_bias: Optional[torch.Tensor] = None,
                    aux: Optional[torch.Tensor] = None, aux_ld: int = 0, workspace: Optional[torch.Tensor] = None,
                    allow_tf32: bool = False, strict_reduction: bool = False, fuse_act: bool = True,
                    dtype: torch.dtype, device: torch.device) -> int:
    """One cuBLASLt GEMM of a linear layer (``kind``: "fwd", "wgrad" or "dgrad"; NOTE: [cuBLASLt path] in
    csrc/cuda/linear_lt.cu): 0 when done, 1 when cuBLASLt has no algorithm for it (nothing written)."""
    kernel = f"cublaslt_linear_{kind}"
    if kind not in ("fwd", "wgrad", "dgrad") or device.type != "cuda":
        raise RuntimeError(f"pyvae._gate.{kernel}: a cuBLASLt GEMM runs on CUDA (fwd, wgrad or dgrad)")
    r, i, o = rows, in_features, out_features
    bias_n = i if (kind == "dgrad") else o  # dgrad with the ReLU mask: the previous layer's bias gradient
    aux_n = r * (aux_ld // 8)
    if aux is not None and (aux_ld % 128 or aux_ld < (o if kind == "fwd" else i)):
        raise RuntimeError(f"pyvae._gate.{kernel}: aux_ld {aux_ld} must be a multiple of 128 covering the features")
    fn = getattr(_C, kernel)
    return fn(
        dtype=_dtype_code(kernel, dtype, device, LINEAR_DTYPES), act=_act_code(kernel, act), rows=r, in_features=i,
        out_features=o, x=_ptr(kernel, "x", x, dtype, device, r * i, optional=True),
        weight=_ptr(kernel, "weight", weight, dtype, device, o * i, optional=True),
        bias=_ptr(kernel, "bias", bias, dtype, device, o, optional=True),
        y=_ptr(kernel, "y", y, dtype, device, r * o, optional=True),
        grad_pre=_ptr(kernel, "grad_pre", grad_pre, dtype, device, r * o, optional=True),
        grad_x=_ptr(kernel, "grad_x", grad_x, dtype, device, r * i, optional=True),
        grad_weight=_ptr(kernel, "grad_weight", grad_weight, dtype, device, o * i, optional=True),
        grad_bias=_ptr(kernel, "grad_bias", grad_bias, dtype, device, bias_n, optional=True),
        aux=_ptr(kernel, "aux", aux, torch.uint8, device, aux_n, optional=True), aux_ld=aux_ld,
        workspace=0 if workspace is None else _ptr(kernel, "workspace", workspace, torch.uint8, device,
                                                    workspace.numel()),
        workspace_bytes=0 if workspace is None else workspace.numel(), allow_tf32=allow_tf32,
        strict_reduction=strict_reduction, fuse_act=fuse_act, device=device_index(device), stream=stream(device))


def cublaslt_load(path: str = "") -> str:
    """Loads libcublasLt (``path``, or the default names when empty) unless loaded: '' or why not."""
    return _C.cublaslt_load(path=path)


def cublaslt_unavailable_reason() -> str:
    return _C.cublaslt_unavailable_reason()


def cublaslt_version() -> int:
    return int(_C.cublaslt_version())


# ---------------------------------------------------------------------- CPU builds, Philox, tests
def cpu_arch() -> str:
    """The CPU kernel build in use (avx512, avx2 or base)."""
    return _C.cpu_arch()


def cpu_archs():
    """The CPU kernel builds this processor can run, best first."""
    return list(_C.cpu_archs())


def set_cpu_arch(name: str) -> None:
    """Use another CPU kernel build (tests compare them)."""
    _C.set_cpu_arch(name=name)


def philox4x32_10(counter, key):
    """The Philox4x32-10 block function (known-answer tests)."""
    return list(_C.philox4x32_10(counter=list(counter), key=list(key)))


def normal4(seed: int, counter: int):
    """The four N(0, 1) draws of one Philox counter."""
    return list(_C.normal4(seed=seed, counter=counter))

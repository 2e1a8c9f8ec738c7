"""Which library runs the GEMMs of pyvae's linear layers on CPU.

NOTE: [CPU GEMM backend]
torch's CPU ``mm``/``addmm`` in float32 call MKL's sgemm. On CPUs that MKL does not take the AVX-512
path for (the Zen 5 AMD EPYC, family 26, this project was developed on first, with 2 x 512-bit FMA per
cycle) that sgemm runs at ~200 GFLOP/s, 38% of the measured FMA peak of ~525 GFLOP/s (2 cores). The same
torch wheel carries oneDNN, whose JIT picks its kernels from the CPU's feature flags: its float32 matmul
reaches ~330-490 GFLOP/s on the VAE's layer shapes (bench/RESULTS.md, "CPU GEMM backend"). On a Zen 4
EPYC (family 25: 512-bit ops on 256-bit units, FMA peak 234 GFLOP/s on 2 cores) the gap is small: MKL
136-195, oneDNN 167-218 (bench/RESULTS.md, stop 16); which library a layer uses is measured per machine
(NOTE: [Layer routes] in pyvae/ops/linear_act.py). torch reaches oneDNN's linear
through ``torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")`` = ``x @ w.T + b``; it takes
transposed views without copying (other strides are copied first: NOTE: [Dense oneDNN operands]), so the
three products of a linear layer map onto it:

    forward      y  = x @ W.T + b      linear(x, W, b)
    grad input   dx = g @ W            linear(g, W.T)          (W.T is a view)
    grad weight  dW = g.T @ x          linear(g.T, x.T)        if in_features >= 64, with g.T
                                                               written contiguous by pyvae's backward
                                                               epilogue kernel (oneDNN would copy the
                                                               view single-threaded: 20-26% of the
                                                               product's time at B=8192)
                                       linear(x.T, g.T).T      otherwise (oneDNN is 3-10x slower on
                                                               the first form for in_features = 20;
                                                               the final transposed copy is cheap there
                                                               and slow for wide layers)

The op is private to torch, so pyvae checks it once (a small product compared against ``torch.mm``)
and falls back to torch's own GEMMs if it is missing or wrong. float64 and float16 always use torch's
GEMMs (oneDNN has no float64 matmul). ``PYVAE_CPU_GEMM=torch`` forces torch's GEMMs,
``PYVAE_CPU_GEMM=onednn`` fails loudly if oneDNN is not usable; the default is ``auto``. The variable is
read at the first GEMM.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

ONEDNN_DTYPES = (torch.float32,)  # bfloat16 mm already runs on oneDNN in torch
_NARROW_IN = 64  # below this in_features, grad_weight uses the transposed form (see the note)
# oneDNN's linear costs ~10 us more per call than torch's mm (primitive lookup, tensor wrapping);
# at ~200 vs ~450 GFLOP/s that is repaid from about 4-8 MFLOP per product up (bench gemm: at 4 MFLOP,
# enc2 at B=100, the two routes tie on two products and oneDNN loses 18% on the third).
_MIN_FLOPS = 8e6
_state = {"onednn": None, "mode": None, "enabled": None}  # None = not probed / read yet


def _mode() -> str:
    """PYVAE_CPU_GEMM, read once (first GEMM) and then cached in _state."""
    mode = _state.get("mode")
    if mode is None:
        mode = os.environ.get("PYVAE_CPU_GEMM", "auto").strip().lower() or "auto"
        if mode not in ("auto", "onednn", "torch"):
            raise ValueError(f"PYVAE_CPU_GEMM must be 'auto', 'onednn' or 'torch', got {mode!r}")
        _state["mode"] = mode
    return mode


def _probe_context_clean() -> bool:
    """Whether the probe below would run plain float32 tensor ops here: no torch.compile tracing, no dispatch
    mode (fake tensors, a logging mode) and no torch function mode. CPU autocast the probe turns off itself."""
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
                or torch._C._is_torch_function_mode_enabled())


def _probe() -> bool:
    """True when oneDNN's linear is present and computes the three products right on this machine.

    The comparison is of float32 products, so it runs with CPU autocast off: the first GEMM of a process
    often runs under it (every ``pyvae train --precision bf16-mixed``), where torch's reference products
    came out in bfloat16, failed the float32 tolerance, and turned oneDNN off for the whole process. Its
    operands are float32 CPU tensors whatever ``torch.set_default_dtype``/``set_default_device`` say."""
    if not torch.backends.mkldnn.is_available():
        return False
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None:
        return False
    try:
        with torch.autocast("cpu", enabled=False):
            gen = torch.Generator().manual_seed(0)
            f32 = dict(generator=gen, dtype=torch.float32, device="cpu")  # whatever the defaults are
            x = torch.randn(7, 5, **f32)
            w = torch.randn(3, 5, **f32)
            b = torch.randn(3, **f32)
            g = torch.randn(7, 3, **f32)
            checks = [
                (op(x, w, b, "none", [], ""), torch.addmm(b, x, w.t())),
                (op(g, w.t(), None, "none", [], ""), g @ w),
                (op(g.t(), x.t(), None, "none", [], ""), g.t() @ x),
                (op(x.t(), g.t(), None, "none", [], "").t(), g.t() @ x),
            ]
            return all(a.shape == r.shape and torch.allclose(a, r, rtol=1e-5, atol=1e-5) for a, r in checks)
    except Exception:  # any failure means: do not use it
        return False


def onednn_enabled() -> bool:
    """Whether float32 CPU GEMMs of pyvae's linear layers run on oneDNN (NOTE: [CPU GEMM backend])."""
    ok = _state.get("enabled")
    if ok is None:
        mode = _mode()
        if mode != "torch" and _state["onednn"] is None:
            if not _probe_context_clean():
                # Fake tensors or a mode would answer for the probe: torch's GEMMs for this call, and the
                # decision waits for a call outside them.
                return False
            _state["onednn"] = _probe()
        if mode == "onednn" and not _state["onednn"]:
            raise RuntimeError("PYVAE_CPU_GEMM=onednn, but torch.ops.mkldnn._linear_pointwise is missing or wrong here")
        ok = _state["enabled"] = mode != "torch" and bool(_state["onednn"])
    return ok


def uses_onednn(dtype: torch.dtype, flops: float) -> bool:
    """Whether a CPU GEMM of ``flops`` in ``dtype`` runs on oneDNN."""
    # flops == 0: an empty dimension, which oneDNN's primitive rejects.
    return flops > 0 and flops >= _MIN_FLOPS and dtype in ONEDNN_DTYPES and onednn_enabled()


def backend(t: torch.Tensor, flops: float = float("inf"), onednn: Optional[bool] = None) -> str:
    """'onednn' or 'torch': who runs a GEMM of ``flops`` on tensors like ``t``. ``onednn=False``: torch's,
    whatever the rule says (a measured route, NOTE: [Measured routes] in pyvae/_tune.py)."""
    if onednn is False:
        return "torch"
    return "onednn" if t.is_cpu and uses_onednn(t.dtype, flops) else "torch"


# NOTE: [Dense oneDNN operands]
# oneDNN's linear takes a row-major operand or the transpose of one at full speed, and anything else (a
# column slice such as a VAE's mu = h[:, :Z], or its transpose) on a slow generic path: on the Intel Xeon
# of bench/RESULTS.md (stop 21; 2 threads, B=1024), the weight gradient of a 500->784 layer whose input was a
# column slice took 16.3 s in float32 and 17.5 s in bfloat16 against 8.5 and 6.2 ms with the slice copied;
# a 20->500 weight gradient from mu 357 ms against 0.55 (0.64 ms against 0.47 in the narrow form); forwards
# from a slice 1.2-2.7x their time. pyvae's races time contiguous operands and would not see it. So every
# operand that is neither goes to oneDNN as a dense copy, made in its own orientation (a row copy of a
# column slice: ~0.1 ms for 1024 x 500 float32).
def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` (2-D) if it or its transpose is contiguous, else a copy with the same values that is."""
    if t.is_contiguous():
        return t
    # (not contiguous, so no dimension is 1 where its stride would matter: t.t() is contiguous exactly when
    # its strides are (1, rows), read here without building the view)
    if t.stride(0) == 1:
        # the transpose of a row-major tensor as it is, else of a row-strided one: copied as rows, kept a view
        return t if t.stride(1) == t.shape[0] else t.t().contiguous().t()
    return t.contiguous()


def onednn_linear(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a @ b.T (+ bias)`` on oneDNN's linear (strided views allowed: NOTE: [Dense oneDNN operands])."""
    return torch.ops.mkldnn._linear_pointwise(_dense(a), _dense(b), bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           onednn: Optional[bool] = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for 2-D x [rows, in] and weight [out, in]; a new contiguous tensor."""
    if backend(x, 2.0 * x.shape[0] * x.shape[1] * weight.shape[0], onednn) == "onednn":
        return onednn_linear(x, weight, None if bias is None else bias.contiguous())
    if bias is None:
        return torch.mm(x, weight.t())
    return torch.addmm(bias, x, weight.t())


# Activations oneDNN's linear applies as a post-op in the GEMM's write-back (its attr names are pyvae's).
# Not relu: oneDNN's relu post-op is max(y, 0), which turns a NaN into 0, where torch's relu and pyvae's
# epilogue keep it (pyvae.ops: a NaN input gives NaN in the rows it reaches, on every route). relu layers
# take the library GEMM and pyvae's bias + relu epilogue (one more pass over the output: ~20-30 us of a
# 784->400 layer at B=128 on the Zen 4 host).
POST_OPS = ("tanh", "sigmoid")
_POST_OP_DTYPES = (torch.float32, torch.bfloat16)


def linear_post_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str,
                   onednn: Optional[bool] = None) -> Optional[torch.Tensor]:
    """``act(x @ weight.T + bias)`` in one oneDNN call (bias and activation fused into the GEMM), or None
    when this GEMM does not run on oneDNN or the activation has no post-op (the caller then runs the GEMM
    and pyvae's epilogue kernel). float32 and bfloat16 (torch's bfloat16 GEMMs are oneDNN's too)."""
    if activation not in POST_OPS or x.dtype not in _POST_OP_DTYPES or onednn is False or not x.is_cpu:
        return None
    flops = 2.0 * x.shape[0] * x.shape[1] * weight.shape[0]
    if not (flops > 0 and flops >= _MIN_FLOPS and onednn_enabled()):
        return None
    return torch.ops.mkldnn._linear_pointwise(_dense(x), _dense(weight), None if bias is None else bias.contiguous(),
                                              activation, [], "")


def grad_input(g: torch.Tensor, weight: torch.Tensor, onednn: Optional[bool] = None) -> torch.Tensor:
    """``g @ weight`` for g [rows, out]: the input gradient of a linear layer."""
    if backend(g, 2.0 * g.shape[0] * g.shape[1] * weight.shape[1], onednn) == "onednn":
        return onednn_linear(g, weight.t())
    return torch.mm(g, weight)


def wants_transposed_grad(g: torch.Tensor, in_features: int, onednn: Optional[bool] = None) -> bool:
    """Whether ``grad_weight`` takes ``g`` transposed ([out, rows], contiguous) for g [rows, out]: the
    oneDNN form ``linear(g.T, x.T)`` needs its first operand row-major, and a g.T written by the
    backward epilogue kernel beside g costs less than the copy oneDNN would make of the view."""
    return in_features >= _NARROW_IN and backend(g, 2.0 * g.shape[0] * g.shape[1] * in_features, onednn) == "onednn"


def grad_weight(g: torch.Tensor, x: torch.Tensor, g_t: Optional[torch.Tensor] = None,
                onednn: Optional[bool] = None) -> torch.Tensor:
    """``g.T @ x`` for g [rows, out], x [rows, in]: the weight gradient, contiguous [out, in].
    ``g_t``: g.T as a contiguous [out, rows] tensor, where ``wants_transposed_grad`` said so."""
    if backend(g, 2.0 * g.shape[0] * g.shape[1] * x.shape[1], onednn) == "onednn":
        if x.shape[1] >= _NARROW_IN:
            return onednn_linear(g.t() if g_t is None else g_t, x.t())
        return onednn_linear(x.t(), g.t()).t().contiguous()
    return torch.mm(g.t(), x)


class override:
    """Context manager for tests and benchmarks: ``override("onednn", min_flops=0)`` routes every eligible
    GEMM to oneDNN, ``override("torch")`` none. Not thread-safe; restores the previous state on exit."""

    def __init__(self, backend: str, min_flops: Optional[float] = None):
        if backend not in ("onednn", "torch"):
            raise ValueError(f"backend must be 'onednn' or 'torch', got {backend!r}")
        self.backend, self.min_flops = backend, min_flops

    def __enter__(self):
        global _MIN_FLOPS
        self._saved = (dict(_state), _MIN_FLOPS)
        if self.backend == "onednn":
            if _state["onednn"] is None:
                _state["onednn"] = _probe()
            if not _state["onednn"]:
                raise RuntimeError("oneDNN's linear is not usable in this torch build")
        _state["mode"] = self.backend
        _state["enabled"] = self.backend == "onednn"
        if self.min_flops is not None:
            _MIN_FLOPS = self.min_flops
        return self

    def __exit__(self, *exc):
        global _MIN_FLOPS
        state, _MIN_FLOPS = self._saved
        _state.update(state)
        return False

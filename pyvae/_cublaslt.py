"""The cuBLASLt path of the fused linear layer on CUDA: GEMMs with cuBLASLt's epilogues where they
exist (bias, ReLU + bias with a bit mask, bias gradient) and pyvae's epilogue kernels where they do
not (tanh, sigmoid, softplus, the activation gradients), all with the math of csrc/ops/activation.h.
The layout mapping, the epilogue chosen per activation and the fallback rules are in
NOTE: [cuBLASLt path] (csrc/cuda/linear_lt.cu). That code has been compiled, never run: these
functions are exercised only by tests/test_cublaslt.py on a machine with a GPU.

Contract shared by the functions below:

- Tensors are 2-D, contiguous, on one CUDA device, of one dtype among float32, float16, bfloat16 and
  float64 (the ``aux`` mask excepted: uint8). Inputs that do not meet this, or an empty dimension, or a
  build/machine without the path (``available()`` False) give ``None``: the caller then runs its own
  path (torch's GEMM + pyvae's epilogue kernels). Shapes that do not fit together raise ``ValueError``.
- Outputs are new tensors made with ``torch.empty`` on the inputs' device and dtype; the work is
  queued on ``torch.cuda.current_stream(device)``. The cuBLASLt workspace comes from torch's allocator
  and is kept per (device, stream) (NOTE: [cuBLASLt workspace]); its size is
  ``$CUBLASLT_WORKSPACE_SIZE`` KiB when set (the variable torch reads), else 32 MiB on sm_90 and newer
  and 4 MiB before, as NVIDIA recommends.
- float32 GEMMs use TF32 exactly when ``torch.backends.cuda.matmul.allow_tf32`` is True; float16 /
  bfloat16 GEMMs reduce split-K partial sums in the half type only when torch's
  ``allow_{fp16,bf16}_reduced_precision_reduction`` allows it. Accumulation is float32 for the three
  (float64 for float64).
- A GEMM for which cuBLASLt has no algorithm is done by ``torch.mm`` (backward) or makes the call
  return ``None`` (forward); a cuBLASLt or CUDA error raises ``RuntimeError``.
- Activation codes: ``pyvae.ops.ACTIVATIONS`` (name -> code, exported by the compiled core).

Set ``PYVAE_DISABLE_CUBLASLT=1`` to make ``available()`` False (for comparisons and bisection).
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Tuple

import torch

from . import _gate

_RELU = _gate.ACTIVATIONS["relu"]
_IDENTITY = _gate.ACTIVATIONS["identity"]
_MASK_BITS = 128  # cuBLASLt: the ReLU mask's leading dimension is a multiple of 128 bits
_state = {"checked": False, "reason": "not checked"}
_workspace_bytes_by_device = {}
_workspaces = {}  # (device index, stream handle) -> uint8 tensor; NOTE: [cuBLASLt workspace]


def _find_library() -> str:
    """Why the library cannot be loaded ('' when loaded), trying the nvidia-cublas wheel's own copy
    when the default names fail (a torch that did not load it already)."""
    why = _gate.cublaslt_load("")
    if not why:
        return ""
    major = _gate.cublaslt_header_version // 10000
    for base in sys.path:
        for sub in (f"nvidia/cu{major}/lib", "nvidia/cublas/lib"):
            path = os.path.join(base or ".", sub, f"libcublasLt.so.{major}")
            if os.path.isfile(path) and not _gate.cublaslt_load(path):
                return ""
    return why


def unavailable_reason() -> str:
    """'' when the cuBLASLt path can run here, else a sentence saying why not."""
    if os.environ.get("PYVAE_DISABLE_CUBLASLT", "").strip() not in ("", "0"):
        return "disabled by PYVAE_DISABLE_CUBLASLT"
    if not _state["checked"]:
        if not _gate.cuda_built:
            reason = "pyvae was built without CUDA kernels"
        elif not _gate.cublaslt_built:
            reason = "pyvae was built without the cuBLASLt path (cublasLt.h not found at build time)"
        elif not torch.cuda.is_available():
            reason = "torch sees no CUDA device"
        else:
            reason = _find_library()
            if not reason:
                reason = _gate.cublaslt_unavailable_reason()
        _state["reason"] = reason
        _state["checked"] = True
    return _state["reason"]


def available() -> bool:
    """True when pyvae was built with the cuBLASLt path, libcublasLt loads (``libcublasLt.so.13``,
    which CUDA builds of torch have already loaded; or ``$PYVAE_CUBLASLT_LIBRARY``), and torch sees a
    GPU. The answer is computed once per process (``PYVAE_DISABLE_CUBLASLT`` is read every call)."""
    return not unavailable_reason()


def aux_shape(rows: int, features: int) -> Tuple[int, int]:
    """Shape ``[rows, ceil(features / 128) * 16]`` (uint8) of the ReLU bit mask of a ``[rows, features]``
    pre-activation: one bit per element, each row padded to a multiple of 128 bits as cuBLASLt requires.
    Row r holds the bits of batch row r; the order of the bits inside a row is cuBLASLt's own (not
    documented), so the mask is opaque: only ``linear_dgrad_relu`` reads it."""
    ld_bits = -(-features // _MASK_BITS) * _MASK_BITS
    return rows, ld_bits // 8


def workspace_bytes(device: torch.device) -> int:
    """The cuBLASLt workspace size for ``device``: ``$CUBLASLT_WORKSPACE_SIZE`` KiB, else 32 MiB on sm_90
    and newer, 4 MiB before (read once per device)."""
    size = _workspace_bytes_by_device.get(device.index)
    if size is None:
        env = os.environ.get("CUBLASLT_WORKSPACE_SIZE", "").strip()
        if env.isdigit():
            size = int(env) * 1024
        else:
            size = (32 if torch.cuda.get_device_capability(device)[0] >= 9 else 4) * 1024 * 1024
        _workspace_bytes_by_device[device.index] = max(size, 1)
    return _workspace_bytes_by_device[device.index]


# NOTE: [cuBLASLt workspace]
# Each GEMM needs scratch (workspace_bytes(): up to 32 MiB). Allocating it per call cost an allocator
# round trip per GEMM, three per layer per step; so one workspace is kept per (device, stream), the
# scheme torch uses for its own cuBLAS workspaces: work on one stream runs in order, so every GEMM
# queued there can reuse it, and no other stream ever touches it. It also serves as act_bwd's scratch
# for the bias gradient that csrc/cuda/linear_lt.cu computes when cuBLASLt has no bias-gradient
# epilogue (NOTE: [act_bwd workspace] in csrc/cuda/linear.cu): a call that may need more than the
# cached size gets a one-off allocation of its own instead (the cached one is never replaced, so a
# captured CUDA graph that recorded its address keeps valid memory). Under CUDA graph capture nothing
# new is cached: a workspace allocated during capture comes from the graph's private pool and belongs
# to that graph.
def _workspace(device: torch.device, min_bytes: int = 0) -> torch.Tensor:
    size = workspace_bytes(device)
    stream_handle = torch.cuda.current_stream(device).cuda_stream
    key = (device.index, stream_handle)
    ws = _workspaces.get(key)
    if ws is not None and ws.numel() >= min_bytes:
        return ws
    fresh = torch.empty(max(size, min_bytes), dtype=torch.uint8, device=device)
    if ws is None and not torch.cuda.is_current_stream_capturing():
        _workspaces[key] = fresh
    return fresh


def _bias_scratch(rows: int, features: int, dtype: torch.dtype, device: torch.device, needed: bool) -> int:
    """Bytes act_bwd needs inside a cuBLASLt call whose bias gradient may fall back to pyvae's kernel."""
    return _gate.act_bwd_workspace_bytes(dtype, device, rows, features) if needed else 0


def _flags(dtype: torch.dtype) -> Tuple[bool, bool]:
    """(allow_tf32, strict_reduction) from torch's matmul settings."""
    m = torch.backends.cuda.matmul
    if dtype == torch.float32:
        return bool(m.allow_tf32), False
    if dtype == torch.float16:
        return False, not bool(m.allow_fp16_reduced_precision_reduction)
    if dtype == torch.bfloat16:
        return False, not bool(m.allow_bf16_reduced_precision_reduction)
    return False, False


def _usable(*tensors: Optional[torch.Tensor]) -> bool:
    """All given tensors are 2-D (1-D for a bias), contiguous, CUDA, of one supported dtype and device."""
    first = tensors[0]
    if first is None or first.device.type != "cuda" or first.dtype not in _gate.LINEAR_DTYPES["cuda"]:
        return False
    for t in tensors:
        if t is None:
            continue
        if t.device != first.device or t.dtype != first.dtype or not t.is_contiguous() or t.dim() not in (1, 2):
            return False
    return available()


def _aligned(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # An epilogue vector (bias) at an odd offset inside a larger buffer: cuBLASLt's heuristics assume
    # it is aligned like the matrices, so give it its own allocation.
    if t is not None and t.data_ptr() % 16:
        return t.clone()
    return t


def _call(kind, dtype, act, rows, in_f, out_f, device, **tensors) -> int:
    tf32, strict = _flags(dtype)
    return _gate.cublaslt_linear(kind, dtype=dtype, device=device, act=act, rows=rows, in_features=in_f,
                                 out_features=out_f, allow_tf32=tf32, strict_reduction=strict, **tensors)


def _check_linear(x2: torch.Tensor, weight: torch.Tensor, op: str) -> Tuple[int, int, int]:
    if x2.dim() != 2 or weight.dim() != 2 or x2.shape[1] != weight.shape[1]:
        raise ValueError(
            f"pyvae._cublaslt.{op}: x2 must be [rows, in_features] and weight [out_features, in_features], "
            f"got {tuple(x2.shape)} and {tuple(weight.shape)}"
        )
    return x2.shape[0], x2.shape[1], weight.shape[0]


def linear_fwd(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: int, *,
               want_aux: bool = False, fuse_relu: bool = True
               ) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """``y = act(x2 @ weight.T + bias)`` with cuBLASLt's epilogue doing the bias (and the ReLU).

    Args:
        x2: ``[rows, in_features]``.
        weight: ``[out_features, in_features]`` (``nn.Linear`` layout).
        bias: ``[out_features]`` or None.
        act: activation code (0-4).
        want_aux: for ReLU (act == 1), also return the bit mask of ``pre-activation > 0``
            (``aux_shape(rows, out_features)``, uint8, opaque) for ``linear_dgrad_relu`` of the next
            layer. Ignored for other activations.
        fuse_relu: let cuBLASLt apply the ReLU (else pyvae's kernel does; forced on by want_aux).

    Returns:
        ``(y, aux)``: y ``[rows, out_features]`` in x2's dtype; aux the mask, or None when not asked for
        or when cuBLASLt could not write it (the layer then computes without the fused mask, and the
        caller must take relu' from y). None when this path cannot take the problem at all.
    """
    rows, in_f, out_f = _check_linear(x2, weight, "linear_fwd")
    if bias is not None and bias.shape != (out_f,):
        raise ValueError(f"pyvae._cublaslt.linear_fwd: bias must be [{out_f}], got {tuple(bias.shape)}")
    if act not in _gate.ACTIVATIONS.values():
        raise ValueError(f"pyvae._cublaslt.linear_fwd: unknown activation code {act}")
    if rows == 0 or in_f == 0 or out_f == 0 or not _usable(x2, weight, bias):
        return None
    dev = x2.device
    y = torch.empty(rows, out_f, dtype=x2.dtype, device=dev)
    aux = torch.empty(aux_shape(rows, out_f), dtype=torch.uint8, device=dev) if (want_aux and act == _RELU) else None
    bias = _aligned(bias)
    ws = _workspace(dev)
    common = {"x": x2, "weight": weight, "bias": bias, "y": y, "fuse_act": fuse_relu, "workspace": ws}
    if aux is not None:
        if _call("fwd", x2.dtype, act, rows, in_f, out_f, dev, aux=aux, aux_ld=aux.shape[1] * 8,
                 **common) == 0:
            return y, aux
        aux = None  # no algorithm writes the mask for this problem: try without it
    if _call("fwd", x2.dtype, act, rows, in_f, out_f, dev, **common) != 0:
        return None
    return y, None


def linear_bwd(grad: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, out: Optional[torch.Tensor], act: int,
               need_x: bool, need_w: bool, need_b: bool
               ) -> Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]]:
    """Gradients of ``y = act(x2 @ weight.T + b)`` with respect to x2, weight and b.

    dZ = dL/d(pre-activation) comes from pyvae's act_bwd kernel with the derivative taken from the
    output y (NOTE: [Derivative from the output]; dZ = grad for identity, no pass at all). Then
    ``dW = dZ^T x2`` on cuBLASLt with the BGRADB epilogue giving ``db`` (the column sums of dZ) in the
    same GEMM, and ``dx = dZ weight`` on cuBLASLt. A GEMM cuBLASLt has no algorithm for is done by
    torch.mm; db without dW is summed by the act_bwd kernel.

    Args:
        grad: ``[rows, out_features]``, dL/dy.
        x2: ``[rows, in_features]``, the forward's input.
        weight: ``[out_features, in_features]``.
        out: ``[rows, out_features]``, the forward's output y; unused (may be None) for identity.
        act: activation code (0-4).
        need_x, need_w, need_b: which gradients to compute.

    Returns:
        ``(grad_x [rows, in], grad_weight [out, in], grad_bias [out])`` in x2's dtype, None for those not
        needed; or None when this path cannot take the problem (nothing computed).
    """
    rows, in_f, out_f = _check_linear(x2, weight, "linear_bwd")
    if tuple(grad.shape) != (rows, out_f) or (act != 0 and (out is None or out.shape != grad.shape)):
        raise ValueError(
            f"pyvae._cublaslt.linear_bwd: grad (and out, unless identity) must be [{rows}, {out_f}], got "
            f"{tuple(grad.shape)} and {None if out is None else tuple(out.shape)}"
        )
    if act not in _gate.ACTIVATIONS.values():
        raise ValueError(f"pyvae._cublaslt.linear_bwd: unknown activation code {act}")
    if not (need_x or need_w or need_b):
        return None, None, None
    if rows == 0 or in_f == 0 or out_f == 0 or not _usable(grad, x2, weight, out if act != 0 else None):
        return None
    dev, dt = x2.device, x2.dtype
    grad_bias = torch.empty(out_f, dtype=dt, device=dev) if need_b else None
    bias_by_gemm = need_b and need_w  # BGRADB in the weight-gradient GEMM
    sum_bias = grad_bias if (need_b and not need_w) else None
    sum_ws = _gate.act_bwd_workspace(grad) if sum_bias is not None else None
    if act == _IDENTITY:
        grad_pre = grad
        if sum_bias is not None:
            _gate.act_bwd(act=act, grad_y=grad, grad_bias=sum_bias, workspace=sum_ws)
    else:
        grad_pre = torch.empty_like(grad) if (need_x or need_w) else None
        _gate.act_bwd(act=act, grad_y=grad, out=out, grad_pre=grad_pre, grad_bias=sum_bias, workspace=sum_ws)
    ws = _workspace(dev, _bias_scratch(rows, out_f, dt, dev, bias_by_gemm)) if (need_x or need_w) else None
    grad_w = None
    if need_w:
        grad_w = torch.empty_like(weight)
        st = _call("wgrad", dt, act, rows, in_f, out_f, dev, x=x2, grad_pre=grad_pre,
                   grad_weight=grad_w, grad_bias=grad_bias if bias_by_gemm else None, workspace=ws)
        if st != 0:
            torch.mm(grad_pre.t(), x2, out=grad_w)
            if bias_by_gemm:
                _gate.act_bwd(act=_IDENTITY, grad_y=grad_pre, grad_bias=grad_bias, workspace=ws)
    grad_x = None
    if need_x:
        grad_x = torch.empty_like(x2)
        st = _call("dgrad", dt, act, rows, in_f, out_f, dev, weight=weight, grad_pre=grad_pre,
                   grad_x=grad_x, workspace=ws)
        if st != 0:
            torch.mm(grad_pre, weight, out=grad_x)
    return grad_x, grad_w, grad_bias


def linear_dgrad_relu(grad_pre: torch.Tensor, weight: torch.Tensor, x2: torch.Tensor, aux: torch.Tensor,
                      need_bias: bool) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Across two layers, ``x2 = relu(h)`` then ``y = act(x2 @ weight.T + b)``: the input gradient of
    the second layer carried through the first layer's ReLU in one GEMM (CUBLASLT_EPILOGUE_DRELU_BGRAD).

    ``grad_h = (grad_pre @ weight) * [h > 0]`` and, when need_bias, ``grad_hb = grad_h.sum(0)`` (the
    first layer's bias gradient). For a ``FusedMLP``-style backward; the single-layer op has no use for
    it (NOTE: [cuBLASLt path]).

    Args:
        grad_pre: ``[rows, out_features]``, dL/d(pre-activation) of the second layer.
        weight: ``[out_features, in_features]``, the second layer's weight.
        x2: ``[rows, in_features]``, the first layer's output relu(h) (used when cuBLASLt has no
            DRELU epilogue for the problem: then relu' is taken from it by pyvae's kernel).
        aux: the first layer's mask from ``linear_fwd(..., act=1, want_aux=True)``,
            ``aux_shape(rows, in_features)`` uint8.
        need_bias: also return grad_hb.

    Returns:
        ``(grad_h [rows, in_features], grad_hb [in_features] or None)`` in x2's dtype, or None when this
        path cannot take the problem.
    """
    rows, in_f, out_f = _check_linear(x2, weight, "linear_dgrad_relu")
    if tuple(grad_pre.shape) != (rows, out_f):
        raise ValueError(f"pyvae._cublaslt.linear_dgrad_relu: grad_pre must be [{rows}, {out_f}], "
                         f"got {tuple(grad_pre.shape)}")
    if aux.dtype != torch.uint8 or tuple(aux.shape) != aux_shape(rows, in_f) or aux.device != x2.device:
        raise ValueError(f"pyvae._cublaslt.linear_dgrad_relu: aux must be uint8 {aux_shape(rows, in_f)} on "
                         f"{x2.device}, got {aux.dtype} {tuple(aux.shape)} on {aux.device}")
    if rows == 0 or in_f == 0 or out_f == 0 or not aux.is_contiguous() or not _usable(grad_pre, weight, x2):
        return None
    dev, dt = x2.device, x2.dtype
    grad_h = torch.empty_like(x2)
    grad_hb = torch.empty(in_f, dtype=dt, device=dev) if need_bias else None
    st = _call("dgrad", dt, _RELU, rows, in_f, out_f, dev, x=x2, weight=weight, grad_pre=grad_pre,
               grad_x=grad_h, grad_bias=grad_hb, aux=aux, aux_ld=aux.shape[1] * 8,
               workspace=_workspace(dev, _bias_scratch(rows, in_f, dt, dev, need_bias)))
    if st != 0:
        return None
    return grad_h, grad_hb

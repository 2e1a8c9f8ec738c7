"""Runs misuse cases for tests/test_misuse.py in a subprocess (so a crash cannot take pytest down).

Reads a JSON job from stdin: {"cases": [{"id", "code", "ref", "dtype"}, ...], "fork": bool, "tol"}; with
``fork``, each case runs in a forked child of this process (cases known to crash: cheap isolation).
For each case it prints one line ``{"start": id}`` before running it and one result line after,
flushing both: if the process dies, the parent knows which case was running. A case's ``code`` must
set ``result``; when it returns normally and the case has a ``ref``, that code must set ``expected``
and the two are compared here (float64 oracle, TOL of the case's dtype; meta tensors and ``Like``
by shape, dtype and device only).

Not a test module (pytest collects test_*.py only).
"""
import json
import math  # noqa: F401  (used by case code)
import os
import signal
import sys
import traceback
import warnings

import numpy as np  # noqa: F401  (used by case code)
import torch
import torch.nn.functional as F

import pyvae
from pyvae import reference  # noqa: F401  (used by case code)
from conftest import EXACT_ACTIVATIONS  # tests/ is this script's directory, so it is on sys.path

TOL = {}  # {dtype: (rtol, atol)}: conftest.py's table, sent by the parent with the job

P = torch.ops.pyvae
_gen = torch.Generator()


def R(*shape, dtype=torch.float64):
    """Deterministic N(0, 1) values (the generator restarts with every case)."""
    return torch.randn(shape, generator=_gen, dtype=torch.float64).to(dtype)


def U(*shape, dtype=torch.float64):
    """Deterministic values in [0, 1]."""
    return torch.rand(shape, generator=_gen, dtype=torch.float64).to(dtype)


def T(*shape, dtype=torch.float64):
    """Deterministic values in (-1, 1): outputs of tanh."""
    return torch.tanh(torch.randn(shape, generator=_gen, dtype=torch.float64)).to(dtype)


def SEED(seed=1234, offset=0):
    """A seed tensor as torch.ops.pyvae.reparameterize takes it: int64 [seed, offset]."""
    return torch.tensor([seed, offset], dtype=torch.int64)


def GEN(seed=7):
    return torch.Generator().manual_seed(seed)


def FUSED():
    """linear_act runs pyvae's kernel for every eager call (the documented switch; re-point here)."""
    from pyvae._linear import fused_only

    return fused_only()


ACTS = EXACT_ACTIVATIONS


def D64(t):
    """float64 copy of a tensor (anything else unchanged)."""
    return t.detach().double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def LINEAR_REF(x, w, b, act):
    return ACTS[act](F.linear(D64(x), D64(w), D64(b)))


# the pre-activation whose activation is a given output (relu, identity: the output itself)
_INVERSE = {"identity": lambda y: y, "relu": lambda y: y, "tanh": torch.atanh, "sigmoid": torch.logit,
            "softplus": lambda y: torch.log(torch.expm1(y))}


def LINEAR_BWD_REF(grad, x, w, out, has_bias, act, mask):
    """linear_act_backward's contract: the gradients of act(x @ w.T + b) for the output ``out``
    (float64 autograd at the pre-activation that gives ``out``); None where not asked for."""
    pre0 = _INVERSE[act](D64(out))
    x, w = D64(x).requires_grad_(), D64(w).requires_grad_()
    b = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device, requires_grad=True)
    lin = F.linear(x, w, b)
    y = ACTS[act](pre0 + (lin - lin.detach()))  # value act(pre0), derivative act'(pre0) d(lin)
    g = torch.autograd.grad(y, [x, w, b], D64(grad).expand(y.shape))
    want = [mask[0], mask[1], mask[2] and has_bias]
    return tuple(t if m else None for t, m in zip(g, want))


class Like:
    """An expected result known only by shape, dtype and device."""

    def __init__(self, shape, dtype, device="cpu"):
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, torch.device(device)


def REF_GRADS(fn, grad, inputs, mask):
    """Gradients of sum(grad * fn(*inputs)) in float64 for the inputs whose mask entry is True
    (None for the others: not compared). ``grad`` broadcasts to the output's shape."""
    leaves = [D64(t).requires_grad_(bool(m)) if isinstance(t, torch.Tensor) else t for t, m in zip(inputs, mask)]
    out = fn(*leaves)
    wanted = [t for t, m in zip(leaves, mask) if m]
    g = torch.autograd.grad(out, wanted, D64(grad).expand(out.shape), allow_unused=True) if wanted else []
    it = iter(g)
    res = []
    for t, m in zip(leaves, mask):
        if not m:
            res.append(None)
            continue
        v = next(it)
        res.append(torch.zeros_like(t) if v is None else v)
    return tuple(res)


def REPARAM_EPS(shape, samples, seed_or_gen, dtype=torch.float64, registered=False):
    """The standard normals behind a draw (mu = 0, logvar = 0 gives z = eps)."""
    zeros = torch.zeros(shape, dtype=dtype)
    if registered:
        return P.reparameterize(zeros, zeros, samples, seed_or_gen)
    return pyvae.reparameterize(zeros, zeros, samples=samples, generator=seed_or_gen)


def _compare(result, expected, dtype, where="result"):
    """None when ``result`` matches ``expected`` (float64 oracle, TOL[dtype]), else a description."""
    if expected is None:
        return None
    if isinstance(expected, (tuple, list)):
        if not isinstance(result, (tuple, list)) or len(result) != len(expected):
            return f"{where}: expected a sequence of {len(expected)}, got {type(result).__name__} " \
                   f"{len(result) if isinstance(result, (tuple, list)) else ''}"
        for i, (r, e) in enumerate(zip(result, expected)):
            msg = _compare(r, e, dtype, f"{where}[{i}]")
            if msg:
                return msg
        return None
    if not isinstance(result, torch.Tensor):
        return f"{where}: expected a tensor, got {type(result).__name__}"
    if isinstance(expected, Like) and result.dtype != expected.dtype:
        return f"{where}: dtype {result.dtype}, expected {expected.dtype}"
    if tuple(result.shape) != tuple(expected.shape):
        return f"{where}: shape {tuple(result.shape)}, expected {tuple(expected.shape)}"
    if result.device != expected.device:
        return f"{where}: device {result.device}, expected {expected.device}"
    want_dtype = getattr(torch, dtype)
    if result.dtype != want_dtype:
        return f"{where}: dtype {result.dtype}, expected {want_dtype}"
    if isinstance(expected, Like) or expected.device.type == "meta":
        return None
    rtol, atol = TOL[want_dtype]
    try:
        torch.testing.assert_close(result.detach().double(), expected.detach().double(), rtol=rtol, atol=atol,
                                   equal_nan=True)
    except AssertionError as e:
        return f"{where}: values differ: {str(e)[:400]}"
    return None


def run_case(case):
    _gen.manual_seed(0)
    ns = dict(globals())
    out = {"id": case["id"]}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(case["code"], ns)
        out["warnings"] = [str(w.message)[:200] for w in caught]
    except Exception as e:  # the case's verdict is made by the parent
        out.update(status="raised", exc=type(e).__name__,
                   bases=[c.__name__ for c in type(e).__mro__], msg=str(e)[:1500],
                   where=traceback.format_exc(limit=-2)[-600:])
        return out
    out["status"] = "returned"
    result = ns.get("result")
    out["result"] = repr(result)[:400]
    if case.get("ref"):
        try:
            exec(case["ref"], ns)
            out["mismatch"] = _compare(result, ns["expected"], case["dtype"])
        except Exception as e:
            out["mismatch"] = f"the reference itself raised {type(e).__name__}: {str(e)[:300]}"
    return out


def run_forked(case):
    """``run_case`` in a forked child, so that a crash ends only the child. Safe here: this process
    has run no kernel yet (no OpenMP or intra-op thread pool exists to be lost in the fork)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        try:
            data = json.dumps(run_case(case)).encode()
        except BaseException as e:  # noqa: BLE001  (anything at all: report it, never fall through)
            data = json.dumps({"id": case["id"], "status": "crashed", "detail": f"runner: {e!r}"}).encode()
        with os.fdopen(write, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if data:
        return json.loads(data)
    if os.WIFSIGNALED(status):
        how = f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    else:
        how = f"exit status {os.WEXITSTATUS(status)}"
    return {"id": case["id"], "status": "crashed", "detail": f"forked child {how} (its stderr is the runner's)"}


def main():
    """stdin: {"cases": [...], "fork": bool, "tol": {dtype name: [rtol, atol]}}; with fork, every case
    runs in a forked child."""
    job = json.load(sys.stdin)
    TOL.update({getattr(torch, name): tuple(v) for name, v in job["tol"].items()})
    for case in job["cases"]:
        print(json.dumps({"start": case["id"]}), flush=True)
        print(json.dumps(run_forked(case) if job["fork"] else run_case(case)), flush=True)


if __name__ == "__main__":
    main()

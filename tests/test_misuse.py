"""Misuse of every public op and every registered torch.ops.pyvae.* op (the *_backward ops included:
torch.ops makes them public).

Each case is a few lines of Python run in a subprocess (tests/misuse_child.py), many cases per
process; a segfault or abort therefore fails the case that was running instead of killing pytest.
If a batch dies, the case it was running is rerun alone (to name the crasher) and the cases after it
run on in a new batch. Cases known to crash each run in a forked child of a third process.

A case passes when
- ``error``: it raises TypeError, ValueError or RuntimeError (or a subclass) whose message names the
  offending argument (as a word: ``mu``, ``output_mask``, ...);
- ``ref``: it returns the reference's result (float64 oracle within TOL of the dtype; meta tensors by
  shape and dtype);
- ``error_or_ref``: either of the two (valid-but-unusual input that an op may also refuse).

A defect found later is marked xfail(strict=True) with the defect as the reason (KNOWN below), so its
cases stay visible and fail once it is fixed; then its entry goes. Every defect of the first run (TESTING.md,
"Misuse of every op") is fixed.
"""
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import pyvae  # noqa: F401  (registers torch.ops.pyvae)
from conftest import TOL

HERE = os.path.dirname(os.path.abspath(__file__))
ACCEPTED = ("TypeError", "ValueError", "RuntimeError")


@dataclass(frozen=True)
class Case:
    id: str
    code: str  # sets `result`
    expect: str  # "error" | "ref" | "error_or_ref"
    names: tuple = ()  # an error message must contain one of these words
    ref: str = ""  # sets `expected` (the reference result) for "ref" / "error_or_ref"
    dtype: str = "float64"  # the dtype tensors in the result must have
    isolate: bool = False  # run in a forked child of its own (known to crash)


# ------------------------------------------------------------------------------- op specs
# Tensor arguments: (name, maker, shape) with maker R (normal), U ([0, 1]) or T (tanh of normal); others:
# (name, None, code). Values are float64 so that results compare tightly with the float64 oracle.
FORWARD = {
    "gaussian_kl": [("mu", "R", (3, 4)), ("logvar", "R", (3, 4)), ("prior_mu", "R", (4,)),
                    ("prior_logvar", "R", (4,))],
    "bernoulli_log_prob": [("logits", "R", (2, 3, 4)), ("x", "U", (3, 4))],
    "continuous_bernoulli_log_prob": [("logits", "R", (2, 3, 4)), ("x", "U", (3, 4))],
    "gaussian_log_prob": [("x", "R", (3, 4)), ("mean", "R", (2, 3, 4)), ("logvar", "R", (4,))],
    "bernoulli_elbo": [("logits", "R", (2, 3, 5)), ("x", "U", (3, 5)), ("mu", "R", (3, 4)), ("logvar", "R", (3, 4))],
    "reparameterize": [("mu", "R", (3, 4)), ("logvar", "R", (4,)), ("samples", None, "2"), ("seed", None, "SEED()")],
    "linear_act": [("x", "R", (3, 5)), ("weight", "R", (4, 5)), ("bias", "R", (4,)), ("activation", None, "'tanh'")],
}
OPTIONAL = {("gaussian_kl", "prior_mu"), ("gaussian_kl", "prior_logvar"), ("linear_act", "bias")}


def _mask(n):
    return ("output_mask", None, repr([True] * n))


BACKWARD = {
    "gaussian_kl_backward": [("grad", "R", (3,))] + FORWARD["gaussian_kl"] + [_mask(4)],
    "gaussian_kl_required_backward": [("grad", "R", (3,))] + FORWARD["gaussian_kl"][:2] + [_mask(2)],
    "bernoulli_log_prob_backward": [("grad", "R", (2, 3))] + FORWARD["bernoulli_log_prob"] + [_mask(2)],
    "continuous_bernoulli_log_prob_backward": [("grad", "R", (2, 3))] + FORWARD["continuous_bernoulli_log_prob"]
    + [_mask(2)],
    "gaussian_log_prob_backward": [("grad", "R", (2, 3))] + FORWARD["gaussian_log_prob"] + [_mask(3)],
    "bernoulli_elbo_backward": [("grad", "R", (3,))] + FORWARD["bernoulli_elbo"] + [_mask(4)],
    "reparameterize_backward": [("grad", "R", (2, 3, 4))] + FORWARD["reparameterize"] + [_mask(2)],
    # out: the forward's output for x = X0, weight = W0, a hidden bias HB (see SETUP)
    "linear_act_backward": [("grad", "R", (3, 4)), ("x", None, "X0"), ("weight", None, "W0"),
                            ("out", None, "LINEAR_REF(X0, W0, HB, 'tanh')"), ("has_bias", None, "True"),
                            ("activation", None, "'tanh'"), _mask(3)],
}
# the tensor arguments of linear_act_backward that are given by name above
LINEAR_BWD_SHAPES = {"x": ("R", (3, 5)), "weight": ("R", (4, 5)), "out": ("T", (3, 4))}  # T: tanh(R)
SETUP = "X0 = R(3, 5)\nW0 = R(4, 5)\nHB = R(4)\n"
REGISTERED = sorted(list(FORWARD) + list(BACKWARD))
PUBLIC = sorted(FORWARD)


def _maker(kind, shape, dtype=None):
    args = ", ".join(str(s) for s in shape)
    return f"{kind}({args}{', ' if args and dtype else ''}{'dtype=torch.' + dtype if dtype else ''})"


def _default(arg):
    name, kind, shape_or_code = arg
    return shape_or_code if kind is None else _maker(kind, shape_or_code)


def _tensor_args(op):
    spec = FORWARD.get(op) or BACKWARD[op]
    out = [(n, k, s) for n, k, s in spec if k is not None]
    if op == "linear_act_backward":
        out += [(n, *LINEAR_BWD_SHAPES[n]) for n in ("x", "weight", "out")]
    return out


def _names(op):
    return [a[0] for a in (FORWARD.get(op) or BACKWARD[op])]


# ------------------------------------------------------------------------------ call forms
def _call(form, op, overrides):
    """Code that binds every argument (a_<name>) and calls the op in ``form`` ("public" or
    "registered"), with ``overrides`` {name: code} replacing the valid defaults."""
    spec = FORWARD.get(op) or BACKWARD[op]
    lines = [SETUP] if op.startswith("linear_act") else []
    names = []
    for arg in spec:
        name = arg[0]
        if form == "public" and op == "reparameterize" and name == "seed":
            name, code = "generator", overrides.get("generator", "GEN()")
        elif form == "public" and op == "reparameterize" and name == "samples":
            code = overrides.get("samples", "2")
        else:
            code = overrides.get(name, _default(arg))
        lines.append(f"a_{name} = {code}")
        names.append(name)
    args = ", ".join(f"a_{n}" for n in names)
    if form == "registered":
        call = f"result = P.{op}({args})"
    elif op == "reparameterize":
        call = "result = pyvae.reparameterize(a_mu, a_logvar, samples=a_samples, generator=a_generator)"
    elif op == "linear_act":
        call = f"with FUSED():\n    result = pyvae.linear_act({args})"
    else:
        call = f"result = pyvae.{op}({args})"
    return "\n".join(lines + [call])


def _ref(form, op, eps_gen="GEN()"):
    """Code that sets ``expected`` from the bound a_<name> arguments (``eps_gen``: the generator the
    public reparameterize's oracle draws eps from, seeded like the call's)."""
    if op in ("gaussian_kl", "bernoulli_log_prob", "continuous_bernoulli_log_prob", "gaussian_log_prob",
              "bernoulli_elbo"):
        return f"expected = reference.{op}(*map(D64, [{', '.join('a_' + n for n in _names(op))}]))"
    if op == "linear_act":
        return "expected = LINEAR_REF(a_x, a_weight, a_bias, a_activation)"
    if op == "reparameterize":
        if form == "public":
            eps = ("REPARAM_EPS(torch.broadcast_shapes(a_mu.shape, a_logvar.shape), "
                   f"None if a_samples is None else int(a_samples), {eps_gen}, a_mu.dtype)")
        else:
            eps = "REPARAM_EPS(torch.broadcast_shapes(a_mu.shape, a_logvar.shape), a_samples, a_seed, a_mu.dtype, True)"
        return f"eps = {eps}\nexpected = D64(a_mu) + (0.5 * D64(a_logvar)).exp() * D64(eps)"
    fwd = op.replace("_required_backward", "").replace("_backward", "")
    if op == "linear_act_backward":
        # the op's contract: the gradients of act(x @ weight.T + b) whose output is `out`
        return ("expected = LINEAR_BWD_REF(a_grad, a_x, a_weight, a_out, a_has_bias, a_activation, a_output_mask)")
    if op == "reparameterize_backward":
        return ("eps = REPARAM_EPS(torch.broadcast_shapes(a_mu.shape, a_logvar.shape), a_samples, a_seed, a_mu.dtype, "
                "True)\nexpected = REF_GRADS(lambda m, v: m + (0.5 * v).exp() * D64(eps), a_grad, [a_mu, a_logvar], "
                "a_output_mask)")
    inputs = [n for n in _names(op) if n not in ("grad", "output_mask")]
    return (f"expected = REF_GRADS(reference.{fwd}, a_grad, [{', '.join('a_' + n for n in inputs)}], "
            "a_output_mask)")


# ------------------------------------------------------------------------------ the cases
CASES = []


def add(id, code, expect, names=(), ref="", dtype="float64", isolate=False):
    assert id not in {c.id for c in CASES}, id
    CASES.append(Case(id, code, expect, tuple(names), ref, dtype, isolate))


def forms(op):
    return (["public", "registered"] if op in PUBLIC else []) + (["registered"] if op in BACKWARD else [])


def _cid(form, op, what):
    return f"{'pyvae' if form == 'public' else 'ops'}.{op}:{what}"


def _tensor_variants(form, op):
    """Wrong types, dtypes, dims, shapes and devices, one tensor argument at a time."""
    targs = _tensor_args(op)
    all_names = [n for n, _, _ in targs]
    backward = op in BACKWARD
    for name, kind, shape in targs:
        call = lambda code: _call(form, op, {name: code})  # noqa: E731
        ref = _ref(form, op)
        grad = name == "grad"
        add(_cid(form, op, f"{name}=float"), call("1.5"), "error", [name])
        add(_cid(form, op, f"{name}=list"), call(repr([[0.5] * shape[-1]])), "error", [name])
        add(_cid(form, op, f"{name}=ndarray"), call(f"np.zeros({shape})"), "error", [name])
        add(_cid(form, op, f"{name}=str"), call("'abc'"), "error", [name])
        if (op.replace("_backward", ""), name) not in OPTIONAL:
            add(_cid(form, op, f"{name}=None"), call("None"), "error", [name])
        for dt in ("int64", "int32", "uint8"):
            add(_cid(form, op, f"{name}={dt}"), call(f"({_maker(kind, shape)} * 3).to(torch.{dt})"),
                "error_or_ref" if grad else "error", [name], ref)
        add(_cid(form, op, f"{name}=bool"), call(f"{_maker(kind, shape)} > 0.5"),
            "error_or_ref" if grad else "error", [name], ref)
        for dt in ("complex64", "complex128"):
            add(_cid(form, op, f"{name}={dt}"), call(f"{_maker(kind, shape)}.to(torch.{dt})"), "error", [name])
        for dt in ("float32", "float16", "bfloat16"):  # mixed with the others' float64
            add(_cid(form, op, f"{name}=mixed-{dt}"), call(_maker(kind, shape, dt)),
                "error_or_ref" if grad else "error", [name], ref)
        # 0-dim: broadcasting would make sense of it; an op may also refuse it (no event dim)
        add(_cid(form, op, f"{name}=0-dim"), call("torch.tensor(0.5, dtype=torch.float64)"), "error_or_ref",
            [name], ref)
        # one dim too long: never broadcastable
        bad = (*shape[:-1], shape[-1] + 1)
        add(_cid(form, op, f"{name}=size{bad}"), call(_maker(kind, bad)), "error", [name] if grad else all_names)
        lead_ok = op == "linear_act" and name == "x"  # x [*, in]: any leading shape is valid
        if len(shape) >= 2:  # the last leading dim changed: valid only where it still broadcasts
            bad = (*shape[:-2], shape[-2] + 2, shape[-1])
            ok = lead_ok or (not backward and _broadcasts(op, name, bad))
            add(_cid(form, op, f"{name}=size{bad}"), call(_maker(kind, bad)), "ref" if ok else "error",
                [name] if grad else all_names, ref)
        if grad or op.startswith("linear_act"):
            bad = (2, *shape)  # an extra leading dim
            add(_cid(form, op, f"{name}=size{bad}"), call(_maker(kind, bad)), "ref" if lead_ok else "error",
                [name] if grad else all_names, ref)
        # on another device than the others (the only other device everywhere: meta)
        add(_cid(form, op, f"{name}=meta"), call(f"{_maker(kind, shape)}.to('meta')"), "error", [name])
        # valid: a stride-0 view of the right shape
        if not grad:
            add(_cid(form, op, f"{name}=expanded"), call(f"{_maker(kind, (1,) * (len(shape) - 1) + shape[-1:])}"
                                                         f".expand{shape}"), "ref", ref=ref)


def _broadcasts(op, name, shape):
    """Whether the forward op's tensor arguments still broadcast with ``name`` of ``shape``."""
    if op == "bernoulli_elbo":  # logits [L, *B, D] or [*B, D], x to [*B, D], mu = logvar: no freedom
        return False
    shapes = [shape if n == name else s for n, _, s in _tensor_args(op)]
    try:
        torch.broadcast_shapes(*shapes)
        return True
    except RuntimeError:
        return False


def _schema_variants(op):
    """For each argument of the registered schema, a value of the wrong type."""
    bad = {"Tensor": "1.5", "Optional[Tensor]": "'abc'", "List[bool]": "'abc'", "str": "1", "bool": "'yes'",
           "int": "2.5"}
    for a in getattr(torch.ops.pyvae, op).default._schema.arguments:
        t = str(a.type)
        assert t in bad, (op, a.name, t)
        add(_cid("registered", op, f"schema-{a.name}={bad[t]}"), _call("registered", op, {a.name: bad[t]}),
            "error", [a.name])


def _op_variants(form, op):
    """Whole-call variants: every tensor on meta, every tensor float16, wrong output_mask lengths."""
    targs = _tensor_args(op)
    ref = _ref(form, op)
    meta = {n: f"{_maker(k, s)}.to('meta')" for n, k, s in targs}
    if op == "linear_act_backward":
        meta = {"grad": "R(3, 4).to('meta')", "x": "X0.to('meta')", "weight": "W0.to('meta')",
                "out": "LINEAR_REF(X0, W0, HB, 'tanh').to('meta')"}
    meta_ref = ref  # the references run on meta tensors too (shapes and dtypes only)
    if op == "reparameterize":  # its oracle needs real draws: only the shape and dtype
        meta_ref = "expected = Like((2, 3, 4), torch.float64, 'meta')"
    if op == "reparameterize_backward":
        meta_ref = "expected = (Like((3, 4), torch.float64, 'meta'), Like((4,), torch.float64, 'meta'))"
    add(_cid(form, op, "all-meta"), _call(form, op, meta), "error_or_ref", ["meta"], meta_ref)
    half = {n: _maker(k, s, "float16") for n, k, s in targs}
    if op == "linear_act_backward":
        half = {"grad": "R(3, 4, dtype=torch.float16)", "x": "X0.half()", "weight": "W0.half()",
                "out": "LINEAR_REF(X0, W0, HB, 'tanh').half()"}
    add(_cid(form, op, "all-float16"), _call(form, op, half), "ref", ref=ref, dtype="float16")
    if op in BACKWARD:
        n = len(eval(dict((a[0], a[2]) for a in BACKWARD[op])["output_mask"]))
        for what, mask in (("short", [True] * (n - 1)), ("long", [True] * (n + 1)), ("empty", [])):
            add(_cid(form, op, f"output_mask-{what}"), _call(form, op, {"output_mask": repr(mask)}), "error",
                ["output_mask"])
        add(_cid(form, op, "output_mask-none-set"), _call(form, op, {"output_mask": repr([False] * n)}), "ref",
            ref=ref)


for _op in REGISTERED:
    for _form in forms(_op):
        _tensor_variants(_form, _op)
        _op_variants(_form, _op)
    _schema_variants(_op)


# -------------------------------------------------------------------- op-specific cases
def _both(op, what, overrides, expect, names=(), isolate=False, ref=None, dtype="float64"):
    for form in forms(op):
        if form == "registered" and op == "reparameterize" and ("generator" in overrides):
            continue
        add(_cid(form, op, what), _call(form, op, overrides), expect, names,
            _ref(form, op) if ref is None else ref, dtype, isolate)


# empty tensors (valid: sums over an empty event dim are 0)
_both("gaussian_kl", "empty-batch", {"mu": "R(0, 4)", "logvar": "R(0, 4)"}, "ref")
_both("gaussian_kl", "empty-event", {"mu": "R(3, 0)", "logvar": "R(3, 0)", "prior_mu": "R(0)",
                                     "prior_logvar": "R(0)"}, "ref")
_both("gaussian_kl", "no-prior", {"prior_mu": "None", "prior_logvar": "None"}, "ref")
_both("gaussian_kl", "prior_mu-only", {"prior_logvar": "None"}, "ref")
_both("gaussian_kl", "prior_logvar-only", {"prior_mu": "None"}, "ref")
_both("bernoulli_log_prob", "empty-batch", {"logits": "R(2, 0, 4)", "x": "U(0, 4)"}, "ref")
_both("bernoulli_log_prob", "empty-event", {"logits": "R(2, 3, 0)", "x": "U(3, 0)"}, "ref")
_both("bernoulli_log_prob", "empty-samples", {"logits": "R(0, 3, 4)"}, "ref")
_both("gaussian_log_prob", "empty-batch", {"x": "R(0, 4)", "mean": "R(2, 0, 4)"}, "ref")
_both("gaussian_log_prob", "empty-event", {"x": "R(3, 0)", "mean": "R(2, 3, 0)", "logvar": "R(0)"}, "ref")
_both("bernoulli_elbo", "empty-batch", {"logits": "R(2, 0, 5)", "x": "U(0, 5)", "mu": "R(0, 4)",
                                        "logvar": "R(0, 4)"}, "ref")
_both("bernoulli_elbo", "empty-D", {"logits": "R(2, 3, 0)", "x": "U(3, 0)"}, "ref")
_both("bernoulli_elbo", "empty-Z", {"mu": "R(3, 0)", "logvar": "R(3, 0)"}, "ref")
_both("reparameterize", "empty", {"mu": "R(0, 4)", "logvar": "R(4)"}, "ref")
_both("reparameterize", "empty-event", {"mu": "R(3, 0)", "logvar": "R(0)"}, "ref")
_both("linear_act", "empty-batch", {"x": "R(0, 5)"}, "ref")
_both("linear_act", "empty-batch-3d", {"x": "R(2, 0, 5)"}, "ref")
_both("linear_act", "in-features-0", {"x": "R(3, 0)", "weight": "R(4, 0)"}, "ref")
_both("linear_act", "in-features-0-3d", {"x": "R(2, 3, 0)", "weight": "R(4, 0)"}, "ref")
_both("linear_act", "out-features-0", {"weight": "R(0, 5)", "bias": "R(0)"}, "ref")
_both("bernoulli_log_prob_backward", "empty-batch", {"grad": "R(2, 0)", "logits": "R(2, 0, 4)", "x": "U(0, 4)"}, "ref")
_both("gaussian_kl_backward", "empty-event", {"mu": "R(3, 0)", "logvar": "R(3, 0)", "prior_mu": "R(0)",
                                              "prior_logvar": "R(0)"}, "ref")
_both("bernoulli_elbo_backward", "empty-batch", {"grad": "R(0)", "logits": "R(2, 0, 5)", "x": "U(0, 5)",
                                                 "mu": "R(0, 4)", "logvar": "R(0, 4)"}, "ref")
_both("linear_act_backward", "out-features-0", {"grad": "R(3, 0)", "weight": "R(0, 5)", "out": "R(3, 0)"}, "ref",
      isolate=True)
_both("linear_act_backward", "out-features-0-3d", {"grad": "R(2, 3, 0)", "x": "R(2, 3, 5)", "weight": "R(0, 5)",
                                                   "out": "R(2, 3, 0)"}, "ref", isolate=True)

# huge sizes through stride-0 views (valid; nothing to materialize but the result)
BIG = 4_000_000
_both("gaussian_kl", "huge-expanded", {"mu": f"R(1, 1).expand({BIG}, 1)", "logvar": "R(1)", "prior_mu": "R(1)",
                                       "prior_logvar": "R(1)"}, "ref")
_both("bernoulli_log_prob", "huge-expanded", {"logits": f"R(1, 1).expand({BIG}, 1)", "x": "U(1)"}, "ref")
_both("gaussian_log_prob", "huge-expanded", {"x": f"R(1, 1).expand({BIG}, 1)", "mean": "R(1)", "logvar": "R(1)"},
      "ref")
_both("bernoulli_elbo", "huge-expanded", {"logits": f"R(1, 1).expand({BIG}, 1)", "x": "U(1)",
                                          "mu": f"R(1, 1).expand({BIG}, 1)", "logvar": f"R(1, 1).expand({BIG}, 1)"},
      "ref")
_both("reparameterize", "huge-expanded", {"mu": f"R(1).expand({BIG})", "logvar": "R(1)"}, "ref")
_both("linear_act", "huge-expanded-bias", {"x": "R(1, 1)", "weight": f"R(1, 1).expand({BIG}, 1)",
                                           "bias": f"R(1).expand({BIG})"}, "ref", isolate=True)
_both("linear_act", "huge-expanded-x", {"x": f"R(1, 5).expand({BIG // 8}, 5)"}, "ref")
_both("gaussian_kl_backward", "huge-expanded", {"grad": f"R(1).expand({BIG})", "mu": f"R(1, 1).expand({BIG}, 1)",
                                                "logvar": "R(1)", "prior_mu": "R(1)", "prior_logvar": "R(1)"}, "ref")

# non-contiguous bias (valid)
for _act in ("relu", "identity"):
    _both("linear_act", f"bias-stepped-{_act}", {"bias": "R(8)[::2]", "activation": repr(_act)}, "ref")
    _both("linear_act", f"bias-stride0-{_act}", {"bias": "R(1).expand(4)", "activation": repr(_act)}, "ref")

# linear_act: shapes, activation strings
_both("linear_act", "x-1d", {"x": "R(5)"}, "ref")
_both("linear_act", "x-4d", {"x": "R(2, 1, 3, 5)"}, "ref")
_both("linear_act", "weight-1d", {"weight": "R(5)"}, "error", ["weight"])
_both("linear_act", "weight-3d", {"weight": "R(1, 4, 5)"}, "error", ["weight"])
_both("linear_act", "weight-transposed-shape", {"weight": "R(5, 4)"}, "error", ["weight", "x", "bias"])
_both("linear_act", "bias-2d", {"bias": "R(1, 4)"}, "error", ["bias"])
_both("linear_act", "bias-none", {"bias": "None"}, "ref")
for _act in ("'Relu'", "'gelu'", "''", "' tanh'", "None", "1", "b'relu'", "['relu']"):
    _both("linear_act", f"activation={_act}", {"activation": _act}, "error", ["activation"])
# torch's schema parser turns bytes into str for a str argument: b'relu' is 'relu' there
CASES[:] = [c if c.id != "ops.linear_act:activation=b'relu'" else Case(c.id, c.code, "error_or_ref", c.names,
            "expected = LINEAR_REF(a_x, a_weight, a_bias, 'relu')", c.dtype, c.isolate) for c in CASES]
for _act in ("identity", "relu", "sigmoid", "softplus"):
    _both("linear_act", f"activation-{_act}", {"activation": repr(_act)}, "ref")

# linear_act_backward: grad and out must have the forward's output shape [*x.shape[:-1], out_features]
_LAB = "linear_act_backward"
_both(_LAB, "brief-repro", {"grad": "torch.ones(10, 7, dtype=torch.float64)", "x": "R(10, 4)", "weight": "R(8, 4)",
                            "out": "torch.zeros(10, 8, dtype=torch.float64)"}, "error", ["grad"], isolate=True)
_both(_LAB, "out-size(3, 3)", {"out": "R(3, 3)"}, "error", ["out"], isolate=True)
_both(_LAB, "out-size(2, 4)", {"out": "R(2, 4)"}, "error", ["out"], isolate=True)
_both(_LAB, "identity-out-ignored", {"activation": "'identity'", "out": "R(1)"}, "error_or_ref", ["out"],
      isolate=True)
_both(_LAB, "has_bias-false", {"has_bias": "False"}, "ref")
for _act in ("'gelu'", "''", "None"):
    _both(_LAB, f"activation={_act}", {"activation": _act}, "error", ["activation"])

# bernoulli_elbo: the documented shapes
_both("bernoulli_elbo", "logits-0-samples", {"logits": "R(0, 3, 5)"}, "error", ["logits"])
_both("bernoulli_elbo", "logits-batch-mismatch", {"logits": "R(2, 4, 5)"}, "error", ["logits"])
_both("bernoulli_elbo", "logits-2-sample-dims", {"logits": "R(2, 2, 3, 5)"}, "error", ["logits"])
_both("bernoulli_elbo", "mu-logvar-mismatch", {"logvar": "R(3, 3)"}, "error", ["mu", "logvar"])
_both("bernoulli_elbo", "logvar-broadcast", {"logvar": "R(4)"}, "error_or_ref", ["mu", "logvar"])
_both("bernoulli_elbo", "x-extra-dim", {"x": "U(2, 3, 5)"}, "error", ["x"])
_both("bernoulli_elbo", "x-row-broadcast", {"x": "U(5)"}, "ref")
_both("bernoulli_elbo", "no-samples", {"logits": "R(3, 5)"}, "ref")
_both("bernoulli_elbo_backward", "no-samples", {"logits": "R(3, 5)"}, "ref")

# reparameterize: samples and generator
for _s, _exp in (("None", "ref"), ("1", "ref"), ("np.int64(2)", "ref"), ("np.int32(3)", "ref"),
                 ("torch.tensor(2)", "error_or_ref"), ("0", "error"), ("-1", "error"), ("2.0", "error"),
                 ("1.5", "error"), ("'2'", "error"), ("True", "error"), ("2**64", "error"), ("[2]", "error")):
    add(_cid("public", "reparameterize", f"samples={_s}"), _call("public", "reparameterize", {"samples": _s}),
        _exp, ["samples"], _ref("public", "reparameterize"))
# None: torch's global generator (seeded here, and again for the oracle's eps)
for _g, _eps_gen in (("(torch.manual_seed(7), None)[1]", "(torch.manual_seed(7), None)[1]"),
                     ("torch.Generator()", "torch.Generator()")):
    add(_cid("public", "reparameterize", f"generator={_g}"), _call("public", "reparameterize", {"generator": _g}),
        "ref", ref=_ref("public", "reparameterize", _eps_gen))
for _g in ("5", "'cpu'", "np.random.default_rng(0)", "torch.device('cpu')", "GEN", "7.5"):
    add(_cid("public", "reparameterize", f"generator={_g}"), _call("public", "reparameterize", {"generator": _g}),
        "error", ["generator"])
for _s, _exp in (("0", "ref"), ("-1", "error"), ("2**63", "error")):
    add(_cid("registered", "reparameterize", f"samples={_s}"), _call("registered", "reparameterize", {"samples": _s}),
        _exp, ["samples"], _ref("registered", "reparameterize"))
for _sd in ("torch.tensor([1, 2, 3])", "torch.tensor([1.0, 0.0])", "torch.tensor([1, 0], dtype=torch.int32)",
            "torch.tensor(5)", "torch.tensor([[1, 0]])", "torch.tensor([1, 0], device='meta')"):
    for _op in ("reparameterize", "reparameterize_backward"):
        add(_cid("registered", _op, f"seed={_sd}"), _call("registered", _op, {"seed": _sd}), "error", ["seed"])
add(_cid("registered", "reparameterize", "seed-negative"), _call("registered", "reparameterize",
    {"seed": "torch.tensor([-5, -1])"}), "ref", ref=_ref("registered", "reparameterize"))
add(_cid("registered", "reparameterize_backward", "samples-mismatch"),
    _call("registered", "reparameterize_backward", {"samples": "3"}), "error", ["grad", "samples"])
add(_cid("registered", "reparameterize_backward", "samples-0-grad-with-sample-dim"),
    _call("registered", "reparameterize_backward", {"samples": "0"}), "error", ["grad", "samples"])
add(_cid("registered", "reparameterize_backward", "samples-0"),
    _call("registered", "reparameterize_backward", {"samples": "0", "grad": "R(3, 4)"}), "ref",
    ref=_ref("registered", "reparameterize_backward"))

# grad broadcastable to the output but not of its shape
for _op, _g in (("gaussian_kl_backward", "R(1)"), ("bernoulli_log_prob_backward", "R(3)"),
                ("gaussian_log_prob_backward", "R(1, 3)"), ("bernoulli_elbo_backward", "R(1)"),
                ("reparameterize_backward", "R(4)"), ("gaussian_kl_required_backward", "R(1)")):
    add(_cid("registered", _op, "grad-broadcastable"), _call("registered", _op, {"grad": _g}), "error_or_ref",
        ["grad"], _ref("registered", _op))
add(_cid("registered", _LAB, "grad-broadcastable"), _call("registered", _LAB, {"grad": "R(4)"}), "error_or_ref",
    ["grad"], _ref("registered", _LAB), isolate=True)

# --------------------------------------------------------------------------- known defects
# Every defect the first run of these cases found (the reasons above) is fixed: no case is expected to fail.
# A defect found later goes here as {REASON: [case ids]}, so that its cases stay visible as strict xfails.
_KNOWN_IDS: dict = {}
KNOWN = {i: reason for reason, ids in _KNOWN_IDS.items() for i in ids}
assert sum(len(v) for v in _KNOWN_IDS.values()) == len(KNOWN), "an id under two defects"
assert set(KNOWN) <= {c.id for c in CASES}, set(KNOWN) - {c.id for c in CASES}

# The cases that once crashed their process (None for a required tensor; linear_act_backward's unchecked
# shapes) still run each in a process of its own: a regression crashes that case alone.
_ALONE = [c.id for c in CASES if (c.id.endswith("=None") and c.id.split(".")[0] in ("pyvae", "ops")
                                  and ":grad=" not in c.id and ":out=" not in c.id and "required" not in c.id
                                  and "elbo" not in c.id)
          or (c.id.startswith("ops.linear_act_backward:")
              and any(k in c.id for k in ("size", "0-dim", "brief-repro", "broadcastable")))]
CASES[:] = [Case(c.id, c.code, c.expect, c.names, c.ref, c.dtype, True) if c.id in _ALONE else c for c in CASES]


# ------------------------------------------------------------------------------ the runner
def _spawn(cases, timeout, fork=False):
    """Runs ``cases`` in one child (each in a forked grandchild with ``fork``); returns ({id: result},
    id running when the child died or None, detail)."""
    payload = json.dumps({"fork": fork, "tol": {str(dt).split(".")[1]: tol for dt, tol in TOL.items()},
                          "cases": [{"id": c.id, "code": c.code, "ref": c.ref, "dtype": c.dtype} for c in cases]})
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run([sys.executable, os.path.join(HERE, "misuse_child.py")], input=payload, text=True,
                              capture_output=True, timeout=timeout, cwd=HERE, env=env)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        rc = f"timeout after {timeout} s"
    results, running = {}, None
    for line in stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if "start" in msg:
            running = msg["start"]
        else:
            results[msg["id"]] = msg
            running = None
    died = None
    if len(results) < len(cases):
        died = running if running is not None else cases[len(results)].id
    return results, died, f"exit status {rc}; stderr: {stderr[-1500:]}"


def _run_batch(cases, timeout, fork=False):
    """{id: result} for ``cases`` run in one child. If it dies, the case it was running is rerun alone
    (a crash there names it; a forked case that killed the child itself is reported as crashed) and
    the cases after it go on in a new child."""
    results, pending = {}, list(cases)
    while pending:
        got, died, detail = _spawn(pending, timeout, fork)
        results.update(got)
        if died is None:
            break
        idx = next(i for i, c in enumerate(pending) if c.id == died)
        alone, died_alone, detail_alone = _spawn([pending[idx]], timeout)
        if died_alone is not None:
            results[died] = {"id": died, "status": "crashed", "detail": detail_alone}
        else:
            # it survives alone: an earlier case of this batch probably corrupted memory
            before = [c.id for c in cases[:len(cases) - len(pending) + idx]][-5:]
            results[died] = {"id": died, "status": "crashed",
                             "detail": f"the batch died while this case ran ({detail}), but it passes alone; "
                                       f"suspects: the cases run before it in the batch, last ones {before}"}
        pending = pending[idx + 1:]
    return results


def run_cases(cases, timeout=900):
    """{id: result} for every case: linear_act_backward's cases (which once corrupted the heap) in a batch
    of their own, the rest in another, and the known crashers each in a forked child; the
    three children run at the same time."""
    from concurrent.futures import ThreadPoolExecutor

    lab = [c for c in cases if not c.isolate and c.id.startswith("ops.linear_act_backward:")]
    rest = [c for c in cases if not c.isolate and not c.id.startswith("ops.linear_act_backward:")]
    alone = [c for c in cases if c.isolate]
    jobs = [(b, fork) for b, fork in ((rest, False), (lab, False), (alone, True)) if b]
    results = {}
    with ThreadPoolExecutor(len(jobs) or 1) as pool:
        for got in pool.map(lambda job: _run_batch(job[0], timeout, job[1]), jobs):
            results.update(got)
    return results


@pytest.fixture(scope="module")
def outcomes():
    return run_cases(CASES)


def verdict(case, res):
    """None when ``res`` is a pass for ``case``, else why not."""
    if res["status"] == "crashed":
        return f"the process died: {res['detail']}"
    if res["status"] == "raised":
        if case.expect == "ref":
            return f"raised {res['exc']}: {res['msg']}\n{res.get('where', '')}"
        if not any(b in ACCEPTED for b in res["bases"]):
            return f"raised {res['exc']} (not TypeError/ValueError/RuntimeError): {res['msg']}"
        if not any(re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", res["msg"]) for n in case.names):
            return f"raised {res['exc']} without naming {' or '.join(case.names)}: {res['msg']}"
        return None
    if case.expect == "error":
        return f"returned instead of raising (naming {' or '.join(case.names)}): {res.get('result')}"
    if res.get("mismatch"):
        return f"returned a wrong result: {res['mismatch']}"
    return None


# ----------------------------------------------------------------- gather_binarize (data loading)
_GB = "src = torch.rand(5, 3, dtype=torch.float32)\n"
for _id, _code, _names in [
    ("index-out-of-range", "pyvae.ops.gather_binarize(src, torch.tensor([0, 5]), seed=1)", ["index"]),
    ("index-negative", "pyvae.ops.gather_binarize(src, torch.tensor([-1]), seed=1)", ["index"]),
    ("index-float", "pyvae.ops.gather_binarize(src, torch.tensor([0.0]), seed=1)", ["index"]),
    ("index-2d", "pyvae.ops.gather_binarize(src, torch.zeros(1, 1, dtype=torch.int64), seed=1)", ["index"]),
    ("index-meta", "pyvae.ops.gather_binarize(src, torch.zeros(1, dtype=torch.int64, device='meta'), seed=1)",
     ["index"]),
    ("src-float64", "pyvae.ops.gather_binarize(src.double(), seed=1)", ["src"]),
    ("src-1d", "pyvae.ops.gather_binarize(torch.rand(5), seed=1)", ["src"]),
    ("src=None", "pyvae.ops.gather_binarize(None, seed=1)", ["src"]),
    ("src-meta", "pyvae.ops.gather_binarize(torch.rand(5, 3, device='meta'), seed=1)", ["src"]),
    ("seed=1.5", "pyvae.ops.gather_binarize(src, seed=1.5)", ["seed"]),
    ("seed='1'", "pyvae.ops.gather_binarize(src, seed='1')", ["seed"]),
    ("first_row=-1", "pyvae.ops.gather_binarize(src, seed=1, first_row=-1)", ["first_row"]),
]:
    add(f"pyvae.gather_binarize:{_id}", _GB + "result = " + _code, "error", _names)
# Valid but unusual: a transposed (non-contiguous) source is read by its strides; p = 0 and 1 are exact.
add("pyvae.gather_binarize:src-transposed", "src = torch.rand(3, 5).t()\n"
    "result = pyvae.ops.gather_binarize(src, seed=4)", "ref", ref="expected = pyvae.ops.gather_binarize("
    "src.contiguous(), seed=4)", dtype="float32")
add("pyvae.gather_binarize:p-0-and-1", "src = torch.tensor([[0.0, 1.0]]).repeat(50, 1)\n"
    "result = pyvae.ops.gather_binarize(src, seed=9)", "ref", ref="expected = src.clone()", dtype="float32")

# Helpers exported beside the ops, without a tensor argument from users or covered by their own tests:
# context managers (fused_only), the route cache (forget_routes), seed draws (draw_seed, seed_for:
# tests/test_reliability.py, tests/test_cuda_code.py) and the model's sharded draw (reparameterize_shard,
# which calls the registered reparameterize op checked above).
# continuous_bernoulli_mean is plain torch (no pointer reaches a kernel; tests/test_continuous_bernoulli_log_prob.py).
HELPERS = {"fused_only", "forget_routes", "release_workspace", "draw_seed", "seed_for", "seed_stays_tensor", "reparameterize_shard", "continuous_bernoulli_mean"}


def _params():
    out = []
    for c in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN[c.id])] if c.id in KNOWN else []
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


@pytest.mark.parametrize("case", _params())
def test_misuse(case, outcomes):
    problem = verdict(case, outcomes[case.id])
    assert problem is None, f"{case.id}: {problem}\n--- case code ---\n{case.code}"


def test_every_op_is_covered():
    """Every public function and every registered op has cases (a new op needs its own here)."""
    registered = {n for n in dir(torch.ops.pyvae) if not n.startswith("_") and hasattr(getattr(torch.ops.pyvae, n),
                                                                                       "default")}
    assert registered <= set(REGISTERED), f"registered ops without misuse cases: {registered - set(REGISTERED)}"
    covered = {c.id.split(":")[0] for c in CASES}
    for op in REGISTERED:
        assert f"ops.{op}" in covered, op
    for op in PUBLIC:
        assert f"pyvae.{op}" in covered, op
    public = {n for n in pyvae.ops.__all__ if callable(getattr(pyvae.ops, n))} - HELPERS
    assert public <= set(PUBLIC) | {"gather_binarize"}, f"public functions without misuse cases: {public - set(PUBLIC)}"
    assert "pyvae.gather_binarize" in covered


def test_runner_names_a_crashing_case():
    """The runner itself: a case that kills its process fails alone, and the cases after it still run,
    batched or forked."""
    cases = [Case("ok-1", "result = 1", "ref"), Case("dies", "import os\nos.abort()", "error", ("x",)),
             Case("ok-2", "result = 2", "ref"), Case("ok-3", "result = 3", "ref", isolate=True),
             Case("dies-forked", "import ctypes\nctypes.string_at(0)", "error", ("x",), isolate=True),
             Case("ok-4", "result = 4", "ref", isolate=True)]
    res = run_cases(cases, timeout=120)
    assert all(res[f"ok-{i}"]["status"] == "returned" for i in range(1, 5)), res
    assert res["dies"]["status"] == "crashed" and res["dies-forked"]["status"] == "crashed", res
    # (under AddressSanitizer, make sanitize, its SEGV handler turns the crash into an abort)
    assert re.search(r"SIGSEGV|SIGABRT", res["dies-forked"]["detail"]), res["dies-forked"]["detail"]

"""Benchmark of pyvae's fused linear layers against PyTorch eager and torch.compile.

Providers:
    torch-eager    ``nn.Sequential(nn.Linear(...), act)`` per layer (the reference of the tests)
    torch-compile  the same modules run through ``torch.compile`` (default mode, static shapes)
    pyvae          ``pyvae.nn.FusedLinear`` with the same weights
    pyvae-fused    (opt-in) the same under ``pyvae.ops.fused_only()``: pyvae's node even for the
                   identity layers that ``pyvae`` runs on F.linear (NOTE: [Small layers run torch's ops])

Ops (the layers of the paper's MNIST VAE, 784-500-20 with a tanh hidden layer):
    enc1   784 -> 500 tanh        enc2   500 -> 40 (mu and logvar of Z=20 from one GEMM)
    dec1    20 -> 500 tanh        dec2   500 -> 784 (Bernoulli logits)
    stack  the whole VAE MLP: enc1 -> enc2 -> split -> dec1(mu) -> dec2, forward and backward
Inputs of inner layers require grad (as inside a network); the data x of enc1/stack does not. All
providers use the same input and parameter tensors (gradients are reset before every call), so none
finds its operands in cache more often than another.

Precision: fp32, or bf16 = ``torch.autocast("cpu"/"cuda", dtype=torch.bfloat16)`` around the forward
of every provider (parameters stay float32).

Examples:
    pyvae bench mlp                                    # everything
    pyvae bench mlp --ops stack --precision fp32 bf16 --batch 1024
    pyvae bench mlp --ops enc2 dec2 --providers torch-eager pyvae pyvae-fused
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from . import common as C

LAYERS = {"enc1": (784, 500, "tanh"), "enc2": (500, 40, "identity"), "dec1": (20, 500, "tanh"),
          "dec2": (500, 784, "identity")}
OPS = tuple(LAYERS) + ("stack",)
BATCHES = (100, 1024, 8192)
Z = 20


def _torch_layer(fin, fout, act):
    from torch import nn

    acts = {"tanh": nn.Tanh(), "identity": nn.Identity()}
    return nn.Sequential(nn.Linear(fin, fout), acts[act])


def _fused_like(seq, act):
    """A FusedLinear on the very parameter tensors of ``seq``'s nn.Linear. Shared, not copied: with
    copies, a provider timed right after one using the same tensors found them in cache and the
    others did not (at B=100, pyvae-fused ran 5-9% faster than pyvae on identical code)."""
    import pyvae.nn as pnn

    lin = seq[0]
    f = pnn.FusedLinear(lin.in_features, lin.out_features, act, device=lin.weight.device)
    f.weight, f.bias = lin.weight, lin.bias
    return f


def _fused_only(fwd):
    """``fwd`` with pyvae's routing to F.linear turned off (the pyvae-fused provider)."""
    from pyvae.ops import fused_only

    def run(*a):
        with fused_only():
            return fwd(*a)
    return run


def _autocast(precision, device):
    import torch

    if precision == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def setup_layer(name, B, device, precision):
    import torch

    fin, fout, act = LAYERS[name]
    torch.manual_seed(0)
    ref = _torch_layer(fin, fout, act).to(device)
    fused = _fused_like(ref, act).to(device)
    x = torch.randn(B, fin, device=device, requires_grad=name != "enc1")
    out_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    grad_out = torch.randn(B, fout, device=device, dtype=out_dtype)

    def make(mod):
        def fwd(x):
            with _autocast(precision, device):
                return mod(x)
        return fwd

    leaves = lambda mod: [p for p in mod.parameters()] + ([x] if x.requires_grad else [])  # noqa: E731
    return {"args": (x,), "grad_out": grad_out, "reference": make(ref), "pyvae": make(fused),
            "leaves": {"reference": leaves(ref), "pyvae": leaves(fused)}}


def setup_stack(B, device, precision):
    import torch

    torch.manual_seed(0)
    ref = {n: _torch_layer(*LAYERS[n]).to(device) for n in LAYERS}
    fused = {n: _fused_like(ref[n], LAYERS[n][2]).to(device) for n in LAYERS}
    x = torch.randn(B, 784, device=device)

    def make(m):
        def fwd(x):
            with _autocast(precision, device):
                h = m["enc2"](m["enc1"](x))
                mu = h[:, :Z]
                return m["dec2"](m["dec1"](mu))
        return fwd

    out_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    params = lambda m: [p for mod in m.values() for p in mod.parameters()]  # noqa: E731
    return {"args": (x,), "grad_out": torch.randn(B, 784, device=device, dtype=out_dtype),
            "reference": make(ref), "pyvae": make(fused),
            "leaves": {"reference": params(ref), "pyvae": params(fused)}}


def run(args) -> list:
    import torch

    machine = C.machine_info(args)
    run_id = f"{machine['date']}-{os.getpid()}"
    rows = []
    for precision in args.precision:
        for op in args.ops:
            for B in args.batch:
                case = setup_stack(B, args.device, precision) if op == "stack" else \
                    setup_layer(op, B, args.device, precision)
                fns, leaves = {}, {}
                for p in args.providers:
                    side = "pyvae" if p.startswith("pyvae") else "reference"
                    fns[p], leaves[p] = case[side], case["leaves"][side]
                    if p == "pyvae-fused":
                        fns[p] = _fused_only(fns[p])
                    if p == "torch-compile":
                        torch._dynamo.reset()
                        fns[p] = torch.compile(fns[p], dynamic=False)
                steps_full, first_call = C.first_calls(fns, case["args"], leaves, case["grad_out"])
                for mode in args.modes:
                    extra = {}
                    if op == "stack" and mode == "full" and args.device == "cpu":
                        # The limit, in the same rounds as the steps: the stack's 11 products alone, each on its
                        # fastest library and layout (x needs no gradient, so enc1 has no input-gradient
                        # product); NOTE: [GEMM-only beside the steps] in train.py.
                        from .train import timed_beside_gemm_only

                        res, extra = timed_beside_gemm_only(C.in_mode(steps_full, mode), B, precision, args)
                        extra["gemm_efficiency"] = {p: extra["gemm_only_ms"] / r["median_ms"] for p, r in res.items()}
                    else:
                        res = C.measure_case(C.in_mode(steps_full, mode), device=args.device, reps=args.reps,
                                             target_s=args.target_s, memory=not args.no_memory)
                    rows.append({**extra,
                        "bench": "mlp", "run_id": run_id, "op": f"{op} {precision}", "layer": op,
                        "precision": precision, "mode": mode, "B": B, "device": args.device,
                        "malloc": args.malloc, "threads": machine["threads"], "results": res,
                        "ratios": C.ratios(res), "first_call_s": first_call, "loadavg": os.getloadavg(),
                        "machine": machine,
                    })
                    summary = "  ".join(f"{p}={r['median_ms']:.4g}ms" for p, r in res.items())
                    print(f"[{op} {precision} {mode} B={B}] {summary}", file=sys.stderr, flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="pyvae bench mlp", description=__doc__.split("\n")[0])
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--batch", nargs="+", type=C.pos_int, default=list(BATCHES))
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    C.add_common_args(p, extra_providers=("pyvae-fused",))
    args = p.parse_args(argv)
    rows, m, out = C.run_family(args, "mlp", run)
    print(f"\nmalloc={args.malloc}, {m['cpu_model']}, {m['cores_usable']} cores, {m['threads']} threads, "
          f"torch {m['torch']}, pyvae {m['pyvae']} ({m['pyvae_cpu_arch']}), device {args.device}; "
          "median (p20-p80) ms; speedup = baseline/pyvae\n")
    print(C.markdown_tables(rows, args.providers))
    limits = [r for r in rows if "gemm_only_ms" in r]
    if limits:
        print("\nThe stack's GEMM-only limit (forward + backward: its 11 products, each on the faster of torch's mm "
              "and oneDNN in its best layout, timed in the same run) and each provider's share of it:\n")
        print("| precision | B | GEMM-only ms | " + " | ".join(f"{p} GEMM / step" for p in args.providers) + " |")
        print("|---|---|---|" + "---|" * len(args.providers))
        for r in limits:
            print(f"| {r['precision']} | {r['B']} | {r['gemm_only_ms']:.3g} | "
                  + " | ".join(f"{r['gemm_efficiency'][p]:.0%}" for p in args.providers) + " |")
    print(f"\n{len(rows)} rows appended to {os.path.relpath(out)}")


if __name__ == "__main__":
    main()

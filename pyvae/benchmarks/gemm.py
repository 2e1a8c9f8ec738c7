"""Benchmark of the CPU GEMM routes of pyvae's linear layers (NOTE: [CPU GEMM backend], pyvae/_gemm.py).

For every layer of the paper's MNIST VAE and every batch size, times the three products of a linear
layer (forward x @ W.T + b, grad_input g @ W, grad_weight g.T @ x) on:
    torch-mm   torch's own mm/addmm (what nn.Linear and torch.compile call: MKL sgemm for float32)
    onednn     oneDNN through torch.ops.mkldnn._linear_pointwise, in the form pyvae uses; for
               grad_weight with in_features >= 64 that is with g.T given row-major, as pyvae's
               backward epilogue kernel writes it (made outside the timed call here; the kernel's
               extra write is inside `bench mlp`'s backward times)
Both routes run interleaved in one process (the shared method of pyvae.benchmarks.common), and the
result is reported as GFLOP/s of the median. Compare with the FMA peak of bench/fma_peak.c.

Examples:
    pyvae bench gemm
    pyvae bench gemm --batch 1024 --dtype float32
    pyvae bench gemm --products grad_weight
"""
from __future__ import annotations

import argparse
import os
import sys

from . import common as C
from .mlp import LAYERS

PRODUCTS = ("forward", "grad_input", "grad_weight")
ROUTES = ("torch-mm", "onednn")


def _step(fn):
    return C.Step(fn, [], None, "forward")


def run(args) -> list:
    import torch

    import pyvae._gemm as G

    machine = C.machine_info(args)
    run_id = f"{machine['date']}-{os.getpid()}"
    dtype = getattr(torch, args.dtype)
    if not G.onednn_enabled():
        raise SystemExit("pyvae bench gemm: oneDNN's linear is not usable in this torch build (or PYVAE_CPU_GEMM=torch)")
    rows = []
    for layer in args.layers:
        fin, fout, _ = LAYERS[layer]
        for B in args.batch:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(B, fin, generator=gen).to(dtype)
            w = torch.randn(fout, fin, generator=gen).to(dtype)
            b = torch.randn(fout, generator=gen).to(dtype)
            g = torch.randn(B, fout, generator=gen).to(dtype)
            flops = 2.0 * B * fin * fout
            with G.override("onednn", min_flops=0):
                g_t = g.t().contiguous() if G.wants_transposed_grad(g, fin) else None
            for product in args.products:
                ref = {"forward": lambda: torch.addmm(b, x, w.t()), "grad_input": lambda: torch.mm(g, w),
                       "grad_weight": lambda: torch.mm(g.t(), x)}[product]
                ours = {"forward": lambda: G.linear(x, w, b), "grad_input": lambda: G.grad_input(g, w),
                        "grad_weight": lambda: G.grad_weight(g, x, g_t)}[product]

                with G.override("onednn", min_flops=0):  # the torch-mm route calls torch directly
                    res = C.measure_case({"torch-mm": _step(ref), "onednn": _step(ours)}, device="cpu",
                                         reps=args.reps, target_s=args.target_s, memory=False)
                gflops = {r: flops / (res[r]["median_ms"] * 1e-3) / 1e9 for r in ROUTES}
                rows.append({
                    "bench": "gemm", "run_id": run_id, "layer": layer, "shape": [B, fin, fout], "B": B,
                    "product": product, "dtype": args.dtype, "flops": flops, "results": res,
                    "gflops": gflops, "speedup": res["torch-mm"]["median_ms"] / res["onednn"]["median_ms"],
                    "threads": machine["threads"], "loadavg": os.getloadavg(), "machine": machine,
                })
                print(f"[{layer} B={B} {product}] torch-mm {gflops['torch-mm']:.0f} GFLOP/s, "
                      f"onednn {gflops['onednn']:.0f} GFLOP/s", file=sys.stderr, flush=True)
    return rows


def markdown(rows) -> str:
    lines = ["| layer | B | product | torch-mm GFLOP/s | onednn GFLOP/s | speedup | pyvae uses |",
             "|---|---|---|---|---|---|---|"]
    import torch

    import pyvae._gemm as G

    for r in rows:
        B, fin, fout = r["shape"]
        used = "onednn" if G.uses_onednn(getattr(torch, r["dtype"]), r["flops"]) else "torch-mm"
        lines.append(f"| {r['layer']} {fin}->{fout} | {B} | {r['product']} | {r['gflops']['torch-mm']:.0f} | "
                     f"{r['gflops']['onednn']:.0f} | {r['speedup']:.2f}x | {used} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="pyvae bench gemm", description=__doc__.split("\n")[0])
    p.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS))
    p.add_argument("--batch", nargs="+", type=C.pos_int, default=[100, 1024, 8192])
    p.add_argument("--products", nargs="+", choices=PRODUCTS, default=list(PRODUCTS))
    C.add_common_args(p)
    args = p.parse_args(argv)
    if args.device != "cpu":
        p.error("the gemm benchmark is CPU-only (it compares CPU GEMM libraries)")
    rows, m, out = C.run_family(args, "gemm", run)
    print(f"\nmalloc={args.malloc}, {m['cpu_model']}, {m['cores_usable']} cores, {m['threads']} threads, "
          f"torch {m['torch']}, {args.dtype}; GFLOP/s of the median of interleaved runs\n")
    print(markdown(rows))
    print(f"\n{len(rows)} rows appended to {os.path.relpath(out)}")


if __name__ == "__main__":
    main()

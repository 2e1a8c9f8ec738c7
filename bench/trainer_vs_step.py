"""How much of the bare training step ``pyvae train`` keeps at large batch (issue 13's pipeline target).

Runs the real trainer (``pyvae.train.train``: shuffled row gather, dynamic binarization, per-step seeds,
the non-finite check, bookkeeping) for a few epochs and reads the samples/s of its last epoch (the first
one includes measuring the layer routes of the new shapes). In the same process it then times the bare
step (``pyvae bench train``'s pyvae provider: VAE forward, backward and fused Adam on one fixed batch of
the same size) with the benchmarks' interleaved timer, and reports trainer / bare, and the step's
GEMM-only time (``pyvae bench train``'s limit) against the trainer's time per step. Each epoch's samples/s
counts every sample of the epoch, the last partial batch included, over the loop's wall time (the test-set
evaluation after the epoch is not in it).

    python bench/trainer_vs_step.py --batch-size 8192 --precision fp32 bf16-mixed --epochs 3

Appends one JSON line per precision to bench/results/trainer.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch


def main(argv=None) -> None:
    from pyvae.benchmarks import common as C

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # the 28x28 sets: the bare step and its GEMM-only limit are the paper's 784-500-20 model
    ap.add_argument("--dataset", default="fashion-mnist", choices=["mnist-5k", "mnist", "fashion-mnist"])
    ap.add_argument("--batch-size", type=C.pos_int, default=8192)
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16-mixed"], choices=["fp32", "bf16-mixed"])
    ap.add_argument("--epochs", type=C.pos_int, default=3, help="epochs of the trainer; the last one is read")
    ap.add_argument("--target-s", type=C.pos_float, default=3.0, help="seconds of timing for the bare step")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "trainer.jsonl"))
    args = ap.parse_args(argv)

    from pyvae import _tune
    from pyvae.benchmarks import train as T
    from pyvae.train import build_config, train

    rows = []
    for precision in args.precision:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = build_config(dict(dataset=args.dataset, batch_size=args.batch_size, epochs=args.epochs,
                                    precision=precision, progress=False, plots=False, out=tmp, seed=0))
            t0 = time.perf_counter()
            res = train(cfg, log=lambda line: print("  train: " + line, file=sys.stderr, flush=True))
            wall = time.perf_counter() - t0
        trainer_sps = res.history[-1]["samples_per_s"]
        step = T.build_steps(args.batch_size, "bf16" if precision == "bf16-mixed" else "fp32", ["pyvae"])["pyvae"]
        step()
        step()
        bare = C.measure_case({"pyvae": C.Step(step, [], None, "forward")}, device="cpu", reps=None,
                              target_s=args.target_s, memory=False)["pyvae"]
        bare_sps = args.batch_size / (bare["median_ms"] * 1e-3)
        gemm_s, _ = T.gemm_only(args.batch_size, "bf16" if precision == "bf16-mixed" else "fp32", None,
                                args.target_s / 4)
        trainer_ms = args.batch_size / trainer_sps * 1e3
        row = {"bench": "trainer_vs_step", "dataset": args.dataset, "B": args.batch_size, "precision": precision,
               "epochs": args.epochs, "trainer_samples_per_s": trainer_sps, "bare_step_ms": bare["median_ms"],
               "bare_samples_per_s": bare_sps, "ratio": trainer_sps / bare_sps, "train_wall_s": wall,
               "gemm_only_ms": gemm_s * 1e3, "trainer_gemm_efficiency": gemm_s * 1e3 / trainer_ms,
               "cpu": _tune.cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "loadavg": os.getloadavg(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        rows.append(row)
        print(f"[{precision} B={args.batch_size}] trainer {trainer_sps:,.0f} samples/s (last of {args.epochs} epochs), "
              f"bare step {bare['median_ms']:.1f} ms = {bare_sps:,.0f} samples/s: {row['ratio']:.0%}", file=sys.stderr,
              flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"\n{rows[0]['cpu']}, {rows[0]['threads']} threads, torch {rows[0]['torch']}\n")
    print("| precision | B | pyvae train samples/s (last epoch) | bare step ms | bare samples/s | train / bare "
          "| GEMM-only ms | GEMM-only / trainer step |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['B']} | {r['trainer_samples_per_s']:,.0f} | {r['bare_step_ms']:.1f} | "
              f"{r['bare_samples_per_s']:,.0f} | {r['ratio']:.0%} | {r['gemm_only_ms']:.1f} | "
              f"{r['trainer_gemm_efficiency']:.0%} |")


if __name__ == "__main__":
    main()

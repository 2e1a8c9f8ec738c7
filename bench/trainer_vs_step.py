"""How much of the bare training step ``pyvae train`` keeps at large batch (issue 13's pipeline target).

Runs the real trainer (``pyvae.train.train``: shuffled row gather, dynamic binarization, per-step seeds,
the non-finite check, bookkeeping) for a few epochs, and after every epoch (from the trainer's per-epoch log
line, outside the epoch's timed loop) times the bare step (``pyvae bench train``'s pyvae provider: VAE
forward, backward and fused Adam on one fixed batch of the same size) with the benchmarks' adaptive timer,
aiming at ``--target-s`` / epochs seconds (at least 15 calls after a warm-up: ~2 s a block at B=8192).
Each epoch is paired with the bare-step block timed right after it: on this project's shared VM the
machine's speed drifts by tens of percent over minutes, and the last epoch against one bare-step timing
taken after the run (this script until stop 24) read 98% and 87% of the bare step in two runs of one
build. The report (``ratio``) is the median over epochs 2..N of each epoch's samples/s over its block's
(``ratio_of_medians`` divides the two medians instead; the first epoch includes measuring the layer
routes of the new shapes, and is reported apart), and the step's GEMM-only time (``pyvae bench train``'s
limit) against the trainer's median time per step. Each epoch's samples/s counts every sample of the
epoch, the last partial batch included, over the loop's wall time (the test-set evaluation after the
epoch and the bare-step block are not in it). At B=8192 an epoch of Fashion-MNIST is 8 steps, so its
samples/s is itself noisy: more epochs give a steadier median.

    python bench/trainer_vs_step.py --batch-size 8192 --precision fp32 bf16-mixed --epochs 4

Appends one JSON line per precision to bench/results/trainer.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
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
    ap.add_argument("--epochs", type=C.pos_int, default=4,
                    help="epochs of the trainer, each paired with a block of bare steps; epochs 2.. are read")
    ap.add_argument("--target-s", type=C.pos_float, default=3.0,
                    help="seconds of timing for the bare step, spread over the epochs")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "trainer.jsonl"))
    args = ap.parse_args(argv)

    from pyvae import _tune
    from pyvae.benchmarks import train as T
    from pyvae.train import build_config, train

    rows = []
    for precision in args.precision:
        prec = "bf16" if precision == "bf16-mixed" else "fp32"
        bare_ms, made = [], {}

        def bare_block(line):
            """The trainer's per-epoch log line; after each epoch, a block of bare steps (outside the epoch's
            timed loop: the line comes after it and after the test-set evaluation)."""
            print("  train: " + line, file=sys.stderr, flush=True)
            if not line.startswith("epoch "):
                return
            t = time.perf_counter()
            if "step" not in made:  # after the first epoch: its shapes' routes are measured by then
                made["step"] = T.build_steps(args.batch_size, prec, ["pyvae"])["pyvae"]
                made["step"]()
                made["step"]()
            bare = C.measure_case({"pyvae": C.Step(made["step"], [], None, "forward")}, device="cpu", reps=None,
                                  target_s=args.target_s / args.epochs, memory=False)["pyvae"]
            made["block_s"] = made.get("block_s", 0.0) + time.perf_counter() - t
            bare_ms.append(bare["median_ms"])

        with tempfile.TemporaryDirectory() as tmp:
            cfg = build_config(dict(dataset=args.dataset, batch_size=args.batch_size, epochs=args.epochs,
                                    precision=precision, progress=False, plots=False, out=tmp, seed=0))
            t0 = time.perf_counter()
            res = train(cfg, log=bare_block)
            wall = time.perf_counter() - t0 - made.get("block_s", 0.0)  # the run without the bare-step blocks
        made.clear()
        epoch_sps = [h["samples_per_s"] for h in res.history]
        bare_sps = [args.batch_size / (m * 1e-3) for m in bare_ms]
        read = slice(1, None) if args.epochs > 1 else slice(0, None)  # epochs 2.. (the only one, if one)
        ratio = statistics.median([e / b for e, b in zip(epoch_sps[read], bare_sps[read])])  # paired per epoch
        trainer_sps = statistics.median(epoch_sps[read])
        bare_med_ms = statistics.median(bare_ms[read])
        gemm_s, _ = T.gemm_only(args.batch_size, prec, None, args.target_s / 4)
        trainer_ms = args.batch_size / trainer_sps * 1e3
        row = {"bench": "trainer_vs_step", "dataset": args.dataset, "B": args.batch_size, "precision": precision,
               "epochs": args.epochs, "trainer_samples_per_s": trainer_sps, "epoch_samples_per_s": epoch_sps,
               "bare_step_ms": bare_med_ms, "bare_step_ms_per_epoch": bare_ms,
               "bare_samples_per_s": args.batch_size / (bare_med_ms * 1e-3), "ratio": ratio, "paired": True,
               "ratio_of_medians": trainer_sps / (args.batch_size / (bare_med_ms * 1e-3)),
               "first_epoch_samples_per_s": epoch_sps[0], "train_wall_s": wall,
               "gemm_only_ms": gemm_s * 1e3, "trainer_gemm_efficiency": gemm_s * 1e3 / trainer_ms,
               "cpu": _tune.cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "loadavg": os.getloadavg(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        rows.append(row)
        print(f"[{precision} B={args.batch_size}] trainer {trainer_sps:,.0f} samples/s (median of epochs "
              f"{'2..' if args.epochs > 1 else '1..'}{args.epochs}), bare step {row['bare_step_ms']:.1f} ms = "
              f"{row['bare_samples_per_s']:,.0f} samples/s; paired per epoch: {ratio:.0%} "
              f"({', '.join(f'{e / b:.0%}' for e, b in zip(epoch_sps, bare_sps))})", file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"\n{rows[0]['cpu']}, {rows[0]['threads']} threads, torch {rows[0]['torch']}\n")
    which = "epochs 2.." if args.epochs > 1 else "the one epoch"
    print(f"| precision | B | pyvae train samples/s (median, {which}) | bare step ms | bare samples/s "
          "| train / bare (median of the per-epoch ratios) | GEMM-only ms | GEMM-only / trainer step "
          "| first epoch samples/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['B']} | {r['trainer_samples_per_s']:,.0f} | {r['bare_step_ms']:.1f} | "
              f"{r['bare_samples_per_s']:,.0f} | {r['ratio']:.0%} | {r['gemm_only_ms']:.1f} | "
              f"{r['trainer_gemm_efficiency']:.0%} | {r['first_epoch_samples_per_s']:,.0f} |")


if __name__ == "__main__":
    main()

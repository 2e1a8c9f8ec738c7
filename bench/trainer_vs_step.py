"""How much of the bare training step ``pyvae train`` keeps at large batch (issue 13's pipeline target).

Runs the real trainer (``pyvae.train.train``: shuffled row gather, dynamic binarization, per-step seeds,
the non-finite check, bookkeeping) one epoch at a time, each epoch after the first resuming the run's
checkpoint, and after every epoch times the bare step (``pyvae bench train``'s pyvae provider: VAE forward,
backward and fused Adam on one fixed batch of the same size) for ``--target-s`` / epochs seconds with the
benchmarks' interleaved timer. Each epoch is paired with the bare-step block timed right after it: on this
project's shared VM the machine's speed drifts by tens of percent over minutes, and a trainer epoch and a
bare-step timing taken minutes apart (the last epoch against one timing after the run, as this script did
until stop 24) read 98% and 87% of the bare step in two runs of one build. The report is the median over
epochs 2..N of each epoch's samples/s over its block's (the first epoch includes measuring the layer routes
of the new shapes, and is reported apart), and the step's GEMM-only time (``pyvae bench train``'s limit)
against the trainer's median time per step. Each epoch's samples/s counts every sample of the epoch, the
last partial batch included, over the loop's wall time (the test-set evaluation after the epoch, the resume
and the bare-step block are not in it).

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
    from pyvae.data import load_dataset
    from pyvae.train import build_config, train

    rows = []
    for precision in args.precision:
        prec = "bf16" if precision == "bf16-mixed" else "fp32"
        with tempfile.TemporaryDirectory() as tmp:
            first = dict(dataset=args.dataset, batch_size=args.batch_size, epochs=1, precision=precision,
                         progress=False, plots=False, out=tmp, seed=0)
            data = None
            epoch_sps, bare_ms, wall = [], [], 0.0
            step = None
            for epoch in range(1, args.epochs + 1):
                cfg = build_config(first if epoch == 1 else dict(resume=tmp, epochs=epoch, progress=False, plots=False))
                if data is None:  # loaded once, as train() would load it
                    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.binarize_mode, cfg.limit)
                t0 = time.perf_counter()
                res = train(cfg, data=data, log=lambda line: print("  train: " + line, file=sys.stderr, flush=True))
                wall += time.perf_counter() - t0
                epoch_sps.append(res.history[-1]["samples_per_s"])
                if step is None:  # after the first epoch: its shapes' routes are measured by then
                    step = T.build_steps(args.batch_size, prec, ["pyvae"])["pyvae"]
                    step()
                    step()
                bare = C.measure_case({"pyvae": C.Step(step, [], None, "forward")}, device="cpu", reps=None,
                                      target_s=args.target_s / args.epochs, memory=False)["pyvae"]
                bare_ms.append(bare["median_ms"])
        bare_sps = [args.batch_size / (m * 1e-3) for m in bare_ms]
        read = slice(1, None) if args.epochs > 1 else slice(0, None)  # epochs 2.. (the only one, if one)
        ratio = statistics.median([e / b for e, b in zip(epoch_sps[read], bare_sps[read])])
        trainer_sps = statistics.median(epoch_sps[read])
        gemm_s, _ = T.gemm_only(args.batch_size, prec, None, args.target_s / 4)
        trainer_ms = args.batch_size / trainer_sps * 1e3
        row = {"bench": "trainer_vs_step", "dataset": args.dataset, "B": args.batch_size, "precision": precision,
               "epochs": args.epochs, "trainer_samples_per_s": trainer_sps, "epoch_samples_per_s": epoch_sps,
               "bare_step_ms": statistics.median(bare_ms[read]), "bare_step_ms_per_epoch": bare_ms,
               "bare_samples_per_s": statistics.median(bare_sps[read]), "ratio": ratio, "paired": True,
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
    print("| precision | B | pyvae train samples/s (median, epochs 2..) | bare step ms | bare samples/s "
          "| train / bare (paired per epoch) | GEMM-only ms | GEMM-only / trainer step | first epoch samples/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['B']} | {r['trainer_samples_per_s']:,.0f} | {r['bare_step_ms']:.1f} | "
              f"{r['bare_samples_per_s']:,.0f} | {r['ratio']:.0%} | {r['gemm_only_ms']:.1f} | "
              f"{r['trainer_gemm_efficiency']:.0%} | {r['first_epoch_samples_per_s']:,.0f} |")


if __name__ == "__main__":
    main()

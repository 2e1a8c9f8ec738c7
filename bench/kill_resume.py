"""Crash evidence for ``pyvae train``: SIGKILLs at random moments, resumed, against the uninterrupted run;
and the resident memory of a long run.

    python bench/kill_resume.py kills --kills 50      # TESTING.md, "SIGKILL and resume"
    python bench/kill_resume.py memory --steps 10000  # TESTING.md, "Memory over a long run"

``kills``: trains the embedded 8x8 digits (a small model, 1 checkpoint per epoch, so many kills land during a
checkpoint write) once without interruption, then again under SIGKILLs at random moments, each time
resuming from the run directory, until it finishes. The final weights, optimizer state and history must
equal the uninterrupted run's bit for bit, and no checkpoint temporary may be left. Layer routes are fixed
(PYVAE_TUNE=off): a route measured anew after a kill could differ in rounding from the first process's.

``memory``: one run of at least ``--steps`` optimizer steps, its RSS read from /proc every 0.25 s; prints
the RSS after the first tenth of the steps and at the end.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARGS = ["--dataset", "digits", "--hidden", "64", "--latent", "8", "--batch-size", "100", "--no-progress", "--no-plots",
        "--threads", "1"]


def _train(out: Path, epochs: int, extra=()):
    env = {**os.environ, "PYVAE_TUNE": "off"}
    cmd = [sys.executable, "-m", "pyvae", "train", *ARGS, "--epochs", str(epochs), "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def kills(args) -> int:
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="pyvae-kills-"))
    ref = tmp / "ref"
    p = _train(ref, args.epochs)
    t0 = time.perf_counter()
    assert p.wait() == 0, p.stderr.read().decode()
    full_s = time.perf_counter() - t0
    rng = random.Random(args.seed)
    run = tmp / "run"
    killed = starts = 0
    while True:
        resume = ["--resume", str(run)] if (run / "checkpoint.pt").is_file() else []
        p = _train(run, args.epochs, resume)
        starts += 1
        if killed < args.kills:
            try:
                p.wait(timeout=rng.uniform(args.min_delay, args.max_delay))
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
                killed += 1
                continue
        else:
            p.wait()
        if p.returncode == 0:
            break
        err = p.stderr.read().decode()
        if p.returncode != -signal.SIGKILL:
            print(f"kills: a start failed (exit {p.returncode}): {err}", file=sys.stderr)
            return 1
    a = torch.load(ref / "checkpoint.pt", weights_only=True)
    b = torch.load(run / "checkpoint.pt", weights_only=True)
    same_model = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    same_opt = all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i] if isinstance(sa[i][k], torch.Tensor))
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("wall_s", "samples_per_s")} for r in h]  # noqa: E731
    same_hist = strip(a["history"]) == strip(b["history"])
    tmps = sorted(str(t) for t in run.glob("*.tmp"))
    ok = same_model and same_opt and same_hist and not tmps
    print(f"kills: {killed} SIGKILLs over {starts} starts ({args.epochs} epochs, uninterrupted run {full_s:.1f} s); "
          f"weights equal: {same_model}, optimizer state equal: {same_opt}, history equal: {same_hist}, "
          f"temporaries left: {len(tmps)} -> {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


def _rss_kib(pid: int):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def memory(args) -> int:
    from pyvae.data import load_dataset

    # the digits training split at batch 100 (its size read, not assumed: 1618 rows, 16 steps an epoch;
    # a constant 1437 here once printed 10,010 steps for a run of 11,440)
    steps_per_epoch = load_dataset("digits").train.shape[0] // 100
    epochs = -(-args.steps // steps_per_epoch)
    out = Path(tempfile.mkdtemp(prefix="pyvae-memory-")) / "run"
    p = _train(out, epochs)
    samples = []
    t0 = time.perf_counter()
    while p.poll() is None:
        r = _rss_kib(p.pid)
        if r is not None:
            samples.append((time.perf_counter() - t0, r))
        time.sleep(0.25)
    if p.returncode != 0:
        print(p.stderr.read().decode(), file=sys.stderr)
        return 1
    total = samples[-1][0]
    early = [r for t, r in samples if total * 0.1 <= t <= total * 0.2]
    late = [r for t, r in samples if t >= total * 0.9]
    e, l = max(early), max(late)
    print(f"memory: {epochs * steps_per_epoch} steps in {total:.1f} s, RSS {e / 1024:.1f} MiB at 10-20% of the run, "
          f"{l / 1024:.1f} MiB at 90-100% ({100 * (l - e) / e:+.1f}%); {len(samples)} samples")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kills")
    k.add_argument("--kills", type=int, default=50)
    k.add_argument("--epochs", type=int, default=150, help="long enough that every kill lands before the end")
    k.add_argument("--min-delay", type=float, default=0.5, help="seconds after a start, at least, before its kill")
    k.add_argument("--max-delay", type=float, default=3.0)
    k.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("memory")
    m.add_argument("--steps", type=int, default=10000)
    args = p.parse_args(argv)
    return kills(args) if args.what == "kills" else memory(args)


if __name__ == "__main__":
    sys.exit(main())

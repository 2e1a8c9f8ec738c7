"""``pyvae bench routes``: does the measured route of each layer (NOTE: [Layer routes] in
pyvae/ops/linear_act.py) pick the fastest one, on this machine and on machines emulated on it?

A machine cannot be chosen, so the benchmark makes this one behave like others by restricting the
libraries' instruction sets and the thread count, each in its own process:

    as-is           nothing restricted
    onednn-avx2     ONEDNN_MAX_CPU_ISA=AVX2: oneDNN without AVX-512 (its GEMMs lose their edge over MKL's, as
                    on a CPU where MKL takes its fast path)
    mkl-avx2        MKL_ENABLE_INSTRUCTIONS=AVX2 (on CPUs where MKL would use AVX-512)
    pyvae-avx2      PYVAE_CPU_ARCH=avx2: pyvae's own kernels without AVX-512
    threads-1       one thread

In each, for every layer of the paper's model (784-500-20 tanh: enc1 784->500 tanh, enc2 500->40, dec1
20->500 tanh, dec2 500->784) and batch size, the three routes are timed forward + backward with the
benchmarks' interleaved timer (medians), then the route pyvae measures for itself (PYVAE_TUNE=force, a
fresh cache) is compared with the best: its time / the best time, target <= 1.03.

NOTE: [Route noise]
"The best" is itself a measurement: on this shared VM two routes a few percent apart swap places from
run to run. So each case also times torch's route a second time as a fourth candidate (the A/A control:
the same code under two names, whose ratio would be 1 without noise), keeps every call, and resamples
the rounds (one call of each candidate, interleaved; 2000 bootstrap draws of as many rounds, with
replacement) to give chosen / best a 95% interval and to say how often the best route stays the best.
A case whose chosen / best is over 1.03 but whose interval reaches down to 1.03 is within the noise of
this benchmark, not a miss beyond it; "resolved" says whether the best route is the best in at least
95% of the draws. With ``--study N`` the tuner's own race (``pyvae._tune.measure``, on the candidates it
built for the case) is also run N more times per rule in ``pyvae._tune.STATS`` (min: fastest call;
median: middle call; NOTE: [Median rule] there), and each pick is read against the benchmark's medians.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from . import common as C

EMULATIONS = {
    "as-is": {},
    "onednn-avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "mkl-avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "pyvae-avx2": {"PYVAE_CPU_ARCH": "avx2"},
    "threads-1": {"PYVAE_BENCH_THREADS": "1"},
}
LAYERS = {"enc1": (784, 500, "tanh"), "enc2": (500, 40, "identity"), "dec1": (20, 500, "tanh"),
          "dec2": (500, 784, "identity")}
TARGET = 1.03
AA = "torch-again"  # the A/A control: torch's route timed under a second name (NOTE: [Route noise])
_CHILD = "PYVAE_BENCH_ROUTES_CHILD"


def bootstrap(times: dict, chosen: str, routes, draws: int = 2000, seed: int = 0) -> dict:
    """Point values and 95% intervals (NOTE: [Route noise]) from per-round timings ``times`` (name -> ms,
    round i of every name taken in the same round): each route's median / the best route's median, the
    chosen route's, the A/A ratio (torch / torch-again) and how often each route is the best."""
    import numpy as np

    routes = [r for r in routes if r in times]
    a = np.array([times[r] for r in routes], dtype=np.float64).T  # [rounds, routes]
    n = a.shape[0]
    idx = np.random.default_rng(seed).integers(0, n, size=(draws, n))
    med = np.median(a[idx], axis=1)  # [draws, routes]
    ratio = med / med.min(axis=1, keepdims=True)
    point = np.median(a, axis=0)
    point_ratio = point / point.min()
    out = {"ratio": {}, "best_share": {}}
    for j, r in enumerate(routes):
        lo, hi = np.percentile(ratio[:, j], [2.5, 97.5])
        out["ratio"][r] = [float(point_ratio[j]), float(lo), float(hi)]
        out["best_share"][r] = float(np.mean(med.argmin(axis=1) == j))
    best = routes[int(point.argmin())]
    out["best"] = best
    out["resolved"] = out["best_share"][best] >= 0.95
    out["chosen"] = out["ratio"][chosen]
    if AA in times and "torch" in times:
        b = np.array([times["torch"], times[AA]], dtype=np.float64).T
        mb = np.median(b[idx], axis=1)
        aa = mb[:, 0] / mb[:, 1]
        lo, hi = np.percentile(aa, [2.5, 97.5])
        pt = float(np.median(b[:, 0]) / np.median(b[:, 1]))
        out["aa"] = [pt, float(lo), float(hi)]
    return out


def verdict(ratio) -> str:
    """"met" (point <= 1.03), "noise" (over, but the interval reaches 1.03) or "miss" (beyond noise)."""
    point, lo, _ = ratio
    return "met" if point <= TARGET else "noise" if lo <= TARGET else "miss"


def _child(args) -> list:
    import torch

    from pyvae import _tune
    from pyvae.ops import forget_routes, linear_act
    from pyvae.ops.linear_act import ROUTES, run_route

    torch.set_num_threads(int(os.environ.get("PYVAE_BENCH_THREADS", args.threads)))
    machine = C.machine_info(args)
    rows = []
    real_measure = _tune.measure
    for name in args.layers:
        fin, fout, act = LAYERS[name]
        for B in args.batch:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(B, fin, generator=gen).requires_grad_()
            w = (torch.randn(fout, fin, generator=gen) * fin ** -0.5).requires_grad_()
            b = torch.randn(fout, generator=gen).requires_grad_()
            g = torch.randn(B, fout, generator=gen)
            _tune.reset_for_tests("force")
            forget_routes()
            seen: dict = {}

            def spy(candidates, **kw):  # the tuner's own candidates and timings, for --study and the record
                if "candidates" in seen:  # a confirming race of an undecided one (NOTE: [Undecided races])
                    return real_measure(candidates, **kw)
                seen["candidates"], seen["raw"] = candidates, {}
                return real_measure(candidates, raw=seen["raw"], **kw)

            _tune.measure = spy
            try:
                linear_act(x, w, b, act).backward(g)  # measures this shape class's route
            finally:
                _tune.measure = real_measure
            (entry,) = [e for k, e in _tune.entries().items() if f"{fin}->{fout} {act}" in k]
            fns = {r: (lambda r=r: run_route(r, x, w, b, act)) for r in ROUTES if r in entry["ms"]}
            fns[AA] = lambda: run_route("torch", x, w, b, act)
            steps, _ = C.first_calls({r: (lambda f=f: f()) for r, f in fns.items()}, (),
                                     {r: [x, w, b] for r in fns}, g)
            res = C.measure_case(steps, device="cpu", reps=args.reps, target_s=args.target_s, memory=False,
                                 keep_times=True)
            routes = [r for r in ROUTES if r in res]
            times = {r: v.pop("times_ms") for r, v in res.items()}
            boot = bootstrap(times, entry["choice"], routes)
            best = min(routes, key=lambda r: res[r]["median_ms"])
            chosen = entry["choice"]
            study = {}
            for stat in _tune.STATS if args.study else ():
                picks = [_tune.choose(real_measure(seen["candidates"], stat=stat)) for _ in range(args.study)]
                study[stat] = {"picks": picks, "ratios": [boot["ratio"][p] for p in picks]}
            rows.append({"bench": "routes", "emulation": os.environ.get("PYVAE_BENCH_EMULATION", "as-is"),
                         "layer": name, "B": B, "results": res, "best": best, "chosen": chosen,
                         "tuner_ms": entry["ms"], "tuner_stat": _tune.STAT, "tuner_votes": entry.get("votes"),
                         "tuner_rounds": {r: len(v) for r, v in seen.get("raw", {}).items()},
                         "chosen_vs_best": res[chosen]["median_ms"] / res[best]["median_ms"],
                         "chosen_vs_best_ci": boot["chosen"][1:], "verdict": verdict(boot["chosen"]),
                         "route_ratios": boot["ratio"], "best_share": boot["best_share"],
                         "resolved": boot["resolved"], "aa": boot.get("aa"), "study": study,
                         "loadavg": os.getloadavg(), "machine": machine})
            print(f"[{rows[-1]['emulation']} {name} B={B}] " + "  ".join(
                f"{r}={v['median_ms']:.3f}ms" for r, v in res.items()) + f"  chosen={chosen} best={best}"
                f"  chosen/best={boot['chosen'][0]:.3f} [{boot['chosen'][1]:.3f}, {boot['chosen'][2]:.3f}]"
                + (f"  A/A={boot['aa'][0]:.3f}" if "aa" in boot else ""), file=sys.stderr, flush=True)
    return rows


def _ci(v) -> str:
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def markdown(rows) -> str:
    stats = sorted({s for r in rows for s in r.get("study", {})})
    lines = ["| emulation | layer | B | torch ms | pyvae ms | pyvae-mm ms | pyvae-1t ms | A/A [95%] | best (share) | "
             "chosen | chosen / best [95%] | verdict" + "".join(f" | {s} rule: picks, worst" for s in stats) + " |",
             "|---" * (12 + len(stats)) + "|"]
    short = {"torch": "t", "pyvae": "p", "pyvae-mm": "m", "pyvae-1t": "1"}
    for r in rows:
        ms = {k: f"{v['median_ms']:.3f}" for k, v in r["results"].items()}
        share = r.get("best_share", {}).get(r["best"])
        best = r["best"] + ("" if share is None else f" ({100 * share:.0f}%{'' if r.get('resolved') else ', tied'})")
        ratio = [r["chosen_vs_best"], *r["chosen_vs_best_ci"]] if "chosen_vs_best_ci" in r else None
        cells = [r["emulation"], r["layer"], str(r["B"]), ms.get("torch", "-"), ms.get("pyvae", "-"),
                 ms.get("pyvae-mm", "-"), ms.get("pyvae-1t", "-"), _ci(r["aa"]) if r.get("aa") else "-", best,
                 r["chosen"] + (f" (votes {''.join(short.get(p, p) for p in r['tuner_votes'])})"
                                if r.get("tuner_votes") else ""),
                 _ci(ratio) if ratio else f"{r['chosen_vs_best']:.3f}", r.get("verdict", "-")]
        for s in stats:
            st = r.get("study", {}).get(s)
            cells.append("-" if not st else
                         "".join(short.get(p, p) for p in st["picks"]) + f", {max(x[0] for x in st['ratios']):.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows) -> str:
    """The lines under the table: the worst case with its interval, the verdicts, the A/A floor and the
    study's picks per rule."""
    if not rows:
        return "no rows"
    worst = max(rows, key=lambda r: r["chosen_vs_best"])
    out = [f"worst chosen / best: {worst['chosen_vs_best']:.3f}, 95% [{worst['chosen_vs_best_ci'][0]:.3f}, "
           f"{worst['chosen_vs_best_ci'][1]:.3f}] ({worst['emulation']} {worst['layer']} B={worst['B']}; "
           f"target <= {TARGET})"]
    v = [r["verdict"] for r in rows]
    out.append(f"verdicts: {v.count('met')} met, {v.count('noise')} over {TARGET} within noise, {v.count('miss')} "
               f"beyond noise; best route resolved (best in >= 95% of draws) in {sum(r['resolved'] for r in rows)} "
               f"of {len(rows)} cases")
    aa = [r["aa"] for r in rows if r.get("aa")]
    if aa:
        dev = max(aa, key=lambda a: max(a[0], 1 / a[0]))
        wide = max(aa, key=lambda a: a[2] - a[1])
        half = sorted((a[2] - a[1]) / 2 for a in aa)[len(aa) // 2]
        out.append(f"A/A floor (torch's route against itself): worst point {max(dev[0], 1 / dev[0]):.3f}, widest 95% "
                   f"[{wide[1]:.3f}, {wide[2]:.3f}], median half-width {half:.3f}")
    for s in sorted({s for r in rows for s in r.get("study", {})}):
        rs = [x for r in rows for x in r["study"].get(s, {}).get("ratios", [])]
        if rs:
            out.append(f"{s} rule, {len(rs)} picks: worst {max(x[0] for x in rs):.3f}, "
                       f"{sum(x[0] > TARGET for x in rs)} over {TARGET}, {sum(x[1] > TARGET for x in rs)} beyond noise")
    return "\n".join(out)



def main(argv=None):
    p = argparse.ArgumentParser(prog="pyvae bench routes", description=__doc__.split("\n")[0])
    p.add_argument("--emulate", nargs="+", choices=list(EMULATIONS), default=list(EMULATIONS))
    p.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS))
    p.add_argument("--batch", nargs="+", type=C.pos_int, default=[100, 1024])
    p.add_argument("--reps", type=C.pos_int, default=None)
    p.add_argument("--target-s", type=C.pos_float, default=0.6)
    p.add_argument("--threads", type=C.pos_int, default=2)
    p.add_argument("--quiet-wait", type=C.nonneg_float, default=20.0)
    p.add_argument("--device", default="cpu", choices=["cpu"])
    p.add_argument("--malloc", default="default", choices=["default"])
    p.add_argument("--omp-wait", default="unset", choices=["unset", "spin"])
    p.add_argument("--study", type=C.nonneg_int, default=3,
                   help="run the tuner's race this many more times per rule (min, median) on each case (0: don't)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if os.environ.get(_CHILD):
        C.apply_env(args)
        C.setup_torch(args)
        rows = _child(args)
        with open(os.environ[_CHILD], "w") as f:
            json.dump(rows, f)
        return
    rows = []
    for emu in args.emulate:
        with tempfile.TemporaryDirectory() as tmp:
            res = os.path.join(tmp, "rows.json")
            env = {**os.environ, **EMULATIONS[emu], _CHILD: res, "PYVAE_BENCH_EMULATION": emu,
                   "PYVAE_CACHE_DIR": tmp}
            argv_child = [sys.executable, "-m", "pyvae", "bench", "routes", *(argv if argv is not None else sys.argv[3:])]
            rc = subprocess.call(argv_child, env=env)
            if rc != 0:
                sys.exit(f"bench routes: the {emu} child failed (exit {rc})")
            with open(res) as f:
                rows += json.load(f)
    out = args.out or C.default_out("routes")
    C.append_jsonl(out, rows)
    m = rows[0]["machine"] if rows else {}
    print(f"\n{m.get('cpu_model')}, torch {m.get('torch')}, pyvae {m.get('pyvae')}; forward + backward, median ms; "
          "A/A: torch / torch-again; best (share of bootstrap draws where it is best); picks: t torch, p pyvae, "
          "m pyvae-mm\n")
    print(markdown(rows))
    print("\n" + summary(rows))
    print(f"tuner rule: {rows[0].get('tuner_stat') if rows else '-'}; {len(rows)} rows appended to {os.path.relpath(out)}")


if __name__ == "__main__":
    main()

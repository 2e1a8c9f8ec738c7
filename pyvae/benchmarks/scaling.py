"""``pyvae bench scaling``: how the whole AEVB training step scales with batch size, data and latent dimension.

The step is ``pyvae bench train``'s (forward, backward, fused Adam; SGVB B with L = 1; D-H-Z tanh MLPs,
Bernoulli decoder), timed the same way (providers interleaved, medians) at each point of three sweeps:

    batch   B = 100, 256, 1024, 4096, 16384, 65536 at the paper's model (D 784, H 500, Z 20)
    D       D = 196, 784, 3072 at B = 1024 (H 500, Z 20)
    Z       Z = 2, 20, 200 at B = 1024 (D 784, H 500)

Providers: torch-eager and pyvae (``--providers ... torch-compile`` adds torch.compile, which compiles again
for every shape); fp32 (``--precision bf16`` for bf16 autocast, or both). Each point reports the median step
time, samples/s, and the GEMM-only limit of the same layer sizes (``pyvae bench train``'s: the step's 11
products, each on the faster of torch's mm and oneDNN), so efficiency = GEMM-only / step is shown. The
point B = 1024, D 784, Z 20 is in all three sweeps and measured in each: the spread of its three
measurements is the run's noise.

A point whose estimated memory (:func:`estimated_bytes`) is above ``--mem-fraction`` of the RAM available
when the run starts is skipped, and the output says so. Per sweep and series, a one-sentence verdict
(:func:`linearity_verdict`) says whether the cost per unit of work is flat within ``--tolerance``
(20%): per sample in the batch sweep (time linear in B), per GEMM FLOP in the D and Z sweeps (time linear
in the step's GEMM work), and where it is not. Rows go to bench/results/scaling.jsonl, the table and the
verdicts to stdout, the plot (step time against each swept size, log-log, with the GEMM-only limit and a
linear reference through the best cost per unit) beside the JSONL as scaling.png.

    pyvae bench scaling                                   # the three sweeps, fp32, eager and pyvae
    pyvae bench scaling --precision fp32 bf16 --providers torch-eager torch-compile pyvae
    pyvae bench scaling --sweeps batch --batch 100 1024 8192
    pyvae bench scaling --quick --quiet-wait 0 --no-memory   # seconds: tiny sizes, rows to the temp directory
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

from . import common as C
from . import train as T

SWEEPS = ("batch", "D", "Z")
DEFAULT_PROVIDERS = ("torch-eager", "pyvae")
COLORS = {"torch-eager": "tab:blue", "torch-compile": "tab:orange", "pyvae": "tab:green", "GEMM-only": "0.35"}
GEMM = "GEMM-only"
FULL = {"batch": [100, 256, 1024, 4096, 16384, 65536], "dims": [196, 784, 3072], "latents": [2, 20, 200],
        "sweep_batch": 1024, "x_dim": 784, "hidden": 500, "latent": 20}
QUICK = {"batch": [8, 16], "dims": [8, 16], "latents": [2, 4], "sweep_batch": 8, "x_dim": 16, "hidden": 8, "latent": 2,
         "reps": 3, "retries": 0}

# NOTE: [Memory estimate]
# The peak of one fp32 torch-eager step, measured with the benchmarks' profiler (common.peak_memory_bytes)
# at B = 1024 and 4096, in floats per sample: 3452 at (D, H, Z) = (784, 500, 20), 10316 at (3072, 500, 20),
# 4352 at (784, 500, 200): exactly 3D + 2H + 5Z; and 1974 at (196, 500, 20), 17% above it. pyvae's peak
# was lower at each size but D = 196 (1.5% above eager's). The estimate doubles 3D + 2H + 5Z (the D = 196
# excess, allocator slack, bf16 autocast's extra copies, a third provider) and adds three [B, D] tensors
# that stay live (the batch, the memory floor's two operands), 8 copies of the parameters (weights,
# gradients and Adam's two moments of two providers), and the GEMM-only products' operands, live beside the
# steps (NOTE: [GEMM-only beside the steps] in train.py): per layer x [B, in], g [B, out], g.T and a weight,
# 3D + 6H + 5Z floats per sample over the four layers.
def estimated_bytes(B: int, D: int, H: int, Z: int) -> int:
    """Estimated peak memory of measuring one point, in bytes (NOTE: [Memory estimate])."""
    params = D * H + H * 2 * Z + Z * H + H * D
    return 4 * B * (2 * (3 * D + 2 * H + 5 * Z) + 3 * D + (3 * D + 6 * H + 5 * Z)) + 4 * 9 * params


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (bytes), else total physical memory, else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def points(args) -> list[tuple[str, int, int, int, int]]:
    """The (sweep, B, D, H, Z) to measure, in order."""
    out = []
    for sweep in args.sweeps:
        if sweep == "batch":
            out += [("batch", B, args.x_dim, args.hidden, args.latent) for B in args.batch]
        elif sweep == "D":
            out += [("D", args.sweep_batch, D, args.hidden, args.latent) for D in args.dims]
        else:
            out += [("Z", args.sweep_batch, args.x_dim, args.hidden, Z) for Z in args.latents]
    return out


# ----------------------------------------------------------------------------- the verdict
def _fmt(v: float) -> str:
    return f"{v:.3g}x"


def linearity_verdict(xs, times, work, *, tol: float = 0.2, name: str = "B", unit: str = "sample") -> dict:
    """Whether ``times`` grow linearly with ``work`` over the sizes ``xs``: cost per unit (time / work) flat
    within ``tol`` (max / min <= 1 + tol), and where not.

    Args:
        xs: the swept sizes (for the sentence), in order.
        times: one time per size (any unit); None or a non-positive value marks a point not measured.
        work: the work of each point (samples, FLOPs), positive.
        tol: the allowed spread of the cost per unit, as a fraction of the smallest.
        name, unit: the swept size's and the work unit's names in the sentence.

    Returns:
        dict: ``flat`` (bool, or None with fewer than two points), ``spread`` (max / min cost per unit),
        ``best`` (the size with the smallest cost per unit), ``flat_range`` (the sizes of the longest run of
        consecutive points flat within tol, or None), ``outside`` ([(size, cost / best cost)] for the
        points more than tol above the best), and ``sentence``.
    """
    pts = [(x, t / w) for x, t, w in zip(xs, times, work) if t is not None and t > 0 and w > 0]
    what = f"time per {unit}"
    if len(pts) < 2:
        return {"flat": None, "spread": None, "best": pts[0][0] if pts else None, "flat_range": None,
                "outside": [], "sentence": f"{what}: fewer than two points measured, nothing to compare."}
    per = [c for _, c in pts]
    lo = min(per)
    best = pts[per.index(lo)][0]
    spread = max(per) / lo
    span = f"{name}={pts[0][0]}..{pts[-1][0]}"
    limit = 1.0 + tol
    run = None  # the longest run of neighbours with max / min <= 1 + tol (the later one on a tie)
    for i in range(len(per)):
        for j in range(i + 1, len(per)):
            seg = per[i:j + 1]
            if max(seg) / min(seg) > limit:
                break
            if run is None or j - i >= run[1] - run[0]:
                run = (i, j)
    outside = [(x, c / lo) for x, c in pts if c / lo > limit]
    flat = spread <= limit
    if flat:
        sentence = (f"{what} is flat within {tol:.0%} over {span} (spread {_fmt(spread)}): linear scaling.")
    else:
        where = (f"flat within {tol:.0%} only over {name}={pts[run[0]][0]}..{pts[run[1]][0]}" if run
                 else f"no two neighbouring points are within {tol:.0%}")
        detail = ", ".join(f"{name}={x} at {_fmt(r)}" for x, r in outside)
        sentence = (f"{what} is not flat over {span} (spread {_fmt(spread)}, best at {name}={best}): {where}; "
                    f"{detail} the best.")
    return {"flat": flat, "spread": spread, "best": best,
            "flat_range": (pts[run[0]][0], pts[run[1]][0]) if run else None, "outside": outside,
            "sentence": sentence}


def _swept(sweep: str) -> str:
    return {"batch": "B", "D": "D", "Z": "Z"}[sweep]


def _work(sweep: str, row: dict) -> float:
    """The unit of work a sweep's cost is divided by: samples (batch sweep), GEMM FLOPs (D and Z sweeps)."""
    return float(row["B"]) if sweep == "batch" else float(row["gemm_flops"])


def series(rows, sweep: str, precision: str) -> dict:
    """One sweep's rows as ``{"x", "work", "times": {series: [ms]}}`` (providers, then GEMM-only)."""
    sel = sorted((r for r in rows if r["sweep"] == sweep and r["precision"] == precision),
                 key=lambda r: r[_swept(sweep)])
    provs = list(dict.fromkeys(p for r in sel for p in r["results"]))
    times = {p: [r["results"].get(p, {}).get("median_ms") for r in sel] for p in provs}
    times[GEMM] = [r["gemm_only_ms"] for r in sel]
    return {"x": [r[_swept(sweep)] for r in sel], "work": [_work(sweep, r) for r in sel], "times": times}


def verdicts(rows, tol: float = 0.2) -> list[dict]:
    """One verdict per (precision, sweep, series) of the rows (see :func:`linearity_verdict`)."""
    out = []
    for precision in dict.fromkeys(r["precision"] for r in rows):
        for sweep in SWEEPS:
            s = series(rows, sweep, precision)
            if not s["x"]:
                continue
            for label, ts in s["times"].items():
                v = linearity_verdict(s["x"], ts, s["work"], tol=tol, name=_swept(sweep),
                                      unit="sample" if sweep == "batch" else "GEMM FLOP")
                out.append({"precision": precision, "sweep": sweep, "series": label, **v})
    return out


def repeats(rows) -> list[str]:
    """For each point measured in more than one sweep, each series' range of medians: the run's noise."""
    seen = {}
    for r in rows:
        seen.setdefault((r["precision"], r["B"], r["D"], r["H"], r["Z"]), []).append(r)
    out = []
    for (precision, B, D, H, Z), rs in seen.items():
        if len(rs) < 2:
            continue
        cells = []
        for label in list(rs[0]["results"]) + [GEMM]:
            ms = [r["gemm_only_ms"] if label == GEMM else r["results"].get(label, {}).get("median_ms") for r in rs]
            ms = [m for m in ms if m]
            if ms:
                cells.append(f"{label} {min(ms):.3g}-{max(ms):.3g} ms ({max(ms) / min(ms) - 1:.0%})")
        out.append(f"{precision} B={B} D={D} H={H} Z={Z}, measured in {len(rs)} sweeps: " + ", ".join(cells))
    return out


# ----------------------------------------------------------------------------- the run
def run(args) -> list:
    machine = C.machine_info(args)
    avail = available_bytes()
    args.skipped = []
    rows = []
    for precision in args.precision:
        for sweep, B, D, H, Z in points(args):
            need = estimated_bytes(B, D, H, Z)
            if avail is not None and need > args.mem_fraction * avail:
                why = (f"{sweep} sweep, {precision}, B={B} D={D} H={H} Z={Z}: skipped, estimated {need / 1e9:.2f} GB "
                       f"> {args.mem_fraction:.0%} of the {avail / 1e9:.2f} GB available")
                args.skipped.append(why)
                print(f"[scaling] {why}", file=sys.stderr, flush=True)
                continue
            pt = T.measure_point(B, precision, args, D, H, Z)
            row = {"bench": "scaling", "sweep": sweep, "D": D, "H": H, "Z": Z, **pt,
                   "ms_per_sample": {p: r["median_ms"] / B for p, r in pt["results"].items()},
                   "estimated_bytes": need, "available_bytes": avail, "loadavg": os.getloadavg(),
                   "machine": machine}
            rows.append(row)
            print(f"[scaling {sweep} {precision} B={B} D={D} H={H} Z={Z}] "
                  + "  ".join(f"{p}={r['median_ms']:.3g}ms" for p, r in pt["results"].items())
                  + f"  gemm-only={pt['gemm_only_ms']:.3g}ms", file=sys.stderr, flush=True)
    return rows


def markdown(rows) -> str:
    head = ("| precision | sweep | B | D | H | Z | provider | step ms (p20-p80) | samples/s | GEMM-only ms "
            "| GEMM / step | vs eager |")
    lines = [head, "|---" * 12 + "|"]
    for r in rows:
        eager = r["results"].get("torch-eager", {}).get("median_ms")
        for p, v in r["results"].items():
            ms = v["median_ms"]
            lines.append(f"| {r['precision']} | {r['sweep']} | {r['B']} | {r['D']} | {r['H']} | {r['Z']} | {p} | "
                         f"{ms:.3g} ({v['p20_ms']:.3g}-{v['p80_ms']:.3g}) | {r['samples_per_s'][p]:,.0f} | "
                         f"{r['gemm_only_ms']:.3g} | {r['gemm_efficiency'][p]:.0%} | "
                         + (f"{eager / ms:.2f}x |" if eager else "- |"))
    return "\n".join(lines)


def plot(rows, path, title: str = ""):
    """The PNG: one row of panels per precision (batch, D, Z sweeps), step time against the swept size,
    log-log, with the GEMM-only limit (dashed) and a linear reference (dotted): each point's work times the
    best cost per unit of any provider in the sweep, so every step lies on or above it and its height above
    the line is its cost per unit over the best."""
    from pyvae.plots import scaling_plot

    grid = []
    for precision in dict.fromkeys(r["precision"] for r in rows):
        row = []
        for sweep in SWEEPS:
            s = series(rows, sweep, precision)
            if not s["x"]:
                continue
            provs = [p for p in s["times"] if p != GEMM]
            unit = "sample" if sweep == "batch" else "GEMM FLOP"
            per = [(t / w, p, x) for p in provs for t, w, x in zip(s["times"][p], s["work"], s["x"]) if t]
            ref = None
            if per:
                c, who, at = min(per)
                ref = (f"linear: best ms per {unit} ({who}, {_swept(sweep)}={at})", [c * w for w in s["work"]])
            sel = [r for r in rows if r["sweep"] == sweep and r["precision"] == precision]
            r0 = sel[0]
            fixed = {"batch": f"D={r0['D']} H={r0['H']} Z={r0['Z']}", "D": f"B={r0['B']} H={r0['H']} Z={r0['Z']}",
                     "Z": f"B={r0['B']} D={r0['D']} H={r0['H']}"}[sweep]
            row.append({"x": s["x"], "series": {p: s["times"][p] for p in provs}, "limits": {GEMM: s["times"][GEMM]},
                        "reference": ref, "colors": COLORS, "title": f"{sweep} sweep, {precision} ({fixed})",
                        "xlabel": {"batch": "batch size B", "D": "data dim D", "Z": "latent dim Z"}[sweep],
                        "ylabel": "median step ms"})
        grid.append(row)
    return scaling_plot(grid, path, title)


def main(argv=None):
    p = argparse.ArgumentParser(prog="pyvae bench scaling", description=__doc__.split("\n")[0])
    p.add_argument("--sweeps", nargs="+", choices=SWEEPS, default=list(SWEEPS))
    p.add_argument("--batch", nargs="+", type=C.pos_int, help="batch sweep: the batch sizes [100 256 1024 4096 16384 65536]")
    p.add_argument("--dims", nargs="+", type=C.pos_int, help="D sweep: the data dims [196 784 3072]")
    p.add_argument("--latents", nargs="+", type=C.pos_int, help="Z sweep: the latent dims [2 20 200]")
    p.add_argument("--sweep-batch", type=C.pos_int, help="the batch size of the D and Z sweeps [1024]")
    p.add_argument("--x-dim", type=C.pos_int, help="D of the batch and Z sweeps [784]")
    p.add_argument("--hidden", type=C.pos_int, help="H of every sweep [500]")
    p.add_argument("--latent", type=C.pos_int, help="Z of the batch and D sweeps [20]")
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    p.add_argument("--mem-fraction", type=C.pos_float, default=0.5,
                   help="skip a point whose estimated memory is above this fraction of the available RAM")
    p.add_argument("--tolerance", type=C.nonneg_float, default=0.2,
                   help="verdict: the cost per unit of work is 'flat' when max / min <= 1 + this")
    p.add_argument("--plot", default=None, help="PNG to write (default: the JSONL's path with .png)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny sizes (B 8 16, D 8 16, Z 2 4, H 8, x-dim 16, latent 2, sweep batch 8) and 3 "
                        "reps, where not given explicitly; no case measured again when other processes are busy; "
                        "rows and plot go to the temporary directory unless --out is given")
    C.add_common_args(p)
    p.set_defaults(providers=list(DEFAULT_PROVIDERS))
    args = p.parse_args(argv)
    if args.device != "cpu":  # train's step, GEMM-only and floor are built on the CPU: cuda would only mislabel them
        p.error("argument --device: the scaling benchmark runs on the CPU only")
    if args.quick and args.out is None:  # tiny sizes' rows stay out of bench/results
        args.out = os.path.join(tempfile.gettempdir(), "pyvae-bench-scaling-quick.jsonl")
    for name, value in (QUICK if args.quick else FULL).items():  # what is not given explicitly
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    rows, m, out = C.run_family(args, "scaling", run)
    print(f"\n{m['cpu_model']}, {m['threads']} threads, torch {m['torch']}, pyvae {m['pyvae']} ({m['pyvae_cpu_arch']}), "
          f"malloc={args.malloc}, omp-wait={args.omp_wait}; one training step (forward, backward, fused Adam), "
          "median ms\n")
    print(markdown(rows))
    print("\nVerdicts (cost per unit of work: per sample in the batch sweep, per GEMM FLOP in the D and Z sweeps):\n")
    for v in verdicts(rows, args.tolerance):
        print(f"- {v['sweep']} sweep, {v['precision']}, {v['series']}: {v['sentence']}")
    for why in getattr(args, "skipped", []):
        print(f"- {why}")
    for line in repeats(rows):
        print(f"- noise: {line}")
    print(f"\n{len(rows)} rows appended to {os.path.relpath(out)}")
    if rows and not args.no_plot:
        path = plot(rows, args.plot or os.path.splitext(out)[0] + ".png",
                    f"{m['cpu_model']}, {m['threads']} threads, torch {m['torch']}, pyvae {m['pyvae']}: "
                    "one AEVB training step")
        print(f"plot: {os.path.relpath(path)}")


if __name__ == "__main__":
    main()

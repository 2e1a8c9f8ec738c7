"""Plots benchmark results (JSONL from bench/bench_*.py): median time vs batch size per provider.

One panel per (op, mode); colour = provider, line style = malloc setting; bars span p20..p80.
For each (op, mode, B, provider, malloc) the most recent row wins, unless --run-id picks runs.

    python bench/plot.py                                    # bench/results/elbo.jsonl -> elbo.png
    python bench/plot.py --ops elbo_step --malloc reuse --out /tmp/elbo_step.png
"""
from __future__ import annotations

import argparse
import os

from pyvae.benchmarks import common as C

HERE = os.path.dirname(os.path.abspath(__file__))
COLORS = {"torch-eager": "tab:blue", "torch-compile": "tab:orange", "pyvae": "tab:green"}
STYLES = {"reuse": "-", "default": "--"}


def latest(rows, ops=None, modes=None, malloc=None, run_ids=None):
    """(op, mode, malloc) -> provider -> {B: stats}, keeping the last row for each key."""
    out = {}
    for r in rows:
        if ops and r["op"] not in ops or modes and r["mode"] not in modes:
            continue
        if malloc and r.get("malloc") not in malloc or run_ids and r.get("run_id") not in run_ids:
            continue
        for prov, stats in r["results"].items():
            out.setdefault((r["op"], r["mode"], r.get("malloc", "default")), {}).setdefault(prov, {})[r["B"]] = stats
    return out


def print_markdown(rows, args):
    """Latest row per (op, mode, B) for each malloc setting, in the order the benchmark runs them."""
    for malloc in args.malloc or ("default", "reuse"):
        keep = {}
        for r in rows:
            if r.get("malloc", "default") != malloc or args.ops and r["op"] not in args.ops:
                continue
            if args.modes and r["mode"] not in args.modes or args.run_ids and r.get("run_id") not in args.run_ids:
                continue
            keep[(r["op"], r["mode"], r["B"])] = r
        if not keep:
            continue
        ops = list(dict.fromkeys(k[0] for k in keep))
        sel = sorted(keep.values(), key=lambda r: (ops.index(r["op"]), r["B"], C.MODES.index(r["mode"])))
        print(f"\n#### malloc={malloc}\n")
        print(C.markdown_tables(sel))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("jsonl", nargs="?", default=os.path.join(HERE, "results", "elbo.jsonl"))
    p.add_argument("--out", default=None, help="PNG path (default: the JSONL's name with .png)")
    p.add_argument("--ops", nargs="+")
    p.add_argument("--modes", nargs="+")
    p.add_argument("--malloc", nargs="+", choices=sorted(STYLES))
    p.add_argument("--run-id", nargs="+", dest="run_ids")
    p.add_argument("--markdown", action="store_true",
                   help="print the markdown tables (latest row per case, one set per malloc setting) "
                        "instead of plotting")
    args = p.parse_args(argv)
    if args.markdown:
        print_markdown(C.read_jsonl(args.jsonl), args)
        return

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = C.read_jsonl(args.jsonl)
    data = latest(rows, args.ops, args.modes, args.malloc, args.run_ids)
    if not data:
        raise SystemExit(f"no matching rows in {args.jsonl}")
    ops = list(dict.fromkeys(k[0] for k in data))
    modes = [m for m in C.MODES if any(k[1] == m for k in data)]
    fig, axes = plt.subplots(len(ops), len(modes), figsize=(4.2 * len(modes), 3.2 * len(ops)), squeeze=False)
    for i, op in enumerate(ops):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            for (o, m, malloc), provs in sorted(data.items()):
                if o != op or m != mode:
                    continue
                for prov, by_b in provs.items():
                    bs = sorted(by_b)
                    med = [by_b[b]["median_ms"] for b in bs]
                    lo = [by_b[b]["median_ms"] - by_b[b]["p20_ms"] for b in bs]
                    hi = [by_b[b]["p80_ms"] - by_b[b]["median_ms"] for b in bs]
                    ax.errorbar(bs, med, yerr=[lo, hi], color=COLORS.get(prov), ls=STYLES.get(malloc, ":"),
                                marker="o", ms=3, capsize=2, label=f"{prov} ({malloc} malloc)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{op} / {mode}", fontsize=10)
            ax.set_xlabel("batch size B")
            ax.set_ylabel("median ms")
            ax.grid(True, which="both", alpha=0.3)
    seen = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    order = [f"{p} ({m} malloc)" for p in C.PROVIDERS for m in ("default", "reuse", "?")]
    labels = sorted(seen, key=lambda lab: order.index(lab) if lab in order else len(order))
    fig.legend([seen[lab] for lab in labels], labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8)
    m = rows[-1].get("machine", {})
    fig.suptitle(f"{m.get('cpu_model', '?')}, {m.get('threads', '?')} threads, torch {m.get('torch', '?')}, "
                 f"pyvae {m.get('pyvae', '?')} ({m.get('pyvae_cpu_arch', '?')}); bars: p20-p80", fontsize=9)
    legend_rows = (len(labels) + 2) // 3
    height = 3.2 * len(ops)
    fig.tight_layout(rect=(0, (0.25 + 0.18 * legend_rows) / height, 1, 1 - 0.3 / height))
    out = args.out or os.path.splitext(args.jsonl)[0] + ".png"
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

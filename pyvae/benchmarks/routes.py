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
_CHILD = "PYVAE_BENCH_ROUTES_CHILD"


def _child(args) -> list:
    import torch

    from pyvae import _tune
    from pyvae.ops import forget_routes, linear_act
    from pyvae.ops.linear_act import ROUTES, run_route

    torch.set_num_threads(int(os.environ.get("PYVAE_BENCH_THREADS", args.threads)))
    machine = C.machine_info(args)
    rows = []
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
            linear_act(x, w, b, act).backward(g)  # measures this shape class's route
            (entry,) = [e for k, e in _tune.entries().items() if f"{fin}->{fout} {act}" in k]
            fns = {r: (lambda r=r: run_route(r, x, w, b, act)) for r in ROUTES if r in entry["ms"]}
            steps, _ = C.first_calls({r: (lambda f=f: f()) for r, f in fns.items()}, (),
                                     {r: [x, w, b] for r in fns}, g)
            res = C.measure_case(steps, device="cpu", reps=args.reps, target_s=args.target_s, memory=False)
            best = min(res, key=lambda r: res[r]["median_ms"])
            chosen = entry["choice"]
            rows.append({"bench": "routes", "emulation": os.environ.get("PYVAE_BENCH_EMULATION", "as-is"),
                         "layer": name, "B": B, "results": res, "best": best, "chosen": chosen,
                         "tuner_ms": entry["ms"],
                         "chosen_vs_best": res[chosen]["median_ms"] / res[best]["median_ms"],
                         "loadavg": os.getloadavg(), "machine": machine})
            print(f"[{rows[-1]['emulation']} {name} B={B}] " + "  ".join(
                f"{r}={v['median_ms']:.3f}ms" for r, v in res.items()) + f"  chosen={chosen} best={best}",
                file=sys.stderr, flush=True)
    return rows


def markdown(rows) -> str:
    lines = ["| emulation | layer | B | torch ms | pyvae ms | pyvae-mm ms | best | chosen | chosen / best |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = {k: f"{v['median_ms']:.3f}" for k, v in r["results"].items()}
        lines.append(f"| {r['emulation']} | {r['layer']} | {r['B']} | {ms.get('torch', '-')} | {ms.get('pyvae', '-')} | "
                     f"{ms.get('pyvae-mm', '-')} | {r['best']} | {r['chosen']} | {r['chosen_vs_best']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="pyvae bench routes", description=__doc__.split("\n")[0])
    p.add_argument("--emulate", nargs="+", choices=list(EMULATIONS), default=list(EMULATIONS))
    p.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS))
    p.add_argument("--batch", nargs="+", type=int, default=[100, 1024])
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--target-s", type=float, default=0.6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quiet-wait", type=float, default=20.0)
    p.add_argument("--device", default="cpu", choices=["cpu"])
    p.add_argument("--malloc", default="default", choices=["default"])
    p.add_argument("--omp-wait", default="unset", choices=["unset", "spin"])
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
    print(f"\n{m.get('cpu_model')}, torch {m.get('torch')}, pyvae {m.get('pyvae')}; forward + backward, median ms\n")
    print(markdown(rows))
    worst = max((r["chosen_vs_best"] for r in rows), default=float("nan"))
    print(f"\nworst chosen / best: {worst:.3f} (target <= 1.03); {len(rows)} rows appended to {os.path.relpath(out)}")


if __name__ == "__main__":
    main()

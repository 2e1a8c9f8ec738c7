"""Benchmark of pyvae's fused ELBO ops against PyTorch eager and torch.compile.

Providers:
    torch-eager    the plain-torch functions in ``pyvae/reference.py`` (the ones the tests use)
    torch-compile  the same reference functions wrapped in ``torch.compile`` (default mode,
                   static shapes: one graph per batch size, compiled and warmed up untimed)
    pyvae          the ``pyvae.ops`` custom ops

Ops (``setup_<op>(B)`` builds the inputs for batch size B; D = 784 data dims, Z = 20 latent dims):
    elbo_step  the main case: z = reparameterize(mu, logvar); loss = -bernoulli_elbo(logits, x, mu,
               logvar).sum() + (z * w).sum(). ``logits`` stands in for the decoder output (a leaf
               that requires grad); the cheap ``(z * w).sum()`` makes reparameterize's backward run.
    elbo_step_unfused  elbo_step with the fused op replaced by bernoulli_log_prob - gaussian_kl (two ops,
               as a likelihood without a fused ELBO op runs); the reference is elbo_step's. Against
               ``elbo_step`` it measures what the fusion buys.
    cb_elbo_step  the same step for a continuous-Bernoulli decoder on grey levels, unfused (there is
               no fused CB ELBO op): loss = -(continuous_bernoulli_log_prob(logits, x) -
               gaussian_kl(mu, logvar)).sum() + (z * w).sum(); the baseline's likelihood is
               torch.distributions.ContinuousBernoulli. Against ``elbo_step``'s pyvae time it bounds
               what fusing the CB likelihood with the KL could save.
    kl         gaussian_kl(mu, logvar)                  [B, Z] -> [B]
    bernoulli  bernoulli_log_prob(logits, x)            [B, D] -> [B]
    cbernoulli continuous_bernoulli_log_prob(logits, x) [B, D] -> [B], x grey levels in [0, 1]; the
               baseline is torch.distributions.ContinuousBernoulli (pyvae.reference)
    gaussian   gaussian_log_prob(x, mean, logvar)       [B, D] -> [B], per-element logvar
    reparam    reparameterize(mu, logvar)               [B, Z] -> [B, Z]
    binarize   a training batch: B rows gathered from a [60000, D] table of grey levels and binarized with one
               Bernoulli draw per pixel (``pyvae.ops.gather_binarize``; the baseline ``torch.bernoulli(src[idx])``,
               as bench/aevb_baseline.py's plain loop writes it). Not differentiable: forward mode only.

Modes: forward (autograd recording, as in training), backward (only ``.backward()`` of a forward
computed untimed just before), full (forward + backward). Gradients of the leaves are reset to None
before every call, so no provider accumulates into an existing ``.grad``.

Examples:
    pyvae bench elbo                                   # everything, default malloc
    pyvae bench elbo --malloc both                     # default malloc, then reuse
    pyvae bench elbo --ops elbo_step --batch 100 1024 --reps 5
"""
from __future__ import annotations

import argparse
import os
import sys

from . import common as C

OPS = ("elbo_step", "elbo_step_unfused", "cb_elbo_step", "kl", "bernoulli", "cbernoulli", "gaussian", "reparam",
       "binarize")
FORWARD_ONLY = ("binarize",)  # ops without a gradient: timed in forward mode only
BATCHES = (100, 1024, 16384)


# ----------------------------------------------------------------------------- setups
def _elbo_step_ref(logits, x, mu, logvar, w):
    from pyvae import reference as R

    z = R.reparameterize(mu, logvar)
    return -R.bernoulli_elbo(logits, x, mu, logvar).sum() + (z * w).sum()


def _elbo_step_pyvae(logits, x, mu, logvar, w):
    import pyvae

    z = pyvae.reparameterize(mu, logvar)
    return -pyvae.bernoulli_elbo(logits, x, mu, logvar).sum() + (z * w).sum()


def _elbo_step_unfused_pyvae(logits, x, mu, logvar, w):
    import pyvae

    z = pyvae.reparameterize(mu, logvar)
    return -(pyvae.bernoulli_log_prob(logits, x) - pyvae.gaussian_kl(mu, logvar)).sum() + (z * w).sum()


def _cb_elbo_step_ref(logits, x, mu, logvar, w):
    from pyvae import reference as R

    z = R.reparameterize(mu, logvar)
    return -(R.continuous_bernoulli_log_prob(logits, x) - R.gaussian_kl(mu, logvar)).sum() + (z * w).sum()


def _cb_elbo_step_pyvae(logits, x, mu, logvar, w):
    import pyvae

    z = pyvae.reparameterize(mu, logvar)
    return -(pyvae.continuous_bernoulli_log_prob(logits, x) - pyvae.gaussian_kl(mu, logvar)).sum() + (z * w).sum()


def _tensors(B, D, Z, device, dtype):
    import torch

    g = torch.Generator().manual_seed(0)

    def t(*shape, scale=1.0, grad=False):
        v = (scale * torch.randn(*shape, generator=g, dtype=dtype)).to(device)
        return v.requires_grad_(grad)

    x = (torch.rand(B, D, generator=g) < 0.5).to(dtype).to(device)
    return t, x


def setup_elbo_step(B, D, Z, device, dtype):
    t, x = _tensors(B, D, Z, device, dtype)
    logits, mu, logvar = t(B, D, scale=2.0, grad=True), t(B, Z, grad=True), t(B, Z, scale=0.5, grad=True)
    w = t(B, Z)
    return {"args": (logits, x, mu, logvar, w), "leaves": (logits, mu, logvar), "grad_out": None,
            "reference": _elbo_step_ref, "pyvae": _elbo_step_pyvae}


def setup_elbo_step_unfused(B, D, Z, device, dtype):
    return {**setup_elbo_step(B, D, Z, device, dtype), "pyvae": _elbo_step_unfused_pyvae}


def setup_cb_elbo_step(B, D, Z, device, dtype):
    import torch

    t, _ = _tensors(B, D, Z, device, dtype)
    logits, mu, logvar = t(B, D, scale=2.0, grad=True), t(B, Z, grad=True), t(B, Z, scale=0.5, grad=True)
    w = t(B, Z)
    x = torch.rand(B, D, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    return {"args": (logits, x, mu, logvar, w), "leaves": (logits, mu, logvar), "grad_out": None,
            "reference": _cb_elbo_step_ref, "pyvae": _cb_elbo_step_pyvae}


def setup_kl(B, D, Z, device, dtype):
    import pyvae
    from pyvae import reference as R

    t, _ = _tensors(B, D, Z, device, dtype)
    mu, logvar = t(B, Z, grad=True), t(B, Z, scale=0.5, grad=True)
    return {"args": (mu, logvar), "leaves": (mu, logvar), "grad_out": t(B),
            "reference": R.gaussian_kl, "pyvae": pyvae.gaussian_kl}


def setup_bernoulli(B, D, Z, device, dtype):
    import pyvae
    from pyvae import reference as R

    t, x = _tensors(B, D, Z, device, dtype)
    logits = t(B, D, scale=2.0, grad=True)
    return {"args": (logits, x), "leaves": (logits,), "grad_out": t(B),
            "reference": R.bernoulli_log_prob, "pyvae": pyvae.bernoulli_log_prob}


def setup_cbernoulli(B, D, Z, device, dtype):
    import torch

    import pyvae
    from pyvae import reference as R

    t, _ = _tensors(B, D, Z, device, dtype)
    logits = t(B, D, scale=2.0, grad=True)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(B, D, generator=g, dtype=dtype).to(device)
    return {"args": (logits, x), "leaves": (logits,), "grad_out": t(B),
            "reference": R.continuous_bernoulli_log_prob, "pyvae": pyvae.continuous_bernoulli_log_prob}


def setup_gaussian(B, D, Z, device, dtype):
    import pyvae
    from pyvae import reference as R

    t, _ = _tensors(B, D, Z, device, dtype)
    x, mean, logvar = t(B, D), t(B, D, grad=True), t(B, D, scale=0.5, grad=True)
    return {"args": (x, mean, logvar), "leaves": (mean, logvar), "grad_out": t(B),
            "reference": R.gaussian_log_prob, "pyvae": pyvae.gaussian_log_prob}


def setup_reparam(B, D, Z, device, dtype):
    import pyvae
    from pyvae import reference as R

    t, _ = _tensors(B, D, Z, device, dtype)
    mu, logvar = t(B, Z, grad=True), t(B, Z, scale=0.5, grad=True)
    return {"args": (mu, logvar), "leaves": (mu, logvar), "grad_out": t(B, Z),
            "reference": R.reparameterize, "pyvae": pyvae.reparameterize}


def _binarize_ref(src, idx, seed):
    import torch

    return torch.bernoulli(src[idx])


def _binarize_pyvae(src, idx, seed):
    from pyvae.ops import gather_binarize

    return gather_binarize(src, idx, seed=seed)


def setup_binarize(B, D, Z, device, dtype):
    import torch

    g = torch.Generator().manual_seed(0)
    src = torch.rand(60000, D, generator=g, dtype=torch.float32).to(device)  # gather_binarize takes float32
    idx = torch.randperm(60000, generator=g)[: min(B, 60000)].to(device)
    if B > 60000:
        idx = idx.repeat((B + 59999) // 60000)[:B]
    return {"args": (src, idx, 1234), "leaves": (), "grad_out": None,
            "reference": _binarize_ref, "pyvae": _binarize_pyvae}


SETUPS = {name: globals()["setup_" + name] for name in OPS}


# ----------------------------------------------------------------------------- driver
def _provider_fns(case, providers):
    """Provider name -> callable over ``case['args']``."""
    import torch

    fns = {}
    for p in providers:
        if p == "torch-eager":
            fns[p] = case["reference"]
        elif p == "pyvae":
            fns[p] = case["pyvae"]
        elif p == "torch-compile":
            torch._dynamo.reset()  # a fresh static-shape graph per (op, B), as a fixed-batch loop gets
            fns[p] = torch.compile(case["reference"], dynamic=False)
    return fns


def run(args, out: str) -> list:
    import torch

    dtype = getattr(torch, args.dtype)
    machine = C.machine_info(args)
    run_id = f"{machine['date']}-{os.getpid()}"
    rows = []
    for op in args.ops:
        for B in args.batch:
            case = SETUPS[op](B, args.dim, args.latent, args.device, dtype)
            fns = _provider_fns(case, args.providers)
            modes = ["forward"] if op in FORWARD_ONLY else args.modes
            steps_full, compile_s = C.first_calls(fns, case["args"], {p: case["leaves"] for p in fns},
                                                  case["grad_out"], mode="forward" if op in FORWARD_ONLY else "full")
            floor_ms = huge_ms = None
            if op == "elbo_step" and "full" in args.modes:
                # The memory floor of the step: one read of logits and x, one write of a fresh [B, D]
                # gradient (torch.add into a new tensor: its page faults included), timed alike; and the same
                # write into a fresh tensor advised onto huge pages first, as pyvae's kernels advise a large
                # fresh output (NOTE: [Huge pages for fresh outputs] in csrc/cpu/pages.h).
                logits, x = case["args"][0], case["args"][1]
                floors = {"floor": C.Step(lambda: torch.add(logits.detach(), x), [], None, "forward")}
                if args.device == "cpu":
                    floors["huge"] = C.Step(lambda: torch.add(logits.detach(), x, out=C.empty_on_huge_pages(
                        x.shape, x.dtype)), [], None, "forward")
                fl = C.measure_case(floors, device=args.device, reps=args.reps, target_s=args.target_s / 2, memory=False)
                floor_ms = fl["floor"]["median_ms"]
                huge_ms = fl["huge"]["median_ms"] if "huge" in fl else None
            for mode in modes:
                res = C.measure_case(C.in_mode(steps_full, mode), device=args.device, reps=args.reps, target_s=args.target_s,
                                     memory=not args.no_memory)
                row = {
                    "bench": "elbo", "run_id": run_id, "op": op, "mode": mode, "B": B, "D": args.dim,
                    "Z": args.latent, "dtype": args.dtype, "device": args.device, "malloc": args.malloc,
                    "threads": machine["threads"], "results": res, "ratios": C.ratios(res),
                    "first_call_s": compile_s, "loadavg": os.getloadavg(), "machine": machine,
                }
                if floor_ms is not None and mode == "full":
                    row["memory_floor_ms"] = floor_ms
                    row["vs_floor"] = {p: r["median_ms"] / floor_ms for p, r in res.items()}
                    if huge_ms is not None:
                        row["memory_floor_huge_ms"] = huge_ms
                        row["vs_floor_huge"] = {p: r["median_ms"] / huge_ms for p, r in res.items()}
                rows.append(row)
                C.append_jsonl(out, [row])  # row by row: an interrupted run keeps what it measured
                summary = "  ".join(f"{p}={r['median_ms']:.4g}ms" for p, r in res.items())
                r0 = next(iter(res.values()))
                load = "-" if r0["foreign_cpu"] is None else f"{100 * r0['foreign_cpu']:.0f}%"
                floor = f"  floor={floor_ms:.4g}ms" if (floor_ms is not None and mode == "full") else ""
                if huge_ms is not None and mode == "full":
                    floor += f" floor-huge={huge_ms:.4g}ms"
                print(f"[{op} {mode} B={B}] {summary}{floor}  reps={r0['reps']} other-cpu={load} "
                      f"attempts={r0['attempts']}", file=sys.stderr, flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="pyvae bench elbo", description=__doc__.split("\n")[0])
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--batch", nargs="+", type=C.pos_int, default=list(BATCHES))
    p.add_argument("--dim", type=C.pos_int, default=784, help="D, data dims (default 784)")
    p.add_argument("--latent", type=C.pos_int, default=20, help="Z, latent dims (default 20)")
    C.add_common_args(p)
    args = p.parse_args(argv)
    C.apply_malloc(args)  # sets OMP_WAIT_POLICY etc.; may re-exec with GLIBC_TUNABLES set or removed
    C.setup_torch(args)
    out = args.out or C.default_out("elbo")
    rows = run(args, out)
    m = rows[0]["machine"] if rows else C.machine_info(args)
    print(f"\nmalloc={args.malloc} (GLIBC_TUNABLES={m['malloc_env'].get('GLIBC_TUNABLES', 'unset')}), "
          f"{m['cpu_model']}, {m['cores_usable']} cores, {m['threads']} threads, torch {m['torch']}, "
          f"pyvae {m['pyvae']} ({m['pyvae_cpu_arch']}), omp-wait={m['omp_wait']} {m['omp_env']}, "
          f"{args.dtype}, device {args.device}, "
          f"D={args.dim} Z={args.latent}; median (p20-p80) ms; speedup = baseline/pyvae\n")
    print(C.markdown_tables(rows, args.providers))
    print(f"\n{len(rows)} rows appended to {os.path.relpath(out)}")


if __name__ == "__main__":
    main()

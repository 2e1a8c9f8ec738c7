"""``pyvae bench train``: the whole AEVB training step against the machine's limits.

One step of the paper's MNIST model (784-500-20 tanh, Bernoulli decoder, SGVB B with L = 1): forward,
backward and a fused Adam update (``--step full``, the default), or forward and backward alone (``--step
fwd-bwd``: the gradients set to None before each backward, no update; what the GEMM-only limit bounds most
closely, since it holds no optimizer), for three providers trained side by side on the same batch:

    torch-eager     a plain PyTorch VAE (nn.Linear + tanh, randn eps, BCE-with-logits + the KL formula)
    torch-compile   the same step's loss under torch.compile
    pyvae           pyvae.VAE (fused layers with measured routes, in-kernel eps, the fused ELBO; the whole
                    objective as one autograd node: NOTE: [One-node VAE step] in pyvae/ops/vae_step.py)
    pyvae-layered   (opt-in) the same with ``one_node = False``: one autograd node per layer, draw and ELBO
    pyvae-fresh-grad  (opt-in) the same with ``elbo_into_logits = False`` (and so layered too): the ELBO's
                    logits gradient in a fresh tensor instead of the logits' storage (NOTE: [ELBO gradient
                    into the logits])
    pyvae-fused     (opt-in) pyvae's step with every layer on pyvae's own node and every row op on pyvae's
                    kernel (``fused_only``), whatever the measured routes say: every matrix product of the
                    step then goes through pyvae._gemm
    pyvae-no-gemm   (opt-in) pyvae-fused with its matrix products replayed, not computed (NOTE: [The step
                    without its GEMMs]): the time of everything else the step does
    pyvae-no-step-race  (opt-in) pyvae with the one-node step on its layers' own routes, not raced as a whole
                    (NOTE: [Step routes] in pyvae/ops/vae_step.py): what that race buys

fp32 and bf16-mixed (torch.autocast on CPU), at each batch size. Beside the step times, two limits are
measured in the same process:

    GEMM-only       the 11 matrix products of a step (forward, input and weight gradients of every layer; the
                    first layer needs no input gradient), each with the fastest of torch's mm and oneDNN's
                    linear in its best layout, on all threads or on one, in the step's precision: no step
                    can be faster. A first pass picks each product's winner; the winners are then timed in
                    the same rounds as the steps and their medians summed (NOTE: [GEMM-only beside the
                    steps]); the row keeps each product's time and the first pass's sum
    memory floor    one read of the logits and x and one write of a fresh [B, 784] gradient (torch.add into
                    a new tensor): what the ELBO's non-GEMM work must move at least

and the report gives each step's efficiency against GEMM-only, and against GEMM-only + floor, and each
provider's minor page faults per step (NOTE: [Page faults of a step]). With both
pyvae-fused and pyvae-no-gemm (``--providers ... pyvae-fused pyvae-no-gemm``) it also splits pyvae's step:
GEMM-only + the step without its GEMMs = the parts, and the fused step's excess over them (its products
running slower inside the step than alone, on operands the rest of the step has pushed out of cache). Rows go to
bench/results/train.jsonl (``--out``), and a plot of the run's points to the same path with .png (``--plot``,
``--no-plot``): per step kind and precision, each provider's median step ms against the batch size, log-log,
with both limits dashed.

The model's sizes are parameters (``layer_sizes``, ``plain_model``, ``build_steps``, ``measure_point``
take D, H, Z; the defaults are the paper's 784-500-20): ``pyvae bench scaling`` sweeps them.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import common as C

PROVIDERS = ("torch-eager", "torch-compile", "pyvae")
PAPER = (784, 500, 20)  # (D, H, Z): the paper's MNIST model


def layer_sizes(D: int = 784, H: int = 500, Z: int = 20) -> tuple:
    """(in, out) of the step's four linear layers: enc1, enc head (mu, logvar), dec1, dec logits."""
    return ((D, H), (H, 2 * Z), (Z, H), (H, D))


LAYERS = layer_sizes(*PAPER)


def plain_model(D: int = 784, H: int = 500, Z: int = 20):
    """The torch-eager provider: a plain D-H-Z tanh VAE (nn.Linear, randn eps, BCE-with-logits + KL)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(D, H)
            self.head = nn.Linear(H, 2 * Z)
            self.dec = nn.Linear(Z, H)
            self.out = nn.Linear(H, D)

        def forward(self, x):
            mu, logvar = self.head(torch.tanh(self.enc(x))).float().chunk(2, -1)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            logits = self.out(torch.tanh(self.dec(z))).float()
            rec = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
            kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)
            return -(rec - kl).mean()

    return Plain()


STEPS = ("full", "fwd-bwd")  # what a timed step holds: forward + backward + Adam, or forward + backward


def _step(model, loss_fn, opt, x, precision, step="full"):
    import torch

    update = step == "full"

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if update:
            opt.step()
        return loss
    return run


def build_steps(B, precision, providers, D=784, H=500, Z=20, step="full"):
    """One training-step callable per provider, all on the same batch x [B, D] and the same initial weights.
    ``step``: "full" (forward, backward, fused Adam) or "fwd-bwd" (no update: every call computes the same
    gradients, which replace the previous ones)."""
    if step not in STEPS:
        raise ValueError(f"step must be one of {list(STEPS)}, got {step!r}")
    import copy

    import torch

    import pyvae

    torch.manual_seed(0)
    plain = plain_model(D, H, Z)
    vae = pyvae.VAE(D, z_dim=Z, hidden=H)
    sd = plain.state_dict()
    vae.load_state_dict({"encoder.0.weight": sd["enc.weight"], "encoder.0.bias": sd["enc.bias"],
                         "enc_head.weight": sd["head.weight"], "enc_head.bias": sd["head.bias"],
                         "decoder.0.weight": sd["dec.weight"], "decoder.0.bias": sd["dec.bias"],
                         "dec_logits.weight": sd["out.weight"], "dec_logits.bias": sd["out.bias"]})
    x = (torch.rand(B, D, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    out = {}
    for p in providers:
        if p.startswith("pyvae"):
            model = vae if p == "pyvae" else copy.deepcopy(vae)
            model.elbo_into_logits = p != "pyvae-fresh-grad"
            model.one_node = p != "pyvae-layered"
            fn = lambda xb, m=model: -m(xb)[0].mean()  # noqa: E731
            if p == "pyvae-no-step-race":
                fn = _no_step_race(fn)
        else:
            model = plain_model(D, H, Z)
            model.load_state_dict(sd)
            if p == "torch-compile":
                # Every point compiles a new model whose forward is the same code object; dynamo keeps at most
                # recompile_limit (8) graphs per code object and then runs it eagerly, without an error: the
                # 9th point of a run timed eager as "torch-compile". A fresh start per point, as bench elbo and
                # bench mlp do.
                torch._dynamo.reset()
            fn = torch.compile(model) if p == "torch-compile" else model
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
        out[p] = _step(model, fn, opt, x, precision, step)
        if p in ("pyvae-fused", "pyvae-no-gemm"):
            out[p] = _all_fused(out[p], GemmReplay() if p == "pyvae-no-gemm" else None)
    return out


def _no_step_race(loss_fn):
    """``loss_fn`` with the one-node step on its layers' own routes (NOTE: [Step routes] in
    pyvae/ops/vae_step.py)."""
    from pyvae.ops.vae_step import no_step_race

    def call(xb):
        with no_step_race():
            return loss_fn(xb)
    return call


def _all_fused(run, replay=None):
    """``run`` with every layer on pyvae's node and every row op on pyvae's kernel (``fused_only``), its
    matrix products replayed by ``replay`` (a :class:`GemmReplay`) when given."""
    import contextlib

    from pyvae.ops.linear_act import fused_only

    def call():
        with fused_only(), (replay if replay is not None else contextlib.nullcontext()):
            return run()
    return call


# NOTE: [The step without its GEMMs]
# What pyvae's step costs besides its matrix products, measured rather than inferred: the first step under a
# GemmReplay runs as usual and keeps the result of each of pyvae._gemm's products (forward with or without a
# fused post-op, input gradient, weight gradient) in call order; every later step gets those results back
# (as new tensors on the same storage) at the same calls, with no arithmetic, and runs everything else
# (casts, epilogue kernels, the ELBO, reparameterize, KL, autograd, the optimizer) as it would. Only the
# time of such a step means something:
# its values do not (a kept result is written over in place by the step that receives it: the ELBO puts its
# gradient into the logits' storage, an epilogue applies an activation in place). Only pyvae-fused can be
# replayed so: under measured routes some layers run torch's F.linear, whose products pyvae does not see.
# A step whose products differ from the first one's in order, shape or dtype raises.
class GemmReplay:
    """Context manager: the first ``with`` block records pyvae._gemm's products, later blocks replay them
    (NOTE: [The step without its GEMMs]). Not thread-safe; restores pyvae._gemm on exit."""

    FUNCS = ("linear", "linear_post_op", "grad_input", "grad_weight")

    def __init__(self):
        self.kept = None  # [(signature, result)] of the recorded block, in call order
        self._saved = None
        self._recording = False
        self._next = 0

    def __enter__(self):
        import pyvae._gemm as G

        if self._saved is not None:
            raise RuntimeError("GemmReplay: already entered")
        recording = self._recording = self.kept is None
        if recording:
            self.kept = []
        self._next = 0
        self._saved = {n: getattr(G, n) for n in self.FUNCS}

        def wrap(name, fn):
            def call(*args, **kwargs):
                sig = (name,) + tuple((tuple(a.shape), a.dtype) for a in (*args, *kwargs.values())
                                      if hasattr(a, "shape"))
                if recording:
                    r = fn(*args, **kwargs)
                    self.kept.append((sig, r))
                    return r
                k = self._next
                if k >= len(self.kept) or self.kept[k][0] != sig:
                    want = self.kept[k][0] if k < len(self.kept) else "no more products"
                    raise RuntimeError(f"GemmReplay: product {k} of this step is {sig}, the recorded step had {want}")
                self._next += 1
                r = self.kept[k][1]
                # a new tensor on the kept storage: autograd sees a result no one else holds, as in the real step
                # (AccumulateGrad takes a weight gradient nobody else references as it is, and copies one that is)
                return None if r is None else r.detach()
            return call
        for n, fn in self._saved.items():
            setattr(G, n, wrap(n, fn))
        return self

    def __exit__(self, exc_type, *exc):
        import pyvae._gemm as G

        for n, fn in self._saved.items():
            setattr(G, n, fn)
        self._saved = None
        if exc_type is None and not self._recording and self._next != len(self.kept):
            raise RuntimeError(f"GemmReplay: this step made {self._next} of the recorded step's {len(self.kept)} products")
        return False


def gemm_flops(B: int, layers=LAYERS) -> float:
    """FLOPs of the step's matrix products: forward, weight and input gradient of every layer (2 B in out
    each), except the first layer's input gradient."""
    return sum((2 if i == 0 else 3) * 2.0 * B * fin * fout for i, (fin, fout) in enumerate(layers))


def _one_thread(fn):
    """``fn`` run with torch's thread count lowered to one for the call."""
    import torch

    def call():
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(prev)
    return call


def gemm_only(B, precision, reps, target_s, layers=LAYERS, retries=2, winners=None):
    """Seconds of the step's GEMMs alone (each product on its faster library and layout, on all of torch's
    threads or, where that is faster, on one: pyvae's "pyvae-1t" layer route can run a product so), and
    their FLOPs.

    ``layers`` is the step's (in, out) sizes (:func:`layer_sizes`); the first layer has no input gradient.
    ``winners``: a dict that receives each product's fastest candidate as a ``C.Step`` (keys "gemm <layer>
    <product>"), for timing them again beside the steps (:func:`measure_point`).
    """
    import torch

    import pyvae._gemm as G

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    dnn = G.onednn_enabled()
    total_s, flops = 0.0, 0.0
    for i, (fin, fout) in enumerate(layers):
        x = torch.randn(B, fin, generator=gen).to(dtype)
        w = torch.randn(fout, fin, generator=gen).to(dtype)
        b = torch.randn(fout, generator=gen).to(dtype)
        g = torch.randn(B, fout, generator=gen).to(dtype)
        g_t = g.t().contiguous()
        # (operands bound as defaults: a winner outlives this iteration of the loop)
        products = {"forward": [lambda x=x, w=w, b=b: torch.addmm(b, x, w.t())]
                    + ([lambda x=x, w=w, b=b: G.onednn_linear(x, w, b)] if dnn else []),
                    "grad_weight": [lambda g=g, x=x: torch.mm(g.t(), x)]
                    + ([lambda g_t=g_t, x=x: G.onednn_linear(g_t, x.t()),
                        lambda g=g, x=x: G.onednn_linear(x.t(), g.t()).t().contiguous()] if dnn else [])}
        if i > 0:
            products["grad_input"] = ([lambda g=g, w=w: torch.mm(g, w)]
                                      + ([lambda g=g, w=w: G.onednn_linear(g, w.t())] if dnn else []))
        for name, fns in products.items():
            if torch.get_num_threads() > 1:
                fns = fns + [_one_thread(f) for f in fns]
            cands = {f"c{k}": C.Step(f, [], None, "forward") for k, f in enumerate(fns)}
            res = C.measure_case(cands, device="cpu", reps=reps, target_s=target_s, memory=False, retries=retries)
            best = min(res, key=lambda k: res[k]["median_ms"])
            total_s += res[best]["median_ms"] * 1e-3
            flops += 2.0 * B * fin * fout
            if winners is not None:
                winners[f"gemm {i} {name}"] = cands[best]
    return total_s, flops


def memory_floor(B, reps, target_s, D=784, retries=2):
    """Seconds of one read of two [B, D] float32 tensors and one write of a fresh one (torch.add)."""
    import torch

    a = torch.rand(B, D)
    b = torch.rand(B, D)
    res = C.measure_case({"add": C.Step(lambda: torch.add(a, b), [], None, "forward")}, device="cpu", reps=reps,
                         target_s=target_s, memory=False, retries=retries)
    return res["add"]["median_ms"] * 1e-3


# NOTE: [GEMM-only beside the steps]
# A first pass picks each product's fastest candidate (gemm_only); the winners are then timed again in the
# same rounds as the providers' steps, each in its own blocks of calls, and their medians summed: the same
# limit (products alone, operands hot), now measured in the same minutes as the steps it divides. On this
# project's shared VM the first pass alone, timed after the steps, moved the fp32 B=1024 efficiency between
# 82% and 94% over two runs of one build. The first pass's own sum is kept as gemm_only_select_ms.
def timed_beside_gemm_only(provs: dict, B: int, precision: str, args, layers=LAYERS):
    """Times the providers' steps ``provs`` (name -> ``C.Step``) and the step's GEMM-only products in the same
    rounds. Returns (the providers' results, as ``C.measure_case`` gives them, peak memory included unless
    ``args.no_memory``; the limit's fields for a row: gemm_only_ms, gemm_only_select_ms, gemm_products_ms,
    gemm_flops)."""
    retries = getattr(args, "retries", 2)
    winners = {}
    select_s, flops = gemm_only(B, precision, args.reps, args.target_s / 4, layers, retries, winners)
    res = C.measure_case({**provs, **winners}, device="cpu", reps=args.reps, target_s=args.target_s, memory=False,
                         retries=retries)
    products = {k: res.pop(k)["median_ms"] for k in winners}
    if not args.no_memory:
        for p, st in provs.items():
            res[p]["peak_mem_bytes"] = C.peak_memory_bytes(st, "cpu")
    return res, {"gemm_only_ms": sum(products.values()), "gemm_only_select_ms": select_s * 1e3,
                 "gemm_products_ms": products, "gemm_flops": flops}


def measure_point(B, precision, args, D=784, H=500, Z=20, step="full") -> dict:
    """One (B, precision, model) point: every provider's step (``step``: see :func:`build_steps`) timed
    interleaved, beside the GEMM-only time and the memory floor of the same sizes. Returns the fields of a
    result row (no machine info). ``args.retries`` (default 2): how often a case is measured again when
    other processes were busy."""
    import time

    retries = getattr(args, "retries", 2)
    steps = build_steps(B, precision, args.providers, D, H, Z, step)
    first = {}
    for p, fn in steps.items():  # compilation, route measurements, allocator warm-up
        t = time.perf_counter()
        fn()
        first[p] = time.perf_counter() - t
        fn()
    provs = {p: C.Step(fn, [], None, "forward") for p, fn in steps.items()}
    res, lim = timed_beside_gemm_only(provs, B, precision, args, layer_sizes(D, H, Z))
    for p, n in faults_per_step(steps).items():
        res[p]["faults_per_step"] = n
    del steps, provs, fn  # the models and their batch
    floor_s = memory_floor(B, args.reps, args.target_s / 4, D, retries)
    return {"precision": precision, "B": B, "step": step, "results": res, "first_call_s": first,
            **lim, "memory_floor_ms": floor_s * 1e3,
            "samples_per_s": {p: B / (r["median_ms"] * 1e-3) for p, r in res.items()},
            "gemm_efficiency": {p: lim["gemm_only_ms"] / r["median_ms"] for p, r in res.items()},
            "limit_efficiency": {p: (lim["gemm_only_ms"] + floor_s * 1e3) / r["median_ms"] for p, r in res.items()},
            "ratios": C.ratios(res), **parts(res, lim["gemm_only_ms"])}


def faults_per_step(steps: dict, rounds: int = 3) -> dict:
    """Minor page faults per call of each step (``getrusage``), median over ``rounds`` interleaved rounds of
    one call each, after the timed rounds (NOTE: [Page faults of a step])."""
    import resource
    import statistics

    counts = {p: [] for p in steps}
    for _ in range(rounds):
        for p, fn in steps.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            fn()
            counts[p].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {p: statistics.median(v) for p, v in counts.items()}


# NOTE: [Page faults of a step]
# Under this project's VMs a minor page fault costs about a microsecond: a fresh 3.2 MB output faulted in
# page by page costs ~0.8 ms, the same write into memory the allocator kept 0.08 ms. glibc hands freed memory
# back to the kernel (an mmap'ed block on free, or the top of the heap past its trim threshold) and a later
# step faults it in again, so two steps of the same arithmetic can differ by their faults. On the model 207
# Xeon (stop 23) eager's forward + backward took 940-1,850 faults a step at B=1024 and 9,000-17,000 at
# B=8192; the eleven products of the step chained in order with fresh outputs took 3,800 faults and ran 1.22x
# the sum of each product timed alone, and level with it under GLIBC_TUNABLES=glibc.malloc.mmap_max=0:
# glibc.malloc.trim_threshold=4000000000. So each row reports its steps' faults, counted in a few interleaved
# calls after the timed rounds (allocator state depends on what ran before: a count, not a constant; and a
# count, not a time: a 2 MiB huge page is one fault, NOTE: [Huge pages for fresh outputs] in csrc/cpu/pages.h).


def parts(res: dict, gemm_only_ms: float) -> dict:
    """The split of pyvae's step (NOTE: [The step without its GEMMs]) where ``res`` holds both pyvae-fused and
    pyvae-no-gemm: {"parts": {no_gemm_ms, fused_ms, parts_ms = GEMM-only + no-GEMM, excess_ms = fused -
    parts}}; else {}."""
    if "pyvae-fused" not in res or "pyvae-no-gemm" not in res:
        return {}
    fused, rest = res["pyvae-fused"]["median_ms"], res["pyvae-no-gemm"]["median_ms"]
    return {"parts": {"no_gemm_ms": rest, "fused_ms": fused, "parts_ms": gemm_only_ms + rest,
                      "excess_ms": fused - gemm_only_ms - rest}}


def run(args) -> list:
    machine = C.machine_info(args)
    rows = []
    for step in args.step:
        for precision in args.precision:
            for B in args.batch:
                rows.append(_point_row(B, precision, args, step, machine))
    return rows


def _point_row(B, precision, args, step, machine) -> dict:
    from pyvae import _tune

    row = {"bench": "train", **measure_point(B, precision, args, step=step), "loadavg": os.getloadavg(),
           "machine": machine}
    # the routes this process has run so far (every point's layers and steps; NOTE: [Step routes])
    row["routes"] = {k: v for k, v in _tune.used().items() if k.startswith(("linear_act", "vae_step"))}
    res = row["results"]
    print(f"[train {step} {precision} B={B}] " + "  ".join(f"{p}={r['median_ms']:.3g}ms" for p, r in res.items())
          + f"  gemm-only={row['gemm_only_ms']:.3g}ms floor={row['memory_floor_ms']:.3g}ms",
          file=sys.stderr, flush=True)
    return row


def markdown(rows) -> str:
    lines = ["| step | precision | B | provider | step ms | samples/s | peak MB | faults / step | GEMM-only ms | GEMM / step "
             "| (GEMM + floor) / step | vs eager | vs compile |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eager = r["results"].get("torch-eager", {}).get("median_ms")
        comp = r["results"].get("torch-compile", {}).get("median_ms")
        for p, v in r["results"].items():
            ms = v["median_ms"]
            peak = v.get("peak_mem_bytes")
            flt = v.get("faults_per_step")
            lines.append(f"| {r.get('step', 'full')} | {r['precision']} | {r['B']} | {p} | {ms:.3g} | {r['samples_per_s'][p]:,.0f} | "
                         f"{'-' if peak is None else f'{peak / 1e6:.3g}'} | {'-' if flt is None else f'{flt:,.0f}'} | {r['gemm_only_ms']:.3g} | {r['gemm_efficiency'][p]:.0%} | {r['limit_efficiency'][p]:.0%} | "
                         f"{(eager / ms) if eager else float('nan'):.2f}x | {(comp / ms) if comp else float('nan'):.2f}x |")
    split = [r for r in rows if "parts" in r]
    if split:
        lines += ["", "pyvae's step in parts (NOTE: [The step without its GEMMs]): the GEMMs alone, the step without "
                  "its GEMMs, their sum, and how much longer the fused step takes than that sum:", "",
                  "| step | precision | B | GEMM-only ms | no-GEMM ms | parts ms | pyvae-fused ms | excess ms "
                  "| excess / fused | pyvae ms |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in split:
            q = r["parts"]
            mine = r["results"].get("pyvae", {}).get("median_ms")
            lines.append(f"| {r.get('step', 'full')} | {r['precision']} | {r['B']} | {r['gemm_only_ms']:.3g} | "
                         f"{q['no_gemm_ms']:.3g} | {q['parts_ms']:.3g} | {q['fused_ms']:.3g} | {q['excess_ms']:.3g} | "
                         f"{q['excess_ms'] / q['fused_ms']:.0%} | {'-' if mine is None else f'{mine:.3g}'} |")
    return "\n".join(lines)


def panels(rows) -> list:
    """The plot's grid (``pyvae.plots.scaling_plot``'s panels): one row of panels per step kind, a panel per
    precision; median step ms of each provider against the batch size, with the GEMM-only limit and the
    GEMM-only + memory-floor limit measured at each point (dashed). The last row of a (step, precision, B)
    wins."""
    keep = {}
    for r in rows:
        keep[(r.get("step", "full"), r["precision"], r["B"])] = r
    grid = []
    for step in [s for s in STEPS if any(k[0] == s for k in keep)]:
        row = []
        for precision in dict.fromkeys(k[1] for k in keep if k[0] == step):
            sel = [keep[k] for k in sorted(k for k in keep if k[:2] == (step, precision))]
            provs = list(dict.fromkeys(p for r in sel for p in r["results"]))
            series = {p: [r["results"][p]["median_ms"] if p in r["results"] else None for r in sel] for p in provs}
            # (GEMM-only drawn last: the floor line is often just above it and would hide it)
            limits = {"GEMM-only + memory floor": [r["gemm_only_ms"] + r["memory_floor_ms"] for r in sel],
                      "GEMM-only": [r["gemm_only_ms"] for r in sel]}
            what = "forward + backward + fused Adam" if step == "full" else "forward + backward"
            row.append({"x": [r["B"] for r in sel], "series": series, "limits": limits, "colors": PLOT_COLORS,
                        "title": f"{precision}: {what}", "xlabel": "batch size B", "ylabel": "median step ms"})
        grid.append(row)
    return grid


PLOT_COLORS = {"torch-eager": "tab:blue", "torch-compile": "tab:orange", "pyvae": "tab:green",
               "pyvae-fresh-grad": "tab:olive", "pyvae-layered": "tab:brown", "pyvae-fused": "tab:cyan", "pyvae-no-gemm": "tab:purple",
               "GEMM-only": "0.2", "GEMM-only + memory floor": "0.6"}


def plot(rows, path, title: str = ""):
    """Writes :func:`panels` of ``rows`` as a PNG (log-log); returns its path."""
    from pyvae.plots import scaling_plot

    return scaling_plot(panels(rows), path, title)


def main(argv=None):
    p = argparse.ArgumentParser(prog="pyvae bench train", description=__doc__.split("\n")[0])
    p.add_argument("--batch", nargs="+", type=C.pos_int, default=[100, 1024, 8192])
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--step", nargs="+", choices=STEPS, default=["full"],
                   help="full: forward, backward and fused Adam (default); fwd-bwd: forward and backward alone")
    p.add_argument("--plot", default=None, help="PNG to write (default: the JSONL's path with .png)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    C.add_common_args(p, extra_providers=("pyvae-layered", "pyvae-fresh-grad", "pyvae-fused", "pyvae-no-gemm",
                                              "pyvae-no-step-race"))
    args = p.parse_args(argv)
    if args.device != "cpu":  # the steps, GEMM-only and the floor are built on the CPU: cuda would only mislabel them
        p.error("argument --device: the train benchmark runs on the CPU only")
    rows, m, out = C.run_family(args, "train", run)
    print(f"\n{m['cpu_model']}, {m['threads']} threads, torch {m['torch']}, pyvae {m['pyvae']} ({m['pyvae_cpu_arch']}), "
          f"malloc={args.malloc}, omp-wait={args.omp_wait}; one training step (full: forward, backward, fused Adam; "
          "fwd-bwd: forward and backward), median ms\n")
    print(markdown(rows))
    print(f"\n{len(rows)} rows appended to {os.path.relpath(out)}")
    if rows and not args.no_plot:
        path = plot(rows, args.plot or os.path.splitext(out)[0] + ".png",
                    f"{m['cpu_model']}, {m['threads']} threads, torch {m['torch']}, pyvae {m['pyvae']}: "
                    "one AEVB training step against its limits")
        print(f"plot: {os.path.relpath(path)}")


if __name__ == "__main__":
    main()

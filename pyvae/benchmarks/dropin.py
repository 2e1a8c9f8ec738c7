"""``pyvae bench dropin``: what swapping pyvae into a typical PyTorch VAE training loop buys, per epoch.

The loop is the classic examples-style VAE (784-400-20 with ReLU, Adam 1e-3, batch 128, grey-level pixels
in [0, 1], loss = summed BCE + KL), in three versions trained side by side from the same initial weights
on the same batches:

    plain           the loop as written in plain PyTorch (nn.Linear, F.relu, randn_like, BCE, KL formula)
    torch-compile   the same with the model's loss under torch.compile
    pyvae           the minimal swap: FusedLinear(..., "relu") for the ReLU layers, GaussianHead for the two
                    heads, pyvae.reparameterize, and -(bernoulli_log_prob(logits, x) - gaussian_kl(mu, logvar))
                    as the loss (the decoder returns logits; BCE on sigmoid outputs is the same loss)

Each epoch runs the three one after the other in a fresh random order; the table gives the median epoch
time (first epoch, which includes compilation and pyvae's route measurements, reported apart), samples/s,
the ratios, and the test loss per datapoint after the last epoch (same within noise: the three optimize
the same objective from the same start, with different random draws). The ratios are given twice: of the
median epoch times, and paired (the median over epochs of the two providers' ratio in the same epoch, with
a 95% bootstrap interval). On a shared machine epoch times drift during a run (2.5 to 3.7 s within one run
on this project's VM, every provider alike); the providers of one epoch run within seconds of each other,
so in the paired ratio the drift cancels and the interval says how far the run can be trusted.

The limit of the swap, measured in the same process after the epochs: a swap of the layers and the loss
leaves three things of each step as they are, so no swapped loop can take less per step than their sum:

    GEMM-only       the model's matrix products (forward, weight and input gradients; the first layer needs
                    no input gradient), each with the fastest of torch's mm and oneDNN's linear in its best
                    layout, on all threads or on one (``pyvae bench train``'s ``gemm_only``), for the swapped
                    model's layers (its two heads in one product: fewer calls than the plain model's)
    optimizer       the user's ``torch.optim.Adam(lr=1e-3).step()`` on the swapped model's parameters
    gather          the loop's ``data.train[perm[i:i + B]]``

The limit row's epoch time is their sum times the steps of an epoch; ``plain / limit`` is the most any such
swap could speed up this loop on this machine, and each provider's ``limit / epoch`` its share of that
bound. The parts are timed alone, with their operands warm in the caches, so the limit is a bound, not a
forecast. Minor page faults per step (``getrusage``) are reported per provider: glibc can hand freed heap
back to the kernel every step and fault it in again (in one run of this loop ~450 faults and ~1 ms of system
time per 7 ms step, in another none), a process-wide cost that moves epoch times.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

from . import common as C

PROVIDERS = ("plain", "torch-compile", "pyvae")
# the 28x28 sets: the loop's model takes 784 inputs (digits' 64 or frey's 560 fail in the first layer)
DATASETS = ("auto", "mnist-5k", "mnist", "fashion-mnist")


def _models(seed: int):
    import torch
    import torch.nn.functional as F
    from torch import nn

    import pyvae
    from pyvae import nn as pnn

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(784, 400)
            self.fc21 = nn.Linear(400, 20)
            self.fc22 = nn.Linear(400, 20)
            self.fc3 = nn.Linear(20, 400)
            self.fc4 = nn.Linear(400, 784)

        def forward(self, x):
            h1 = F.relu(self.fc1(x))
            mu, logvar = self.fc21(h1), self.fc22(h1)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            recon = torch.sigmoid(self.fc4(F.relu(self.fc3(z))))
            bce = F.binary_cross_entropy(recon, x, reduction="sum")
            kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
            return bce + kld

    class Swapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = pnn.FusedLinear(784, 400, "relu")
            self.head = pnn.GaussianHead(400, 20)
            self.fc3 = pnn.FusedLinear(20, 400, "relu")
            self.fc4 = pnn.FusedLinear(400, 784, "identity")

        def forward(self, x):
            mu, logvar = self.head(self.fc1(x))
            z = pyvae.reparameterize(mu, logvar)
            logits = self.fc4(self.fc3(z))
            return -(pyvae.bernoulli_log_prob(logits, x) - pyvae.gaussian_kl(mu, logvar)).sum()

    torch.manual_seed(seed)
    plain = Plain()
    compiled_src = Plain()
    compiled_src.load_state_dict(plain.state_dict())
    swapped = Swapped()
    sd = plain.state_dict()
    swapped.fc1.load_state_dict({"weight": sd["fc1.weight"], "bias": sd["fc1.bias"]})
    swapped.head.load_state_dict({"weight": torch.cat([sd["fc21.weight"], sd["fc22.weight"]]),
                                  "bias": torch.cat([sd["fc21.bias"], sd["fc22.bias"]])})
    swapped.fc3.load_state_dict({"weight": sd["fc3.weight"], "bias": sd["fc3.bias"]})
    swapped.fc4.load_state_dict({"weight": sd["fc4.weight"], "bias": sd["fc4.bias"]})
    return {"plain": (plain, plain), "torch-compile": (compiled_src, torch.compile(compiled_src)),
            "pyvae": (swapped, swapped)}


def _data(name: str, data_dir, limit):
    from pyvae.data import load_dataset

    if name == "auto":
        try:
            return load_dataset("fashion-mnist", data_dir, "none", limit)
        except FileNotFoundError:
            print("bench dropin: Fashion-MNIST not found (apt-get install dataset-fashion-mnist); using mnist-5k",
                  file=sys.stderr)
            name = "mnist-5k"
    return load_dataset(name, data_dir, "none", limit)


def paired_ratio(num, den, draws: int = 2000, seed: int = 0) -> list:
    """``[point, lo, hi]``: the median over epochs of ``num[e] / den[e]`` and its 95% bootstrap interval
    (epochs resampled with replacement)."""
    import numpy as np

    r = np.asarray(num, dtype=np.float64) / np.asarray(den, dtype=np.float64)
    if r.size == 0:
        raise ValueError("paired_ratio: no epochs")
    idx = np.random.default_rng(seed).integers(0, r.size, size=(draws, r.size))
    lo, hi = np.percentile(np.median(r[idx], axis=1), [2.5, 97.5])
    return [float(np.median(r)), float(lo), float(hi)]


def layer_sizes(module) -> list:
    """(in, out) of the linear layers of ``module`` (``nn.Linear`` and pyvae's ``FusedLinear``), in the order
    they were registered, which for these models is the forward order."""
    from torch import nn

    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


def limit_per_step(gemm_ms: float, optimizer_ms: float, gather_ms: float) -> float:
    """The per-step bound of the swap: its three unchanged parts run back to back."""
    return gemm_ms + optimizer_ms + gather_ms


def measure_limit(module, data, B: int, seed: int, target_s: float = 1.0) -> dict:
    """Milliseconds of the parts of a step that a swap of the layers and the loss leaves unchanged (see the
    module docstring), measured on copies of ``module``'s parameters."""
    import torch

    from .train import gemm_only

    gemm_s, flops = gemm_only(B, "fp32", None, target_s / 4, layers=layer_sizes(module))
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(p.detach().clone()) for p in module.parameters()]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt = torch.optim.Adam(params, lr=1e-3)
    idx = torch.randperm(data.train.shape[0], generator=gen)[:B]
    res = C.measure_case({"optimizer": C.Step(opt.step, [], None, "forward"),
                          "gather": C.Step(lambda: data.train[idx], [], None, "forward")},
                         device="cpu", reps=None, target_s=target_s, memory=False)
    out = {"gemm_ms": gemm_s * 1e3, "gemm_flops": flops, "optimizer_ms": res["optimizer"]["median_ms"],
           "gather_ms": res["gather"]["median_ms"]}
    out["step_ms"] = limit_per_step(out["gemm_ms"], out["optimizer_ms"], out["gather_ms"])
    return out


def run(args) -> list:
    import resource

    import torch

    machine = C.machine_info(args)
    data = _data(args.dataset, args.data_dir, args.limit)
    n = data.train.shape[0]
    B = args.batch_size
    if n < B:  # (the dataset's size is known only now) an epoch of no steps would time nothing
        raise SystemExit(f"pyvae bench dropin: --batch-size {B} is more than the {n} train examples of {data.name}")
    models = _models(args.seed)
    opts = {p: torch.optim.Adam(models[p][0].parameters(), lr=1e-3) for p in args.providers}
    epoch_s = {p: [] for p in args.providers}
    faults = {p: [] for p in args.providers}  # minor page faults per step, per epoch
    steps = len(range(0, n - B + 1, B))
    order = random.Random(args.seed)
    for epoch in range(args.epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        providers = list(args.providers)
        order.shuffle(providers)
        for p in providers:
            module, fn = models[p]
            opt = opts[p]
            module.train()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = time.perf_counter()
            for i in range(0, n - B + 1, B):
                x = data.train[perm[i:i + B]]
                loss = fn(x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            epoch_s[p].append(time.perf_counter() - t)
            faults[p].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / max(steps, 1))
        print(f"[dropin epoch {epoch + 1}] " + "  ".join(f"{p}={epoch_s[p][-1]:.2f}s" for p in args.providers),
              file=sys.stderr, flush=True)
    test_loss = {}
    with torch.no_grad():
        for p in args.providers:
            module, fn = models[p]
            torch.manual_seed(args.seed)
            tot = sum(float(fn(data.test[i:i + 1000])) for i in range(0, data.test.shape[0], 1000))
            test_loss[p] = tot / data.test.shape[0]
    # the epochs after the first (all of one), and their median (for an even count, the mean of the two middle ones)
    def after_first(v):
        return v[1:] if len(v) > 1 else v

    timed = {p: after_first(v) for p, v in epoch_s.items()}
    steady = {p: statistics.median(v) for p, v in timed.items()}
    samples = (n // B) * B
    row = {"bench": "dropin", "dataset": data.name, "B": B, "epochs": args.epochs, "train_samples": samples,
           "epoch_s": epoch_s, "median_epoch_s": steady, "first_epoch_s": {p: v[0] for p, v in epoch_s.items()},
           "samples_per_s": {p: samples / s for p, s in steady.items()}, "test_loss": test_loss,
           "faults_per_step": {p: statistics.median(after_first(v)) for p, v in faults.items()},
           "loadavg": os.getloadavg(), "machine": machine}
    if not args.no_swap_limit:
        lim = measure_limit(models["pyvae"][0], data, B, args.seed)
        print(f"[dropin limit] gemm-only={lim['gemm_ms']:.3g}ms optimizer={lim['optimizer_ms']:.3g}ms "
              f"gather={lim['gather_ms']:.3g}ms per step", file=sys.stderr, flush=True)
        row["limit"] = {**lim, "epoch_s": lim["step_ms"] * 1e-3 * steps}
        row["share_of_limit"] = {p: row["limit"]["epoch_s"] / s for p, s in steady.items()}
        if "plain" in steady:
            row["plain_vs_limit"] = steady["plain"] / row["limit"]["epoch_s"]
    if "plain" in steady and "pyvae" in steady:
        row["pyvae_vs_plain"] = steady["plain"] / steady["pyvae"]
        row["paired_pyvae_vs_plain"] = paired_ratio(timed["plain"], timed["pyvae"])
    if "torch-compile" in steady and "pyvae" in steady:
        row["pyvae_vs_compile"] = steady["torch-compile"] / steady["pyvae"]
        row["paired_pyvae_vs_compile"] = paired_ratio(timed["torch-compile"], timed["pyvae"])
    return [row]


def markdown(rows) -> str:
    lines = ["| dataset | B | provider | median epoch s | first epoch s | samples/s | test loss / datapoint "
             "| faults / step | limit / epoch |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for p in r["median_epoch_s"]:
            fl = r.get("faults_per_step", {}).get(p)
            share = r.get("share_of_limit", {}).get(p)
            lines.append(f"| {r['dataset']} | {r['B']} | {p} | {r['median_epoch_s'][p]:.2f} | "
                         f"{r['first_epoch_s'][p]:.2f} | {r['samples_per_s'][p]:,.0f} | {r['test_loss'][p]:.2f} | "
                         f"{'-' if fl is None else f'{fl:.0f}'} | {'-' if share is None else f'{share:.0%}'} |")
        if "limit" in r:
            lim = r["limit"]
            lines.append(f"| {r['dataset']} | {r['B']} | limit | {lim['epoch_s']:.2f} | | "
                         f"{r['train_samples'] / lim['epoch_s']:,.0f} | | | 100% |")
        extra = []
        for key, name in (("pyvae_vs_plain", "pyvae vs plain"), ("pyvae_vs_compile", "vs torch.compile")):
            if key in r:
                paired = r.get("paired_" + key)
                extra.append(f"{name} {r[key]:.2f}x" + ("" if paired is None else
                             f" (paired per epoch {paired[0]:.2f}x [{paired[1]:.2f}, {paired[2]:.2f}])"))
        if "plain_vs_limit" in r:
            lim = r["limit"]
            extra.append(f"plain / limit {r['plain_vs_limit']:.2f}x (limit per step: GEMM-only {lim['gemm_ms']:.3g} ms"
                         f" + optimizer {lim['optimizer_ms']:.3g} + gather {lim['gather_ms']:.3g})")
        if extra:
            lines.append(f"| | | {', '.join(extra)} | | | | | | |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="pyvae bench dropin", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="auto", choices=DATASETS,
                   help="auto (Fashion-MNIST if installed, else mnist-5k) or a 28x28 set")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit", type=C.pos_int, default=None,
                   help="use only N train and N test examples (a fixed random subset of each)")
    p.add_argument("--epochs", type=C.pos_int, default=4, help="epochs (the first one is reported apart)")
    p.add_argument("--batch-size", type=C.pos_int, default=128)
    p.add_argument("--seed", type=C.seed_int, default=0)
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--threads", type=C.pos_int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu"])
    p.add_argument("--malloc", default="default", choices=["default", "reuse", "both"])
    p.add_argument("--omp-wait", default="unset", choices=["spin", "active", "passive", "unset"])
    p.add_argument("--no-swap-limit", action="store_true",
                   help="skip the limit of the swap (GEMM-only + optimizer + gather, timed after the epochs)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < args.batch_size:  # an epoch of no steps: nothing to time
        p.error(f"argument --batch-size: {args.batch_size} is more than the --limit of {args.limit} train examples")
    if not (-2 ** 63 <= args.seed * 1000 and args.seed * 1000 + args.epochs - 1 < 2 ** 64):
        # each epoch's data order is seeded with seed * 1000 + epoch, which torch takes only in 64 bits
        p.error(f"argument --seed: seed * 1000 + epoch must lie in [-2**63, 2**64), got seed {args.seed}")
    rows, m, out = C.run_family(args, "dropin", run)
    print(f"\n{m['cpu_model']}, {m['threads']} threads, torch {m['torch']}, pyvae {m['pyvae']} "
          f"({m['pyvae_cpu_arch']}), malloc={args.malloc}, omp-wait={args.omp_wait}\n")
    print(markdown(rows))
    print(f"\n{len(rows)} rows appended to {os.path.relpath(out)}")


if __name__ == "__main__":
    main()

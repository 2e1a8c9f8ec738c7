"""``pyvae tune``: measure the routes of a model's layers ahead of time (NOTE: [Measured routes] in
pyvae/_tune.py), so that training starts on routes already chosen for this machine."""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence

import torch

from . import _tune
from .evaluation import autocast
from .models import VAE
from .ops import forget_routes

__all__ = ["tune_model", "show", "bf16_products", "bf16_note"]


def tune_model(x_dim: int = 784, z_dim: int = 20, hidden: int = 500, activation: str = "tanh",
               likelihood: str = "bernoulli", layers: int = 1, batch_sizes: Sequence[int] = (100,),
               precisions: Sequence[str] = ("fp32",), force: bool = False) -> Dict[str, object]:
    """Runs one training step (forward + backward) of the model at each batch size and precision, which
    measures the route of every layer not yet in the cache (all of them with ``force``).

    Returns:
        ``{"seconds": wall time, "routes": {key: entry}}`` for the routes of this model's layers.
    """
    if force:
        _tune.reset_for_tests("force")
    before = set(_tune.entries())
    forget_routes()
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = VAE(x_dim, z_dim, hidden, likelihood, activation, layers)
        for precision in precisions:
            for b in batch_sizes:
                x = (torch.rand(b, x_dim) < 0.5).float()
                with autocast(precision, torch.device("cpu")):
                    loss = -model.elbo(x).mean()
                loss.backward()
                model.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    routes = {k: v for k, v in _tune.entries().items() if force or k not in before}
    if force:
        _tune.reset_for_tests(None)
    return {"seconds": seconds, "routes": routes}


def show() -> List[str]:
    """The cache file, its machine key and one line per route (for ``pyvae tune --show``)."""
    machine = _tune.machine_key()
    lines = [f"cache: {_tune.cache_path()} ({'present' if _tune.cache_path().is_file() else 'absent'}); "
             f"PYVAE_TUNE={_tune.mode()}",
             "cpu: " + _tune.cpu_model() + "; ISA " + " ".join(machine["cpu"]["isa"]) + "; caches "
             + " ".join(f"{lvl} {size}" for lvl, size in machine["cpu"]["caches"].items()),
             "machine: " + ", ".join(f"{k}={v}" for k, v in machine.items() if k != "cpu")]
    # the file's routes as well as this process's: under PYVAE_TUNE=off or force the process reads no file
    for key, e in sorted({**_tune.on_disk(), **_tune.entries()}.items()):
        ms = ", ".join(f"{n} {v:.3f} ms" for n, v in e["ms"].items())
        votes = f"; undecided, races picked {', '.join(e['votes'])}" if e.get("votes") else ""
        lines.append(f"{key}: {e['choice']}  ({ms}{votes})")
    return lines


# NOTE: [bf16 on this CPU]
# bf16-mixed pays off on a CPU only where bfloat16 matrix products beat float32 ones: with AMX (the Intel
# Xeon of family 6 model 167: 550-1050 GFLOP/s against fp32's 180-200) or fast avx512_bf16 (the Zen 4 AMD
# EPYC: 720-750 against ~200). A VM can expose avx512_bf16 without AMX: on the Intel Xeon of family 6 model
# 207 oneDNN's bf16 products ran at 165-181 GFLOP/s against MKL's fp32 306-319, and bf16-mixed training was
# slower than fp32 at B=100 (bench/RESULTS.md, stops 22 and 23). The flags do not say which case a machine is
# (and the libraries' ISA limits, ONEDNN_MAX_CPU_ISA, change it), so `pyvae train --precision bf16-mixed` on
# CPU measures it: the three training products (forward, input and weight gradient) of the model's largest
# layer, with torch's own GEMMs, in float32 and in bfloat16, at the run's batch (at most 2048 rows: 0.66 s
# for a 784->500 layer on the model 207 Xeon; the cost grows with in x out), raced and cached like a layer
# route (key "precision <in>-><out> rows<=<bucket> train"; ``pyvae tune --show`` lists it). Where bfloat16
# is not faster, the run says so once and names fp32; it still runs in the precision asked for (a precision
# changes results, not only speed, so it is never switched silently). PYVAE_TUNE=off: nothing measured,
# nothing said.
_BF16_MAX_ROWS = 2048


def bf16_products(rows: int, in_features: int, out_features: int) -> Optional[Dict[str, object]]:
    """Milliseconds of one linear layer's three training products with torch's GEMMs, ``{"fp32": ms, "bf16":
    ms, "rows": the rows timed, "busy": whether the machine was busy then}`` (``rows`` rounded up to a power
    of two, at most 2048), measured on this machine once per shape class and cached with the layer routes
    (NOTE: [bf16 on this CPU]); None when tuning is off (``PYVAE_TUNE=off``)."""
    for name, v in (("rows", rows), ("in_features", in_features), ("out_features", out_features)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"bf16_products: {name} must be a positive int, got {v!r}")
    if not _tune.enabled():
        return None
    rows = min(rows, _BF16_MAX_ROWS)
    bucket = 1 << (rows - 1).bit_length()
    key = f"precision {in_features}->{out_features} rows<={bucket} train"
    if _tune.lookup(key) is None:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(bucket, in_features, generator=gen)
        w = torch.randn(out_features, in_features, generator=gen) * in_features ** -0.5
        g = torch.randn(bucket, out_features, generator=gen)

        def products(x, w, g):
            def call():
                torch.mm(x, w.t())  # forward
                torch.mm(g, w)  # input gradient
                torch.mm(g.t(), x)  # weight gradient
            return call

        _tune.decide(key, {"fp32": products(x, w, g),
                           "bf16": products(x.bfloat16(), w.bfloat16(), g.bfloat16())},
                     what=f"bf16 against fp32 products, {in_features}->{out_features} at {bucket} rows")
    entry = _tune.entries()[key]
    ms = entry["ms"]
    return {"fp32": float(ms["fp32"]), "bf16": float(ms["bf16"]), "rows": bucket, "busy": bool(entry.get("busy"))}


def bf16_note(rows: int, in_features: int, out_features: int) -> Optional[str]:
    """A line for a bf16-mixed CPU run where this machine's bfloat16 products are not faster than float32
    ones by more than the routes' tie margin (NOTE: [bf16 on this CPU]), else None."""
    ms = bf16_products(rows, in_features, out_features)
    if ms is None or ms["bf16"] * (1 + _tune.TIE) < ms["fp32"]:
        return None
    if ms.get("busy"):  # timed while other processes took the CPUs (NOTE: [Disturbed races]): no advice from it
        return None
    amx = "amx_bf16" in _tune.cpu_identity()["isa"]
    return (f"bf16-mixed: on this CPU ({_tune.cpu_model()}{'' if amx else '; no AMX in its flags'}) bfloat16 matrix "
            f"products are not faster than float32 ones (the {in_features}->{out_features} layer's forward and "
            f"backward products at {ms['rows']} rows: bf16 {ms['bf16']:.3g} ms, fp32 "
            f"{ms['fp32']:.3g} ms), so --precision fp32 is likely the faster run here; `pyvae bench train "
            f"--precision fp32 bf16` times the whole step")

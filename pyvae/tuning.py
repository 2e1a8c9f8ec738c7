"""``pyvae tune``: measure the routes of a model's layers ahead of time (NOTE: [Measured routes] in
pyvae/_tune.py), so that training starts on routes already chosen for this machine."""
from __future__ import annotations

import time
from typing import Dict, List, Sequence

import torch

from . import _tune
from .evaluation import autocast
from .models import VAE
from .ops import forget_routes

__all__ = ["tune_model", "show"]


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

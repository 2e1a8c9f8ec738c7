"""Routes chosen by measurement on the machine that runs them.

NOTE: [Measured routes]
The fastest way to run a layer differs by CPU: on a Zen 5 AMD EPYC torch's float32 ``mm`` (MKL) takes
its AVX2 path at ~200 GFLOP/s and oneDNN reaches 330-490, so pyvae's layer on oneDNN is 2x eager; on a
Zen 4 EPYC both run near a peak less than half as high and the same route is 1.05-1.3x eager from
B=1024; on an Intel Xeon MKL takes AVX-512 and the same route is 0.85-0.92x eager (shared/DESIGN.md,
"Machines differ"). No threshold tuned on one machine holds on the other. So where pyvae chooses between
implementations, it times the candidates the first time a shape class is seen, on this machine, with
this torch, this many threads, and keeps the winner:

- in memory for the process, and on disk in ``cache_path()`` (one JSON file per machine key: the CPU's
  name, vendor, family, model, stepping, ISA extensions and cache sizes (NOTE: [Which CPU]), pyvae's CPU
  kernel build, thread count, torch and pyvae versions, the ISA limits of oneDNN and MKL set in the
  environment, ``PYVAE_CPU_GEMM`` and whether oneDNN's linear is usable), so the next process reuses it;
  after ``torch.set_num_threads`` the process reads (and races into) the new count's file;
- ``PYVAE_TUNE=off``: no measuring, no cache: the cold-start rule of each decision; ``PYVAE_TUNE=force``:
  measure again, whatever the cache says; default ``auto``. ``PYVAE_CACHE_DIR`` moves the cache.
- ``pyvae tune`` measures the paper's model ahead of time; ``pyvae tune --show`` prints the cache.

Every candidate computes the same function; routes differ in speed and in rounding, never otherwise.
Candidates are timed on tensors of the call's shape filled from a private generator (the caller's
tensors and torch's global RNG are not touched), interleaved, and the fastest call of each is compared
(the median is the studied alternative: NOTE: [Median rule]). One race differs: a one-node VAE step raced as a
whole reads the call's own batch and parameters (writing nothing to them) and compares medians (NOTE: [Step
routes] in pyvae/ops/vae_step.py);
the timing stops as soon as one candidate clearly wins or the candidates left measurably tie (NOTE:
[Early stop]).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import _gate, _gemm
from ._version import __version__

__all__ = ["cpu_model", "cpu_identity", "mode", "enabled", "lookup", "decide", "cache_path", "machine_key", "entries",
           "clear", "measure", "race", "choose", "note", "used", "run_routes", "pin", "pinned", "TIE", "STAT", "STATS",
           "WIDE", "WIDE_ROUNDS", "wide_out"]

_LOG = logging.getLogger("pyvae.tune")
_VERSION = 5  # 2: row-op routes, early-stopped races; 3: the one-thread layer route and the planned (lean) row-op
# kernel path as the kernel candidate; 4: undecided races confirmed by a vote (NOTE: [Undecided races]); 5: relu
# layers no longer fuse relu into oneDNN's GEMM (NOTE: [CPU GEMM backend]), so their "pyvae" route costs what it
# did not. Caches of an older version are measured again.
_state: Dict[str, object] = {"mode": None, "routes": None, "path": None, "key": None}


def mode() -> str:
    """``PYVAE_TUNE``: "auto" (default), "off" or "force" (read once per process)."""
    m = _state["mode"]
    if m is None:
        m = os.environ.get("PYVAE_TUNE", "auto").strip().lower() or "auto"
        if m not in ("auto", "off", "force"):
            raise ValueError(f"PYVAE_TUNE must be 'auto', 'off' or 'force', got {m!r}")
        _state["mode"] = m
    return m  # type: ignore[return-value]


def enabled() -> bool:
    return mode() != "off"


# NOTE: [Which CPU]
# The model name in /proc/cpuinfo does not identify the microarchitecture under a VM: this project's VMs
# report "AMD EPYC" on a Zen 5 host (family 26) and on a Zen 4 host (family 25), whose fastest routes differ
# (fp32 GEMMs on oneDNN ran 1.4-2.9x MKL's on the Zen 5 and 1.06-1.47x on the Zen 4; bf16 GEMMs 720-750
# GFLOP/s against 320-420). A route measured on one must not be reused on the other, so the machine key of
# the route cache holds the vendor, family, model and stepping, the ISA extensions the GEMM libraries and
# pyvae's kernels dispatch on, and the cache sizes, and results name the CPU by ``cpu_model()``, which
# appends the family, model and stepping to the name.
_ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
              "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
              "asimd", "sve", "sve2", "bf16", "i8mm")


def _cpuinfo(path: str = "/proc/cpuinfo") -> Dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields: Dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                k, sep, v = line.partition(":")
                if sep:
                    fields.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    return fields


def _cache_sizes(base: str = "/sys/devices/system/cpu/cpu0/cache") -> Dict[str, str]:
    """CPU 0's data and unified cache sizes by level ("L2": "1024K", ...); {} where sysfs has none."""
    sizes: Dict[str, str] = {}
    try:
        for d in sorted(os.listdir(base)):
            if not d.startswith("index"):
                continue
            with open(os.path.join(base, d, "type")) as f:
                kind = f.read().strip()
            if kind == "Instruction":
                continue
            with open(os.path.join(base, d, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(base, d, "size")) as f:
                sizes[f"L{level}"] = f.read().strip()
    except OSError:
        pass
    return sizes


def cpu_identity(cpuinfo: str = "/proc/cpuinfo",
                 caches: str = "/sys/devices/system/cpu/cpu0/cache") -> Dict[str, object]:
    """What identifies this CPU for the route cache (NOTE: [Which CPU]): name, vendor, family, model,
    stepping (x86; "CPU implementer" / "CPU part" on Arm), the ISA extensions of ``_ISA_FLAGS`` it has, and
    its cache sizes."""
    info = _cpuinfo(cpuinfo)
    flags = set((info.get("flags") or info.get("Features") or "").split())
    ident: Dict[str, object] = {
        "name": info.get("model name") or platform.processor() or platform.machine(),
        "isa": sorted(flags.intersection(_ISA_FLAGS)),
        "caches": _cache_sizes(caches),
    }
    for key, field in (("vendor", "vendor_id"), ("family", "cpu family"), ("model", "model"),
                       ("stepping", "stepping"), ("implementer", "CPU implementer"), ("part", "CPU part")):
        if field in info:
            ident[key] = info[field]
    return ident


def cpu_model() -> str:
    """The CPU as results name it: the model name, then the family, model and stepping where /proc/cpuinfo
    gives them ("AMD EPYC (family 25, model 17, stepping 1)"): NOTE: [Which CPU]."""
    ident = cpu_identity()
    name = str(ident["name"])
    ids = [f"{k} {ident[k]}" for k in ("family", "model", "stepping", "implementer", "part") if k in ident]
    return f"{name} ({', '.join(ids)})" if ids else name


def _follow_threads() -> None:
    """Forgets the machine key, its file and its routes when torch's thread count has changed since they
    were read: a route raced on one thread count is neither reused nor saved under another."""
    key = _state["key"]
    if key is not None and key["threads"] != torch.get_num_threads():  # type: ignore[index]
        _state.update(routes=None, path=None, key=None)


def machine_key() -> Dict[str, object]:
    """What a measured route depends on besides the shape."""
    _follow_threads()
    if _state["key"] is None:
        _state["key"] = {
            "cpu": cpu_identity(),
            "pyvae_cpu_arch": _gate.cpu_arch(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "pyvae": __version__,
            "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")),
            "mkl_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS", ""),
            "gemm_mode": os.environ.get("PYVAE_CPU_GEMM", "auto"),
            # Whether oneDNN's linear is usable in this process (pyvae/_gemm.py): every "pyvae" route's
            # GEMMs change with it, so routes timed without it are not reused with it, and back.
            "onednn": _gemm.onednn_enabled(),
        }
    return dict(_state["key"])  # type: ignore[arg-type]


def cache_path() -> Path:
    """The cache file of this machine key."""
    _follow_threads()
    if _state["path"] is None:
        base = os.environ.get("PYVAE_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "pyvae")
        digest = hashlib.sha256(json.dumps(machine_key(), sort_keys=True).encode()).hexdigest()[:12]
        _state["path"] = Path(base) / f"routes-{digest}.json"
    return _state["path"]  # type: ignore[return-value]


def _on_disk() -> Dict[str, dict]:
    """The routes in this machine key's cache file now ({} when there is none, or it is unreadable, of
    another version or of another machine)."""
    try:
        data = json.loads(cache_path().read_text())
        if data.get("version") == _VERSION and data.get("machine") == machine_key():
            return dict(data.get("routes", {}))
    except (OSError, ValueError, AttributeError):
        pass  # no cache yet, or an unreadable one: measure again
    return {}


def on_disk() -> Dict[str, dict]:
    """The routes the cache file holds for this machine key, whatever ``PYVAE_TUNE`` says (``pyvae tune --show``)."""
    return _on_disk()


def _routes() -> Dict[str, dict]:
    _follow_threads()
    if _state["routes"] is None:
        _state["routes"] = _on_disk() if mode() == "auto" else {}
    return _state["routes"]  # type: ignore[return-value]


def _save() -> None:
    """Writes this process's routes into the cache file, over the file's own as it is now: routes another
    process (a DDP rank, a second run) saved since this one read the file are kept, not overwritten."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = {**_on_disk(), **{k: v for k, v in _routes().items() if not v.get("busy")}}
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": _VERSION, "machine": machine_key(), "routes": kept}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: keep the routes in memory only
        if path not in _UNWRITABLE:  # once per file: a run saves after each race
            _UNWRITABLE.add(path)
            _LOG.warning("pyvae: cannot write the route cache %s (%s); routes are kept for this process only",
                         path, e)


_UNWRITABLE: set = set()  # cache files this process could not write (warned about once)


# NOTE: [Routes of a run]
# Routes compute the same function but round differently (NOTE: [Layer routes] in pyvae/ops/linear_act.py),
# so a training run is reproducible to the bit only if it runs the same route in every shape class. A
# resumed run does not by itself: its process races afresh any class the route cache lacks (a race judged
# disturbed is not cached; another cache directory; PYVAE_TUNE=force), and the continuation would drift from
# the uninterrupted run by rounding. So every route a process takes (cold rule, cache, race or pin) is noted
# by its key (``note``/``used``), ``pyvae.train`` writes them into each checkpoint with the machine key (under
# DDP on the CPU every rank's: each races its own), and resuming on the same machine key runs under
# ``pinned(routes)``: those routes first, for the run only.
_used: Dict[str, str] = {}
_pins: Dict[str, str] = {}


def note(key: str, route: str) -> None:
    """Records that this process runs ``route`` for the shape class ``key`` (NOTE: [Routes of a run])."""
    _used[key] = route


def used() -> Dict[str, str]:
    """Every route this process has taken, by key."""
    return dict(_used)


def run_routes() -> Dict[str, object]:
    """This process's machine key and routes (``used``) in plain JSON types, as a checkpoint holds them
    (NOTE: [Routes of a run]; ``torch.__version__`` is a str subclass that ``torch.load(weights_only=True)``
    refuses)."""
    return json.loads(json.dumps({"machine": machine_key(), "used": used()}))


def pin(key: str) -> Optional[str]:
    """The pinned route of ``key`` (NOTE: [Routes of a run]), or None."""
    return _pins.get(key) if _pins else None


class pinned:
    """Context manager: ``routes`` (key -> route) are taken before any cached, measured or cold-rule route
    while it is active; the caller also clears the in-process route tables (``pyvae.ops.forget_routes``) on
    entry and exit, so that the pins apply and do not outlive the block."""

    def __init__(self, routes: Dict[str, str]):
        self.routes = {str(k): str(v) for k, v in dict(routes).items()}

    def __enter__(self):
        self._saved = dict(_pins)
        _pins.update(self.routes)
        return self

    def __exit__(self, *exc):
        _pins.clear()
        _pins.update(self._saved)
        return False


def lookup(key: str) -> Optional[str]:
    """The measured route of ``key``, or None when it has not been measured (or tuning is off)."""
    r = _routes().get(key)
    return None if r is None else r["choice"]


# NOTE: [Early stop]
# A fixed number of rounds spends time on races already decided: at B=100 on the paper's model, the
# 500->40 layer's torch route is 11-27% ahead of pyvae's after five rounds, and each candidate's four
# fastest calls lie within a few percent of its fastest. So after ``min_rounds`` interleaved rounds,
# and after every round from then on, the race is judged from each candidate's floor (its fastest call,
# m) and the spread of that floor (its k-th fastest call minus m, k = 4): noise on a shared machine only
# adds time, so a floor hit k times is a floor measured to within that spread.
# - A candidate is out when the leader (lowest m) beats it by more than the larger of the two spreads
#   and more than the tie margin: the leader's k fastest calls all beat its fastest one, and the gap is
#   no tie. An out candidate is no longer timed (its m so far is reported); one left: it wins.
# - The race is over as a tie when every candidate left is within the tie margin of the leader and every
#   spread is under it: whichever ``decide`` picks (torch's route on a tie) is then within the margin,
#   plus the spread, of the best.
# Otherwise the rounds go on (the candidates left, interleaved, in rotating order) until ``max_rounds``,
# or ``budget_s`` once ``min_rounds`` are done: close routes and noisy timings (large spreads) are timed
# as long as before. k = 4 rather than 3: on synthetic timings with 15% noise and outliers (routes 5%
# apart, tests/test_tune.py) k = 3 picks a route more than 3% slower than the best in ~2% of the races,
# k = 4 in 0.5% (0.25% with the 10-round minimum below, at 57% of the calls), the fixed 25 rounds in under 0.1%. Those timings are independent
# from call to call; a shared machine's are not: another process takes a core for whole scheduler slices
# (ms), slowing whichever candidate runs then. Five rounds of the 20->500 layer at B=100 last ~5 ms,
# and in one `pyvae bench routes` run each on a loaded machine, that early stop picked routes 2-16%
# slower than the best in five of the 20 B=100 cases, the fixed rounds in none. So no verdict comes
# before ``min_s`` (25 ms, several slices) either: the small layers are timed as long as before (25
# rounds of ~1 ms take about that long), and the early stop saves where rounds are long (the 784->500
# and 500->784 layers at B=100: ~5 ms a round, 25 rounds took 110-150 ms). And none before 10 rounds: with
# 5, the full `pyvae bench routes` run of 2026-11-30 08:05Z (quiet machine) chose routes 3-16% slower
# than the best in 4 of the 40 cases, all at B=1024, where a round of the two wide layers takes ~40 ms.
TIE = 0.01  # routes within 1% are a tie (``decide`` then takes the first candidate)


# NOTE: [Wide margins]
# The ten-round minimum of NOTE: [Early stop] is what a close race needs, and a race is not always close.
# At large batch one round of a wide layer's routes takes long (B=8192, the 784->500 layer: ~0.4 s for its
# four routes on the model 207 host; the first epoch of `pyvae train --batch-size 8192` spent ~20 s racing),
# and some candidates lose by a factor there: the one-thread route (pyvae-1t) runs on half the cores, and
# on the Zen 5 host MKL's products take twice oneDNN's time. So before ``min_rounds``, from round
# ``WIDE_ROUNDS`` on (and not before ``min_s``, as for every verdict), a candidate is out when its fastest
# call is more than ``1 + WIDE`` times the leader's fastest. Noise only adds time: a candidate's fastest
# call bounds its cost from above, and the leader's cost is at most its fastest call. So the best route
# can be put out only if every one of its calls so far was slowed by more than half. (The leader's slowest
# call, tried first as the bound, let one slow call of the leader keep everyone in: at B=8192 the first
# calls of every route fault in fresh pages, and the 2x losers were timed all ten rounds.) In 4000
# synthetic races under the noise of NOTE: [Early stop] (15% exponential, one call in ten slowed by up to
# 100%; tests/test_tune.py), three routes 5% apart and a fourth at twice the best: the fourth was out after
# three rounds in every race, the calls fell 13%, and the route picked was more than 3% slower than the
# best in 7 races, against 9 without the rule; with the fourth at 1.6x the best, it was out after three
# rounds in 93% of the races (before the tenth in 99.8%), with 9 such picks. The rule only drops
# candidates; the race still ends only as NOTE: [Early stop] says, or when one candidate is left. It
# compares fastest calls, so it serves the default rule only: under
# ``stat="median"`` a route fast now and then has the best floor and may not have the best median (NOTE:
# [Median rule]), and a steady route 1.5x its floor could still be the better one per call.
WIDE = 0.5
WIDE_ROUNDS = 3


def wide_out(times: Dict[str, List[float]], wide: Optional[float] = None) -> List[str]:
    """The candidates left after NOTE: [Wide margins], in their given order: those whose fastest call is
    at most ``1 + wide`` (default ``WIDE``) times the fastest call of all."""
    best = min(min(v) for v in times.values())
    bound = best * (1 + (WIDE if wide is None else wide))
    return [n for n, v in times.items() if min(v) <= bound]


# NOTE: [Median rule]
# The tuner compares each route's fastest call; `pyvae bench routes` compares medians (a training step
# pays the typical call, not the best one). The two disagree where a route's own time varies from call
# to call: a route fast in a quarter of its calls and slow in the rest has the best floor and a worse
# median than a steady route (tests/test_tune.py: the fastest call picks it in 185-188 of 200 simulated
# races, the median in 1-2). ``measure(stat="median")`` decides on the middle call instead, with the early
# stop judged on the median's order-statistic interval (about one standard error either side; a
# candidate is out when the two intervals are apart, and beyond the tie margin). Measured before making
# it the default, and not made it:
# - `pyvae bench routes --study 3` reruns the tuner's race three times per rule on each case's own
#   candidates and reads every pick against the benchmark's medians. Two full runs (80 cases, 240 picks
#   per rule; 2026-11-30 09:05Z loaded, 09:14Z quiet): fastest call 15 picks over 1.03, 7 of them beyond
#   the benchmark's noise (NOTE: [Route noise] in pyvae/benchmarks/routes.py); median 13 and 9. No
#   difference that the runs resolve: on this machine's routes the misses are moments (the tuner times
#   10-25 rounds once; a near-tie read then can differ from the benchmark's read a second later), not the
#   statistic.
# - Where noise only adds time (the synthetic races of NOTE: [Early stop]: 15% exponential noise plus
#   outliers, routes 5% apart), the median picks a route more than 3% slower in 333 of 2000 races (the
#   fastest call: 5) and spends 72% of the calls of 25 full rounds (57%): the median of 10-25 calls keeps
#   the noise that the floor filters out. On a loaded machine (another process on one of the 2 cores),
#   the median of every route of the 500->40 layer read ~40 ms against a 0.2 ms floor: it measures the
#   load.
# - `pyvae tune --batch-size 100 --force` on a quiet machine: 1.93-2.19 s wall with the fastest call
#   (0.29-0.32 s of it measuring), 1.83-1.89 s with the median (0.25-0.29 s); loaded, both took 3.6-8.4 s.
# - A blend tried in simulation and not kept (the fastest call, unless the medians put its route behind beyond both
#   intervals) picked the slower route in 56 of 2000 noise-only races and the steady route in only 148 of
#   200 of the races above: worse than either rule on the other's ground.
# So ``STAT`` stays "min"; "median" stays selectable for further study.
STAT = "min"  # what ``measure`` compares by default (NOTE: [Median rule])


def _floor(times: List[float], k: int) -> Tuple[float, float]:
    """(fastest call, k-th fastest call minus the fastest) of one candidate's timings."""
    s = sorted(times)
    return s[0], s[min(k, len(s)) - 1] - s[0]


def _middle(times: List[float]) -> Tuple[float, float]:
    """(median, half-width of its order-statistic interval) of one candidate's timings (NOTE: [Median
    rule]): the interval runs from the ceil(n/2 - sqrt(n)/2)-th to the floor(n/2 + 1 + sqrt(n)/2)-th
    fastest call (1-based; about one standard error either side: n = 10, the 4th to 7th fastest; n = 25,
    the 10th to 16th), and the half-width is the larger of its two sides."""
    s = sorted(times)
    n = len(s)
    med = s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
    lo = max(math.ceil(n / 2 - math.sqrt(n) / 2), 1) - 1
    hi = min(math.floor(n / 2 + 1 + math.sqrt(n) / 2), n) - 1
    return med, max(med - s[lo], s[hi] - med)


STATS = ("min", "median")


def race(times: Dict[str, List[float]], tie: float = TIE, k: int = 4, stat: str = "min") -> Tuple[List[str], bool]:
    """Judges interleaved timings so far (NOTE: [Early stop], NOTE: [Median rule]): the candidates still in
    the race, in their given order, and whether the race is over (one left, or a measured tie)."""
    if stat == "min":
        est = {n: _floor(v, k) for n, v in times.items()}
        beyond = max  # noise only adds: the leader's k fastest calls all beat the other's fastest
    elif stat == "median":
        est = {n: _middle(v) for n, v in times.items()}
        beyond = lambda a, b: a + b  # noqa: E731  two intervals, apart
    else:
        raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
    lead = min(est, key=lambda n: est[n][0])
    m_lead, s_lead = est[lead]
    left = [n for n, (m, s) in est.items()
            if n == lead or m - m_lead <= max(beyond(s_lead, s), tie * m_lead)]
    tied = all(est[n][0] <= m_lead * (1 + tie) and est[n][1] <= tie * est[n][0] for n in left)
    return left, len(left) == 1 or tied


def _summary(times: List[float], stat: str) -> float:
    return min(times) if stat == "min" else _middle(times)[0]


def measure(candidates: Dict[str, Callable[[], None]], budget_s: float = 0.3, min_rounds: int = 10,
            max_rounds: int = 25, min_s: float = 0.025, stat: Optional[str] = None,
            raw: Optional[Dict[str, List[float]]] = None, outcome: Optional[dict] = None) -> Dict[str, float]:
    """Seconds per call of each candidate, timed interleaved after one warm-up call each, for at least
    ``min_rounds`` rounds and ``min_s`` seconds and then until the race is decided (NOTE: [Early stop]),
    ``max_rounds`` are done or ``budget_s`` is spent; a candidate beaten by a wide margin is dropped
    sooner (NOTE: [Wide margins]). ``stat`` (default ``STAT``): "min", the fastest
    call (on a shared machine other processes only ever add time, so the fastest call estimates what the
    route itself costs), or "median", the middle call (what a run of many calls pays per call where a
    route's own time varies from call to call; NOTE: [Median rule]). ``raw``, when given, receives each
    candidate's timings (seconds, in the order taken); ``outcome``, when given, receives ``decided`` (whether the
    rule of NOTE: [Early stop] has a verdict on the timings taken, when the race ended or at its end) and
    ``rounds``."""
    stat = stat or STAT
    if stat not in STATS:
        raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
    for fn in candidates.values():
        fn()
    times: Dict[str, List[float]] = {n: [] for n in candidates}
    left = list(candidates)
    start = time.perf_counter()
    r = 0
    over = False
    while r < max_rounds and (r < min_rounds or time.perf_counter() - start < budget_s):
        for name in left[r % len(left):] + left[:r % len(left)]:
            t = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - t)
        r += 1
        if time.perf_counter() - start < min_s:
            continue
        if r >= min_rounds:
            left, over = race({n: times[n] for n in left}, stat=stat)
        elif r >= WIDE_ROUNDS and len(left) > 1 and stat == "min":  # NOTE: [Wide margins]
            left = wide_out({n: times[n] for n in left})
            over = len(left) == 1
        if over:
            break
    if raw is not None:
        raw.update({n: list(v) for n, v in times.items()})
    if outcome is not None:
        if not over and r:  # stopped by max_rounds or the budget (or before min_s): judged once at the end
            over = race({n: times[n] for n in left}, stat=stat)[1]
        outcome.update(decided=over, rounds=r)
    return {n: _summary(v, stat) for n, v in times.items()}


def choose(ms: Dict[str, float]) -> str:
    """The route ``decide`` takes from measured seconds per call (in candidate order): the fastest, or
    the first candidate (torch's route) when it is within ``TIE`` of the fastest."""
    names = list(ms)
    best = min(names, key=lambda n: ms[n])
    return names[0] if ms[names[0]] <= ms[best] * (1 + TIE) else best


def _busy() -> bool:
    """True when other processes keep the CPUs busy (1-minute load above 1.5x the core count): a route
    measured then is used by this process but not written to the cache."""
    try:
        return os.getloadavg()[0] > 1.5 * (os.cpu_count() or 1)
    except OSError:
        return False


# NOTE: [Disturbed races]
# A race timed while another process shares the cores is not a measurement of the routes: on this 2-core
# VM a competing 2-thread job made the paper's layers 3-10x slower and the race cached garbage (500->40:
# 20 ms against 0.2 ms), while the 1-minute load average (``_busy``) still read 1.5-2.3, under its bar.
# What tells is the time this process's threads spent runnable but waiting for a CPU (Linux's per-thread
# run delay, the second field of /proc/self/task/*/schedstat), summed over its threads, against the race's
# wall time: undisturbed, 0.001-0.012 here, whether OpenMP's idle workers spin or sleep
# (OMP_WAIT_POLICY=passive); with one competing job, 0.97-1.01. (The measuring thread's CPU time against
# wall time, tried first, cannot tell: it drops to 0.87-0.91 undisturbed when the workers sleep.) So a
# race whose threads waited for a CPU more than MAX_RUN_DELAY of its wall time is run again, up to RETRIES
# times; if every attempt was disturbed, its result is used by this process but not cached, as for a busy
# machine. Where the counters cannot be read (not Linux, no schedstat) races are not judged, and races
# under 5 ms of wall time are too short to judge. One more case reads as disturbed: torch set to more
# threads than the process gets cores, whose own threads then wait for each other's CPUs.
MAX_RUN_DELAY = 0.1
RETRIES = 2


def _run_delay() -> Optional[float]:
    """Seconds this process's threads have spent runnable but not running (None where unreadable)."""
    total, read = 0, False
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/schedstat") as f:
                total += int(f.read().split()[1])
                read = True
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total * 1e-9 if read else None


def _measure_undisturbed(candidates: Dict[str, Callable[[], None]],
                         outcome: Optional[dict] = None, **kw) -> Tuple[Dict[str, float], bool]:
    """``measure(candidates, **kw)``, run again while disturbed (NOTE: [Disturbed races]); returns the timings
    and whether the last attempt was still disturbed (``outcome``: as ``measure``'s, of the last attempt)."""
    for _ in range(1 + RETRIES):
        w0, d0 = time.perf_counter(), _run_delay()
        ms = measure(candidates, **kw) if outcome is None else measure(candidates, outcome=outcome, **kw)
        wall, d1 = time.perf_counter() - w0, _run_delay()
        if wall < 0.005 or d0 is None or d1 is None or d1 - d0 <= MAX_RUN_DELAY * wall:
            return ms, False
        _LOG.debug("pyvae: a route race's threads waited for a CPU %.0f%% of its %.3f s: another process shares "
                   "the CPUs; timing it again", 100 * (d1 - d0) / wall, wall)
    return ms, True


# NOTE: [Undecided races]
# A race whose timings have no verdict when it ends (NOTE: [Early stop]) is a close one, and on this shared
# VM a close race read once can come out either way: in stop 12's `pyvae bench routes` runs the worst
# misses (chosen route 1.15x and 1.35x the best) were such races, and the tuner's own rule, run three more
# times on the same candidates inside the benchmark, picked the benchmark's best in every rerun. So an
# undecided race is run again between its pick and the fastest other candidate, at another moment, and the
# picks vote; if the two disagree a third race between the same two decides (two of the three picks agree:
# the later races have only the two to pick from). A race decided by its rule is not repeated, so the
# cost falls on close races only: each extra race is another 10-25 rounds of two candidates. The cache
# entry keeps the picks ("votes").
CONFIRM = 3  # races at most for an undecided one


def decide(key: str, candidates: Dict[str, Callable[[], None]], *, what: str = "", **measure_kw) -> str:
    """Times ``candidates`` (name -> a call of that route on tensors of the key's shape), records and
    returns the fastest. Ties (within 1%) go to the first candidate, by convention torch's own route.
    A race disturbed by other processes is timed again, and not cached if it stays disturbed (NOTE:
    [Disturbed races]); a race that ends undecided is run again and its picks vote (NOTE: [Undecided races]).
    ``measure_kw`` go to ``measure`` (the statistic, the rounds, the budget), for every race of the decision."""
    outcome: dict = {}
    ms, disturbed = _measure_undisturbed(candidates, outcome, **measure_kw)
    best = choose({n: ms[n] for n in candidates})
    picks = [best]
    if outcome.get("decided") is False and len(candidates) > 1:  # NOTE: [Undecided races]
        other = min((n for n in candidates if n != best), key=lambda n: ms[n])
        pair = {n: candidates[n] for n in candidates if n in (best, other)}  # (candidate order: ties go first)
        while len(picks) < CONFIRM and not (len(picks) == 2 and picks[0] == picks[1]):
            ms_k, dist_k = _measure_undisturbed(pair, **measure_kw)
            disturbed = disturbed or dist_k
            picks.append(choose(ms_k))
        best = max(picks, key=picks.count)  # the majority: two of two, or two of three
    busy = disturbed or _busy()
    _routes()[key] = {"choice": best, "ms": {n: round(v * 1e3, 4) for n, v in ms.items()}, "what": what,
                      "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "busy": busy}
    if len(picks) > 1:
        _routes()[key]["votes"] = picks
    if mode() != "off" and not busy:
        _save()
    if not _state.get("announced"):
        _state["announced"] = True
        _LOG.info("pyvae: measuring the fastest route of each new layer or row-op shape on this machine (once per shape%s; "
                  "pyvae tune --show lists them, PYVAE_TUNE=off turns this off)",
                  ", not cached while the machine is busy" if busy else f", cached in {cache_path()}")
    _LOG.debug("pyvae: route for %s: %s (%s)%s", what or key, best,
               ", ".join(f"{n} {v * 1e3:.3f} ms" for n, v in ms.items()),
               "; the machine was busy: not cached" if busy else f"; cached in {cache_path()}")
    return best


def entries() -> Dict[str, dict]:
    """Every route known to this process (measured now or read from the cache)."""
    return dict(_routes())


def clear() -> bool:
    """Forgets every route (this process and the cache file); True when a file was removed."""
    _state["routes"] = {}
    try:
        cache_path().unlink()
        return True
    except FileNotFoundError:
        return False


def reset_for_tests(mode_: Optional[str] = None) -> None:
    """Re-reads the environment (tests, ``pyvae tune``): forgets the in-memory routes and machine key."""
    _state.update(mode=mode_, routes=None, path=None, key=None, announced=False)


def log_to_stderr(detail: bool = False) -> None:
    """Shows that routes are being measured (one line; the CLI turns this on), and with ``detail`` each
    decision with its timings (``pyvae tune``)."""
    if not any(getattr(h, "_pyvae", False) for h in _LOG.handlers):
        h = logging.StreamHandler(sys.stderr)
        h._pyvae = True  # type: ignore[attr-defined]
        h.setFormatter(logging.Formatter("%(message)s"))
        _LOG.addHandler(h)
        _LOG.propagate = False
    _LOG.setLevel(logging.DEBUG if detail else logging.INFO)

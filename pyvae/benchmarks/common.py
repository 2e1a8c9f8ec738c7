"""Shared plumbing for pyvae's benchmarks: process setup, timing, memory, machine info, output.

Every ``bench/bench_<family>.py`` script builds its cases with ``setup_<op>(B)`` factories and hands
each provider's forward callable to :func:`measure_case`, which times the providers interleaved
(one call each per repetition round, in a fresh random order, so machine noise hits all of them
alike and none always runs after the same one) and reports
median / 20th / 80th percentile in milliseconds plus the peak memory of one call.

Results are appended as one JSON object per case to ``bench/results/<family>.jsonl``; the same rows
render as the markdown table that goes into ``bench/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..cli import nonneg_float, nonneg_int, pos_float, pos_int  # noqa: F401  (argument types, used as C.pos_int)

if TYPE_CHECKING:  # torch is imported lazily: --malloc may re-exec the process before it is needed
    import torch

PROVIDERS = ("torch-eager", "torch-compile", "pyvae")
MODES = ("forward", "backward", "full")

# glibc serves allocations above the (dynamic) mmap threshold with a fresh mmap and returns them to
# the OS on free, so every large tensor is page-faulted again on first touch (10-70 ms for 51 MB
# here). These tunables keep freed memory in the heap for reuse, as a long training run would.
REUSE_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4000000000"
_MALLOC_MARK = "PYVAE_BENCH_MALLOC"


# ----------------------------------------------------------------------------- argument types
# argparse ``type=`` checks for the benchmarks' numbers, the same as every pyvae command's (pyvae/cli.py): a
# bad value stops at parse time with argparse's "error: argument --batch: expected ..." (exit status 2),
# before any re-exec, timing or output file. The positive/non-negative ones are pyvae/cli.py's (imported
# above); the seed is the benchmarks' own.
def seed_int(s: str) -> int:
    """An integer torch's generators take as a seed: in [-2**63, 2**64) (outside, manual_seed fails with
    "Overflow when unpacking long long")."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {s!r}") from None
    if not -2 ** 63 <= v < 2 ** 64:
        raise argparse.ArgumentTypeError(f"expected an integer seed in [-2**63, 2**64), got {s}")
    return v


# ----------------------------------------------------------------------------- process setup
def add_common_args(p: argparse.ArgumentParser, extra_providers: Sequence[str] = ()) -> None:
    """The arguments every benchmark family takes; ``extra_providers`` are opt-in (not in the default)."""
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--providers", nargs="+", choices=PROVIDERS + tuple(extra_providers), default=list(PROVIDERS))
    p.add_argument("--reps", type=pos_int, default=None,
                   help="fixed repetitions per case (default: adaptive, 15..200 by case cost)")
    p.add_argument("--target-s", type=pos_float, default=1.5,
                   help="adaptive reps: aim at about this many seconds for the slowest provider")
    p.add_argument("--threads", type=pos_int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--malloc", default="default", choices=["default", "reuse", "both"],
                   help="glibc malloc: 'default', or 'reuse' (re-exec with GLIBC_TUNABLES="
                        f"{REUSE_TUNABLES}), or 'both' (run the two one after the other)")
    p.add_argument("--omp-wait", default="unset", choices=["spin", "active", "passive", "unset"],
                   help="idle OpenMP threads: 'unset' (default: what a user gets) leaves the runtime's "
                        "default; 'spin' sets GOMP_SPINCOUNT=30000000, i.e. spin for up to ~0.1 s before "
                        "sleeping (a tuned environment); 'active'/'passive' set OMP_WAIT_POLICY (see apply_env)")
    p.add_argument("--quiet-wait", type=nonneg_float, default=20.0,
                   help="before each case, wait up to this many seconds for other processes to use "
                        "< 10%% of the CPUs (0: don't wait); their share while timing is recorded")
    p.add_argument("--block", type=pos_int, default=BLOCK,
                   help="calls a provider runs back to back per round: the first untimed (it brings the "
                        "provider's own weights and buffers back into cache, as in a training loop), the rest "
                        "timed; 1: one timed call per provider per round (NOTE: [Blocks of calls]) "
                        f"(default {BLOCK})")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--out", default=None, help="JSONL file to append results to")


_OMP_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
_STARTUP_OMP_ENV = {k: os.environ.get(k) for k in _OMP_KEYS}  # as this process started


def apply_env(args: argparse.Namespace) -> None:
    """Sets the OpenMP / inductor environment; must run before torch (and libgomp) is loaded.

    Idle OpenMP workers spin briefly, then sleep. On this VM a sleeping worker's vCPU halts, and
    waking it for the next parallel region costs a host scheduling slice: a 0.08 ms op measured at
    5-35 ms when calls are a few ms apart (the Python work between timed calls is enough). A
    training loop runs op after op with its workers hot; to measure that steady state for every
    provider alike, 'spin' (GOMP_SPINCOUNT=30M, libgomp, which torch's wheel and pyvae share) keeps
    workers spinning across the gaps between calls but lets them sleep during longer pauses;
    'active' (OMP_WAIT_POLICY) spins forever, which also burns a core while other processes run.
    TORCHINDUCTOR_COMPILE_THREADS=1 compiles in-process, so no idle pool of compile workers
    competes for the 2 cores with the timed calls.
    """
    policy = getattr(args, "omp_wait", "unset")
    for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        os.environ.pop(k, None)
    if policy == "spin":
        os.environ["GOMP_SPINCOUNT"] = "30000000"
    elif policy in ("active", "passive"):
        os.environ["OMP_WAIT_POLICY"] = policy.upper()
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    changed = any(os.environ.get(k) != _STARTUP_OMP_ENV[k] for k in _OMP_KEYS)
    if changed and "torch" in sys.modules and os.environ.get(_MALLOC_MARK) is not None:
        # A process that will not re-exec itself (apply_malloc) keeps the runtime it loaded.
        print("warning: torch was imported before apply_env; the OpenMP settings may not apply", file=sys.stderr)


def _env_for(setting: str) -> dict[str, str]:
    env = dict(os.environ)
    env[_MALLOC_MARK] = setting
    if setting == "reuse":
        env["GLIBC_TUNABLES"] = REUSE_TUNABLES
    else:
        env.pop("GLIBC_TUNABLES", None)
    return env


def apply_malloc(args: argparse.Namespace) -> None:
    """Makes the process run under the asked glibc malloc setting; re-execs itself if needed.

    GLIBC_TUNABLES is read once when the process starts, so it cannot be changed in-process:
    'reuse' and 'default' re-exec (os.execve) with the variable set or removed. 'both' runs the
    script twice as child processes (default, then reuse) and exits with the worse status.
    Calls :func:`apply_env` first, so the OpenMP/inductor environment is set before torch loads.
    """
    apply_env(args)
    if args.malloc == "both":
        rc = 0
        for setting in ("default", "reuse"):
            argv = _replace_flag(sys.argv, "--malloc", setting)
            print(f"\n### malloc={setting}\n", flush=True)
            rc = max(rc, subprocess.call(_python_argv(argv), env=_env_for(setting)))
        sys.exit(rc)
    want = REUSE_TUNABLES if args.malloc == "reuse" else None
    have = os.environ.get("GLIBC_TUNABLES")
    if os.environ.get(_MALLOC_MARK) == args.malloc and have == want:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    argv = _python_argv(sys.argv)
    os.execve(argv[0], argv, _env_for(args.malloc))


def _python_argv(argv: Sequence[str]) -> list[str]:
    """The command that runs this benchmark again: a script (bench/*.py, the ``pyvae`` console
    script) directly, ``python -m pyvae`` when started that way."""
    if os.path.basename(argv[0]) == "__main__.py":
        return [sys.executable, "-m", "pyvae", *argv[1:]]
    return [sys.executable, *argv]


def default_out(family: str) -> str:
    """Where results are appended by default: ``bench/results/<family>.jsonl`` of the source
    checkout pyvae runs from, else of the working directory (``$PYVAE_BENCH_RESULTS`` overrides)."""
    env = os.environ.get("PYVAE_BENCH_RESULTS")
    if env:
        return os.path.join(env, family + ".jsonl")
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    base = checkout if os.path.isdir(os.path.join(checkout, "bench")) else os.getcwd()
    return os.path.join(base, "bench", "results", family + ".jsonl")


def _replace_flag(argv: Sequence[str], flag: str, value: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == flag:
            skip = True
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return out + [flag, value]


_QUIET_WAIT_S = 0.0
BLOCK = 4
_BLOCK = BLOCK


def setup_torch(args: argparse.Namespace) -> None:
    import torch

    global _QUIET_WAIT_S, _BLOCK
    _QUIET_WAIT_S = getattr(args, "quiet_wait", 0.0)
    _BLOCK = getattr(args, "block", BLOCK)
    if _BLOCK < 1:  # (the parser checks --block too; this covers namespaces built in code)
        sys.exit(f"--block must be >= 1, got {_BLOCK}")
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no GPU")


# ----------------------------------------------------------------------------- machine info
def run_family(args: argparse.Namespace, family: str, run) -> tuple[list, dict, str]:
    """The start of every benchmark's main: malloc/OpenMP setup (may re-exec), torch setup, then
    ``run(args)``; appends the rows to ``args.out`` (default bench/results/<family>.jsonl).
    Returns (rows, machine info, output path)."""
    apply_malloc(args)  # sets OMP_WAIT_POLICY etc.; may re-exec with GLIBC_TUNABLES set or removed
    setup_torch(args)
    out = args.out or default_out(family)
    rows = run(args)
    append_jsonl(out, rows)
    return rows, (rows[0]["machine"] if rows else machine_info(args)), out


def git_rev() -> str | None:
    """The checkout's short commit, with "-dirty" when tracked files differ from it (None outside git)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        return (rev + ("-dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def thp_mode() -> str | None:
    """The system's transparent-huge-page mode ("always", "madvise", "never"), or None where unreadable."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text and "]" in text else None


def machine_info(args: argparse.Namespace) -> dict:
    import torch

    import pyvae
    from pyvae._tune import cpu_identity, cpu_model

    info = {
        "cpu_model": cpu_model(),  # the name with family, model and stepping (NOTE: [Which CPU] in pyvae/_tune.py)
        "cpu": cpu_identity(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyvae": getattr(pyvae, "__version__", None),
        "pyvae_cpu_arch": pyvae._C.cpu_arch() if hasattr(pyvae._C, "cpu_arch") else None,
        "pyvae_cuda_built": bool(getattr(pyvae._C, "cuda_built", False)),
        # which build ran: the tree's commit says little while pyvae is reinstalled from a dirty tree
        "pyvae_C_mtime": _dt.datetime.fromtimestamp(os.path.getmtime(pyvae._C.__file__), _dt.timezone.utc)
        .isoformat(timespec="seconds"),
        "git": git_rev(),
        "malloc": args.malloc,
        "glibc": platform.libc_ver()[1] or None,
        "malloc_env": {k: v for k, v in os.environ.items()
                       if k == "GLIBC_TUNABLES" or k.startswith("MALLOC_")},
        # large fresh outputs of pyvae's kernels go on huge pages only in "madvise" or "always" mode (NOTE: [Huge
        # pages for fresh outputs] in csrc/cpu/pages.h); torch's THP_MEM_ALLOC_ENABLE puts all of torch's there
        "thp": thp_mode(),
        "thp_env": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "omp_wait": getattr(args, "omp_wait", None),
        "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_"))},
        "inductor_compile_threads": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS"),
        "device": args.device,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ----------------------------------------------------------------------------- timing
def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Step:
    """One provider in one mode: ``prepare()`` (untimed) then ``run(state)`` (timed).

    forward:  run = out = fwd()                       (autograd records the graph, as in training)
    backward: prepare computes out = fwd(); run = out.backward(grad)
    full:     run = out = fwd(); out.backward(grad)
    Leaf gradients are reset to None before every call, so each call does the same work (no
    accumulation into an existing .grad). The output is kept alive until after the timer stops.
    """

    def __init__(self, fwd: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor],
                 grad_out: torch.Tensor | None, mode: str):
        self.fwd, self.leaves, self.grad_out, self.mode = fwd, list(leaves), grad_out, mode

    def prepare(self):
        for t in self.leaves:
            t.grad = None
        if self.mode == "backward":
            return self.fwd()
        return None

    def run(self, state):
        if self.mode == "forward":
            return self.fwd()
        if self.mode == "backward":
            state.backward(self.grad_out)
            return state
        out = self.fwd()
        out.backward(self.grad_out)
        return out


def first_calls(fns: dict, args: tuple, leaves: dict, grad_out, mode: str = "full") -> tuple[dict, dict]:
    """One full (forward + backward; ``mode="forward"`` for an op without a gradient) call per provider, timed
    once: for torch-compile this is the compilation of its forward and backward graphs. Returns (Steps in
    ``mode``, first-call seconds). ``leaves`` maps each provider to the tensors whose .grad is reset before
    every call."""
    steps, seconds = {}, {}
    for p, fn in fns.items():
        step = Step(lambda fn=fn, a=args: fn(*a), leaves[p], grad_out, mode)
        t0 = time.perf_counter()
        step.run(step.prepare())
        seconds[p] = time.perf_counter() - t0
        steps[p] = step
    return steps, seconds


def in_mode(steps: dict, mode: str) -> dict:
    """The same providers' Steps in another mode (forward, backward or full)."""
    return {p: Step(s.fwd, s.leaves, s.grad_out, mode) for p, s in steps.items()}


def empty_on_huge_pages(shape, dtype):
    """``torch.empty(shape, dtype=dtype)`` on the CPU, advised before any store exactly as pyvae's kernels
    advise their large fresh outputs (the kernels' own code: NOTE: [Huge pages for fresh outputs] in
    csrc/cpu/pages.h; the same 4 MB threshold and PYVAE_HUGE_PAGES switch), for a memory floor measured on
    the same pages as pyvae's output."""
    import torch

    from pyvae import _gate

    t = torch.empty(shape, dtype=dtype)
    _gate.advise_huge_pages(t)
    return t


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _time_once(step: Step, device: str) -> float:
    state = step.prepare()
    _sync(device)
    t0 = time.perf_counter()
    keep = step.run(state)
    _sync(device)
    t1 = time.perf_counter()
    del keep, state
    return (t1 - t0) * 1e3


def peak_memory_bytes(step: Step, device: str) -> int | None:
    """Peak bytes of tensor memory allocated during one call, above what was live before it.

    CUDA: torch.cuda.max_memory_allocated. CPU: the allocation/free events of torch's CPU allocator
    recorded by torch.profiler(profile_memory=True) for one call (outside the timed runs), summed in
    time order; this covers every tensor torch allocates (eager ops, inductor buffers, pyvae's
    outputs and workspaces, which Python allocates with torch), not malloc calls made elsewhere.
    """
    import torch

    state = step.prepare()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        keep = step.run(state)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del keep, state
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    # Measured twice, the second one reported: a case's first profiled call gave identical code
    # 24.6 and 8.5 MB (the profiler warns that it misses frees of blocks allocated before it
    # started); the second calls agreed.
    for _ in range(2):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            keep = step.run(state)
        del keep, state
        state = step.prepare()
    del state
    try:
        events = prof.profiler.kineto_results.events()
        mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except AttributeError:  # profiler internals moved: report no number rather than a wrong one
        return None
    cur = peak = 0
    for _, nbytes in mem:
        cur += nbytes
        peak = max(peak, cur)
    return int(peak)


def _cpu_jiffies():
    """(busy jiffies of the whole machine, jiffies of this process), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        # /proc/stat cpu: user nice system idle iowait irq softirq steal ...; busy excludes idle+iowait
        return sum(v[:8]) - v[3] - v[4], int(own[11]) + int(own[12])
    except (OSError, ValueError, IndexError):
        return None


class ForeignLoad:
    """CPU used by other processes while a case ran, as a fraction of the machine (0..1)."""

    def __enter__(self):
        self.j0, self.t0 = _cpu_jiffies(), time.monotonic()
        return self

    def __exit__(self, *exc):
        j1, dt = _cpu_jiffies(), time.monotonic() - self.t0
        if self.j0 is None or j1 is None or dt < 0.3:  # jiffies are 10 ms: too coarse below that
            self.value = None
        else:
            hz = os.sysconf("SC_CLK_TCK")
            busy = (j1[0] - self.j0[0]) - (j1[1] - self.j0[1])
            self.value = min(1.0, max(0.0, busy / hz / dt / (os.cpu_count() or 1)))
        return False


def wait_quiet(max_wait_s: float, threshold: float = 0.10, window_s: float = 0.5) -> float | None:
    """Waits (up to max_wait_s) until other processes use < threshold of the CPUs; returns their load."""
    deadline = time.monotonic() + max_wait_s
    while True:
        with ForeignLoad() as fl:
            time.sleep(window_s)
        if fl.value is None or fl.value < threshold or time.monotonic() >= deadline:
            return fl.value


def _timed_rounds(steps: dict[str, Step], device: str, reps: int | None, target_s: float,
                  min_reps: int, max_reps: int, block: int = 1):
    """Warm-up, rep calibration and the interleaved timing; returns (times, foreign CPU share).

    ``block`` > 1: each provider runs ``block`` calls per round, an untimed one and then ``block - 1``
    timed ones (NOTE: [Blocks of calls])."""
    names = list(steps)
    load = ForeignLoad().__enter__()  # spans warm-up and timing: long enough for 10 ms jiffies
    for name in names:  # warm up this mode (caches, allocator, lazy init): >= 3 calls and >= 0.1 s
        spent, n = 0.0, 0
        while n < 3 or (spent < 100.0 and n < 50):
            spent += _time_once(steps[name], device)
            n += 1
    if reps is None:
        slowest = max(percentile([_time_once(steps[n], device) for _ in range(3)], 50) for n in names)
        reps = int(min(max_reps, max(min_reps, round(target_s * 1e3 / max(slowest, 1e-3)))))
    timed = max(1, block - 1)
    times: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    gc_was = gc.isenabled()
    gc.disable()
    try:
        # A fresh random order every round: a fixed cyclic order gives each provider the same
        # predecessor every time, and at small sizes what ran just before matters (operands left in
        # cache, the OpenMP pool's state after a compiled kernel): measured 5-9% at B=100 between two
        # providers running identical code. Seeded, so a rerun uses the same orders.
        rng = random.Random(0)
        for done in range(0, reps, timed):
            order = names[:]
            rng.shuffle(order)
            for name in order:
                if block > 1:
                    _time_once(steps[name], device)
                for _ in range(min(timed, reps - done)):
                    times[name].append(_time_once(steps[name], device))
    finally:
        if gc_was:
            gc.enable()
    load.__exit__(None, None, None)
    return times, load.value


# NOTE: [Blocks of calls]
# One call per provider per round (block 1) puts every timed call right after another provider's, whose
# weights, optimizer state and buffers then fill the caches. At the paper's B=100 a training step's working
# set (four layers' weights, gradients and Adam moments, ~13 MB for 784-500-20) and the three providers'
# together (~40 MB) exceed this VM's 32 MiB L3: each timed step started from a cold L3, and the fused Adam
# step alone measured 0.35 ms warm against 1.26 ms cold. No training loop runs that way: it runs its own
# step again and again. So by default each provider runs a block of calls per round: one untimed call that
# brings its own data back into cache, then block - 1 timed calls; rounds still shuffle the providers'
# order. ``--block 1`` gives the earlier cold-cache interleaving (a lower bound for a model sharing the
# machine's caches with others). No run has yet compared the two in one process: bench/RESULTS.md (stop 12)
# has a --block 1 run, in another process.


def measure_case(steps: dict[str, Step], *, device: str, reps: int | None, target_s: float,
                 min_reps: int = 15, max_reps: int = 200, memory: bool = True,
                 quiet_wait_s: float | None = None, retries: int = 2,
                 busy_threshold: float = 0.15, keep_times: bool = False,
                 block: int | None = None) -> dict[str, dict]:
    """Times every provider's step, interleaved (a block of calls each per round, in random order:
    ``block`` defaults to --block via setup_torch, NOTE: [Blocks of calls]); returns per-provider
    statistics.

    With 2 threads on 2 cores, any other busy process stalls OpenMP regions for whole scheduler
    slices. So before timing, wait up to quiet_wait_s (default: --quiet-wait, via setup_torch) for
    other processes to go quiet; and if they used more than busy_threshold of the CPUs while the
    case ran, wait and measure it again (at most ``retries`` times). The share of the last attempt
    is reported as ``foreign_cpu`` and the number of attempts as ``attempts``. ``keep_times`` adds
    each provider's calls (ms; round by round, the same number per round for every provider) as ``times_ms``.
    """
    wait = _QUIET_WAIT_S if quiet_wait_s is None else quiet_wait_s
    attempts = 0
    while True:
        attempts += 1
        if wait > 0:
            wait_quiet(wait)
        times, foreign = _timed_rounds(steps, device, reps, target_s, min_reps, max_reps,
                                       _BLOCK if block is None else block)
        if foreign is None or foreign <= busy_threshold or attempts > retries:
            break
    out = {}
    for name, ts in times.items():
        out[name] = {
            "median_ms": percentile(ts, 50),
            "p20_ms": percentile(ts, 20),
            "p80_ms": percentile(ts, 80),
            "min_ms": min(ts),
            "mean_ms": sum(ts) / len(ts),
            "reps": len(ts),
            "peak_mem_bytes": peak_memory_bytes(steps[name], device) if memory else None,
            # CPU share other processes used while this case was timed (same for all providers)
            "foreign_cpu": foreign,
            "attempts": attempts,
        }
        if keep_times:
            out[name]["times_ms"] = list(ts)
    return out


def ratios(res: dict[str, dict]) -> dict:
    """Speedups of pyvae from the medians of the same run: baseline_ms / pyvae_ms (>1: pyvae faster)."""
    r = {}
    if "pyvae" in res:
        p = res["pyvae"]["median_ms"]
        for base, key in (("torch-eager", "speedup_vs_eager"), ("torch-compile", "speedup_vs_compile")):
            if base in res and p > 0:
                r[key] = res[base]["median_ms"] / p
    return r


# ----------------------------------------------------------------------------- output
def append_jsonl(path: str, rows: Sequence[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _fmt_ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.4f}" if x < 0.1 else f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def markdown_tables(rows: Sequence[dict], providers: Sequence[str] = PROVIDERS) -> str:
    """Time table (medians, ms, with p20-p80) and peak-memory table (MB) for rows of one run."""
    providers = [p for p in PROVIDERS if p in providers] + [p for p in providers if p not in PROVIDERS]
    provs = [p for p in providers if any(p in r["results"] for r in rows)]
    head = ["op", "mode", "B"] + [f"{p} ms" for p in provs]
    if "pyvae" in provs:
        head += [x for b, x in (("torch-eager", "eager/pyvae"), ("torch-compile", "compile/pyvae"))
                 if b in provs]
    head.append("other CPU")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["op"], r["mode"], str(r["B"])]
        for p in provs:
            s = r["results"].get(p)
            cells.append("-" if s is None else
                         f"{_fmt_ms(s['median_ms'])} ({_fmt_ms(s['p20_ms'])}-{_fmt_ms(s['p80_ms'])})")
        if "pyvae" in provs:
            if "torch-eager" in provs:
                cells.append(_fmt_x(r["ratios"].get("speedup_vs_eager")))
            if "torch-compile" in provs:
                cells.append(_fmt_x(r["ratios"].get("speedup_vs_compile")))
        loads = [s.get("foreign_cpu") for s in r["results"].values() if s.get("foreign_cpu") is not None]
        cells.append(f"{100 * loads[0]:.0f}%" if loads else "-")
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines)
    if any(s.get("peak_mem_bytes") is not None for r in rows for s in r["results"].values()):
        head = ["op", "mode", "B"] + [f"{p} MB" for p in provs]
        mem = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for r in rows:
            cells = [r["op"], r["mode"], str(r["B"])]
            for p in provs:
                b = r["results"].get(p, {}).get("peak_mem_bytes")
                cells.append("-" if b is None else f"{b / 1e6:.2f}")
            mem.append("| " + " | ".join(cells) + " |")
        out += "\n\nPeak memory of one call (MB, tensor bytes above what was live before the call):\n\n"
        out += "\n".join(mem)
    return out

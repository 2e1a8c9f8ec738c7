"""The AEVB training loop (Kingma & Welling 2013, Algorithm 1) with checkpoints, resume and DDP.

``train(TrainConfig(...))`` loads the data, builds the ``VAE``, and for each minibatch of M examples
(paper: M = 100) maximizes the SGVB estimate of the ELBO with Adagrad (the paper) or Adam. Each epoch
it evaluates the test ELBO and writes ``metrics.jsonl``/``metrics.csv`` and ``checkpoint.pt`` to the
run directory; after training it draws the plots (``pyvae.plots``).

Reproducibility: every random draw of training derives from ``(seed, epoch)`` (data order) or
``(seed, step)`` (binarization, eps), never from a global RNG stream. So a run resumed from any
checkpoint, also one written by Ctrl-C in the middle of an epoch, continues exactly as the
uninterrupted run; and N data-parallel processes at global batch B see exactly the data and eps of one
process at batch B (their results differ only by float summation order).

Multi-process: under ``torchrun`` (``WORLD_SIZE > 1``) or when ``torch.distributed`` is already
initialized, the model is wrapped in ``DistributedDataParallel`` (gloo on CPU, nccl on CUDA), each
process takes its slice of every global batch, and rank 0 alone logs, checkpoints and plots.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.distributed as dist

from . import _tune, checkpoint, tuning
from .data import (BINARIZE, DATASETS, DataSplits, ShardedBatches, check_seed, load_dataset, mix_seed,
                   resolve_binarize)
from .evaluation import PRECISIONS, autocast, evaluate
from .models import ESTIMATORS, LIKELIHOODS, VAE

__all__ = ["TrainConfig", "TrainResult", "train", "build_config", "load_toml", "METRIC_KEYS", "RESUME_OVERRIDABLE",
           "NonFiniteLossError"]

OPTIMIZERS = ("adam", "adagrad")
METRIC_KEYS = ("epoch", "step", "samples_seen", "train_elbo", "test_elbo", "kl", "recon", "samples_per_s", "wall_s")
RESUME_OVERRIDABLE = ("epochs", "device", "progress", "plots", "tensorboard", "threads", "resume", "out", "on_nonfinite")


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class TrainConfig:
    """Everything a run depends on; the CLI flags and the TOML config file have the same keys.

    Attributes:
        dataset: one of ``pyvae.data.DATASETS`` (default: the embedded MNIST-5k).
        data_dir: directory of the data files (IDX, frey_rawface.mat); default ``$PYVAE_DATA``.
        binarize: "dynamic", "static", "none", or "auto" (dynamic for Bernoulli, none for the
            continuous Bernoulli and the Gaussian).
        limit: use only ``limit`` train and ``limit`` test examples, a fixed random subset of each (NOTE:
            [Limited splits] in pyvae/data.py).
        epochs: passes over the training set.
        batch_size: M, the global minibatch size (paper: 100).
        latent: z_dim (paper's MNIST: 20 among 3..200).
        hidden: hidden units per layer (paper: 500 for MNIST, 200 for Frey Face).
        layers: hidden layers in encoder and decoder (paper: 1).
        activation: hidden activation (paper: tanh).
        likelihood: "bernoulli", "continuous-bernoulli" (grey levels in [0, 1]) or "gaussian".
        estimator: "analytic" (SGVB B) or "mc" (SGVB A).
        samples: L, draws of z per datapoint (paper: 1).
        init: "default" (PyTorch) or "paper" (N(0, 0.01^2)).
        optimizer: "adam" or "adagrad" (the paper's).
        lr: learning rate.
        weight_decay: L2 coefficient, or "prior" for the paper's N(0, I) prior on the parameters
            (MAP): the objective is the mean per-datapoint ELBO, so the prior weighs 1 / N_train.
        kl_warmup: epochs over which the KL weight rises linearly from 0 to 1 (0: off).
        grad_clip: max global gradient norm (None: off, the paper's setting).
        device: "cpu" or "cuda" (or "cuda:N").
        precision: "fp32", "bf16-mixed" (CPU and CUDA) or "fp16-mixed" (CUDA, with a grad scaler).
        seed: seeds initialization, data order, binarization and eps.
        out: run directory (default ``runs/<dataset>-<date>-<time>``).
        resume: a run directory or checkpoint to continue.
        eval_batch: test-set evaluation batch size.
        test_samples: L for the test ELBO.
        tensorboard: also log to ``<out>/tb`` (needs the ``tensorboard`` package).
        progress: show a tqdm progress bar (rank 0).
        plots: write the PNGs after training.
        threads: torch CPU threads (None: torch's default).
        on_nonfinite: what a step with a non-finite loss does: "stop" (raise ``NonFiniteLossError`` naming
            the step; the last checkpoint, written at the end of the last good epoch, stays intact) or
            "skip" (no update for that step; the count is logged). Either way an epoch none of whose steps
            was finite, or whose test ELBO is not finite, raises ``NonFiniteLossError`` before its checkpoint
            is written, so the last checkpoint always holds weights that gave a finite test ELBO.
    """

    dataset: str = "mnist-5k"
    data_dir: Optional[str] = None
    binarize: str = "auto"
    limit: Optional[int] = None
    epochs: int = 30
    batch_size: int = 100
    latent: int = 20
    hidden: int = 500
    layers: int = 1
    activation: str = "tanh"
    likelihood: str = "bernoulli"
    estimator: str = "analytic"
    samples: int = 1
    init: str = "default"
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: Union[float, str] = 0.0
    kl_warmup: float = 0.0
    grad_clip: Optional[float] = None
    device: str = "cpu"
    precision: str = "fp32"
    seed: int = 0
    out: Optional[str] = None
    resume: Optional[str] = None
    eval_batch: int = 1000
    test_samples: int = 1
    tensorboard: bool = False
    progress: bool = True
    plots: bool = True
    threads: Optional[int] = None
    on_nonfinite: str = "stop"

    def validate(self) -> "TrainConfig":
        """Checks every field; raises ValueError naming the field. Returns self."""
        def choice(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {list(options)}, got {getattr(self, name)!r}")

        def pos_int(name, allow_none=False, lo=1):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")

        choice("dataset", DATASETS)
        choice("binarize", BINARIZE + ("auto",))
        choice("likelihood", LIKELIHOODS)
        choice("estimator", ESTIMATORS)
        choice("optimizer", OPTIMIZERS)
        choice("precision", PRECISIONS)
        choice("init", ("default", "paper"))
        choice("activation", ("tanh", "relu", "sigmoid", "softplus"))
        for n in ("batch_size", "latent", "hidden", "layers", "samples", "eval_batch", "test_samples"):
            pos_int(n)
        pos_int("epochs", lo=0)
        pos_int("limit", allow_none=True)
        pos_int("threads", allow_none=True)
        check_seed(self.seed)
        for n in ("progress", "plots", "tensorboard"):
            if not isinstance(getattr(self, n), bool):
                raise ValueError(f"{n} must be true or false, got {getattr(self, n)!r}")
        for n in ("out", "resume", "data_dir"):  # (a TOML number there failed deep in pathlib, naming nothing)
            _check_path(n, getattr(self, n))
            if getattr(self, n) is not None:
                setattr(self, n, os.fspath(getattr(self, n)))  # (a Path kept as given would not go into config.json)
        if not (_finite_number(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite positive number, got {self.lr!r}")
        if self.weight_decay != "prior" and not (_finite_number(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0 or 'prior', got {self.weight_decay!r}")
        if not (_finite_number(self.kl_warmup) and self.kl_warmup >= 0):
            raise ValueError(f"kl_warmup must be a finite number of epochs >= 0, got {self.kl_warmup!r}")
        if self.grad_clip is not None and not (_finite_number(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be None or a finite positive number, got {self.grad_clip!r}")
        choice("on_nonfinite", ("stop", "skip"))
        if not isinstance(self.device, str) or not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but torch sees no CUDA GPU")
        if self.precision == "fp16-mixed" and not self.device.startswith("cuda"):
            raise ValueError("precision 'fp16-mixed' needs device cuda (on CPU use 'bf16-mixed')")
        if self.likelihood == "gaussian" and self.binarize in ("dynamic", "static"):
            raise ValueError("likelihood 'gaussian' models continuous data: use binarize 'none' (or 'auto')")
        return self

    @property
    def binarize_mode(self) -> str:
        return resolve_binarize(self.binarize, self.likelihood)


def _check_path(name: str, v) -> None:
    """A path-valued setting: None or a path string."""
    if v is not None and not isinstance(v, (str, os.PathLike)):
        raise ValueError(f"{name} must be a path (a string), got {v!r}")


def load_toml(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Reads a TOML config file (keys of ``TrainConfig``, flat or under ``[train]``).

    Raises:
        FileNotFoundError; ValueError: syntax errors and unknown keys, naming the file.
    """
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib  # type: ignore[no-redef]
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        with open(p, "rb") as f:
            d = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{p}: invalid TOML: {e}") from None
    if "train" in d:
        # the keys under [train] are the configuration; anything beside them (top-level keys, another table,
        # a misspelt [trian]) would be dropped without a word
        beside = sorted(k for k in d if k != "train")
        if not isinstance(d["train"], dict) or beside:
            raise ValueError(f"{p}: with a [train] table every key must be under it; found {beside or ['train']} "
                             "outside it")
        d = d["train"]
    d = {k.replace("-", "_"): v for k, v in d.items()}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{p}: unknown config keys {unknown}; known: {sorted(known)}")
    return d


def build_config(overrides: Optional[Dict[str, Any]] = None, config_file: Optional[str] = None) -> TrainConfig:
    """Defaults <- config file <- ``overrides`` (e.g. the flags given on the command line).

    With ``resume`` set, the configuration is the checkpoint's; only ``RESUME_OVERRIDABLE`` keys may be
    given (e.g. more ``epochs``); anything else raises ValueError.
    """
    values: Dict[str, Any] = {}
    if config_file:
        values.update(load_toml(config_file))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown configuration keys {unknown}")
    if values.get("resume"):
        _check_path("resume", values["resume"])
        ckpt = checkpoint.load_checkpoint(values["resume"])
        base = dict(ckpt["config"])
        bad = sorted(k for k, v in values.items() if k not in RESUME_OVERRIDABLE and base.get(k) != v)
        if bad:
            raise ValueError(f"cannot change {bad} when resuming (only {list(RESUME_OVERRIDABLE)})")
        done = len(ckpt.get("history", ()))
        if "epochs" in values and isinstance(values["epochs"], int) and values["epochs"] < done:
            raise ValueError(f"epochs ({values['epochs']}) is fewer than the {done} this run has already trained; "
                             f"give --epochs {done} or more")
        base.update(values)
        if not values.get("out"):
            base["out"] = str(checkpoint.resolve_checkpoint(values["resume"]).parent)
        values = base
    return TrainConfig(**values).validate()


@dataclass
class TrainResult:
    """What ``train`` returns.

    Attributes:
        run_dir: the run directory (None on ranks other than 0).
        model: the trained ``VAE`` (unwrapped from DDP).
        history: per-epoch metrics (dicts with ``METRIC_KEYS``).
        interrupted: True when stopped by Ctrl-C (a checkpoint was saved).
        plots: names -> paths of the PNGs written.
        checkpoint: path of the last checkpoint.
    """

    run_dir: Optional[Path]
    model: VAE
    history: List[Dict[str, float]]
    interrupted: bool = False
    plots: Dict[str, Path] = field(default_factory=dict)
    checkpoint: Optional[Path] = None

    @property
    def final_test_elbo(self) -> Optional[float]:
        return self.history[-1]["test_elbo"] if self.history else None


# -------------------------------------------------------------------------------- helpers
class _Dist:
    def __init__(self, device: torch.device):
        self.owned = False
        if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            if device.type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.owned = True
        self.on = dist.is_initialized()
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1

    def sum(self, values: List[float], device) -> List[float]:
        if not self.on:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def close(self, clean: bool = True):
        if self.owned:
            if clean:
                # Every rank reaches this point before any tears gloo down: a rank that destroyed
                # its process group while rank 0 was still writing the checkpoint aborted with
                # "terminate called without an active exception" (seen in 1 of ~4 torchrun runs).
                dist.barrier()
            dist.destroy_process_group()


class _StopFlag:
    """Ctrl-C sets a flag checked between steps; a second Ctrl-C interrupts immediately.

    Under torchrun (``distributed``) a terminal's Ctrl-C reaches every worker and torchrun forwards
    the signal again, so there repeated SIGINTs (and SIGTERM) only set the flag: the ranks agree on it
    at the next step and rank 0 writes the checkpoint before they exit.
    """

    def __init__(self, distributed: bool = False):
        self.set = False
        self.distributed = distributed
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            sigs = (signal.SIGINT, signal.SIGTERM) if self.distributed else (signal.SIGINT,)
            for sig in sigs:
                self._old[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.set and not self.distributed:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _device(cfg: TrainConfig) -> torch.device:
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and dev.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def _make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam or Adagrad, with torch's fused (single-kernel) implementation where this torch has one.

    The fused update is the same math as the default ``foreach`` one (tested in torch); on the
    paper's 784-500-20 model at batch 100 it saves several ms per step on CPU.
    """
    cls = torch.optim.Adam if name == "adam" else torch.optim.Adagrad
    params = list(params)
    try:
        return cls(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (TypeError, RuntimeError, ValueError):  # older torch, or no fused kernel for this device
        return cls(params, lr=lr, weight_decay=weight_decay)


def _write_metrics(run_dir: Path, history: List[Dict[str, float]]) -> None:
    for name, write in (("metrics.jsonl", _jsonl), ("metrics.csv", _csv)):
        tmp = run_dir / (name + ".tmp")
        with open(tmp, "w", newline="") as f:
            write(f, history)
        os.replace(tmp, run_dir / name)


def _jsonl(f, history):
    for row in history:
        f.write(json.dumps(row) + "\n")


def _csv(f, history):
    w = csv.DictWriter(f, fieldnames=list(METRIC_KEYS))
    w.writeheader()
    for row in history:
        w.writerow({k: row[k] for k in METRIC_KEYS})


def _default_out(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


# What makes a directory a run's: a fresh run does not write into one (it would replace that run's checkpoint
# and metrics); ``--resume`` continues it. (A config.json alone is a run that stopped before its first
# checkpoint: nothing to lose, so a new run may take the directory.)
RUN_FILES = (checkpoint.CHECKPOINT_NAME, "metrics.csv", "metrics.jsonl")


def _claim_default_dir(base: Path) -> Path:
    """A new directory named ``base``, or ``base-2``, ``base-3``, ... where that is taken: created here
    (``mkdir`` without exist_ok), so two runs started in the same second never share one."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 10_000):
        d = base if k == 1 else base.with_name(f"{base.name}-{k}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise FileExistsError(f"out: no free run directory name beside {base}; give --out")


# ---------------------------------------------------------------------------------- train
def train(cfg: TrainConfig, *, on_step: Optional[Callable[[Dict[str, Any]], None]] = None,
          data: Optional[DataSplits] = None, log: Callable[[str], None] = print) -> TrainResult:
    """Runs AEVB training as configured.

    Args:
        cfg: the configuration (``build_config`` merges defaults, a TOML file and flags).
        on_step: called after every optimizer step with the progress dict (``epoch``, ``batch``,
            ``step``, ``samples_seen``, ``loss``); for tests and custom logging.
        data: use these splits instead of loading ``cfg.dataset`` (tests).
        log: where rank 0 prints per-epoch lines (default ``print``).

    Returns:
        ``TrainResult``. Ctrl-C stops after the current step, writes a checkpoint and returns with
        ``interrupted=True``; ``--resume`` then continues exactly.
    """
    cfg.validate()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg)
    dd = _Dist(device)
    clean = False
    try:
        result = _train(cfg, device, dd, on_step, data, log)
        clean = True
        return result
    finally:
        dd.close(clean)
        torch.set_num_threads(threads)


class NonFiniteLossError(ValueError):
    """Training produced a non-finite loss; the message names the step and the last good checkpoint."""


def _train(cfg, device, dd: _Dist, on_step, data, log) -> TrainResult:
    loop = _Loop(cfg, device, dd, on_step, data, log)
    return loop.run()


class _Loop:
    """One training run, in named parts: build (model, optimizer, resume), the steps of an epoch, the
    end of an epoch (evaluation, checkpoint, metrics), and the end of the run (plots)."""

    def __init__(self, cfg: TrainConfig, device: torch.device, dd: _Dist, on_step, data, log):
        self.cfg, self.device, self.dd, self.on_step, self.log = cfg, device, dd, on_step, log
        self.main = dd.rank == 0
        self.data = data if data is not None else load_dataset(cfg.dataset, cfg.data_dir, cfg.binarize_mode, cfg.limit)
        self.n_train = self.data.train.shape[0]
        if cfg.batch_size % dd.world:
            raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the number of processes ({dd.world})")
        with torch.random.fork_rng(devices=[]):  # seeded initialization without touching the caller's RNG
            torch.manual_seed(cfg.seed)
            model = VAE(self.data.x_dim, cfg.latent, cfg.hidden, cfg.likelihood, cfg.activation, cfg.layers,
                        cfg.init)
        self.model = model.to(device)
        if cfg.precision == "bf16-mixed" and device.type == "cpu" and self.main:
            # said once where this machine's bf16 products are not faster (NOTE: [bf16 on this CPU] in tuning.py)
            widest = max((p for p in self.model.parameters() if p.dim() == 2), key=lambda p: p.numel())
            note = tuning.bf16_note(cfg.batch_size // dd.world, widest.shape[1], widest.shape[0])
            if note:
                log(f"train: {note}")
        wd = 1.0 / self.n_train if cfg.weight_decay == "prior" else float(cfg.weight_decay)
        self.opt = _make_optimizer(cfg.optimizer, self.model.parameters(), cfg.lr, wd)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16-mixed" else None
        self.st = dict(epoch=0, batch=0, step=0, samples_seen=0, wall_s=0.0, acc_elbo=0.0, acc_kl=0.0, acc_n=0.0,
                       acc_time=0.0, skipped=0)
        self.history: List[Dict[str, float]] = []
        self.resume_routes: Optional[Dict[str, str]] = None  # NOTE: [Routes of a run] in pyvae/_tune.py
        self.run_dir = Path(cfg.out) if cfg.out else _default_out(cfg)
        self.ckpt_path = self.run_dir / checkpoint.CHECKPOINT_NAME
        if cfg.resume:
            self._resume()
        self.net = self.model
        if dd.on:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.tb = None

    # ------------------------------------------------------------------------------- setup
    def _resume(self) -> None:
        cfg = self.cfg
        ck = checkpoint.load_checkpoint(cfg.resume, map_location=self.device)
        where = checkpoint.resolve_checkpoint(cfg.resume)
        if ck["model_config"] != self.model.config():
            raise ValueError(f"{where}: checkpoint model {ck['model_config']} does not match {self.model.config()}")
        checkpoint.load_weights(self.model, ck["model"], where)
        try:
            self.opt.load_state_dict(ck["optimizer"])
            if self.scaler is not None and ck.get("scaler"):
                self.scaler.load_state_dict(ck["scaler"])
            torch.set_rng_state(ck["rng"]["torch"].cpu())
            if torch.cuda.is_available() and ck["rng"].get("cuda"):
                torch.cuda.set_rng_state_all([s.cpu() for s in ck["rng"]["cuda"]])
        except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"{where}: cannot restore the optimizer or RNG state ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
        self.st.update(ck["state"])
        if self.dd.rank != 0:  # the partial-epoch sums in a checkpoint are global: counted once, by rank 0
            self.st.update(acc_elbo=0.0, acc_kl=0.0, acc_n=0.0)
        self.history = list(ck["history"])
        saved = ck.get("routes")  # (checkpoints written before routes were saved have none)
        ranks = saved.get("ranks") if isinstance(saved, dict) else None
        if isinstance(ranks, list) and len(ranks) == self.dd.world and self.dd.on:
            saved = ranks[self.dd.rank]  # this rank's own routes, as each rank raced its own
        if isinstance(saved, dict) and isinstance(saved.get("used"), dict):
            if saved.get("machine") == _tune.run_routes()["machine"]:
                self.resume_routes = saved["used"]
            elif self.main:
                self.log(f"{where}: written on another machine key (CPU, thread count, library settings: `pyvae tune "
                         "--show`), so this run takes its own layer routes: it continues the same training, but not "
                         "bit-identically to an uninterrupted run")

    def _open_run_dir(self) -> None:
        """Rank 0: the run directory, its config.json, no temporaries left by a killed checkpoint write, and
        metrics that agree with the checkpoint (a kill between the two writes can leave them apart)."""
        if not self.main:
            return
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ValueError(f"out: {self.run_dir} exists and is not a directory")
        if not self.cfg.resume:
            if not self.cfg.out:
                self.run_dir = _claim_default_dir(self.run_dir)
                self.ckpt_path = self.run_dir / checkpoint.CHECKPOINT_NAME
            held = [n for n in RUN_FILES if (self.run_dir / n).exists()]
            if held:
                raise FileExistsError(
                    f"out: {self.run_dir} already holds a run ({', '.join(held)}); a new run would replace it. "
                    f"Continue it with --resume {self.run_dir}, or give another --out")
        else:
            # A resume writes into its own run's directory, or into one that holds no run: resuming another
            # checkpoint (a copy, another run's) into a run directory would replace that run's files.
            source = checkpoint.resolve_checkpoint(self.cfg.resume).resolve()
            held = [n for n in RUN_FILES if (self.run_dir / n).exists()]
            if held and source != self.ckpt_path.resolve():
                raise FileExistsError(
                    f"out: {self.run_dir} already holds a run ({', '.join(held)}) other than the checkpoint resumed "
                    f"({source}); resuming into it would replace that run. Give another --out, or --resume "
                    f"{self.run_dir} to continue that run")
        SummaryWriter = None
        if self.cfg.tensorboard:  # before anything is written: a run that cannot start changes no file
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("tensorboard=True needs the tensorboard package: pip install tensorboard") from None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_stale_temporaries(self.ckpt_path)
        with open(self.run_dir / "config.json", "w") as f:
            json.dump(dataclasses.asdict(self.cfg), f, indent=1)
        if self.cfg.resume:
            _write_metrics(self.run_dir, self.history)
        if SummaryWriter is not None:
            self.tb = SummaryWriter(str(self.run_dir / "tb"))

    def _run_routes(self) -> Dict[str, Any]:
        """This run's routes for a checkpoint (NOTE: [Routes of a run] in pyvae/_tune.py): rank 0's machine key
        and routes, and under DDP on the CPU every rank's (a collective: all ranks call it), since each rank
        races its own."""
        mine = _tune.run_routes()
        if not self.dd.on or self.device.type != "cpu":  # (CUDA layers take no routes)
            return mine
        ranks: List[Any] = [None] * self.dd.world
        dist.all_gather_object(ranks, mine)
        return {**ranks[0], "ranks": ranks}

    def save(self, routes: Optional[Dict[str, Any]] = None) -> None:
        """Rank 0 writes the checkpoint; ``routes``: ``_run_routes()``, when every rank has taken part in it."""
        if not self.main:
            return
        if routes is None:  # this process's own (no collective: rank 0 alone is here)
            routes = _tune.run_routes()
        m, rng_cuda = self.model, list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else []
        checkpoint.save_checkpoint(self.ckpt_path, {
            "format": checkpoint.FORMAT, "model": m.state_dict(), "model_config": m.config(),
            "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "state": dict(self.st), "history": self.history, "config": dataclasses.asdict(self.cfg),
            "rng": {"torch": torch.get_rng_state(), "cuda": rng_cuda},
            "routes": routes,  # NOTE: [Routes of a run]
            "image_shape": list(self.data.image_shape),  # for pictures without the data (pyvae sample)
        })

    def _sum(self, values: List[float]) -> List[float]:
        return self.dd.sum(values, "cpu" if self.device.type == "cpu" else self.device)

    # ------------------------------------------------------------------------------- steps
    def _step(self, xb: torch.Tensor, shard, beta: float) -> Optional[torch.Tensor]:
        """One optimizer step on ``xb``; the loss, or None when a non-finite loss was skipped."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(mix_seed(cfg.seed, 3, self.st["step"]))
        with autocast(cfg.precision, self.device):
            obj, elbo, kl = self.net(xb, cfg.samples, cfg.estimator, beta, g, shard)
        loss = -obj.mean()
        finite = bool(torch.isfinite(loss))
        if self.dd.on:  # every rank takes the same decision
            finite = self._sum([0.0 if finite else 1.0])[0] == 0
        if not finite:
            if cfg.on_nonfinite == "skip":
                self.opt.zero_grad(set_to_none=True)
                self.st["skipped"] += 1
                return None
            raise NonFiniteLossError(
                f"step {self.st['step'] + 1} (epoch {self.st['epoch'] + 1}, batch {self.st['batch'] + 1}) gave a "
                f"non-finite loss ({loss.item()}); {self._last_good()}. Lower --lr, set --grad-clip, or pass "
                "--on-nonfinite skip to skip such steps")
        self.opt.zero_grad(set_to_none=True)
        params = self.model.parameters()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if cfg.grad_clip:
                self.scaler.unscale_(self.opt)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.opt.step()
        self.st["acc_elbo"] += float(elbo.sum())
        self.st["acc_kl"] += float(kl.sum())
        self.st["acc_n"] += xb.shape[0]
        return loss

    def _epoch(self, stop: _StopFlag, show: bool) -> bool:
        """The remaining steps of the current epoch; True when stopped by Ctrl-C."""
        cfg, st, dd = self.cfg, self.st, self.dd
        e = st["epoch"]
        batches = ShardedBatches(self.data.train, cfg.batch_size, seed=cfg.seed, epoch=e,
                                 binarize=self.data.binarize == "dynamic", rank=dd.rank, world=dd.world,
                                 start=st["batch"])
        bar = _progress_bar(batches, st["batch"], f"epoch {e + 1}/{cfg.epochs}") if show else None
        warm_steps = cfg.kl_warmup * (self.n_train // cfg.batch_size)
        t_epoch = time.perf_counter()
        interrupted = False
        for s, xb in batches:
            lo, _, size = batches.rows(s)
            beta = min(1.0, (st["step"] + 1) / warm_steps) if warm_steps > 0 else 1.0
            loss = self._step(xb.to(self.device, non_blocking=True), (lo, size) if dd.world > 1 else None, beta)
            st["step"] += 1
            st["batch"] = s + 1
            st["samples_seen"] += size
            if bar is not None:
                bar.update(1)
                if s % 10 == 0 and loss is not None:
                    el = st["acc_time"] + time.perf_counter() - t_epoch
                    bar.set_postfix(loss=f"{loss.item():.2f}",
                                    samples_s=f"{(s + 1 - batches.start) * cfg.batch_size / max(el, 1e-9):.0f}",
                                    refresh=False)
            if self.on_step is not None:
                self.on_step(dict(epoch=e, batch=s + 1, step=st["step"], samples_seen=st["samples_seen"],
                                  loss=float("nan") if loss is None else loss.item()))
            flag = stop.set
            if dd.on:
                flag = self._sum([float(stop.set)])[0] > 0
            if flag:
                interrupted = True
                break
        st["acc_time"] += time.perf_counter() - t_epoch
        if bar is not None:
            bar.close()
        return interrupted

    def _last_good(self) -> str:
        """Where the last good checkpoint is, for a NonFiniteLossError's message."""
        if self.ckpt_path.is_file():
            return f"the last good checkpoint is {self.ckpt_path} (epoch {self.st['epoch']})"
        return "no checkpoint was written yet"

    def _save_interrupted(self, t_start: float) -> None:
        self.st["wall_s"] = time.perf_counter() - t_start
        if self.dd.on:  # the checkpoint holds the partial-epoch sums of all ranks (rank 0 resumes them)
            self.st["acc_elbo"], self.st["acc_kl"], self.st["acc_n"] = self._sum(
                [self.st["acc_elbo"], self.st["acc_kl"], self.st["acc_n"]])
        self.save(self._run_routes())
        if self.dd.on:
            dist.barrier()  # every rank returns only once the checkpoint is on disk
        if self.main:
            self.log(f"interrupted: checkpoint saved to {self.ckpt_path} (continue with --resume {self.run_dir})")

    def _end_epoch(self, t_start: float) -> None:
        """Test ELBO, the epoch's metrics row, then the checkpoint and (after it, so that a kill between the
        two never leaves metrics ahead of the checkpoint) the metrics files."""
        cfg, st, dd = self.cfg, self.st, self.dd
        e = st["epoch"]
        sums = self._sum([st["acc_elbo"], st["acc_kl"], st["acc_n"]])
        if sums[2] == 0 and st["skipped"]:
            # (--on-nonfinite skip) no step of this epoch was finite: the weights are past saving, and a
            # checkpoint of them would replace the last good one
            raise NonFiniteLossError(
                f"every step of epoch {e + 1} gave a non-finite loss ({st['skipped']} steps skipped so far): nothing "
                f"trains any more; {self._last_good()}. Check the data, lower --lr or set --grad-clip")
        n = max(sums[2], 1.0)
        ev = evaluate(self.model, self.data.test, batch_size=cfg.eval_batch, samples=cfg.test_samples,
                      seed=mix_seed(cfg.seed, 5), device=self.device, precision=cfg.precision, rank=dd.rank,
                      world=dd.world)
        if not math.isfinite(ev["elbo"]):
            raise NonFiniteLossError(
                f"the test ELBO after epoch {e + 1} is not finite ({ev['elbo']}), so this epoch's weights are not "
                f"saved; {self._last_good()}. Lower --lr or set --grad-clip")
        st["wall_s"] = time.perf_counter() - t_start
        row = dict(epoch=e + 1, step=st["step"], samples_seen=st["samples_seen"], train_elbo=sums[0] / n,
                   test_elbo=ev["elbo"], kl=sums[1] / n, recon=(sums[0] + sums[1]) / n,
                   samples_per_s=n / max(st["acc_time"], 1e-9), wall_s=st["wall_s"])
        self.history.append(row)
        st.update(epoch=e + 1, batch=0, acc_elbo=0.0, acc_kl=0.0, acc_n=0.0, acc_time=0.0)
        routes = self._run_routes()  # (every rank: a collective under DDP)
        if not self.main:
            return
        self.save(routes)
        _write_metrics(self.run_dir, self.history)
        if self.tb is not None:
            for k in ("train_elbo", "test_elbo", "kl", "recon", "samples_per_s"):
                self.tb.add_scalar(k, row[k], st["samples_seen"])
        skipped = f"  ({st['skipped']} non-finite steps skipped so far)" if st["skipped"] else ""
        self.log(f"epoch {e + 1}/{cfg.epochs}  train ELBO {row['train_elbo']:.2f}  test ELBO {row['test_elbo']:.2f}"
                 f"  KL {row['kl']:.2f}  {row['samples_per_s']:,.0f} samples/s  {row['wall_s']:.1f} s{skipped}")

    # --------------------------------------------------------------------------------- run
    @contextlib.contextmanager
    def _routes(self):
        """A resumed run on the machine key it was written on takes the routes it took before (NOTE: [Routes
        of a run] in pyvae/_tune.py), for this run only."""
        if not self.resume_routes:
            yield
            return
        from .ops import forget_routes

        forget_routes()
        try:
            with _tune.pinned(self.resume_routes):
                yield
        finally:
            forget_routes()

    def run(self) -> TrainResult:
        with self._routes():
            return self._run()

    def _run(self) -> TrainResult:
        cfg, st = self.cfg, self.st
        self._open_run_dir()
        try:
            from tqdm.auto import tqdm  # noqa: F401
            show = cfg.progress and self.main
        except ImportError:  # pragma: no cover
            show = False
        t_start = time.perf_counter() - st["wall_s"]
        interrupted = False
        self.model.train()
        with _StopFlag(self.dd.on) as stop:
            while st["epoch"] < cfg.epochs and not interrupted:
                if self._epoch(stop, show):
                    interrupted = True
                    self._save_interrupted(t_start)
                    break
                self._end_epoch(t_start)
                if stop.set and not self.dd.on:
                    interrupted = True
                    self.log(f"interrupted: checkpoint saved to {self.ckpt_path} (continue with --resume {self.run_dir})")
        if self.tb is not None:
            self.tb.close()
        plots: Dict[str, Path] = {}
        if self.main and cfg.plots and not interrupted and self.history:
            from .plots import run_plots
            plots = run_plots(self.model, self.data, self.history, self.run_dir)
        main = self.main
        written = self.ckpt_path if (main and self.ckpt_path.is_file()) else None
        return TrainResult(self.run_dir if main else None, self.model, self.history, interrupted, plots, written)


def _progress_bar(batches: ShardedBatches, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=batches.num_batches, initial=initial, desc=desc, unit="batch", leave=False, file=sys.stderr,
                ncols=min(shutil.get_terminal_size((100, 20)).columns, 120))

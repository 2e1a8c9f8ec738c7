"""Checkpoints: atomic writes, safe loads (``torch.load(weights_only=True)``: never executes code).

A checkpoint is one ``torch.save``d dict of tensors and plain Python values:

==================  ==============================================================================
``format``          ``"pyvae-checkpoint-1"``
``model``           the VAE's state dict
``model_config``    ``VAE`` constructor arguments (``VAE.config()``)
``optimizer``       the optimizer's state dict; ``scaler``: the fp16 grad scaler's, or None
``state``           progress: ``epoch``, ``batch`` (next batch of that epoch), ``step``,
                    ``samples_seen``, ``wall_s``, partial-epoch sums
``history``         the per-epoch metrics so far (list of dicts)
``config``          the training configuration (``dataclasses.asdict(TrainConfig)``)
``rng``             torch's CPU RNG state and the CUDA ones (training itself derives its draws from
                    ``(seed, step)``, so resuming is exact whatever these are)
==================  ==============================================================================
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import torch

from .models import VAE

__all__ = ["FORMAT", "CHECKPOINT_NAME", "save_checkpoint", "load_checkpoint", "resolve_checkpoint", "load_model",
           "load_weights", "remove_stale_temporaries"]

_KEYS = ("model", "model_config", "optimizer", "state", "history", "config", "rng")
_CONFIG_KEYS = ("dataset", "binarize", "likelihood")  # what eval/sample/inpaint/denoise read to reload the data

FORMAT = "pyvae-checkpoint-1"
CHECKPOINT_NAME = "checkpoint.pt"

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only be read by
    setting it, which would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_checkpoint(path: PathLike, ckpt: Dict[str, Any]) -> Path:
    """Writes ``ckpt`` to ``path`` atomically: a temporary file in the same directory, fsync, rename.

    A reader (or a crash) never sees a half-written checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file owner-only (0600); a checkpoint gets the mode of any file the user writes
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def resolve_checkpoint(run_or_ckpt: PathLike) -> Path:
    """A checkpoint file, or a run directory containing ``checkpoint.pt``.

    Raises:
        FileNotFoundError: naming the path.
    """
    p = Path(run_or_ckpt)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {p} (give a run directory or a checkpoint file)")
    return p


def load_checkpoint(run_or_ckpt: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Loads a checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError; ValueError: not a pyvae checkpoint or unreadable (the message names the file).
    """
    p = resolve_checkpoint(run_or_ckpt)
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch.load raises many types for bad files)
        raise ValueError(f"{p}: not a loadable pyvae checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{p}: not a pyvae checkpoint (expected format {FORMAT!r})")
    missing = [k for k in _KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"{p}: damaged pyvae checkpoint: missing {missing}")
    cfg = ckpt["config"]
    lacks = list(_CONFIG_KEYS) if not isinstance(cfg, dict) else [k for k in _CONFIG_KEYS if k not in cfg]
    if lacks:
        raise ValueError(f"{p}: damaged pyvae checkpoint: its config lacks {lacks}")
    return ckpt


def load_weights(model: VAE, state: Dict[str, Any], where: PathLike) -> None:
    """``model.load_state_dict(state)`` with a one-line ValueError naming ``where`` when the weights do not
    fit the model (missing or extra keys, wrong shapes) or are not finite."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise ValueError(f"{where}: the weights do not fit the model {model.config()}: {detail}") from None
    bad = [name for name, t in state.items() if isinstance(t, torch.Tensor) and t.is_floating_point()
           and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{where}: non-finite weights (NaN or Inf) in {bad[:4]}")


def remove_stale_temporaries(path: PathLike) -> List[Path]:
    """Removes the temporaries a killed ``save_checkpoint(path, ...)`` left behind; returns them."""
    path = Path(path)
    gone = []
    for tmp in path.parent.glob(path.name + ".*.tmp"):
        try:
            tmp.unlink()
            gone.append(tmp)
        except FileNotFoundError:
            pass
    return gone


def load_model(run_or_ckpt: PathLike, device: Union[str, torch.device] = "cpu") -> Tuple[VAE, Dict[str, Any]]:
    """The trained ``VAE`` (in eval mode, on ``device``) and the checkpoint dict."""
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda") or (dev.type == "cuda" and not torch.cuda.is_available()):
        raise ValueError(f"device {str(dev)!r}: use cpu, or cuda[:N] on a machine where torch sees a GPU")
    ckpt = load_checkpoint(run_or_ckpt)
    where = resolve_checkpoint(run_or_ckpt)
    try:
        model = VAE(**ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: bad model_config {ckpt['model_config']!r}: {e}") from None
    load_weights(model, ckpt["model"], where)
    return model.to(device).eval(), ckpt

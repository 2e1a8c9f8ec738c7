"""Marginal inference on x with a trained VAE: inpainting (missing pixels) and denoising (flipped bits).

Inpainting fills the missing pixels x_mis of ``x`` given the observed ones x_obs by iterating

    x_t = (x_obs, x_mis_t)  ->  z ~ q(z | x_t)  ->  x_mis_{t+1} ~ p(x_mis | z)

with the observed pixels clamped: the pseudo-Gibbs sampler of Rezende, Mohamed & Wierstra (2014,
section 5.2). Its stationary distribution is only approximately p(x_mis | x_obs) (q is not the exact
posterior). With ``metropolis=True`` each z draw is a Metropolis-Hastings step with q(z | x_t) as an
independent proposal (Mattei & Frellsen 2018, "Leveraging the exact likelihood of deep latent variable
models", Metropolis-within-Gibbs): z' is accepted with probability

    min(1, p(x_t | z') p(z') q(z_t | x_t) / (p(x_t | z_t) p(z_t) q(z' | x_t)))

and the chain then targets p(z, x_mis | x_obs) exactly.

Conventions:
    - ``x`` is ``[B, D]`` float (rows are flattened H x W images); ``mask`` is ``[D]`` or ``[B, D]``,
      1 (or True) = observed, 0 = missing.
    - ``steps`` counts the iterations after the first pass: ``steps=0`` is one encode -> z -> decode
      pass from the initial fill (0 by default: no ink), ``steps=K`` is K + 1 passes. The first pass is always
      accepted (there is no previous z); Metropolis corrections apply to the K further steps.
    - During the chain, the missing pixels of a Bernoulli model are binary draws from p(x_mis | z) (a
      proper Markov chain; ``chain="mean"`` feeds the probabilities back instead, a deterministic
      mean-field variant, not allowed with ``metropolis``). Gaussian models draw
      x_mis ~ N(mean, exp(logvar)), continuous-Bernoulli ones x_mis ~ CB(logits) (by its inverse CDF).
    - The returned completions hold, at the missing pixels, E[x_mis | z] of the last z (decoder
      probabilities for Bernoulli models; ``output="sample"`` returns the last draw of x_mis instead).
      Observed pixels are copied from ``x`` bit for bit.
    - All S chains of all B images run as one batch of S * B rows; ``completions[s, b]`` is chain s of
      image b.

Randomness comes from ``generator`` (default: torch's global generator): z through
``pyvae.ops.reparameterize`` (seeded from it), the Bernoulli draws and the Metropolis uniforms from
``torch.rand`` with it. The same seed gives the same result.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import torch

from . import ops

__all__ = ["Inpainting", "inpaint", "denoise", "flip_noise", "make_mask", "load_mask", "mask_kinds",
           "completion_metrics", "image_shape_for", "MASK_KINDS"]

PathLike = Union[str, os.PathLike]
MASK_KINDS = ("top-half", "bottom-half", "left-half", "right-half", "random:P")
_EPS = 1e-6  # probabilities are clamped to [eps, 1 - eps] for log-likelihoods of completions


def mask_kinds() -> Tuple[str, ...]:
    """The mask kinds ``make_mask`` knows (besides a ``.npy``/``.png`` file)."""
    return MASK_KINDS


@dataclass
class Inpainting:
    """What ``inpaint`` returns; unpacks as ``completions, mean = inpaint(...)``.

    Attributes:
        completions: ``[S, B, D]``, x's dtype and device; observed pixels equal ``x``.
        mean: ``[B, D]``, the mean of the completions over S.
        accept_rate: ``[B]`` fraction of accepted Metropolis proposals per image (over the S chains and
            ``steps`` steps), or None without ``metropolis`` (or with ``steps=0``).
    """

    completions: torch.Tensor
    mean: torch.Tensor
    accept_rate: Optional[torch.Tensor] = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield self.completions
        yield self.mean


# ------------------------------------------------------------------------------ validation
def _check_model(model) -> None:
    for attr in ("encode", "decode", "mean_from", "log_weight", "x_dim", "z_dim", "likelihood"):
        if not hasattr(model, attr):
            raise TypeError(f"model must be a pyvae.models.VAE (no attribute {attr!r}), got {type(model).__name__}")


def _model_param(model) -> torch.Tensor:
    return next(model.parameters())


def _check_x(model, x, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 2 or x.shape[1] != model.x_dim:
        raise ValueError(f"{name} must have shape [B, {model.x_dim}] (B rows of x_dim pixels), got {tuple(x.shape)}")
    p = _model_param(model)
    if x.device != p.device:
        raise ValueError(f"{name} is on {x.device} but the model is on {p.device}")
    return x


def _check_mask(mask, x: torch.Tensor) -> torch.Tensor:
    """``mask`` as a bool ``[B, D]`` tensor (True = observed), after checking shape, values and device."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor (1 = observed, 0 = missing), got {type(mask).__name__}")
    B, D = x.shape
    if tuple(mask.shape) not in ((D,), (B, D), (1, D)):
        raise ValueError(f"mask must have shape [{D}] or [{B}, {D}] like x, got {tuple(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"x and mask are on different devices: x on {x.device}, mask on {mask.device}")
    if mask.dtype != torch.bool:
        if mask.is_complex():
            raise TypeError(f"mask must be bool, integer or float, got dtype {mask.dtype}")
        bad = ~((mask == 0) | (mask == 1))
        if bool(bad.any()):
            vals = torch.unique(mask[bad].detach().cpu())[:5].tolist()
            raise ValueError(f"mask must be binary (1 = observed, 0 = missing); found values such as {vals}")
        mask = mask != 0
    return mask.expand(B, D)


def _check_int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


# ---------------------------------------------------------------------------- randomness
def _rand(shape, generator: Optional[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """U[0, 1) of ``shape`` on ``like``'s device and dtype, drawn on the generator's device."""
    g_dev = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=g_dev, dtype=like.dtype).to(like.device)


def _continuous_bernoulli_icdf(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The inverse CDF of CB(sigmoid(logits)) at u in [0, 1): a draw when u ~ U[0, 1).

    The density is proportional to e^(l x) on [0, 1], so F(x) = expm1(l x) / expm1(l) and, for l < 0,
    x = log1p(u expm1(l)) / l (u expm1(l) in (-1, 0]: no overflow, no cancellation). For l > 0 the
    same with 1 - x ~ CB(-l) at 1 - u. For |l| < 1e-4, x = u + u (1 - u) l / 2 (error O(l^2)).
    """
    neg = logits < 0
    a = -logits.abs()  # the l <= 0 case
    v = torch.where(neg, u, 1 - u)
    safe = torch.where(a < -1e-4, a, -1.0)
    y = torch.log1p(v * torch.expm1(safe)) / safe
    y = torch.where(a < -1e-4, y, v + v * (1 - v) * a / 2)
    return torch.where(neg, y, 1 - y).clamp(0, 1)


def _draw_x(model, out, generator) -> torch.Tensor:
    """One draw x ~ p(x | z) from the decoder output (binary for Bernoulli, in [0, 1] for the
    continuous Bernoulli)."""
    if model.likelihood == "bernoulli":
        p = torch.sigmoid(out)
        return (_rand(p.shape, generator, p) < p).to(p.dtype)
    if model.likelihood == "continuous-bernoulli":
        return _continuous_bernoulli_icdf(out, _rand(out.shape, generator, out))
    mean, logvar = out
    return ops.reparameterize(mean, logvar, generator=generator)


def _select(acc: torch.Tensor, new, old):
    """Rows of ``new`` where ``acc`` else rows of ``old`` (tensors or (mean, logvar) pairs)."""
    if isinstance(new, tuple):
        return tuple(_select(acc, a, b) for a, b in zip(new, old))
    return torch.where(acc.unsqueeze(-1), new, old)


# ------------------------------------------------------------------------------ inpainting
@torch.no_grad()
def inpaint(model, x: torch.Tensor, mask: torch.Tensor, steps: int = 20, samples: int = 1,
            generator: Optional[torch.Generator] = None, metropolis: bool = False, *, output: str = "mean",
            chain: str = "sample", init: Union[float, torch.Tensor] = 0.0) -> Inpainting:
    """Fills the missing pixels (``mask == 0``) of ``x`` given the observed ones, with S chains per image.

    Args:
        model: a trained ``pyvae.models.VAE`` (any decoder); put in eval mode by you.
        x: ``[B, D]`` float tensor on the model's device; its missing pixels are ignored.
        mask: ``[D]`` or ``[B, D]`` bool/int/float tensor on x's device, 1 = observed, 0 = missing.
        steps: pseudo-Gibbs iterations after the first pass (0: one encode -> z -> decode pass).
        samples: S, chains (completions) per image.
        generator: torch generator for every random draw (default: torch's global one).
        metropolis: Metropolis-within-Gibbs correction of the z draws (Mattei & Frellsen 2018).
        output: "mean" (E[x_mis | z], the decoder's probabilities for Bernoulli) or "sample" (the last
            draw of x_mis, binary for Bernoulli) at the missing pixels of the completions.
        chain: "sample" (the chain carries draws of x_mis) or "mean" (it carries E[x_mis | z]; Bernoulli
            and Gaussian; not with ``metropolis``).
        init: fill of the missing pixels before the first pass: a number, or a ``[D]``/``[B, D]`` tensor.
            The default 0 (background) works best on MNIST (docs/INFERENCE.md): a 0.5 or mean-image fill
            is far from any training image, and the chain can stay stuck near the odd first z.

    Returns:
        ``Inpainting(completions [S, B, D], mean [B, D], accept_rate [B] or None)`` in x's dtype; it
        unpacks as ``completions, mean``.

    Raises:
        TypeError: non-tensor or non-float ``x``, non-tensor ``mask``. ValueError: wrong shapes,
        non-binary mask values, tensors on different devices, bad ``steps``/``samples``/``output``/``chain``.
    """
    _check_model(model)
    _check_x(model, x)
    m = _check_mask(mask, x)
    _check_int("steps", steps, 0)
    S = _check_int("samples", samples, 1)
    _check_generator(generator)
    if output not in ("mean", "sample"):
        raise ValueError(f"output must be 'mean' or 'sample', got {output!r}")
    if chain not in ("sample", "mean"):
        raise ValueError(f"chain must be 'sample' or 'mean', got {chain!r}")
    if metropolis and chain != "sample":
        raise ValueError("metropolis=True needs chain='sample' (the acceptance ratio is for draws of x_mis)")
    B, D = x.shape
    dt = _model_param(model).dtype
    if isinstance(init, torch.Tensor):
        if tuple(init.shape) not in ((D,), (B, D), (1, D)) or init.device != x.device:
            raise ValueError(f"init must be a number or a [{D}] / [{B}, {D}] tensor on {x.device}, got "
                             f"{tuple(init.shape)} on {init.device}")
        fill0 = init.to(dt).expand(B, D)
    else:
        fill0 = torch.full((B, D), float(init), dtype=dt, device=x.device)

    # S chains of B images as one batch: row s * B + b is chain s of image b.
    obs = m.repeat(S, 1)
    xo = x.to(dt).repeat(S, 1)
    cur = torch.where(obs, xo, fill0.repeat(S, 1))

    def propose(xc):
        mu, logvar = model.encode(xc)
        z = ops.reparameterize(mu.to(dt), logvar.to(dt), generator=generator)
        return mu, logvar, z

    # first pass: always accepted
    _, _, z = propose(cur)
    out = model.decode(z)
    accepted = torch.zeros(S * B, dtype=torch.float64, device=x.device)
    for _ in range(steps):
        cur = torch.where(obs, xo, _draw_x(model, out, generator) if chain == "sample" else model.mean_from(out))
        mu, logvar, z_new = propose(cur)
        out_new = model.decode(z_new)
        if metropolis:
            # log rho = log w(z') - log w(z), w = p(x, z) / q(z | x) (the model's log importance weight)
            log_w_new = model.log_weight(cur, z_new, mu, logvar, decoded=out_new)
            log_w_old = model.log_weight(cur, z, mu, logvar, decoded=out)
            u = _rand((S * B,), generator, log_w_new)
            acc = torch.log(u) < (log_w_new - log_w_old)  # u = 0 -> -inf: always accepted
            acc = acc | torch.isnan(log_w_old)  # never keep a NaN state
            accepted += acc.double()
            z = torch.where(acc.unsqueeze(-1), z_new, z)
            out = _select(acc, out_new, out)
        else:
            z, out = z_new, out_new
    fill = model.mean_from(out) if output == "mean" else _draw_x(model, out, generator)
    comp = torch.where(obs, x.repeat(S, 1), fill.to(x.dtype)).view(S, B, D)
    rate = None
    if metropolis and steps > 0:
        rate = (accepted.view(S, B).sum(0) / (S * steps)).to(x.dtype)
    return Inpainting(comp, comp.mean(0), rate)


# ------------------------------------------------------------------------------- denoising
def flip_noise(x: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Bit-flip (salt-and-pepper) noise on binary images: each pixel becomes ``1 - x`` with probability p.

    Args:
        x: ``[..., D]`` float tensor of 0s and 1s.
        p: flip probability in [0, 1].
        generator: torch generator for the uniforms (may live on another device than ``x``).

    Returns:
        Tensor of x's shape, dtype and device.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
    _check_generator(generator)
    flip = _rand(x.shape, generator, x) < p
    return torch.where(flip, 1.0 - x, x)


@torch.no_grad()
def denoise(model, x_noisy: torch.Tensor, steps: int = 1, samples: int = 0,
            generator: Optional[torch.Generator] = None, flip: Optional[float] = None) -> torch.Tensor:
    """Reconstructs ``x_noisy`` through the model: x <- E[x | z] with z from q(z | x), ``steps`` times.

    With ``flip`` (the bit-flip probability of the noise, Bernoulli models), the noise model is used:
    each step returns P(x = 1 | z, x_noisy) = pi q / (pi q + (1 - pi)(1 - q)) with pi = P(x = 1 | z)
    and q = P(x_noisy | x = 1) = 1 - flip where x_noisy = 1, flip where 0, averaged over the z draws.
    Measured on MNIST-5k at flip 0.1 (docs/INFERENCE.md): wrong pixels 0.099 noisy, 0.112 after a
    plain reconstruction, 0.060 after one noise-aware step with 8 draws. More steps drift toward the
    model's typical digits (0.096 after 2, 0.23 after 5): keep ``steps=1``.

    Args:
        model: a trained ``pyvae.models.VAE``.
        x_noisy: ``[B, D]`` float tensor on the model's device (e.g. ``flip_noise(x, 0.1)``).
        steps: reconstructions in a row (1: ``model.reconstruct``; more pulls further toward the model's
            typical images).
        samples: 0 to decode the posterior mean z = mu(x) (deterministic), or L >= 1 to average E[x | z]
            over L draws z ~ q(z | x) (the posterior predictive mean).
        generator: torch generator for the z draws (only with ``samples >= 1``).
        flip: the noise's bit-flip probability in [0, 0.5), or None to ignore the noise model.

    Returns:
        ``[B, D]`` tensor in x_noisy's dtype: the decoder's mean (probabilities for Bernoulli models);
        threshold at 0.5 for a binary image.
    """
    _check_model(model)
    _check_x(model, x_noisy, "x_noisy")
    _check_int("steps", steps, 1)
    _check_int("samples", samples, 0)
    _check_generator(generator)
    if flip is not None:
        if not isinstance(flip, (int, float)) or not 0.0 <= float(flip) < 0.5:
            raise ValueError(f"flip must be a probability in [0, 0.5), got {flip!r}")
        if model.likelihood != "bernoulli":
            raise ValueError("flip (the bit-flip noise model) needs a Bernoulli model")
        if not bool(((x_noisy == 0) | (x_noisy == 1)).all()):
            raise ValueError("with flip, x_noisy must be binary (0/1)")
    dt = _model_param(model).dtype
    noisy = x_noisy.to(dt)
    if flip is not None:
        like1 = torch.where(noisy > 0.5, 1.0 - float(flip), float(flip))  # P(x_noisy | x = 1)
    cur = noisy
    for _ in range(steps):
        mu, logvar = model.encode(cur)
        if samples == 0:
            pi = model.mean(mu.to(dt))
        else:
            pi = model.mean(ops.reparameterize(mu.to(dt), logvar.to(dt), samples=samples, generator=generator))
        if flip is not None:
            pi = pi * like1 / (pi * like1 + (1.0 - pi) * (1.0 - like1))
        cur = pi if samples == 0 else pi.mean(0)
    return cur.to(x_noisy.dtype)


# ----------------------------------------------------------------------------------- masks
def image_shape_for(x_dim: int, dataset: Optional[str] = None) -> Tuple[int, int]:
    """(H, W) of flattened images: by dataset name, else square (784 -> 28 x 28)."""
    known = {"digits": (8, 8), "frey": (28, 20), "mnist-5k": (28, 28), "mnist": (28, 28), "fashion-mnist": (28, 28)}
    if dataset in known and known[dataset][0] * known[dataset][1] == x_dim:
        return known[dataset]
    r = int(round(math.sqrt(x_dim)))
    if r * r != x_dim:
        raise ValueError(f"cannot guess the image shape of x_dim={x_dim} (not a square); give image_shape")
    return (r, r)


def _image_hw(shape) -> Tuple[Optional[int], int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        return None, shape[0], shape[1]
    if len(shape) == 3:
        return shape
    raise ValueError(f"shape must be (H, W) or (B, H, W), got {shape}")


def load_mask(path: PathLike, image_shape: Tuple[int, int]) -> torch.Tensor:
    """A mask from a file: ``.npy`` (0/1 or bool, shape ``(H, W)`` or ``(H*W,)``) or ``.png`` (grayscale
    or RGB of size W x H, black = missing, white = observed; only the values 0 and 255 are allowed).

    Returns:
        ``[H*W]`` float32 tensor of 0s and 1s (1 = observed).

    Raises:
        FileNotFoundError; ValueError: unknown extension, wrong shape, non-binary values (naming the file).
    """
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"mask file not found: {p}")
    H, W = image_shape
    if p.suffix.lower() == ".npy":
        try:
            a = np.load(p, allow_pickle=False)
        except Exception as e:  # noqa: BLE001  (np.load raises many types for bad files)
            raise ValueError(f"{p}: not a readable .npy file ({type(e).__name__}: {e})") from None
        if a.shape not in ((H, W), (H * W,)):
            raise ValueError(f"{p}: mask must have shape ({H}, {W}) or ({H * W},) for images of {H} x {W}, "
                             f"got {a.shape}")
        if a.dtype == bool:
            a = a.astype(np.float32)
        if not np.issubdtype(a.dtype, np.number) or not np.isin(a, (0, 1)).all():
            raise ValueError(f"{p}: mask values must be 0 (missing) or 1 (observed)")
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).reshape(H * W)
    if p.suffix.lower() == ".png":
        from PIL import Image

        try:
            with Image.open(p) as im:
                a = np.asarray(im.convert("L"))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{p}: not a readable PNG ({type(e).__name__}: {e})") from None
        if a.shape != (H, W):
            raise ValueError(f"{p}: mask image must be {W} x {H} pixels (W x H), got {a.shape[1]} x {a.shape[0]}")
        if not np.isin(a, (0, 255)).all():
            raise ValueError(f"{p}: mask PNG must be black (0, missing) and white (255, observed) only; "
                             f"found values such as {sorted(set(np.unique(a).tolist()) - {0, 255})[:5]}")
        return torch.from_numpy((a == 255).astype(np.float32)).reshape(H * W)
    raise ValueError(f"{p}: mask file must be .npy or .png, got {p.suffix!r}")


def make_mask(kind: str, shape: Sequence[int], generator: Optional[torch.Generator] = None,
              device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """A mask for flattened images (1 = observed, 0 = missing).

    Args:
        kind: "top-half" / "bottom-half" / "left-half" / "right-half" (the first/last floor(H/2) rows or
            floor(W/2) columns missing), "random:P" (exactly round(P * H * W) pixels missing per image,
            chosen uniformly; P in [0, 1]), or a path to a ``.npy``/``.png`` file (see ``load_mask``).
        shape: ``(H, W)`` for one mask ``[H*W]`` shared by all images, or ``(B, H, W)`` for ``[B, H*W]``
            (random masks differ per row).
        generator: torch generator for "random:P" (CPU).
        device: where the mask is returned.

    Returns:
        float32 tensor of 0s and 1s.
    """
    if not isinstance(kind, str):
        raise TypeError(f"kind must be a str, got {type(kind).__name__}")
    B, H, W = _image_hw(shape)
    if H < 1 or W < 1 or (B is not None and B < 1):
        raise ValueError(f"shape must be positive, got {tuple(shape)}")
    _check_generator(generator)
    rows = 1 if B is None else B
    if kind.startswith("random:"):
        try:
            frac = float(kind.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"mask kind 'random:P' needs a number P in [0, 1], got {kind!r}") from None
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"mask kind 'random:P' needs P in [0, 1], got {frac}")
        k = int(round(frac * H * W))
        g_dev = generator.device if generator is not None else "cpu"
        order = torch.rand((rows, H * W), generator=generator, device=g_dev).argsort(1)
        m = torch.ones(rows, H * W)
        m.scatter_(1, order[:, :k].cpu(), 0.0)
    elif kind in ("top-half", "bottom-half", "left-half", "right-half"):
        img = torch.ones(H, W)
        if kind == "top-half":
            img[: H // 2] = 0
        elif kind == "bottom-half":
            img[H - H // 2:] = 0
        elif kind == "left-half":
            img[:, : W // 2] = 0
        else:
            img[:, W - W // 2:] = 0
        m = img.reshape(1, H * W).expand(rows, H * W).clone()
    elif kind.lower().endswith((".npy", ".png")) or os.path.exists(kind):
        m = load_mask(kind, (H, W)).reshape(1, H * W).expand(rows, H * W).clone()
    else:
        raise ValueError(f"unknown mask kind {kind!r}: use one of {list(MASK_KINDS)} or a .npy/.png file")
    return (m[0] if B is None else m).to(device)


# --------------------------------------------------------------------------------- metrics
def completion_metrics(pred: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> Dict[str, float]:
    """Quality of predictions at the missing pixels (``mask == 0``) of binary (or [0, 1]) targets.

    Args:
        pred: ``[B, D]`` predicted probabilities (e.g. ``Inpainting.mean``); ``x``: ``[B, D]`` truth;
            ``mask``: ``[D]`` or ``[B, D]``, 1 = observed.

    Returns:
        ``{"ll": mean Bernoulli log-likelihood per missing pixel (nats; pred clamped to [1e-6, 1 - 1e-6]),
        "mae": mean |pred - x| per missing pixel, "err": fraction of missing pixels with
        (pred > 0.5) != (x > 0.5), "missing": number of missing pixels}``.
    """
    miss = (mask == 0).expand_as(x)
    n = int(miss.sum())
    if n == 0:
        return {"ll": 0.0, "mae": 0.0, "err": 0.0, "missing": 0}
    p = pred.double().clamp(_EPS, 1 - _EPS)[miss]
    t = x.double()[miss]
    ll = ops.bernoulli_log_prob(torch.logit(p), t).item() / n  # all missing pixels as one row
    return {"ll": ll, "mae": (p - t).abs().mean().item(), "err": ((p > 0.5) != (t > 0.5)).double().mean().item(),
            "missing": n}

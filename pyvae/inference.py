"""Marginal inference on x with a trained VAE: inpainting (missing pixels) and denoising (flipped bits).

Three methods fill the missing pixels x_mis of ``x`` given the observed ones x_obs (``method=``):

``"importance"`` (the default): the posterior predictive by self-normalized importance sampling,

    p(x_mis | x_obs) ~= sum_k w_k p(x_mis | z_k),   w_k ∝ p(x_obs | z_k) p(z_k) / r(z_k),   z_k ~ r,

with a proposal r(z) fitted to each image (NOTE: [Fitted proposal]). The same weights give the estimate
log p(x_obs) ~= log (1/K) sum_k p(x_obs | z_k) p(z_k) / r(z_k) and the effective sample size
ESS = (sum_k w_k)^2 / sum_k w_k^2 in [1, K], both returned. Completions are draws from the weighted
sample (resampling); ``mean`` is the predictive mean itself.

``"gibbs"``: the pseudo-Gibbs sampler of Rezende, Mohamed & Wierstra (2014, section 5.2),

    x_t = (x_obs, x_mis_t)  ->  z ~ q(z | x_t)  ->  x_mis_{t+1} ~ p(x_mis | z)

with the observed pixels clamped. Its stationary distribution is only approximately p(x_mis | x_obs) (q is
not the exact posterior).

``"metropolis"`` (or ``metropolis=True``): each z draw of the chain is a Metropolis-Hastings step with
q(z | x_t) as an independent proposal (Mattei & Frellsen 2018, "Leveraging the exact likelihood of deep
latent variable models", Metropolis-within-Gibbs): z' is accepted with probability

    min(1, p(x_t | z') p(z') q(z_t | x_t) / (p(x_t | z_t) p(z_t) q(z' | x_t)))

and the chain then targets p(z, x_mis | x_obs) exactly.

Conventions:
    - ``x`` is ``[B, D]`` float (rows are flattened H x W images); ``mask`` is ``[D]`` or ``[B, D]``,
      1 (or True) = observed, 0 = missing.
    - Chains (gibbs, metropolis): ``steps`` counts the iterations after the first pass: ``steps=0`` is one
      encode -> z -> decode pass from the initial fill (0 by default: no ink), ``steps=K`` is K + 1 passes.
      The first pass is always accepted (there is no previous z); Metropolis corrections apply to the K
      further steps. During the chain, the missing pixels of a Bernoulli model are binary draws from
      p(x_mis | z) (a proper Markov chain; ``chain="mean"`` feeds the probabilities back instead, a
      deterministic mean-field variant, not allowed with ``metropolis``). Gaussian models draw
      x_mis ~ N(mean, exp(logvar)), continuous-Bernoulli ones x_mis ~ CB(logits) (by its inverse CDF).
    - The returned completions hold, at the missing pixels, E[x_mis | z] of one z (decoder probabilities
      for Bernoulli models: the last z of a chain, a resampled z_k for importance sampling);
      ``output="sample"`` returns a draw of x_mis from p(x_mis | z) instead. Observed pixels are copied
      from ``x`` bit for bit.
    - All S chains (or S resampled completions) of all B images are one batch; ``completions[s, b]`` is
      completion s of image b.

Randomness comes from ``generator`` (default: torch's global generator): z through
``pyvae.ops.reparameterize`` (seeded from it), the Bernoulli draws, the Metropolis uniforms and the
resampling from ``torch.rand``/``torch.multinomial`` with it. The same seed gives the same result.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import torch

from . import ops

__all__ = ["Inpainting", "Denoising", "inpaint", "denoise", "denoise_importance", "flip_noise", "make_mask",
           "load_mask", "mask_kinds", "completion_metrics", "image_shape_for", "nearest_neighbours",
           "nearest_neighbour_completion", "reliability", "METHODS", "MASK_KINDS"]

PathLike = Union[str, os.PathLike]
MASK_KINDS = ("top-half", "bottom-half", "left-half", "right-half", "random:P")
METHODS = ("importance", "gibbs", "metropolis")
_EPS = 1e-6  # probabilities are clamped to [eps, 1 - eps] for log-likelihoods of completions


def check_unit_interval(likelihood: str, x: torch.Tensor, name: str = "x", where: Optional[torch.Tensor] = None
                        ) -> None:
    """ValueError unless ``x`` (its ``where`` elements, when given) lies in [0, 1] for a likelihood on [0, 1]
    (Bernoulli, continuous Bernoulli): outside it their log-densities are silently wrong, even positive.
    One pass over x: for the evaluation entry points (here, pyvae.models, pyvae.evaluation), not the
    training step (``VAE.forward``)."""
    if likelihood not in ("bernoulli", "continuous-bernoulli"):
        return
    bad = ~((x >= 0) & (x <= 1))  # NaN too
    if where is not None:
        bad &= where
    if bool(bad.any()):
        vals = x[bad].detach()[:5].cpu().tolist()
        raise ValueError(f"{name} must hold values in [0, 1] for the {likelihood} likelihood; found values such "
                         f"as {vals}")


def mask_kinds() -> Tuple[str, ...]:
    """The mask kinds ``make_mask`` knows (besides a ``.npy``/``.png`` file)."""
    return MASK_KINDS


@dataclass
class Inpainting:
    """What ``inpaint`` returns; unpacks as ``completions, mean = inpaint(...)``.

    Attributes:
        completions: ``[S, B, D]``, x's dtype and device; observed pixels equal ``x``.
        mean: ``[B, D]``: for ``"importance"`` the posterior predictive mean E[x_mis | x_obs] (the
            weighted average over all K draws, not the mean of the S resampled completions); for the
            chains, the mean of the completions over S.
        accept_rate: ``[B]`` fraction of accepted Metropolis proposals per image (over the S chains and
            ``steps`` steps), or None (other methods, or ``steps=0``).
        ess: ``[B]`` effective sample size of the importance weights, in [1, K] (``"importance"`` only).
        log_px_obs: ``[B]`` float64 estimate of log p(x_obs) in nats, the observed pixels' marginal
            likelihood from the same weights (``"importance"`` only; a stochastic lower bound in
            expectation, like every importance-sampled log-likelihood).
        method: the method that ran.
    """

    completions: torch.Tensor
    mean: torch.Tensor
    accept_rate: Optional[torch.Tensor] = None
    ess: Optional[torch.Tensor] = None
    log_px_obs: Optional[torch.Tensor] = None
    method: str = "gibbs"

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield self.completions
        yield self.mean


@dataclass
class Denoising:
    """What ``denoise_importance`` returns.

    Attributes:
        mean: ``[B, D]`` P(x = 1 | x_noisy), the posterior predictive of the clean pixels.
        ess: ``[B]`` effective sample size of the importance weights, in [1, K].
        log_px_noisy: ``[B]`` float64 estimate of log p(x_noisy) under the model and the flip channel.
    """

    mean: torch.Tensor
    ess: torch.Tensor
    log_px_noisy: torch.Tensor


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


# ------------------------------------------------------------------ importance sampling
# NOTE: [Masked log-likelihood]
# log p(x_obs | z) is the decoder's log-likelihood summed over the observed pixels only. The fused ops
# (bernoulli_log_prob, gaussian_log_prob) sum over every pixel and take no mask, so the missing pixels are
# made to contribute exactly 0 and the fused op does the rest: Bernoulli, logit -1e4 with target 0
# (0 * l - softplus(-1e4) = 0, softplus underflows to 0 in float32 and float64, and the ops are exact at
# logits of +-1e4, README "Extremes"); continuous Bernoulli, logit 0 with x = 1/2 (at logit 0 it is the
# uniform density on [0, 1], log-density exactly 0); Gaussian, mean = x with logvar = -log(2 pi)
# (-0.5 (log 2 pi + lv + 0) = 0 up to rounding, ~1e-7 per pixel). The cost is one masked_fill (where) pass
# over the decoder output per evaluation; a masked op would save it, not worth a kernel at these sizes
# (the decoder GEMMs dominate).
_MASKED_LOGIT = -1e4
_MASKED_LOGVAR = -math.log(2.0 * math.pi)

# NOTE: [Fitted proposal]
# The importance proposal r(z) for an image is a mixture of M diagonal Gaussians (``components``, 2 by
# default), each fitted to that image before any weight is computed:
#   1. candidates: the encoder's q(z | x~) on completed inputs x~: the observed pixels with the missing ones
#      filled by each of ``fills`` (e.g. background, the mean image, the training images nearest on the
#      observed pixels), and by E[x | z] of the prior draws z that best explain the evidence (``screen``
#      draws decoded once, the best M per image); the M candidates whose means score best on
#      log p(evidence | mu) + log p(mu) are kept (one decoder pass per candidate);
#   2. fit: ``fit_steps`` Adam steps (lr 0.1, 4 draws per step) on each component's own ELBO of the
#      evidence, E_q[log p(x_obs | z)] - KL(q || N(0, I)), per image (the encoder has never seen a half
#      image, so its q is off: the amortization gap);
#   3. spread: each fitted std times 1.2 (an ELBO fit is narrower than the posterior; importance sampling
#      needs the proposal's tails wider than the target's), equal mixture weights, K draws stratified over
#      the components (ceil/floor of K / M each) and weighted against the whole mixture density
#      (deterministic-mixture weights), so a component that missed the posterior costs draws, not bias.
# Chosen by measurement on the README's MNIST-5k model (docs/INFERENCE.md, "Choosing the proposal"): the
# issue's encoder-on-mean-image proposal with doubled std had ESS ~3 of 2000 draws; refitting a Gaussian to
# the weighted draws and redrawing (adaptive importance sampling) needed ~16000 draws to reach the
# log p(x_obs) this gets from 160 fit draws and 500 weighted ones; of the cheap settings it is the closest
# to a 20000-draw reference predictive. Spread 1.0 gave a lower log p(x_obs), 1.5 and 2.0 a lower ESS and a
# worse predictive; full-covariance and Student-t proposals were no better.
_FIT_DRAWS = 4
_FIT_LR = 0.1
_SPREAD = 1.2
_CHUNK_ELEMENTS = 1 << 25  # images per chunk: n * chunk * D decoder outputs of this many elements at most


class _Missing:
    """Inpainting evidence: the observed pixels of ``x [b, D]`` (``obs`` bool ``[b, D]``, True = observed)."""

    def __init__(self, model, x: torch.Tensor, obs: torch.Tensor):
        self.model, self.x, self.obs, self.missing = model, x, obs, ~obs
        self.x0 = x.masked_fill(self.missing, 0.0)

    def complete(self, fill: torch.Tensor) -> torch.Tensor:
        """The encoder's input for a fill ``[..., b, D]`` of the missing pixels."""
        return torch.where(self.obs, self.x, fill)

    def log_lik(self, decoded, inplace: bool = False) -> torch.Tensor:
        """log p(x_obs | z), ``[..., b, D] -> [..., b]`` (NOTE: [Masked log-likelihood]). ``inplace``: the
        decoder's output may be overwritten (one pass less over it; no autograd)."""
        if self.model.likelihood == "bernoulli":
            masked = decoded.masked_fill_(self.missing, _MASKED_LOGIT) if inplace else \
                decoded.masked_fill(self.missing, _MASKED_LOGIT)
            return self.model.log_px(self.x0, masked)
        if self.model.likelihood == "continuous-bernoulli":
            # A missing pixel as logit 0, x = 1/2: the uniform density on [0, 1], log-density exactly 0.
            # (Not in place: the draws of output="sample" read the decoder's logits afterwards.)
            masked = decoded.masked_fill(self.missing, 0.0)
            return self.model.log_px(self.x.masked_fill(self.missing, 0.5), masked)
        mean, logvar = decoded
        return self.model.log_px(self.x, (torch.where(self.obs, mean, self.x),
                                          logvar.masked_fill(self.missing, _MASKED_LOGVAR)))

    def predict(self, decoded) -> torch.Tensor:
        """E[x | z] ``[..., b, D]`` (the missing pixels' predictive given z)."""
        return self.model.mean_from(decoded)

    def draw(self, pred: torch.Tensor, decoded, generator) -> torch.Tensor:
        """A draw of x from p(x | z) given ``pred = predict(decoded)`` (Bernoulli) or ``decoded`` (Gaussian,
        continuous Bernoulli)."""
        if self.model.likelihood == "bernoulli":
            return (_rand(pred.shape, generator, pred) < pred).to(pred.dtype)
        return _draw_x(self.model, decoded, generator)


class _Flipped:
    """Denoising evidence: ``noisy [b, D]`` (binary), each clean bit flipped with probability ``flip``.

    p(noisy = 1 | z) = flip + (1 - 2 flip) sigmoid(l) for decoder logits l, and given z the clean bit's
    posterior has logit l + (2 noisy - 1) log((1 - flip) / flip). Neither is a fused op (the channel is
    pyvae.inference's, not the model's): a few torch expressions per evaluation, denoising only.
    """

    def __init__(self, model, noisy: torch.Tensor, flip: float):
        self.model, self.noisy, self.flip = model, noisy, float(flip)
        if self.flip > 0:
            self.shift = (2.0 * noisy - 1.0) * math.log((1.0 - self.flip) / self.flip)
            self.k = math.log1p(-2.0 * self.flip) - math.log(self.flip)

    def complete(self, image: torch.Tensor) -> torch.Tensor:
        """The encoder's input for a candidate clean image: the image itself."""
        return image

    def log_lik(self, decoded, inplace: bool = False) -> torch.Tensor:
        """log p(noisy | z) summed over D: the Bernoulli log-prob of the channel's logits."""
        if self.flip == 0:
            return ops.bernoulli_log_prob(decoded, self.noisy)
        # log p(noisy = 1 | z) = log f + softplus(logsigmoid(l) + k), k = log((1 - 2f) / f); likewise for 0
        # with -l: the channel's logit is the difference of the two softplus terms.
        F = torch.nn.functional
        logits = F.softplus(F.logsigmoid(decoded) + self.k) - F.softplus(F.logsigmoid(-decoded) + self.k)
        return ops.bernoulli_log_prob(logits, self.noisy)

    def predict(self, decoded) -> torch.Tensor:
        """P(x = 1 | z, noisy) ``[..., b, D]`` (exactly ``noisy`` when flip is 0)."""
        if self.flip == 0:
            return self.noisy.expand_as(decoded)
        return torch.sigmoid(decoded + self.shift)

    def draw(self, pred: torch.Tensor, decoded, generator) -> torch.Tensor:
        return (_rand(pred.shape, generator, pred) < pred).to(pred.dtype)


class _Frozen:
    """Parameters of ``model`` not requiring grad inside the block (restored after): the proposal fit
    differentiates through the decoder for mu and logvar only, and the weight gradients would be waste."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)
        return False


def _take(decoded, idx: torch.Tensor):
    """Rows ``idx [S, b]`` (draw indices) of ``decoded [K, b, D]`` (or a (mean, logvar) pair): ``[S, b, D]``."""
    if isinstance(decoded, tuple):
        return tuple(_take(t, idx) for t in decoded)
    return decoded.gather(0, idx.unsqueeze(-1).expand(*idx.shape, decoded.shape[-1]))


def _fit_proposal(model, evidence, mu: torch.Tensor, logvar: torch.Tensor, steps: int,
                  generator: Optional[torch.Generator]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``steps`` Adam steps on each Gaussian's ELBO of the evidence; ``mu, logvar [M, b, Z]`` (NOTE:
    [Fitted proposal], step 2)."""
    if steps == 0:
        return mu, logvar
    mu = mu.detach().clone().requires_grad_(True)
    logvar = logvar.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([mu, logvar], lr=_FIT_LR)
    with torch.enable_grad(), _Frozen(model):
        for _ in range(steps):
            z = ops.reparameterize(mu, logvar, samples=_FIT_DRAWS, generator=generator)  # [L, M, b, Z]
            elbo = evidence.log_lik(model.decode(z)).mean(0) - ops.gaussian_kl(mu, logvar)  # [M, b]
            opt.zero_grad(set_to_none=True)
            (-elbo.sum()).backward()
            opt.step()
    return mu.detach(), logvar.detach()


def _importance(model, evidence, starts: torch.Tensor, screen: int, draws: int, fit_steps: int, components: int,
                samples: int, output: str, generator: Optional[torch.Generator]):
    """Self-normalized importance sampling of one chunk of b images (NOTE: [Fitted proposal]).

    Args:
        starts: ``[C, b, D]`` encoder inputs of the first C candidates.
        screen: prior draws z ~ N(0, I) decoded once and scored on each image's evidence; the
            ``components`` best of them give more candidates (the encoder on their E[x | z], completed).

    Returns:
        ``(mean [b, D], completions [S, b, D], ess [b], log_evidence [b] float64)``.
    """
    b = starts.shape[1]
    dt = _model_param(model).dtype
    if screen:
        zeros = starts.new_zeros(screen, 1, model.z_dim).to(dt)
        zp = ops.reparameterize(zeros, zeros, generator=generator)  # z ~ N(0, I)
        dec = model.decode(zp)  # [P, 1, D]
        best = evidence.log_lik(dec).nan_to_num(float("-inf")).topk(min(components, screen), 0).indices  # [m, b]
        images = model.mean_from(dec)[:, 0][best]  # [m, b, D]
        starts = torch.cat([starts, evidence.complete(images.to(starts.dtype))])
    mu0, logvar0 = model.encode(starts)
    mu0, logvar0 = mu0.to(dt), logvar0.to(dt)
    C, Z = mu0.shape[0], mu0.shape[2]
    zero = mu0.new_zeros(1)
    M = min(components, C)
    if M < C:  # keep the M candidates whose means explain the evidence best
        score = evidence.log_lik(model.decode(mu0)) + ops.gaussian_log_prob(mu0, zero, zero)  # [C, b]
        keep = score.nan_to_num(float("-inf")).topk(M, 0).indices.unsqueeze(-1).expand(M, b, Z)
        mu0, logvar0 = mu0.gather(0, keep), logvar0.gather(0, keep)
    mu, logvar = _fit_proposal(model, evidence, mu0, logvar0, fit_steps, generator)
    logvar = logvar + 2.0 * math.log(_SPREAD)
    per = -(-draws // M)
    z = ops.reparameterize(mu, logvar, samples=per, generator=generator).reshape(per * M, b, Z)[:draws]
    # draw n * M + c comes from component c: component c has ceil((K - c) / M) of the K draws
    counts = torch.tensor([(draws - c + M - 1) // M for c in range(M)], dtype=mu.dtype, device=mu.device)
    log_alpha = (counts / draws).log().view(M, 1)
    log_r = torch.logsumexp(ops.gaussian_log_prob(z.unsqueeze(1), mu, logvar) + log_alpha, 1)  # [K, b]
    decoded = model.decode(z)
    pred = evidence.predict(decoded)  # before log_lik, which may overwrite decoded
    # the draws of output="sample" read decoded where pred is not enough (Gaussian, continuous Bernoulli;
    # their log_lik leaves it as it is), pred where log_lik overwrites the logits (Bernoulli)
    keep = model.likelihood != "bernoulli"
    log_w = evidence.log_lik(decoded, inplace=True) + ops.gaussian_log_prob(z, zero, zero) - log_r
    log_w = log_w.nan_to_num(float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    w = torch.softmax(log_w, 0)  # [K, b]
    mean = torch.einsum("kb,kbd->bd", w, pred)
    ess = 1.0 / (w * w).sum(0)
    log_evidence = torch.logsumexp(log_w.double(), 0) - math.log(draws)
    g_dev = generator.device if generator is not None else w.device
    idx = torch.multinomial(w.T.to(g_dev), samples, replacement=True, generator=generator).T.to(w.device)
    picked = _take(pred, idx)
    comp = picked if output == "mean" else evidence.draw(picked, _take(decoded, idx) if keep else None, generator)
    return mean, comp, ess, log_evidence


def _chunks(b: int, d: int, draws: int, screen: int, components: int, candidates: int
            ) -> Iterator[Tuple[int, int]]:
    """Row ranges of the b images for ``_importance``: it holds ``[n, chunk, D]`` tensors for n = the K
    draws, the ``screen`` prior draws scored on every image, the fit's draws and the candidates, so a chunk
    is ``_CHUNK_ELEMENTS / (n D)`` images with n the largest of those."""
    n = max(draws, screen, _FIT_DRAWS * components, candidates + min(components, screen))
    step = max(1, _CHUNK_ELEMENTS // max(1, n * d))
    for i in range(0, b, step):
        yield i, min(b, i + step)


def _fill_rows(fill, B: int, D: int, like: torch.Tensor, name: str) -> torch.Tensor:
    """A fill (number, ``[D]`` or ``[B, D]`` tensor) as ``[B, D]`` in ``like``'s dtype and device."""
    if isinstance(fill, torch.Tensor):
        if tuple(fill.shape) not in ((D,), (B, D), (1, D)) or fill.device != like.device:
            raise ValueError(f"{name} must be a number or a [{D}] / [{B}, {D}] tensor on {like.device}, got "
                             f"{tuple(fill.shape)} on {fill.device}")
        if not bool(torch.isfinite(fill).all()):  # (NaN made NaN encodings: a multinomial error, NaN completions)
            raise ValueError(f"{name} must hold finite values")
        return fill.to(like.dtype).expand(B, D)
    if isinstance(fill, bool) or not isinstance(fill, (int, float)) or not math.isfinite(fill):
        raise TypeError(f"{name} must be a finite number or a tensor, got {fill!r}")
    return torch.full((B, D), float(fill), dtype=like.dtype, device=like.device)


def _inpaint_importance(model, x, m, samples, generator, output, draws, fit_steps, components, fills, screen
                        ) -> Inpainting:
    B, D = x.shape
    dt = _model_param(model).dtype
    xd = x.to(dt)
    if fills is None:
        fills = (0.0,)
    if isinstance(fills, torch.Tensor):
        if fills.dim() != 3:
            raise ValueError(f"fills as one tensor must be [C, B, D] (C fills), got shape {tuple(fills.shape)}")
        fills = list(fills.unbind(0))
    elif not isinstance(fills, (list, tuple)) or len(fills) == 0:
        raise ValueError(f"fills must be a non-empty sequence of numbers or [D] / [B, D] tensors, got {fills!r}")
    filled = torch.stack([torch.where(m, xd, _fill_rows(f, B, D, xd, f"fills[{i}]")) for i, f in enumerate(fills)])
    mean = torch.empty(B, D, dtype=dt, device=x.device)
    comp = torch.empty(samples, B, D, dtype=dt, device=x.device)
    ess = torch.empty(B, dtype=dt, device=x.device)
    log_ev = torch.empty(B, dtype=torch.float64, device=x.device)
    for i, j in _chunks(B, D, draws, screen, components, len(fills)):
        mean[i:j], comp[:, i:j], ess[i:j], log_ev[i:j] = _importance(
            model, _Missing(model, xd[i:j], m[i:j]), filled[:, i:j], screen, draws, fit_steps, components,
            samples, output, generator)
    comp = torch.where(m, x, comp.to(x.dtype))
    mean = torch.where(m, x, mean.to(x.dtype))
    return Inpainting(comp, mean, None, ess.to(x.dtype), log_ev, "importance")


# ------------------------------------------------------------------------------ inpainting
@torch.no_grad()
def inpaint(model, x: torch.Tensor, mask: torch.Tensor, steps: int = 20, samples: int = 1,
            generator: Optional[torch.Generator] = None, metropolis: bool = False, *, method: Optional[str] = None,
            output: str = "mean", chain: str = "sample", init: Union[float, torch.Tensor] = 0.0,
            draws: int = 500, fit_steps: int = 20, components: int = 2, fills=None, screen: int = 64
            ) -> Inpainting:
    """Fills the missing pixels (``mask == 0``) of ``x`` given the observed ones.

    Args:
        model: a trained ``pyvae.models.VAE`` (any decoder); put in eval mode by you.
        x: ``[B, D]`` float tensor on the model's device; its missing pixels are ignored.
        mask: ``[D]`` or ``[B, D]`` bool/int/float tensor on x's device, 1 = observed, 0 = missing.
        steps: chain iterations after the first pass (``"gibbs"``/``"metropolis"``; 0: one encode -> z ->
            decode pass). Not used by ``"importance"``.
        samples: S, completions per image (chains, or draws resampled from the importance weights).
        generator: torch generator for every random draw (default: torch's global one).
        metropolis: the same as ``method="metropolis"`` (kept for existing callers).
        method: ``"importance"`` (default), ``"gibbs"`` or ``"metropolis"`` (module docstring).
        output: "mean" (E[x_mis | z], the decoder's probabilities for Bernoulli) or "sample" (a draw of
            x_mis, binary for Bernoulli) at the missing pixels of the completions.
        chain: "sample" (the chain carries draws of x_mis) or "mean" (it carries E[x_mis | z]); chains only,
            not with ``metropolis``.
        init: chains: fill of the missing pixels before the first pass: a number, or a ``[D]``/``[B, D]``
            tensor. The default 0 (background) works best on MNIST (docs/INFERENCE.md).
        draws: importance: K, weighted draws of z per image.
        fit_steps: importance: Adam steps fitting each proposal component (0: the encoder's q as it is).
        components: importance: M, Gaussians in each image's proposal mixture.
        fills: importance: the fills of the missing pixels whose encodings are the candidate proposals
            (a sequence of numbers / ``[D]`` / ``[B, D]`` tensors, or a ``[C, B, D]`` tensor); default
            ``(0.0,)``. ``pyvae.runs.inpaint_run`` passes 0, the training-set mean image and the six
            training images nearest on the observed pixels.
        screen: importance: prior draws z ~ N(0, I) decoded once and scored on each image's observed pixels;
            the observed pixels completed by E[x | z] of the best ``components`` of them are more candidates
            (0: none). Needs no training data.

    Returns:
        ``Inpainting(completions [S, B, D], mean [B, D], accept_rate, ess, log_px_obs, method)`` in x's
        dtype (``log_px_obs`` float64); it unpacks as ``completions, mean``.

    Raises:
        TypeError: non-tensor or non-float ``x``, non-tensor ``mask``, bad fills. ValueError: wrong shapes,
        non-binary mask values, tensors on different devices, bad ``steps``/``samples``/``output``/``chain``/
        ``method``/``draws``/``fit_steps``/``components``.
    """
    _check_model(model)
    _check_x(model, x)
    m = _check_mask(mask, x)
    check_unit_interval(model.likelihood, x, "x (at its observed pixels)", where=m)
    _check_int("steps", steps, 0)
    S = _check_int("samples", samples, 1)
    _check_generator(generator)
    if method is None:
        method = "metropolis" if metropolis else "importance"
    elif method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    elif metropolis and method != "metropolis":
        raise ValueError(f"metropolis=True means method='metropolis', but method={method!r} was given")
    if output not in ("mean", "sample"):
        raise ValueError(f"output must be 'mean' or 'sample', got {output!r}")
    if chain not in ("sample", "mean"):
        raise ValueError(f"chain must be 'sample' or 'mean', got {chain!r}")
    if method == "metropolis" and chain != "sample":
        raise ValueError("metropolis=True needs chain='sample' (the acceptance ratio is for draws of x_mis)")
    if method == "importance":
        _check_int("draws", draws, 1)
        _check_int("fit_steps", fit_steps, 0)
        _check_int("components", components, 1)
        _check_int("screen", screen, 0)
        return _inpaint_importance(model, x, m, S, generator, output, draws, fit_steps, components, fills, screen)
    return _inpaint_chain(model, x, m, steps, S, generator, method == "metropolis", output, chain, init)


def _inpaint_chain(model, x, m, steps, S, generator, metropolis, output, chain, init) -> Inpainting:
    """Pseudo-Gibbs (Metropolis-within-Gibbs with ``metropolis``): S chains per image as one batch."""
    B, D = x.shape
    dt = _model_param(model).dtype
    fill0 = _fill_rows(init, B, D, x.new_empty(0, dtype=dt), "init")

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
    return Inpainting(comp, comp.mean(0), rate, method="metropolis" if metropolis else "gibbs")


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


def _check_flip(model, x_noisy: torch.Tensor, flip) -> float:
    if isinstance(flip, bool) or not isinstance(flip, (int, float)) or not 0.0 <= float(flip) < 0.5:
        raise ValueError(f"flip must be a probability in [0, 0.5), got {flip!r}")
    if model.likelihood != "bernoulli":
        raise ValueError("flip (the bit-flip noise model) needs a Bernoulli model")
    if not bool(((x_noisy == 0) | (x_noisy == 1)).all()):
        raise ValueError("with flip, x_noisy must be binary (0/1)")
    return float(flip)


@torch.no_grad()
def denoise_importance(model, x_noisy: torch.Tensor, flip: float, *, draws: int = 500, fit_steps: int = 20,
                       components: int = 2, starts=None, screen: int = 64,
                       generator: Optional[torch.Generator] = None) -> Denoising:
    """The posterior predictive of the clean image under the bit-flip noise model, by importance sampling.

    p(x | x_noisy) ~= sum_k w_k prod_d P(x_d | z_k, x_noisy_d), w_k ∝ p(x_noisy | z_k) p(z_k) / r(z_k), with
    p(x_noisy | z) = prod_d [flip + (1 - 2 flip) pi_d(z)]^x_noisy_d [...]^(1 - x_noisy_d) (each clean bit
    flipped with probability ``flip``) and the fitted proposal r of ``inpaint`` (NOTE: [Fitted proposal]).

    Args:
        model: a trained Bernoulli ``pyvae.models.VAE``.
        x_noisy: ``[B, D]`` binary float tensor on the model's device.
        flip: the noise's bit-flip probability in [0, 0.5).
        draws, fit_steps, components, screen: as in ``inpaint``.
        starts: the images whose encodings are the candidate proposals: a sequence of ``[B, D]`` tensors
            (or a ``[C, B, D]`` tensor); default: ``x_noisy`` and ``denoise(model, x_noisy, flip=flip)``.
        generator: torch generator for every draw.

    Returns:
        ``Denoising(mean [B, D], ess [B], log_px_noisy [B] float64)``.
    """
    _check_model(model)
    _check_x(model, x_noisy, "x_noisy")
    flip = _check_flip(model, x_noisy, flip)
    _check_int("draws", draws, 1)
    _check_int("fit_steps", fit_steps, 0)
    _check_int("components", components, 1)
    _check_int("screen", screen, 0)
    _check_generator(generator)
    B, D = x_noisy.shape
    dt = _model_param(model).dtype
    noisy = x_noisy.to(dt)
    if starts is None:
        starts = [noisy, _denoise_encoder(model, noisy, 1, 0, None, flip)]
    if isinstance(starts, torch.Tensor):
        if starts.dim() != 3:
            raise ValueError(f"starts as one tensor must be [C, B, D], got shape {tuple(starts.shape)}")
        starts = list(starts.unbind(0))
    if not isinstance(starts, (list, tuple)) or len(starts) == 0:
        raise ValueError(f"starts must be a non-empty sequence of [B, D] tensors, got {starts!r}")
    for i, t in enumerate(starts):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"starts[{i}] must be a [B, D] tensor, got {type(t).__name__}")
    stack = torch.stack([_fill_rows(t, B, D, noisy, f"starts[{i}]") for i, t in enumerate(starts)])
    mean = torch.empty(B, D, dtype=dt, device=x_noisy.device)
    ess = torch.empty(B, dtype=dt, device=x_noisy.device)
    log_ev = torch.empty(B, dtype=torch.float64, device=x_noisy.device)
    for i, j in _chunks(B, D, draws, screen, components, len(starts)):
        mean[i:j], _, ess[i:j], log_ev[i:j] = _importance(
            model, _Flipped(model, noisy[i:j], flip), stack[:, i:j], screen, draws, fit_steps, components,
            1, "mean", generator)
    return Denoising(mean.to(x_noisy.dtype), ess.to(x_noisy.dtype), log_ev)


@torch.no_grad()
def denoise(model, x_noisy: torch.Tensor, steps: int = 1, samples: int = 0,
            generator: Optional[torch.Generator] = None, flip: Optional[float] = None, *,
            method: Optional[str] = None, **importance) -> torch.Tensor:
    """Denoises ``x_noisy``: the flip noise model's posterior predictive, or reconstructions through the model.

    ``method="importance"`` (the default when ``flip`` is given): ``denoise_importance(model, x_noisy, flip,
    generator=generator, **importance).mean``, P(x = 1 | x_noisy) by importance sampling; ``steps`` and
    ``samples`` are not used.

    ``method="encoder"`` (the default without ``flip``): x <- E[x | z] with z from q(z | x), ``steps`` times.
    With ``flip`` (Bernoulli models), each step returns P(x = 1 | z, x_noisy) = pi q / (pi q + (1 - pi)(1 - q))
    with pi = P(x = 1 | z) and q = P(x_noisy | x = 1) = 1 - flip where x_noisy = 1, flip where 0, averaged
    over the z draws (z from the encoder on the noisy image). More steps drift toward the model's typical
    images (docs/INFERENCE.md): keep ``steps=1``.

    Args:
        model: a trained ``pyvae.models.VAE``.
        x_noisy: ``[B, D]`` float tensor on the model's device (e.g. ``flip_noise(x, 0.1)``).
        steps: ``"encoder"``: reconstructions in a row (1: ``model.reconstruct``).
        samples: ``"encoder"``: 0 to decode the posterior mean z = mu(x) (deterministic), or L >= 1 to
            average over L draws z ~ q(z | x).
        generator: torch generator for the z draws.
        flip: the noise's bit-flip probability in [0, 0.5), or None to ignore the noise model.
        method: ``"importance"`` (needs ``flip``) or ``"encoder"``; None picks as above.
        **importance: ``draws``, ``fit_steps``, ``components``, ``starts``, ``screen`` of ``denoise_importance``.

    Returns:
        ``[B, D]`` tensor in x_noisy's dtype: probabilities for Bernoulli models (threshold at 0.5 for a
        binary image), the decoder's mean for Gaussian ones.
    """
    _check_model(model)
    _check_x(model, x_noisy, "x_noisy")
    check_unit_interval(model.likelihood, x_noisy, "x_noisy")
    _check_int("steps", steps, 1)
    _check_int("samples", samples, 0)
    _check_generator(generator)
    if method is None:
        method = "encoder" if flip is None else "importance"
    if method not in ("importance", "encoder"):
        raise ValueError(f"method must be 'importance' or 'encoder', got {method!r}")
    if method == "importance":
        if flip is None:
            raise ValueError("method='importance' needs flip (the noise model is its likelihood)")
        return denoise_importance(model, x_noisy, flip, generator=generator, **importance).mean
    if importance:
        raise TypeError(f"{sorted(importance)} are arguments of method='importance'")
    if flip is not None:
        flip = _check_flip(model, x_noisy, flip)
    dt = _model_param(model).dtype
    return _denoise_encoder(model, x_noisy.to(dt), steps, samples, generator, flip).to(x_noisy.dtype)


def _denoise_encoder(model, noisy, steps, samples, generator, flip):
    if flip is not None:
        like1 = torch.where(noisy > 0.5, 1.0 - flip, flip)  # P(x_noisy | x = 1)
    dt = noisy.dtype
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
    return cur


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


def reliability(pred: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, bins: int = 10) -> Dict[str, object]:
    """Calibration of predicted probabilities at the missing pixels (``mask == 0``): equal-width bins of the
    predicted probability P(x = 1), and in each the mean prediction and the observed frequency of x = 1.

    Args:
        pred: ``[B, D]`` predicted probabilities; x: ``[B, D]`` binary truth; mask: ``[D]`` or ``[B, D]``,
            1 = observed (pass zeros to use every pixel).
        bins: number of bins over [0, 1].

    Returns:
        ``{"edges": [bins + 1] list, "confidence": [bins] mean prediction per bin (NaN where empty),
        "frequency": [bins] fraction of x = 1 per bin (NaN where empty), "count": [bins] pixels per bin,
        "ece": sum over bins of count / total * |frequency - confidence|}`` (plain Python numbers).
    """
    _check_int("bins", bins, 1)
    miss = (mask == 0).expand_as(x)
    p = pred.double()[miss].clamp(0, 1)
    t = (x.double()[miss] > 0.5).double()
    which = (p * bins).long().clamp_max(bins - 1)
    count = torch.bincount(which, minlength=bins).double()
    conf = torch.bincount(which, weights=p, minlength=bins) / count
    freq = torch.bincount(which, weights=t, minlength=bins) / count
    total = max(1.0, count.sum().item())
    ece = ((count / total) * (freq - conf).abs()).nan_to_num(0.0).sum().item()
    return {"edges": torch.linspace(0, 1, bins + 1).tolist(), "confidence": conf.tolist(),
            "frequency": freq.tolist(), "count": [int(c) for c in count.tolist()], "ece": ece}


# ------------------------------------------------------------------------------- baselines
def nearest_neighbours(x: torch.Tensor, mask: torch.Tensor, train: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Indices of the ``k`` rows of ``train`` closest to each row of ``x`` on that row's observed pixels
    (squared Euclidean distance over ``mask == 1``), nearest first.

    Args:
        x: ``[B, D]``; mask: ``[D]`` or ``[B, D]``, 1 = observed; train: ``[N, D]`` (e.g. the training set),
            on x's device.
        k: neighbours per row, at most N.

    Returns:
        ``[B, k]`` int64 tensor.
    """
    if not isinstance(train, torch.Tensor) or train.dim() != 2 or train.shape[1] != x.shape[1]:
        raise ValueError(f"train must be an [N, {x.shape[1]}] tensor, got "
                         f"{tuple(train.shape) if isinstance(train, torch.Tensor) else type(train).__name__}")
    _check_int("k", k, 1)
    if k > train.shape[0]:
        raise ValueError(f"k must be at most the {train.shape[0]} rows of train, got {k}")
    B, D = x.shape
    m = mask.to(train.dtype).expand(B, D)
    xo = x.to(train.dtype) * m
    sq = train * train
    out = []
    step = max(1, _CHUNK_ELEMENTS // max(1, train.shape[0]))
    for i in range(0, B, step):
        # sum_obs (x - t)^2 = sum_obs x^2 - 2 x.t + t^2; the first term is the same for every t
        d = (m[i:i + step] @ sq.T) - 2.0 * (xo[i:i + step] @ train.T)  # [b, N]
        out.append(d.topk(k, 1, largest=False).indices)
    return torch.cat(out)


def nearest_neighbour_completion(x: torch.Tensor, mask: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """The baseline completion: the missing pixels of each row of ``x`` copied from the ``train`` row
    closest on its observed pixels (``nearest_neighbours``, k = 1); observed pixels are ``x``'s.

    Returns:
        ``[B, D]`` in x's dtype.
    """
    idx = nearest_neighbours(x, mask, train, 1)[:, 0]
    return torch.where((mask != 0).expand_as(x), x, train[idx].to(x.dtype))

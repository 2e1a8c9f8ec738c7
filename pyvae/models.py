"""The variational auto-encoder of Kingma & Welling (2013) and its estimators, on pyvae's fused ops.

``VAE`` has a Gaussian MLP encoder q(z|x) = N(mu(x), diag(exp(logvar(x)))) and a Bernoulli (logits),
continuous-Bernoulli (logits; the normalized density on [0, 1] of Loaiza-Ganem & Cunningham 2019, for
grey levels) or Gaussian (sigmoid mean, learned log-variance; the paper's Frey Face decoder) MLP decoder
p(x|z), with the prior p(z) = N(0, I). Estimators, all per datapoint (``[B]``):

- ``elbo(x, samples=L, estimator="analytic")``: SGVB estimator B (analytic KL, the paper's eq. 7);
  ``estimator="mc"``: estimator A (eq. 6), the mean over L draws of log p(x, z) - log q(z|x).
- ``iwae_bound(x, k)``: the importance-weighted bound of Burda et al. (2015).
- ``log_likelihood(x, samples)``: importance-sampled log p(x) with q as proposal, in bounded memory.

The hot path runs on pyvae's fused ops: ``reparameterize`` (Philox eps drawn in the kernel),
``bernoulli_elbo`` (estimator B for Bernoulli decoders in one pass), ``gaussian_kl``,
``gaussian_log_prob``, ``bernoulli_log_prob``, ``continuous_bernoulli_log_prob``, and the fused linear
layers of ``pyvae.nn``.

Layers: every linear layer is built by ``_linear`` (``pyvae.nn.FusedLinear``, or with ``fused=False`` an
``nn.Linear`` subclass applying the activation in eager torch). Both ARE ``nn.Linear`` subclasses, so
parameter names (``weight``, ``bias``) and state dicts are identical whichever is used, and a
checkpoint loads in both.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Optional, Tuple, Union

import torch
from torch import nn
from torch.nn.modules import module as _torch_module  # its global forward hooks: VAE._elbo_into_logits

from . import ops
from .inference import check_unit_interval
from .nn import FusedLinear, GaussianHead
from .reference import ACTIVATIONS as TORCH_ACTIVATIONS

__all__ = ["VAE", "LIKELIHOODS", "ESTIMATORS", "Shard"]

# torch's global module hooks (private dicts of torch.nn.modules.module; where a torch lacks one, assume some)
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")

LIKELIHOODS = ("bernoulli", "continuous-bernoulli", "gaussian")
_LOGIT_DECODERS = ("bernoulli", "continuous-bernoulli")  # the decoder outputs logits [..., D]
ESTIMATORS = ("analytic", "mc")

Shard = Tuple[int, int]
"""``(row0, global_rows)``: this batch is rows ``[row0, row0 + B)`` of a global batch (data parallel)."""

class _EagerLinear(nn.Linear):
    """``act(nn.Linear(x))`` in eager torch: the stand-in for ``pyvae.nn.FusedLinear`` (same state dict)."""

    def __init__(self, in_features: int, out_features: int, activation: str = "tanh"):
        super().__init__(in_features, out_features)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return TORCH_ACTIVATIONS[self.activation](super().forward(x))


class _EagerGaussianHead(nn.Linear):
    """(mu, logvar) heads as one ``nn.Linear`` of width ``2 * z_dim`` (same layout as pyvae.nn.GaussianHead)."""

    def __init__(self, in_features: int, z_dim: int):
        super().__init__(in_features, 2 * z_dim)
        self.z_dim = z_dim

    def forward(self, x):
        h = super().forward(x)
        return h[..., : self.z_dim], h[..., self.z_dim:]


def _linear(in_features: int, out_features: int, activation: str, fused: bool = True) -> nn.Linear:
    """The one place that chooses the layer implementation (fused or eager; same parameters)."""
    if fused:
        return FusedLinear(in_features, out_features, activation=activation)
    return _EagerLinear(in_features, out_features, activation)


def _gaussian_head(in_features: int, z_dim: int, fused: bool = True) -> nn.Linear:
    if fused:
        return GaussianHead(in_features, z_dim)
    return _EagerGaussianHead(in_features, z_dim)


def _check_int(name: str, v, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


def _check_shard(shard, rows: int) -> Shard:
    """``shard`` as ``(row0, global_rows)`` of ints holding this batch's ``rows`` rows: a shard that ran past
    the global batch would give its last rows the eps of the next sample's first rows (NOTE: [Sharded
    draws] in pyvae/ops/reparameterize.py)."""
    try:
        if len(shard) != 2 or any(isinstance(v, bool) for v in shard):
            raise TypeError
        row0, total = operator.index(shard[0]), operator.index(shard[1])
    except TypeError:
        raise ValueError(f"shard must be a pair of ints (row0, global_rows), got {shard!r}") from None
    if row0 < 0 or row0 + rows > total:
        raise ValueError(f"shard=(row0, global_rows) must satisfy 0 <= row0 and row0 + B <= global_rows for this "
                         f"batch of B={rows} rows, got {shard!r}")
    return row0, total


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 (autocast outputs) to float32; other dtypes unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _reparameterize(mu: torch.Tensor, logvar: torch.Tensor, samples: int, generator: Optional[torch.Generator],
                    shard: Optional[Shard]) -> torch.Tensor:
    """``[L, B, Z]`` z from pyvae's fused reparameterize; one seed per call, drawn from ``generator`` (on
    the device for CUDA inputs, so a captured training step draws anew on each replay: NOTE: [Graph-safe
    seed]). With ``shard``, the draws of those rows of the global batch (NOTE: [Sharded draws] in
    pyvae/ops/reparameterize.py)."""
    # (CPU inputs: the seed as an int, the value seed_for would hold in its host tensor; a tensor while
    # torch.compile or torch.jit.trace traces, or under a dispatch mode: NOTE: [Seeds under torch.compile] in
    # pyvae/ops/reparameterize.py)
    seed = ops.draw_seed(generator) if mu.device.type == "cpu" and not ops.seed_stays_tensor() \
        else ops.seed_for(mu.device, generator)
    return ops.reparameterize_shard(mu, logvar, samples, seed, shard)


class VAE(nn.Module):
    """Variational auto-encoder with MLP encoder and decoder (the paper's Appendix C).

    Args:
        x_dim: data dimension D (e.g. 784).
        z_dim: latent dimension Z (paper: 2..200; 20 by default).
        hidden: units per hidden layer (paper: 500 for MNIST, 200 for Frey Face).
        likelihood: "bernoulli" (decoder outputs logits), "continuous-bernoulli" (logits too; the
            normalized density for x in [0, 1], whose mean is not sigmoid(logits)) or "gaussian"
            (sigmoid mean and a learned per-pixel log-variance, both functions of z, as the paper's Frey
            Face model).
        activation: hidden activation ("tanh" as the paper; "relu", "sigmoid", "softplus").
        layers: hidden layers in each of encoder and decoder (paper: 1).
        init: "default" (PyTorch's nn.Linear init) or "paper" (every weight and bias ~ N(0, 0.01^2)).
        fused: use pyvae's fused linear layers (True) or eager torch layers (False); same parameters.

    Shapes: ``x`` is ``[B, D]`` (any leading batch dims work where noted); ``z`` is ``[..., Z]``.
    """

    def __init__(self, x_dim: int, z_dim: int = 20, hidden: int = 500, likelihood: str = "bernoulli",
                 activation: str = "tanh", layers: int = 1, init: str = "default", fused: bool = True):
        super().__init__()
        _check_int("x_dim", x_dim)
        _check_int("z_dim", z_dim)
        _check_int("hidden", hidden)
        _check_int("layers", layers)
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {list(LIKELIHOODS)}, got {likelihood!r}")
        if activation not in TORCH_ACTIVATIONS or activation == "identity":
            raise ValueError(f"activation must be one of {sorted(set(TORCH_ACTIVATIONS) - {'identity'})}, "
                             f"got {activation!r}")
        if init not in ("default", "paper"):
            raise ValueError(f"init must be 'default' or 'paper', got {init!r}")
        self.x_dim, self.z_dim, self.hidden, self.layers = x_dim, z_dim, hidden, layers
        self.likelihood, self.activation = likelihood, activation
        enc = [x_dim] + [hidden] * layers
        self.encoder = nn.Sequential(*[_linear(a, b, activation, fused) for a, b in zip(enc[:-1], enc[1:])])
        self.enc_head = _gaussian_head(hidden, z_dim, fused)
        dec = [z_dim] + [hidden] * layers
        self.decoder = nn.Sequential(*[_linear(a, b, activation, fused) for a, b in zip(dec[:-1], dec[1:])])
        if likelihood in _LOGIT_DECODERS:
            self.dec_logits = _linear(hidden, x_dim, "identity", fused)
        else:
            self.dec_mean = _linear(hidden, x_dim, "sigmoid", fused)
            self.dec_logvar = _linear(hidden, x_dim, "identity", fused)
        if init == "paper":
            for p in self.parameters():
                nn.init.normal_(p, 0.0, 0.01)

    elbo_into_logits: bool = True
    """Training (``forward``, Bernoulli, analytic KL): the fused ELBO may write d ELBO / d logits over the
    decoder's logits, an intermediate no one else sees, instead of a fresh ``[L, B, D]`` tensor each step
    (NOTE: [ELBO gradient into the logits] in pyvae/ops/bernoulli_elbo.py). Not while ``dec_logits`` (or
    every module) has forward hooks, which could keep the logits. The graph of such a step can then be
    differentiated once (no ``retain_graph`` second backward, no ``create_graph``): set False on the model
    (or the class) for those."""

    one_node: bool = True
    """Training (``forward``, Bernoulli, analytic KL, one draw, ``kl_weight`` 1, no shard, eager CPU float32 or
    float64 without autocast, the fused layers with no module or saved-tensor hooks, ``VAE`` and its containers
    as built, not subclassed: ``_node_layers``, ``ops.vae_elbo_mode_ok`` and ``ops.vae_elbo_layers_ok``): the whole
    objective runs as one autograd node (NOTE: [One-node VAE step] in pyvae/ops/vae_step.py), with the layers'
    own routes and kernels and the same gradients as the layered graph, without its per-node work. Like
    ``elbo_into_logits`` (which it needs), its graph can be differentiated once: set False on the model (or the
    class) for retain_graph, double backward, or to see each layer in autograd's graph (hooks on a layer's
    tensors, the profiler)."""

    def _node_layers(self):
        """``(weight, bias, activation)`` of every layer for ``ops.vae_elbo``, or None where the one-node step
        does not apply to this model's modules (eager layers, a subclass's ``encode`` or ``_decoder_input``, a
        container subclass, module hooks anywhere)."""
        if not self.one_node or self.likelihood != "bernoulli" or not self._elbo_into_logits():
            return None
        if any(getattr(_torch_module, h, True) for h in _GLOBAL_HOOKS):
            return None
        # what the layered forward calls, unchanged: a subclass's encode or decoder input, a container's forward,
        # would be bypassed
        cls = type(self)
        if (cls.encode is not VAE.encode or cls._decoder_input is not VAE._decoder_input
                or type(self.encoder) is not nn.Sequential or type(self.decoder) is not nn.Sequential):
            return None
        seq = (*self.encoder, self.enc_head, *self.decoder, self.dec_logits)
        for m in (self, self.encoder, self.decoder, *seq):
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
                return None
        if type(self.enc_head) is not GaussianHead or any(type(m) is not FusedLinear
                                                          for m in seq if m is not self.enc_head):
            return None
        return [(m.weight, m.bias, m.activation) for m in seq]

    def _elbo_into_logits(self) -> bool:
        # torch keeps the global forward hooks in a private dict: where a torch has none, assume some
        global_hooks = getattr(_torch_module, "_global_forward_hooks", True)
        return self.elbo_into_logits and not self.dec_logits._forward_hooks and not global_hooks

    def config(self) -> dict:
        """Constructor arguments (without ``init``/``fused``) as a plain dict, for checkpoints."""
        return dict(x_dim=self.x_dim, z_dim=self.z_dim, hidden=self.hidden, likelihood=self.likelihood,
                    activation=self.activation, layers=self.layers)

    # ------------------------------------------------------------------------- the networks
    def _check_x(self, x, name: str = "x", batch: bool = False) -> torch.Tensor:
        """Type and shape of ``x [..., D]``; ``batch``: at least ``[B, D]`` (the estimators draw z per row)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.x_dim:
            raise ValueError(f"{name} must have shape [..., {self.x_dim}] (x_dim), got {tuple(x.shape)}")
        if batch and x.dim() < 2:
            raise ValueError(f"{name} must have shape [B, {self.x_dim}] (a batch of rows; x[None] for one), "
                             f"got {tuple(x.shape)}")
        return x

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """q(z|x): ``x [..., D] -> (mu [..., Z], logvar [..., Z])`` (float32 under autocast)."""
        self._check_x(x)
        mu, logvar = self.enc_head(self.encoder(x))
        return _wide(mu), _wide(logvar)  # the ELBO terms are computed in float32 under autocast

    def _decoder_input(self, z: torch.Tensor) -> torch.Tensor:
        """z in the dtype of a half-precision model's decoder (one cast with ``.to(torch.bfloat16)``, not under
        autocast): z is drawn in float32, from the widened mu and logvar, and the layers take one dtype."""
        w = self.decoder[0].weight.dtype
        if z.dtype != w and w in (torch.float16, torch.bfloat16) and not torch.is_autocast_enabled(z.device.type):
            return z.to(w)
        return z

    def decode(self, z: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """p(x|z)'s parameters: (continuous) Bernoulli ``logits [..., D]``; Gaussian ``(mean [..., D],
        logvar [..., D])``."""
        if not isinstance(z, torch.Tensor) or z.dim() < 1 or z.shape[-1] != self.z_dim:
            raise ValueError(f"z must be a tensor of shape [..., {self.z_dim}] (z_dim), got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
        h = self.decoder(self._decoder_input(z))
        if self.likelihood in _LOGIT_DECODERS:
            return _wide(self.dec_logits(h))
        return _wide(self.dec_mean(h)), _wide(self.dec_logvar(h))

    def mean_from(self, decoded) -> torch.Tensor:
        """E[x|z] ``[..., D]`` from ``decode(z)``'s output: sigmoid(logits) (Bernoulli), the continuous
        Bernoulli's mean ``pyvae.ops.continuous_bernoulli_mean(logits)``, or the mean (Gaussian)."""
        if self.likelihood == "bernoulli":
            return torch.sigmoid(decoded)
        if self.likelihood == "continuous-bernoulli":
            return ops.continuous_bernoulli_mean(decoded)
        return decoded[0]

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        """E[x|z] ``[..., D]`` (see ``mean_from``)."""
        return self.mean_from(self.decode(z))

    def log_px(self, x: torch.Tensor, decoded) -> torch.Tensor:
        """log p(x|z) summed over D, from ``decoded = decode(z)``: ``x [B, D] -> [..., B]``."""
        if self.likelihood == "bernoulli":
            return ops.bernoulli_log_prob(decoded, x.to(decoded.dtype))
        if self.likelihood == "continuous-bernoulli":
            return ops.continuous_bernoulli_log_prob(decoded, x.to(decoded.dtype))
        return ops.gaussian_log_prob(x.to(decoded[0].dtype), decoded[0], decoded[1])

    def log_px_given_z(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over D: ``x [B, D]``, ``z [..., B, Z] -> [..., B]``."""
        return self.log_px(x, self.decode(z))

    # ---------------------------------------------------------------------------- estimators
    @staticmethod
    def _log_pz_qz(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(log p(z), log q(z|x)) for ``z [..., B, Z]``: the standard normal prior and the encoder's Gaussian."""
        zero = z.new_zeros(1)
        return ops.gaussian_log_prob(z, zero, zero), ops.gaussian_log_prob(z, mu, logvar)

    def log_weight(self, x: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                   decoded=None) -> torch.Tensor:
        """The log importance weight log p(x, z) - log q(z|x) = log p(x|z) + log p(z) - log q(z|x).

        Args:
            x: ``[B, D]``; z: ``[..., B, Z]`` draws from q(z|x) = N(mu, exp(logvar)); mu, logvar: ``[B, Z]``.
            decoded: ``decode(z)`` when already computed (else it is computed here).

        Returns:
            ``[..., B]``. Every estimator of pyvae built on importance weights (SGVB A, the IWAE bound,
            log p(x), the Metropolis step of inpainting) uses this one.
        """
        log_pz, log_qz = self._log_pz_qz(z, mu, logvar)
        return self.log_px(x, self.decode(z) if decoded is None else decoded) + log_pz - log_qz

    def forward(self, x: torch.Tensor, samples: int = 1, estimator: str = "analytic", kl_weight: float = 1.0,
                generator: Optional[torch.Generator] = None, shard: Optional[Shard] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training objective (what ``DistributedDataParallel`` wraps).

        Args:
            x: ``[B, D]`` targets (binary for Bernoulli, in [0, 1] allowed; in [0, 1] for the continuous
                Bernoulli).
            samples: L, draws of z per datapoint.
            estimator: "analytic" (SGVB B) or "mc" (SGVB A).
            kl_weight: beta in ``recon - beta * KL`` (KL warm-up), a finite number; 1 is the ELBO.
            generator: torch generator the eps seed is drawn from (default: torch's global one; for CUDA
                inputs the device's default CUDA generator, NOTE: [Graph-safe seed]).
            shard: ``(row0, global_rows)`` for data-parallel training (see ``_reparameterize``): ints with
                ``0 <= row0`` and ``row0 + B <= global_rows``.

        Returns:
            ``(objective [B], elbo [B], kl [B])``: the objective to maximize (differentiable; equals
            the ELBO when ``kl_weight == 1``), and the detached ELBO and KL (analytic KL for "analytic";
            the MC estimate of E_q[log q(z|x) - log p(z)] for "mc").

        x's values are not checked here (a pass over x each training step): ``elbo`` checks them.
        """
        self._check_x(x, batch=True)
        _check_int("samples", samples)
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {list(ESTIMATORS)}, got {estimator!r}")
        # (abs < inf, not math.isfinite: torch.compile traces a changing float, a KL warm-up's, as a symbolic
        # float, which math.isfinite does not take: a graph break, an error under fullgraph=True)
        if isinstance(kl_weight, bool) or not isinstance(kl_weight, numbers.Real) or not abs(kl_weight) < math.inf:
            raise ValueError(f"kl_weight must be a finite real number, got {kl_weight!r}")
        if shard is not None:
            shard = _check_shard(shard, x.shape[-2])
        if (estimator == "analytic" and samples == 1 and shard is None and not torch.compiler.is_compiling()
                and kl_weight == 1.0 and ops.vae_elbo_mode_ok(x)):
            layers = self._node_layers()
            if layers is not None and ops.vae_elbo_layers_ok(x, layers, self.z_dim, len(self.encoder)):
                # NOTE: [One-node VAE step] in pyvae/ops/vae_step.py: the seed drawn as _reparameterize draws it
                elbo, kl = ops.vae_elbo(x, layers, len(self.encoder), self.z_dim, ops.draw_seed(generator))
                return elbo, elbo.detach(), kl
        mu, logvar = self.encode(x)
        z = _reparameterize(mu, logvar, samples, generator, shard)
        if estimator == "analytic":
            if self.likelihood == "bernoulli":
                # L = 1: the decoder and the ELBO on [B, *] (the same products and terms as on [1, B, *], without
                # the batched matmul's reshapes in forward and backward)
                logits = self.dec_logits(self.decoder(self._decoder_input(z[0] if samples == 1 else z)))
                if logits.dtype not in (mu.dtype, torch.bfloat16):
                    logits = _wide(logits)
                # bfloat16 logits (CPU autocast) go to the ELBO as they are: NOTE: [bfloat16 logits] in
                # csrc/cpu/kernels.cpp (the numbers of widening them first, without the two casts)
                # the logits are this model's own intermediate: their storage may take their gradient
                elbo = (ops.bernoulli_elbo_into_logits if self._elbo_into_logits() else ops.bernoulli_elbo)(
                    logits, x.to(mu.dtype), mu, logvar)
                # (traced by torch.compile, the general form below for every kl_weight, elbo + 0.0 * kl at 1.0: a
                # test of a symbolic float for == 1.0 specializes it, and a KL warm-up's every new value then
                # recompiles. The same numbers while the KL is finite.)
                if not torch.compiler.is_compiling() and kl_weight == 1.0:
                    with torch.no_grad():
                        kl = ops.gaussian_kl(mu, logvar)
                    return elbo, elbo.detach(), kl
                kl = ops.gaussian_kl(mu, logvar)
                return elbo + (1.0 - kl_weight) * kl, elbo.detach(), kl.detach()
            kl = ops.gaussian_kl(mu, logvar)
            rec = self.log_px_given_z(x, z).mean(0)
            return rec - kl_weight * kl, (rec - kl).detach(), kl.detach()
        rec = self.log_px_given_z(x, z).mean(0)
        log_pz, log_qz = self._log_pz_qz(z, mu, logvar)
        kl = (log_qz - log_pz).mean(0)  # the MC estimate of KL(q || p): minus the latent part of log_weight
        return rec - kl_weight * kl, (rec - kl).detach(), kl.detach()

    def elbo(self, x: torch.Tensor, samples: int = 1, estimator: str = "analytic",
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The SGVB estimate of the ELBO per datapoint (differentiable).

        Args:
            x: ``[B, D]`` (in [0, 1] for the Bernoulli and continuous-Bernoulli likelihoods).
            samples: L >= 1 draws of z per datapoint.
            estimator: "analytic" (SGVB B: E_q[log p(x|z)] by L draws minus the analytic KL) or "mc"
                (SGVB A: mean over L draws of log p(x|z) + log p(z) - log q(z|x)).
            generator: torch generator for the eps seed.

        Returns:
            ``[B]`` tensor.
        """
        self._check_x(x, batch=True)
        check_unit_interval(self.likelihood, x)
        return self.forward(x, samples, estimator, 1.0, generator)[0]

    def iwae_bound(self, x: torch.Tensor, k: int = 50, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The importance-weighted bound log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x).

        ``k == 1`` is the ELBO (SGVB A with L = 1); the bound is non-decreasing in k in expectation.

        Memory: ``O(k * B * D)`` (the k draws are one batch through the decoder, with its graph when a
        gradient is wanted). For a large k without a gradient, ``log_likelihood`` computes the same
        estimator in chunks of draws.

        Args:
            x: ``[B, D]`` (in [0, 1] for the Bernoulli and continuous-Bernoulli likelihoods).
            k: number of importance samples.
            generator: torch generator for the eps seed.

        Returns:
            ``[B]`` tensor (differentiable), computed with a stable log-mean-exp.
        """
        self._check_x(x, batch=True)
        _check_int("k", k)
        check_unit_interval(self.likelihood, x)
        mu, logvar = self.encode(x)
        z = _reparameterize(mu, logvar, k, generator, None)
        return torch.logsumexp(self.log_weight(x, z, mu, logvar), 0) - math.log(k)

    @torch.no_grad()
    def log_likelihood(self, x: torch.Tensor, samples: int = 5000, batch: int = 500,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Importance-sampled estimate of log p(x) with q(z|x) as the proposal (the paper's Figure 3).

        ``log (1/S) sum_s p(x, z_s) / q(z_s|x)`` with S = ``samples`` draws taken ``batch`` at a time and
        combined by a running log-sum-exp, so memory is ``O(batch * B * D)`` whatever S is.

        Args:
            x: ``[B, D]`` (in [0, 1] for the Bernoulli and continuous-Bernoulli likelihoods).
            samples: S, total importance samples per datapoint.
            batch: draws per chunk.
            generator: torch generator for the eps seeds.

        Returns:
            ``[B]`` tensor (no gradient).
        """
        self._check_x(x, batch=True)
        _check_int("samples", samples)
        _check_int("batch", batch)
        check_unit_interval(self.likelihood, x)
        mu, logvar = self.encode(x)
        acc = None
        done = 0
        while done < samples:
            c = min(batch, samples - done)
            z = _reparameterize(mu, logvar, c, generator, None)
            lse = torch.logsumexp(self.log_weight(x, z, mu, logvar).double(), 0)
            acc = lse if acc is None else torch.logaddexp(acc, lse)
            done += c
        return (acc - math.log(samples)).to(mu.dtype)

    # ---------------------------------------------------------------------------- generation
    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None, binary: bool = False) -> torch.Tensor:
        """``n`` draws from the model: z ~ N(0, I), then E[x|z] (default) or a draw of x (``binary``).

        Returns:
            ``[n, D]`` tensor on the model's device.
        """
        _check_int("n", n)
        p = next(self.parameters())
        z = torch.randn((n, self.z_dim), generator=generator, dtype=p.dtype,
                        device=generator.device if generator is not None else "cpu").to(p.device)
        m = self.mean(z)
        if binary:
            if self.likelihood == "bernoulli":
                return torch.bernoulli(m, generator=generator if m.device.type == "cpu" else None)
            raise ValueError("binary=True needs the bernoulli likelihood")
        return m

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x | z = mu(x)]: ``x [..., D] -> [..., D]`` (deterministic reconstruction)."""
        mu, _ = self.encode(x)
        return self.mean(mu.to(next(self.parameters()).dtype))

    # ------------------------------------------------------------ marginal inference on x
    def inpaint(self, x: torch.Tensor, mask: torch.Tensor, **kwargs):
        """Fills the ``mask == 0`` pixels of ``x [B, D]``; see :func:`pyvae.inference.inpaint`."""
        from .inference import inpaint

        return inpaint(self, x, mask, **kwargs)

    def denoise(self, x_noisy: torch.Tensor, **kwargs) -> torch.Tensor:
        """Reconstructs ``x_noisy [B, D]`` through the model; see :func:`pyvae.inference.denoise`."""
        from .inference import denoise

        return denoise(self, x_noisy, **kwargs)

"""The training objective of an MLP VAE with a Bernoulli decoder as one autograd node (``pyvae.VAE``'s eager
CPU training step).

NOTE: [One-node VAE step]
In a training step of ``pyvae.VAE`` (Bernoulli decoder, analytic KL, one draw) autograd sees one node per
layer, one for the draw, one for the ELBO, and the views, copies and gradient sums between them: at the
paper's batch (B=100) that bookkeeping is a share of a step's time beside its GEMMs (bench/RESULTS.md,
"Stop 22": ``pyvae bench train --providers pyvae pyvae-layered``). So ``vae_elbo`` computes the whole objective
in one ``autograd.Function``: its forward runs every layer, the draw and the one-pass ELBO, keeping what the
backward reads; its backward runs the layers' backward in reverse and returns the gradients of every weight
and bias at once.

Nothing is computed differently from the layered graph:
- each layer runs on the route the layer itself would take (NOTE: [Layer routes] in linear_act.py;
  ``linear_act.route_of``), or where the step was raced as a whole on its pick (NOTE: [Step routes]), with the
  same functions: pyvae's node's forward and backward, or for torch's route the ops of torch's own forward and
  autograd formulas;
- the draw is ``reparameterize``'s kernel with the same seed word (``host_draw_seed``), so the same z;
- the ELBO is the planned one-pass kernel with its gradient written over the logits (NOTE: [ELBO gradient into
  the logits] in bernoulli_elbo.py), rescaled as there when the upstream gradient is not the expected one;
- mu's and logvar's gradients are the draw's plus the ELBO's, as autograd sums them.
- the head's gradient is the two slices' gradients, each +0.0 outside its slice, as autograd sums them.
So the outputs and gradients are those of the layered graph on the same routes bit for bit
(tests/test_vae_step.py), and the step runs the same kernels and GEMMs as the layered one, less the per-node
work.

Like the ELBO into the logits, the graph can be differentiated once: a second backward (retain_graph) or
create_graph=True raises, naming ``VAE.one_node``, the switch that turns this path off. Where the node would not
compute what the layered forward computes (an activation on the head or the logits layer, a subclass's ``encode``,
a container subclass, module or saved-tensor hooks, inference mode: ``vae_elbo_mode_ok``, ``vae_elbo_layers_ok``
and ``VAE._node_layers``), the layered graph runs.

NOTE: [One-node step under autocast]
Under CPU autocast to bfloat16 (``pyvae train --precision bf16-mixed``), a float32 model's layered step has a
cast per layer input and parameter, widens the head's two halves to float32 (``VAE.encode``), draws in float32,
narrows z for the decoder and hands the bfloat16 logits to the ELBO (NOTE: [bfloat16 logits] in
csrc/cpu/kernels.cpp), with a cast node in autograd's graph for each. The node does the same inside: x and
every weight and bias cast once with ``.to(bfloat16)`` (the values of autocast's casts), the layers on the
routes measured for their autocast keys (``route_of(..., amp)``), mu and logvar widened, z narrowed; in
backward each weight's and bias's gradient widened to float32, z's gradient widened before the draw's backward
and the head's narrowed after the sum, where the cast nodes would. Bit for bit the layered step on every route
(tests/test_vae_step.py); 5-7% faster at B = 100 .. 8192 on the Zen 5 EPYC (bench/RESULTS.md, "Stop 25").
float16 autocast, and autocast of a float64 model (which autocast leaves alone), take the layered graph.
"""
from __future__ import annotations

import contextlib
from typing import List, Sequence, Tuple

import torch

from ._registry import eager_ok
from .bernoulli_elbo import forward_into_logits, into_logits_ok, rescale_written
from .gaussian_kl import gaussian_kl
from .. import _tune
from ._registry import remember
from .linear_act import STEP_ROUTES, backward_on_route, forward_on_route, route_key, route_of
from .reparameterize import host_draw_seed, kept_draw

__all__ = ["vae_elbo", "vae_elbo_layers_ok", "vae_elbo_mode_ok"]


class _Spec:
    """What a call fixes besides its tensors: activations, routes, sizes, the encoder's depth."""

    __slots__ = ("acts", "routes", "n_enc", "z_dim", "seed", "draw", "amp")

    def __init__(self, acts, routes, n_enc, z_dim, seed, draw, amp):
        self.acts, self.routes, self.n_enc, self.z_dim, self.seed, self.draw = acts, routes, n_enc, z_dim, seed, draw
        self.amp = amp  # the CPU autocast dtype (NOTE: [One-node step under autocast]) or None


_ONCE = ("pyvae.VAE: this one-node training step (NOTE: [One-node VAE step] in pyvae/ops/vae_step.py) can be "
         "differentiated once and not with create_graph=True; set VAE.one_node = False (or VAE.elbo_into_logits = "
         "False) for retain_graph or double backward")


class _VAEStep(torch.autograd.Function):
    # What the backward reads: x and the parameters through save_for_backward (so that an in-place change of
    # one before backward is torch's error, as in the layered graph); the intermediates, which only this node
    # ever sees, in ctx.inter, each dropped as soon as the backward is done with it (autograd would free a
    # layered graph's saved tensors node by node; held to the end, they raised the peak at B=8192 by a
    # quarter). Per layer: (its input, its output where its activation's derivative reads it, torch's
    # softplus pre-activation or None); then logvar and eps for the draw's backward.
    @staticmethod
    def forward(ctx, spec: _Spec, x, *params):
        n, amp = len(spec.acts), spec.amp
        # Under autocast the layers compute in amp from casts of x and the parameters, as autocast casts them
        # for each layer (NOTE: [One-node step under autocast]); the float32 tensors are kept for the checks.
        cast = params if amp is None else [t.to(amp) for t in params]
        h = x if amp is None else x.to(amp)
        inter = []
        for i in range(n):
            w, b = cast[2 * i], cast[2 * i + 1]
            if i == spec.n_enc + 1:  # the decoder's input: the draw from the head's output
                head = h
                Z = spec.z_dim
                if amp is None:
                    mu, logvar = head[:, :Z].contiguous(), head[:, Z:].contiguous()
                else:  # VAE.encode widens the head's two halves to float32
                    mu, logvar = head[:, :Z].float(), head[:, Z:].float()
                z, eps = spec.draw.forward_keeping_eps(mu, logvar, spec.seed, 0)
                h = z if amp is None else z.to(amp)
            y, pre = forward_on_route(spec.routes[i], h, w, b, spec.acts[i])
            inter.append([None if i == 0 and amp is None else h, None if spec.acts[i] == "identity" else y, pre])
            h = y
        logits = h  # the last layer's output: this node's own, overwritten by its gradient
        elbo, g_mu, g_lv, ctx.scale = forward_into_logits(logits, x, mu, logvar)
        # The KL as the layered step computes it, on its route: without grad, of tensors that require grad (the
        # row op's route key records that and their layout: NOTE: [Row op routes] in _rowwise.py): views of the
        # head, or under autocast its widened halves.
        with torch.enable_grad():
            if amp is None:
                hv = head.detach().requires_grad_()
                mu_v, lv_v = hv[:, :spec.z_dim], hv[:, spec.z_dim:]
            else:
                mu_v, lv_v = mu.detach().requires_grad_(), logvar.detach().requires_grad_()
        kl = gaussian_kl(mu_v, lv_v)
        ctx.spec = spec
        ctx.written = (logits, g_mu, g_lv)
        ctx.inter = (inter, logvar, eps, None if amp is None else cast)
        ctx.save_for_backward(x, *params)
        ctx.mark_non_differentiable(kl)
        return elbo, kl

    @staticmethod
    def backward(ctx, grad, _grad_kl):
        if ctx.written is None or torch.is_grad_enabled():
            raise RuntimeError(_ONCE)
        spec, amp = ctx.spec, ctx.spec.amp
        x, *params = ctx.saved_tensors
        g_l, g_mu, g_lv = ctx.written  # g_l: the logits' storage, holding d ELBO / d logits (times expected)
        inter, logvar, eps, cast = ctx.inter
        ctx.written = ctx.inter = None
        rescale_written(grad, *ctx.scale, g_l, g_mu, g_lv)
        if cast is not None:
            params = cast
        del cast
        n = len(inter)
        grads: List = [None] * (2 * n)
        g = g_l
        del g_l
        for i in reversed(range(n)):
            inp, y, pre = inter.pop()
            gx, gw, gb = backward_on_route(spec.routes[i], g, x if inp is None else inp, params[2 * i], y, pre, True,
                                           spec.acts[i], (i > 0, True, True))
            del inp, y, pre
            if amp is not None:  # back to the parameters' float32, as the casts' backward does
                params[2 * i] = params[2 * i + 1] = None  # (the casts, dropped once used)
                gw, gb = gw.float(), gb.float()
            grads[2 * i], grads[2 * i + 1] = gw, gb
            if i == spec.n_enc + 1:  # gx is z's gradient: through the draw to mu and logvar, plus the ELBO's
                if amp is not None:
                    gx = gx.float()
                d_mu, d_lv = spec.draw.backward(gx, (None, logvar), spec.seed, 0, eps)
                # (+ 0.0: the layered graph sums the two slices' gradients, each zero outside its slice, so a
                # -0.0 of either comes out +0.0 there; under autocast each half is narrowed to amp first)
                gx = torch.cat([d_mu.add_(g_mu), d_lv.add_(g_lv)], dim=1)
                gx = (gx if amp is None else gx.to(amp)).add_(0.0)
                del d_mu, d_lv, logvar, eps, g_mu, g_lv
            g = gx
        return (None, None, *grads)


def vae_elbo(x: torch.Tensor, layers: Sequence[Tuple[torch.Tensor, torch.Tensor, str]], encoder_layers: int,
             z_dim: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(elbo [B], kl [B])`` of an MLP VAE with a Bernoulli decoder, analytic KL and one draw, as one autograd
    node (NOTE: [One-node VAE step]); kl is not differentiable.

    ``layers``: ``(weight, bias, activation)`` of the encoder's ``encoder_layers`` hidden layers, the Gaussian
    head (identity, ``2 * z_dim`` outputs: mu then logvar), the decoder's hidden layers and the logits layer
    (identity). ``x`` ``[B, D]``, contiguous, of the weights' dtype (float32 or float64), not differentiated;
    every weight and bias differentiable; ``seed`` a host seed (``draw_seed``). For callers that have checked
    all this (``pyvae.VAE``): nothing is validated here.
    """
    rows = x.shape[0]
    acts = tuple(a for _, _, a in layers)
    amp = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    # (under autocast a layer's input is float32 where the layered step feeds it float32: x and z)
    x_dtypes = [x.dtype if amp is None or i in (0, encoder_layers + 1) else amp for i in range(len(layers))]
    routes = tuple(route_of(rows, i > 0, w, b, a, amp, x_dtypes[i]) for i, (w, b, a) in enumerate(layers))
    params = [t for w, b, _ in layers for t in (w, b)]
    spec = _Spec(acts, routes, encoder_layers, z_dim, host_draw_seed(seed, rows, z_dim),
                 kept_draw((rows, z_dim), x.dtype), amp)
    k = (routes, rows, x.dtype, amp, encoder_layers, z_dim, tuple((w.shape, b is not None, a) for w, b, a in layers),
         torch.get_num_threads(), _STEP_RACE["on"])
    step_routes = STEP_ROUTES.get(k)
    if step_routes is None:
        step_routes = remember(STEP_ROUTES, k, _step_routes(spec, x, layers, params), 256)
    spec.routes = step_routes
    return _VAEStep.apply(spec, x, *params)


# NOTE: [Step routes]
# Each layer's route is raced alone (NOTE: [Layer routes] in linear_act.py), and inside a step the layers do not
# add up to their races. On the Zen 4 EPYC at B=100 (fp32, forward + backward; bench/RESULTS.md, "Stop 25"), with
# the layer races' mix of routes (784->500 on pyvae's, the other three on torch's), `pyvae bench train` ran
# pyvae-fused (every layer on pyvae's route) 1.04-1.13x faster than that step in 13 runs, though the two
# steps' fastest calls were level and moving any single layer to pyvae's route gained nothing (ad hoc). So where
# the layers' picks are a mix, the one-node step races the step itself, once per shape class: the layers' picks,
# every layer on pyvae's route and every layer on torch's, each timed as STEP_BLOCK whole training steps of this
# node through autograd, on the call's own x and on detached leaves sharing the parameters' storage (nothing is
# written to the parameters or their gradients, nor drawn from torch's generator: the draw's seed is the call's;
# the upstream gradient is the one the ELBO expects, so its expectation stays the caller's). The race is
# ``_tune.decide``'s (interleaved, early stop, disturbed and undecided races, the cache; ties go to the layers'
# picks) by the median call (STEP_RACE): the gain is in the typical step, not the fastest. Two versions that did
# not find it: calling the node's forward and backward directly, outside autograd's engine, picked every layer
# on torch's route by the fastest call, by the median, and in blocks of four steps, and the benchmark ran that
# step no faster than the mix. The race is bounded by its cost: only where the layers' races put STEP_BLOCK steps
# under STEP_RACE_MS (the paper's model at B=100; at larger batches the GEMMs dominate and their races decide),
# never where a layer's route is pinned and the step's is not (tests, a resumed run from before the step race;
# a resumed run runs its step's pinned pick) or tuning is off. The routes differ in speed only:
# a step's values are those of the layered graph on the same routes, bit for bit, and the routes agree to
# rounding.
STEP_RACE_MS = 30.0  # the layers' estimated step time above which the step is not raced
# by the median call (the gain is in the typical step); the budget of a layer race
STEP_RACE = {"stat": "median", "budget_s": 0.3}
STEP_BLOCK = 2  # steps per timed call
_STEP_CANDIDATES = ("layers", "pyvae", "torch")
_STEP_RACE = {"on": True}


@contextlib.contextmanager
def no_step_race():
    """One-node steps run their layers' own routes, unraced, inside this block (``pyvae bench train``'s
    pyvae-no-step-race provider: what the race of NOTE: [Step routes] buys, timed beside it)."""
    saved, _STEP_RACE["on"] = _STEP_RACE["on"], False
    try:
        yield
    finally:
        _STEP_RACE["on"] = saved


def _step_routes(spec: _Spec, x, layers, params) -> tuple:
    """The layer routes of this shape class's one-node step (NOTE: [Step routes])."""
    routes, n = spec.routes, len(spec.routes)
    if not (_STEP_RACE["on"] and _tune.enabled()) or len(set(routes)) == 1:  # (fused_only: every route pyvae's)
        return routes
    rows = x.shape[0]
    cand = {"layers": routes, "pyvae": ("pyvae",) * n, "torch": ("torch",) * n}
    skey = (f"vae_step {str(spec.amp or x.dtype).replace('torch.', '')}{' autocast' if spec.amp else ''} "
            f"rows<={1 << max(rows - 1, 0).bit_length()} "
            + " ".join(f"{w.shape[1]}->{w.shape[0]}{'' if b is not None else ' nobias'} {a}:{r}"
                       for (w, b, a), r in zip(layers, routes)))
    # a resumed run's own pick of the step first, as of its layers (NOTE: [Routes of a run] in pyvae/_tune.py);
    # a run whose layers are pinned and its step not (a run from before the step race) runs its layers' routes
    choice = _tune.pin(skey)
    if choice not in cand and any(_tune.pin(route_key(rows, w, b, a, spec.amp)) is not None for w, b, a in layers):
        return routes
    if choice not in cand:
        choice = _tune.lookup(skey)
    if choice not in cand:
        entries = _tune.entries()
        keys = [route_key(rows, w, b, a, spec.amp) for w, b, a in layers]
        est = sum(entries.get(key, {}).get("ms", {}).get(r, float("inf")) for key, r in zip(keys, routes))
        if not est * STEP_BLOCK <= STEP_RACE_MS:
            return routes
        choice = _tune.decide(skey, {c: _timed_step(spec, cand[c], x, params) for c in _STEP_CANDIDATES},
                              what=f"the one-node VAE step at {rows} rows ({'+'.join(routes)} by layer)",
                              **STEP_RACE)
    _tune.note(skey, choice)
    return cand[choice]


def _timed_step(spec: _Spec, routes, x, params):
    """A call of STEP_BLOCK training steps of the node on ``routes`` (NOTE: [Step routes]), on leaves that share
    the parameters' storage, not their gradients."""
    s = _Spec(spec.acts, routes, spec.n_enc, spec.z_dim, spec.seed, spec.draw, spec.amp)
    leaves = [p.detach().requires_grad_() for p in params]

    def call():
        for _ in range(STEP_BLOCK):
            for t in leaves:
                t.grad = None
            elbo, _ = _VAEStep.apply(s, x, *leaves)
            # the upstream gradient the ELBO expects (NOTE: [Expected upstream gradient] in bernoulli_elbo.py),
            # so that nothing is rewritten and the expectation stays the caller's
            with torch.autocast("cpu", enabled=False):  # as backward runs, outside the forward's autocast
                (elbo * elbo.grad_fn.scale[0]).sum().backward()
    return call


_saved_tensors_hooks = torch._C._autograd._top_saved_tensors_default_hooks


def vae_elbo_mode_ok(x) -> bool:
    """The first half of whether ``vae_elbo`` takes a training step's call, on ``x`` and the mode alone (tested
    before ``pyvae.VAE`` gathers its layers, ~20 us a step, spent for nothing without grad;
    ``vae_elbo_layers_ok`` is the second half): plain eager mode with gradients on (not in inference mode), no
    autocast but CPU autocast to bfloat16 of a float32 x (NOTE: [One-node step under autocast]), no saved-tensor
    hooks, and a contiguous non-empty float32/float64 CPU ``x [B, D]`` that is not differentiated."""
    if not (torch.is_grad_enabled() and type(x) is torch.Tensor and x.is_cpu and x.dim() == 2 and x.shape[0] > 0
            and x.dtype in (torch.float32, torch.float64) and not x.requires_grad and x.is_contiguous()
            and not torch.is_inference_mode_enabled()):
        return False
    # autocast: only CPU autocast to bfloat16 of a float32 model (NOTE: [One-node step under autocast])
    if torch._C._is_any_autocast_enabled() and not (
            x.dtype == torch.float32 and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return False
    # The intermediates are held on the node, not saved through autograd: where saved-tensor hooks are active
    # (save_on_cpu, non-reentrant checkpointing, a user's pack hooks) the layered graph lets them act on each.
    return _saved_tensors_hooks(False) is None


def vae_elbo_layers_ok(x, layers: Sequence[Tuple[torch.Tensor, torch.Tensor, str]], z_dim: int,
                       encoder_layers: int) -> bool:
    """The second half, for an ``x`` that ``vae_elbo_mode_ok`` passed: the head (layer ``encoder_layers``,
    ``2 * z_dim`` outputs) and the logits layer without activation, every weight and bias a differentiable CPU
    tensor of x's dtype, and an ELBO gradient that can be written over the logits (NOTE: [ELBO gradient into
    the logits])."""
    # The head and the logits layer have no activation (the logits' storage receives their gradient, which an
    # activation's backward would read as its output).
    if len(layers) < 3 or layers[-1][2] != "identity" or any(w.dim() != 2 for w, _, _ in layers):
        return False
    params = [t for w, b, _ in layers for t in (w, b)]
    if not eager_ok(x, *params):
        return False
    for t in params:
        if t is None or not t.requires_grad or t.dtype != x.dtype or not t.is_cpu:
            return False
    head = layers[encoder_layers][0] if 0 <= encoder_layers < len(layers) - 2 else None
    if head is None or layers[encoder_layers][2] != "identity" or head.shape[0] != 2 * z_dim:
        return False
    return into_logits_ok(x.shape[0], x.shape[1], z_dim, x.dtype)

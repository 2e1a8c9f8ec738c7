"""Numbers for docs/INFERENCE.md, "Choosing the proposal": the importance-sampled posterior predictive
p(x_mis | x_obs) under several proposals, on all test images of a run.

    python docs/inference/proposals.py RUN [MASK] [THREADS]

Prints, per proposal: log-lik and error rate at the missing pixels (and their ratio to the training-set
mean image's), the median effective sample size, the mean estimate of log p(x_obs) (higher is a better
estimate: importance estimates are low in expectation), and the wall time.
"""
import math
import sys
import time

import torch

from pyvae import ops
from pyvae.checkpoint import load_model
from pyvae.inference import completion_metrics, inpaint, make_mask, nearest_neighbours
from pyvae.runs import run_data

run = sys.argv[1]
kind = sys.argv[2] if len(sys.argv) > 2 else "top-half"
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
model, ckpt = load_model(run)
model.eval()
data, x = run_data(ckpt)
B, D = x.shape
mask = make_mask(kind, (B, *data.image_shape), generator=torch.Generator().manual_seed(0))
obs = mask.bool()
mean_img = data.train.mean(0)
base = completion_metrics(mean_img.expand_as(x), x, mask)


def log_joint(xb, ob, z):
    """log p(x_obs | z) + log p(z) and E[x | z] for z [K, b, Z] (the library's masking, written out)."""
    logits = model.decode(z)
    probs = torch.sigmoid(logits)
    lpx = ops.bernoulli_log_prob(logits.masked_fill(~ob, -1e4), xb.masked_fill(~ob, 0.0))
    return lpx + ops.gaussian_log_prob(z, z.new_zeros(1), z.new_zeros(1)), probs


def finish(lw, probs):
    w = torch.softmax(lw, 0)
    return (torch.einsum("kb,kbd->bd", w, probs), 1.0 / (w * w).sum(0),
            torch.logsumexp(lw.double(), 0) - math.log(lw.shape[0]))


@torch.no_grad()
def encoder_doubled(xb, ob, g, draws=2000):
    """The issue's proposal: q(z | x) on the missing pixels filled with the mean image, std doubled."""
    mu, lv = model.encode(torch.where(ob, xb, mean_img))
    lv = lv + 2 * math.log(2.0)
    z = ops.reparameterize(mu, lv, samples=draws, generator=g)
    lj, probs = log_joint(xb, ob, z)
    return finish(lj - ops.gaussian_log_prob(z, mu, lv), probs)


@torch.no_grad()
def adaptive(xb, ob, g, rounds=(1000,) * 8 + (8000,), widen=2.0):
    """Adaptive importance sampling: start from the encoder on the mean-image fill (std doubled), refit a
    diagonal Gaussian to the weighted draws of all rounds so far (variance x ``widen``), redraw; all draws
    weighted against the mixture of every round's proposal (deterministic mixture)."""
    mu, lv = model.encode(torch.where(ob, xb, mean_img))
    lv = lv + 2 * math.log(2.0)
    props, zs, ljs, ps = [], [], [], []
    for t, n in enumerate(rounds):
        z = ops.reparameterize(mu, lv, samples=n, generator=g)
        lj, probs = log_joint(xb, ob, z)
        props.append((mu, lv, n))
        zs.append(z), ljs.append(lj), ps.append(probs)
        zz, total = torch.cat(zs), sum(p[2] for p in props)
        log_r = torch.logsumexp(torch.stack([ops.gaussian_log_prob(zz, m, v) + math.log(k / total)
                                             for m, v, k in props]), 0)
        lw = torch.cat(ljs) - log_r
        if t + 1 < len(rounds):
            w = torch.softmax(lw, 0).unsqueeze(-1)
            mu = (w * zz).sum(0)
            lv = ((w * (zz - mu) ** 2).sum(0) * widen).clamp_min(1e-4).log()
    return finish(lw, torch.cat(ps))


def chunked(fn, g, size=50):
    outs = [fn(x[i:i + size], obs[i:i + size], g) for i in range(0, B, size)]
    return [torch.cat(o) for o in zip(*outs)]


near = nearest_neighbours(x, mask, data.train, 6)
fills = [0.0, mean_img] + [data.train[near[:, j]] for j in range(6)]  # what pyvae.runs.inpaint_run passes


def library(**kw):
    def fn(g):
        r = inpaint(model, x, mask, generator=g, fills=fills, **kw)
        return r.mean, r.ess, r.log_px_obs
    return fn


variants = [
    ("encoder on the mean-image fill, std x2, K=2000 (the issue's)", lambda g: chunked(encoder_doubled, g)),
    ("adaptive IS, 8 x 1000 + 8000 draws", lambda g: chunked(adaptive, g)),
    ("encoder candidates, no fit (fit_steps=0), K=500", library(fit_steps=0)),
    ("fitted, 1 component, K=500", library(components=1)),
    ("fitted, 10 steps, K=500", library(fit_steps=10)),
    ("fitted (default: 20 steps, 2 components, K=500)", library()),
    ("fitted, K=1000", library(draws=1000)),
    ("fitted, 40 steps, 3 components, K=2000", library(draws=2000, fit_steps=40, components=3)),
]
only = sys.argv[4].split(",") if len(sys.argv) > 4 else None
print(f"{data.name} {kind}: {B} test images; mean image log-lik {base['ll']:.4f}, error rate {base['err']:.4f}")
for i, (name, fn) in enumerate(variants):
    if only and str(i) not in only:
        continue
    t = time.perf_counter()
    pred, ess, lp = fn(torch.Generator().manual_seed(1))
    sec = time.perf_counter() - t
    r = completion_metrics(pred, x, mask)
    print(f"| {name} | {r['ll']:.4f} ({r['ll'] / base['ll']:.3f}) | {r['err']:.4f} ({r['err'] / base['err']:.3f}) | "
          f"{ess.median().item():.1f} | {lp.mean().item():.2f} | {sec:.1f} |", flush=True)

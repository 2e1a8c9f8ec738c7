"""Numbers for docs/INFERENCE.md, "How close to the exact predictive": a reference posterior predictive by
many more draws (20000, 60 fit steps, 4 components), and how far the cheaper settings are from it.

    python docs/inference/reference.py RUN [MASK] [N]      (N test images spread over the test set; ~5 min for 100)
"""
import sys
import time

import torch

from pyvae.checkpoint import load_model
from pyvae.inference import completion_metrics, inpaint, make_mask, nearest_neighbours, reliability
from pyvae.runs import run_data

torch.set_num_threads(2)
run = sys.argv[1]
kind = sys.argv[2] if len(sys.argv) > 2 else "top-half"
n = int(sys.argv[3]) if len(sys.argv) > 3 else 100
model, ckpt = load_model(run)
model.eval()
data, test = run_data(ckpt)
idx = torch.linspace(0, len(test) - 1, n).round().long()
x = test[idx]
mask = make_mask(kind, (len(test), *data.image_shape), generator=torch.Generator().manual_seed(0))[idx]
mean_img = data.train.mean(0)
near = nearest_neighbours(x, mask, data.train, 6)
fills = [0.0, mean_img] + [data.train[near[:, j]] for j in range(6)]
miss = mask == 0
base = completion_metrics(mean_img.expand_as(x), x, mask)


def kl(p, q):
    """Mean KL(Bernoulli(p) || Bernoulli(q)) over the missing pixels (nats/pixel)."""
    p, q = p.double().clamp(1e-6, 1 - 1e-6), q.double().clamp(1e-6, 1 - 1e-6)
    return (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log())[miss].mean().item()


t = time.perf_counter()
ref = inpaint(model, x, mask, generator=torch.Generator().manual_seed(7), fills=fills, draws=20000, fit_steps=60,
              components=4)
print(f"{data.name} {kind}, {n} test images; reference in {time.perf_counter() - t:.0f} s")
for name, kw in [("reference: K=20000, 60 steps, 4 components", None), ("default (K=500, 20 steps, 2 components)", {}),
                 ("10 fit steps", dict(fit_steps=10)), ("no fit (fit_steps=0)", dict(fit_steps=0)),
                 ("K=2000, 40 steps, 3 components", dict(draws=2000, fit_steps=40, components=3))]:
    r = ref if kw is None else inpaint(model, x, mask, generator=torch.Generator().manual_seed(1), fills=fills, **kw)
    a = completion_metrics(r.mean, x, mask)
    print(f"| {name} | {a['ll']:.4f} ({a['ll'] / base['ll']:.3f}) | {a['err']:.4f} ({a['err'] / base['err']:.3f}) | "
          f"{reliability(r.mean, x, mask)['ece']:.4f} | {kl(ref.mean, r.mean):.4f} | {r.ess.median().item():.1f} | "
          f"{r.log_px_obs.mean().item():.2f} |", flush=True)

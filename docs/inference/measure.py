"""Numbers for docs/INFERENCE.md: python docs/inference/measure.py RUN [SAMPLES]"""
import sys, time, torch
torch.set_num_threads(1)
from pyvae.checkpoint import load_model
from pyvae.runs import run_data
from pyvae.inference import inpaint, make_mask, completion_metrics, denoise, flip_noise
run = sys.argv[1]
model, ckpt = load_model(run)
data, test = run_data(ckpt)
x = test
mean_img = data.train.mean(0).expand_as(x)
S = int(sys.argv[2]) if len(sys.argv) > 2 else 10
print(f"test images {x.shape[0]}, samples per image {S}")
for kind in ("top-half", "random:0.5"):
    m = make_mask(kind, (x.shape[0], 28, 28), generator=torch.Generator().manual_seed(0))
    r = completion_metrics(mean_img, x, m)
    print(f"| {kind} | training-set mean image | - | {r['ll']:.4f} | {r['mae']:.4f} | {r['err']:.4f} | - |")
    for met in (False, True):
        for steps in (0, 1, 5, 20, 50):
            if met and steps == 0: continue
            t = time.time()
            res = inpaint(model, x, m, steps=steps, samples=S, generator=torch.Generator().manual_seed(1), method="metropolis" if met else "gibbs")
            r = completion_metrics(res.mean, x, m)
            acc = "-" if res.accept_rate is None else f"{res.accept_rate.mean().item():.3f}"
            print(f"| {kind} | {'Metropolis-within-Gibbs' if met else 'pseudo-Gibbs'} | {steps} | {r['ll']:.4f} | {r['mae']:.4f} | {r['err']:.4f} | {acc} |  ({time.time()-t:.1f} s)", flush=True)
    for steps in (5, 20, 50):
        res = inpaint(model, x, m, steps=steps, samples=S, generator=torch.Generator().manual_seed(1), method="gibbs", chain="mean")
        r = completion_metrics(res.mean, x, m)
        print(f"| {kind} | pseudo-Gibbs, chain='mean' | {steps} | {r['ll']:.4f} | {r['mae']:.4f} | {r['err']:.4f} | - |", flush=True)
g = torch.Generator().manual_seed(2)
noisy = flip_noise(x, 0.1, g)
print(f"flip 0.1: wrong pixels noisy {(noisy != x).double().mean().item():.4f}")
for steps in (1, 2, 5):
    for L in (0, 10):
        d = denoise(model, noisy, steps=steps, samples=L, generator=torch.Generator().manual_seed(3))
        allm = torch.zeros_like(x)
        r = completion_metrics(d, x, allm)
        print(f"| denoise steps={steps} samples={L} | err {r['err']:.4f} | mae {r['mae']:.4f} | ll {r['ll']:.4f} |")
r = completion_metrics(mean_img, x, torch.zeros_like(x)); print("mean image (all pixels)", r)

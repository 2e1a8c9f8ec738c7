"""Plain-PyTorch eager AEVB baseline for the quality bar (docs/AEVB.md).

The same model and protocol as ``pyvae train`` but written only with ``torch.nn`` and the plain-torch
reference math of ``pyvae/reference.py`` (BCE-with-logits and the closed-form KL: the fastest eager
formulation; ``torch.distributions`` adds argument validation and object construction per step at
this size, so it would flatter pyvae): 784-500-20 tanh MLP encoder/decoder, Bernoulli decoder, SGVB estimator B
(analytic KL, L = 1), Adam, batch 100, dynamic binarization (a fresh Bernoulli draw per batch), test
ELBO on the same fixed binarization of the test set (``pyvae.data.load_dataset`` supplies the data only,
so both see identical files and test set).

    python bench/aevb_baseline.py --dataset fashion-mnist --epochs 10 --out bench/results/aevb_baseline.jsonl

Prints one line per epoch and appends one JSON object (per-epoch test ELBO and wall time, machine
info) to ``--out``.

``--compare-pyvae RUN_DIR`` trains pyvae (``pyvae.train.train``, the code behind ``pyvae train``) on the
same data with the same settings, INTERLEAVED epoch by epoch with the baseline (baseline epoch 1, pyvae
epoch 1, baseline epoch 2, ...; pyvae continues exactly from its checkpoint each time). On a shared
machine whose load changes minute to minute, this exposes both to the same conditions; the JSON line
then holds both histories. Wall time counts training and the per-epoch test evaluation, as ``pyvae train``'s
``wall_s`` does (data loading and model construction excluded in both).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from torch import nn

from pyvae import reference as R
from pyvae._tune import cpu_model
from pyvae.benchmarks.common import git_rev, pos_float, pos_int, seed_int
from pyvae.data import DATASETS, load_dataset


class EagerVAE(nn.Module):
    def __init__(self, x_dim: int, z_dim: int = 20, hidden: int = 500):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(x_dim, hidden), nn.Tanh())
        self.enc_head = nn.Linear(hidden, 2 * z_dim)
        self.decoder = nn.Sequential(nn.Linear(z_dim, hidden), nn.Tanh(), nn.Linear(hidden, x_dim))
        self.z_dim = z_dim

    def elbo(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Per-datapoint SGVB estimator B: [B, D] -> [B]."""
        mu, logvar = self.enc_head(self.encoder(x)).chunk(2, dim=-1)
        std = (0.5 * logvar).exp()
        z = mu + std * torch.randn(std.shape, generator=generator)
        return R.bernoulli_log_prob(self.decoder(z), x) - R.gaussian_kl(mu, logvar)


def _pyvae_epoch(args, data, epoch: int):
    """Trains pyvae up to ``epoch`` (resuming its run directory); returns its metrics history."""
    from pyvae.train import build_config, train

    res = train(build_config(_pyvae_flags(args, epoch)), data=data,
                log=lambda line: print("pyvae       " + line, flush=True))
    return res.history


def _pyvae_flags(args, epoch: int) -> dict:
    """The configuration of pyvae's run up to ``epoch``: a fresh run for the first, a resumed one after."""
    if epoch > 1:
        return dict(resume=args.compare_pyvae, epochs=epoch, threads=args.threads, progress=False,
                    plots=epoch == args.epochs)
    return dict(dataset=args.dataset, data_dir=args.data_dir, epochs=epoch, batch_size=args.batch_size,
                latent=args.latent, hidden=args.hidden, optimizer="adam", lr=args.lr, binarize="dynamic",
                seed=args.seed, threads=args.threads, progress=False, plots=epoch == args.epochs,
                out=args.compare_pyvae, precision=args.pyvae_precision)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist", choices=DATASETS)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--epochs", type=pos_int, default=10)
    ap.add_argument("--batch-size", type=pos_int, default=100)
    ap.add_argument("--latent", type=pos_int, default=20)
    ap.add_argument("--hidden", type=pos_int, default=500)
    ap.add_argument("--lr", type=pos_float, default=1e-3)
    ap.add_argument("--seed", type=seed_int, default=0)
    ap.add_argument("--threads", type=pos_int, default=None)
    ap.add_argument("--out", default=None, help="append a JSON result line here")
    ap.add_argument("--compare-pyvae", metavar="RUN_DIR", default=None,
                    help="also train pyvae, interleaved epoch by epoch, into this run directory")
    ap.add_argument("--save", metavar="PATH", default=None, help="save the trained baseline's state dict here")
    ap.add_argument("--pyvae-precision", default="fp32", choices=("fp32", "bf16-mixed"),
                    help="precision of the pyvae run (the baseline is always fp32)")
    args = ap.parse_args(argv)
    if args.compare_pyvae:
        from pyvae.train import RUN_FILES, build_config

        held = [f for f in RUN_FILES if os.path.exists(os.path.join(args.compare_pyvae, f))]
        if held:  # (a fresh pyvae run refuses a directory that holds a run: fail now, not after epoch 1's baseline)
            ap.error(f"--compare-pyvae {args.compare_pyvae} already holds a run ({', '.join(held)}); give a new directory")
        try:  # pyvae's first epoch would refuse what its config refuses (e.g. a negative --seed): fail now too
            build_config(_pyvae_flags(args, 1))
        except ValueError as e:
            ap.error(f"--compare-pyvae: pyvae would refuse this run: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # the initialization (same layer order and shapes as pyvae's VAE)
    # Every draw of training comes from this generator, not torch's global RNG: pyvae's train(),
    # interleaved with this loop by --compare-pyvae, seeds and restores the global RNG.
    gen = torch.Generator().manual_seed(args.seed)
    data = load_dataset(args.dataset, args.data_dir, "dynamic")
    train_x, test_x = data.train, data.test
    model = EagerVAE(data.x_dim, args.latent, args.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    n = train_x.shape[0]
    steps = n // args.batch_size
    if steps == 0:  # (the dataset's size is known only now) epochs of no steps: nothing to train or time
        ap.error(f"argument --batch-size: {args.batch_size} is more than the {n} train examples of {args.dataset}")
    history = []
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(n, generator=gen)
        tot = 0.0
        t_ep = time.perf_counter()
        for s in range(steps):
            x = torch.bernoulli(train_x[perm[s * args.batch_size:(s + 1) * args.batch_size]], generator=gen)
            elbo = model.elbo(x, gen)
            loss = -elbo.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += elbo.detach().sum().item()
        train_time = time.perf_counter() - t_ep
        with torch.no_grad():
            test = sum(model.elbo(test_x[i:i + 1000], gen).sum().item() for i in range(0, test_x.shape[0], 1000))
        row = dict(epoch=epoch, train_elbo=tot / (steps * args.batch_size), test_elbo=test / test_x.shape[0],
                   samples_per_s=steps * args.batch_size / train_time, wall_s=time.perf_counter() - t0)
        history.append(row)
        print(f"torch-eager epoch {epoch}/{args.epochs}  train ELBO {row['train_elbo']:.2f}  test ELBO "
              f"{row['test_elbo']:.2f}  {row['samples_per_s']:,.0f} samples/s  {row['wall_s']:.1f} s", flush=True)
        if args.compare_pyvae:
            t_pause = time.perf_counter()
            pyvae_history = _pyvae_epoch(args, data, epoch)
            t0 += time.perf_counter() - t_pause  # the baseline's clock stops while pyvae trains
    result = dict(provider="torch-eager", dataset=args.dataset, epochs=args.epochs, batch_size=args.batch_size,
                  arch=f"{data.x_dim}-{args.hidden}-{args.latent} tanh", lr=args.lr, seed=args.seed,
                  threads=torch.get_num_threads(), torch=torch.__version__, machine=platform.machine(),
                  cpus=os.cpu_count(), final_test_elbo=history[-1]["test_elbo"], wall_s=history[-1]["wall_s"],
                  history=history, time=time.strftime("%Y-%m-%dT%H:%M:%S"),
                  # which CPU (family, model: NOTE: [Which CPU] in pyvae/_tune.py) and which code
                  cpu_model=cpu_model(), git=git_rev())
    if args.compare_pyvae:
        result["pyvae"] = dict(final_test_elbo=pyvae_history[-1]["test_elbo"], wall_s=pyvae_history[-1]["wall_s"],
                               history=pyvae_history, run_dir=args.compare_pyvae,
                               precision=args.pyvae_precision)
        print(f"final test ELBO: torch-eager {history[-1]['test_elbo']:.2f} in {history[-1]['wall_s']:.1f} s; "
              f"pyvae {pyvae_history[-1]['test_elbo']:.2f} in {pyvae_history[-1]['wall_s']:.1f} s")
    if args.save:
        torch.save(model.state_dict(), args.save)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

"""Compares trained runs on Fashion-MNIST grey levels (the numbers in docs/AEVB.md, "Continuous
Bernoulli on Fashion-MNIST grey levels").

For each run directory: its test ELBO under its own likelihood; the same weights scored as a
continuous Bernoulli (a normalized density on [0, 1]^784, so runs trained with either likelihood can be
compared on one scale); and the mean squared error of its reconstructions E[x | z = mu(x)] (the model's
``mean_from``), next to what sigmoid(logits) would give.

    python docs/continuous_bernoulli/compare.py RUN_CB RUN_BERNOULLI
"""
import argparse

import torch

from pyvae import checkpoint as C
from pyvae.data import load_dataset
from pyvae.evaluation import evaluate
from pyvae.models import VAE


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x = load_dataset("fashion-mnist", binarize="none").test
    print("| run | likelihood | test ELBO | recon | KL | test ELBO as a continuous Bernoulli | "
          "reconstruction MSE (model's mean) | MSE with sigmoid(logits) |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        m, _ = C.load_model(run)
        m.eval()
        own = evaluate(m, x, batch_size=1000, seed=0)
        cb = VAE(**{**m.config(), "likelihood": "continuous-bernoulli"})
        cb.load_state_dict(m.state_dict())
        as_cb = evaluate(cb.eval(), x, batch_size=1000, seed=0)
        with torch.no_grad():
            mu, _ = m.encode(x)
            logits = m.decode(mu)
            mse = ((m.mean_from(logits) - x) ** 2).mean().item()
            mse_sigmoid = ((torch.sigmoid(logits) - x) ** 2).mean().item()
        print(f"| {run} | {m.likelihood} | {own['elbo']:.2f} | {own['recon']:.2f} | {own['kl']:.2f} | "
              f"{as_cb['elbo']:.2f} | {mse:.5f} | {mse_sigmoid:.5f} |")


if __name__ == "__main__":
    main()

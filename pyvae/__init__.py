"""pyvae: fast, trustworthy Auto-Encoding Variational Bayes for PyTorch."""
import torch  # (imported before pyvae._C, through _gate: it loads the OpenMP runtime both share)

from . import _gate
from .ops import (bernoulli_elbo, bernoulli_log_prob, continuous_bernoulli_log_prob, continuous_bernoulli_mean, gaussian_kl,
                  gaussian_log_prob, linear_act, reparameterize)

from ._version import __version__


# The public submodules, loaded on first use like VAE (so ``pyvae.nn.FusedLinear`` works after a bare
# ``import pyvae``, which stays as cheap as the op library). They all sit below this package in the layers
# of tests/test_layers.py, so loading one from here cannot close an import cycle.
_SUBMODULES = frozenset({"nn", "models", "inference", "data", "checkpoint", "evaluation", "plots", "tuning",
                         "train", "runs", "reference", "ops"})


def __getattr__(name):
    # VAE lives in pyvae.models, which imports pyvae.nn: load it on first use, not at import.
    if name == "VAE":
        from .models import VAE

        return VAE
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'pyvae' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"VAE"} | _SUBMODULES)


def cuda_available() -> bool:
    """True when this build has CUDA kernels and torch sees a GPU."""
    return _gate.cuda_built and torch.cuda.is_available()


def cuda_built() -> bool:
    """True when this build of pyvae compiled its CUDA kernels (whether or not a GPU is present)."""
    return _gate.cuda_built


__all__ = [
    "__version__",
    "VAE",
    "linear_act",
    "bernoulli_elbo",
    "bernoulli_log_prob",
    "continuous_bernoulli_log_prob",
    "continuous_bernoulli_mean",
    "gaussian_kl",
    "gaussian_log_prob",
    "reparameterize",
    "cuda_available",
    "cuda_built",
]

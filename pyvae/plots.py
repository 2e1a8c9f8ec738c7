"""PNG plots of a run: learning curves (the paper's Figure 2), samples, reconstructions, 2-D manifold; and
log-log panels of measured times (``scaling_plot``, used by ``pyvae bench scaling``).

All functions use matplotlib's non-interactive Agg backend and write a file; none opens a window.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["learning_curve", "image_grid", "sample_grid", "reconstructions", "manifold", "reliability_diagram",
           "run_plots", "scaling_plot"]

PathLike = Union[str, os.PathLike]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def learning_curve(history: Sequence[Dict[str, float]], path: PathLike, title: str = "") -> Path:
    """Train and test ELBO (per datapoint) against training samples seen, log x axis (Figure 2).

    Args:
        history: per-epoch metrics with ``samples_seen``, ``train_elbo``, ``test_elbo``.
        path: the PNG to write.
    """
    if not history:
        raise ValueError("history is empty: nothing to plot")
    plt = _plt()
    xs = [h["samples_seen"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=100)
    ax.plot(xs, [h["train_elbo"] for h in history], "o-", ms=3, label="AEVB (train)")
    ax.plot(xs, [h["test_elbo"] for h in history], "s--", ms=3, label="AEVB (test)")
    ax.set_xscale("log")
    ax.set_xlabel("# training samples evaluated")
    ax.set_ylabel("ELBO (nats per datapoint)")
    ax.set_title(title or "learning curve")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _tile(images: torch.Tensor, image_shape: Tuple[int, int], nrow: int, pad: int = 1) -> torch.Tensor:
    n = images.shape[0]
    h, w = image_shape
    ncol = -(-n // nrow)
    out = torch.ones(nrow * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, ncol)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = \
            images[i].reshape(h, w)
    return out


def image_grid(images: torch.Tensor, image_shape: Tuple[int, int], path: PathLike, nrow: Optional[int] = None,
               title: str = "") -> Path:
    """Tiles ``images [N, H*W]`` (values in [0, 1]) into one grayscale PNG, pixel-exact (white borders).

    ``title`` is accepted for the callers' documentation but not drawn (the PNG is the bare grid).

    Args:
        images: ``[N, D]`` tensor with ``D == H * W``.
        image_shape: ``(H, W)``.
        path: the PNG to write.
        nrow: rows of the grid (default: about square).
    """
    images = images.detach().float().cpu()
    if images.dim() != 2 or images.shape[1] != image_shape[0] * image_shape[1]:
        raise ValueError(f"images must be [N, {image_shape[0] * image_shape[1]}] for image_shape {image_shape}, "
                         f"got {tuple(images.shape)}")
    n = images.shape[0]
    nrow = nrow or max(1, round(n ** 0.5))
    grid = _tile(images.clamp(0, 1), image_shape, nrow)
    k = max(1, round(400 / max(grid.shape)))  # whole pixels per image pixel: exact, no resampling blur
    grid = grid.repeat_interleave(k, 0).repeat_interleave(k, 1)
    # PIL is a matplotlib dependency; 8-bit grayscale PNGs are ~4x smaller than matplotlib's RGBA.
    from PIL import Image

    path = Path(path)
    Image.fromarray((grid * 255).round().to(torch.uint8).numpy(), mode="L").save(path, optimize=True)
    return path


def sample_grid(model, image_shape: Tuple[int, int], path: PathLike, n: int = 100, seed: int = 0) -> Path:
    """``n`` samples E[x|z], z ~ N(0, I), from ``model`` as a grid."""
    g = torch.Generator().manual_seed(seed)
    return image_grid(model.sample(n, generator=g), image_shape, path, title="samples E[x|z], z ~ N(0, I)")


def reconstructions(model, x: torch.Tensor, image_shape: Tuple[int, int], path: PathLike, n: int = 10) -> Path:
    """``n`` originals spread evenly over ``x`` (odd rows) above their reconstructions E[x | z = mu(x)]."""
    idx = torch.linspace(0, x.shape[0] - 1, min(n, x.shape[0])).round().long()  # spread over the set
    x = x[idx].to(next(model.parameters()).device, next(model.parameters()).dtype)
    images, nrow = _over_under(x.cpu(), model.reconstruct(x).cpu())
    return image_grid(images, image_shape, path, nrow=nrow, title="originals / reconstructions")


def _over_under(x: torch.Tensor, r: torch.Tensor, per: int = 10) -> Tuple[torch.Tensor, int]:
    """Rows of up to ``per`` originals ``x`` each above the row of their reconstructions ``r``: the images in
    grid order and the number of rows. A short last pair of rows is filled up with white images, so that
    every row has the same width and no image slides into the next row."""
    per = min(per, x.shape[0])
    rows = []
    for i in range(0, x.shape[0], per):
        xo, ro = x[i:i + per], r[i:i + per]
        if xo.shape[0] < per:
            blank = torch.ones(per - xo.shape[0], x.shape[1], dtype=x.dtype)
            xo, ro = torch.cat([xo, blank]), torch.cat([ro, blank.to(r.dtype)])
        rows += [xo, ro]
    return torch.cat(rows), len(rows)


def manifold(model, image_shape: Tuple[int, int], path: PathLike, n: int = 20) -> Path:
    """The paper's Figure 4: E[x|z] on an ``n x n`` grid of a 2-D latent space.

    The grid is linearly spaced in the unit square and mapped through the inverse Gaussian CDF, so it
    covers N(0, I) by equal probability mass.
    """
    if model.z_dim != 2:
        raise ValueError(f"the manifold plot needs a 2-D latent space, got z_dim={model.z_dim}")
    p = torch.linspace(0.5 / n, 1 - 0.5 / n, n, dtype=torch.float64)
    q = torch.distributions.Normal(0.0, 1.0).icdf(p)
    zz = torch.stack(torch.meshgrid(q.flip(0), q, indexing="ij"), -1).reshape(-1, 2)
    par = next(model.parameters())
    zz = zz[:, [1, 0]].to(par.device, par.dtype)
    with torch.no_grad():
        imgs = model.mean(zz)
    return image_grid(imgs, image_shape, path, nrow=n, title="learned manifold (z through the inverse Gaussian CDF)")


def reliability_diagram(calibration: Dict[str, object], path: PathLike, title: str = "") -> Path:
    """A reliability diagram: mean predicted probability against observed frequency per bin (the diagonal is
    perfect calibration), and below it the number of pixels per bin (log scale).

    Args:
        calibration: ``pyvae.inference.reliability(...)``'s dict (``edges``, ``confidence``, ``frequency``,
            ``count``, ``ece``).
        path: the PNG to write.
        title: the figure's title (the expected calibration error is appended).
    """
    for key in ("edges", "confidence", "frequency", "count", "ece"):
        if key not in calibration:
            raise ValueError(f"calibration must come from pyvae.inference.reliability (no {key!r})")
    plt = _plt()
    edges = calibration["edges"]
    centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    width = edges[1] - edges[0]
    keep = [i for i, c in enumerate(calibration["count"]) if c > 0]
    conf = [calibration["confidence"][i] for i in keep]
    freq = [calibration["frequency"][i] for i in keep]
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(4.2, 5.0), dpi=100, sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "--", color="0.6", lw=1, label="perfectly calibrated")
    ax.bar([centers[i] for i in keep], freq, width=width * 0.9, color="C0", alpha=0.35, label="observed frequency")
    ax.plot(conf, freq, "o-", color="C0", ms=4, label="(mean prediction, frequency)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of pixels = 1")
    ece = calibration["ece"]
    ax.set_title(f"{title}\nECE {ece:.4f}" if title else f"reliability (ECE {ece:.4f})", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    axc.bar(centers, [max(c, 0) for c in calibration["count"]], width=width * 0.9, color="0.5")
    if any(c > 0 for c in calibration["count"]):
        axc.set_yscale("log")
    axc.set_xlabel("predicted P(x = 1)")
    axc.set_ylabel("pixels")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def scaling_plot(panels: Sequence[Sequence[dict]], path: PathLike, title: str = "") -> Path:
    """A grid of log-log panels: measured times against a size, one line per series, with dashed limits
    and a dotted reference line.

    Args:
        panels: rows of panels. Each panel is a dict with ``x`` (the sizes, positive), ``series``
            (label -> one time per size; None or a non-positive value is left out), and optionally
            ``limits`` (label -> times, drawn dashed: what no series can beat), ``reference``
            (``(label, times)``, drawn dotted: e.g. linear scaling), ``colors`` (label -> colour),
            ``title``, ``xlabel`` and ``ylabel``.
        path: the PNG to write.
        title: the figure's title.
    """
    rows = [list(r) for r in panels if r]
    if not rows:
        raise ValueError("panels is empty: nothing to plot")
    plt = _plt()
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    ncol = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(4.3 * ncol, 3.5 * len(rows)), dpi=100, squeeze=False)

    def draw(ax, xs, ys, **kw):
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None and y > 0]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], **kw)

    for i, row in enumerate(rows):
        for j in range(ncol):
            ax = axes[i][j]
            if j >= len(row):
                ax.axis("off")
                continue
            panel = row[j]
            xs = list(panel["x"])
            colors = dict(panel.get("colors") or {})
            for label, ys in dict(panel.get("series") or {}).items():
                draw(ax, xs, ys, marker="o", ms=4, color=colors.get(label), label=label)
            for label, ys in dict(panel.get("limits") or {}).items():
                draw(ax, xs, ys, ls="--", marker="x", ms=4, color=colors.get(label, "0.4"), label=label)
            if panel.get("reference"):
                label, ys = panel["reference"]
                draw(ax, xs, ys, ls=":", color="0.2", lw=1.2, label=label)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(xs)
            ax.set_xticklabels([str(x) for x in xs], fontsize=7)
            ax.minorticks_off()
            # labels at 1, 2 and 5 times each power of ten: a panel spanning less than a decade still has some
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.set_xlabel(str(panel.get("xlabel", "")))
            ax.set_ylabel(str(panel.get("ylabel", "ms")))
            ax.set_title(str(panel.get("title", "")), fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def run_plots(model, data, history: List[Dict[str, float]], run_dir: PathLike) -> Dict[str, Path]:
    """The PNGs written after training: ``learning_curve.png``, ``samples.png``, ``reconstructions.png``
    and, for a 2-D latent space, ``manifold.png``. Returns name -> path."""
    run_dir = Path(run_dir)
    model = model.module if hasattr(model, "module") else model
    was = model.training
    model.eval()
    out = {
        "learning_curve": learning_curve(history, run_dir / "learning_curve.png",
                                         f"{data.name}: {model.x_dim}-{model.hidden}-{model.z_dim} {model.activation}"),
        "samples": sample_grid(model, data.image_shape, run_dir / "samples.png"),
        "reconstructions": reconstructions(model, data.test, data.image_shape, run_dir / "reconstructions.png", n=20),
    }
    if model.z_dim == 2:
        out["manifold"] = manifold(model, data.image_shape, run_dir / "manifold.png")
    model.train(was)
    return out

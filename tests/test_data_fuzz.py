"""Fuzz tests of pyvae.data's file readers (read_idx, read_frey) on hostile bytes.

Each case is a file built from parts (honest or lying headers, dims whose product overflows int64,
wrong magic and type codes, raw or compressed) and then possibly cut, bit-flipped or extended, or just
random bytes. Every case must end in one of two ways:

* a result, which for an honest, unmutated file must equal what was written; or
* a one-line ``DataFormatError`` (a ``ValueError``) whose message names the file.

Any other exception fails the test (hypothesis then shrinks it to a minimal file), and so does a peak
of traced allocations (``tracemalloc``, which sees Python objects and numpy arrays) above
``8 MiB + 16 x the file's size``: a reader that believes a header's byte count allocates far more.

Profiles: by default a few hundred cases per reader with a fixed seed (a few seconds, run by CI);
``PYVAE_FUZZ_EXAMPLES=10000 pytest -q -s tests/test_data_fuzz.py`` runs that many random cases per
reader and prints the counts (TESTING.md, "Data readers fuzzed", records such a run).
"""
import gzip
import math
import os
import struct
import tempfile
import tracemalloc
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pyvae import data as D

hypothesis = pytest.importorskip("hypothesis")  # in the "test" extra (pyproject.toml)
st = pytest.importorskip("hypothesis.strategies")
HealthCheck, given, settings = hypothesis.HealthCheck, hypothesis.given, hypothesis.settings

LONG = int(os.environ.get("PYVAE_FUZZ_EXAMPLES", "0"))
SETTINGS = settings(
    max_examples=LONG or 300,
    derandomize=not LONG,  # CI: the same cases every run; long runs: fresh ones
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

# Header values that break naive readers: 0, 1, sign and width edges, and products that overflow int64.
EDGE_U32 = [0, 1, 2, 3, 28, 560, 0xFFFF, 0x10000, 2**24, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]
EDGE_I32 = [0, 1, 2, 3, 560, -1, -560, 2**16, 2**24, 2**31 - 1, -(2**31)]


def bound(size: int) -> int:
    return (8 << 20) + 16 * size


def check(reader, payload: bytes, name: str, stats: Counter):
    """Runs ``reader`` on ``payload`` written to a file; returns the result or None after an error."""
    stats["cases"] += 1
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / name
        p.write_bytes(payload)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            try:
                out = reader(p)
            except D.DataFormatError as e:
                out = e
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        stats["peak_max"] = max(stats["peak_max"], peak)
        assert peak <= bound(len(payload)), f"peak allocation {peak} bytes for a {len(payload)}-byte file"
        if isinstance(out, Exception):
            msg = str(out)
            assert str(p) in msg and "\n" not in msg, msg
            stats["errors"] += 1
            return None
        stats["results"] += 1
        return out


mutation = st.one_of(
    st.just(("none",)),
    st.tuples(st.just("cut"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=16)),
)


def mutate(b: bytes, m) -> bytes:
    if m[0] == "cut":
        return b[:int(len(b) * m[1])]
    if m[0] == "flip" and b:
        i = min(int(len(b) * m[1]), len(b) - 1)
        return b[:i] + bytes([b[i] ^ m[2]]) + b[i + 1:]
    if m[0] == "append":
        return b + m[1]
    return b


# ------------------------------------------------------------------------------------ IDX
IDX_CODES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@st.composite
def idx_cases(draw):
    """(file bytes, expected array or None): None where the reader may refuse."""
    gz = draw(st.booleans())
    honest = draw(st.booleans())  # half the cases: a well-formed file that must read back exactly
    if not honest and draw(st.integers(0, 4)) == 0:  # random bytes, sometimes behind the zero magic bytes
        b = draw(st.sampled_from([b"", b"\0\0"])) + draw(st.binary(max_size=64))
        return (gzip.compress(b, mtime=0) if gz else b), None
    if honest:
        magic, code, ndim = b"\0\0", draw(st.sampled_from(sorted(IDX_CODES))), draw(st.integers(1, 4))
        dims = draw(st.lists(st.one_of(st.integers(0, 6), st.sampled_from([0, 2**31, 2**32 - 1])),
                             min_size=ndim, max_size=ndim).filter(lambda d: math.prod(d) <= 512))
    else:
        magic = draw(st.sampled_from([b"\0\0"] * 6 + [b"\0\1", b"\1\0", b"\x1f\x8b"]))
        code = draw(st.one_of(st.sampled_from(sorted(IDX_CODES)), st.integers(0, 255)))
        ndim = draw(st.one_of(st.integers(1, 4), st.integers(0, 255)))
        small = st.integers(0, 6)
        dims = draw(st.lists(st.one_of(small, small, st.sampled_from(EDGE_U32), st.integers(0, 2**32 - 1)),
                             min_size=min(ndim, 6), max_size=min(ndim, 6)))
    header = magic + bytes([code, ndim]) + struct.pack(">" + "I" * len(dims), *dims)
    valid = magic == b"\0\0" and code in IDX_CODES and 1 <= ndim <= 4 and len(dims) == ndim
    need = math.prod(dims) * np.dtype(IDX_CODES.get(code, "u1")).itemsize
    if valid and need <= 4096 and (honest or draw(st.integers(0, 3))):
        data = draw(st.binary(min_size=need, max_size=need))
    else:  # a lying header: far fewer bytes than it claims (or any bytes at all)
        valid = False
        data = draw(st.binary(max_size=256))
    m = ("none",) if honest else draw(mutation)
    body = header + data
    if gz:
        z = gzip.compress(body, mtime=0)
        b = mutate(z, m)
    else:
        b = mutate(body, m)
    expected = None
    span = math.prod(max(d, 1) for d in dims) * np.dtype(IDX_CODES.get(code, "u1")).itemsize
    if valid and m[0] == "none" and span <= 2**34:  # beyond 16 GiB of non-zero dims the reader refuses
        expected = np.frombuffer(data, dtype=IDX_CODES[code]).reshape(dims)
    return b, expected


def test_fuzz_read_idx(capsys):
    stats = Counter()

    @SETTINGS
    @given(idx_cases())
    def run(case):
        b, expected = case
        out = check(D.read_idx, b, "fuzz.idx", stats)
        if expected is not None:
            assert out is not None, "an honest IDX file was refused"
            assert out.shape == expected.shape and out.dtype == expected.dtype.newbyteorder("=")
            np.testing.assert_array_equal(out, expected)
            stats["honest_roundtrips"] += 1
        elif out is not None:
            assert isinstance(out, np.ndarray)

    run()
    with capsys.disabled():
        print(f"\nread_idx fuzz: {dict(stats)}")
    assert stats["cases"] >= SETTINGS.max_examples and stats["errors"] and stats["honest_roundtrips"]


# ------------------------------------------------------------------------------------ .mat
MI = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
MX_NUMERIC = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}


def element(e: str, t: int, data: bytes, small: bool = False, n_lie=None) -> bytes:
    n = len(data) if n_lie is None else n_lie
    if small and len(data) <= 4:
        return struct.pack(e + "I", ((n & 0xFFFF) << 16) | t) + data.ljust(4, b"\0")
    return struct.pack(e + "II", t, n) + data + b"\0" * (-len(data) % 8)


@st.composite
def pixels(draw):
    """An honest ff: (560 x N pixels k in 0..255 with max > 1, how they are stored)."""
    n = draw(st.integers(0, 3))
    k = np.frombuffer(draw(st.binary(min_size=560 * n, max_size=560 * n)), dtype=np.uint8).reshape(n, 560).T
    if n:
        k = k.copy()
        k[0, 0] = max(k[0, 0], 2)
    return k, draw(st.sampled_from(["u1", "f8", "f8/255", "f4/255", "f8-as-u1", "i4", "u2"]))


def stored(k: np.ndarray, how: str):
    """(mx class, mi type, values) for pixels ``k`` stored ``how``."""
    if how == "f8/255":
        return 6, 9, k / 255.0
    if how == "f4/255":
        return 7, 7, (k / 255.0).astype(np.float32)
    if how == "f8":
        return 6, 9, k.astype(np.float64)
    if how == "f8-as-u1":  # MATLAB stores a double array's small integers as uint8
        return 6, 2, k
    cls = {"u1": 9, "i4": 12, "u2": 11}[how]
    return cls, {9: 2, 12: 5, 11: 4}[cls], k.astype(MX_NUMERIC[cls])


@st.composite
def mat5_variable(draw, e: str, name: str, honest: bool):
    """(element bytes, expected pixels or None): an honest ff must read back as its pixels."""
    expected = None
    if honest or (name == "ff" and draw(st.booleans())):
        if name == "ff":
            k, how = draw(pixels())
            cls, mi, vals = stored(k, how)
            dims = [560, k.shape[1]]
            data = np.asarray(vals, dtype=np.dtype(e + MI[mi])).tobytes(order="F")
            expected = k
        else:  # any well-formed variable (the reader skips it)
            cls, mi = draw(st.integers(0, 255)), draw(st.sampled_from(sorted(MI)))
            dims = draw(st.lists(st.integers(0, 3), min_size=2, max_size=4))
            data = bytes(math.prod(dims) * np.dtype(MI[mi]).itemsize)
    else:
        cls = draw(st.one_of(st.sampled_from(sorted(MX_NUMERIC)), st.integers(0, 255)))
        mi = draw(st.one_of(st.sampled_from(sorted(MI)), st.integers(0, 20)))
        dims = draw(st.one_of(st.tuples(st.just(560), st.integers(0, 3)).map(list),
                              st.lists(st.one_of(st.integers(0, 4), st.sampled_from(EDGE_I32)), max_size=5)))
        size = math.prod(dims) * (np.dtype(MI[mi]).itemsize if mi in MI else 1)
        if 0 <= size <= 4096 and all(d >= 0 for d in dims) and draw(st.integers(0, 2)):
            data = draw(st.binary(min_size=size, max_size=size))
        else:
            data = draw(st.binary(max_size=64))
    flags = cls | draw(st.sampled_from([0, 0, 0, 0x200] + ([] if honest else [0x800])))
    lies = [] if honest else draw(st.lists(st.sampled_from(["flags", "dims", "name", "data", "matrix", "inner"]),
                                           max_size=2))
    if lies or flags & 0x800:
        expected = None
    lie = st.one_of(st.sampled_from(EDGE_U32), st.integers(0, 2**32 - 1))
    content = (element(e, 6, struct.pack(e + "II", flags, 0), n_lie=draw(lie) if "flags" in lies else None)
               + element(e, 5, struct.pack(e + "i" * len(dims), *dims), n_lie=draw(lie) if "dims" in lies else None)
               + element(e, 1, name.encode(), small=draw(st.booleans()), n_lie=draw(lie) if "name" in lies else None)
               + element(e, mi, data, n_lie=draw(lie) if "data" in lies else None))
    matrix = struct.pack(e + "II", 14, draw(lie) if "matrix" in lies else len(content)) + content
    if draw(st.booleans()):  # compressed (v7): a zlib stream of the matrix element
        z = zlib.compress(matrix)
        return struct.pack(e + "II", 15, draw(lie) if "inner" in lies else len(z)) + z, expected
    return matrix, expected


@st.composite
def mat5_cases(draw):
    e = draw(st.sampled_from("<>"))
    honest = draw(st.booleans())  # half the cases: a well-formed file
    mark, version = (b"IM" if e == "<" else b"MI"), 0x0100
    if not honest:
        mark = draw(st.sampled_from([mark] * 4 + [b"MM", b"\0\0"]))
        version = draw(st.sampled_from([0x0100] * 4 + [0x0200, 0, 0xFFFF]))
    head = b"MATLAB 5.0 MAT-file, fuzz".ljust(116) + b"\0" * 8 + struct.pack(e + "H", version) + mark
    names = draw(st.lists(st.sampled_from(["ff", "ff", "x", "f", "ffx"]), min_size=int(honest), max_size=3))
    if honest and "ff" not in names:
        names.append("ff")
    body, expected = b"", None
    for i, name in enumerate(names):
        b, exp = draw(mat5_variable(e, name, honest))
        body += b
        if name == "ff" and "ff" not in names[:i]:  # the reader takes the first ff
            expected = exp
    m = ("none",) if honest else draw(mutation)
    return mutate(head + body, m), (expected if honest else None)


@st.composite
def mat4_cases(draw):
    e = draw(st.sampled_from("<>"))
    honest = draw(st.booleans())  # half the cases: a well-formed file
    out, expected = b"", None
    names = draw(st.lists(st.sampled_from(["ff", "x", "ffx"]), min_size=1, max_size=3))
    if honest and "ff" not in names:
        names.append("ff")
    for i, name in enumerate(names):
        if honest:
            p = draw(st.integers(0, 5))
            t, imagf = (0, 0) if name == "ff" else (draw(st.integers(0, 2)), draw(st.integers(0, 1)))
            mopt = (0 if e == "<" else 1000) + 10 * p + t
        else:
            p = draw(st.one_of(st.integers(0, 5), st.integers(0, 9)))
            t = draw(st.sampled_from([0, 0, 0, 1, 2, 7]))
            mopt = (0 if e == "<" else 1000) + 10 * p + t
            if draw(st.integers(0, 5)) == 0:
                mopt = draw(st.integers(-(2**31), 2**31 - 1))
            imagf = draw(st.sampled_from([0, 0, 0, 1, 2]))
        dtype = {0: "f8", 1: "f4", 2: "i4", 3: "i2", 4: "u2", 5: "u1"}.get(p, "u1")
        exp = None
        if name == "ff" and (honest or (t == 0 and p <= 5 and imagf == 0 and draw(st.booleans()))):
            k, _ = draw(pixels())
            rows, cols = 560, k.shape[1]
            data = k.astype(e + dtype).tobytes(order="F")
            exp = k
        elif honest:
            rows, cols = draw(st.integers(0, 4)), draw(st.integers(0, 4))
            data = bytes(rows * cols * np.dtype(dtype).itemsize * (1 + imagf))
        else:
            rows, cols = draw(st.sampled_from(EDGE_I32)), draw(st.sampled_from(EDGE_I32))
            size = rows * cols * np.dtype(dtype).itemsize * (1 + (imagf == 1))
            data = draw(st.binary(min_size=size, max_size=size)) if 0 <= size <= 4096 and rows >= 0 and cols >= 0 \
                else draw(st.binary(max_size=64))
        raw_name = name.encode() + b"\0"
        namlen = len(raw_name) if honest or draw(st.integers(0, 5)) else draw(st.sampled_from(EDGE_I32))
        if name == "ff" and "ff" not in names[:i]:  # the reader takes the first ff
            expected = exp
        out += struct.pack(e + "5i", mopt, rows, cols, imagf, namlen) + raw_name + data
    m = ("none",) if honest else draw(mutation)
    return mutate(out, m), (expected if honest else None)


@st.composite
def mat_cases(draw):
    which = draw(st.integers(0, 9))
    if which == 0:
        return draw(st.binary(max_size=256)), None
    return draw(mat5_cases() if which <= 6 else mat4_cases())


def test_fuzz_read_frey(capsys):
    stats = Counter()

    @SETTINGS
    @given(mat_cases())
    def run(case):
        b, expected = case
        out = check(D.read_frey, b, "fuzz.mat", stats)
        if expected is not None:
            assert out is not None, "an honest .mat file was refused"
            np.testing.assert_array_equal(out, expected.T)
            stats["honest_roundtrips"] += 1
        elif out is not None:
            assert out.dtype == np.uint8 and out.ndim == 2 and out.shape[1] == 560

    run()
    with capsys.disabled():
        print(f"\nread_frey fuzz: {dict(stats)}")
    assert stats["cases"] >= SETTINGS.max_examples and stats["errors"] and stats["honest_roundtrips"]

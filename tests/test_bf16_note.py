"""bf16-mixed on a CPU whose bfloat16 products are not faster than float32 ones (NOTE: [bf16 on this CPU] in
pyvae/tuning.py): measured once per shape class and cached with the routes, said once by ``pyvae train``,
never a silent change of precision."""
import json

import pytest
import torch

from pyvae import _tune
from pyvae import tuning as ptuning
from pyvae.data import load_dataset
from pyvae.train import build_config, train

TINY = dict(dataset="digits", hidden=32, latent=4, batch_size=50, epochs=1, progress=False, plots=False, threads=1)


def _fake_products(fp32, bf16, calls=None, busy=False):
    def products(rows, fin, fout):
        if calls is not None:
            calls.append((rows, fin, fout))
        return {"fp32": fp32, "bf16": bf16, "rows": 1 << (min(rows, 2048) - 1).bit_length(), "busy": busy}
    return products


def test_products_are_measured_once_and_cached(tuning, monkeypatch):
    ms = ptuning.bf16_products(100, 48, 24)
    assert set(ms) == {"fp32", "bf16", "rows", "busy"} and ms["rows"] == 128 and ms["busy"] is False
    assert ms["fp32"] > 0 and ms["bf16"] > 0
    entry = _tune.entries()["precision 48->24 rows<=128 train"]
    assert entry["choice"] in ("fp32", "bf16") and set(entry["ms"]) == {"fp32", "bf16"}

    def no_race(*a, **k):
        raise AssertionError("measured a cached shape class again")
    assert "precision 48->24 rows<=128 train" in _tune.on_disk()  # written to the cache file
    with monkeypatch.context() as m:
        m.setattr(_tune, "decide", no_race)
        assert ptuning.bf16_products(120, 48, 24) == ms  # same bucket: the cache
    # a large batch is timed at 2048 rows at most
    assert ptuning.bf16_products(100_000, 8, 4)["rows"] == 2048


def test_the_race_times_bf16_and_fp32_products(tuning, monkeypatch):
    seen = {}
    mm = torch.mm

    def measure(candidates, **kw):
        for name, fn in candidates.items():
            dtypes = []
            with monkeypatch.context() as m:
                m.setattr(torch, "mm",
                          lambda a, b: dtypes.append((a.dtype, tuple(a.shape), tuple(b.shape))) or mm(a, b))
                fn()
            seen[name] = dtypes
        return {"fp32": 0.001, "bf16": 0.003}
    monkeypatch.setattr(_tune, "measure", measure)
    ms = ptuning.bf16_products(64, 40, 30)
    assert ms["fp32"] == 1.0 and ms["bf16"] == 3.0
    # the three products of a layer, each in its candidate's dtype
    # forward (64, 40) @ (40, 30), input gradient (64, 30) @ (30, 40), weight gradient (30, 64) @ (64, 40)
    shapes = [((64, 40), (40, 30)), ((64, 30), (30, 40)), ((30, 64), (64, 40))]
    assert seen["fp32"] == [(torch.float32, *sh) for sh in shapes]
    assert seen["bf16"] == [(torch.bfloat16, *sh) for sh in shapes]


@pytest.mark.parametrize("bf16, says", [(2.0, True), (0.995, True), (0.5, False)])
def test_the_note_names_fp32_only_where_bf16_is_not_faster(monkeypatch, bf16, says):
    monkeypatch.setattr(ptuning, "bf16_products", _fake_products(1.0, bf16))
    note = ptuning.bf16_note(100, 784, 500)
    if not says:
        assert note is None
        return
    assert "not faster than float32" in note and "--precision fp32" in note
    assert f"bf16 {bf16:.3g} ms, fp32 1 ms" in note and "784->500" in note and "128 rows" in note
    assert _tune.cpu_model() in note


def test_a_busy_measurement_gives_no_advice(monkeypatch):
    monkeypatch.setattr(ptuning, "bf16_products", _fake_products(1.0, 2.0, busy=True))
    assert ptuning.bf16_note(100, 784, 500) is None


def test_tuning_off_measures_and_says_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("PYVAE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PYVAE_TUNE", "off")
    _tune.reset_for_tests()
    try:
        def no_race(*a, **k):
            raise AssertionError("measured with PYVAE_TUNE=off")
        monkeypatch.setattr(_tune, "decide", no_race)
        assert ptuning.bf16_products(100, 784, 500) is None
        assert ptuning.bf16_note(100, 784, 500) is None
    finally:
        _tune.reset_for_tests()


@pytest.mark.parametrize("arg, value", [("rows", 0), ("in_features", -3), ("out_features", 2.5), ("rows", True)])
def test_bad_sizes_name_the_argument(arg, value):
    sizes = dict(rows=100, in_features=784, out_features=500)
    sizes[arg] = value
    with pytest.raises(ValueError, match=f"{arg} must be a positive int"):
        ptuning.bf16_products(**sizes)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", binarize="dynamic")


@pytest.mark.parametrize("precision, bf16, says", [("bf16-mixed", 2.0, True), ("bf16-mixed", 0.5, False),
                                                    ("fp32", 2.0, False)])
def test_train_says_it_once_and_keeps_the_precision(monkeypatch, tmp_path, digits, precision, bf16, says):
    calls = []
    monkeypatch.setattr(ptuning, "bf16_products", _fake_products(1.0, bf16, calls))
    lines = []
    cfg = build_config({**TINY, "out": str(tmp_path / "run"), "precision": precision, "epochs": 2})
    res = train(cfg, data=digits, log=lines.append)
    notes = [s for s in lines if "bfloat16 matrix products are not faster" in s]
    assert len(notes) == (1 if says else 0)
    # the largest layer of the model (64 -> 32 hidden: digits are 8x8) at the run's batch; the decoder's 32 -> 64
    # weight has as many elements, and max() keeps the first (the encoder's)
    assert calls == ([] if precision == "fp32" else [(50, 64, 32)])
    assert json.loads((res.run_dir / "config.json").read_text())["precision"] == precision  # never switched


def _ddp_note_worker(rank, world, port, cfg_dict, out):
    """One rank of a two-process bf16-mixed run: records what the bf16 timing was asked and what was logged."""
    import datetime
    import os
    import sys

    import torch.distributed as dist

    from pyvae.train import TrainConfig

    torch.set_num_threads(1)
    calls, lines = [], []
    ptuning.bf16_products = _fake_products(1.0, 2.0, calls)  # bf16 slower: rank 0 must say so, once
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # a stuck start fails, not gloo's 30 minutes
    try:
        train(TrainConfig(**cfg_dict), log=lines.append)
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"calls": calls, "notes": [s for s in lines if "bfloat16 matrix products" in s]}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as the DDP workers of tests/test_train.py: no C++ static destructors


def test_ddp_times_each_ranks_slice_on_rank_0_only(tmp_path):
    """Under DDP the note is rank 0's: it times the products at a rank's share of the batch (the rows each
    process multiplies), says it once, and the other rank neither times nor says anything."""
    import dataclasses
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = build_config({**TINY, "out": str(tmp_path / "ddp"), "precision": "bf16-mixed", "limit": 200})
    out = str(tmp_path / "note")
    mp.spawn(_ddp_note_worker, args=(2, port, dataclasses.asdict(cfg), out), nprocs=2, join=True)
    rank0, rank1 = (json.loads(open(f"{out}.{r}").read()) for r in (0, 1))
    assert rank0["calls"] == [[25, 64, 32]]  # the batch of 50 split over two processes
    assert len(rank0["notes"]) == 1
    assert rank1 == {"calls": [], "notes": []}

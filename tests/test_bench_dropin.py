"""``pyvae bench dropin``: the limit of the swap (which layers its GEMM-only time covers, how its parts add
up) and a smoke run of the command on a small dataset (the row's limit, faults and table)."""
import json
import os
import subprocess
import sys
import tempfile
import types

import pytest
import torch

from pyvae.benchmarks import dropin as D


def test_layer_sizes_are_the_models_linear_layers_in_forward_order():
    models = D._models(0)
    # the swapped model: its two heads are one product of width 2 * 20
    assert D.layer_sizes(models["pyvae"][0]) == [(784, 400), (400, 40), (20, 400), (400, 784)]
    assert D.layer_sizes(models["plain"][0]) == [(784, 400), (400, 20), (400, 20), (20, 400), (400, 784)]


def test_limit_is_the_sum_of_its_three_parts():
    assert D.limit_per_step(2.0, 0.75, 0.05) == pytest.approx(2.8)


def test_measure_limit_times_each_part_on_copies_of_the_parameters():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 16))
    before = [p.detach().clone() for p in module.parameters()]
    data = types.SimpleNamespace(train=torch.rand(64, 16))
    lim = D.measure_limit(module, data, B=8, seed=0, target_s=0.02)
    assert lim["gemm_ms"] > 0 and lim["optimizer_ms"] > 0 and lim["gather_ms"] > 0
    assert lim["step_ms"] == pytest.approx(lim["gemm_ms"] + lim["optimizer_ms"] + lim["gather_ms"])
    # forward 8x16x8 and 8x8x16; weight gradients of both; the input gradient of the second only
    assert lim["gemm_flops"] == pytest.approx(2.0 * 8 * 16 * 8 * 5)
    # the optimizer ran on copies: the module's own weights are untouched
    for a, b in zip(before, module.parameters()):
        assert torch.equal(a, b)


def test_bench_dropin_smoke_reports_the_limit_and_faults():
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "dropin.jsonl")
        r = subprocess.run([sys.executable, "-m", "pyvae", "bench", "dropin", "--dataset", "mnist-5k", "--limit", "1024",
                            "--epochs", "2", "--providers", "plain", "pyvae", "--out", out],
                           cwd=tmp, capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, PYTHONWARNINGS="ignore"))
        assert r.returncode == 0, r.stderr[-2000:]
        row = json.loads(open(out).read().splitlines()[-1])
    lim = row["limit"]
    steps = len(range(0, row["train_samples"] - row["B"] + 1, row["B"]))
    assert lim["epoch_s"] == pytest.approx(lim["step_ms"] * 1e-3 * steps)
    assert row["plain_vs_limit"] == pytest.approx(row["median_epoch_s"]["plain"] / lim["epoch_s"])
    faults = row["faults_per_step"]
    assert set(faults) == {"plain", "pyvae"} and all(f >= 0 for f in faults.values())
    assert "| limit |" in r.stdout and "plain / limit" in r.stdout
    e = row["epoch_s"]
    assert row["paired_pyvae_vs_plain"][0] == pytest.approx(e["plain"][1] / e["pyvae"][1])
    assert "paired per epoch" in r.stdout


def test_paired_ratio_is_the_median_of_the_epochs_ratios():
    # the machine slows down over the run; the pyvae loop is 1.25x faster in every epoch
    drift = [1.0, 1.3, 0.9, 1.6, 1.1, 1.45]
    plain = [2.5 * d for d in drift]
    pyvae = [2.0 * d for d in drift]
    assert D.paired_ratio(plain, pyvae) == pytest.approx([1.25, 1.25, 1.25])
    # one disturbed epoch: the median keeps 1.25 (the mean of the ratios would be 1.18)
    pyvae[3] *= 1.5
    point, lo, hi = D.paired_ratio(plain, pyvae)
    assert point == pytest.approx(1.25) and hi == pytest.approx(1.25) and 1.25 / 1.5 <= lo < 1.25


def test_paired_ratio_interval_is_wide_when_epochs_disagree():
    point, lo, hi = D.paired_ratio([1.0, 1.0, 1.0, 1.0, 1.0], [0.8, 1.25, 0.9, 1.1, 1.0])
    assert point == pytest.approx(1.0) and lo < 0.95 and hi > 1.05


def test_paired_ratio_needs_epochs():
    with pytest.raises(ValueError, match="no epochs"):
        D.paired_ratio([], [])

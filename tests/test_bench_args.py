"""The benchmarks' command lines refuse nonsense numbers at parse time: ``pyvae bench <family>`` and
bench/aevb_baseline.py, bench/trainer_vs_step.py end with argparse's ``error: argument --X: ...`` (exit status
2) before any re-exec, timing or output file; valid values still parse. Nothing is benchmarked here: whatever
would start the work (run_family, the routes children, the scripts' first torch call) raises ``Ran`` instead."""
import argparse
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from pyvae.benchmarks import common as C
from pyvae.benchmarks import dropin, elbo, gemm, mlp, routes, scaling, train

BENCH = Path(__file__).resolve().parents[1] / "bench"


class Ran(Exception):
    """Raised where a benchmark would start its work; carries the parsed arguments."""


def _ran(args, *rest, **kw):
    raise Ran(args)


@pytest.fixture
def no_run(monkeypatch):
    """The families stop where their work would start: after parsing, at run_family (elbo: apply_malloc, which
    may re-exec), or at the routes parent's first child process. Returns the list of namespaces parsed."""
    monkeypatch.setattr(C, "run_family", _ran)
    monkeypatch.setattr(C, "apply_malloc", _ran)
    monkeypatch.setattr(routes.subprocess, "call", _ran)
    monkeypatch.delenv("PYVAE_BENCH_ROUTES_CHILD", raising=False)
    parsed = []
    real = argparse.ArgumentParser.parse_args

    def parse_args(self, *a, **k):
        ns = real(self, *a, **k)
        parsed.append(ns)
        return ns
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    return parsed


def _script(name):
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _refused(capsys, call, flag):
    """``call()`` ends with argparse's usage error naming ``flag``."""
    with pytest.raises(SystemExit) as e:
        call()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err, err
    return err


# ----------------------------------------------------------------------------- the families' shared arguments
COMMON_BAD = [("--reps", "0"), ("--reps", "-3"), ("--target-s", "0"), ("--target-s", "-1"), ("--target-s", "nan"),
              ("--target-s", "inf"), ("--threads", "0"), ("--threads", "-1"), ("--quiet-wait", "-1"),
              ("--quiet-wait", "nan"), ("--quiet-wait", "inf"), ("--block", "0"), ("--block", "-2")]
COMMON_FAMILIES = {"elbo": elbo, "mlp": mlp, "gemm": gemm, "train": train, "scaling": scaling}


@pytest.mark.parametrize("flag, value", COMMON_BAD, ids=[f"{f}={v}" for f, v in COMMON_BAD])
@pytest.mark.parametrize("family", list(COMMON_FAMILIES))
def test_common_arguments_refuse_nonsense(no_run, capsys, family, flag, value):
    _refused(capsys, lambda: COMMON_FAMILIES[family].main([flag, value]), flag)


# ----------------------------------------------------------------------------- each family's own arguments
FAMILY_BAD = [
    ("elbo", "--batch", ["0"]), ("elbo", "--batch", ["100", "-5"]), ("elbo", "--dim", ["0"]),
    ("elbo", "--latent", ["0"]),
    ("mlp", "--batch", ["0"]), ("mlp", "--batch", ["10", "-1"]),
    ("gemm", "--batch", ["0"]),
    ("train", "--batch", ["0"]), ("train", "--device", ["cuda"]),
    ("scaling", "--batch", ["0"]), ("scaling", "--dims", ["8", "0"]), ("scaling", "--latents", ["-2"]),
    ("scaling", "--sweep-batch", ["0"]), ("scaling", "--x-dim", ["0"]), ("scaling", "--hidden", ["0"]),
    ("scaling", "--latent", ["0"]), ("scaling", "--mem-fraction", ["0"]), ("scaling", "--mem-fraction", ["-0.5"]),
    ("scaling", "--mem-fraction", ["nan"]), ("scaling", "--tolerance", ["-0.1"]), ("scaling", "--tolerance", ["nan"]),
    ("scaling", "--device", ["cuda"]),
    ("dropin", "--limit", ["0"]), ("dropin", "--epochs", ["0"]), ("dropin", "--batch-size", ["0"]),
    ("dropin", "--threads", ["0"]), ("dropin", "--seed", [str(2 ** 64)]), ("dropin", "--dataset", ["no-such-set"]),
    ("dropin", "--dataset", ["digits"]),
    ("routes", "--batch", ["0"]), ("routes", "--reps", ["0"]), ("routes", "--target-s", ["0"]),
    ("routes", "--target-s", ["nan"]), ("routes", "--threads", ["0"]), ("routes", "--quiet-wait", ["-1"]),
    ("routes", "--study", ["-1"]),
]
FAMILIES = {**COMMON_FAMILIES, "dropin": dropin, "routes": routes}


@pytest.mark.parametrize("family, flag, values", FAMILY_BAD,
                         ids=[f"{f}{a}={'_'.join(v)}" for f, a, v in FAMILY_BAD])
def test_family_arguments_refuse_nonsense(no_run, capsys, family, flag, values):
    _refused(capsys, lambda: FAMILIES[family].main([flag, *values]), flag)


def test_dropin_refuses_a_batch_larger_than_the_limit(no_run, capsys):
    err = _refused(capsys, lambda: dropin.main(["--limit", "100", "--batch-size", "128"]), "--batch-size")
    assert "100" in err and "128" in err
    with pytest.raises(Ran):  # a limit of exactly one batch is an epoch of one step
        dropin.main(["--limit", "128", "--batch-size", "128"])


def test_dropin_refuses_a_seed_whose_epoch_seeds_overflow(no_run, capsys):
    # seed * 1000 + epoch seeds each epoch's order: 2**60 passes torch's range, its products do not
    _refused(capsys, lambda: dropin.main(["--seed", str(2 ** 60)]), "--seed")


def test_dropin_refuses_a_batch_larger_than_the_dataset(monkeypatch):
    # known only once the data is loaded: a clear exit naming --batch-size, before any model or epoch
    monkeypatch.setattr(C, "machine_info", lambda args: {})
    args = types.SimpleNamespace(dataset="mnist-5k", data_dir=None, limit=None, batch_size=5000, epochs=1, seed=0,
                                 providers=["plain"], no_swap_limit=True)
    with pytest.raises(SystemExit) as e:
        dropin.run(args)
    assert "--batch-size 5000" in str(e.value.code)


def test_bench_command_passes_the_family_error_through(no_run, capsys, monkeypatch):
    from pyvae.cli import main

    monkeypatch.setattr(sys, "argv", ["pyvae"])  # (the bench command sets it for a re-exec)
    _refused(capsys, lambda: main(["bench", "mlp", "--batch", "0", "--ops", "enc2"]), "--batch")


# ----------------------------------------------------------------------------- valid values still parse
VALID = [
    (elbo, ["--batch", "1", "100", "--dim", "1", "--latent", "1", "--reps", "1", "--target-s", "0.01",
            "--threads", "1", "--quiet-wait", "0", "--block", "1"],
     {"batch": [1, 100], "dim": 1, "latent": 1, "reps": 1, "target_s": 0.01, "threads": 1, "quiet_wait": 0.0,
      "block": 1}),
    (elbo, [], {"batch": list(elbo.BATCHES), "reps": None, "target_s": 1.5, "threads": 2, "quiet_wait": 20.0,
                "block": C.BLOCK}),
    (mlp, ["--batch", "3", "--ops", "enc2", "--reps", "2"], {"batch": [3], "reps": 2}),
    (gemm, ["--batch", "8", "--target-s", "1e-3"], {"batch": [8], "target_s": 1e-3}),
    (train, ["--batch", "4", "--device", "cpu"], {"batch": [4], "device": "cpu"}),
    (scaling, ["--batch", "8", "--dims", "8", "--latents", "2", "--sweep-batch", "8", "--x-dim", "16",
               "--hidden", "8", "--latent", "2", "--mem-fraction", "2", "--tolerance", "0"],
     {"batch": [8], "dims": [8], "latents": [2], "sweep_batch": 8, "x_dim": 16, "hidden": 8, "latent": 2,
      "mem_fraction": 2.0, "tolerance": 0.0}),
    (scaling, ["--quick"], {"batch": scaling.QUICK["batch"], "reps": 3, "mem_fraction": 0.5, "tolerance": 0.2}),
    (dropin, ["--limit", "1024", "--epochs", "1", "--batch-size", "1", "--seed", "-7", "--threads", "1",
              "--dataset", "mnist-5k"],
     {"limit": 1024, "epochs": 1, "batch_size": 1, "seed": -7, "threads": 1, "dataset": "mnist-5k"}),
    (dropin, [], {"limit": None, "epochs": 4, "batch_size": 128, "seed": 0, "dataset": "auto"}),
    (routes, ["--batch", "1", "--reps", "1", "--target-s", "0.5", "--threads", "1", "--quiet-wait", "0",
              "--study", "0", "--emulate", "as-is"],
     {"batch": [1], "reps": 1, "target_s": 0.5, "threads": 1, "quiet_wait": 0.0, "study": 0}),
]


@pytest.mark.parametrize("mod, argv, want", VALID, ids=[f"{m.__name__.rsplit('.', 1)[1]}-{i}"
                                                        for i, (m, _, _) in enumerate(VALID)])
def test_valid_values_parse(no_run, mod, argv, want):
    with pytest.raises(Ran):  # parsing passed: the run would start here
        mod.main(argv)
    args = no_run[-1]
    assert {k: getattr(args, k) for k in want} == want


# ----------------------------------------------------------------------------- bench/*.py scripts
class _Halt(types.ModuleType):
    """Stands in for a script's torch: its first use (after parsing) raises Ran."""

    def __getattr__(self, name):
        raise Ran(name)


@pytest.fixture
def aevb(monkeypatch):
    mod = _script("aevb_baseline")
    monkeypatch.setattr(mod, "torch", _Halt("torch"))
    return mod


def _run_script(monkeypatch, mod, argv):
    monkeypatch.setattr(sys, "argv", [mod.__name__ + ".py", *argv])
    return mod.main()


AEVB_BAD = [("--epochs", "0"), ("--batch-size", "0"), ("--latent", "0"), ("--hidden", "-1"), ("--lr", "0"),
            ("--lr", "-0.001"), ("--lr", "nan"), ("--seed", str(2 ** 64)), ("--threads", "0"), ("--threads", "-2"),
            ("--dataset", "no-such-set")]


@pytest.mark.parametrize("flag, value", AEVB_BAD, ids=[f"{f}={v}" for f, v in AEVB_BAD])
def test_aevb_baseline_refuses_nonsense(aevb, monkeypatch, capsys, flag, value):
    _refused(capsys, lambda: _run_script(monkeypatch, aevb, [flag, value]), flag)


def test_aevb_baseline_refuses_what_pyvae_would_refuse_before_the_first_epoch(aevb, monkeypatch, capsys, tmp_path):
    # pyvae's run takes seeds >= 0: a negative one would fail only after the baseline's first epoch
    with pytest.raises(SystemExit) as e:
        _run_script(monkeypatch, aevb, ["--seed", "-1", "--compare-pyvae", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--compare-pyvae" in err and "seed" in err
    with pytest.raises(Ran):  # without --compare-pyvae the baseline alone takes it
        _run_script(monkeypatch, aevb, ["--seed", "-1"])


def test_aevb_baseline_refuses_a_batch_larger_than_the_dataset(monkeypatch, capsys):
    mod = _script("aevb_baseline")
    tiny = types.SimpleNamespace(train=torch.rand(10, 4), test=torch.rand(3, 4), x_dim=4)
    monkeypatch.setattr(mod, "load_dataset", lambda *a, **k: tiny)
    with torch.random.fork_rng(devices=[]):
        _refused(capsys, lambda: _run_script(monkeypatch, mod, ["--dataset", "digits", "--batch-size", "11",
                                                                 "--hidden", "4", "--latent", "2", "--epochs", "1"]),
                 "--batch-size")


def test_aevb_baseline_valid_values_parse(aevb, monkeypatch):
    with pytest.raises(Ran):  # parsing passed: the first torch call (threads) is reached
        _run_script(monkeypatch, aevb, ["--epochs", "1", "--batch-size", "1", "--latent", "1", "--hidden", "1",
                                        "--lr", "1e-4", "--seed", "-3", "--threads", "2", "--dataset", "digits"])
    with pytest.raises(Ran):
        _run_script(monkeypatch, aevb, [])


@pytest.fixture
def trainer(monkeypatch):
    """bench/trainer_vs_step.py, its trainer replaced by Ran."""
    import pyvae.train

    monkeypatch.setattr(pyvae.train, "train", _ran)
    return _script("trainer_vs_step")


TRAINER_BAD = [("--batch-size", "0"), ("--epochs", "0"), ("--target-s", "0"), ("--target-s", "inf"),
               ("--dataset", "no-such-set"), ("--dataset", "digits")]


@pytest.mark.parametrize("flag, value", TRAINER_BAD, ids=[f"{f}={v}" for f, v in TRAINER_BAD])
def test_trainer_vs_step_refuses_nonsense(trainer, monkeypatch, capsys, flag, value):
    _refused(capsys, lambda: _run_script(monkeypatch, trainer, [flag, value]), flag)


def test_trainer_vs_step_valid_values_parse(trainer, monkeypatch):
    with pytest.raises(Ran) as e:
        _run_script(monkeypatch, trainer, ["--batch-size", "1", "--epochs", "1", "--target-s", "0.1",
                                           "--dataset", "mnist-5k", "--precision", "fp32"])
    cfg = e.value.args[0]
    assert (cfg.batch_size, cfg.epochs, cfg.dataset) == (1, 1, "mnist-5k")


@pytest.mark.parametrize("epochs", [1, 4])
def test_trainer_vs_step_pairs_each_epoch_with_the_block_after_it(monkeypatch, tmp_path, capsys, epochs):
    """The trainer's epochs and the bare-step blocks, faked: epoch k runs at 100 samples/s times k, the block timed
    after it at (100 times k) / ratio_k; the row's ratio is the median of the per-epoch ratios of epochs 2.. (the
    one epoch when there is one), whatever the drift, and the first epoch is reported apart."""
    import pyvae.train
    from pyvae.benchmarks import train as T

    ratios = [0.3, 0.9, 0.8, 0.85]  # the first epoch's is the route races'; drift: epoch k is k times faster
    B = 10

    def fake_train(cfg, log=print, **kw):
        assert cfg.epochs == epochs
        history = []
        for k in range(1, cfg.epochs + 1):
            history.append({"samples_per_s": 100.0 * k})
            state["epoch"] = k
            log("train: bf16-mixed: a note line, not an epoch")
            log(f"epoch {k}/{cfg.epochs}  ...")
        return types.SimpleNamespace(history=history)

    def fake_measure_case(cands, **kw):
        k = state["epoch"]
        sps = 100.0 * k / ratios[k - 1]
        return {"pyvae": {"median_ms": B / sps * 1e3}}

    state = {}
    monkeypatch.setattr(pyvae.train, "train", fake_train)
    monkeypatch.setattr(T, "build_steps", lambda *a, **k: {"pyvae": lambda: None})
    monkeypatch.setattr(T, "gemm_only", lambda *a, **k: (0.001, 1.0))
    monkeypatch.setattr(C, "measure_case", fake_measure_case)
    out = tmp_path / "rows.jsonl"
    mod = _script("trainer_vs_step")
    _run_script(monkeypatch, mod, ["--batch-size", str(B), "--epochs", str(epochs), "--precision", "fp32",
                                   "--out", str(out)])
    row = json.loads(out.read_text())
    read = ratios[1:epochs] if epochs > 1 else ratios[:1]
    assert row["ratio"] == pytest.approx(sorted(read)[len(read) // 2])  # 0.85 for epochs 2..4; 0.3 for one
    assert len(row["bare_step_ms_per_epoch"]) == epochs and row["first_epoch_samples_per_s"] == 100.0
    assert row["bare_samples_per_s"] == pytest.approx(B / (row["bare_step_ms"] * 1e-3))
    assert ("epochs 2.." if epochs > 1 else "the one epoch") in capsys.readouterr().out


# ----------------------------------------------------------------------------- the helpers
def test_helpers_take_their_range_and_name_what_they_expect():
    assert C.pos_int("1") == 1 and C.nonneg_int("0") == 0
    assert C.pos_float("1e-9") == 1e-9 and C.nonneg_float("0") == 0.0
    assert C.seed_int(str(-2 ** 63)) == -2 ** 63 and C.seed_int(str(2 ** 64 - 1)) == 2 ** 64 - 1
    for fn, bad in ((C.pos_int, "0"), (C.pos_int, "1.5"), (C.nonneg_int, "-1"), (C.pos_float, "0"),
                    (C.pos_float, "inf"), (C.nonneg_float, "-0.1"), (C.nonneg_float, "nan"),
                    (C.seed_int, str(2 ** 64)), (C.seed_int, str(-2 ** 63 - 1))):
        with pytest.raises(argparse.ArgumentTypeError, match="expected"):
            fn(bad)

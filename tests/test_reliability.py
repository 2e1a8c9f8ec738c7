"""Regression tests of the reliability audit: each failed (a wrong answer, a crash, a traceback where one
line is promised, or a run left inconsistent) before its fix."""
import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import pyvae
from pyvae import checkpoint
from pyvae.cli import main
from pyvae.data import load_dataset
from pyvae.train import NonFiniteLossError, build_config, train

TINY = dict(dataset="digits", hidden=16, latent=4, batch_size=50, epochs=1, progress=False, plots=False, threads=1)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", binarize="dynamic")


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("rel") / "run"
    train(build_config({**TINY, "out": str(out)}), data=digits, log=lambda *a: None)
    return out


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


# ------------------------------------------------------------------------------------ ops
def test_linear_act_reads_a_strided_bias_by_its_strides():
    bias = torch.arange(6.0)[::2]  # [0, 2, 4], stride 2
    for act in ("relu", "tanh", "identity"):
        with pyvae.ops.fused_only():
            y = pyvae.linear_act(torch.zeros(1, 5), torch.zeros(3, 5), bias, act)
        torch.testing.assert_close(y, pyvae.reference.ACTIVATIONS[act](torch.tensor([[0.0, 2.0, 4.0]])))


def test_linear_act_expanded_bias_and_its_gradient():
    x = torch.randn(7, 5, dtype=torch.float64)
    w = torch.randn(3, 5, dtype=torch.float64)
    b0 = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    with pyvae.ops.fused_only():
        y = pyvae.linear_act(x, w, b0.expand(3), "tanh")
    ref = torch.tanh(x @ w.T + 0.5)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    (gb,) = torch.autograd.grad(y, b0, g)
    torch.testing.assert_close(gb, ((1 - ref ** 2) * g).sum().reshape(1))


def test_linear_act_backward_op_checks_grad_and_out():
    op = torch.ops.pyvae.linear_act_backward
    x, w = torch.randn(10, 4), torch.randn(8, 4)
    with pytest.raises(ValueError, match="grad must have the output's shape"):
        op(torch.ones(10, 7), x, w, torch.zeros(10, 8), True, "tanh", [True] * 3)
    with pytest.raises(ValueError, match="out .* must have shape"):
        op(torch.ones(10, 8), x, w, torch.zeros(10, 7), True, "tanh", [True] * 3)
    with pytest.raises(ValueError, match="output_mask must have 3"):
        op(torch.ones(10, 8), x, w, torch.zeros(10, 8), True, "tanh", [True] * 2)


def test_reparameterize_argument_types():
    mu = torch.zeros(3, 4)
    with pytest.raises(TypeError, match="generator"):
        pyvae.reparameterize(mu, mu, generator=5)
    assert pyvae.reparameterize(mu, mu, samples=np.int64(2)).shape == (2, 3, 4)
    with pytest.raises(ValueError, match="samples"):
        pyvae.reparameterize(mu, mu, samples=2.0)


def test_the_gate_refuses_a_tensor_the_kernel_would_misread():
    from pyvae import _gate

    y = torch.zeros(4, 6)
    with pytest.raises(RuntimeError, match="bias must be a contiguous"):
        _gate.bias_act_fwd(y=y, bias=torch.arange(12.0)[::2], act=_gate.ACTIVATIONS["tanh"])
    with pytest.raises(RuntimeError, match="of 6 elements"):
        _gate.bias_act_fwd(y=y, bias=torch.zeros(5), act=_gate.ACTIVATIONS["tanh"])
    with pytest.raises(RuntimeError, match="grad_y must be"):
        _gate.act_bwd(act=0, grad_y=torch.zeros(6, 4).t())
    with pytest.raises(RuntimeError, match="advise_huge_pages: t must be a contiguous CPU tensor"):
        _gate.advise_huge_pages(torch.empty(64, 64).t())
    with pytest.raises(RuntimeError, match="advise_huge_pages: t must be a contiguous CPU tensor"):
        _gate.advise_huge_pages(None)


# ------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("flag,value", [("--weight-decay", "inf"), ("--kl-warmup", "inf"), ("--kl-warmup", "nan"),
                                       ("--lr", "inf"), ("--grad-clip", "nan")])
def test_non_finite_flags_are_refused(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["train", flag, value])
    assert e.value.code == 2 and "finite" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["weight_decay", "kl_warmup", "grad_clip", "lr"])
def test_non_finite_config_keys_are_refused(tmp_path, key):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"{key} = inf\n")
    with pytest.raises(ValueError, match=f"{key} must be .*finite"):
        build_config({}, config_file=str(cfg))


def test_non_finite_loss_stops_with_the_last_good_checkpoint_intact(tmp_path, digits):
    out = tmp_path / "nan"
    train(build_config({**TINY, "out": str(out)}), data=digits, log=lambda *a: None)
    before = (out / "checkpoint.pt").read_bytes()
    poisoned = dataclasses.replace(digits, train=torch.full_like(digits.train, float("nan")), binarize="none")
    with pytest.raises(NonFiniteLossError, match=r"step \d+ .*non-finite loss.*last good checkpoint"):
        train(build_config({"resume": str(out), "epochs": 2}), data=poisoned, log=lambda *a: None)
    assert (out / "checkpoint.pt").read_bytes() == before
    # skip: an epoch none of whose steps was finite trains nothing; it is not saved (its metrics would be made up)
    with pytest.raises(NonFiniteLossError, match=r"every step of epoch 2 gave a non-finite loss \(%d steps skipped"
                       % (digits.train.shape[0] // 50)):
        train(build_config({"resume": str(out), "epochs": 2, "on_nonfinite": "skip"}), data=poisoned,
              log=lambda *a: None)
    assert (out / "checkpoint.pt").read_bytes() == before


def test_skip_trains_on_past_a_few_non_finite_steps(tmp_path, digits):
    poisoned = dataclasses.replace(digits, train=digits.train.clone(), binarize="none")
    poisoned.train[:2] = float("nan")  # two rows: at most two batches of an epoch
    out = tmp_path / "skip"
    r = train(build_config({**TINY, "out": str(out), "epochs": 2, "on_nonfinite": "skip"}), data=poisoned,
              log=lambda *a: None)
    ck = checkpoint.load_checkpoint(out)
    assert 2 <= ck["state"]["skipped"] <= 4 and [h["epoch"] for h in r.history] == [1, 2]
    assert all(math.isfinite(h[k]) for h in r.history for k in ("train_elbo", "test_elbo", "kl"))
    assert all(bool(torch.isfinite(v).all()) for v in ck["model"].values())  # no update from a NaN step


def test_diverged_weights_are_never_checkpointed(tmp_path, digits):
    # lr=30 makes the weights non-finite from a step whose loss was still finite; skip cannot catch that, so
    # the end of the epoch does: its test ELBO is not finite and its checkpoint is not written.
    out = tmp_path / "diverged"
    with pytest.raises(NonFiniteLossError, match=r"test ELBO after epoch 1 is not finite.*no checkpoint was written"):
        train(build_config({**TINY, "out": str(out), "lr": 30.0, "on_nonfinite": "skip"}), data=digits,
              log=lambda *a: None)
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.csv").exists()
    # the directory holds no run yet, so a new one may take it
    train(build_config({**TINY, "out": str(out), "epochs": 1}), data=digits, log=lambda *a: None)
    assert (out / "checkpoint.pt").is_file()


def test_a_fresh_run_never_replaces_another_run(tmp_path, digits):
    out = tmp_path / "taken"
    train(build_config({**TINY, "out": str(out), "epochs": 1}), data=digits, log=lambda *a: None)
    before = {n: (out / n).read_bytes() for n in ("checkpoint.pt", "metrics.csv", "config.json")}
    with pytest.raises(FileExistsError, match=r"out: .*taken already holds a run \(checkpoint.pt, metrics.csv, "
                                              r"metrics.jsonl\).*--resume"):
        train(build_config({**TINY, "out": str(out), "latent": 3}), data=digits, log=lambda *a: None)
    assert {n: (out / n).read_bytes() for n in before} == before


def test_a_resume_never_replaces_another_run(tmp_path, digits):
    """A resume writes into its own run's directory or into one holding no run. Resuming run A into run B's
    directory (--out), or a copy of A's checkpoint placed in B's directory, replaced B's checkpoint, metrics
    and config without a word."""
    a, b = tmp_path / "a", tmp_path / "b"
    train(build_config({**TINY, "out": str(a), "epochs": 1}), data=digits, log=lambda *x: None)
    train(build_config({**TINY, "out": str(b), "epochs": 1, "latent": 3}), data=digits, log=lambda *x: None)
    shutil.copy(a / "checkpoint.pt", b / "copy-of-a.pt")
    before = {n: (b / n).read_bytes() for n in ("checkpoint.pt", "metrics.csv", "metrics.jsonl", "config.json")}
    for resume, out in ((a, b), (b / "copy-of-a.pt", None)):
        cfg = {"resume": str(resume), "epochs": 2, **({"out": str(out)} if out else {})}
        with pytest.raises(FileExistsError, match=r"out: .*b already holds a run .*other than the checkpoint resumed"):
            train(build_config(cfg), data=digits, log=lambda *x: None)
        assert {n: (b / n).read_bytes() for n in before} == before
    # its own run, and a directory that holds none, still take a resume
    train(build_config({"resume": str(b), "epochs": 2}), data=digits, log=lambda *x: None)
    assert len(checkpoint.load_checkpoint(b)["history"]) == 2
    train(build_config({"resume": str(a), "epochs": 2, "out": str(tmp_path / "c")}), data=digits, log=lambda *x: None)
    assert len(checkpoint.load_checkpoint(tmp_path / "c")["history"]) == 2


def test_a_resume_that_cannot_start_changes_no_file(tmp_path, digits, monkeypatch):
    """A resume refused at start (tensorboard asked for, not installed) rewrote config.json first: the run's
    config then said 3 epochs and tensorboard on while its checkpoint stood at 1."""
    import builtins

    out = tmp_path / "r"
    train(build_config({**TINY, "out": str(out), "epochs": 1}), data=digits, log=lambda *x: None)
    before = {n: (out / n).read_bytes() for n in ("checkpoint.pt", "metrics.csv", "config.json")}
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("no tensorboard here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ValueError, match="tensorboard"):
        train(build_config({"resume": str(out), "epochs": 3, "tensorboard": True}), data=digits, log=lambda *x: None)
    assert {n: (out / n).read_bytes() for n in before} == before


def test_limit_keeps_a_fixed_random_subset():
    """The embedded MNIST-5k keeps its source's label order: ``limit=500`` trained on 450 zeros and 50 ones,
    and ``pyvae eval --limit 50`` scored zeros alone. A limit now keeps a fixed random subset of each split
    (NOTE: [Limited splits] in pyvae/data.py): every digit, the same rows in every call, in the split's order."""
    full = load_dataset("mnist-5k", binarize="none")
    part = load_dataset("mnist-5k", binarize="none", limit=500)
    again = load_dataset("mnist-5k", binarize="none", limit=500)
    assert part.train.shape[0] == 500 and part.test.shape[0] == min(500, len(full.test))
    counts = torch.bincount(part.train_labels, minlength=10)
    assert counts.min() >= 25 and counts.max() <= 80, counts  # each digit near its 50
    assert torch.equal(part.train, again.train) and torch.equal(part.test, again.test)
    keep = pyvae.data.limit_rows(len(full.train), 500)
    assert torch.equal(part.train, full.train[keep]) and bool((keep[1:] > keep[:-1]).all())
    assert pyvae.data.limit_rows(len(full.test), 10_000) is None  # a limit past the split keeps it whole
    test_part = load_dataset("mnist-5k", binarize="none", limit=50)
    assert torch.bincount(test_part.test_labels, minlength=10).count_nonzero() >= 8


def test_eval_limit_is_the_same_subset_and_checked(run):
    """``eval_run(limit=...)`` scores the fixed subset, not the first rows; 0 scored nothing as a perfect
    0 nats and a negative limit dropped rows from the end."""
    from pyvae.runs import eval_run, run_data

    ckpt = checkpoint.load_checkpoint(run)
    data, test = run_data(ckpt, limit=20)
    assert torch.equal(test, data.test[pyvae.data.limit_rows(len(data.test), 20)])
    assert not torch.equal(test, data.test[:20])
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match="limit must be an int >= 1"):
            eval_run(run, k=0, ll_samples=0, limit=bad)


def test_seeds_up_to_two_to_the_64(run, capsys, tmp_path):
    """The largest seed works in every command (``seed + 1`` overflowed torch's generator: "Overflow when
    unpacking long long", naming nothing), and one past it is refused naming the seed."""
    top = str(2 ** 64 - 1)
    assert main(["eval", str(run), "--k", "2", "--ll-samples", "0", "--limit", "5", "--seed", top]) == 0
    assert main(["denoise", str(run), "--n", "2", "--draws", "8", "--fit-steps", "0", "--seed", top,
                 "--out", str(tmp_path / "d.png")]) == 0
    capsys.readouterr()
    for cmd in (["eval", str(run)], ["sample", str(run)], ["inpaint", str(run)], ["denoise", str(run)]):
        with pytest.raises(SystemExit):
            main(cmd + ["--seed", str(2 ** 64)])
        assert "expected an integer seed in [0, 2**64)" in capsys.readouterr().err
    from pyvae.runs import eval_run
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\)"):
        eval_run(run, k=0, ll_samples=0, seed=2 ** 64)


def test_denoise_flip_is_checked_at_parse_time(run, capsys):
    """``--flip 0.7`` passed the command line (its check said [0, 1]) and failed in the library."""
    with pytest.raises(SystemExit):
        main(["denoise", str(run), "--flip", "0.7"])
    assert "expected a probability in [0, 0.5)" in capsys.readouterr().err


def test_inpaint_and_denoise_a_run_with_few_training_images(tmp_path, capsys):
    """A run trained on 3 images: inpaint and denoise compare against the 6 nearest training images, and
    refused with "k must be at most the 3 rows of train", a k the user cannot set. They take all 3."""
    out = tmp_path / "tiny"
    assert main(["train", "--dataset", "digits", "--limit", "3", "--batch-size", "3", "--epochs", "1",
                 "--hidden", "8", "--latent", "2", "--no-progress", "--no-plots", "--out", str(out)]) == 0
    assert main(["inpaint", str(out), "--n", "2", "--draws", "8", "--fit-steps", "0",
                 "--out", str(tmp_path / "i.png")]) == 0
    assert main(["denoise", str(out), "--n", "2", "--draws", "8", "--fit-steps", "0",
                 "--out", str(tmp_path / "d.png")]) == 0


def test_path_settings_of_the_wrong_type_are_named():
    """A TOML ``out = 5`` or ``resume = 5`` failed in pathlib ("expected str, bytes or os.PathLike object,
    not int"), and ``data_dir = 5`` was taken and saved into config.json."""
    for key in ("out", "resume", "data_dir"):
        with pytest.raises(ValueError, match=f"{key} must be a path"):
            build_config({key: 5})


def test_a_checkpoint_whose_config_lacks_the_dataset_is_a_one_line_error(tmp_path, run, capsys):
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    p = tmp_path / "noset.pt"
    torch.save(dict(ck, config={k: v for k, v in ck["config"].items() if k != "dataset"}), p)
    _one_line_error(capsys, ["eval", str(p), "--k", "0", "--ll-samples", "0"], str(p), "config lacks ['dataset']")


def test_default_run_directories_are_never_shared(tmp_path, digits, monkeypatch):
    # Without --out the directory is named by the second the run starts: two runs in one second get two.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.strftime", lambda fmt, *a: "20261130-000000")
    dirs = [train(build_config({**TINY, "epochs": 1, "latent": k}), data=digits, log=lambda *a: None).run_dir
            for k in (2, 3, 4)]
    assert [d.name for d in dirs] == ["digits-20261130-000000", "digits-20261130-000000-2", "digits-20261130-000000-3"]
    assert [checkpoint.load_checkpoint(d)["config"]["latent"] for d in dirs] == [2, 3, 4]


# ------------------------------------------------------------------------ one-line errors
def test_checkpoint_faults_are_one_line_errors(tmp_path, run, capsys):
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    cases = {}
    bad_shape = dict(ck, model={k: (v[:-1] if k == "dec_logits.bias" else v) for k, v in ck["model"].items()})
    cases["shape"] = (bad_shape, "do not fit the model")
    cases["config"] = (dict(ck, model_config=dict(ck["model_config"], hidden=17)), "do not fit the model")
    cases["missing"] = ({k: v for k, v in ck.items() if k != "history"}, "missing ['history']")
    nan = dict(ck, model={k: v.clone().fill_(float("nan")) if k == "enc_head.bias" else v for k, v in ck["model"].items()})
    cases["nan"] = (nan, "non-finite weights")
    for name, (c, needle) in cases.items():
        p = tmp_path / f"{name}.pt"
        torch.save(c, p)
        for argv in (["eval", str(p), "--k", "0", "--ll-samples", "0"], ["sample", str(p), "--out", str(tmp_path)],
                     ["inpaint", str(p), "--n", "2", "--out", str(tmp_path / "i.png")]):
            _one_line_error(capsys, argv, str(p), needle)


def test_resume_faults_are_one_line_errors(tmp_path, run, capsys):
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    bad_rng = dict(ck, rng={"torch": torch.zeros(3, dtype=torch.uint8), "cuda": []})
    p = tmp_path / "rng" / "checkpoint.pt"
    p.parent.mkdir()
    torch.save(bad_rng, p)
    _one_line_error(capsys, ["train", "--resume", str(p), "--epochs", "2", "--no-progress"], "RNG state")
    q = tmp_path / "cfg" / "checkpoint.pt"
    q.parent.mkdir()
    torch.save(dict(ck, model_config=dict(ck["model_config"], latent=9)), q)
    _one_line_error(capsys, ["train", "--resume", str(q), "--epochs", "2", "--no-progress"], "does not match")


def test_out_and_device_faults_are_one_line_errors(tmp_path, run, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    _one_line_error(capsys, ["train", "--dataset", "digits", "--epochs", "1", "--out", str(f), "--no-progress"],
                    "not a directory")
    _one_line_error(capsys, ["sample", str(run), "--out", str(f)], "is a file")
    for dev in ("tpu", "meta"):
        with pytest.raises(SystemExit) as e:
            main(["eval", str(run), "--device", dev])
        assert e.value.code == 2 and "cpu, cuda or cuda:N" in capsys.readouterr().err


def test_file_system_and_memory_faults_are_one_line_errors(tmp_path, run, capsys):
    long = "a" * 300  # a path component over the file system's 255 bytes: OSError ENAMETOOLONG
    _one_line_error(capsys, ["train", "--dataset", "digits", "--epochs", "1", "--out", str(tmp_path / long),
                             "--no-progress"], "File name too long")
    _one_line_error(capsys, ["eval", str(tmp_path / long)], "File name too long")
    # a model too large for the machine: torch's CPU allocator raises a plain RuntimeError
    _one_line_error(capsys, ["train", "--dataset", "digits", "--epochs", "1", "--hidden", "2000000000",
                             "--out", str(tmp_path / "huge"), "--no-progress"], "out of memory")


def test_zero_epochs_claims_no_files(tmp_path, capsys):
    assert main(["train", "--dataset", "digits", "--epochs", "0", "--out", str(tmp_path / "z"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "checkpoint.pt" not in printed and "no epoch trained" in printed
    assert not (tmp_path / "z" / "checkpoint.pt").exists()


# ------------------------------------------------------------------------------- crashes
def test_stale_temporaries_are_removed_and_metrics_follow_the_checkpoint(tmp_path, digits):
    out = tmp_path / "crash"
    train(build_config({**TINY, "out": str(out)}), data=digits, log=lambda *a: None)
    # What a kill leaves: a half-written checkpoint temporary, and metrics one epoch ahead of the checkpoint.
    (out / "checkpoint.pt.abc123.tmp").write_bytes(b"half")
    rows = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(rows + [rows[-1].replace('"epoch": 1', '"epoch": 2')]) + "\n")
    r = train(build_config({"resume": str(out), "epochs": 2}), data=digits, log=lambda *a: None)
    assert not list(out.glob("*.tmp"))
    got = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert got == [1, 2] == [h["epoch"] for h in r.history]
    assert len((out / "metrics.csv").read_text().splitlines()) == 3


@pytest.mark.parametrize("fn", [
    lambda m: pyvae.gaussian_kl(m, torch.zeros(3, 4)).sum(),
    lambda m: pyvae.bernoulli_log_prob(m, torch.ones(3, 4)).sum(),
    lambda m: pyvae.reparameterize(m, torch.zeros(3, 4)).sum(),
    lambda m: pyvae.linear_act(m, torch.ones(2, 4), None, "tanh").sum(),
], ids=["gaussian_kl", "bernoulli_log_prob", "reparameterize", "linear_act"])
def test_torch_func_is_refused_with_a_clear_message(fn):
    # NOTE: [torch.func]: torch's register_autograd Function cannot run under torch.func transforms; the
    # message names the op and the way out instead of torch's setup_context error.
    with pytest.raises(RuntimeError, match=r"pyvae\.\w+: torch.func transforms .* torch.autograd.grad"):
        torch.func.grad(fn)(torch.randn(3, 4))


def test_cpu_arch_env_var_is_validated(tmp_path):
    # PYVAE_CPU_ARCH with a name no kernel build has ("avx-512") silently ran the best build, so a run meant
    # to time the avx2 kernels timed the avx512 ones; now the import refuses it, naming the variable. A known
    # name still selects its build (capped at what the CPU runs), and an empty value means unset.
    import subprocess
    import sys

    def run(value, code="import pyvae; print(pyvae._gate.cpu_arch())"):
        env = dict(os.environ, PYVAE_CPU_ARCH=value)  # (outside the checkout: its pyvae/ has no built _C)
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)

    r = run("avx-512")
    assert r.returncode != 0 and "PYVAE_CPU_ARCH must be one of avx512, avx2, base" in r.stderr, r.stderr[-2000:]
    best = pyvae._gate.cpu_archs()[0]
    assert run("").stdout.strip() == best
    assert run("base").stdout.strip() == "base"


def test_cpu_arch_names_are_the_compiled_tables():
    # The import check above names the builds by hand; a build added to csrc/cpu/dispatch.cpp and not here
    # would be refused by name.
    import re
    from pathlib import Path

    src = (Path(__file__).resolve().parents[1] / "csrc" / "cpu" / "dispatch.cpp").read_text()
    multi = re.search(r"const KernelTable kTables\[\] = \{([^}]*)\};", src).group(1)
    assert tuple(re.findall(r"PYVAE_TABLE\((\w+)\)", multi)) == pyvae._gate.CPU_ARCH_NAMES

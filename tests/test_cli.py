"""The ``pyvae`` command line end to end on tiny data: train, resume, eval, sample, help, errors."""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

from pyvae.cli import main

TINY = ["--dataset", "digits", "--hidden", "16", "--batch-size", "50", "--threads", "1", "--no-progress"]


# Subprocesses run outside the source checkout: its pyvae/ has no compiled _C when pyvae is installed
# non-editable, and `python -m` would put the working directory first on sys.path.
_CWD = tempfile.gettempdir()


def _env(**extra):
    return dict(os.environ, **extra)


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "pyvae", *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(PYTHONWARNINGS="ignore"), cwd=_CWD, check=False)


@pytest.fixture(scope="module")
def run2d(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--latent", "2", "--epochs", "2", "--out", str(out)]) == 0
    return out


def test_train_end_to_end(run2d, capsys):
    for name in ("metrics.jsonl", "metrics.csv", "checkpoint.pt", "config.json", "learning_curve.png",
                 "samples.png", "reconstructions.png", "manifold.png"):
        assert (run2d / name).is_file(), name
    rows = [json.loads(x) for x in (run2d / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_train_prints_final_elbo_and_pictures(tmp_path, capsys):
    assert main(["train", *TINY, "--latent", "3", "--epochs", "1", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "final test ELBO:" in out and "pictures:" in out and str(tmp_path / "r" / "samples.png") in out


def test_resume_more_epochs(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", *TINY, "--latent", "3", "--epochs", "1", "--no-plots", "--out", str(out)]) == 0
    assert main(["train", "--resume", str(out), "--epochs", "2", "--no-plots"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert not list(out.glob("*.png"))
    # plots, progress and tensorboard may change on resume, both ways: --plots switches the PNGs back on
    assert main(["train", "--resume", str(out), "--epochs", "3", "--plots", "--progress"]) == 0
    assert (out / "samples.png").is_file() and (out / "learning_curve.png").is_file()


def test_sample_without_data_draws_the_runs_own_image_shape(tmp_path, capsys):
    # --no-reconstructions draws without the data, from the image shape the checkpoint holds; a checkpoint
    # without one (older runs) gets its dataset's usual shape only where it fits, else a square one.
    from PIL import Image

    out = tmp_path / "r"
    assert main(["train", *TINY, "--latent", "3", "--epochs", "1", "--no-plots", "--out", str(out)]) == 0
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["image_shape"] == [8, 8]

    def drawn(image_shape, dataset="digits"):
        c = dict(ck, config=dict(ck["config"], dataset=dataset))
        if image_shape is None:
            del c["image_shape"]
        else:
            c["image_shape"] = image_shape
        torch.save(c, out / "checkpoint.pt")
        assert main(["sample", str(out), "--no-reconstructions", "--n", "100"]) == 0
        return Image.open(out / "samples.png").size  # (width, height)

    def size(h, w):  # a 10 x 10 grid, 1-pixel borders, scaled by whole pixels to about 400
        gh, gw = 10 * (h + 1) + 1, 10 * (w + 1) + 1
        k = max(1, round(400 / max(gh, gw)))
        return gw * k, gh * k

    assert drawn([4, 16]) == size(4, 16)
    assert drawn(None) == size(8, 8)  # digits' own shape
    assert drawn(None, dataset="mnist") == size(8, 8)  # 28 x 28 does not fit 64 pixels: a square


def test_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('dataset = "digits"\nhidden = 8\nlatent = 2\nepochs = 1\nplots = false\nprogress = false\n')
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["hidden"] == 8


def test_eval(run2d, capsys):
    assert main(["eval", str(run2d), "--k", "5", "--ll-samples", "20", "--limit", "40"]) == 0
    out = capsys.readouterr().out
    vals = {line.split(":")[0]: float(line.split(":")[1].split()[0]) for line in out.splitlines() if "nats" in line}
    assert set(vals) == {"test ELBO", "IWAE bound (k=5)", "log p(x) (importance sampling, 20 samples)"}
    assert vals["test ELBO"] < 0 and "test points: 40" in out


def test_sample_manifold(run2d, tmp_path, capsys):
    assert main(["sample", str(run2d / "checkpoint.pt"), "--manifold", "--n", "16", "--out", str(tmp_path)]) == 0
    for name in ("samples.png", "manifold.png", "reconstructions.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_sample_manifold_needs_2d(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", *TINY, "--latent", "3", "--epochs", "1", "--no-plots", "--out", str(out)]) == 0
    assert main(["sample", str(out), "--manifold"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2-D latent" in err[0]


@pytest.mark.parametrize("cmd", [[], ["train"], ["eval"], ["sample"]])
def test_help(cmd):
    r = _run(*cmd, "--help")
    assert r.returncode == 0 and "usage: pyvae" in r.stdout
    if cmd == ["train"]:
        for flag in ("--dataset", "--data-dir", "--epochs", "--batch-size", "--latent", "--hidden", "--likelihood",
                     "--estimator", "--samples", "--optimizer", "--lr", "--weight-decay", "--device", "--precision",
                     "--seed", "--out", "--resume", "--config"):
            assert flag in r.stdout, flag


@pytest.mark.parametrize("args,match", [
    (["train", "--latent", "zero"], "--latent: expected a positive integer"),
    (["train", "--optimizer", "sgd"], "--optimizer: invalid choice"),
    (["train", "--dataset", "mnist", "--data-dir", "/nonexistent-dir", "--no-progress"], "dataset 'mnist'"),
    (["train", "--precision", "fp16-mixed", "--epochs", "0"], "fp16-mixed"),
    (["eval", "/nonexistent-run"], "no checkpoint"),
    (["train", "--weight-decay", "lots"], "--weight-decay"),
])
def test_errors_are_one_line(args, match):
    r = _run(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("pyvae") and "error:" in last and match in last


def test_a_closed_stdout_ends_quietly(tmp_path):
    """``pyvae tune --show | head`` where head has gone: exit status 141 (as SIGPIPE), no traceback."""
    p = subprocess.Popen([sys.executable, "-m", "pyvae", "tune", "--show"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                         env={**os.environ, "PYVAE_CACHE_DIR": str(tmp_path)})
    p.stdout.close()  # the reader goes away before the command writes its first line
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_console_script_installed():
    exe = shutil.which("pyvae")
    if exe is None:
        pytest.skip("the pyvae console script is not installed (pip install -e . re-creates it)")
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and r.stdout.startswith("pyvae ")


def test_torchrun_two_processes(tmp_path):
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        "-m", "pyvae", "train", *TINY, "--latent", "4", "--epochs", "1", "--no-plots",
                        "--out", str(out)], capture_output=True, text=True, timeout=180,
                       env=_env(OMP_NUM_THREADS="1"), cwd=_CWD, check=False)
    assert r.returncode == 0, r.stderr[:4000] + "\n...\n" + r.stderr[-1500:]
    assert r.stdout.count("final test ELBO") == 1  # rank 0 alone reports
    assert (out / "checkpoint.pt").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_frey_gaussian_from_synthetic_mat(tmp_path, capsys):
    scipy_io = pytest.importorskip("scipy.io")
    import numpy as np

    rng = np.random.default_rng(0)
    scipy_io.savemat(tmp_path / "frey_rawface.mat", {"ff": rng.integers(0, 256, (560, 120), dtype=np.uint8)})
    out = tmp_path / "frey"
    assert main(["train", "--dataset", "frey", "--data-dir", str(tmp_path), "--likelihood", "gaussian",
                 "--hidden", "20", "--latent", "2", "--batch-size", "20", "--epochs", "1", "--no-progress",
                 "--threads", "1", "--out", str(out)]) == 0
    assert (out / "manifold.png").is_file()
    assert json.loads((out / "config.json").read_text())["likelihood"] == "gaussian"


def test_train_continuous_bernoulli_end_to_end(tmp_path, capsys):
    """``pyvae train --likelihood continuous-bernoulli`` on the embedded digits, then eval and sample."""
    out = tmp_path / "cb"
    assert main(["train", *TINY, "--likelihood", "continuous-bernoulli", "--latent", "2", "--epochs", "1",
                 "--out", str(out)]) == 0
    assert "final test ELBO:" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["likelihood"] == "continuous-bernoulli" and cfg["binarize"] in ("auto", "none")
    for name in ("samples.png", "reconstructions.png", "manifold.png", "learning_curve.png"):
        assert (out / name).is_file(), name
    assert main(["eval", str(out), "--k", "5", "--ll-samples", "20", "--limit", "40"]) == 0
    text = capsys.readouterr().out
    vals = {line.split(":")[0]: float(line.split(":")[1].split()[0]) for line in text.splitlines() if "nats" in line}
    assert len(vals) == 3 and all(math.isfinite(v) for v in vals.values())
    # the bounds are ordered: ELBO <= IWAE (k = 5) <~ log p(x), all on grey levels (they can be > 0)
    assert vals["test ELBO"] <= vals["IWAE bound (k=5)"] + 1.0
    assert main(["sample", str(out / "checkpoint.pt"), "--n", "16", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "samples.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_runs_and_records(tmp_path):
    out = tmp_path / "kl.jsonl"
    r = _run("bench", "elbo", "--ops", "kl", "--batch", "3", "--reps", "2", "--modes", "full", "--providers",
             "torch-eager", "pyvae", "--no-memory", "--quiet-wait", "0", "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["op"] == "kl" and rows[0]["B"] == 3
    assert set(rows[0]["results"]) == {"torch-eager", "pyvae"}
    assert rows[0]["results"]["pyvae"]["median_ms"] > 0 and "eager/pyvae" in r.stdout


def test_bench_elbo_times_the_batch_binarization_forward_only(tmp_path):
    from pyvae.benchmarks import elbo

    case = elbo.setup_binarize(5, 6, 2, "cpu", torch.float32)
    for fn in (case["reference"], case["pyvae"]):  # both a fresh [B, D] of 0s and 1s from gathered grey levels
        x = fn(*case["args"])
        assert x.shape == (5, 6) and set(x.unique().tolist()) <= {0.0, 1.0}
    out = tmp_path / "binarize.jsonl"
    # --modes full: a differentiable op's mode; binarize has no gradient and is timed forward only
    r = _run("bench", "elbo", "--ops", "binarize", "--batch", "3", "--reps", "2", "--modes", "full", "--providers",
             "torch-eager", "pyvae", "--no-memory", "--quiet-wait", "0", "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(row["op"], row["mode"]) for row in rows] == [("binarize", "forward")]
    assert rows[0]["results"]["pyvae"]["median_ms"] > 0


def test_bench_mlp_fused_provider_and_shared_parameters(tmp_path):
    from pyvae.benchmarks import mlp

    case = mlp.setup_layer("enc2", 4, "cpu", "fp32")
    ref, fused = case["leaves"]["reference"], case["leaves"]["pyvae"]
    assert all(a is b for a, b in zip(ref, fused)) and len(ref) == len(fused) == 3  # weight, bias, x
    out = tmp_path / "mlp.jsonl"
    r = _run("bench", "mlp", "--ops", "enc2", "--batch", "3", "--precision", "fp32", "--reps", "2", "--modes",
             "full", "--providers", "torch-eager", "pyvae", "pyvae-fused", "--no-memory", "--quiet-wait", "0",
             "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and set(rows[0]["results"]) == {"torch-eager", "pyvae", "pyvae-fused"}
    assert "pyvae-fused ms" in r.stdout


def test_bench_mlp_stack_times_its_gemm_limit_beside_the_providers(tmp_path):
    out = tmp_path / "mlp.jsonl"
    r = _run("bench", "mlp", "--ops", "stack", "--batch", "3", "--precision", "fp32", "--reps", "2", "--modes",
             "full", "--providers", "torch-eager", "pyvae", "--no-memory", "--quiet-wait", "0", "--out", str(out),
             timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(row["results"]) == {"torch-eager", "pyvae"}  # the products are no providers
    assert len(row["gemm_products_ms"]) == 11
    assert row["gemm_only_ms"] == pytest.approx(sum(row["gemm_products_ms"].values()))
    for p, res in row["results"].items():
        assert row["gemm_efficiency"][p] == pytest.approx(row["gemm_only_ms"] / res["median_ms"])


def test_bench_train_fwd_bwd_rows_and_plot(tmp_path):
    out, png = tmp_path / "train.jsonl", tmp_path / "train.png"
    r = _run("bench", "train", "--batch", "4", "--precision", "fp32", "--step", "fwd-bwd", "--reps", "2",
             "--providers", "torch-eager", "pyvae", "--no-memory", "--quiet-wait", "0", "--out", str(out),
             "--plot", str(png), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["step"] == "fwd-bwd" and set(row["results"]) == {"torch-eager", "pyvae"}
    assert "| fwd-bwd | fp32 | 4 | pyvae |" in r.stdout
    assert png.read_bytes()[:4] == b"\x89PNG"

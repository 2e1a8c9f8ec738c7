"""pyvae.train: the AEVB loop, metrics, checkpoints, exact resume, Ctrl-C, config, 2-process DDP."""
import dataclasses
import json
import os
import signal
import socket
import sys

import pytest
import torch
from torch.distributions import Bernoulli, Independent, Normal, kl_divergence

from pyvae import checkpoint as C
from pyvae.data import load_dataset
from pyvae.evaluation import evaluate
from pyvae.models import VAE
from pyvae.train import METRIC_KEYS, TrainConfig, build_config, train

TINY = dict(dataset="digits", hidden=32, latent=4, batch_size=50, epochs=2, progress=False, plots=False, threads=1)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", binarize="dynamic")


def _cfg(tmp_path, name="run", **kw):
    return build_config({**TINY, "out": str(tmp_path / name), **kw})


def _quiet(*a):
    pass


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def _independent_terms(model, x, samples=64, seed=0):
    """Per-datapoint analytic KL(q(z|x) || N(0, I)) and a ``samples``-draw Monte Carlo estimate of
    E_q[log p(x|z)] of a Bernoulli ``model``, computed apart from pyvae: float64, eager torch layers
    (``fused=False``: nn.Linear + activation) holding the model's parameters, torch.distributions for
    the densities and the KL, torch.randn for the draws."""
    m = VAE(**model.config(), fused=False).double()
    m.load_state_dict(model.state_dict())
    x = x.double()
    mu, logvar = m.encode(x)
    q = Independent(Normal(mu, (0.5 * logvar).exp()), 1)
    kl = kl_divergence(q, Independent(Normal(torch.zeros_like(mu), torch.ones_like(mu)), 1))
    eps = torch.randn((samples, *mu.shape), generator=torch.Generator().manual_seed(seed), dtype=mu.dtype)
    z = mu + (0.5 * logvar).exp() * eps
    rec = Independent(Bernoulli(logits=m.decode(z)), 1).log_prob(x).mean(0)
    return kl, rec


def test_train_writes_run_dir(tmp_path, digits):
    r = train(_cfg(tmp_path, epochs=3, plots=True), data=digits, log=_quiet)
    assert [h["epoch"] for h in r.history] == [1, 2, 3]
    assert r.history[-1]["test_elbo"] > r.history[0]["test_elbo"]  # it learns
    assert r.history[-1]["samples_seen"] == 3 * (digits.train.shape[0] // 50) * 50
    rows = [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and set(METRIC_KEYS) <= set(rows[0])
    csv_lines = (r.run_dir / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].split(",") == list(METRIC_KEYS) and len(csv_lines) == 4
    for name in ("learning_curve", "samples", "reconstructions"):
        assert r.plots[name].is_file() and r.plots[name].read_bytes()[:4] == b"\x89PNG"
    assert json.loads((r.run_dir / "config.json").read_text())["hidden"] == 32
    assert not [p for p in r.run_dir.iterdir() if p.name.endswith(".tmp")]


def test_fresh_run_leaves_global_rng_alone(tmp_path, digits):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    train(_cfg(tmp_path, epochs=1), data=digits, log=_quiet)
    assert torch.equal(torch.get_rng_state(), before)


def test_checkpoint_is_weights_only_and_complete(tmp_path, digits):
    r = train(_cfg(tmp_path, epochs=1), data=digits, log=_quiet)
    ck = torch.load(r.checkpoint, weights_only=True)  # no code can run
    assert ck["format"] == C.FORMAT
    assert set(ck) >= {"model", "optimizer", "state", "config", "rng", "history", "model_config"}
    assert ck["state"]["epoch"] == 1 and ck["state"]["step"] == digits.train.shape[0] // 50
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(r.checkpoint).st_mode & 0o777 == 0o666 & ~umask  # like the run's other files, not 0600
    model, _ = C.load_model(r.run_dir)
    for k, v in r.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        C.load_checkpoint(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        C.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a pyvae checkpoint"):
        C.load_checkpoint(tmp_path / "other.pt")


def test_resume_reproduces_uninterrupted_run(tmp_path, digits):
    full = train(_cfg(tmp_path, "full", epochs=3), data=digits, log=_quiet)
    part = train(_cfg(tmp_path, "part", epochs=1), data=digits, log=_quiet)
    assert len(part.history) == 1
    res = train(build_config({"resume": str(part.run_dir), "epochs": 3}), data=digits, log=_quiet)
    assert res.run_dir == part.run_dir
    for k, v in full.model.state_dict().items():
        assert torch.equal(res.model.state_dict()[k], v), k
    assert [h["test_elbo"] for h in res.history] == [h["test_elbo"] for h in full.history]
    assert [h["train_elbo"] for h in res.history] == [h["train_elbo"] for h in full.history]


def test_resume_runs_the_routes_of_the_interrupted_run(tmp_path, digits, tuning, monkeypatch):
    """Layer and row-op routes round differently (NOTE: [Layer routes]), and a resumed process races afresh
    any shape class its route cache lacks (another cache, a race that was not cached): the checkpoint holds
    the routes the run used and the resume runs those, so it still ends bit-identical."""
    from pyvae import _tune
    from pyvae.ops import forget_routes

    def racing(winner, cache):
        monkeypatch.setenv("PYVAE_CACHE_DIR", str(tmp_path / cache))
        _tune.reset_for_tests()
        forget_routes()

        def measure(candidates, **kw):
            for fn in candidates.values():
                fn()
            return {n: (0.001 if n == winner else 0.002) for n in candidates}
        monkeypatch.setattr(_tune, "measure", measure)

    racing("torch", "a")
    full = train(_cfg(tmp_path, "full", epochs=2), data=digits, log=_quiet)
    racing("torch", "b")
    part = train(_cfg(tmp_path, "part", epochs=1), data=digits, log=_quiet)
    racing("pyvae", "c")  # a fresh cache whose races would pick pyvae's node and kernels everywhere
    res = train(build_config({"resume": str(part.run_dir), "epochs": 2}), data=digits, log=_quiet)
    for k, v in full.model.state_dict().items():
        assert torch.equal(res.model.state_dict()[k], v), k
    assert [h["train_elbo"] for h in res.history] == [h["train_elbo"] for h in full.history]
    # and the routes of the resumed run were pinned for that run only: the next run races again
    racing("pyvae", "d")
    train(_cfg(tmp_path, "other", epochs=1), data=digits, log=_quiet)
    assert _tune.used()["linear_act 64->32 tanh float32 rows<=64 train"] == "pyvae"


def test_resume_on_another_machine_key_says_it_is_not_bit_identical(tmp_path, digits):
    part = train(_cfg(tmp_path, "part", epochs=1), data=digits, log=_quiet)
    ck = torch.load(part.checkpoint, weights_only=True)
    assert ck["routes"]["used"] and ck["routes"]["machine"]["threads"] == TINY["threads"]
    ck["routes"]["machine"]["threads"] = 99  # as if written by a process on 99 threads
    torch.save(ck, part.checkpoint)
    said = []
    train(build_config({"resume": str(part.run_dir), "epochs": 2}), data=digits, log=said.append)
    assert any("another machine key" in m and "not bit-identically" in m for m in said), said


def test_ctrl_c_saves_and_resumes_exactly(tmp_path, digits):
    full = train(_cfg(tmp_path, "full", epochs=2, optimizer="adagrad", lr=0.02), data=digits, log=_quiet)
    seen = []

    def interrupt(p):
        seen.append(p["step"])
        if p["step"] == 7:  # a real SIGINT in the middle of epoch 1
            os.kill(os.getpid(), signal.SIGINT)

    cut = train(_cfg(tmp_path, "cut", epochs=2, optimizer="adagrad", lr=0.02), data=digits, on_step=interrupt,
                log=_quiet)
    assert cut.interrupted and seen[-1] == 7 and cut.history == []
    ck = C.load_checkpoint(cut.run_dir)
    assert ck["state"]["batch"] == 7 and ck["state"]["epoch"] == 0
    res = train(build_config({"resume": str(cut.run_dir)}), data=digits, log=_quiet)
    assert not res.interrupted
    for k, v in full.model.state_dict().items():
        assert torch.equal(res.model.state_dict()[k], v), k
    assert res.history[-1]["test_elbo"] == full.history[-1]["test_elbo"]


def test_options_run(tmp_path, digits):
    r = train(_cfg(tmp_path, epochs=2, optimizer="adagrad", lr=0.05, weight_decay="prior", kl_warmup=1.0,
                   grad_clip=5.0, estimator="mc", samples=2, precision="bf16-mixed", init="paper"),
              data=digits, log=_quiet)
    h = r.history[-1]
    assert all(torch.isfinite(torch.tensor(h[k])) for k in METRIC_KEYS)


@pytest.mark.parametrize("estimator", ["analytic", "mc"])
def test_train_metrics_match_an_independent_computation(tmp_path, estimator):
    """The epoch's train ELBO, KL and recon are means over its datapoints of the model's ELBO and its
    two terms, the unweighted KL even during KL warm-up. With lr = 1e-30 no parameter moves (checked),
    so every step sees the initial model; 1600 statically binarized rows in 16 batches of 100 are each
    seen once, so the metrics must be the training set's means of terms computed independently by
    ``_independent_terms``. The analytic KL is deterministic: it matches to float32 rounding; recon is
    estimated with 4 draws per row (standard error ~0.015 nat), the "mc" KL too (~0.003). A train
    ELBO that summed the warm-up objective instead of the ELBO is ~0.25 nat off (half the KL of ~0.5)."""
    data = load_dataset("digits", binarize="static", limit=1600)
    kw = dict(latent=16, batch_size=100, estimator=estimator, samples=4, kl_warmup=1.0, lr=1e-30)
    r = train(_cfg(tmp_path, "run", epochs=1, **kw), data=data, log=_quiet)
    init = train(_cfg(tmp_path, "init", epochs=0, **kw), data=data, log=_quiet).model
    for k, v in init.state_dict().items():
        assert torch.equal(r.model.state_dict()[k], v), k  # the model did not move
    kl, rec = _independent_terms(init, data.train)
    h = r.history[-1]
    assert kl.mean().item() > 0.4  # the KL is large enough for the tolerances below to see it
    if estimator == "analytic":
        assert h["kl"] == pytest.approx(kl.mean().item(), rel=1e-5)
    else:
        assert h["kl"] == pytest.approx(kl.mean().item(), abs=0.02)
    assert h["recon"] == pytest.approx(rec.mean().item(), abs=0.08)
    assert h["train_elbo"] == pytest.approx((rec - kl).mean().item(), abs=0.08)


@pytest.mark.skipif(not (torch.cuda.is_available() and __import__("pyvae").cuda_built()), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "fp16-mixed"])
def test_cuda_training(tmp_path, digits, precision):
    r = train(_cfg(tmp_path, device="cuda", precision=precision), data=digits, log=_quiet)
    assert r.history[-1]["test_elbo"] > r.history[0]["test_elbo"]
    assert next(r.model.parameters()).device.type == "cuda"


def test_gaussian_likelihood_continuous(tmp_path):
    data = load_dataset("digits", binarize="none")
    r = train(_cfg(tmp_path, likelihood="gaussian", epochs=2), data=data, log=_quiet)
    assert r.history[-1]["test_elbo"] > r.history[0]["test_elbo"]


def test_continuous_bernoulli_trains_on_grey_levels(tmp_path):
    """likelihood "continuous-bernoulli" keeps the grey levels by default ("auto" -> no binarization)."""
    from pyvae.data import resolve_binarize

    assert resolve_binarize("auto", "continuous-bernoulli") == "none"
    cfg = _cfg(tmp_path, likelihood="continuous-bernoulli", epochs=2)
    assert cfg.binarize_mode == "none"
    data = load_dataset("digits", binarize=cfg.binarize_mode)
    assert data.binarize == "none" and ((data.test > 0) & (data.test < 1)).any()
    r = train(cfg, data=data, log=_quiet)
    assert r.model.likelihood == "continuous-bernoulli"
    assert r.history[-1]["test_elbo"] > r.history[0]["test_elbo"]


def test_evaluate_deterministic_and_matches_an_independent_computation(digits):
    """evaluate's mean ELBO, KL and recon over the 179 test rows (batches of 64: a partial last batch)
    against ``_independent_terms``: the analytic KL to float32 rounding, recon and the ELBO within
    0.05 nat (32 draws per row: standard error ~0.01 nat; the KL is ~0.77 nat)."""
    torch.manual_seed(0)
    m = VAE(64, 16, 16)
    a = evaluate(m, digits.test, batch_size=64, samples=32, seed=3)
    b = evaluate(m, digits.test, batch_size=64, samples=32, seed=3)
    assert a == b
    kl, rec = _independent_terms(m, digits.test, samples=256)
    assert kl.mean().item() > 0.5
    assert a["kl"] == pytest.approx(kl.mean().item(), rel=1e-5)
    assert a["recon"] == pytest.approx(rec.mean().item(), abs=0.05)
    assert a["elbo"] == pytest.approx((rec - kl).mean().item(), abs=0.05)


def test_toml_config(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('dataset = "digits"\nlatent = 2\nlr = 0.01\nbatch-size = 20\n')
    cfg = build_config({"epochs": 1}, config_file=str(p))
    assert (cfg.dataset, cfg.latent, cfg.lr, cfg.batch_size, cfg.epochs) == ("digits", 2, 0.01, 20, 1)
    cfg2 = build_config({"latent": 3}, config_file=str(p))  # flags override the file
    assert cfg2.latent == 3
    p.write_text('[train]\nhidden = 7\n')
    assert build_config(config_file=str(p)).hidden == 7
    p.write_text('latnet = 3\n')
    with pytest.raises(ValueError, match="unknown config keys.*latnet"):
        build_config(config_file=str(p))
    p.write_text('latent = \n')
    with pytest.raises(ValueError, match="invalid TOML"):
        build_config(config_file=str(p))
    # with a [train] table, nothing may sit beside it: such keys used to be dropped without a word
    for text, beside in (('epochs = 1\n[train]\nhidden = 7\n', "epochs"), ('[train]\nhidden = 7\n[trian]\nepochs = 1\n', "trian")):
        p.write_text(text)
        with pytest.raises(ValueError, match=f"every key must be under it; found \\['{beside}'\\]"):
            build_config(config_file=str(p))
    p.write_text('plots = "false"\n')  # a string is not a bool (and "false" is truthy)
    with pytest.raises(ValueError, match="plots must be true or false, got 'false'"):
        build_config(config_file=str(p))


@pytest.mark.parametrize("kw,match", [
    (dict(dataset="cifar"), "dataset"), (dict(lr=-1.0), "lr"), (dict(epochs=-1), "epochs"),
    (dict(optimizer="sgd"), "optimizer"), (dict(precision="fp16-mixed"), "fp16-mixed"),
    (dict(likelihood="gaussian", binarize="dynamic"), "binarize"), (dict(weight_decay="big"), "weight_decay"),
    (dict(device="tpu"), "device"), (dict(batch_size=0), "batch_size"), (dict(seed=2 ** 64), "seed"),
    (dict(progress=1), "progress must be true or false"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        build_config(kw)


def test_resume_refuses_model_changes(tmp_path, digits):
    r = train(_cfg(tmp_path, epochs=1), data=digits, log=_quiet)
    with pytest.raises(ValueError, match="cannot change.*latent"):
        build_config({"resume": str(r.run_dir), "latent": 9})
    assert build_config({"resume": str(r.run_dir), "epochs": 5}).epochs == 5
    assert build_config({"resume": str(r.run_dir), "epochs": 1}).epochs == 1  # as many as done: nothing to do
    with pytest.raises(ValueError, match=r"epochs \(0\) is fewer than the 1 this run has already trained"):
        build_config({"resume": str(r.run_dir), "epochs": 0})


# ------------------------------------------------------------------------------------ DDP
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg_dict, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        r = train(TrainConfig(**cfg_dict), log=lambda *a: None)
        if rank == 0:
            torch.save({"params": r.model.state_dict(), "history": r.history}, out)
        # Ctrl-C on rank 0 only in the middle of epoch 1 of a second run: all ranks stop at the same
        # step, rank 0 checkpoints, and the resumed run matches the uninterrupted one.
        cut = dict(cfg_dict, out=cfg_dict["out"] + "-cut")

        def interrupt(p):
            if rank == 0 and p["step"] == 5:
                os.kill(os.getpid(), signal.SIGINT)

        r1 = train(TrainConfig(**cut), on_step=interrupt, log=lambda *a: None)
        assert r1.interrupted and r1.history == []
        r2 = train(build_config({"resume": cut["out"]}), log=lambda *a: None)
        if rank == 0:
            torch.save({"params": r2.model.state_dict(), "history": r2.history}, out + "-resumed")
        dist.barrier()  # no rank tears gloo down while another still uses it
    finally:
        dist.destroy_process_group()
    # As in NOTE: [torchrun exit] (pyvae/__main__.py): a finished worker occasionally aborted in torch's
    # C++ static destructors ("terminate called without an active exception"); skip them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _ddp_routes_worker(rank, world, port, cfg_dict, out):
    """A DDP run whose ranks race different routes (rank 0 torch's, rank 1 pyvae's), interrupted at step 5
    and resumed from fresh route caches whose races would pick the other way round on each rank."""
    import torch.distributed as dist

    from pyvae import _tune
    from pyvae.ops import forget_routes

    def racing(winner, cache):
        os.environ.update(PYVAE_TUNE="auto", PYVAE_CACHE_DIR=os.path.join(cfg_dict["out"] + "-cache", f"{cache}{rank}"))
        _tune.reset_for_tests()
        forget_routes()
        _tune._busy = lambda: False  # both ranks race at once on this machine: not a disturbance here

        def measure(candidates, **kw):
            for fn in candidates.values():
                fn()
            return {n: (0.001 if n == winner else 0.002) for n in candidates}
        _tune.measure = measure
        _tune._measure_undisturbed = lambda c, outcome=None, **kw: (measure(c), False)

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mine, other = ("torch", "pyvae") if rank == 0 else ("pyvae", "torch")
        racing(mine, "full")
        r = train(TrainConfig(**cfg_dict), log=lambda *a: None)
        cut = dict(cfg_dict, out=cfg_dict["out"] + "-cut")

        def interrupt(p):
            if rank == 0 and p["step"] == 5:
                os.kill(os.getpid(), signal.SIGINT)

        racing(mine, "part")
        assert train(TrainConfig(**cut), on_step=interrupt, log=lambda *a: None).interrupted
        racing(other, "resume")
        r2 = train(build_config({"resume": cut["out"]}), log=lambda *a: None)
        if rank == 0:
            torch.save({"full": r.model.state_dict(), "resumed": r2.model.state_dict()}, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_ddp_resume_runs_each_ranks_own_routes(tmp_path):
    """Under DDP each rank races its own routes; the checkpoint holds every rank's, and each rank takes its own
    back on resume, so the resumed run ends bit-identical to the uninterrupted one (with rank 0's routes on
    every rank it does not)."""
    import torch.multiprocessing as mp

    cfg = _cfg(tmp_path, "ddp", epochs=2, limit=600)
    out = tmp_path / "routes.pt"
    mp.spawn(_ddp_routes_worker, args=(2, _free_port(), dataclasses.asdict(cfg), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    ck = torch.load(tmp_path / "ddp-cut" / "checkpoint.pt", weights_only=True)
    key = "linear_act 64->32 tanh float32 rows<=32 train"  # a rank's slice of the batch of 50: 25 rows
    assert [r["used"][key] for r in ck["routes"]["ranks"]] == ["torch", "pyvae"]
    for k, v in got["full"].items():
        assert torch.equal(got["resumed"][k], v), k


def test_ddp_two_processes_match_one(tmp_path):
    import torch.multiprocessing as mp

    cfg = _cfg(tmp_path, "ddp", epochs=2, limit=600)
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), dataclasses.asdict(cfg), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    one = train(_cfg(tmp_path, "one", epochs=2, limit=600), log=_quiet)
    for k, v in one.model.state_dict().items():
        torch.testing.assert_close(got["params"][k], v, rtol=1e-4, atol=1e-5)
    for a, b in zip(got["history"], one.history):
        assert a["samples_seen"] == b["samples_seen"]
        assert a["test_elbo"] == pytest.approx(b["test_elbo"], abs=1e-3)
        assert a["train_elbo"] == pytest.approx(b["train_elbo"], abs=1e-3)
    assert (tmp_path / "ddp" / "checkpoint.pt").is_file()
    resumed = torch.load(str(out) + "-resumed", weights_only=True)
    for k, v in got["params"].items():
        torch.testing.assert_close(resumed["params"][k], v, rtol=1e-4, atol=1e-5)
    for a, b in zip(resumed["history"], got["history"]):
        assert a["train_elbo"] == pytest.approx(b["train_elbo"], abs=1e-3)  # partial-epoch sums kept once
        assert a["test_elbo"] == pytest.approx(b["test_elbo"], abs=1e-3)


@pytest.mark.parametrize("n", [15, 20])
def test_reconstructions_keep_each_original_above_its_reconstruction(tmp_path, n):
    # reconstructions.png: rows of 10 originals, each above the row of their reconstructions. With 11-19
    # images the last pair of rows is short; it is filled with white, where it once let images slide into
    # the next row (an original under another original's reconstruction).
    import numpy as np
    from PIL import Image

    from pyvae.plots import reconstructions

    torch.manual_seed(0)
    model = VAE(64, z_dim=2, hidden=8)
    x = torch.rand(n, 64)
    path = reconstructions(model, x, (8, 8), tmp_path / "r.png", n=n)
    grid = torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255.0)
    k = grid.shape[1] // (10 * 9 + 1)  # whole pixels per image pixel; 10 columns of 8 + 1 border
    assert grid.shape == (k * (4 * 9 + 1), k * (10 * 9 + 1))
    grid = grid[::k, ::k]

    def tile(r, c):
        return grid[1 + 9 * r:1 + 9 * r + 8, 1 + 9 * c:1 + 9 * c + 8].reshape(64)

    with torch.no_grad():
        rec = model.reconstruct(x)
    for i in range(20):
        r, c = divmod(i, 10)
        if i < n:
            torch.testing.assert_close(tile(2 * r, c), x[i], atol=0.5 / 255, rtol=0)
            torch.testing.assert_close(tile(2 * r + 1, c), rec[i], atol=0.5 / 255, rtol=0)
        else:
            assert bool((tile(2 * r, c) == 1).all() and (tile(2 * r + 1, c) == 1).all())

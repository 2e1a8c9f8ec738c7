"""``pyvae bench scaling``: the linear-scaling verdict on made-up series, the generalized step model, and a
smoke run of the command on tiny sizes (rows, table, verdicts, a skipped point, the plot)."""
import json
import os
import subprocess
import sys
import tempfile

import pytest

from pyvae.benchmarks import scaling as S
from pyvae.benchmarks import train as T

BATCH = [100, 256, 1024, 4096, 16384, 65536]


# ------------------------------------------------------------------------------------------ the verdict
def test_verdict_linear_series_is_flat():
    wobble = [1.00, 1.08, 0.97, 1.12, 1.02, 1.05]  # max / min = 1.155: inside 20%
    v = S.linearity_verdict(BATCH, [0.01 * b * w for b, w in zip(BATCH, wobble)], BATCH)
    assert v["flat"] is True and v["outside"] == [] and v["flat_range"] == (100, 65536)
    assert v["spread"] == pytest.approx(1.12 / 0.97)
    assert "is flat within 20% over B=100..65536" in v["sentence"]


def test_verdict_fails_on_fixed_per_step_cost():
    # 5 ms per step on top of 0.01 ms per sample: per-sample time falls from 0.06 to ~0.01 ms
    v = S.linearity_verdict(BATCH, [5.0 + 0.01 * b for b in BATCH], BATCH)
    assert v["flat"] is False and v["best"] == 65536
    assert [x for x, _ in v["outside"]] == [100, 256, 1024]
    assert v["flat_range"] == (4096, 65536)
    assert v["outside"][0][1] == pytest.approx((5.0 / 100 + 0.01) / (5.0 / 65536 + 0.01))
    assert "not flat" in v["sentence"] and "only over B=4096..65536" in v["sentence"]
    assert "B=100 at" in v["sentence"] and "B=16384 at" not in v["sentence"]


def test_verdict_fails_on_a_slowdown_at_the_large_end():
    # linear up to 16384, then 1.5x per sample (a cache or memory cliff): the verdict names the last point
    times = [0.01 * b for b in BATCH[:-1]] + [0.015 * BATCH[-1]]
    v = S.linearity_verdict(BATCH, times, BATCH)
    assert v["flat"] is False and v["flat_range"] == (100, 16384)
    assert v["outside"] == [(65536, pytest.approx(1.5))] and "B=65536 at 1.5x" in v["sentence"]


def test_verdict_tolerance_is_the_bound():
    xs = [1, 2]
    assert S.linearity_verdict(xs, [1.0, 2.0 * 1.2], xs, tol=0.2)["flat"] is True
    assert S.linearity_verdict(xs, [1.0, 2.0 * 1.21], xs, tol=0.2)["flat"] is False
    v = S.linearity_verdict(xs, [1.0, 2.0 * 1.21], xs, tol=0.2)
    assert v["flat_range"] is None and "no two neighbouring points" in v["sentence"]
    assert S.linearity_verdict(xs, [1.0, 2.0 * 1.21], xs, tol=0.25)["flat"] is True


def test_verdict_divides_by_the_work_and_skips_missing_points():
    # D sweep: time proportional to the GEMM FLOPs is linear although it is not proportional to D
    dims = [196, 784, 3072]
    flops = [T.gemm_flops(1024, T.layer_sizes(d, 500, 20)) for d in dims]
    v = S.linearity_verdict(dims, [3e-9 * f for f in flops], flops, name="D", unit="GEMM FLOP")
    assert v["flat"] is True and "time per GEMM FLOP is flat" in v["sentence"]
    assert S.linearity_verdict(dims, [1.0, 1.0, 1.0], dims, name="D")["flat"] is False
    v = S.linearity_verdict(dims, [None, 4.0, 0.0], dims)
    assert v["flat"] is None and "fewer than two points" in v["sentence"]


def test_verdicts_cover_every_sweep_and_series():
    def row(sweep, B, D, Z, ms):
        return {"sweep": sweep, "precision": "fp32", "B": B, "D": D, "H": 500, "Z": Z,
                "results": {"torch-eager": {"median_ms": ms}, "pyvae": {"median_ms": ms / 2}},
                "gemm_only_ms": ms / 4, "gemm_flops": T.gemm_flops(B, T.layer_sizes(D, 500, Z))}
    rows = [row("batch", b, 784, 20, 5.0 + 0.01 * b) for b in BATCH]
    rows += [row("D", 1024, d, 20, 1e-8 * T.gemm_flops(1024, T.layer_sizes(d, 500, 20))) for d in (196, 784, 3072)]
    vs = S.verdicts(rows)
    assert [(v["sweep"], v["series"]) for v in vs] == [(s, p) for s in ("batch", "D")
                                                       for p in ("torch-eager", "pyvae", "GEMM-only")]
    assert all(v["flat"] is False for v in vs if v["sweep"] == "batch")
    assert all(v["flat"] is True for v in vs if v["sweep"] == "D")
    # B=1024 D=784 Z=20 is in both sweeps: its two measurements are reported as the run's noise
    eager = sorted([5.0 + 0.01 * 1024, 1e-8 * T.gemm_flops(1024, T.layer_sizes())])
    (line,) = S.repeats(rows)
    assert line.startswith("fp32 B=1024 D=784 H=500 Z=20, measured in 2 sweeps: ")
    assert f"torch-eager {eager[0]:.3g}-{eager[1]:.3g} ms ({eager[1] / eager[0] - 1:.0%})" in line


# ------------------------------------------------------------------------------------------ the model
def test_default_step_is_the_paper_model():
    assert T.LAYERS == ((784, 500), (500, 40), (20, 500), (500, 784)) == T.layer_sizes()
    shapes = [tuple(p.shape) for p in T.plain_model().parameters()]
    assert shapes == [(500, 784), (500,), (40, 500), (40,), (500, 20), (500,), (784, 500), (784,)]
    assert [tuple(p.shape) for p in T.plain_model(12, 7, 3).parameters()] == [
        (7, 12), (7,), (6, 7), (6,), (7, 3), (7,), (12, 7), (12,)]


def test_generalized_steps_run_at_other_sizes():
    import argparse

    import torch

    steps = T.build_steps(5, "fp32", ["torch-eager", "pyvae"], D=12, H=7, Z=3)
    losses = {p: fn().item() for p, fn in steps.items()}
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    # same weights and batch, different eps: the two negative ELBOs agree roughly, not bit for bit
    assert losses["pyvae"] == pytest.approx(losses["torch-eager"], rel=0.2)
    args = argparse.Namespace(providers=["torch-eager"], reps=2, target_s=0.01, no_memory=True, retries=0)
    pt = T.measure_point(4, "fp32", args, D=6, H=5, Z=2)
    assert pt["gemm_flops"] == T.gemm_flops(4, T.layer_sizes(6, 5, 2))
    assert pt["gemm_only_ms"] > 0 and pt["results"]["torch-eager"]["median_ms"] > 0


def test_every_point_compiles_its_torch_compile_step():
    # dynamo keeps a bounded number of graphs per code object and then runs it eagerly, silently; with the
    # bound at 1 the second point would time eager under the name torch-compile. (config.patch, not
    # monkeypatch: cache_size_limit is an alias of recompile_limit, and undoing both by setattr broke later
    # tests' dynamo config.)
    import torch
    from torch._dynamo.utils import counters

    limit = torch._dynamo.config.recompile_limit
    with torch._dynamo.config.patch(recompile_limit=1):
        for _ in range(2):
            step = T.build_steps(4, "fp32", ["torch-compile"], D=12, H=7, Z=3)["torch-compile"]
            ok = counters["frames"]["ok"]
            step()
            assert counters["frames"]["ok"] > ok, "the step ran without compiling"
    assert torch._dynamo.config.recompile_limit == limit


def test_fwd_bwd_step_leaves_the_weights_and_full_step_updates_them():
    import torch

    # The same seed before each call gives the same draws, so two calls' losses differ only if the
    # weights moved in between: never with --step fwd-bwd, always with the default full step.
    for step, moves in (("fwd-bwd", False), ("full", True)):
        steps = T.build_steps(6, "fp32", ["torch-eager", "pyvae"], D=12, H=7, Z=3, step=step)
        for p, fn in steps.items():
            losses = []
            for _ in range(2):
                torch.manual_seed(3)
                losses.append(fn().item())
            assert (losses[0] != losses[1]) == moves, (step, p, losses)
    with pytest.raises(ValueError, match="step must be one of"):
        T.build_steps(6, "fp32", ["torch-eager"], D=12, H=7, Z=3, step="forward")


def test_train_rows_and_table_name_their_step():
    import argparse

    args = argparse.Namespace(providers=["torch-eager"], reps=2, target_s=0.01, no_memory=True, retries=0)
    pt = T.measure_point(4, "fp32", args, D=6, H=5, Z=2, step="fwd-bwd")
    assert pt["step"] == "fwd-bwd"
    table = T.markdown([pt])
    assert table.splitlines()[0].startswith("| step |") and "| fwd-bwd | fp32 | 4 | torch-eager |" in table
    assert "| peak MB |" in table.splitlines()[0]
    pt["results"]["torch-eager"]["peak_mem_bytes"] = 12_345_678  # shown in MB; "-" where not measured
    assert f"{pt['samples_per_s']['torch-eager']:,.0f} | 12.3 |" in T.markdown([pt])
    pt["results"]["torch-eager"]["peak_mem_bytes"] = None
    assert f"{pt['samples_per_s']['torch-eager']:,.0f} | - |" in T.markdown([pt])
    assert "| faults / step |" in table.splitlines()[0] and pt["results"]["torch-eager"]["faults_per_step"] >= 0
    pt["results"]["torch-eager"]["faults_per_step"] = 16_907
    assert f"{pt['samples_per_s']['torch-eager']:,.0f} | - | 16,907 |" in T.markdown([pt])


def test_faults_per_step_counts_the_pages_a_step_faults_in():
    import mmap

    pages = 64

    def fresh_pages():  # an anonymous mapping, written page by page: one minor fault per page
        m = mmap.mmap(-1, pages * mmap.PAGESIZE)
        for i in range(pages):
            m[i * mmap.PAGESIZE] = 1
        m.close()

    def nothing():
        pass

    counts = T.faults_per_step({"fresh": fresh_pages, "nothing": nothing})
    assert counts["fresh"] >= pages and counts["nothing"] < pages / 8


def test_gemm_only_winners_compute_their_own_products():
    # Each winner keeps its own layer's operands (a closure over the loop's variables would run every
    # product on the last layer's tensors).
    layers = ((6, 5), (5, 4), (2, 5), (5, 6))
    winners = {}
    T.gemm_only(3, "fp32", 2, 0.01, layers, retries=0, winners=winners)
    expect = {}
    for i, (fin, fout) in enumerate(layers):
        expect[f"gemm {i} forward"] = (3, fout)
        expect[f"gemm {i} grad_weight"] = (fout, fin)
        if i > 0:
            expect[f"gemm {i} grad_input"] = (3, fin)
    assert {k: tuple(st.fwd().shape) for k, st in winners.items()} == expect


def _tensors_of(fn, seen):
    """Every tensor a winner's callable holds (its defaults, and the callable a one-thread wrapper closes over)."""
    import torch

    for v in list(fn.__defaults__ or ()) + [c.cell_contents for c in (fn.__closure__ or ())]:
        if isinstance(v, torch.Tensor):
            seen[id(v)] = v
        elif callable(v):
            _tensors_of(v, seen)
    return seen


def test_memory_estimate_covers_the_gemm_operands_live_beside_the_steps():
    D, H, Z = 12, 7, 3
    layers = T.layer_sizes(D, H, Z)
    held = {}
    for B in (4, 8):
        winners = {}
        T.gemm_only(B, "fp32", 2, 0.01, layers, retries=0, winners=winners)
        seen = {}
        for st in winners.values():
            _tensors_of(st.fwd, seen)
        held[B] = sum(t.numel() * t.element_size() for t in seen.values())
    per_sample = (held[8] - held[4]) / 4
    # at most x, g and g.T of every layer (a winner holds only the operands its candidate reads)
    assert 0 < per_sample <= 4 * (3 * D + 6 * H + 5 * Z)
    eager_peak = 4 * (3 * D + 2 * H + 5 * Z)  # per sample, NOTE: [Memory estimate]
    slope = (S.estimated_bytes(1024, D, H, Z) - S.estimated_bytes(0, D, H, Z)) / 1024
    assert slope >= 2 * eager_peak + 4 * 3 * D + per_sample


def test_measure_point_times_the_gemm_winners_beside_the_steps():
    import argparse

    args = argparse.Namespace(providers=["torch-eager"], reps=2, target_s=0.01, no_memory=True, retries=0)
    pt = T.measure_point(4, "fp32", args, D=6, H=5, Z=2)
    assert list(pt["results"]) == ["torch-eager"]  # the products are not providers
    assert len(pt["gemm_products_ms"]) == 11
    assert pt["gemm_only_ms"] == pytest.approx(sum(pt["gemm_products_ms"].values()))
    assert pt["gemm_only_select_ms"] > 0


def _train_row(step, precision, B, ms, gemm, floor):
    return {"step": step, "precision": precision, "B": B, "gemm_only_ms": gemm, "memory_floor_ms": floor,
            "results": {p: {"median_ms": v} for p, v in ms.items()}}


def test_train_plot_panels_hold_each_step_precision_and_limit(tmp_path):
    rows = [_train_row("fwd-bwd", "fp32", 1024, {"torch-eager": 30.0, "pyvae": 26.0}, 24.0, 1.0),
            _train_row("fwd-bwd", "fp32", 100, {"torch-eager": 4.0, "pyvae": 4.5}, 2.0, 0.1),
            _train_row("full", "bf16", 100, {"torch-eager": 3.0}, 1.2, 0.1),
            _train_row("fwd-bwd", "fp32", 100, {"torch-eager": 4.2, "pyvae": 4.4}, 2.1, 0.1)]  # replaces row 2
    grid = T.panels(rows)
    assert [[p["title"] for p in r] for r in grid] == [
        ["bf16: forward + backward + fused Adam"], ["fp32: forward + backward"]]  # full first, as STEPS
    p = grid[1][0]
    assert p["x"] == [100, 1024]
    assert p["series"] == {"torch-eager": [4.2, 30.0], "pyvae": [4.4, 26.0]}
    assert p["limits"] == {"GEMM-only": [2.1, 24.0], "GEMM-only + memory floor": [2.2, 25.0]}
    out = T.plot(rows, tmp_path / "train.png", "title")
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"


def test_memory_estimate_is_linear_in_batch_and_twice_the_measured_peak():
    params = S.estimated_bytes(0, 784, 500, 20)
    assert S.estimated_bytes(2048, 784, 500, 20) - params == 2 * (S.estimated_bytes(1024, 784, 500, 20) - params)
    # floats per sample at the measured peak of an eager step (NOTE: [Memory estimate] in scaling.py)
    for (D, H, Z), peak in {(784, 500, 20): 3452, (3072, 500, 20): 10316, (784, 500, 200): 4352,
                            (196, 500, 20): 1974}.items():
        per_sample = (S.estimated_bytes(1024, D, H, Z) - S.estimated_bytes(0, D, H, Z)) / (4 * 1024)
        assert per_sample >= 2 * peak, (D, H, Z)


# ------------------------------------------------------------------------------------------ end to end
def test_bench_scaling_smoke(tmp_path):
    out = tmp_path / "scaling.jsonl"
    huge = 10 ** 12  # estimated at petabytes: must be skipped, never run
    cmd = [sys.executable, "-m", "pyvae", "bench", "scaling", "--quick", "--batch", "8", "16", str(huge),
           "--dims", "8", "--latents", "3", "--reps", "2", "--quiet-wait", "0", "--no-memory", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tempfile.gettempdir(),
                       env=dict(os.environ, PYTHONWARNINGS="ignore"), check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(x["sweep"], x["B"], x["D"], x["H"], x["Z"]) for x in rows] == [
        ("batch", 8, 16, 8, 2), ("batch", 16, 16, 8, 2), ("D", 8, 8, 8, 2), ("Z", 8, 16, 8, 3)]
    for x in rows:
        assert x["bench"] == "scaling" and x["precision"] == "fp32"
        assert set(x["results"]) == {"torch-eager", "pyvae"}
        for p, res in x["results"].items():
            assert res["median_ms"] > 0 and res["reps"] == 2
            assert x["samples_per_s"][p] == pytest.approx(x["B"] / res["median_ms"] * 1e3)
            assert x["ms_per_sample"][p] == pytest.approx(res["median_ms"] / x["B"])
            assert x["gemm_efficiency"][p] == pytest.approx(x["gemm_only_ms"] / res["median_ms"])
        assert x["gemm_only_ms"] > 0 and x["gemm_flops"] == T.gemm_flops(x["B"], T.layer_sizes(x["D"], 8, x["Z"]))
        assert x["machine"]["threads"] >= 1
    assert "| fp32 | batch | 16 | 16 | 8 | 2 | pyvae |" in r.stdout
    assert "- batch sweep, fp32, pyvae: time per sample is" in r.stdout
    assert "- D sweep, fp32, GEMM-only: time per GEMM FLOP: fewer than two points" in r.stdout
    assert f"B={huge} D=16 H=8 Z=2: skipped, estimated" in r.stdout
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"


def test_the_no_gemm_step_replays_every_product_and_computes_none(monkeypatch):
    # NOTE: [The step without its GEMMs]: after the first (recording) step, a pyvae-no-gemm step gets each of
    # pyvae._gemm's products back from the first step without computing it; pyvae-fused computes them all.
    import pyvae._gemm as G

    calls = []
    for name in T.GemmReplay.FUNCS:
        fn = getattr(G, name)
        monkeypatch.setattr(G, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
    steps = T.build_steps(6, "fp32", ["pyvae-fused", "pyvae-no-gemm"], D=12, H=7, Z=3, step="full")
    steps["pyvae-fused"]()
    per_step = len(calls)
    assert per_step >= 11 and set(calls) >= {"grad_input", "grad_weight"}  # every layer on pyvae's node
    steps["pyvae-no-gemm"]()  # records
    assert len(calls) == 2 * per_step
    for _ in range(2):
        steps["pyvae-no-gemm"]()  # replays: no product reaches pyvae._gemm's functions
    assert len(calls) == 2 * per_step
    steps["pyvae-fused"]()
    assert len(calls) == 3 * per_step
    assert all(getattr(G, n).__name__ == "<lambda>" for n in T.GemmReplay.FUNCS)  # restored after each step


def test_gemm_replay_refuses_a_step_of_other_products():
    import torch

    import pyvae._gemm as G

    replay = T.GemmReplay()
    a, w = torch.randn(4, 3), torch.randn(5, 3)
    with replay:
        kept = G.linear(a, w)
    with replay:
        again = G.linear(a, w)  # the recorded result's storage, not a new product
        assert again is not kept and again.data_ptr() == kept.data_ptr() and again.shape == kept.shape
    with pytest.raises(RuntimeError, match=r"product 0 of this step is .*\(4, 6\).*the recorded step had"):
        with replay:
            G.linear(torch.randn(4, 6), torch.randn(5, 6))
    with pytest.raises(RuntimeError, match="made 0 of the recorded step's 1 products"):
        with replay:
            pass
    assert G.linear.__module__ == "pyvae._gemm"  # restored after a failed step too


def test_train_rows_split_pyvae_into_gemms_and_the_rest():
    import argparse

    args = argparse.Namespace(providers=["pyvae", "pyvae-fused", "pyvae-no-gemm"], reps=2, target_s=0.01,
                              no_memory=True, retries=0)
    pt = T.measure_point(4, "fp32", args, D=6, H=5, Z=2, step="fwd-bwd")
    q = pt["parts"]
    assert q["no_gemm_ms"] == pt["results"]["pyvae-no-gemm"]["median_ms"]
    assert q["fused_ms"] == pt["results"]["pyvae-fused"]["median_ms"]
    assert q["parts_ms"] == pytest.approx(pt["gemm_only_ms"] + q["no_gemm_ms"])
    assert q["excess_ms"] == pytest.approx(q["fused_ms"] - q["parts_ms"])
    table = T.markdown([pt])
    assert "| step | precision | B | GEMM-only ms | no-GEMM ms | parts ms |" in table
    assert f"| fwd-bwd | fp32 | 4 | {pt['gemm_only_ms']:.3g} | {q['no_gemm_ms']:.3g} |" in table
    args.providers = ["pyvae", "pyvae-fused"]  # the split needs both
    pt = T.measure_point(4, "fp32", args, D=6, H=5, Z=2)
    assert "parts" not in pt and "parts ms" not in T.markdown([pt])

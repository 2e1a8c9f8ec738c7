"""``pyvae bench routes``'s reading of its own noise (NOTE: [Route noise] in pyvae/benchmarks/routes.py):
bootstrap intervals over interleaved rounds, the A/A control and the verdicts."""
import random

from pyvae.benchmarks import routes


def _rounds(true_ms, n, rng, noise=0.05):
    return {r: [t * (1 + rng.expovariate(1 / noise)) for _ in range(n)] for r, t in true_ms.items()}


def test_a_clear_winner_is_resolved_and_a_slower_choice_is_a_miss():
    rng = random.Random(0)
    t = _rounds({"torch": 1.2, "pyvae": 1.0, "pyvae-mm": 1.1, routes.AA: 1.2}, 100, rng)
    b = routes.bootstrap(t, "pyvae-mm", ["torch", "pyvae", "pyvae-mm"])
    assert b["best"] == "pyvae" and b["resolved"] and b["best_share"]["pyvae"] > 0.99
    point, lo, hi = b["chosen"]
    assert lo <= point <= hi and lo > 1.05 and routes.verdict(b["chosen"]) == "miss"
    assert routes.verdict(b["ratio"]["pyvae"]) == "met"
    aa_point, aa_lo, aa_hi = b["aa"]  # torch against itself: an interval around 1
    assert aa_lo < 1.0 < aa_hi and abs(aa_point - 1) < 0.03


def test_routes_within_noise_are_not_resolved_nor_a_miss():
    rng = random.Random(1)
    # 4% apart under heavy noise with 15 rounds: the point may be over 1.03, the interval reaches under it
    t = _rounds({"torch": 1.04, "pyvae": 1.0, routes.AA: 1.04}, 15, rng, noise=0.3)
    b = routes.bootstrap(t, "torch", ["torch", "pyvae"])
    assert not b["resolved"] and b["chosen"][1] <= routes.TARGET
    assert routes.verdict(b["chosen"]) in ("met", "noise")
    assert routes.verdict([1.05, 1.02, 1.08]) == "noise" and routes.verdict([1.05, 1.04, 1.08]) == "miss"

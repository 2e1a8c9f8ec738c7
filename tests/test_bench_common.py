"""The benchmarks' timer (pyvae/benchmarks/common.py): blocks of calls per provider (NOTE: [Blocks of calls])."""
import pytest

from pyvae.benchmarks import common as C

NAMES = ("a", "b", "c")
WARM = 50  # warm-up calls per provider when calls take no time (>= 3, until 100 ms or 50 calls)


def _recording():
    log = []
    return {n: C.Step(lambda n=n: log.append(n), [], None, "forward") for n in NAMES}, log


@pytest.mark.parametrize("block, reps", [(1, 5), (4, 7), (4, 3), (2, 4)])
def test_each_round_runs_every_provider_for_a_block_whose_first_call_is_untimed(block, reps):
    steps, log = _recording()
    times, _ = C._timed_rounds(steps, "cpu", reps, target_s=0.0, min_reps=1, max_reps=10, block=block)
    assert {n: len(t) for n, t in times.items()} == {n: reps for n in NAMES}
    assert log[:WARM * len(NAMES)] == [n for n in NAMES for _ in range(WARM)]
    rest = log[WARM * len(NAMES):]
    timed = block - 1 if block > 1 else 1
    lengths = [min(timed, reps - done) + (block > 1) for done in range(0, reps, timed)]
    pos = 0
    for length in lengths:  # a round: every provider once, each for `length` calls in a row
        chunks = [rest[pos + i * length: pos + (i + 1) * length] for i in range(len(NAMES))]
        assert all(len(set(c)) == 1 and len(c) == length for c in chunks), (chunks, length)
        assert sorted(c[0] for c in chunks) == sorted(NAMES)
        pos += len(NAMES) * length
    assert pos == len(rest)


def test_measure_case_takes_the_block_and_reports_reps():
    steps, log = _recording()
    # retries=0: on a loaded machine measure_case times a disturbed case again, and the count below doubled (CI
    # run beside another test run: 354 calls)
    res = C.measure_case(steps, device="cpu", reps=6, target_s=0.0, memory=False, quiet_wait_s=0, block=3,
                         retries=0)
    assert {n: r["reps"] for n, r in res.items()} == {n: 6 for n in NAMES}
    assert len(log) == len(NAMES) * (WARM + 6 + 3)  # warm-up, 6 timed, one untimed call in each of 3 rounds

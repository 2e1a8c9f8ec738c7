"""Philox4x32-10 against Random123's known answers, and the Box-Muller normals built on it."""
import math
from pathlib import Path

import pytest
import torch

import pyvae
from conftest import ARCHS, cpu_arch

KAT = Path(__file__).with_name("kat_vectors")


def _kat_vectors():
    rows = []
    for line in KAT.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        lhs, rhs = line.split("->")
        words = [int(w, 16) for w in lhs.split()]
        rows.append((words[:4], words[4:], [int(w, 16) for w in rhs.split()]))
    return rows


def test_kat_file_has_the_three_published_vectors():
    assert len(_kat_vectors()) == 3


@pytest.mark.parametrize("counter,key,expected", _kat_vectors())
def test_philox_known_answers(counter, key, expected):
    assert list(pyvae._C.philox4x32_10(counter, key)) == expected


def _normals(seed, n_counters, first=0):
    return torch.tensor([v for c in range(first, first + n_counters) for v in pyvae._C.normal4(seed, c)],
                        dtype=torch.float64)


def _ks_statistic(values):
    """Kolmogorov-Smirnov distance between the sample and N(0, 1) (CDF via math.erf)."""
    xs = sorted(values.tolist())
    n = len(xs)
    cdf = [0.5 * (1.0 + math.erf(x / math.sqrt(2.0))) for x in xs]
    return max(max(c - i / n, (i + 1) / n - c) for i, c in enumerate(cdf))


# sqrt(n) * D exceeds 2.5 with probability 1.5e-5 for a correct sampler (Kolmogorov distribution).
KS_LIMIT = 2.5

N_COUNTERS = 50_000  # 200k normals


@pytest.fixture(scope="module")
def draws():
    return _normals(seed=0x5EED_1234_ABCD, n_counters=N_COUNTERS).view(-1, 4)


def test_normal4_moments(draws):
    z = draws.flatten()
    n = z.numel()
    assert abs(z.mean()) < 6 / math.sqrt(n)
    assert abs(z.var() - 1) < 6 * math.sqrt(2 / n)
    assert abs((z**3).mean()) < 6 * math.sqrt(15 / n)  # skewness
    assert abs((z**4).mean() - 3) < 6 * math.sqrt(96 / n)  # kurtosis: Var(z^4) = 105 - 9
    assert z.abs().max() < 6.0  # 24-bit uniforms: |z| <= sqrt(2 * 24 ln 2) = 5.77


def test_normal4_ks_all_and_per_lane(draws):
    z = draws.flatten()
    d = _ks_statistic(z)
    assert math.sqrt(z.numel()) * d < KS_LIMIT, d
    for lane in range(4):  # cos and sin lanes of both Box-Muller pairs
        col = draws[:, lane]
        assert math.sqrt(col.numel()) * _ks_statistic(col) < KS_LIMIT, lane
    # the test has power: a slightly wrong sampler (sd 1.03, or mean 0.015) fails it
    assert math.sqrt(z.numel()) * _ks_statistic(1.03 * z) > KS_LIMIT
    assert math.sqrt(z.numel()) * _ks_statistic(z + 0.015) > KS_LIMIT


def test_normal4_lanes_and_counters_uncorrelated(draws):
    n = draws.shape[0]
    c = torch.corrcoef(draws.T)
    off_diag = c - torch.eye(4, dtype=c.dtype)
    assert off_diag.abs().max() < 6 / math.sqrt(n)
    # consecutive counters, and the squares of a Box-Muller pair (dependent if the pair were reused)
    assert abs(torch.corrcoef(torch.stack([draws[1:, 0], draws[:-1, 0]]))[0, 1]) < 6 / math.sqrt(n)
    assert abs(torch.corrcoef(torch.stack([draws[:, 0] ** 2, draws[:, 1] ** 2]))[0, 1]) < 6 / math.sqrt(n / 2)


def test_normal4_depends_on_seed_and_counter():
    a = pyvae._C.normal4(1, 0)
    assert pyvae._C.normal4(1, 0) == a  # deterministic
    assert pyvae._C.normal4(2, 0) != a
    assert pyvae._C.normal4(1, 1) != a
    assert pyvae._C.normal4(1 << 32, 0) != a  # both key words are used
    assert pyvae._C.normal4(1, 1 << 32) != a  # both counter words are used


@pytest.mark.parametrize("arch", ARCHS)
def test_eps_where_the_counter_carries_into_its_high_word(arch):
    """Counters 2^32 - 40 .. 2^32 + 60 of a draw, on every CPU build: the AVX-512 build computes 32 counters
    in 32-bit lanes (NOTE: [Philox in vector lanes] in csrc/cpu/reparameterize.cpp), where a lane's low word
    wraps and carries one into its high word; bit for bit the block function's normals there."""
    seed, offset, m = 0x1234_5678_9ABC, (1 << 32) - 40, 401
    expected = _normals(seed, (m + 3) // 4, first=offset)[:m].float()
    with cpu_arch(arch):
        z = torch.ops.pyvae.reparameterize(torch.zeros(m), torch.zeros(m), 1, torch.tensor([seed, offset]))
    assert torch.equal(z.view(-1), expected)


def test_reparameterize_eps_is_normal4_at_offset_plus_i_over_4():
    """NOTE: [Counter-based eps]: element i of draw (seed, offset) is lane i % 4 of counter offset + i / 4."""
    seed, offset, m, samples = 0x1234_5678_9ABC, 5, 3001, 2  # m: odd, more than one CPU chunk (2048)
    expected = _normals(seed, (samples * m + 3) // 4, first=offset)[: samples * m].view(samples, m).float()
    # the baseline build is the one compiled like the binding's normal4 (no FMA contraction)
    with cpu_arch(ARCHS[-1]):
        z = torch.ops.pyvae.reparameterize(torch.zeros(m), torch.zeros(m), samples, torch.tensor([seed, offset]))
    assert torch.equal(z, expected)
    for name in ARCHS:
        with cpu_arch(name):
            z = torch.ops.pyvae.reparameterize(torch.zeros(m), torch.zeros(m), samples, torch.tensor([seed, offset]))
        torch.testing.assert_close(z, expected, rtol=4e-7, atol=1e-7)

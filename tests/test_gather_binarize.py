"""pyvae.ops.gather_binarize: one Bernoulli draw per pixel of a gathered batch, from counter-based uniforms
(NOTE: [Counter-based binarization] in csrc/ops/philox.h)."""
import numpy as np
import pytest
import torch

import pyvae
from pyvae import _gate
from pyvae.data import ShardedBatches
from pyvae.ops import gather_binarize

from conftest import ARCHS, DEVICES


def _uniform(seed, i):
    """Element i of the draw, from the Philox block function (Random123-validated, tests/test_philox.py)."""
    w = _gate.philox4x32_10([(i // 4) & 0xFFFFFFFF, (i // 4) >> 32, 0, 0], [seed & 0xFFFFFFFF, seed >> 32])
    return np.float32((w[i % 4] >> 8) * 2.0 ** -24)


@pytest.mark.parametrize("device", DEVICES)
def test_each_pixel_is_its_uniform_against_its_grey_level(device):
    g = torch.Generator().manual_seed(0)
    src = torch.rand(9, 7, generator=g).to(device)
    idx = torch.tensor([4, 0, 8, 4, 2], device=device)
    seed, first = 0x1234_5678_9ABC, 3
    out = gather_binarize(src, idx, seed=seed, first_row=first).cpu()
    want = torch.tensor([[1.0 if _uniform(seed, (first + r) * 7 + c) < float(src[idx[r], c]) else 0.0
                          for c in range(7)] for r in range(5)])
    assert torch.equal(out, want)


@pytest.mark.parametrize("arch", ARCHS)
def test_uniforms_where_the_counter_carries_into_its_high_word(arch):
    """Rows whose uniforms come from counters on both sides of 2^32 (the AVX-512 build's 32-bit lanes carry
    into the high word there: NOTE: [Philox in vector lanes] in csrc/cpu/reparameterize.cpp), every element
    against its uniform, on every CPU build."""
    from conftest import cpu_arch

    src = torch.rand(40, 7, generator=torch.Generator().manual_seed(4))
    first, seed = (4 * 2 ** 32 - 90) // 7, 0xABCD_EF01_2345  # elements first * 7 .. : counters 2^32 - 23 ..
    with cpu_arch(arch):
        out = gather_binarize(src, seed=seed, first_row=first)
    want = torch.tensor([[1.0 if _uniform(seed, (first + r) * 7 + c) < float(src[r, c]) else 0.0
                          for c in range(7)] for r in range(40)])
    assert (first * 7) // 4 < 2 ** 32 < ((first + 40) * 7) // 4
    assert torch.equal(out, want)


def test_frequencies_follow_the_grey_levels():
    p = torch.linspace(0, 1, 11).repeat(4000, 1)  # 11 grey levels, 4000 rows each
    out = gather_binarize(p, seed=7)
    freq = out.mean(0)
    assert freq[0] == 0 and freq[-1] == 1  # p = 0 never, p = 1 always
    assert torch.allclose(freq, p[0], atol=4 * (0.25 / 4000) ** 0.5)


@pytest.mark.parametrize("arch", ARCHS)
def test_same_draw_on_every_build_thread_count_and_shard(arch):
    from conftest import cpu_arch

    src = torch.rand(300, 33, generator=torch.Generator().manual_seed(1))
    idx = torch.randperm(300, generator=torch.Generator().manual_seed(2))[:200]
    whole = gather_binarize(src, idx, seed=99)
    threads = torch.get_num_threads()
    with cpu_arch(arch):
        try:
            torch.set_num_threads(1)
            one = gather_binarize(src, idx, seed=99)
        finally:
            torch.set_num_threads(threads)
        halves = torch.cat([gather_binarize(src, idx[:77], seed=99),
                            gather_binarize(src, idx[77:], seed=99, first_row=77)])
    assert torch.equal(whole, one) and torch.equal(whole, halves)
    assert not torch.equal(whole, gather_binarize(src, idx, seed=100))


def test_sharded_batches_see_the_single_process_data():
    data = torch.rand(103, 20, generator=torch.Generator().manual_seed(3))
    one = list(ShardedBatches(data, 40, seed=5, epoch=2, binarize=True))
    shards = [list(ShardedBatches(data, 40, seed=5, epoch=2, binarize=True, rank=r, world=2)) for r in range(2)]
    for s, x in one:
        assert torch.equal(x, torch.cat([dict(shards[0])[s], dict(shards[1])[s]]))
        assert set(x.unique().tolist()) <= {0.0, 1.0}


def test_bad_input_is_named():
    src = torch.rand(5, 3)
    with pytest.raises(ValueError, match="index must hold rows"):
        gather_binarize(src, torch.tensor([0, 5]), seed=1)
    with pytest.raises(ValueError, match="index must hold rows"):
        gather_binarize(src, torch.tensor([-1]), seed=1)
    with pytest.raises(TypeError, match="src must be a 2-D float32"):
        gather_binarize(src.double(), seed=1)
    with pytest.raises(TypeError, match="index must be a 1-D int64"):
        gather_binarize(src, torch.tensor([0.0]), seed=1)
    with pytest.raises(TypeError, match="integers"):
        gather_binarize(src, seed=1.5)
    with pytest.raises(ValueError, match="first_row"):
        gather_binarize(src, seed=1, first_row=-1)
    for huge in (2 ** 63, 2 ** 63 // src.shape[1]):  # past the kernel's 64-bit element index: not a pybind error
        with pytest.raises(ValueError, match=r"first_row must be >= 0 with \(first_row \+ rows\) \* columns < 2\*\*63"):
            gather_binarize(src, seed=1, first_row=huge)
    assert gather_binarize(src, torch.zeros(0, dtype=torch.int64), seed=1).shape == (0, 3)
    assert pyvae.ops.gather_binarize is gather_binarize

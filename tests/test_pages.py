"""Large fresh outputs of the CPU kernels are advised onto transparent huge pages (NOTE: [Huge pages for fresh
outputs] in csrc/cpu/pages.h).

The check reads the kernel's own accounting (/proc/self/smaps: AnonHugePages of the mapping that holds the
output). It runs only where the system's THP mode is "madvise": with "always" every large mapping gets huge
pages whether pyvae asks or not (the test could not fail), with "never" none do.
"""
from __future__ import annotations

import pytest
import torch

import pyvae
from pyvae.benchmarks.common import thp_mode
from pyvae.ops import gather_binarize


pytestmark = pytest.mark.skipif(thp_mode() != "madvise", reason="THP mode is not 'madvise' here")


def _huge_kb(t: torch.Tensor) -> int:
    """AnonHugePages (kB) of the mappings overlapping ``t``'s bytes (advice splits a mapping at the 2 MiB
    boundaries inside the tensor, so its first bytes lie in a mapping of their own)."""
    lo_t = t.data_ptr()
    hi_t = lo_t + t.numel() * t.element_size()
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo < hi_t and lo_t < hi
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1])
    return total


B, D, Z = 16384, 784, 20  # 51 MB float32 outputs: always a fresh mapping of glibc's


def test_bernoulli_log_prob_grad_on_huge_pages():
    logits = torch.randn(B, D, requires_grad=True)
    x = (torch.rand(B, D) < 0.5).float()
    pyvae.bernoulli_log_prob(logits, x).sum().backward()
    assert _huge_kb(logits.grad) >= 2048


def test_elbo_fresh_grad_on_huge_pages():
    logits = torch.randn(B, D, requires_grad=True)  # a leaf: the gradient is a fresh tensor
    x = (torch.rand(B, D) < 0.5).float()
    mu = torch.randn(B, Z, requires_grad=True)
    logvar = torch.randn(B, Z, requires_grad=True)
    pyvae.bernoulli_elbo(logits, x, mu, logvar).sum().backward()
    assert _huge_kb(logits.grad) >= 2048


def test_gather_binarize_output_on_huge_pages():
    src = torch.rand(B, D)
    out = gather_binarize(src, torch.arange(B), seed=3)
    assert _huge_kb(out) >= 2048


def test_benchmark_floor_buffer_on_huge_pages():
    # `pyvae bench elbo`'s second memory floor writes into this buffer: it must get the advice pyvae's kernels give.
    from pyvae.benchmarks import common as C

    t = C.empty_on_huge_pages((B, D), torch.float32)
    assert t.shape == (B, D) and t.dtype == torch.float32
    t.fill_(1.0)
    assert _huge_kb(t) >= 2048


def test_advice_can_be_turned_off(tmp_path):
    # PYVAE_HUGE_PAGES=off (NOTE: [Huge pages for fresh outputs]): the same output stays on 4 KiB pages; with the
    # variable unset, the same child process puts it on huge pages (so the check can tell the two apart).
    import os
    import subprocess
    import sys

    code = ("import torch, pyvae, test_pages as T\n"
            "logits = torch.randn(T.B, T.D, requires_grad=True)\n"
            "pyvae.bernoulli_log_prob(logits, (torch.rand(T.B, T.D) < 0.5).float()).sum().backward()\n"
            "import pyvae.benchmarks.common as C\n"
            "f = C.empty_on_huge_pages((T.B, T.D), torch.float32); f.fill_(1.0)\n"
            "print(T._huge_kb(logits.grad), T._huge_kb(f))\n")
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "PYVAE_HUGE_PAGES"}
    env["PYTHONPATH"] = here + os.pathsep + env.get("PYTHONPATH", "")  # (pyvae itself: the installed one)

    def huge_kb(**extra):
        out = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                             timeout=300, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        return [int(v) for v in out.stdout.split()[-2:]]

    # the kernel's output and the benchmarks' floor buffer alike
    assert huge_kb(PYVAE_HUGE_PAGES="off") == [0, 0]
    assert min(huge_kb()) >= 2048

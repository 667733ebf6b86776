"""ΔW = tuned − base and its squared norms in one chunked pass (core.decompositions.difference_sum_squares)."""

import math

import pytest
import torch

from rankwise.core import memory
from rankwise.core.decompositions import _FRO_CHUNK, difference_sum_squares, sum_squares

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SHAPES = [(3, 5), (640, 320), (320, 4, 3, 3), (_FRO_CHUNK + 7,), (0, 4)]


def _pair(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    tuned = (base.double() + torch.randn(shape, generator=g) * 1e-3).to(dtype)
    return base, tuned


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_same_bits_as_the_plain_computation(shape, dtype):
    base, tuned = _pair(shape, dtype)
    d, fro2, base_fro2 = difference_sum_squares(base, tuned)
    want = (tuned.double() - base.double()).float()  # exact for fp16/bf16/fp32 inputs, then one rounding
    assert d.dtype == torch.float32 and tuple(d.shape) == tuple(shape)
    assert torch.equal(d, want)
    assert fro2 == sum_squares(want)
    assert base_fro2 == sum_squares(base)


def test_mixed_dtypes_and_views():
    base, tuned = _pair((256, 96), torch.float16)
    tuned = tuned.to(torch.bfloat16)
    rows_b, rows_t = base[64:192], tuned[64:192]  # a fused q/k/v slice: a contiguous row view
    d, fro2, _ = difference_sum_squares(rows_b, rows_t)
    assert torch.equal(d, (rows_t.double() - rows_b.double()).float())
    assert fro2 == sum_squares(d)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_gives_a_non_finite_sum(bad):
    base, tuned = _pair((300, 300), torch.float16)
    tuned[123, 45] = bad
    _, fro2, _ = difference_sum_squares(base, tuned)
    assert not math.isfinite(fro2)


def test_fp16_overflow_of_the_difference_is_not_hidden():
    base = torch.full((4, 4), -60000.0, dtype=torch.float16)
    tuned = torch.full((4, 4), 60000.0, dtype=torch.float16)
    d, fro2, _ = difference_sum_squares(base, tuned)
    assert float(d[0, 0]) == 120000.0  # fp32 holds what fp16 could not
    assert math.isfinite(fro2)


def test_empty_cpu_big_buffers_are_ordinary_tensors():
    n = memory.HUGE_PAGE_MIN_BYTES // 4 + 123
    t = memory.empty_cpu((n,))
    assert t.dtype == torch.float32 and t.numel() == n and t.is_contiguous()
    t.fill_(1.5)
    assert bool((t == 1.5).all())
    small = memory.empty_cpu((7, 3), torch.uint8)
    assert small.shape == (7, 3) and small.dtype == torch.uint8

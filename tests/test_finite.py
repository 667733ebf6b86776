"""core.finite.is_finite: the sum-based check decides exactly like isfinite().all()."""

import math

import pytest
import torch

from rankwise.core.finite import is_finite, overflows

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
def test_largest_finite_values_do_not_overflow_the_check(dtype):
    big = torch.full((100_000,), torch.finfo(dtype).max, dtype=dtype)
    big[::2] = torch.finfo(dtype).max  # all the same sign: the worst case for an accumulator
    assert is_finite(big)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_one_bad_entry_is_found(dtype, bad):
    t = torch.randn(5000).to(dtype)
    t[1234] = bad
    assert not is_finite(t)


@pytest.mark.parametrize("dtype", DTYPES)
def test_opposite_infinities_are_found(dtype):
    t = torch.zeros(10, dtype=dtype)
    t[2], t[7] = math.inf, -math.inf
    assert not is_finite(t)


def test_none_empty_and_integers_are_finite():
    assert is_finite(None)
    assert is_finite(torch.zeros(0))
    assert is_finite(torch.arange(10))


def test_overflow_of_a_cast_is_found():
    t = torch.tensor([1.0, 70000.0])
    assert overflows(t, torch.float16)
    assert not overflows(t, torch.bfloat16)
    assert not overflows(torch.tensor([1.0, 65504.0]), torch.float16)

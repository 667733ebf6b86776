"""Shared fixtures: seeded generators (helpers live in rw_helpers.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def pytest_configure(config):
    # Small matrices dominate the unit tests; one BLAS thread avoids 2-thread spin-wait slowdowns
    # on a shared 2-core machine and keeps timings stable.
    torch.set_num_threads(1)

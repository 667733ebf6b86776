"""Helpers shared by the unit tests (import as ``from rw_helpers import …``; ``conftest`` is ambiguous
because tests/integration has its own)."""

from __future__ import annotations

import torch

# Per-dtype tolerances (relative) for comparisons after a cast.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def lowrank(m: int, n: int, r: int, *, generator: torch.Generator, spectrum=None) -> torch.Tensor:
    """A random m×n matrix of rank r with the given singular values (default: r…1 decreasing)."""
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=torch.float64))
    s = torch.linspace(float(r), 1.0, r, dtype=torch.float64) if spectrum is None else torch.as_tensor(spectrum, dtype=torch.float64)
    return ((u * s) @ v.T).float()

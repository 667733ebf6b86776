"""The one non-finite / overflow policy, used by every operation and by the writers.

* **Inputs** (checkpoint tensors, LoRA factors): NaN/Inf is detected per named part
  (:func:`non_finite_parts`), reported on the layer (``LayerStat.non_finite``) and the operation
  raises :class:`~.errors.NonFiniteError` naming *every* such layer after the pass
  (:func:`raise_non_finite`). Nothing non-finite is ever decomposed, and nothing becomes zeros.
* **Decompositions**: a routine that returns non-finite or inconsistent values (an fp32 overflow
  inside the Gram matrix, a LAPACK failure) moves to the next rung of the fallback ladder
  (:mod:`.fallback`); the rung that ran is reported (``LayerStat.fallback``). If no rung works the
  layer's error names it.
* **Output dtype**: a factor that would overflow the storage dtype is found by
  :func:`overflows` (the cast itself, then a finiteness check): extract keeps such factors in fp32
  and says so (``LayerStat.kept_fp32``); the writers refuse with :class:`NonFiniteError`.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from .errors import NonFiniteError

Tensor = torch.Tensor


# A sum is finite iff every entry is, as long as finite entries cannot overflow the accumulator:
# fp16 (max 65504) in fp32 needs > 5e33 entries to, fp32/bf16 (max 3.4e38) in fp64 > 5e269. NaN
# propagates, and +Inf + −Inf is NaN. 3–14× faster than ``isfinite(t).all()`` (no bool tensor;
# measured on 1.6 M-entry factors: fp16 2.9 → 0.3 ms, bf16 3.7 → 0.3 ms, fp32 2.5 → 0.5 ms).
_SUM_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float64, torch.float32: torch.float64}


def is_finite(t: Tensor | None) -> bool:
    """No NaN/Inf in ``t`` (None counts as finite)."""
    if t is None:
        return True
    acc = _SUM_DTYPE.get(t.dtype)
    if acc is None or t.device.type != "cpu":
        return bool(torch.isfinite(t).all())
    return math.isfinite(float(t.sum(dtype=acc)))


def non_finite_parts(parts: Iterable[tuple[str, Tensor | None]]) -> tuple[str, ...]:
    """The names of the parts that hold NaN/Inf, in order."""
    return tuple(name for name, t in parts if not is_finite(t))


def overflows(t: Tensor, dtype: torch.dtype) -> bool:
    """True when casting the (finite) tensor ``t`` to ``dtype`` produces Inf."""
    if t.dtype == dtype or not dtype.is_floating_point:
        return False
    if torch.finfo(dtype).max >= torch.finfo(t.dtype).max:
        return False
    return not is_finite(t.to(dtype))


def describe_counts(t: Tensor) -> str:
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    return f"{nan} NaN and {inf} ±Inf value(s)"


def raise_non_finite(bad: Sequence[str], label: str = "input", shown_as: Sequence[str] | None = None) -> None:
    """Raise :class:`NonFiniteError` for the layers ``bad`` (no-op when empty).

    ``shown_as``: how to print each layer in the message (default: its name).
    """
    bad = tuple(bad)
    if not bad:
        return
    display = list(shown_as) if shown_as is not None else list(bad)
    shown = ", ".join(display[:8]) + (f" … (+{len(bad) - 8} more)" if len(bad) > 8 else "")
    raise NonFiniteError(
        f"{label} has NaN/Inf values in {len(bad)} layer(s): {shown}; the file is damaged or was "
        f"saved from a diverged training run — re-export it or exclude these layers",
        names=bad,
    )

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

from typing import Iterable, Sequence

import torch

from .errors import NonFiniteError

Tensor = torch.Tensor


def is_finite(t: Tensor | None) -> bool:
    """No NaN/Inf in ``t`` (None counts as finite)."""
    return t is None or bool(torch.isfinite(t).all())


def non_finite_parts(parts: Iterable[tuple[str, Tensor | None]]) -> tuple[str, ...]:
    """The names of the parts that hold NaN/Inf, in order."""
    return tuple(name for name, t in parts if not is_finite(t))


def overflows(t: Tensor, dtype: torch.dtype) -> bool:
    """True when casting the (finite) tensor ``t`` to ``dtype`` produces Inf."""
    if t.dtype == dtype or not dtype.is_floating_point:
        return False
    if torch.finfo(dtype).max >= torch.finfo(t.dtype).max:
        return False
    return not bool(torch.isfinite(t.to(dtype)).all())


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

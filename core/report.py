"""Per-layer statistics shared by extract, resize and merge: a table for people, JSON for tools."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Sequence

from .types import LayerKind, LayerStatus, SkipReason


@dataclass(frozen=True)
class LayerStat:
    """One output layer.

    ``retained``: fraction of ‖ΔW‖_F² kept. ``error``: ‖ΔW − ΔW_k‖_F of what was written (before the
    output dtype cast). ``optimal_error``: the Eckart–Young optimum at the same rank. ``status`` is a
    :class:`LayerStatus` (``ok``, ``skipped`` — see ``skip`` — or ``fallback`` — see ``fallback``).

    Structured fields (code reads these, never ``note``, which is for people):

    * ``capped``: a fixed rank above the layer's rank limit was lowered to the limit;
    * ``non_finite``: the inputs (sides, factors or input LoRAs) that hold NaN/Inf;
    * ``fallback``: the fallback-ladder rung(s) that produced the decomposition, None when the
      primary routine ran;
    * ``skip``: why a skipped layer was not written;
    * ``missing_in``: merge inputs that lack the layer (taken as 0);
    * ``dense_input``: the layer came from (or was merged with) a dense LoHa/LoKr/full ΔW;
    * ``kept_fp32``: the factors stayed fp32 because the storage dtype would overflow.
    """

    name: str
    kind: LayerKind
    shape: tuple[int, ...]
    rank: int
    input_rank: int | None = None
    retained: float = 1.0
    error: float = 0.0
    optimal_error: float = 0.0
    norm: float = 0.0
    nbytes: int = 0
    status: LayerStatus = LayerStatus.OK
    note: str = ""
    capped: bool = False
    non_finite: tuple[str, ...] = ()
    fallback: str | None = None
    skip: SkipReason | None = None
    missing_in: tuple[str, ...] = ()
    dense_input: bool = False
    kept_fp32: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", LayerKind(self.kind))
        object.__setattr__(self, "status", LayerStatus(self.status))
        if self.skip is not None:
            object.__setattr__(self, "skip", SkipReason(self.skip))
        object.__setattr__(self, "non_finite", tuple(self.non_finite))
        object.__setattr__(self, "missing_in", tuple(self.missing_in))
        object.__setattr__(self, "shape", tuple(int(x) for x in self.shape))

    @property
    def written(self) -> bool:
        return self.status is not LayerStatus.SKIPPED

    @property
    def excess(self) -> float:
        """error / optimal_error − 1 (0 when both are ~0)."""
        if self.optimal_error <= 0.0:
            return 0.0 if self.error <= 1e-12 * max(self.norm, 1.0) else math.inf
        return self.error / self.optimal_error - 1.0


@dataclass(frozen=True)
class Report:
    """What an operation did, layer by layer, plus totals and free-form notes."""

    operation: str
    layers: tuple[LayerStat, ...]
    notes: tuple[str, ...] = ()
    params: Mapping[str, str] = field(default_factory=dict)

    @property
    def written(self) -> tuple[LayerStat, ...]:
        return tuple(s for s in self.layers if s.status is not LayerStatus.SKIPPED)

    @property
    def skipped(self) -> tuple[LayerStat, ...]:
        return tuple(s for s in self.layers if s.status is LayerStatus.SKIPPED)

    @property
    def fallbacks(self) -> tuple[LayerStat, ...]:
        return tuple(s for s in self.layers if s.status is LayerStatus.FALLBACK)

    def totals(self) -> dict[str, float]:
        written = self.written
        energy = sum(s.norm**2 for s in written)
        kept = sum(s.retained * s.norm**2 for s in written)
        excesses = sorted(s.excess for s in written if math.isfinite(s.excess))
        return {
            "layers": float(len(self.layers)),
            "written": float(len(written)),
            "skipped": float(len(self.skipped)),
            "fallbacks": float(len(self.fallbacks)),
            "bytes": float(sum(s.nbytes for s in written)),
            "retained_energy": kept / energy if energy > 0 else 1.0,
            "mean_rank": (sum(s.rank for s in written) / len(written)) if written else 0.0,
            "median_excess": excesses[len(excesses) // 2] if excesses else 0.0,
            "max_excess": excesses[-1] if excesses else 0.0,
        }

    def summary(self) -> str:
        t = self.totals()
        if self.operation == "info":  # a file read as it is: nothing was written, kept or truncated
            lines = [
                f"info: {int(t['layers'])} layers ({int(t['skipped'])} all zero); mean rank {t['mean_rank']:.1f}; "
                f"size {t['bytes'] / 2**20:.1f} MiB"
            ]
        else:
            lines = [
                f"{self.operation}: {int(t['written'])} layers written, {int(t['skipped'])} skipped, "
                f"{int(t['fallbacks'])} fallbacks; mean rank {t['mean_rank']:.1f}; "
                f"retained energy {100 * t['retained_energy']:.2f}%; size {t['bytes'] / 2**20:.1f} MiB; "
                f"error vs optimum: median +{100 * t['median_excess']:.3f}%, max +{100 * t['max_excess']:.3f}%",
            ]
        if self.params:
            lines.append("parameters: " + ", ".join(f"{k}={v}" for k, v in self.params.items()))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def to_table(self, limit: int | None = None) -> str:
        header = f"{'layer':<72} {'kind':<8} {'rank':>5} {'kept%':>7} {'err/opt':>8} {'KiB':>8}  status"
        rows = [header, "-" * len(header)]
        shown: Iterable[LayerStat] = self.layers if limit is None else self.layers[:limit]
        for s in shown:
            ratio = "" if s.status is LayerStatus.SKIPPED else f"{1 + s.excess:8.4f}"
            note = f" {s.note}" if s.note else ""
            rows.append(
                f"{s.name[:72]:<72} {s.kind.value:<8} {s.rank:>5} {100 * s.retained:>7.2f} {ratio:>8} "
                f"{s.nbytes / 1024:>8.1f}  {s.status.value}{note}"
            )
        if limit is not None and len(self.layers) > limit:
            rows.append(f"… {len(self.layers) - limit} more layers")
        rows.append("")
        rows.append(self.summary())
        return "\n".join(rows)

    def to_json(self) -> str:
        def layer(s: LayerStat) -> dict:
            d = asdict(s)
            d["shape"] = list(s.shape)
            d["kind"] = s.kind.value
            d["status"] = s.status.value
            d["skip"] = None if s.skip is None else s.skip.value
            d["non_finite"] = list(s.non_finite)
            d["missing_in"] = list(s.missing_in)
            d["excess"] = s.excess if math.isfinite(s.excess) else None
            return d

        return json.dumps(
            {
                "operation": self.operation,
                "params": dict(self.params),
                "totals": self.totals(),
                "notes": list(self.notes),
                "layers": [layer(s) for s in self.layers],
            },
            indent=1,
        )


def merge_reports(operation: str, reports: Sequence[Report]) -> Report:
    layers: list[LayerStat] = []
    notes: list[str] = []
    for r in reports:
        layers.extend(r.layers)
        notes.extend(r.notes)
    return Report(operation, tuple(layers), tuple(notes))

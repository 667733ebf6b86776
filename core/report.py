"""Per-layer statistics shared by extract, resize and merge: a table for people, JSON for tools."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Sequence


@dataclass(frozen=True)
class LayerStat:
    """One output layer.

    ``retained``: fraction of ‖ΔW‖_F² kept. ``error``: ‖ΔW − ΔW_k‖_F of what was written (before the
    output dtype cast). ``optimal_error``: the Eckart–Young optimum at the same rank. ``status`` is
    ``"ok"``, ``"skipped"`` (near-zero or filtered) or ``"fallback"`` (see ``note``).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    rank: int
    input_rank: int | None = None
    retained: float = 1.0
    error: float = 0.0
    optimal_error: float = 0.0
    norm: float = 0.0
    nbytes: int = 0
    status: str = "ok"
    note: str = ""

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
        return tuple(s for s in self.layers if s.status != "skipped")

    @property
    def skipped(self) -> tuple[LayerStat, ...]:
        return tuple(s for s in self.layers if s.status == "skipped")

    @property
    def fallbacks(self) -> tuple[LayerStat, ...]:
        return tuple(s for s in self.layers if s.status == "fallback")

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
            ratio = "" if s.status == "skipped" else f"{1 + s.excess:8.4f}"
            note = f" {s.note}" if s.note else ""
            rows.append(
                f"{s.name[:72]:<72} {s.kind:<8} {s.rank:>5} {100 * s.retained:>7.2f} {ratio:>8} "
                f"{s.nbytes / 1024:>8.1f}  {s.status}{note}"
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

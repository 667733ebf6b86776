"""Rank rules: one vocabulary for extraction, resize and merge.

Every rule returns the *minimal* rank k that meets its target, then the per-layer cap and the
minimum rank are applied. With σ₁ ≥ σ₂ ≥ … ≥ σ_p the singular values of ΔW (p = min(m, n)):

==================  ==========================================================================
rule (``name:v``)   rank chosen
==================  ==========================================================================
``fixed:r`` / ``r`` r (the cap for the layer kind replaces it for conv / text-encoder layers)
``sv_ratio:ρ``      #{σᵢ > σ₁/ρ}, ρ ≥ 1  (LyCORIS ``ratio`` p equals ``sv_ratio`` 1/p)
``sv_cumulative:τ`` smallest k with Σ_{i≤k} σᵢ ≥ τ · Σ σᵢ  (LyCORIS ``quantile`` τ; see below)
``sv_fro:τ``        smallest k with √(Σ_{i≤k} σᵢ²) ≥ τ · ‖ΔW‖_F
``threshold:t``     #{σᵢ > t}  (LyCORIS ``threshold``)
``sv_knee``         the Kneedle knee of the normalised spectrum (:func:`knee_rank`)
``size:160MB``      global: the ranks that keep the most weighted energy in a file of at most
                    that many bytes (:mod:`.budget`); units B, KB, MB, GB (decimal: 1 MB = 10⁶ B)
                    and KiB, MiB, GiB (binary: 1 MiB = 2²⁰ B)
``size:0.25``       global: a fraction in (0, 1] of the size of the same layers at fixed rank 128
                    (each layer at min(128, p)); a number without a unit must be such a fraction
``params:N``        global: at most N stored factor values Σ r·(out + in·kh·kw) (alphas not
                    counted); N may end in K, M or G (10³, 10⁶, 10⁹)
==================  ==========================================================================

*Global* rules (``size``, ``params``; :attr:`RankRule.is_global`) cannot pick a layer's rank from
its own spectrum: a pipeline decomposes every layer first (factors at the cap; the cap defaults to
:data:`GLOBAL_DEFAULT_CAP` when ``max_rank`` is unset), then :mod:`.budget` allocates the ranks
across layers. :func:`select_rank` refuses them.

Off-by-one differences from the peers (re-derived, see the README):

* kohya ``resize_lora.py`` clamps the minimal index to [1, p−1] and then adds one more, so its
  ``sv_ratio``/``sv_cumulative``/``sv_fro`` ranks are ``min(k, p−1) + 1`` (never below 2).
  ``kohya_compat=True`` reproduces that, and kohya's "σ₁ ≤ 1e-6 → rank 1".
* LyCORIS ``quantile`` counts #{Cᵢ < τ} (C the normalised cumulative sum), which is k − 1 whenever
  no partial sum hits τ exactly.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

import torch

from .errors import RankwiseError
from .types import LayerKind


class RuleKind(str, enum.Enum):
    FIXED = "fixed"
    SV_RATIO = "sv_ratio"
    SV_CUMULATIVE = "sv_cumulative"
    SV_FRO = "sv_fro"
    THRESHOLD = "threshold"
    SV_KNEE = "sv_knee"
    SIZE = "size"  # value: bytes
    SIZE_FRACTION = "size_fraction"  # value: fraction of the rank-128 size; written "size:0.25"
    PARAMS = "params"  # value: stored factor values


GLOBAL_KINDS = frozenset({RuleKind.SIZE, RuleKind.SIZE_FRACTION, RuleKind.PARAMS})
GLOBAL_DEFAULT_CAP = 128
"""The per-layer cap of a global rule when ``max_rank`` is unset (the factors kept before allocating)."""
SIZE_REFERENCE_RANK = 128
"""``size:f`` is a fraction f of the file with every layer at rank min(128, p)."""
SIZE_UNITS: dict[str, int] = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30,
}
COUNT_SUFFIXES: dict[str, int] = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$")


@dataclass(frozen=True)
class RankRule:
    kind: RuleKind
    value: float

    def __post_init__(self) -> None:
        v = float(self.value)
        if not math.isfinite(v):
            raise RankwiseError(f"rank rule {self.kind.value} needs a finite value, got {self.value}")
        if self.kind is RuleKind.FIXED and (v < 1 or v != int(v)):
            raise RankwiseError(f"a fixed rank must be a whole number ≥ 1, got {self.value:g}")
        if self.kind in (RuleKind.SV_CUMULATIVE, RuleKind.SV_FRO) and not 0.0 < v <= 1.0:
            raise RankwiseError(f"{self.kind.value} takes a fraction in (0, 1], got {self.value}")
        if self.kind is RuleKind.SV_RATIO and v < 1.0:
            raise RankwiseError(
                f"sv_ratio keeps σ > σ₁/ρ and needs ρ ≥ 1, got {self.value} "
                f"(LyCORIS' ratio p corresponds to sv_ratio {1 / v if v > 0 else 'inf'})"
            )
        if self.kind is RuleKind.THRESHOLD and v < 0:
            raise RankwiseError(f"threshold must be ≥ 0, got {self.value}")
        _check_extended(self.kind, v)

    @property
    def is_fixed(self) -> bool:
        return self.kind is RuleKind.FIXED

    @property
    def is_global(self) -> bool:
        """True for budget rules (``size``, ``params``): all layers' spectra are needed first."""
        return self.kind in GLOBAL_KINDS

    @staticmethod
    def parse(text: str) -> "RankRule":
        """``"32"`` → fixed 32; ``"sv_fro:0.9"``, ``"sv_ratio=20"``, ``"fixed:16"``…"""
        s = str(text).strip().lower()
        if not s:
            raise RankwiseError("empty rank rule")
        extended = _parse_extended(s)
        if extended is not None:
            return extended
        for sep in (":", "="):
            if sep in s:
                name, _, val = s.partition(sep)
                break
        else:
            name, val = "fixed", s
        try:
            kind = RuleKind(name.strip())
        except ValueError:
            names = ", ".join(k.value for k in RuleKind if k is not RuleKind.SIZE_FRACTION)
            raise RankwiseError(f"unknown rank rule {name!r}; use one of: {names}") from None
        try:
            value = float(val)
        except ValueError:
            raise RankwiseError(f"rank rule {text!r}: {val!r} is not a number") from None
        return RankRule(kind, value)

    def __str__(self) -> str:
        if self.is_fixed:
            return str(int(self.value))
        if self.kind in _EXTENDED_STR:
            return _EXTENDED_STR[self.kind](self.value)
        return f"{self.kind.value}:{self.value:g}"


def parse_rules(text: str) -> list[RankRule]:
    """A comma/semicolon separated list (sweeps): ``"8,16,32"`` or ``"sv_fro:0.8; sv_fro:0.9"``."""
    parts = [p for chunk in str(text).split(";") for p in chunk.split(",")]
    rules = [RankRule.parse(p) for p in parts if p.strip()]
    if not rules:
        raise RankwiseError(f"no rank rule in {text!r}")
    return rules


@dataclass(frozen=True)
class RankPolicy:
    """A rule plus the per-layer limits.

    ``max_rank`` caps dynamic rules (None: no cap). ``conv_rank`` replaces the rank (fixed rule) or the
    cap (dynamic rules) for conv layers with a kernel larger than 1×1; ``te_rank`` does the same for
    text-encoder layers. ``min_rank`` is a floor for dynamic rules.
    """

    rule: RankRule
    max_rank: int | None = None
    conv_rank: int | None = None
    te_rank: int | None = None
    min_rank: int = 1
    kohya_compat: bool = False

    def __post_init__(self) -> None:
        for name in ("max_rank", "conv_rank", "te_rank"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise RankwiseError(f"{name} must be ≥ 1 (or unset), got {v}")
        if self.min_rank < 1:
            raise RankwiseError(f"min_rank must be ≥ 1, got {self.min_rank}")
        if self.max_rank is not None and self.min_rank > self.max_rank:
            raise RankwiseError(
                f"min_rank {self.min_rank} is above max_rank {self.max_rank}; no rank can satisfy both"
            )

    def cap(self, kind: LayerKind, is_text_encoder: bool = False) -> int | None:
        """The rank (fixed rule) or the upper bound (dynamic rules) for a layer; None = unbounded."""
        if kind is LayerKind.CONV and self.conv_rank is not None:
            return int(self.conv_rank)
        if is_text_encoder and self.te_rank is not None:
            return int(self.te_rank)
        if self.rule.is_fixed:
            return int(self.rule.value)
        if self.max_rank is None and self.rule.is_global:
            return GLOBAL_DEFAULT_CAP
        return None if self.max_rank is None else int(self.max_rank)

    def needed_values(self, full_rank: int, kind: LayerKind, is_text_encoder: bool = False) -> int:
        """How many leading singular values a decomposition must deliver for this policy."""
        cap = self.cap(kind, is_text_encoder)
        k = full_rank if cap is None else min(cap, full_rank)
        if self.rule.kind is RuleKind.SV_KNEE:
            k = full_rank  # the knee is defined on the whole spectrum
        if self.kohya_compat and not self.rule.is_fixed:
            k = min(k + 1, full_rank)
        return max(k, 1)

    def describe(self) -> str:
        parts = [str(self.rule)]
        if self.max_rank is not None and not self.rule.is_fixed:
            parts.append(f"max_rank={self.max_rank}")
        if self.conv_rank is not None:
            parts.append(f"conv_rank={self.conv_rank}")
        if self.te_rank is not None:
            parts.append(f"te_rank={self.te_rank}")
        if self.min_rank != 1:
            parts.append(f"min_rank={self.min_rank}")
        if self.kohya_compat:
            parts.append("kohya_compat")
        return " ".join(parts)


@dataclass(frozen=True)
class Spectrum:
    """What is known about a matrix's singular values.

    ``values``: the leading q singular values, descending (fp64, CPU). ``fro2``: the exact ‖A‖_F²
    (sum of squares of the entries, no SVD needed). ``full_rank``: p = min(m, n).
    """

    values: torch.Tensor
    fro2: float
    full_rank: int

    @property
    def known(self) -> int:
        return int(self.values.numel())

    @property
    def complete(self) -> bool:
        return self.known >= self.full_rank

    def energy(self, k: int) -> float:
        """Σ_{i≤k} σᵢ² (k ≤ known)."""
        return float((self.values[:k].double() ** 2).sum())

    def retained(self, k: int) -> float:
        """Fraction of Frobenius energy kept at rank k: Σ_{i≤k} σᵢ² / ‖A‖_F²."""
        if self.fro2 <= 0:
            return 1.0
        return min(1.0, self.energy(k) / self.fro2)

    def optimal_error(self, k: int) -> float:
        """Eckart–Young: ‖A − A_k‖_F = √(‖A‖_F² − Σ_{i≤k} σᵢ²)."""
        return math.sqrt(max(self.fro2 - self.energy(k), 0.0))


@dataclass(frozen=True)
class RankChoice:
    rank: int
    certain: bool  # False: the partial spectrum could not decide; recompute with all values


def _count_above(values: torch.Tensor, bound: float) -> int:
    return int((values > bound).sum())


def _first_reaching(partial_sums: torch.Tensor, target: float) -> int | None:
    """Smallest k (1-based) with partial_sums[k-1] ≥ target, or None."""
    hit = torch.nonzero(partial_sums >= target * (1 - 1e-12))
    return int(hit[0]) + 1 if hit.numel() else None


def minimal_rank(spectrum: Spectrum, rule: RankRule) -> tuple[int | None, int | None]:
    """The minimal rank meeting ``rule`` as an interval (lo, hi) of what the partial spectrum allows.

    ``None`` as hi means "more than the known values" (unbounded). With a complete spectrum lo == hi.
    """
    s = spectrum.values.double().cpu()
    q, p = spectrum.known, spectrum.full_rank
    complete = spectrum.complete
    if q == 0:
        return 0, (0 if complete else None)
    kind, v = rule.kind, float(rule.value)
    if rule.is_global:
        raise RankwiseError(f"{rule} is a global rule: ranks come from core.budget.allocate, not per layer")
    if kind is RuleKind.SV_KNEE:
        if not complete:
            return 1, None
        k = knee_rank(s)
        return k, k
    if kind is RuleKind.FIXED:
        k = min(int(v), p)
        return k, k
    if kind in (RuleKind.SV_RATIO, RuleKind.THRESHOLD):
        bound = float(s[0]) / v if kind is RuleKind.SV_RATIO else v
        k = _count_above(s, bound)
        if k < q or complete:
            return k, k
        return q, None
    if kind is RuleKind.SV_FRO:
        k = _first_reaching(torch.cumsum(s * s, 0), v * v * spectrum.fro2)
        if k is not None:
            return k, k
        return (p, p) if complete else (q + 1, None)
    # SV_CUMULATIVE: needs the nuclear norm N = Σσ.
    sums = torch.cumsum(s, 0)
    tail = max(spectrum.fro2 - float((s * s).sum()), 0.0)
    if complete or tail <= 0.0:
        n_lo = n_hi = float(sums[-1])
    else:
        n_lo = float(sums[-1]) + tail / float(s[-1]) if float(s[-1]) > 0 else float(sums[-1])
        n_hi = float(sums[-1]) + math.sqrt((p - q) * tail)
    k_lo = _first_reaching(sums, v * n_lo)
    k_hi = _first_reaching(sums, v * n_hi)
    lo = k_lo if k_lo is not None else (p if complete else q + 1)
    hi = k_hi if k_hi is not None else (p if complete else None)
    return lo, hi


def select_rank(
    spectrum: Spectrum,
    rule: RankRule,
    *,
    cap: int | None = None,
    min_rank: int = 1,
    kohya_compat: bool = False,
) -> RankChoice:
    """The rank for one layer under ``rule``, within [min_rank, min(cap, p)].

    Certain whenever the known values decide it (always, with a complete spectrum).
    """
    p = spectrum.full_rank
    upper = p if cap is None else max(1, min(int(cap), p))
    floor = max(1, min(int(min_rank), upper))
    if rule.is_fixed:
        return RankChoice(upper if cap is not None else min(int(rule.value), p), True)
    s0 = float(spectrum.values[0]) if spectrum.known else 0.0
    if kohya_compat and s0 <= 1e-6:
        return RankChoice(1, True)
    lo, hi = minimal_rank(spectrum, rule)

    def finish(k: int | None) -> int:
        if k is None:
            k = upper
        if kohya_compat:
            k = min(max(k, 1), p - 1) + 1 if p > 1 else 1
        return max(floor, min(k, upper))

    a, b = finish(lo), finish(hi)
    return RankChoice(a if a == b else b, a == b)


# ---------------------------------------------------------------------------------------------
# sv_knee and the global (budget) rules
# ---------------------------------------------------------------------------------------------


def knee_rank(values: torch.Tensor) -> int:
    """The Kneedle knee of a descending spectrum σ₁ ≥ … ≥ σₙ (n = all singular values).

    Both axes are normalised to [0, 1]: xᵢ = (i − 1)/(n − 1) and yᵢ = (σᵢ − σₙ)/(σ₁ − σₙ), so the
    curve runs from (0, 1) to (1, 0) and is below the chord y = 1 − x where the spectrum is convex.
    The difference curve is dᵢ = (1 − xᵢ) − yᵢ; the knee is the first i with the largest dᵢ, and
    the rank is that i (1-based). KJNodes' ``sv_knee`` takes the same argmax on 0-based indices and
    adds one, i.e. the same rank. Degenerate spectra: n = 1 → 1; σ₁ = 0 → 1; σ₁ = σₙ > 0 (flat, no
    knee) → n.
    """
    s = values.double().flatten().cpu()
    n = int(s.numel())
    if n <= 1 or float(s[0]) <= 0.0:
        return 1
    lo, hi = float(s[-1]), float(s[0])
    if hi - lo <= 0.0:
        return n
    x = torch.arange(n, dtype=torch.float64) / (n - 1)
    y = (s - lo) / (hi - lo)
    d = (1.0 - x) - y
    return int(torch.argmax(d)) + 1  # torch.argmax returns the first maximum


def parse_size(text: str) -> int:
    """``"160MB"`` → 160 000 000, ``"1.5GiB"`` → 1 610 612 736 (rounded down to whole bytes)."""
    m = _NUMBER_UNIT.match(str(text).strip().lower())
    if m is None or m.group(2) not in SIZE_UNITS:
        units = ", ".join(u.upper().replace("I", "i") for u in SIZE_UNITS)
        raise RankwiseError(f"size {text!r}: give a number and a unit ({units}), e.g. 160MB")
    return int(math.floor(float(m.group(1)) * SIZE_UNITS[m.group(2)]))


def _parse_count(text: str) -> int:
    m = _NUMBER_UNIT.match(str(text).strip().lower())
    n = float(m.group(1)) * COUNT_SUFFIXES[m.group(2)] if m and m.group(2) in COUNT_SUFFIXES else -1.0
    if n < 1 or n != int(n):
        raise RankwiseError(f"params {text!r}: give a whole number ≥ 1, optionally with K, M or G (e.g. 20M)")
    return int(n)


def _parse_extended(s: str) -> "RankRule | None":
    """``sv_knee``, ``size:…``, ``params:…`` (lower-cased, stripped); None for the other rules."""
    name, sep, val = s.replace("=", ":", 1).partition(":")
    name, val = name.strip(), val.strip()
    if name == RuleKind.SV_KNEE.value:
        if sep and val:
            raise RankwiseError(f"sv_knee takes no value, got {s!r}")
        return RankRule(RuleKind.SV_KNEE, 0.0)
    if name == RuleKind.SIZE.value:
        if _NUMBER_UNIT.match(val) and not _NUMBER_UNIT.match(val).group(2):
            f = float(val)
            if not 0.0 < f <= 1.0:
                raise RankwiseError(
                    f"size {val!r}: a number without a unit is a fraction in (0, 1] of the rank-128 "
                    f"size; for bytes add a unit, e.g. size:{val}MB"
                )
            return RankRule(RuleKind.SIZE_FRACTION, f)
        return RankRule(RuleKind.SIZE, parse_size(val))
    if name == RuleKind.SIZE_FRACTION.value:
        return RankRule(RuleKind.SIZE_FRACTION, float(val))
    if name == RuleKind.PARAMS.value:
        return RankRule(RuleKind.PARAMS, _parse_count(val))
    return None


def _check_extended(kind: RuleKind, v: float) -> None:
    if kind is RuleKind.SIZE and (v < 1 or v != int(v)):
        raise RankwiseError(f"a size budget must be a whole number of bytes ≥ 1, got {v:g}")
    if kind is RuleKind.SIZE_FRACTION and not 0.0 < v <= 1.0:
        raise RankwiseError(f"size as a fraction of the rank-128 size must be in (0, 1], got {v:g}")
    if kind is RuleKind.PARAMS and (v < 1 or v != int(v)):
        raise RankwiseError(f"a parameter budget must be a whole number ≥ 1, got {v:g}")


def _size_str(v: float) -> str:
    b = int(v)
    for unit in ("GB", "MB", "KB", "GiB", "MiB", "KiB"):
        factor = SIZE_UNITS[unit.lower()]
        if b >= factor and b % factor == 0:
            return f"size:{b // factor}{unit}"
    return f"size:{b}B"


def _count_str(v: float) -> str:
    n = int(v)
    for suffix in ("G", "M", "K"):
        factor = COUNT_SUFFIXES[suffix.lower()]
        if n >= factor and n % factor == 0:
            return f"params:{n // factor}{suffix}"
    return f"params:{n}"


_EXTENDED_STR = {
    RuleKind.SV_KNEE: lambda v: "sv_knee",
    RuleKind.SIZE: _size_str,
    RuleKind.SIZE_FRACTION: lambda v: f"size:{v:g}",
    RuleKind.PARAMS: _count_str,
}

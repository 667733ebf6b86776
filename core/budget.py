"""Ranks from a file-size (or parameter) budget, allocated across layers.

Objective
---------
For layers l with singular values σ_{l,1} ≥ σ_{l,2} ≥ … of ΔW_l, choose ranks r_l maximising the
weighted retained energy ::

    J(r) = Σ_l w_l · E_l(r_l),        E_l(r) = Σ_{i≤r} σ_{l,i}²   (= ‖ΔW_l‖²_F for a full ``.diff``)

subject to Σ_l cost_l(r_l) ≤ B (bytes, or factor values for ``params:N``) and each r_l within its
caps. Eckart–Young: E_l(r) is the most of ‖ΔW_l‖²_F any rank-r factorisation keeps, so J is the
(weighted) squared Frobenius error removed. Two weightings (:class:`Weighting`):

* ``relative`` (extraction's default): w_l = 1/‖W_base,l‖²_F, so a layer counts by its *relative*
  change; large and small layers are compared on the same scale.
* ``absolute``: w_l = 1, the plain Σ ‖ΔW_l − ΔW_l,r‖²_F (resize and merge, which know no base).

Cost
----
A layer written at rank r ≥ 1 costs ``fixed + unit·r`` bytes (:class:`LayerCost`): ``unit`` is
(out + in·kh·kw) × the save dtype's bytes (one row of ``up`` and of ``down``), ``fixed`` is the alpha
tensor plus the three JSON header entries (``lora_up``/``lora_down``/``alpha``) with the rank and the
data offsets counted at their largest digit count, so the model never under-counts. A layer at rank
0 is not written (cost 0). A full ``.diff`` costs out·in·kh·kw × bytes plus its header entry. The
file adds the 8-byte length, the JSON braces, the ``__metadata__`` entry and ≤ 7 bytes of padding
once (:func:`file_overhead`). :func:`predict_file_bytes` gives the exact size of a file from its
layer shapes and ranks, the same layout :func:`~.io.save_lora` writes.

Allocation and what is optimal
------------------------------
Each layer's options (its floor rank, every rank up to its cap, optionally rank 0 and a full diff)
are points (cost, w·E) ; :func:`allocate` takes the upper concave hull of each layer's points,
starting at its mandatory point, and buys hull segments across all layers in order of gain per byte
(a sort over all segments; slopes decrease along each hull, so each layer's segments are bought in
order). Because σ² is non-increasing and a rank unit costs the same bytes within a layer, the hull
of a plain layer is every rank; the fixed cost of a droppable layer and the diff option are the only
places where segments span several ranks. Proven (and checked against brute force in
``tests/test_budget.py``):

1. **Exact at its own cost.** Let C be the cost of the greedy prefix (the segments bought before the
   first one that does not fit). No allocation with cost ≤ C has a larger J: the prefix solves the
   fractional relaxation over the hulls at budget C, which bounds every integer allocation.
2. **Within one segment of the optimum.** For any budget B, J(greedy) ≥ OPT(B) − g*, where g* is the
   gain of the first segment that did not fit (``Allocation.gap_bound``). It is a knapsack: with
   unequal unit costs no greedy is exact for every B; after the first miss the greedy keeps buying
   the segments that still fit and then fills the remainder with the best partial segment, which only
   raises J. The unspent bytes are then smaller than the cheapest next step of any layer not at its
   cap — a few kilobytes in a 160 MB SDXL file.
3. **Exact when every unit costs the same** (``params`` with equal layer widths, no floors): the
   greedy is optimal for every budget.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import torch

from .errors import RankwiseError
from .rank import (
    RankPolicy,
    RankRule,
    RuleKind,
    SIZE_REFERENCE_RANK,
    Spectrum,
)
from .stream_write import _ST_DTYPES, plan_safetensors
from .types import LayerKind


class BudgetError(RankwiseError):
    """A budget no allocation can meet (smaller than every layer at its floor rank)."""


class Weighting(str, enum.Enum):
    """How layers are weighed against each other in the objective (module docstring)."""

    RELATIVE = "relative"  # w_l = 1 / ‖W_base,l‖²_F
    ABSOLUTE = "absolute"  # w_l = 1


class Storage(str, enum.Enum):
    LORA = "lora"  # up/down/alpha at the chosen rank
    DIFF = "diff"  # the exact full difference (.diff)
    NONE = "none"  # not written (rank 0)


# ---------------------------------------------------------------------------------------------
# Bytes
# ---------------------------------------------------------------------------------------------


HASH_PLACEHOLDERS = {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8}
"""save_lora adds these two keys (hex SHA-256 and its first 8 digits): same lengths as the real ones."""

_SEPARATORS = (",", ":")


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _digits(n: int) -> int:
    return len(str(max(int(n), 0)))


def _entry_bytes(key: str, shape: Sequence[int], dtype: torch.dtype, offset_digits: int) -> int:
    """JSON bytes of one tensor entry plus its separating comma, offsets written with ``offset_digits``."""
    big = int("9" * max(offset_digits, 1))
    entry = {key: {"dtype": _ST_DTYPES[dtype], "shape": [int(s) for s in shape], "data_offsets": [big, big]}}
    return len(json.dumps(entry, separators=_SEPARATORS, ensure_ascii=False).encode("utf-8")) - 2 + 1


def alpha_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The dtypes an alpha may be written in for a save dtype (formats._alpha_tensor: the save dtype
    unless that rounds the value, then fp32)."""
    return (dtype,) if _element_size(dtype) >= 4 else (dtype, torch.float32)


def _layer_parts(weight_shape: Sequence[int], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    out = int(weight_shape[0])
    if len(weight_shape) == 2:
        return (out, rank), (rank, int(weight_shape[1]))
    return (out, rank, 1, 1), (rank, *(int(s) for s in weight_shape[1:]))


def flat_in(weight_shape: Sequence[int]) -> int:
    return int(math.prod(int(s) for s in weight_shape[1:]))


@dataclass(frozen=True)
class LayerCost:
    """Cost of one layer: 0 at rank 0, ``fixed + unit·r`` at rank r ≥ 1, ``diff`` as a full
    difference (None: not offered)."""

    unit: int
    fixed: int
    diff: int | None = None

    def at(self, rank: int) -> int:
        return 0 if rank <= 0 else self.fixed + self.unit * int(rank)


def lora_layer_cost(
    name: str,
    weight_shape: Sequence[int],
    dtype: torch.dtype,
    *,
    max_rank: int,
    offset_digits: int,
) -> LayerCost:
    """Upper-bound byte cost of a kohya layer ``name`` (module docstring, "Cost"): exact data bytes,
    header entries with the rank at ``max_rank``'s digit count and offsets at ``offset_digits``."""
    es = _element_size(dtype)
    out, fin = int(weight_shape[0]), flat_in(weight_shape)
    r = max(int(max_rank), 1)
    up, down = _layer_parts(weight_shape, int("9" * _digits(r)))
    header = _entry_bytes(f"{name}.lora_up.weight", up, dtype, offset_digits)
    header += _entry_bytes(f"{name}.lora_down.weight", down, dtype, offset_digits)
    header += max(_entry_bytes(f"{name}.alpha", (), a, offset_digits) + _element_size(a) for a in alpha_dtypes(dtype))
    diff = out * fin * es + _entry_bytes(f"{name}.diff", tuple(int(s) for s in weight_shape), dtype, offset_digits)
    return LayerCost(unit=(out + fin) * es, fixed=header, diff=diff)


def params_layer_cost(weight_shape: Sequence[int]) -> LayerCost:
    """``params:N`` counts stored factor values: r·(out + in·kh·kw); a diff stores out·in·kh·kw."""
    out, fin = int(weight_shape[0]), flat_in(weight_shape)
    return LayerCost(unit=out + fin, fixed=0, diff=out * fin)


def file_overhead(metadata: Mapping[str, str] | None, *, with_hashes: bool = True) -> int:
    """Bytes of a file beyond its tensor entries and data: the 8-byte length, ``{}``, the
    ``__metadata__`` entry (with save_lora's two hash keys) and at most 7 bytes of padding."""
    md = dict(metadata or {})
    if with_hashes:
        md.update(HASH_PLACEHOLDERS)
    entry = {"__metadata__": {k: md[k] for k in sorted(md)}}  # save_lora always writes one
    body = 2 + len(json.dumps(entry, separators=_SEPARATORS, ensure_ascii=False).encode("utf-8")) - 2 + 1
    return 8 + body + 7


@dataclass(frozen=True)
class LayerLayout:
    """What a layer will be in the file: a LoRA at ``rank``, a full diff, or nothing."""

    name: str
    weight_shape: tuple[int, ...]
    rank: int
    storage: Storage = Storage.LORA


def layout_items(layouts: Iterable[LayerLayout], dtype: torch.dtype, alpha: float | None = None) -> list:
    """Stream items (key, shape, dtype, producer=None) of the file ``layouts`` describe, as
    :func:`~.formats.lora_state_items` lays them out (the alpha dtype from ``alpha``; None: the save
    dtype)."""
    from .formats import _alpha_tensor

    a_dtype = dtype if alpha is None else _alpha_tensor(float(alpha), dtype).dtype
    items = []
    for lay in layouts:
        if lay.storage is Storage.NONE or (lay.storage is Storage.LORA and lay.rank <= 0):
            continue
        if lay.storage is Storage.DIFF:
            items.append((f"{lay.name}.diff", tuple(lay.weight_shape), dtype, None))
            continue
        up, down = _layer_parts(lay.weight_shape, lay.rank)
        items.append((f"{lay.name}.lora_up.weight", up, dtype, None))
        items.append((f"{lay.name}.lora_down.weight", down, dtype, None))
        items.append((f"{lay.name}.alpha", (), a_dtype, None))
    return items


def predict_file_bytes(
    layouts: Iterable[LayerLayout],
    dtype: torch.dtype,
    metadata: Mapping[str, str] | None,
    *,
    alpha: float | None = None,
    with_hashes: bool = True,
) -> int:
    """The exact size of the file :func:`~.io.save_lora` writes for these layers and metadata
    (``with_hashes``: save_lora's two hash keys are added, as it does)."""
    md = dict(metadata or {})
    if with_hashes:
        md.update(HASH_PLACEHOLDERS)
    return plan_safetensors(layout_items(layouts, dtype, alpha), md).total_bytes


# ---------------------------------------------------------------------------------------------
# Allocation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BudgetLayer:
    """One layer's input to :func:`allocate`.

    ``sq``: σ_i² for i = 1..(at least ``hi``), descending (fp64). ``fro2``: ‖ΔW‖²_F (the gain of a
    full diff). ``lo``: the floor rank when written (≥ 1). ``hi``: the cap (≥ lo). ``optional``: may
    be left out (rank 0). ``diff``: a full difference is offered (needs ``cost.diff``).
    """

    name: str
    sq: torch.Tensor
    weight: float
    cost: LayerCost
    lo: int
    hi: int
    fro2: float = 0.0
    optional: bool = False
    diff: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.lo <= self.hi:
            raise ValueError(f"layer {self.name}: ranks need 1 ≤ lo ≤ hi, got lo={self.lo} hi={self.hi}")
        if self.sq.numel() < self.hi:
            raise ValueError(f"layer {self.name}: {self.sq.numel()} singular values known, cap is {self.hi}")
        if self.diff and self.cost.diff is None:
            raise ValueError(f"layer {self.name}: a diff is offered without its cost")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"layer {self.name}: weight must be finite and ≥ 0, got {self.weight}")

    def options(self) -> list["Option"]:
        """Every option by increasing cost; an option gaining no more than a cheaper one is dropped."""
        cum = torch.cumsum(self.sq[: self.hi].double(), 0).tolist()
        pts: list[Option] = []
        if self.optional:
            pts.append(Option(0, 0.0, 0, Storage.NONE, 0.0))
        fixed, unit, w, lora = self.cost.fixed, self.cost.unit, self.weight, Storage.LORA
        pts.extend(Option(fixed + unit * r, w * cum[r - 1], r, lora, cum[r - 1]) for r in range(self.lo, self.hi + 1))
        if self.diff:
            full = max(self.fro2, cum[-1])
            pts = [p for p in pts if p.cost < self.cost.diff]
            pts.append(Option(int(self.cost.diff), self.weight * full, 0, Storage.DIFF, full))
        keep: list[Option] = []
        for p in pts:
            if keep and p.gain <= keep[-1].gain:
                continue
            keep.append(p)
        return keep


class Option(NamedTuple):
    """One way to store a layer: its cost, weighted gain w·E, rank, storage and unweighted energy E."""

    cost: int
    gain: float
    rank: int
    storage: Storage
    energy: float


def _upper_hull(points: Sequence[Option]) -> list[int]:
    """Indices of the upper concave hull of ``points`` (sorted by cost), first and last included.
    Collinear middle points are kept (they are feasible stops at no loss)."""
    hull: list[int] = []
    for i, pt in enumerate(points):
        c, g = pt.cost, pt.gain
        while len(hull) >= 2:
            c1, g1 = points[hull[-2]].cost, points[hull[-2]].gain
            c2, g2 = points[hull[-1]].cost, points[hull[-1]].gain
            # drop the middle point when it lies strictly below the chord from hull[-2] to i
            if (g2 - g1) * (c - c1) < (g - g1) * (c2 - c1):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


@dataclass(frozen=True)
class LayerAllocation:
    name: str
    rank: int  # 0 for a diff or a left-out layer
    storage: Storage
    cost: int
    gain: float  # weighted: w · E(r)
    energy: float  # unweighted Σ σ² kept (‖ΔW‖²_F for a diff)


@dataclass(frozen=True)
class Allocation:
    """The chosen ranks. ``cost`` is Σ layer costs (the overhead is not included); ``budget`` is what
    the layers could spend; ``gap_bound``: OPT(budget) − objective ≤ gap_bound (0: exactly optimal)."""

    layers: tuple[LayerAllocation, ...]
    budget: int
    cost: int
    objective: float
    gap_bound: float
    exact_at: int = 0  # cost of the greedy prefix: at that budget the prefix is exactly optimal

    def ranks(self) -> dict[str, int]:
        return {a.name: a.rank for a in self.layers}

    def by_name(self) -> dict[str, LayerAllocation]:
        return {a.name: a for a in self.layers}

    @property
    def leftover(self) -> int:
        return self.budget - self.cost


class _Search:
    """The improvement steps after the greedy (fill, exchange, re-buy), on one mutable state."""

    def __init__(self, opts, hulls, state, blocked, bought, remaining) -> None:
        self.opts, self.hulls, self.state = opts, hulls, state
        self.blocked, self.bought, self.remaining = blocked, bought, remaining
        self.vertex = [{idx: j for j, idx in enumerate(h)} for h in hulls]

    def _seg(self, l: int, j: int) -> tuple[int, float]:
        a, b = self.opts[l][self.hulls[l][j - 1]], self.opts[l][self.hulls[l][j]]
        return b.cost - a.cost, b.gain - a.gain

    def fill(self) -> None:
        """Points strictly inside a blocked segment that fit the remainder, best gain first."""
        while self.blocked and self.remaining > 0:
            best: tuple[float, int, int] | None = None
            for l, j in self.blocked.items():
                cur = self.opts[l][self.state[l]]
                for i in range(self.state[l] + 1, self.hulls[l][j]):
                    o = self.opts[l][i]
                    if o.cost - cur.cost <= self.remaining and o.gain > cur.gain and (
                            best is None or o.gain - cur.gain > best[0]):
                        best = (o.gain - cur.gain, l, i)
            if best is None:
                return
            _, l, i = best
            self.remaining -= self.opts[l][i].cost - self.opts[l][self.state[l]].cost
            self.state[l] = i

    def rebuy(self) -> None:
        """Buy next segments that fit again (after an exchange freed bytes), best slope first."""
        while True:
            best: tuple[float, int, int] | None = None
            for l, j in self.blocked.items():
                if self.state[l] != self.hulls[l][j - 1]:
                    continue
                dc, dg = self._seg(l, j)
                if dc <= self.remaining and (best is None or dg / dc > best[0]):
                    best = (dg / dc, l, j)
            if best is None:
                return
            _, l, j = best
            self._buy_end(l, j)
            self.remaining -= self._seg(l, j)[0]

    def _buy_end(self, l: int, j: int) -> None:
        self.state[l] = self.hulls[l][j]
        self.bought.append((l, j))
        if j + 1 < len(self.hulls[l]):
            self.blocked[l] = j + 1
        else:
            self.blocked.pop(l, None)

    def swap(self) -> bool:
        """The best exchange: for a blocked layer, a point inside or at the end of its blocked segment,
        paid for by selling the last-bought (least efficient) segments of other layers. True if one
        with a positive net gain was made."""
        best: tuple[float, int, int, list[tuple[int, int]], int] | None = None
        for l, j in self.blocked.items():
            cur = self.opts[l][self.state[l]]
            for i in range(self.state[l] + 1, self.hulls[l][j] + 1):
                o = self.opts[l][i]
                need, dg = o.cost - cur.cost - self.remaining, o.gain - cur.gain
                if need <= 0 or dg <= (best[0] if best else 0.0):
                    continue
                freed, lost, sells, tops = 0, 0.0, [], {}
                for m, jm in reversed(self.bought):
                    if m == l or tops.get(m, self.vertex[m].get(self.state[m])) != jm:
                        continue
                    dcm, dgm = self._seg(m, jm)
                    freed, lost = freed + dcm, lost + dgm
                    sells.append((m, jm))
                    tops[m] = jm - 1
                    if freed >= need or lost >= dg:
                        break
                net = dg - lost
                if freed >= need and net > max(best[0] if best else 0.0, 1e-12 * abs(dg)):
                    best = (net, l, i, sells, freed)
        if best is None:
            return False
        _, l, i, sells, freed = best
        sold = set(sells)
        self.bought = [b for b in self.bought if b not in sold]
        for m, jm in sells:
            self.state[m] = self.hulls[m][jm - 1]
            self.blocked[m] = jm
        j = self.blocked[l]
        self.remaining += freed - (self.opts[l][i].cost - self.opts[l][self.state[l]].cost)
        if i == self.hulls[l][j]:
            self._buy_end(l, j)
        else:
            self.state[l] = i
        return True


@dataclass(frozen=True, eq=False)
class Prepared:
    """The budget-independent part of :func:`allocate` (options, hulls, segments by slope): several
    budgets over the same layers (a sweep, or the exact-size calibration) share it."""

    opts: tuple
    hulls: tuple
    segments: tuple  # (-slope, layer, hull position, Δcost, Δgain), best slope first

    @staticmethod
    def of(layers: Sequence[BudgetLayer]) -> "Prepared":
        opts = [layer.options() for layer in layers]
        hulls = [_upper_hull(o) for o in opts]
        segments: list[tuple[float, int, int, int, float]] = []
        for l, (o, h) in enumerate(zip(opts, hulls)):
            for j in range(1, len(h)):
                dc = o[h[j]].cost - o[h[j - 1]].cost
                dg = o[h[j]].gain - o[h[j - 1]].gain
                segments.append((-(dg / dc), l, j, dc, dg))
        segments.sort(key=lambda s: (s[0], s[1], s[2]))
        return Prepared(tuple(opts), tuple(hulls), tuple(segments))


def allocate(layers: Sequence[BudgetLayer], budget: int, *, max_swaps: int = 64,
             prepared: Prepared | None = None) -> Allocation:
    """Maximise Σ w_l·E_l(r_l) subject to Σ cost_l ≤ ``budget`` (module docstring for what is proven).

    After the greedy: the remainder is filled with the best partial step of a layer whose next hull
    segment did not fit, and up to ``max_swaps`` exchanges sell the least efficient bought steps of
    other layers to afford such a step when that raises J (each one strictly does). Raises
    :class:`BudgetError` when even every layer at its floor (optional layers left out) costs more
    than ``budget``. ``prepared``: :meth:`Prepared.of` the same ``layers``, to reuse.
    """
    budget = int(budget)
    prep = prepared if prepared is not None else Prepared.of(layers)
    opts, hulls, segments = prep.opts, prep.hulls, prep.segments
    state = [0] * len(layers)  # index into opts[l] of the current point
    base_cost = sum(o[0].cost for o in opts)
    if base_cost > budget:
        floor = min((layer.lo for layer in layers), default=1)
        raise BudgetError(
            f"a budget of {budget} is below the smallest possible file part ({base_cost} with every layer "
            f"at its minimum rank {floor}); raise the budget or lower --min-rank"
        )
    remaining = budget - base_cost
    blocked: dict[int, int] = {}  # layer → hull position of its first segment not bought
    bought: list[tuple[int, int]] = []  # (layer, hull position), in the order bought
    gap = 0.0
    first_miss = True
    prefix = base_cost
    for _, l, j, dc, dg in segments:
        if l in blocked:
            continue
        if dc <= remaining:
            remaining -= dc
            state[l] = hulls[l][j]
            bought.append((l, j))
            if first_miss:
                prefix += dc
        else:
            blocked[l] = j
            if first_miss:
                gap, first_miss = dg, False
    search = _Search(opts, hulls, state, blocked, bought, remaining)
    search.fill()
    for _ in range(max_swaps):
        if not search.swap():
            break
        search.rebuy()
        search.fill()
    state = search.state
    out: list[LayerAllocation] = []
    for layer, o, s in zip(layers, opts, state):
        pt = o[s]
        out.append(LayerAllocation(layer.name, pt.rank, pt.storage, pt.cost, pt.gain, pt.energy))
    cost = sum(a.cost for a in out)
    return Allocation(tuple(out), budget, cost, sum(a.gain for a in out), 0.0 if first_miss else gap, prefix)


# ---------------------------------------------------------------------------------------------
# From a rule and the layers' spectra to an allocation (what a pipeline calls)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LayerInfo:
    """What the selector needs of one decomposed layer. ``base_fro2``: ‖W_base‖²_F (None: unknown)."""

    name: str
    weight_shape: tuple[int, ...]
    spectrum: Spectrum
    is_text_encoder: bool = False
    base_fro2: float | None = None
    block: str | None = None

    @property
    def kind(self) -> LayerKind:
        return LayerKind.of_shape(self.weight_shape)


@dataclass(frozen=True)
class BudgetOptions:
    """``weighting``: the objective's layer weights. ``full_diff``: offer a full ``.diff`` for layers
    whose cap reaches half of min(out, in·kh·kw) (break-even of a factorisation). ``dtype``: the save
    dtype (None: not known yet, as in a node graph — sized for fp16 and bf16 alike). ``metadata``: the metadata the file will carry (its bytes are reserved), plus
    ``metadata_slack`` bytes for values that change with the ranks (``ss_network_dim``…).
    ``reserved_bytes``: file bytes of layers written besides the allocated ones (exact parts)."""

    weighting: Weighting = Weighting.RELATIVE
    full_diff: bool = False
    dtype: torch.dtype | None = None  # None: not known yet (a node graph) — any 16-bit dtype fits
    metadata: Mapping[str, str] = field(default_factory=dict)
    metadata_slack: int = 256
    reserved_bytes: int = 0  # written outside the allocation (a resize's or merge's exact parts)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weighting", Weighting(self.weighting))


@dataclass(frozen=True)
class BudgetPlan:
    """A global rule resolved: the allocation plus what it was resolved against.

    ``target``: the rule's budget (bytes of the whole file, or factor values). ``overhead``: the
    reserved file bytes outside the layers. ``predicted_bytes``: the exact file size (layouts and
    ``options.metadata``; for ``params`` the factor-value count).
    """

    rule: RankRule
    allocation: Allocation
    target: int
    overhead: int
    predicted_bytes: int
    layouts: tuple[LayerLayout, ...]
    weighting: Weighting

    def ranks(self) -> dict[str, int]:
        return self.allocation.ranks()

    def storage(self) -> dict[str, Storage]:
        return {a.name: a.storage for a in self.allocation.layers}


def layer_weight(info: LayerInfo, weighting: Weighting) -> float:
    """w_l: 1 (absolute) or 1/‖W_base‖²_F (relative). Without a base (resize, merge) relative falls
    back to absolute (w = 1); a known all-zero base weight counts relative to its own ‖ΔW‖²_F."""
    base = info.base_fro2
    if weighting is Weighting.ABSOLUTE or base is None:
        return 1.0
    if base > 0:
        return 1.0 / base
    fro2 = info.spectrum.fro2
    return 1.0 / fro2 if fro2 > 0 else 1.0


def diff_offered(weight_shape: Sequence[int], cap: int) -> bool:
    """A full diff is offered when the cap reaches half of p = min(out, in·kh·kw) (break-even)."""
    p = min(int(weight_shape[0]), flat_in(weight_shape))
    return 2 * int(cap) >= p


def _caps(info: LayerInfo, policy: RankPolicy) -> tuple[int, int]:
    p = info.spectrum.full_rank
    cap = policy.cap(info.kind, info.is_text_encoder)
    hi = min(p if cap is None else int(cap), p, info.spectrum.known)
    hi = max(hi, 1)
    lo = max(1, min(int(policy.min_rank), hi))
    return lo, hi


def reference_bytes(infos: Sequence[LayerInfo], dtype: torch.dtype, metadata: Mapping[str, str] | None) -> int:
    """The file size with every layer at fixed rank min(128, p) (what ``size:f`` is a fraction of)."""
    layouts = [LayerLayout(i.name, tuple(i.weight_shape), min(SIZE_REFERENCE_RANK, i.spectrum.full_rank))
               for i in infos]
    return predict_file_bytes(layouts, dtype, metadata)


def plan_budget(
    rule: RankRule,
    policy: RankPolicy,
    infos: Sequence[LayerInfo],
    options: BudgetOptions = BudgetOptions(),
) -> BudgetPlan:
    """Resolve a global rule (``size:…``, ``params:…``) over all layers.

    Layer caps come from ``policy`` (``max_rank`` or the global default cap, ``conv_rank``,
    ``te_rank``; ``min_rank`` is each layer's floor — every layer is written). Layers with an empty
    spectrum (ΔW = 0) keep the floor.
    """
    if not rule.is_global:
        raise ValueError(f"{rule} is not a global rule")
    md = dict(options.metadata)
    # the save dtype; unknown: fp16 and bf16 (same data bytes, "BF16" one header byte longer), the larger
    dtypes = (options.dtype,) if options.dtype is not None else (torch.float16, torch.bfloat16)
    if rule.kind is RuleKind.PARAMS:
        target, overhead = int(rule.value), 0
        cost_of: Callable[[LayerInfo, int], LayerCost] = lambda info, hi: params_layer_cost(info.weight_shape)
    else:
        if rule.kind is RuleKind.SIZE:
            target = int(rule.value)
        else:
            target = int(math.floor(float(rule.value) * reference_bytes(infos, dtypes[0], md)))
        overhead = file_overhead(md) + int(options.metadata_slack) + int(options.reserved_bytes)
        digits = _digits(target)
        cost_of = lambda info, hi: max((lora_layer_cost(info.name, info.weight_shape, dt, max_rank=hi,
                                                        offset_digits=digits) for dt in dtypes),
                                       key=lambda c: (c.unit, c.fixed))
    budget_layers = []
    for info in infos:
        lo, hi = _caps(info, policy)
        sq = info.spectrum.values.double().cpu() ** 2
        if sq.numel() < hi:  # a zero layer may deliver fewer values
            sq = torch.cat([sq, torch.zeros(hi - sq.numel(), dtype=torch.float64)])
        budget_layers.append(BudgetLayer(
            name=info.name, sq=sq, weight=layer_weight(info, options.weighting), cost=cost_of(info, hi),
            lo=lo, hi=hi, fro2=float(info.spectrum.fro2),
            diff=bool(options.full_diff and diff_offered(info.weight_shape, hi)),
        ))
    shapes = {i.name: tuple(i.weight_shape) for i in infos}

    prepared = Prepared.of(budget_layers)

    def solve(budget: int) -> tuple[Allocation, tuple[LayerLayout, ...], int]:
        try:
            alloc = allocate(budget_layers, budget, prepared=prepared)
        except BudgetError:
            smallest = sum(b.cost.at(b.lo) for b in budget_layers) + overhead
            unit = "factor values" if rule.kind is RuleKind.PARAMS else "bytes"
            raise BudgetError(
                f"{rule}: {target:,} {unit} is below the smallest result, {smallest:,} {unit} with each of the "
                f"{len(budget_layers)} layers at its minimum rank {policy.min_rank}; raise the budget, lower "
                "--min-rank or select fewer layers"
            ) from None
        lays = tuple(LayerLayout(a.name, shapes[a.name], a.rank, a.storage) for a in alloc.layers)
        pred = alloc.cost if rule.kind is RuleKind.PARAMS else (
            max(predict_file_bytes(lays, dt, md) for dt in dtypes) + int(options.reserved_bytes))
        return alloc, lays, pred

    budget = target - overhead
    allocation, layouts, predicted = solve(budget)
    if rule.kind is not RuleKind.PARAMS:
        # The cost model over-counts a little (offset and rank digits at their widest, fp32 alphas,
        # padding); spend what the exact layout leaves, keeping the exact size + slack ≤ target.
        limit = target - int(options.metadata_slack)
        spare = limit - predicted
        for _ in range(8):
            steps = [b.cost.unit for b, a in zip(budget_layers, allocation.layers)
                     if a.storage is Storage.LORA and a.rank < b.hi]
            if spare <= 0 or spare < min(steps, default=spare + 1):
                break  # not even one more rank unit would fit
            trial = solve(budget + spare)
            if trial[2] <= limit and trial[0].objective >= allocation.objective:
                budget += spare
                allocation, layouts, predicted = trial
                spare = limit - predicted
            else:
                spare //= 2
    weighting = options.weighting
    if weighting is Weighting.RELATIVE and all(i.base_fro2 is None for i in infos):
        weighting = Weighting.ABSOLUTE  # no base model (resize, merge): w = 1 (layer_weight)
    return BudgetPlan(rule, allocation, target, overhead, predicted, layouts, weighting)


# ---------------------------------------------------------------------------------------------
# The pipeline's global rank selector
# ---------------------------------------------------------------------------------------------


DEFAULT_METADATA_RESERVE = 2048
"""Bytes reserved for the metadata a pipeline writes after choosing (ss_*, modelspec, rankwise.params:
~1.5 KB for an extraction), on top of the metadata it carries from its input (:func:`carrying`)."""


@dataclass(frozen=True, eq=False)
class BudgetSelector:
    """A global rule (``size:…``, ``params:…``) as a :class:`~.pipeline.RankSelector`: it sees every
    layer's spectrum (phase 1 keeps the factors at the cap), allocates with :func:`plan_budget`, and
    records the plan (``last_plan``/``last_infos``) for the dry run and the report.

    ``metadata``: metadata the file will carry besides what the pipeline writes (e.g. the input's
    ``ss_*`` keys a resize carries), reserved on top of ``metadata_reserve`` bytes.
    """

    policy: RankPolicy
    options: BudgetOptions = field(default_factory=BudgetOptions)
    metadata_reserve: int = DEFAULT_METADATA_RESERVE
    block_of: Callable[[str], str | None] | None = None  # block labels for the table (else the pipeline's)
    is_global: bool = True
    _record: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.policy.rule.is_global:
            raise ValueError(f"{self.policy.rule} is not a global rule")

    @property
    def label(self) -> str:
        return self.policy.describe()

    @property
    def rule(self) -> RankRule:
        return self.policy.rule

    def _cap(self, kind: LayerKind, is_te: bool) -> int:
        cap = self.policy.cap(kind, is_te)
        return int(cap) if cap is not None else 1 << 30

    def needed(self, info) -> int:
        """Triplets phase 1 must keep: the cap, or every one when a full diff may be chosen."""
        limit = max(1, int(info.limit))
        cap = min(self._cap(info.kind, info.is_text_encoder), limit)
        if self.options.full_diff and diff_offered(info.shape, cap):
            return limit
        return max(1, cap)

    def may_store_full(self, info) -> bool:
        """Whether this selector may store the layer as an exact full difference (.diff): its
        factors are then held in fp32 (:class:`~.pipeline.RankPhase`), the .diff formed from them."""
        cap = min(self._cap(info.kind, info.is_text_encoder), max(1, int(info.limit)))
        return bool(self.options.full_diff and diff_offered(info.shape, cap))

    def infos(self, layers: Sequence) -> list[LayerInfo]:
        out = []
        for d in layers:
            info, spec = d.info, d.spectrum
            limit = max(1, int(info.limit))
            if spec.full_rank > limit:  # every value past the limit is zero
                spec = Spectrum(spec.values[:limit], spec.fro2, limit)
            out.append(LayerInfo(name=info.name, weight_shape=tuple(info.shape), spectrum=spec,
                                 is_text_encoder=bool(info.is_text_encoder),
                                 base_fro2=d.extra.get("base_fro2"),
                                 block=d.extra.get("block") or (self.block_of(info.name) if self.block_of else None)))
        return out

    def plan(self, infos: Sequence[LayerInfo]) -> BudgetPlan:
        md_reserve = dict(self.options.metadata)
        options = BudgetOptions(
            weighting=self.options.weighting, full_diff=self.options.full_diff, dtype=self.options.dtype,
            metadata=md_reserve, metadata_slack=int(self.options.metadata_slack) + int(self.metadata_reserve),
            reserved_bytes=self.options.reserved_bytes,
        )
        return plan_budget(self.policy.rule, self.policy, infos, options)

    def select(self, layers: Sequence) -> list:
        from .pipeline import RankDecision

        infos = self.infos(layers)
        plan = self.plan(infos)
        self._record[:] = [plan, tuple(infos)]
        decisions = []
        for d, a in zip(layers, plan.allocation.layers):
            if a.storage is Storage.DIFF:
                decisions.append(RankDecision(max(1, int(d.info.limit)), full=True))
            else:
                decisions.append(RankDecision(max(1, a.rank)))
        return decisions

    @property
    def last_plan(self) -> BudgetPlan | None:
        return self._record[0] if self._record else None

    @property
    def last_infos(self) -> tuple[LayerInfo, ...]:
        return self._record[1] if self._record else ()

    def describe(self) -> str:
        """The last allocation as text (:func:`describe_plan`); '' before any selection."""
        plan = self.last_plan
        return "" if plan is None else describe_plan(plan, self.last_infos)


def budget_notes(selector) -> list[str]:
    """Report notes for a selector: the allocation table of a :class:`BudgetSelector` (one note per
    line), nothing for any other."""
    if not isinstance(selector, BudgetSelector) or selector.last_plan is None:
        return []
    return selector.describe().splitlines()


def exact_part_bytes(layers: Mapping, dtype: torch.dtype | None) -> int:
    """Upper bound of the file bytes of layers stored exactly (``.diff`` / ``.diff_b`` vectors)."""
    es = 2 if dtype is None else _element_size(dtype)
    name_dtype = torch.bfloat16 if dtype is None else dtype
    total = 0
    for name, layer in layers.items():
        t = getattr(layer, "diff", None)
        if t is None:
            continue
        total += t.numel() * es + _entry_bytes(f"{name}.diff_b", tuple(t.shape), name_dtype, 12)
    return total


def carrying(selectors: Sequence, metadata: Mapping[str, str], exact_layers: Mapping | None = None) -> tuple:
    """The selectors, with every :class:`BudgetSelector` also reserving ``metadata`` (what a resize or
    merge carries from its input into the file) and the bytes of ``exact_layers`` (parts written
    exactly, outside the allocation)."""
    out = []
    for sel in selectors:
        if isinstance(sel, BudgetSelector) and (metadata or exact_layers):
            md = {**dict(metadata or {}), **dict(sel.options.metadata)}
            reserved = int(sel.options.reserved_bytes) + exact_part_bytes(exact_layers or {}, sel.options.dtype)
            opts = BudgetOptions(weighting=sel.options.weighting, full_diff=sel.options.full_diff,
                                 dtype=sel.options.dtype, metadata=md, metadata_slack=sel.options.metadata_slack,
                                 reserved_bytes=reserved)
            sel = BudgetSelector(sel.policy, opts, sel.metadata_reserve, sel.block_of, _record=sel._record)
        out.append(sel)
    return tuple(out)


def budget_selectors(policies: Sequence, options: BudgetOptions | None = None,
                     metadata_reserve: int = DEFAULT_METADATA_RESERVE,
                     block_of: Callable[[str], str | None] | None = None) -> list:
    """Policies → selectors: a global rule becomes a :class:`BudgetSelector` (with ``options``), every
    other item is returned as it is."""
    out = []
    for p in policies:
        if isinstance(p, RankPolicy) and p.rule.is_global:
            out.append(BudgetSelector(p, options or BudgetOptions(), metadata_reserve, block_of))
        else:
            out.append(p)
    return out


# ---------------------------------------------------------------------------------------------
# The dry-run table
# ---------------------------------------------------------------------------------------------


def _group_line(label: str, allocs: Sequence[LayerAllocation], fro2: Mapping[str, float]) -> str:
    ranks = [a.rank for a in allocs if a.storage is Storage.LORA]
    diffs = sum(1 for a in allocs if a.storage is Storage.DIFF)
    size = sum(a.cost for a in allocs)
    total = sum(fro2.get(a.name, 0.0) for a in allocs)
    kept = sum(a.energy for a in allocs)
    ret = kept / total if total > 0 else 1.0
    rank_part = (f"rank mean {sum(ranks) / len(ranks):6.1f} min {min(ranks):4d} max {max(ranks):4d}"
                 if ranks else "rank    –")
    return (f"  {label:<12} {len(allocs):5d} layers  {size / 1e6:9.2f} MB  {rank_part}"
            f"{f'  {diffs} diff' if diffs else ''}  retained {100 * ret:6.2f}%")


def _block_order(label: str) -> tuple:
    """BASE, IN00…, M00, OUT00…, then anything else by name."""
    head = {"BASE": 0, "IN": 1, "M": 2, "OUT": 3}
    letters = label.rstrip("0123456789")
    digits = label[len(letters):]
    return (head.get(letters, 4), int(digits) if digits else -1, label)


def describe_plan(plan: BudgetPlan, infos: Sequence[LayerInfo]) -> str:
    """The allocation as text: totals, then per kind and per block (size, mean/min/max rank, energy)."""
    alloc = plan.allocation
    by_name = alloc.by_name()
    fro2 = {i.name: float(i.spectrum.fro2) for i in infos}
    unit = "values" if plan.rule.kind is RuleKind.PARAMS else "bytes"
    total_e = sum(fro2.values())
    kept_e = sum(a.energy for a in alloc.layers)
    lines = [
        f"{plan.rule}: target {plan.target:,} {unit}, predicted {plan.predicted_bytes:,} {unit} "
        f"({100 * plan.predicted_bytes / plan.target:.2f}% of the target), {len(alloc.layers)} layers",
        f"  objective ({plan.weighting.value}) {alloc.objective:.6g}, gap to the optimum ≤ {alloc.gap_bound:.3g}; "
        f"retained ‖ΔW‖² {100 * (kept_e / total_e if total_e > 0 else 1.0):.2f}%",
        "  per kind:",
    ]
    groups: dict[str, list[LayerAllocation]] = {}
    blocks: dict[str, list[LayerAllocation]] = {}
    for info in infos:
        a = by_name[info.name]
        kind = ("te " if info.is_text_encoder else "") + info.kind.value
        groups.setdefault(kind, []).append(a)
        blocks.setdefault(info.block or "–", []).append(a)
    lines.extend(_group_line(k, v, fro2) for k, v in groups.items())
    if set(blocks) != {"–"}:
        lines.append("  per block:")
        lines.extend(_group_line(k, blocks[k], fro2) for k in sorted(blocks, key=_block_order))
    return "\n".join(lines)

"""Merge LoRAs with signed ratios: exact concatenation, or an exact SVD re-compression.

For inputs i with ratio wᵢ, block multiplier bᵢ (per layer, from ``block_weights``) and layer scale
sᵢ = alphaᵢ/rankᵢ, the merged delta of a layer is

    ΔW = Σᵢ cᵢ · Bᵢ Aᵢ,     cᵢ = wᵢ · bᵢ · sᵢ          (Bᵢ = up, Aᵢ = down, 2-D)

Modes (:class:`MergeMode`):

* ``concat`` (exact). ``up = [c₁B₁ … c_L B_L]``, ``down = [A₁; …; A_L]``, ``alpha = R = Σ rankᵢ``
  (scale 1): the coefficient, sign included, goes on ``up`` only, so ΔW is reproduced to fp32
  round-off and the ranks add up. kohya's ``merge_lora.py --concat`` gets this wrong twice: it puts
  |√(αᵢ/α₁)·wᵢ| on up and √(αᵢ/α₁)·wᵢ on down (so the product is wᵢ·|wᵢ|, the ratio "squared"), and
  it keeps ``alpha = α₁`` while the rank becomes R, so its effective delta is
  Σᵢ wᵢ|wᵢ|·αᵢ/R·BᵢAᵢ instead of Σᵢ wᵢ·αᵢ/rᵢ·BᵢAᵢ. On a random example (two rank-16 LoRAs with
  alpha 8 on a 320×320 layer, ratios 1 and −0.5; ``tests/test_merge.py::kohya_concat_error``) its
  relative error ‖ΔW_kohya − ΔW‖/‖ΔW‖ is 0.56 (0.50 with ratios (1, 1), because alpha/R halves
  the scale); ours is ≤ 1e-7.
* ``svd`` (exact re-compression to a :class:`RankPolicy`). The stacked factors above go through
  the QR trick (:func:`svd.decompose_factored`), so ΔW is never formed and every singular value of
  the sum is exact: the truncation error is the Eckart–Young optimum of the dense sum, and every
  rank rule (``sv_cumulative`` included) decides on the complete spectrum. When the stacked rank
  reaches the short side, ``decompose_factored`` switches to a dense thin SVD itself. If any input
  layer is dense (LoHa/LoKr/full diff), that layer's ΔW is summed densely and decomposed exactly.
  Output alpha = k (scale 1), singular values on ``up``.

Other rules:

* A layer present in only some inputs is merged anyway (the others contribute 0); the report
  names such layers and which inputs lack them.
* Inputs with ratio 0 are skipped without reading their tensors.
* A layer whose merged ΔW cancels to zero (e.g. merging A with −A) is dropped and reported as
  ``empty``. "Zero" means ‖ΔW‖ ≤ 1e-5 · Σᵢ‖cᵢBᵢAᵢ‖, measured with 8 seeded Gaussian probes
  (‖ΔW G‖, no dense ΔW). If every layer cancels, the returned LoRA has no layers and the report
  says so; :func:`io.save_lora` refuses to write an empty LoRA.
* Concat with a dense input layer keeps that layer dense (a :class:`DiffLayer` holding the exact
  sum); the report notes it.
* Architectures must agree: ``Lora.arch`` (or, when unset, :func:`archs.detect_lora_arch`) of every
  contributing input, and each shared layer's weight shape; otherwise :class:`MismatchError` names
  the inputs.
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from .archs import detect_lora_arch, key_table
from .blocks import block_labels, block_weight, parse_block_weights
from .errors import MismatchError, RankwiseError
from .metadata import build_metadata
from .finite import raise_non_finite
from .budget import budget_notes, carrying
from .pipeline import (
    Decomposed, LayerFilter, RankDecision, RankPhase, RankSelector, iter_layers, layer_stat, selectors_of,
    skipped_stat,
)
from .progress import ProgressFn
from .rank import RankPolicy
from .report import LayerStat, Report
from .resize import decompose_dense, decompose_lowrank, layer_non_finite, layer_output, to_layer
from .types import Arch, DiffLayer, LayerDelta, LayerKind, LayerStatus, Lora, LoraLayer, SkipReason, as_matrix

Tensor = torch.Tensor

__all__ = ["MergeInput", "MergeMode", "merge", "merge_sweep", "merge_layer_terms", "parse_block_weights", "EMPTY_RTOL"]

EMPTY_RTOL = 1e-5  # a merged layer with ‖ΔW‖ ≤ EMPTY_RTOL · Σ‖termᵢ‖ counts as cancelled
_PROBES = 8
_PROBE_SEED = 20240601


class MergeMode(str, enum.Enum):
    CONCAT = "concat"  # exact: ranks add up
    SVD = "svd"  # exact re-compression to a RankPolicy


@dataclass(frozen=True)
class MergeInput:
    """One LoRA to merge: ΔW contributes ``ratio`` · ``block_weights[block]`` · ΔW_lora.

    ``block_weights`` maps block labels (``BASE``, ``IN00``…, ``M00``, ``OUT00``…; see
    :mod:`blocks`) to multipliers; blocks not listed keep 1.
    """

    lora: Lora
    ratio: float
    name: str = ""
    block_weights: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(float(self.ratio)):
            raise ValueError(f"merge ratio of {self.name or 'an input'} must be finite, got {self.ratio}")
        if self.block_weights is not None:
            for block, value in self.block_weights.items():
                if not math.isfinite(float(value)):
                    raise ValueError(f"block weight {block} of {self.name or 'an input'} is not finite")


@dataclass(frozen=True)
class _Term:
    index: int  # which input
    coeff: float  # ratio · block weight (alpha/rank applied separately for LoRA layers)
    layer: LayerDelta

    @property
    def rank(self) -> int:
        return self.layer.rank

    def dense(self) -> Tensor:
        """c·ΔW as a 2-D fp32 matrix (alpha/rank applied)."""
        return as_matrix(self.layer.delta()) * self.coeff


def _label(inp: MergeInput, i: int) -> str:
    return inp.name or f"input {i + 1}"


def _check_archs(inputs: Sequence[MergeInput], active: Sequence[int]) -> Arch | None:
    explicit = [inputs[i].lora.arch for i in active if inputs[i].lora.arch is not None]
    family = next((a for a in explicit if a in (Arch.SD1, Arch.SD2)), Arch.SD1)
    archs: dict[int, Arch] = {}
    for i in active:
        lora = inputs[i].lora
        arch = lora.arch if lora.arch is not None else detect_lora_arch(lora.layers, sd_family=family)
        if arch is not None:
            archs[i] = arch
    if len(set(archs.values())) > 1:
        listing = ", ".join(f"{_label(inputs[i], i)}: {a.value}" for i, a in archs.items())
        raise MismatchError(f"the LoRAs to merge are for different architectures ({listing}); merge only "
                            f"LoRAs trained for the same base model family")
    return next(iter(archs.values()), None)


def _check_shapes(name: str, terms: Sequence[_Term], inputs: Sequence[MergeInput]) -> None:
    shapes = {t.index: t.layer.weight_shape for t in terms}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{_label(inputs[i], i)}: {tuple(s)}" for i, s in shapes.items())
        raise MismatchError(f"layer {name} has different weight shapes in the inputs ({listing}); "
                            f"these LoRAs are for different models")


def _stack(terms: Sequence[_Term]) -> tuple[Tensor, Tensor]:
    """The stacked 2-D fp32 factors ``[c₁s₁B₁ … c_L s_L B_L]`` (m × R) and ``[A₁; …; A_L]`` (R × n)."""
    ups, downs = [], []
    for t in terms:
        layer = t.layer
        assert isinstance(layer, LoraLayer)
        ups.append(layer.up_matrix() * (t.coeff * layer.scale))
        downs.append(layer.down_matrix())
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def _probe(n: int, seed: int) -> Tensor:
    return torch.randn(n, _PROBES, generator=torch.Generator().manual_seed(seed))


def _norms_factored(up: Tensor, down: Tensor, ranks: Sequence[int], seed: int) -> tuple[float, float]:
    """(‖Σ termᵢ‖_F, Σ‖termᵢ‖_F) of stacked factors, estimated with seeded Gaussian probes."""
    z = down @ _probe(int(down.shape[1]), seed)
    parts, start = 0.0, 0
    for r in ranks:
        parts += float((up[:, start : start + r] @ z[start : start + r]).norm())
        start += r
    return float((up @ z).norm()) / math.sqrt(_PROBES), parts / math.sqrt(_PROBES)


def _norms_dense(deltas: Sequence[Tensor], total: Tensor, seed: int) -> tuple[float, float]:
    probe = _probe(int(total.shape[1]), seed)
    parts = sum(float((d @ probe).norm()) for d in deltas)
    return float((total @ probe).norm()) / math.sqrt(_PROBES), parts / math.sqrt(_PROBES)


def _output_dtype(inputs: Sequence[MergeInput], active: Sequence[int]) -> torch.dtype:
    dtypes = []
    for i in active:
        for layer in inputs[i].lora.layers.values():
            dtypes.append(layer.diff.dtype if isinstance(layer, DiffLayer) else layer.up.dtype)
            break
    return functools.reduce(torch.promote_types, dtypes) if dtypes else torch.float32


def _layer_names(inputs: Sequence[MergeInput], active: Sequence[int]) -> list[str]:
    seen: dict[str, None] = {}
    for i in active:
        seen.update(dict.fromkeys(inputs[i].lora.layers))
    return list(seen)


def _block_lookup(
    arch: Arch | None, inputs: Sequence[MergeInput], active: Sequence[int]
) -> Callable[[str], str | None] | None:
    """name → block label (None if unknown), or None when no input has block weights."""
    if not any(inputs[i].block_weights for i in active):
        return None
    if arch is None:
        raise RankwiseError("per-block weights need a known architecture, but none of the inputs was "
                            "recognised as SD1/SD2/SDXL; drop the block weights")
    valid = set(block_labels(arch))
    for i in active:
        unknown = sorted(set(inputs[i].block_weights or ()) - valid)
        if unknown:
            raise RankwiseError(f"block weights of {_label(inputs[i], i)} name unknown block(s) {', '.join(unknown)}; "
                                f"{arch.value} blocks are {', '.join(block_labels(arch))}")
    table = key_table(arch)

    def lookup(name: str) -> str | None:
        spec = table.by_lora_name(name)
        return spec.block if spec is not None else None

    return lookup


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def merge_layer_terms(
    name: str, job: "_Job", *, mode: MergeMode, selectors: Sequence[RankSelector], dtype: torch.dtype,
) -> Decomposed | tuple[LayerDelta, LayerStat] | LayerStat:
    """Phase 1 of a merge for one layer (at least one term).

    Returns the stat of a layer that cancels, the finished ``(layer, stat)`` of a concat, or, in
    SVD mode, the exact decomposition of the summed ΔW for the rank phase. All-LoRA terms stay
    factored (stacked factors); any dense term makes the layer dense.
    """
    shape, terms = job.shape, job.terms
    if LayerKind.of_shape(shape) is LayerKind.VECTOR:  # exact parts (.diff / .diff_b): summed exactly
        total = functools.reduce(torch.add, [t.layer.delta() * t.coeff for t in terms])
        part: LayerDelta = type(terms[0].layer)(total.to(dtype).contiguous())
        return part, LayerStat(
            name=name, kind=LayerKind.VECTOR, shape=tuple(shape), rank=part.rank, input_rank=None, retained=1.0,
            norm=float(total.norm()), nbytes=part.nbytes(), status=LayerStatus.OK,
            note=_join(job.note, "exact part: summed"), missing_in=job.missing_in,
        )
    in_rank = sum(t.rank for t in terms)
    dense = not all(isinstance(t.layer, LoraLayer) for t in terms)
    if dense:
        deltas = [t.dense() for t in terms]
        total = functools.reduce(torch.add, deltas)
        merged_norm, parts_norm = _norms_dense(deltas, total, job.seed)
        del deltas
    else:
        up, down = _stack(terms)
        merged_norm, parts_norm = _norms_factored(up, down, [t.rank for t in terms], job.seed)
    if merged_norm <= EMPTY_RTOL * parts_norm:
        return skipped_stat(name, shape, SkipReason.EMPTY, input_rank=in_rank, missing_in=job.missing_in,
                            note=_join("empty: the inputs cancel", job.note), dense_input=dense)
    if mode is MergeMode.CONCAT:
        if dense:
            layer: LayerDelta = DiffLayer(total.reshape(shape).to(dtype).contiguous())
            rank = int(min(total.shape))
        else:
            layer, rank = to_layer(up, down, float(in_rank), shape, dtype), in_rank
        stat = LayerStat(
            name=name, kind=LayerKind.of_shape(shape), shape=tuple(shape), rank=rank,
            input_rank=in_rank, retained=1.0, error=0.0, optimal_error=0.0, norm=merged_norm,
            nbytes=layer.nbytes(), status=LayerStatus.OK,
            note=_join(job.note, "dense input: kept as a full diff" if dense else ""),
            missing_in=job.missing_in, dense_input=dense,
        )
        return layer, stat
    if dense:
        d = decompose_dense(name, shape, total, selectors, dtype)
    else:
        d = decompose_lowrank(name, shape, up, down, selectors, dtype)
    d.extra.update(input_rank=in_rank, dense=dense, job=job, dtype=dtype)  # dtype: RankPhase's hold dtype
    return d


def _notes(inputs: Sequence[MergeInput], active: Sequence[int], stats: Sequence[LayerStat],
           arch: Arch | None, unlabelled: int, mode: MergeMode, empty_result: bool) -> list[str]:
    notes: list[str] = []
    not_read = [_label(inp, i) for i, inp in enumerate(inputs) if i not in active]
    if not_read:
        notes.append(f"ratio 0, not read: {', '.join(not_read)}")
    partial = [s.name for s in stats if s.missing_in and s.skip is not SkipReason.FILTERED]
    if partial:
        notes.append(f"{len(partial)} layer(s) missing from some inputs, merged with 0 for the missing "
                     f"ones (e.g. {partial[0]})")
    empty = [s.name for s in stats if s.skip is SkipReason.EMPTY]
    if empty:
        notes.append(f"{len(empty)} layer(s) empty after merging (cancelled or weight 0), dropped "
                     f"(e.g. {empty[0]})")
    filtered = sum(s.skip is SkipReason.FILTERED for s in stats)
    if filtered:
        notes.append(f"{filtered} layer(s) left out by the include/exclude filters")
    if unlabelled and arch is not None:
        notes.append(f"{unlabelled} layer(s) have no block label in the {arch.value} key table; block weight 1")
    dense = sum(s.dense_input for s in stats if s.status is not LayerStatus.SKIPPED)
    if dense:
        how = "kept as a full diff (concat is exact)" if mode is MergeMode.CONCAT else "summed densely"
        notes.append(f"{dense} layer(s) with a dense (LoHa/LoKr/full) input {how}")
    fallbacks = [s.name for s in stats if s.fallback]
    if fallbacks:
        notes.append(f"{len(fallbacks)} layer(s) needed an SVD fallback (e.g. {fallbacks[0]})")
    if mode is MergeMode.CONCAT:
        notes.append("concat: layer norms are probe estimates (ΔW is never formed)")
    if empty_result:
        notes.append("the merged LoRA is EMPTY: every layer cancelled, was filtered or had weight 0; "
                     "there is nothing to save")
    return notes


@dataclass(frozen=True)
class _Job:
    """One layer to merge: its shape, terms, the inputs that lack it, a note, the probe seed."""

    shape: tuple[int, ...]
    terms: list[_Term]
    missing_in: tuple[str, ...]
    note: str
    seed: int


def _plan(
    inputs: Sequence[MergeInput],
    active: Sequence[int],
    names: Sequence[str],
    blocks: Callable[[str], str | None] | None,
    flt: LayerFilter,
) -> tuple[dict[str, _Job | LayerStat], int]:
    """Per layer: (shape, terms, note, probe seed) to merge, or the stat of a layer left out;
    plus the count of layers without a block label. Checks shapes (cheap, before any SVD)."""
    jobs: dict[str, _Job | LayerStat] = {}
    unlabelled = 0
    for index, name in enumerate(names):
        present = [i for i in active if name in inputs[i].lora.layers]
        shape = inputs[present[0]].lora.layers[name].weight_shape
        if not flt.selects(name):
            jobs[name] = skipped_stat(name, shape, SkipReason.FILTERED, note="filtered out")
            continue
        missing = tuple(_label(inputs[i], i) for i in active if i not in present)
        note = f"missing in {', '.join(missing)} (taken as 0)" if missing else ""
        block = blocks(name) if blocks is not None else None
        unlabelled += blocks is not None and block is None
        terms = [
            _Term(i, coeff, inputs[i].lora.layers[name])
            for i in present
            if (coeff := float(inputs[i].ratio) * block_weight(inputs[i].block_weights, block)) != 0.0
        ]
        _check_shapes(name, terms, inputs)
        if terms:
            jobs[name] = _Job(shape, terms, missing, note, _PROBE_SEED + index)
        else:
            jobs[name] = skipped_stat(name, shape, SkipReason.EMPTY, input_rank=0, missing_in=missing,
                                      note=_join("empty: block weight 0", note))
    return jobs, unlabelled


def _describe(inputs: Sequence[MergeInput], active: Sequence[int], mode: MergeMode, rule_label: str | None,
              flt: LayerFilter) -> tuple[dict[str, str], str]:
    """(rankwise.params entries, ss_training_comment) of a merge."""
    ratios = ", ".join(f"{_label(inp, i)}×{float(inp.ratio):g}" for i, inp in enumerate(inputs))
    params = {"mode": mode.value, "ratios": ratios}
    rule = rule_label if rule_label is not None and mode is MergeMode.SVD else ""
    if rule:
        params["rule"] = rule
    params.update(flt.params())
    blocked = [f"{_label(inputs[i], i)}[{','.join(f'{k}:{v:g}' for k, v in inputs[i].block_weights.items())}]"
               for i in active if inputs[i].block_weights]
    if blocked:
        params["block_weights"] = "; ".join(blocked)
    comment = f"rankwise merge ({mode.value}{', ' + rule if rule else ''}): {ratios}"
    return params, comment


@torch.no_grad()
def merge(
    inputs: Sequence[MergeInput],
    *,
    mode: MergeMode,
    policy: RankPolicy | None = None,
    progress: ProgressFn | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    dtype: torch.dtype | None = None,
    workers: int = 1,
    layer_filter: LayerFilter | None = None,
) -> tuple[Lora, Report]:
    """Merge LoRAs: ΔW = Σᵢ ratioᵢ · block_weightᵢ(layer) · ΔWᵢ, layer by layer.

    Args:
        inputs: the LoRAs with their signed ratios, names (for the report and metadata) and
            optional per-block multipliers.
        mode: ``CONCAT`` (exact, ranks add up) or ``SVD`` (exact re-compression to ``policy``).
        policy: the rank rule for ``SVD`` (``conv_rank``/``te_rank`` apply); unused for ``CONCAT``.
        progress: called after each layer as ``progress(done, total, name)``; may raise to cancel.
        include, exclude: layer patterns with the :class:`~.pipeline.LayerFilter` semantics (a glob,
            or a substring when the pattern has no ``*?[``); or pass ``layer_filter``.
        dtype: output dtype; None promotes the inputs' dtypes (fp16 + fp16 → fp16).
        workers: layers merged concurrently, each with one torch thread (:func:`pipeline.iter_layers`);
            2 on a 2-core machine. The result is the same up to float round-off.

    Returns:
        (merged LoRA, per-layer report). Cancelled layers are dropped and reported; the LoRA may be
        empty when everything cancels (see the module docstring).

    Raises:
        RankwiseError: no inputs, every ratio 0, SVD mode without a policy, block weights without a
            known architecture.
        MismatchError: inputs for different architectures or with different layer shapes.
        NonFiniteError: NaN/Inf in a contributing input (names every such layer and its inputs;
            checked layer by layer during the pass, so raised after it).
    """
    mode = MergeMode(mode)
    if not inputs:
        raise RankwiseError("nothing to merge: no input LoRAs")
    if mode is MergeMode.SVD and policy is None:
        raise RankwiseError("SVD merge needs a rank policy (e.g. RankPolicy(RankRule.parse('64'))); "
                            "use mode=concat for an exact merge without one")
    policies = [policy] if mode is MergeMode.SVD else []
    return merge_sweep(inputs, policies, mode=mode, progress=progress, include=include, exclude=exclude,
                       dtype=dtype, workers=workers, layer_filter=layer_filter)[0]


@torch.no_grad()
def merge_sweep(
    inputs: Sequence[MergeInput],
    policies: Sequence[RankPolicy | RankSelector],
    *,
    mode: MergeMode = MergeMode.SVD,
    progress: ProgressFn | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    dtype: torch.dtype | None = None,
    workers: int = 1,
    layer_filter: LayerFilter | None = None,
) -> list[tuple[Lora, Report]]:
    """One merged LoRA per policy from a single pass (SVD mode: each summed layer is decomposed
    once); CONCAT ignores ``policies`` and returns one LoRA. See :func:`merge`."""
    mode = MergeMode(mode)
    if not inputs:
        raise RankwiseError("nothing to merge: no input LoRAs")
    if mode is MergeMode.SVD and not policies:
        raise RankwiseError("SVD merge needs a rank policy (e.g. RankPolicy(RankRule.parse('64'))); "
                            "use mode=concat for an exact merge without one")
    active = [i for i, inp in enumerate(inputs) if float(inp.ratio) != 0.0]
    if not active:
        raise RankwiseError("every merge ratio is 0: nothing to merge")
    flt = layer_filter if layer_filter is not None else LayerFilter(tuple(include), tuple(exclude))
    arch = _check_archs(inputs, active)
    blocks = _block_lookup(arch, inputs, active)
    out_dtype = dtype or _output_dtype(inputs, active)

    names = _layer_names(inputs, active)
    jobs, unlabelled = _plan(inputs, active, names, blocks, flt)
    exact = {n: l for i in active for n, l in inputs[i].lora.layers.items() if l.kind is LayerKind.VECTOR}
    selectors = (carrying(selectors_of(policies), inputs[active[0]].lora.metadata, exact)  # a size budget
                 if mode is MergeMode.SVD else ())  # reserves the carried metadata and the exact parts
    n_out = max(1, len(selectors))
    outs: list[dict[str, LayerDelta]] = [{} for _ in range(n_out)]
    stats: list[list[LayerStat]] = [[] for _ in range(n_out)]

    def run(name: str):
        job = jobs.pop(name)  # drop the references as we go
        if isinstance(job, LayerStat):
            return job
        bad = [_label(inputs[t.index], t.index) for t in job.terms if layer_non_finite(t.layer)]
        if bad:
            return skipped_stat(name, job.shape, SkipReason.NON_FINITE, note=f"NaN/Inf in {', '.join(bad)}",
                                non_finite=tuple(bad))
        return merge_layer_terms(name, job, mode=mode, selectors=selectors, dtype=out_dtype)

    def emit(d: Decomposed, decisions: Sequence[RankDecision]) -> None:
        x = d.extra
        job: _Job = x["job"]
        for out, st, decision in zip(outs, stats, decisions):
            layer = layer_output(d, decision, scale=1.0, dtype=out_dtype)
            out[d.info.name] = layer
            st.append(layer_stat(d, decision, layer, input_rank=x["input_rank"], missing_in=job.missing_in,
                                 dense_input=x["dense"],
                                 note=_join(job.note, "dense input: summed densely" if x["dense"] else "")))

    def on_skip(item) -> None:
        stat, layer = (item, None) if isinstance(item, LayerStat) else (item[1], item[0])
        for out, st in zip(outs, stats):
            st.append(stat)
            if layer is not None:
                out[stat.name] = layer

    phase = RankPhase(selectors, emit, on_skip) if selectors else None
    for result in iter_layers(run, names, workers=workers, progress=progress):
        if isinstance(result, Decomposed):
            phase.add(result)
        elif phase is not None:
            phase.skip(result)
        else:
            on_skip(result)
    if phase is not None:
        phase.finish()
    bad = [s for s in stats[0] if s.non_finite]
    raise_non_finite([s.name for s in bad], "the merge input",
                     shown_as=[f"{s.name} in {', '.join(s.non_finite)}" for s in bad])

    labels = [_label(inputs[i], i) for i in active]
    first = inputs[active[0]].lora
    results = []
    for i in range(n_out):
        rule_label = selectors[i].label if selectors else None
        layers = outs[i]
        notes = _notes(inputs, active, stats[i], arch, unlabelled, mode, empty_result=not layers)
        notes = budget_notes(selectors[i]) + list(notes) if selectors else notes
        params, comment = _describe(inputs, active, mode, rule_label, flt)
        out = Lora(layers=layers, metadata={}, arch=arch)
        metadata = build_metadata(
            out,
            title=f"merge of {', '.join(labels)}",
            method=f"merge-{mode.value}",
            params=params,
            merged_from=tuple(labels),
            carry=first.metadata,
            comment=comment,
        )
        report = Report(f"merge ({mode.value})", tuple(stats[i]), tuple(notes), params)
        results.append((out.replace(metadata=metadata), report))
    return results

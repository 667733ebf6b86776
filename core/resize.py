"""Resize a LoRA to a fixed or dynamic rank, exactly, without forming ΔW.

Every layer is re-factorised from its own factors (the QR trick in :func:`svd.decompose_factored`):
for ΔW = s·B·A (s = strength·alpha/r, B = up m×r, A = down r×n) the thin QRs of B and Aᵀ reduce the
SVD to an r×r core, so all r nonzero singular values of ΔW are known exactly at O((m+n)r²) cost.
Every rank rule (``sv_cumulative`` included) therefore decides on the complete spectrum, and the
truncation error equals the Eckart–Young optimum (the report's "error vs optimum" is 1 up to
round-off).

Layer types:

* :class:`LoraLayer` (LoRA, LoCon): ``down_matrix()`` folds a Tucker ``mid``, so a LoCon/CP layer
  comes out as a plain LoRA (down ``(k, in, kh, kw)``, up ``(out, k, 1, 1)``).
* :class:`DiffLayer` (LoHa/LoKr/full ``diff``, densified by the readers): dense exact
  decomposition (:func:`svd.decompose`) of the matrix; the output is a plain LoRA.

Alpha convention (kohya's, and DESIGN.md's): a resized LoRA layer keeps its **alpha/rank ratio**,
``new_alpha = old_alpha / old_rank · k``, and the singular values are divided by that scale before
they go onto ``up``, so ΔW_out = (new_alpha/k)·up'·down' equals the truncated ΔW exactly. A dense
input (no alpha) gets ``alpha = k`` (scale 1). ``strength`` multiplies ΔW and is folded into the
weights (it never lands in alpha).

Ranks: a fixed rank above a layer's rank limit is capped at min(out, in·kh·kw, input rank) and the
cap is reported per layer (``LayerStat.capped``; kohya's ``resize_lora.py`` raises IndexError
here). A layer whose ΔW is exactly zero (alpha 0, zero factors) is dropped and reported as skipped.

Sweeps: :func:`resize_sweep` decomposes every layer once and gives one LoRA per rule (the loop,
progress and rank phase are :mod:`.pipeline`'s). The per-layer math is :func:`decompose_layer`
(factors → decomposition) and :func:`layer_output` (decomposition + rank → factors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import torch

from .errors import RankwiseError
from .finite import non_finite_parts, raise_non_finite
from .metadata import build_metadata
from .budget import budget_notes, carrying
from .pipeline import (
    Decomposed, LayerInfo, PolicySelector, RankDecision, RankPhase, RankSelector, iter_layers, is_text_encoder,
    layer_stat, run_layers, selectors_of, skipped_stat, storage_bytes_per_rank, triplets_needed,
)
from .progress import ProgressFn
from .rank import RankPolicy, Spectrum
from .report import LayerStat, Report
from .svd import Decomposition, SvdMethod, decompose, decompose_factored, split_factors
from .types import DiffLayer, LayerDelta, LayerKind, Lora, LoraLayer, SkipReason, as_matrix, factors_to_layer_shapes

Tensor = torch.Tensor

__all__ = [
    "resize", "resize_sweep", "decompose_layer", "decompose_lowrank", "decompose_dense", "layer_output",
    "refactor_factors", "refactor_dense", "to_layer", "is_text_encoder", "layer_is_finite", "raise_non_finite",
    "run_layers",  # moved to pipeline; re-exported for old callers
]


def layer_is_finite(layer: LayerDelta) -> bool:
    """No NaN/Inf in any of the layer's tensors."""
    return not layer_non_finite(layer)


def layer_non_finite(layer: LayerDelta) -> tuple[str, ...]:
    """The parts of a layer (``up``, ``down``, ``mid``, ``diff``) that hold NaN/Inf."""
    if isinstance(layer, DiffLayer):
        return non_finite_parts([("diff", layer.diff)])
    return non_finite_parts([("up", layer.up), ("down", layer.down), ("mid", layer.mid)])


# ---------------------------------------------------------------------------------------------
# Per-layer math: pure functions
# ---------------------------------------------------------------------------------------------


def _info(name: str, shape: tuple[int, ...], limit: int, dtype: torch.dtype) -> LayerInfo:
    return LayerInfo(name=name, kind=LayerKind.of_shape(shape), shape=tuple(shape), is_text_encoder=is_text_encoder(name),
                     limit=max(1, int(limit)), bytes_per_rank=storage_bytes_per_rank(shape, dtype))


def decompose_lowrank(
    name: str, shape: tuple[int, ...], up: Tensor, down: Tensor, selectors: Sequence[RankSelector],
    dtype: torch.dtype,
) -> Decomposed:
    """ΔW = up @ down (2-D, scale folded into ``up``) → its exact decomposition (QR trick).

    The product has rank ≤ R = up.shape[1], so the limit is min(out, in·kh·kw, R): a larger fixed
    rank would only add zero columns. Only the triplets the selectors can use are kept.
    """
    limit = max(1, min(int(up.shape[0]), int(down.shape[1]), int(up.shape[1])))
    info = _info(name, shape, limit, dtype)
    wants = [s.needed(info) for s in selectors]
    wanted = None if any(w is None for w in wants) else max(wants)  # a fixed rank: just those triplets
    dec = decompose_factored(up, down, k=wanted)
    return Decomposed(info, dec, exact_beyond_limit=True)


def decompose_dense(
    name: str, shape: tuple[int, ...], delta: Tensor, selectors: Sequence[RankSelector], dtype: torch.dtype,
) -> Decomposed:
    """Exact decomposition of a dense 2-D ΔW; the complete spectrum decides every rule exactly."""
    p = int(min(delta.shape))
    info = _info(name, shape, p, dtype)
    wants = [s.needed(info) for s in selectors]
    first = max([w for w in wants if w is not None] or [min(p, 64)])
    layer = Decomposed(info, decompose(delta, first, method=SvdMethod.EXACT, full_spectrum=True), exact_beyond_limit=False)
    k = triplets_needed(selectors, layer)
    if k > layer.dec.rank:
        layer = Decomposed(info, decompose(delta, k, method=SvdMethod.EXACT, full_spectrum=True))
    return layer


def layer_output(layer: Decomposed, decision: RankDecision, *, scale: float, dtype: torch.dtype) -> LoraLayer:
    """The rank-k plain LoRA layer: alpha/rank kept (``alpha = scale·k``), ΔW_k = scale·up·down."""
    k = decision.rank
    up, down = split_factors(layer.dec, k)
    if decision.full:  # a size budget chose the exact full difference (.diff)
        return DiffLayer((up @ down).reshape(layer.info.shape).to(dtype).contiguous())
    return to_layer(up / scale, down, scale * k, layer.info.shape, dtype)


def to_layer(
    up: Tensor, down: Tensor, alpha: float, weight_shape: tuple[int, ...], dtype: torch.dtype
) -> LoraLayer:
    """Wrap 2-D factors as a plain LoRA layer in the weight's layout and ``dtype``."""
    u, d = factors_to_layer_shapes(up.contiguous(), down.contiguous(), tuple(weight_shape))
    return LoraLayer(up=u.to(dtype).contiguous(), down=d.to(dtype).contiguous(), alpha=float(alpha))


@dataclass(frozen=True)
class Refactored:
    """One layer re-factorised at rank k: ΔW_k = up @ down (2-D fp32, S folded into ``up``)."""

    up: Tensor
    down: Tensor
    dec: Decomposition
    rank: int
    limit: int
    capped: bool = False

    @property
    def spectrum(self) -> Spectrum:
        return self.dec.spectrum


def _single(layer: Decomposed, policy: RankPolicy) -> Refactored:
    decision = PolicySelector(policy).decide(layer)
    up, down = split_factors(layer.dec, decision.rank)
    return Refactored(up, down, layer.dec, decision.rank, layer.info.limit, decision.capped)


def refactor_factors(up: Tensor, down: Tensor, policy: RankPolicy, kind: LayerKind, is_te: bool) -> Refactored:
    """One rule on ΔW = up @ down (2-D, scale in ``up``): :func:`decompose_lowrank` + the rank."""
    shape = (int(up.shape[0]), int(down.shape[1])) if kind is not LayerKind.CONV else (int(up.shape[0]), int(down.shape[1]), 1, 1)
    name = "lora_te_layer" if is_te else "lora_unet_layer"
    return _single(decompose_lowrank(name, shape, up, down, [PolicySelector(policy)], torch.float32), policy)


def refactor_dense(delta: Tensor, policy: RankPolicy, kind: LayerKind, is_te: bool) -> Refactored:
    """One rule on a dense 2-D ΔW: :func:`decompose_dense` + the rank."""
    shape = tuple(int(x) for x in delta.shape)
    name = "lora_te_layer" if is_te else "lora_unet_layer"
    return _single(decompose_dense(name, shape, delta.float(), [PolicySelector(policy)], torch.float32), policy)


_Phase1 = Union[Decomposed, LayerStat]


def decompose_layer(
    name: str, layer: LayerDelta, selectors: Sequence[RankSelector], strength: float, dtype: torch.dtype | None
) -> _Phase1:
    """Phase 1 of resize for one layer: its decomposition, or the stat of a layer not written.

    ``extra`` carries what phase 2 needs: ``scale`` (the alpha/rank kept), ``dtype``, ``mid``/``dense``.
    """
    shape = layer.weight_shape
    bad = layer_non_finite(layer)
    if bad:
        return skipped_stat(name, shape, SkipReason.NON_FINITE, note=f"NaN/Inf in {', '.join(bad)}", non_finite=bad)
    if isinstance(layer, DiffLayer):
        delta = as_matrix(layer.delta()) * strength
        if not bool(delta.any()):
            return skipped_stat(name, shape, SkipReason.EMPTY, note="empty: ΔW is zero", dense_input=True)
        out_dtype = dtype or layer.diff.dtype
        d = decompose_dense(name, shape, delta, selectors, out_dtype)
        d.extra.update(scale=1.0, dtype=out_dtype, dense=True)
        return d
    scale = layer.scale
    if scale == 0.0:
        return skipped_stat(name, shape, SkipReason.EMPTY, input_rank=layer.rank, note="empty: alpha is 0")
    up = layer.up_matrix() * (strength * scale)
    out_dtype = dtype or layer.up.dtype
    d = decompose_lowrank(name, shape, up, layer.down_matrix(), selectors, out_dtype)
    if d.spectrum.fro2 <= 0.0:
        return skipped_stat(name, shape, SkipReason.EMPTY, input_rank=layer.rank, note="empty: ΔW is zero")
    d.extra.update(scale=scale, dtype=out_dtype, input_rank=layer.rank, mid=layer.mid is not None)
    return d


# ---------------------------------------------------------------------------------------------
# The operation
# ---------------------------------------------------------------------------------------------


def _dim_text(ranks: Mapping[str, int]) -> str:
    values = set(ranks.values())
    if not values:
        return "0"
    return str(values.pop()) if len(values) == 1 else "Dynamic"


@torch.no_grad()
def resize(
    lora: Lora,
    policy: RankPolicy,
    *,
    strength: float = 1.0,
    progress: ProgressFn | None = None,
    dtype: torch.dtype | None = None,
    workers: int = 1,
) -> tuple[Lora, Report]:
    """Resize every layer of ``lora`` to the rank ``policy`` chooses, exactly.

    Args:
        lora: any mix of LoRA / LoCon (``mid``) / dense (LoHa, LoKr, full diff) layers.
        policy: the rank rule and per-kind caps (``conv_rank`` for 3×3 convs, ``te_rank`` for
            text-encoder layers).
        strength: multiplies every ΔW (folded into ``up``; any finite nonzero value, sign included).
        progress: called after each layer as ``progress(done, total, name)``; may raise to cancel.
        dtype: output tensor dtype; None keeps each layer's input dtype.
        workers: layers resized concurrently, each with one torch thread (:func:`pipeline.iter_layers`);
            2 on a 2-core machine. The result is the same up to float round-off.

    Returns:
        (resized LoRA, per-layer report). ΔW_out equals the rank-k truncation of strength·ΔW_in;
        output layers are plain LoRA with alpha/rank kept (dense inputs: alpha = k).

    Raises:
        NonFiniteError: NaN/Inf in input layers, all of them named (raised after the last layer).
        RankwiseError: a zero or non-finite strength, or an empty input.
    """
    return resize_sweep(lora, [policy], strength=strength, progress=progress, dtype=dtype, workers=workers)[0]


@torch.no_grad()
def resize_sweep(
    lora: Lora,
    policies: Sequence[RankPolicy | RankSelector],
    *,
    strength: float = 1.0,
    progress: ProgressFn | None = None,
    dtype: torch.dtype | None = None,
    workers: int = 1,
) -> list[tuple[Lora, Report]]:
    """One resized LoRA per policy (or :class:`~.pipeline.RankSelector`) from a single pass: each
    layer is decomposed once and every rule picks its rank from the same exact spectrum."""
    strength = float(strength)
    if not math.isfinite(strength) or strength == 0.0:
        raise RankwiseError(f"strength must be a finite nonzero number, got {strength}")
    if len(lora) == 0:
        raise RankwiseError("the input LoRA has no layers to resize")
    if not policies:
        raise ValueError("resize_sweep needs at least one rank policy")
    # a size budget reserves the carried metadata and the exact parts' bytes
    selectors = carrying(selectors_of(policies), lora.metadata, _exact_parts(lora))
    # exact parts (1-D weights, biases, parameters: .diff / .diff_b) are not low-rank: kept (_finish)
    names = [n for n in lora.layers if n not in _exact_parts(lora)]
    outs: list[dict[str, LoraLayer]] = [{} for _ in selectors]
    stats: list[list[LayerStat]] = [[] for _ in selectors]

    def emit(d: Decomposed, decisions: Sequence[RankDecision]) -> None:
        x = d.extra
        note = "LoCon mid folded" if x.get("mid") else ("dense input → LoRA" if x.get("dense") else "")
        for out, st, decision in zip(outs, stats, decisions):
            layer = layer_output(d, decision, scale=x["scale"], dtype=x["dtype"])
            out[d.info.name] = layer
            st.append(layer_stat(d, decision, layer, input_rank=x.get("input_rank"), note=note,
                                 dense_input=bool(x.get("dense"))))

    def on_skip(stat: LayerStat) -> None:
        for st in stats:
            st.append(stat)

    phase = RankPhase(selectors, emit, on_skip)
    layers = lora.layers
    for result in iter_layers(lambda n: decompose_layer(n, layers[n], selectors, strength, dtype), names,
                              workers=workers, progress=progress):
        if isinstance(result, LayerStat):
            phase.skip(result)
        else:
            phase.add(result)
    phase.finish()
    raise_non_finite([s.name for s in stats[0] if s.non_finite])
    return [_finish(lora, sel, out, st, strength) for sel, out, st in zip(selectors, outs, stats)]


def _exact_parts(lora: Lora) -> dict[str, LayerDelta]:
    """The layers stored exactly and never factorised (1-D weights, biases, other parameters)."""
    return {n: layer for n, layer in lora.layers.items() if layer.kind is LayerKind.VECTOR}


def _finish(lora: Lora, selector: RankSelector, layers: dict[str, LoraLayer], stats: list[LayerStat],
            strength: float) -> tuple[Lora, Report]:
    notes: list[str] = budget_notes(selector)
    exact = _exact_parts(lora)
    for name, layer in exact.items():
        layers[name] = layer if strength == 1.0 else type(layer)((layer.diff.float() * strength).to(layer.diff.dtype))
    capped = [s.name for s in stats if s.capped]
    if capped:
        notes.append(f"{len(capped)} layer(s) capped at their rank limit (e.g. {capped[0]})")
    if exact:
        notes.append(f"{len(exact)} exact part(s) (.diff / .diff_b) kept as they are"
                     + (f", times strength {strength:g}" if strength != 1.0 else ""))
    dense = sum(isinstance(layer, DiffLayer) and name not in exact for name, layer in lora.layers.items())
    if dense:
        notes.append(f"{dense} dense layer(s) (LoHa/LoKr/full) converted to plain LoRA")
    mids = sum(isinstance(layer, LoraLayer) and layer.mid is not None for layer in lora.layers.values())
    if mids:
        notes.append(f"{mids} LoCon/Tucker layer(s) folded to plain LoRA")
    empty = [s.name for s in stats if s.skip is SkipReason.EMPTY]
    if empty:
        notes.append(f"{len(empty)} layer(s) with a zero ΔW dropped (e.g. {empty[0]})")
    fallbacks = [s.name for s in stats if s.fallback]
    if fallbacks:
        notes.append(f"{len(fallbacks)} layer(s) needed an SVD fallback (e.g. {fallbacks[0]})")

    label = selector.label
    old_dim = lora.metadata.get("ss_network_dim") or _dim_text(lora.ranks())
    new_dim = _dim_text({n: layer.rank for n, layer in layers.items()})
    comment = f"dimension is resized from {old_dim} to {new_dim}; rankwise resize {label}"
    if strength != 1.0:
        comment += f", strength {strength:g}"
    params = {"rule": label, "strength": f"{strength:g}"}
    out = Lora(layers=layers, metadata={}, arch=lora.arch)
    metadata = build_metadata(
        out,
        title=lora.metadata.get("modelspec.title") or f"resized LoRA ({label})",
        method="resize",
        params=params,
        carry=lora.metadata,
        comment=comment,
    )
    # modelspec.* keys Rankwise does not set (author, description, license, tags, …) describe the
    # same model after a resize: keep them
    for key, value in lora.metadata.items():
        if key.startswith("modelspec.") and key not in metadata:
            metadata[key] = value
    return out.replace(metadata=metadata), Report("resize", tuple(stats), tuple(notes), params)

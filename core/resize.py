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
cap is reported per layer (kohya's ``resize_lora.py`` raises IndexError here). A layer whose ΔW is
exactly zero (alpha 0, zero factors) is dropped and reported as skipped.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, TypeVar

import torch

from .errors import NonFiniteError, RankwiseError
from .metadata import build_metadata
from .memory import release_free_memory
from .progress import ProgressFn, report
from .rank import RankPolicy, Spectrum, select_rank
from .report import LayerStat, Report
from .svd import Decomposition, SvdMethod, decompose, decompose_factored, split_factors
from .types import DiffLayer, LayerDelta, LayerKind, Lora, LoraLayer, as_matrix, factors_to_layer_shapes

Tensor = torch.Tensor
T = TypeVar("T")

NON_FINITE_NOTE = "NaN/Inf in the input"

TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")


def is_text_encoder(name: str) -> bool:
    """kohya module names of text-encoder layers start with ``lora_te``."""
    return name.startswith(TEXT_ENCODER_PREFIXES)


def layer_is_finite(layer: LayerDelta) -> bool:
    """No NaN/Inf in any of the layer's tensors."""
    parts = [layer.diff] if isinstance(layer, DiffLayer) else [layer.up, layer.down, layer.mid]
    return all(t is None or bool(torch.isfinite(t).all()) for t in parts)


def raise_non_finite(bad: Sequence[str], label: str = "input", shown_as: Sequence[str] | None = None) -> None:
    """Raise :class:`NonFiniteError` for the layers ``bad`` (no-op when empty).

    ``shown_as``: how to print each layer in the message (default: its name).
    """
    bad = tuple(bad)
    if bad:
        display = list(shown_as) if shown_as is not None else list(bad)
        shown = ", ".join(display[:8]) + (f" … (+{len(bad) - 8} more)" if len(bad) > 8 else "")
        raise NonFiniteError(
            f"{label} has NaN/Inf values in {len(bad)} layer(s): {shown}; the file is damaged or was "
            f"saved from a diverged training run — re-export it or exclude these layers",
            names=bad,
        )


@dataclass(frozen=True)
class Refactored:
    """One layer re-factorised at rank k: ΔW_k = up @ down (2-D fp32, S folded into ``up``)."""

    up: Tensor
    down: Tensor
    dec: Decomposition
    rank: int
    limit: int  # the largest rank this layer can have: min(out, in·kh·kw, stacked rank)
    requested: int | None  # the fixed rank asked for this layer (None for dynamic rules)

    @property
    def spectrum(self) -> Spectrum:
        return self.dec.spectrum

    @property
    def capped(self) -> bool:
        return self.requested is not None and self.requested > self.limit

    def note(self) -> str:
        if self.capped:
            return f"rank {self.requested} capped at {self.limit} (the layer's rank limit)"
        return ""


def _choose(
    dec: Decomposition, limit: int, policy: RankPolicy, kind: LayerKind, is_te: bool
) -> int:
    """The rank for a layer whose nonzero singular values are all among the first ``limit``."""
    spec = dec.spectrum
    choice = select_rank(
        Spectrum(spec.values[:limit], spec.fro2, limit),
        policy.rule,
        cap=policy.cap(kind, is_te),
        min_rank=policy.min_rank,
        kohya_compat=policy.kohya_compat,
    )
    return max(1, min(choice.rank, limit))


def _requested(policy: RankPolicy, kind: LayerKind, is_te: bool) -> int | None:
    """The rank a fixed rule asks for (conv/TE overrides included); dynamic rules ask for none."""
    return policy.cap(kind, is_te) if policy.rule.is_fixed else None


def refactor_factors(
    up: Tensor, down: Tensor, policy: RankPolicy, kind: LayerKind, is_te: bool
) -> Refactored:
    """Exact re-factorisation of ΔW = up @ down (2-D, scale already folded into ``up``).

    The product has rank ≤ R = up.shape[1], so the limit is min(out, in·kh·kw, R): a larger fixed
    rank would only add zero columns.
    """
    limit = max(1, min(int(up.shape[0]), int(down.shape[1]), int(up.shape[1])))
    cap = policy.cap(kind, is_te)
    # a fixed rank is known before the spectrum: ask for just those triplets
    wanted = min(cap, limit) if policy.rule.is_fixed and cap is not None else None
    dec = decompose_factored(up, down, k=wanted)
    k = _choose(dec, limit, policy, kind, is_te)
    new_up, new_down = split_factors(dec, k)
    return Refactored(new_up, new_down, dec, k, limit, _requested(policy, kind, is_te))


def refactor_dense(delta: Tensor, policy: RankPolicy, kind: LayerKind, is_te: bool) -> Refactored:
    """Exact decomposition of a dense 2-D ΔW; the complete spectrum decides every rule exactly."""
    p = int(min(delta.shape))
    delta = delta.float()
    need = policy.needed_values(p, kind, is_te)
    dec = decompose(delta, need, method=SvdMethod.EXACT, full_spectrum=True)
    k = _choose(dec, p, policy, kind, is_te)
    if k > dec.rank:
        dec = decompose(delta, k, method=SvdMethod.EXACT, full_spectrum=True)
    new_up, new_down = split_factors(dec, k)
    return Refactored(new_up, new_down, dec, k, p, _requested(policy, kind, is_te))


def layer_stat(
    name: str,
    shape: tuple[int, ...],
    out_layer: LoraLayer,
    ref: Refactored,
    *,
    input_rank: int | None,
    note: str = "",
) -> LayerStat:
    k = ref.rank
    notes = [n for n in (ref.note(), note) if n]
    # every nonzero singular value kept: the re-factorisation is exact (round-off only), while
    # √(‖ΔW‖² − Σ S²) would report its fp32 cancellation floor (~3e-4·‖ΔW‖)
    error = 0.0 if k >= ref.limit else ref.dec.error(k)
    optimal = 0.0 if k >= ref.limit else ref.dec.optimal_error(k)
    return LayerStat(
        name=name,
        kind=LayerKind.of_shape(shape).value,
        shape=tuple(shape),
        rank=k,
        input_rank=input_rank,
        retained=ref.spectrum.retained(k),
        error=error,
        optimal_error=optimal,
        norm=math.sqrt(max(ref.spectrum.fro2, 0.0)),
        nbytes=out_layer.nbytes(),
        status="ok",
        note="; ".join(notes),
    )


def skipped_stat(name: str, shape: tuple[int, ...], *, input_rank: int | None, note: str) -> LayerStat:
    return LayerStat(
        name=name,
        kind=LayerKind.of_shape(shape).value,
        shape=tuple(shape),
        rank=0,
        input_rank=input_rank,
        retained=0.0,
        status="skipped",
        note=note,
    )


def to_layer(
    up: Tensor, down: Tensor, alpha: float, weight_shape: tuple[int, ...], dtype: torch.dtype
) -> LoraLayer:
    """Wrap 2-D factors as a plain LoRA layer in the weight's layout and ``dtype``."""
    u, d = factors_to_layer_shapes(up.contiguous(), down.contiguous(), tuple(weight_shape))
    return LoraLayer(up=u.to(dtype).contiguous(), down=d.to(dtype).contiguous(), alpha=float(alpha))


def _resize_layer(
    name: str, layer: LayerDelta, policy: RankPolicy, strength: float, dtype: torch.dtype | None
) -> tuple[LoraLayer | None, LayerStat]:
    try:
        return _resize_finite_layer(name, layer, policy, strength, dtype)
    except NonFiniteError:
        # the SVD checks its inputs (‖·‖² is not finite) at no extra cost; name the layer instead
        return None, skipped_stat(name, layer.weight_shape, input_rank=None, note=NON_FINITE_NOTE)


def _resize_finite_layer(
    name: str, layer: LayerDelta, policy: RankPolicy, strength: float, dtype: torch.dtype | None
) -> tuple[LoraLayer | None, LayerStat]:
    shape = layer.weight_shape
    kind, is_te = layer.kind, is_text_encoder(name)
    if isinstance(layer, DiffLayer):
        delta = as_matrix(layer.delta()) * strength
        if not bool(delta.any()):
            return None, skipped_stat(name, shape, input_rank=None, note="empty: ΔW is zero")
        ref = refactor_dense(delta, policy, kind, is_te)
        out = to_layer(ref.up, ref.down, float(ref.rank), shape, dtype or layer.diff.dtype)
        return out, layer_stat(name, shape, out, ref, input_rank=None, note="dense input → LoRA")
    scale = layer.scale
    if scale == 0.0:
        if not layer_is_finite(layer):
            raise NonFiniteError("non-finite factors", names=(name,))
        return None, skipped_stat(name, shape, input_rank=layer.rank, note="empty: alpha is 0")
    up = layer.up_matrix() * (strength * scale)
    ref = refactor_factors(up, layer.down_matrix(), policy, kind, is_te)
    if ref.spectrum.fro2 <= 0.0:
        return None, skipped_stat(name, shape, input_rank=layer.rank, note="empty: ΔW is zero")
    # keep alpha/rank: ΔW_k = scale · (up_k / scale) @ down_k with alpha = scale · k
    out = to_layer(ref.up / scale, ref.down, scale * ref.rank, shape, dtype or layer.up.dtype)
    note = "LoCon mid folded" if layer.mid is not None else ""
    return out, layer_stat(name, shape, out, ref, input_rank=layer.rank, note=note)


def run_layers(
    fn: Callable[[str], T], names: Sequence[str], *, workers: int = 1, progress: ProgressFn | None = None
) -> list[T]:
    """``[fn(name) for name in names]``, optionally on ``workers`` threads, reporting progress in order.

    With ``workers > 1`` each worker runs its torch ops single-threaded (layer-level parallelism:
    two 1-thread layers at once degrade gracefully on a busy machine, where 2-thread BLAS calls on
    small matrices can be 10× slower than 1 thread). The torch thread count is restored afterwards.
    The progress callback runs on the calling thread and may raise to cancel: queued layers are
    dropped, running ones finish, the exception propagates.
    """
    total = len(names)

    def call(name: str) -> T:
        with torch.no_grad():  # grad mode is per thread
            return fn(name)

    if workers <= 1 or total <= 1:
        results = []
        try:
            for i, name in enumerate(names):
                results.append(call(name))
                report(progress, i + 1, total, name)
            return results
        finally:
            release_free_memory()
    before = torch.get_num_threads()
    pool = ThreadPoolExecutor(max_workers=int(workers), initializer=torch.set_num_threads, initargs=(1,))
    try:
        futures = [pool.submit(call, name) for name in names]
        results = []
        for i, (name, future) in enumerate(zip(names, futures)):
            results.append(future.result())
            report(progress, i + 1, total, name)
        return results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(before)
        release_free_memory()


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
        workers: layers resized concurrently, each with one torch thread (see :func:`run_layers`);
            2 on a 2-core machine. The result is the same up to float round-off.

    Returns:
        (resized LoRA, per-layer report). ΔW_out equals the rank-k truncation of strength·ΔW_in;
        output layers are plain LoRA with alpha/rank kept (dense inputs: alpha = k).

    Raises:
        NonFiniteError: NaN/Inf in input layers, all of them named (detected by the SVD's own
            norm check during the pass, so it is raised after the last layer).
        RankwiseError: a zero or non-finite strength, or an empty input.
    """
    strength = float(strength)
    if not math.isfinite(strength) or strength == 0.0:
        raise RankwiseError(f"strength must be a finite nonzero number, got {strength}")
    if len(lora) == 0:
        raise RankwiseError("the input LoRA has no layers to resize")
    names = list(lora.layers)
    results = run_layers(
        lambda name: _resize_layer(name, lora.layers[name], policy, strength, dtype),
        names, workers=workers, progress=progress,
    )
    raise_non_finite([stat.name for _, stat in results if stat.note == NON_FINITE_NOTE])
    layers = {name: out for name, (out, _) in zip(names, results) if out is not None}
    stats = [stat for _, stat in results]

    notes: list[str] = []
    capped = [s.name for s in stats if "capped" in s.note]
    if capped:
        notes.append(f"{len(capped)} layer(s) capped at their rank limit (e.g. {capped[0]})")
    dense = sum(isinstance(layer, DiffLayer) for layer in lora.layers.values())
    if dense:
        notes.append(f"{dense} dense layer(s) (LoHa/LoKr/full) converted to plain LoRA")
    mids = sum(isinstance(layer, LoraLayer) and layer.mid is not None for layer in lora.layers.values())
    if mids:
        notes.append(f"{mids} LoCon/Tucker layer(s) folded to plain LoRA")
    empty = [s.name for s in stats if s.status == "skipped"]
    if empty:
        notes.append(f"{len(empty)} layer(s) with a zero ΔW dropped (e.g. {empty[0]})")

    old_dim = lora.metadata.get("ss_network_dim") or _dim_text(lora.ranks())
    new_dim = _dim_text({n: layer.rank for n, layer in layers.items()})
    comment = f"dimension is resized from {old_dim} to {new_dim}; rankwise resize {policy.describe()}"
    if strength != 1.0:
        comment += f", strength {strength:g}"
    params = {"rule": policy.describe(), "strength": f"{strength:g}"}
    out = Lora(layers=layers, metadata={}, arch=lora.arch)
    metadata = build_metadata(
        out,
        title=lora.metadata.get("modelspec.title") or f"resized LoRA ({policy.describe()})",
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

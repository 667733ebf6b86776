"""Extract the LoRA that best reproduces ``tuned − base``, layer by layer, streaming.

For every selected layer of the key table::

    read both tensors (one layer per side in memory; fused q/k/v rows sliced)
    upcast to fp32, then subtract            ΔW = W_tuned − W_base, as a matrix (conv flattened)
    finite check                             NonFiniteError names the key and the side
    near-zero check                          ‖ΔW‖_F / ‖W_base‖_F < min_relative_delta → skipped
    decompose_delta (phase 1)                svd.decompose at the largest rank any rule of the
                                             sweep needs; uncapped dynamic rules start at 64
                                             triplets and double while the known values (plus
                                             the tail energy) cannot decide; sv_cumulative gets
                                             the full spectrum when still undecided
    rank phase (phase 2)                     pipeline.RankPhase: every rule of the sweep on the
                                             same spectrum (per layer, or after the last layer
                                             for a global selector)
    layer_output                             up = U_r·diag(S_r), down = Vh_r, alpha = r (scale 1),
                                             (clamp), reshape, store

:mod:`.pipeline` owns the loop: a read-ahead thread reads and converts the next layer while the
current one decomposes (``options.prefetch`` layers), so I/O and the fp16 → fp32 conversion use
the second core; progress, cancellation and the memory hand-back are the pipeline's too.

Decisions (documented here once)
--------------------------------
* **Preset** defaults to :attr:`LayerPreset.ALL`: attention, MLP, projections, ResNet (3×3 convs
  included), samplers, embeddings and conv_in/out. kohya's default is ``ATTN_MLP``.
* **Text encoders** default to :attr:`TextEncoderMode.AUTO`: an encoder is extracted only when
  :func:`clip.text_encoder_report` finds ``‖ΔW‖/‖W‖`` above ``te_threshold``; the verdict and the
  number go into the report notes.
* **Factor dtype**: the factors are stored in ``options.factor_dtype`` (default fp16), the dtype a
  LoRA is normally saved in. A rank-128 SDXL extraction holds ~510 M factor values: 1.0 GB in fp16,
  2.0 GB in fp32, so fp16 is what keeps the whole run under ~2 GB of anonymous memory. The report's
  ``error`` is measured before that cast (fp32 math throughout). Under a size budget the layers wait
  for the allocation with their singular vectors in that 16-bit dtype (:meth:`.pipeline.Decomposed.held`,
  halving the ~1.9 GB fp32 an SDXL extraction at cap 128 would hold): the stored factors then differ
  from the fp32 path by at most about one more rounding of the same size (``up`` rounded twice),
  which the reported error leaves out like the save cast itself. A layer whose factors overflow fp16
  keeps fp32 factors and says so. Pass ``factor_dtype=torch.float32`` for exact factors.
* **Device**: ``None`` means CUDA when available, else CPU, decided at call time.
* **Threads**: ``None`` leaves torch's setting alone; ``threads=n`` sets torch and scipy's OpenBLAS
  (``svd.set_threads``) for the run and restores torch's count after. On a busy 2-core machine
  2 torch threads were 6–16× *slower* than 1 (measured: SD1.5 attention layers, 13 CPU-s / 21 s
  wall at 1 thread vs 87–193 CPU-s / 125–329 s wall at 2, spinning OpenMP threads); the prefetch
  thread already overlaps reading with the decomposition, so ``threads=1`` is the safe choice
  there, more threads on an idle many-core machine.
* **Workers**: ``workers=n`` decomposes n layers at once, each on its own thread with ``threads``
  torch threads (layer-level parallelism, results in layer order, ≤ 2n layers in flight besides
  the read-ahead); the CLI passes ``--workers`` (default 2). SDXL rank 128 exact, end to end
  (``bench/bench_end_to_end.py``, load ≈ 1.5 from other jobs): 135 s wall at 1 worker, 111 s at 2.
* **Read-ahead**: up to ``prefetch`` (4) layers wait read, within ``prefetch_bytes`` (160 MiB) of
  fp32 ΔW, one layer always passing (a Flux MLP is 151 MB). With one layer ahead the two workers
  starved between big layers: SDXL rank 128 exact ran 1.57 cores busy, 73.5 s wall; with two or
  more, 1.97 cores, 59–61 s (same CPU time).
* **Spectra**: :func:`extract_detailed` returns an :class:`ExtractResult` holding, besides the
  LoRA and the report, each layer's :class:`~.rank.Spectrum` (the values the rank was chosen from)
  for :mod:`.spectrum` plots. :func:`extract` returns just ``(Lora, Report)``.
* **Clamp** (off by default): both factors are clamped to ±the q-quantile of ``|values|``, the
  quantile taken on a seeded random sample of at most 200 000 values (``torch.quantile`` refuses
  inputs over 2²⁴ elements). The reported error is then the true error of the clamped factors.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Sequence

import torch

from .archs import Component, KeyTable, LayerPreset, LayerSpec
from .clip import DEFAULT_TE_THRESHOLD, EncoderDiff, text_encoder_report
from .errors import NonFiniteError, RankwiseError
from .finite import is_finite
from .metadata import build_metadata
from .budget import budget_notes
from .pipeline import (
    Decomposed, LayerFilter, LayerInfo, LayerLoop, RankDecision, RankPhase, RankSelector, ReadAhead, all_certain,
    layer_stat, selectors_of, skipped_stat, storage_bytes_per_rank, triplets_needed,
)
from .progress import ProgressFn
from .rank import RankPolicy, Spectrum
from .runtime import resolve_device  # noqa: F401  (public here too)
from .report import LayerStat, Report
from .sources import KeyStyle, PairReport, WeightSource, layer_source_key, preflight
from .decompositions import difference_sum_squares
from .svd import SvdMethod, decompose, set_threads, singular_values, split_factors, sum_squares
from .types import DiffLayer, Lora, LoraLayer, SkipReason, as_matrix, factors_to_layer_shapes

Tensor = torch.Tensor

CLAMP_SAMPLE = 200_000
"""At most this many factor values are sampled to estimate the clamp quantile."""


class TextEncoderMode(str, enum.Enum):
    """Which text encoders to extract."""

    AUTO = "auto"  # those that really differ (clip.text_encoder_report)
    ALL = "all"
    NONE = "none"


@dataclass(frozen=True)
class ExtractOptions:
    """How to extract; ``policy`` decides the ranks (see :mod:`.rank`).

    ``include``/``exclude`` are patterns on kohya layer names with the one
    :class:`~.pipeline.LayerFilter` semantics: shell-style globs (``*attn2*``), or a plain substring
    when a pattern has no ``*?[`` characters. A layer is kept when it matches some ``include``
    pattern (or ``include`` is empty) and no ``exclude`` pattern.
    """

    policy: RankPolicy
    preset: LayerPreset = LayerPreset.ALL
    text_encoders: TextEncoderMode = TextEncoderMode.AUTO
    method: SvdMethod = SvdMethod.EXACT
    clamp_quantile: float | None = None
    min_relative_delta: float = 1e-6
    te_threshold: float = DEFAULT_TE_THRESHOLD
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    device: str | None = None
    factor_dtype: torch.dtype = torch.float16
    key_style: KeyStyle = KeyStyle.CHECKPOINT
    threads: int | None = None  # torch + OpenBLAS threads during the run (None: leave as is)
    prefetch: int = 4  # layers read ahead by the background thread (0: read in the main thread) …
    prefetch_bytes: int = 160 << 20  # … within this many bytes of fp32 ΔW (one layer always passes)
    workers: int = 1  # layers decomposed at once, each on its own thread (with ``threads`` torch threads)
    seed: int = 0
    exact_parts: bool = False  # also store changed 1-D weights / biases exactly (.diff / .diff_b; generic keys)

    @property
    def layer_filter(self) -> LayerFilter:
        return LayerFilter(self.include, self.exclude)

    def __post_init__(self) -> None:
        object.__setattr__(self, "preset", LayerPreset(self.preset))
        object.__setattr__(self, "text_encoders", TextEncoderMode(self.text_encoders))
        object.__setattr__(self, "method", SvdMethod(self.method))
        object.__setattr__(self, "key_style", KeyStyle(self.key_style))
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        q = self.clamp_quantile
        if q is not None and not (0.0 < float(q) <= 1.0):
            raise ValueError(f"clamp_quantile must be in (0, 1] or None, got {q}")
        if not (self.min_relative_delta >= 0 and math.isfinite(self.min_relative_delta)):
            raise ValueError(f"min_relative_delta must be a finite number ≥ 0, got {self.min_relative_delta}")
        if not (self.te_threshold >= 0 and math.isfinite(self.te_threshold)):
            raise ValueError(f"te_threshold must be a finite number ≥ 0, got {self.te_threshold}")
        if self.factor_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"factor_dtype must be float16, bfloat16 or float32, got {self.factor_dtype}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be ≥ 1 (or None), got {self.threads}")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be ≥ 0, got {self.prefetch}")
        if self.prefetch_bytes < 0:
            raise ValueError(f"prefetch_bytes must be ≥ 0, got {self.prefetch_bytes}")
        if self.exact_parts and self.key_style is not KeyStyle.GENERIC:
            raise ValueError("exact_parts (.diff / .diff_b) needs the generic key style (ComfyUI-native names)")
        if self.workers < 1:
            raise ValueError(f"workers must be ≥ 1, got {self.workers}")


@dataclass(frozen=True)
class ExtractResult:
    """One extraction: the LoRA, its report, the spectrum of every decomposed layer, the pair check
    and the text-encoder verdicts."""

    lora: Lora
    report: Report
    spectra: Mapping[str, Spectrum] = field(default_factory=dict)
    pair: PairReport | None = None
    encoders: tuple[EncoderDiff, ...] = ()


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def extract(
    base: WeightSource,
    tuned: WeightSource,
    options: ExtractOptions,
    *,
    progress: ProgressFn | None = None,
    title: str = "",
) -> tuple[Lora, Report]:
    """Extract a LoRA (``tuned − base``) under ``options.policy``. Nothing is written to disk."""
    result = extract_detailed(base, tuned, options, progress=progress, title=title)
    return result.lora, result.report


def extract_detailed(
    base: WeightSource,
    tuned: WeightSource,
    options: ExtractOptions,
    *,
    progress: ProgressFn | None = None,
    title: str = "",
) -> ExtractResult:
    """Like :func:`extract`, also returning the per-layer spectra, the pair check and TE verdicts."""
    return _run(base, tuned, (options.policy,), options, progress, title)[0]


def extract_sweep(
    base: WeightSource,
    tuned: WeightSource,
    policies: Sequence[RankPolicy | RankSelector],
    options: ExtractOptions,
    *,
    progress: ProgressFn | None = None,
    title: str = "",
) -> list[tuple[Lora, Report]]:
    """One LoRA per policy from a single pass: each ΔW is decomposed once, at the largest number
    of singular values any policy needs, then every policy picks its rank from that."""
    return [(r.lora, r.report) for r in extract_sweep_detailed(base, tuned, policies, options,
                                                                progress=progress, title=title)]


def extract_sweep_detailed(
    base: WeightSource,
    tuned: WeightSource,
    policies: Sequence[RankPolicy | RankSelector],
    options: ExtractOptions,
    *,
    progress: ProgressFn | None = None,
    title: str = "",
) -> list[ExtractResult]:
    if not policies:
        raise ValueError("extract_sweep needs at least one rank policy")
    return _run(base, tuned, tuple(policies), options, progress, title)


def layer_selected(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """``LayerFilter(include, exclude).selects(name)`` (:class:`~.pipeline.LayerFilter`)."""
    return LayerFilter(tuple(include), tuple(exclude)).selects(name)


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------

INITIAL_DYNAMIC = 64
"""Leading triplets a dynamic rule without a cap is first decomposed with. An ``sv_fro`` rank is
decided exactly by the known values plus the tail energy ‖ΔW‖_F² − Σσ² whenever it is ≤ this; a
larger one is found from the complete spectrum (values only) instead of a full decomposition."""


@dataclass
class _Item:
    """One layer, read and converted by the read-ahead thread."""

    spec: LayerSpec
    delta: Tensor | None = None  # fp32 matrix m × n (conv flattened)
    fro2: float = 0.0
    base_norm: float = 0.0

    def nbytes(self) -> int:
        d = self.delta
        return 0 if d is None else d.numel() * d.element_size()


@dataclass
class _Out:
    """What one selector accumulates."""

    selector: RankSelector
    layers: dict[str, LoraLayer] = field(default_factory=dict)
    stats: list[LayerStat] = field(default_factory=list)
    kept_fp32: list[str] = field(default_factory=list)


def _run(
    base: WeightSource,
    tuned: WeightSource,
    policies: tuple[RankPolicy | RankSelector, ...],
    options: ExtractOptions,
    progress: ProgressFn | None,
    title: str,
) -> list[ExtractResult]:
    table, pair = preflight(base, tuned, key_style=options.key_style)
    notes: list[str] = list(pair.notes)

    components, encoders = _choose_components(base, tuned, table, pair, options, notes)
    selected = table.select(options.preset, components)
    flt = options.layer_filter
    specs = tuple(s for s in selected if flt.selects(s.kohya))
    if len(specs) < len(selected):
        notes.append(f"{len(selected) - len(specs)} layers left out by the include/exclude filters")
    keys_b, keys_t = set(base.keys()), set(tuned.keys())
    present = tuple(s for s in specs if layer_source_key(s, options.key_style)[0] in keys_b
                    and layer_source_key(s, options.key_style)[0] in keys_t)
    if not present:
        raise RankwiseError(
            f"no layer to extract from {tuned.name!r}: preset {options.preset.value}, text encoders "
            f"{options.text_encoders.value}, filters include={list(options.include)} exclude={list(options.exclude)}"
        )

    device = resolve_device(options.device)
    selectors = selectors_of(policies)
    outs = [_Out(s) for s in selectors]
    spectra: dict[str, Spectrum] = {}

    def emit(d: Decomposed, decisions: Sequence[RankDecision]) -> None:
        spectra[d.info.name] = d.spectrum
        for out, decision in zip(outs, decisions):
            layer, stat = layer_output(d, decision, options)
            out.layers[d.info.name] = layer
            out.stats.append(stat)
            if stat.kept_fp32:
                out.kept_fp32.append(d.info.name)

    def on_skip(stat: LayerStat) -> None:
        for out in outs:
            out.stats.append(stat)

    phase = RankPhase(selectors, emit, on_skip)
    reader = _Reader(base, tuned, options.key_style, device)
    old_threads = torch.get_num_threads()
    if options.threads is not None:
        set_threads(options.threads)

    def phase1(item: _Item, index: int) -> tuple[bool, object]:
        """(decomposed?, Decomposed or near-zero stat) of one read layer."""
        with torch.no_grad():  # grad mode is per thread
            rel = _relative(item)
            if rel < options.min_relative_delta:
                out: tuple[bool, object] = (False, _near_zero_stat(item, rel))
            else:
                info = _layer_info(item.spec, options.factor_dtype)
                layer = decompose_delta(item.delta, info, selectors, options, device, index, fro2=item.fro2)
                layer.extra["base_fro2"] = item.base_norm ** 2  # for a size budget's relative weights
                layer.extra["block"] = item.spec.block
                layer.extra["dtype"] = options.factor_dtype  # held in it for a size budget
                out = (True, layer)
            item.delta = None
            return out

    try:
        with LayerLoop(len(present), progress) as loop, \
                ReadAhead(present, reader, options.prefetch, name="rankwise-extract-read",
                          max_bytes=options.prefetch_bytes, size=_Item.nbytes) as items, \
                _Workers(options.workers, options.threads) as pool:
            for item, (decomposed, payload) in pool.map_ordered(phase1, items):
                if decomposed:
                    phase.add(payload)
                else:
                    phase.skip(payload)
                loop.tick(item.spec.kohya)
            phase.finish()
    finally:
        reader.close()
        if options.threads is not None:
            set_threads(old_threads)

    near_zero = sum(1 for s in outs[0].stats if s.skip is SkipReason.NEAR_ZERO)
    if near_zero:
        notes.append(f"{near_zero} near-zero layers skipped (‖ΔW‖/‖W‖ < {options.min_relative_delta:g})")
    if options.clamp_quantile is not None:
        notes.append(f"factors clamped at the {options.clamp_quantile:g}-quantile of |values| "
                     f"(sampled, ≤ {CLAMP_SAMPLE} values per layer)")
    if options.exact_parts:  # core.generic: exact .diff / .diff_b parts beside the low-rank layers
        from .generic import exact_parts

        parts = exact_parts(base, tuned, table)
        for out in outs:
            out.layers.update(parts.layers)
        notes.append(parts.note())
    from .quant import rounding_notes

    keys = {s.kohya: layer_source_key(s, options.key_style)[0] for s in present}
    frozen_spectra = MappingProxyType(spectra)
    return [_result(out, notes + rounding_notes(base, tuned, out.stats, keys), base, tuned, options, pair,
                    encoders, frozen_spectra, title) for out in outs]


class _Workers:
    """Phase 1 on ``workers`` threads (layer-level parallelism; one thread: the caller's), results
    in input order, at most ``2·workers`` layers in flight besides the read-ahead."""

    def __init__(self, workers: int, threads: int | None) -> None:
        self.workers = int(workers)
        self.threads = 1 if threads is None else int(threads)
        self.pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> "_Workers":
        if self.workers > 1:
            self.pool = ThreadPoolExecutor(max_workers=self.workers, initializer=torch.set_num_threads,
                                           initargs=(self.threads,), thread_name_prefix="rankwise-extract")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def map_ordered(self, fn, items):
        """(item, fn(item, index)) for each item, index from 1, in order."""
        if self.pool is None:
            for index, item in enumerate(items, start=1):
                yield item, fn(item, index)
            return
        pending: collections.deque = collections.deque()
        window = 2 * self.workers
        for index, item in enumerate(items, start=1):
            pending.append((item, self.pool.submit(fn, item, index)))
            if len(pending) >= window:
                head, future = pending.popleft()
                yield head, future.result()
        while pending:
            head, future = pending.popleft()
            yield head, future.result()


def _layer_info(spec: LayerSpec, dtype: torch.dtype) -> LayerInfo:
    m = spec.shape[0]
    n = 1
    for x in spec.shape[1:]:
        n *= int(x)
    return LayerInfo(name=spec.kohya, kind=spec.kind, shape=tuple(spec.shape), is_text_encoder=spec.is_text_encoder,
                     limit=max(1, min(int(m), n)), bytes_per_rank=storage_bytes_per_rank(spec.shape, dtype))


def _relative(item: _Item) -> float:
    """‖ΔW‖_F / ‖W_base‖_F (0 for 0/0, inf for a change of an all-zero weight)."""
    if item.base_norm > 0:
        return math.sqrt(item.fro2) / item.base_norm
    return 0.0 if item.fro2 == 0 else math.inf


def _near_zero_stat(item: _Item, rel: float) -> LayerStat:
    return skipped_stat(item.spec.kohya, item.spec.shape, SkipReason.NEAR_ZERO, norm=math.sqrt(item.fro2),
                        note=f"near-zero (‖ΔW‖/‖W‖ = {rel:.2g})")


def _result(out: _Out, notes: list[str], base: WeightSource, tuned: WeightSource, options: ExtractOptions,
            pair: PairReport, encoders: tuple[EncoderDiff, ...], spectra: Mapping[str, Spectrum],
            title: str) -> ExtractResult:
    out_notes = list(notes) + budget_notes(out.selector)
    if out.kept_fp32:
        out_notes.append(f"{len(out.kept_fp32)} layers kept fp32 factors (values beyond "
                         f"{_dtype_name(options.factor_dtype)} range): {', '.join(out.kept_fp32[:5])}")
    fallbacks = sum(1 for s in out.stats if s.fallback)
    if fallbacks:
        out_notes.append(f"{fallbacks} layers needed an SVD fallback (see their notes)")
    params = _params(base, tuned, out.selector, options, pair)
    lora = Lora(layers=out.layers, metadata={}, arch=pair.arch)
    lora = lora.replace(metadata=_metadata(lora, title or _default_title(tuned), params))
    report = Report("extract", tuple(out.stats), tuple(out_notes), params)
    return ExtractResult(lora, report, spectra, pair, encoders)


def _choose_components(
    base: WeightSource,
    tuned: WeightSource,
    table: KeyTable,
    pair: PairReport,
    options: ExtractOptions,
    notes: list[str],
) -> tuple[tuple[Component, ...], tuple[EncoderDiff, ...]]:
    encoders_present = tuple(c for c in pair.components if c is not Component.UNET)
    comps = [c for c in pair.components if c is Component.UNET]
    mode = options.text_encoders
    encoders: tuple[EncoderDiff, ...] = ()
    if mode is TextEncoderMode.NONE:
        if encoders_present:
            notes.append("text encoders not extracted (text_encoders=none)")
    elif mode is TextEncoderMode.ALL:
        comps.extend(encoders_present)
    elif encoders_present:
        encoders = text_encoder_report(base, tuned, table, threshold=options.te_threshold,
                                       key_style=options.key_style)
        for enc in encoders:
            notes.append(enc.describe() + ("" if enc.differs else ": not extracted"))
            if enc.differs:
                comps.append(enc.component)
    return tuple(comps), encoders


def decompose_delta(a: Tensor, info: LayerInfo, selectors: Sequence[RankSelector], options: ExtractOptions,
                    device: torch.device, index: int = 0, fro2: float | None = None) -> Decomposed:
    """Phase 1 of extract for one layer: ΔW (fp32 matrix) → a decomposition every selector can decide from.

    Fixed ranks (and capped dynamic rules) decompose once at the largest rank any rule needs. An
    uncapped dynamic rule starts at :data:`INITIAL_DYNAMIC` triplets; when the known values (plus
    the tail energy ‖ΔW‖_F² − Σσ²) cannot decide, the complete spectrum (values only, fp64 Gram)
    is computed once and decides every rule. Then the triplets are topped up to the largest rank
    chosen, in one more decomposition. ``fro2``: ‖ΔW‖_F² when the reader has it already.
    """
    p = info.limit
    wants = [s.needed(info) for s in selectors]
    fixed = [w for w in wants if w is not None]
    k = max(fixed) if len(fixed) == len(wants) else max(fixed + [min(p, INITIAL_DYNAMIC)])
    per_layer = [s for s in selectors if not s.is_global]
    name = info.name
    layer = Decomposed(info, _decompose(a, k, options, device, full=False, name=name, fro2=fro2), source=a)
    if not all_certain(per_layer, layer) and k < p:
        # the known values cannot decide (an uncapped rule needs more of them, or sv_cumulative needs
        # Σσ): the complete spectrum, values only (fp64 Gram eigenvalues), decides every rule; the
        # triplets held stay. Doubling k instead cost up to four decompositions on heavy tails.
        known = layer.dec.S.detach().double().cpu()
        values = torch.cat([known, singular_values(a, device=device)[known.numel():].clamp(max=float(known[-1]))])
        spectrum = Spectrum(values, layer.spectrum.fro2, layer.spectrum.full_rank)
        layer = Decomposed(info, dataclasses.replace(layer.dec, spectrum=spectrum), source=a)
    need = triplets_needed(selectors, layer)
    if need > layer.dec.rank:
        more = _decompose(a, need, options, device, full=False, name=name, fro2=fro2)
        known = layer.spectrum.values
        if known.numel() > need:  # keep the complete tail already known
            values = torch.cat([more.spectrum.values[:need], known[need:].clamp(max=float(more.S[-1]))])
            more = dataclasses.replace(more, spectrum=Spectrum(values, more.spectrum.fro2, more.spectrum.full_rank))
        layer = Decomposed(info, more, source=a)
    layer.extra["seed"] = options.seed + index
    return layer


def layer_output(layer: Decomposed, decision: RankDecision, options: ExtractOptions) -> tuple[LoraLayer, LayerStat]:
    """Phase 2 of extract for one layer and rank: split (clamp), store, and the layer's row."""
    r = decision.rank
    spec_shape = layer.info.shape
    up, down = split_factors(layer.dec, r)
    up, down = up.float(), down.float()
    if decision.full:  # a size budget chose the full difference: ΔW from all p triplets
        diff = (up @ down).reshape(spec_shape).to("cpu")
        stored = diff.to(options.factor_dtype)
        kept32 = not is_finite(stored)
        full = DiffLayer(diff.contiguous() if kept32 else stored.contiguous())
        return full, layer_stat(layer, decision, full, note="full difference (.diff)", kept_fp32=kept32)
    error = None
    note = ""
    if options.clamp_quantile is not None:
        up, down = _clamp(up, down, options.clamp_quantile, int(layer.extra.get("seed", options.seed)))
        if layer.source is not None:
            error = _true_error(layer.source, up, down)
        else:
            note = "clamped; error is that of the unclamped factors"
    up_t, down_t = factors_to_layer_shapes(up, down, spec_shape)
    up_s, down_s, kept32 = _store(up_t, down_t, options.factor_dtype)
    if kept32:
        note = "; ".join(x for x in (note, f"kept fp32 (beyond {_dtype_name(options.factor_dtype)} range)") if x)
    out = LoraLayer(up=up_s, down=down_s, alpha=float(r))
    return out, layer_stat(layer, decision, out, error=error, note=note, kept_fp32=kept32)


def _decompose(a: Tensor, k: int, options: ExtractOptions, device: torch.device, *, full: bool, name: str,
               fro2: float | None = None) -> Decomposition:
    try:
        return decompose(a, k, method=options.method, full_spectrum=full, device=device, seed=options.seed, fro2=fro2)
    except NonFiniteError as e:
        raise NonFiniteError(f"layer {name}: {e}", (name,)) from e
    except RankwiseError as e:  # the whole fallback ladder failed: name the layer
        raise RankwiseError(f"layer {name} ({a.shape[0]}×{a.shape[1]}): {e}") from e


def _clamp(up: Tensor, down: Tensor, q: float, seed: int) -> tuple[Tensor, Tensor]:
    values = torch.cat([up.reshape(-1), down.reshape(-1)]).abs()
    if values.numel() > CLAMP_SAMPLE:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        idx = torch.randint(0, values.numel(), (CLAMP_SAMPLE,), generator=gen).to(values.device)
        values = values[idx]
    hi = float(torch.quantile(values.float(), float(q)))
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def _true_error(a: Tensor, up: Tensor, down: Tensor, rows: int = 256) -> float:
    """‖A − up·down‖_F, formed a block of rows at a time (fp32 residual, fp64 sum; no cancellation)."""
    a = a.to(up.device)
    total = 0.0
    for start in range(0, a.shape[0], rows):
        r = a[start:start + rows] - up[start:start + rows] @ down
        total += float(torch.sum(r.double() ** 2))
    return math.sqrt(total)


def _store(up: Tensor, down: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, bool]:
    """Factors in the storage dtype on the CPU (fp32 kept when the cast would overflow)."""
    up, down = up.detach().to("cpu"), down.detach().to("cpu")
    if dtype == torch.float32:
        return up.contiguous(), down.contiguous(), False
    up_s, down_s = up.to(dtype).contiguous(), down.to(dtype).contiguous()
    if not (is_finite(up_s) and is_finite(down_s)):  # the cast overflowed (the inputs are finite)
        return up.float().contiguous(), down.float().contiguous(), True
    return up_s, down_s, False


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------
# Reading (run ahead of the decomposition by pipeline.ReadAhead)
# ---------------------------------------------------------------------------------------------


class _Reader:
    """``spec → _Item``: reads, upcasts and subtracts one layer; keeps a fused q/k/v tensor pair
    while its layers are read. Raises NonFiniteError naming the key and the side."""

    def __init__(self, base: WeightSource, tuned: WeightSource, style: KeyStyle, device: torch.device) -> None:
        self._base, self._tuned = base, tuned
        self._style = style
        self._device = device
        self._cache: tuple[str, Tensor, Tensor] | None = None

    def close(self) -> None:
        self._cache = None

    def _pair(self, key: str, fused: bool) -> tuple[Tensor, Tensor]:
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2]
        self._cache = None
        w = self._base.get(key).to(self._device)
        t = self._tuned.get(key).to(self._device)
        if fused:
            self._cache = (key, w, t)
        return w, t

    def __call__(self, spec: LayerSpec) -> _Item:
        key, rows = layer_source_key(spec, self._style)
        w, t = self._pair(key, rows is not None)
        if rows is not None:
            w, t = w[rows[0]:rows[1]], t[rows[0]:rows[1]]
        if tuple(w.shape) != tuple(spec.shape) or tuple(t.shape) != tuple(spec.shape):
            raise RankwiseError(f"layer {spec.kohya}: tensor {key} has shapes {list(w.shape)} (base) and "
                                f"{list(t.shape)} (tuned), expected {list(spec.shape)}")
        d, fro2, base_fro2 = difference_sum_squares(w, t)
        mat = as_matrix(d)
        if not math.isfinite(fro2):  # Σ d² is finite iff every entry is: no extra pass
            raise _non_finite(key, spec, (("base", self._base, w), ("tuned", self._tuned, t)))
        return _Item(spec, mat, fro2, math.sqrt(base_fro2))


def _non_finite(key: str, spec: LayerSpec, sides: Sequence[tuple[str, WeightSource, Tensor]]) -> NonFiniteError:
    bad = [f"{side} checkpoint {src.name!r}" for side, src, x in sides if not is_finite(x)]
    where = " and ".join(bad) or "the difference (an overflow)"
    return NonFiniteError(
        f"tensor {key} (layer {spec.kohya}) holds NaN or Inf values in {where}; "
        f"repair or re-download the model, or exclude the layer",
        (key,),
    )


# ---------------------------------------------------------------------------------------------
# Metadata and report parameters
# ---------------------------------------------------------------------------------------------


def _default_title(tuned: WeightSource) -> str:
    name = str(getattr(tuned, "name", "") or "extracted")
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return f"{stem} (extracted)"


def _params(base: WeightSource, tuned: WeightSource, selector: RankSelector, options: ExtractOptions,
            pair: PairReport) -> dict[str, str]:
    policy = getattr(selector, "policy", None)
    return {
        "rule": str(policy.rule) if policy is not None else selector.label,
        "policy": selector.label,
        "method": options.method.value,
        "preset": options.preset.value,
        "text_encoders": options.text_encoders.value,
        "clamp_quantile": "off" if options.clamp_quantile is None else f"{options.clamp_quantile:g}",
        "min_relative_delta": f"{options.min_relative_delta:g}",
        "factor_dtype": _dtype_name(options.factor_dtype),
        "arch": pair.arch.value if pair.arch is not None else "generic",
        "base": str(base.name),
        "tuned": str(tuned.name),
        **({"include": ",".join(options.include)} if options.include else {}),
        **({"exclude": ",".join(options.exclude)} if options.exclude else {}),
    }


def _metadata(lora: Lora, title: str, params: Mapping[str, str]) -> dict[str, str]:
    return dict(build_metadata(lora, title=title, method="extract", params=dict(params)))

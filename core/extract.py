"""Extract the LoRA that best reproduces ``tuned − base``, layer by layer, streaming.

For every selected layer of the key table::

    read both tensors (one layer per side in memory; fused q/k/v rows sliced)
    upcast to fp32, then subtract            ΔW = W_tuned − W_base, as a matrix (conv flattened)
    finite check                             NonFiniteError names the key and the side
    near-zero check                          ‖ΔW‖_F / ‖W_base‖_F < min_relative_delta → skipped
    decompose(ΔW, k = policy.needed_values)  svd.decompose (exact: Gram + partial eigh)
    select_rank                              rank.select_rank; a partial spectrum that cannot
                                             decide (sv_cumulative) is recomputed in full
    split, (clamp), reshape                  up = U_r·diag(S_r), down = Vh_r, alpha = r (scale 1)

A background thread reads and converts the next layer while the current one decomposes (a bounded
queue of ``options.prefetch`` layers), so I/O and the fp16 → fp32 conversion use the second core.

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
  ``error`` is measured before that cast (fp32 math throughout). A layer whose factors overflow fp16
  keeps fp32 factors and says so. Pass ``factor_dtype=torch.float32`` for exact factors.
* **Device**: ``None`` means CUDA when available, else CPU, decided at call time.
* **Threads**: ``None`` leaves torch's setting alone; ``threads=n`` sets torch and scipy's OpenBLAS
  (``svd.set_threads``) for the run and restores torch's count after. On a busy 2-core machine
  2 torch threads were 6–16× *slower* than 1 (measured: SD1.5 attention layers, 13 CPU-s / 21 s
  wall at 1 thread vs 87–193 CPU-s / 125–329 s wall at 2, spinning OpenMP threads); the prefetch
  thread already overlaps reading with the decomposition, so ``threads=1`` is the safe choice
  there, more threads on an idle many-core machine.
* **Spectra**: :func:`extract_detailed` returns an :class:`ExtractResult` holding, besides the
  LoRA and the report, each layer's :class:`~.rank.Spectrum` (the values the rank was chosen from)
  for :mod:`.spectrum` plots. :func:`extract` returns just ``(Lora, Report)``.
* **Clamp** (off by default): both factors are clamped to ±the q-quantile of ``|values|``, the
  quantile taken on a seeded random sample of at most 200 000 values (``torch.quantile`` refuses
  inputs over 2²⁴ elements). The reported error is then the true error of the clamped factors.
"""

from __future__ import annotations

import enum
import fnmatch
import math
import queue
import threading
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterator, Mapping, Sequence

import torch

from .archs import Component, KeyTable, LayerPreset, LayerSpec
from .clip import DEFAULT_TE_THRESHOLD, EncoderDiff, text_encoder_report
from .errors import NonFiniteError, RankwiseError
from .memory import release_free_memory
from .metadata import build_metadata
from .progress import ProgressFn, report as report_progress
from .rank import RankChoice, RankPolicy, Spectrum, select_rank
from .report import LayerStat, Report
from .sources import KeyStyle, PairReport, WeightSource, layer_source_key, preflight
from .svd import Decomposition, SvdMethod, decompose, set_threads, split_factors, sum_squares
from .types import LayerKind, Lora, LoraLayer, as_matrix, factors_to_layer_shapes

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

    ``include``/``exclude`` are patterns on kohya layer names: shell-style globs (``*attn2*``), or a
    plain substring when a pattern has no ``*?[`` characters. A layer is kept when it matches some
    ``include`` pattern (or ``include`` is empty) and no ``exclude`` pattern.
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
    prefetch: int = 1  # layers read ahead by the background thread (0: read in the main thread)
    seed: int = 0

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
    policies: Sequence[RankPolicy],
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
    policies: Sequence[RankPolicy],
    options: ExtractOptions,
    *,
    progress: ProgressFn | None = None,
    title: str = "",
) -> list[ExtractResult]:
    if not policies:
        raise ValueError("extract_sweep needs at least one rank policy")
    return _run(base, tuned, tuple(policies), options, progress, title)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` → CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def layer_selected(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """The include/exclude rule of :class:`ExtractOptions` for one kohya layer name."""
    def hit(pattern: str) -> bool:
        if any(c in pattern for c in "*?["):
            return fnmatch.fnmatchcase(name, pattern)
        return pattern in name

    if include and not any(hit(p) for p in include):
        return False
    return not any(hit(p) for p in exclude)


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------


@dataclass
class _Item:
    """One layer, read and converted by the prefetcher."""

    spec: LayerSpec
    delta: Tensor | None = None  # fp32 matrix m × n (conv flattened)
    fro2: float = 0.0
    base_norm: float = 0.0
    error: BaseException | None = None


@dataclass
class _Out:
    """What one policy accumulates."""

    policy: RankPolicy
    layers: dict[str, LoraLayer] = field(default_factory=dict)
    stats: list[LayerStat] = field(default_factory=list)
    kept_fp32: list[str] = field(default_factory=list)


def _run(
    base: WeightSource,
    tuned: WeightSource,
    policies: tuple[RankPolicy, ...],
    options: ExtractOptions,
    progress: ProgressFn | None,
    title: str,
) -> list[ExtractResult]:
    table, pair = preflight(base, tuned, key_style=options.key_style)
    notes: list[str] = list(pair.notes)

    components, encoders = _choose_components(base, tuned, table, pair, options, notes)
    selected = table.select(options.preset, components)
    specs = tuple(s for s in selected if layer_selected(s.kohya, options.include, options.exclude))
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
    outs = [_Out(p) for p in policies]
    spectra: dict[str, Spectrum] = {}
    old_threads = torch.get_num_threads()
    if options.threads is not None:
        set_threads(options.threads)
    try:
        with _Prefetcher(base, tuned, present, options.key_style, device, options.prefetch) as items:
            for done, item in enumerate(items, start=1):
                if item.error is not None:
                    raise item.error
                rel = _relative(item)
                if rel < options.min_relative_delta:
                    stat = _near_zero_stat(item, rel)
                    for out in outs:
                        out.stats.append(stat)
                else:
                    spectra[item.spec.kohya] = _layer(item, outs, options, device, done)
                item.delta = None
                report_progress(progress, done, len(present), item.spec.kohya)
    finally:
        if options.threads is not None:
            set_threads(old_threads)
        release_free_memory()

    near_zero = sum(1 for s in outs[0].stats if s.status == "skipped")
    if near_zero:
        notes.append(f"{near_zero} near-zero layers skipped (‖ΔW‖/‖W‖ < {options.min_relative_delta:g})")
    if options.clamp_quantile is not None:
        notes.append(f"factors clamped at the {options.clamp_quantile:g}-quantile of |values| "
                     f"(sampled, ≤ {CLAMP_SAMPLE} values per layer)")
    frozen_spectra = MappingProxyType(spectra)
    return [_result(out, notes, base, tuned, options, pair, encoders, frozen_spectra, title) for out in outs]


def _relative(item: _Item) -> float:
    """‖ΔW‖_F / ‖W_base‖_F (0 for 0/0, inf for a change of an all-zero weight)."""
    if item.base_norm > 0:
        return math.sqrt(item.fro2) / item.base_norm
    return 0.0 if item.fro2 == 0 else math.inf


def _near_zero_stat(item: _Item, rel: float) -> LayerStat:
    norm = math.sqrt(item.fro2)
    return LayerStat(
        name=item.spec.kohya, kind=item.spec.kind.value, shape=item.spec.shape, rank=0, norm=norm,
        retained=0.0 if item.fro2 > 0 else 1.0, error=norm, optimal_error=norm,
        status="skipped", note=f"near-zero (‖ΔW‖/‖W‖ = {rel:.2g})",
    )


def _result(out: _Out, notes: list[str], base: WeightSource, tuned: WeightSource, options: ExtractOptions,
            pair: PairReport, encoders: tuple[EncoderDiff, ...], spectra: Mapping[str, Spectrum],
            title: str) -> ExtractResult:
    out_notes = list(notes)
    if out.kept_fp32:
        out_notes.append(f"{len(out.kept_fp32)} layers kept fp32 factors (values beyond "
                         f"{_dtype_name(options.factor_dtype)} range): {', '.join(out.kept_fp32[:5])}")
    fallbacks = sum(1 for s in out.stats if s.status == "fallback")
    if fallbacks:
        out_notes.append(f"{fallbacks} layers needed an SVD fallback (see their notes)")
    params = _params(base, tuned, out.policy, options, pair)
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


def _layer(item: _Item, outs: list[_Out], options: ExtractOptions, device: torch.device, index: int) -> Spectrum:
    """Decompose one ΔW once and emit a layer per policy. Returns the spectrum used."""
    spec = item.spec
    a = item.delta
    m, n = a.shape
    p = min(m, n)
    kind, is_te = spec.kind, spec.is_text_encoder
    k = max(out.policy.needed_values(p, kind, is_te) for out in outs)
    dec = _decompose(a, k, options, device, full=False, name=spec.kohya)
    choices = [_choose(dec, out.policy, kind, is_te) for out in outs]
    if not all(c.certain for c in choices):
        dec = _decompose(a, k, options, device, full=True, name=spec.kohya)
        choices = [_choose(dec, out.policy, kind, is_te) for out in outs]
    spectrum = dec.spectrum
    norm = math.sqrt(item.fro2)
    base_note = "; ".join(dec.notes)
    for out, choice in zip(outs, choices):
        r = choice.rank
        up, down = split_factors(dec, r)
        up, down = up.float(), down.float()
        error = dec.error(r)
        note = base_note
        if options.clamp_quantile is not None:
            up, down = _clamp(up, down, options.clamp_quantile, options.seed + index)
            error = _true_error(a, up, down)
        up_t, down_t = factors_to_layer_shapes(up, down, spec.shape)
        up_s, down_s, kept32 = _store(up_t, down_t, options.factor_dtype)
        if kept32:
            out.kept_fp32.append(spec.kohya)
            note = "; ".join(x for x in (note, f"kept fp32 (beyond {_dtype_name(options.factor_dtype)} range)") if x)
        layer = LoraLayer(up=up_s, down=down_s, alpha=float(r))
        out.layers[spec.kohya] = layer
        out.stats.append(LayerStat(
            name=spec.kohya,
            kind=kind.value,
            shape=spec.shape,
            rank=r,
            retained=spectrum.retained(r),
            error=float(error),
            optimal_error=float(dec.optimal_error(r)),
            norm=norm,
            nbytes=layer.nbytes(),
            status="fallback" if dec.notes else "ok",
            note=note,
        ))
    return spectrum


def _choose(dec: Decomposition, policy: RankPolicy, kind: LayerKind, is_te: bool) -> RankChoice:
    return select_rank(dec.spectrum, policy.rule, cap=policy.cap(kind, is_te), min_rank=policy.min_rank,
                       kohya_compat=policy.kohya_compat)


def _decompose(a: Tensor, k: int, options: ExtractOptions, device: torch.device, *, full: bool, name: str) -> Decomposition:
    try:
        return decompose(a, k, method=options.method, full_spectrum=full, device=device, seed=options.seed)
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
    u, d = up.to(dtype), down.to(dtype)
    if bool(torch.isfinite(u).all()) and bool(torch.isfinite(d).all()):
        return u.contiguous(), d.contiguous(), False
    return up.float().contiguous(), down.float().contiguous(), True


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------
# Prefetching reader
# ---------------------------------------------------------------------------------------------


class _Prefetcher:
    """Reads, upcasts and subtracts layers ahead of the consumer in a daemon thread.

    With ``depth == 0`` it works synchronously in the caller's thread. Errors travel in the item and
    are raised by the consumer; closing (or leaving the ``with``) stops the thread.
    """

    def __init__(self, base: WeightSource, tuned: WeightSource, specs: Sequence[LayerSpec], style: KeyStyle,
                 device: torch.device, depth: int) -> None:
        self._base, self._tuned = base, tuned
        self._specs = tuple(specs)
        self._style = style
        self._device = device
        self._depth = depth
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._cache: tuple[str, Tensor, Tensor] | None = None

    def __enter__(self) -> Iterator[_Item]:
        if self._depth == 0:
            return (self._read(s) for s in self._specs)
        self._queue = queue.Queue(maxsize=self._depth)
        self._thread = threading.Thread(target=self._work, name="rankwise-extract-prefetch", daemon=True)
        self._thread.start()
        return self._consume()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:  # unblock a producer waiting on a full queue
                    self._queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread.join()
        self._cache = None

    def _consume(self) -> Iterator[_Item]:
        for _ in self._specs:
            item = self._queue.get()
            yield item
            if item.error is not None:
                return

    def _work(self) -> None:
        for spec in self._specs:
            if self._stop.is_set():
                return
            item = self._read(spec)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item.error is not None:
                return
        self._cache = None

    def _pair(self, key: str, fused: bool) -> tuple[Tensor, Tensor]:
        """Both stored tensors of ``key`` on the device, not upcast; kept while the layers of a fused
        q/k/v tensor are read."""
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2]
        self._cache = None
        w = self._base.get(key).to(self._device)
        t = self._tuned.get(key).to(self._device)
        if fused:
            self._cache = (key, w, t)
        return w, t

    def _read(self, spec: LayerSpec) -> _Item:
        try:
            key, rows = layer_source_key(spec, self._style)
            w, t = self._pair(key, rows is not None)
            if rows is not None:
                w, t = w[rows[0]:rows[1]], t[rows[0]:rows[1]]
            if tuple(w.shape) != tuple(spec.shape) or tuple(t.shape) != tuple(spec.shape):
                raise RankwiseError(f"layer {spec.kohya}: tensor {key} has shapes {list(w.shape)} (base) and "
                                    f"{list(t.shape)} (tuned), expected {list(spec.shape)}")
            d = _difference(w, t)
            if not bool(torch.isfinite(d).all()):
                raise _non_finite(key, spec, (("base", self._base, w), ("tuned", self._tuned, t)))
            mat = as_matrix(d)
            return _Item(spec, mat, sum_squares(mat), math.sqrt(sum_squares(w)))
        except BaseException as e:  # noqa: BLE001 — handed to the consumer
            return _Item(spec, error=e)


def _difference(w: Tensor, t: Tensor) -> Tensor:
    """``t − w`` in fp32, both sides upcast before subtracting, without an fp32 copy of ``w``."""
    if w.dtype == torch.float64 or t.dtype == torch.float64:
        return (t.double() - w.double()).float()
    d = t.to(torch.float32, copy=True)
    if w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        w = w.float()
    return d.sub_(w)  # w is converted element by element inside the kernel


def _non_finite(key: str, spec: LayerSpec, sides: Sequence[tuple[str, WeightSource, Tensor]]) -> NonFiniteError:
    bad = [f"{side} checkpoint {src.name!r}" for side, src, x in sides if not bool(torch.isfinite(x.float()).all())]
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


def _params(base: WeightSource, tuned: WeightSource, policy: RankPolicy, options: ExtractOptions,
            pair: PairReport) -> dict[str, str]:
    return {
        "rule": str(policy.rule),
        "policy": policy.describe(),
        "method": options.method.value,
        "preset": options.preset.value,
        "text_encoders": options.text_encoders.value,
        "clamp_quantile": "off" if options.clamp_quantile is None else f"{options.clamp_quantile:g}",
        "min_relative_delta": f"{options.min_relative_delta:g}",
        "factor_dtype": _dtype_name(options.factor_dtype),
        "arch": pair.arch.value,
        "base": str(base.name),
        "tuned": str(tuned.name),
        **({"include": ",".join(options.include)} if options.include else {}),
        **({"exclude": ",".join(options.exclude)} if options.exclude else {}),
    }


def _metadata(lora: Lora, title: str, params: Mapping[str, str]) -> dict[str, str]:
    return dict(build_metadata(lora, title=title, method="extract", params=dict(params)))

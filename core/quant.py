"""fp8 inputs: plain ``float8_e4m3fn`` / ``float8_e5m2`` weights and ComfyUI's *scaled fp8*.

Plain fp8 weights are read as stored and upcast to fp32 (exact: every fp8 value is an fp32 value).

Scaled fp8 (ComfyUI ``comfy/ops.py scaled_fp8_ops``): a Linear weight is stored in fp8 with a
``<module>.scale_weight`` tensor beside it, and the real weight is ``fp8 value × scale``
(``convert_weight``); the file carries a ``scaled_fp8`` marker key (``model_detection``), and may
hold ``<module>.scale_input`` (activation scales, irrelevant to the weights). ComfyUI's newer
quantised layout names the same factor ``<module>.weight_scale`` (with ``input_scale`` and a
``comfy_quant`` descriptor); both spellings are read. A scale is a scalar or one value per
output row.

:class:`ScalePlan` finds the scales of one file from its key names, shapes and dtypes only, and
refuses (:class:`QuantError`) a scale without its weight, a scale whose shape does not fit the
weight, and an fp8 weight with no scale in a file that is scaled fp8 (marker or other scales
present): ComfyUI would read that weight with scale 1, which for a weight quantised with a scale
is wrong by the missing factor. :func:`dequantize` forms ``fp32(weight) · fp32(scale)`` (one fp32
rounding; checked finite and non-zero). The scale, marker and input-scale keys are hidden from
the keys a source lists.

Rounding report: fp8 keeps m = 3 (e4m3) or 2 (e5m2) mantissa bits. Rounding a value in
[2ᵉ, 2ᵉ⁺¹) to nearest leaves an error uniform in ±2ᵉ⁻ᵐ⁻¹ (RMS 2ᵉ⁻ᵐ/√12); over values spread
evenly through a binade, E[(2ᵉ/x)²] = 1/2, so the relative RMS error is 2⁻ᵐ/√24: ≈2.6 % (e4m3)
and ≈5.1 % (e5m2) of ‖W‖ (measured on Gaussian weights with a per-tensor scale: 2.64 % / 5.26 %). The rounding in ΔW = W_t − W_b is then estimated
as ``sqrt(Σ_fp8 sides (ρ·‖W_side‖)²)``. :func:`rounding_notes` says where that estimate is larger
than what the chosen rank leaves out (the layer's reported error): there the LoRA is already as
close to ``tuned − base`` as the fp8 inputs themselves are, and a higher rank only adds noise.
Sources that dequantise record ``(‖W‖_F, dtype)`` of every fp8 tensor they hand out in
``quant_reads`` (no second read of the file is needed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch

from .errors import FormatError

Tensor = torch.Tensor

FP8_MANTISSA_BITS: dict[torch.dtype, int] = {}
for _attr, _bits in (("float8_e4m3fn", 3), ("float8_e4m3fnuz", 3), ("float8_e5m2", 2), ("float8_e5m2fnuz", 2)):
    if hasattr(torch, _attr):
        FP8_MANTISSA_BITS[getattr(torch, _attr)] = _bits

SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
"""``<module><suffix>`` scales ``<module>.weight``."""

HIDDEN_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
MARKER = "scaled_fp8"
"""ComfyUI's marker key (``<prefix>scaled_fp8``, an empty tensor whose dtype is the fp8 type)."""

_MAX_LISTED = 8


class QuantError(FormatError):
    """An fp8 scale is missing, does not fit its weight, or is not a usable number."""


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_MANTISSA_BITS


def relative_rounding(dtype: torch.dtype) -> float:
    """Estimated RMS relative rounding error of storing values in ``dtype`` (0 for non-fp8)."""
    bits = FP8_MANTISSA_BITS.get(dtype)
    if bits is None:
        return 0.0
    return 2.0 ** -bits / math.sqrt(24.0)


def _is_marker(key: str) -> bool:
    return key == MARKER or key.endswith("." + MARKER)


def is_quant_key(key: str) -> bool:
    """A scale, input scale, quantisation descriptor or marker key (never a weight of its own)."""
    return _is_marker(key) or key.endswith(SCALE_SUFFIXES) or key.endswith(HIDDEN_SUFFIXES)


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" … and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


@dataclass(frozen=True)
class ScalePlan:
    """The scales of one file: ``scales`` maps a weight key to its scale key; ``hidden`` are the keys
    a source does not list (scales, markers, input scales)."""

    scales: Mapping[str, str] = field(default_factory=dict)
    hidden: frozenset[str] = frozenset()
    scaled: bool = False  # the file is scaled fp8 (marker or any scale present)

    @property
    def empty(self) -> bool:
        return not self.scales and not self.hidden


def plan_scales(
    name: str,
    keys: Iterable[str],
    shape: Callable[[str], tuple[int, ...]],
    dtype: Callable[[str], torch.dtype],
) -> ScalePlan:
    """Find and check the scales of a file from key names, shapes and dtypes (no tensor is read).

    Raises:
        QuantError: a scale with no weight beside it, a scale whose shape is neither a scalar nor
            one value per output row of its weight, or an fp8 weight without a scale in a file that
            is scaled fp8.
    """
    keys = list(keys)
    keyset = set(keys)
    scales: dict[str, str] = {}
    hidden: set[str] = set()
    orphans: list[str] = []
    misfits: list[str] = []
    marker = False
    for key in keys:
        if _is_marker(key):
            hidden.add(key)
            marker = True
            continue
        if key.endswith(HIDDEN_SUFFIXES):
            hidden.add(key)
            continue
        for suffix in SCALE_SUFFIXES:
            if key.endswith(suffix):
                hidden.add(key)
                weight = key[: -len(suffix)] + ".weight"
                if weight not in keyset:
                    orphans.append(key)
                elif not _fits(shape(key), shape(weight)):
                    misfits.append(f"{key} {list(shape(key))} for {weight} {list(shape(weight))}")
                else:
                    scales[weight] = key
                break
    if orphans:
        raise QuantError(f"{name}: {len(orphans)} fp8 scales have no weight beside them: {_listing(orphans)}")
    if misfits:
        raise QuantError(
            f"{name}: {len(misfits)} fp8 scales do not fit their weight (a scale is a scalar or one value "
            f"per output row): {_listing(misfits)}"
        )
    scaled = marker or bool(scales)
    if scaled:
        missing = [k for k in keys if k.endswith(".weight") and k not in scales and k not in hidden
                   and is_fp8(dtype(k))]
        if missing:
            raise QuantError(
                f"{name} is a scaled-fp8 file, but {len(missing)} fp8 weights have no scale_weight beside "
                f"them: {_listing(missing)}; their real values are unknown (the file is incomplete or was "
                f"converted wrongly); use a complete file or the bf16/fp16 original"
            )
    return ScalePlan(scales=scales, hidden=frozenset(hidden), scaled=scaled)


def _fits(scale_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> bool:
    numel = 1
    for s in scale_shape:
        numel *= int(s)
    if numel == 1:
        return True
    if not weight_shape or numel != int(weight_shape[0]):
        return False
    # (out,) or (out, 1, …): one value per output row
    return int(scale_shape[0]) == int(weight_shape[0]) and all(int(s) == 1 for s in scale_shape[1:])


def dequantize(weight: Tensor, scale: Tensor, *, key: str, name: str) -> Tensor:
    """``fp32(weight) · fp32(scale)`` (scale a scalar or one value per output row).

    Raises:
        QuantError: the scale holds NaN/Inf or a zero.
    """
    s = scale.detach().to(device=weight.device, dtype=torch.float32)
    if not bool(torch.isfinite(s).all()) or bool((s == 0).any()):
        raise QuantError(f"{name}: the fp8 scale of {key} is not a usable number ({s.flatten()[:4].tolist()})")
    w = weight.to(torch.float32, copy=True)
    if s.numel() == 1:
        return w.mul_(s.reshape(()))
    return w.mul_(s.reshape((w.shape[0],) + (1,) * (w.dim() - 1)))


class QuantReads(dict):
    """``key → (‖W‖_F of the dequantised tensor, stored fp8 dtype)`` of every fp8 tensor handed out."""

    def record(self, key: str, value: Tensor, dtype: torch.dtype) -> None:
        if is_fp8(dtype):
            self[key] = (math.sqrt(float(torch.sum(value.double() ** 2))), dtype)


def read(get: Callable[[str], Tensor], key: str, plan: ScalePlan, reads: QuantReads | None, name: str) -> Tensor:
    """One tensor of a file: dequantised when it has a scale, recorded in ``reads`` when fp8."""
    raw = get(key)
    dtype = raw.dtype
    scale_key = plan.scales.get(key)
    if scale_key is not None:
        out = dequantize(raw, get(scale_key), key=key, name=name)
    elif is_fp8(dtype):
        out = raw.to(torch.float32)
    else:
        return raw
    if reads is not None:
        reads.record(key, out, dtype)
    return out


def read_dtype(stored: torch.dtype, key: str, plan: ScalePlan) -> torch.dtype:
    """The dtype :func:`read` hands out for ``key``."""
    return torch.float32 if key in plan.scales or is_fp8(stored) else stored


# --------------------------------------------------------------------------------------------
# Report


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _noise(key: str, sides: Sequence[object]) -> tuple[float, torch.dtype | None]:
    total = 0.0
    worst: torch.dtype | None = None
    for src in sides:
        reads = getattr(src, "quant_reads", None) or {}
        got = reads.get(key)
        if got is None:
            continue
        norm, dtype = got
        total += (relative_rounding(dtype) * norm) ** 2
        if worst is None or relative_rounding(dtype) > relative_rounding(worst):
            worst = dtype
    return math.sqrt(total), worst


def rounding_notes(base: object, tuned: object, stats: Sequence[object], keys: Mapping[str, str]) -> list[str]:
    """Report notes on fp8 inputs: in how many decomposed layers the estimated fp8 rounding of ΔW is
    larger than what the chosen rank leaves out, and how many ΔW are below that rounding at all.

    ``stats`` are the report's :class:`~.report.LayerStat`; ``keys`` maps a layer name to the source
    key it was read from. Returns ``[]`` when no fp8 tensor was read.
    """
    if not (getattr(base, "quant_reads", None) or getattr(tuned, "quant_reads", None)):
        return []
    fp8_layers = 0
    below: list[tuple[float, str, int]] = []
    drowned = 0
    dtypes: set[str] = set()
    for stat in stats:
        key = keys.get(stat.name)
        if key is None:
            continue
        noise, dtype = _noise(key, (base, tuned))
        if dtype is None:
            continue
        fp8_layers += 1
        dtypes.add(str(dtype).replace("torch.", ""))
        if stat.status == "skipped":
            continue
        if noise > stat.norm:
            drowned += 1
        if 0 < stat.rank < min(stat.shape[0], _numel(stat.shape[1:])) and noise > stat.error:
            below.append((noise / max(stat.error, 1e-30), stat.name, stat.rank))
    if not fp8_layers:
        return []
    notes = [f"{fp8_layers} layers read from fp8 weights ({', '.join(sorted(dtypes))}), dequantised to fp32"]
    if below:
        below.sort(reverse=True)
        worst = ", ".join(f"{name} (rank {r}, {ratio:.1f}×)" for ratio, name, r in below[:3])
        notes.append(
            f"fp8 rounding of the inputs (estimated) is larger than what the chosen rank leaves out in "
            f"{len(below)} of {fp8_layers} fp8 layers — worst: {worst}; there a lower rank loses nothing "
            f"that the fp8 inputs really hold"
        )
    if drowned:
        notes.append(f"{drowned} fp8 layers change by less than the fp8 rounding itself (‖ΔW‖ below it): "
                     f"mostly quantisation noise")
    return notes

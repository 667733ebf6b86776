"""Safetensors metadata for LoRAs: kohya ``ss_*`` keys, SAI ModelSpec ``modelspec.*`` keys, Rankwise's
own ``rankwise.*`` record, and kohya's ``sshs_*`` hashes.

Conventions followed (kohya-ss/sd-scripts ``networks/extract_lora_from_models.py``, ``resize_lora.py``,
``library/sai_model_spec.py``, ``library/train_util.py``):

* every value is a string (safetensors rejects anything else); nested values are JSON strings;
* ``ss_network_dim`` / ``ss_network_alpha``: the shared rank / alpha of the linear and 1×1 layers
  (alpha written as a float, ``"16.0"``), ``"Dynamic"`` when they vary;
* ``ss_network_args``: JSON with ``conv_dim`` / ``conv_alpha`` (strings) when 3×3 conv layers exist;
* ModelSpec 1.0.1: SDXL LoRAs name the Stability implementation URL, SD1/SD2 LoRAs ``"diffusers"``;
  date is ISO-8601 local time without microseconds.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from typing import Iterable, Mapping, Sequence

import torch

from .stream_write import SafetensorsPlan, StreamItem, iter_data, plan_safetensors
from .types import Arch, LayerKind, Lora, LoraLayer

Tensor = torch.Tensor

def _from_records(key: str) -> dict[Arch, str]:
    from .archs import records  # the architecture records (core/data/archs) hold these strings

    return {r.arch: r.metadata[key] for r in records() if key in r.metadata}


BASE_MODEL_VERSION: dict[Arch, str] = _from_records("ss_base_model_version")
MODELSPEC_ARCH: dict[Arch, str] = _from_records("modelspec.architecture")
MODELSPEC_IMPLEMENTATION: dict[Arch, str] = _from_records("modelspec.implementation")
RESOLUTION: dict[Arch, str] = _from_records("modelspec.resolution")
SAI_MODEL_SPEC_VERSION = "1.0.1"
NETWORK_MODULE = "networks.lora"
DYNAMIC = "Dynamic"

# Bytes above which hashes are computed from a temporary file instead of an in-memory copy.


def _arch_metadata(lora: Lora, carried: Mapping[str, str]) -> dict[str, str]:
    """The record's metadata strings for ``lora.arch``: the size its layers fit (SD3 large), and a
    variant the carried ``ss_base_model_version`` names (SD2 ``sd_v2_v`` → v-prediction)."""
    from .archs import record
    from .formats import _size_fitting

    rec = record(lora.arch)
    size = _size_fitting(lora) if len(rec.size_metadata) else "full"
    variant = next((name for name, m in rec.metadata_variants.items()
                    if m.get("ss_base_model_version") == carried.get("ss_base_model_version")), None)
    return rec.metadata_for(size, variant)


def rankwise_version() -> str:
    try:
        from importlib.metadata import version

        return version("rankwise")
    except Exception:  # not installed (running from a checkout)
        return "0+unknown"


def _shared(values: Sequence[float]) -> float | None:
    distinct = set(values)
    return values[0] if len(distinct) == 1 else None


def _dim_alpha(layers: Sequence[LoraLayer]) -> tuple[str, str]:
    if not layers:
        return DYNAMIC, DYNAMIC
    rank = _shared([layer.rank for layer in layers])
    alpha = _shared([float(layer.alpha) for layer in layers])
    return (
        DYNAMIC if rank is None else str(int(rank)),
        DYNAMIC if alpha is None or rank is None else str(float(alpha)),
    )


def network_fields(lora: Lora) -> dict[str, str]:
    """``ss_network_module``, ``ss_network_dim``, ``ss_network_alpha``, ``ss_network_args`` for ``lora``."""
    low_rank = [l for l in lora.layers.values() if isinstance(l, LoraLayer)]
    linear = [l for l in low_rank if l.kind is not LayerKind.CONV]
    conv = [l for l in low_rank if l.kind is LayerKind.CONV]
    dim, alpha = _dim_alpha(linear)
    args: dict[str, str] = {}
    if conv:
        args["conv_dim"], args["conv_alpha"] = _dim_alpha(conv)
    return {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": dim,
        "ss_network_alpha": alpha,
        "ss_network_args": json.dumps(args),
    }


def iso_date(timestamp: float | None = None) -> str:
    ts = int(time.time() if timestamp is None else timestamp)
    return datetime.datetime.fromtimestamp(ts).isoformat()


def build_metadata(
    lora: Lora,
    *,
    title: str,
    method: str,
    params: Mapping[str, str],
    merged_from: Sequence[str] = (),
    carry: Mapping[str, str] | None = None,
    comment: str | None = None,
    timestamp: float | None = None,
) -> dict[str, str]:
    """Metadata for a LoRA Rankwise writes (all values are strings).

    Args:
        lora: the result; its layers give dim/alpha, its ``arch`` the base-model keys (omitted when None).
        title: ``modelspec.title``.
        method: what made it (``"extract"``, ``"resize"``, ``"merge"``) → ``rankwise.method``.
        params: the options used → ``rankwise.params`` (JSON of strings).
        merged_from: input titles/names → ``modelspec.merged_from`` (comma-joined).
        carry: ``ss_*`` training keys of the input(s) to carry forward; Rankwise's own values override
            them. Other keys in ``carry`` are ignored.
        comment: appended to the carried ``ss_training_comment`` (``"old; new"``).
        timestamp: seconds since the epoch for ``modelspec.date`` (default: now).
    """
    out: dict[str, str] = {}
    carried = {str(k): str(v) for k, v in (carry or {}).items() if str(k).startswith("ss_")}
    out.update(carried)
    out.update(network_fields(lora))
    arch = lora.arch
    spec: dict[str, str] = {}
    if arch is not None:
        spec = _arch_metadata(lora, carried)
        out["ss_base_model_version"] = spec["ss_base_model_version"]
        out["ss_v2"] = str(arch is Arch.SD2)
    old_comment = carried.get("ss_training_comment", "")
    if comment:
        out["ss_training_comment"] = f"{old_comment}; {comment}" if old_comment else comment
    out["modelspec.sai_model_spec"] = SAI_MODEL_SPEC_VERSION
    for key in ("modelspec.architecture", "modelspec.implementation", "modelspec.resolution",
                "modelspec.prediction_type"):
        if key in spec:
            out[key] = spec[key]
    out["modelspec.title"] = str(title)
    out["modelspec.date"] = iso_date(timestamp)
    if merged_from:
        out["modelspec.merged_from"] = ", ".join(str(m) for m in merged_from)
    out["rankwise.version"] = rankwise_version()
    out["rankwise.method"] = str(method)
    out["rankwise.params"] = json.dumps({str(k): str(v) for k, v in params.items()}, sort_keys=True)
    return out


# --------------------------------------------------------------------------------------------
# kohya / sd-webui-additional-networks hashes


LEGACY_HASH_WINDOW = (0x100000, 0x100000 + 0x10000)  # bytes of the file the legacy hash covers


def safetensors_file_hashes(path: str | os.PathLike) -> tuple[str, str]:
    """(addnet model hash, addnet legacy hash) of a .safetensors file as it is on disk.

    Model hash: SHA-256 of every byte after the 8-byte length and the JSON header. Legacy hash: first 8
    hex digits of the SHA-256 of the 0x10000 bytes at offset 0x100000 (empty input for small files).
    """
    model = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(2**20), b""):
            model.update(chunk)
        lo, hi = LEGACY_HASH_WINDOW
        f.seek(lo)
        legacy = hashlib.sha256(f.read(hi - lo)).hexdigest()[:8]
    return model.hexdigest(), legacy


def plan_hashes(plan: SafetensorsPlan) -> tuple[str, str]:
    """(addnet model hash, legacy hash) of the file ``plan`` describes, streaming its tensors.

    Same definitions as :func:`safetensors_file_hashes`; each tensor is produced once and dropped.
    """
    model = hashlib.sha256()
    legacy = hashlib.sha256()
    lo, hi = LEGACY_HASH_WINDOW

    def window(chunk: memoryview, pos: int) -> None:
        a, b = max(lo, pos), min(hi, pos + len(chunk))
        if a < b:
            legacy.update(chunk[a - pos: b - pos])

    window(memoryview(plan.header), 0)
    pos = len(plan.header)
    for chunk in iter_data(plan):
        model.update(chunk)
        window(chunk, pos)
        pos += len(chunk)
    return model.hexdigest(), legacy.hexdigest()[:8]


def kohya_hash_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The metadata kohya serialises when it hashes a LoRA: the ``ss_*`` keys only."""
    return {str(k): str(v) for k, v in metadata.items() if str(k).startswith("ss_")}


def streamed_hashes(items: Iterable[StreamItem], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` exactly as kohya's ``precalculate_safetensors_hashes``,
    for tensors given as stream items (produced one at a time: no serialisation is held in memory).

    kohya serialises the tensors with only the ``ss_*`` metadata and hashes that byte string (see
    :func:`safetensors_file_hashes`). The model hash covers the tensor data only, so it equals the
    addnet hash of any file holding the same tensors; the legacy hash depends on the header length.
    """
    return plan_hashes(plan_safetensors(items, kohya_hash_metadata(metadata)))


def safetensors_hashes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """:func:`streamed_hashes` of an in-memory state dict."""
    return streamed_hashes(
        [(k, tuple(t.shape), t.dtype, (lambda t=t: t)) for k, t in tensors.items()], metadata
    )

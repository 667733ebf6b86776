"""Random checkpoints and LoRAs generated from the key tables, with planted deltas.

Used by tests, benchmarks and the CLI demo. Everything is deterministic: a tensor depends only on
``(seed, name)``, so the base file, the tuned file and the returned deltas can be produced
independently, one tensor at a time. Files are written by :func:`write_safetensors_streaming`
(header first, then each tensor's bytes as it is produced), so even a full-size SDXL pair
(2 × 6.9 GB in fp16) is written with a peak memory of a few layers.

Weights are ``N(0, 0.02²)``. A planted ΔW has Frobenius norm ``scale · 0.02 · √numel`` (the
expected norm of the weight), so ``scale`` is relative to the weight's norm.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch

from .archs import Component, FileLayout, KeyTable, LayerPreset, LayerSpec, key_table, layout_names
from .stream_write import Producer, StreamItem, parse_dtype, write_safetensors_streaming
from .types import Arch, Lora, LoraLayer, factors_to_layer_shapes

WEIGHT_STD = 0.02

# --------------------------------------------------------------------------------------------
# Planted deltas
# --------------------------------------------------------------------------------------------


class DeltaKind(str, enum.Enum):
    LOWRANK = "lowrank"  # planted rank-k ΔW (σ linearly 1 → 0.5, then normalised) + optional noise
    HEAVY_TAIL = "heavy_tail"  # full rank, σᵢ ∝ i^-0.5, like a full fine-tune
    NONE = "none"  # ΔW = 0: the tuned file equals the base file


@dataclass(frozen=True)
class PlantedDelta:
    """What :func:`planted_delta` plants in each layer.

    Attributes:
        kind: the spectrum of ΔW.
        rank: the planted rank for ``LOWRANK`` (capped at min(out, in·kh·kw)).
        noise: dense Gaussian noise added to a ``LOWRANK`` ΔW, as a fraction of its norm.
        scale: ‖ΔW‖_F relative to the weight's expected norm ``0.02·√numel``.
        components: the networks that get a delta; the others are left unchanged.
    """

    kind: DeltaKind = DeltaKind.LOWRANK
    rank: int = 8
    noise: float = 0.0
    scale: float = 0.01
    components: frozenset[Component] = frozenset(Component)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", DeltaKind(self.kind))
        object.__setattr__(self, "components", frozenset(Component(c) for c in self.components))
        if self.rank < 1:
            raise ValueError(f"planted rank must be ≥ 1, got {self.rank}")
        if self.noise < 0 or self.scale < 0 or not (math.isfinite(self.noise) and math.isfinite(self.scale)):
            raise ValueError(f"noise and scale must be finite and ≥ 0, got {self.noise}, {self.scale}")


def _generator(seed: int, name: str, purpose: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}\0{purpose}\0{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen))
    return q


def planted_delta(spec: LayerSpec, delta: PlantedDelta, *, seed: int) -> torch.Tensor:
    """The fp32 ΔW of ``spec.shape`` planted in this layer (a delta, not a weight).

    Deterministic per ``(seed, spec.kohya)``; zero when ``delta.kind`` is ``NONE`` or the layer's
    component is not in ``delta.components``.
    """
    if delta.kind is DeltaKind.NONE or spec.component not in delta.components:
        return torch.zeros(spec.shape)
    m, n = spec.shape[0], math.prod(spec.shape[1:])
    p = min(m, n)
    gen = _generator(seed, spec.kohya, "delta")
    if delta.kind is DeltaKind.LOWRANK:
        k = min(delta.rank, p)
        sigma = torch.linspace(1.0, 0.5, k)
    else:
        k = p
        sigma = torch.arange(1, p + 1, dtype=torch.float32).pow(-0.5)
    u = _orthonormal(m, k, gen)
    v = _orthonormal(n, k, gen)
    dw = (u * sigma) @ v.T
    if delta.kind is DeltaKind.LOWRANK and delta.noise > 0:
        noise = torch.randn(m, n, generator=gen)
        dw += noise * (delta.noise * dw.norm() / noise.norm())
    target = delta.scale * WEIGHT_STD * math.sqrt(m * n)
    dw *= target / dw.norm()
    return dw.reshape(spec.shape)



# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _base_tensor(table: KeyTable, key: str, seed: int) -> torch.Tensor:
    shape = table.checkpoint_shape(key)
    return torch.randn(shape, generator=_generator(seed, key, "weight")) * WEIGHT_STD


def random_weights(table: KeyTable, *, seed: int = 0, dtype: torch.dtype = torch.float16) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(checkpoint key, full unsliced weight)`` for every source tensor of the table.

    Weights are ``N(0, 0.02²)``, deterministic per ``(seed, key)``, generated lazily.
    """
    for key in table.checkpoint_keys():
        yield key, _base_tensor(table, key, seed).to(dtype)


def _extra_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Plausible filler for a non-table key (same in both files of a pair)."""
    if key.endswith("position_ids"):
        n = shape[-1] if shape else 1
        return torch.arange(n, dtype=torch.int64).expand(shape).to(dtype).contiguous()
    if not (dtype.is_floating_point or dtype.is_complex):
        return torch.zeros(shape, dtype=dtype)
    if key.endswith("logit_scale"):
        return torch.full(shape, math.log(100.0), dtype=dtype)
    if key.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1 and key.endswith("weight"):  # 1-D weights in SD are GroupNorm/LayerNorm scales
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=_generator(seed, key, "extra")) * WEIGHT_STD).to(dtype)


def write_checkpoint_pair(
    base_path: str | os.PathLike,
    tuned_path: str | os.PathLike,
    arch: Arch,
    *,
    size: str = "tiny",
    delta: PlantedDelta = PlantedDelta(),
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    extra_layout: Mapping[str, tuple[Sequence[int], str]] | None = None,
    return_deltas: bool | None = None,
    fsync: bool = False,
    keep: Callable[[str], bool] | None = None,
    layouts: tuple[FileLayout | str, FileLayout | str] = (FileLayout.CHECKPOINT, FileLayout.CHECKPOINT),
) -> dict[str, torch.Tensor]:
    """Write a base and a tuned original-layout checkpoint whose difference is planted.

    tuned = cast(base_fp32 + ΔW) for every table layer (fused q/k/v tensors get each third's
    ΔW in its rows); ``extra_layout`` keys are identical in both files.

    Args:
        base_path, tuned_path: the two .safetensors files (written atomically, streaming).
        arch, size: which key table (``"tiny"`` or ``"full"``).
        delta: what to plant (see :class:`PlantedDelta`).
        seed: base weights and deltas depend only on ``(seed, name)``.
        dtype: storage dtype of the table weights.
        extra_layout: more keys to fill, ``key → (shape, dtype name)`` such as
            ``{"cond_stage_model.transformer.text_model.embeddings.position_ids": ([1, 77], "I64")}``
            (position_ids become ``arange``, 1-D weights (norms) ones, biases zeros, the rest small noise).
        return_deltas: return the planted deltas; default: only for ``size="tiny"``.
        fsync: flush both files to disk (synthetic data: off by default; the rename is atomic anyway).
        keep: which checkpoint keys (table and extra) to write, e.g. :func:`reduced_depth` for a
            Flux with one double and one single block at real width.
        layouts: the file layout of the base and the tuned file (:class:`archs.FileLayout`):
            ``checkpoint`` (as the table names them), ``comfy`` / ``bare`` (the diffusion model only,
            ``diffusion_model.`` / no prefix) or ``diffusers`` (table weights only, fused q/k/v split
            into diffusers' modules).

    Returns:
        The planted fp32 ΔW keyed by kohya name (non-zero layers only), or ``{}`` if not asked.
        Note the files hold ``cast(W + ΔW) − cast(W)``, which differs from ΔW by the rounding of
        ``dtype``.
    """
    if os.path.abspath(base_path) == os.path.abspath(tuned_path):
        raise ValueError(f"base and tuned paths are the same file: {os.fspath(base_path)!r}")
    table = key_table(arch, size)
    keep_deltas = (size == "tiny") if return_deltas is None else return_deltas
    extras = {}
    for key, (shape, dt) in (extra_layout or {}).items():
        if table.by_checkpoint_key(key):
            raise ValueError(f"extra_layout key {key!r} is a table layer of {table.arch.value}; remove it")
        extras[key] = (tuple(int(s) for s in shape), parse_dtype(dt))
    planted: dict[str, torch.Tensor] = {}
    meta = {
        "rankwise.synthetic": json.dumps(
            {"arch": table.arch.value, "size": size, "seed": seed, "delta": delta.kind.value,
             "rank": delta.rank, "noise": delta.noise, "scale": delta.scale,
             "components": sorted(c.value for c in delta.components)},
            sort_keys=True,
        )
    }

    def base(key: str) -> Producer:
        return lambda: _base_tensor(table, key, seed).to(dtype)

    def tuned(key: str) -> Producer:
        def produce() -> torch.Tensor:
            weight = _base_tensor(table, key, seed)
            for spec in table.by_checkpoint_key(key):
                dw = planted_delta(spec, delta, seed=seed)
                if spec.rows is None:
                    weight += dw
                else:
                    weight[spec.rows[0]: spec.rows[1]] += dw
                if keep_deltas and (delta.kind is not DeltaKind.NONE and spec.component in delta.components):
                    planted[spec.kohya] = dw
            return weight.to(dtype)

        return produce

    def extra(key: str, shape: tuple[int, ...], dt: torch.dtype) -> Producer:
        return lambda: _extra_tensor(key, shape, dt, seed)

    def items(make: Callable[[str], Producer]) -> list[StreamItem]:
        out: list[StreamItem] = [(k, table.checkpoint_shape(k), dtype, make(k)) for k in table.checkpoint_keys()]
        out += [(k, shape, dt, extra(k, shape, dt)) for k, (shape, dt) in extras.items()]
        return [item for item in out if keep is None or keep(item[0])]

    base_layout, tuned_layout = (FileLayout(x) for x in layouts)
    write_safetensors_streaming(base_path, relayout(items(base), table, base_layout), meta, fsync=fsync)
    write_safetensors_streaming(tuned_path, relayout(items(tuned), table, tuned_layout), meta, fsync=fsync)
    return planted


def reduced_depth(arch: Arch, *, double: int = 1, single: int = 1, joint: int | None = None,
                  text_encoders: bool = False) -> Callable[[str], bool]:
    """A ``keep`` filter for :func:`write_checkpoint_pair`: the first ``double``/``single`` Flux blocks
    (or ``joint`` SD3 blocks), every non-block key, and the text encoders only when asked."""
    from .archs import record

    prefix = record(arch).diffusion_prefixes.checkpoint
    limits = {"double_blocks.": double, "single_blocks.": single, "joint_blocks.": joint}

    def keep(key: str) -> bool:
        if not key.startswith(prefix):
            return text_encoders
        rest = key[len(prefix):]
        for head, limit in limits.items():
            if rest.startswith(head) and limit is not None:
                return int(rest[len(head):].split(".", 1)[0]) < limit
        return True

    return keep


def relayout(items: Sequence[StreamItem], table: KeyTable, layout: FileLayout) -> list[StreamItem]:
    """Stream items named in checkpoint keys, renamed to another file layout (see
    :func:`write_checkpoint_pair`); a fused weight diffusers splits becomes one item per part."""
    from .archs import record

    layout = FileLayout(layout)
    if layout is FileLayout.CHECKPOINT:
        return list(items)
    pre = record(table.arch).diffusion_prefixes
    out: list[StreamItem] = []
    for key, shape, dt, produce in items:
        if not key.startswith(pre.checkpoint):
            continue  # text encoders: a diffusion-model-only file has none
        module = key[len(pre.checkpoint):]
        if layout is FileLayout.COMFY:
            out.append((pre.comfy + module, shape, dt, produce))
        elif layout is FileLayout.BARE:
            out.append((module, shape, dt, produce))
        else:
            specs = table.by_checkpoint_key(key)
            if not specs:
                continue  # biases and norms: the table's weights only
            spec = specs[0]
            strip = layout is FileLayout.DIFFUSERS
            for name, part_shape in layout_names(spec, table, layout):
                path = (pre.diffusers if strip else "") + name[: -len(".weight")]
                pieces = [s for s in spec.splits if s.path == path]
                out.append((name, part_shape, dt, _part_producer(produce, pieces, part_shape)))
    return out


def _part_producer(produce: Producer, pieces, shape: tuple[int, ...]) -> Producer:
    if not pieces:
        return produce

    def make() -> torch.Tensor:
        full = produce()
        part = torch.empty(shape, dtype=full.dtype)
        for s in pieces:
            dst = s.part_rows or (0, s.rows[1] - s.rows[0])
            part[dst[0]:dst[1]] = full[s.rows[0]:s.rows[1]]
        return part

    return make


# --------------------------------------------------------------------------------------------
# LoRAs
# --------------------------------------------------------------------------------------------


def random_lora(
    table: KeyTable,
    *,
    rank: int = 8,
    seed: int = 0,
    preset: LayerPreset = LayerPreset.ATTN_MLP,
    alpha: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Lora:
    """A Lora with random factors for every layer of ``table.select(preset)``.

    ``down`` rows are ~unit norm, ``up`` entries ~1e-2/√r, so ΔW is small next to a 0.02-std
    weight. ``alpha`` defaults to the rank (scale 1). The rank is capped at min(out, in·kh·kw).
    Deterministic per ``(seed, kohya name)``.
    """
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    layers = {}
    for spec in table.select(preset):
        m, n = spec.shape[0], math.prod(spec.shape[1:])
        r = min(rank, m, n)
        gen = _generator(seed, spec.kohya, "lora")
        down = torch.randn(r, n, generator=gen) / math.sqrt(n)
        up = torch.randn(m, r, generator=gen) * (1e-2 / math.sqrt(r))
        up, down = factors_to_layer_shapes(up, down, spec.shape)
        layers[spec.kohya] = LoraLayer(up=up.to(dtype), down=down.to(dtype), alpha=float(r if alpha is None else alpha))
    return Lora(layers=layers, metadata={}, arch=table.arch)

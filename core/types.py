"""The values that cross module boundaries: LoRA layers, the LoRA itself, architectures.

Scaling convention (one for the whole project)
----------------------------------------------
For a low-rank layer with factors ``up`` (out × r) and ``down`` (r × in·kh·kw)::

    ΔW = (alpha / r) · up @ down          reshaped to the weight's shape

Conv weights are flattened as ``(out, in, kh, kw) -> (out, in·kh·kw)``; a conv LoRA stores
``down`` as ``(r, in, kh, kw)`` and ``up`` as ``(out, r, 1, 1)``. A Conv3d weight (5-D, e.g. a video
model's patch embedding) is flattened the same way, ``(out, in, kt, kh, kw) -> (out, in·kt·kh·kw)``,
with ``down`` ``(r, in, kt, kh, kw)`` and ``up`` ``(out, r, 1, 1, 1)``. A LoCon/Tucker layer keeps a
``mid`` of shape ``(r, r, kh, kw)`` with ``down`` ``(r, in, 1, 1)``; its flattened down factor is
``mid ×₁ down`` (see :meth:`LoraLayer.down_matrix`).

Tensors inside these values are never modified in place; the dataclasses are frozen.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Union

import torch

Tensor = torch.Tensor


class Arch(str, enum.Enum):
    """Model families whose key tables Rankwise ships."""

    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    FLUX = "flux"  # Flux.1 dev / schnell and their fine-tunes
    SD3 = "sd3"  # SD3 medium, SD3.5 medium / large (sizes of one record)
    CHROMA = "chroma"  # lodestones/Chroma: Flux.1-schnell blocks, one distilled_guidance_layer for every modulation


class LayerKind(str, enum.Enum):
    LINEAR = "linear"
    CONV1X1 = "conv1x1"
    CONV = "conv"  # any kernel larger than 1×1 (3×3 in SD; Conv3d kernels too)
    # A 1-D weight (norm), a bias or another parameter (e.g. a modulation table): never factorised,
    # only stored exactly (``.diff`` / ``.diff_b``).
    VECTOR = "vector"

    @staticmethod
    def of_shape(shape: tuple[int, ...]) -> "LayerKind":
        if len(shape) == 2:
            return LayerKind.LINEAR
        if len(shape) in (4, 5):
            kernel = 1
            for s in shape[2:]:
                kernel *= int(s)
            return LayerKind.CONV1X1 if kernel == 1 else LayerKind.CONV
        return LayerKind.VECTOR


class LayerStatus(str, enum.Enum):
    """What happened to one layer of an operation (the report's ``status`` column, a string in JSON)."""

    OK = "ok"
    FALLBACK = "fallback"  # written, but the decomposition needed a rung of the fallback ladder
    SKIPPED = "skipped"  # not written; ``SkipReason`` says why


class SkipReason(str, enum.Enum):
    """Why a layer was not written."""

    NEAR_ZERO = "near_zero"  # extract: ‖ΔW‖/‖W‖ below the threshold
    EMPTY = "empty"  # ΔW is exactly zero, cancels in a merge, or has weight 0
    FILTERED = "filtered"  # left out by the LayerFilter
    NON_FINITE = "non_finite"  # NaN/Inf in an input (the operation then raises NonFiniteError)


def as_matrix(weight: Tensor) -> Tensor:
    """View a Linear/Conv2d/Conv3d weight (or delta) as the 2-D matrix ``out × in·k…``."""
    if weight.dim() == 2:
        return weight
    if weight.dim() in (4, 5):
        return weight.flatten(1)
    raise ValueError(f"expected a 2-D, 4-D or 5-D weight, got shape {tuple(weight.shape)}")


def factors_to_layer_shapes(
    up: Tensor, down: Tensor, weight_shape: tuple[int, ...]
) -> tuple[Tensor, Tensor]:
    """Reshape 2-D factors ``up`` (out × r), ``down`` (r × in·kh·kw) to a weight's layout."""
    r = down.shape[0]
    if len(weight_shape) == 2:
        return up, down
    out_ch, in_ch, kernel = weight_shape[0], weight_shape[1], tuple(weight_shape[2:])
    ones = (1,) * len(kernel)
    return up.reshape(out_ch, r, *ones), down.reshape(r, in_ch, *kernel)


@dataclass(frozen=True, eq=False)
class LoraLayer:
    """One low-rank module: ΔW = (alpha / rank) · up @ down (module docstring)."""

    up: Tensor
    down: Tensor
    alpha: float
    mid: Tensor | None = None

    def __post_init__(self) -> None:
        r = self.down.shape[0]
        if self.up.shape[1] != r:
            raise ValueError(
                f"up {tuple(self.up.shape)} and down {tuple(self.down.shape)} disagree on the rank"
            )
        if self.mid is not None and tuple(self.mid.shape[:2]) != (r, r):
            raise ValueError(f"mid {tuple(self.mid.shape)} does not match rank {r}")
        if not math.isfinite(float(self.alpha)):
            raise ValueError(f"alpha is not finite: {self.alpha}")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @property
    def weight_shape(self) -> tuple[int, ...]:
        out_features = int(self.up.shape[0])
        if self.down.dim() == 2:
            return (out_features, int(self.down.shape[1]))
        in_ch = int(self.down.shape[1])
        if self.mid is not None:
            return (out_features, in_ch) + tuple(int(s) for s in self.mid.shape[2:])
        return (out_features, in_ch) + tuple(int(s) for s in self.down.shape[2:])

    @property
    def kind(self) -> LayerKind:
        return LayerKind.of_shape(self.weight_shape)

    def up_matrix(self) -> Tensor:
        """``up`` as an fp32 (out × r) matrix, without the alpha/rank scale."""
        return self.up.reshape(self.up.shape[0], self.rank).float()

    def down_matrix(self) -> Tensor:
        """``down`` as an fp32 (r × in·kh·kw) matrix, with a Tucker ``mid`` folded in."""
        down = self.down.float()
        if self.mid is None:
            return down.reshape(self.rank, -1)
        d2 = down.reshape(self.rank, -1)  # (r, in) for a (r, in, 1, 1) down
        # D'[a, i, h, w] = Σ_b mid[a, b, h, w] · down[b, i]
        folded = torch.einsum("abhw,bi->aihw", self.mid.float(), d2)
        return folded.reshape(self.rank, -1)

    def delta(self) -> Tensor:
        """The dense fp32 ΔW in the weight's shape."""
        return (self.scale * (self.up_matrix() @ self.down_matrix())).reshape(self.weight_shape)

    def nbytes(self) -> int:
        parts = [self.up, self.down] + ([self.mid] if self.mid is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)


@dataclass(frozen=True, eq=False)
class DiffLayer:
    """A dense ΔW (LyCORIS full ``diff``, or a densified LoHa/LoKr) in the weight's shape."""

    diff: Tensor

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.diff.shape)

    @property
    def kind(self) -> LayerKind:
        return LayerKind.of_shape(self.weight_shape)

    @property
    def rank(self) -> int:
        """The rank of the stored matrix as a container, i.e. min(out, in·kh·kw) (1 for a 1-D weight)."""
        if self.diff.dim() not in (2, 4, 5):
            return 1
        return int(min(as_matrix(self.diff).shape))

    def delta(self) -> Tensor:
        return self.diff.float()

    def nbytes(self) -> int:
        return self.diff.numel() * self.diff.element_size()


@dataclass(frozen=True, eq=False)
class BiasDiffLayer(DiffLayer):
    """The exact Δ of a module's bias, saved as ``<module>.diff_b`` (ComfyUI's bias patch).

    In a :class:`Lora` it is keyed ``<module>`` + :data:`BIAS_SUFFIX`, beside the module's weight
    layer (if any) keyed ``<module>``.
    """

    @property
    def kind(self) -> LayerKind:
        return LayerKind.VECTOR

    @property
    def rank(self) -> int:
        return 1


BIAS_SUFFIX = ".bias"
"""Lora layer-name suffix of a :class:`BiasDiffLayer` (``diffusion_model.x.bias`` → ``diffusion_model.x.diff_b``)."""


def bias_module(name: str) -> str:
    """The module a bias layer name belongs to (``a.b.bias`` → ``a.b``)."""
    return name[: -len(BIAS_SUFFIX)] if name.endswith(BIAS_SUFFIX) else name


LayerDelta = Union[LoraLayer, DiffLayer, BiasDiffLayer]


def _frozen(mapping: Mapping) -> Mapping:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, eq=False)
class Lora:
    """The LoRA value on graph edges and between core functions.

    ``layers`` is keyed by the kohya module name (``lora_unet_…``, ``lora_te1_…``), which is
    also what the files store. ``metadata`` is string → string (safetensors' rule).
    """

    layers: Mapping[str, LayerDelta]
    metadata: Mapping[str, str] = field(default_factory=dict)
    arch: Arch | None = None

    def __post_init__(self) -> None:
        for k, v in self.metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"metadata must be str → str; {k!r} has {type(v).__name__}")
        object.__setattr__(self, "layers", _frozen(self.layers))
        object.__setattr__(self, "metadata", _frozen(self.metadata))

    def __len__(self) -> int:
        return len(self.layers)

    def ranks(self) -> dict[str, int]:
        return {name: layer.rank for name, layer in self.layers.items()}

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers.values())

    def replace(
        self,
        *,
        layers: Mapping[str, LayerDelta] | None = None,
        metadata: Mapping[str, str] | None = None,
        arch: Arch | None = None,
    ) -> "Lora":
        return Lora(
            layers=self.layers if layers is None else layers,
            metadata=self.metadata if metadata is None else metadata,
            arch=self.arch if arch is None else arch,
        )

    def with_metadata(self, **updates: str) -> "Lora":
        merged = dict(self.metadata)
        merged.update(updates)
        return self.replace(metadata=merged)

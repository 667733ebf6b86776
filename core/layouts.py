"""Full checkpoint layouts, and file layouts: how one file names an architecture's weights.

Two things live here:

* **Full layouts** (every key, shape and dtype of a real checkpoint). The key tables in
  :mod:`.archs` list only the LoRA-targetable layers; a checkpoint that a real loader (ComfyUI,
  A1111, diffusers' single-file loader) accepts also needs norms, biases, embeddings and the VAE.
  UNet records name a ``core/data/<name>_layout.json`` (``{key: [shape, dtype]}``, taken from real
  checkpoints); DiT layouts (Flux, SD3) are generated from the record
  (:func:`archs.diffusion_layout`). :func:`extra_layout` is the part a synthetic checkpoint writer
  must fill besides the table layers.
* **File layouts** (:class:`archs.FileLayout`): the same architecture arrives as an all-in-one
  checkpoint (``model.diffusion_model.…``), a ComfyUI state dict (``diffusion_model.…``), a
  diffusion-model-only file (``double_blocks.…`` / ``input_blocks.…``, no prefix) or a diffusers
  model file (``transformer_blocks.…`` with q/k/v split, ``down_blocks.…``). :func:`canonical_source`
  shows any of them under the checkpoint keys of the key table, so a base and a tuned model shipped
  in different layouts are matched layer for layer by the architecture record.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from types import MappingProxyType
from typing import Iterable, Mapping

import torch

from .archs import (
    Component,
    Detection,
    FileLayout,
    Family,
    KeyTable,
    LayerSpec,
    arch_label,
    detect_file,
    diffusion_layout,
    key_table,
    layout_names,
    record,
)
from .errors import FormatError
from .types import Arch

Layout = Mapping[str, tuple[tuple[int, ...], str]]
DIT_LAYOUT_DTYPE = "bfloat16"  # how Flux / SD3.5 diffusion models ship


@functools.lru_cache(maxsize=None)
def _load(arch: Arch) -> Layout:
    rec = record(arch)
    if rec.family is not Family.UNET:
        prefix = rec.diffusion_prefixes.checkpoint
        return MappingProxyType({prefix + k: (tuple(s), DIT_LAYOUT_DTYPE) for k, s in diffusion_layout(arch).items()})
    name = rec.layout_file
    if not name:
        raise FormatError(f"the {arch.value} record names no layout file")
    try:
        raw = json.loads(resources.files(__package__).joinpath("data", name).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FormatError(f"cannot read the {arch.value} layout data file core/data/{name}: {e}") from e
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for key, value in raw.items():
        try:
            shape, dtype = value
            out[key] = (tuple(int(s) for s in shape), str(dtype))
        except (TypeError, ValueError) as e:
            raise FormatError(f"core/data/{name}: entry {key!r} is not [shape, dtype]: {value!r}") from e
    return MappingProxyType(out)


def load_layout(arch: Arch) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every key of a full original-format checkpoint of ``arch``: ``key → (shape, dtype name)``.

    Dtype names are torch names (``"float16"``, ``"int64"``). DiT records give the diffusion model
    only (``model.diffusion_model.…``, bfloat16). Returns a fresh dict.
    """
    return dict(_load(Arch(arch)))


def extra_layout(arch: Arch) -> dict[str, tuple[tuple[int, ...], str]]:
    """The layout minus the source keys of the full key table (what ``write_checkpoint_pair`` fills)."""
    arch = Arch(arch)
    table_keys = frozenset(key_table(arch, "full").checkpoint_keys())
    return {k: v for k, v in _load(arch).items() if k not in table_keys}


# ---------------------------------------------------------------------------------------------
# File layouts
# ---------------------------------------------------------------------------------------------


def _source_shapes(source) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(s) for s in source.shape(k)) for k in source.keys()}


def detect_source(source) -> Detection:
    """Architecture, size and file layout of a :class:`~.sources.WeightSource` (keys and shapes only)."""
    known = getattr(source, "detection", None)
    if isinstance(known, Detection):
        return known
    try:
        return detect_file(_source_shapes(source))
    except FormatError as e:
        raise FormatError(f"{getattr(source, 'name', 'source')}: {e}") from None


def describe_source(source) -> str:
    """``"Flux.1 (flux), a diffusion-model-only file (no prefix)"``, or why it is not recognised."""
    try:
        return detect_source(source).describe()
    except FormatError:
        return "not a recognised model layout"


@functools.lru_cache(maxsize=None)
def _plan(arch: Arch, size: str, layout: FileLayout) -> Mapping[str, tuple[tuple[str, tuple[int, int] | None], ...]]:
    """checkpoint key → the file keys (and row pieces) it is read from, for the table's layers."""
    table = key_table(arch, size)
    plan: dict[str, tuple[tuple[str, tuple[int, int] | None], ...]] = {}
    for spec in table.layers:
        if spec.checkpoint_key in plan:
            continue
        names = layout_names(spec, table, layout)
        if not names:
            continue
        if spec.rows is not None and layout is not FileLayout.CHECKPOINT:
            continue  # OpenCLIP's fused in_proj exists only in the checkpoint layout
        if spec.component is Component.UNET and spec.splits and layout in (FileLayout.DIFFUSERS,
                                                                          FileLayout.DIFFUSERS_PIPELINE):
            strip = layout is FileLayout.DIFFUSERS
            pre = record(arch).diffusion_prefixes.diffusers
            pieces = []
            for s in sorted(spec.splits, key=lambda s: s.rows):
                path = s.path[len(pre):] if strip and s.path.startswith(pre) else s.path
                pieces.append((path + ".weight", s.part_rows))
            plan[spec.checkpoint_key] = tuple(pieces)
        else:
            plan[spec.checkpoint_key] = ((names[0][0], None),)
    return MappingProxyType(plan)


class LayoutSource:
    """A :class:`~.sources.WeightSource` showing a file of another layout under checkpoint keys.

    Only the key table's layers are shown (and, for diffusers files, fused weights are the row
    concatenation of their parts, in the original order: ``qkv = [to_q; to_k; to_v]``). ``layout``
    and ``detection`` say what the file is.
    """

    def __init__(self, inner, detection: Detection) -> None:
        self._inner = inner
        self.detection = detection
        self.layout = detection.layout
        self.name = getattr(inner, "name", "source")
        self.path = getattr(inner, "path", None)
        self.metadata: Mapping[str, str] = dict(getattr(inner, "metadata", None) or {})
        inner_keys = set(inner.keys())
        plan = _plan(detection.arch, detection.size, detection.layout)
        self._map = {k: v for k, v in plan.items() if all(p[0] in inner_keys for p in v)}

    @property
    def inner(self):
        return self._inner

    @property
    def notes(self) -> tuple[str, ...]:
        return tuple(getattr(self._inner, "notes", ()) or ())

    def stored_key(self, key: str) -> str:
        """The file's own name of a shown key (the first part of a fused weight)."""
        name = self._map[key][0][0] if key in self._map else key
        fn = getattr(self._inner, "stored_key", None)
        return fn(name) if callable(fn) else name

    def te_layouts(self) -> dict:
        fn = getattr(self._inner, "te_layouts", None)
        return dict(fn()) if callable(fn) else {}

    def keys(self) -> Iterable[str]:
        return self._map.keys()

    def __contains__(self, key: object) -> bool:
        return key in self._map

    def shape(self, key: str) -> tuple[int, ...]:
        pieces = self._map[key]
        if len(pieces) == 1 and pieces[0][1] is None:
            return tuple(int(s) for s in self._inner.shape(pieces[0][0]))
        rows, rest = 0, ()
        for name, part in pieces:
            shape = tuple(int(s) for s in self._inner.shape(name))
            rows += (part[1] - part[0]) if part is not None else shape[0]
            rest = shape[1:]
        return (rows,) + rest

    def dtype(self, key: str) -> torch.dtype:
        name = self._map[key][0][0]
        fn = getattr(self._inner, "dtype", None)
        return fn(name) if callable(fn) else self._inner.get(name).dtype

    def get(self, key: str) -> torch.Tensor:
        pieces = self._map[key]
        if len(pieces) == 1 and pieces[0][1] is None:
            return self._inner.get(pieces[0][0])
        parts = []
        for name, part in pieces:
            t = self._inner.get(name)
            parts.append(t[part[0]:part[1]] if part is not None else t)
        return torch.cat(parts, dim=0)

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "LayoutSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LayoutSource({self.name!r}, {self.detection.describe()})"


def canonical_source(source):
    """``source`` itself when it is an all-in-one checkpoint (or not recognised), else a
    :class:`LayoutSource` showing it under the key table's checkpoint keys."""
    if isinstance(source, LayoutSource):
        return source
    try:
        found = detect_file(_source_shapes(source))
    except FormatError:
        return source
    if found.layout is FileLayout.CHECKPOINT:
        return source
    return LayoutSource(source, found)


def layout_of(source) -> FileLayout | None:
    """The file layout of ``source`` (a view's original layout), or None when not recognised."""
    if isinstance(source, LayoutSource):
        return source.layout
    try:
        return detect_source(source).layout
    except FormatError:
        return None


def describe_pair(base, tuned) -> tuple[str, str]:
    """What each of two sources is, in words (for preflight notes and errors)."""
    def words(src) -> str:
        if isinstance(src, LayoutSource):
            return src.detection.describe()
        return describe_source(src)

    return words(base), words(tuned)


__all__ = [
    "LayoutSource",
    "canonical_source",
    "describe_pair",
    "describe_source",
    "detect_source",
    "extra_layout",
    "layout_of",
    "load_layout",
]

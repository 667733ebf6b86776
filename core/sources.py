"""Where weights come from: a file read tensor by tensor, a state dict, or a re-keyed view.

A :class:`WeightSource` is anything that lists its keys, tells a key's shape without loading it, and
hands out one tensor at a time (any dtype, CPU is fine). The extraction engine only ever holds the
tensors of one layer per side, so a source backed by a memory-mapped ``.safetensors`` file keeps the
anonymous memory of a whole SDXL pair under a few hundred MB.

:func:`preflight` checks that two sources form a pair Rankwise can subtract: the same architecture,
the same layer keys and the same shapes. It returns the key table of that architecture (full-size or
the tiny test variant, whichever the shapes match) and a :class:`PairReport`.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Protocol, runtime_checkable

import torch

from . import quant
from .archs import Component, FileLayout, KeyTable, LayerSpec, arch_label, arch_sizes, detect_file, key_table
from .errors import FormatError, MismatchError
from .types import Arch

Tensor = torch.Tensor

_SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
_MAX_LISTED = 20


@runtime_checkable
class WeightSource(Protocol):
    """Weights, key by key. ``get`` may return any dtype on any device; callers upcast."""

    name: str

    def keys(self) -> Iterable[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def get(self, key: str) -> Tensor: ...


def source_dtype(source: WeightSource, key: str) -> torch.dtype:
    """A key's dtype, without loading the tensor when the source can tell (``dtype(key)``)."""
    fn = getattr(source, "dtype", None)
    if callable(fn):
        return fn(key)
    return source.get(key).dtype


def source_path(source: WeightSource) -> Path | None:
    """The file behind a source, if any (used to refuse writing over an input)."""
    path = getattr(source, "path", None)
    return Path(path) if path is not None else None


class StateDictSource:
    """An in-memory mapping key → tensor (tests, ComfyUI adapters, loaded ``.ckpt`` files)."""

    def __init__(self, tensors: Mapping[str, Tensor], name: str = "state dict", path: str | os.PathLike | None = None) -> None:
        self._tensors = tensors
        self.name = name
        self.path = None if path is None else Path(path)
        self.metadata: Mapping[str, str] = {}

    def keys(self) -> Iterable[str]:
        return self._tensors.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def get(self, key: str) -> Tensor:
        return self._tensors[key]

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def close(self) -> None:
        pass

    def __enter__(self) -> "StateDictSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StateDictSource({self.name!r}, {len(self._tensors)} tensors)"


# ---------------------------------------------------------------------------------------------
# Older text-encoder layout
# ---------------------------------------------------------------------------------------------

# transformers < 4.21-era SD1 checkpoints store CLIPTextModel's weights without the "text_model."
# level: cond_stage_model.transformer.encoder.layers.0.… instead of …transformer.text_model.encoder.…
HF_TE_CHECKPOINT_PREFIXES = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")
_LEGACY_TE_PARTS = ("encoder.", "embeddings.", "final_layer_norm.")
_CANONICAL_TE_LEVEL = "text_model."


class TELayoutKind(str, enum.Enum):
    """How a checkpoint names its CLIP-L (HF) text encoder."""

    CURRENT = "text_model"  # cond_stage_model.transformer.text_model.encoder.…
    LEGACY = "legacy"  # cond_stage_model.transformer.encoder.… (no "text_model.")


def legacy_te_aliases(keys: Iterable[str]) -> dict[str, str]:
    """``canonical key → stored key`` for text-encoder keys stored in the older layout.

    A legacy key is renamed only when its canonical name is not stored too (no key is hidden).
    """
    stored = set(keys)
    out: dict[str, str] = {}
    for key in stored:
        for prefix in HF_TE_CHECKPOINT_PREFIXES:
            if key.startswith(prefix) and key[len(prefix):].startswith(_LEGACY_TE_PARTS):
                canonical = prefix + _CANONICAL_TE_LEVEL + key[len(prefix):]
                if canonical not in stored:
                    out[canonical] = key
                break
    return out


def _layouts(keys: Iterable[str], alias: Mapping[str, str]) -> dict[str, TELayoutKind]:
    """``prefix → layout`` of each HF text encoder among canonical ``keys`` (LEGACY when renamed)."""
    found: dict[str, TELayoutKind] = {}
    for key in keys:
        for prefix in HF_TE_CHECKPOINT_PREFIXES:
            if key.startswith(prefix + _CANONICAL_TE_LEVEL):
                if key in alias:
                    found[prefix] = TELayoutKind.LEGACY
                else:
                    found.setdefault(prefix, TELayoutKind.CURRENT)
    return found


def te_key_in_layout(key: str, layout: TELayoutKind) -> str:
    """A canonical checkpoint key written in ``layout`` (LEGACY drops the ``text_model.`` level)."""
    if TELayoutKind(layout) is TELayoutKind.LEGACY:
        for prefix in HF_TE_CHECKPOINT_PREFIXES:
            if key.startswith(prefix + _CANONICAL_TE_LEVEL):
                return prefix + key[len(prefix) + len(_CANONICAL_TE_LEVEL):]
    return key


def te_layouts(source: WeightSource) -> dict[str, TELayoutKind]:
    """``checkpoint prefix → layout`` of each HF text encoder present in ``source``."""
    fn = getattr(source, "te_layouts", None)
    if callable(fn):
        return dict(fn())
    return _layouts(source.keys(), {})


def stored_key(source: WeightSource, key: str) -> str:
    """The name ``key`` has in the file behind ``source`` (differs for the older TE layout)."""
    fn = getattr(source, "stored_key", None)
    return fn(key) if callable(fn) else key


class LegacyTextEncoderView:
    """A source whose older-layout text-encoder keys are shown under the canonical
    ``…transformer.text_model.…`` names; :meth:`stored_key` gives back a key's stored name."""

    def __init__(self, inner: WeightSource, aliases: Mapping[str, str] | None = None) -> None:
        self._inner = inner
        self.name = getattr(inner, "name", "source")
        self.path = source_path(inner)
        self.metadata: Mapping[str, str] = dict(getattr(inner, "metadata", None) or {})
        self.notes: tuple[str, ...] = tuple(getattr(inner, "notes", ()) or ())
        self._alias = dict(legacy_te_aliases(inner.keys()) if aliases is None else aliases)
        hidden = set(self._alias.values())
        self._keys = [k for k in inner.keys() if k not in hidden] + list(self._alias)

    def te_layouts(self) -> dict[str, TELayoutKind]:
        return _layouts(self._keys, self._alias)

    def stored_key(self, key: str) -> str:
        return self._alias.get(key, key)

    def keys(self) -> Iterable[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self._inner.shape(self.stored_key(key)))

    def dtype(self, key: str) -> torch.dtype:
        return source_dtype(self._inner, self.stored_key(key))

    def get(self, key: str) -> Tensor:
        return self._inner.get(self.stored_key(key))

    def __contains__(self, key: object) -> bool:
        return key in self._alias or (key in set(self._inner.keys()) and key not in set(self._alias.values()))

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "LegacyTextEncoderView":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LegacyTextEncoderView({self._inner!r}, {len(self._alias)} renamed keys)"


def canonical_te_keys(source: WeightSource) -> WeightSource:
    """``source`` itself, or a :class:`LegacyTextEncoderView` when it stores the older TE layout."""
    aliases = legacy_te_aliases(source.keys())
    return LegacyTextEncoderView(source, aliases) if aliases else source


def layout_notes(base: WeightSource, tuned: WeightSource) -> list[str]:
    """Notes naming the file(s) that store a text encoder in the older layout."""
    lb, lt = te_layouts(base), te_layouts(tuned)
    notes: list[str] = []
    for prefix in HF_TE_CHECKPOINT_PREFIXES:
        b, t = lb.get(prefix), lt.get(prefix)
        if TELayoutKind.LEGACY not in (b, t):
            continue

        def says(layout: TELayoutKind | None) -> str:
            if layout is TELayoutKind.LEGACY:
                return f"the older layout ({prefix}encoder.*, no 'text_model.')"
            return f"the current layout ({prefix}text_model.*)" if layout else "no such text encoder"

        if b is t:
            notes.append(f"text encoder: base {base.name!r} and tuned {tuned.name!r} both use {says(b)}; "
                         "read under the current names")
        else:
            notes.append(f"text encoder: base {base.name!r} uses {says(b)}, tuned {tuned.name!r} uses "
                         f"{says(t)}; both read under the current names")
    return notes


class FileSource:
    """A checkpoint file: ``.safetensors`` streamed tensor by tensor, or a safely loaded ``.ckpt``.

    The format is told by the file's first bytes, not its name. ``.ckpt``/``.pt`` files are pickles;
    they are read with ``io.read_state_dict`` (weights only, never arbitrary code) and held in
    memory, so they cost their full size in RAM. A text encoder stored in the older layout (no
    ``text_model.`` level) is shown under the canonical names (:meth:`stored_key` gives the stored
    one). ``notes``: what the loader ignored or told by content.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        from . import io as rw_io  # late: io pulls in safetensors and metadata helpers

        self.path = Path(path)
        self.name = self.path.name
        rw_io.check_input_file(self.path, "checkpoint file")
        self._stream = None
        self._tensors: Mapping[str, Tensor] | None = None
        kind, notes = rw_io.file_kind(str(self.path))
        if kind is rw_io.FileKind.SAFETENSORS:
            self._stream = rw_io.SafetensorsSource(self.path)
            self.metadata: Mapping[str, str] = dict(getattr(self._stream, "metadata", None) or {})
        else:
            loaded = rw_io.read_state_dict(self.path)
            self._tensors, self.metadata = loaded.tensors, dict(loaded.metadata)
            notes = tuple(n for n in loaded.notes if n not in notes) + notes
        self.notes: tuple[str, ...] = tuple(f"{self.name}: {n}" for n in notes)
        stored = self._stream.keys() if self._stream is not None else self._tensors.keys()
        # fp8 / scaled fp8 (core.quant): scales applied on read, scale and marker keys not listed
        self._quant = quant.plan_scales(self.name, stored, self._raw_shape, self._raw_dtype)
        self.quant_reads = quant.QuantReads()
        if self._quant.hidden:
            stored = [k for k in stored if k not in self._quant.hidden]
        self._alias = legacy_te_aliases(stored)
        if self._alias:
            hidden = set(self._alias.values())
            self._keys = [k for k in stored if k not in hidden] + list(self._alias)
        else:
            self._keys = list(stored)

    def stored_key(self, key: str) -> str:
        return self._alias.get(key, key)

    def te_layouts(self) -> dict[str, TELayoutKind]:
        return _layouts(self._keys, self._alias)

    def keys(self) -> Iterable[str]:
        return self._keys

    def _raw_shape(self, key: str) -> tuple[int, ...]:
        if self._stream is not None:
            return tuple(int(s) for s in self._stream.shape(key))
        return tuple(int(s) for s in self._tensors[key].shape)

    def _raw_dtype(self, key: str) -> torch.dtype:
        if self._stream is not None:
            return self._stream.dtype(key)
        return self._tensors[key].dtype

    def _raw_get(self, key: str) -> Tensor:
        if self._stream is not None:
            return self._stream.get(key)
        return self._tensors[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._raw_shape(self.stored_key(key))

    def dtype(self, key: str) -> torch.dtype:
        key = self.stored_key(key)
        return quant.read_dtype(self._raw_dtype(key), key, self._quant)

    def get(self, key: str) -> Tensor:
        """The tensor as stored, except fp8: upcast to fp32, times its scale when it has one."""
        return quant.read(self._raw_get, self.stored_key(key), self._quant, self.quant_reads, self.name)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._tensors = None

    def __enter__(self) -> "FileSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FileSource({str(self.path)!r})"


class PrefixedSource:
    """A re-keyed view: each ``inner prefix → exposed prefix`` pair renames matching keys.

    ``PrefixedSource(comfy_unet_sd, {"diffusion_model.": "model.diffusion_model."})`` shows a ComfyUI
    UNet state dict under checkpoint keys. Keys that match no prefix are hidden unless
    ``keep_unmatched`` is set. The longest matching inner prefix wins.
    """

    def __init__(self, inner: WeightSource, prefixes: Mapping[str, str], *, keep_unmatched: bool = False,
                 name: str | None = None) -> None:
        self._inner = inner
        self._prefixes = sorted(dict(prefixes).items(), key=lambda kv: len(kv[0]), reverse=True)
        self._keep = keep_unmatched
        self.name = name or getattr(inner, "name", "source")
        self.path = source_path(inner)
        self.metadata: Mapping[str, str] = dict(getattr(inner, "metadata", None) or {})
        self._map: dict[str, str] | None = None

    def _mapping(self) -> dict[str, str]:
        if self._map is None:
            out: dict[str, str] = {}
            for key in self._inner.keys():
                for src, dst in self._prefixes:
                    if key.startswith(src):
                        out[dst + key[len(src):]] = key
                        break
                else:
                    if self._keep:
                        out[key] = key
            self._map = out
        return self._map

    def keys(self) -> Iterable[str]:
        return self._mapping().keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self._inner.shape(self._mapping()[key]))

    def dtype(self, key: str) -> torch.dtype:
        return source_dtype(self._inner, self._mapping()[key])

    def get(self, key: str) -> Tensor:
        return self._inner.get(self._mapping()[key])

    @property
    def quant_reads(self) -> dict:
        """The inner source's fp8 reads (core.quant) under the exposed names."""
        reads = getattr(self._inner, "quant_reads", None) or {}
        if not reads:
            return {}
        inverse = {inner: outer for outer, inner in self._mapping().items()}
        return {inverse[k]: v for k, v in reads.items() if k in inverse}

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "PrefixedSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(path: str | os.PathLike) -> WeightSource:
    """Open a checkpoint file as a :class:`WeightSource` (close it, or use ``with``).

    A file in another layout than an all-in-one checkpoint (a diffusion-model-only file, a ComfyUI
    state dict, a diffusers UNet/transformer file) is shown under the checkpoint keys of its
    architecture's key table (:func:`.layouts.canonical_source`), so a base and a tuned model in
    different layouts form a pair.
    """
    from .layouts import canonical_source  # late: layouts imports this module's neighbours

    return canonical_source(FileSource(path))


# ---------------------------------------------------------------------------------------------
# Key styles and the pair check
# ---------------------------------------------------------------------------------------------


class KeyStyle(str, enum.Enum):
    """Which key of a :class:`LayerSpec` names a layer's tensor in a source."""

    CHECKPOINT = "checkpoint"  # original single-file checkpoint (OpenCLIP TEs fused q/k/v)
    COMFY = "comfy"  # ComfyUI model / CLIP state dicts (diffusion_model.…, clip_l.transformer.…)
    GENERIC = "generic"  # no architecture record: layers named by the pair's own keys (core.generic)


def layer_source_key(spec: LayerSpec, style: KeyStyle) -> tuple[str, tuple[int, int] | None]:
    """The source key of a layer and the row slice to take from it (fused q/k/v), per key style."""
    if KeyStyle(style) is KeyStyle.COMFY:
        return spec.comfy_key, None
    return spec.checkpoint_key, spec.rows


def read_layer(source: WeightSource, spec: LayerSpec, style: KeyStyle = KeyStyle.CHECKPOINT) -> Tensor:
    """One layer's weight as stored (rows sliced for fused tensors), not upcast."""
    key, rows = layer_source_key(spec, style)
    t = source.get(key)
    return t[rows[0]:rows[1]] if rows is not None else t


@dataclass(frozen=True)
class PairReport:
    """What :func:`compare_pair` found. ``layers`` counts key-table layers present on both sides."""

    arch: Arch
    keys_compared: int
    layers: int
    missing_in_tuned: tuple[str, ...] = ()
    missing_in_base: tuple[str, ...] = ()
    shape_mismatches: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()
    notes: tuple[str, ...] = ()
    key_style: KeyStyle = KeyStyle.CHECKPOINT
    components: tuple[Component, ...] = ()  # components present on both sides
    size: str = "full"  # which key table matched: "full", "tiny" (or a record's other size)
    base_layout: str = ""  # what the base file is, in words ("Flux.1 (flux), a diffusion-model-only file …")
    tuned_layout: str = ""

    @property
    def ok(self) -> bool:
        return not (self.missing_in_tuned or self.missing_in_base or self.shape_mismatches)


def _shapes(source: WeightSource) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(s) for s in source.shape(k)) for k in source.keys()}


def _detect(source: WeightSource, shapes: Mapping[str, tuple[int, ...]]):
    try:
        return detect_file(shapes)
    except FormatError as e:
        raise FormatError(f"{source.name}: {e}") from None


def _words(source: WeightSource, found) -> str:
    """What a source is: its architecture and, for a layout view, the layout of the file behind it."""
    view = getattr(source, "detection", None)
    return (view or found).describe()


_STYLE_LAYOUT = {"checkpoint": FileLayout.CHECKPOINT, "comfy": FileLayout.COMFY}


def _expected_shape(table: KeyTable, key: str, spec: LayerSpec, style: KeyStyle) -> tuple[int, ...]:
    return table.checkpoint_shape(key) if style is KeyStyle.CHECKPOINT else spec.shape


def _table_keys(table: KeyTable, style: KeyStyle) -> dict[str, tuple[LayerSpec, ...]]:
    """Source key → the layers read from it, in table order."""
    out: dict[str, list[LayerSpec]] = {}
    for spec in table.layers:
        key, _ = layer_source_key(spec, style)
        out.setdefault(key, []).append(spec)
    return {k: tuple(v) for k, v in out.items()}


def _pick_size(arch: Arch, shapes: Mapping[str, tuple[int, ...]], style: KeyStyle) -> str:
    """The key-table size ("full" / "tiny") whose shapes match most of the source's keys."""
    def hits(size: str) -> int:
        table = key_table(arch, size)
        return sum(1 for key, specs in _table_keys(table, style).items()
                   if shapes.get(key) == _expected_shape(table, key, specs[0], style))

    return max(arch_sizes(arch), key=hits)  # ties: the first (full)


def _listing(items: list[str], what: str) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" … and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"{len(items)} {what}: {shown}{more}"


def compare_pair(base: WeightSource, tuned: WeightSource, *,
                 key_style: KeyStyle | str = KeyStyle.CHECKPOINT) -> tuple[KeyTable, PairReport]:
    """Compare two sources without raising on key or shape differences (see :func:`preflight`).

    Raises:
        MismatchError: the two sources are different architectures.
        FormatError: a source's architecture cannot be detected.
    """
    style = KeyStyle(key_style)
    base_shapes, tuned_shapes = _shapes(base), _shapes(tuned)
    found_b, found_t = _detect(base, base_shapes), _detect(tuned, tuned_shapes)
    arch_b, arch_t = found_b.arch, found_t.arch
    words_b, words_t = _words(base, found_b), _words(tuned, found_t)
    if arch_b is not arch_t:
        raise MismatchError(
            f"architectures differ: base {base.name!r} is {arch_b.value.upper()} ({words_b}), tuned "
            f"{tuned.name!r} is {arch_t.value.upper()} ({words_t}); extract from two models of the same "
            "architecture"
        )
    wanted = _STYLE_LAYOUT[style.value]
    off = [(side, src, found) for side, src, found in (("base", base, found_b), ("tuned", tuned, found_t))
           if found.layout is not wanted and found.layout is not FileLayout.DIFFUSERS_PIPELINE]
    if off:
        listing = "; ".join(f"{side} {src.name!r} is {found.describe()}" for side, src, found in off)
        other = [k for k, lay in _STYLE_LAYOUT.items() if all(f.layout is lay for _, _, f in off) and k != style.value]
        hint = (f"use key_style={other[0]!r}" if other and len(off) == 2 else
                "open files with rankwise.core.sources.open_source, which matches any layout of a known "
                "architecture to the checkpoint keys")
        raise MismatchError(f"{listing}, not {wanted.describe()} as key_style={style.value!r} reads; {hint}")
    size, tuned_size = _pick_size(arch_b, base_shapes, style), _pick_size(arch_b, tuned_shapes, style)
    table = key_table(arch_b, size)
    if tuned_size != size:
        raise MismatchError(
            f"model sizes differ: base {base.name!r} matches the {size} {arch_b.value} table, tuned "
            f"{tuned.name!r} the {tuned_size} one"
        )

    by_key = _table_keys(table, style)
    missing_t: list[str] = []
    missing_b: list[str] = []
    mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    compared = 0
    present: dict[Component, list[int]] = {}  # component → [keys on both, base only, tuned only]
    for key, specs in by_key.items():
        comp = specs[0].component
        counts = present.setdefault(comp, [0, 0, 0])
        in_b, in_t = key in base_shapes, key in tuned_shapes
        if in_b and in_t:
            counts[0] += 1
            compared += 1
            if base_shapes[key] != tuned_shapes[key]:
                mismatches.append((key, base_shapes[key], tuned_shapes[key]))
        elif in_b:
            counts[1] += 1
            missing_t.append(key)
        elif in_t:
            counts[2] += 1
            missing_b.append(key)

    notes: list[str] = [*layout_notes(base, tuned), *getattr(base, "notes", ()), *getattr(tuned, "notes", ())]
    components: list[Component] = []
    dropped: set[Component] = set()
    for comp, (both, only_b, only_t) in present.items():
        if both:
            components.append(comp)
        elif comp is not Component.UNET and (only_b or only_t):
            # A whole text encoder absent on one side (e.g. a UNet-only file): leave it out, say so.
            side = tuned.name if only_b else base.name
            notes.append(f"text encoder {comp.value} is absent from {side!r}; it is left out of the comparison")
            dropped.add(comp)
    if dropped:
        missing_t = [k for k in missing_t if by_key[k][0].component not in dropped]
        missing_b = [k for k in missing_b if by_key[k][0].component not in dropped]
    layers = sum(len(specs) for key, specs in by_key.items()
                 if key in base_shapes and key in tuned_shapes and specs[0].component in components)
    report = PairReport(
        arch=arch_b,
        keys_compared=compared,
        layers=layers,
        missing_in_tuned=tuple(missing_t),
        missing_in_base=tuple(missing_b),
        shape_mismatches=tuple(mismatches),
        notes=tuple(notes),
        key_style=style,
        components=tuple(components),
        size=size,
        base_layout=words_b,
        tuned_layout=words_t,
    )
    if words_b != words_t:
        report = dataclasses.replace(report, notes=report.notes + (
            f"layouts differ, matched by the {arch_label(arch_b)} record: base {base.name!r} is {words_b}; "
            f"tuned {tuned.name!r} is {words_t}",))
    return table, report


def preflight(base: WeightSource, tuned: WeightSource, *,
              key_style: KeyStyle | str = KeyStyle.CHECKPOINT) -> tuple[KeyTable, PairReport]:
    """Check that ``base`` and ``tuned`` form a pair: same architecture, layer keys and shapes.

    A text encoder missing entirely from one side is left out with a note (UNet-only files);
    any other difference raises.

    Raises:
        MismatchError: different architectures, or keys/shapes that differ (up to 20 listed + count).
        FormatError: an architecture cannot be detected.
    """
    if KeyStyle(key_style) is KeyStyle.GENERIC:
        from .generic import generic_table  # late: generic imports this module

        return generic_table(base, tuned)
    table, report = compare_pair(base, tuned, key_style=key_style)
    problems: list[str] = []
    if report.missing_in_tuned:
        problems.append(_listing(list(report.missing_in_tuned), f"keys missing in tuned {tuned.name!r}"))
    if report.missing_in_base:
        problems.append(_listing(list(report.missing_in_base), f"keys missing in base {base.name!r}"))
    if report.shape_mismatches:
        items = [f"{k} {list(b)} vs {list(t)}" for k, b, t in report.shape_mismatches]
        problems.append(_listing(items, "shape mismatches (base vs tuned)"))
    if problems:
        raise MismatchError(
            f"{base.name!r} ({report.base_layout}) and {tuned.name!r} ({report.tuned_layout}) do not match "
            "layer for layer; "
            + "; ".join(problems)
            + ". Use two checkpoints of the same model family and layout."
        )
    if report.layers == 0:
        other = KeyStyle.COMFY if report.key_style is KeyStyle.CHECKPOINT else KeyStyle.CHECKPOINT
        raise MismatchError(
            f"{base.name!r} and {tuned.name!r} share no {report.arch.value} layer under {report.key_style.value} "
            f"keys; if these are {'ComfyUI' if other is KeyStyle.COMFY else 'original checkpoint'} state dicts, "
            f"use key_style={other.value!r}"
        )
    return table, report

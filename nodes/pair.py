"""The checkpoint-pair handle carried on ``RANKWISE_PAIR`` edges, and the weight views it uses.

No ComfyUI import: the ComfyUI-model source lives in :mod:`.comfy_glue`; everything here works on
any core :class:`~..core.sources.WeightSource` and is unit-tested without ComfyUI.

* :class:`ModelPair` — base and tuned sources, the key style they are keyed in, and the pair check
  (:func:`core.sources.preflight`) done when the pair was made.
* :class:`UnionSource` — several sources as one (a ComfyUI UNet + its CLIP).
* :class:`EncoderSwapSource` — the tuned side with chosen text encoders served from the base, so
  their ΔW is exactly zero (Clean CLIP), optionally with ``position_ids`` repaired.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Mapping, Sequence

import torch

from ..core.archs import Component, KeyTable, comfy_text_encoder_prefixes, text_encoder_prefixes
from ..core.clip import EncoderDiff, is_position_ids_key, repair_position_ids
from ..core.errors import FormatError, MismatchError
from ..core.generic import comfy_names_check, diffusion_prefix, diffusion_view
from ..core.sources import KeyStyle, PairReport, PrefixedSource, WeightSource, preflight, source_dtype, source_path
from ..core.types import Arch

Tensor = torch.Tensor


class UnionSource:
    """Several sources seen as one; a key is served by the first source that holds it."""

    def __init__(self, sources: Sequence[WeightSource], name: str | None = None) -> None:
        if not sources:
            raise ValueError("UnionSource needs at least one source")
        self._sources = tuple(sources)
        self.name = name or " + ".join(str(getattr(s, "name", "source")) for s in self._sources)
        self.path = source_path(self._sources[0])
        self.metadata: Mapping[str, str] = dict(getattr(self._sources[0], "metadata", None) or {})
        self._owner: dict[str, WeightSource] | None = None

    def _index(self) -> dict[str, WeightSource]:
        if self._owner is None:
            owner: dict[str, WeightSource] = {}
            for src in self._sources:
                for key in src.keys():
                    owner.setdefault(key, src)
            self._owner = owner
        return self._owner

    def keys(self) -> Iterable[str]:
        return self._index().keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self._index()[key].shape(key))

    def dtype(self, key: str) -> torch.dtype:
        return source_dtype(self._index()[key], key)

    def get(self, key: str) -> Tensor:
        return self._index()[key].get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._index()

    @property
    def quant_reads(self) -> dict:
        """fp8 tensors read by the parts (core.quant's report)."""
        out: dict = {}
        for src in self._sources:
            out.update(getattr(src, "quant_reads", None) or {})
        return out

    def __repr__(self) -> str:
        return f"UnionSource({self.name!r})"


class EncoderSwapSource:
    """The tuned side of a pair whose keys under ``prefixes`` come from ``base`` instead.

    The key set is the tuned keys outside the prefixes plus the base keys inside them. With
    ``fix_position_ids`` every ``…position_ids`` tensor is served repaired (int64 ``arange``).
    """

    def __init__(
        self,
        tuned: WeightSource,
        base: WeightSource,
        prefixes: Sequence[str],
        *,
        fix_position_ids: bool = False,
        name: str | None = None,
    ) -> None:
        self._tuned, self._base = tuned, base
        self._prefixes = tuple(prefixes)
        self._fix = bool(fix_position_ids)
        self.name = name or str(getattr(tuned, "name", "tuned"))
        self.path = source_path(tuned)
        self.metadata: Mapping[str, str] = dict(getattr(tuned, "metadata", None) or {})
        self._from_base: dict[str, bool] | None = None

    def _swapped(self, key: str) -> bool:
        return bool(self._prefixes) and key.startswith(self._prefixes)

    def _index(self) -> dict[str, bool]:
        """key → served from the base?"""
        if self._from_base is None:
            index = {k: False for k in self._tuned.keys() if not self._swapped(k)}
            if self._prefixes:
                index.update({k: True for k in self._base.keys() if self._swapped(k)})
            self._from_base = index
        return self._from_base

    def _side(self, key: str) -> WeightSource:
        return self._base if self._index()[key] else self._tuned

    def keys(self) -> Iterable[str]:
        return self._index().keys()

    def shape(self, key: str) -> tuple[int, ...]:
        shape = tuple(int(s) for s in self._side(key).shape(key))
        if self._fix and is_position_ids_key(key):
            n = 1
            for s in shape:
                n *= s
            return (1, n)
        return shape

    def dtype(self, key: str) -> torch.dtype:
        if self._fix and is_position_ids_key(key):
            return torch.int64
        return source_dtype(self._side(key), key)

    def get(self, key: str) -> Tensor:
        t = self._side(key).get(key)
        if self._fix and is_position_ids_key(key):
            return repair_position_ids(t)[0]
        return t

    def __contains__(self, key: object) -> bool:
        return key in self._index()

    def __repr__(self) -> str:
        return f"EncoderSwapSource({self.name!r}, from base: {list(self._prefixes)})"


def encoder_prefixes(arch: Arch, style: KeyStyle) -> dict[Component, str]:
    """Key prefix of each text encoder of ``arch`` in ``style`` (checkpoint or ComfyUI keys)."""
    if KeyStyle(style) is KeyStyle.COMFY:
        return comfy_text_encoder_prefixes(arch)
    return text_encoder_prefixes(arch)


def comfy_clip_prefix(component_prefix: str) -> str:
    """``"clip_l.transformer."`` → ``"clip_l."``: every key of that encoder in a ComfyUI CLIP."""
    return component_prefix.split(".", 1)[0] + "."


@dataclass(frozen=True, eq=False)
class ModelPair:
    """Base and tuned weights, checked to be a pair, keyed in ``key_style``.

    ``replaced`` lists the text encoders whose tuned weights were swapped for the base's
    (Clean CLIP); ``encoders`` the last text-encoder difference report.
    """

    base: WeightSource
    tuned: WeightSource
    table: KeyTable
    check: PairReport
    key_style: KeyStyle
    replaced: tuple[Component, ...] = ()
    position_ids_fixed: bool = False
    encoders: tuple[EncoderDiff, ...] = ()
    exact_parts: bool = False  # generic pairs: also extract .diff / .diff_b (Extract LoRA reads this)

    @property
    def arch(self) -> Arch | None:
        """The architecture record's arch, or None for a generic pair (no record)."""
        return self.check.arch

    @property
    def generic(self) -> bool:
        return self.key_style is KeyStyle.GENERIC

    @property
    def text_encoders(self) -> tuple[Component, ...]:
        return tuple(c for c in self.check.components if c is not Component.UNET)

    def describe(self) -> str:
        """The preflight report shown by the pair nodes."""
        c = self.check
        if c.arch is None:
            head = (f"pair OK: no architecture record, generic mode, {c.layers} Linear/Conv layers "
                    f"(ComfyUI-native names{', exact .diff/.diff_b parts' if self.exact_parts else ''})")
        else:
            size = "" if c.size == "full" else f" ({c.size} test layout)"
            head = (f"pair OK: {c.arch.value.upper()}{size}, {c.layers} LoRA-targetable layers "
                    f"({c.keys_compared} tensors compared, {c.key_style.value} keys)")
        lines = [
            head,
            f"base:  {self.base.name}",
            f"tuned: {self.tuned.name}",
            "components: " + ", ".join(comp.value for comp in c.components),
        ]
        lines.extend(f"note: {n}" for n in c.notes)
        if self.replaced:
            lines.append("text encoders taken from base: " + ", ".join(comp.value for comp in self.replaced))
        if self.position_ids_fixed:
            lines.append("position_ids served repaired on the tuned side")
        return "\n".join(lines)


def make_pair(base: WeightSource, tuned: WeightSource, *, key_style: KeyStyle | str = KeyStyle.CHECKPOINT) -> ModelPair:
    """Check ``base``/``tuned`` with :func:`core.sources.preflight` and wrap them.

    Raises:
        MismatchError: different architectures, keys or shapes (the message lists them).
        FormatError: an architecture cannot be detected.
    """
    style = KeyStyle(key_style)
    if style is KeyStyle.GENERIC:
        return make_generic_pair(base, tuned)
    table, check = preflight(base, tuned, key_style=style)
    return ModelPair(base=base, tuned=tuned, table=table, check=check, key_style=style)


def make_generic_pair(base: WeightSource, tuned: WeightSource, *, exact_parts: bool = False,
                      key_map: Mapping[str, object] | None = None, note: str = "") -> ModelPair:
    """A pair named through the generic path (:mod:`core.generic`): the diffusion models of ``base``
    and ``tuned`` under ``diffusion_model.<key>`` names.

    With ``key_map`` (ComfyUI's ``model_lora_keys_unet`` of the loaded model), every layer name is
    checked to be one ComfyUI's loader applies; the names it would not apply are listed in a note.

    Raises:
        MismatchError: the two diffusion models are not the same layout.
    """
    b, t = diffusion_view(base), diffusion_view(tuned)
    table, check = preflight(b, t, key_style=KeyStyle.GENERIC)
    notes = list(check.notes)
    if note:
        notes.insert(0, note)
    if key_map is not None:
        bad = comfy_names_check((s.kohya for s in table.layers), key_map)
        if bad:
            shown = ", ".join(bad[:8]) + (f" … and {len(bad) - 8} more" if len(bad) > 8 else "")
            notes.append(f"{len(bad)} of {len(table.layers)} layer names are not in ComfyUI's key map of this "
                         f"model (they would not load): {shown}")
        else:
            notes.append(f"all {len(table.layers)} layer names are in ComfyUI's key map of this model")
    return ModelPair(base=b, tuned=t, table=table, check=replace(check, notes=tuple(notes)),
                     key_style=KeyStyle.GENERIC, exact_parts=bool(exact_parts))


def make_pair_or_generic(base: WeightSource, tuned: WeightSource, *, key_style: KeyStyle | str,
                         exact_parts: bool = False, key_map: Mapping[str, object] | None = None) -> ModelPair:
    """:func:`make_pair` when an architecture record matches, else :func:`make_generic_pair` (with a
    note). ``exact_parts`` applies to generic pairs only (recorded architectures keep kohya names)."""
    try:
        pair = make_pair(base, tuned, key_style=key_style)
    except FormatError as e:
        return make_generic_pair(base, tuned, exact_parts=exact_parts, key_map=key_map,
                                 note=f"no architecture record matched ({str(e)[:120]}…); generic mode")
    return pair


def diffusion_file_pair(base: WeightSource, tuned: WeightSource, *, exact_parts: bool = False,
                        key_map: Mapping[str, object] | None = None) -> ModelPair:
    """Two diffusion-model files as a pair: by their architecture record when one matches (bare keys
    are seen as ``model.diffusion_model.<key>``, the original checkpoint layout), else generic."""
    def as_checkpoint(src: WeightSource) -> WeightSource:
        if diffusion_prefix(src.keys()) == "":
            return PrefixedSource(src, {"": "model.diffusion_model."}, name=src.name)
        return src

    try:
        return make_pair(as_checkpoint(base), as_checkpoint(tuned), key_style=KeyStyle.CHECKPOINT)
    except FormatError:
        return make_generic_pair(base, tuned, exact_parts=exact_parts, key_map=key_map,
                                 note="no architecture record matched; generic mode")


def with_encoders_from_base(
    pair: ModelPair,
    components: Iterable[Component],
    *,
    fix_position_ids: bool = False,
    encoders: Sequence[EncoderDiff] = (),
) -> ModelPair:
    """A view of ``pair`` whose tuned side serves the base's tensors for ``components``.

    The extraction then sees ΔW = 0 for those encoders (nothing is extracted for them). The
    original tuned source is not modified.

    Raises:
        MismatchError: a component that is not a text encoder present in the pair.
    """
    chosen = tuple(dict.fromkeys(Component(c) for c in components))
    present = pair.text_encoders
    for comp in chosen:
        if comp not in present:
            have = ", ".join(c.value for c in present) or "none"
            raise MismatchError(f"the pair has no text encoder {comp.value} to replace (it has: {have})")
    prefixes_by_comp = encoder_prefixes(pair.arch, pair.key_style)
    prefixes = [prefixes_by_comp[c] for c in chosen]
    if pair.key_style is KeyStyle.COMFY:
        prefixes = [comfy_clip_prefix(p) for p in prefixes]
    if not prefixes and not fix_position_ids:
        return replace(pair, encoders=tuple(encoders))
    tuned = EncoderSwapSource(pair.tuned, pair.base, prefixes, fix_position_ids=fix_position_ids,
                              name=pair.tuned.name)
    return replace(
        pair,
        tuned=tuned,
        replaced=tuple(dict.fromkeys(pair.replaced + chosen)),
        position_ids_fixed=pair.position_ids_fixed or bool(fix_position_ids),
        encoders=tuple(encoders),
    )


def position_ids_problems(source: WeightSource) -> dict[str, tuple[int, ...]]:
    """``position_ids`` keys of ``source`` that are not an exact int64 ``arange`` → wrong indices
    (an empty tuple means only the dtype or shape was off)."""
    out: dict[str, tuple[int, ...]] = {}
    for key in source.keys():
        if not is_position_ids_key(key):
            continue
        t = source.get(key)
        fixed, broken = repair_position_ids(t)
        if broken or t.dtype != torch.int64 or tuple(t.shape) != tuple(fixed.shape):
            out[key] = broken
    return out

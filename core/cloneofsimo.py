"""cloneofsimo ``lora`` files ("safeloras"): positional keys named from the key tables.

Format (``lora_diffusion.lora.save_safeloras_with_embeds``)
-----------------------------------------------------------
* tensors ``<model>:<i>:up`` (out, r) and ``<model>:<i>:down`` (r, in) for ``model`` in ``unet`` and
  ``text_encoder`` (4-D for convs, when ResnetBlock2D was targeted); ``i`` counts the injected layers;
* metadata ``<model>`` = JSON list of the target classes, ``<model>:<i>:rank`` = str(r);
* textual-inversion embeddings stored beside them: a tensor per token (``<s1>``, shape (dim,)),
  flagged in the metadata as ``"<embed>"``.

Scale: ``realize_as_lora`` saves ``up · scale`` and loading patches ``up @ down`` with scale 1.0
(users scale afterwards with ``tune_lora_scale``), so ΔW = up @ down: read as alpha = rank.

Numbering: ``inject_trainable_lora`` walks ``model.modules()`` (pre-order, registration order), and
for each module whose class name is a target (UNet default {CrossAttention, Attention, GEGLU}; text
encoder {CLIPAttention}) walks its ``named_modules()`` for ``nn.Linear`` (extended: also
``nn.Conv2d``). In diffusers' ``UNet2DConditionModel`` the down blocks come first, then the *up*
blocks, then the mid block (``mid_block`` is assigned after both ModuleLists are registered); in a
block, attentions before resnets; in an ``Attention``: ``to_q, to_k, to_v, to_out.0``; a GEGLU:
``proj``; a ``ResnetBlock2D``: ``conv1, time_emb_proj, conv2, conv_shortcut``; a ``CLIPAttention``:
``k_proj, v_proj, q_proj, out_proj``. The order inside ``BasicTransformerBlock`` changed in
diffusers: old releases (cloneofsimo's own example files) registered ``attn1, ff, attn2``, current
ones ``attn1, attn2, ff``. The shapes tell the two apart (``ff.net.0.proj`` is (8·c, c), ``attn2``'s
first layer (c, c)), so :func:`to_kohya` takes the order whose shapes fit every module.
tests/test_cloneofsimo.py checks :func:`injection_order` against diffusers' and transformers' own
module order.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from .archs import SIZES, Component, KeyTable, LayerSpec, key_table
from .errors import FormatError, MismatchError
from .types import Arch

Tensor = torch.Tensor

EMBED_FLAG = "<embed>"
KEY = re.compile(r"^(?P<model>[A-Za-z_][\w.]*):(?P<index>\d+):(?P<direction>up|down)$")
RANK_KEY = re.compile(r"^[A-Za-z_][\w.]*:\d+:rank$")

UNET = "unet"
TEXT_ENCODER = "text_encoder"
UNET_DEFAULT_TARGETS = frozenset({"CrossAttention", "Attention", "GEGLU"})
UNET_EXTENDED_TARGETS = frozenset({"ResnetBlock2D", "CrossAttention", "Attention", "GEGLU"})
TE_DEFAULT_TARGETS = frozenset({"CLIPAttention"})
_KNOWN_TARGETS = {UNET: UNET_EXTENDED_TARGETS, TEXT_ENCODER: TE_DEFAULT_TARGETS}
_ARCHS = (Arch.SD1, Arch.SD2)  # cloneofsimo/lora trained SD 1.x / 2.x pipelines


class BlockOrder(str, enum.Enum):
    """Registration order inside diffusers' ``BasicTransformerBlock``."""

    LEGACY = "attn1-ff-attn2"  # diffusers ≤ 0.12 (cloneofsimo's example files)
    CURRENT = "attn1-attn2-ff"  # later diffusers


_ATTN_PARTS = ("to_q", "to_k", "to_v", "to_out.0")
_RESNET_PARTS = ("conv1", "time_emb_proj", "conv2", "conv_shortcut")
_CLIP_PARTS = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj")
_SECTION = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}
_UNET_PATH = re.compile(
    r"^unet\.(?P<section>down_blocks|up_blocks|mid_block)(?:\.(?P<level>\d+))?\."
    r"(?:(?P<attn>attentions)\.(?P<j>\d+)\.transformer_blocks\.(?P<t>\d+)\.(?P<part>.+)"
    r"|(?P<res>resnets)\.(?P<rj>\d+)\.(?P<rpart>.+))$"
)
_TE_PATH = re.compile(r"^text_encoder\.text_model\.encoder\.layers\.(?P<i>\d+)\.(?P<part>.+)$")


def _transformer_part_rank(part: str, targets: frozenset[str], order: BlockOrder) -> int | None:
    """Position of a layer inside a BasicTransformerBlock's walk, or None when not injected."""
    attention = bool(targets & {"Attention", "CrossAttention"})
    geglu = "GEGLU" in targets
    slots = {"attn1": 0, "ff": 1, "attn2": 2} if order is BlockOrder.LEGACY else {"attn1": 0, "attn2": 1, "ff": 2}
    head, _, rest = part.partition(".")
    if head in ("attn1", "attn2") and attention and rest in _ATTN_PARTS:
        return slots[head] * 10 + _ATTN_PARTS.index(rest)
    if part == "ff.net.0.proj" and geglu:
        return slots["ff"] * 10
    return None


def injection_order(
    table: KeyTable,
    model: str,
    targets: Iterable[str] | None = None,
    order: BlockOrder = BlockOrder.CURRENT,
) -> tuple[LayerSpec, ...]:
    """The layers of ``table`` in the order cloneofsimo's injector numbers them for ``model``
    (``"unet"`` or ``"text_encoder"``) with target classes ``targets`` (default: cloneofsimo's)."""
    if model == TEXT_ENCODER:
        chosen = frozenset(targets) if targets is not None else TE_DEFAULT_TARGETS
        if "CLIPAttention" not in chosen:
            return ()
        keyed = []
        for spec in table.layers:
            m = _TE_PATH.match(spec.diffusers) if spec.component is Component.TE1 else None
            if m and m.group("part") in _CLIP_PARTS:
                keyed.append(((int(m.group("i")), _CLIP_PARTS.index(m.group("part"))), spec))
        return tuple(spec for _, spec in sorted(keyed, key=lambda kv: kv[0]))
    if model != UNET:
        raise ValueError(f"cloneofsimo models are 'unet' and 'text_encoder', not {model!r}")
    chosen = frozenset(targets) if targets is not None else UNET_DEFAULT_TARGETS
    keyed = []
    for spec in table.layers:
        if spec.component is not Component.UNET:
            continue
        m = _UNET_PATH.match(spec.diffusers)
        if m is None:
            continue
        section, level = _SECTION[m.group("section")], int(m.group("level") or 0)
        if m.group("attn"):
            rank = _transformer_part_rank(m.group("part"), chosen, BlockOrder(order))
            if rank is None:
                continue
            key = (section, level, 0, int(m.group("j")), int(m.group("t")), rank)
        else:
            if "ResnetBlock2D" not in chosen or m.group("rpart") not in _RESNET_PARTS:
                continue
            key = (section, level, 1, int(m.group("rj")), 0, _RESNET_PARTS.index(m.group("rpart")))
        keyed.append((key, spec))
    return tuple(spec for _, spec in sorted(keyed, key=lambda kv: kv[0]))


def is_cloneofsimo(keys: Iterable[str]) -> bool:
    """True when any key is a cloneofsimo positional key (``unet:0:up``)."""
    return any(KEY.match(k) for k in keys)


def embeddings(sd: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> dict[str, Tensor]:
    """The textual-inversion embeddings of a cloneofsimo file (token → tensor)."""
    return {k: v for k, v in sd.items() if _is_embedding(k, v, metadata)}


def _is_embedding(key: str, value: object, metadata: Mapping[str, str] | None) -> bool:
    if not isinstance(value, torch.Tensor) or KEY.match(key):
        return False
    flagged = (metadata or {}).get(key) == EMBED_FLAG
    return flagged or (re.fullmatch(r"<[^<>\s]+>", key) is not None and value.dim() in (1, 2))


@dataclass(frozen=True)
class Converted:
    """A cloneofsimo file renamed to a kohya state dict for one key table."""

    state_dict: dict[str, Tensor]
    metadata: dict[str, str]
    table: KeyTable
    order: BlockOrder
    embeddings: tuple[tuple[str, tuple[int, ...]], ...]
    notes: tuple[str, ...]


@dataclass(frozen=True)
class _Factor:
    index: int
    up: Tensor
    down: Tensor

    @property
    def delta_shape(self) -> tuple[int, ...]:
        if self.down.dim() == 4:
            return (int(self.up.shape[0]), *(int(s) for s in self.down.shape[1:]))
        return (int(self.up.shape[0]), int(self.down.shape[-1]))

    def describe(self, model: str) -> str:
        return f"{model}:{self.index} (up {tuple(self.up.shape)}, down {tuple(self.down.shape)})"


def _targets(model: str, metadata: Mapping[str, str], notes: list[str]) -> frozenset[str]:
    raw = metadata.get(model)
    default = UNET_DEFAULT_TARGETS if model == UNET else TE_DEFAULT_TARGETS
    if raw is None:
        notes.append(f"no '{model}' target classes in the metadata; cloneofsimo's defaults assumed "
                     f"({', '.join(sorted(default))})")
        return default
    try:
        value = json.loads(raw)
        classes = frozenset(str(c) for c in value)
    except (TypeError, ValueError):
        raise FormatError(f"cloneofsimo metadata '{model}' is not a JSON list of class names: {raw[:80]!r}") from None
    unknown = sorted(classes - _KNOWN_TARGETS[model])
    if unknown:
        raise FormatError(
            f"cloneofsimo '{model}' targets {unknown}, which Rankwise cannot place (it knows "
            f"{sorted(_KNOWN_TARGETS[model])}); the layer numbering would be guessed, so the file is refused"
        )
    return classes


def _factors(sd: Mapping[str, Tensor], metadata: Mapping[str, str]) -> dict[str, list[_Factor]]:
    parts: dict[str, dict[int, dict[str, Tensor]]] = {}
    for key, value in sd.items():
        m = KEY.match(key)
        if m is None:
            continue
        model = m.group("model")
        if model not in (UNET, TEXT_ENCODER):
            raise FormatError(f"cloneofsimo key {key!r}: unknown model {model!r} (expected 'unet' or 'text_encoder')")
        if not isinstance(value, torch.Tensor) or value.dim() not in (2, 4):
            raise FormatError(f"cloneofsimo tensor {key!r} must be a 2-D (or 4-D conv) factor, got "
                              f"{tuple(getattr(value, 'shape', ()))}")
        parts.setdefault(model, {}).setdefault(int(m.group("index")), {})[m.group("direction")] = value
    out: dict[str, list[_Factor]] = {}
    for model, by_index in parts.items():
        missing = [i for i in range(max(by_index) + 1) if set(by_index.get(i, {})) != {"up", "down"}]
        if missing:
            raise FormatError(
                f"cloneofsimo '{model}' layers are numbered 0…{max(by_index)}, but {len(missing)} lack an "
                f"up or a down tensor (first {model}:{missing[0]}); the numbering cannot be trusted"
            )
        factors = []
        for i in range(max(by_index) + 1):
            up, down = by_index[i]["up"], by_index[i]["down"]
            r = int(down.shape[0])
            if int(up.shape[1]) != r or (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1)):
                raise FormatError(f"{model}:{i}: up {tuple(up.shape)} and down {tuple(down.shape)} are not "
                                  "LoRA factors of one rank")
            declared = metadata.get(f"{model}:{i}:rank")
            if declared is not None and declared.strip().isdigit() and int(declared) != r:
                raise FormatError(f"{model}:{i}: the metadata says rank {declared}, the tensors have rank {r}")
            factors.append(_Factor(i, up, down))
        out[model] = factors
    return out


def _fits(factors: list[_Factor], specs: tuple[LayerSpec, ...]) -> tuple[int | None, int]:
    """(index of the first factor whose ΔW does not fit its spec — len(factors) if all fit, None if
    the counts differ —, how many fit)."""
    if len(factors) != len(specs):
        return None, -1
    misfits = [k for k, (f, spec) in enumerate(zip(factors, specs)) if f.delta_shape != tuple(spec.shape)]
    return (misfits[0] if misfits else len(factors)), len(factors) - len(misfits)


def _candidate_tables(arch: Arch | None, table: KeyTable | None) -> list[KeyTable]:
    if table is not None:
        return [table]
    archs = (Arch(arch),) if arch is not None else _ARCHS
    out = []
    for a in archs:
        for size in SIZES:
            try:
                out.append(key_table(a, size))
            except ValueError:
                continue
    return out


def to_kohya(
    sd: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    arch: Arch | None = None,
    table: KeyTable | None = None,
) -> Converted:
    """Name the layers of a cloneofsimo state dict and write them as a kohya state dict
    (``<kohya>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha`` = rank).

    The key table (SD1 / SD2, full or tiny; or ``arch``/``table``) and the transformer-block order
    are the ones under which every layer's ΔW shape fits; other keys pass through unchanged (they
    are reported as not understood), embeddings are set aside.

    Raises:
        FormatError: malformed keys, gaps in the numbering, unknown target classes.
        MismatchError: no architecture/order fits every layer (names the first layer that does not
            fit under the closest candidate).
    """
    md = {str(k): str(v) for k, v in (metadata or {}).items()}
    notes: list[str] = []
    factors = _factors(sd, md)
    targets = {model: _targets(model, md, notes) for model in factors}
    best: tuple[KeyTable, BlockOrder] | None = None
    closest: tuple[int, str] | None = None  # (modules that fit, message on the first misfit)
    for cand in _candidate_tables(arch, table):
        for order in BlockOrder:
            ok = True
            for model, fs in factors.items():
                specs = injection_order(cand, model, targets[model], order)
                hit, score = _fits(fs, specs)
                if hit == len(fs):
                    continue
                ok = False
                label = f"{getattr(cand.arch, 'value', cand.arch)} ({order.value})"
                if hit is None:
                    msg = f"{label} has {len(specs)} '{model}' layers for these targets, the file {len(fs)}"
                else:
                    f, spec = fs[hit], specs[hit]
                    msg = (f"{f.describe(model)} gives ΔW {f.delta_shape}, but layer {hit} of {label} in "
                           f"cloneofsimo's order is {spec.diffusers} {tuple(spec.shape)}")
                if closest is None or score > closest[0]:
                    closest = (score, msg)
                break
            if ok:
                best = (cand, order)
                break
        if best is not None:
            break
    if best is None:
        counts = ", ".join(f"{len(fs)} {model}" for model, fs in factors.items())
        raise MismatchError(
            f"cloneofsimo file ({counts} layers) fits no SD1/SD2 layer order: "
            f"{closest[1] if closest else 'no candidate architecture'}"
        )
    chosen, order = best
    out: dict[str, Tensor] = {}
    for model, fs in factors.items():
        for f, spec in zip(fs, injection_order(chosen, model, targets[model], order)):
            out[f"{spec.kohya}.lora_up.weight"] = f.up
            out[f"{spec.kohya}.lora_down.weight"] = f.down
            out[f"{spec.kohya}.alpha"] = torch.tensor(float(f.down.shape[0]))
    embeds = []
    for key, value in sd.items():
        if KEY.match(key):
            continue
        if _is_embedding(key, value, md):
            embeds.append((key, tuple(int(s) for s in value.shape)))
        else:
            out[key] = value  # reported as a key not understood
    counts = ", ".join(f"{len(fs)} {model}" for model, fs in factors.items())
    notes.insert(0, f"cloneofsimo lora file: {counts} layers, numbered in the "
                    f"{getattr(chosen.arch, 'value', chosen.arch)} diffusers module order "
                    f"({order.value} inside transformer blocks); ΔW = up @ down (scale 1)")
    if embeds:
        notes.append(
            f"{len(embeds)} textual-inversion embeddings kept aside, not part of the LoRA and not written "
            f"to kohya files: {', '.join(f'{t} {list(s)}' for t, s in embeds)}"
        )
    clean_md = {k: v for k, v in md.items()
                if not RANK_KEY.match(k) and v != EMBED_FLAG and k not in (UNET, TEXT_ENCODER)}
    clean_md["rankwise.source_format"] = "cloneofsimo"
    return Converted(out, clean_md, chosen, order, tuple(embeds), tuple(notes))

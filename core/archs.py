"""Architectures as data records, and the key tables generated from them.

Each architecture Rankwise knows is one JSON record in ``core/data/archs/<arch>.json``: its family
(``unet``, ``flux``, ``mmdit``) and per-size config, its components (the diffusion model and any
number of text encoders) with their key prefixes in every naming style, the metadata strings a LoRA
for it carries, its block layout for block weights, and how it is detected. Everything else in
Rankwise derives from these records; adding an architecture of a known family is one record.

This is the only module that knows key names. A :class:`KeyTable` lists every LoRA-targetable
Linear/Conv2d weight of an architecture as a :class:`LayerSpec`, with its name in each naming
scheme Rankwise meets:

* ``kohya``          the LoRA module name (``lora_unet_…``, ``lora_te_…``, ``lora_te1_…`` … ``lora_te3_…``)
* ``checkpoint_key`` the key in an original (LDM / "single file" / all-in-one) checkpoint, plus a row
                     slice for OpenCLIP's fused ``attn.in_proj_weight`` (q, k, v thirds)
* ``comfy_key``      the key in ComfyUI's model (``diffusion_model.…``) or CLIP (``clip_l.…``) state dict
* ``diffusers``      the diffusers module path (``unet.…``, ``transformer.…``, ``text_encoder.…``); a
                     fused DiT weight that diffusers splits (Flux ``img_attn.qkv`` → ``to_q/to_k/to_v``)
                     has its parts in ``splits`` and their paths joined by ``|`` here

Layer tables come from one generator per family: the LDM/sgm ``UNetModel`` walk (below), the
Flux double/single-stream DiT and the SD3 MMDiT (their ComfyUI ``comfy/ldm`` module trees, with
the diffusers names of ``comfy.utils.flux_to_diffusers`` / ``mmdit_to_diffusers``), and the CLIP /
T5 text encoders. UNet names follow the LDM → diffusers renaming rules (the ones that
``comfy.utils.unet_to_diffusers`` and kohya's ``convert_ldm_unet_checkpoint`` implement):

=====================================  =========================================
sgm (LDM) module                       diffusers module
=====================================  =========================================
input_blocks.0.0                       conv_in
input_blocks.{(n+1)·i+j+1}.0 / .1      down_blocks.i.resnets.j / attentions.j
input_blocks.{(n+1)·(i+1)}.0.op        down_blocks.i.downsamplers.0.conv
middle_block.0 / .1 / .2               mid_block.resnets.0 / attentions.0 / resnets.1
output_blocks.{(n+1)·i+j}.0 / .1       up_blocks.i.resnets.j / attentions.j
output_blocks.{(n+1)·i+n}.{1|2}.conv   up_blocks.i.upsamplers.0.conv (.2 when the block has attention)
time_embed.0 / .2                      time_embedding.linear_1 / linear_2
label_emb.0.0 / .0.2                   add_embedding.linear_1 / linear_2
out.2                                  conv_out
res: in_layers.2 / out_layers.3        conv1 / conv2
res: emb_layers.1 / skip_connection    time_emb_proj / conv_shortcut
=====================================  =========================================

(n = ``num_res_blocks``; ``up_blocks.i`` counts levels from the deepest one.)
"""

from __future__ import annotations

import enum
import functools
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType
from typing import Iterable, Iterator, Mapping, Sequence, Union

from .errors import FormatError
from .types import Arch, LayerKind

# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------


class Component(str, enum.Enum):
    """Which network a layer belongs to: the diffusion model (``unet``, also for DiTs) or a text
    encoder, numbered as the architecture's record lists them (SD1/SD2's single one is ``TE1``)."""

    UNET = "unet"
    TE1 = "te1"
    TE2 = "te2"
    TE3 = "te3"


class LayerGroup(str, enum.Enum):
    """What a layer does (used for presets and reports)."""

    ATTENTION = "attention"  # UNet attn1/attn2 to_q…to_out.0; TE q/k/v/out; DiT qkv/proj, Flux linear1/2
    MLP = "mlp"  # UNet ff.net.0.proj / ff.net.2; TE fc1 / fc2; DiT mlp
    PROJ = "proj"  # transformer proj_in / proj_out
    RESNET = "resnet"  # in_layers.2, out_layers.3, emb_layers.1, skip_connection
    SAMPLER = "sampler"  # downsample op, upsample conv
    EMBEDDING = "embedding"  # time_embed.0/.2, label_emb.0.0/.0.2; DiT img_in/txt_in/time_in/…
    IO = "io"  # conv_in, conv_out; DiT final_layer
    MODULATION = "modulation"  # DiT adaLN modulation linears (Flux img_mod/txt_mod/modulation, SD3 adaLN)


class LayerPreset(str, enum.Enum):
    """Named sets of layer groups."""

    ATTENTION = "attention"
    ATTN_MLP = "attn_mlp"  # kohya's default targets (Transformer2DModel/CLIP; every Linear of a DiT block)
    ALL = "all"

    def groups(self) -> frozenset[LayerGroup]:
        if self is LayerPreset.ATTENTION:
            return frozenset({LayerGroup.ATTENTION})
        if self is LayerPreset.ATTN_MLP:
            return frozenset({LayerGroup.ATTENTION, LayerGroup.MLP, LayerGroup.PROJ, LayerGroup.MODULATION})
        return frozenset(LayerGroup)


class TELayout(str, enum.Enum):
    """How a text encoder's weights are laid out in an original checkpoint."""

    HF = "hf"  # transformers CLIPTextModel: text_model.encoder.layers.{i}.self_attn.q_proj …
    OPENCLIP = "openclip"  # transformer.resblocks.{i}.attn.in_proj_weight (fused q/k/v) …
    T5 = "t5"  # transformers T5EncoderModel: encoder.block.{i}.layer.0.SelfAttention.q …


class UNetNaming(str, enum.Enum):
    """Which module path the kohya UNet names are built from."""

    DIFFUSERS = "diffusers"  # SD1/SD2: lora_unet_down_blocks_0_attentions_0_…
    SGM = "sgm"  # SDXL: lora_unet_input_blocks_4_1_…


class Family(str, enum.Enum):
    """The generator a record's diffusion model is built by."""

    UNET = "unet"  # LDM/sgm UNetModel (SD1, SD2, SDXL)
    FLUX = "flux"  # double/single-stream DiT (Flux.1)
    MMDIT = "mmdit"  # joint-block MMDiT (SD3, SD3.5)


class NamingStyle(str, enum.Enum):
    """How a saved LoRA names its modules (see ``formats.WRITERS``)."""

    KOHYA = "kohya"  # lora_unet_… / lora_te1_… + .alpha (ComfyUI, Forge, A1111, kohya; diffusers: SD1/SDXL/Flux)
    COMFY = "comfy"  # diffusion_model.<key> / text_encoders.<key> (ComfyUI's own extractor)
    DIFFUSERS = "diffusers"  # transformer.<diffusers path>.lora_A/B (PEFT; fused qkv split exactly)


BASE_BLOCK = "BASE"
MIDDLE_BLOCK = "M00"
FIRST_UNET_BLOCK = "IN00"

UNET_CHECKPOINT_PREFIX = "model.diffusion_model."
UNET_COMFY_PREFIX = "diffusion_model."
UNET_DIFFUSERS_PREFIX = "unet."
KOHYA_UNET_PREFIX = "lora_unet_"
DIT_DIFFUSERS_PREFIX = "transformer."
DIFFUSERS_SPLIT_SEP = "|"

# ---------------------------------------------------------------------------------------------
# Configs (data, read from the records)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetConfig:
    """The LDM/sgm ``UNetModel`` hyper-parameters that decide its Linear/Conv weights."""

    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    transformer_depth: tuple[int, ...]  # per level on the input side; 0 = no attention
    transformer_depth_middle: int
    context_dim: int
    use_linear_in_transformer: bool
    adm_in_channels: int | None = None  # SDXL: 2816 (pooled bigG 1280 + 6 × 256 size embeddings)
    # Depth of each output level's transformers; ``None`` mirrors ``transformer_depth``.
    transformer_depth_output: tuple[int, ...] | None = None
    in_channels: int = 4
    out_channels: int = 4
    ff_mult: int = 4  # GEGLU: ff.net.0.proj is (2·ff_mult·C, C)
    naming: UNetNaming = UNetNaming.DIFFUSERS

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        if len(self.transformer_depth) != levels:
            raise ValueError(
                f"transformer_depth has {len(self.transformer_depth)} entries for {levels} levels"
            )
        if self.transformer_depth_output is not None and len(self.transformer_depth_output) != levels:
            raise ValueError(
                f"transformer_depth_output has {len(self.transformer_depth_output)} entries for {levels} levels"
            )

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def output_depth(self, level: int) -> int:
        depths = self.transformer_depth if self.transformer_depth_output is None else self.transformer_depth_output
        return depths[level]


class FluxModulation(str, enum.Enum):
    """Where a Flux-style DiT's adaLN modulations come from."""

    # Flux.1: time_in / vector_in (/ guidance_in) embed a vector; each block's img_mod.lin / txt_mod.lin /
    # modulation.lin and the final layer's adaLN_modulation.1 turn it into that block's modulation
    PER_BLOCK = "per_block"
    # Chroma (ComfyUI ``comfy/ldm/chroma``): one distilled_guidance_layer (in_proj, layers.N.in_layer /
    # out_layer, norms.N.scale, out_proj) computes every block's modulation; the blocks have no
    # modulation linears, the final layer none, and there is no time_in / vector_in / guidance_in
    APPROXIMATOR = "approximator"


@dataclass(frozen=True)
class FluxConfig:
    """Flux.1's double/single-stream DiT (ComfyUI ``comfy/ldm/flux/model.py``), or Chroma's pruned
    variant of it (``modulation = approximator``, ComfyUI ``comfy/ldm/chroma/model.py``)."""

    hidden: int
    heads: int
    double_blocks: int
    single_blocks: int
    in_channels: int = 64  # img_in input: 16 latent channels × 2×2 patch
    out_channels: int = 64  # final_layer.linear output
    context_in: int = 4096  # txt_in input (T5-XXL width)
    vec_in: int = 768  # vector_in input (CLIP-L pooled)
    mlp_ratio: int = 4
    guidance: bool = True  # dev: guidance_in; schnell has none
    time_dim: int = 256
    modulation: FluxModulation = FluxModulation.PER_BLOCK
    # Chroma's distilled_guidance_layer (ComfyUI fixes 64 → 5120 × 5 layers → hidden)
    approximator_in: int = 64
    approximator_hidden: int = 5120
    approximator_layers: int = 5

    def __post_init__(self) -> None:
        if self.modulation is FluxModulation.APPROXIMATOR and self.guidance:
            raise ValueError("a distilled_guidance_layer model has no guidance_in: set guidance to false")

    @property
    def per_block_modulation(self) -> bool:
        return self.modulation is FluxModulation.PER_BLOCK

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class MMDiTConfig:
    """SD3/SD3.5's MMDiT (ComfyUI ``comfy/ldm/modules/diffusionmodules/mmdit.py``): width 64·depth."""

    hidden: int
    depth: int
    in_channels: int = 16
    out_channels: int = 16
    patch: int = 2
    context_in: int = 4096
    adm_in: int = 2048
    mlp_ratio: int = 4
    attn2_layers: tuple[int, ...] = ()  # SD3.5 medium: x_block.attn2 ("dual attention") in these blocks
    qk_norm: bool = False
    pos_embed_max: int = 192
    time_dim: int = 256

    @property
    def head_dim(self) -> int:
        return 64


DiffusionConfig = Union[UNetConfig, FluxConfig, MMDiTConfig]


@dataclass(frozen=True)
class TextEncoderConfig:
    """A text encoder (CLIP or T5): its sizes, checkpoint layout and the prefixes of its four names."""

    component: Component
    hidden: int
    layers: int  # layers in the key table (SD2: 23 of OpenCLIP-H's 24 resblocks are used)
    mlp: int
    layout: TELayout
    checkpoint_prefix: str  # e.g. "cond_stage_model.transformer."
    comfy_prefix: str  # e.g. "clip_l.transformer."
    diffusers_prefix: str  # "text_encoder." / "text_encoder_2."
    kohya_prefix: str  # "lora_te_" / "lora_te1_" / "lora_te2_" / "lora_te3_"
    checkpoint_layers: int | None = None  # layers stored in a checkpoint, when more than ``layers``
    name: str = ""  # ComfyUI's name: clip_l, clip_g, clip_h, t5xxl
    inner: int | None = None  # T5: attention width (heads × d_kv); None = hidden

    @property
    def stored_layers(self) -> int:
        return self.layers if self.checkpoint_layers is None else self.checkpoint_layers


@dataclass(frozen=True)
class ArchConfig:
    """One size of one architecture. ``unet`` is the diffusion model's config (any family)."""

    arch: Arch
    unet: DiffusionConfig
    text_encoders: tuple[TextEncoderConfig, ...]

    @property
    def diffusion(self) -> DiffusionConfig:
        return self.unet

    @property
    def family(self) -> Family:
        if isinstance(self.unet, FluxConfig):
            return Family.FLUX
        if isinstance(self.unet, MMDiTConfig):
            return Family.MMDIT
        return Family.UNET


@dataclass(frozen=True)
class Prefixes:
    """A component's key prefix in each naming style ("" = the style does not apply)."""

    checkpoint: str  # all-in-one / original checkpoint
    comfy: str  # ComfyUI model or CLIP state dict
    diffusers: str  # diffusers pipeline module path
    kohya: str  # kohya LoRA module prefix


@dataclass(frozen=True)
class ArchRecord:
    """Everything Rankwise knows about one architecture (``core/data/archs/<arch>.json``)."""

    arch: Arch
    label: str
    family: Family
    diffusion_prefixes: Prefixes
    text_encoder_names: Mapping[Component, str]  # te1 → "clip_l", …
    text_encoder_prefixes: Mapping[Component, Prefixes]
    configs: Mapping[str, ArchConfig]  # size → config ("full" first)
    metadata: Mapping[str, str]  # ss_base_model_version, modelspec.* a LoRA for it carries
    size_metadata: Mapping[str, Mapping[str, str]]  # size → overrides
    metadata_variants: Mapping[str, Mapping[str, str]]  # e.g. SD2 "v" (v-prediction)
    metadata_match: Mapping[str, tuple[str, ...]]  # metadata key → value prefixes that name this arch
    metadata_priority: int
    blocks: Mapping[int, tuple[str, ...]]  # positional block-weight layouts: count → labels
    layout_file: str | None  # full checkpoint layout shipped in core/data (UNet family)
    naming_styles: tuple[NamingStyle, ...]  # styles a saved LoRA may use (first: the default)
    detect_markers: tuple[str, ...]  # diffusion-model keys (no prefix) that identify the family
    detect_rule: str
    source: str  # the record's file name
    # diffusion-model key heads (no prefix) a file of this architecture never has (Flux:
    # "distilled_guidance_layer." is Chroma's): a file with one is never detected as this record
    detect_exclude: tuple[str, ...] = ()

    @property
    def sizes(self) -> tuple[str, ...]:
        return tuple(self.configs)

    @property
    def components(self) -> tuple[Component, ...]:
        return (Component.UNET,) + tuple(self.text_encoder_prefixes)

    def prefixes(self, component: Component) -> Prefixes:
        if Component(component) is Component.UNET:
            return self.diffusion_prefixes
        return self.text_encoder_prefixes[Component(component)]

    def metadata_for(self, size: str = "full", variant: str | None = None) -> dict[str, str]:
        out = dict(self.metadata)
        out.update(self.size_metadata.get(size, {}))
        if variant is not None:
            out.update(self.metadata_variants.get(variant, {}))
        return out


def _expand_blocks(text: str) -> tuple[str, ...]:
    """``"BASE IN00-IN02 M00"`` → ``("BASE", "IN00", "IN01", "IN02", "M00")``."""
    out: list[str] = []
    for part in text.split():
        m = re.fullmatch(r"([A-Z]+)(\d+)-\1(\d+)", part)
        if m:
            width = len(m.group(2))
            out.extend(f"{m.group(1)}{i:0{width}d}" for i in range(int(m.group(2)), int(m.group(3)) + 1))
        else:
            out.append(part)
    return tuple(out)


def _prefixes(raw: Mapping[str, str]) -> Prefixes:
    return Prefixes(str(raw.get("checkpoint", "")), str(raw.get("comfy", "")), str(raw.get("diffusers", "")),
                    str(raw.get("kohya", "")))


def _diffusion_config(family: Family, raw: Mapping) -> DiffusionConfig:
    raw = dict(raw)
    if family is Family.UNET:
        for key in ("channel_mult", "transformer_depth", "transformer_depth_output"):
            if raw.get(key) is not None:
                raw[key] = tuple(raw[key])
        raw["naming"] = UNetNaming(raw.get("naming", "diffusers"))
        return UNetConfig(**raw)
    if family is Family.FLUX:
        raw["modulation"] = FluxModulation(raw.get("modulation", "per_block"))
        return FluxConfig(**raw)
    raw["attn2_layers"] = tuple(raw.get("attn2_layers", ()))
    return MMDiTConfig(**raw)


def _parse_record(raw: Mapping, source: str) -> ArchRecord:
    try:
        arch = Arch(raw["arch"])
        family = Family(raw["family"])
        tes = list(raw.get("text_encoders", ()))
        te_prefixes = {Component(te["component"]): _prefixes(te["prefixes"]) for te in tes}
        te_names = {Component(te["component"]): str(te.get("name", "")) for te in tes}
        configs: dict[str, ArchConfig] = {}
        for size, cfg in raw["sizes"].items():
            sized = list(cfg.get("text_encoders", ()))
            if len(sized) != len(tes):
                raise ValueError(f"size {size!r} gives {len(sized)} text-encoder sizes for {len(tes)} encoders")
            encoders = []
            for te, dims in zip(tes, sized):
                p = _prefixes(te["prefixes"])
                encoders.append(TextEncoderConfig(
                    Component(te["component"]), int(dims["hidden"]), int(dims["layers"]), int(dims["mlp"]),
                    TELayout(te["layout"]), p.checkpoint, p.comfy, p.diffusers, p.kohya,
                    dims.get("checkpoint_layers"), str(te.get("name", "")), dims.get("inner"),
                ))
            configs[str(size)] = ArchConfig(arch, _diffusion_config(family, cfg["diffusion"]), tuple(encoders))
        if "full" not in configs:
            raise ValueError("a record needs a 'full' size")
        detect = raw.get("detect", {})
        return ArchRecord(
            arch=arch,
            label=str(raw.get("label", arch.value)),
            family=family,
            diffusion_prefixes=_prefixes(raw["diffusion_prefixes"]),
            text_encoder_names=MappingProxyType(te_names),
            text_encoder_prefixes=MappingProxyType(te_prefixes),
            configs=MappingProxyType(configs),
            metadata=MappingProxyType({str(k): str(v) for k, v in raw.get("metadata", {}).items()}),
            size_metadata=MappingProxyType({str(s): MappingProxyType(dict(m))
                                            for s, m in raw.get("size_metadata", {}).items()}),
            metadata_variants=MappingProxyType({str(s): MappingProxyType(dict(m))
                                                for s, m in raw.get("metadata_variants", {}).items()}),
            metadata_match=MappingProxyType({str(k): tuple(str(x).lower() for x in v)
                                             for k, v in raw.get("metadata_match", {}).items()}),
            metadata_priority=int(raw.get("metadata_priority", 50)),
            blocks=MappingProxyType({int(n): _expand_blocks(v) for n, v in raw.get("blocks", {}).items()}),
            layout_file=raw.get("layout_file"),
            naming_styles=tuple(NamingStyle(s) for s in raw.get("naming_styles", ["kohya", "comfy"])),
            detect_markers=tuple(detect.get("markers", ())),
            detect_rule=str(detect.get("rule", "")),
            source=source,
            detect_exclude=tuple(str(x) for x in detect.get("exclude", ())),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"architecture record core/data/archs/{source} is invalid: {e}") from e


@functools.lru_cache(maxsize=None)
def _records() -> Mapping[Arch, ArchRecord]:
    folder = resources.files(__package__).joinpath("data", "archs")
    found: dict[Arch, ArchRecord] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        try:
            raw = json.loads(entry.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise FormatError(f"cannot read architecture record core/data/archs/{entry.name}: {e}") from e
        rec = _parse_record(raw, entry.name)
        if rec.arch in found:
            raise FormatError(f"two architecture records for {rec.arch.value}: {found[rec.arch].source}, {entry.name}")
        found[rec.arch] = rec
    missing = [a.value for a in Arch if a not in found]
    if missing:
        raise FormatError(f"no architecture record for {', '.join(missing)} in core/data/archs")
    return MappingProxyType({a: found[a] for a in Arch})


def records() -> tuple[ArchRecord, ...]:
    """Every architecture record, in :class:`Arch` order."""
    return tuple(_records().values())


def record(arch: Arch | str) -> ArchRecord:
    """The record of ``arch`` (an :class:`Arch` or its value)."""
    try:
        return _records()[Arch(arch)]
    except ValueError:
        known = ", ".join(a.value for a in Arch)
        raise ValueError(f"unknown architecture {arch!r}; known: {known}") from None


def arch_label(arch: Arch | str | None) -> str:
    """A human name for messages: ``"Flux.1 (flux)"``."""
    if arch is None:
        return "unknown architecture"
    rec = record(arch)
    return rec.label if rec.label.lower() == rec.arch.value else f"{rec.label} ({rec.arch.value})"


SIZES = ("full", "tiny")  # the sizes every record has; a record may add more (SD3 "large")


def arch_sizes(arch: Arch) -> tuple[str, ...]:
    """Every size of ``arch``'s record ("full" first)."""
    return record(arch).sizes


def arch_config(arch: Arch, size: str = "full") -> ArchConfig:
    """The config an architecture's key table is generated from (``size`` one of :func:`arch_sizes`)."""
    try:
        rec = record(arch)
    except ValueError:
        raise ValueError(f"no config for architecture {arch!r} size {size!r}; sizes are {SIZES}") from None
    try:
        return rec.configs[size]
    except KeyError:
        raise ValueError(f"no config for architecture {rec.arch.value!r} size {size!r}; sizes are {rec.sizes}") from None


def is_text_encoder(name: str) -> bool:
    """Whether a kohya module name belongs to a text encoder (the one place that answers this)."""
    return name.startswith(text_encoder_kohya_prefixes())


@functools.lru_cache(maxsize=None)
def text_encoder_kohya_prefixes() -> tuple[str, ...]:
    """Every text-encoder kohya prefix of every record (``lora_te_``, ``lora_te1_`` …)."""
    found = {p.kohya for rec in records() for p in rec.text_encoder_prefixes.values() if p.kohya}
    return tuple(sorted(found, key=lambda p: (len(p), p)))


@functools.lru_cache(maxsize=None)
def kohya_prefixes() -> tuple[str, ...]:
    """Every kohya module prefix of every record (diffusion model first)."""
    found = {rec.diffusion_prefixes.kohya for rec in records()}
    return tuple(sorted(found)) + text_encoder_kohya_prefixes()


COMFY_LORA_PREFIXES = ("diffusion_model.", "text_encoders.")  # ComfyUI-native LoRA module prefixes


def component_of_kohya(name: str, arch: Arch | None = None) -> str:
    """``"unet"``/``"te1"``/… for a kohya module name (``"other"`` when no prefix matches)."""
    if arch is not None:
        rec = record(arch)
        for comp, p in sorted(rec.text_encoder_prefixes.items(), key=lambda kv: -len(kv[1].kohya)):
            if p.kohya and name.startswith(p.kohya):
                return comp.value
    m = re.match(r"lora_te(\d?)_", name)
    if m:
        return f"te{m.group(1) or 1}"
    if any(name.startswith(r.diffusion_prefixes.kohya) for r in records()):
        return Component.UNET.value
    return "other"


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------




@dataclass(frozen=True)
class Split:
    """One diffusers module that holds rows of a fused weight.

    ``rows`` are the fused weight's rows this part holds; ``part_rows`` where they sit in the
    part (``None``: the whole part). Flux's final adaLN is one part in two pieces, because diffusers
    swaps its shift and scale halves.
    """

    path: str  # diffusers module path, with the component prefix ("transformer.…")
    rows: tuple[int, int]
    part_rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class LayerSpec:
    """One LoRA-targetable weight, named in every scheme (see the module docstring)."""

    kohya: str
    checkpoint_key: str
    rows: tuple[int, int] | None
    comfy_key: str
    diffusers: str
    shape: tuple[int, ...]
    component: Component
    group: LayerGroup
    block: str
    splits: tuple[Split, ...] = ()  # diffusers parts of a fused weight (empty: ``diffusers`` is one module)

    @property
    def diffusers_modules(self) -> tuple[str, ...]:
        """The diffusers module path(s) of this weight (several for a fused weight diffusers splits)."""
        return tuple(dict.fromkeys(s.path for s in self.splits)) if self.splits else (self.diffusers,)

    @property
    def kind(self) -> LayerKind:
        return LayerKind.of_shape(self.shape)

    @property
    def is_text_encoder(self) -> bool:
        return self.component is not Component.UNET

    @property
    def module(self) -> str:
        """UNet: the sgm module path (``input_blocks.1.1.proj_in``); TE: the HF path (``text_model.…``)."""
        key = self.comfy_key
        if self.component is Component.UNET:
            key = key[len(UNET_COMFY_PREFIX):]
        else:
            key = key.split(".transformer.", 1)[1]
        return key[: -len(".weight")]


@dataclass(frozen=True)
class KeyTable:
    """Every LoRA-targetable layer of one architecture, with look-ups by each name."""

    arch: Arch
    layers: tuple[LayerSpec, ...]
    _kohya: Mapping[str, LayerSpec] = field(init=False, repr=False, compare=False)
    _ckpt: Mapping[str, tuple[LayerSpec, ...]] = field(init=False, repr=False, compare=False)
    _comfy: Mapping[str, LayerSpec] = field(init=False, repr=False, compare=False)
    _diffusers: Mapping[str, LayerSpec] = field(init=False, repr=False, compare=False)
    _aliases: Mapping[str, LayerSpec] = field(init=False, repr=False, compare=False)
    _parts: Mapping[str, tuple[LayerSpec, tuple[Split, ...]]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kohya: dict[str, LayerSpec] = {}
        ckpt: dict[str, list[LayerSpec]] = {}
        comfy: dict[str, LayerSpec] = {}
        diffusers: dict[str, LayerSpec] = {}
        for spec in self.layers:
            for index, key in ((kohya, spec.kohya), (comfy, spec.comfy_key), (diffusers, spec.diffusers)):
                if key in index:
                    raise ValueError(f"duplicate name {key!r} in the {self.arch.value} key table")
                index[key] = spec
            ckpt.setdefault(spec.checkpoint_key, []).append(spec)
        aliases: dict[str, LayerSpec] = {}
        for spec in self.layers:
            for alias in _kohya_aliases(spec):
                aliases.setdefault(alias, spec)
        object.__setattr__(self, "_kohya", MappingProxyType(kohya))
        object.__setattr__(self, "_ckpt", MappingProxyType({k: tuple(v) for k, v in ckpt.items()}))
        object.__setattr__(self, "_comfy", MappingProxyType(comfy))
        object.__setattr__(self, "_diffusers", MappingProxyType(diffusers))
        object.__setattr__(self, "_aliases", MappingProxyType(aliases))
        parts: dict[str, tuple[LayerSpec, tuple[Split, ...]]] = {}
        for spec in self.layers:
            for path in spec.diffusers_modules if spec.splits else ():
                parts[path] = (spec, tuple(s for s in spec.splits if s.path == path))
        object.__setattr__(self, "_parts", MappingProxyType(parts))

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[LayerSpec]:
        return iter(self.layers)

    def by_kohya(self, name: str) -> LayerSpec | None:
        return self._kohya.get(name)

    def by_lora_name(self, name: str) -> LayerSpec | None:
        """Like :meth:`by_kohya`, also accepting the other UNet spelling ComfyUI loads.

        SD1/SD2 LoRAs sometimes use sgm names (``lora_unet_input_blocks_1_1_…``) and SDXL ones
        diffusers names (``lora_unet_down_blocks_1_attentions_0_…``); both resolve here.
        """
        return self._kohya.get(name) or self._aliases.get(name)

    def by_checkpoint_key(self, key: str) -> tuple[LayerSpec, ...]:
        """Every layer read from this checkpoint tensor (three for a fused q/k/v tensor)."""
        return self._ckpt.get(key, ())

    def by_comfy_key(self, key: str) -> LayerSpec | None:
        return self._comfy.get(key)

    def by_diffusers(self, module_path: str) -> LayerSpec | None:
        return self._diffusers.get(module_path)

    def by_diffusers_part(self, module_path: str) -> tuple[LayerSpec, tuple[Split, ...]] | None:
        """The fused layer a diffusers module is part of (``to_q`` → Flux ``img_attn.qkv``), with
        the pieces of that module; None when the module is not a part of a fused layer."""
        return self._parts.get(module_path)

    def select(
        self,
        preset: LayerPreset = LayerPreset.ALL,
        components: Iterable[Component] | None = None,
    ) -> tuple[LayerSpec, ...]:
        groups = LayerPreset(preset).groups()
        wanted = frozenset(Component) if components is None else frozenset(Component(c) for c in components)
        return tuple(s for s in self.layers if s.group in groups and s.component in wanted)

    def checkpoint_keys(self) -> tuple[str, ...]:
        """Distinct source tensors, in table order."""
        return tuple(self._ckpt)

    def checkpoint_shape(self, key: str) -> tuple[int, ...]:
        """The full (unsliced) shape of a checkpoint tensor that holds table layers."""
        specs = self._ckpt.get(key)
        if not specs:
            raise KeyError(f"{key!r} is not a source key of the {self.arch.value} key table")
        first = specs[0]
        if first.rows is None:
            return first.shape
        return (max(s.rows[1] for s in specs if s.rows is not None),) + tuple(first.shape[1:])

    def components(self) -> tuple[Component, ...]:
        return tuple(dict.fromkeys(s.component for s in self.layers))


def _kohya_aliases(spec: LayerSpec) -> tuple[str, ...]:
    """The UNet spelling that is not the table's kohya name (sgm for SD1/2, diffusers for SDXL)."""
    if spec.component is not Component.UNET or not spec.diffusers.startswith(UNET_DIFFUSERS_PREFIX):
        return ()
    sgm = KOHYA_UNET_PREFIX + spec.module.replace(".", "_")
    diff = KOHYA_UNET_PREFIX + spec.diffusers[len(UNET_DIFFUSERS_PREFIX):].replace(".", "_")
    return tuple(a for a in (sgm, diff) if a != spec.kohya)


# --- generation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _UNetLayer:
    sgm: str  # module path without ".weight"
    diffusers: str  # module path without the "unet." prefix
    shape: tuple[int, ...]
    group: LayerGroup
    block: str


def _conv(out_ch: int, in_ch: int, k: int) -> tuple[int, ...]:
    return (out_ch, in_ch, k, k)


def _resblock(sgm: str, diff: str, in_ch: int, out_ch: int, emb: int, block: str) -> Iterator[_UNetLayer]:
    g = LayerGroup.RESNET
    yield _UNetLayer(f"{sgm}.in_layers.2", f"{diff}.conv1", _conv(out_ch, in_ch, 3), g, block)
    yield _UNetLayer(f"{sgm}.emb_layers.1", f"{diff}.time_emb_proj", (out_ch, emb), g, block)
    yield _UNetLayer(f"{sgm}.out_layers.3", f"{diff}.conv2", _conv(out_ch, out_ch, 3), g, block)
    if in_ch != out_ch:
        yield _UNetLayer(f"{sgm}.skip_connection", f"{diff}.conv_shortcut", _conv(out_ch, in_ch, 1), g, block)


def _transformer(sgm: str, diff: str, ch: int, depth: int, cfg: UNetConfig, block: str) -> Iterator[_UNetLayer]:
    proj = (ch, ch) if cfg.use_linear_in_transformer else _conv(ch, ch, 1)
    yield _UNetLayer(f"{sgm}.proj_in", f"{diff}.proj_in", proj, LayerGroup.PROJ, block)
    for t in range(depth):
        s, d = f"{sgm}.transformer_blocks.{t}", f"{diff}.transformer_blocks.{t}"
        for attn, kv_in in (("attn1", ch), ("attn2", cfg.context_dim)):
            for name, shape in (("to_q", (ch, ch)), ("to_k", (ch, kv_in)), ("to_v", (ch, kv_in)),
                                ("to_out.0", (ch, ch))):
                yield _UNetLayer(f"{s}.{attn}.{name}", f"{d}.{attn}.{name}", shape, LayerGroup.ATTENTION, block)
            if attn == "attn1":
                inner = cfg.ff_mult * ch
                yield _UNetLayer(f"{s}.ff.net.0.proj", f"{d}.ff.net.0.proj", (2 * inner, ch), LayerGroup.MLP, block)
                yield _UNetLayer(f"{s}.ff.net.2", f"{d}.ff.net.2", (ch, inner), LayerGroup.MLP, block)
    yield _UNetLayer(f"{sgm}.proj_out", f"{diff}.proj_out", proj, LayerGroup.PROJ, block)


def _unet_layers(cfg: UNetConfig) -> Iterator[_UNetLayer]:
    """Walk sgm's UNetModel construction and name each Linear/Conv in both schemes."""
    mc, emb, n = cfg.model_channels, cfg.time_embed_dim, cfg.num_res_blocks
    levels = len(cfg.channel_mult)
    g = LayerGroup.EMBEDDING
    # Blocks of the layers outside input/middle/output blocks follow the block-merge convention
    # ("before the input blocks" / "after the output blocks"): the time and label embeddings and
    # conv_in are IN00, conv_out is the last OUT block. BASE stays the text encoders', as in LBW.
    yield _UNetLayer("time_embed.0", "time_embedding.linear_1", (emb, mc), g, FIRST_UNET_BLOCK)
    yield _UNetLayer("time_embed.2", "time_embedding.linear_2", (emb, emb), g, FIRST_UNET_BLOCK)
    if cfg.adm_in_channels is not None:
        yield _UNetLayer("label_emb.0.0", "add_embedding.linear_1", (emb, cfg.adm_in_channels), g, FIRST_UNET_BLOCK)
        yield _UNetLayer("label_emb.0.2", "add_embedding.linear_2", (emb, emb), g, FIRST_UNET_BLOCK)

    yield _UNetLayer("input_blocks.0.0", "conv_in", _conv(mc, cfg.in_channels, 3), LayerGroup.IO, FIRST_UNET_BLOCK)
    chans = [mc]
    ch = mc
    index = 1
    for level, mult in enumerate(cfg.channel_mult):
        for j in range(n):
            block = f"IN{index:02d}"
            sgm, diff = f"input_blocks.{index}", f"down_blocks.{level}"
            out_ch = mult * mc
            yield from _resblock(f"{sgm}.0", f"{diff}.resnets.{j}", ch, out_ch, emb, block)
            ch = out_ch
            if cfg.transformer_depth[level] > 0:
                yield from _transformer(f"{sgm}.1", f"{diff}.attentions.{j}", ch, cfg.transformer_depth[level], cfg, block)
            chans.append(ch)
            index += 1
        if level != levels - 1:
            yield _UNetLayer(f"input_blocks.{index}.0.op", f"down_blocks.{level}.downsamplers.0.conv",
                             _conv(ch, ch, 3), LayerGroup.SAMPLER, f"IN{index:02d}")
            chans.append(ch)
            index += 1

    yield from _resblock("middle_block.0", "mid_block.resnets.0", ch, ch, emb, MIDDLE_BLOCK)
    if cfg.transformer_depth_middle > 0:
        yield from _transformer("middle_block.1", "mid_block.attentions.0", ch, cfg.transformer_depth_middle,
                                cfg, MIDDLE_BLOCK)
        yield from _resblock("middle_block.2", "mid_block.resnets.1", ch, ch, emb, MIDDLE_BLOCK)
    else:
        yield from _resblock("middle_block.1", "mid_block.resnets.1", ch, ch, emb, MIDDLE_BLOCK)

    index = 0
    for up, level in enumerate(reversed(range(levels))):
        mult = cfg.channel_mult[level]
        depth = cfg.output_depth(level)
        for j in range(n + 1):
            block = f"OUT{index:02d}"
            sgm, diff = f"output_blocks.{index}", f"up_blocks.{up}"
            out_ch = mult * mc
            yield from _resblock(f"{sgm}.0", f"{diff}.resnets.{j}", ch + chans.pop(), out_ch, emb, block)
            ch = out_ch
            pos = 1
            if depth > 0:
                yield from _transformer(f"{sgm}.1", f"{diff}.attentions.{j}", ch, depth, cfg, block)
                pos = 2
            if level and j == n:
                yield _UNetLayer(f"{sgm}.{pos}.conv", f"{diff}.upsamplers.0.conv", _conv(ch, ch, 3),
                                 LayerGroup.SAMPLER, block)
            index += 1

    yield _UNetLayer("out.2", "conv_out", _conv(cfg.out_channels, mc, 3), LayerGroup.IO, f"OUT{index - 1:02d}")


def _unet_specs(cfg: UNetConfig) -> Iterator[LayerSpec]:
    for layer in _unet_layers(cfg):
        named = layer.diffusers if cfg.naming is UNetNaming.DIFFUSERS else layer.sgm
        yield LayerSpec(
            kohya=KOHYA_UNET_PREFIX + named.replace(".", "_"),
            checkpoint_key=f"{UNET_CHECKPOINT_PREFIX}{layer.sgm}.weight",
            rows=None,
            comfy_key=f"{UNET_COMFY_PREFIX}{layer.sgm}.weight",
            diffusers=UNET_DIFFUSERS_PREFIX + layer.diffusers,
            shape=layer.shape,
            component=Component.UNET,
            group=layer.group,
            block=layer.block,
        )


# HF module name → (OpenCLIP checkpoint suffix, row third of the fused in_proj or None), per layer.
_OPENCLIP_SOURCE: Mapping[str, tuple[str, int | None]] = MappingProxyType({
    "self_attn.q_proj": ("attn.in_proj_weight", 0),
    "self_attn.k_proj": ("attn.in_proj_weight", 1),
    "self_attn.v_proj": ("attn.in_proj_weight", 2),
    "self_attn.out_proj": ("attn.out_proj.weight", None),
    "mlp.fc1": ("mlp.c_fc.weight", None),
    "mlp.fc2": ("mlp.c_proj.weight", None),
})


def _t5_specs(te: TextEncoderConfig) -> Iterator[LayerSpec]:
    h, ff = te.hidden, te.mlp
    inner = te.inner or h
    modules = (
        ("layer.0.SelfAttention.q", (inner, h), LayerGroup.ATTENTION),
        ("layer.0.SelfAttention.k", (inner, h), LayerGroup.ATTENTION),
        ("layer.0.SelfAttention.v", (inner, h), LayerGroup.ATTENTION),
        ("layer.0.SelfAttention.o", (h, inner), LayerGroup.ATTENTION),
        ("layer.1.DenseReluDense.wi_0", (ff, h), LayerGroup.MLP),
        ("layer.1.DenseReluDense.wi_1", (ff, h), LayerGroup.MLP),
        ("layer.1.DenseReluDense.wo", (h, ff), LayerGroup.MLP),
    )
    for i in range(te.layers):
        for name, shape, group in modules:
            path = f"encoder.block.{i}.{name}"
            yield LayerSpec(
                kohya=te.kohya_prefix + path.replace(".", "_"),
                checkpoint_key=f"{te.checkpoint_prefix}{path}.weight",
                rows=None,
                comfy_key=f"{te.comfy_prefix}{path}.weight",
                diffusers=te.diffusers_prefix + path,
                shape=shape,
                component=te.component,
                group=group,
                block=BASE_BLOCK,
            )


def _te_specs(te: TextEncoderConfig) -> Iterator[LayerSpec]:
    if te.layout is TELayout.T5:
        yield from _t5_specs(te)
        return
    h, m = te.hidden, te.mlp
    modules = (
        ("self_attn.q_proj", (h, h), LayerGroup.ATTENTION),
        ("self_attn.k_proj", (h, h), LayerGroup.ATTENTION),
        ("self_attn.v_proj", (h, h), LayerGroup.ATTENTION),
        ("self_attn.out_proj", (h, h), LayerGroup.ATTENTION),
        ("mlp.fc1", (m, h), LayerGroup.MLP),
        ("mlp.fc2", (h, m), LayerGroup.MLP),
    )
    for i in range(te.layers):
        for name, shape, group in modules:
            hf = f"text_model.encoder.layers.{i}.{name}"
            rows = None
            if te.layout is TELayout.HF:
                ckpt = f"{te.checkpoint_prefix}{hf}.weight"
            else:
                suffix, third = _OPENCLIP_SOURCE[name]
                ckpt = f"{te.checkpoint_prefix}transformer.resblocks.{i}.{suffix}"
                if third is not None:
                    rows = (third * h, (third + 1) * h)
            yield LayerSpec(
                kohya=te.kohya_prefix + hf.replace(".", "_"),
                checkpoint_key=ckpt,
                rows=rows,
                comfy_key=f"{te.comfy_prefix}{hf}.weight",
                diffusers=te.diffusers_prefix + hf,
                shape=shape,
                component=te.component,
                group=group,
                block=BASE_BLOCK,
            )




# --- DiT families (Flux, MMDiT) -----------------------------------------------------------------


@dataclass(frozen=True)
class _DiTLayer:
    module: str  # original (ComfyUI / BFL / SAI) module path without ".weight"
    shape: tuple[int, ...]
    group: LayerGroup
    block: str
    # diffusers parts: (path without "transformer.", fused rows, part rows or None); one entry
    # covering all rows = a plain rename
    parts: tuple[tuple[str, tuple[int, int], tuple[int, int] | None], ...]
    bias: bool = True


def _whole(path: str, rows: int) -> tuple[tuple[str, tuple[int, int], None], ...]:
    return ((path, (0, rows), None),)


def _cut(paths: Sequence[str], sizes: Sequence[int]) -> tuple[tuple[str, tuple[int, int], None], ...]:
    out, start = [], 0
    for path, n in zip(paths, sizes):
        out.append((path, (start, start + n), None))
        start += n
    return tuple(out)


def _swapped(path: str, h: int) -> tuple[tuple[str, tuple[int, int], tuple[int, int]], ...]:
    """(shift, scale) in the original order, (scale, shift) in diffusers' AdaLayerNormContinuous."""
    return ((path, (0, h), (h, 2 * h)), (path, (h, 2 * h), (0, h)))


def _mlp_embedder(module: str, diff: str, h: int, n_in: int, block: str, names=("in_layer", "out_layer"),
                  diff_names=("linear_1", "linear_2")) -> Iterator[_DiTLayer]:
    g = LayerGroup.EMBEDDING
    yield _DiTLayer(f"{module}.{names[0]}", (h, n_in), g, block, _whole(f"{diff}.{diff_names[0]}", h))
    yield _DiTLayer(f"{module}.{names[1]}", (h, h), g, block, _whole(f"{diff}.{diff_names[1]}", h))


def _approximator(cfg: FluxConfig, block: str) -> Iterator[_DiTLayer]:
    """Chroma's ``distilled_guidance_layer`` (ComfyUI ``Approximator``; diffusers ``ChromaApproximator``,
    whose residual MLPs name their linears ``linear_1`` / ``linear_2``)."""
    g, n, a = LayerGroup.EMBEDDING, cfg.approximator_hidden, "distilled_guidance_layer"
    yield _DiTLayer(f"{a}.in_proj", (n, cfg.approximator_in), g, block, _whole(f"{a}.in_proj", n))
    for i in range(cfg.approximator_layers):
        yield from _mlp_embedder(f"{a}.layers.{i}", f"{a}.layers.{i}", n, n, block)
    yield _DiTLayer(f"{a}.out_proj", (cfg.hidden, n), g, block, _whole(f"{a}.out_proj", cfg.hidden))


def _flux_layers(cfg: FluxConfig) -> Iterator[_DiTLayer]:
    """Flux.1's Linear weights in ``comfy/ldm/flux/model.py`` order, with ``flux_to_diffusers`` names
    (Chroma: ``comfy/ldm/chroma/model.py`` order, no modulation linears, the approximator instead)."""
    h, mlp = cfg.hidden, cfg.mlp_ratio * cfg.hidden
    A, M, MOD = LayerGroup.ATTENTION, LayerGroup.MLP, LayerGroup.MODULATION
    first = FIRST_UNET_BLOCK
    per_block = cfg.per_block_modulation
    yield _DiTLayer("img_in", (h, cfg.in_channels), LayerGroup.EMBEDDING, first, _whole("x_embedder", h))
    if per_block:
        yield from _mlp_embedder("time_in", "time_text_embed.timestep_embedder", h, cfg.time_dim, first)
        yield from _mlp_embedder("vector_in", "time_text_embed.text_embedder", h, cfg.vec_in, first)
        if cfg.guidance:
            yield from _mlp_embedder("guidance_in", "time_text_embed.guidance_embedder", h, cfg.time_dim, first)
    yield _DiTLayer("txt_in", (h, cfg.context_in), LayerGroup.EMBEDDING, first, _whole("context_embedder", h))
    if not per_block:
        yield from _approximator(cfg, first)
    for i in range(cfg.double_blocks):
        s, d, block = f"double_blocks.{i}", f"transformer_blocks.{i}", f"D{i:02d}"
        for side, q, proj, mod, ff in (("img", ("to_q", "to_k", "to_v"), "to_out.0", "norm1", "ff"),
                                       ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out",
                                        "norm1_context", "ff_context")):
            if per_block:
                yield _DiTLayer(f"{s}.{side}_mod.lin", (6 * h, h), MOD, block, _whole(f"{d}.{mod}.linear", 6 * h))
            yield _DiTLayer(f"{s}.{side}_attn.qkv", (3 * h, h), A, block,
                            _cut([f"{d}.attn.{n}" for n in q], (h, h, h)))
            yield _DiTLayer(f"{s}.{side}_attn.proj", (h, h), A, block, _whole(f"{d}.attn.{proj}", h))
            yield _DiTLayer(f"{s}.{side}_mlp.0", (mlp, h), M, block, _whole(f"{d}.{ff}.net.0.proj", mlp))
            yield _DiTLayer(f"{s}.{side}_mlp.2", (h, mlp), M, block, _whole(f"{d}.{ff}.net.2", h))
    for i in range(cfg.single_blocks):
        s, d, block = f"single_blocks.{i}", f"single_transformer_blocks.{i}", f"S{i:02d}"
        yield _DiTLayer(f"{s}.linear1", (3 * h + mlp, h), A, block,
                        _cut([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"], (h, h, h, mlp)))
        yield _DiTLayer(f"{s}.linear2", (h, h + mlp), A, block, _whole(f"{d}.proj_out", h))
        if per_block:
            yield _DiTLayer(f"{s}.modulation.lin", (3 * h, h), MOD, block, _whole(f"{d}.norm.linear", 3 * h))
    yield _DiTLayer("final_layer.linear", (cfg.out_channels, h), LayerGroup.IO, "OUT00",
                    _whole("proj_out", cfg.out_channels))
    if per_block:
        # IO, not MODULATION: the attn_mlp preset is exactly kohya's block targets (double/single or
        # joint blocks), which every loader takes (diffusers' kohya Flux converter drops the final layer)
        yield _DiTLayer("final_layer.adaLN_modulation.1", (2 * h, h), LayerGroup.IO, "OUT00",
                        _swapped("norm_out.linear", h))


def _flux_extras(cfg: FluxConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Non-table parameters (besides biases) of a Flux diffusion model: the q/k RMSNorm scales (and
    Chroma's approximator RMSNorm scales, which ComfyUI detects Chroma by)."""
    if not cfg.per_block_modulation:
        for i in range(cfg.approximator_layers):
            yield f"distilled_guidance_layer.norms.{i}.scale", (cfg.approximator_hidden,)
    for i in range(cfg.double_blocks):
        for side in ("img", "txt"):
            for n in ("query_norm", "key_norm"):
                yield f"double_blocks.{i}.{side}_attn.norm.{n}.scale", (cfg.head_dim,)
    for i in range(cfg.single_blocks):
        for n in ("query_norm", "key_norm"):
            yield f"single_blocks.{i}.norm.{n}.scale", (cfg.head_dim,)


def _mmdit_layers(cfg: MMDiTConfig) -> Iterator[_DiTLayer]:
    """SD3's MMDiT Linear/Conv weights in ComfyUI ``MMDiT`` order, with ``mmdit_to_diffusers`` names."""
    h, mlp, p = cfg.hidden, cfg.mlp_ratio * cfg.hidden, cfg.patch
    A, M, MOD = LayerGroup.ATTENTION, LayerGroup.MLP, LayerGroup.MODULATION
    first = FIRST_UNET_BLOCK
    yield _DiTLayer("x_embedder.proj", (h, cfg.in_channels, p, p), LayerGroup.EMBEDDING, first,
                    _whole("pos_embed.proj", h))
    yield from _mlp_embedder("t_embedder", "time_text_embed.timestep_embedder", h, cfg.time_dim, first,
                             names=("mlp.0", "mlp.2"))
    yield from _mlp_embedder("y_embedder", "time_text_embed.text_embedder", h, cfg.adm_in, first,
                             names=("mlp.0", "mlp.2"))
    yield _DiTLayer("context_embedder", (h, cfg.context_in), LayerGroup.EMBEDDING, first, _whole("context_embedder", h))
    for i in range(cfg.depth):
        s, d, block = f"joint_blocks.{i}", f"transformer_blocks.{i}", f"J{i:02d}"
        pre_only = i == cfg.depth - 1
        c = f"{s}.context_block"
        yield _DiTLayer(f"{c}.attn.qkv", (3 * h, h), A, block,
                        _cut([f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], (h, h, h)))
        if not pre_only:
            yield _DiTLayer(f"{c}.attn.proj", (h, h), A, block, _whole(f"{d}.attn.to_add_out", h))
            yield _DiTLayer(f"{c}.mlp.fc1", (mlp, h), M, block, _whole(f"{d}.ff_context.net.0.proj", mlp))
            yield _DiTLayer(f"{c}.mlp.fc2", (h, mlp), M, block, _whole(f"{d}.ff_context.net.2", h))
            yield _DiTLayer(f"{c}.adaLN_modulation.1", (6 * h, h), MOD, block, _whole(f"{d}.norm1_context.linear", 6 * h))
        else:
            yield _DiTLayer(f"{c}.adaLN_modulation.1", (2 * h, h), MOD, block, _swapped(f"{d}.norm1_context.linear", h))
        x = f"{s}.x_block"
        yield _DiTLayer(f"{x}.attn.qkv", (3 * h, h), A, block,
                        _cut([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], (h, h, h)))
        yield _DiTLayer(f"{x}.attn.proj", (h, h), A, block, _whole(f"{d}.attn.to_out.0", h))
        dual = i in cfg.attn2_layers
        if dual:
            yield _DiTLayer(f"{x}.attn2.qkv", (3 * h, h), A, block,
                            _cut([f"{d}.attn2.to_q", f"{d}.attn2.to_k", f"{d}.attn2.to_v"], (h, h, h)))
            yield _DiTLayer(f"{x}.attn2.proj", (h, h), A, block, _whole(f"{d}.attn2.to_out.0", h))
        yield _DiTLayer(f"{x}.mlp.fc1", (mlp, h), M, block, _whole(f"{d}.ff.net.0.proj", mlp))
        yield _DiTLayer(f"{x}.mlp.fc2", (h, mlp), M, block, _whole(f"{d}.ff.net.2", h))
        n_mods = 9 if dual else 6
        yield _DiTLayer(f"{x}.adaLN_modulation.1", (n_mods * h, h), MOD, block, _whole(f"{d}.norm1.linear", n_mods * h))
    yield _DiTLayer("final_layer.linear", (p * p * cfg.out_channels, h), LayerGroup.IO, "OUT00",
                    _whole("proj_out", p * p * cfg.out_channels))
    # IO, not MODULATION: the attn_mlp preset is exactly kohya's block targets (double/single or
    # joint blocks), which every loader takes (diffusers' kohya Flux converter drops the final layer)
    yield _DiTLayer("final_layer.adaLN_modulation.1", (2 * h, h), LayerGroup.IO, "OUT00", _swapped("norm_out.linear", h))


def _mmdit_extras(cfg: MMDiTConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Non-table parameters (besides biases) of an MMDiT: pos_embed and the q/k RMSNorm weights."""
    yield "pos_embed", (1, cfg.pos_embed_max * cfg.pos_embed_max, cfg.hidden)
    if not cfg.qk_norm:
        return
    for i in range(cfg.depth):
        attns = ["context_block.attn", "x_block.attn"] + (["x_block.attn2"] if i in cfg.attn2_layers else [])
        for a in attns:
            for n in ("ln_q", "ln_k"):
                yield f"joint_blocks.{i}.{a}.{n}.weight", (cfg.head_dim,)


def _dit_layers(cfg: DiffusionConfig) -> Iterator[_DiTLayer]:
    if isinstance(cfg, FluxConfig):
        return _flux_layers(cfg)
    if isinstance(cfg, MMDiTConfig):
        return _mmdit_layers(cfg)
    raise TypeError(f"not a DiT config: {type(cfg).__name__}")


def _dit_specs(config: ArchConfig) -> Iterator[LayerSpec]:
    p = record(config.arch).diffusion_prefixes
    for layer in _dit_layers(config.unet):
        splits = tuple(Split(p.diffusers + path, rows, part) for path, rows, part in layer.parts)
        paths = tuple(dict.fromkeys(s.path for s in splits))
        plain = len(splits) == 1 and splits[0].part_rows is None and splits[0].rows == (0, layer.shape[0])
        yield LayerSpec(
            kohya=p.kohya + layer.module.replace(".", "_"),
            checkpoint_key=f"{p.checkpoint}{layer.module}.weight",
            rows=None,
            comfy_key=f"{p.comfy}{layer.module}.weight",
            diffusers=paths[0] if plain else DIFFUSERS_SPLIT_SEP.join(paths) + ("" if len(paths) > 1 else DIFFUSERS_SPLIT_SEP),
            shape=layer.shape,
            component=Component.UNET,
            group=layer.group,
            block=layer.block,
            splits=() if plain else splits,
        )


def diffusion_layout(arch: Arch, size: str = "full") -> dict[str, tuple[int, ...]]:
    """Every parameter of a DiT diffusion model (no prefix): ``key → shape``, table weights, their
    biases and the norm scales / position embedding — what ComfyUI needs to detect and build it."""
    config = arch_config(arch, size)
    cfg = config.unet
    if isinstance(cfg, UNetConfig):
        raise ValueError(f"{Arch(arch).value} is a UNet; its layout ships as core/data/{record(arch).layout_file}")
    out: dict[str, tuple[int, ...]] = {}
    for layer in _dit_layers(cfg):
        out[f"{layer.module}.weight"] = layer.shape
        if layer.bias:
            out[f"{layer.module}.bias"] = (layer.shape[0],)
    extras = _flux_extras(cfg) if isinstance(cfg, FluxConfig) else _mmdit_extras(cfg)
    for key, shape in extras:
        out[key] = shape
    return out


def build_key_table(config: ArchConfig) -> KeyTable:
    """Generate the key table of a config (diffusion-model layers in construction order, then the TEs)."""
    if config.family is Family.UNET:
        specs = list(_unet_specs(config.unet))
    else:
        specs = list(_dit_specs(config))
    for te in config.text_encoders:
        specs.extend(_te_specs(te))
    return KeyTable(config.arch, tuple(specs))


@functools.lru_cache(maxsize=None)
def _cached_table(arch: Arch, size: str) -> KeyTable:
    return build_key_table(arch_config(arch, size))


def key_table(arch: Arch, size: str = "full") -> KeyTable:
    """The (cached) key table of ``arch``; ``size="tiny"`` has the same names with tiny shapes
    (a record may have more sizes, e.g. SD3 ``"large"``: :func:`arch_sizes`)."""
    arch = Arch(arch)
    if size not in record(arch).sizes:
        raise ValueError(f"unknown key table size {size!r} for {arch.value}; use one of {record(arch).sizes}")
    return _cached_table(arch, size)


def table_size(table: KeyTable) -> str:
    """Which size of its architecture ``table`` is ("full" for a table built elsewhere)."""
    for size in record(table.arch).sizes:
        if key_table(table.arch, size) is table:
            return size
    return "full"


def diffusers_unet_config(arch: Arch, size: str = "full") -> dict:
    """Keyword arguments for ``diffusers.UNet2DConditionModel`` with the same Linear/Conv weights.

    Pure data (diffusers is not imported); used by tests that build an independent model.
    Head counts do not change weight shapes; 64-channel heads are used where the real model's
    differ.
    """
    config = arch_config(arch, size)
    cfg = config.unet
    if not isinstance(cfg, UNetConfig):
        raise ValueError(f"{Arch(arch).value} is not a UNet; use diffusers_transformer_config")
    channels = tuple(cfg.model_channels * m for m in cfg.channel_mult)
    attn_levels = [d > 0 for d in cfg.transformer_depth]
    kwargs: dict = dict(
        sample_size=32,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        block_out_channels=channels,
        layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn_levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn_levels)),
        transformer_layers_per_block=tuple(max(1, d) for d in cfg.transformer_depth),
        cross_attention_dim=cfg.context_dim,
        use_linear_projection=cfg.use_linear_in_transformer,
        attention_head_dim=8 if config.arch is Arch.SD1 else tuple(max(1, c // 64) for c in channels),
        norm_num_groups=min(32, cfg.model_channels),
    )
    if cfg.adm_in_channels is not None:
        # diffusers' "text_time" embedding: pooled text (TE2 hidden) + 6 size/crop numbers.
        pooled = config.text_encoders[-1].hidden
        kwargs.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=(cfg.adm_in_channels - pooled) // 6,
            projection_class_embeddings_input_dim=cfg.adm_in_channels,
        )
    return kwargs


def diffusers_transformer_config(arch: Arch, size: str = "full") -> dict:
    """Keyword arguments for diffusers' ``FluxTransformer2DModel`` / ``ChromaTransformer2DModel`` /
    ``SD3Transformer2DModel`` with the same Linear/Conv weights as the table (pure data; used by tests)."""
    cfg = arch_config(arch, size).unet
    if isinstance(cfg, FluxConfig):
        head = cfg.head_dim
        rope = (head // 8 * 2, head // 8 * 3, head - head // 8 * 5)
        if not cfg.per_block_modulation:  # diffusers' ChromaTransformer2DModel
            return dict(patch_size=1, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                        num_layers=cfg.double_blocks, num_single_layers=cfg.single_blocks, attention_head_dim=head,
                        num_attention_heads=cfg.heads, joint_attention_dim=cfg.context_in, axes_dims_rope=rope,
                        approximator_num_channels=cfg.approximator_in, approximator_hidden_dim=cfg.approximator_hidden,
                        approximator_layers=cfg.approximator_layers)
        return dict(patch_size=1, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                    num_layers=cfg.double_blocks, num_single_layers=cfg.single_blocks, attention_head_dim=head,
                    num_attention_heads=cfg.heads, joint_attention_dim=cfg.context_in,
                    pooled_projection_dim=cfg.vec_in, guidance_embeds=cfg.guidance, axes_dims_rope=rope)
    if isinstance(cfg, MMDiTConfig):
        return dict(sample_size=cfg.pos_embed_max * cfg.patch // 2, patch_size=cfg.patch, in_channels=cfg.in_channels,
                    num_layers=cfg.depth, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.hidden // cfg.head_dim,
                    joint_attention_dim=cfg.context_in, caption_projection_dim=cfg.hidden,
                    pooled_projection_dim=cfg.adm_in, out_channels=cfg.out_channels,
                    pos_embed_max_size=cfg.pos_embed_max, dual_attention_layers=tuple(cfg.attn2_layers),
                    qk_norm="rms_norm" if cfg.qk_norm else None)
    raise ValueError(f"{Arch(arch).value} is not a DiT; use diffusers_unet_config")


def unet_prefix(arch: Arch) -> str:
    """Checkpoint key prefix of the diffusion model (``model.diffusion_model.`` for every record today)."""
    return record(arch).diffusion_prefixes.checkpoint


def text_encoder_prefixes(arch: Arch) -> dict[Component, str]:
    """Checkpoint key prefix of each text encoder, e.g. ``{TE1: "cond_stage_model.transformer."}``."""
    return {c: p.checkpoint for c, p in record(arch).text_encoder_prefixes.items()}


def comfy_text_encoder_prefixes(arch: Arch) -> dict[Component, str]:
    """ComfyUI CLIP state-dict prefix of each text encoder, e.g. ``{TE1: "clip_l.transformer."}``."""
    return {c: p.comfy for c, p in record(arch).text_encoder_prefixes.items()}


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------


class FileLayout(str, enum.Enum):
    """How a weight file names the diffusion model's tensors (its text encoders, if any, are in
    the all-in-one checkpoint's own prefixes)."""

    CHECKPOINT = "checkpoint"  # all-in-one / original checkpoint: model.diffusion_model.…
    COMFY = "comfy"  # ComfyUI model state dict: diffusion_model.…
    BARE = "bare"  # diffusion-model-only file: input_blocks.… / double_blocks.… / joint_blocks.…
    DIFFUSERS = "diffusers"  # diffusers UNet / transformer file: down_blocks.… / transformer_blocks.… (split q/k/v)
    DIFFUSERS_PIPELINE = "diffusers_pipeline"  # diffusers names with the component prefix: unet.… / transformer.…

    def describe(self) -> str:
        return _LAYOUT_WORDS[self]


_LAYOUT_WORDS = {
    FileLayout.CHECKPOINT: "an all-in-one checkpoint (model.diffusion_model.*)",
    FileLayout.COMFY: "a ComfyUI model state dict (diffusion_model.*)",
    FileLayout.BARE: "a diffusion-model-only file (no prefix)",
    FileLayout.DIFFUSERS: "a diffusers-layout model file",
    FileLayout.DIFFUSERS_PIPELINE: "a diffusers-layout file with component prefixes",
}


def _part_shape(spec: LayerSpec, path: str) -> tuple[int, ...]:
    """The full shape of one diffusers part of a fused layer."""
    rows = max((s.part_rows or (0, s.rows[1] - s.rows[0]))[1] for s in spec.splits if s.path == path)
    return (rows,) + tuple(spec.shape[1:])


def layout_names(spec: LayerSpec, table: KeyTable, layout: FileLayout) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The keys (with their full shapes) that hold ``spec``'s weight in a file of ``layout``.

    Text-encoder layers exist only in the checkpoint and ComfyUI layouts. Several keys for a fused
    weight diffusers splits; one key for every other layer.
    """
    if spec.component is not Component.UNET:
        if layout is FileLayout.CHECKPOINT:
            return ((spec.checkpoint_key, table.checkpoint_shape(spec.checkpoint_key)),)
        if layout is FileLayout.COMFY:
            return ((spec.comfy_key, spec.shape),)
        return ()
    p = record(table.arch).diffusion_prefixes
    module = spec.comfy_key[len(p.comfy):]
    if layout is FileLayout.CHECKPOINT:
        return ((spec.checkpoint_key, table.checkpoint_shape(spec.checkpoint_key)),)
    if layout is FileLayout.COMFY:
        return ((spec.comfy_key, spec.shape),)
    if layout is FileLayout.BARE:
        return ((module, spec.shape),)
    paths = spec.diffusers_modules
    strip = layout is FileLayout.DIFFUSERS
    out = []
    for path in paths:
        name = path[len(p.diffusers):] if strip and path.startswith(p.diffusers) else path
        out.append((name + ".weight", _part_shape(spec, path) if spec.splits else spec.shape))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _probe_index(arch: Arch, size: str) -> Mapping[str, tuple[tuple[int, ...], FileLayout]]:
    table = key_table(arch, size)
    index: dict[str, tuple[tuple[int, ...], FileLayout]] = {}
    for layout in FileLayout:
        for spec in table.layers:
            for name, shape in layout_names(spec, table, layout):
                index.setdefault(name, (shape, layout))
    return MappingProxyType(index)


def _detect_hint() -> str:
    parts = [f"{r.label}: {r.detect_rule}" for r in records() if r.detect_rule]
    return ("looked for the layers of " + "; ".join(parts) + " — under 'model.diffusion_model.*' (all-in-one "
            "checkpoint), 'diffusion_model.*' (ComfyUI), no prefix (diffusion-model-only file) or diffusers "
            "names, with matching shapes")


@dataclass(frozen=True)
class Detection:
    """What :func:`detect_file` found: the architecture, the key-table size and the file layout."""

    arch: Arch
    size: str
    layout: FileLayout
    hits: int  # table weights found with the expected shape
    misses: int  # known keys with another shape

    def describe(self) -> str:
        return f"{record(self.arch).label}, {self.layout.describe()}"


def _excluded(rec: ArchRecord, keys: Iterable[str]) -> bool:
    """Whether a file holds a diffusion-model key the record's ``detect.exclude`` says it never has."""
    if not rec.detect_exclude:
        return False
    p = rec.diffusion_prefixes
    heads = tuple(dict.fromkeys((p.checkpoint, p.comfy, p.diffusers, "")))
    return any(key.startswith(h) and key[len(h):].startswith(rec.detect_exclude) for key in keys for h in heads)


def _scores(shapes: Mapping[str, Sequence[int]]) -> list[tuple[tuple[int, float], Arch, str, FileLayout, int, int]]:
    out = []
    norm = {k: tuple(int(s) for s in v) for k, v in shapes.items()}
    for rec in records():
        if _excluded(rec, norm):
            continue
        for size in rec.sizes:
            index = _probe_index(rec.arch, size)
            hit = miss = 0
            per_layout: dict[FileLayout, int] = {}
            for key, shape in norm.items():
                entry = index.get(key)
                if entry is None:
                    continue
                if shape == entry[0]:
                    hit += 1
                    per_layout[entry[1]] = per_layout.get(entry[1], 0) + 1
                else:
                    miss += 1
            if hit == 0:
                continue
            layout = max(per_layout, key=lambda lay: (per_layout[lay], lay is FileLayout.CHECKPOINT))
            if layout is not FileLayout.CHECKPOINT and per_layout.get(FileLayout.CHECKPOINT, 0) == per_layout[layout]:
                layout = FileLayout.CHECKPOINT
            # ties: UNet records first (a CLIP-only SDXL state dict is also SD3's CLIP-L + CLIP-G
            # without T5), then the table covered best (a lone clip_l is SD1, not SDXL)
            score = (hit - miss, rec.family is Family.UNET, hit / len(key_table(rec.arch, size)))
            out.append((score, rec.arch, size, layout, hit, miss))
    out.sort(key=lambda t: t[0], reverse=True)
    return out


def detect_file(shapes: Mapping[str, Sequence[int]]) -> Detection:
    """Architecture, size and layout of a weight file from its key names and shapes (see :func:`detect_arch`)."""
    ranked = _scores(shapes)
    if not ranked or ranked[0][0][0] <= 0:
        sample = ", ".join(repr(k) for k in list(shapes)[:5]) or "no keys"
        raise FormatError(f"could not detect the model architecture: {_detect_hint()}; found {sample}")
    best = ranked[0]
    # the best score per architecture (a record's other sizes do not compete with it)
    per_arch: dict[Arch, tuple] = {}
    for item in ranked:
        per_arch.setdefault(item[1], item)
    rivals = [v for a, v in per_arch.items() if a is not best[1]]
    if rivals:
        second = rivals[0]
        tied_sd = {best[1], second[1]} == {Arch.SD1, Arch.SD2} and second[0][0] == best[0][0]
        if tied_sd or second[0] == best[0]:
            # SD1 and SD2 share every name; an equal score means no telling key (context width,
            # proj_in kind, text encoder) was seen.
            raise FormatError(
                f"ambiguous architecture: {best[1].value} and {second[1].value} match equally "
                f"({best[0][0]} layers); pass the architecture explicitly"
            )
    return Detection(best[1], best[2], best[3], best[4], best[5])


def detect_arch(shapes: Mapping[str, Sequence[int]]) -> Arch:
    """Tell the architecture from key names and shapes.

    Args:
        shapes: key → shape of an original / all-in-one checkpoint, a ComfyUI model/CLIP state dict,
            a diffusion-model-only file or a diffusers UNet/transformer file (any size of any record).

    Every candidate table scores ``matches − mismatches`` (a mismatch is a known key with another
    shape); the best score wins. A tie between SD1 and SD2 (e.g. only resnet convs given) is an
    error; other ties go to the table whose layers are covered best (a lone ``clip_l`` is SD1).

    Raises:
        FormatError: nothing matched, or two architectures matched equally well.
    """
    return detect_file(shapes).arch


_SGM_UNET_MARKERS = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")


@functools.lru_cache(maxsize=None)
def _lora_names(arch: Arch, component: Component | None = Component.UNET) -> frozenset[str]:
    table = key_table(arch)
    names = {s.kohya for s in table if component is None or s.component is component}
    names |= {a for a, s in table._aliases.items() if component is None or s.component is component}
    return frozenset(names)


@functools.lru_cache(maxsize=None)
def _own_lora_names(arch: Arch) -> frozenset[str]:
    """Kohya names (any component) of ``arch``'s table that no other record's table has."""
    others = frozenset().union(*(_lora_names(r.arch, None) for r in records() if r.arch is not arch))
    return _lora_names(arch, None) - others


def detect_lora_arch(module_names: Iterable[str], *, sd_family: Arch = Arch.SD1) -> Arch | None:
    """Tell the architecture of a LoRA from its kohya module names.

    The diffusion-model names are matched against every record's table (both UNet spellings for
    SD); Flux (``lora_unet_double_blocks_…``) and SD3 (``lora_unet_joint_blocks_…``) names are
    their own. Chroma shares Flux's block names: its ``distilled_guidance_layer`` or T5 names
    (``lora_te1_encoder_block_…``) tell it; block names alone are taken as Flux (a saved file's
    metadata tells them apart, see ``formats.arch_from_metadata``). Text-encoder names only one
    record has decide next. ``lora_te1_``/``lora_te2_`` without a DiT name mean SDXL; sgm names
    (``lora_unet_input_blocks_…``) that fit SD1 and SDXL equally are taken as SDXL. SD1 and SD2
    share every name, so a match of that family returns ``sd_family`` (SD1 unless told). Returns
    ``None`` when no name is recognised.
    """
    names = [n.split(".", 1)[0] for n in module_names]
    dit_recs = [rec.arch for rec in records() if rec.family is not Family.UNET]
    # DiT names, then (Flux and Chroma share every block name) the names of all components; a full tie
    # goes to the first record (Flux)
    dit = {a: (sum(n in _lora_names(a) for n in names), sum(n in _lora_names(a, None) for n in names)) for a in dit_recs}
    best_dit = max(dit, key=lambda a: dit[a], default=None)
    if best_dit is not None and dit[best_dit][0] > 0:
        return best_dit
    # text-encoder names no other record has (Chroma's lone T5 is lora_te1_encoder_block_…)
    own = {a: sum(n in _own_lora_names(a) for n in names) for a in dit_recs}
    best_own = max(own, key=lambda a: own[a], default=None)
    if best_own is not None and own[best_own] > 0:
        return best_own
    if any(n.startswith("lora_te3_") for n in names):
        return Arch.SD3 if any(n.startswith("lora_te2_") for n in names) else Arch.FLUX
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in names):
        return Arch.SDXL
    sd_names, xl_names = _lora_names(Arch.SD1), _lora_names(Arch.SDXL)
    sd = sum(n in sd_names for n in names)
    xl = sum(n in xl_names for n in names)
    if sd == 0 and xl == 0 and not any(n.startswith("lora_te_") for n in names):
        return None
    if xl > sd or (xl == sd and any(n.startswith(_SGM_UNET_MARKERS) for n in names)):
        return Arch.SDXL
    if _max_te_layer(names, "lora_te_") >= arch_config(Arch.SD1).text_encoders[0].layers:
        return Arch.SD2  # SD1's CLIP-L has 12 layers; OpenCLIP-H has 23 in use
    return sd_family


def _max_te_layer(names: Iterable[str], prefix: str) -> int:
    head = prefix + "text_model_encoder_layers_"
    found = [int(m.group(1)) for n in names if n.startswith(head) and (m := re.match(r"(\d+)_", n[len(head):]))]
    return max(found, default=-1)

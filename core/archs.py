"""Architecture configs as data, and the key tables generated from them.

This is the only module that knows key names. A :class:`KeyTable` lists every LoRA-targetable
Linear/Conv2d weight of an architecture as a :class:`LayerSpec`, with its name in each naming
scheme Rankwise meets:

* ``kohya``          the LoRA module name (``lora_unet_…``, ``lora_te_…``, ``lora_te1_…``, ``lora_te2_…``)
* ``checkpoint_key`` the key in an original (LDM / "single file") checkpoint, plus a row slice for
                     OpenCLIP's fused ``attn.in_proj_weight`` (q, k, v thirds)
* ``comfy_key``      the key in ComfyUI's model (``diffusion_model.…``) or CLIP (``clip_l.…``) state dict
* ``diffusers``      the diffusers module path (``unet.…``, ``text_encoder.…``, ``text_encoder_2.…``)

The tables are generated from small per-architecture configs (:class:`UNetConfig`,
:class:`TextEncoderConfig`) by walking the LDM/sgm ``UNetModel`` construction order, exactly as
``openaimodel.py`` builds it, and by the LDM → diffusers renaming rules (the ones that
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
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Iterator, Mapping, Sequence

from .errors import FormatError
from .types import Arch, LayerKind

# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------


class Component(str, enum.Enum):
    """Which network a layer belongs to. SD1/SD2's single text encoder is ``TE1``."""

    UNET = "unet"
    TE1 = "te1"
    TE2 = "te2"


class LayerGroup(str, enum.Enum):
    """What a layer does (used for presets and reports)."""

    ATTENTION = "attention"  # UNet attn1/attn2 to_q/to_k/to_v/to_out.0; TE self_attn q/k/v/out_proj
    MLP = "mlp"  # UNet ff.net.0.proj / ff.net.2; TE mlp fc1 / fc2
    PROJ = "proj"  # transformer proj_in / proj_out
    RESNET = "resnet"  # in_layers.2, out_layers.3, emb_layers.1, skip_connection
    SAMPLER = "sampler"  # downsample op, upsample conv
    EMBEDDING = "embedding"  # time_embed.0/.2, label_emb.0.0/.0.2
    IO = "io"  # conv_in, conv_out


class LayerPreset(str, enum.Enum):
    """Named sets of layer groups."""

    ATTENTION = "attention"
    ATTN_MLP = "attn_mlp"  # kohya's default targets (Transformer2DModel + CLIPAttention/CLIPMLP)
    ALL = "all"

    def groups(self) -> frozenset[LayerGroup]:
        if self is LayerPreset.ATTENTION:
            return frozenset({LayerGroup.ATTENTION})
        if self is LayerPreset.ATTN_MLP:
            return frozenset({LayerGroup.ATTENTION, LayerGroup.MLP, LayerGroup.PROJ})
        return frozenset(LayerGroup)


class TELayout(str, enum.Enum):
    """How a text encoder's weights are laid out in an original checkpoint."""

    HF = "hf"  # transformers CLIPTextModel: text_model.encoder.layers.{i}.self_attn.q_proj …
    OPENCLIP = "openclip"  # transformer.resblocks.{i}.attn.in_proj_weight (fused q/k/v) …


class UNetNaming(str, enum.Enum):
    """Which module path the kohya UNet names are built from."""

    DIFFUSERS = "diffusers"  # SD1/SD2: lora_unet_down_blocks_0_attentions_0_…
    SGM = "sgm"  # SDXL: lora_unet_input_blocks_4_1_…


BASE_BLOCK = "BASE"
MIDDLE_BLOCK = "M00"
FIRST_UNET_BLOCK = "IN00"

UNET_CHECKPOINT_PREFIX = "model.diffusion_model."
UNET_COMFY_PREFIX = "diffusion_model."
UNET_DIFFUSERS_PREFIX = "unet."
KOHYA_UNET_PREFIX = "lora_unet_"

# ---------------------------------------------------------------------------------------------
# Configs (data)
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


@dataclass(frozen=True)
class TextEncoderConfig:
    """A CLIP text encoder: its sizes, checkpoint layout and the prefixes of its four names."""

    component: Component
    hidden: int
    layers: int  # layers in the key table (SD2: 23 of OpenCLIP-H's 24 resblocks are used)
    mlp: int
    layout: TELayout
    checkpoint_prefix: str  # e.g. "cond_stage_model.transformer."
    comfy_prefix: str  # e.g. "clip_l.transformer."
    diffusers_prefix: str  # "text_encoder." / "text_encoder_2."
    kohya_prefix: str  # "lora_te_" / "lora_te1_" / "lora_te2_"
    checkpoint_layers: int | None = None  # layers stored in a checkpoint, when more than ``layers``

    @property
    def stored_layers(self) -> int:
        return self.layers if self.checkpoint_layers is None else self.checkpoint_layers


@dataclass(frozen=True)
class ArchConfig:
    arch: Arch
    unet: UNetConfig
    text_encoders: tuple[TextEncoderConfig, ...]


def _hf_te(component: Component, hidden: int, layers: int, mlp: int, ckpt: str, comfy: str,
           diffusers: str, kohya: str) -> TextEncoderConfig:
    return TextEncoderConfig(component, hidden, layers, mlp, TELayout.HF, ckpt, comfy, diffusers, kohya)


def _openclip_te(component: Component, hidden: int, layers: int, mlp: int, ckpt: str, comfy: str,
                 diffusers: str, kohya: str, stored: int | None = None) -> TextEncoderConfig:
    return TextEncoderConfig(component, hidden, layers, mlp, TELayout.OPENCLIP, ckpt, comfy, diffusers,
                             kohya, stored)


def _sd1_config(mc: int, context: int, te_hidden: int, te_layers: int, te_mlp: int) -> ArchConfig:
    return ArchConfig(
        Arch.SD1,
        UNetConfig(mc, (1, 2, 4, 4), 2, (1, 1, 1, 0), 1, context, use_linear_in_transformer=False),
        (_hf_te(Component.TE1, te_hidden, te_layers, te_mlp, "cond_stage_model.transformer.",
                "clip_l.transformer.", "text_encoder.", "lora_te_"),),
    )


def _sd2_config(mc: int, context: int, te_hidden: int, te_layers: int, te_mlp: int) -> ArchConfig:
    return ArchConfig(
        Arch.SD2,
        UNetConfig(mc, (1, 2, 4, 4), 2, (1, 1, 1, 0), 1, context, use_linear_in_transformer=True),
        (_openclip_te(Component.TE1, te_hidden, te_layers, te_mlp, "cond_stage_model.model.",
                      "clip_h.transformer.", "text_encoder.", "lora_te_", stored=te_layers + 1),),
    )


def _sdxl_config(mc: int, depth: tuple[int, int, int], adm: int, te1: tuple[int, int, int],
                 te2: tuple[int, int, int]) -> ArchConfig:
    return ArchConfig(
        Arch.SDXL,
        UNetConfig(mc, (1, 2, 4), 2, depth, depth[-1], te1[0] + te2[0], use_linear_in_transformer=True,
                   adm_in_channels=adm, naming=UNetNaming.SGM),
        (
            _hf_te(Component.TE1, *te1, "conditioner.embedders.0.transformer.", "clip_l.transformer.",
                   "text_encoder.", "lora_te1_"),
            _openclip_te(Component.TE2, *te2, "conditioner.embedders.1.model.", "clip_g.transformer.",
                         "text_encoder_2.", "lora_te2_"),
        ),
    )


SIZES = ("full", "tiny")

_CONFIGS: Mapping[tuple[Arch, str], ArchConfig] = MappingProxyType({
    (Arch.SD1, "full"): _sd1_config(320, 768, 768, 12, 3072),
    (Arch.SD2, "full"): _sd2_config(320, 1024, 1024, 23, 4096),
    (Arch.SDXL, "full"): _sdxl_config(320, (0, 2, 10), 2816, (768, 12, 3072), (1280, 32, 5120)),
    # Same structure and naming rules, tiny channels (diffusers models need norm_num_groups=16).
    (Arch.SD1, "tiny"): _sd1_config(16, 24, 24, 2, 48),
    (Arch.SD2, "tiny"): _sd2_config(16, 40, 40, 2, 80),
    (Arch.SDXL, "tiny"): _sdxl_config(16, (0, 2, 10), 56, (16, 2, 32), (32, 2, 64)),
})


def arch_config(arch: Arch, size: str = "full") -> ArchConfig:
    """The config an architecture's key table is generated from (``size`` "full" or "tiny")."""
    try:
        return _CONFIGS[(Arch(arch), size)]
    except (KeyError, ValueError):
        raise ValueError(f"no config for architecture {arch!r} size {size!r}; sizes are {SIZES}") from None


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


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
    if spec.component is not Component.UNET:
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


def _te_specs(te: TextEncoderConfig) -> Iterator[LayerSpec]:
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


def build_key_table(config: ArchConfig) -> KeyTable:
    """Generate the key table of a config (UNet layers in construction order, then the TEs)."""
    specs = list(_unet_specs(config.unet))
    for te in config.text_encoders:
        specs.extend(_te_specs(te))
    return KeyTable(config.arch, tuple(specs))


@functools.lru_cache(maxsize=None)
def _cached_table(arch: Arch, size: str) -> KeyTable:
    return build_key_table(arch_config(arch, size))


def key_table(arch: Arch, size: str = "full") -> KeyTable:
    """The (cached) key table of ``arch``; ``size="tiny"`` has the same names with tiny shapes."""
    if size not in SIZES:
        raise ValueError(f"unknown key table size {size!r}; use one of {SIZES}")
    return _cached_table(Arch(arch), size)


def diffusers_unet_config(arch: Arch, size: str = "full") -> dict:
    """Keyword arguments for ``diffusers.UNet2DConditionModel`` with the same Linear/Conv weights.

    Pure data (diffusers is not imported); used by tests that build an independent model.
    Head counts do not change weight shapes; 64-channel heads are used where the real model's
    differ.
    """
    config = arch_config(arch, size)
    cfg = config.unet
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


def unet_prefix(arch: Arch) -> str:
    """Checkpoint key prefix of the UNet (the same for every supported architecture)."""
    Arch(arch)
    return UNET_CHECKPOINT_PREFIX


def text_encoder_prefixes(arch: Arch) -> dict[Component, str]:
    """Checkpoint key prefix of each text encoder, e.g. ``{TE1: "cond_stage_model.transformer."}``."""
    return {te.component: te.checkpoint_prefix for te in arch_config(arch).text_encoders}


def comfy_text_encoder_prefixes(arch: Arch) -> dict[Component, str]:
    """ComfyUI CLIP state-dict prefix of each text encoder, e.g. ``{TE1: "clip_l.transformer."}``."""
    return {te.component: te.comfy_prefix for te in arch_config(arch).text_encoders}


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------


def _probe_names(spec: LayerSpec, table: KeyTable) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every state-dict key (with its full shape) under which this layer may appear."""
    full = table.checkpoint_shape(spec.checkpoint_key)
    yield spec.checkpoint_key, full
    yield spec.comfy_key, spec.shape
    if spec.component is Component.UNET:
        yield spec.comfy_key[len(UNET_COMFY_PREFIX):], spec.shape  # bare diffusion-model file
        yield spec.diffusers + ".weight", spec.shape  # diffusers pipeline-level
        yield spec.diffusers[len(UNET_DIFFUSERS_PREFIX):] + ".weight", spec.shape  # diffusers unet file


@functools.lru_cache(maxsize=None)
def _probe_index(arch: Arch, size: str) -> Mapping[str, tuple[int, ...]]:
    table = key_table(arch, size)
    index: dict[str, tuple[int, ...]] = {}
    for spec in table.layers:
        for name, shape in _probe_names(spec, table):
            index.setdefault(name, shape)
    return MappingProxyType(index)


_DETECT_HINT = (
    "looked for SD1/SD2/SDXL weights under 'model.diffusion_model.*' / 'cond_stage_model.*' / "
    "'conditioner.embedders.*' (original checkpoint), 'diffusion_model.*' / 'clip_l.*' / 'clip_h.*' / "
    "'clip_g.*' (ComfyUI state dict), bare 'input_blocks.*' (diffusion-model file) or diffusers "
    "'down_blocks.*' keys, with matching shapes"
)


def detect_arch(shapes: Mapping[str, Sequence[int]]) -> Arch:
    """Tell SD1 / SD2 / SDXL from key names and shapes.

    Args:
        shapes: key → shape of an original checkpoint, a ComfyUI UNet/CLIP state dict, a bare
            diffusion-model file or a diffusers UNet (full-size or the tiny test variants).

    Every candidate table scores ``matches − mismatches`` (a mismatch is a known key with another
    shape); the best score wins. A tie between SD1 and SD2 (e.g. only resnet convs given) is an
    error; other ties go to the table whose layers are covered best (a lone ``clip_l`` is SD1).

    Raises:
        FormatError: nothing matched, or two architectures matched equally well.
    """
    scores: dict[Arch, tuple[int, float]] = {}
    for arch in Arch:
        for size in SIZES:
            index = _probe_index(arch, size)
            hit = miss = 0
            for key, shape in shapes.items():
                expected = index.get(key)
                if expected is None:
                    continue
                if tuple(int(s) for s in shape) == expected:
                    hit += 1
                else:
                    miss += 1
            score = (hit - miss, hit / len(key_table(arch, size)))
            if score > scores.get(arch, (0, 0.0)):
                scores[arch] = score
    ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)
    if not ranked or ranked[0][1][0] <= 0:
        sample = ", ".join(repr(k) for k in list(shapes)[:5]) or "no keys"
        raise FormatError(f"could not detect the model architecture: {_DETECT_HINT}; found {sample}")
    tied = {arch for arch, score in ranked if score[0] == ranked[0][1][0]}
    if {Arch.SD1, Arch.SD2} <= tied or (len(ranked) > 1 and ranked[1][1] == ranked[0][1]):
        # SD1 and SD2 share every name; an equal score means no telling key (context width,
        # proj_in kind, text encoder) was seen.
        raise FormatError(
            f"ambiguous architecture: {ranked[0][0].value} and {ranked[1][0].value} match equally "
            f"({ranked[0][1][0]} layers); pass the architecture explicitly"
        )
    return ranked[0][0]


_SGM_UNET_MARKERS = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")


@functools.lru_cache(maxsize=None)
def _lora_names(arch: Arch) -> frozenset[str]:
    table = key_table(arch)
    return frozenset(table._kohya) | frozenset(table._aliases)


def detect_lora_arch(module_names: Iterable[str], *, sd_family: Arch = Arch.SD1) -> Arch | None:
    """Tell the architecture of a LoRA from its kohya module names.

    ``lora_te1_``/``lora_te2_`` mean SDXL. Otherwise the UNet names are matched against the SD1
    and SDXL tables (in both UNet spellings); sgm names (``lora_unet_input_blocks_…``) that fit
    both equally are taken as SDXL. SD1 and SD2 share every name, so a match of that family returns
    ``sd_family`` (SD1 unless told). Returns ``None`` when no name is recognised.
    """
    names = [n.split(".", 1)[0] for n in module_names]
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

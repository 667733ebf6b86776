"""Key tables: counts and shapes against the measured layer inventory, known real kohya names,
the ComfyUI/checkpoint/diffusers columns, detection, and an independent check of the diffusers
column against diffusers/transformers models built on the meta device."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from rankwise.core.archs import (
    Component,
    LayerGroup,
    LayerPreset,
    arch_config,
    detect_arch,
    detect_lora_arch,
    diffusers_unet_config,
    key_table,
    text_encoder_prefixes,
    unet_prefix,
)
from rankwise.core.archs import Family, record
from rankwise.core.errors import FormatError
from rankwise.core.types import Arch, LayerKind

UNET_ARCHS = [a for a in Arch if record(a).family is Family.UNET]

SET_A = {LayerGroup.ATTENTION, LayerGroup.MLP, LayerGroup.PROJ}
SET_B = {LayerGroup.RESNET, LayerGroup.SAMPLER}
SET_C = {LayerGroup.EMBEDDING, LayerGroup.IO}

# docs: /work/shared/reference/performance-notes.md §1 — (m, n) of the matrix out × in·kh·kw → count.
INVENTORY = {
    Arch.SDXL: {
        "A": {(10240, 1280): 60, (1280, 5120): 60, (5120, 640): 10, (1280, 2048): 120, (640, 2560): 10,
              (1280, 1280): 372, (640, 2048): 20, (640, 640): 70},
        "B": {(1280, 23040): 2, (1280, 17280): 1, (1280, 11520): 11, (640, 17280): 1, (1280, 5760): 1,
              (640, 11520): 1, (640, 8640): 1, (640, 5760): 8, (1280, 2560): 2, (320, 8640): 1, (1280, 1920): 1,
              (640, 2880): 1, (320, 5760): 2, (1280, 1280): 7, (640, 1920): 1, (320, 2880): 8, (640, 1280): 6,
              (1280, 640): 1, (640, 960): 1, (320, 1280): 5, (320, 960): 1, (640, 320): 1, (320, 640): 2},
        "C": {(1280, 2816): 1, (1280, 1280): 2, (1280, 320): 1, (320, 36): 1, (4, 2880): 1},
    },
    Arch.SD1: {
        "A": {(10240, 1280): 6, (1280, 5120): 6, (5120, 640): 5, (640, 2560): 5, (1280, 1280): 48, (1280, 768): 12,
              (2560, 320): 5, (640, 768): 10, (640, 640): 40, (320, 1280): 5, (320, 768): 10, (320, 320): 40},
        "B": {(1280, 23040): 5, (1280, 17280): 1, (1280, 11520): 20, (640, 17280): 1, (1280, 5760): 1,
              (640, 11520): 1, (640, 8640): 1, (640, 5760): 8, (1280, 2560): 5, (320, 8640): 1, (1280, 1920): 1,
              (640, 2880): 1, (320, 5760): 2, (1280, 1280): 12, (640, 1920): 1, (320, 2880): 8, (640, 1280): 6,
              (1280, 640): 1, (640, 960): 1, (320, 1280): 5, (320, 960): 1, (640, 320): 1, (320, 640): 2},
        "C": {(1280, 1280): 1, (1280, 320): 1, (320, 36): 1, (4, 2880): 1},
    },
}


def _matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


@pytest.mark.parametrize("arch, total, without_c, set_a", [(Arch.SDXL, 794, 788, 722), (Arch.SD1, 282, 278, 192)])
def test_unet_layer_counts_match_inventory(arch, total, without_c, set_a):
    unet = key_table(arch).select(components=[Component.UNET])
    assert len(unet) == total
    assert sum(s.group not in SET_C for s in unet) == without_c
    assert len(key_table(arch).select(LayerPreset.ATTN_MLP, [Component.UNET])) == set_a


@pytest.mark.parametrize("arch", [Arch.SDXL, Arch.SD1])
def test_unet_shapes_match_inventory(arch):
    unet = key_table(arch).select(components=[Component.UNET])
    for name, groups in (("A", SET_A), ("B", SET_B), ("C", SET_C)):
        got = Counter(_matrix(s.shape) for s in unet if s.group in groups)
        assert got == Counter(INVENTORY[arch][name]), name


def test_sd1_proj_is_conv1x1_and_sd2_sdxl_linear():
    assert key_table(Arch.SD1).by_kohya("lora_unet_mid_block_attentions_0_proj_in").kind is LayerKind.CONV1X1
    assert key_table(Arch.SD2).by_kohya("lora_unet_mid_block_attentions_0_proj_in").shape == (1280, 1280)
    assert key_table(Arch.SDXL).by_kohya("lora_unet_middle_block_1_proj_out").kind is LayerKind.LINEAR


def test_sd2_unet_same_names_as_sd1_other_context():
    sd1, sd2 = key_table(Arch.SD1), key_table(Arch.SD2)
    names1 = [s.kohya for s in sd1.select(components=[Component.UNET])]
    assert names1 == [s.kohya for s in sd2.select(components=[Component.UNET])]
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert sd1.by_kohya(k).shape == (320, 768) and sd2.by_kohya(k).shape == (320, 1024)


KNOWN = {
    Arch.SD1: {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "lora_unet_down_blocks_0_resnets_0_conv1": "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
        "lora_unet_up_blocks_0_upsamplers_0_conv": "model.diffusion_model.output_blocks.2.1.conv.weight",
        "lora_unet_up_blocks_1_upsamplers_0_conv": "model.diffusion_model.output_blocks.5.2.conv.weight",
        "lora_unet_mid_block_attentions_0_proj_in": "model.diffusion_model.middle_block.1.proj_in.weight",
        "lora_unet_down_blocks_1_downsamplers_0_conv": "model.diffusion_model.input_blocks.6.0.op.weight",
        "lora_unet_up_blocks_3_resnets_2_conv_shortcut":
            "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj":
            "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
        "lora_unet_mid_block_resnets_1_time_emb_proj": "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "lora_unet_time_embedding_linear_1": "model.diffusion_model.time_embed.0.weight",
        "lora_unet_conv_in": "model.diffusion_model.input_blocks.0.0.weight",
        "lora_unet_conv_out": "model.diffusion_model.out.2.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
            "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "lora_te_text_model_encoder_layers_11_mlp_fc2":
            "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
    },
    Arch.SDXL: {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        "lora_unet_input_blocks_1_0_in_layers_2": "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
        "lora_unet_input_blocks_3_0_op": "model.diffusion_model.input_blocks.3.0.op.weight",
        "lora_unet_output_blocks_2_2_conv": "model.diffusion_model.output_blocks.2.2.conv.weight",
        "lora_unet_output_blocks_5_2_conv": "model.diffusion_model.output_blocks.5.2.conv.weight",
        "lora_unet_middle_block_1_proj_in": "model.diffusion_model.middle_block.1.proj_in.weight",
        "lora_unet_label_emb_0_0": "model.diffusion_model.label_emb.0.0.weight",
        "lora_unet_out_2": "model.diffusion_model.out.2.weight",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
            "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "lora_te2_text_model_encoder_layers_31_mlp_fc1":
            "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight",
    },
}


@pytest.mark.parametrize("arch", list(KNOWN))
def test_known_kohya_names(arch):
    table = key_table(arch)
    for name, ckpt in KNOWN[arch].items():
        spec = table.by_kohya(name)
        assert spec is not None, name
        assert spec.checkpoint_key == ckpt
        assert spec in table.by_checkpoint_key(ckpt)


@pytest.mark.parametrize("arch", list(Arch))
@pytest.mark.parametrize("size", ["full", "tiny"])
def test_names_unique_and_lookups_round_trip(arch, size):
    table = key_table(arch, size)
    for column in ("kohya", "comfy_key", "diffusers"):
        values = [getattr(s, column) for s in table]
        assert len(values) == len(set(values)), column
    for spec in table:
        assert table.by_kohya(spec.kohya) is spec
        assert table.by_comfy_key(spec.comfy_key) is spec
        assert table.by_diffusers(spec.diffusers) is spec
        assert spec in table.by_checkpoint_key(spec.checkpoint_key)
        assert table.by_lora_name(spec.kohya) is spec
        if spec.component is Component.UNET:
            assert spec.kohya.startswith("lora_unet_") and spec.comfy_key.startswith("diffusion_model.")
            assert spec.checkpoint_key == unet_prefix(arch) + spec.comfy_key[len("diffusion_model."):]
        else:
            assert spec.checkpoint_key.startswith(text_encoder_prefixes(arch)[spec.component])
    assert table.by_kohya("lora_unet_nope") is None and table.by_checkpoint_key("nope") == ()
    assert len(table.checkpoint_keys()) == len(set(table.checkpoint_keys()))


def test_tiny_tables_keep_names_and_kinds():
    for arch in Arch:
        full, tiny = key_table(arch), key_table(arch, "tiny")
        unet_full = [(s.kohya, s.kind, s.group, s.block) for s in full.select(components=[Component.UNET])]
        unet_tiny = [(s.kohya, s.kind, s.group, s.block) for s in tiny.select(components=[Component.UNET])]
        if record(arch).family is Family.UNET:
            assert unet_full == unet_tiny
        else:  # DiT tiny tables are also shallower: their names are a subset with the same kinds
            assert set(unet_tiny) <= set(unet_full), set(unet_tiny) - set(unet_full)
        assert sum(math.prod(s.shape) for s in tiny) < 8_000_000
    assert key_table(Arch.SDXL) is key_table(Arch.SDXL)  # cached


def test_unet_aliases_resolve_other_spelling():
    sd1, xl = key_table(Arch.SD1), key_table(Arch.SDXL)
    spec = sd1.by_lora_name("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q")
    assert spec.kohya == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    spec = xl.by_lora_name("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q")
    assert spec.kohya == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


def test_text_encoder_columns():
    sd2 = key_table(Arch.SD2)
    te = sd2.select(components=[Component.TE1])
    assert len(te) == 23 * 6  # resblock 23 of OpenCLIP-H is unused by SD2
    qkv = sd2.by_checkpoint_key("cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight")
    assert [s.rows for s in qkv] == [(0, 1024), (1024, 2048), (2048, 3072)]
    assert sd2.checkpoint_shape(qkv[0].checkpoint_key) == (3072, 1024)
    assert qkv[2].comfy_key == "clip_h.transformer.text_model.encoder.layers.22.self_attn.v_proj.weight"
    fc1 = sd2.by_kohya("lora_te_text_model_encoder_layers_3_mlp_fc1")
    assert fc1.checkpoint_key == "cond_stage_model.model.transformer.resblocks.3.mlp.c_fc.weight"
    assert fc1.shape == (4096, 1024) and fc1.group is LayerGroup.MLP and fc1.block == "BASE"
    xl = key_table(Arch.SDXL)
    assert len(xl.select(components=[Component.TE1])) == 12 * 6
    assert len(xl.select(components=[Component.TE2])) == 32 * 6
    g = xl.by_kohya("lora_te2_text_model_encoder_layers_0_self_attn_out_proj")
    assert g.comfy_key == "clip_g.transformer.text_model.encoder.layers.0.self_attn.out_proj.weight"
    assert g.diffusers == "text_encoder_2.text_model.encoder.layers.0.self_attn.out_proj"
    assert xl.by_kohya("lora_te2_text_model_encoder_layers_0_mlp_fc2").shape == (1280, 5120)
    assert text_encoder_prefixes(Arch.SDXL) == {
        Component.TE1: "conditioner.embedders.0.transformer.",
        Component.TE2: "conditioner.embedders.1.model.",
    }


def test_select_presets_and_components():
    table = key_table(Arch.SDXL)
    att = table.select(LayerPreset.ATTENTION)
    assert {s.group for s in att} == {LayerGroup.ATTENTION}
    assert {s.group for s in table.select(LayerPreset.ATTN_MLP)} == SET_A
    assert len(table.select(LayerPreset.ALL)) == len(table)
    te_only = table.select(components=[Component.TE1, Component.TE2])
    assert te_only and all(s.is_text_encoder for s in te_only)
    assert LayerPreset.ALL.groups() == frozenset(LayerGroup)


def test_blocks_labels():
    xl = key_table(Arch.SDXL)
    blocks = {s.block for s in xl}
    assert blocks == {f"IN{i:02d}" for i in range(9)} | {"M00"} | {f"OUT{i:02d}" for i in range(9)} | {"BASE"}
    sd1_blocks = {s.block for s in key_table(Arch.SD1)}
    assert sd1_blocks == {f"IN{i:02d}" for i in range(12)} | {"M00"} | {f"OUT{i:02d}" for i in range(12)} | {"BASE"}
    assert xl.by_kohya("lora_unet_input_blocks_0_0").block == "IN00"
    # outside the numbered blocks: embeddings with conv_in ("before the input blocks"), conv_out
    # in the last output block; BASE is the text encoders' alone (LBW's meaning)
    assert xl.by_kohya("lora_unet_time_embed_0").block == "IN00"
    assert xl.by_kohya("lora_unet_label_emb_0_2").block == "IN00"
    assert xl.by_kohya("lora_unet_out_2").block == "OUT08"
    sd1 = key_table(Arch.SD1)
    assert sd1.by_kohya("lora_unet_conv_out").block == "OUT11"
    assert sd1.by_kohya("lora_unet_time_embedding_linear_1").block == "IN00"
    for table in (xl, sd1, key_table(Arch.SD2)):
        assert all((s.block == "BASE") == s.is_text_encoder for s in table)


# --- detection ----------------------------------------------------------------------------------


def _shapes(table, column):
    out = {}
    for s in table:
        key = getattr(s, column)
        out[key] = table.checkpoint_shape(key) if column == "checkpoint_key" else s.shape
    return out


@pytest.mark.parametrize("arch", list(Arch))
@pytest.mark.parametrize("size", ["full", "tiny"])
def test_detect_arch_from_each_layout(arch, size):
    table = key_table(arch, size)
    assert detect_arch(_shapes(table, "checkpoint_key")) is arch
    comfy = _shapes(table, "comfy_key")
    assert detect_arch(comfy) is arch
    unet_only = {k: v for k, v in comfy.items() if k.startswith("diffusion_model.")}
    assert detect_arch(unet_only) is arch
    bare = {k[len("diffusion_model."):]: v for k, v in unet_only.items()}
    assert detect_arch(bare) is arch
    clip_only = {k: v for k, v in comfy.items() if not k.startswith("diffusion_model.")}
    assert detect_arch(clip_only) is arch


def test_detect_arch_ignores_extra_keys_and_tolerates_lists():
    shapes = {k: list(v) for k, v in _shapes(key_table(Arch.SD1), "checkpoint_key").items()}
    shapes["first_stage_model.decoder.conv_in.weight"] = [512, 4, 3, 3]
    shapes["cond_stage_model.transformer.text_model.embeddings.position_ids"] = [1, 77]
    assert detect_arch(shapes) is Arch.SD1


def test_detect_arch_unknown_raises():
    with pytest.raises(FormatError, match="model.diffusion_model"):
        detect_arch({"blocks.0.attn.qkv.weight": (3072, 1024)})
    with pytest.raises(FormatError, match="could not detect"):
        detect_arch({})
    resnets_only = {
        s.checkpoint_key: s.shape for s in key_table(Arch.SD1) if s.group is LayerGroup.RESNET
    }  # identical in SD1 and SD2
    with pytest.raises(FormatError, match="ambiguous architecture: sd[12] and sd[12]"):
        detect_arch(resnets_only)


def test_detect_lora_arch():
    sd1 = [s.kohya for s in key_table(Arch.SD1)]
    assert detect_lora_arch(n + ".lora_up.weight" for n in sd1) is Arch.SD1
    assert detect_lora_arch(sd1, sd_family=Arch.SD2) is Arch.SD2
    assert detect_lora_arch(s.kohya for s in key_table(Arch.SD2)) is Arch.SD2  # TE layers 12..22
    assert detect_lora_arch(s.kohya for s in key_table(Arch.SDXL)) is Arch.SDXL
    assert detect_lora_arch(["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"]) is Arch.SDXL
    assert detect_lora_arch(["lora_te1_text_model_encoder_layers_0_mlp_fc1"]) is Arch.SDXL
    # sgm spelling of an SD1 layer that SDXL lacks (SDXL level 0 has no attention)
    assert detect_lora_arch(["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"]) is Arch.SD1
    assert detect_lora_arch(["lora_te_text_model_encoder_layers_0_mlp_fc1"]) is Arch.SD1
    assert detect_lora_arch(["lora_transformer_single_blocks_0_linear1"]) is None
    assert detect_lora_arch([]) is None


def test_arch_config_errors():
    with pytest.raises(ValueError, match="size"):
        key_table(Arch.SD1, "huge")
    with pytest.raises(ValueError, match="no config"):
        arch_config("sd9")


# --- independent check: diffusers / transformers modules on the meta device ----------------------

try:  # imported at collection time: the import alone takes seconds
    import diffusers
    import transformers

    diffusers.UNet2DConditionModel, transformers.CLIPTextModelWithProjection  # resolve the lazy modules now
except ImportError:  # pragma: no cover - test extra not installed
    diffusers = transformers = None
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="needs diffusers + transformers (pip install .[test])")


def _linear_conv_shapes(model, prefix: str) -> dict[str, tuple[int, ...]]:
    # transformers ≥ 5 dropped the ``text_model`` level from CLIPTextModel (its loader strips the
    # prefix); the LoRA/checkpoint naming the table follows keeps it.
    if hasattr(model, "encoder") and not hasattr(model, "text_model"):
        prefix += "text_model."
    return {
        prefix + name: tuple(mod.weight.shape)
        for name, mod in model.named_modules()
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))
    }


@needs_diffusers
@pytest.mark.parametrize("arch", UNET_ARCHS)
@pytest.mark.parametrize("size", ["full", "tiny"])
def test_diffusers_column_matches_diffusers_modules(arch, size):
    config = arch_config(arch, size)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**diffusers_unet_config(arch, size))
        theirs = _linear_conv_shapes(unet, "unet.")
        for te in config.text_encoders:
            te_cfg = transformers.CLIPTextConfig(
                hidden_size=te.hidden, intermediate_size=te.mlp, num_hidden_layers=te.layers,
                num_attention_heads=max(1, te.hidden // 64), projection_dim=te.hidden,
            )
            cls = transformers.CLIPTextModelWithProjection if te.component is Component.TE2 else transformers.CLIPTextModel
            theirs.update(_linear_conv_shapes(cls(te_cfg), te.diffusers_prefix))
    # Only the pooled-output projection of CLIP-G is not a LoRA target (ComfyUI maps no kohya name to it).
    theirs.pop("text_encoder_2.text_projection", None)
    ours = {s.diffusers: s.shape for s in key_table(arch, size).select(LayerPreset.ALL)}
    assert set(ours) == set(theirs)
    assert ours == theirs

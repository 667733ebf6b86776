"""Flux.1, Chroma and SD3 from their records: tables against diffusers' own transformer modules, detection
of every file layout, and diffusers' LoRA loaders as an independent oracle for what Rankwise writes
(kohya names for Flux, diffusers names with the fused q/k/v split exactly for SD3)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rankwise.core.archs import (
    Component,
    FileLayout,
    LayerPreset,
    arch_config,
    detect_file,
    detect_lora_arch,
    diffusers_transformer_config,
    is_text_encoder,
    key_table,
    layout_names,
)
from rankwise.core.errors import MismatchError
from rankwise.core.formats import lora_from_state_dict, lora_items, lora_to_diffusers_state_dict
from rankwise.core.io import save_lora
from rankwise.core.synthetic import random_lora
from rankwise.core.types import Arch, Lora

try:  # imported at collection time: the import alone takes seconds
    import diffusers
    import peft  # noqa: F401
    import transformers
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    diffusers.FluxTransformer2DModel, diffusers.SD3Transformer2DModel, diffusers.FluxPipeline
    diffusers.ChromaTransformer2DModel
    _SKIP = ""
except Exception as e:  # pragma: no cover
    _SKIP = f"needs diffusers + peft + transformers: {type(e).__name__}: {e}"
needs_diffusers = pytest.mark.skipif(bool(_SKIP), reason=_SKIP or "ok")

DIT = [Arch.FLUX, Arch.SD3, Arch.CHROMA]


def test_flux_kohya_names_are_the_known_ones():
    table = key_table(Arch.FLUX)
    for name, shape in {
        "lora_unet_double_blocks_0_img_attn_qkv": (9216, 3072),
        "lora_unet_double_blocks_18_txt_mlp_2": (3072, 12288),
        "lora_unet_single_blocks_37_linear1": (21504, 3072),
        "lora_unet_single_blocks_0_linear2": (3072, 15360),
        "lora_unet_single_blocks_0_modulation_lin": (9216, 3072),
        "lora_unet_guidance_in_in_layer": (3072, 256),
        "lora_unet_final_layer_adaLN_modulation_1": (6144, 3072),
        "lora_te1_text_model_encoder_layers_11_mlp_fc2": (768, 3072),
        "lora_te3_encoder_block_23_layer_1_DenseReluDense_wo": (4096, 10240),
    }.items():
        assert table.by_kohya(name).shape == shape, name
    assert table.by_kohya("lora_unet_double_blocks_19_img_attn_qkv") is None
    spec = table.by_kohya("lora_unet_single_blocks_0_linear1")
    assert [s.path.rsplit(".", 2)[-2:] for s in spec.splits][-1] == ["single_transformer_blocks.0", "proj_mlp"] or \
        spec.splits[-1].path.endswith("proj_mlp")
    assert spec.splits[-1].rows == (9216, 21504)


def test_chroma_is_flux_without_per_block_modulation():
    """Chroma (ComfyUI comfy/ldm/chroma): Flux's double/single blocks at 3072, no img_mod / txt_mod /
    modulation / final adaLN linears and no time_in / vector_in / guidance_in, but a
    distilled_guidance_layer (64 → 5120, five residual MLPs, → 3072); T5 alone is its text encoder."""
    flux, chroma = key_table(Arch.FLUX), key_table(Arch.CHROMA)
    for name, shape in {
        "lora_unet_double_blocks_0_img_attn_qkv": (9216, 3072),
        "lora_unet_double_blocks_18_txt_mlp_2": (3072, 12288),
        "lora_unet_single_blocks_37_linear1": (21504, 3072),
        "lora_unet_single_blocks_0_linear2": (3072, 15360),
        "lora_unet_img_in": (3072, 64),
        "lora_unet_txt_in": (3072, 4096),
        "lora_unet_final_layer_linear": (64, 3072),
        "lora_unet_distilled_guidance_layer_in_proj": (5120, 64),
        "lora_unet_distilled_guidance_layer_layers_4_in_layer": (5120, 5120),
        "lora_unet_distilled_guidance_layer_layers_0_out_layer": (5120, 5120),
        "lora_unet_distilled_guidance_layer_out_proj": (3072, 5120),
        "lora_te1_encoder_block_23_layer_1_DenseReluDense_wo": (4096, 10240),
    }.items():
        assert chroma.by_kohya(name).shape == shape, name
    gone = [s.kohya for s in flux.select(components=["unet"]) if chroma.by_kohya(s.kohya) is None]
    assert gone and all(any(p in n for p in ("_mod_lin", "_modulation_lin", "time_in_", "vector_in_", "guidance_in_",
                                            "final_layer_adaLN")) for n in gone)
    shared = [s for s in chroma.select(components=["unet"]) if flux.by_kohya(s.kohya) is not None]
    assert all(flux.by_kohya(s.kohya).shape == s.shape and flux.by_kohya(s.kohya).diffusers == s.diffusers
               for s in shared)
    assert len(chroma.select(components=["unet"])) == 19 * 8 + 38 * 2 + 1 + 2 + 12
    assert chroma.by_kohya("lora_unet_distilled_guidance_layer_layers_2_out_layer").diffusers == \
        "transformer.distilled_guidance_layer.layers.2.linear_2"
    assert chroma.components() == (Component.UNET, Component.TE1)
    assert {s.component for s in chroma if s.kohya.startswith("lora_te1_")} == {Component.TE1}
    # the attn_mlp preset is the double/single blocks, as for Flux less its modulation linears
    blocks = ["unet"]
    assert {s.kohya for s in chroma.select(LayerPreset.ATTN_MLP, blocks)} == \
        {s.kohya for s in flux.select(LayerPreset.ATTN_MLP, blocks) if s.group.value != "modulation"}


def test_sd3_variants_by_size():
    medium, large = key_table(Arch.SD3), key_table(Arch.SD3, "large")
    assert medium.by_kohya("lora_unet_joint_blocks_12_x_block_attn2_qkv").shape == (4608, 1536)
    assert medium.by_kohya("lora_unet_joint_blocks_13_x_block_attn2_qkv") is None
    assert medium.by_kohya("lora_unet_joint_blocks_0_x_block_adaLN_modulation_1").shape == (9 * 1536, 1536)
    last = medium.by_kohya("lora_unet_joint_blocks_23_context_block_adaLN_modulation_1")
    assert last.shape == (2 * 1536, 1536) and len(last.splits) == 2  # pre-only, shift/scale swapped in diffusers
    assert medium.by_kohya("lora_unet_joint_blocks_23_context_block_mlp_fc1") is None
    assert large.by_kohya("lora_unet_joint_blocks_37_x_block_mlp_fc1").shape == (4 * 2432, 2432)
    assert medium.by_kohya("lora_unet_x_embedder_proj").shape == (1536, 16, 2, 2)
    assert [c for c in medium.components()] == [Component.UNET, Component.TE1, Component.TE2, Component.TE3]


@pytest.mark.parametrize("arch", DIT)
@pytest.mark.parametrize("size", ["full", "tiny"])
@pytest.mark.parametrize("layout", [FileLayout.CHECKPOINT, FileLayout.COMFY, FileLayout.BARE, FileLayout.DIFFUSERS])
def test_detect_every_layout(arch, size, layout):
    table = key_table(arch, size)
    shapes = {}
    for spec in table.select(components=["unet"]):
        shapes.update(dict(layout_names(spec, table, layout)))
    found = detect_file(shapes)
    assert (found.arch, found.size, found.layout) == (arch, size, layout)


def _layout_shapes(arch, size="full", keep=None):
    from rankwise.core.archs import diffusion_layout

    return {k: s for k, s in diffusion_layout(arch, size).items() if keep is None or keep(k)}


def test_flux_detection_excludes_chroma():
    """Every Chroma key but one distilled_guidance_layer norm is a Flux key with Flux's shape: Flux's
    record excludes files with distilled_guidance_layer.*, in every layout; and Chroma Radiance
    (nerf_blocks.*) is neither."""
    from rankwise.core.errors import FormatError
    from rankwise.core.synthetic import reduced_depth

    keep = reduced_depth(Arch.CHROMA, double=1, single=1)
    reduced = _layout_shapes(Arch.CHROMA, keep=lambda k: keep("model.diffusion_model." + k))
    assert detect_file(reduced).arch is Arch.CHROMA and detect_file(reduced).layout is FileLayout.BARE
    assert detect_file({"diffusion_model." + k: s for k, s in reduced.items()}).layout is FileLayout.COMFY
    blocks_and_norms = {k: s for k, s in reduced.items() if not k.startswith("distilled_guidance_layer.")
                        or k.endswith(".scale")}
    assert detect_file(blocks_and_norms).arch is Arch.CHROMA  # only Flux's weights + one Chroma norm
    flux = _layout_shapes(Arch.FLUX, keep=lambda k: keep("model.diffusion_model." + k))
    assert detect_file(flux).arch is Arch.FLUX
    radiance = dict(blocks_and_norms)
    radiance["nerf_blocks.0.norm.scale"] = (64,)
    with pytest.raises(FormatError, match="could not detect"):
        detect_file(radiance)


def test_detect_lora_arch_tells_flux_and_chroma_apart():
    chroma = [s.kohya for s in key_table(Arch.CHROMA)]
    assert detect_lora_arch(chroma) is Arch.CHROMA
    assert detect_lora_arch(["lora_unet_distilled_guidance_layer_in_proj", "lora_unet_double_blocks_0_img_attn_qkv"]) \
        is Arch.CHROMA
    t5 = [n for n in chroma if n.startswith("lora_te1_")]
    assert detect_lora_arch(t5[:3]) is Arch.CHROMA  # Chroma's lone T5, not SDXL's CLIP-L
    assert detect_lora_arch(t5[:3] + ["lora_unet_double_blocks_0_img_attn_qkv"]) is Arch.CHROMA
    # block names alone are Flux's too: taken as Flux (a saved file's metadata says chroma)
    assert detect_lora_arch(["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_3_linear2"]) is Arch.FLUX
    assert detect_lora_arch(s.kohya for s in key_table(Arch.FLUX)) is Arch.FLUX
    assert detect_lora_arch(["lora_te1_text_model_encoder_layers_0_mlp_fc1"]) is Arch.SDXL


def test_chroma_lora_reads_back_by_its_metadata(tmp_path):
    """A Chroma LoRA of block layers only has Flux's names and shapes; saved with its record's
    metadata it reads back as Chroma, and the metadata strings are sd-scripts' Chroma ones."""
    from rankwise.core.io import load_lora
    from rankwise.core.metadata import build_metadata

    table = key_table(Arch.CHROMA, "tiny")
    full = random_lora(table, rank=2, preset=LayerPreset.ATTN_MLP, seed=3)
    lora = Lora({n: l for n, l in full.layers.items() if not table.by_kohya(n).is_text_encoder}, arch=Arch.CHROMA)
    meta = build_metadata(lora, title="t", method="test", params={})
    assert meta["ss_base_model_version"] == "chroma" and meta["modelspec.architecture"] == "chroma/lora"
    assert meta["modelspec.implementation"] == "https://huggingface.co/lodestones/Chroma"
    path = tmp_path / "chroma.safetensors"
    save_lora(lora.replace(metadata=meta), path, dtype=torch.float32)
    back, _ = load_lora(path)
    assert back.arch is Arch.CHROMA and set(back.layers) == set(lora.layers)
    for name, layer in lora.layers.items():
        assert torch.allclose(back.layers[name].delta(), layer.delta(), atol=1e-6), name
    bare, _ = lora_from_state_dict({k: p() for k, _, _, p in lora_items(lora, "kohya", dtype=torch.float32)})
    assert bare.arch is Arch.FLUX  # no metadata: Flux's names and shapes


def test_detect_lora_arch_tells_dit_families_apart():
    assert detect_lora_arch(["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]) is Arch.FLUX
    assert detect_lora_arch(["lora_unet_joint_blocks_0_x_block_attn_qkv"]) is Arch.SD3
    assert detect_lora_arch(["lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_te3_encoder_block_0_layer_0_SelfAttention_q"]) is Arch.FLUX
    assert detect_lora_arch(["lora_unet_input_blocks_4_1_proj_in"]) is Arch.SDXL
    assert is_text_encoder("lora_te3_encoder_block_0_layer_0_SelfAttention_q")
    assert not is_text_encoder("lora_unet_double_blocks_0_img_attn_qkv")


@pytest.mark.parametrize("arch", DIT)
def test_every_naming_style_reads_back_exactly(arch):
    table = key_table(arch, "tiny")
    lora = random_lora(table, rank=3, preset=LayerPreset.ALL, seed=2)
    for style in ("kohya", "comfy", "diffusers"):  # read back even where not offered for saving (Chroma: diffusers)
        sd = {k: p() for k, _, _, p in lora_items(lora, style, dtype=torch.float32, table=table)}
        back, report = lora_from_state_dict(sd)
        assert back.arch is arch and len(back.layers) == len(lora.layers), (style, report.summary())
        for name, layer in lora.layers.items():
            assert torch.allclose(back.layers[name].delta(), layer.delta(), atol=1e-6), (style, name)


def test_diffusers_split_shares_down_and_splits_up():
    table = key_table(Arch.SD3, "tiny")
    lora = random_lora(table, rank=4, preset=LayerPreset.ATTENTION, seed=3)
    sd = lora_to_diffusers_state_dict(lora, dtype=torch.float32)
    spec = table.by_kohya("lora_unet_joint_blocks_0_x_block_attn_qkv")
    layer = lora.layers[spec.kohya]
    scale = layer.alpha / layer.rank
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        a = sd[f"transformer.transformer_blocks.0.attn.{name}.lora_A.weight"]
        b = sd[f"transformer.transformer_blocks.0.attn.{name}.lora_B.weight"]
        assert torch.equal(a, layer.down.float())
        assert torch.allclose(b, layer.up.float()[128 * i:128 * (i + 1)] * scale)
    assert not any(k.endswith(".alpha") for k in sd if not k.startswith("lora_te3_"))  # T5 keeps kohya names


def test_merging_flux_with_sdxl_names_both():
    from rankwise.core.merge import MergeInput, MergeMode, merge

    flux = random_lora(key_table(Arch.FLUX, "tiny"), rank=2, seed=1)
    sdxl = random_lora(key_table(Arch.SDXL, "tiny"), rank=2, seed=1)
    unnamed = Lora(dict(flux.layers))  # no arch: told from its kohya names
    for first in (flux, unnamed):
        with pytest.raises(MismatchError, match="(?i)flux.*sdxl|sdxl.*flux"):
            merge([MergeInput(first, 1.0, "f"), MergeInput(sdxl, 1.0, "x")], mode=MergeMode.CONCAT)


# --- diffusers as the oracle ------------------------------------------------------------------


def _linear_shapes(model, prefix: str) -> dict[str, tuple[int, ...]]:
    return {prefix + n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def _table_parts(table) -> dict[str, tuple[int, ...]]:
    out = {}
    for spec in table.select(components=["unet"]):
        if spec.splits:
            for path in spec.diffusers_modules:
                pieces = [s for s in spec.splits if s.path == path]
                rows = max((s.part_rows or (0, s.rows[1] - s.rows[0]))[1] for s in pieces)
                out[path] = (rows,) + tuple(spec.shape[1:])
        else:
            out[spec.diffusers] = spec.shape
    return out


def _transformer(arch: Arch, size: str):
    cls = {Arch.FLUX: diffusers.FluxTransformer2DModel, Arch.SD3: diffusers.SD3Transformer2DModel,
           Arch.CHROMA: diffusers.ChromaTransformer2DModel}[arch]
    return cls(**diffusers_transformer_config(arch, size))


@needs_diffusers
@pytest.mark.parametrize("arch", DIT)
@pytest.mark.parametrize("size", ["full", "tiny"])
def test_diffusers_column_matches_diffusers_transformer(arch, size):
    with torch.device("meta"):
        theirs = _linear_shapes(_transformer(arch, size), "transformer.")
    ours = _table_parts(key_table(arch, size))
    assert ours == theirs


def _clip(te):
    cfg = transformers.CLIPTextConfig(
        hidden_size=te.hidden, intermediate_size=te.mlp, num_hidden_layers=te.layers, num_attention_heads=2,
        projection_dim=te.hidden, vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
        pad_token_id=1,
    )
    return transformers.CLIPTextModelWithProjection(cfg)


def _t5(te):
    cfg = transformers.T5Config(d_model=te.hidden, d_ff=te.mlp, d_kv=(te.inner or te.hidden) // 2, num_heads=2,
                                num_layers=te.layers, vocab_size=100, feed_forward_proj="gated-gelu")
    return transformers.T5EncoderModel(cfg)


def _vae():
    return diffusers.AutoencoderKL(block_out_channels=(16,), norm_num_groups=8, latent_channels=16,
                                   down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))


def _pipeline(arch: Arch):
    torch.manual_seed(0)
    config = arch_config(arch, "tiny")
    tes = config.text_encoders
    if arch is Arch.FLUX:
        return diffusers.FluxPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=_vae(), text_encoder=_clip(tes[0]),
            tokenizer=None, text_encoder_2=_t5(tes[1]), tokenizer_2=None, transformer=_transformer(arch, "tiny"))
    return diffusers.StableDiffusion3Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=_vae(), text_encoder=_clip(tes[0]), tokenizer=None,
        text_encoder_2=_clip(tes[1]), tokenizer_2=None, text_encoder_3=_t5(tes[2]), tokenizer_3=None,
        transformer=_transformer(arch, "tiny"))


def _weights(pipe, table) -> dict[str, torch.Tensor]:
    out = {}
    for spec in table.layers:
        for path in spec.diffusers_modules:
            comp, sub = path.split(".", 1)
            root = getattr(pipe, comp)
            try:
                mod = root.get_submodule(sub)
            except AttributeError:
                mod = root.get_submodule(sub.removeprefix("text_model."))
            out[path] = getattr(mod, "base_layer", mod).weight.detach().clone()
    return out


def _fused_delta(spec, before, after) -> torch.Tensor:
    if not spec.splits:
        return after[spec.diffusers] - before[spec.diffusers]
    delta = torch.zeros(spec.shape[0], *before[spec.splits[0].path].shape[1:])
    for s in spec.splits:
        d = after[s.path] - before[s.path]
        src = s.part_rows or (0, s.rows[1] - s.rows[0])
        delta[s.rows[0]:s.rows[1]] = d[src[0]:src[1]]
    return delta


@needs_diffusers
def test_diffusers_flux_converter_takes_every_kohya_key(tmp_path):
    """diffusers' kohya→diffusers Flux converter hard-codes Flux's 3072 width, so this runs at real
    width on a reduced depth (the blocks it names beyond the file are simply absent): every key of
    our kohya file is converted (none left over), each converted module exists in diffusers'
    FluxTransformer2DModel with its shape, and the converted factors give our ΔW, the fused q/k/v
    split by rows. T5 (``lora_te3_``) is left out: diffusers' Flux loader does not load T5."""
    table = key_table(Arch.FLUX)
    keep = ("double_blocks_0_", "single_blocks_0_", "double_blocks_1_")
    specs = [s for s in table.layers if s.component is Component.UNET and (
        not s.kohya.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_"))
        or any(s.kohya.startswith("lora_unet_" + k) for k in keep))]
    specs += [s for s in table.layers if s.component is Component.TE1][:12]
    gen = torch.Generator().manual_seed(5)
    layers = {}
    from rankwise.core.types import LoraLayer

    for spec in specs:
        r = 4
        layers[spec.kohya] = LoraLayer(up=torch.randn(spec.shape[0], r, generator=gen) * 0.01,
                                       down=torch.randn(r, spec.shape[1], generator=gen) * 0.01, alpha=2.0)
    lora = Lora(layers, arch=Arch.FLUX)
    path = tmp_path / "flux.safetensors"
    save_lora(lora, path, dtype=torch.float32)
    converted = diffusers.FluxPipeline.lora_state_dict(str(path))
    converted = converted[0] if isinstance(converted, tuple) else converted
    with torch.device("meta"):
        model = diffusers.FluxTransformer2DModel(**diffusers_transformer_config(Arch.FLUX))
        clip = _clip(arch_config(Arch.FLUX).text_encoders[0])
    modules = {"transformer": model, "text_encoder": clip}
    rebuilt: dict[str, torch.Tensor] = {}
    unprefixed: set[str] = set()
    pairs = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
             (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
             ("_lora.down.weight", "_lora.up.weight"))  # text encoder: attention-processor spelling
    te_names = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
    for key, a in converted.items():
        hit = next(((d, u) for d, u in pairs if key.endswith(d)), None)
        if hit is None:
            continue
        path_ = key[: -len(hit[0])]
        b = converted[path_ + hit[1]]
        if hit[0].startswith("_lora"):
            head, _, last = path_.rpartition(".")
            path_ = f"{head}.{te_names.get(last, last)}"
        comp, _, sub = path_.partition(".")
        if comp not in modules:  # emitted without "transformer.": diffusers' loader skips these
            unprefixed.add("transformer." + path_)
            comp, sub, path_ = "transformer", path_, "transformer." + path_
        try:
            mod = modules[comp].get_submodule(sub)
        except AttributeError:
            mod = modules[comp].get_submodule(sub.removeprefix("text_model."))
        assert tuple(mod.weight.shape) == (b.shape[0], a.shape[1]), path_
        rebuilt[path_] = b.float() @ a.float()
    assert 2 * len(rebuilt) == len(converted), "keys left over or unpaired"
    for spec in specs:
        if spec.group.value in ("embedding", "io"):
            continue  # skipped by diffusers' loader (below); its converter also ignores the final layer's alpha
        expected = lora.layers[spec.kohya].delta()
        if spec.splits:
            got = torch.zeros_like(expected)
            for sp in spec.splits:
                src = sp.part_rows or (0, sp.rows[1] - sp.rows[0])
                got[sp.rows[0]:sp.rows[1]] = rebuilt[sp.path][src[0]:src[1]]
        else:
            got = rebuilt[spec.diffusers]
        assert torch.allclose(got, expected, atol=1e-7, rtol=1e-4), spec.kohya
    # Finding (diffusers 0.42): the embedders and the final layer come out of the converter without
    # the "transformer." prefix, so load_lora_weights skips them silently; the attn_mlp preset (the
    # double/single blocks, kohya's targets) loads completely.
    skipped = {s.kohya for s in specs if any(p in unprefixed for p in s.diffusers_modules)}
    assert skipped == {s.kohya for s in specs if s.group.value in ("embedding", "io")}
    assert all(s.group.value not in ("embedding", "io") for s in table.select(LayerPreset.ATTN_MLP))


@needs_diffusers
@pytest.mark.parametrize("arch, naming", [(Arch.SD3, "diffusers")])
def test_diffusers_loader_takes_every_key(tmp_path, arch, naming):
    """SD3: diffusers names, which its loader reads as they are, into a tiny SD3 pipeline; after
    fuse_lora every weight moved by our ΔW (fused q/k/v rebuilt from its parts). T5 layers are left
    out (diffusers' SD3 LoRA loader does not load T5; ComfyUI does)."""
    table = key_table(arch, "tiny")
    t5 = {Arch.FLUX: Component.TE2, Arch.SD3: Component.TE3}[arch]
    full = random_lora(table, rank=3, preset=LayerPreset.ALL, seed=4)
    lora = Lora({n: l for n, l in full.layers.items() if table.by_kohya(n).component is not t5}, arch=arch)
    specs = [table.by_kohya(n) for n in lora.layers]
    pipe = _pipeline(arch)
    path = tmp_path / f"{arch.value}.safetensors"
    save_lora(lora, path, dtype=torch.float32, naming=naming)
    before = _weights(pipe, table)
    pipe.load_lora_weights(str(path))
    for spec in specs:
        for p in spec.diffusers_modules:
            comp, sub = p.split(".", 1)
            root = getattr(pipe, comp)
            try:
                mod = root.get_submodule(sub)
            except AttributeError:
                mod = root.get_submodule(sub.removeprefix("text_model."))
            assert isinstance(mod, PeftLoraLayer), f"{spec.kohya}: {p} got no LoRA"
    pipe.fuse_lora()
    after = _weights(pipe, table)
    for spec in specs:
        expected = lora.layers[spec.kohya].delta().reshape(spec.shape[0], -1)
        got = _fused_delta(spec, before, after).reshape(spec.shape[0], -1)
        assert torch.allclose(got, expected, atol=1e-5), spec.kohya


def test_partial_diffusers_parts_read_as_zero_rows():
    """A diffusers/PEFT Flux LoRA that trains only to_q and to_v (as many trainers do) reads as the
    fused qkv layer with zero k rows, exactly."""
    table = key_table(Arch.FLUX, "tiny")
    gen = torch.Generator().manual_seed(7)
    h = 32
    sd = {}
    for name in ("to_q", "to_v"):
        sd[f"transformer.transformer_blocks.0.attn.{name}.lora_A.weight"] = torch.randn(2, h, generator=gen)
        sd[f"transformer.transformer_blocks.0.attn.{name}.lora_B.weight"] = torch.randn(h, 2, generator=gen)
    sd["transformer.single_transformer_blocks.1.proj_mlp.lora_A.weight"] = torch.randn(3, h, generator=gen)
    sd["transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight"] = torch.randn(4 * h, 3, generator=gen)
    lora, report = lora_from_state_dict(sd)
    assert lora.arch is Arch.FLUX and set(lora.layers) == {"lora_unet_double_blocks_0_img_attn_qkv",
                                                           "lora_unet_single_blocks_1_linear1"}
    qkv = lora.layers["lora_unet_double_blocks_0_img_attn_qkv"].delta()
    q = sd["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"] @ sd["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
    v = sd["transformer.transformer_blocks.0.attn.to_v.lora_B.weight"] @ sd["transformer.transformer_blocks.0.attn.to_v.lora_A.weight"]
    assert torch.allclose(qkv[:h], q, atol=1e-6) and torch.equal(qkv[h:2 * h], torch.zeros(h, h))
    assert torch.allclose(qkv[2 * h:], v, atol=1e-6)
    lin1 = lora.layers["lora_unet_single_blocks_1_linear1"].delta()
    assert lin1.shape == table.by_kohya("lora_unet_single_blocks_1_linear1").shape
    assert torch.equal(lin1[:3 * h], torch.zeros(3 * h, h))

"""Extraction from Flux / Chroma / SD3 pairs and from files in different layouts, matched by the records.

Pairs are written by ``synthetic.write_checkpoint_pair`` from the records (tiny widths here; real
widths in tests/integration) with a planted low-rank ΔW; base and tuned come in different layouts
(all-in-one, ComfyUI, diffusion-model-only, diffusers with split q/k/v). Extraction must recover the
planted ΔW, and at a rank below the planted one give the Eckart–Young optimum of the true ΔW.
"""

from __future__ import annotations

import math

import pytest
import torch

from rankwise.core.archs import FileLayout, LayerPreset, diffusion_layout, key_table, record
from rankwise.core.errors import MismatchError
from rankwise.core.extract import ExtractOptions, extract
from rankwise.core.rank import RankPolicy, RankRule
from rankwise.core.sources import StateDictSource, open_source, preflight
from rankwise.core.svd import SvdMethod
from rankwise.core.synthetic import PlantedDelta, reduced_depth, write_checkpoint_pair
from rankwise.core.types import Arch, as_matrix


DIT = [Arch.FLUX, Arch.SD3, Arch.CHROMA]


def _options(rank: int, **kw) -> ExtractOptions:
    kw.setdefault("device", "cpu")
    kw.setdefault("method", SvdMethod.EXACT)
    kw.setdefault("factor_dtype", torch.float32)
    kw.setdefault("preset", LayerPreset.ALL)
    return ExtractOptions(policy=RankPolicy(RankRule.parse(str(rank))), **kw)


def _extras(arch: Arch, size: str = "tiny") -> dict:
    if record(arch).family.value == "unet":
        return {}
    pre = record(arch).diffusion_prefixes.checkpoint
    return {pre + k: (s, "float32") for k, s in diffusion_layout(arch, size).items()
            if not (k.endswith(".weight") and len(s) >= 2)}


def _pair(tmp_path, arch, layouts, rank=4, **kw):
    base, tuned = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    planted = write_checkpoint_pair(base, tuned, arch, size="tiny", delta=PlantedDelta(rank=rank, scale=0.05),
                                    dtype=torch.float32, extra_layout=_extras(arch), layouts=layouts, **kw)
    return base, tuned, planted


@pytest.mark.parametrize("arch", DIT)
@pytest.mark.parametrize("layouts", [("bare", "bare"), ("checkpoint", "bare"), ("diffusers", "comfy"),
                                     ("bare", "diffusers")])
def test_mixed_layouts_recover_the_planted_delta(tmp_path, arch, layouts):
    base, tuned, planted = _pair(tmp_path, arch, layouts)
    b, t = open_source(base), open_source(tuned)
    table, pair = preflight(b, t)
    assert pair.arch is arch and pair.layers == len(table.select(components=["unet"]))
    lora, report = extract(b, t, _options(8))
    unet = {n: d for n, d in planted.items() if table.by_kohya(n).component.value == "unet"}
    assert set(lora.layers) == set(unet)
    for name, dw in unet.items():
        got = lora.layers[name].delta().reshape(dw.shape)
        assert float((got - dw).norm()) <= 1e-4 * float(dw.norm()), name
    if layouts[0] != layouts[1]:
        assert any("layouts differ" in n for n in pair.notes)


@pytest.mark.parametrize("arch", DIT)
def test_rank_below_planted_is_the_eckart_young_optimum(tmp_path, arch):
    base, tuned, planted = _pair(tmp_path, arch, ("bare", "diffusers"), rank=6)
    lora, _ = extract(open_source(base), open_source(tuned), _options(3))
    for name, dw in planted.items():
        spec = key_table(arch, "tiny").by_kohya(name)
        if spec.component.value != "unet":
            continue
        s = torch.linalg.svdvals(as_matrix(dw).double())
        optimum = math.sqrt(float((s[3:] ** 2).sum()))
        err = float((as_matrix(lora.layers[name].delta()).double() - as_matrix(dw).double()).norm())
        assert err <= optimum * (1 + 1e-4) + 1e-7, (name, err, optimum)


def test_reduced_depth_keeps_the_first_blocks(tmp_path):
    keep = reduced_depth(Arch.FLUX, double=1, single=2)
    base, tuned = tmp_path / "b.safetensors", tmp_path / "t.safetensors"
    write_checkpoint_pair(base, tuned, Arch.FLUX, size="tiny", keep=keep, layouts=("bare", "bare"))
    src = open_source(base)
    keys = set(src.inner.keys())
    assert "double_blocks.0.img_attn.qkv.weight" in keys and "double_blocks.1.img_attn.qkv.weight" not in keys
    assert "single_blocks.1.linear1.weight" in keys and "img_in.weight" in keys
    assert src.detection.layout is FileLayout.BARE and src.detection.arch is Arch.FLUX


@pytest.mark.parametrize("preset", [LayerPreset.ATTN_MLP, LayerPreset.ALL])
def test_chroma_extract_save_load_is_the_identity(tmp_path, preset):
    """Chroma from a reduced pair (the first double/single blocks, every approximator layer):
    detected as Chroma, not Flux; saved with kohya names and its record's metadata; read back as
    Chroma with the same factors — also with block layers only, whose names and shapes are Flux's."""
    from rankwise.core.io import load_lora, save_lora

    keep = reduced_depth(Arch.CHROMA, double=1, single=1)
    base, tuned, planted = _pair(tmp_path, Arch.CHROMA, ("bare", "checkpoint"), keep=keep)
    b, t = open_source(base), open_source(tuned)
    from rankwise.core.layouts import detect_source

    found_b, found_t = detect_source(b), detect_source(t)
    assert (found_b.arch, found_b.layout) == (Arch.CHROMA, FileLayout.BARE)
    assert (found_t.arch, found_t.layout) == (Arch.CHROMA, FileLayout.CHECKPOINT)
    lora, _ = extract(b, t, _options(8, preset=preset))
    names = set(lora.layers)
    assert "lora_unet_double_blocks_0_img_attn_qkv" in names and "lora_unet_double_blocks_1_img_attn_qkv" not in names
    assert any(n.startswith("lora_unet_distilled_guidance_layer_") for n in names) == (preset is LayerPreset.ALL)
    assert lora.metadata["ss_base_model_version"] == "chroma"
    path = tmp_path / "chroma_lora.safetensors"
    save_lora(lora, path, dtype=torch.float32, naming="kohya")
    back, report = load_lora(path)
    assert back.arch is Arch.CHROMA and set(back.layers) == names, report.summary()
    assert back.metadata["modelspec.architecture"] == "chroma/lora"
    for name, layer in lora.layers.items():
        got = back.layers[name]
        assert torch.equal(got.up, layer.up) and torch.equal(got.down, layer.down) and got.alpha == layer.alpha, name
        dw = planted[name]
        assert float((got.delta().reshape(dw.shape) - dw).norm()) <= 1e-4 * float(dw.norm()), name


def test_different_architectures_name_both(tmp_path):
    flux_b, flux_t, _ = _pair(tmp_path, Arch.FLUX, ("bare", "bare"))
    xl = tmp_path / "xl"
    xl.mkdir()
    xl_b, xl_t = xl / "b.safetensors", xl / "t.safetensors"
    write_checkpoint_pair(xl_b, xl_t, Arch.SDXL, size="tiny")
    with pytest.raises(MismatchError, match=r"base 'b.safetensors' is SDXL .*tuned 'tuned.safetensors' is FLUX "
                                            r"\(Flux.1, a diffusion-model-only file"):
        preflight(open_source(xl_b), open_source(flux_t))


def test_raw_sources_in_another_layout_are_named(tmp_path):
    base, tuned, _ = _pair(tmp_path, Arch.FLUX, ("bare", "checkpoint"))
    from rankwise.core.sources import FileSource

    with pytest.raises(MismatchError, match="diffusion-model-only file .*open_source"):
        preflight(FileSource(base), FileSource(tuned))


def test_unet_only_file_against_a_full_checkpoint(tmp_path):
    """Issue 10: a bare ``input_blocks.*`` UNet (or a diffusers ``down_blocks.*`` UNet) against a full
    SD1 checkpoint extracts the UNet; the text encoder is left out with a note."""
    for layouts in (("checkpoint", "bare"), ("diffusers", "checkpoint"), ("comfy", "checkpoint")):
        base, tuned, planted = _pair(tmp_path, Arch.SD1, layouts)
        b, t = open_source(base), open_source(tuned)
        table, pair = preflight(b, t)
        assert [c.value for c in pair.components] == ["unet"], pair
        assert any("left out" in n for n in pair.notes) and any("layouts differ" in n for n in pair.notes)
        lora, _ = extract(b, t, _options(8))
        for name, layer in lora.layers.items():
            dw = planted[name]
            assert float((layer.delta().reshape(dw.shape) - dw).norm()) <= 1e-4 * float(dw.norm()), name


def test_state_dict_views_stay_comparable():
    """A StateDictSource in checkpoint keys needs no view: canonical_source returns it."""
    from rankwise.core.layouts import canonical_source

    table = key_table(Arch.SD1, "tiny")
    sd = {k: torch.zeros(table.checkpoint_shape(k)) for k in table.checkpoint_keys()}
    src = StateDictSource(sd)
    assert canonical_source(src) is src


@pytest.mark.parametrize("arch", DIT)
def test_comfyui_graph_keys_pair_and_extract(arch):
    """A MODEL + CLIP pair from a ComfyUI graph is keyed diffusion_model.… / clip_l.transformer.… /
    t5xxl.transformer.…: the records' comfy prefixes, so make_pair and extraction take it as is."""
    from rankwise.core.sources import KeyStyle
    from rankwise.nodes.pair import make_pair

    table = key_table(arch, "tiny")
    gen = torch.Generator().manual_seed(0)
    base = {s.comfy_key: torch.randn(s.shape, generator=gen) * 0.02 for s in table}
    planted = {}
    tuned = {}
    for s in table:
        w = base[s.comfy_key]
        if s.component.value == "unet" and s.kind.value == "linear":
            u, v = torch.randn(s.shape[0], 2, generator=gen), torch.randn(2, s.shape[1], generator=gen)
            planted[s.kohya] = 1e-3 * u @ v
            w = w + planted[s.kohya]
        tuned[s.comfy_key] = w
    pair = make_pair(StateDictSource(base, "base"), StateDictSource(tuned, "tuned"), key_style=KeyStyle.COMFY)
    assert pair.check.arch is arch and pair.check.size == "tiny"
    lora, _ = extract(pair.base, pair.tuned, _options(4, key_style=KeyStyle.COMFY))
    for name, dw in planted.items():
        assert float((lora.layers[name].delta() - dw).norm()) <= 1e-4 * float(dw.norm()), name


def test_safetensors_header_length_ending_in_0x80_is_not_a_pickle(tmp_path):
    """A safetensors header whose length has 0x80 as its low byte starts with the pickle protocol
    opcode; content sniffing must still see safetensors (found writing reduced Flux files)."""
    import struct

    from rankwise.core.io import FileKind, sniff

    header = b'{"__metadata__":{"a":"' + b"x" * (0x80 - 24) + b'"}}'
    header += b" " * ((0x180 - len(header)) if len(header) < 0x180 else 0)
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    assert len(header) & 0xFF == 0x80
    assert sniff(path) is FileKind.SAFETENSORS

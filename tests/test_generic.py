"""The generic path: a pair with no architecture record, Conv3d layers, exact .diff / .diff_b parts."""

from __future__ import annotations

import pytest
import torch
from generic_layouts import planted_tuned, random_state_dict, wan21_layout
from safetensors import safe_open
from safetensors.torch import save_file

from rankwise.core import cli
from rankwise.core.errors import MismatchError
from rankwise.core.extract import ExtractOptions, extract_detailed
from rankwise.core.formats import lora_to_state_dict
from rankwise.core.generic import (
    DiffusionModelView, comfy_names_check, diffusion_view, has_record, layer_block, layer_group, part_name,
)
from rankwise.core.archs import LayerGroup
from rankwise.core.rank import RankPolicy, parse_rules
from rankwise.core.sources import KeyStyle, StateDictSource, open_source
from rankwise.core.types import BiasDiffLayer, DiffLayer, LayerKind, Lora, LoraLayer


def _options(rank: int, **kw) -> ExtractOptions:
    return ExtractOptions(policy=RankPolicy(parse_rules(str(rank))[0]), key_style=KeyStyle.GENERIC,
                          factor_dtype=torch.float32, **kw)


def _views(base: dict, tuned: dict, base_prefix: str = "", tuned_prefix: str = ""):
    b = StateDictSource({base_prefix + k: v for k, v in base.items()}, name="base")
    t = StateDictSource({tuned_prefix + k: v for k, v in tuned.items()}, name="tuned")
    return diffusion_view(b), diffusion_view(t)


def _module_name(key: str) -> str:
    return "diffusion_model." + key[: -len(".weight")]


def test_conv3d_patch_embedding_round_trip(gen):
    """A planted rank-3 ΔW of a 5-D Conv3d weight comes back exactly (ΔW in = ΔW out), with
    down (r, in, kt, kh, kw) and up (out, r, 1, 1, 1) as ComfyUI applies them."""
    w = torch.randn(64, 16, 1, 2, 2, generator=gen) * 0.02
    planted = (torch.randn(64, 3, generator=gen) @ torch.randn(3, 64, generator=gen)).reshape(64, 16, 1, 2, 2)
    b, t = _views({"patch_embedding.weight": w}, {"patch_embedding.weight": w + planted})
    result = extract_detailed(b, t, _options(rank=3))
    layer = result.lora.layers["diffusion_model.patch_embedding"]
    assert isinstance(layer, LoraLayer) and layer.kind is LayerKind.CONV
    assert tuple(layer.down.shape) == (3, 16, 1, 2, 2) and tuple(layer.up.shape) == (64, 3, 1, 1, 1)
    assert torch.allclose(layer.delta(), planted, atol=1e-5 * float(planted.abs().max()))
    # ComfyUI's LoRA math: mm(up.flatten(1), down.flatten(1)).reshape(weight.shape) · alpha / rank
    sd = lora_to_state_dict(result.lora, dtype=torch.float32)
    up, down = sd["diffusion_model.patch_embedding.lora_up.weight"], sd["diffusion_model.patch_embedding.lora_down.weight"]
    alpha = float(sd["diffusion_model.patch_embedding.alpha"])
    comfy = (torch.mm(up.flatten(1), down.flatten(1)) * (alpha / down.shape[0])).reshape(w.shape)
    assert torch.allclose(comfy, planted, atol=1e-5 * float(planted.abs().max()))


def test_exact_parts_reproduce_1d_weights_biases_and_parameters_bit_for_bit():
    layout = wan21_layout(dim=128, ffn=256, text_dim=64)
    base = random_state_dict(layout, seed=3)
    tuned, deltas = planted_tuned(base, seed=4)
    b, t = _views(base, tuned)
    result = extract_detailed(b, t, _options(rank=4, exact_parts=True))
    sd = lora_to_state_dict(result.lora, dtype=torch.float32)
    vectors = [k for k, v in layout.items() if not (k.endswith(".weight") and len(v) in (2, 4, 5))]
    assert vectors
    for key in vectors:
        if key.endswith(".bias"):
            stored = sd[f"diffusion_model.{key[:-5]}.diff_b"]
        elif key.endswith(".weight"):
            stored = sd[f"diffusion_model.{key[:-7]}.diff"]
        else:  # e.g. blocks.0.modulation: ComfyUI maps a non-.weight key to itself
            stored = sd[f"diffusion_model.{key}.diff"]
        # exact: base + diff (in fp32) gives the tuned value, then the stored dtype, bit for bit
        assert torch.equal((base[key].float() + stored).to(tuned[key].dtype), tuned[key]), key
        assert torch.equal(stored, deltas[key]), key
    assert any(n.startswith("exact parts: ") for n in result.report.notes)


def test_unchanged_parts_are_left_out_and_parts_are_off_by_default(gen):
    w = torch.randn(16, 8, generator=gen)
    base = {"a.weight": w, "a.bias": torch.zeros(16), "n.weight": torch.ones(16)}
    tuned = {"a.weight": w + 0.1, "a.bias": torch.zeros(16), "n.weight": torch.ones(16) * 1.5}
    b, t = _views(base, tuned)
    with_parts = extract_detailed(b, t, _options(rank=1, exact_parts=True)).lora
    assert set(with_parts.layers) == {"diffusion_model.a", "diffusion_model.n"}
    assert isinstance(with_parts.layers["diffusion_model.n"], DiffLayer)
    without = extract_detailed(b, t, _options(rank=1)).lora
    assert set(without.layers) == {"diffusion_model.a"}


def test_exact_parts_need_the_generic_key_style():
    with pytest.raises(ValueError, match="generic key style"):
        ExtractOptions(policy=RankPolicy(parse_rules("4")[0]), exact_parts=True)


def test_bias_layer_is_written_as_diff_b_beside_the_module():
    lora = Lora(layers={
        "diffusion_model.x": LoraLayer(up=torch.ones(4, 1), down=torch.ones(1, 3), alpha=1.0),
        "diffusion_model.x.bias": BiasDiffLayer(torch.arange(4.0)),
        "diffusion_model.n": DiffLayer(torch.ones(4)),
    })
    sd = lora_to_state_dict(lora, dtype=torch.float32)
    assert sorted(sd) == ["diffusion_model.n.diff", "diffusion_model.x.alpha", "diffusion_model.x.diff_b",
                          "diffusion_model.x.lora_down.weight", "diffusion_model.x.lora_up.weight"]
    assert torch.equal(sd["diffusion_model.x.diff_b"], torch.arange(4.0))
    assert part_name("diffusion_model.x.bias") == ("diffusion_model.x.bias", True)
    assert part_name("diffusion_model.n.weight") == ("diffusion_model.n", False)
    assert part_name("diffusion_model.blocks.0.modulation") == ("diffusion_model.blocks.0.modulation", False)


def test_mixed_layouts_checkpoint_against_bare_file(gen):
    w = torch.randn(32, 16, generator=gen)
    base = {"blocks.0.q.weight": w}
    tuned = {"blocks.0.q.weight": w + torch.outer(torch.ones(32), torch.ones(16))}
    b, t = _views(base, tuned, base_prefix="model.diffusion_model.")
    extra = StateDictSource({"model.diffusion_model.blocks.0.q.weight": w, "first_stage_model.x.weight": w,
                             "cond_stage_model.y.weight": w}, name="ckpt")
    assert list(DiffusionModelView(extra).keys()) == ["diffusion_model.blocks.0.q.weight"]
    lora = extract_detailed(b, t, _options(rank=1)).lora
    assert list(lora.layers) == ["diffusion_model.blocks.0.q"]
    assert torch.allclose(lora.layers["diffusion_model.blocks.0.q"].delta(), torch.ones(32, 16), atol=1e-5)


def test_layout_differences_are_listed(gen):
    w = torch.randn(8, 8, generator=gen)
    b, t = _views({"a.weight": w, "b.weight": w}, {"a.weight": torch.randn(8, 4, generator=gen), "c.weight": w})
    with pytest.raises(MismatchError) as e:
        extract_detailed(b, t, _options(rank=1))
    msg = str(e.value)
    assert "missing in tuned 'tuned': diffusion_model.b.weight" in msg
    assert "missing in base 'base': diffusion_model.c.weight" in msg
    assert "diffusion_model.a.weight [8, 8] vs [8, 4]" in msg


def test_names_groups_and_blocks():
    assert layer_group("blocks.0.self_attn.q") is LayerGroup.ATTENTION
    assert layer_group("double_blocks.0.img_attn.qkv") is LayerGroup.ATTENTION
    assert layer_group("blocks.0.ffn.0") is LayerGroup.MLP
    assert layer_group("transformer_blocks.3.img_mlp.net.0.proj") is LayerGroup.MLP
    assert layer_group("patch_embedding") is LayerGroup.EMBEDDING
    assert layer_group("head.head") is LayerGroup.IO
    assert layer_block("blocks.3.self_attn.q") == "blocks.3"
    assert layer_block("double_blocks.0.img_attn.qkv") == "double_blocks.0"
    assert layer_block("transformer_blocks.12.attn.to_q") == "transformer_blocks.12"
    assert layer_block("patch_embedding") == "other"
    key_map = {"diffusion_model.a": "diffusion_model.a.weight", "diffusion_model.a.bias": "diffusion_model.a.bias"}
    assert comfy_names_check(["diffusion_model.a", "diffusion_model.a.bias", "diffusion_model.z"], key_map) == (
        "diffusion_model.z",)


def _wan_files(tmp_path, dtype=torch.float32):
    layout = wan21_layout(dim=256, ffn=512, layers=2)
    base = random_state_dict(layout, seed=5, dtype=dtype)
    tuned, deltas = planted_tuned(base, rank=4, seed=6)
    bp, tp = tmp_path / "wan_base.safetensors", tmp_path / "wan_tuned.safetensors"
    save_file(base, str(bp))
    save_file(tuned, str(tp))
    return layout, bp, tp, deltas


def test_cli_falls_back_to_generic_for_a_wan_layout(tmp_path, capsys):
    layout, bp, tp, deltas = _wan_files(tmp_path)
    assert not has_record(open_source(bp), open_source(tp))
    out = tmp_path / "wan_lora.safetensors"
    rc = cli.main(["extract", str(bp), str(tp), "-o", str(out), "--rank", "4", "--exact-parts", "--dtype", "fp32",
                   "--no-progress"])
    assert rc == 0
    assert "generic mode" in capsys.readouterr().err
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        sd = {k: f.get_tensor(k) for k in keys}
    # ComfyUI-native names of every Linear/Conv weight of ComfyUI's WanModel (comfy/ldm/wan/model.py)
    layers = [k for k, s in layout.items() if k.endswith(".weight") and len(s) in (2, 4, 5)]
    for key in layers:
        name = _module_name(key)
        assert {f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.alpha"} <= keys, key
        up, down = sd[f"{name}.lora_up.weight"].flatten(1), sd[f"{name}.lora_down.weight"].flatten(1)
        delta = (up @ down * (float(sd[f"{name}.alpha"]) / down.shape[0])).reshape(layout[key])
        # planted rank 4 at rank 4 (fp32 files): only the fp32 decomposition's rounding is left
        assert float((delta - deltas[key]).norm() / deltas[key].norm()) < 1e-3, key
    assert "diffusion_model.patch_embedding.lora_down.weight" in keys  # the Conv3d
    assert tuple(sd["diffusion_model.patch_embedding.lora_down.weight"].shape) == (4, 16, 1, 2, 2)
    assert "diffusion_model.blocks.1.cross_attn.q.diff_b" in keys
    assert "diffusion_model.blocks.1.norm3.diff" in keys
    assert "diffusion_model.head.modulation.diff" in keys
    assert not [k for k in keys if not k.startswith("diffusion_model.")]


def test_cli_recorded_arch_keeps_its_record_and_generic_is_explicit(tmp_path, capsys):
    from rankwise.core.synthetic import DeltaKind, PlantedDelta, write_checkpoint_pair
    from rankwise.core.types import Arch

    base, tuned = tmp_path / "b.safetensors", tmp_path / "t.safetensors"
    write_checkpoint_pair(base, tuned, Arch.SD1, size="tiny", delta=PlantedDelta(DeltaKind.LOWRANK, rank=2), seed=3)
    assert has_record(open_source(base), open_source(tuned))
    assert cli.main(["extract", str(base), str(tuned), "--rank", "2", "--exact-parts", "--dry-run",
                     "--no-progress"]) == 2
    assert "--exact-parts" in capsys.readouterr().err
    out = tmp_path / "g.safetensors"
    assert cli.main(["extract", str(base), str(tuned), "--rank", "2", "--generic", "-o", str(out),
                     "--no-progress"]) == 0
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("diffusion_model.") for k in keys)  # the UNet only, native names


def test_resize_keeps_exact_parts_and_refactors_the_rest():
    from rankwise.core.resize import resize

    layout = wan21_layout(dim=128, ffn=256, text_dim=64)
    base = random_state_dict(layout, seed=7)
    tuned, _ = planted_tuned(base, seed=8)
    b, t = _views(base, tuned)
    lora = extract_detailed(b, t, _options(rank=8, exact_parts=True)).lora
    small, report = resize(lora, RankPolicy(parse_rules("2")[0]), strength=0.5)
    bias = "diffusion_model.blocks.0.ffn.0.bias"
    assert isinstance(small.layers[bias], BiasDiffLayer)
    assert torch.equal(small.layers[bias].diff, lora.layers[bias].diff * 0.5)
    assert small.layers["diffusion_model.blocks.0.ffn.0"].rank == 2
    assert any("exact part(s)" in n for n in report.notes)
    assert len(small.layers) == len(lora.layers)


def test_generic_lora_file_reads_back_and_resizes(tmp_path):
    """A saved generic LoRA (ComfyUI-native names, a Conv3d, .diff / .diff_b) is read back exactly by
    Load LoRA's reader, with no architecture record, and resizes."""
    from rankwise.core.io import load_lora, save_lora
    from rankwise.core.resize import resize

    layout = wan21_layout(dim=128, ffn=256, text_dim=64)
    base = random_state_dict(layout, seed=9, dtype=torch.float32)
    tuned, _ = planted_tuned(base, seed=10)
    b, t = _views(base, tuned)
    lora = extract_detailed(b, t, _options(rank=4, exact_parts=True)).lora
    path = tmp_path / "wan.safetensors"
    save_lora(lora, path, dtype=torch.float32)
    got = load_lora(path)
    back = got[0] if isinstance(got, tuple) else got
    assert set(back.layers) == set(lora.layers)
    for name, layer in lora.layers.items():
        assert type(back.layers[name]) is type(layer), name
        assert torch.allclose(back.layers[name].delta(), layer.delta(), atol=1e-7), name
    small, _ = resize(back, RankPolicy(parse_rules("2")[0]))
    assert small.layers["diffusion_model.patch_embedding"].rank == 2
    assert isinstance(small.layers["diffusion_model.head.head.bias"], BiasDiffLayer)


@pytest.mark.parametrize("mode", ["concat", "svd"])
def test_merge_sums_exact_parts_exactly(mode):
    from rankwise.core.merge import MergeInput, MergeMode, merge

    layout = wan21_layout(dim=128, ffn=256, text_dim=64)
    base = random_state_dict(layout, seed=13, dtype=torch.float32)
    t1, _ = planted_tuned(base, seed=14)
    t2, _ = planted_tuned(base, seed=15)
    b = _views(base, base)[0]
    l1 = extract_detailed(b, _views(t1, t1)[0], _options(rank=4, exact_parts=True)).lora
    l2 = extract_detailed(b, _views(t2, t2)[0], _options(rank=4, exact_parts=True)).lora
    policy = RankPolicy(parse_rules("4")[0]) if mode == "svd" else None
    merged, _ = merge([MergeInput(l1, 0.5), MergeInput(l2, -2.0)], mode=MergeMode(mode), policy=policy,
                      dtype=torch.float32)
    for name in ("diffusion_model.blocks.0.ffn.0.bias", "diffusion_model.blocks.0.norm3", "diffusion_model.head.modulation"):
        expected = 0.5 * l1.layers[name].delta() - 2.0 * l2.layers[name].delta()
        assert type(merged.layers[name]) is type(l1.layers[name])
        assert torch.allclose(merged.layers[name].delta(), expected, atol=1e-7), name

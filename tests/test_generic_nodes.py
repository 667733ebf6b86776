"""The generic path as the nodes use it (no ComfyUI: graph sources are state dicts with ComfyUI's keys)."""

from __future__ import annotations

import torch
from generic_layouts import planted_tuned, random_state_dict, wan21_layout
from safetensors.torch import save_file

from rankwise.core.extract import ExtractOptions, extract_detailed
from rankwise.core.rank import RankPolicy, parse_rules
from rankwise.core.sources import KeyStyle, StateDictSource, open_source
from rankwise.core.synthetic import DeltaKind, PlantedDelta, write_checkpoint_pair
from rankwise.core.types import Arch
from rankwise.nodes.pair import diffusion_file_pair, make_pair_or_generic


def _key_map(model_keys) -> dict[str, str]:
    """What comfy.lora.model_lora_keys_unet builds from a model's state-dict keys (its generic part)."""
    out = {}
    for k in model_keys:
        if k.endswith(".weight"):
            out[k[: -len(".weight")]] = k
            out["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
        else:
            out[k] = k
    return out


def _graph_pair():
    layout = wan21_layout(dim=128, ffn=256, text_dim=64)
    base = random_state_dict(layout, seed=1, dtype=torch.float32)
    tuned, deltas = planted_tuned(base, rank=2, seed=2)
    g = lambda sd: {"diffusion_model." + k: v for k, v in sd.items()}  # noqa: E731
    clip = {"clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(8)}
    b = StateDictSource({**g(base), **clip}, name="base")
    t = StateDictSource({**g(tuned), **clip}, name="tuned")
    return b, t, deltas, g(base)


def test_graph_pair_without_record_is_generic_and_checked_against_the_key_map():
    b, t, deltas, model_sd = _graph_pair()
    pair = make_pair_or_generic(b, t, key_style=KeyStyle.COMFY, exact_parts=True, key_map=_key_map(model_sd))
    assert pair.generic and pair.arch is None and pair.exact_parts
    text = pair.describe()
    assert "generic mode" in text and "all 17 layer names are in ComfyUI's key map" in text
    options = ExtractOptions(policy=RankPolicy(parse_rules("2")[0]), key_style=pair.key_style,
                             exact_parts=pair.exact_parts, factor_dtype=torch.float32)
    lora = extract_detailed(pair.base, pair.tuned, options).lora
    weights = [k for k, v in deltas.items() if k.endswith(".weight") and v.dim() in (2, 4, 5)]
    assert {f"diffusion_model.{k[:-7]}" for k in weights} <= set(lora.layers)
    assert "diffusion_model.blocks.0.self_attn.q.bias" in lora.layers  # written as .diff_b
    assert not any("clip_l" in n for n in lora.layers)
    for key in weights:
        d = lora.layers[f"diffusion_model.{key[:-7]}"].delta()
        assert float((d - deltas[key]).norm() / deltas[key].norm()) < 1e-3, key


def test_names_outside_the_key_map_are_reported():
    b, t, _, model_sd = _graph_pair()
    key_map = _key_map(k for k in model_sd if "patch_embedding" not in k)
    pair = make_pair_or_generic(b, t, key_style=KeyStyle.COMFY, key_map=key_map)
    assert "1 of 17 layer names are not in ComfyUI's key map" in pair.describe()
    assert "diffusion_model.patch_embedding" in pair.describe()


def test_diffusion_model_files_recorded_arch_and_generic(tmp_path):
    # a recorded architecture (SD1, tiny) shipped as bare diffusion-model files keeps its record
    cb, ct = tmp_path / "b.safetensors", tmp_path / "t.safetensors"
    write_checkpoint_pair(cb, ct, Arch.SD1, size="tiny", delta=PlantedDelta(DeltaKind.LOWRANK, rank=2), seed=1)
    for src, dst in ((cb, tmp_path / "bu.safetensors"), (ct, tmp_path / "tu.safetensors")):
        s = open_source(src)
        save_file({k[len("model.diffusion_model."):]: s.get(k) for k in s.keys()
                   if k.startswith("model.diffusion_model.")}, str(dst))
    pair = diffusion_file_pair(open_source(tmp_path / "bu.safetensors"), open_source(tmp_path / "tu.safetensors"))
    assert pair.arch is Arch.SD1 and not pair.generic
    # a Wan 2.1 layout has no record: generic
    layout = wan21_layout(dim=128, ffn=256, text_dim=64)
    base = random_state_dict(layout, seed=3)
    tuned, _ = planted_tuned(base, seed=4)
    save_file(base, str(tmp_path / "wb.safetensors"))
    save_file(tuned, str(tmp_path / "wt.safetensors"))
    pair = diffusion_file_pair(open_source(tmp_path / "wb.safetensors"), open_source(tmp_path / "wt.safetensors"),
                               exact_parts=True)
    assert pair.generic and pair.exact_parts and pair.check.layers == 17

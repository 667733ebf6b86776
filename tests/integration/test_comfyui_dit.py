"""ComfyUI itself as the oracle for Flux.1 and SD3: its key map consumes every layer of our tables
(kohya names, and SD3's diffusers names with the fused q/k/v split), ComfyUI detects our reduced
files as Flux / SD3 (``comfy.model_detection`` through ``load_diffusion_model``), its loader applies
every key of a LoRA Rankwise extracted from them, and base + LoRA reproduces tuned − base.

Flux needs real width (ComfyUI fixes Flux's hidden size at 3072), so its pair has one double and one
single block (2 × ~1 GB in fp16); SD3's width is 64 × depth, so two joint blocks make a 128-wide
model ComfyUI builds as SD3.
"""

from __future__ import annotations

import json

import pytest
import torch

from comfy_harness import HERE

from rankwise.core.archs import LayerPreset, diffusion_layout, key_table, record
from rankwise.core.extract import ExtractOptions, extract
from rankwise.core.io import save_lora
from rankwise.core.layouts import load_layout
from rankwise.core.rank import RankPolicy, RankRule
from rankwise.core.sources import open_source
from rankwise.core.svd import SvdMethod
from rankwise.core.synthetic import PlantedDelta, random_lora, reduced_depth, write_checkpoint_pair
from rankwise.core.types import Arch

# The few text-encoder keys ComfyUI's SD3 / Flux clip_target looks at to decide which encoders exist.
TE_MARKERS = {
    "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": ([768], "float16"),
    "text_encoders.clip_g.transformer.text_model.final_layer_norm.weight": ([1280], "float16"),
    "text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight": ([4096], "float16"),
}


def _keymap(comfy_install, tmp_path, arch: Arch, size: str, naming: str) -> dict:
    table = key_table(arch, size)
    lora = random_lora(table, rank=2, preset=LayerPreset.ALL, seed=1)
    lora_path = tmp_path / f"all_{arch.value}_{size}_{naming}.safetensors"
    save_lora(lora, lora_path, naming=naming)
    pre = record(arch).diffusion_prefixes.checkpoint
    layout = {pre + k: [list(s), "bfloat16"] for k, s in diffusion_layout(arch, size).items()}
    layout.update({k: [list(s), d] for k, (s, d) in TE_MARKERS.items()})
    layout_path = tmp_path / f"{arch.value}_{size}_layout.json"
    layout_path.write_text(json.dumps(layout))
    out = tmp_path / "keymap.json"
    proc = comfy_install.run_python(
        [str(HERE / "comfy_probe.py"), "--out", str(out), "keymap", "--layout", str(layout_path),
         "--lora", str(lora_path)], timeout=300)
    assert proc.returncode == 0 and out.exists(), f"probe failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    res = json.loads(out.read_text())
    res["table_layers"] = len(table)
    return res


@pytest.mark.parametrize("arch, size", [(Arch.FLUX, "full"), (Arch.SD3, "full"), (Arch.SD3, "large"),
                                        (Arch.CHROMA, "full")])
def test_comfyui_key_map_covers_every_dit_layer_kohya(comfy_install, tmp_path, arch, size):
    res = _keymap(comfy_install, tmp_path, arch, size, "kohya")
    expected_model = {Arch.FLUX: "Flux", Arch.SD3: "SD3", Arch.CHROMA: "Chroma"}[arch]
    assert res["model_class"] == expected_model, res
    assert res["not_loaded"] == [], f"lora key not loaded: {res['not_loaded'][:20]} (+{len(res['not_loaded'])})"
    assert res["lora_modules"] == res["table_layers"] == res["patch_targets"], res
    assert res["missing_targets"] == [] and res["shape_errors"] == [], res


def test_comfyui_key_map_takes_sd3_diffusers_names(comfy_install, tmp_path):
    res = _keymap(comfy_install, tmp_path, Arch.SD3, "full", "diffusers")
    assert res["not_loaded"] == [], res["not_loaded"][:20]
    assert res["missing_targets"] == [], res
    # one patch per diffusers module; the split q/k/v of a fused weight become row slices of it
    # (T5 layers keep their kohya names in this style)
    table = key_table(Arch.SD3)
    t5 = [s for s in table if s.kohya.startswith("lora_te3_")]
    assert t5 and res["patch_targets"] == sum(len(s.diffusers_modules) for s in table if s not in t5) + len(t5)


def _extract_and_apply(comfy_install, tmp_path, arch: Arch, size: str, keep, scale: float,
                       naming: str = "kohya") -> dict:
    base, tuned = tmp_path / f"{arch.value}_base.safetensors", tmp_path / f"{arch.value}_tuned.safetensors"
    pre = record(arch).diffusion_prefixes.checkpoint
    extras = {pre + k: (s, "float16") for k, s in diffusion_layout(arch, size).items()
              if not (k.endswith(".weight") and len(s) >= 2)}
    write_checkpoint_pair(base, tuned, arch, size=size, delta=PlantedDelta(rank=8, scale=scale),
                          dtype=torch.float16, extra_layout=extras, keep=keep, layouts=("bare", "bare"),
                          return_deltas=False)
    opts = ExtractOptions(policy=RankPolicy(RankRule.parse("16")), preset=LayerPreset.ALL, device="cpu",
                          method=SvdMethod.FAST, factor_dtype=torch.float16)
    lora, report = extract(open_source(base), open_source(tuned), opts)
    lora_path = tmp_path / f"{arch.value}_lora.safetensors"
    save_lora(lora, lora_path, naming=naming)
    out = tmp_path / "apply.json"
    proc = comfy_install.run_python(
        [str(HERE / "comfy_probe.py"), "--out", str(out), "apply", "--diffusion-model", "--base", str(base),
         "--tuned", str(tuned), "--lora", str(lora_path)], timeout=580)
    assert proc.returncode == 0 and out.exists(), f"probe failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    res = json.loads(out.read_text())
    res["written"] = len(lora.layers)
    return res


def _check_apply(res: dict, model_class: str, *, split: bool = False) -> None:
    assert res["model_class"] == model_class, res.get("model_class")
    assert res["not_loaded"] == [], f"ComfyUI did not load these LoRA keys: {res['not_loaded'][:20]}"
    if split:  # diffusers names: one module per q/k/v part, ComfyUI patches row slices of the fused weight
        assert res["patched_keys"] == res["written"], {k: v for k, v in res.items() if k != "layers"}
    else:
        assert res["lora_modules"] == res["written"] == res["patch_targets"] == res["patched_keys"], res
    assert res["unpatched_targets"] == []
    for layer in res["layers"]:
        assert "error" not in layer, layer
    worst = max(layer["rel_error"] for layer in res["layers"])
    assert worst < 0.02, f"base + LoRA misses tuned − base by {worst:.4g} (planted rank 8 < 16: fp16 noise only)"


@pytest.mark.parametrize("naming", ["kohya", "diffusers"])
def test_comfyui_detects_reduced_sd3_and_applies_every_key(comfy_install, tmp_path, naming):
    res = _extract_and_apply(comfy_install, tmp_path, Arch.SD3, "tiny", None, scale=0.2, naming=naming)
    _check_apply(res, "SD3", split=naming == "diffusers")
    assert res["unet_config"].get("depth") == 2


@pytest.mark.slow
def test_comfyui_detects_reduced_flux_and_applies_every_key(comfy_install, tmp_path):
    keep = reduced_depth(Arch.FLUX, double=1, single=1)
    res = _extract_and_apply(comfy_install, tmp_path, Arch.FLUX, "full", keep, scale=0.2)
    _check_apply(res, "Flux")
    assert res["unet_config"].get("depth") == 1 and res["unet_config"].get("depth_single_blocks") == 1


def test_comfyui_detects_reduced_chroma_and_applies_every_key(comfy_install, tmp_path):
    """Chroma at real width (ComfyUI fixes 3072 and the 64 → 5120 × 5 → 3072 approximator), one double
    and one single block: ComfyUI's model detection says Chroma (not Flux), and its loader patches
    every key of the kohya-named LoRA, the distilled_guidance_layer included."""
    keep = reduced_depth(Arch.CHROMA, double=1, single=1)
    res = _extract_and_apply(comfy_install, tmp_path, Arch.CHROMA, "full", keep, scale=0.2)
    _check_apply(res, "Chroma")
    assert res["unet_config"].get("depth") == 1 and res["unet_config"].get("depth_single_blocks") == 1
    assert any(layer["lora"].startswith("lora_unet_distilled_guidance_layer_") for layer in res["layers"])

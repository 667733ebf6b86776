"""The generic path inside a real ComfyUI: a reduced Wan 2.1 diffusion model (no Rankwise record).

ComfyUI loads the files with its own Load Diffusion Model (it detects Wan 2.1 from the keys), the
pack extracts from the pair through the generic path (Model Pair from Graph, and Load Diffusion
Model Pair streaming the files), Save LoRA writes ComfyUI-native names, and ComfyUI's own loader
must apply every key of the file; base + LoRA then reproduces tuned − base within the report.

Layout: ComfyUI's WanModel key names and shapes, 2 blocks, dim 512 (4 heads of 128), ffn 1536, the
real text width 4096; fp32 files so that the planted rank-8 ΔW is the whole difference.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from comfy_harness import HERE

sys.path.insert(0, str(HERE.parent))  # tests/: generic_layouts
from generic_layouts import planted_tuned, random_state_dict, wan21_layout  # noqa: E402

BASE, TUNED = "rankwise_wan_base.safetensors", "rankwise_wan_tuned.safetensors"
_ROW = re.compile(r"^(\S+)\s+(\S+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\S+)")
EXTRACT = {"rules": "16", "max_rank": 128, "conv_rank": 0, "te_rank": 0, "min_rank": 1, "layers": "all",
           "text_encoders": "none", "method": "exact", "clamp_quantile": 0.0, "seed": 0}


@pytest.fixture(scope="module")
def wan_files(comfy_server):
    import torch

    folder = comfy_server.base_dir / "models" / "diffusion_models"
    folder.mkdir(parents=True, exist_ok=True)
    layout = wan21_layout(dim=512, ffn=1536, layers=2)
    base = random_state_dict(layout, seed=11, dtype=torch.float32)
    tuned, _ = planted_tuned(base, rank=8, seed=12)
    save_file(base, str(folder / BASE))
    save_file(tuned, str(folder / TUNED))
    return folder / BASE, folder / TUNED, layout


def _texts(entry: dict, node_id: str) -> list[str]:
    return [str(t) for t in (entry["outputs"].get(node_id) or {}).get("text", [])]


def _saved(server, entry: dict, node_id: str) -> list[Path]:
    return [server.base_dir / "models" / "loras" / name
            for text in _texts(entry, node_id) for name in re.findall(r"saved (\S+\.safetensors)", text)]


def _rows(table: str) -> dict[str, tuple[int, float, float]]:
    rows = {}
    for line in table.splitlines():
        m = _ROW.match(line)
        if m and m.group(7) in ("ok", "fallback"):
            rows[m.group(1)] = (int(m.group(3)), float(m.group(4)), float(m.group(5)))
    return rows


def _prompt(source: str, prefix: str) -> dict:
    if source == "graph":
        nodes = {
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": BASE, "weight_dtype": "default"}},
            "2": {"class_type": "UNETLoader", "inputs": {"unet_name": TUNED, "weight_dtype": "default"}},
            "3": {"class_type": "RankwiseModelPair",
                  "inputs": {"base_model": ["1", 0], "tuned_model": ["2", 0], "exact_parts": True}},
        }
        pair = ["3", 0]
        report = ["3", 1]
    else:
        nodes = {
            "3": {"class_type": "RankwiseLoadDiffusionModelPair",
                  "inputs": {"base_model_name": BASE, "tuned_model_name": TUNED, "load_base_for_sampling": True,
                             "weight_dtype": "default", "exact_parts": True}},
        }
        pair = ["3", 1]
        report = ["3", 2]
    nodes.update({
        "4": {"class_type": "RankwiseExtractLoRA", "inputs": {"pair": pair, **EXTRACT}},
        "5": {"class_type": "RankwiseSaveLoRA",
              "inputs": {"lora": ["4", 0], "filename_prefix": prefix, "dtype": "fp32", "suffix": ""}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": report}},
    })
    if source == "graph":  # the in-memory LoRA on the base MODEL: Apply LoRA's coverage report
        nodes["8"] = {"class_type": "RankwiseApplyLoRA",
                      "inputs": {"model": ["1", 0], "lora": ["4", 0], "strength_model": 1.0, "strength_clip": 1.0}}
        nodes["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["8", 2]}}
    return nodes


@pytest.mark.parametrize("source", ["graph", "files"])
def test_generic_wan_pair_extracts_and_comfyui_applies_every_key(comfy_server, comfy_install, wan_files, tmp_path,
                                                                 source):
    base_path, tuned_path, layout = wan_files
    prompt = _prompt(source, f"generic/wan_{source}")
    entry = comfy_server.run_prompt(prompt, timeout=900, label=f"generic Wan extraction ({source})")
    pair_report = "\n".join(_texts(entry, "7"))
    assert "generic mode" in pair_report, pair_report
    assert "layer names are in ComfyUI's key map" in pair_report and "not in ComfyUI's key map" not in pair_report
    table = "\n".join(_texts(entry, "6"))
    rows = _rows(table)
    n_layers = sum(1 for k, s in layout.items() if k.endswith(".weight") and len(s) in (2, 4, 5))
    assert len(rows) == n_layers, table[:3000]
    if source == "graph":
        coverage = "\n".join(_texts(entry, "9"))
        m = re.search(r"applied (\d+) of (\d+) modules", coverage)
        assert m and m.group(1) == m.group(2) == str(len(layout)), coverage[:2000]
    files = _saved(comfy_server, entry, "5")
    assert len(files) == 1, entry["outputs"]

    out = tmp_path / "probe.json"
    proc = comfy_install.run_python([str(HERE / "generic_probe.py"), "--base", str(base_path), "--tuned",
                                     str(tuned_path), "--lora", str(files[0]), "--out", str(out)], timeout=600)
    assert proc.returncode == 0 and out.exists(), f"probe failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    res = json.loads(out.read_text())
    assert res["model_class"] == "WAN21", res["model_class"]  # ComfyUI detected Wan 2.1 from the file
    assert res["not_loaded"] == [], f"ComfyUI did not load these LoRA keys: {res['not_loaded'][:20]}"
    assert res["unpatched_targets"] == [] and res["patched_keys"] == res["patch_targets"], res
    # every tensor of the model that changed is patched: low-rank weights, .diff norms/params, .diff_b biases
    assert res["patched_keys"] == len(layout), (res["patched_keys"], len(layout))

    problems = []
    for layer in res["layers"]:
        assert "error" not in layer, layer
        name = layer["key"][: -len(".weight")] if layer["key"].endswith(".weight") else layer["key"]
        if name in rows:
            rank, kept, ratio = rows[name]
            bound = ratio * math.sqrt(max(0.0, 1.0 - (kept - 0.005) / 100.0)) + 1e-4
        else:  # an exact part (fp32 file): exact up to fp32 rounding of base + diff
            bound = 1e-5
        if not layer["rel_error"] <= bound:
            problems.append(f"{layer['key']} ({layer['kind']}): ComfyUI reproduces ΔW with relative error "
                            f"{layer['rel_error']:.3g}, the report promises ≤ {bound:.3g}")
    worst = max(res["layers"], key=lambda layer: layer["rel_error"])
    print(f"\n[{source}] ComfyUI {res['model_class']}: {res['patched_keys']} keys patched from "
          f"{res['lora_tensors']} LoRA tensors; worst relative error {worst['rel_error']:.3g} ({worst['key']})")
    assert not problems, "\n".join(problems[:20])
    # planted rank 8 < 16 in fp32: base + LoRA is tuned up to the decomposition's rounding
    assert max(layer["rel_error"] for layer in res["layers"]) < 1e-3


def test_scaled_fp8_tuned_is_dequantised_as_comfyui_does(comfy_server, wan_files):
    """A ComfyUI scaled-fp8 tuned file (fp8 Linear weights + scale_weight + scaled_fp8 marker):
    Rankwise's own dequantisation (Load Diffusion Model Pair, streamed from the files) and ComfyUI's
    (Load Diffusion Model → Model Pair from Graph, ComfyUI's convert_weight) give the same LoRA.

    Biases are left out of the comparison: ComfyUI builds a scaled-fp8 model's Linear layers in fp8,
    so it rounds their biases to fp8 when it loads the file (measured: ~7 % of Δb), while the files
    path reads the biases as stored."""
    import torch
    from safetensors import safe_open

    base_path, tuned_path, layout = wan_files
    fp8 = torch.float8_e4m3fn
    scaled: dict = {"scaled_fp8": torch.empty(0, dtype=fp8)}
    with safe_open(str(tuned_path), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if key.endswith(".weight") and t.dim() == 2:  # ComfyUI's scaled fp8 covers Linear layers
                scale = (t.abs().max() / torch.finfo(fp8).max).float().reshape(())
                scaled[key] = (t / scale).to(fp8)
                scaled[key[: -len(".weight")] + ".scale_weight"] = scale
            else:
                scaled[key] = t
    name = "rankwise_wan_tuned_scaled_fp8.safetensors"
    save_file(scaled, str(tuned_path.parent / name))

    files_prompt = _prompt("files", "generic/wan_fp8_files")
    files_prompt["3"]["inputs"].update(tuned_model_name=name, load_base_for_sampling=False)
    graph_prompt = _prompt("graph", "generic/wan_fp8_graph")
    graph_prompt["2"]["inputs"]["unet_name"] = name
    loras = {}
    for label, prompt in (("files", files_prompt), ("graph", graph_prompt)):
        entry = comfy_server.run_prompt(prompt, timeout=900, label=f"generic Wan scaled-fp8 extraction ({label})")
        table = "\n".join(_texts(entry, "6"))
        assert "layers read from fp8 weights (float8_e4m3fn)" in table, table[-3000:]
        [path] = _saved(comfy_server, entry, "5")
        with safe_open(str(path), "pt") as f:
            loras[label] = {k: f.get_tensor(k).float() for k in f.keys()}
    assert set(loras["files"]) == set(loras["graph"])
    worst = 0.0
    diffs = []
    for key in loras["files"]:
        if key.endswith(".lora_up.weight"):
            stem = key[: -len(".lora_up.weight")]
            a, b = (lo[key].flatten(1) @ lo[stem + ".lora_down.weight"].flatten(1) for lo in (loras["files"], loras["graph"]))
        elif key.endswith(".diff_b"):
            continue
        else:
            a, b = loras["files"][key], loras["graph"][key]
        rel = float((a - b).norm() / max(float(a.norm()), 1e-30))
        diffs.append((rel, key))
        worst = max(worst, rel)
    print(f"\nscaled fp8: Rankwise vs ComfyUI dequantisation, worst relative ΔW difference {worst:.3g} "
          f"({sorted(diffs)[-1][1]})")
    assert worst < 1e-4


FAMILIES = ("wan21", "qwen_image", "hunyuan_video", "lumina2", "hidream")


@pytest.fixture(scope="module")
def family_layouts(comfy_install, tmp_path_factory):
    out = tmp_path_factory.mktemp("families") / "families.json"
    proc = comfy_install.run_python([str(HERE / "family_layouts.py"), "--out", str(out)], timeout=600)
    assert proc.returncode == 0 and out.exists(), f"layout dump failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


class _Shapes:
    """A shapes-only source (the generic key table reads names, shapes and dtypes, never values)."""

    def __init__(self, layout: dict, name: str) -> None:
        import torch

        self.name = name
        self._layout = {k: (tuple(s), getattr(torch, d)) for k, (s, d) in layout.items()}

    def keys(self):
        return self._layout.keys()

    def shape(self, key):
        return self._layout[key][0]

    def dtype(self, key):
        return self._layout[key][1]

    def get(self, key):  # pragma: no cover - never called
        raise AssertionError(f"the key table read the tensor {key}")


@pytest.mark.parametrize("family", FAMILIES)
def test_generic_names_of_every_family_are_in_comfyuis_key_map(family_layouts, family):
    """Real widths, depth 1: ComfyUI detects the family from its own layout, and every name the
    generic path gives (LoRA layers, .diff modules / parameters, .diff_b modules) is one that
    ComfyUI's loader maps to a weight of that model."""
    from rankwise.core.generic import comfy_names_check, diffusion_view, generic_table, part_name

    entry = family_layouts[family]
    assert "error" not in entry, entry.get("error")
    assert entry["detected_class"] == entry["config_class"], entry
    source = diffusion_view(_Shapes(entry["layout"], family))
    table, report = generic_table(source, source)
    names = [spec.kohya for spec in table.layers]
    layer_keys = {spec.checkpoint_key for spec in table.layers}
    parts = [part_name(k)[0] for k in source.keys()
             if k not in layer_keys and source.dtype(k).is_floating_point]
    key_map = set(entry["key_map"])
    assert names and comfy_names_check(names + parts, {k: k for k in key_map}) == ()
    conv = [s for s in table.layers if len(s.shape) == 5]
    print(f"\n{family}: ComfyUI {entry['detected_class']}, {len(names)} LoRA layers "
          f"({len(conv)} Conv3d), {len(parts)} exact parts, all in ComfyUI's key map")

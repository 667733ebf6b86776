"""The pack inside a real ComfyUI (subprocess, CPU): loading, node metadata, the example workflows,
and the saved files checked with ComfyUI's own LoRA loader.

Needs a ComfyUI checkout (``COMFYUI_PATH``, default ``~/ComfyUI``) and its python
(``COMFYUI_PYTHON``, default ``<path>/venv/bin/python``); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import pytest

from comfy_harness import HERE, NODE_IDS, PACK_FOLDER, REPO, TIMINGS, ComfyServer
from workflow_api import set_inputs, ui_to_api

WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
UI_ONLY_WIDGET_TYPES = ("control_after_generate",)

# Speed overrides by node type: the example files carry realistic values (512², 20 steps).
SPEED = {
    "KSampler": {"steps": 1, "seed": 1},
    "EmptyLatentImage": {"width": 64, "height": 64, "batch_size": 1},
    "EmptySD3LatentImage": {"width": 64, "height": 64, "batch_size": 1},
    "RankwiseExtractLoRA": {"layers": "attention", "method": "fast"},
}
SD_CHECKPOINTS = {"rankwise_base.safetensors", "rankwise_tuned.safetensors"}

# The Flux.1 template names the files users have; the test places a reduced real-width Flux pair
# (1 double + 1 single block, which ComfyUI detects as Flux) under those names in models/diffusion_models.
FLUX_WORKFLOW = "flux_extract_preview"
FLUX_BASE, FLUX_TUNED = "flux1-dev.safetensors", "flux1-dev-finetune.safetensors"
# What the Flux template's preview needs and a test cannot have: T5-XXL (4.7 B parameters, ~19 GB in
# fp32 on CPU), CLIP-L and the ae VAE. These node types are removed from its API prompt by
# prune_flux_sampling (each must be in the template, none may feed a node that stays), and a
# PreviewAny on Apply LoRA's coverage keeps Apply LoRA in the run: extract → save → apply runs for real.
FLUX_SAMPLING_NODES = frozenset({"DualCLIPLoader", "VAELoader", "CLIPTextEncode", "FluxGuidance",
                                 "ConditioningZeroOut", "EmptySD3LatentImage", "KSampler", "VAEDecode",
                                 "SaveImage"})
FLUX_COVERAGE_PROBE = "flux_coverage_probe"
APPLIED = re.compile(r"applied (\d+) of (\d+) modules")
# RANKWISE_FULL_WORKFLOWS=1 runs the example workflows at their own settings (all layers, exact
# SVD, 512², 20 steps): tens of minutes on CPU, so not part of the default test run.
FULL_WORKFLOWS = os.environ.get("RANKWISE_FULL_WORKFLOWS", "") not in ("", "0")
WORKFLOW_TIMEOUT_S = 3600 if FULL_WORKFLOWS else 600


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def speed_up(prompt: dict) -> dict:
    """Apply :data:`SPEED`, and small ranks: a sweep keeps two of its rules ("4,8,16,32" → "4,16"),
    a single extraction rank is capped at 16 (the planted rank is 8), a resize goes to rank 8."""
    for class_type, values in SPEED.items():
        set_inputs(prompt, class_type, **values)
    for node in prompt.values():
        rules = node["inputs"].get("rules")
        if not isinstance(rules, str):
            continue
        parts = [r.strip() for r in rules.split(",") if r.strip()]
        if node["class_type"] == "RankwiseExtractLoRA":
            if len(parts) > 2:
                node["inputs"]["rules"] = f"{parts[0]},{parts[len(parts) // 2]}"
            elif len(parts) == 1 and parts[0].isdigit() and int(parts[0]) > 16:
                node["inputs"]["rules"] = "16"
        elif node["class_type"] == "RankwiseResizeLoRA" and len(parts) == 1 and parts[0].isdigit():
            node["inputs"]["rules"] = "8"
    return prompt


def prune_flux_sampling(prompt: dict) -> dict:
    """The Flux template's API prompt without its sampling nodes (:data:`FLUX_SAMPLING_NODES`), and a
    PreviewAny (:data:`FLUX_COVERAGE_PROBE`) on Apply LoRA's coverage output so that Apply LoRA still runs."""
    present = {node["class_type"] for node in prompt.values()}
    assert FLUX_SAMPLING_NODES <= present, f"the Flux template lacks {sorted(FLUX_SAMPLING_NODES - present)}"
    pruned = {nid for nid, node in prompt.items() if node["class_type"] in FLUX_SAMPLING_NODES}
    kept = {nid: node for nid, node in prompt.items() if nid not in pruned}
    for nid, node in kept.items():
        for name, value in node["inputs"].items():
            assert not (isinstance(value, list) and value and value[0] in pruned), \
                f"node {nid} {node['class_type']}.{name} is fed by pruned node {value[0]}"
    [apply] = [nid for nid, node in kept.items() if node["class_type"] == "RankwiseApplyLoRA"]
    kept[FLUX_COVERAGE_PROBE] = {"class_type": "PreviewAny", "inputs": {"source": [apply, 2]}}
    return kept


def _place_flux_pair(server: ComfyServer) -> list[Path]:
    """Write the reduced real-width Flux pair (fp16, diffusion-model-only, planted rank-8 ΔW; ~2 × 1 GB,
    ~20 s) into the server's models/diffusion_models under the template's names."""
    import torch

    from rankwise.core.archs import diffusion_layout, record
    from rankwise.core.synthetic import PlantedDelta, reduced_depth, write_checkpoint_pair
    from rankwise.core.types import Arch

    folder = server.base_dir / "models" / "diffusion_models"
    base, tuned = folder / FLUX_BASE, folder / FLUX_TUNED
    pre = record(Arch.FLUX).diffusion_prefixes.checkpoint
    extras = {pre + k: (s, "float16") for k, s in diffusion_layout(Arch.FLUX, "full").items()
              if not (k.endswith(".weight") and len(s) >= 2)}
    wall0 = time.perf_counter()
    write_checkpoint_pair(base, tuned, Arch.FLUX, size="full", delta=PlantedDelta(rank=8, scale=0.2), seed=3,
                          dtype=torch.float16, extra_layout=extras, keep=reduced_depth(Arch.FLUX, double=1, single=1),
                          layouts=("bare", "bare"), return_deltas=False)
    TIMINGS.append(("reduced Flux pair written", time.perf_counter() - wall0, 0.0))
    return [base, tuned]


def _texts(entry: dict, node_id: str) -> list[str]:
    return [str(t) for t in (entry["outputs"].get(node_id) or {}).get("text", [])]


def _images(entry: dict, node_id: str) -> list[dict]:
    return list((entry["outputs"].get(node_id) or {}).get("images", []))


def _saved_loras(server: ComfyServer, entry: dict, prompt: dict) -> list[Path]:
    """The files Save LoRA reported (``saved <name> (…)``), resolved under models/loras."""
    out = []
    for nid, node in prompt.items():
        if node["class_type"] != "RankwiseSaveLoRA":
            continue
        for text in _texts(entry, nid):
            for name in re.findall(r"saved (\S+\.safetensors)", text):
                out.append(server.base_dir / "models" / "loras" / name)
    return out


def _tracebacks(log: str) -> list[str]:
    """Each "Traceback …" block of a log: the header, the indented frames and the exception line."""
    blocks, current = [], None
    for line in log.splitlines():
        if line.startswith("Traceback (most recent call last)"):
            current = [line]
            blocks.append(current)
        elif current is not None:
            current.append(line)
            if line and not line[0].isspace() and not line.startswith(("During handling", "The above exception")):
                current = None
    return ["\n".join(b) for b in blocks]


@pytest.fixture(scope="session")
def workflow_results(comfy_server):
    """Runs each example workflow at most once per session: path → (prompt, history entry | error).

    The Flux template runs on the reduced Flux pair (written on first use, removed at the end) and
    without its sampling nodes (:func:`prune_flux_sampling`)."""
    cache: dict[Path, tuple[dict, dict | BaseException]] = {}
    flux_files: list[Path] = []

    def run(path: Path) -> tuple[dict, dict]:
        if path not in cache:
            prompt = ui_to_api(json.loads(path.read_text()), comfy_server.object_info)
            if not FULL_WORKFLOWS:
                prompt = speed_up(prompt)
            if path.stem == FLUX_WORKFLOW:
                prompt = prune_flux_sampling(prompt)
                if not flux_files:
                    flux_files.extend(_place_flux_pair(comfy_server))
            label = f"{path.name} ({'own settings' if FULL_WORKFLOWS else 'reduced settings'})"
            try:
                cache[path] = (prompt, comfy_server.run_prompt(prompt, timeout=WORKFLOW_TIMEOUT_S, label=label))
            except BaseException as e:  # remembered, so dependent tests report it instead of re-running
                cache[path] = (prompt, e)
        prompt, result = cache[path]
        if isinstance(result, BaseException):
            raise result
        return prompt, result

    yield run
    for f in flux_files:  # 2 × 1 GB: not left in pytest's kept temp folders
        f.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# (1) the pack loads, with complete metadata
# ---------------------------------------------------------------------------------------------


def test_pack_loads_without_errors(comfy_server):
    info = comfy_server.object_info
    missing = [n for n in NODE_IDS if n not in info]
    log = comfy_server.log_text()
    assert not missing, f"nodes missing from /object_info: {missing}\n--- log ---\n{log[-6000:]}"
    bad = [line for line in log.splitlines()
           if PACK_FOLDER in line and ("Cannot import" in line or "IMPORT FAILED" in line or "Error" in line)]
    assert not bad, "ComfyUI reported a problem with the pack:\n" + "\n".join(bad)
    for block in _tracebacks(log):
        assert PACK_FOLDER not in block and "rankwise" not in block.lower(), f"traceback from the pack:\n{block[:4000]}"
    extra = sorted(n for n, v in info.items() if PACK_FOLDER in str(v.get("python_module", "")) and n not in NODE_IDS)
    assert not extra, f"unexpected nodes from the pack: {extra}"


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_node_metadata_is_complete(comfy_server, node_id):
    info = comfy_server.object_info.get(node_id)
    if info is None:
        pytest.fail(f"{node_id} is not registered")
    assert info["category"] == "Rankwise"
    assert info.get("description", "").strip(), f"{node_id}: no description"
    assert info.get("display_name", "").strip() and info["display_name"] != node_id, f"{node_id}: no display name"
    no_tooltip = []
    for section in ("required", "optional"):
        for name, spec in (info["input"].get(section) or {}).items():
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if not str(opts.get("tooltip", "")).strip():
                no_tooltip.append(name)
    assert not no_tooltip, f"{node_id}: inputs without a tooltip: {no_tooltip}"
    outputs = info.get("output") or []
    tips = info.get("output_tooltips") or []
    assert len(tips) == len(outputs) and all(str(t).strip() for t in tips), \
        f"{node_id}: output tooltips {tips} for outputs {info.get('output_name')}"
    names = info.get("output_name") or []
    assert len(names) == len(outputs) and all(names), f"{node_id}: output names {names}"


# ---------------------------------------------------------------------------------------------
# (2) every example workflow runs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_example_workflow_runs(comfy_server, workflow_results, path):
    workflow = json.loads(path.read_text())
    names = {n["widgets_values"][0] for n in workflow["nodes"]
             if n["type"] == "CheckpointLoaderSimple"}
    diffusion_names: set[str] = set()
    for n in workflow["nodes"]:
        if n["type"] == "RankwiseLoadModelPair":
            names |= set(n["widgets_values"][:2])
        if n["type"] in ("RankwiseLoadDiffusionModelPair", "UNETLoader"):
            diffusion_names |= set(n["widgets_values"][:1 if n["type"] == "UNETLoader" else 2])
    assert names <= SD_CHECKPOINTS, names
    assert diffusion_names <= {FLUX_BASE, FLUX_TUNED}, diffusion_names  # what the test places
    assert bool(diffusion_names) == (path.stem == FLUX_WORKFLOW), (path.stem, diffusion_names)

    prompt, entry = workflow_results(path)
    assert entry["status"]["status_str"] == "success"
    assert not [m for m in entry["status"].get("messages", []) if m[0] == "execution_error"]

    saved = _saved_loras(comfy_server, entry, prompt)
    n_save_nodes = sum(1 for n in prompt.values() if n["class_type"] == "RankwiseSaveLoRA")
    assert len(saved) >= n_save_nodes, f"Save LoRA reported {saved}"
    for f in saved:
        assert f.is_file() and f.stat().st_size > 0, f"{f} missing"
    for nid, node in prompt.items():
        if node["class_type"] in ("SaveImage", "PreviewImage"):
            images = _images(entry, nid)
            assert images, f"node {nid} {node['class_type']} produced no image"
            for img in images:
                folder = comfy_server.base_dir / ("output" if img["type"] == "output" else "temp")
                assert (folder / img.get("subfolder", "") / img["filename"]).is_file()
    if path.stem == "rank_sweep_grid":
        extract = next(n for n, v in prompt.items() if v["class_type"] == "RankwiseExtractLoRA")
        rules = [r for r in prompt[extract]["inputs"]["rules"].split(",") if r.strip()]
        assert len(saved) == len(rules), f"one file per sweep item expected, got {saved}"
        assert len({f.name for f in saved}) == len(saved)


def test_flux_workflow_saves_a_kohya_flux_lora(comfy_server, workflow_results):
    """The Flux template on the reduced Flux pair: ComfyUI loads flux1-dev for sampling, the pair is
    Flux (not generic), and Save LoRA writes kohya Flux names for both block kinds."""
    from safetensors import safe_open

    prompt, entry = workflow_results(REPO / "example_workflows" / f"{FLUX_WORKFLOW}.json")
    assert not FLUX_SAMPLING_NODES & {node["class_type"] for node in prompt.values()}
    [pair_node] = [nid for nid, node in prompt.items() if node["class_type"] == "RankwiseLoadDiffusionModelPair"]
    assert prompt[pair_node]["inputs"]["load_base_for_sampling"] is True
    report = "\n".join(_texts(entry, pair_node))
    assert report.startswith("pair OK: FLUX"), report
    [saved] = _saved_loras(comfy_server, entry, prompt)
    with safe_open(str(saved), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("lora_unet_") for k in keys), [k for k in keys if "lora_unet_" not in k][:10]
    assert any(k.startswith("lora_unet_double_blocks_0_") for k in keys)
    assert any(k.startswith("lora_unet_single_blocks_0_") for k in keys)
    n_layers = sum(k.endswith(".lora_down.weight") for k in keys)
    assert sum(k.endswith(".alpha") for k in keys) == n_layers > 0
    coverage = "\n".join(_texts(entry, next(n for n, v in prompt.items() if v["class_type"] == "RankwiseApplyLoRA")))
    print(f"\nFlux template (sampling pruned): {report.splitlines()[0]}; saved {saved.name} with {n_layers} "
          f"layers; Apply LoRA: {coverage.splitlines()[0] if coverage else '(no coverage text)'}")


# ---------------------------------------------------------------------------------------------
# (5) Apply LoRA reaches every module
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", ["extract_resize_preview", "rank_sweep_grid", FLUX_WORKFLOW])
def test_apply_lora_reports_every_module_applied(workflow_results, stem):
    path = REPO / "example_workflows" / f"{stem}.json"
    if not path.exists():
        pytest.fail(f"{path} is missing")
    prompt, entry = workflow_results(path)
    found = 0
    for nid, node in prompt.items():
        if node["class_type"] != "RankwiseApplyLoRA":
            continue
        texts = _texts(entry, nid)
        assert texts, f"Apply LoRA node {nid} showed no coverage text: {entry['outputs'].get(nid)}"
        for text in texts:
            m = APPLIED.search(text)
            assert m, f"unexpected coverage text: {text!r}"
            applied, total = int(m.group(1)), int(m.group(2))
            assert total > 0 and applied == total, f"node {nid}: {text}"
            assert "not applied" not in text
            found += 1
    assert found >= 1


# ---------------------------------------------------------------------------------------------
# (3) the saved file, loaded by ComfyUI's own loader, reproduces tuned − base
# ---------------------------------------------------------------------------------------------

_ROW = re.compile(r"^(\S+)\s+(\S+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\S+)")


def _report_rows(table: str) -> dict[str, tuple[int, float, float]]:
    """layer (maybe cut to 72 chars) → (rank, kept %, err/opt) from an Extract LoRA report table."""
    rows = {}
    for line in table.splitlines():
        m = _ROW.match(line)
        if m and m.group(7) in ("ok", "fallback"):
            rows[m.group(1)] = (int(m.group(3)), float(m.group(4)), float(m.group(5)))
    return rows


def test_saved_lora_reproduces_tuned_in_comfyui(comfy_server, comfy_install, tmp_path):
    prompt = {
        "1": {"class_type": "RankwiseLoadModelPair",
              "inputs": {"base_ckpt": "rankwise_base.safetensors", "tuned_ckpt": "rankwise_tuned.safetensors",
                         "load_base_for_sampling": False}},
        "2": {"class_type": "RankwiseExtractLoRA",
              "inputs": {"pair": ["1", 3], "rules": "16", "max_rank": 128, "conv_rank": 0, "te_rank": 0,
                         "min_rank": 1, "layers": "attention", "text_encoders": "all", "method": "fast",
                         "clamp_quantile": 0.0, "seed": 0}},
        "3": {"class_type": "RankwiseSaveLoRA",
              "inputs": {"lora": ["2", 0], "filename_prefix": "probe/extracted", "dtype": "fp16", "suffix": ""}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }
    entry = comfy_server.run_prompt(prompt, timeout=600, label="probe extraction (rank 16, attention, TE all)")
    files = _saved_loras(comfy_server, entry, prompt)
    assert len(files) == 1, entry["outputs"]
    table = "\n".join(_texts(entry, "4"))
    rows = _report_rows(table)
    assert rows, f"no per-layer rows in the report:\n{table[:2000]}"

    out = tmp_path / "probe.json"
    proc = comfy_install.run_python(
        [str(HERE / "comfy_probe.py"), "--out", str(out), "apply", "--base", str(comfy_server.base_ckpt),
         "--tuned", str(comfy_server.tuned_ckpt), "--lora", str(files[0])], timeout=300)
    assert proc.returncode == 0 and out.exists(), f"probe failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    res = json.loads(out.read_text())

    assert res["not_loaded"] == [], f"ComfyUI did not load these LoRA keys: {res['not_loaded'][:20]}"
    assert res["lora_modules"] == len(rows), (res["lora_modules"], len(rows))
    assert res["patch_targets"] == res["lora_modules"] == res["patched_keys"], res
    assert res["unpatched_targets"] == []
    assert res["unet_patched"] > 0 and res["clip_patched"] > 0

    names = {layer["lora"]: layer for layer in res["layers"] if "lora" in layer}
    problems = []
    for layer in res["layers"]:
        assert "error" not in layer, layer
        row_name = next((r for r in rows if layer["lora"] == r or (len(r) >= 72 and layer["lora"].startswith(r))), None)
        assert row_name is not None, f"{layer['lora']} not in the report"
        rank, kept, ratio = rows[row_name]
        # The report's relative error of this layer: err/opt · √(1 − kept), kept printed to 0.01 %;
        # plus the fp16 rounding of the saved factors.
        bound = ratio * math.sqrt(max(0.0, 1.0 - (kept - 0.005) / 100.0)) + 3e-3
        if not layer["rel_error"] <= bound:
            problems.append(f"{layer['key']}: ComfyUI reproduces ΔW with relative error {layer['rel_error']:.4g}, "
                            f"the report promises ≤ {bound:.4g} (kept {kept}%, err/opt {ratio})")
    assert not problems, "\n".join(problems[:20])
    assert len(names) == res["patched_keys"]
    assert max(layer["rel_error"] for layer in res["layers"]) < 0.02  # planted rank 8 < 16: only fp16 noise left


# ---------------------------------------------------------------------------------------------
# (3b) Cancel stops an extraction promptly and leaves no file
# ---------------------------------------------------------------------------------------------


def _wait_running(server: ComfyServer, prompt_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = server.get("/queue").get("queue_running", [])
        if any(item[1] == prompt_id for item in running):
            return
        time.sleep(0.2)
    raise AssertionError(f"prompt {prompt_id} never started:\n{server.log_tail()}")


def _wait_history(server: ComfyServer, prompt_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            return entry
        time.sleep(0.2)
    raise AssertionError(f"prompt {prompt_id} did not finish {timeout:.0f} s after the interrupt:\n{server.log_tail()}")


def test_cancel_stops_extraction_promptly_and_leaves_no_file(comfy_server):
    prefix = "cancelled/extraction"
    prompt = {
        "1": {"class_type": "RankwiseLoadModelPair",
              "inputs": {"base_ckpt": "rankwise_base.safetensors", "tuned_ckpt": "rankwise_tuned.safetensors",
                         "load_base_for_sampling": False}},
        "2": {"class_type": "RankwiseExtractLoRA",  # every layer, exact: tens of seconds here
              "inputs": {"pair": ["1", 3], "rules": "64,96", "max_rank": 128, "conv_rank": 0, "te_rank": 0,
                         "min_rank": 1, "layers": "all", "text_encoders": "all", "method": "exact",
                         "clamp_quantile": 0.0, "seed": 12345}},
        "3": {"class_type": "RankwiseSaveLoRA",
              "inputs": {"lora": ["2", 0], "filename_prefix": prefix, "dtype": "fp16", "suffix": ""}},
    }
    reply = comfy_server.post("/prompt", {"prompt": prompt, "client_id": comfy_server.client_id}, timeout=120)
    assert not reply.get("node_errors"), reply
    prompt_id = reply["prompt_id"]
    _wait_running(comfy_server, prompt_id)
    time.sleep(4.0)  # well into the layer loop
    comfy_server.post("/interrupt", {})
    asked = time.monotonic()
    entry = _wait_history(comfy_server, prompt_id)
    stopped_after = time.monotonic() - asked

    kinds = [m[0] for m in entry["status"].get("messages", [])]
    assert "execution_interrupted" in kinds, (kinds, comfy_server.log_tail())
    assert "execution_success" not in kinds
    assert stopped_after < 20, f"stopped {stopped_after:.1f} s after the interrupt"
    loras = comfy_server.base_dir / "models" / "loras"
    left = [p for p in loras.rglob("*") if p.is_file() and ("cancelled" in str(p) or p.name.endswith(".tmp"))]
    assert left == [], left


# ---------------------------------------------------------------------------------------------
# (4) ComfyUI's key map consumes every layer of our key tables
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_comfyui_key_map_covers_every_table_layer(comfy_install, tmp_path, arch):
    from rankwise.core.archs import LayerPreset, key_table
    from rankwise.core.io import save_lora
    from rankwise.core.layouts import load_layout
    from rankwise.core.synthetic import random_lora
    from rankwise.core.types import Arch

    table = key_table(Arch(arch))
    lora = random_lora(table, rank=3, preset=LayerPreset.ALL, seed=1)
    assert len(lora.layers) == len(table), "preset ALL with every component must cover the whole table"
    lora_path = tmp_path / f"all_layers_{arch}.safetensors"
    save_lora(lora, lora_path)
    layout_path = tmp_path / f"{arch}_layout.json"
    layout_path.write_text(json.dumps({k: [list(s), d] for k, (s, d) in load_layout(Arch(arch)).items()}))

    out = tmp_path / "keymap.json"
    proc = comfy_install.run_python(
        [str(HERE / "comfy_probe.py"), "--out", str(out), "keymap", "--layout", str(layout_path),
         "--lora", str(lora_path)], timeout=180)
    assert proc.returncode == 0 and out.exists(), f"probe failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    res = json.loads(out.read_text())
    assert res["not_loaded"] == [], f"{arch}: lora key not loaded: {res['not_loaded'][:20]} (+{len(res['not_loaded'])})"
    assert res["lora_modules"] == len(table)
    assert res["patch_targets"] == len(table), f"{arch}: {res['patch_targets']} ComfyUI weights for {len(table)} layers"
    assert res["missing_targets"] == [] and res["shape_errors"] == [], res

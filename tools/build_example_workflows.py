"""Write example_workflows/*.json (ComfyUI UI format, as the frontend saves it).

Node inputs, outputs and widget order come from a running ComfyUI's ``GET /object_info`` (the
truth for the pack's schema), given as a saved JSON file or fetched from a URL:

    python tools/build_example_workflows.py --object-info object_info.json
    python tools/build_example_workflows.py --url http://127.0.0.1:8188

Each SD workflow needs only ``rankwise_base.safetensors`` and ``rankwise_tuned.safetensors`` in
models/checkpoints; the Flux one the files ComfyUI's own Flux templates name (flux1-dev in
models/diffusion_models beside a fine-tune, clip_l / t5xxl, ae). Every LoRA a workflow uses is made
earlier in the same graph. Widget values are the ones a user would run (512×512 or Flux's 1024×1024,
20 steps); the integration tests override them for speed.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "example_workflows"
BASE_CKPT = "rankwise_base.safetensors"
TUNED_CKPT = "rankwise_tuned.safetensors"
PROMPT = "a photograph of a red fox sitting in a snowy pine forest, detailed fur, soft morning light"
NEGATIVE = "blurry, low quality, watermark, text"
FRONTEND_VERSION = "1.27.10"

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SLOT_H, WIDGET_H, TITLE_H = 20, 24, 30
COL_W, GAP_X, GAP_Y, MARGIN = 340, 70, 30, 40  # GAP_Y is the free space above a node's title bar


@dataclass
class Node:
    id: int
    type: str
    col: int
    widgets: dict[str, Any] = field(default_factory=dict)  # name -> value (defaults fill the rest)
    links: dict[str, tuple[int, int]] = field(default_factory=dict)  # input name -> (src id, slot)
    title: str | None = None
    width: int = COL_W
    height: int | None = None  # default: computed from sockets and widgets
    control: str = "fixed"  # control_after_generate value for seed widgets
    text: str | None = None  # MarkdownNote text


@dataclass
class Spec:
    name: str
    title: str
    nodes: list[Node]
    groups: list[tuple[str, list[int], str]] = field(default_factory=list)  # title, node ids, colour


# ---------------------------------------------------------------------------------------------
# object_info helpers
# ---------------------------------------------------------------------------------------------


def ordered_inputs(info: dict) -> list[tuple[str, list, bool]]:
    out = []
    order = info.get("input_order") or {}
    for section in ("required", "optional"):
        specs = (info.get("input") or {}).get(section) or {}
        for name in order.get(section) or list(specs):
            if name in specs:
                out.append((name, specs[name], section == "optional"))
    return out


def is_widget(spec: list) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return not opts.get("forceInput") and (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES)


def has_control(name: str, spec: list) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    kind = "COMBO" if isinstance(spec[0], list) else spec[0]
    control = opts.get("control_after_generate")
    if control is None and kind == "INT":
        control = name in ("seed", "noise_seed")
    return bool(control) and kind in ("INT", "COMBO")


def default_value(spec: list) -> Any:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in opts:
        return opts["default"]
    if isinstance(spec[0], list):
        return spec[0][0] if spec[0] else ""
    if spec[0] == "COMBO":
        return (opts.get("options") or [""])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[spec[0]]


def multiline(spec: list) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return bool(opts.get("multiline"))


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def build(spec: Spec, object_info: dict) -> dict:
    by_id = {n.id: n for n in spec.nodes}
    if len(by_id) != len(spec.nodes):
        raise SystemExit(f"{spec.name}: duplicate node ids")
    links: list[list] = []
    out_links: dict[tuple[int, int], list[int]] = {}
    in_link: dict[tuple[int, str], int] = {}
    for node in spec.nodes:
        if node.type == "MarkdownNote":
            continue
        info = object_info[node.type]
        names = [n for n, _, _ in ordered_inputs(info)]
        for name, (src, slot) in node.links.items():
            if name not in names:
                raise SystemExit(f"{spec.name}: node {node.id} {node.type} has no input {name!r} (has {names})")
            src_info = object_info[by_id[src].type]
            kind = src_info["output"][slot]
            want = dict((n, s) for n, s, _ in ordered_inputs(info))[name][0]
            want = "COMBO" if isinstance(want, list) else want
            if want not in (kind, "*") and not (want in WIDGET_TYPES and kind == want):
                raise SystemExit(f"{spec.name}: {by_id[src].type}[{slot}] is {kind}, {node.type}.{name} wants {want}")
            lid = len(links) + 1
            links.append([lid, src, slot, node.id, None, kind])  # target slot filled below
            out_links.setdefault((src, slot), []).append(lid)
            in_link[(node.id, name)] = lid

    ui_nodes: list[dict] = []
    order = topo_order(spec.nodes)
    heights: dict[int, int] = {}
    for node in spec.nodes:
        if node.type == "MarkdownNote":
            heights[node.id] = node.height or 160
            ui_nodes.append({
                "id": node.id, "type": "MarkdownNote", "pos": [0, 0], "size": [node.width, heights[node.id]],
                "flags": {}, "order": order[node.id], "mode": 0, "inputs": [], "outputs": [],
                "title": node.title or "Note", "properties": {}, "widgets_values": [node.text or ""],
                "color": "#432", "bgcolor": "#653",
            })
            continue
        info = object_info[node.type]
        unknown = set(node.widgets) - {n for n, _, _ in ordered_inputs(info)}
        if unknown:
            raise SystemExit(f"{spec.name}: node {node.id} {node.type} has no widget(s) {sorted(unknown)}")
        inputs, values = [], []
        n_sockets = n_widgets = extra_h = 0
        for name, ispec, optional in ordered_inputs(info):
            kind = "COMBO" if isinstance(ispec[0], list) else ispec[0]
            slot: dict[str, Any] = {"localized_name": name, "name": name, "type": kind}
            if is_widget(ispec):
                slot["widget"] = {"name": name}
                value = node.widgets.get(name, default_value(ispec))
                values.append(value)
                if has_control(name, ispec):
                    values.append(node.control)
                    n_widgets += 1
                n_widgets += 1
                if multiline(ispec):
                    extra_h += 70
            else:
                n_sockets += 1
                if optional:
                    slot["shape"] = 7  # the frontend draws optional sockets hollow
            slot["link"] = in_link.get((node.id, name))
            if slot["link"] is not None or not is_widget(ispec):
                inputs.append(slot)
            else:
                inputs.append(slot)
        for i, slot in enumerate(inputs):
            if slot["link"] is not None:
                links[slot["link"] - 1][4] = i
        outputs = []
        for i, kind in enumerate(info.get("output") or []):
            oname = (info.get("output_name") or [])[i] if i < len(info.get("output_name") or []) else kind
            out = {"localized_name": oname, "name": oname, "type": "COMBO" if isinstance(kind, list) else kind,
                   "links": out_links.get((node.id, i)) or []}
            if (info.get("output_is_list") or [False] * (i + 1))[i]:
                out["shape"] = 6
            outputs.append(out)
        rows = max(n_sockets, len(outputs))
        h = node.height or (TITLE_H // 3 + rows * SLOT_H + n_widgets * WIDGET_H + extra_h + 16)
        heights[node.id] = h
        ui = {
            "id": node.id, "type": node.type, "pos": [0, 0], "size": [node.width, h], "flags": {},
            "order": order[node.id], "mode": 0, "inputs": inputs, "outputs": outputs,
            "properties": {"Node name for S&R": node.type}, "widgets_values": values,
        }
        if node.title:
            ui["title"] = node.title
        if node.type.startswith("Rankwise"):
            ui["properties"]["cnr_id"] = "rankwise"
        ui_nodes.append(ui)

    place(spec, ui_nodes, heights)
    groups = []
    pos = {n["id"]: (n["pos"], n["size"]) for n in ui_nodes}
    for title, members, colour in spec.groups:
        x0 = min(pos[i][0][0] for i in members) - 15
        y0 = min(pos[i][0][1] for i in members) - 70
        x1 = max(pos[i][0][0] + pos[i][1][0] for i in members) + 15
        y1 = max(pos[i][0][1] + pos[i][1][1] for i in members) + 15
        groups.append({"id": len(groups) + 1, "title": title, "bounding": [x0, y0, x1 - x0, y1 - y0],
                       "color": colour, "font_size": 24, "flags": {}})
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"rankwise/example_workflows/{spec.name}")),
        "revision": 0,
        "last_node_id": max(n.id for n in spec.nodes),
        "last_link_id": len(links),
        "nodes": sorted(ui_nodes, key=lambda n: n["id"]),
        "links": links,
        "groups": groups,
        "config": {},
        "extra": {"ds": {"scale": 0.75, "offset": [0, 0]}, "frontendVersion": FRONTEND_VERSION},
        "version": 0.4,
    }


def topo_order(nodes: list[Node]) -> dict[int, int]:
    deps = {n.id: {src for src, _ in n.links.values()} for n in nodes}
    order, done = {}, set()
    while len(done) < len(nodes):
        ready = sorted(i for i, d in deps.items() if i not in done and d <= done)
        if not ready:
            raise SystemExit("cycle in workflow")
        for i in ready:
            order[i] = len(order)
            done.add(i)
    return order


def place(spec: Spec, ui_nodes: list[dict], heights: dict[int, int]) -> None:
    """Columns left to right; nodes stacked in each column in spec order, groups get headroom."""
    by_id = {n["id"]: n for n in ui_nodes}
    grouped = {i for _, members, _ in spec.groups for i in members}
    widths: dict[int, int] = {}
    for node in spec.nodes:
        widths[node.col] = max(widths.get(node.col, 0), node.width)
    x_of, x = {}, MARGIN
    for col in sorted(widths):
        x_of[col] = x
        x += widths[col] + GAP_X
    y_of: dict[int, int] = {}
    first_group_member = {members[0] for _, members, _ in spec.groups}
    for node in spec.nodes:
        y = y_of.get(node.col, MARGIN + 80)
        if node.id in first_group_member and y > MARGIN + 80:
            y += 60  # room for the group title
        by_id[node.id]["pos"] = [x_of[node.col], y]
        y_of[node.col] = y + heights[node.id] + TITLE_H + GAP_Y + (40 if node.id in grouped else 0)


# ---------------------------------------------------------------------------------------------
# The four workflows
# ---------------------------------------------------------------------------------------------


def sampler_nodes(first: int, col: int, model: tuple[int, int], clip: tuple[int, int], vae: tuple[int, int],
                  latent: tuple[int, int], seed: int = 42) -> list[Node]:
    pos, neg, ks, dec = first, first + 1, first + 2, first + 3
    return [
        Node(pos, "CLIPTextEncode", col, {"text": PROMPT}, {"clip": clip}, title="Positive prompt", height=150),
        Node(neg, "CLIPTextEncode", col, {"text": NEGATIVE}, {"clip": clip}, title="Negative prompt", height=120),
        Node(ks, "KSampler", col + 1, {"seed": seed, "steps": 20, "cfg": 7.0, "sampler_name": "euler",
                                       "scheduler": "normal", "denoise": 1.0},
             {"model": model, "positive": (pos, 0), "negative": (neg, 0), "latent_image": latent}),
        Node(dec, "VAEDecode", col + 1, {}, {"samples": (ks, 0), "vae": vae}, width=220),
    ]


def extract_resize_preview() -> Spec:
    nodes = [
        Node(1, "RankwiseLoadModelPair", 0, {"base_ckpt": BASE_CKPT, "tuned_ckpt": TUNED_CKPT,
                                             "load_base_for_sampling": True}),
        Node(2, "RankwiseExtractLoRA", 1, {"rules": "64", "layers": "all", "text_encoders": "auto",
                                           "method": "exact", "seed": 0}, {"pair": (1, 3)}),
        Node(3, "RankwiseResizeLoRA", 1, {"rules": "32", "strength": 1.05}, {"lora": (2, 0)}),
        Node(4, "RankwiseSaveLoRA", 1, {"filename_prefix": "rankwise/extracted", "dtype": "fp16", "suffix": "_r32"},
             {"lora": (3, 0)}),
        Node(5, "RankwiseApplyLoRA", 2, {"strength_model": 1.0, "strength_clip": 1.0},
             {"model": (1, 0), "clip": (1, 1), "lora": (3, 0)}),
        Node(8, "EmptyLatentImage", 2, {"width": 512, "height": 512, "batch_size": 1}),
        *sampler_nodes(10, 3, (5, 0), (5, 1), (1, 2), (8, 0)),
        Node(20, "CheckpointLoaderSimple", 2, {"ckpt_name": TUNED_CKPT}, title="Load tuned (reference)"),
        *sampler_nodes(21, 3, (20, 0), (20, 1), (20, 2), (8, 0)),
        Node(30, "ImageBatch", 5, {}, {"image1": (13, 0), "image2": (24, 0)}, width=220),
        Node(31, "RankwiseImageGrid", 5, {"labels": "base + LoRA\ntuned", "columns": 2}, {"images": (30, 0)}),
        Node(32, "SaveImage", 6, {"filename_prefix": "rankwise/compare"}, {"images": (31, 0)}, width=400, height=300),
        Node(40, "MarkdownNote", 0, text=(
            "### Extract → resize → compare\n"
            "Extract LoRA keeps rank 64 of tuned − base, Resize LoRA re-factorises it to rank 32 "
            "(×1.05), Save LoRA writes it to `models/loras/rankwise/`.\n\n"
            "The base model + LoRA (top) and the tuned model (bottom) sample the same seed; the grid "
            "shows both side by side."), width=COL_W, height=170),
    ]
    # rows: base + LoRA branch above, tuned branch below (same columns)
    return Spec("extract_resize_preview", "Extract, resize and preview", nodes, [
        ("Extract a LoRA", [2, 3, 4], "#3f789e"),
        ("base + LoRA", [10, 11], "#8A8"),
    ])


def difference_merge() -> Spec:
    nodes = [
        Node(1, "RankwiseLoadModelPair", 0, {"base_ckpt": BASE_CKPT, "tuned_ckpt": TUNED_CKPT,
                                             "load_base_for_sampling": False}),
        Node(2, "RankwiseExtractLoRA", 1, {"rules": "32", "layers": "all", "text_encoders": "auto"},
             {"pair": (1, 3)}, title="Extract LoRA (rank 32)"),
        Node(3, "RankwiseResizeLoRA", 2, {"rules": "8", "strength": 1.0}, {"lora": (2, 0)},
             title="Resize LoRA (rank 8)"),
        Node(4, "RankwiseMergeLoRAs", 3, {"ratio_1": 1.0, "ratio_2": -1.0, "mode": "concat"},
             {"lora_1": (2, 0), "lora_2": (3, 0)}, title="Merge LoRAs (rank 32 − rank 8)"),
        Node(5, "RankwiseLoRAInfo", 4, {}, {"lora": (4, 0)}),
        Node(6, "PreviewImage", 5, {}, {"images": (5, 1)}, width=400, height=300, title="Spectrum"),
        Node(7, "RankwiseSaveLoRA", 4, {"filename_prefix": "rankwise/difference", "dtype": "fp16", "suffix": ""},
             {"lora": (4, 0)}),
        Node(10, "MarkdownNote", 0, text=(
            "### Difference of two LoRAs\n"
            "Both LoRAs are made here: a rank-32 extraction and the same LoRA resized to rank 8. "
            "Merge LoRAs with ratios 1 and −1 (concat, exact) keeps only what ranks 9–32 add. "
            "LoRA Info shows its spectrum; Save LoRA writes it."), width=COL_W, height=150),
    ]
    return Spec("difference_merge", "Difference merge of two extracted LoRAs", nodes)


def rank_sweep_grid() -> Spec:
    nodes = [
        Node(1, "RankwiseLoadModelPair", 0, {"base_ckpt": BASE_CKPT, "tuned_ckpt": TUNED_CKPT,
                                             "load_base_for_sampling": True}),
        Node(2, "RankwiseExtractLoRA", 1, {"rules": "4,8,16,32", "layers": "all", "text_encoders": "auto"},
             {"pair": (1, 3)}, title="Extract LoRA (sweep)"),
        Node(3, "RankwiseSaveLoRA", 2, {"filename_prefix": "rankwise/sweep", "dtype": "fp16", "suffix": ""},
             {"lora": (2, 0), "suffix": (2, 3)}),
        Node(4, "PreviewImage", 2, {}, {"images": (2, 2)}, width=COL_W, height=300, title="Spectra"),
        Node(5, "RankwiseApplyLoRA", 1, {"strength_model": 1.0, "strength_clip": 1.0},
             {"model": (1, 0), "clip": (1, 1), "lora": (2, 0)}),
        Node(6, "EmptyLatentImage", 1, {"width": 512, "height": 512, "batch_size": 1}),
        *sampler_nodes(7, 2, (5, 0), (5, 1), (1, 2), (6, 0)),
        Node(12, "RankwiseImageGrid", 4, {"labels": "", "columns": 4}, {"images": (10, 0), "labels": (2, 3)}),
        Node(13, "SaveImage", 5, {"filename_prefix": "rankwise/sweep"}, {"images": (12, 0)}, width=480, height=300),
        Node(20, "MarkdownNote", 0, text=(
            "### Rank sweep\n"
            "One Extract LoRA with rules `4,8,16,32` decomposes every layer once and outputs a list of "
            "four LoRAs. Everything downstream runs once per LoRA: Save LoRA writes four files "
            "(suffix = label), Apply LoRA + KSampler make four samples, and the Labelled Image Grid "
            "collects them with their labels."), width=COL_W, height=170),
    ]
    return Spec("rank_sweep_grid", "Rank sweep to a labelled grid", nodes)


def graph_merge_clean_clip() -> Spec:
    nodes = [
        Node(1, "CheckpointLoaderSimple", 0, {"ckpt_name": BASE_CKPT}, title="Load base"),
        Node(2, "CheckpointLoaderSimple", 0, {"ckpt_name": TUNED_CKPT}, title="Load tuned"),
        Node(3, "ModelMergeSimple", 1, {"ratio": 0.5}, {"model1": (1, 0), "model2": (2, 0)}),
        Node(4, "CLIPMergeSimple", 1, {"ratio": 0.5}, {"clip1": (1, 1), "clip2": (2, 1)}),
        Node(5, "RankwiseModelPair", 2, {}, {"base_model": (1, 0), "tuned_model": (3, 0),
                                            "base_clip": (1, 1), "tuned_clip": (4, 0)},
             title="Model Pair from Graph (base vs merged)"),
        Node(6, "RankwiseCleanCLIP", 3, {"mode": "replace differing encoders with base",
                                        "repair_position_ids": True},
             {"pair": (5, 0), "clip": (4, 0), "base_clip": (1, 1)}),
        Node(7, "RankwiseExtractLoRA", 4, {"rules": "32", "layers": "all", "text_encoders": "auto"},
             {"pair": (6, 0)}),
        Node(8, "RankwiseSaveLoRA", 5, {"filename_prefix": "rankwise/merge_diff", "dtype": "fp16", "suffix": ""},
             {"lora": (7, 0)}),
        Node(9, "RankwiseLoRAInfo", 5, {}, {"lora": (7, 0)}),
        Node(10, "PreviewImage", 6, {}, {"images": (9, 1)}, width=400, height=300, title="Spectrum"),
        Node(20, "MarkdownNote", 0, text=(
            "### LoRA from a merge made in the graph\n"
            "ModelMergeSimple / CLIPMergeSimple blend base and tuned 50/50. Model Pair from Graph "
            "pairs the base with the merge (weights computed with their patches, one tensor at a time). "
            "Clean CLIP measures each text encoder's change and uses the base's encoders where they "
            "differ, so the LoRA is UNet-only."), width=COL_W, height=170),
    ]
    return Spec("graph_merge_clean_clip", "Merge in the graph, clean CLIP, extract", nodes)


FLUX_BASE = "flux1-dev.safetensors"  # the names ComfyUI's own Flux templates use (models/diffusion_models, …)
FLUX_TUNED = "flux1-dev-finetune.safetensors"
FLUX_CLIP_L, FLUX_T5, FLUX_VAE = "clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors"
FLUX_PROMPT = "a photograph of a red fox sitting in a snowy pine forest, detailed fur, soft morning light"


def flux_extract_preview() -> Spec:
    nodes = [
        Node(1, "RankwiseLoadDiffusionModelPair", 0, {"base_model_name": FLUX_BASE, "tuned_model_name": FLUX_TUNED,
                                                      "load_base_for_sampling": True, "weight_dtype": "default",
                                                      "exact_parts": False}),
        Node(2, "RankwiseExtractLoRA", 1, {"rules": "64", "layers": "all", "text_encoders": "auto",
                                           "method": "exact", "seed": 0}, {"pair": (1, 1)},
             title="Extract LoRA (rank 64)"),
        Node(14, "RankwiseResizeLoRA", 1, {"rules": "32", "strength": 1.0}, {"lora": (2, 0)},
             title="Resize LoRA (rank 32)"),
        Node(3, "RankwiseSaveLoRA", 1, {"filename_prefix": "rankwise/flux_extracted", "dtype": "bf16",
                                        "suffix": "_r32", "key_names": "auto"}, {"lora": (14, 0)}),
        Node(4, "RankwiseApplyLoRA", 2, {"strength_model": 1.0, "strength_clip": 1.0},
             {"model": (1, 0), "lora": (14, 0)}),
        Node(5, "DualCLIPLoader", 2, {"clip_name1": FLUX_CLIP_L, "clip_name2": FLUX_T5, "type": "flux"}),
        Node(6, "VAELoader", 2, {"vae_name": FLUX_VAE}),
        Node(7, "EmptySD3LatentImage", 2, {"width": 1024, "height": 1024, "batch_size": 1}),
        Node(8, "CLIPTextEncode", 3, {"text": FLUX_PROMPT}, {"clip": (5, 0)}, title="Prompt", height=150),
        Node(9, "FluxGuidance", 3, {"guidance": 3.5}, {"conditioning": (8, 0)}),
        Node(10, "ConditioningZeroOut", 3, {}, {"conditioning": (8, 0)}, title="Negative (zero: Flux has none)"),
        Node(11, "KSampler", 4, {"seed": 42, "steps": 20, "cfg": 1.0, "sampler_name": "euler",
                                 "scheduler": "simple", "denoise": 1.0},
             {"model": (4, 0), "positive": (9, 0), "negative": (10, 0), "latent_image": (7, 0)}),
        Node(12, "VAEDecode", 4, {}, {"samples": (11, 0), "vae": (6, 0)}, width=220),
        Node(13, "SaveImage", 5, {"filename_prefix": "rankwise/flux_preview"}, {"images": (12, 0)},
             width=400, height=400),
        Node(20, "MarkdownNote", 0, text=(
            "### Flux.1: a LoRA from a fine-tune\n"
            "Put flux1-dev and the fine-tune (diffusion-model-only files) in `models/diffusion_models`; "
            "Load Diffusion Model Pair streams them one tensor at a time.\n\n"
            "Extract LoRA keeps rank 64 of tuned − base, Resize LoRA re-factorises it to rank 32 (no "
            "second SVD of ΔW); Save LoRA writes kohya names (ComfyUI, Forge, diffusers) to "
            "`models/loras/rankwise/`.\n\n"
            "The preview applies the LoRA to flux1-dev and samples with ComfyUI's Flux nodes "
            "(clip_l + t5xxl, ae VAE, guidance 3.5, cfg 1)."), width=COL_W, height=230),
    ]
    return Spec("flux_extract_preview", "Flux.1: extract from two diffusion models, resize, save, preview", nodes, [
        ("Extract a LoRA", [2, 14, 3], "#3f789e"),
        ("flux1-dev + LoRA", [8, 9, 10], "#8A8"),
    ])


SPECS = (extract_resize_preview, difference_merge, rank_sweep_grid, graph_merge_clean_clip, flux_extract_preview)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--object-info", type=Path, help="a saved GET /object_info response")
    src.add_argument("--url", help="a running ComfyUI, e.g. http://127.0.0.1:8188")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--only", action="append", default=[], help="write only these workflow names")
    args = ap.parse_args(argv)
    if args.url:
        with urllib.request.urlopen(args.url.rstrip("/") + "/object_info", timeout=60) as r:
            object_info = json.load(r)
    else:
        object_info = json.loads(args.object_info.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    for make in SPECS:
        spec = make()
        if args.only and spec.name not in args.only:
            continue
        workflow = build(spec, object_info)
        path = args.out / f"{spec.name}.json"
        path.write_text(json.dumps(workflow, indent=1, ensure_ascii=False) + "\n")
        print(f"{path}: {len(workflow['nodes'])} nodes, {len(workflow['links'])} links")
    return 0


if __name__ == "__main__":
    sys.exit(main())

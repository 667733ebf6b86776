"""The UI → API workflow converter on hand-made object_info (no ComfyUI needed)."""

from __future__ import annotations

import json

import pytest

from comfy_harness import REPO
from workflow_api import WorkflowError, set_inputs, ui_to_api, widget_slots

OBJECT_INFO = {
    "Loader": {"input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}},
               "input_order": {"required": ["ckpt_name"]}, "output": ["MODEL", "CLIP"]},
    "Sampler": {
        "input": {
            "required": {
                "model": ["MODEL", {}],
                "seed": ["INT", {"default": 0, "control_after_generate": True}],
                "steps": ["INT", {"default": 20}],
                "sampler_name": [["euler", "dpm"], {}],
                "text": ["STRING", {"forceInput": True}],
            },
            "optional": {"noise_seed": ["INT", {}], "strength": ["FLOAT", {"default": 1.0}],
                         "mode": ["COMBO", {"options": ["x", "y"]}]},
        },
        "input_order": {"required": ["model", "seed", "steps", "sampler_name", "text"],
                        "optional": ["noise_seed", "strength", "mode"]},
        "output": ["LATENT"],
    },
    "Text": {"input": {"required": {"value": ["STRING", {}]}}, "output": ["STRING"]},
}


def _node(nid, kind, widgets=None, inputs=None, **extra):
    return {"id": nid, "type": kind, "widgets_values": widgets, "inputs": inputs or [], **extra}


def test_widget_slots_follow_the_frontend_rules():
    slots = widget_slots(OBJECT_INFO["Sampler"])
    # seed: explicit control; noise_seed: legacy name rule; forceInput and sockets are not widgets
    assert slots == [("seed", "INT"), (None, "control_after_generate"), ("steps", "INT"),
                     ("sampler_name", "COMBO"), ("noise_seed", "INT"), (None, "control_after_generate"),
                     ("strength", "FLOAT"), ("mode", "COMBO")]


def test_links_widgets_reroutes_primitives_and_notes():
    workflow = {
        "nodes": [
            _node(1, "Loader", ["b.safetensors"]),
            _node(2, "Reroute", None, [{"name": "", "type": "*", "link": 1}]),
            _node(3, "Sampler", [7, "randomize", 4, "dpm", 9, "fixed", 0.5, "y"],
                  [{"name": "model", "type": "MODEL", "link": 2},
                   {"name": "text", "type": "STRING", "link": 3},
                   {"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": 4}]),
            _node(4, "Text", ["hello"]),
            _node(5, "PrimitiveNode", [12, "fixed"]),
            _node(6, "Note", ["just a note"]),
            _node(7, "Text", ["muted"], mode=2),
        ],
        "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"], [3, 4, 0, 3, 1, "STRING"],
                  [4, 5, 0, 3, 2, "INT"]],
    }
    prompt = ui_to_api(workflow, OBJECT_INFO)
    assert set(prompt) == {"1", "3", "4"}
    assert prompt["1"]["inputs"] == {"ckpt_name": "b.safetensors"}
    assert prompt["3"]["inputs"] == {"seed": 7, "steps": 12, "sampler_name": "dpm", "noise_seed": 9,
                                     "strength": 0.5, "mode": "y", "model": ["1", 0], "text": ["4", 0]}
    assert set_inputs(prompt, "Sampler", steps=1, model="ignored") == 1
    assert prompt["3"]["inputs"]["steps"] == 1 and prompt["3"]["inputs"]["model"] == ["1", 0]


def test_wrong_number_of_widget_values_is_an_error():
    workflow = {"nodes": [_node(1, "Sampler", [7, 4, "dpm", 0.5, "y"])], "links": []}
    with pytest.raises(WorkflowError, match="5 widgets_values"):
        ui_to_api(workflow, OBJECT_INFO)


def test_unknown_node_type_and_missing_required_input_are_errors():
    with pytest.raises(WorkflowError, match="not known"):
        ui_to_api({"nodes": [_node(1, "Nope", [])], "links": []}, OBJECT_INFO)
    workflow = {"nodes": [_node(1, "Sampler", [7, "fixed", 4, "dpm", 9, "fixed", 0.5, "y"])], "links": []}
    with pytest.raises(WorkflowError, match=r"required inputs \['model', 'text'\]"):
        ui_to_api(workflow, OBJECT_INFO)


@pytest.mark.parametrize("path", sorted((REPO / "example_workflows").glob("*.json")), ids=lambda p: p.stem)
def test_example_files_are_well_formed_ui_workflows(path):
    wf = json.loads(path.read_text())
    assert wf["version"] == 0.4 and {"last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra"} <= set(wf)
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids)) and wf["last_node_id"] == max(ids)
    assert wf["last_link_id"] == max(link[0] for link in wf["links"])
    by_id = {n["id"]: n for n in wf["nodes"]}
    for lid, src, sslot, dst, dslot, kind in wf["links"]:
        assert lid in by_id[src]["outputs"][sslot]["links"]
        assert by_id[dst]["inputs"][dslot]["link"] == lid
        assert by_id[dst]["inputs"][dslot]["type"] in (kind, "*")
    boxes = [(n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in wf["nodes"]]
    for i, a in enumerate(boxes):  # readable: no two nodes (title bars included) overlap
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)


def test_there_are_example_workflows():
    names = {p.stem for p in sorted((REPO / "example_workflows").glob("*.json"))}
    assert {"extract_resize_preview", "difference_merge", "rank_sweep_grid", "graph_merge_clean_clip",
            "flux_extract_preview"} <= names
    for p in sorted((REPO / "example_workflows").glob("*.json")):
        thumb = p.with_suffix(".jpg")
        assert thumb.is_file(), f"{p.name} has no thumbnail {thumb.name}"
        assert thumb.stat().st_size <= 160_000, f"{thumb.name} is {thumb.stat().st_size} bytes"

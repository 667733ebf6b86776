"""The budget widgets (``budget_weighting``, ``full_diff``) inside a real ComfyUI: declared as optional
widgets with today's defaults, accepted by ComfyUI's validation, and their values reach core (the
budget's allocation note in each report names the weighting used).

Uses the session's real-size SD1.5 pair (``comfy_server``); the extraction is kept small (attention,
fast SVD, cap 16).
"""

from __future__ import annotations

import pytest

BUDGET_INPUTS = {
    "RankwiseExtractLoRA": {"budget_weighting": (["relative", "absolute"], "relative"), "full_diff": ("BOOLEAN", False)},
    "RankwiseResizeLoRA": {"full_diff": ("BOOLEAN", False)},
    "RankwiseMergeLoRAs": {"full_diff": ("BOOLEAN", False)},
}


def _texts(entry: dict, node_id: str) -> list[str]:
    return [str(t) for t in (entry["outputs"].get(node_id) or {}).get("text", [])]


@pytest.mark.parametrize("node_id", sorted(BUDGET_INPUTS))
def test_budget_widgets_are_optional_widgets_with_todays_defaults(comfy_server, node_id):
    info = comfy_server.object_info[node_id]
    assert "budget_weighting" not in info["input"]["required"] and "full_diff" not in info["input"]["required"]
    optional = info["input"].get("optional") or {}
    for name, (kind, default) in BUDGET_INPUTS[node_id].items():
        spec = optional.get(name)
        assert spec is not None, f"{node_id}: no optional input {name}: {sorted(optional)}"
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if isinstance(kind, list):  # a combo: V1 lists the options, V3 says COMBO with "options"
            assert (spec[0] if isinstance(spec[0], list) else opts.get("options")) == kind
        else:
            assert spec[0] == kind
        assert opts.get("default") == default
        assert "size:/params: rules" in opts.get("tooltip", "")
    if "budget_weighting" not in BUDGET_INPUTS[node_id]:
        assert "budget_weighting" not in optional  # no base model: relative is not available
    assert info["input_order"]["optional"][-1] == "full_diff"  # appended: older workflows keep their positions


def test_budget_widget_values_reach_core(comfy_server):
    common = {"max_rank": 16, "conv_rank": 0, "te_rank": 0, "min_rank": 1}
    prompt = {
        "1": {"class_type": "RankwiseLoadModelPair",
              "inputs": {"base_ckpt": "rankwise_base.safetensors", "tuned_ckpt": "rankwise_tuned.safetensors",
                         "load_base_for_sampling": False}},
        "2": {"class_type": "RankwiseExtractLoRA",
              "inputs": {"pair": ["1", 3], "rules": "size:3MB", **common, "layers": "attention",
                         "text_encoders": "none", "method": "fast", "clamp_quantile": 0.0, "seed": 0,
                         "budget_weighting": "absolute", "full_diff": True}},
        "3": {"class_type": "RankwiseResizeLoRA",
              "inputs": {"lora": ["2", 0], "rules": "size:1MB", **common, "strength": 1.0, "full_diff": True}},
        "4": {"class_type": "RankwiseMergeLoRAs",
              "inputs": {"lora_1": ["2", 0], "ratio_1": 1.0, "lora_2": ["3", 0], "ratio_2": 0.5, "ratio_3": 1.0,
                         "ratio_4": 1.0, "mode": "svd", "rules": "size:1MB", "conv_rank": 0, "block_weights": "",
                         "filters": "", "full_diff": True}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}},
    }
    entry = comfy_server.run_prompt(prompt, timeout=600, label="size budgets with the budget widgets")
    assert entry["status"]["status_str"] == "success"
    for nid, what in (("5", "extract"), ("6", "resize"), ("7", "merge")):
        text = "\n".join(_texts(entry, nid))
        assert "objective (absolute)" in text, f"{what}: no absolute budget allocation in the report:\n{text[:3000]}"

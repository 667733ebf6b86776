"""Files from the wild through the Load LoRA node in a real ComfyUI: a module that does not fit its
layer fails the node by default and is dropped (and counted) with ``skip_bad_modules``; a
cloneofsimo file is read, its embeddings reported."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from comfy_harness import ComfyError
from rankwise.core import cloneofsimo as cs
from rankwise.core.archs import key_table
from rankwise.core.formats import lora_to_state_dict
from rankwise.core.synthetic import random_lora
from rankwise.core.types import Arch


def _texts(entry: dict, node_id: str) -> list[str]:
    return [str(t) for t in (entry["outputs"].get(node_id) or {}).get("text", [])]


def _prompt(name: str, skip: bool) -> dict:
    return {
        "1": {"class_type": "RankwiseLoadLoRA", "inputs": {"lora_name": name, "skip_bad_modules": skip}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}},
    }


def test_load_lora_node_bad_module_then_skip_and_cloneofsimo(comfy_server):
    folder = comfy_server.base_dir / "models" / "loras" / "wild"
    folder.mkdir(parents=True, exist_ok=True)
    table = key_table(Arch.SD1, "tiny")
    sd = lora_to_state_dict(random_lora(table, rank=2, seed=1), dtype=torch.float32)
    bad = next(k for k in sd if k.endswith("attn1_to_q.lora_down.weight"))
    sd[bad] = torch.zeros(2, 7)
    save_file(sd, str(folder / "bad.safetensors"))
    module = bad[: -len(".lora_down.weight")]

    with pytest.raises(ComfyError, match=module):
        comfy_server.run_prompt(_prompt("wild/bad.safetensors", False), timeout=120, label="Load LoRA: bad module")
    entry = comfy_server.run_prompt(_prompt("wild/bad.safetensors", True), timeout=120, label="Load LoRA: skip")
    report = "\n".join(_texts(entry, "2"))
    assert "modules dropped, factors do not fit the layer (1)" in report and module in report

    md, tensors = {"unet": json.dumps(sorted(cs.UNET_DEFAULT_TARGETS)), "<s1>": cs.EMBED_FLAG}, {}
    for i, spec in enumerate(cs.injection_order(table, cs.UNET, order=cs.BlockOrder.LEGACY)):
        tensors[f"unet:{i}:up"] = torch.randn(spec.shape[0], 1) * 0.01
        tensors[f"unet:{i}:down"] = torch.randn(1, spec.shape[1])
    tensors["<s1>"] = torch.randn(24)
    save_file(tensors, str(folder / "cloneofsimo.safetensors"), metadata=md)
    entry = comfy_server.run_prompt(_prompt("wild/cloneofsimo.safetensors", False), timeout=120,
                                    label="Load LoRA: cloneofsimo")
    report = "\n".join(_texts(entry, "2"))
    assert "(cloneofsimo)" in report and "<s1> [24]" in report

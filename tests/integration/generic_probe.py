"""Check a generic-path (ComfyUI-native) LoRA with ComfyUI's own loader on a diffusion-model-only file.
Run with ComfyUI's python, ComfyUI's folder on ``sys.path``; prints one JSON object (``PROBE_JSON …``).

Loads the base as Load Diffusion Model does (``comfy.sd.load_diffusion_model``), reports the model
class ComfyUI detected, builds its key map (``comfy.lora.model_lora_keys_unet``), loads the LoRA
(``comfy.lora.load_lora``: every key it leaves unconsumed is reported), patches a clone
(``add_patches``) and compares every patched weight (``comfy.lora.calculate_weight``, fp32) with the
tuned file's weight under the same name. Nothing here is ComfyUI code.
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--tuned", required=True)
    ap.add_argument("--lora", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import logging

    import torch

    torch.set_grad_enabled(False)
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logging.getLogger().addHandler(Collect())
    logging.getLogger().setLevel(logging.INFO)
    import comfy.lora
    import comfy.sd
    import comfy.utils

    model = comfy.sd.load_diffusion_model(args.base)
    lora_sd = comfy.utils.load_torch_file(args.lora, safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    mark = len(messages)
    patches = comfy.lora.load_lora(lora_sd, key_map)
    prefix = "lora key not loaded: "
    not_loaded = sorted(m[len(prefix):] for m in messages[mark:] if m.startswith(prefix))
    clone = model.clone()
    patched = sorted(clone.add_patches(patches, 1.0))

    tuned = comfy.utils.load_torch_file(args.tuned, safe_load=True)
    model_sd = model.model.state_dict()
    layers = []
    for key in patched:
        base_w = model_sd[key].to(torch.float32).clone()
        target = tuned.get(key[len("diffusion_model."):])
        if target is None:
            layers.append({"key": key, "error": "no tuned tensor"})
            continue
        target = target.to(torch.float32)
        out = comfy.lora.calculate_weight(clone.patches[key], base_w.clone(), key, intermediate_dtype=torch.float32)
        delta = target - base_w
        err = float((out - target).norm())
        dn = float(delta.norm())
        layers.append({"key": key, "kind": type(clone.patches[key][0][1]).__name__, "delta_norm": dn,
                       "abs_error": err, "rel_error": err / dn if dn > 0 else (0.0 if err == 0 else math.inf)})
    result = {
        "model_class": type(model.model).__name__,
        "config_class": type(model.model.model_config).__name__,
        "lora_tensors": len(lora_sd),
        "not_loaded": not_loaded,
        "patch_targets": len(patches),
        "patched_keys": len(patched),
        "unpatched_targets": sorted(set(patches) - set(patched)),
        "layers": layers,
    }
    text = json.dumps(result)
    with open(args.out, "w") as f:
        f.write(text)
    sys.stdout.write("\nPROBE_JSON " + text[:2000] + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Check Rankwise LoRA files with ComfyUI's own loader. Run with ComfyUI's python, ComfyUI's folder
on ``sys.path`` (``PYTHONPATH=<ComfyUI>`` or ``--comfyui <path>``); prints one JSON object.

apply:  load the base checkpoint (comfy.sd.load_checkpoint_guess_config), the LoRA
        (comfy.utils.load_torch_file), build ComfyUI's key map (model_lora_keys_unet +
        model_lora_keys_clip), convert and load the LoRA (comfy.lora.load_lora, every key it does
        not consume is reported), patch clones of the model and CLIP (add_patches), compute the
        patched weights (comfy.lora.calculate_weight) and compare them with the tuned checkpoint's
        weights, mapped with ComfyUI's own prefix rules (unet prefix, process_clip_state_dict).

keymap: the key-map check without loading any weights: ComfyUI detects the model config from a
        shapes-only (meta-device) state dict built from a layout file ``{key: [shape, dtype]}``,
        instantiates the diffusion model and the text encoders on the meta device, and the LoRA is
        loaded against their key map; each patch's factor shapes are checked against the weight.

Nothing here is ComfyUI code: it only calls ComfyUI's public functions.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(record.getMessage())
        except Exception:  # pragma: no cover - a broken log record must not break the probe
            pass


def _setup(comfyui: str | None):
    if comfyui:
        sys.path.insert(0, comfyui)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    import torch

    torch.set_grad_enabled(False)
    handler = _Collect()
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    return torch, handler


def _not_loaded(handler: _Collect, start: int) -> list[str]:
    prefix = "lora key not loaded: "
    return sorted(m[len(prefix):] for m in handler.messages[start:] if m.startswith(prefix))


def _lora_modules(lora_sd: dict) -> list[str]:
    ends = (".lora_down.weight", ".hada_w1_a", ".lokr_w1", ".lokr_w1_a", ".diff")
    out = set()
    for k in lora_sd:
        for e in ends:
            if k.endswith(e):
                out.add(k[: -len(e)])
    return sorted(out)


def _adapter_factors(patch):
    """(up, down) of a LoRA patch value, or None for other kinds."""
    weights = getattr(patch, "weights", None)
    if weights is None and isinstance(patch, tuple) and len(patch) == 2 and patch[0] == "lora":
        weights = patch[1]
    if weights is None or len(weights) < 2:
        return None
    return weights[0], weights[1]


# ---------------------------------------------------------------------------------------------
# apply
# ---------------------------------------------------------------------------------------------


def cmd_apply(args) -> dict:
    torch, handler = _setup(args.comfyui)
    import comfy.lora
    import comfy.lora_convert
    import comfy.model_detection
    import comfy.sd
    import comfy.utils

    t0 = time.perf_counter()
    if args.diffusion_model:  # a diffusion-model-only file, as ComfyUI's "Load Diffusion Model" reads it
        model, clip = comfy.sd.load_diffusion_model(args.base), None
    else:
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(args.base, output_vae=False, output_clip=True)
    lora_sd = comfy.utils.load_torch_file(args.lora, safe_load=True)
    modules = _lora_modules(lora_sd)

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    converted = comfy.lora_convert.convert_lora(lora_sd)
    mark = len(handler.messages)
    patches = comfy.lora.load_lora(converted, key_map)
    not_loaded = _not_loaded(handler, mark)

    new_model = model.clone()
    unet_keys = new_model.add_patches(patches, args.strength)
    new_clip = clip.clone() if clip is not None else None
    clip_keys = new_clip.add_patches(patches, args.strength) if clip is not None else []
    # a sliced patch (diffusers q/k/v onto a fused weight) is keyed (weight, offset): count weights
    def _weight_name(k):
        return k[0] if isinstance(k, tuple) else k

    patched = {_weight_name(k) for k in list(unet_keys) + list(clip_keys)}
    unpatched_targets = sorted({_weight_name(k) for k in patches} - patched)

    # tuned weights under ComfyUI's names, with ComfyUI's own prefix rules
    tuned_sd = comfy.utils.load_torch_file(args.tuned, safe_load=True)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(tuned_sd)
    if args.diffusion_model and not any(k.startswith(prefix) for k in tuned_sd):
        prefix = ""  # a bare diffusion-model file, as load_diffusion_model reads it
    config = model.model.model_config
    if clip is not None:
        tuned_clip = config.process_clip_state_dict(
            {k: v for k, v in tuned_sd.items() if not k.startswith(prefix)})
    else:
        tuned_clip = {}
    tuned_unet = {"diffusion_model." + k[len(prefix):]: v for k, v in tuned_sd.items() if k.startswith(prefix)}

    model_sd = model.model.state_dict()
    clip_sd = clip.cond_stage_model.state_dict() if clip is not None else {}
    present = set(modules)
    lora_of = {}
    for name, target in key_map.items():
        if name in present:
            lora_of.setdefault(target[0] if isinstance(target, tuple) else target, name)
    layers = []
    keys = sorted(patched)
    if args.max_layers and len(keys) > args.max_layers:
        step = len(keys) / args.max_layers
        keys = [keys[int(i * step)] for i in range(args.max_layers)]
    for key in keys:
        in_unet = key in new_model.patches
        patch_list = (new_model.patches if in_unet else new_clip.patcher.patches)[key]
        base_w = (model_sd if in_unet else clip_sd)[key]
        tuned_w = (tuned_unet if in_unet else tuned_clip).get(key)
        if tuned_w is None:
            layers.append({"key": key, "lora": lora_of.get(key, ""), "error": "no tuned weight under this name"})
            continue
        base32 = base_w.detach().to(torch.float32).clone()
        patched_w = comfy.lora.calculate_weight(patch_list, base32.clone(), key, intermediate_dtype=torch.float32)
        target = tuned_w.to(torch.float32)
        delta = target - base32
        dnorm = float(delta.norm())
        err = float((patched_w - target).norm())
        layers.append({"key": key, "lora": lora_of.get(key, ""), "delta_norm": dnorm, "abs_error": err,
                       "rel_error": err / dnorm if dnorm > 0 else (0.0 if err == 0 else math.inf)})
    return {
        "mode": "apply",
        "model_class": type(model.model).__name__,
        "config_class": type(model.model.model_config).__name__,
        "unet_config": {k: v for k, v in model.model.model_config.unet_config.items()
                        if isinstance(v, (int, float, str, bool, list))},
        "lora_tensors": len(lora_sd),
        "lora_modules": len(modules),
        "not_loaded": not_loaded,
        "patch_targets": len(patches),
        "patched_keys": len(patched),
        "unet_patched": len(unet_keys),
        "clip_patched": len(clip_keys),
        "unpatched_targets": unpatched_targets,
        "layers": layers,
        "seconds": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------------------
# keymap
# ---------------------------------------------------------------------------------------------


def cmd_keymap(args) -> dict:
    torch, handler = _setup(args.comfyui)
    import comfy.lora
    import comfy.lora_convert
    import comfy.model_detection
    import comfy.utils

    t0 = time.perf_counter()
    with open(args.layout) as f:
        layout = json.load(f)
    # ≥2-D tensors on the meta device (no memory); 1-D ones real zeros, because model detection
    # reads a few small values (e.g. SD2's v-prediction guess takes the std of a norm bias).
    sd = {k: torch.zeros(shape, dtype=getattr(torch, dtype), device="cpu" if len(shape) <= 1 else "meta")
          for k, (shape, dtype) in layout.items()}
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    config = comfy.model_detection.model_config_from_unet(sd, prefix)
    if config is None:
        raise SystemExit(f"ComfyUI did not recognise the layout {args.layout}")
    config.set_inference_dtype(torch.float16, None)
    meta = torch.device("meta")
    with meta:
        model = config.get_model(sd, prefix, device=meta)
        target = config.clip_target(state_dict=sd)
        clip_model = target.clip(device=meta, dtype=torch.float16)
    model_sd = model.state_dict()
    clip_sd = clip_model.state_dict()

    key_map = comfy.lora.model_lora_keys_unet(model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip_model, key_map)
    lora_sd = comfy.utils.load_torch_file(args.lora, safe_load=True)
    modules = _lora_modules(lora_sd)
    converted = comfy.lora_convert.convert_lora(lora_sd)
    mark = len(handler.messages)
    patches = comfy.lora.load_lora(converted, key_map)
    not_loaded = _not_loaded(handler, mark)

    missing_targets, shape_errors = [], []
    for key, patch in patches.items():
        name = key[0] if isinstance(key, tuple) else key
        weight = model_sd.get(name, clip_sd.get(name))
        if weight is None:
            missing_targets.append(name)
            continue
        factors = _adapter_factors(patch)
        if factors is None:
            continue
        up, down = factors
        rows, cols = weight.shape[0], math.prod(weight.shape[1:])
        if up.shape[0] != rows or math.prod(down.shape[1:]) != cols or up.shape[1] != down.shape[0]:
            shape_errors.append(f"{name}: weight {list(weight.shape)}, up {list(up.shape)}, down {list(down.shape)}")
    return {
        "mode": "keymap",
        "model_class": type(model).__name__,
        "config_class": type(config).__name__,
        "clip_class": type(clip_model).__name__,
        "lora_tensors": len(lora_sd),
        "lora_modules": len(modules),
        "not_loaded": not_loaded,
        "patch_targets": len(patches),
        "missing_targets": missing_targets,
        "shape_errors": shape_errors,
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Check LoRA files with ComfyUI's loader; prints JSON.")
    ap.add_argument("--comfyui", help="ComfyUI folder to put on sys.path (default: PYTHONPATH)")
    ap.add_argument("--out", help="write the JSON here as well as to stdout")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("apply")
    a.add_argument("--base", required=True)
    a.add_argument("--tuned", required=True)
    a.add_argument("--lora", required=True)
    a.add_argument("--strength", type=float, default=1.0)
    a.add_argument("--max-layers", type=int, default=0, help="compare at most this many patched layers (0: all)")
    a.add_argument("--diffusion-model", action="store_true", help="base/tuned are diffusion-model-only files")
    k = sub.add_parser("keymap")
    k.add_argument("--layout", required=True, help="JSON {checkpoint key: [shape, dtype]}")
    k.add_argument("--lora", required=True)
    args = ap.parse_args(argv)
    result = cmd_apply(args) if args.cmd == "apply" else cmd_keymap(args)
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    sys.stdout.write("\nPROBE_JSON " + text + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")
    sys.exit(main())

"""Dump ComfyUI's own layouts of DiT families Rankwise has no record for (run with ComfyUI's python,
ComfyUI's folder on ``sys.path``); prints ``PROBE_JSON {family: …}``.

For each family a reduced-depth config at real widths (the values of ``comfy/model_detection.py``)
is instantiated on the meta device (no memory), its state dict gives the layout under ComfyUI's
names, ComfyUI's detection is run on that layout (must give the same model config class), and the
LoRA key map of the model (``comfy.lora.model_lora_keys_unet``) is listed. Nothing here is ComfyUI code.
"""

from __future__ import annotations

import argparse
import json
import sys

FAMILIES = {
    "wan21": {"image_model": "wan2.1", "model_type": "t2v", "dim": 1536, "out_dim": 16, "num_heads": 12,
              "ffn_dim": 8960, "num_layers": 1, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1),
              "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16},
    "qwen_image": {"image_model": "qwen_image", "in_channels": 64, "num_layers": 1},
    "hunyuan_video": {"image_model": "hunyuan_video", "in_channels": 16, "patch_size": [1, 2, 2], "out_channels": 16,
                      "vec_in_dim": 768, "axes_dim": [16, 56, 56], "meanflow": False, "context_in_dim": 4096,
                      "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1, "depth_single_blocks": 1,
                      "theta": 256, "qkv_bias": True, "guidance_embed": True, "byt5": False},
    "lumina2": {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 2304, "cap_feat_dim": 2304,
                "n_layers": 1, "n_heads": 24, "n_kv_heads": 8, "qk_norm": True, "axes_dims": [32, 32, 32],
                "axes_lens": [300, 512, 512]},
    "hidream": {"image_model": "hidream", "attention_head_dim": 128, "axes_dims_rope": [64, 32, 32],
                "caption_channels": [4096, 4096], "max_resolution": [128, 128], "in_channels": 16,
                "llama_layers": [0, 1], "num_attention_heads": 20, "num_routed_experts": 4,
                "num_activated_experts": 2, "num_layers": 1, "num_single_layers": 1, "out_channels": 16,
                "patch_size": 2, "text_emb_dim": 2048},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import torch

    import comfy.lora
    import comfy.model_detection

    torch.set_grad_enabled(False)
    meta = torch.device("meta")
    result = {}
    for family, dit_config in FAMILIES.items():
        try:
            config = comfy.model_detection.model_config_from_unet_config(dict(dit_config))
            if config is None:
                raise RuntimeError("no model config for this unet config")
            config.set_inference_dtype(torch.bfloat16, None)
            with meta:
                model = config.get_model({}, "", device=meta)
            sd = model.state_dict()
            layout = {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in sd.items()}
            # ComfyUI's detection on the bare layout (1-D tensors real zeros: detection may read values)
            bare = {k[len("diffusion_model."):]: (torch.zeros(v.shape, dtype=v.dtype) if v.dim() <= 1
                                                  else torch.empty(v.shape, dtype=v.dtype, device=meta))
                    for k, v in sd.items() if k.startswith("diffusion_model.")}
            detected = comfy.model_detection.model_config_from_unet(bare, "")
            result[family] = {
                "config_class": type(config).__name__,
                "detected_class": type(detected).__name__ if detected is not None else None,
                "model_class": type(model).__name__,
                "layout": layout,
                "key_map": sorted(comfy.lora.model_lora_keys_unet(model, {})),
            }
        except Exception as e:  # noqa: BLE001 - report per family
            result[family] = {"error": f"{type(e).__name__}: {e}"}
    with open(args.out, "w") as f:
        json.dump(result, f)
    sys.stdout.write("\nPROBE_JSON " + json.dumps({k: v.get("error") or v["detected_class"] for k, v in result.items()}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

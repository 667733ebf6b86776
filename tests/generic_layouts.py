"""Reduced-depth diffusion-model layouts of architectures Rankwise has no record for (test data).

Key names and shapes follow ComfyUI's own modules, so ComfyUI detects the files: Wan 2.1
(``comfy/ldm/wan/model.py`` WanModel, detected by ``head.modulation`` in
``comfy/model_detection.py``). Widths are parameters; ``dim`` must be a multiple of 128 (ComfyUI
sets ``num_heads = dim // 128``) and ``text_dim`` 4096 (WanModel's default, not detected).
"""

from __future__ import annotations

import torch


def wan21_layout(dim: int = 256, ffn: int = 512, layers: int = 1, in_dim: int = 16, out_dim: int = 16,
                 text_dim: int = 4096, freq_dim: int = 256) -> dict[str, tuple[int, ...]]:
    """key → shape of a Wan 2.1 text-to-video diffusion model (bare keys, as in models/diffusion_models)."""
    s: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (dim, in_dim, 1, 2, 2),  # Conv3d, kernel = patch (1, 2, 2)
        "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, text_dim), "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, freq_dim), "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,),
    }
    for i in range(layers):
        b = f"blocks.{i}."
        for attn in ("self_attn", "cross_attn"):
            for p in ("q", "k", "v", "o"):
                s[f"{b}{attn}.{p}.weight"] = (dim, dim)
                s[f"{b}{attn}.{p}.bias"] = (dim,)
            s[f"{b}{attn}.norm_q.weight"] = (dim,)
            s[f"{b}{attn}.norm_k.weight"] = (dim,)
        s[f"{b}norm3.weight"] = (dim,)
        s[f"{b}norm3.bias"] = (dim,)
        s[f"{b}ffn.0.weight"] = (ffn, dim)
        s[f"{b}ffn.0.bias"] = (ffn,)
        s[f"{b}ffn.2.weight"] = (dim, ffn)
        s[f"{b}ffn.2.bias"] = (dim,)
        s[f"{b}modulation"] = (1, 6, dim)
    s["head.head.weight"] = (out_dim * 4, dim)  # out_dim · prod(patch)
    s["head.head.bias"] = (out_dim * 4,)
    s["head.modulation"] = (1, 2, dim)
    return s


def random_state_dict(layout: dict[str, tuple[int, ...]], *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                      scale: float = 0.02) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in layout.items():
        t = torch.randn(shape, generator=gen) * scale
        if len(shape) == 1 and key.endswith(".weight"):
            t = t + 1.0  # norms around 1
        out[key] = t.to(dtype).contiguous()
    return out


def planted_tuned(base: dict[str, torch.Tensor], *, rank: int = 4, seed: int = 1, size: float = 0.01,
                  vectors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(tuned, planted ΔW) with an exact rank-``rank`` ΔW added to every 2-D/4-D/5-D weight and a
    small change to every 1-D weight / bias / other parameter (``vectors``), in fp32 before the cast."""
    gen = torch.Generator().manual_seed(seed)
    tuned, deltas = {}, {}
    for key, w in base.items():
        shape = tuple(w.shape)
        if key.endswith(".weight") and len(shape) in (2, 4, 5):
            m = torch.randn(shape[0], rank, generator=gen) @ torch.randn(rank, int(w[0].numel()), generator=gen)
            d = (m * (size / rank)).reshape(shape)
        elif vectors:
            d = torch.randn(shape, generator=gen) * size
        else:
            d = torch.zeros(shape)
        t = (w.float() + d).to(w.dtype)
        tuned[key] = t.contiguous()
        deltas[key] = t.float() - w.float()  # the ΔW the files really hold
    return tuned, deltas

"""Every ComfyUI call of the pack: progress, folders, model weights, LoRA application, saving.

The node modules call these functions and never ``comfy.*`` / ``folder_paths`` directly, so API
drift in ComfyUI is absorbed here. ComfyUI modules are imported inside the functions: importing
this module needs ComfyUI on ``sys.path`` only when a function runs.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, Mapping, Sequence

import torch

from ..core.archs import UNET_COMFY_PREFIX
from ..core.formats import lora_to_state_dict
from ..core.progress import ProgressFn
from ..core.quant import FP8_MANTISSA_BITS
from ..core.types import Lora
from .pair import UnionSource
from .widgets import Coverage, apply_coverage

Tensor = torch.Tensor
log = logging.getLogger("rankwise")

UNET_PREFIX = UNET_COMFY_PREFIX  # ComfyUI's model state-dict prefix, the same in every architecture record

# ---------------------------------------------------------------------------------------------
# Progress and devices
# ---------------------------------------------------------------------------------------------


def progress_bar() -> ProgressFn:
    """A core ProgressFn driving ComfyUI's progress bar for the running node.

    ``ProgressBar.update_absolute`` also checks for an interrupt and raises ComfyUI's
    ``InterruptProcessingException``; it is not caught, so Cancel stops the core at the next layer.
    """
    import comfy.utils

    bar = None

    def update(done: int, total: int, label: str) -> None:
        nonlocal bar
        if bar is None:
            bar = comfy.utils.ProgressBar(max(int(total), 1))
        bar.update_absolute(int(done), max(int(total), 1))

    return update


def compute_device() -> str:
    """The device ComfyUI computes on (honours ``--cpu``), as a string for core options."""
    import comfy.model_management

    return str(comfy.model_management.get_torch_device())


def throw_if_interrupted() -> None:
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


def blocked(message: str):
    """An output value that blocks the nodes using it, showing ``message`` (ComfyUI ExecutionBlocker)."""
    from comfy_execution.graph_utils import ExecutionBlocker

    return ExecutionBlocker(message)


# ---------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------


def file_names(folder: str) -> list[str]:
    """Files ComfyUI lists for a model folder (``"checkpoints"``, ``"loras"``)."""
    import folder_paths

    return folder_paths.get_filename_list(folder)


def full_path(folder: str, name: str) -> str:
    """The path of a listed file; raises ComfyUI's FileNotFoundError with the folder named."""
    import folder_paths

    return folder_paths.get_full_path_or_raise(folder, name)


def lora_save_target(prefix: str) -> tuple[str, str, int, str]:
    """``(folder, file stem, counter, subfolder)`` for a new LoRA under the first loras folder.

    ``prefix`` is relative to that folder (already sanitised); ComfyUI's ``%date%`` tokens expand,
    and ``get_save_image_path`` refuses anything that would land outside the folder.
    """
    import folder_paths

    root = os.path.abspath(folder_paths.get_folder_paths("loras")[0])
    os.makedirs(root, exist_ok=True)
    folder, stem, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, root)
    return folder, stem, counter, subfolder


def forget_lora_list() -> None:
    """Drop ComfyUI's cached "loras" file list so LoraLoader shows a new file without a restart."""
    import folder_paths

    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.pop("loras", None)
    helper = getattr(folder_paths, "cache_helper", None)
    inner = getattr(helper, "cache", None)
    if isinstance(inner, dict):
        inner.pop("loras", None)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def load_checkpoint_for_sampling(path: str) -> tuple[object, object, object]:
    """``(MODEL, CLIP, VAE)`` of a checkpoint, loaded the way CheckpointLoaderSimple does."""
    import comfy.sd
    import folder_paths

    out = comfy.sd.load_checkpoint_guess_config(
        path, output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings")
    )
    return out[0], out[1], out[2]


def load_diffusion_model_for_sampling(path: str, weight_dtype: str = "default") -> object:
    """A diffusion-model-only file as a MODEL, loaded the way UNETLoader does (``comfy.sd.load_diffusion_model``)."""
    import comfy.sd

    options: dict = {}
    if weight_dtype == "fp8_e4m3fn":
        options["dtype"] = torch.float8_e4m3fn
    elif weight_dtype == "fp8_e5m2":
        options["dtype"] = torch.float8_e5m2
    return comfy.sd.load_diffusion_model(path, model_options=options)


def unet_key_map(model) -> dict:
    """ComfyUI's LoRA key map of a MODEL (``comfy.lora.model_lora_keys_unet``): LoRA module name →
    weight key, the names ComfyUI's loader applies to this model."""
    import comfy.lora

    return comfy.lora.model_lora_keys_unet(model.model, {})


class PatchedModelSource:
    """A ComfyUI ModelPatcher as a core WeightSource: each ``get`` returns one weight with the
    patcher's patches (LoRAs, merges, subtractions) applied, computed on demand in fp32.

    Keys are the patcher's state-dict keys (``diffusion_model.…`` for a MODEL, ``clip_l.transformer.…``
    for a CLIP), optionally only those under ``prefix``. Only one patched tensor exists at a time:
    the second model of a pair is never materialised.
    """

    def __init__(self, patcher, prefix: str | None = None, name: str = "model") -> None:
        self._patcher = patcher
        self._prefix = prefix
        self.name = name
        self.path = None
        self.metadata: Mapping[str, str] = {}
        self._entries: dict | None = None
        self.quant_reads: dict = {}  # fp8 weights read: key → (‖W‖_F, dtype), for core.quant's report

    def _key_patches(self) -> dict:
        if self._entries is None:
            # {key: [(weight, convert_func), *patches]}; references only, nothing is copied
            self._entries = self._patcher.get_key_patches(self._prefix)
        return self._entries

    def keys(self) -> Iterable[str]:
        return self._key_patches().keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self._key_patches()[key][0][0].shape)

    def dtype(self, key: str) -> torch.dtype:
        entry = self._key_patches()[key]
        return torch.float32 if len(entry) > 1 else entry[0][0].dtype

    def get(self, key: str) -> Tensor:
        import comfy.lora
        import comfy.model_management

        entry = self._key_patches()[key]
        weight, convert = entry[0]
        with torch.no_grad():
            w = comfy.model_management.cast_to_device(weight.detach(), weight.device, torch.float32, copy=True)
            w = convert(w, inplace=True)
            if len(entry) > 1:
                w = comfy.lora.calculate_weight(entry[1:], w, key, original_weights=self._key_patches())
        if weight.dtype in FP8_MANTISSA_BITS:
            self.quant_reads[key] = (float(torch.linalg.vector_norm(w.double())), weight.dtype)
        return w.detach()

    def __contains__(self, key: object) -> bool:
        return key in self._key_patches()

    def __repr__(self) -> str:
        return f"PatchedModelSource({self.name!r})"


def graph_source(model, clip, name: str) -> UnionSource:
    """A MODEL (UNet keys) and an optional CLIP (text-encoder keys) as one ComfyUI-keyed source."""
    parts = [PatchedModelSource(model, UNET_PREFIX, name=f"{name} model")]
    if clip is not None:
        parts.append(PatchedModelSource(clip.patcher, None, name=f"{name} clip"))
    return UnionSource(parts, name=name)


def clip_with_encoders_from(clip, base_clip, prefixes: Sequence[str]):
    """A clone of ``clip`` whose weights under ``prefixes`` are set to ``base_clip``'s (``set`` patches)."""
    new = clip.clone()
    if not prefixes:
        return new
    base_sd = base_clip.cond_stage_model.state_dict()
    target_sd = clip.cond_stage_model.state_dict()
    patches = {}
    for key, value in base_sd.items():
        if not key.startswith(tuple(prefixes)) or not value.is_floating_point():
            continue
        if key in target_sd and tuple(target_sd[key].shape) == tuple(value.shape):
            patches[key] = ("set", (value,))
    new.add_patches(patches, 1.0)
    return new


# ---------------------------------------------------------------------------------------------
# LoRA application
# ---------------------------------------------------------------------------------------------


def apply_lora(model, clip, lora: Lora, strength_model: float, strength_clip: float) -> tuple[object, object, Coverage]:
    """Apply ``lora`` to ``model`` (and ``clip`` when given) in memory, with a coverage report.

    The LoRA is written as a kohya state dict (fp32) and loaded with ComfyUI's own ``load_lora``
    against the key maps of the given models; ``add_patches`` returns the keys it patched, so
    every module that did not reach a weight is listed (and logged), never dropped silently. A
    strength of 0 returns the input unchanged but still reports coverage.
    """
    import comfy.lora

    sd = lora_to_state_dict(lora, dtype=torch.float32)
    key_map: dict = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    patches = comfy.lora.load_lora(sd, key_map, log_missing=False)

    patched: set = set()
    new_model, new_clip = model, clip
    if model is not None:
        m = model.clone()
        patched |= set(m.add_patches(patches, float(strength_model)))
        if float(strength_model) != 0.0:
            new_model = m
    if clip is not None:
        c = clip.clone()
        patched |= set(c.add_patches(patches, float(strength_clip)))
        if float(strength_clip) != 0.0:
            new_clip = c
    coverage = apply_coverage(list(lora.layers), key_map, patched, clip_connected=clip is not None)
    if coverage.missing:
        log.warning("Rankwise Apply LoRA: %s", coverage.summary(limit=8).replace("\n", " "))
    return new_model, new_clip, coverage


__all__ = [
    "PatchedModelSource",
    "apply_lora",
    "blocked",
    "clip_with_encoders_from",
    "compute_device",
    "file_names",
    "forget_lora_list",
    "full_path",
    "graph_source",
    "load_checkpoint_for_sampling",
    "load_diffusion_model_for_sampling",
    "lora_save_target",
    "progress_bar",
    "throw_if_interrupted",
    "unet_key_map",
]

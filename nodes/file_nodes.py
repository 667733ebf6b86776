"""Nodes that read and write LoRA files: Load LoRA (any format), Save LoRA."""

from __future__ import annotations

import os

from comfy_api.latest import io, ui

from ..core.io import load_lora, save_lora
from ..core.types import Lora
from . import comfy_glue as glue
from .sockets import CATEGORY, LoraSocket
from .widgets import (DEFAULT_PREFIX, SaveDtype, SaveNaming, counter_file_name, dtype_from_name, prefix_with_suffix, relative_lora_name,
                      sanitize_prefix, widget_problem)


class RankwiseLoadLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RankwiseLoadLoRA",
            display_name="Load LoRA (any format)",
            category=CATEGORY,
            description=(
                "Read a LoRA file from models/loras in any common format (kohya, LoCon, LoHa, LoKr, full "
                "diff, PEFT, diffusers, ComfyUI, cloneofsimo) for resizing, merging or inspection. Keys it "
                "does not understand are listed by name in the report."
            ),
            inputs=[
                io.Combo.Input("lora_name", options=glue.file_names("loras"), tooltip="The LoRA file (models/loras)."),
                io.Boolean.Input("skip_bad_modules", default=False, optional=True,
                                 tooltip="Drop (and count in the report) modules whose factors do not fit "
                                         "their layer, instead of failing."),
            ],
            outputs=[
                LoraSocket.Output(display_name="lora", tooltip="The LoRA, renamed to kohya module names."),
                io.String.Output(display_name="report", tooltip="Formats found, modules read, unknown or ignored keys, metadata."),
            ],
        )

    @classmethod
    def execute(cls, lora_name: str, skip_bad_modules: bool = False) -> io.NodeOutput:
        path = glue.full_path("loras", lora_name)
        lora, read = load_lora(path, skip_bad_modules=bool(skip_bad_modules))
        arch = lora.arch.value if lora.arch is not None else "unknown architecture"
        lines = [f"{lora_name}: {arch}, {len(lora)} layers, {lora.nbytes() / 2**20:.1f} MiB", read.summary()]
        for key in ("ss_network_dim", "ss_network_alpha", "ss_base_model_version", "modelspec.title"):
            if key in lora.metadata:
                lines.append(f"{key}: {lora.metadata[key]}")
        report = "\n".join(lines)
        return io.NodeOutput(lora, report, ui=ui.PreviewText(report))

    @classmethod
    def fingerprint_inputs(cls, lora_name: str, skip_bad_modules: bool = False):
        """Re-read when the file changes on disk (same name, new content)."""
        try:
            st = os.stat(glue.full_path("loras", lora_name))
        except (OSError, FileNotFoundError):
            return lora_name
        return f"{lora_name}:{st.st_size}:{st.st_mtime_ns}"


class RankwiseSaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RankwiseSaveLoRA",
            display_name="Save LoRA",
            category=CATEGORY,
            description=(
                "Write a LoRA into models/loras as a kohya-format .safetensors file with its metadata and "
                "hashes (loads in ComfyUI, A1111/Forge and diffusers). Files get a counter and are never "
                "overwritten; with a sweep it saves one file per LoRA. The new file is listed by "
                "LoraLoader after a refresh of the UI."
            ),
            inputs=[
                LoraSocket.Input("lora", tooltip="The LoRA to save (a list saves one file each)."),
                io.String.Input("filename_prefix", default=DEFAULT_PREFIX,
                                tooltip="Path under models/loras, e.g. rankwise/mystyle; %date:…%-style "
                                        "tokens such as %year%-%month%-%day% are expanded."),
                io.Combo.Input("dtype", options=SaveDtype, default=SaveDtype.FP16,
                               tooltip="Tensor precision of the file: fp16 (usual), bf16 (large values), fp32 (exact)."),
                io.String.Input("suffix", default="",
                                tooltip="Optional text appended to the name; connect Extract LoRA's label to name "
                                        "sweep files rank16, sv_fro0.9, …"),
                io.Combo.Input("key_names", options=SaveNaming, default=SaveNaming.AUTO, optional=True,
                               tooltip="Module names in the file. auto: kohya (SD1/SD2/SDXL/Flux: ComfyUI, Forge, "
                                       "A1111, diffusers) or diffusers (SD3: diffusers and ComfyUI). comfyui: "
                                       "diffusion_model.… names. diffusers: transformer.…lora_A/B, q/k/v split "
                                       "exactly (Flux, SD3)."),
            ],
            outputs=[
                io.String.Output(display_name="lora_name",
                                 tooltip="The saved file's name relative to models/loras (what LoraLoader lists)."),
            ],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix: str | None = None) -> bool | str:
        if filename_prefix is None:
            return True
        return widget_problem(sanitize_prefix, filename_prefix) or True

    @classmethod
    def execute(cls, lora: Lora, filename_prefix: str, dtype: str, suffix: str,
                key_names: str = SaveNaming.AUTO.value) -> io.NodeOutput:
        prefix = prefix_with_suffix(sanitize_prefix(filename_prefix), suffix)
        folder, stem, counter, subfolder = glue.lora_save_target(prefix)
        file_name = counter_file_name(stem, counter)
        os.makedirs(folder, exist_ok=True)  # a subfolder of the prefix; the guard itself creates no folders
        result = save_lora(lora, os.path.join(folder, file_name), dtype=dtype_from_name(dtype),
                           naming=SaveNaming(key_names).style)
        glue.forget_lora_list()
        name = relative_lora_name(subfolder, file_name)
        text = (f"saved {name} ({result.bytes / 2**20:.1f} MiB, {len(lora)} layers, "
                f"sha256 {result.sha256[:10]}) in {folder}")
        return io.NodeOutput(name, ui=ui.PreviewText(text))


NODES = [RankwiseLoadLoRA, RankwiseSaveLoRA]

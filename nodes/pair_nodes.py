"""Nodes that make and clean a checkpoint pair: Load Model Pair, Load Diffusion Model Pair, Model Pair
from Graph, Clean CLIP.

A pair whose architecture Rankwise has no record for (Wan, Qwen-Image, HunyuanVideo, HiDream, Lumina …)
goes through the generic path (:mod:`core.generic`): its layers are named ``diffusion_model.<key>``,
checked against ComfyUI's own key map of the model (``comfy.lora.model_lora_keys_unet``), and the
LoRA is saved with those ComfyUI-native names.
"""

from __future__ import annotations

import os

from comfy_api.latest import io, ui

from ..core.clip import DEFAULT_TE_THRESHOLD, text_encoder_report
from ..core.errors import MismatchError, RankwiseError
from ..core.sources import KeyStyle, open_source
from . import comfy_glue as glue
from .pair import (
    ModelPair, comfy_clip_prefix, diffusion_file_pair, encoder_prefixes, make_pair, make_pair_or_generic,
    position_ids_problems, with_encoders_from_base,
)
from .sockets import CATEGORY, PairSocket
from .widgets import CleanMode


class RankwiseLoadModelPair(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RankwiseLoadModelPair",
            display_name="Load Model Pair",
            category=CATEGORY,
            description=(
                "Open a base and a fine-tuned checkpoint as a pair for LoRA extraction. Both files are "
                "streamed tensor by tensor (the tuned model is never loaded whole) and checked to be "
                "the same architecture with the same layers. The base can also be loaded for sampling."
            ),
            inputs=[
                io.Combo.Input("base_ckpt", options=glue.file_names("checkpoints"),
                               tooltip="The original model the fine-tune started from (models/checkpoints)."),
                io.Combo.Input("tuned_ckpt", options=glue.file_names("checkpoints"),
                               tooltip="The fine-tuned model whose difference from the base becomes the LoRA."),
                io.Boolean.Input("load_base_for_sampling", default=True,
                                 tooltip="Also load the base as MODEL/CLIP/VAE to preview the LoRA. Turn off to "
                                         "only extract (saves the memory and time of a full model load)."),
            ],
            outputs=[
                io.Model.Output(display_name="base_model", tooltip="The base model, for sampling with the extracted LoRA."),
                io.Clip.Output(display_name="base_clip", tooltip="The base text encoder(s), for sampling."),
                io.Vae.Output(display_name="base_vae", tooltip="The base VAE, for sampling."),
                PairSocket.Output(display_name="pair", tooltip="Base and tuned weights, streamed from the files; feed Extract LoRA or Clean CLIP."),
                io.String.Output(display_name="report", tooltip="The pair check: architecture, layers compared, components, notes."),
            ],
        )

    @classmethod
    def execute(cls, base_ckpt: str, tuned_ckpt: str, load_base_for_sampling: bool) -> io.NodeOutput:
        base_path = glue.full_path("checkpoints", base_ckpt)
        tuned_path = glue.full_path("checkpoints", tuned_ckpt)
        if os.path.realpath(base_path) == os.path.realpath(tuned_path):
            raise MismatchError(
                f"base and tuned are the same file ({base_ckpt}); pick the fine-tuned checkpoint as tuned_ckpt"
            )
        pair = make_pair(open_source(base_path), open_source(tuned_path), key_style=KeyStyle.CHECKPOINT)
        if load_base_for_sampling:
            try:
                model, clip, vae = glue.load_checkpoint_for_sampling(base_path)
            except RuntimeError as e:
                raise RankwiseError(
                    f"ComfyUI could not load {base_ckpt} for sampling ({e}); the pair itself is fine — "
                    f"turn off load_base_for_sampling to extract without it"
                ) from e
        else:
            off = "Load Model Pair: load_base_for_sampling is off, so there is no base {} to use"
            model, clip, vae = glue.blocked(off.format("MODEL")), glue.blocked(off.format("CLIP")), glue.blocked(off.format("VAE"))
        report = pair.describe()
        return io.NodeOutput(model, clip, vae, pair, report, ui=ui.PreviewText(report))


EXACT_PARTS_TOOLTIP = (
    "Generic pairs (architectures with no Rankwise record): also store every changed norm weight exactly "
    "as .diff and every changed bias as .diff_b, as ComfyUI's own extractor does. Exact, small, loaded by "
    "ComfyUI; other loaders (diffusers) may drop them."
)


class RankwiseLoadDiffusionModelPair(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RankwiseLoadDiffusionModelPair",
            display_name="Load Diffusion Model Pair",
            category=CATEGORY,
            description=(
                "Open a base and a fine-tuned diffusion-model-only file (models/diffusion_models, as "
                "Load Diffusion Model reads them) as a pair for LoRA extraction, streamed tensor by tensor; "
                "fp8 and scaled-fp8 files are dequantised. Any model ComfyUI loads works: without a Rankwise "
                "record (Wan, Qwen-Image, HunyuanVideo, HiDream, Lumina …) layers get ComfyUI-native names."
            ),
            inputs=[
                io.Combo.Input("base_model_name", options=glue.file_names("diffusion_models"),
                               tooltip="The original diffusion model (models/diffusion_models)."),
                io.Combo.Input("tuned_model_name", options=glue.file_names("diffusion_models"),
                               tooltip="The fine-tuned diffusion model whose difference becomes the LoRA."),
                io.Boolean.Input("load_base_for_sampling", default=True,
                                 tooltip="Also load the base as MODEL (like Load Diffusion Model) to preview the "
                                         "LoRA; its key map also checks every layer name. Off: extract only."),
                io.Combo.Input("weight_dtype", options=["default", "fp8_e4m3fn", "fp8_e5m2"], default="default",
                               tooltip="dtype of the base MODEL loaded for sampling (the extraction always "
                                       "reads the files in fp32)."),
                io.Boolean.Input("exact_parts", default=False, tooltip=EXACT_PARTS_TOOLTIP),
            ],
            outputs=[
                io.Model.Output(display_name="base_model", tooltip="The base model, for sampling with the extracted LoRA."),
                PairSocket.Output(display_name="pair", tooltip="Base and tuned weights, streamed from the files; feed Extract LoRA."),
                io.String.Output(display_name="report", tooltip="The pair check: architecture or generic mode, layers, notes."),
            ],
        )

    @classmethod
    def execute(cls, base_model_name: str, tuned_model_name: str, load_base_for_sampling: bool,
                weight_dtype: str, exact_parts: bool) -> io.NodeOutput:
        base_path = glue.full_path("diffusion_models", base_model_name)
        tuned_path = glue.full_path("diffusion_models", tuned_model_name)
        if os.path.realpath(base_path) == os.path.realpath(tuned_path):
            raise MismatchError(
                f"base and tuned are the same file ({base_model_name}); pick the fine-tuned model as tuned_model_name"
            )
        model, key_map = None, None
        if load_base_for_sampling:
            try:
                model = glue.load_diffusion_model_for_sampling(base_path, weight_dtype)
            except RuntimeError as e:
                raise RankwiseError(
                    f"ComfyUI could not load {base_model_name} for sampling ({e}); turn off "
                    f"load_base_for_sampling to extract without it"
                ) from e
            key_map = glue.unet_key_map(model)
        pair = diffusion_file_pair(open_source(base_path), open_source(tuned_path), exact_parts=exact_parts,
                                   key_map=key_map)
        report = pair.describe()
        if exact_parts and not pair.generic:
            report += "\nnote: exact_parts applies to generic pairs only (this architecture has a record)"
        if model is None:
            model = glue.blocked("Load Diffusion Model Pair: load_base_for_sampling is off, so there is no base MODEL")
        return io.NodeOutput(model, pair, report, ui=ui.PreviewText(report))


class RankwiseModelPair(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RankwiseModelPair",
            display_name="Model Pair from Graph",
            category=CATEGORY,
            description=(
                "Make a pair from models already in the graph (e.g. a merge, or a model with LoRAs "
                "applied). Weights are computed with their patches one tensor at a time, so no second "
                "full model is held in memory."
            ),
            inputs=[
                io.Model.Input("base_model", tooltip="The original model."),
                io.Model.Input("tuned_model", tooltip="The changed model (merged, patched, fine-tuned)."),
                io.Clip.Input("base_clip", optional=True,
                              tooltip="Base text encoder(s); connect both CLIPs to extract text-encoder layers too."),
                io.Clip.Input("tuned_clip", optional=True,
                              tooltip="Changed text encoder(s); connect both CLIPs to extract text-encoder layers too."),
                io.Boolean.Input("exact_parts", default=False, optional=True,
                                 tooltip=EXACT_PARTS_TOOLTIP),
            ],
            outputs=[
                PairSocket.Output(display_name="pair", tooltip="Base and tuned weights (patched, computed on demand); feed Extract LoRA."),
                io.String.Output(display_name="report", tooltip="The pair check: architecture, layers compared, components, notes."),
            ],
        )

    @classmethod
    def execute(cls, base_model, tuned_model, base_clip=None, tuned_clip=None, exact_parts=False) -> io.NodeOutput:
        base = glue.graph_source(base_model, base_clip, "base")
        tuned = glue.graph_source(tuned_model, tuned_clip, "tuned")
        pair = make_pair_or_generic(base, tuned, key_style=KeyStyle.COMFY, exact_parts=bool(exact_parts),
                                    key_map=glue.unet_key_map(base_model))
        report = pair.describe()
        if exact_parts and not pair.generic:
            report += "\nnote: exact_parts applies to generic pairs only (this architecture has a record)"
        if (base_clip is None) != (tuned_clip is None):
            report += "\nnote: only one CLIP is connected, so no text-encoder layer is compared"
        return io.NodeOutput(pair, report, ui=ui.PreviewText(report))


class RankwiseCleanCLIP(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RankwiseCleanCLIP",
            display_name="Clean CLIP",
            category=CATEGORY,
            description=(
                "Measure how much each text encoder of the tuned model differs from the base "
                "(‖ΔW‖/‖W‖), and optionally use the base's encoders instead, so that no text-encoder "
                "layers are extracted from mere re-saving noise. Can also repair broken position_ids."
            ),
            inputs=[
                PairSocket.Input("pair", tooltip="A pair from Load Model Pair or Model Pair from Graph."),
                io.Combo.Input("mode", options=CleanMode, default=CleanMode.REPORT,
                               tooltip="report only: change nothing. replace differing: encoders above the "
                                       "threshold take the base's weights (their ΔW becomes 0). replace all: "
                                       "every encoder takes the base's weights (UNet-only LoRA)."),
                io.Boolean.Input("repair_position_ids", default=True,
                                 tooltip="Serve position_ids as exact integers 0…76 on the tuned side (merged "
                                         "checkpoints often carry 76.9999-style values)."),
                io.Float.Input("threshold", default=DEFAULT_TE_THRESHOLD, min=0.0, max=1.0, step=0.0001,
                               tooltip="An encoder differs when ‖ΔW‖/‖W‖ is above this; the default sits above "
                                       "fp16/bf16 re-save noise and below a 1% change."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional tuned CLIP for sampling; with base_clip, the replaced encoders are swapped in it too."),
                io.Clip.Input("base_clip", optional=True,
                              tooltip="Optional base CLIP providing the weights of the replaced encoders for the clip output."),
            ],
            outputs=[
                PairSocket.Output(display_name="pair", tooltip="The pair with the chosen encoders taken from the base."),
                io.String.Output(display_name="report", tooltip="Per-encoder relative difference, verdict and what was replaced."),
                io.Clip.Output(display_name="clip", tooltip="The clip input with the same encoders replaced (needs clip and base_clip)."),
            ],
        )

    @classmethod
    def execute(cls, pair: ModelPair, mode: str, repair_position_ids: bool, threshold: float,
                clip=None, base_clip=None) -> io.NodeOutput:
        mode = CleanMode(mode)
        diffs = text_encoder_report(pair.base, pair.tuned, pair.table, threshold=float(threshold),
                                    key_style=pair.key_style)
        if mode is CleanMode.REPLACE_DIFFERING:
            chosen = tuple(d.component for d in diffs if d.differs)
        elif mode is CleanMode.REPLACE_ALL:
            chosen = tuple(d.component for d in diffs)
        else:
            chosen = ()
        broken = position_ids_problems(pair.tuned)
        out = with_encoders_from_base(pair, chosen, fix_position_ids=repair_position_ids, encoders=diffs)

        lines = [d.describe() for d in diffs] or ["the pair has no text encoder on both sides"]
        if chosen:
            lines.append("taken from base (ΔW = 0, not extracted): " + ", ".join(c.value for c in chosen))
        elif mode is not CleanMode.REPORT:
            lines.append("no encoder replaced")
        for key, bad in broken.items():
            state = "repaired" if repair_position_ids else "left as is"
            lines.append(f"{key}: {len(bad)} wrong ids {list(bad[:10])} ({state})" if bad
                         else f"{key}: not int64 / wrong shape ({state})")

        if clip is None:
            clip_out = glue.blocked("Clean CLIP: connect a CLIP to the clip input to use the clip output")
        elif chosen and base_clip is not None:
            prefixes = [comfy_clip_prefix(p) for c, p in encoder_prefixes(pair.arch, KeyStyle.COMFY).items() if c in chosen]
            clip_out = glue.clip_with_encoders_from(clip, base_clip, prefixes)
            lines.append("clip output: " + ", ".join(prefixes) + " weights set from base_clip")
        else:
            clip_out = clip
            if chosen:
                lines.append("clip output unchanged: connect base_clip to swap the replaced encoders in it")
        report = "\n".join(lines)
        return io.NodeOutput(out, report, clip_out, ui=ui.PreviewText(report))


NODES = [RankwiseLoadModelPair, RankwiseLoadDiffusionModelPair, RankwiseModelPair, RankwiseCleanCLIP]

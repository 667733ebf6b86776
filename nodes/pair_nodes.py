"""Nodes that make and clean a checkpoint pair: Load Model Pair, Model Pair from Graph, Clean CLIP."""

from __future__ import annotations

import os

from comfy_api.latest import io, ui

from ..core.clip import DEFAULT_TE_THRESHOLD, text_encoder_report
from ..core.errors import MismatchError, RankwiseError
from ..core.sources import KeyStyle, open_source
from . import comfy_glue as glue
from .pair import ModelPair, comfy_clip_prefix, encoder_prefixes, make_pair, position_ids_problems, with_encoders_from_base
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
            ],
            outputs=[
                PairSocket.Output(display_name="pair", tooltip="Base and tuned weights (patched, computed on demand); feed Extract LoRA."),
                io.String.Output(display_name="report", tooltip="The pair check: architecture, layers compared, components, notes."),
            ],
        )

    @classmethod
    def execute(cls, base_model, tuned_model, base_clip=None, tuned_clip=None) -> io.NodeOutput:
        base = glue.graph_source(base_model, base_clip, "base")
        tuned = glue.graph_source(tuned_model, tuned_clip, "tuned")
        pair = make_pair(base, tuned, key_style=KeyStyle.COMFY)
        report = pair.describe()
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


NODES = [RankwiseLoadModelPair, RankwiseModelPair, RankwiseCleanCLIP]

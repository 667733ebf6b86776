"""Nodes that connect Rankwise LoRAs to ComfyUI models: Apply LoRA, LORA ⇄ LORA_MODEL."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..core.formats import lora_from_state_dict, lora_to_comfy_state_dict, lora_to_state_dict
from ..core.types import Lora
from . import comfy_glue as glue
from .sockets import CATEGORY, LoraSocket
from .widgets import LoraModelKeys, SaveDtype, dtype_from_name


class RankwiseApplyLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RankwiseApplyLoRA",
            display_name="Apply LoRA (preview)",
            category=CATEGORY,
            description=(
                "Apply a LoRA from the graph to a model (and CLIP) without saving it first, to preview an "
                "extraction. Reports how many LoRA modules reached a model weight and names the rest."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (usually the base the LoRA was extracted from)."),
                io.Clip.Input("clip", optional=True, tooltip="Optional CLIP for the LoRA's text-encoder layers."),
                LoraSocket.Input("lora", tooltip="The LoRA to apply."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly to modify the diffusion model; can be negative."),
                io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly to modify the text encoder(s); can be negative."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the LoRA applied."),
                io.Clip.Output(display_name="clip", tooltip="The CLIP with the LoRA applied (needs the clip input)."),
                io.String.Output(display_name="coverage",
                                 tooltip="\"applied N of M modules\" and the modules that were not applied, with why."),
            ],
        )

    @classmethod
    def execute(cls, model, lora: Lora, strength_model: float, strength_clip: float, clip=None) -> io.NodeOutput:
        new_model, new_clip, coverage = glue.apply_lora(model, clip, lora, strength_model, strength_clip)
        if new_clip is None:
            new_clip = glue.blocked("Apply LoRA: connect a CLIP to the clip input to use the clip output")
        text = coverage.summary()
        return io.NodeOutput(new_model, new_clip, text, ui=ui.PreviewText(text))


class RankwiseToLoraModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RankwiseToLoraModel",
            display_name="LoRA to LORA_MODEL",
            category=CATEGORY,
            description=(
                "Convert a Rankwise LoRA to ComfyUI's LORA_MODEL (a plain state dict), for core nodes such "
                "as Load LoRA Model and Save LoRA Weights."
            ),
            inputs=[
                LoraSocket.Input("lora", tooltip="The LoRA to convert."),
                io.Combo.Input("key_names", options=LoraModelKeys, default=LoraModelKeys.COMFY,
                               tooltip="comfyui: diffusion_model.… / text_encoders.… names (as ComfyUI's trainer "
                                       "writes). kohya: lora_unet_… / lora_te_… names (portable)."),
                io.Combo.Input("dtype", options=SaveDtype, default=SaveDtype.FP16, tooltip="Tensor precision."),
            ],
            outputs=[
                io.LoraModel.Output(display_name="lora_model", tooltip="The LoRA as a state dict (LORA_MODEL)."),
            ],
        )

    @classmethod
    def execute(cls, lora: Lora, key_names: str, dtype: str) -> io.NodeOutput:
        torch_dtype = dtype_from_name(dtype)
        if LoraModelKeys(key_names) is LoraModelKeys.COMFY:
            sd = lora_to_comfy_state_dict(lora, dtype=torch_dtype)
        else:
            sd = lora_to_state_dict(lora, dtype=torch_dtype)
        return io.NodeOutput(sd)


class RankwiseFromLoraModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RankwiseFromLoraModel",
            display_name="LORA_MODEL to LoRA",
            category=CATEGORY,
            description=(
                "Read ComfyUI's LORA_MODEL (e.g. from Train LoRA) as a Rankwise LoRA, to resize, merge, "
                "inspect or save it in kohya format."
            ),
            inputs=[
                io.LoraModel.Input("lora_model", tooltip="A LoRA state dict (LORA_MODEL)."),
            ],
            outputs=[
                LoraSocket.Output(display_name="lora", tooltip="The LoRA with kohya module names."),
                io.String.Output(display_name="report", tooltip="Formats found, modules read, keys not understood or ignored."),
            ],
        )

    @classmethod
    def execute(cls, lora_model: dict) -> io.NodeOutput:
        lora, read = lora_from_state_dict(lora_model)
        report = read.summary()
        return io.NodeOutput(lora, report, ui=ui.PreviewText(report))


NODES = [RankwiseApplyLoRA, RankwiseToLoraModel, RankwiseFromLoraModel]

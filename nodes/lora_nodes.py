"""Nodes that make LoRAs: Extract LoRA (rank sweeps), Resize LoRA, Merge LoRAs, LoRA Info."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..core.archs import LayerPreset, detect_lora_arch
from ..core.blocks import parse_block_weights
from ..core.budget import Weighting
from ..core.errors import RankwiseError
from ..core.extract import ExtractOptions, ExtractResult, TextEncoderMode, extract_sweep_detailed
from ..core.merge import MergeInput, MergeMode, merge_sweep
from ..core.pipeline import LayerFilter
from ..core.resize import resize_sweep
from ..core.runtime import layer_parallelism
from ..core.spectrum import render_spectrum, select_layers_for_plot
from ..core.svd import SvdMethod
from ..core.types import Lora
from . import comfy_glue as glue
from .pair import ModelPair
from .sockets import CATEGORY, LoraSocket, PairSocket
from .widgets import (merge_ratios, parse_filters, parse_policies, pil_to_image, placeholder_image, rank_selectors,
                      sweep_labels, widget_problem)

RULES_TOOLTIP = (
    "Rank rule(s). A number is a fixed rank (\"32\"); a comma list makes a sweep with one output per rule "
    "(\"8,16,32,64\"). Dynamic rules pick a rank per layer: sv_fro:0.9 (keep 90% of the Frobenius norm), "
    "sv_ratio:20 (σ > σ1/20), sv_cumulative:0.9, threshold:0.01, sv_knee. A budget over the whole file picks every "
    "layer's rank at once: size:160MB (MB = 10^6 B), size:0.25 (of the rank-128 size), params:20M."
)
MAX_RANK_TOOLTIP = "Upper limit for dynamic rules (ignored by fixed ranks). 0 = no limit."
CONV_RANK_TOOLTIP = "Rank (or limit, for dynamic rules) of 3×3 conv layers. 0 = same as the linear layers."
TE_RANK_TOOLTIP = "Rank (or limit, for dynamic rules) of text-encoder layers. 0 = same as the UNet layers."
MIN_RANK_TOOLTIP = "Lower limit for dynamic rules."
BUDGET_WEIGHTING_TOOLTIP = (
    "Only used by size:/params: rules (ignored by every other rule). How a budget weighs the layers when it "
    "decides where the bytes go: it keeps the singular values with the most weighted ‖ΔW‖² per byte. "
    "relative (default): a layer's kept ‖ΔW‖² is divided by ‖W_base‖², so layers compete by relative change "
    "and big layers do not win by size alone. absolute: kept ‖ΔW‖² as is (big layers count more)."
)
FULL_DIFF_TOOLTIP = (
    "Only used by size:/params: rules (ignored by every other rule). On: a layer whose rank cap reaches half "
    "of min(out, in) (where LoRA factors cost as much as the full matrix) may be stored as the exact full "
    "difference (.diff, which ComfyUI, Forge and LyCORIS load), counted in the budget at its real size and "
    "chosen only where it is the best use of the bytes. Off (default): LoRA factors only."
)


def _validate_rules(rules: str | None) -> bool | str:
    """Checked before the queue runs (a linked rules input arrives as None and is checked at run time)."""
    if rules is None:
        return True
    return widget_problem(parse_policies, rules) or True


def _spectrum_image(result: ExtractResult, label: str):
    names = [n for n in select_layers_for_plot(result.report) if n in result.spectra]
    if not names:
        return pil_to_image(placeholder_image(f"{label}: no layer was decomposed"))
    ranks = {n: result.lora.layers[n].rank for n in names if n in result.lora.layers}
    img = render_spectrum({n: result.spectra[n] for n in names}, ranks, title=f"Singular-value spectra: {label}")
    return pil_to_image(img)


class RankwiseExtractLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RankwiseExtractLoRA",
            display_name="Extract LoRA",
            category=CATEGORY,
            description=(
                "Extract the LoRA that best reproduces tuned − base, layer by layer (truncated SVD, "
                "optimal for the chosen rank). Several rules give several LoRAs from one pass: each "
                "layer is decomposed once, so a sweep costs about one extraction."
            ),
            inputs=[
                PairSocket.Input("pair", tooltip="A pair from Load Model Pair, Model Pair from Graph or Clean CLIP."),
                io.String.Input("rules", default="32", tooltip=RULES_TOOLTIP),
                io.Int.Input("max_rank", default=128, min=0, max=4096, tooltip=MAX_RANK_TOOLTIP),
                io.Int.Input("conv_rank", default=0, min=0, max=4096, tooltip=CONV_RANK_TOOLTIP),
                io.Int.Input("te_rank", default=0, min=0, max=4096, tooltip=TE_RANK_TOOLTIP),
                io.Int.Input("min_rank", default=1, min=1, max=4096, tooltip=MIN_RANK_TOOLTIP),
                io.Combo.Input("layers", options=LayerPreset, default=LayerPreset.ALL,
                               tooltip="attention: attention only. attn_mlp: attention + feed-forward + projections "
                                       "(kohya's default). all: also ResNet convs, samplers, embeddings (LoCon)."),
                io.Combo.Input("text_encoders", options=TextEncoderMode, default=TextEncoderMode.AUTO,
                               tooltip="auto: only encoders that really differ from the base. all: always. none: UNet only."),
                io.Combo.Input("method", options=SvdMethod, default=SvdMethod.EXACT,
                               tooltip="exact: exact leading singular vectors. fast: randomized SVD, verified; "
                                       "faster on large layers."),
                io.Float.Input("clamp_quantile", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Clamp the factors at this quantile of their absolute values (kohya uses "
                                       "0.99). 0 = off, the exact optimum."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the randomized parts (fast method, clamp sampling); same seed, same file."),
                io.Combo.Input("budget_weighting", options=Weighting, default=Weighting.RELATIVE, optional=True,
                               tooltip=BUDGET_WEIGHTING_TOOLTIP),
                io.Boolean.Input("full_diff", default=False, optional=True, tooltip=FULL_DIFF_TOOLTIP),
            ],
            outputs=[
                LoraSocket.Output(display_name="lora", is_output_list=True,
                                  tooltip="One LoRA per rule (a list: downstream nodes run once per LoRA)."),
                io.String.Output(display_name="report", is_output_list=True,
                                 tooltip="Per-layer table (rank, energy kept, error vs optimum, size) per LoRA."),
                io.Image.Output(display_name="spectrum", is_output_list=True,
                                tooltip="Singular-value spectra of representative layers, with the chosen ranks."),
                io.String.Output(display_name="label", is_output_list=True,
                                 tooltip="A short label per LoRA (\"rank 16\", \"sv_fro 0.9\") for grids and file names."),
            ],
        )

    @classmethod
    def validate_inputs(cls, rules: str | None = None) -> bool | str:
        return _validate_rules(rules)

    @classmethod
    def execute(cls, pair: ModelPair, rules: str, max_rank: int, conv_rank: int, te_rank: int, min_rank: int,
                layers: str, text_encoders: str, method: str, clamp_quantile: float, seed: int,
                budget_weighting: str = Weighting.RELATIVE.value, full_diff: bool = False) -> io.NodeOutput:
        policies = parse_policies(rules, max_rank=max_rank, conv_rank=conv_rank, te_rank=te_rank, min_rank=min_rank)
        selectors = rank_selectors(policies, weighting=budget_weighting, full_diff=full_diff)
        labels = sweep_labels(policies)
        device = glue.compute_device()
        workers, threads = layer_parallelism(device)
        options = ExtractOptions(
            policy=policies[0],
            preset=LayerPreset(layers),
            text_encoders=TextEncoderMode(text_encoders),
            method=SvdMethod(method),
            clamp_quantile=float(clamp_quantile) if clamp_quantile > 0 else None,
            device=device,
            key_style=pair.key_style,
            seed=int(seed),
            exact_parts=getattr(pair, "exact_parts", False),
            workers=workers,
            threads=threads,
        )
        results = extract_sweep_detailed(pair.base, pair.tuned, selectors, options, progress=glue.progress_bar())
        loras = [r.lora for r in results]
        reports = [r.report.to_table() for r in results]
        images = [_spectrum_image(r, label) for r, label in zip(results, labels)]
        summary = "\n\n".join(f"[{label}]\n{r.report.summary()}" for label, r in zip(labels, results))
        return io.NodeOutput(loras, reports, images, labels, ui=ui.PreviewText(summary))


class RankwiseResizeLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RankwiseResizeLoRA",
            display_name="Resize LoRA",
            category=CATEGORY,
            description=(
                "Change a LoRA's rank exactly: each layer is re-factorised from its own factors, so the "
                "result is the best LoRA of the new rank. Several rules give several LoRAs."
            ),
            inputs=[
                LoraSocket.Input("lora", tooltip="The LoRA to resize (any format Load LoRA reads)."),
                io.String.Input("rules", default="16", tooltip=RULES_TOOLTIP),
                io.Int.Input("max_rank", default=128, min=0, max=4096, tooltip=MAX_RANK_TOOLTIP),
                io.Int.Input("conv_rank", default=0, min=0, max=4096, tooltip=CONV_RANK_TOOLTIP),
                io.Int.Input("te_rank", default=0, min=0, max=4096, tooltip=TE_RANK_TOOLTIP),
                io.Int.Input("min_rank", default=1, min=1, max=4096, tooltip=MIN_RANK_TOOLTIP),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiply the LoRA's effect by this, folded into the weights (not 0)."),
                io.Boolean.Input("full_diff", default=False, optional=True, tooltip=FULL_DIFF_TOOLTIP
                                 + " (A LoRA has no base model, so a budget here weighs layers by absolute ‖ΔW‖².)"),
            ],
            outputs=[
                LoraSocket.Output(display_name="lora", is_output_list=True, tooltip="One resized LoRA per rule."),
                io.String.Output(display_name="report", is_output_list=True,
                                 tooltip="Per-layer table: old and new rank, energy kept, size."),
                io.String.Output(display_name="label", is_output_list=True,
                                 tooltip="A short label per LoRA (\"rank 16\", \"sv_fro 0.9\")."),
            ],
        )

    @classmethod
    def validate_inputs(cls, rules: str | None = None) -> bool | str:
        return _validate_rules(rules)

    @classmethod
    def execute(cls, lora: Lora, rules: str, max_rank: int, conv_rank: int, te_rank: int, min_rank: int,
                strength: float, full_diff: bool = False) -> io.NodeOutput:
        policies = parse_policies(rules, max_rank=max_rank, conv_rank=conv_rank, te_rank=te_rank, min_rank=min_rank)
        labels = sweep_labels(policies)
        # no base model: a budget's weights are absolute (core falls back to them; the CLI's flag is moot here)
        selectors = rank_selectors(policies, weighting=Weighting.ABSOLUTE, full_diff=full_diff)
        # one pass: every layer is re-factorised once and each rule picks its rank from that spectrum
        results = resize_sweep(lora, selectors, strength=float(strength), progress=glue.progress_bar(),
                               workers=layer_parallelism("cpu")[0])
        loras = [out for out, _ in results]
        reports = [rep.to_table() for _, rep in results]
        summaries = [f"[{label}]\n{rep.summary()}" for label, (_, rep) in zip(labels, results)]
        return io.NodeOutput(loras, reports, labels, ui=ui.PreviewText("\n\n".join(summaries)))


class RankwiseMergeLoRAs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        ratio_tip = "Weight of this LoRA in the sum; negative subtracts it (1 and -1 give the difference A − B)."
        return io.Schema(
            node_id="RankwiseMergeLoRAs",
            display_name="Merge LoRAs",
            category=CATEGORY,
            description=(
                "Add LoRAs with signed ratios, exactly: concat keeps every rank (the file grows), svd "
                "re-compresses the exact sum to a rank rule. Optional per-block weights and layer filters."
            ),
            inputs=[
                LoraSocket.Input("lora_1", tooltip="First LoRA."),
                io.Float.Input("ratio_1", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip=ratio_tip),
                LoraSocket.Input("lora_2", tooltip="Second LoRA."),
                io.Float.Input("ratio_2", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip=ratio_tip),
                LoraSocket.Input("lora_3", optional=True, tooltip="Optional third LoRA."),
                io.Float.Input("ratio_3", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip=ratio_tip + " Used only when lora_3 is connected."),
                LoraSocket.Input("lora_4", optional=True, tooltip="Optional fourth LoRA."),
                io.Float.Input("ratio_4", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip=ratio_tip + " Used only when lora_4 is connected."),
                io.Combo.Input("mode", options=MergeMode, default=MergeMode.CONCAT,
                               tooltip="concat: exact, ranks add up. svd: exact sum re-compressed to the rank rule."),
                io.String.Input("rules", default="64",
                                tooltip="Rank rule(s) for svd mode (\"64\", \"sv_fro:0.95\"); a comma list gives one "
                                        "merged LoRA per rule from one pass. Unused by concat."),
                io.Int.Input("conv_rank", default=0, min=0, max=4096,
                             tooltip="svd mode: rank (or limit) of 3×3 conv layers. 0 = same as the rule."),
                io.String.Input("block_weights", default="", multiline=False,
                                tooltip="Optional per-block multipliers, LoRA Block Weight style: 17/26 numbers "
                                        "(SD1/2) or 12/20/26 (SDXL), or NAME:value pairs such as "
                                        "\"BASE:0, IN04:0.5, M00:1\". Empty = all 1."),
                io.String.Input("filters", default="",
                                tooltip="Optional layer filters on kohya names, comma separated: a pattern keeps "
                                        "matching layers, !pattern drops them (\"lora_unet_*, !*ff_net*\"). "
                                        "Plain words match anywhere. Empty = all layers."),
                io.Boolean.Input("full_diff", default=False, optional=True,
                                 tooltip="svd mode only (unused by concat). " + FULL_DIFF_TOOLTIP
                                 + " (LoRAs have no base model, so a budget here weighs layers by absolute ‖ΔW‖².)"),
            ],
            outputs=[
                LoraSocket.Output(display_name="lora", is_output_list=True,
                                  tooltip="The merged LoRA (svd mode: one per rule)."),
                io.String.Output(display_name="report", is_output_list=True,
                                 tooltip="Per-layer table and notes (partial layers, cancellations)."),
                io.String.Output(display_name="label", is_output_list=True,
                                 tooltip="A short label per LoRA (\"concat\", \"rank 64\", \"sv_fro 0.95\")."),
            ],
        )

    @classmethod
    def validate_inputs(cls, mode: str | None = None, rules: str | None = None, filters: str | None = None) -> bool | str:
        if mode is not None and mode not in [m.value for m in MergeMode]:
            return f"mode must be one of {[m.value for m in MergeMode]}, got {mode!r}"
        if mode == MergeMode.SVD.value and rules is not None:
            problem = widget_problem(parse_policies, rules)
            if problem:
                return problem
        if filters is not None:
            return widget_problem(parse_filters, filters) or True
        return True

    @classmethod
    def execute(cls, lora_1: Lora, ratio_1: float, lora_2: Lora, ratio_2: float, mode: str, rules: str,
                conv_rank: int, block_weights: str, filters: str, lora_3: Lora | None = None,
                ratio_3: float = 1.0, lora_4: Lora | None = None, ratio_4: float = 1.0,
                full_diff: bool = False) -> io.NodeOutput:
        slots = merge_ratios([(lora_1, ratio_1), (lora_2, ratio_2), (lora_3, ratio_3), (lora_4, ratio_4)])
        weights = None
        if str(block_weights).strip():
            arch = next((lo.arch for _, lo, _ in slots if lo.arch is not None), None)
            if arch is None:
                arch = detect_lora_arch([n for _, lo, _ in slots for n in lo.layers])
            if arch is None:
                raise RankwiseError("block_weights need to know the model family, but no input LoRA's architecture "
                                    "is known; clear block_weights or use LoRAs for SD1/SD2/SDXL")
            weights = parse_block_weights(block_weights, arch)
        inputs = [MergeInput(lora=lo, ratio=r, name=f"lora_{i}", block_weights=weights) for i, lo, r in slots]
        merge_mode = MergeMode(mode)
        policies = parse_policies(rules, conv_rank=conv_rank) if merge_mode is MergeMode.SVD else []
        labels = sweep_labels(policies) if policies else ["concat"]
        include, exclude = parse_filters(filters)
        selectors = rank_selectors(policies, weighting=Weighting.ABSOLUTE, full_diff=full_diff)  # no base model
        results = merge_sweep(inputs, selectors, mode=merge_mode, progress=glue.progress_bar(),
                              layer_filter=LayerFilter(include, exclude), workers=layer_parallelism("cpu")[0])
        summary = "\n\n".join(f"[{label}]\n{rep.summary()}" for label, (_, rep) in zip(labels, results))
        return io.NodeOutput([out for out, _ in results], [rep.to_table() for _, rep in results], labels,
                             ui=ui.PreviewText(summary))


class RankwiseLoRAInfo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RankwiseLoRAInfo",
            display_name="LoRA Info",
            category=CATEGORY,
            description=(
                "Per-layer statistics of a LoRA: rank, strength (‖ΔW‖), size, and the rank that keeps 99% "
                "of each layer's energy (how far it could be resized), plus a spectrum picture."
            ),
            inputs=[LoraSocket.Input("lora", tooltip="Any LoRA (loaded, extracted, resized or merged).")],
            outputs=[
                io.String.Output(display_name="report", tooltip="Per-layer table with totals and the rank/alpha/base-model metadata."),
                io.Image.Output(display_name="spectrum", tooltip="Singular-value spectra of representative layers."),
            ],
        )

    @classmethod
    def execute(cls, lora: Lora) -> io.NodeOutput:
        from ..core.info import lora_info

        rep, image = lora_info(lora, spectrum=True, progress=glue.progress_bar())
        text = rep.to_table()
        img = pil_to_image(image if image is not None else placeholder_image("no spectrum"))
        return io.NodeOutput(text, img, ui=ui.PreviewText(rep.summary()))


NODES = [RankwiseExtractLoRA, RankwiseResizeLoRA, RankwiseMergeLoRAs, RankwiseLoRAInfo]

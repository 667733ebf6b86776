"""Labelled Image Grid: a rank sweep's sample images side by side with their labels."""

from __future__ import annotations

from comfy_api.latest import io

from .sockets import CATEGORY
from .widgets import expand_labels, image_to_pils, pil_to_image, render_grid


class RankwiseImageGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RankwiseImageGrid",
            display_name="Labelled Image Grid",
            category=CATEGORY,
            description=(
                "Collect a list of images (one run per sweep item) into one grid with a label over each "
                "image, e.g. samples of rank 8 / 16 / 32 side by side."
            ),
            inputs=[
                io.Image.Input("images", tooltip="The images (a list, or batches; every image becomes a cell)."),
                io.String.Input("labels", default="", multiline=True,
                                tooltip="Labels: connect Extract/Resize LoRA's label output, or type one per line."),
                io.Int.Input("columns", default=0, min=0, max=64, tooltip="Cells per row; 0 = about square."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The grid as one image.")],
            is_input_list=True,
        )

    @classmethod
    def execute(cls, images: list, labels: list, columns: list) -> io.NodeOutput:
        texts = [str(x) for x in labels]
        if len(texts) == 1 and "\n" in texts[0]:
            texts = texts[0].splitlines()
        pils = [p for batch in images for p in image_to_pils(batch)]
        sizes = [int(batch.shape[0]) if batch.dim() == 4 else 1 for batch in images]
        cells = expand_labels(texts, sizes)
        grid = render_grid(pils, cells, columns=int(columns[0]) if columns else 0)
        return io.NodeOutput(pil_to_image(grid))


NODES = [RankwiseImageGrid]

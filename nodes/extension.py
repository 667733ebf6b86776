"""The ComfyUI extension object: the node list of the pack (loaded lazily by ``comfy_entrypoint``)."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import file_nodes, image_nodes, lora_nodes, model_nodes, pair_nodes


class RankwiseExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [
            *pair_nodes.NODES,
            *lora_nodes.NODES,
            *file_nodes.NODES,
            *model_nodes.NODES,
            *image_nodes.NODES,
        ]

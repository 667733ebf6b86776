"""Rankwise: LoRA extraction, resize and merge for ComfyUI.

ComfyUI imports this package from ``custom_nodes/<folder>`` and calls :func:`comfy_entrypoint`.
Nothing ComfyUI-specific is imported until then, so ``rankwise.core`` works without ComfyUI
(command line, tests).
"""

__version__ = "0.1.0"

WEB_DIRECTORY = "./web"  # web/docs/<NodeId>.md: the help page of each node


async def comfy_entrypoint():
    from .nodes.extension import RankwiseExtension

    return RankwiseExtension()

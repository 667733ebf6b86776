"""The pack's socket types. Sockets connect by type string alone, so ours are namespaced."""

from __future__ import annotations

from comfy_api.latest import io

LoraSocket = io.Custom("RANKWISE_LORA")
"""A :class:`core.types.Lora` (kohya-named layers, metadata, architecture) travelling between nodes."""

PairSocket = io.Custom("RANKWISE_PAIR")
"""A :class:`nodes.pair.ModelPair`: base and tuned weights, streamed, checked to be a pair."""

CATEGORY = "Rankwise"

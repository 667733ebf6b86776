"""Full original-format checkpoint layouts (every key, shape and dtype) shipped as package data.

The key tables in :mod:`.archs` list only the LoRA-targetable layers. A checkpoint that a real
loader (ComfyUI, A1111, diffusers' single-file loader) accepts also needs norms, biases,
embeddings and the VAE. ``core/data/<name>_layout.json`` holds ``{key: [shape, dtype]}`` for
each supported architecture, taken from real checkpoints. :func:`extra_layout` is the part a
synthetic checkpoint writer must fill besides the table layers.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from types import MappingProxyType
from typing import Mapping

from .archs import key_table
from .errors import FormatError
from .types import Arch

Layout = Mapping[str, tuple[tuple[int, ...], str]]

_FILES: Mapping[Arch, str] = MappingProxyType({
    Arch.SD1: "sd15_layout.json",
    Arch.SD2: "sd21_layout.json",
    Arch.SDXL: "sdxl_layout.json",
})


@functools.lru_cache(maxsize=None)
def _load(arch: Arch) -> Layout:
    name = _FILES[arch]
    try:
        raw = json.loads(resources.files(__package__).joinpath("data", name).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FormatError(f"cannot read the {arch.value} layout data file core/data/{name}: {e}") from e
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for key, value in raw.items():
        try:
            shape, dtype = value
            out[key] = (tuple(int(s) for s in shape), str(dtype))
        except (TypeError, ValueError) as e:
            raise FormatError(f"core/data/{name}: entry {key!r} is not [shape, dtype]: {value!r}") from e
    return MappingProxyType(out)


def load_layout(arch: Arch) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every key of a full original-format checkpoint of ``arch``: ``key → (shape, dtype name)``.

    Dtype names are torch names (``"float16"``, ``"int64"``). Returns a fresh dict.
    """
    return dict(_load(Arch(arch)))


def extra_layout(arch: Arch) -> dict[str, tuple[tuple[int, ...], str]]:
    """The layout minus the source keys of the full key table (what ``write_checkpoint_pair`` fills)."""
    arch = Arch(arch)
    table_keys = frozenset(key_table(arch, "full").checkpoint_keys())
    return {k: v for k, v in _load(arch).items() if k not in table_keys}

"""Per-block weights in the LoRA Block Weight (LBW) vocabulary.

Block labels are those of :attr:`archs.LayerSpec.block`: ``BASE`` (text encoders only), ``IN00``…,
``M00``, ``OUT00``…. UNet layers outside the numbered blocks follow the block-merge convention:
the time/label embeddings go with ``conv_in`` in ``IN00``, ``conv_out`` in the last output block
(``OUT11``; SDXL ``OUT08``). Two text forms are accepted (:func:`parse_block_weights`):

* **positional**, as in hako-mikan's sd-webui-lora-block-weight: a comma-separated list whose
  length names the layout

  ====  ======  ==========================================================================
  n     arch    blocks, in order
  ====  ======  ==========================================================================
  17    SD1/2   BASE IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03 … OUT11 (the attention blocks)
  26    any     BASE IN00 … IN11 M00 OUT00 … OUT11
  12    SDXL    BASE IN04 IN05 IN07 IN08 M00 OUT00 … OUT05 (the attention blocks)
  20    SDXL    BASE IN00 … IN08 M00 OUT00 … OUT08
  60    Flux    BASE IN00 D00 … D18 S00 … S37 OUT00 (embedders, double, single blocks, final layer)
  27    SD3     BASE IN00 J00 … J23 OUT00 (SD3 / SD3.5 medium joint blocks); 41: SD3.5 large (J00 … J37)
  ====  ======  ==========================================================================

  The layouts are the ``blocks`` of each architecture record (``core/data/archs``). Like LBW (its ``to26``), the blocks a short form leaves out get weight **0**. In a plain
  (attention-only) LoRA those blocks hold no layers; in a LoCon they hold the conv-only
  ResNet/sampler layers, which are therefore dropped, exactly as LBW does.
* **named**: ``"BASE:1, IN04:0.5, OUT01=0"`` (``:`` or ``=``, comma/semicolon/newline separated,
  case-insensitive, ``MID`` is an alias of ``M00``). Blocks not named keep weight 1.

The result is a plain ``dict`` block → multiplier; layers whose block is absent from it are
multiplied by 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from .types import Arch

BLOCKS_26: tuple[str, ...] = (
    ("BASE",) + tuple(f"IN{i:02d}" for i in range(12)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(12))
)
BLOCKS_17: tuple[str, ...] = (
    ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00") + tuple(f"OUT{i:02d}" for i in range(3, 12))
)
BLOCKS_12: tuple[str, ...] = (
    ("BASE", "IN04", "IN05", "IN07", "IN08", "M00") + tuple(f"OUT{i:02d}" for i in range(6))
)
BLOCKS_20: tuple[str, ...] = (
    ("BASE",) + tuple(f"IN{i:02d}" for i in range(9)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(9))
)

def _layouts(arch: Arch) -> Mapping[int, tuple[str, ...]]:
    """Positional block layouts of ``arch``, from its record (count → labels in order)."""
    from .archs import record

    return record(arch).blocks


class _Layouts(Mapping):
    """``_LAYOUTS[arch]``: kept as a mapping view over the records for existing callers."""

    def __getitem__(self, arch):
        return _layouts(Arch(arch))

    def __iter__(self):
        return iter(Arch)

    def __len__(self) -> int:
        return len(Arch)


_LAYOUTS: Mapping[Arch, Mapping[int, tuple[str, ...]]] = _Layouts()

_ALIASES: Mapping[str, str] = {"MID": "M00", "M0": "M00", "MIDDLE": "M00"}


def block_labels(arch: Arch) -> tuple[str, ...]:
    """Every block label a weight may name for ``arch`` (the widest positional layout)."""
    layouts = _LAYOUTS[Arch(arch)]
    return layouts[max(layouts)]


def _forms(arch: Arch) -> str:
    counts = " or ".join(str(n) for n in sorted(_LAYOUTS[Arch(arch)]))
    return (
        f"{counts} comma-separated numbers (LoRA Block Weight order, e.g. "
        f"{','.join(['1'] * min(_LAYOUTS[Arch(arch)]))}), or NAME:value pairs such as "
        f"'BASE:0, IN04:0.5, M00:1' (names: {', '.join(block_labels(arch))}; MID = M00)"
    )


def _number(text: str, where: str, arch: Arch) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"block weight {where}: {text!r} is not a number; use {_forms(arch)}") from None
    if not math.isfinite(value):
        raise ValueError(f"block weight {where} must be finite, got {text!r}")
    return value


def parse_block_weights(text: str, arch: Arch) -> dict[str, float]:
    """Parse per-block multipliers for ``arch`` (see the module docstring for the forms).

    Args:
        text: positional LBW list (12/17/20/26 values) or ``NAME:value`` pairs.
        arch: the architecture of the LoRAs the weights will apply to.

    Returns:
        block label → multiplier. Positional forms list every block of the 26-block layout (the
        ones the short form omits set to 0, as LBW does); named forms list only the named blocks.

    Raises:
        ValueError: empty text, a wrong count, an unknown block name or a non-number, with the
            accepted forms in the message.
    """
    arch = Arch(arch)
    s = str(text).strip()
    if not s:
        raise ValueError(f"empty block weights; use {_forms(arch)}")
    parts = [p.strip() for p in re.split(r"[,;\n]", s) if p.strip()]
    if any(":" in p or "=" in p for p in parts):
        valid = set(block_labels(arch))
        out: dict[str, float] = {}
        for p in parts:
            m = re.fullmatch(r"([^:=]+)[:=](.*)", p)
            if m is None:
                raise ValueError(f"block weight {p!r} is not NAME:value; use {_forms(arch)}")
            name, value = m.group(1), m.group(2)
            label = name.strip().upper()
            label = _ALIASES.get(label, label)
            if label not in valid:
                raise ValueError(f"unknown block {name.strip()!r} for {arch.value}; use {_forms(arch)}")
            if label in out:
                raise ValueError(f"block {label} is given twice in {text!r}")
            out[label] = _number(value.strip(), label, arch)
        return out
    layout = _LAYOUTS[arch].get(len(parts))
    if layout is None:
        raise ValueError(f"{len(parts)} block weights given for {arch.value}; use {_forms(arch)}")
    weights = {label: 0.0 for label in block_labels(arch)}
    for label, value in zip(layout, parts):
        weights[label] = _number(value, label, arch)
    return weights


def block_weight(weights: Mapping[str, float] | None, block: str | None) -> float:
    """The multiplier of one layer: ``weights[block]``, 1 when not given."""
    if not weights or block is None:
        return 1.0
    return float(weights.get(block, 1.0))

"""Widget values → core types, parsed once. No ComfyUI import: unit-tested without ComfyUI.

Every node widget that needs interpretation goes through one function here, so the nodes stay
thin (parse → call core → wrap) and the parsing rules are tested in ``tests/test_node_logic.py``.
Conventions shared by the widgets:

* rank-like integers use ``0`` for "not set" (``max_rank`` 0 = no cap, ``conv_rank``/``te_rank``
  0 = same as the linear rank);
* a rules string is the core vocabulary (:func:`core.rank.parse_rules`): ``"32"``,
  ``"8,16,32"``, ``"sv_fro:0.8; sv_fro:0.9"``; several rules make a sweep, one output per rule;
* labels (``"rank 16"``, ``"sv_fro 0.9"``) name sweep items in grids and file names.
"""

from __future__ import annotations

import enum
import math
import os
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..core.archs import is_text_encoder
from ..core.budget import BudgetOptions, Weighting, budget_selectors
from ..core.errors import RankwiseError, UnsafePathError
from ..core.rank import RankPolicy, RankRule, parse_rules

DEFAULT_PREFIX = "rankwise/lora"
"""Default ``filename_prefix`` of the Save LoRA node (a subfolder of ``models/loras``)."""

LORA_EXTENSIONS = (".safetensors", ".sft")

# ---------------------------------------------------------------------------------------------
# Combo vocabularies (the option strings are stored in workflows: never rename them)
# ---------------------------------------------------------------------------------------------


class SaveDtype(str, enum.Enum):
    """Tensor dtype of a saved LoRA."""

    FP16 = "fp16"
    BF16 = "bf16"
    FP32 = "fp32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self]


_DTYPES: Mapping[SaveDtype, torch.dtype] = {
    SaveDtype.FP16: torch.float16,
    SaveDtype.BF16: torch.bfloat16,
    SaveDtype.FP32: torch.float32,
}


def dtype_from_name(name: str) -> torch.dtype:
    """``"fp16"`` / ``"bf16"`` / ``"fp32"`` → the torch dtype (ValueError names the choices)."""
    try:
        return SaveDtype(str(name).strip().lower()).torch_dtype
    except ValueError:
        choices = ", ".join(d.value for d in SaveDtype)
        raise RankwiseError(f"unknown dtype {name!r}; use one of: {choices}") from None


class CleanMode(str, enum.Enum):
    """What the Clean CLIP node does with the text encoders of a pair."""

    REPORT = "report only"
    REPLACE_DIFFERING = "replace differing encoders with base"
    REPLACE_ALL = "replace all encoders with base"


class SaveNaming(str, enum.Enum):
    """Module names of a saved LoRA file (``formats.lora_items``); which ones an architecture allows
    is in its record (``naming_styles``)."""

    AUTO = "auto"  # the record's default: kohya (SD1/SD2/SDXL/Flux), diffusers (SD3)
    KOHYA = "kohya"  # lora_unet_… + .alpha: ComfyUI, Forge, A1111, kohya, diffusers (SD1/SDXL/Flux)
    COMFY = "comfyui"  # diffusion_model.… (ComfyUI's own extractor)
    DIFFUSERS = "diffusers"  # transformer.…lora_A/B (SD3/Flux; diffusers and ComfyUI)

    @property
    def style(self) -> str:
        return "comfy" if self is SaveNaming.COMFY else self.value


class LoraModelKeys(str, enum.Enum):
    """Key names of a LORA_MODEL state dict made from a Rankwise LoRA."""

    COMFY = "comfyui"  # diffusion_model.<sgm key>.lora_up.weight (what ComfyUI's trainer writes)
    KOHYA = "kohya"  # lora_unet_… (portable to A1111 / diffusers)


# ---------------------------------------------------------------------------------------------
# Rank rules
# ---------------------------------------------------------------------------------------------


def optional_rank(value: int | float | None, name: str) -> int | None:
    """A rank widget: ``0`` (or None) → None ("not set"), a positive whole number → itself."""
    if value is None:
        return None
    v = float(value)
    if not math.isfinite(v) or v < 0 or v != int(v):
        raise RankwiseError(f"{name} must be a whole number ≥ 0 (0 = not set), got {value!r}")
    return int(v) or None


def parse_policies(
    rules: str,
    *,
    max_rank: int = 0,
    conv_rank: int = 0,
    te_rank: int = 0,
    min_rank: int = 1,
) -> list[RankPolicy]:
    """The rules string and the limit widgets → one :class:`RankPolicy` per distinct rule, in order.

    Raises:
        RankwiseError: an unparsable rule or limit; the message quotes the widget text and lists the
            accepted forms.
    """
    try:
        parsed = parse_rules(rules)
    except ValueError as e:
        raise RankwiseError(
            f"rank rules {str(rules)!r}: {e}. Write a rank (\"32\"), a comma list for a sweep "
            f"(\"8,16,32\") or dynamic rules such as \"sv_fro:0.9\", \"sv_ratio:20\", "
            f"\"sv_cumulative:0.9\", \"threshold:0.01\", \"sv_knee\", or a file-size budget \"size:160MB\""
        ) from None
    unique = list(dict.fromkeys(parsed))
    floor = optional_rank(min_rank, "min_rank") or 1
    try:
        return [
            RankPolicy(
                rule=rule,
                max_rank=optional_rank(max_rank, "max_rank"),
                conv_rank=optional_rank(conv_rank, "conv_rank"),
                te_rank=optional_rank(te_rank, "te_rank"),
                min_rank=floor,
            )
            for rule in unique
        ]
    except ValueError as e:
        if isinstance(e, RankwiseError):
            raise
        raise RankwiseError(str(e)) from None


def single_policy(rules: str, **limits: int) -> RankPolicy:
    """Like :func:`parse_policies` for nodes that take exactly one rule (SVD merge)."""
    policies = parse_policies(rules, **limits)
    if len(policies) != 1:
        raise RankwiseError(
            f"rank rules {rules!r} name {len(policies)} rules; this node takes one (sweeps: Extract LoRA, "
            f"Resize LoRA, Merge LoRAs in svd mode)"
        )
    return policies[0]


def budget_weighting(value: str | Weighting) -> Weighting:
    """The ``budget_weighting`` combo → :class:`core.budget.Weighting` (``"relative"`` / ``"absolute"``)."""
    try:
        return Weighting(str(getattr(value, "value", value)).strip().lower())
    except ValueError:
        choices = ", ".join(x.value for x in Weighting)
        raise RankwiseError(f"budget_weighting {value!r} is not one of: {choices}") from None


def rank_selectors(
    policies: Sequence[RankPolicy],
    *,
    weighting: str | Weighting = Weighting.RELATIVE,
    full_diff: bool = False,
) -> list:
    """Policies + the budget widgets → what core's sweeps take (as the CLI's ``--budget-weighting`` /
    ``--full-diff``): a ``size:``/``params:`` rule becomes a :class:`core.budget.BudgetSelector`
    with these options, every other rule stays a :class:`RankPolicy` (the widgets do nothing to it).
    The save dtype is not known in a graph (Save LoRA picks it), so the budget is sized for any
    16-bit dtype, as before. ``relative`` needs a base model: with none (resize, merge) core weighs
    every layer 1, i.e. ``absolute``."""
    options = BudgetOptions(weighting=budget_weighting(weighting), full_diff=bool(full_diff))
    return budget_selectors(list(policies), options)


def widget_problem(parse, *args, **kwargs) -> str | None:
    """Run a widget parser for ``validate_inputs``: None when it accepts the value, else the message."""
    try:
        parse(*args, **kwargs)
    except RankwiseError as e:
        return str(e)
    return None


def rule_label(rule: RankRule) -> str:
    """A short human label: ``"rank 16"`` for fixed rules, ``"sv_fro 0.9"`` otherwise."""
    if rule.is_fixed:
        return f"rank {int(rule.value)}"
    if rule.is_global or rule.kind.value == "sv_knee":  # "size:160MB", "params:20M", "sv_knee"
        return str(rule).replace(":", " ")
    return f"{rule.kind.value} {float(rule.value):g}"


def sweep_labels(policies: Sequence[RankPolicy]) -> list[str]:
    """One label per policy (rules are distinct after :func:`parse_policies`)."""
    return [rule_label(p.rule) for p in policies]


def label_token(label: str) -> str:
    """A label as a file-name token: ``"rank 16"`` → ``"rank16"``, ``"sv_fro 0.9"`` → ``"sv_fro0.9"``."""
    token = re.sub(r"\s+", "", str(label).strip())
    token = re.sub(r"[^A-Za-z0-9._+-]", "_", token)
    return token.strip("._")


# ---------------------------------------------------------------------------------------------
# File names
# ---------------------------------------------------------------------------------------------

_BAD_CHARS = re.compile(r'[<>:"|?*\x00-\x1f]')


def sanitize_prefix(prefix: str, default: str = DEFAULT_PREFIX) -> str:
    """A ``filename_prefix`` made safe to join under the loras folder.

    Backslashes become ``/``, characters Windows forbids become ``_``, a trailing ``.safetensors``
    is dropped, empty parts and ``.`` are removed; an empty prefix gives ``default``. ComfyUI's
    ``%year%``-style tokens are kept (``folder_paths.get_save_image_path`` expands them).

    Raises:
        UnsafePathError: an absolute path, a drive letter or a ``..`` part (the file must stay
            inside the loras folder).
    """
    text = str(prefix or "").strip().replace("\\", "/")
    if not text:
        text = default
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        raise UnsafePathError(
            f"filename_prefix {prefix!r} is an absolute path; give a path relative to models/loras "
            f"such as {default!r}"
        )
    for ext in LORA_EXTENSIONS:
        if text.lower().endswith(ext):
            text = text[: -len(ext)]
    parts = [p.strip() for p in text.split("/")]
    if any(p == ".." for p in parts):
        raise UnsafePathError(f"filename_prefix {prefix!r} leaves the loras folder ('..'); remove the '..' parts")
    parts = [_BAD_CHARS.sub("_", p).rstrip(". ") for p in parts if p not in ("", ".")]
    parts = [p for p in parts if p]
    if not parts:
        return default
    return "/".join(parts)


def prefix_with_suffix(prefix: str, suffix: str) -> str:
    """``"rankwise/lora"`` + ``"rank 16"`` → ``"rankwise/lora_rank16"`` (no suffix: unchanged)."""
    token = label_token(suffix)
    return f"{prefix}_{token}" if token else prefix


def counter_file_name(filename: str, counter: int) -> str:
    """ComfyUI's counter naming: ``lora_00001_.safetensors``."""
    return f"{filename}_{int(counter):05}_.safetensors"


def relative_lora_name(subfolder: str, file_name: str) -> str:
    """The name LoraLoader lists for a file in ``subfolder`` of the loras folder."""
    return os.path.join(subfolder, file_name) if subfolder else file_name


# ---------------------------------------------------------------------------------------------
# Merge widgets
# ---------------------------------------------------------------------------------------------


def parse_filters(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Layer filters → ``(include, exclude)`` patterns on kohya layer names.

    Patterns are separated by commas, semicolons or new lines; a pattern starting with ``!`` or
    ``-`` excludes. Patterns are shell globs (``lora_unet_*attn2*``); a pattern without ``*?[``
    matches as a substring (``attn2`` = ``*attn2*``). Empty text: everything.
    """
    include: list[str] = []
    exclude: list[str] = []
    for raw in re.split(r"[,;\n]", str(text or "")):
        p = raw.strip()
        if not p:
            continue
        target = include
        if p[0] in "!-":
            target, p = exclude, p[1:].strip()
            if not p:
                raise RankwiseError(f"layer filter {raw.strip()!r} excludes nothing; write e.g. '!lora_te*'")
        target.append(p if any(c in p for c in "*?[") else f"*{p}*")
    return tuple(include), tuple(exclude)


def merge_ratios(pairs: Sequence[tuple[object | None, float]]) -> list[tuple[int, object, float]]:
    """(lora or None, ratio) slots → ``(slot number, lora, ratio)`` for the connected ones."""
    out = []
    for i, (lora, ratio) in enumerate(pairs, start=1):
        if lora is None:
            continue
        r = float(ratio)
        if not math.isfinite(r):
            raise RankwiseError(f"ratio_{i} must be a finite number, got {ratio!r}")
        out.append((i, lora, r))
    return out


# ---------------------------------------------------------------------------------------------
# Apply-LoRA coverage
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Coverage:
    """Which LoRA modules reached a model weight when applied.

    ``missing`` maps a module name to why it was not applied.
    """

    applied: tuple[str, ...]
    missing: Mapping[str, str]

    @property
    def total(self) -> int:
        return len(self.applied) + len(self.missing)

    def summary(self, limit: int = 12) -> str:
        text = f"applied {len(self.applied)} of {self.total} modules"
        if not self.missing:
            return text
        by_reason: dict[str, list[str]] = {}
        for name, why in self.missing.items():
            by_reason.setdefault(why, []).append(name)
        lines = [text + "; not applied:"]
        for why, names in by_reason.items():
            shown = ", ".join(names[:limit]) + (f", … (+{len(names) - limit} more)" if len(names) > limit else "")
            lines.append(f"- {len(names)} {why}: {shown}")
        return "\n".join(lines)


NO_TARGET = "with no matching weight in the model (wrong architecture?)"
NO_CLIP = "text-encoder modules (no CLIP connected)"
NOT_PATCHED = "mapped but not patched (key absent from the model)"


def apply_coverage(
    modules: Sequence[str],
    key_map: Mapping[str, object],
    patched: set,
    *,
    clip_connected: bool,
    is_text_encoder=is_text_encoder,
) -> Coverage:
    """Coverage of an application: ``key_map`` maps module names to model keys (ComfyUI's
    ``model_lora_keys_*``), ``patched`` holds the keys ``add_patches`` reported."""
    applied: list[str] = []
    missing: dict[str, str] = {}
    for name in modules:
        target = key_map.get(name)
        if target is None:
            missing[name] = NO_CLIP if (is_text_encoder(name) and not clip_connected) else NO_TARGET
        elif target in patched:
            applied.append(name)
        else:
            missing[name] = NOT_PATCHED
    return Coverage(tuple(applied), missing)


# ---------------------------------------------------------------------------------------------
# Images (ComfyUI IMAGE = float [B, H, W, C] in 0..1)
# ---------------------------------------------------------------------------------------------


def pil_to_image(img) -> torch.Tensor:
    """A Pillow image → IMAGE tensor ``[1, H, W, 3]`` float32 in 0..1."""
    import numpy as np

    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).unsqueeze(0)


def image_to_pils(images: torch.Tensor) -> list:
    """An IMAGE tensor ``[B, H, W, C]`` (or ``[H, W, C]``) → one RGB Pillow image per batch entry."""
    import numpy as np
    from PIL import Image

    t = images.detach().cpu().float()
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4:
        raise RankwiseError(f"expected an IMAGE tensor [B, H, W, C], got shape {list(images.shape)}")
    out = []
    for frame in t:
        c = frame.shape[-1]
        if c == 1:
            frame = frame.expand(-1, -1, 3)
        elif c == 4:
            frame = frame[..., :3]
        elif c != 3:
            raise RankwiseError(f"expected 1, 3 or 4 channels, got {c}")
        arr = (frame.clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
        out.append(Image.fromarray(arr, "RGB"))
    return out


def placeholder_image(text: str, size: tuple[int, int] = (256, 64)):
    """A small grey Pillow image with a line of text (an IMAGE output that has nothing to show)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (40, 40, 40))
    ImageDraw.Draw(img).text((8, size[1] // 2 - 6), text, fill=(220, 220, 220))
    return img


@dataclass(frozen=True)
class GridLayout:
    """Where each cell of a labelled grid goes. Cells are ``cell_w × (label_h + cell_h)``."""

    count: int
    columns: int
    rows: int
    cell_w: int
    cell_h: int
    label_h: int
    gap: int

    @property
    def width(self) -> int:
        return self.columns * self.cell_w + (self.columns + 1) * self.gap

    @property
    def height(self) -> int:
        return self.rows * (self.cell_h + self.label_h) + (self.rows + 1) * self.gap

    def origin(self, index: int) -> tuple[int, int]:
        """Top-left corner of cell ``index``'s label band (the image starts ``label_h`` below)."""
        if not 0 <= index < self.count:
            raise IndexError(f"cell {index} outside a grid of {self.count}")
        row, col = divmod(index, self.columns)
        x = self.gap + col * (self.cell_w + self.gap)
        y = self.gap + row * (self.cell_h + self.label_h + self.gap)
        return x, y


def grid_layout(count: int, cell_w: int, cell_h: int, *, columns: int = 0, label_h: int = 0, gap: int = 4) -> GridLayout:
    """Lay out ``count`` cells; ``columns`` 0 = automatic (⌈√count⌉, at most ``count``)."""
    if count < 1:
        raise RankwiseError("the image grid needs at least one image")
    if columns < 0:
        raise RankwiseError(f"columns must be ≥ 0 (0 = automatic), got {columns}")
    cols = columns or math.ceil(math.sqrt(count))
    cols = max(1, min(cols, count))
    rows = math.ceil(count / cols)
    return GridLayout(count, cols, rows, int(cell_w), int(cell_h), int(label_h), int(gap))


def expand_labels(labels: Sequence[str], batch_sizes: Sequence[int]) -> list[str]:
    """Labels for every image of a list of batches.

    One label per batch (a sweep's labels beside its images) is repeated for the batch's images
    (numbered when a batch holds several); one label per image is used as is; otherwise labels are
    used in order and missing ones are left empty.
    """
    total = sum(batch_sizes)
    labels = [str(x) for x in labels]
    if len(labels) == len(batch_sizes) and total != len(batch_sizes):
        out = []
        for label, n in zip(labels, batch_sizes):
            out.extend([label] if n == 1 else [f"{label} #{i + 1}" for i in range(n)])
        return out
    return (labels + [""] * total)[:total]


def render_grid(images: Sequence, labels: Sequence[str], *, columns: int = 0, font_size: int = 0):
    """Draw a labelled grid (Pillow). Images of different sizes are centred in the largest cell."""
    from PIL import Image, ImageDraw, ImageFont

    if not images:
        raise RankwiseError("the image grid needs at least one image")
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    size = font_size or max(12, min(48, cell_w // 16))
    font = _font(ImageFont, size)
    has_labels = any(str(x).strip() for x in labels)
    label_h = int(size * 1.6) if has_labels else 0
    layout = grid_layout(len(images), cell_w, cell_h, columns=columns, label_h=label_h)
    canvas = Image.new("RGB", (layout.width, layout.height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(images):
        x, y = layout.origin(i)
        if label_h:
            text = str(labels[i]) if i < len(labels) else ""
            tw = draw.textlength(text, font=font)
            draw.text((x + max(0, (cell_w - tw) / 2), y + (label_h - size) / 2), text, fill=(0, 0, 0), font=font)
        canvas.paste(im.convert("RGB"), (x + (cell_w - im.width) // 2, y + label_h + (cell_h - im.height) // 2))
    return canvas


def _font(image_font, size: int):
    try:
        return image_font.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return image_font.load_default()


__all__ = [
    "DEFAULT_PREFIX",
    "SaveDtype",
    "CleanMode",
    "LoraModelKeys",
    "Coverage",
    "GridLayout",
    "apply_coverage",
    "budget_weighting",
    "counter_file_name",
    "dtype_from_name",
    "expand_labels",
    "grid_layout",
    "image_to_pils",
    "label_token",
    "merge_ratios",
    "optional_rank",
    "parse_filters",
    "parse_policies",
    "pil_to_image",
    "placeholder_image",
    "prefix_with_suffix",
    "rank_selectors",
    "relative_lora_name",
    "render_grid",
    "rule_label",
    "sanitize_prefix",
    "single_policy",
    "sweep_labels",
    "widget_problem",
]

"""A picture of singular-value spectra, drawn with Pillow only.

Both panels share a log-scaled index axis (1 … the longest spectrum). Left panel: the normalised
singular values σᵢ/σ₁ of each layer on a log scale. Right panel: the
cumulative energy Σ_{j≤i} σⱼ² / ‖ΔW‖_F² (exact even for a partial spectrum, since ‖ΔW‖_F² is known).
A dashed vertical line in the layer's colour marks its chosen rank on both panels. Labels are ASCII
because Pillow's built-in font has no Greek glyphs.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from .rank import Spectrum
from .report import Report

PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)
_GRID = (226, 226, 226)
_AXIS = (60, 60, 60)
_TEXT = (20, 20, 20)
_MIN_DECADE = -7


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _log_ticks(hi: float) -> list[tuple[int, bool]]:
    """(tick, labelled) pairs for a log axis over [1, hi]: 1, 2, 5, 10, 20, 50, … (decades labelled)."""
    ticks: list[tuple[int, bool]] = []
    decade = 1
    while decade <= hi:
        for m in (1, 2, 5):
            if m * decade <= hi:
                ticks.append((m * decade, m == 1))
        decade *= 10
    return ticks


def short_name(name: str, limit: int = 44) -> str:
    """A compact label for a kohya layer name."""
    s = name
    for old, new in (("lora_unet_", "unet "), ("lora_te1_", "te1 "), ("lora_te2_", "te2 "), ("lora_te3_", "te3 "),
                     ("lora_te_", "te "), ("text_model_encoder_layers_", "L"), ("encoder_block_", "B"),
                     ("double_blocks_", "db"), ("single_blocks_", "sb"), ("joint_blocks_", "jb"),
                     ("context_block_", "ctx "), ("transformer_blocks_", "tb"),
                     ("input_blocks_", "in"), ("output_blocks_", "out"), ("middle_block_", "mid"),
                     ("down_blocks_", "down"), ("up_blocks_", "up"), ("attentions_", "att"), ("resnets_", "res")):
        s = s.replace(old, new)
    if len(s) > limit:
        keep = limit - 1
        s = s[: keep // 2] + "~" + s[-(keep - keep // 2):]
    return s


class _Panel:
    """A plot area with data → pixel transforms."""

    def __init__(self, box: tuple[int, int, int, int], x_max: float, y_lo: float, y_hi: float) -> None:
        self.x0, self.y0, self.x1, self.y1 = box
        self.x_max = max(x_max, 2.0)
        self.y_lo, self.y_hi = y_lo, y_hi

    def px(self, x: float) -> float:
        """Log-scaled index axis: 1 … x_max."""
        return self.x0 + math.log(max(x, 1.0)) / math.log(self.x_max) * (self.x1 - self.x0)

    def py(self, y: float) -> float:
        y = min(max(y, self.y_lo), self.y_hi)
        return self.y1 - (y - self.y_lo) / (self.y_hi - self.y_lo) * (self.y1 - self.y0)


def _dashed(draw: ImageDraw.ImageDraw, x: float, y0: float, y1: float, fill: tuple[int, int, int]) -> None:
    y = y0
    while y < y1:
        draw.line([(x, y), (x, min(y + 5, y1))], fill=fill, width=1)
        y += 9


def _curve(values: Sequence[float], panel: _Panel, transform) -> list[tuple[float, float]]:
    """Pixel points of a curve, thinned to about one point per pixel column."""
    n = len(values)
    points: list[tuple[float, float]] = []
    last_x = -1.0
    for i in range(n):
        x = panel.px(i + 1)
        if x - last_x >= 0.5 or i == n - 1:
            points.append((x, panel.py(transform(values[i]))))
            last_x = x
    return points


def render_spectrum(
    spectra: Mapping[str, Spectrum],
    ranks: Mapping[str, int] | None = None,
    *,
    width: int = 768,
    height: int = 432,
    title: str = "Singular-value spectra",
) -> Image.Image:
    """Plot normalised singular values (log) and cumulative energy for a few layers.

    Args:
        spectra: layer name → spectrum (a handful of layers; colours repeat after 10).
        ranks: layer name → chosen rank, drawn as dashed markers.
        width, height: image size in pixels (at least 320 × 200).
    """
    width, height = max(int(width), 320), max(int(height), 200)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    small, normal = _font(11), _font(13)
    draw.text((10, 6), title, fill=_TEXT, font=normal)
    items = [(name, s) for name, s in spectra.items() if s.known > 0]
    if not items:
        draw.text((10, height // 2), "no spectrum to show (no layer was decomposed)", fill=_TEXT, font=normal)
        return img
    ranks = dict(ranks or {})

    legend_rows = math.ceil(len(items) / 2)
    legend_h = 16 * legend_rows + 8
    top, bottom = 30, height - legend_h - 24
    gap, left_margin, right_margin = 56, 48, 14
    panel_w = (width - left_margin - right_margin - gap) // 2
    x_max = max(s.known for _, s in items)
    if x_max < 2:
        x_max = 2

    normalised: list[list[float]] = []
    lowest = 0.0
    for _, s in items:
        v = s.values.double().cpu()
        s1 = float(v[0]) if float(v[0]) > 0 else 1.0
        logs = [math.log10(max(float(x) / s1, 10.0 ** (_MIN_DECADE - 1))) for x in v]
        normalised.append(logs)
        lowest = min(lowest, min(logs))
    y_lo = float(max(min(math.floor(lowest), -1), _MIN_DECADE))
    left = _Panel((left_margin, top + 14, left_margin + panel_w, bottom), x_max, y_lo, 0.0)
    right = _Panel((left.x1 + gap, top + 14, left.x1 + gap + panel_w, bottom), x_max, 0.0, 1.0)

    # Frames, grids, ticks.
    draw.text((left.x0, top - 2), "singular value / largest (log10)", fill=_TEXT, font=small)
    draw.text((right.x0, top - 2), "cumulative energy (fraction of |dW|_F^2)", fill=_TEXT, font=small)
    x_ticks = _log_ticks(x_max)
    for panel, y_ticks, fmt in (
        (left, [float(d) for d in range(int(y_lo), 1)], lambda y: "1" if y == 0 else f"1e{int(y)}"),
        (right, [0.0, 0.25, 0.5, 0.75, 1.0], lambda y: f"{y:.2f}"),
    ):
        for y in y_ticks:
            yy = panel.py(y)
            draw.line([(panel.x0, yy), (panel.x1, yy)], fill=_GRID)
            label = fmt(y)
            tw = draw.textlength(label, font=small)
            draw.text((panel.x0 - tw - 4, yy - 6), label, fill=_AXIS, font=small)
        for x, labelled in x_ticks:
            xx = panel.px(x)
            draw.line([(xx, panel.y0), (xx, panel.y1)], fill=_GRID)
            if not labelled and x_max > 60:
                continue
            label = str(x)
            tw = draw.textlength(label, font=small)
            draw.text((xx - tw / 2, panel.y1 + 3), label, fill=_AXIS, font=small)
        draw.rectangle([panel.x0, panel.y0, panel.x1, panel.y1], outline=_AXIS)
        label = "index i (log)"
        draw.text((panel.x1 - draw.textlength(label, font=small), panel.y1 + 16), label, fill=_AXIS, font=small)

    # Curves and rank markers.
    for idx, ((name, s), logs) in enumerate(zip(items, normalised)):
        colour = PALETTE[idx % len(PALETTE)]
        if len(logs) > 1:
            draw.line(_curve(logs, left, lambda y: y), fill=colour, width=2)
        v2 = s.values.double().cpu() ** 2
        fro2 = s.fro2 if s.fro2 > 0 else float(v2.sum()) or 1.0
        cum = (torch.cumsum(v2, 0) / fro2).clamp(max=1.0).tolist()
        if len(cum) > 1:
            draw.line(_curve(cum, right, lambda y: y), fill=colour, width=2)
        r = ranks.get(name)
        if r is not None and r >= 1:
            for panel in (left, right):
                xx = panel.px(min(r, x_max))
                _dashed(draw, xx, panel.y0, panel.y1, colour)
            if r <= len(cum):
                cx, cy = right.px(r), right.py(cum[r - 1])
                draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)

    # Legend: two columns under the panels.
    ly = height - legend_h
    col_w = (width - 20) // 2
    for idx, (name, s) in enumerate(items):
        colour = PALETTE[idx % len(PALETTE)]
        x = 10 + (idx % 2) * col_w
        y = ly + (idx // 2) * 16
        draw.line([(x, y + 7), (x + 18, y + 7)], fill=colour, width=3)
        r = ranks.get(name)
        extra = f"  r={r}, kept {100 * s.retained(min(r, s.known)):.1f}%" if r else ""
        label = short_name(name, limit=max(16, int((col_w - 150) / 6.2))) + extra
        draw.text((x + 24, y), label, fill=_TEXT, font=small)
    return img


def _component(name: str) -> str:
    from .archs import component_of_kohya  # the records know every component's kohya prefix

    return component_of_kohya(name)


def select_layers_for_plot(report: Report, n: int = 6) -> tuple[str, ...]:
    """Representative layers: the largest-norm layer of each component, then the largest of each
    layer kind, then the largest remaining ones; at most ``n``, largest norm first."""
    written = sorted((s for s in report.layers if s.status != "skipped"), key=lambda s: s.norm, reverse=True)
    chosen: list[str] = []

    def take(pred) -> None:
        seen = {pred(s) for s in written if s.name in chosen}
        for s in written:
            key = pred(s)
            if len(chosen) >= n:
                return
            if key in seen or s.name in chosen:
                continue
            seen.add(key)
            chosen.append(s.name)

    take(lambda s: _component(s.name))
    take(lambda s: s.kind)
    take(lambda s: s.name)
    order = {s.name: i for i, s in enumerate(written)}
    return tuple(sorted(chosen[:n], key=order.__getitem__))

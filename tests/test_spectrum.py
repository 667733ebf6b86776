"""The spectrum picture (Pillow only) and the choice of layers to show."""

from __future__ import annotations

import torch

from rankwise.core.rank import Spectrum
from rankwise.core.report import LayerStat, Report
from rankwise.core.spectrum import PALETTE, render_spectrum, select_layers_for_plot, short_name


def _spectrum(p: int, decay: float, known: int | None = None) -> Spectrum:
    v = torch.arange(1, p + 1, dtype=torch.float64).pow(-decay)
    return Spectrum(v[: known or p], float((v * v).sum()), p)


def _colours(img) -> set[tuple[int, int, int]]:
    return {c for _, c in img.getcolors(maxcolors=1 << 20)}


def test_render_draws_every_layer_in_its_colour():
    spectra = {f"lora_unet_layer_{i}": _spectrum(320 * (i + 1), 0.3 + 0.4 * i, known=128 if i == 2 else None)
               for i in range(4)}
    ranks = {name: 16 * (i + 1) for i, name in enumerate(spectra)}
    img = render_spectrum(spectra, ranks, width=640, height=360)
    assert img.size == (640, 360) and img.mode == "RGB"
    colours = _colours(img)
    for i in range(len(spectra)):
        assert PALETTE[i] in colours


def test_render_handles_empty_tiny_and_odd_inputs():
    assert render_spectrum({}).size == (768, 432)
    one = {"lora_te1_x": Spectrum(torch.tensor([2.0], dtype=torch.float64), 4.0, 1)}
    img = render_spectrum(one, {"lora_te1_x": 5, "missing": 3}, width=100, height=50)  # clamped to the minimum
    assert img.size == (320, 200)
    zero = {"z": Spectrum(torch.zeros(4, dtype=torch.float64), 0.0, 4)}
    render_spectrum(zero, {"z": 1})


def _stat(name: str, norm: float, kind: str = "linear", status: str = "ok") -> LayerStat:
    return LayerStat(name=name, kind=kind, shape=(4, 4), rank=2, norm=norm, status=status)


def test_select_layers_covers_each_component_then_largest():
    report = Report("extract", (
        _stat("lora_unet_a", 10.0),
        _stat("lora_unet_b", 9.0),
        _stat("lora_unet_conv", 3.0, kind="conv"),
        _stat("lora_te1_a", 0.5),
        _stat("lora_te2_a", 0.2),
        _stat("lora_unet_skipped", 100.0, status="skipped"),
    ))
    chosen = select_layers_for_plot(report, n=4)
    assert chosen == ("lora_unet_a", "lora_unet_conv", "lora_te1_a", "lora_te2_a")
    assert select_layers_for_plot(report, n=2) == ("lora_unet_a", "lora_te1_a")
    assert len(select_layers_for_plot(report, n=10)) == 5


def test_short_name_is_bounded():
    name = "lora_unet_output_blocks_5_1_transformer_blocks_0_attn2_to_k"
    assert len(short_name(name, 30)) <= 30 and short_name(name).startswith("unet out5")

"""Full checkpoint layouts (core/data/*_layout.json) agree with the key tables."""

from __future__ import annotations

import math

import pytest
import torch

from rankwise.core.archs import key_table
from rankwise.core.layouts import extra_layout, load_layout
from rankwise.core.synthetic import parse_dtype
from rankwise.core.archs import Family, record
from rankwise.core.types import Arch

UNET_ARCHS = [a for a in Arch if record(a).family is Family.UNET]

# Key counts of the real original-format checkpoints (v1-5-pruned-emaonly, v2-1_768-ema-pruned, sd_xl_base_1.0).
EXPECTED_KEYS = {Arch.SD1: 1131, Arch.SD2: 1228, Arch.SDXL: 2515}


@pytest.mark.parametrize("arch", UNET_ARCHS)
def test_layout_holds_every_table_tensor_with_its_shape(arch):
    layout = load_layout(arch)
    table = key_table(arch)
    assert len(layout) == EXPECTED_KEYS[arch]
    for key in table.checkpoint_keys():
        assert key in layout, f"{arch.value}: table key {key} missing from the layout"
        assert layout[key][0] == table.checkpoint_shape(key), key


@pytest.mark.parametrize("arch", list(Arch))
def test_extra_layout_is_the_rest(arch):
    layout, extra = load_layout(arch), extra_layout(arch)
    table_keys = set(key_table(arch).checkpoint_keys())
    assert set(extra) == set(layout) - table_keys
    assert not set(extra) & table_keys


@pytest.mark.parametrize("arch", UNET_ARCHS)
def test_layout_entries_are_well_formed(arch):
    for key, (shape, dtype) in load_layout(arch).items():
        assert isinstance(shape, tuple) and all(isinstance(s, int) and s > 0 for s in shape), key
        assert parse_dtype(dtype) in (torch.float16, torch.int64), (key, dtype)


def test_layout_sizes_match_the_real_models():
    # parameters in the fp16 tensors, in millions: UNet + text encoder(s) + VAE
    sizes = {a: sum(math.prod(s) for s, d in load_layout(a).values() if d == "float16") / 1e6 for a in UNET_ARCHS}
    assert 1060 < sizes[Arch.SD1] < 1070
    assert 1300 < sizes[Arch.SD2] < 1310
    assert 3460 < sizes[Arch.SDXL] < 3480


def test_load_layout_returns_a_fresh_dict():
    a = load_layout(Arch.SD1)
    a.clear()
    assert load_layout(Arch.SD1)
    with pytest.raises(ValueError):
        load_layout("sd9")


def test_dit_layouts_are_generated_from_the_records():
    # flux1-dev.safetensors: 780 tensors, 11 901 408 320 parameters; SD3.5 large: 8.1 B; SD3.5 medium: 2.5 B
    flux = load_layout(Arch.FLUX)
    assert len(flux) == 780
    assert sum(math.prod(s) for s, _ in flux.values()) == 11_901_408_320
    table = key_table(Arch.FLUX)
    for spec in table.select(components=["unet"]):
        assert flux[spec.checkpoint_key][0] == spec.shape
    from rankwise.core.archs import diffusion_layout

    large = diffusion_layout(Arch.SD3, "large")
    assert 8.0e9 < sum(math.prod(s) for s in large.values()) < 8.2e9
    chroma = load_layout(Arch.CHROMA)  # ComfyUI's Chroma module: 643 tensors; "8.9B parameters" (its model card)
    assert len(chroma) == 643 and 8.85e9 < sum(math.prod(s) for s, _ in chroma.values()) < 8.95e9
    assert not any(".img_mod." in k or ".modulation." in k or "time_in." in k for k in chroma)
    medium = load_layout(Arch.SD3)
    assert 2.4e9 < sum(math.prod(s) for s, _ in medium.values()) < 2.6e9
    assert all(k.startswith("model.diffusion_model.") for k in medium)

"""Weight sources and the pair preflight: same architecture, same layer keys, same shapes.

Pairs are tiny synthetic checkpoints written once per module; mismatches are made by editing
in-memory copies, so each error path is checked against a known difference.
"""

from __future__ import annotations

import pytest
import torch

from rankwise.core.archs import Component, key_table
from rankwise.core.errors import FormatError, MismatchError
from rankwise.core.sources import (
    FileSource,
    KeyStyle,
    PrefixedSource,
    StateDictSource,
    compare_pair,
    open_source,
    preflight,
    read_layer,
)
from rankwise.core.synthetic import DeltaKind, PlantedDelta, random_weights, write_checkpoint_pair
from rankwise.core.types import Arch


@pytest.fixture(scope="module")
def sd1_pair(tmp_path_factory):
    """A tiny SD1 pair on disk (no delta: only keys and shapes matter here)."""
    d = tmp_path_factory.mktemp("sd1")
    write_checkpoint_pair(d / "base.safetensors", d / "tuned.safetensors", Arch.SD1,
                          delta=PlantedDelta(kind=DeltaKind.NONE))
    return d / "base.safetensors", d / "tuned.safetensors"


@pytest.fixture(scope="module")
def sdxl_base():
    return StateDictSource(dict(random_weights(key_table(Arch.SDXL, "tiny"))), "sdxl.safetensors")


def _load(path) -> dict[str, torch.Tensor]:
    with open_source(path) as src:
        return {k: src.get(k).clone() for k in src.keys()}


def test_preflight_accepts_a_matching_pair(sd1_pair):
    with open_source(sd1_pair[0]) as base, open_source(sd1_pair[1]) as tuned:
        table, report = preflight(base, tuned)
    assert table is key_table(Arch.SD1, "tiny")
    assert report.arch is Arch.SD1 and report.size == "tiny" and report.ok
    assert report.layers == len(table)
    assert report.keys_compared == len(table.checkpoint_keys())
    assert set(report.components) == {Component.UNET, Component.TE1}


def test_preflight_names_both_architectures(sd1_pair, sdxl_base):
    with open_source(sd1_pair[0]) as base:
        with pytest.raises(MismatchError, match=r"base 'base.safetensors' is SD1 .*, tuned 'sdxl.safetensors' is SDXL "):
            preflight(base, sdxl_base)


def test_preflight_lists_shape_mismatches_by_key(sd1_pair):
    sd = _load(sd1_pair[1])
    key = key_table(Arch.SD1, "tiny").layers[5].checkpoint_key
    sd[key] = torch.zeros(sd[key].shape[0] + 1, *sd[key].shape[1:], dtype=sd[key].dtype)
    with open_source(sd1_pair[0]) as base:
        with pytest.raises(MismatchError, match=rf"1 shape mismatches.*{key}"):
            preflight(base, StateDictSource(sd, "edited"))


def test_preflight_lists_at_most_20_missing_keys_and_counts_the_rest(sd1_pair):
    sd = _load(sd1_pair[1])
    unet_keys = [s.checkpoint_key for s in key_table(Arch.SD1, "tiny").layers if s.component is Component.UNET]
    for key in unet_keys[:25]:
        del sd[key]
    with open_source(sd1_pair[0]) as base:
        with pytest.raises(MismatchError, match=r"25 keys missing in tuned 'edited'.*… and 5 more") as err:
            preflight(base, StateDictSource(sd, "edited"))
    assert unet_keys[0] in str(err.value) and unet_keys[24] not in str(err.value)


def test_a_text_encoder_absent_on_one_side_is_left_out_with_a_note(sd1_pair):
    sd = {k: v for k, v in _load(sd1_pair[1]).items() if not k.startswith("cond_stage_model.")}
    with open_source(sd1_pair[0]) as base:
        table, report = preflight(base, StateDictSource(sd, "unet-only"))
    assert report.components == (Component.UNET,)
    assert report.layers == sum(1 for s in table.layers if s.component is Component.UNET)
    assert any("te1" in n and "unet-only" in n for n in report.notes)


def test_compare_pair_reports_without_raising(sd1_pair):
    sd = _load(sd1_pair[1])
    key = key_table(Arch.SD1, "tiny").layers[0].checkpoint_key
    del sd[key]
    with open_source(sd1_pair[0]) as base:
        _, report = compare_pair(base, StateDictSource(sd, "edited"))
    assert not report.ok and report.missing_in_tuned == (key,)


def test_undetectable_source_names_the_file():
    junk = StateDictSource({"foo.weight": torch.zeros(3, 3)}, "junk.safetensors")
    with pytest.raises(FormatError, match="junk.safetensors"):
        preflight(junk, junk)


def test_ckpt_file_source_matches_safetensors(sd1_pair, tmp_path):
    sd = _load(sd1_pair[0])
    path = tmp_path / "base.ckpt"
    torch.save({"state_dict": sd}, path)
    with FileSource(path) as ckpt, open_source(sd1_pair[0]) as st:
        assert set(ckpt.keys()) == set(st.keys())
        key = next(iter(st.keys()))
        assert ckpt.shape(key) == st.shape(key) and ckpt.dtype(key) == st.dtype(key)
        assert torch.equal(ckpt.get(key), st.get(key))
        _, report = preflight(ckpt, st)
    assert report.ok


def test_prefixed_source_maps_comfy_keys_to_checkpoint_keys(sd1_pair):
    table = key_table(Arch.SD1, "tiny")
    sd = _load(sd1_pair[0])
    comfy = {k.replace("model.diffusion_model.", "diffusion_model.", 1): v for k, v in sd.items()
             if k.startswith("model.diffusion_model.")}
    view = PrefixedSource(StateDictSource(comfy, "comfy"), {"diffusion_model.": "model.diffusion_model."})
    spec = table.layers[3]
    assert spec.checkpoint_key in set(view.keys())
    assert torch.equal(view.get(spec.checkpoint_key), sd[spec.checkpoint_key])
    assert view.shape(spec.checkpoint_key) == tuple(sd[spec.checkpoint_key].shape)


def test_comfy_key_style_reads_layers_by_comfy_key(sd1_pair):
    table = key_table(Arch.SD1, "tiny")
    sd = _load(sd1_pair[0])
    comfy = {}
    for spec in table.layers:
        comfy[spec.comfy_key] = read_layer(StateDictSource(sd), spec)
    src = StateDictSource(comfy, "comfy")
    got_table, report = preflight(src, src, key_style=KeyStyle.COMFY)
    assert got_table is table and report.ok and report.layers == len(table)
    with pytest.raises(MismatchError, match="key_style='comfy'"):
        preflight(src, src)


def test_openclip_fused_rows_are_sliced():
    table = key_table(Arch.SD2, "tiny")
    q, k = [s for s in table.layers if s.rows is not None][:2]
    full = torch.arange(3 * q.shape[0] * q.shape[1], dtype=torch.float32).reshape(3 * q.shape[0], q.shape[1])
    src = StateDictSource({q.checkpoint_key: full})
    assert torch.equal(read_layer(src, q), full[: q.shape[0]])
    assert torch.equal(read_layer(src, k), full[q.shape[0]: 2 * q.shape[0]])

"""Synthetic checkpoints and LoRAs: the streaming writer round-trips through safetensors, planted
deltas have the promised rank/spectrum/norm, and a written pair differs by exactly the planted ΔW."""

from __future__ import annotations

import math
import os
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from rankwise.core.archs import Component, LayerPreset, detect_arch, key_table
from rankwise.core.synthetic import (
    WEIGHT_STD,
    DeltaKind,
    PlantedDelta,
    parse_dtype,
    planted_delta,
    random_lora,
    random_weights,
    write_checkpoint_pair,
    write_safetensors_streaming,
)
from rankwise.core.types import Arch, LayerKind, LoraLayer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Many tiny QRs: 2-thread OpenMP spin-waits make them 50× slower on a busy 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rank(m: torch.Tensor, rtol: float = 1e-4) -> int:
    s = torch.linalg.svdvals(m.double().reshape(m.shape[0], -1))
    return int((s > rtol * s[0]).sum())


# --- streaming writer ------------------------------------------------------------------------------


def test_streaming_writer_round_trips(tmp_path):
    tensors = {
        "a.f16": torch.randn(3, 5).half(),
        "b.bf16": torch.randn(2, 2, 3, 3).bfloat16(),
        "c.f32": torch.randn(7),
        "d.position_ids": torch.arange(77, dtype=torch.int64).reshape(1, 77),
        "e.bool": torch.tensor([True, False, True]),
        "f.u8": torch.arange(5, dtype=torch.uint8),
        "g.scalar": torch.tensor(3.5),
        "h.empty": torch.zeros(0, 4),
    }
    path = tmp_path / "x.safetensors"
    items = [(k, v.shape, v.dtype, (lambda v=v: v)) for k, v in tensors.items()]
    write_safetensors_streaming(path, items, {"ss_network_dim": "8", "note": "ünïcode"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"ss_network_dim": "8", "note": "ünïcode"}
        assert set(f.keys()) == set(tensors)
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
    assert load_file(str(path))["d.position_ids"].dtype == torch.int64
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0  # padded, so the data section starts aligned
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_streaming_writer_holds_one_tensor_at_a_time(tmp_path):
    refs: list[weakref.ref] = []

    def producer(i: int):
        def make():
            assert all(r() is None for r in refs), "an earlier tensor is still alive"
            t = torch.full((64, 64), float(i))
            refs.append(weakref.ref(t))
            return t

        return make

    write_safetensors_streaming(tmp_path / "s.safetensors", [(f"k{i}", (64, 64), torch.float32, producer(i)) for i in range(5)])
    got = load_file(str(tmp_path / "s.safetensors"))
    assert all(float(got[f"k{i}"][0, 0]) == i for i in range(5))


def test_streaming_writer_errors_leave_nothing(tmp_path):
    target = tmp_path / "bad.safetensors"
    with pytest.raises(ValueError, match="k1: producer returned"):
        write_safetensors_streaming(target, [
            ("k0", (2,), torch.float32, lambda: torch.zeros(2)),
            ("k1", (2,), torch.float32, lambda: torch.zeros(3)),
        ])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="duplicate tensor key 'k'"):
        write_safetensors_streaming(target, [("k", (1,), torch.float32, torch.zeros)] * 2)
    with pytest.raises(ValueError, match="str → str"):
        write_safetensors_streaming(target, [], {"dim": 8})
    assert list(tmp_path.iterdir()) == []


def test_streaming_writer_replaces_existing_file(tmp_path):
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"old")
    write_safetensors_streaming(target, [("w", (2, 2), torch.float16, lambda: torch.ones(2, 2).half())], fsync=False)
    assert torch.equal(load_file(str(target))["w"], torch.ones(2, 2).half())


def test_parse_dtype():
    assert parse_dtype("F16") is torch.float16 and parse_dtype("I64") is torch.int64
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'F17'"):
        parse_dtype("F17")


# --- planted deltas ------------------------------------------------------------------------------

TINY_SD1 = key_table(Arch.SD1, "tiny")
LINEAR = TINY_SD1.by_kohya("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj")
CONV = TINY_SD1.by_kohya("lora_unet_down_blocks_1_resnets_0_conv1")


@pytest.mark.parametrize("spec", [LINEAR, CONV], ids=["linear", "conv"])
def test_lowrank_delta_rank_norm_determinism(spec):
    d = PlantedDelta(rank=5, scale=0.03)
    dw = planted_delta(spec, d, seed=7)
    assert dw.dtype == torch.float32 and tuple(dw.shape) == spec.shape
    assert _rank(dw) == 5
    expected = 0.03 * WEIGHT_STD * math.sqrt(math.prod(spec.shape))
    assert dw.norm().item() == pytest.approx(expected, rel=1e-5)
    s = torch.linalg.svdvals(dw.reshape(spec.shape[0], -1).double())[:5]
    assert (s / s[0]).tolist() == pytest.approx(torch.linspace(1.0, 0.5, 5).tolist(), abs=1e-5)
    assert torch.equal(dw, planted_delta(spec, d, seed=7))
    assert not torch.equal(dw, planted_delta(spec, d, seed=8))


def test_lowrank_rank_capped_and_noise():
    conv_out = TINY_SD1.by_kohya("lora_unet_conv_out")  # (4, 16, 3, 3)
    assert _rank(planted_delta(conv_out, PlantedDelta(rank=64), seed=0)) == 4
    noisy = planted_delta(LINEAR, PlantedDelta(rank=3, noise=0.05), seed=0).double()
    s = torch.linalg.svdvals(noisy)
    assert _rank(noisy) == min(LINEAR.shape)  # noise makes it full rank …
    tail = s[3:].square().sum().sqrt() / s.square().sum().sqrt()
    assert 0.02 < tail < 0.06  # … with ≈ 5 % of the norm outside the planted rank


def test_heavy_tail_spectrum():
    dw = planted_delta(LINEAR, PlantedDelta(kind=DeltaKind.HEAVY_TAIL), seed=1)
    s = torch.linalg.svdvals(dw.double())
    i = torch.arange(1, s.numel() + 1, dtype=torch.float64)
    ratio = s * i.sqrt()
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)


def test_none_kind_and_components_give_zero():
    assert not planted_delta(LINEAR, PlantedDelta(kind=DeltaKind.NONE), seed=0).any()
    te = TINY_SD1.by_kohya("lora_te_text_model_encoder_layers_0_mlp_fc1")
    unet_only = PlantedDelta(components=frozenset({Component.UNET}))
    assert not planted_delta(te, unet_only, seed=0).any()
    assert planted_delta(LINEAR, unet_only, seed=0).any()


def test_planted_delta_validation():
    with pytest.raises(ValueError, match="rank must be ≥ 1"):
        PlantedDelta(rank=0)
    with pytest.raises(ValueError, match="finite"):
        PlantedDelta(scale=float("nan"))


# --- random weights and checkpoint pairs ---------------------------------------------------------------


def test_random_weights_cover_table_sources():
    table = key_table(Arch.SD2, "tiny")
    got = dict(random_weights(table, seed=3))
    assert tuple(got) == table.checkpoint_keys()
    for key, t in got.items():
        assert tuple(t.shape) == table.checkpoint_shape(key) and t.dtype == torch.float16
    big = got["model.diffusion_model.output_blocks.0.0.in_layers.2.weight"].float()
    assert big.std().item() == pytest.approx(WEIGHT_STD, rel=0.05)
    again = dict(random_weights(table, seed=3, dtype=torch.float32))
    assert torch.equal(again[key].half(), got[key])


def _diffs(table, base, tuned):
    out = {}
    with safe_open(str(base), "pt") as fb, safe_open(str(tuned), "pt") as ft:
        for key in table.checkpoint_keys():
            diff = ft.get_tensor(key).float() - fb.get_tensor(key).float()
            for spec in table.by_checkpoint_key(key):
                out[spec.kohya] = diff if spec.rows is None else diff[spec.rows[0]: spec.rows[1]]
    return out


@pytest.mark.parametrize("arch", [Arch.SD1, Arch.SD2])
def test_pair_differs_by_planted_delta(tmp_path, arch):
    base, tuned = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    planted = write_checkpoint_pair(base, tuned, arch, delta=PlantedDelta(rank=4), seed=5, dtype=torch.float32)
    table = key_table(arch, "tiny")
    assert set(planted) == {s.kohya for s in table}
    diffs = _diffs(table, base, tuned)
    for name, dw in planted.items():
        err = (diffs[name] - dw).norm() / dw.norm()
        assert err < 1e-4, name
    with safe_open(str(base), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        assert "rankwise.synthetic" in f.metadata()
    assert detect_arch(shapes) is arch


def test_pair_fp16_within_rounding_and_components(tmp_path):
    base, tuned = tmp_path / "b.safetensors", tmp_path / "t.safetensors"
    delta = PlantedDelta(rank=4, components=frozenset({Component.UNET}))
    planted = write_checkpoint_pair(base, tuned, Arch.SD1, delta=delta, seed=1)
    table = key_table(Arch.SD1, "tiny")
    assert set(planted) == {s.kohya for s in table.select(components=[Component.UNET])}
    diffs = _diffs(table, base, tuned)
    for spec in table:
        if spec.is_text_encoder:
            assert not diffs[spec.kohya].any()
        else:
            dw = planted[spec.kohya]
            assert (diffs[spec.kohya] - dw).norm() / dw.norm() < 0.1  # fp16 rounding of W + ΔW


def test_pair_extra_layout_and_none_delta(tmp_path):
    extra = {
        "cond_stage_model.transformer.text_model.embeddings.position_ids": ([1, 77], "I64"),
        "model.diffusion_model.out.0.weight": ([16], "F16"),
        "model.diffusion_model.out.0.bias": ([16], "F32"),
        "first_stage_model.decoder.conv_in.weight": ([8, 4, 3, 3], "F16"),
    }
    base, tuned = tmp_path / "b.safetensors", tmp_path / "t.safetensors"
    planted = write_checkpoint_pair(base, tuned, Arch.SD1, delta=PlantedDelta(kind=DeltaKind.NONE), extra_layout=extra)
    assert planted == {}
    assert base.read_bytes() == tuned.read_bytes()
    sd = load_file(str(base))
    ids = sd["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert ids.dtype == torch.int64 and torch.equal(ids, torch.arange(77).reshape(1, 77))
    assert torch.equal(sd["model.diffusion_model.out.0.weight"], torch.ones(16, dtype=torch.float16))
    assert sd["model.diffusion_model.out.0.bias"].dtype == torch.float32 and not sd["model.diffusion_model.out.0.bias"].any()
    assert sd["first_stage_model.decoder.conv_in.weight"].std() > 0


def test_pair_argument_errors(tmp_path):
    p = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="same file"):
        write_checkpoint_pair(p, p, Arch.SD1)
    with pytest.raises(ValueError, match="table layer"):
        write_checkpoint_pair(p, tmp_path / "y.safetensors", Arch.SD1,
                              extra_layout={"model.diffusion_model.out.2.weight": ([4, 16, 3, 3], "F16")})
    assert list(tmp_path.iterdir()) == []


def test_pair_return_deltas_flag(tmp_path):
    got = write_checkpoint_pair(tmp_path / "b.safetensors", tmp_path / "t.safetensors", Arch.SD1, return_deltas=False)
    assert got == {}


# --- random LoRAs --------------------------------------------------------------------------------


def test_random_lora_layers_and_shapes():
    table = key_table(Arch.SDXL, "tiny")
    lora = random_lora(table, rank=4, seed=2)
    assert lora.arch is Arch.SDXL and dict(lora.metadata) == {}
    assert list(lora.layers) == [s.kohya for s in table.select(LayerPreset.ATTN_MLP)]
    for name, layer in lora.layers.items():
        spec = table.by_kohya(name)
        assert isinstance(layer, LoraLayer) and layer.weight_shape == spec.shape
        assert layer.rank == min(4, spec.shape[0], math.prod(spec.shape[1:])) and layer.alpha == layer.rank
        assert layer.up.dtype == torch.float32
    again = random_lora(table, rank=4, seed=2)
    name = next(iter(lora.layers))
    assert torch.equal(again.layers[name].up, lora.layers[name].up)


def test_random_lora_conv_alpha_dtype():
    lora = random_lora(TINY_SD1, rank=8, preset=LayerPreset.ALL, alpha=2.0, dtype=torch.float16)
    assert len(lora) == len(TINY_SD1)
    conv = lora.layers[CONV.kohya]
    assert conv.kind is LayerKind.CONV and conv.up.shape == (CONV.shape[0], 8, 1, 1)
    assert conv.down.shape == (8,) + CONV.shape[1:] and conv.up.dtype == torch.float16
    assert conv.alpha == 2.0 and conv.delta().shape == CONV.shape
    assert lora.layers["lora_unet_conv_out"].rank == 4  # capped at out channels
    with pytest.raises(ValueError, match="rank must be ≥ 1"):
        random_lora(TINY_SD1, rank=0)

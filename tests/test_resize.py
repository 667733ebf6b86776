"""resize(): exact re-factorisation of every layer type, rank rules on planted spectra, reporting.

The QR path must give the same singular values and the same truncation error as a dense fp64 SVD
of ΔW, ΔW must be preserved up to the Eckart–Young optimum (identity when the rank is unchanged),
and the alpha/rank convention, strength folding, caps and error paths are pinned here.
"""

from __future__ import annotations

import math

import pytest
import torch

from rankwise.core.errors import NonFiniteError, RankwiseError
from rankwise.core.rank import RankPolicy, RankRule
from rankwise.core.errors import Cancelled
from rankwise.core.resize import refactor_factors, resize
from rankwise.core.types import Arch, DiffLayer, LayerKind, Lora, LoraLayer, as_matrix


def rand_layer(out_f, in_f, r, *, alpha=None, gen, conv=None, dtype=torch.float32) -> LoraLayer:
    """A random LoRA layer; ``conv=(kh, kw)`` makes a conv layer (down r×in×kh×kw)."""
    up = torch.randn(out_f, r, generator=gen) / math.sqrt(r)
    down = torch.randn(r, in_f * (conv[0] * conv[1] if conv else 1), generator=gen) / math.sqrt(in_f)
    if conv:
        up, down = up.reshape(out_f, r, 1, 1), down.reshape(r, in_f, *conv)
    return LoraLayer(up=up.to(dtype), down=down.to(dtype), alpha=float(r if alpha is None else alpha))


def planted_layer(values, m, n, *, alpha, gen) -> LoraLayer:
    """A LoRA layer whose ΔW = (alpha/r)·up@down has exactly the singular values ``values``."""
    s = torch.as_tensor(values, dtype=torch.float64)
    r = len(values)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    scale = alpha / r
    return LoraLayer(up=(u * (s / scale)).float(), down=v.T.contiguous().float(), alpha=float(alpha))


def small_lora(gen, *, dtype=torch.float32) -> Lora:
    return Lora(
        layers={
            "lora_unet_a_to_q": rand_layer(48, 40, 8, alpha=4, gen=gen, dtype=dtype),
            "lora_unet_b_conv1": rand_layer(16, 8, 6, alpha=3, gen=gen, conv=(3, 3), dtype=dtype),
            "lora_unet_c_proj_in": rand_layer(24, 16, 5, alpha=1, gen=gen, conv=(1, 1), dtype=dtype),
            "lora_te_text_model_encoder_layers_0_mlp_fc1": rand_layer(64, 32, 8, gen=gen, dtype=dtype),
        },
        metadata={"ss_network_dim": "8", "ss_network_alpha": "4.0", "ss_learning_rate": "0.0001",
                  "ss_base_model_version": "sd_v1", "ss_training_comment": "trained on cats",
                  "modelspec.title": "Cats", "modelspec.author": "someone", "modelspec.date": "2023-01-01T00:00:00",
                  "sshs_model_hash": "stale"},
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_resize_to_same_rank_is_identity(gen):
    lora = small_lora(gen)
    out, rep = resize(lora, RankPolicy(RankRule.parse("sv_fro:1.0")))
    assert out.ranks() == lora.ranks()
    for name, layer in lora.layers.items():
        assert out.layers[name].weight_shape == layer.weight_shape
        assert rel(out.layers[name].delta(), layer.delta()) < 1e-5, name
    assert all(abs(s.excess) < 1e-3 or s.optimal_error < 1e-5 * s.norm for s in rep.layers)


def test_alpha_over_rank_is_kept_and_delta_identical(gen):
    layer = rand_layer(40, 30, 8, alpha=2, gen=gen)
    out, _ = resize(Lora({"lora_unet_x": layer}), RankPolicy(RankRule.parse("8")))
    new = out.layers["lora_unet_x"]
    assert new.rank == 8 and new.alpha == pytest.approx(2.0)  # 2/8 · 8
    assert rel(new.delta(), layer.delta()) < 1e-5
    out4, _ = resize(Lora({"lora_unet_x": layer}), RankPolicy(RankRule.parse("4")))
    assert out4.layers["lora_unet_x"].alpha == pytest.approx(1.0)  # alpha/rank = 0.25 kept


PLANTED = [10.0, 8.0, 5.0, 2.0, 1.0, 0.5, 0.1, 0.01]


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("fixed:3", 3),
        ("sv_ratio:15", 5),  # σ > 10/15 = 0.667: 10, 8, 5, 2, 1
        ("sv_ratio:3", 3),  # σ > 3.33
        ("sv_cumulative:0.9", 4),  # Σσ = 26.61; cumsum 10, 18, 23, 25 ≥ 23.95
        ("sv_cumulative:0.5", 2),  # ≥ 13.3
        ("sv_fro:0.99", 4),  # ‖·‖² = 194.26; 0.9801 · 194.26 = 190.39; cumsum 100, 164, 189, 193
        ("sv_fro:0.7", 1),  # 0.49 · 194.26 = 95.2 ≤ 100
        ("threshold:1.5", 4),
        ("threshold:0.05", 7),
    ],
)
def test_planted_spectrum_picks_expected_rank(gen, rule, expected):
    layer = planted_layer(PLANTED, 60, 50, alpha=3.0, gen=gen)
    out, rep = resize(Lora({"lora_unet_x": layer}), RankPolicy(RankRule.parse(rule)))
    assert out.layers["lora_unet_x"].rank == expected
    stat = rep.layers[0]
    assert stat.rank == expected and stat.input_rank == 8
    opt = math.sqrt(sum(s * s for s in PLANTED[expected:]))
    # √(‖ΔW‖² − Σ S²) in fp32 is accurate to ~1e-5·‖ΔW‖ (‖ΔW‖ = 13.9 here)
    floor = 2e-5 * math.sqrt(sum(s * s for s in PLANTED))
    assert stat.optimal_error == pytest.approx(opt, rel=1e-4, abs=floor)
    assert stat.error == pytest.approx(opt, rel=1e-4, abs=floor)
    assert stat.retained == pytest.approx(sum(s * s for s in PLANTED[:expected]) / sum(s * s for s in PLANTED), rel=1e-6)


def test_max_rank_caps_dynamic_rules(gen):
    layer = planted_layer(PLANTED, 60, 50, alpha=8.0, gen=gen)
    out, _ = resize(Lora({"lora_unet_x": layer}), RankPolicy(RankRule.parse("threshold:0.05"), max_rank=3))
    assert out.layers["lora_unet_x"].rank == 3


def test_qr_path_matches_dense_svd(gen):
    layer = rand_layer(120, 90, 16, alpha=5, gen=gen)
    dense = as_matrix(layer.delta()).double()
    ref_s = torch.linalg.svdvals(dense)
    up = layer.up_matrix() * layer.scale
    got = refactor_factors(up, layer.down_matrix(), RankPolicy(RankRule.parse("6")), LayerKind.LINEAR, False)
    s = got.spectrum.values.double()[:16]  # complete even though only 6 triplets were kept
    assert got.dec.rank == 6
    assert torch.allclose(s, ref_s[:16], rtol=1e-5, atol=1e-6 * float(ref_s[0]))
    dense_err = float(ref_s[6:].pow(2).sum().sqrt())
    out, rep = resize(Lora({"lora_unet_x": layer}), RankPolicy(RankRule.parse("6")))
    actual = float((out.layers["lora_unet_x"].delta().double() - dense).norm())
    assert actual == pytest.approx(dense_err, rel=1e-4)
    assert rep.layers[0].error == pytest.approx(dense_err, rel=1e-4)
    assert rep.layers[0].optimal_error == pytest.approx(dense_err, rel=1e-4)
    assert abs(rep.layers[0].excess) < 1e-4


def test_conv_rank_applies_to_3x3_only(gen):
    lora = small_lora(gen)
    out, _ = resize(lora, RankPolicy(RankRule.parse("4"), conv_rank=2, te_rank=3))
    assert out.ranks() == {
        "lora_unet_a_to_q": 4,
        "lora_unet_b_conv1": 2,
        "lora_unet_c_proj_in": 4,
        "lora_te_text_model_encoder_layers_0_mlp_fc1": 3,
    }
    conv = out.layers["lora_unet_b_conv1"]
    assert tuple(conv.down.shape) == (2, 8, 3, 3) and tuple(conv.up.shape) == (16, 2, 1, 1)
    assert tuple(out.layers["lora_unet_c_proj_in"].down.shape) == (4, 16, 1, 1)


def test_locon_mid_becomes_plain_lora(gen):
    r, out_c, in_c = 4, 12, 6
    layer = LoraLayer(
        up=torch.randn(out_c, r, 1, 1, generator=gen),
        down=torch.randn(r, in_c, 1, 1, generator=gen),
        alpha=2.0,
        mid=torch.randn(r, r, 3, 3, generator=gen),
    )
    out, rep = resize(Lora({"lora_unet_x": layer}), RankPolicy(RankRule.parse("4")))
    new = out.layers["lora_unet_x"]
    assert new.mid is None and tuple(new.down.shape) == (4, in_c, 3, 3)
    assert rel(new.delta(), layer.delta()) < 1e-5
    assert "mid" in rep.layers[0].note or any("LoCon" in n for n in rep.notes)


def _loha(gen, m, n, r) -> torch.Tensor:
    w1 = torch.randn(m, r, generator=gen) @ torch.randn(r, n, generator=gen)
    w2 = torch.randn(m, r, generator=gen) @ torch.randn(r, n, generator=gen)
    return w1 * w2  # Hadamard product: rank ≤ r²


def _lokr(gen, m1, n1, m2, n2, r) -> torch.Tensor:
    w1 = torch.randn(m1, n1, generator=gen)
    w2 = torch.randn(m2, r, generator=gen) @ torch.randn(r, n2, generator=gen)
    return torch.kron(w1, w2)


@pytest.mark.parametrize("kind", ["loha", "lokr", "loha_conv"])
def test_dense_inputs_resize_to_plain_lora_within_reported_error(gen, kind):
    if kind == "loha":
        diff = _loha(gen, 40, 36, 3)
    elif kind == "lokr":
        diff = _lokr(gen, 4, 4, 10, 9, 2)
    else:
        diff = _loha(gen, 16, 8 * 9, 3).reshape(16, 8, 3, 3)
    layer = DiffLayer(diff)
    out, rep = resize(Lora({"lora_unet_x": layer}), RankPolicy(RankRule.parse("5")))
    new = out.layers["lora_unet_x"]
    assert isinstance(new, LoraLayer) and new.rank == 5 and new.alpha == 5.0
    assert new.weight_shape == layer.weight_shape
    actual = float((new.delta().double() - diff.double()).norm())
    s = torch.linalg.svdvals(as_matrix(diff).double())
    opt = float(s[5:].pow(2).sum().sqrt())
    stat = rep.layers[0]
    assert actual == pytest.approx(opt, rel=1e-4)
    assert stat.error == pytest.approx(actual, rel=1e-4) and stat.optimal_error == pytest.approx(opt, rel=1e-4)
    assert stat.input_rank is None


def test_dense_input_exact_when_rank_suffices(gen):
    diff = _lokr(gen, 2, 2, 10, 9, 2)  # rank 4 (2·2)
    out, rep = resize(Lora({"lora_unet_x": DiffLayer(diff)}), RankPolicy(RankRule.parse("sv_fro:1.0")))
    assert out.layers["lora_unet_x"].rank == 4
    assert rel(out.layers["lora_unet_x"].delta(), diff) < 1e-5


def test_strength_is_folded_into_delta(gen):
    lora = small_lora(gen)
    out, rep = resize(lora, RankPolicy(RankRule.parse("sv_fro:1.0")), strength=1.05)
    for name, layer in lora.layers.items():
        assert rel(out.layers[name].delta(), 1.05 * layer.delta()) < 1e-5
        assert out.layers[name].alpha == pytest.approx(layer.alpha)  # strength never lands in alpha
    neg, _ = resize(lora, RankPolicy(RankRule.parse("sv_fro:1.0")), strength=-0.5)
    name = "lora_unet_a_to_q"
    assert rel(neg.layers[name].delta(), -0.5 * lora.layers[name].delta()) < 1e-5
    assert rep.params["strength"] == "1.05"


@pytest.mark.parametrize("strength", [0.0, float("nan"), float("inf")])
def test_bad_strength_rejected(gen, strength):
    with pytest.raises(RankwiseError, match="strength"):
        resize(small_lora(gen), RankPolicy(RankRule.parse("4")), strength=strength)


def test_rank_larger_than_layer_is_capped_and_reported(gen):
    lora = Lora({"lora_unet_tiny": rand_layer(6, 4, 4, gen=gen), "lora_unet_big": rand_layer(40, 40, 8, gen=gen)})
    out, rep = resize(lora, RankPolicy(RankRule.parse("16")))
    assert out.ranks() == {"lora_unet_tiny": 4, "lora_unet_big": 8}
    by_name = {s.name: s for s in rep.layers}
    assert "capped at 4" in by_name["lora_unet_tiny"].note
    assert "capped at 8" in by_name["lora_unet_big"].note
    assert any("capped" in n for n in rep.notes)
    assert rel(out.layers["lora_unet_tiny"].delta(), lora.layers["lora_unet_tiny"].delta()) < 1e-5


def test_nan_input_names_layers(gen):
    bad = rand_layer(8, 8, 2, gen=gen)
    up = bad.up.clone()
    up[0, 0] = float("nan")
    diff = torch.randn(8, 8, generator=gen)
    diff[3, 3] = float("inf")
    zero_alpha = LoraLayer(up, bad.down, 0.0)  # ΔW = 0·NaN is still NaN
    lora = Lora({"lora_unet_ok": rand_layer(8, 8, 2, gen=gen), "lora_unet_broken": LoraLayer(up, bad.down, 2.0),
                 "lora_unet_dense": DiffLayer(diff), "lora_unet_zero_alpha": zero_alpha})
    for workers in (1, 2):
        with pytest.raises(NonFiniteError, match="3 layer.*lora_unet_broken, lora_unet_dense") as info:
            resize(lora, RankPolicy(RankRule.parse("2")), workers=workers)
        assert info.value.names == ("lora_unet_broken", "lora_unet_dense", "lora_unet_zero_alpha")


def test_zero_layer_dropped_and_reported(gen):
    zero = LoraLayer(torch.zeros(8, 2), torch.randn(2, 8, generator=gen), 2.0)
    lora = Lora({"lora_unet_zero": zero, "lora_unet_ok": rand_layer(8, 8, 2, gen=gen)})
    out, rep = resize(lora, RankPolicy(RankRule.parse("2")))
    assert list(out.layers) == ["lora_unet_ok"]
    assert [s.name for s in rep.skipped] == ["lora_unet_zero"]


def test_dtype_kept_or_overridden(gen):
    lora = small_lora(gen, dtype=torch.float16)
    out, rep = resize(lora, RankPolicy(RankRule.parse("4")))
    assert all(layer.up.dtype == torch.float16 for layer in out.layers.values())
    assert rep.layers[0].nbytes == out.layers[rep.layers[0].name].nbytes()
    out32, _ = resize(lora, RankPolicy(RankRule.parse("4")), dtype=torch.float32)
    assert all(layer.down.dtype == torch.float32 for layer in out32.layers.values())


def test_metadata_carried_forward(gen):
    lora = small_lora(gen)
    out, _ = resize(lora, RankPolicy(RankRule.parse("4")), strength=1.05)
    md = out.metadata
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
    assert md["ss_learning_rate"] == "0.0001"
    assert md["ss_base_model_version"] == "sd_v1"
    assert "dimension is resized from 8 to 4" in md["ss_training_comment"]
    assert md["ss_network_dim"] == "4"
    assert md["ss_training_comment"].startswith("trained on cats; ")
    assert md["modelspec.title"] == "Cats" and md["modelspec.author"] == "someone"
    assert md["modelspec.date"] != "2023-01-01T00:00:00"  # updated
    assert "sshs_model_hash" not in md  # recomputed by io.save_lora
    assert any(k.startswith("rankwise.") and "1.05" in v for k, v in md.items())


def test_progress_called_per_layer_and_can_cancel(gen):
    lora = small_lora(gen)
    calls = []
    resize(lora, RankPolicy(RankRule.parse("2")), progress=lambda d, t, n: calls.append((d, t, n)))
    assert [c[0] for c in calls] == [1, 2, 3, 4] and all(c[1] == 4 for c in calls)

    def interrupt(done, total, name):
        raise KeyboardInterrupt

    # Ctrl-C inside the layer loop becomes Cancelled (the CLI prints one line for it)
    with pytest.raises(Cancelled, match="cancelled after 1 of 4 layers"):
        resize(lora, RankPolicy(RankRule.parse("2")), progress=interrupt)

    def cancel(done, total, name):
        if done == 2:
            raise Cancelled("stop")

    for workers in (1, 2):
        with pytest.raises(Cancelled, match="stop"):
            resize(lora, RankPolicy(RankRule.parse("2")), progress=cancel, workers=workers)


def test_kohya_compat_adds_one(gen):
    layer = planted_layer(PLANTED, 60, 50, alpha=8.0, gen=gen)
    out, _ = resize(Lora({"lora_unet_x": layer}), RankPolicy(RankRule.parse("sv_fro:0.99"), kohya_compat=True))
    assert out.layers["lora_unet_x"].rank == 5


def test_file_round_trip_on_tiny_sdxl(tmp_path):
    from rankwise.core.archs import LayerPreset, key_table
    from rankwise.core.io import load_lora, save_lora
    from rankwise.core.synthetic import random_lora

    full = random_lora(key_table(Arch.SDXL, "tiny"), rank=8, seed=3, preset=LayerPreset.ALL, dtype=torch.float32)
    lora = full.replace(layers=dict(list(full.layers.items())[::8]))  # ~100 layers of every kind, UNet + both TEs
    save_lora(lora, tmp_path / "in.safetensors", dtype=torch.float32)
    loaded, _ = load_lora(tmp_path / "in.safetensors")
    out, rep = resize(loaded, RankPolicy(RankRule.parse("4"), conv_rank=2))
    save_lora(out, tmp_path / "out.safetensors", dtype=torch.float32)
    back, _ = load_lora(tmp_path / "out.safetensors")
    assert back.arch is Arch.SDXL and set(back.layers) == set(lora.layers)
    stats = {s.name: s for s in rep.layers}
    for name, layer in back.layers.items():
        err = float((layer.delta().double() - lora.layers[name].delta().double()).norm())
        assert err == pytest.approx(stats[name].error, rel=1e-3, abs=1e-6 * max(stats[name].norm, 1e-12))
        assert layer.rank == (2 if layer.kind is LayerKind.CONV else min(4, lora.layers[name].rank))


def test_dynamic_max_rank_above_input_rank_is_not_reported_as_capped(gen):
    lora = Lora({"lora_unet_x": rand_layer(40, 40, 8, gen=gen)})
    out, rep = resize(lora, RankPolicy(RankRule.parse("sv_fro:1.0"), max_rank=64))
    assert out.layers["lora_unet_x"].rank == 8
    assert rep.layers[0].note == "" and not rep.notes


def test_workers_give_the_same_result_and_keep_threads(gen):
    lora = small_lora(gen)
    policy = RankPolicy(RankRule.parse("sv_fro:0.9"))
    one, rep1 = resize(lora, policy)
    two, rep2 = resize(lora, policy, workers=2, progress=lambda d, t, n: None)
    assert torch.get_num_threads() == 1  # restored (conftest sets 1)
    assert list(one.layers) == list(two.layers) and one.ranks() == two.ranks()
    for name in one.layers:
        assert rel(two.layers[name].delta(), one.layers[name].delta()) < 1e-5
    assert [s.name for s in rep1.layers] == [s.name for s in rep2.layers]


def test_workers_cancel(gen):
    def cancel(done, total, name):
        raise KeyboardInterrupt

    with pytest.raises(Cancelled):
        resize(small_lora(gen), RankPolicy(RankRule.parse("2")), workers=2, progress=cancel)

"""merge(): exact signed concat, exact SVD re-compression, cancellation, filters and block weights.

The invariants: concat reproduces Σ ratioᵢ·ΔWᵢ to fp32 round-off (negative ratios included, unlike
kohya's ``--concat``); the SVD merge's error is the Eckart–Young optimum of the dense sum; ratio
(1, 0) returns the first input; (A, −A) cancels to an empty, reported result.
"""

from __future__ import annotations

import math

import pytest
import torch

from rankwise.core.archs import key_table
from rankwise.core.blocks import BLOCKS_17, parse_block_weights
from rankwise.core.errors import MismatchError, NonFiniteError, RankwiseError
from rankwise.core.merge import MergeInput, MergeMode, merge
from rankwise.core.rank import RankPolicy, RankRule
from rankwise.core.types import Arch, DiffLayer, Lora, LoraLayer, as_matrix

SHAPES = {
    "lora_unet_a_to_q": (48, 40),
    "lora_unet_b_conv1": (16, 8, 3, 3),
    "lora_unet_c_proj_in": (24, 16, 1, 1),
    "lora_te_text_model_encoder_layers_0_mlp_fc1": (64, 32),
}


def rand_layer(shape, r, *, alpha, gen, dtype=torch.float32) -> LoraLayer:
    out_f, n = shape[0], math.prod(shape[1:])
    up = torch.randn(out_f, r, generator=gen) / math.sqrt(r)
    down = torch.randn(r, n, generator=gen) / math.sqrt(n)
    if len(shape) == 4:
        up, down = up.reshape(out_f, r, 1, 1), down.reshape(r, *shape[1:])
    return LoraLayer(up=up.to(dtype), down=down.to(dtype), alpha=float(alpha))


def rand_lora(gen, rank, alpha, *, names=tuple(SHAPES), dtype=torch.float32, metadata=None) -> Lora:
    return Lora({n: rand_layer(SHAPES[n], rank, alpha=alpha, gen=gen, dtype=dtype) for n in names},
                metadata=metadata or {})


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def expected(inputs, name) -> torch.Tensor:
    parts = [inp.ratio * inp.lora.layers[name].delta().double() for inp in inputs if name in inp.lora.layers]
    return sum(parts)


def kohya_concat_error(ratios=(1.0, -0.5), rank=16, alpha=8.0, size=320, seed=0) -> float:
    """Relative error of kohya merge_lora.py --concat (ratio·|ratio|, alpha kept at α₁ with rank Σr)."""
    g = torch.Generator().manual_seed(seed)
    bs = [torch.randn(size, rank, generator=g, dtype=torch.float64) for _ in ratios]
    as_ = [torch.randn(rank, size, generator=g, dtype=torch.float64) for _ in ratios]
    total_rank = rank * len(ratios)
    exact = sum(w * alpha / rank * b @ a for w, b, a in zip(ratios, bs, as_))
    kohya = sum(w * abs(w) * alpha / total_rank * b @ a for w, b, a in zip(ratios, bs, as_))
    return float((kohya - exact).norm() / exact.norm())


@pytest.mark.parametrize("ratios", [(1.0, -0.5), (1.0, 1.0)])
def test_concat_is_exact_where_kohyas_formula_is_not(ratios):
    """The module docstring's claim, checked on our merge itself: concat reproduces Σ wᵢ·αᵢ/rᵢ·BᵢAᵢ,
    while kohya's --concat formula (wᵢ|wᵢ|, alpha α₁ with rank Σr) lands far from it."""
    rank, alpha, size = 16, 8.0, 320
    g = torch.Generator().manual_seed(0)
    loras = [Lora({"lora_unet_x": LoraLayer(up=torch.randn(size, rank, generator=g), down=torch.randn(rank, size, generator=g),
                                            alpha=alpha)}) for _ in ratios]
    out, _ = merge([MergeInput(lo, w, f"in{i}") for i, (lo, w) in enumerate(zip(loras, ratios))], mode=MergeMode.CONCAT)
    got = out.layers["lora_unet_x"].delta().double()
    parts = [lo.layers["lora_unet_x"] for lo in loras]
    exact = sum(w * alpha / rank * p.up.double() @ p.down.double() for w, p in zip(ratios, parts))
    kohya = sum(w * abs(w) * alpha / (rank * len(ratios)) * p.up.double() @ p.down.double() for w, p in zip(ratios, parts))
    assert rel(got, exact) <= 1e-6
    assert rel(got, kohya) >= 0.4  # ≈ 0.56 / 0.50 (module docstring; kohya_concat_error gives the same)
    assert kohya_concat_error(ratios=ratios) == pytest.approx(float((kohya - exact).norm() / exact.norm()), abs=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_concat_is_exact_with_negative_ratios(gen, dtype):
    a, b, c = rand_lora(gen, 4, 2.0, dtype=dtype), rand_lora(gen, 8, 8.0, dtype=dtype), rand_lora(gen, 3, 1.0, dtype=dtype)
    inputs = [MergeInput(a, 0.7, "a"), MergeInput(b, -1.3, "b"), MergeInput(c, 0.25, "c")]
    out, rep = merge(inputs, mode=MergeMode.CONCAT)
    for name in SHAPES:
        layer = out.layers[name]
        assert layer.rank == 15 and layer.alpha == 15.0
        assert layer.weight_shape == SHAPES[name]
        assert rel(layer.delta(), expected(inputs, name)) <= 1e-6
    assert all(s.status == "ok" and s.rank == 15 and s.input_rank == 15 for s in rep.layers)


def test_ratio_one_zero_returns_first_input(gen):
    a, b = rand_lora(gen, 6, 3.0), rand_lora(gen, 4, 4.0)
    for mode, policy in ((MergeMode.CONCAT, None), (MergeMode.SVD, RankPolicy(RankRule.parse("6")))):
        out, rep = merge([MergeInput(a, 1.0, "a"), MergeInput(b, 0.0, "b")], mode=mode, policy=policy)
        assert out.ranks() == a.ranks()
        for name, layer in a.layers.items():
            assert rel(out.layers[name].delta(), layer.delta()) < 1e-5
        assert any("not read" in n and "b" in n for n in rep.notes)


def test_zero_ratio_input_is_not_read(gen):
    a = rand_lora(gen, 4, 4.0)
    broken = Lora({n: LoraLayer(torch.full((SHAPES[n][0], 2), float("nan")).reshape(SHAPES[n][0], 2, *([1, 1] if len(SHAPES[n]) == 4 else [])),
                                rand_layer(SHAPES[n], 2, alpha=1, gen=gen).down, 1.0) for n in SHAPES})
    out, _ = merge([MergeInput(a, 1.0, "a"), MergeInput(broken, 0.0, "broken")], mode=MergeMode.CONCAT)
    assert len(out) == len(SHAPES)
    with pytest.raises(NonFiniteError, match="broken"):
        merge([MergeInput(a, 1.0, "a"), MergeInput(broken, 0.5, "broken")], mode=MergeMode.CONCAT)


@pytest.mark.parametrize("mode", [MergeMode.CONCAT, MergeMode.SVD])
def test_merge_with_negation_is_empty_and_reported(gen, mode):
    a = rand_lora(gen, 4, 2.0, dtype=torch.float16)
    policy = RankPolicy(RankRule.parse("4")) if mode is MergeMode.SVD else None
    out, rep = merge([MergeInput(a, 1.0, "a"), MergeInput(a, -1.0, "minus_a")], mode=mode, policy=policy)
    assert len(out) == 0
    assert len(rep.skipped) == len(SHAPES)
    assert all("cancel" in s.note for s in rep.layers)
    assert any("EMPTY" in n for n in rep.notes)


def test_partial_cancellation_keeps_other_layers(gen):
    a, b = rand_lora(gen, 4, 2.0), rand_lora(gen, 4, 2.0, names=("lora_unet_a_to_q",))
    out, rep = merge([MergeInput(a, 1.0, "a"), MergeInput(a, -1.0, "a2"), MergeInput(b, 1.0, "b")], mode=MergeMode.CONCAT)
    assert list(out.layers) == ["lora_unet_a_to_q"]
    assert rel(out.layers["lora_unet_a_to_q"].delta(), b.layers["lora_unet_a_to_q"].delta()) < 1e-5


def test_svd_merge_error_is_optimum_of_dense_sum(gen):
    a, b = rand_lora(gen, 8, 4.0), rand_lora(gen, 6, 6.0)
    inputs = [MergeInput(a, 0.8, "a"), MergeInput(b, -0.6, "b")]
    out, rep = merge(inputs, mode=MergeMode.SVD, policy=RankPolicy(RankRule.parse("5")))
    stats = {s.name: s for s in rep.layers}
    for name in SHAPES:
        dense = as_matrix(expected(inputs, name))
        s = torch.linalg.svdvals(dense)
        opt = float(s[5:].pow(2).sum().sqrt())
        layer = out.layers[name]
        assert layer.rank == 5 and layer.alpha == 5.0 and layer.weight_shape == SHAPES[name]
        actual = float((as_matrix(layer.delta()).double() - dense).norm())
        assert actual == pytest.approx(opt, rel=1e-4)
        assert stats[name].error == pytest.approx(opt, rel=1e-4)
        assert stats[name].optimal_error == pytest.approx(opt, rel=1e-4)
        assert stats[name].input_rank == 14
        assert stats[name].retained == pytest.approx(float(s[:5].pow(2).sum() / s.pow(2).sum()), rel=1e-5)


def test_svd_merge_dynamic_rule_and_conv_rank(gen):
    a, b = rand_lora(gen, 8, 4.0), rand_lora(gen, 8, 8.0)
    policy = RankPolicy(RankRule.parse("sv_fro:1.0"), conv_rank=3)
    out, _ = merge([MergeInput(a, 1.0, "a"), MergeInput(b, 1.0, "b")], mode=MergeMode.SVD, policy=policy)
    assert out.layers["lora_unet_b_conv1"].rank == 3
    assert out.layers["lora_unet_a_to_q"].rank == 16  # full stacked rank: the sum is exact
    assert out.layers["lora_unet_c_proj_in"].rank == 16  # 24×16: short side 16
    inputs = [MergeInput(a, 1.0), MergeInput(b, 1.0)]
    assert rel(out.layers["lora_unet_a_to_q"].delta(), expected(inputs, "lora_unet_a_to_q")) < 1e-5


def test_svd_merge_requires_policy(gen):
    with pytest.raises(RankwiseError, match="policy"):
        merge([MergeInput(rand_lora(gen, 2, 2.0), 1.0)], mode=MergeMode.SVD)


def test_layers_missing_from_some_inputs_are_included(gen):
    a = rand_lora(gen, 4, 4.0, names=("lora_unet_a_to_q", "lora_unet_b_conv1"))
    b = rand_lora(gen, 4, 4.0, names=("lora_unet_a_to_q", "lora_unet_c_proj_in"))
    inputs = [MergeInput(a, 1.0, "a"), MergeInput(b, 0.5, "b")]
    out, rep = merge(inputs, mode=MergeMode.CONCAT)
    assert set(out.layers) == {"lora_unet_a_to_q", "lora_unet_b_conv1", "lora_unet_c_proj_in"}
    assert rel(out.layers["lora_unet_c_proj_in"].delta(), expected(inputs, "lora_unet_c_proj_in")) < 1e-6
    stats = {s.name: s for s in rep.layers}
    assert "missing in b" in stats["lora_unet_b_conv1"].note
    assert "missing in a" in stats["lora_unet_c_proj_in"].note
    assert any(n.startswith("2 layer(s) missing") for n in rep.notes)


def test_architecture_mismatch_names_inputs(gen):
    a = Lora(rand_lora(gen, 2, 2.0).layers, arch=Arch.SD1)
    b = Lora(rand_lora(gen, 2, 2.0).layers, arch=Arch.SDXL)
    with pytest.raises(MismatchError, match=r"first.*sd1.*second.*sdxl"):
        merge([MergeInput(a, 1.0, "first"), MergeInput(b, 1.0, "second")], mode=MergeMode.CONCAT)


def test_detected_architecture_mismatch(gen):
    sd1 = key_table(Arch.SD1, "tiny").layers[10]
    xl = key_table(Arch.SDXL, "tiny").layers[-1]  # lora_te2_…
    a = Lora({sd1.kohya: rand_layer(sd1.shape, 2, alpha=2, gen=gen)})
    b = Lora({xl.kohya: rand_layer(xl.shape, 2, alpha=2, gen=gen)})
    with pytest.raises(MismatchError, match="sd_one.*xl_one"):
        merge([MergeInput(a, 1.0, "sd_one"), MergeInput(b, 1.0, "xl_one")], mode=MergeMode.CONCAT)


def test_shape_mismatch_names_layer_and_inputs(gen):
    a = rand_lora(gen, 2, 2.0, names=("lora_unet_a_to_q",))
    b = Lora({"lora_unet_a_to_q": rand_layer((48, 41), 2, alpha=2, gen=gen)})
    with pytest.raises(MismatchError, match=r"lora_unet_a_to_q.*x: \(48, 40\).*y: \(48, 41\)"):
        merge([MergeInput(a, 1.0, "x"), MergeInput(b, 1.0, "y")], mode=MergeMode.CONCAT)


def test_include_exclude_filters(gen):
    a = rand_lora(gen, 2, 2.0)
    out, rep = merge([MergeInput(a, 1.0)], mode=MergeMode.CONCAT, include=("lora_unet_*",), exclude=("*conv*",))
    assert set(out.layers) == {"lora_unet_a_to_q", "lora_unet_c_proj_in"}
    assert sum(s.note == "filtered out" for s in rep.layers) == 2


def test_dense_input_layers(gen):
    a = rand_lora(gen, 4, 4.0, names=("lora_unet_a_to_q",))
    diff = torch.randn(48, 6, generator=gen) @ torch.randn(6, 40, generator=gen) * 0.1
    b = Lora({"lora_unet_a_to_q": DiffLayer(diff)})
    inputs = [MergeInput(a, 1.0, "a"), MergeInput(b, -0.5, "b")]
    want = expected(inputs, "lora_unet_a_to_q")
    out, rep = merge(inputs, mode=MergeMode.CONCAT)
    assert isinstance(out.layers["lora_unet_a_to_q"], DiffLayer)
    assert rel(out.layers["lora_unet_a_to_q"].delta(), want) < 1e-6
    out, rep = merge(inputs, mode=MergeMode.SVD, policy=RankPolicy(RankRule.parse("sv_ratio:1e4")))
    layer = out.layers["lora_unet_a_to_q"]  # dense path: round-off σ ~1e-7·σ₁ fall below σ₁/1e4
    assert isinstance(layer, LoraLayer) and layer.rank == 10
    assert rel(layer.delta(), want) < 1e-5


def test_output_dtype_promotes(gen):
    a, b = rand_lora(gen, 2, 2.0, dtype=torch.float16), rand_lora(gen, 2, 2.0, dtype=torch.float16)
    out, _ = merge([MergeInput(a, 1.0), MergeInput(b, 1.0)], mode=MergeMode.CONCAT)
    assert all(layer.up.dtype == torch.float16 for layer in out.layers.values())
    c = rand_lora(gen, 2, 2.0, dtype=torch.bfloat16)
    out, _ = merge([MergeInput(a, 1.0), MergeInput(c, 1.0)], mode=MergeMode.CONCAT)
    assert all(layer.up.dtype == torch.float32 for layer in out.layers.values())


def test_metadata_records_merge(gen):
    a = rand_lora(gen, 2, 2.0, metadata={"ss_learning_rate": "1e-4", "ss_network_dim": "2"})
    b = rand_lora(gen, 2, 2.0, metadata={"ss_learning_rate": "5e-5"})
    out, rep = merge([MergeInput(a, 0.5, "alpha.safetensors"), MergeInput(b, -1.0, "beta.safetensors")],
                     mode=MergeMode.CONCAT)
    md = out.metadata
    assert all(isinstance(v, str) for v in md.values())
    assert md["ss_learning_rate"] == "1e-4"  # carried from the first input
    assert "alpha.safetensors" in md["modelspec.merged_from"] and "beta.safetensors" in md["modelspec.merged_from"]
    assert "concat" in md["ss_training_comment"] and "-1" in md["ss_training_comment"]
    assert any(k.startswith("rankwise.") for k in md)


# --- per-block weights ----------------------------------------------------------------------------


def test_parse_block_weights_forms():
    w = parse_block_weights(",".join(["1"] * 7 + ["0.5"] + ["0"] * 9), Arch.SD1)
    assert w["M00"] == 0.5 and w["BASE"] == 1.0 and w["OUT03"] == 0.0
    assert w["IN00"] == 0.0  # omitted by the 17-block form: 0, as LBW's to26
    assert len(w) == 26
    xl = parse_block_weights("0,1,1,1,1,1,1,1,1,1,1,1", Arch.SDXL)
    assert xl["BASE"] == 0.0 and xl["OUT05"] == 1.0 and xl["OUT06"] == 0.0
    assert parse_block_weights("base:0, mid=0.3; OUT01:2", Arch.SDXL) == {"BASE": 0.0, "M00": 0.3, "OUT01": 2.0}
    assert len(parse_block_weights(",".join(["1"] * 20), Arch.SDXL)) == 26


@pytest.mark.parametrize(
    "text, arch, match",
    [
        ("", Arch.SD1, "empty"),
        ("1,1,1", Arch.SD1, r"3 block weights.*17 or 26"),
        (",".join(["1"] * 12), Arch.SD1, "17 or 26"),
        (",".join(["1"] * 17), Arch.SDXL, "12 or 20 or 26"),
        ("IN99:1", Arch.SD1, "unknown block 'IN99'"),
        ("BASE:x", Arch.SD1, "not a number"),
        ("BASE:1, BASE:2", Arch.SD1, "twice"),
        ("BASE:1, 0.5", Arch.SD1, "NAME:value"),
    ],
)
def test_parse_block_weights_errors(text, arch, match):
    with pytest.raises(ValueError, match=match):
        parse_block_weights(text, arch)


def test_block_weights_scale_layers_by_block(gen):
    table = key_table(Arch.SD1, "tiny")
    picks = {}
    for spec in table.layers:
        wanted = spec.block in ("IN01", "M00") or (spec.block == "BASE" and spec.is_text_encoder)
        if wanted and spec.block not in picks and spec.kind.value == "linear":
            picks[spec.block] = spec
    lora = Lora({s.kohya: rand_layer(s.shape, 2, alpha=2, gen=gen) for s in picks.values()}, arch=Arch.SD1)
    weights = parse_block_weights("BASE:0.5, M00:0", Arch.SD1)
    out, rep = merge([MergeInput(lora, 2.0, "x", block_weights=weights)], mode=MergeMode.CONCAT)
    base, in01, mid = picks["BASE"].kohya, picks["IN01"].kohya, picks["M00"].kohya
    assert rel(out.layers[base].delta(), 1.0 * lora.layers[base].delta()) < 1e-6
    assert rel(out.layers[in01].delta(), 2.0 * lora.layers[in01].delta()) < 1e-6
    assert mid not in out.layers
    assert {s.name: s.note for s in rep.skipped}[mid] == "empty: block weight 0"
    assert "BASE:0.5" in rep.params["block_weights"]
    assert len(BLOCKS_17) == 17


def test_block_weights_need_known_arch(gen):
    lora = rand_lora(gen, 2, 2.0, names=("lora_unet_a_to_q",))
    lora = Lora({"lora_unet_zzz": lora.layers["lora_unet_a_to_q"]})
    with pytest.raises(RankwiseError, match="architecture"):
        merge([MergeInput(lora, 1.0, block_weights={"BASE": 0.0})], mode=MergeMode.CONCAT)


def test_nothing_to_merge_errors(gen):
    with pytest.raises(RankwiseError, match="no input"):
        merge([], mode=MergeMode.CONCAT)
    with pytest.raises(RankwiseError, match="every merge ratio is 0"):
        merge([MergeInput(rand_lora(gen, 2, 2.0), 0.0)], mode=MergeMode.CONCAT)


def test_concat_folds_locon_mid(gen):
    r, out_c, in_c = 3, 16, 8
    locon = LoraLayer(
        up=torch.randn(out_c, r, 1, 1, generator=gen),
        down=torch.randn(r, in_c, 1, 1, generator=gen),
        alpha=1.5,
        mid=torch.randn(r, r, 3, 3, generator=gen),
    )
    a = Lora({"lora_unet_b_conv1": locon})
    b = rand_lora(gen, 4, 2.0, names=("lora_unet_b_conv1",))
    inputs = [MergeInput(a, -0.3, "a"), MergeInput(b, 1.0, "b")]
    out, _ = merge(inputs, mode=MergeMode.CONCAT)
    layer = out.layers["lora_unet_b_conv1"]
    assert layer.mid is None and tuple(layer.down.shape) == (7, in_c, 3, 3)
    assert rel(layer.delta(), expected(inputs, "lora_unet_b_conv1")) < 1e-6


def test_saving_an_empty_merge_fails_clearly(gen, tmp_path):
    from rankwise.core.io import save_lora

    a = rand_lora(gen, 2, 2.0)
    out, _ = merge([MergeInput(a, 1.0, "a"), MergeInput(a, -1.0, "b")], mode=MergeMode.CONCAT)
    assert len(out) == 0
    with pytest.raises(RankwiseError, match="empty|no layers"):
        save_lora(out, tmp_path / "empty.safetensors")


def test_merge_files_of_tiny_sd1(tmp_path):
    from rankwise.core.archs import LayerPreset
    from rankwise.core.io import load_lora, save_lora
    from rankwise.core.synthetic import random_lora

    table = key_table(Arch.SD1, "tiny")
    a = random_lora(table, rank=4, seed=1, preset=LayerPreset.ALL)
    b = random_lora(table, rank=6, seed=2, preset=LayerPreset.ATTN_MLP, alpha=3.0)
    inputs = [MergeInput(a, 0.6, "a"), MergeInput(b, -0.9, "b")]
    out, rep = merge(inputs, mode=MergeMode.SVD, policy=RankPolicy(RankRule.parse("sv_fro:0.95"), max_rank=8))
    save_lora(out, tmp_path / "m.safetensors", dtype=torch.float32)
    back, _ = load_lora(tmp_path / "m.safetensors")
    assert back.arch is Arch.SD1 and set(back.layers) == set(a.layers)
    stats = {s.name: s for s in rep.layers}
    for name, layer in back.layers.items():
        err = float((as_matrix(layer.delta()).double() - as_matrix(expected(inputs, name))).norm())
        assert err == pytest.approx(stats[name].error, rel=1e-3, abs=1e-3 * stats[name].norm)
        assert stats[name].retained >= 0.95**2 - 1e-6 or layer.rank == 8


def test_merge_workers_same_result(gen):
    a, b = rand_lora(gen, 8, 4.0), rand_lora(gen, 6, 6.0)
    inputs = [MergeInput(a, 0.8, "a"), MergeInput(b, -0.6, "b")]
    policy = RankPolicy(RankRule.parse("5"))
    one, _ = merge(inputs, mode=MergeMode.SVD, policy=policy)
    two, rep = merge(inputs, mode=MergeMode.SVD, policy=policy, workers=2, exclude=("*conv1",))
    assert set(two.layers) == set(one.layers) - {"lora_unet_b_conv1"}
    for name in two.layers:
        assert rel(two.layers[name].delta(), one.layers[name].delta()) < 1e-5
    assert [s.name for s in rep.layers] == list(SHAPES)


def test_block_weights_with_unknown_block_rejected(gen):
    table = key_table(Arch.SD1, "tiny")
    spec = next(s for s in table.layers if s.kind.value == "linear")
    lora = Lora({spec.kohya: rand_layer(spec.shape, 2, alpha=2, gen=gen)}, arch=Arch.SD1)
    with pytest.raises(RankwiseError, match="unknown block.*IN99"):
        merge([MergeInput(lora, 1.0, "x", block_weights={"IN99": 0.0})], mode=MergeMode.CONCAT)


def test_nan_layers_named_with_their_inputs(gen):
    a, b = rand_lora(gen, 2, 2.0), rand_lora(gen, 2, 2.0)
    up = a.layers["lora_unet_a_to_q"].up.clone()
    up[0, 0] = float("nan")
    a = Lora({**a.layers, "lora_unet_a_to_q": LoraLayer(up, a.layers["lora_unet_a_to_q"].down, 2.0)})
    diff = torch.zeros(64, 32)
    diff[1, 1] = float("inf")
    b = Lora({**b.layers, "lora_te_text_model_encoder_layers_0_mlp_fc1": DiffLayer(diff)})
    with pytest.raises(NonFiniteError, match=r"2 layer.*lora_unet_a_to_q in first.*fc1 in second") as info:
        merge([MergeInput(a, 1.0, "first"), MergeInput(b, 1.0, "second")], mode=MergeMode.SVD,
              policy=RankPolicy(RankRule.parse("2")), workers=2)
    assert set(info.value.names) == {"lora_unet_a_to_q", "lora_te_text_model_encoder_layers_0_mlp_fc1"}

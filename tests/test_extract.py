"""Extraction: planted deltas come back exactly, layer shapes round-trip, ranks follow the rules.

Invariants checked on tiny synthetic pairs (SD1 written to disk with ``write_checkpoint_pair``, SDXL
built in memory for the layers under test):

* a planted rank-k ΔW is recovered at rank ≥ k (LoRA delta == planted ΔW, conv 3×3 included);
  with noise the error equals the Eckart–Young optimum;
* dynamic rules pick the ranks that ``select_rank`` picks on the exact spectrum (``svdvals``);
* a sweep equals separate extractions; identical layers are skipped and counted;
* NaN/Inf and cancellation are reported by name and leave no thread behind.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

from rankwise.core.archs import Component, LayerPreset, key_table
from rankwise.core.errors import Cancelled, NonFiniteError, RankwiseError
from rankwise.core.extract import (
    CLAMP_SAMPLE,
    ExtractOptions,
    TextEncoderMode,
    _clamp,
    extract,
    extract_detailed,
    extract_sweep,
    layer_selected,
)
from rankwise.core.rank import RankPolicy, RankRule, Spectrum, select_rank
from rankwise.core.sources import StateDictSource, open_source, read_layer
from rankwise.core.svd import SvdMethod
from rankwise.core.synthetic import DeltaKind, PlantedDelta, planted_delta, random_weights, write_checkpoint_pair
from rankwise.core.types import Arch, LayerKind, as_matrix


def fixed(r: int, **kw) -> RankPolicy:
    return RankPolicy(RankRule.parse(str(r)), **kw)


def options(policy: RankPolicy, **kw) -> ExtractOptions:
    kw.setdefault("device", "cpu")
    kw.setdefault("factor_dtype", torch.float32)
    kw.setdefault("text_encoders", TextEncoderMode.ALL)
    kw.setdefault("threads", 1)  # 2-thread BLAS crawls on tiny matrices when the machine is busy
    return ExtractOptions(policy, **kw)


@pytest.fixture(scope="module")
def sd1_lowrank(tmp_path_factory):
    """Tiny SD1 pair in fp32 with a planted rank-3 ΔW in every layer."""
    d = tmp_path_factory.mktemp("sd1_lowrank")
    planted = write_checkpoint_pair(d / "base.safetensors", d / "tuned.safetensors", Arch.SD1,
                                    delta=PlantedDelta(rank=3, scale=0.05), dtype=torch.float32)
    return d / "base.safetensors", d / "tuned.safetensors", planted


@pytest.fixture(scope="module")
def sd1_heavy():
    """Tiny SD1 pair (fp16, in memory) with a full-rank heavy-tailed ΔW in the UNet attention/MLP
    layers; every other layer (text encoder included) is identical."""
    table = key_table(Arch.SD1, "tiny")
    base = dict(random_weights(table, seed=7))
    tuned = dict(base)
    heavy = PlantedDelta(kind=DeltaKind.HEAVY_TAIL, scale=0.05)
    for spec in table.select(LayerPreset.ATTN_MLP, [Component.UNET]):
        tuned[spec.checkpoint_key] = (base[spec.checkpoint_key].float() + planted_delta(spec, heavy, seed=0)).half()
    return StateDictSource(base, "heavy-base"), StateDictSource(tuned, "heavy-tuned")


def _sources(pair):
    if isinstance(pair[0], StateDictSource):
        return pair[0], pair[1]
    return open_source(pair[0]), open_source(pair[1])


def test_planted_lowrank_is_recovered_exactly_sd1(sd1_lowrank):
    base, tuned = _sources(sd1_lowrank)
    planted = sd1_lowrank[2]
    with base, tuned:
        lora, report = extract(base, tuned, options(fixed(6)))
    table = key_table(Arch.SD1, "tiny")
    assert lora.arch is Arch.SD1 and len(lora) == len(table) == len(report.written)
    kinds = set()
    for spec in table.layers:
        layer = lora.layers[spec.kohya]
        kinds.add(spec.kind)
        assert layer.rank == min(6, *as_matrix(torch.empty(spec.shape)).shape)
        assert layer.alpha == layer.rank
        assert layer.weight_shape == spec.shape  # conv layout: up (out, r, 1, 1), down (r, in, kh, kw)
        dw = planted[spec.kohya]
        assert torch.allclose(layer.delta(), dw, atol=2e-5 * dw.norm().item()), spec.kohya
    assert kinds == {LayerKind.LINEAR, LayerKind.CONV1X1, LayerKind.CONV}
    for s in report.layers:
        # error = √(‖A‖² − Σ Sᵢ²) bottoms out at ~√eps₃₂·‖A‖ when the planted rank is fully captured
        assert s.status == "ok" and s.error <= 1e-3 * s.norm and s.retained == pytest.approx(1.0, abs=1e-6)
    assert "ss_network_dim" in lora.metadata or any(k.startswith("rankwise") for k in lora.metadata)


def test_noise_floor_error_equals_the_optimum_sd1():
    table = key_table(Arch.SD1, "tiny")
    sd = dict(random_weights(table, seed=9, dtype=torch.float32))
    noisy = PlantedDelta(rank=4, noise=0.05, scale=0.05)
    tuned_sd = dict(sd)
    for spec in table.select(components=[Component.TE1]):
        tuned_sd[spec.checkpoint_key] = sd[spec.checkpoint_key] + planted_delta(spec, noisy, seed=0)
    with StateDictSource(sd) as base, StateDictSource(tuned_sd) as tuned:
        lora, report = extract(base, tuned, options(fixed(4), preset=LayerPreset.ATTN_MLP))
        stats = [s for s in report.written if s.name.startswith("lora_te_")]
        assert len(stats) == 12 and not [s for s in report.written if s.name.startswith("lora_unet_")]
        for s in stats:
            spec = key_table(Arch.SD1, "tiny").by_kohya(s.name)
            dw = read_layer(tuned, spec).double() - read_layer(base, spec).double()
            sv = torch.linalg.svdvals(dw)
            floor = math.sqrt(float((sv[4:] ** 2).sum()))
            assert s.optimal_error == pytest.approx(floor, rel=1e-4)
            assert s.error == pytest.approx(floor, rel=1e-4)  # error / optimal ≈ 1
            true = (lora.layers[s.name].delta().double() - dw).norm().item()
            assert true == pytest.approx(floor, rel=1e-4)
    assert sum("near-zero" in n for n in report.notes) == 1  # the identical UNet layers


def _sdxl_pair(include_specs, delta: PlantedDelta) -> tuple[StateDictSource, StateDictSource, dict]:
    table = key_table(Arch.SDXL, "tiny")
    base = {k: v.float() for k, v in random_weights(table, seed=5, dtype=torch.float32)}
    tuned = dict(base)
    planted = {}
    for spec in include_specs:
        dw = planted_delta(spec, delta, seed=1)
        w = tuned[spec.checkpoint_key].clone()
        if spec.rows is None:
            w += dw
        else:
            w[spec.rows[0]:spec.rows[1]] += dw
        tuned[spec.checkpoint_key] = w
        planted[spec.kohya] = dw
    return StateDictSource(base, "xl-base"), StateDictSource(tuned, "xl-tuned"), planted


def test_planted_lowrank_is_recovered_sdxl_unet_block_and_fused_te2():
    table = key_table(Arch.SDXL, "tiny")
    pattern = ("lora_unet_input_blocks_4_*", "lora_unet_output_blocks_2_2_conv", "lora_te2_*")
    specs = [s for s in table.layers if layer_selected(s.kohya, pattern, ())]
    assert any(s.rows for s in specs) and any(s.kind is LayerKind.CONV for s in specs)
    base, tuned, planted = _sdxl_pair(specs, PlantedDelta(rank=2, scale=0.05))
    lora, report = extract(base, tuned, options(fixed(4), include=pattern))
    assert set(lora.layers) == set(planted)
    for name, dw in planted.items():
        assert torch.allclose(lora.layers[name].delta(), dw, atol=2e-5 * dw.norm().item()), name
    assert lora.arch is Arch.SDXL and report.params["arch"] == "sdxl"


def test_text_encoder_auto_skips_identical_encoders(sd1_heavy):
    base, tuned = _sources(sd1_heavy)
    with base, tuned:
        lora, report = extract(base, tuned, options(fixed(2), text_encoders=TextEncoderMode.AUTO,
                                                    preset=LayerPreset.ATTENTION))
        lora_all, report_all = extract(base, tuned, options(fixed(2), text_encoders=TextEncoderMode.ALL,
                                                            preset=LayerPreset.ATTENTION))
    assert not any(n.startswith("lora_te_") for n in lora.layers)
    assert any("te1: identical" in n and "not extracted" in n for n in report.notes)
    # ALL reads them, finds them identical, and skips each as near-zero.
    te_stats = [s for s in report_all.layers if s.name.startswith("lora_te_")]
    assert te_stats and all(s.status == "skipped" for s in te_stats)
    assert any(f"{len(te_stats)} near-zero layers skipped" in n for n in report_all.notes)
    assert not any(n.startswith("lora_te_") for n in lora_all.layers)


@pytest.mark.parametrize("side", ["base", "tuned"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_layers_are_named(side, bad):
    table = key_table(Arch.SD1, "tiny")
    sd = {k: v.float() for k, v in random_weights(table, seed=2, dtype=torch.float32)}
    spec = table.layers[7]
    broken = dict(sd)
    broken[spec.checkpoint_key] = sd[spec.checkpoint_key].clone()
    broken[spec.checkpoint_key].view(-1)[3] = bad
    pair = (StateDictSource(broken, "broken"), StateDictSource(sd, "fine"))
    base, tuned = pair if side == "base" else pair[::-1]
    with pytest.raises(NonFiniteError, match=rf"{spec.checkpoint_key}.*{side} checkpoint 'broken'") as err:
        extract(base, tuned, options(fixed(2)))
    assert err.value.names == (spec.checkpoint_key,)


def test_sweep_equals_separate_extractions(sd1_heavy):
    policies = [fixed(2), fixed(5), RankPolicy(RankRule.parse("sv_fro:0.5"), max_rank=12),
                RankPolicy(RankRule.parse("sv_cumulative:0.3"), max_rank=6)]
    narrow = dict(preset=LayerPreset.ATTN_MLP, text_encoders=TextEncoderMode.NONE, include=("*attn2*", "*ff_net_2"))
    base, tuned = _sources(sd1_heavy)
    with base, tuned:
        swept = extract_sweep(base, tuned, policies, options(policies[0], **narrow))
        for policy, (lora_s, report_s) in zip(policies, swept):
            lora, report = extract(base, tuned, options(policy, **narrow))
            assert lora.ranks() == lora_s.ranks()
            assert report_s.params["rule"] == str(policy.rule)
            for name, layer in lora.layers.items():
                assert torch.allclose(layer.delta(), lora_s.layers[name].delta(), atol=1e-5 * max(layer.delta().norm().item(), 1e-6))
    assert len({tuple(sorted(lo.ranks().items())) for lo, _ in swept}) == len(policies)


@pytest.mark.parametrize("rule,max_rank", [
    ("sv_fro:0.8", None), ("sv_ratio:4", 16), ("sv_cumulative:0.5", 8), ("sv_cumulative:0.9", None),
    ("threshold:0.004", 12),
])
def test_dynamic_rules_match_the_exact_spectrum(sd1_heavy, rule, max_rank):
    policy = RankPolicy(RankRule.parse(rule), max_rank=max_rank)
    base, tuned = _sources(sd1_heavy)
    with base, tuned:
        lora, report = extract(base, tuned, options(policy, preset=LayerPreset.ATTN_MLP,
                                                    text_encoders=TextEncoderMode.NONE, include=("*attn1*",)))
        table = key_table(Arch.SD1, "tiny")
        assert len(lora) > 10
        for name, layer in lora.layers.items():
            spec = table.by_kohya(name)
            dw = as_matrix(read_layer(tuned, spec).double() - read_layer(base, spec).double())
            sv = torch.linalg.svdvals(dw)
            exact = select_rank(Spectrum(sv, float((sv ** 2).sum()), sv.numel()), policy.rule,
                                cap=policy.cap(spec.kind, False), min_rank=policy.min_rank)
            assert layer.rank == exact.rank, name


def test_near_zero_layers_are_skipped_and_counted():
    table = key_table(Arch.SD1, "tiny")
    sd = {k: v.float() for k, v in random_weights(table, seed=4, dtype=torch.float32)}
    specs = [s for s in table.layers if s.group.value == "attention"][:5]
    tuned = dict(sd)
    for i, spec in enumerate(specs):
        scale = 1e-8 if i == 0 else 0.05  # the first is below min_relative_delta
        tuned[spec.checkpoint_key] = sd[spec.checkpoint_key] + planted_delta(spec, PlantedDelta(rank=2, scale=scale), seed=0)
    lora, report = extract(StateDictSource(sd), StateDictSource(tuned), options(fixed(2), min_relative_delta=1e-6))
    assert set(lora.layers) == {s.kohya for s in specs[1:]}
    assert len(report.skipped) == len(table) - 4
    skipped = {s.name: s for s in report.skipped}
    assert skipped[specs[0].kohya].note.startswith("near-zero") and skipped[specs[0].kohya].norm > 0
    assert any(f"{len(table) - 4} near-zero layers skipped" in n for n in report.notes)


def test_clamp_quantile_samples_large_factors_without_crashing():
    gen = torch.Generator().manual_seed(0)
    up = torch.randn(8192, 1100, generator=gen)  # with down: 18 M values > 2**24, torch.quantile's limit
    down = torch.randn(1100, 8192, generator=gen)
    up[0, 0] = 1e6
    cu, cd = _clamp(up, down, 0.99, seed=0)
    hi = float(cu.abs().max())
    assert 2.0 < hi < 3.5 and float(cd.abs().max()) <= hi  # ≈ the 0.99 quantile of |N(0,1)| (2.58)
    assert up.numel() + down.numel() > 2**24 > CLAMP_SAMPLE


def test_clamped_layers_report_their_true_error(sd1_lowrank):
    base, tuned = _sources(sd1_lowrank)
    with base, tuned:
        lora, report = extract(base, tuned, options(fixed(3), clamp_quantile=0.9, include=("*attn1_to_q",)))
        for s in report.written:
            spec = key_table(Arch.SD1, "tiny").by_kohya(s.name)
            dw = read_layer(tuned, spec).double() - read_layer(base, spec).double()
            true = (lora.layers[s.name].delta().double() - dw).norm().item()
            assert s.error == pytest.approx(true, rel=1e-3, abs=1e-6)
            assert s.error > s.optimal_error
    assert any("clamped" in n for n in report.notes)


def test_progress_counts_layers_and_cancel_stops_the_reader(sd1_heavy):
    calls = []
    base, tuned = _sources(sd1_heavy)
    threads_before = threading.active_count()
    with base, tuned:
        _, report = extract(base, tuned, options(fixed(2), preset=LayerPreset.ATTENTION,
                                                 text_encoders=TextEncoderMode.NONE),
                            progress=lambda d, t, label: calls.append((d, t, label)))
        n = len(report.layers)
        assert [c[0] for c in calls] == list(range(1, n + 1)) and {c[1] for c in calls} == {n}

        def cancel(done, total, label):
            if done == 3:
                raise Cancelled()

        with pytest.raises(Cancelled):
            extract(base, tuned, options(fixed(2), preset=LayerPreset.ATTENTION), progress=cancel)
    assert threading.active_count() == threads_before


def test_prefetch_and_factor_dtype(sd1_lowrank):
    base, tuned = _sources(sd1_lowrank)
    with base, tuned:
        sync, _ = extract(base, tuned, options(fixed(3), prefetch=0, include=("*attn2*",)))
        ahead, _ = extract(base, tuned, options(fixed(3), prefetch=2, include=("*attn2*",)))
        half, rep = extract(base, tuned, options(fixed(3), include=("*attn2*",), factor_dtype=torch.float16))
    for name, layer in sync.layers.items():
        assert torch.equal(layer.up, ahead.layers[name].up) and torch.equal(layer.down, ahead.layers[name].down)
        assert half.layers[name].up.dtype == torch.float16
        assert torch.allclose(half.layers[name].delta(), layer.delta(), atol=2e-3 * layer.delta().norm().item())
    assert rep.params["factor_dtype"] == "float16"


def test_options_validate_and_empty_selection_is_an_error(sd1_lowrank):
    with pytest.raises(ValueError, match="clamp_quantile"):
        ExtractOptions(fixed(2), clamp_quantile=1.5)
    with pytest.raises(ValueError, match="factor_dtype"):
        ExtractOptions(fixed(2), factor_dtype=torch.int8)
    assert ExtractOptions(fixed(2), method="fast").method is SvdMethod.FAST
    base, tuned = _sources(sd1_lowrank)
    with base, tuned, pytest.raises(RankwiseError, match="no layer to extract"):
        extract(base, tuned, options(fixed(2), include=("nothing_matches_this",)))


def test_extract_detailed_keeps_spectra(sd1_lowrank):
    base, tuned = _sources(sd1_lowrank)
    with base, tuned:
        result = extract_detailed(base, tuned, options(RankPolicy(RankRule.parse("sv_fro:0.99"), max_rank=8),
                                                       include=("*ff_net*",)))
    assert set(result.spectra) == set(result.lora.layers)
    for name, spectrum in result.spectra.items():
        assert spectrum.known >= result.lora.layers[name].rank
        assert result.lora.layers[name].rank == 3  # planted rank
    assert result.pair is not None and result.pair.arch is Arch.SD1


def test_layer_selected_patterns():
    assert layer_selected("lora_unet_a_attn1_to_q", ("attn1",), ())
    assert not layer_selected("lora_unet_a_attn1_to_q", ("*attn2*",), ())
    assert not layer_selected("lora_unet_a_attn1_to_q", (), ("to_q",))
    assert layer_selected("lora_te_x", (), ())

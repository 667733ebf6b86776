"""Rank rules: parsing, minimality, monotonicity, bounds, partial-spectrum certificates, kohya compatibility."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise.core.rank import (
    RankChoice,
    RankPolicy,
    RankRule,
    RuleKind,
    Spectrum,
    parse_rules,
    select_rank,
)
from rankwise.core.types import LayerKind


def spectrum_of(values, known: int | None = None) -> Spectrum:
    s = torch.as_tensor(sorted(values, reverse=True), dtype=torch.float64)
    fro2 = float((s**2).sum())
    k = len(s) if known is None else known
    return Spectrum(s[:k].clone(), fro2, len(s))


HEAVY = [i**-0.5 for i in range(1, 65)]


def test_parse_forms():
    assert RankRule.parse("32") == RankRule(RuleKind.FIXED, 32)
    assert RankRule.parse(" sv_fro:0.9 ") == RankRule(RuleKind.SV_FRO, 0.9)
    assert RankRule.parse("SV_RATIO=20") == RankRule(RuleKind.SV_RATIO, 20)
    assert [str(r) for r in parse_rules("8, 16;sv_fro:0.8")] == ["8", "16", "sv_fro:0.8"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("banana:3", "unknown rank rule"),
        ("sv_fro:1.5", r"fraction in \(0, 1\]"),
        ("sv_ratio:0.5", "ρ ≥ 1"),
        ("0", "whole number"),
        ("12.5", "whole number"),
        ("sv_fro:abc", "not a number"),
        ("", "empty"),
    ],
)
def test_parse_errors(text, message):
    with pytest.raises(ValueError, match=message):
        RankRule.parse(text)


def test_minimal_ranks_by_hand():
    s = spectrum_of([5.0, 3.0, 1.0, 0.5, 0.1])
    fro = math.sqrt(s.fro2)
    # sv_fro τ: smallest k with sqrt(Σσ²) ≥ τ‖A‖: 5²=25/35.26 → 0.842 ; +9 → 0.964
    assert select_rank(s, RankRule.parse("sv_fro:0.9")).rank == 2
    assert math.sqrt(25 / s.fro2) < 0.9 <= math.sqrt(34 / s.fro2)
    assert fro > 0
    # sv_ratio ρ=4: keep σ > 1.25 → 2
    assert select_rank(s, RankRule.parse("sv_ratio:4")).rank == 2
    # sv_cumulative τ=0.9: Σσ = 9.6; 8/9.6 = .833, 9/9.6 = .9375 → 3
    assert select_rank(s, RankRule.parse("sv_cumulative:0.9")).rank == 3
    assert select_rank(s, RankRule.parse("threshold:0.5")).rank == 3
    assert select_rank(s, RankRule.parse("3")).rank == 3


def test_kohya_compat_adds_one_and_floors_at_two():
    s = spectrum_of([5.0, 3.0, 1.0, 0.5, 0.1])
    for text in ("sv_fro:0.9", "sv_ratio:4", "sv_cumulative:0.9"):
        plain = select_rank(s, RankRule.parse(text)).rank
        assert select_rank(s, RankRule.parse(text), kohya_compat=True).rank == min(plain, 4) + 1
    tiny = spectrum_of([1e-7, 1e-8])
    assert select_rank(tiny, RankRule.parse("sv_fro:0.5"), kohya_compat=True).rank == 1


@pytest.mark.parametrize("kind", ["sv_fro", "sv_cumulative"])
@given(a=st.floats(0.05, 1.0), b=st.floats(0.05, 1.0))
@settings(max_examples=60, deadline=None)
def test_fraction_rules_monotone(kind, a, b):
    lo, hi = sorted((a, b))
    s = spectrum_of(HEAVY)
    assert select_rank(s, RankRule.parse(f"{kind}:{lo}")).rank <= select_rank(s, RankRule.parse(f"{kind}:{hi}")).rank


@given(a=st.floats(1.0, 1e4), b=st.floats(1.0, 1e4))
@settings(max_examples=60, deadline=None)
def test_ratio_rule_monotone(a, b):
    lo, hi = sorted((a, b))
    s = spectrum_of(HEAVY)
    assert select_rank(s, RankRule.parse(f"sv_ratio:{lo}")).rank <= select_rank(s, RankRule.parse(f"sv_ratio:{hi}")).rank


@given(
    values=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=40),
    rule=st.sampled_from(["sv_fro:0.5", "sv_fro:1", "sv_cumulative:0.9", "sv_ratio:10", "threshold:1", "16"]),
    cap=st.one_of(st.none(), st.integers(1, 50)),
    floor=st.integers(1, 8),
)
@settings(max_examples=150, deadline=None)
def test_bounded(values, rule, cap, floor):
    s = spectrum_of(values)
    choice = select_rank(s, RankRule.parse(rule), cap=cap, min_rank=floor)
    upper = len(values) if cap is None else min(cap, len(values))
    assert 1 <= choice.rank <= upper
    if not RankRule.parse(rule).is_fixed:
        assert choice.rank >= min(floor, upper)
    assert choice.certain


def test_fro_rule_is_minimal():
    s = spectrum_of(HEAVY)
    for tau in (0.3, 0.6, 0.9, 0.99):
        k = select_rank(s, RankRule(RuleKind.SV_FRO, tau)).rank
        assert s.retained(k) >= tau**2 - 1e-12
        assert k == 1 or s.retained(k - 1) < tau**2


@pytest.mark.parametrize("rule", ["sv_fro:0.9", "sv_ratio:3", "threshold:0.4"])
def test_partial_spectrum_decides_when_capped(rule):
    full = spectrum_of(HEAVY)
    part = spectrum_of(HEAVY, known=16)
    exact = select_rank(full, RankRule.parse(rule), cap=16)
    partial = select_rank(part, RankRule.parse(rule), cap=16)
    assert partial == RankChoice(exact.rank, True)


def test_cumulative_certificate():
    # Fast-decaying spectrum: 10 known values settle a τ=0.7 decision.
    fast = [2.0**-i for i in range(40)]
    assert select_rank(spectrum_of(fast, known=10), RankRule.parse("sv_cumulative:0.7")) == RankChoice(
        select_rank(spectrum_of(fast), RankRule.parse("sv_cumulative:0.7")).rank, True
    )
    # Flat heavy tail with few known values and no cap: undecidable → certain=False, never a wrong "certain".
    choice = select_rank(spectrum_of(HEAVY, known=8), RankRule.parse("sv_cumulative:0.9"))
    assert not choice.certain


def test_policy_caps_per_layer_kind():
    policy = RankPolicy(RankRule.parse("32"), conv_rank=8, te_rank=16)
    assert policy.cap(LayerKind.LINEAR) == 32
    assert policy.cap(LayerKind.CONV1X1) == 32  # 1×1 convs follow the linear rank (kohya)
    assert policy.cap(LayerKind.CONV) == 8
    assert policy.cap(LayerKind.LINEAR, is_text_encoder=True) == 16
    dyn = RankPolicy(RankRule.parse("sv_fro:0.9"), max_rank=64)
    assert dyn.cap(LayerKind.LINEAR) == 64
    assert dyn.needed_values(320, LayerKind.LINEAR) == 64
    assert RankPolicy(RankRule.parse("sv_fro:0.9")).needed_values(320, LayerKind.LINEAR) == 320
    with pytest.raises(ValueError, match="max_rank"):
        RankPolicy(RankRule.parse("8"), max_rank=0)


def test_fixed_rank_capped_by_dimensions():
    s = spectrum_of([3.0, 2.0, 1.0])
    assert select_rank(s, RankRule.parse("128")).rank == 3
    assert select_rank(s, RankRule.parse("128"), cap=128).rank == 3


# ---------------------------------------------------------------------------------------------
# sv_knee and the global rules (size, params)

from rankwise.core.rank import GLOBAL_DEFAULT_CAP, knee_rank, parse_size  # noqa: E402


@pytest.mark.parametrize(
    "text, kind, value, shown",
    [
        ("size:160MB", RuleKind.SIZE, 160_000_000, "size:160MB"),
        ("size=1.5GiB", RuleKind.SIZE, 1_610_612_736, "size:1536MiB"),
        ("SIZE:80mb", RuleKind.SIZE, 80_000_000, "size:80MB"),
        ("size:123457B", RuleKind.SIZE, 123_457, "size:123457B"),
        ("size:512KiB", RuleKind.SIZE, 524_288, "size:512KiB"),
        ("size:0.25", RuleKind.SIZE_FRACTION, 0.25, "size:0.25"),
        ("size:1", RuleKind.SIZE_FRACTION, 1.0, "size:1"),
        ("params:20M", RuleKind.PARAMS, 20_000_000, "params:20M"),
        ("params:1234", RuleKind.PARAMS, 1234, "params:1234"),
        ("sv_knee", RuleKind.SV_KNEE, 0.0, "sv_knee"),
    ],
)
def test_parse_extended_rules(text, kind, value, shown):
    rule = RankRule.parse(text)
    assert rule.kind is kind and rule.value == value
    assert str(rule) == shown and RankRule.parse(str(rule)) == rule
    assert rule.is_global == (kind in (RuleKind.SIZE, RuleKind.SIZE_FRACTION, RuleKind.PARAMS))


def test_units_decimal_and_binary():
    assert parse_size("1KB") == 1000 and parse_size("1KiB") == 1024
    assert parse_size("1MB") == 10**6 and parse_size("1MiB") == 2**20
    assert parse_size("1GB") == 10**9 and parse_size("1GiB") == 2**30
    assert parse_size("7B") == 7


@pytest.mark.parametrize("bad", ["size:2", "size:0", "size:5XB", "size:MB", "params:abc", "params:1.5",
                                 "sv_knee:3", "size:0.5B"])
def test_extended_rules_refuse_bad_values(bad):
    with pytest.raises(ValueError):
        RankRule.parse(bad)


def test_sweeps_mix_budgets_and_ranks():
    rules = parse_rules("size:80MB,size:160MB,32; sv_knee")
    assert [str(r) for r in rules] == ["size:80MB", "size:160MB", "32", "sv_knee"]
    assert [r.is_global for r in rules] == [True, True, False, False]


def test_global_rules_are_not_per_layer():
    with pytest.raises(ValueError, match="global"):
        select_rank(spectrum_of(HEAVY), RankRule.parse("size:10MB"))
    policy = RankPolicy(RankRule.parse("size:10MB"))
    assert policy.cap(LayerKind.LINEAR) == GLOBAL_DEFAULT_CAP
    assert RankPolicy(RankRule.parse("size:10MB"), max_rank=64).cap(LayerKind.LINEAR) == 64
    assert policy.needed_values(320, LayerKind.LINEAR) == GLOBAL_DEFAULT_CAP


def _kneedle_reference(s):
    """The definition, written out: x = (i−1)/(n−1), y = (σ−σₙ)/(σ₁−σₙ), argmax (1 − x) − y."""
    n = len(s)
    best, arg = -math.inf, 0
    for i in range(n):
        x = i / (n - 1)
        y = (s[i] - s[-1]) / (s[0] - s[-1])
        if (1 - x) - y > best:
            best, arg = (1 - x) - y, i
    return arg + 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 100.0), min_size=3, max_size=40))
def test_knee_matches_its_definition(values):
    s = sorted(values, reverse=True)
    if s[0] == s[-1]:
        return
    assert knee_rank(torch.tensor(s, dtype=torch.float64)) == _kneedle_reference(s)


def test_knee_of_an_elbow_and_degenerate_spectra():
    # a sharp elbow: 5 large values, then a slow tail. The knee is the corner of the curve, the
    # first value of the tail (Kneedle's point farthest below the chord), so the rank is 6.
    s = torch.tensor([10.0, 9.5, 9.0, 8.5, 8.0] + [0.5 - 0.01 * i for i in range(45)], dtype=torch.float64)
    assert knee_rank(s) == 6
    assert knee_rank(torch.tensor([3.0])) == 1
    assert knee_rank(torch.zeros(8, dtype=torch.float64)) == 1
    assert knee_rank(torch.ones(8, dtype=torch.float64)) == 8


def test_sv_knee_rule_needs_the_whole_spectrum():
    rule = RankRule.parse("sv_knee")
    policy = RankPolicy(rule, max_rank=16)
    assert policy.needed_values(64, LayerKind.LINEAR) == 64
    full = spectrum_of(HEAVY)
    choice = select_rank(full, rule, cap=16)
    assert choice.certain and choice.rank == min(16, knee_rank(full.values))
    partial = spectrum_of(HEAVY, known=10)
    assert not select_rank(partial, rule, cap=16).certain

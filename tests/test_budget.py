"""Size budgets: exact byte costs, and the allocation's optimality against brute force."""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from rankwise.core.budget import (
    BudgetError,
    BudgetLayer,
    BudgetOptions,
    LayerCost,
    LayerInfo,
    LayerLayout,
    Storage,
    Weighting,
    allocate,
    describe_plan,
    diff_offered,
    file_overhead,
    lora_layer_cost,
    params_layer_cost,
    plan_budget,
    predict_file_bytes,
    reference_bytes,
)
from rankwise.core.formats import common_alpha
from rankwise.core.io import save_lora
from rankwise.core.rank import RankPolicy, RankRule, Spectrum
from rankwise.core.types import DiffLayer, Lora, LoraLayer

# ---------------------------------------------------------------------------------------------
# brute force


def _raw_options(layer: BudgetLayer) -> list[tuple[int, float, int, Storage]]:
    """Every feasible option of a layer (no pruning): rank 0 when optional, lo..hi, the diff."""
    cum = torch.cumsum(layer.sq[: layer.hi].double(), 0).tolist()
    out = [(0, 0.0, 0, Storage.NONE)] if layer.optional else []
    out += [(layer.cost.at(r), layer.weight * cum[r - 1], r, Storage.LORA) for r in range(layer.lo, layer.hi + 1)]
    if layer.diff:
        out.append((layer.cost.diff, layer.weight * max(layer.fro2, cum[-1]), 0, Storage.DIFF))
    return out


def brute_opt(layers: list[BudgetLayer], budget: int) -> float:
    best = -math.inf
    for combo in itertools.product(*(_raw_options(l) for l in layers)):
        if sum(c for c, *_ in combo) <= budget:
            best = max(best, sum(g for _, g, *_ in combo))
    return best


def random_layers(seed: int, n: int = 3, *, fixed: bool = True, optional: bool = False, diff: bool = False,
                  equal_units: bool = False) -> list[BudgetLayer]:
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(n):
        hi = int(torch.randint(2, 6, (1,), generator=gen))
        lo = int(torch.randint(1, hi + 1, (1,), generator=gen)) if seed % 3 == 0 else 1
        sq = torch.sort(torch.rand(hi + 1, generator=gen, dtype=torch.float64) ** 3, descending=True).values
        unit = 7 if equal_units else int(torch.randint(3, 17, (1,), generator=gen))
        fix = int(torch.randint(0, 20, (1,), generator=gen)) if fixed else 0
        full = float(sq.sum()) * 1.5
        cost = LayerCost(unit=unit, fixed=fix, diff=fix + unit * int(torch.randint(2, hi + 3, (1,), generator=gen)))
        layers.append(BudgetLayer(
            name=f"l{i}", sq=sq, weight=float(torch.rand(1, generator=gen)) + 0.1, cost=cost, lo=lo, hi=hi,
            fro2=full, optional=optional and i % 2 == 0, diff=diff and i != 1,
        ))
    return layers


def _budgets(layers: list[BudgetLayer]):
    lo = sum(min(c for c, *_ in _raw_options(l)) for l in layers)
    hi = sum(max(c for c, *_ in _raw_options(l)) for l in layers)
    return range(lo, hi + 2)


CASES = [
    dict(fixed=False),
    dict(fixed=True),
    dict(fixed=True, optional=True),
    dict(fixed=True, diff=True),
    dict(fixed=True, optional=True, diff=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(k for k, v in c.items() if v) or "linear")
@pytest.mark.parametrize("seed", range(6))
def test_allocation_against_brute_force(case, seed):
    """Feasible; never above OPT; within gap_bound of OPT for every budget; exactly OPT at the
    greedy prefix's own cost (the two proven statements of core.budget)."""
    layers = random_layers(seed, n=3 + seed % 2, **case)
    for budget in _budgets(layers):
        alloc = allocate(layers, budget)
        opt = brute_opt(layers, budget)
        assert alloc.cost <= budget
        for layer, a in zip(layers, alloc.layers):
            assert a.cost == {Storage.NONE: 0, Storage.DIFF: layer.cost.diff}.get(a.storage, layer.cost.at(a.rank))
            if a.storage is Storage.LORA:
                assert layer.lo <= a.rank <= layer.hi
            assert a.storage is not Storage.NONE or layer.optional
            assert a.storage is not Storage.DIFF or layer.diff
        assert alloc.objective <= opt + 1e-9
        assert alloc.objective >= opt - alloc.gap_bound - 1e-9
        if alloc.gap_bound == 0:
            assert alloc.objective == pytest.approx(opt, abs=1e-12)
        exact = allocate(layers, alloc.exact_at)
        assert exact.objective == pytest.approx(brute_opt(layers, alloc.exact_at), abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_equal_unit_costs_exactly_optimal_for_every_budget(seed):
    layers = random_layers(seed + 100, n=4, fixed=False, equal_units=True)
    for budget in _budgets(layers):
        assert allocate(layers, budget).objective == pytest.approx(brute_opt(layers, budget), abs=1e-12)


def test_greedy_can_miss_the_knapsack_optimum_and_says_by_how_much():
    """Unequal unit costs: the ratio-greedy is not optimal for every budget (it is a knapsack), and
    the reported gap bound covers the difference."""
    a = BudgetLayer("a", torch.tensor([20.0, 9.0], dtype=torch.float64), 1.0, LayerCost(10, 0), 1, 2)
    b = BudgetLayer("b", torch.tensor([20.0, 5.0, 5.0], dtype=torch.float64), 1.0, LayerCost(6, 0), 1, 3)
    layers = [a, b]
    # greedy buys a's unit (0.9/byte), then b's (0.83/byte) no longer fit; no single exchange helps
    # (selling a's unit frees 10 bytes, b's two units need 12)
    alloc = allocate(layers, 16 + 12)
    assert alloc.ranks() == {"a": 2, "b": 1} and alloc.objective == 49.0
    assert brute_opt(layers, 28) == 50.0  # b's two units
    assert alloc.gap_bound == 5.0 and alloc.exact_at == 26
    for budget in _budgets(layers):
        alloc, opt = allocate(layers, budget), brute_opt(layers, budget)
        assert opt - alloc.gap_bound - 1e-9 <= alloc.objective <= opt + 1e-9


def test_budget_below_the_floor_is_refused():
    layers = random_layers(3, fixed=True)
    floor = sum(l.cost.at(l.lo) for l in layers)
    allocate(layers, floor)
    with pytest.raises(BudgetError, match="below the smallest"):
        allocate(layers, floor - 1)


def test_fixed_cost_makes_dropping_a_layer_worth_it():
    """An optional layer whose first unit costs more (header) than it gains per byte is left out,
    and the greedy over the hull takes a multi-rank first step when that pays."""
    heavy = BudgetLayer("h", torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64), 1.0, LayerCost(1, 100), 1, 3,
                        optional=True)
    cheap = BudgetLayer("c", torch.tensor([0.5, 0.4, 0.3], dtype=torch.float64), 1.0, LayerCost(10, 0), 1, 3)
    alloc = allocate([heavy, cheap], 30)
    assert alloc.by_name()["h"].storage is Storage.NONE and alloc.by_name()["c"].rank == 3
    # 113: the ratio-greedy buys c's ranks 2 and 3 (0.04, 0.03 per byte) before h's 103-byte step
    # (0.029 per byte), which then no longer fits; the exchange sells them back for h at rank 3.
    alloc = allocate([heavy, cheap], 113)
    assert alloc.ranks() == {"h": 3, "c": 1} and alloc.objective == pytest.approx(3.5)
    assert allocate([heavy, cheap], 113, max_swaps=0).objective == pytest.approx(1.2)


def test_diff_replaces_ranks_past_break_even():
    sq = torch.linspace(1.0, 0.5, 8, dtype=torch.float64)
    layer = BudgetLayer("d", sq, 1.0, LayerCost(unit=16, fixed=10, diff=10 + 16 * 4), 1, 8,
                        fro2=float(sq.sum()), diff=True)
    opts = layer.options()
    assert max(o.rank for o in opts if o.storage is Storage.LORA) == 3  # rank 4 costs as much as the diff
    alloc = allocate([layer], 10_000)
    assert alloc.layers[0].storage is Storage.DIFF
    assert alloc.layers[0].energy == pytest.approx(float(sq.sum()))


def test_diff_offered_at_half_of_min_dimension():
    assert diff_offered((320, 320), 160) and not diff_offered((320, 320), 159)
    assert diff_offered((64, 32, 3, 3), 32) and not diff_offered((64, 32, 3, 3), 31)


# ---------------------------------------------------------------------------------------------
# bytes


def _random_lora(seed: int, *, diffs: bool = True) -> Lora:
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    shapes = [(64, 48), (32, 32), (40, 16, 3, 3), (24, 8, 1, 1), (128, 12)]
    for i, shape in enumerate(shapes):
        name = f"lora_unet_block_{seed}_{i}_{'x' * (i * 3)}"
        if diffs and i == 1:
            layers[name] = DiffLayer(torch.randn(shape, generator=gen))
            continue
        p = min(shape[0], math.prod(shape[1:]))
        r = int(torch.randint(1, min(p, 12) + 1, (1,), generator=gen))
        up = torch.randn(shape[0], r, generator=gen) * 0.1
        down = torch.randn(r, math.prod(shape[1:]), generator=gen) * 0.1
        if len(shape) == 4:
            up, down = up.reshape(shape[0], r, 1, 1), down.reshape(r, *shape[1:])
        layers[name] = LoraLayer(up=up, down=down, alpha=float(r if seed % 2 else 1.5))
    return Lora(layers=layers, metadata={"ss_network_dim": "Dynamic", "modelspec.title": f"t{seed} ünï"})


def _layouts(lora: Lora) -> list[LayerLayout]:
    out = []
    for name, layer in lora.layers.items():
        if isinstance(layer, DiffLayer):
            out.append(LayerLayout(name, layer.weight_shape, 0, Storage.DIFF))
        else:
            out.append(LayerLayout(name, layer.weight_shape, layer.rank))
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seed", range(4))
def test_predicted_file_size_is_the_saved_size(tmp_path, dtype, seed):
    lora = _random_lora(seed)
    extra = {"rankwise.params": '{"rule": "size:1MB"}'}
    result = save_lora(lora, tmp_path / "x.safetensors", dtype=dtype, metadata=extra)
    md = {**lora.metadata, **extra}
    predicted = predict_file_bytes(_layouts(lora), dtype, md, alpha=common_alpha(lora))
    assert predicted == result.bytes == os.path.getsize(result.path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seed", range(4))
def test_cost_model_bounds_the_file_from_above_tightly(tmp_path, dtype, seed):
    lora = _random_lora(seed, diffs=seed % 2 == 0)
    result = save_lora(lora, tmp_path / "x.safetensors", dtype=dtype)
    digits = len(str(result.bytes))
    model = file_overhead(lora.metadata)
    for lay in _layouts(lora):
        cost = lora_layer_cost(lay.name, lay.weight_shape, dtype, max_rank=lay.rank or 1, offset_digits=digits)
        model += cost.diff if lay.storage is Storage.DIFF else cost.at(lay.rank)
    assert result.bytes <= model
    # slack: offsets written at full width (≤ 2·digits per tensor), alpha possibly fp32, padding, one comma
    assert model - result.bytes <= 3 * 2 * digits * len(lora) + 2 * len(lora) + 8 + 1


def test_params_cost():
    c = params_layer_cost((320, 40, 3, 3))
    assert c.unit == 320 + 360 and c.fixed == 0 and c.diff == 320 * 360
    assert c.at(4) == 4 * 680 and c.at(0) == 0


# ---------------------------------------------------------------------------------------------
# plan_budget


def _infos(seed: int = 0, n: int = 6) -> list[LayerInfo]:
    gen = torch.Generator().manual_seed(seed)
    infos = []
    for i in range(n):
        shape = [(64, 64), (96, 32), (32, 16, 3, 3), (48, 48), (80, 80), (16, 64)][i % 6]
        p = min(shape[0], math.prod(shape[1:]))
        s = torch.sort(torch.rand(p, generator=gen, dtype=torch.float64) ** 4, descending=True).values
        infos.append(LayerInfo(
            name=f"lora_unet_layer_{i}", weight_shape=shape,
            spectrum=Spectrum(s.clone(), float((s**2).sum()), p),
            base_fro2=float(torch.rand(1, generator=gen)) * 100 + 1, block=f"IN{i % 3:02d}",
            is_text_encoder=i == 5,
        ))
    return infos


@pytest.mark.parametrize("rule", ["size:40KB", "size:0.3", "params:9000", "size:64KiB"])
def test_plan_budget_meets_its_target(rule):
    infos = _infos()
    plan = plan_budget(RankRule.parse(rule), RankPolicy(RankRule.parse(rule), max_rank=48), infos,
                       BudgetOptions(metadata={"k": "v"}, metadata_slack=0))
    assert plan.predicted_bytes <= plan.target
    assert all(1 <= r <= 48 for r in plan.ranks().values())
    if rule.startswith("size:0"):
        assert plan.target == int(0.3 * reference_bytes(infos, torch.float16, {"k": "v"}))
    text = describe_plan(plan, infos)
    assert "per block" in text and "IN01" in text and "te linear" in text


def test_plan_budget_uses_the_bytes():
    """A size budget is used up to less than one layer step (here: within 1 %)."""
    infos = _infos(n=6)
    rule = RankRule.parse("size:30KB")
    plan = plan_budget(rule, RankPolicy(rule, max_rank=64), infos, BudgetOptions(metadata_slack=0))
    assert 0.99 * plan.target <= plan.predicted_bytes <= plan.target


def test_plan_budget_caps_and_floors():
    infos = _infos()
    rule = RankRule.parse("size:1GB")  # everything fits: every layer at its cap
    policy = RankPolicy(rule, max_rank=20, conv_rank=5, te_rank=3, min_rank=2)
    plan = plan_budget(rule, policy, infos)
    for info in infos:
        r = plan.ranks()[info.name]
        cap = 3 if info.is_text_encoder else 5 if info.kind.value == "conv" else 20
        assert r == min(cap, info.spectrum.full_rank)
    small = RankRule.parse("size:12KB")
    plan = plan_budget(small, RankPolicy(small, min_rank=2), infos, BudgetOptions(metadata_slack=0))
    assert min(plan.ranks().values()) >= 2


def test_plan_budget_full_diff_counted_at_its_size(tmp_path):
    infos = _infos()
    rule = RankRule.parse("size:1GB")
    plan = plan_budget(rule, RankPolicy(rule, max_rank=200), infos, BudgetOptions(full_diff=True))
    assert all(s is Storage.DIFF for s in plan.storage().values())  # all fit: exact diffs cost less than rank p
    dense = Lora(layers={i.name: DiffLayer(torch.randn(i.weight_shape)) for i in infos})
    result = save_lora(dense, tmp_path / "d.safetensors")
    assert predict_file_bytes(plan.layouts, torch.float16, {}) == result.bytes


def test_weighting_changes_the_allocation():
    infos = _infos()
    rule = RankRule.parse("size:20KB")
    rel = plan_budget(rule, RankPolicy(rule), infos, BudgetOptions(weighting=Weighting.RELATIVE))
    ab = plan_budget(rule, RankPolicy(rule), infos, BudgetOptions(weighting=Weighting.ABSOLUTE))
    assert rel.ranks() != ab.ranks()


def test_plan_budget_refuses_local_rules_and_tiny_budgets():
    infos = _infos()
    with pytest.raises(ValueError):
        plan_budget(RankRule.parse("32"), RankPolicy(RankRule.parse("32")), infos)
    rule = RankRule.parse("size:100B")
    with pytest.raises(BudgetError, match="size:100B: 100 bytes is below the smallest result"):
        plan_budget(rule, RankPolicy(rule), infos)

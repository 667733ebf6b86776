"""Size budgets through the pipeline: extract, resize and merge on a reduced planted SDXL pair."""

from __future__ import annotations

import os

import pytest
import torch

from rankwise.core import extract as extract_mod
from rankwise.core.archs import key_table
from rankwise.core.budget import BudgetOptions, BudgetSelector, Storage, Weighting
from rankwise.core.extract import ExtractOptions, extract_sweep_detailed, layer_selected
from rankwise.core.io import save_lora
from rankwise.core.merge import MergeInput, MergeMode, merge_sweep
from rankwise.core.rank import RankPolicy, RankRule
from rankwise.core.resize import resize_sweep
from rankwise.core.sources import StateDictSource
from rankwise.core.synthetic import DeltaKind, PlantedDelta, planted_delta, random_weights
from rankwise.core.types import Arch, DiffLayer

PATTERN = ("lora_unet_input_blocks_4_*", "lora_unet_output_blocks_2_*", "lora_unet_middle_block_*", "lora_te2_*")


@pytest.fixture(scope="module")
def sdxl_pair():
    return planted_sdxl_pair()


def planted_sdxl_pair():
    """A reduced SDXL-like pair (tiny table, a few blocks + TE2) with a full-rank heavy-tailed ΔW
    whose size varies by layer, so layers deserve different ranks."""
    table = key_table(Arch.SDXL, "tiny")
    specs = [s for s in table.layers if layer_selected(s.kohya, PATTERN, ())]
    base = {k: v.float() for k, v in random_weights(table, seed=3, dtype=torch.float32)}
    tuned = dict(base)
    for i, spec in enumerate(specs):
        delta = PlantedDelta(kind=DeltaKind.HEAVY_TAIL if i % 3 else DeltaKind.LOWRANK, rank=3 + i % 7,
                             noise=0.05, scale=0.02 * (1 + i % 5))
        dw = planted_delta(spec, delta, seed=1)
        w = tuned[spec.checkpoint_key].clone()
        if spec.rows is None:
            w += dw
        else:
            w[spec.rows[0]:spec.rows[1]] += dw
        tuned[spec.checkpoint_key] = w
    base_fro2 = {}
    for spec in specs:
        w = base[spec.checkpoint_key]
        if spec.rows is not None:
            w = w[spec.rows[0]:spec.rows[1]]
        base_fro2[spec.kohya] = float(w.double().pow(2).sum())
    return StateDictSource(base, "xl-base"), StateDictSource(tuned, "xl-tuned"), base_fro2


def _opts(policy):
    return ExtractOptions(policy=policy, include=PATTERN, text_encoders="all", factor_dtype=torch.float32)


def _weighted(result, base_fro2) -> float:
    """Σ_l E_l(r_l)/‖W_base,l‖² of a result, from its spectra and the ranks it wrote."""
    total = 0.0
    for name, layer in result.lora.layers.items():
        spec = result.spectra[name]
        e = spec.fro2 if isinstance(layer, DiffLayer) else spec.energy(layer.rank)
        total += e / base_fro2[name]
    return total


def test_size_budget_beats_every_fixed_rank_and_sv_fro_no_larger(sdxl_pair, tmp_path, monkeypatch):
    base, tuned, base_fro2 = sdxl_pair
    calls = []
    real = extract_mod._decompose
    monkeypatch.setattr(extract_mod, "_decompose", lambda *a, **k: calls.append(1) or real(*a, **k))

    fixed = [RankPolicy(RankRule.parse(str(r))) for r in (1, 2, 4, 6, 8, 12, 16)]
    fro = [RankPolicy(RankRule.parse(f"sv_fro:{t}"), max_rank=64) for t in (0.5, 0.7, 0.8, 0.9, 0.95)]
    results = extract_sweep_detailed(base, tuned, fixed + fro, _opts(fixed[0]))
    sizes = []
    for i, r in enumerate(results):
        sizes.append(save_lora(r.lora, tmp_path / f"ref{i}.safetensors", dtype=torch.float16).bytes)
    one_pass = len(calls)

    targets = [sizes[2], sizes[4], (sizes[3] + sizes[5]) // 2]
    budget_rules = [RankPolicy(RankRule(RankRule.parse("size:1MB").kind, t)) for t in targets]
    calls.clear()
    budgets = extract_sweep_detailed(base, tuned, budget_rules, _opts(budget_rules[0]))
    assert len(calls) == len(base_fro2) <= one_pass  # three budgets: one decomposition per layer

    for target, res in zip(targets, budgets):
        got = save_lora(res.lora, tmp_path / f"b{target}.safetensors", dtype=torch.float16)
        assert 0.99 * target <= got.bytes <= target, (target, got.bytes)
        mine = _weighted(res, base_fro2)
        for r, size in zip(results, sizes):
            if size <= got.bytes:
                assert mine >= _weighted(r, base_fro2) * (1 - 1e-9), (r.report.params["rule"], size)
        ranks = {layer.rank for layer in res.lora.layers.values()}
        assert len(ranks) > 1  # the budget is spread unevenly


def test_predicted_size_and_sweep_cost_one_decomposition(sdxl_pair, tmp_path):
    base, tuned, _ = sdxl_pair
    sels = [BudgetSelector(RankPolicy(RankRule.parse(t), max_rank=32)) for t in ("size:300KB", "size:500KB")]
    out = extract_sweep_detailed(base, tuned, sels, _opts(sels[0].policy))
    for sel, res in zip(sels, out):
        plan = sel.last_plan
        assert plan.ranks() == {n: l.rank for n, l in res.lora.layers.items()}
        text = sel.describe()
        assert "per block" in text and "retained" in text
        got = save_lora(res.lora, tmp_path / f"{sel.rule}.safetensors".replace(":", ""), dtype=torch.float16)
        # the plan's prediction lacks only the pipeline's metadata, which the reserve covers
        assert plan.predicted_bytes <= got.bytes <= plan.target


def test_resize_to_a_size_with_strength_folded(sdxl_pair, tmp_path):
    base, tuned, _ = sdxl_pair
    src = extract_sweep_detailed(base, tuned, [RankPolicy(RankRule.parse("32"))], _opts(RankPolicy(RankRule.parse("32"))))[0]
    target = 1_000_000
    rule = RankPolicy(RankRule(RankRule.parse("size:1MB").kind, target))
    (small, report), (fixed8, _) = resize_sweep(src.lora, [rule, RankPolicy(RankRule.parse("8"))], strength=0.7)
    got = save_lora(small, tmp_path / "s.safetensors", dtype=torch.float16)
    assert 0.99 * target <= got.bytes <= target
    for name, layer in small.layers.items():  # ΔW_out is a truncation of 0.7·ΔW_in
        full = 0.7 * src.lora.layers[name].delta().double()
        err = (layer.delta().double() - full).norm()
        assert err <= full.norm() * (1 + 1e-5)
    # absolute energy kept (resize has no base): ≥ the fixed rank whose file is no larger
    f8 = save_lora(fixed8, tmp_path / "f8.safetensors", dtype=torch.float16).bytes
    kept = lambda lora: sum(float(l.delta().double().pow(2).sum()) for l in lora.layers.values())
    if f8 <= got.bytes:
        assert kept(small) >= kept(fixed8) * (1 - 1e-6)


def test_merge_to_a_size(sdxl_pair, tmp_path):
    base, tuned, _ = sdxl_pair
    p = RankPolicy(RankRule.parse("16"))
    a = extract_sweep_detailed(base, tuned, [p], _opts(p))[0].lora
    target = 600_000
    rule = RankPolicy(RankRule(RankRule.parse("size:1MB").kind, target))
    (out, report), = merge_sweep([MergeInput(a, 1.0, "a"), MergeInput(a, -0.5, "b")], [rule], mode=MergeMode.SVD)
    got = save_lora(out, tmp_path / "m.safetensors", dtype=torch.float16)
    assert 0.99 * target <= got.bytes <= target


def test_full_diff_past_break_even(sdxl_pair, tmp_path):
    base, tuned, _ = sdxl_pair
    sel = BudgetSelector(RankPolicy(RankRule.parse("size:100MB"), max_rank=64),
                         BudgetOptions(full_diff=True, weighting=Weighting.ABSOLUTE))
    res = extract_sweep_detailed(base, tuned, [sel], _opts(sel.policy))[0]
    diffs = [n for n, s in sel.last_plan.storage().items() if s is Storage.DIFF]
    assert diffs and all(isinstance(res.lora.layers[n], DiffLayer) for n in diffs)
    got = save_lora(res.lora, tmp_path / "d.safetensors", dtype=torch.float16)
    assert got.bytes <= sel.last_plan.target
    for n in diffs[:5]:  # exact up to the fp32 reconstruction and the fp16 cast
        d = res.lora.layers[n].delta().double()
        assert d.pow(2).sum().item() == pytest.approx(res.spectra[n].fro2, rel=1e-3)


def test_sv_knee_through_extract(sdxl_pair):
    from rankwise.core.rank import knee_rank

    base, tuned, _ = sdxl_pair
    p = RankPolicy(RankRule.parse("sv_knee"), max_rank=24)
    res = extract_sweep_detailed(base, tuned, [p], _opts(p))[0]
    for name, layer in list(res.lora.layers.items())[:40]:
        spec = res.spectra[name]
        assert spec.complete
        assert layer.rank == min(24, knee_rank(spec.values))


def test_cli_size_budget_sweep_dry_run_and_files(tmp_path, capsys):
    from rankwise.core.cli import main
    from rankwise.core.synthetic import write_checkpoint_pair

    b, t = tmp_path / "b.safetensors", tmp_path / "t.safetensors"
    write_checkpoint_pair(b, t, Arch.SDXL, size="tiny", delta=PlantedDelta(kind=DeltaKind.HEAVY_TAIL, scale=0.05))
    out = tmp_path / "x_{rule}.safetensors"
    assert main(["extract", str(b), str(t), "--rule", "size:1500KB,size:2MB", "--dry-run", "--no-progress",
                 "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "size:1500KB: target 1,500,000 bytes" in text and "size:2MB: target" in text
    assert "per block" in text and "OUT08" in text and not list(tmp_path.glob("x_*"))
    assert main(["extract", str(b), str(t), "--rule", "size:2MB", "--no-progress", "-o", str(out)]) == 0
    made = tmp_path / "x_size2MB.safetensors"
    assert 0.99 * 2e6 <= os.path.getsize(made) <= 2e6
    small = tmp_path / "r.safetensors"
    assert main(["resize", str(made), "--rule", "size:1MB", "--strength", "0.8", "--no-progress",
                 "-o", str(small)]) == 0
    assert 0.99 * 1e6 <= os.path.getsize(small) <= 1e6
    merged = tmp_path / "m.safetensors"
    assert main(["merge", f"{made}:1", f"{small}:-0.5", "--rule", "size:800KB", "--no-progress",
                 "-o", str(merged)]) == 0
    assert 0.99 * 8e5 <= os.path.getsize(merged) <= 8e5


def test_params_budget_and_fraction_through_resize(sdxl_pair):
    import math as _m

    base, tuned, _ = sdxl_pair
    p = RankPolicy(RankRule.parse("32"))
    src = extract_sweep_detailed(base, tuned, [p], _opts(p))[0].lora
    n = 200_000
    rules = [RankPolicy(RankRule.parse(f"params:{n}")), RankPolicy(RankRule.parse("size:0.5"))]
    (by_params, rep), (half, _) = resize_sweep(src, rules)
    values = sum(l.rank * (l.weight_shape[0] + _m.prod(l.weight_shape[1:])) for l in by_params.layers.values())
    assert 0.99 * n <= values <= n
    assert any("params:200K: target 200,000 values" in note for note in rep.notes)
    # size:0.5 of the rank-128 size; the input is rank 32, so every layer sits at its limit at most
    assert all(half.layers[k].rank <= src.layers[k].rank for k in src.layers)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unknown_save_dtype_fits_fp16_and_bf16(sdxl_pair, tmp_path, dtype):
    """A node graph chooses the save dtype later: the default selector sizes for both 16-bit dtypes."""
    base, tuned, _ = sdxl_pair
    p = RankPolicy(RankRule.parse("size:700KB"))  # through selectors_of, as the nodes pass it
    res = extract_sweep_detailed(base, tuned, [p], _opts(p))[0]
    got = save_lora(res.lora, tmp_path / "n.safetensors", dtype=dtype)
    assert 0.99 * 700_000 <= got.bytes <= 700_000


def test_resize_budget_counts_exact_parts(sdxl_pair, tmp_path):
    """Exact parts (1-D .diff vectors) are written besides the allocation; the budget reserves them."""
    base, tuned, _ = sdxl_pair
    p = RankPolicy(RankRule.parse("16"))
    src = extract_sweep_detailed(base, tuned, [p], _opts(p))[0].lora
    extra = {f"lora_unet_extra_norm_{i}": DiffLayer(torch.randn(4096)) for i in range(8)}  # 64 KiB at fp16
    lora = src.replace(layers={**src.layers, **extra})
    target = 500_000
    (out, _), = resize_sweep(lora, [RankPolicy(RankRule(RankRule.parse("size:1MB").kind, target))])
    assert set(extra) <= set(out.layers)
    got = save_lora(out, tmp_path / "e.safetensors", dtype=torch.float16)
    assert 0.99 * target <= got.bytes <= target


def _held_probe(monkeypatch):
    """Records, at the allocation, what RankPhase holds: bytes and the (U, Vh) dtypes per layer."""
    from rankwise.core import pipeline

    seen: dict = {}
    real = pipeline.RankPhase.finish

    def finish(self):
        held = self.held_layers
        seen["bytes"] = self.held_bytes + self.spilled_bytes  # in memory or parked on disk
        seen["memory_bytes"] = self.held_bytes
        seen["spilled_bytes"] = self.spilled_bytes
        seen["dtypes"] = {(d.dec.U.dtype, d.dec.Vh.dtype) for d in held}
        seen["fp32_bytes"] = sum(d.dec.U.numel() * 4 + d.dec.Vh.numel() * 4 + d.dec.S.numel() * d.dec.S.element_size()
                                 + (0 if d.dec.energy_gap is None else d.dec.energy_gap.numel() * d.dec.energy_gap.element_size())
                                 for d in held)
        seen["sources"] = sum(d.source is not None for d in held)
        return real(self)

    monkeypatch.setattr(pipeline.RankPhase, "finish", finish)
    return seen


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_budget_holds_singular_vectors_in_the_save_dtype(sdxl_pair, monkeypatch, dtype):
    """Issue #11: a size budget holds every layer until the allocation; U and Vh wait in the 16-bit
    factor dtype (half the fp32 bytes), and the result matches the fp32-held path: same ranks, ΔW
    within the dtype's rounding."""
    from rankwise.core import pipeline

    base, tuned, _ = sdxl_pair
    sel = lambda: BudgetSelector(RankPolicy(RankRule.parse("size:400KB"), max_rank=32), BudgetOptions(dtype=dtype))
    opts = lambda s: ExtractOptions(policy=s.policy, include=PATTERN, text_encoders="all", factor_dtype=dtype)

    seen = _held_probe(monkeypatch)
    s16 = sel()
    compact = extract_sweep_detailed(base, tuned, [s16], opts(s16))[0]
    assert seen["dtypes"] == {(dtype, dtype)} and seen["sources"] == 0
    # U and Vh at 2 bytes instead of 4; S (and FAST's energy gap) as they were
    assert seen["bytes"] < 0.55 * seen["fp32_bytes"]

    monkeypatch.setattr(pipeline, "hold_dtype", lambda _dtype: torch.float32)  # the fp32-held path
    s32 = sel()
    ref = extract_sweep_detailed(base, tuned, [s32], opts(s32))[0]
    assert seen["dtypes"] == {(torch.float32, torch.float32)}

    assert s16.last_plan.ranks() == s32.last_plan.ranks()
    unit = torch.finfo(dtype).eps / 2
    assert set(compact.lora.layers) == set(ref.lora.layers)
    for name, layer in ref.lora.layers.items():
        got = compact.lora.layers[name]
        assert got.rank == layer.rank and got.up.dtype == dtype
        a, b = got.delta().double(), layer.delta().double()
        # one more rounding of U and of up (same size as the save cast) on top of the save cast
        assert (a - b).norm() <= 4 * unit * b.norm(), name
    # the report's errors come from the spectrum: unchanged
    for x, y in zip(compact.report.layers, ref.report.layers):
        assert (x.name, x.rank) == (y.name, y.rank)
        assert x.error == pytest.approx(y.error, rel=1e-9, abs=1e-12)
        assert x.optimal_error == pytest.approx(y.optimal_error, rel=1e-9, abs=1e-12)


def test_budget_holds_fp32_for_fp32_output_and_full_diff_candidates(sdxl_pair, monkeypatch):
    base, tuned, _ = sdxl_pair
    seen = _held_probe(monkeypatch)
    s = BudgetSelector(RankPolicy(RankRule.parse("size:400KB"), max_rank=32))
    extract_sweep_detailed(base, tuned, [s], _opts(s.policy))  # factor_dtype fp32
    assert seen["dtypes"] == {(torch.float32, torch.float32)}
    assert seen["bytes"] == seen["fp32_bytes"]
    # a layer that may become an exact .diff is formed from all its triplets: held in fp32
    s = BudgetSelector(RankPolicy(RankRule.parse("size:100MB"), max_rank=64),
                       BudgetOptions(full_diff=True, weighting=Weighting.ABSOLUTE))
    p = ExtractOptions(policy=s.policy, include=PATTERN, text_encoders="all", factor_dtype=torch.float16)
    res = extract_sweep_detailed(base, tuned, [s], p)[0]
    assert (torch.float32, torch.float32) in seen["dtypes"]
    for n, st in s.last_plan.storage().items():
        if st is Storage.DIFF:
            d = res.lora.layers[n].delta().double()
            assert d.pow(2).sum().item() == pytest.approx(res.spectra[n].fro2, rel=1e-3)


def test_held_factor_keeps_fp32_where_a_cast_loses_too_much():
    from rankwise.core.pipeline import _held_factor

    x = torch.linalg.qr(torch.randn(300, 8))[0]
    assert _held_factor(x, torch.float16, copy=True).dtype == torch.float16
    tiny = x * 1e-6  # mostly fp16 subnormals: far more than the unit roundoff is lost
    assert _held_factor(tiny, torch.float16, copy=True).dtype == torch.float32
    assert _held_factor(tiny, torch.bfloat16, copy=True).dtype == torch.bfloat16
    assert _held_factor(x, torch.float32, copy=False) is x


def test_held_vectors_are_parked_on_disk_and_come_back_bit_identical(sdxl_pair, monkeypatch):
    """Issue #11 (≤ 2 GB for SDXL): a global selector parks the held U/Vh in an anonymous temp file;
    only S and the spectra stay in memory, and the result is bit-identical to holding in memory."""
    from rankwise.core import pipeline

    base, tuned, _ = sdxl_pair
    sel = lambda: BudgetSelector(RankPolicy(RankRule.parse("size:400KB"), max_rank=32), BudgetOptions(dtype=torch.float16))
    opts = lambda s: ExtractOptions(policy=s.policy, include=PATTERN, text_encoders="all", factor_dtype=torch.float16)
    seen = _held_probe(monkeypatch)
    s1 = sel()
    parked = extract_sweep_detailed(base, tuned, [s1], opts(s1))[0]
    assert seen["spilled_bytes"] > 0
    assert seen["memory_bytes"] < 0.2 * seen["bytes"]  # S (+ gaps) only

    real_init = pipeline.RankPhase.__init__
    monkeypatch.setattr(pipeline.RankPhase, "__init__",
                        lambda self, *a, **k: real_init(self, *a, **{**k, "spill": False}))
    s2 = sel()
    kept = extract_sweep_detailed(base, tuned, [s2], opts(s2))[0]
    assert seen["spilled_bytes"] == 0
    assert set(parked.lora.layers) == set(kept.lora.layers)
    for name, layer in kept.lora.layers.items():
        got = parked.lora.layers[name]
        assert torch.equal(got.up, layer.up) and torch.equal(got.down, layer.down), name


def test_spill_file_round_trip_and_failure_keeps_tensors_in_memory(tmp_path):
    from rankwise.core.pipeline import SpillFile

    spill = SpillFile(str(tmp_path))
    tensors = [torch.randn(5, 3), torch.randn(7).to(torch.bfloat16), torch.randn(2, 4).half(), torch.empty(0, 3)]
    parked = [spill.park(t) for t in tensors]
    assert [p.device.type for p in parked] == ["meta", "meta", "meta", "cpu"]
    if os.name == "posix":
        assert list(tmp_path.iterdir()) == []  # the file has no name (or is unlinked at once)
    for t, p in zip(reversed(tensors), reversed(parked)):
        back = spill.fetch(p)
        assert back.dtype == t.dtype and torch.equal(back, t)
    spill.close()

    broken = SpillFile(str(tmp_path / "missing-folder"))
    t = torch.randn(3, 3)
    assert broken.park(t) is t and broken.failed is not None
    assert broken.fetch(t) is t

"""The layer pipeline: filter semantics, sweeps that decompose once, the global-selector seam,
read-ahead, cancellation and typed results."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch

import rankwise.core.decompositions as dx
import rankwise.core.extract as extract_mod
import rankwise.core.resize as resize_mod
from rankwise.core.errors import Cancelled, NonFiniteError
from rankwise.core.extract import ExtractOptions, decompose_delta, layer_selected
from rankwise.core.merge import MergeInput, MergeMode, merge, merge_sweep
from rankwise.core.pipeline import (
    Decomposed, LayerFilter, LayerInfo, PolicySelector, RankDecision, RankPhase, RankSelector, ReadAhead, run_layers,
)
from rankwise.core.rank import RankPolicy, RankRule
from rankwise.core.resize import resize, resize_sweep
from rankwise.core.svd import SvdMethod
from rankwise.core.types import DiffLayer, LayerKind, LayerStatus, Lora, LoraLayer, SkipReason


def policy(text: str, **kw) -> RankPolicy:
    return RankPolicy(RankRule.parse(text), **kw)


def rand_lora(gen, n=4, out_f=40, in_f=30, r=8) -> Lora:
    layers = {}
    for i in range(n):
        up = torch.randn(out_f, r, generator=gen) * (0.5 ** torch.arange(r))
        layers[f"lora_unet_l{i}_attn1_to_q" if i % 2 else f"lora_unet_l{i}_ff_net"] = LoraLayer(
            up=up, down=torch.randn(r, in_f, generator=gen), alpha=float(r))
    return Lora(layers)


# --------------------------------------------------------------------------------------------- filter


@pytest.mark.parametrize("pattern, name, hit", [
    ("attn1", "lora_unet_a_attn1_to_q", True),          # substring
    ("*attn1", "lora_unet_a_attn1_to_q", False),        # glob: whole name
    ("*attn1*", "lora_unet_a_attn1_to_q", True),
    ("lora_te?_*", "lora_te1_x", True),
    ("lora_te[12]_*", "lora_te3_x", False),
    ("to_q", "lora_unet_a_attn1_to_q", True),
])
def test_layer_filter_semantics(pattern, name, hit):
    assert LayerFilter(include=(pattern,)).selects(name) is hit
    assert LayerFilter(exclude=(pattern,)).selects(name) is (not hit)
    assert layer_selected(name, (pattern,), ()) is hit  # extract uses the same value


def test_merge_uses_the_same_filter_semantics(gen):
    lora = rand_lora(gen)
    out, rep = merge([MergeInput(lora, 1.0, "a")], mode=MergeMode.CONCAT, include=("attn1",))
    assert set(out.layers) == {n for n in lora.layers if "attn1" in n}
    filtered = [s for s in rep.layers if s.skip is SkipReason.FILTERED]
    assert len(filtered) == len(lora.layers) - len(out.layers)


# --------------------------------------------------------------------------------------------- sweeps


def test_resize_sweep_decomposes_each_layer_once_and_matches_single_runs(gen, monkeypatch):
    lora = rand_lora(gen)
    calls = []
    original = resize_mod.decompose_factored
    monkeypatch.setattr(resize_mod, "decompose_factored", lambda *a, **k: calls.append(1) or original(*a, **k))
    rules = [policy("2"), policy("4"), policy("sv_fro:0.9")]
    swept = resize_sweep(lora, rules)
    assert len(calls) == len(lora.layers)
    monkeypatch.setattr(resize_mod, "decompose_factored", original)
    for p, (out, rep) in zip(rules, swept):
        single, single_rep = resize(lora, p)
        assert [s.rank for s in rep.layers] == [s.rank for s in single_rep.layers]
        for name in lora.layers:
            torch.testing.assert_close(out.layers[name].delta(), single.layers[name].delta(), rtol=1e-5, atol=1e-6)
        assert rep.params["rule"] == p.describe()


def test_merge_sweep_matches_single_merges(gen):
    a, b = rand_lora(gen), rand_lora(gen)
    inputs = [MergeInput(a, 1.0, "a"), MergeInput(b, -0.5, "b")]
    rules = [policy("3"), policy("sv_fro:0.95")]
    swept = merge_sweep(inputs, rules)
    assert len(swept) == 2
    for p, (out, rep) in zip(rules, swept):
        single, single_rep = merge(inputs, mode=MergeMode.SVD, policy=p)
        assert [s.rank for s in rep.layers] == [s.rank for s in single_rep.layers]
        for name in out.layers:
            torch.testing.assert_close(out.layers[name].delta(), single.layers[name].delta(), rtol=1e-5, atol=1e-6)


def _info(a: torch.Tensor, name: str = "lora_unet_x") -> LayerInfo:
    return LayerInfo(name=name, kind=LayerKind.LINEAR, shape=tuple(a.shape), is_text_encoder=False, limit=min(a.shape))


@pytest.mark.parametrize("method", [SvdMethod.EXACT, SvdMethod.FAST])
def test_uncapped_sv_fro_is_decided_from_a_partial_spectrum(gen, monkeypatch, method):
    """sv_fro needs only the known values and ‖ΔW‖_F²: no full decomposition (the slow sweep)."""
    m, n, true_rank = 600, 900, 20
    a = (torch.randn(m, true_rank, generator=gen) * torch.linspace(3, 1, true_rank)) @ torch.randn(true_rank, n, generator=gen)
    a = a + 1e-3 * torch.randn(m, n, generator=gen)
    asked = []
    original = extract_mod.decompose
    monkeypatch.setattr(extract_mod, "decompose", lambda A, k, **kw: asked.append((k, kw["full_spectrum"])) or original(A, k, **kw))
    selectors = [PolicySelector(policy("16")), PolicySelector(policy("sv_fro:0.9"))]
    options = ExtractOptions(policy=policy("16"), method=method)
    d = decompose_delta(a, _info(a), selectors, options, torch.device("cpu"))
    assert asked and max(k for k, _ in asked) < min(m, n) // 4 and not any(full for _, full in asked)
    exact = torch.linalg.svdvals(a.double())
    energy = torch.cumsum(exact**2, 0) / float((exact**2).sum())
    want = int((energy < 0.81 * (1 - 1e-12)).sum()) + 1
    assert selectors[1].decide(d).rank == want and selectors[1].decide(d).certain


def test_sv_cumulative_still_gets_a_certain_rank(gen):
    a = torch.randn(300, 400, generator=gen) * torch.linspace(1, 0.01, 400)
    sel = PolicySelector(policy("sv_cumulative:0.5"))
    d = decompose_delta(a, _info(a), [sel], ExtractOptions(policy=policy("8")), torch.device("cpu"))
    decision = sel.decide(d)
    s = torch.linalg.svdvals(a.double())
    c = torch.cumsum(s, 0) / s.sum()
    assert decision.certain and decision.rank == int((c < 0.5 * (1 - 1e-12)).sum()) + 1
    assert d.dec.rank >= decision.rank


# --------------------------------------------------------------------------------------------- global seam


class _SameRankForAll:
    """A toy global selector: every layer gets the smallest rank any layer needs for sv_fro:0.9."""

    is_global = True
    label = "global-min-sv_fro"

    def __init__(self) -> None:
        self.calls = 0
        self.inner = PolicySelector(policy("sv_fro:0.9"))

    def needed(self, info: LayerInfo) -> int | None:
        return min(6, info.limit)

    def select(self, layers):
        self.calls += 1
        r = min(min(self.inner.decide(x).rank for x in layers), 6)
        return [RankDecision(r) for _ in layers]


def test_global_selector_sees_every_layer_once_and_outputs_keep_order(gen):
    lora = rand_lora(gen, n=5)
    names = list(lora.layers)
    zero = names[2]
    layers = dict(lora.layers)
    layers[zero] = LoraLayer(up=torch.zeros(40, 8), down=torch.zeros(8, 30), alpha=8.0)  # skipped
    lora = Lora(layers)
    g = _SameRankForAll()
    assert isinstance(g, RankSelector)
    (out_g, rep_g), (out_p, rep_p) = resize_sweep(lora, [g, policy("4")])
    assert g.calls == 1
    assert [s.name for s in rep_g.layers] == names == [s.name for s in rep_p.layers]
    assert rep_g.layers[2].skip is SkipReason.EMPTY
    ranks = {s.rank for s in rep_g.layers if s.written}
    assert len(ranks) == 1 and ranks.pop() <= 6
    assert all(s.rank == 4 for s in rep_p.layers if s.written)
    assert rep_g.params["rule"] == "global-min-sv_fro"


def test_rank_phase_truncates_held_layers_to_what_selectors_need(gen):
    a = torch.randn(50, 60, generator=gen)
    from rankwise.core.svd import decompose

    held = []
    g = _SameRankForAll()
    phase = RankPhase([g, PolicySelector(policy("3"))], lambda d, ds: held.append((d, ds)), lambda p: held.append(p))
    phase.add(Decomposed(_info(a), decompose(a, 40), source=a))
    phase.skip("skipped-row")
    assert held == []  # nothing decided before the end
    phase.finish()
    (d, decisions), skipped = held
    assert skipped == "skipped-row"
    assert d.source is None and d.dec.rank == 6  # max(global needed 6, per-layer 3)
    assert decisions[1].rank == 3


# --------------------------------------------------------------------------------------------- loop


def test_read_ahead_raises_at_the_failing_item_and_stops():
    seen = []

    def read(i):
        if i == 3:
            raise ValueError("bad item 3")
        return i * 10

    with pytest.raises(ValueError, match="bad item 3"):
        with ReadAhead(range(6), read, depth=2) as values:
            for v in values:
                seen.append(v)
    assert seen == [0, 10, 20]
    assert not any(t.name == "rankwise-read-ahead" for t in threading.enumerate())


def test_cancel_propagates_from_every_operation(gen):
    lora = rand_lora(gen)

    def cancel(done, total, name):
        raise Cancelled("user")

    with pytest.raises(Cancelled):
        resize_sweep(lora, [policy("2"), policy("3")], progress=cancel)
    with pytest.raises(Cancelled):
        merge([MergeInput(lora, 1.0)], mode=MergeMode.SVD, policy=policy("2"), progress=cancel, workers=2)
    with pytest.raises(Cancelled, match="cancelled after 1 of 3"):
        run_layers(lambda n: n, ["a", "b", "c"], progress=lambda d, t, n: (_ for _ in ()).throw(KeyboardInterrupt()))


# --------------------------------------------------------------------------------------------- typed results


def test_typed_stats_and_json_strings(gen):
    lora = rand_lora(gen, n=2)
    out, rep = resize(lora, policy("64"))  # above every layer's limit (8): capped
    for s in rep.layers:
        assert s.status is LayerStatus.OK and s.kind is LayerKind.LINEAR and s.capped and s.fallback is None
    data = json.loads(rep.to_json())
    assert {row["status"] for row in data["layers"]} == {"ok"}
    assert {row["kind"] for row in data["layers"]} == {"linear"}
    assert all(row["capped"] is True and row["non_finite"] == [] for row in data["layers"])


def test_non_finite_inputs_are_named_not_zeroed(gen):
    lora = rand_lora(gen, n=3)
    name = list(lora.layers)[1]
    bad = lora.layers[name]
    up = bad.up.clone()
    up[0, 0] = math.nan
    broken = Lora({**lora.layers, name: LoraLayer(up=up, down=bad.down, alpha=bad.alpha)})
    with pytest.raises(NonFiniteError) as e:
        resize(broken, policy("2"))
    assert e.value.names == (name,)
    with pytest.raises(NonFiniteError) as e:
        merge([MergeInput(lora, 1.0, "good"), MergeInput(broken, 1.0, "bad")], mode=MergeMode.SVD, policy=policy("2"))
    assert e.value.names == (name,) and "bad" in str(e.value)


def test_fallback_rung_is_reported_structurally(gen, monkeypatch):
    original = dx.gram_eigh

    def flaky(W, k, full, driver="evr"):
        if driver == "evr":
            raise torch.linalg.LinAlgError("induced")
        return original(W, k, full, driver=driver)

    monkeypatch.setattr(dx, "gram_eigh", flaky)
    dense = DiffLayer(torch.randn(80, 120, generator=gen))
    _, rep = resize(Lora({"lora_unet_dense": dense}), policy("4"))
    s = rep.layers[0]
    assert s.status is LayerStatus.FALLBACK and s.fallback.startswith("eigh driver evd") and s.dense_input
    assert rep.totals()["fallbacks"] == 1


@pytest.mark.parametrize("method", [SvdMethod.EXACT, SvdMethod.FAST])
def test_a_large_dynamic_rank_costs_two_decompositions_and_is_exact(gen, monkeypatch, method):
    """sv_fro:0.9 of a heavy tail needs far more than 64 values: the complete spectrum (values only)
    decides, then one decomposition at the chosen rank — never a doubling series."""
    m, n = 400, 500
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, m, generator=gen))
    sigma = torch.arange(1, m + 1, dtype=torch.float32) ** -0.5
    a = (u * sigma) @ v.mT
    asked = []
    original = extract_mod.decompose
    monkeypatch.setattr(extract_mod, "decompose", lambda A, k, **kw: asked.append(k) or original(A, k, **kw))
    sel = PolicySelector(policy("sv_fro:0.9"))
    d = decompose_delta(a, _info(a), [sel, PolicySelector(policy("16"))], ExtractOptions(policy=policy("16"), method=method),
                        torch.device("cpu"))
    energy = torch.cumsum(sigma.double() ** 2, 0) / float((sigma.double() ** 2).sum())
    want = int((energy < 0.81 * (1 - 1e-12)).sum()) + 1
    decision = sel.decide(d)
    assert want > 64 and decision.rank == want and decision.certain
    assert asked == [64, want] and d.dec.rank == want


def test_read_ahead_byte_bound_holds_back_but_always_passes_one():
    """With max_bytes, the values waiting stay within the bound (one oversized value still passes)."""
    import time as _time

    sizes = [40, 40, 40, 200, 10, 10, 10, 10]
    waiting_peaks = []
    ra = ReadAhead(range(len(sizes)), lambda i: sizes[i], depth=4, max_bytes=100, size=lambda v: v)
    with ra as values:
        out = []
        for v in values:
            _time.sleep(0.02)  # let the producer run ahead as far as it may
            with ra._cond:
                waiting_peaks.append((len(ra._ready), ra._bytes))
            out.append(v)
    assert out == sizes
    for n, nbytes in waiting_peaks:
        assert n <= 4
        assert nbytes <= 100 or n == 1
    assert any(n >= 2 for n, _ in waiting_peaks)  # it did read ahead more than one


def test_read_ahead_stops_a_producer_blocked_on_the_bound():
    import threading as _threading

    ra = ReadAhead(range(100), lambda i: i, depth=2, name="rankwise-test-bound", max_bytes=1, size=lambda v: 1)
    with ra as values:
        assert next(values) == 0
    assert not any(t.name == "rankwise-test-bound" for t in _threading.enumerate())


def test_layer_parallelism_splits_the_cores():
    from rankwise.core.runtime import layer_parallelism

    assert layer_parallelism("cpu", 1) == (1, 1)
    assert layer_parallelism("cpu", 2) == (2, 1)
    assert layer_parallelism("cpu", 16) == (4, 4)
    assert layer_parallelism("cpu", 6) == (4, 1)
    for n in range(1, 65):
        workers, threads = layer_parallelism("cpu", n)
        assert 1 <= workers <= 4 and workers * threads <= n
    assert layer_parallelism("cuda:0", 16) == (1, None)

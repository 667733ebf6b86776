"""The budget widgets of Extract / Resize / Merge LoRAs (``budget_weighting``, ``full_diff``) reach core.

The node classes are run without ComfyUI: ``comfy_api.latest`` is replaced by a recording stub for the
duration of each test (and removed again, so ``test_node_logic``'s "no ComfyUI imported" check holds),
and ComfyUI's device / progress hooks by CPU / no-op. The pair is a tiny SD1 table with six 64×64
attention layers changed by a full-rank ΔW of one spectrum; three of them have a 30× larger base weight,
so a relative budget (w = 1/‖W_base‖²) and an absolute one (w = 1) must allocate differently.
"""

from __future__ import annotations

import importlib
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from rankwise.core.archs import key_table
from rankwise.core.errors import RankwiseError
from rankwise.core.sources import KeyStyle, StateDictSource
from rankwise.core.synthetic import random_weights
from rankwise.core.types import Arch, DiffLayer
from rankwise.nodes import widgets as w

STUBBED = ("comfy_api", "comfy_api.latest")
NODE_MODULES = ("rankwise.nodes.lora_nodes", "rankwise.nodes.sockets")


class _Spec:
    """Any schema object (Schema, an input or output declaration): records its arguments."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    @property
    def name(self):
        return self.args[0] if self.args else None


class _Kind:
    Input = _Spec
    Output = _Spec


class _NodeOutput:
    def __init__(self, *values, ui=None):
        self.values, self.ui = values, ui


def _stub_modules() -> dict[str, types.ModuleType]:
    io = types.SimpleNamespace(ComfyNode=object, Schema=_Spec, NodeOutput=_NodeOutput, Custom=lambda name: _Kind,
                               Combo=_Kind, Int=_Kind, Float=_Kind, String=_Kind, Boolean=_Kind, Image=_Kind,
                               Model=_Kind, Clip=_Kind, Vae=_Kind)
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ui = io, types.SimpleNamespace(PreviewText=_Spec)
    root = types.ModuleType("comfy_api")
    root.latest = latest
    return {"comfy_api": root, "comfy_api.latest": latest}


@pytest.fixture
def nodes(monkeypatch):
    """``rankwise.nodes.lora_nodes`` imported against the stub; everything it added is removed after."""
    assert not any(m in sys.modules for m in STUBBED + NODE_MODULES), "a real ComfyUI import is in the way"
    for name, module in _stub_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    try:
        mod = importlib.import_module("rankwise.nodes.lora_nodes")
        monkeypatch.setattr(mod.glue, "compute_device", lambda: "cpu")
        monkeypatch.setattr(mod.glue, "progress_bar", lambda: None)
        yield mod
    finally:
        for name in NODE_MODULES:
            sys.modules.pop(name, None)
        pkg = sys.modules.get("rankwise.nodes")
        for attr in ("lora_nodes", "sockets"):
            if pkg is not None and hasattr(pkg, attr):
                delattr(pkg, attr)


# --------------------------------------------------------------------------------------------- data


def _pair():
    table = key_table(Arch.SD1, "tiny")
    specs = [s for s in table.layers if s.rows is None and tuple(s.shape) == (64, 64)
             and s.kohya.startswith("lora_unet") and "attn" in s.kohya][:6]
    assert len(specs) == 6
    base = {k: v.float() for k, v in random_weights(table, seed=1, dtype=torch.float32)}
    tuned = dict(base)
    gen = torch.Generator().manual_seed(2)
    sv = 0.05 * torch.exp(-torch.arange(64, dtype=torch.float32) / 10.0)  # full rank, one spectrum for all
    big = set()
    for i, spec in enumerate(specs):
        if i % 2:
            base[spec.checkpoint_key] = base[spec.checkpoint_key] * 30.0
            big.add(spec.kohya)
        u, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen))
        tuned[spec.checkpoint_key] = base[spec.checkpoint_key] + u @ torch.diag(sv) @ v.T
    pair = SimpleNamespace(base=StateDictSource(base, "base"), tuned=StateDictSource(tuned, "tuned"),
                           key_style=KeyStyle.CHECKPOINT, exact_parts=False)
    return pair, {s.kohya for s in specs}, big


@pytest.fixture(scope="module")
def tiny():
    return _pair()


EXTRACT_WIDGETS = dict(max_rank=128, conv_rank=0, te_rank=0, min_rank=1, layers="all", text_encoders="none",
                       method="exact", clamp_quantile=0.0, seed=0)
RESIZE_WIDGETS = dict(max_rank=128, conv_rank=0, te_rank=0, min_rank=1, strength=1.0)
MERGE_WIDGETS = dict(ratio_1=1.0, ratio_2=-0.5, mode="svd", conv_rank=0, block_weights="", filters="")


def _extract(nodes, pair, rules, **budget):
    out = nodes.RankwiseExtractLoRA.execute(pair, rules, **EXTRACT_WIDGETS, **budget)
    (lora,) = out.values[0]
    return lora


def _ranks(lora) -> dict[str, int]:
    return {n: layer.rank for n, layer in lora.layers.items()}


def _diffs(lora) -> set[str]:
    return {n for n, layer in lora.layers.items() if isinstance(layer, DiffLayer)}


# --------------------------------------------------------------------------------------------- schema


def _inputs(node) -> list[_Spec]:
    return node.define_schema().kwargs["inputs"]


def test_budget_widgets_are_optional_and_last_with_todays_defaults(nodes):
    ext = _inputs(nodes.RankwiseExtractLoRA)
    assert [i.name for i in ext[-2:]] == ["budget_weighting", "full_diff"]
    weighting, full = ext[-2].kwargs, ext[-1].kwargs
    assert [o.value for o in weighting["options"]] == ["relative", "absolute"]
    assert weighting["default"].value == "relative" and full["default"] is False
    for node in (nodes.RankwiseResizeLoRA, nodes.RankwiseMergeLoRAs):  # no base model: no weighting combo
        names = [i.name for i in _inputs(node)]
        assert names[-1] == "full_diff" and "budget_weighting" not in names
        assert _inputs(node)[-1].kwargs["default"] is False
    for node in (nodes.RankwiseExtractLoRA, nodes.RankwiseResizeLoRA, nodes.RankwiseMergeLoRAs):
        for spec in _inputs(node):
            if spec.name in ("budget_weighting", "full_diff"):
                assert spec.kwargs["optional"] is True
                assert "size:/params: rules" in spec.kwargs["tooltip"]


# --------------------------------------------------------------------------------------------- widgets


def test_weighting_widget_values_parse_once():
    assert w.budget_weighting("relative").value == "relative"
    assert w.budget_weighting(" Absolute ").value == "absolute"
    with pytest.raises(RankwiseError, match="relative, absolute"):
        w.budget_weighting("log")
    sels = w.rank_selectors(w.parse_policies("size:1MB,16"), weighting="absolute", full_diff=True)
    assert sels[0].options.weighting.value == "absolute" and sels[0].options.full_diff is True
    assert sels[0].options.dtype is None  # Save LoRA picks the dtype: sized for any 16-bit one
    assert sels[1] == w.parse_policies("16")[0]  # per-layer rules are left as they are


# --------------------------------------------------------------------------------------------- extract


def test_extract_weighting_changes_the_allocation(nodes, tiny):
    pair, names, big = tiny
    relative = _ranks(_extract(nodes, pair, "size:12KB", budget_weighting="relative"))
    absolute = _ranks(_extract(nodes, pair, "size:12KB", budget_weighting="absolute"))
    default = _ranks(_extract(nodes, pair, "size:12KB"))  # widgets left out: today's behaviour
    assert default == relative
    small = names - big
    # absolute: one spectrum for all six layers, so the bytes are shared evenly
    assert max(absolute.values()) - min(absolute.values()) <= 1
    # relative: a 30× larger base weighs 1/900 as much; those layers get (next to) nothing
    assert sum(relative.get(n, 0) for n in big) < sum(absolute.get(n, 0) for n in big)
    assert min(relative[n] for n in small) > max(relative.get(n, 0) for n in big)


def test_extract_full_diff_stores_layers_past_break_even_as_diff(nodes, tiny):
    pair, names, _ = tiny
    with_diff = _extract(nodes, pair, "size:100MB", full_diff=True)
    assert _diffs(with_diff) == names  # cap 64 ≥ 64/2 and the diff is cheaper than rank 64
    for layer in with_diff.layers.values():
        assert layer.rank == 64
    without = _extract(nodes, pair, "size:100MB")
    assert not _diffs(without) and set(_ranks(without).values()) == {64}
    fixed = _extract(nodes, pair, "32", full_diff=True)  # not a budget rule: the widget does nothing
    assert not _diffs(fixed) and set(_ranks(fixed).values()) == {32}


# --------------------------------------------------------------------------------------------- resize / merge


@pytest.fixture(scope="module")
def rank64(tiny):
    from rankwise.core.extract import ExtractOptions, TextEncoderMode, extract_sweep_detailed
    from rankwise.core.rank import RankPolicy, RankRule

    pair, _, _ = tiny
    policy = RankPolicy(RankRule.parse("64"))
    opts = ExtractOptions(policy=policy, text_encoders=TextEncoderMode.NONE, factor_dtype=torch.float32)
    return extract_sweep_detailed(pair.base, pair.tuned, [policy], opts)[0].lora


def test_resize_full_diff_reaches_core(nodes, tiny, rank64):
    _, names, _ = tiny
    on = nodes.RankwiseResizeLoRA.execute(rank64, "size:100MB", **RESIZE_WIDGETS, full_diff=True).values[0][0]
    assert _diffs(on) == names
    off = nodes.RankwiseResizeLoRA.execute(rank64, "size:100MB", **RESIZE_WIDGETS).values[0][0]
    assert not _diffs(off)
    for name in names:  # both exact: the diff is ΔW itself
        ref = rank64.layers[name].delta().double()
        assert float((on.layers[name].delta().double() - ref).norm() / ref.norm()) < 1e-3


def test_merge_full_diff_reaches_core_in_svd_mode(nodes, tiny, rank64):
    _, names, _ = tiny
    merge = nodes.RankwiseMergeLoRAs.execute
    on = merge(rank64, lora_2=rank64, rules="size:100MB", **MERGE_WIDGETS, full_diff=True).values[0]
    assert _diffs(on[0]) == names
    off = merge(rank64, lora_2=rank64, rules="size:100MB", **MERGE_WIDGETS).values[0]
    assert not _diffs(off[0])
    concat = merge(rank64, lora_2=rank64, rules="size:100MB", **{**MERGE_WIDGETS, "mode": "concat"},
                   full_diff=True).values[0]
    assert not _diffs(concat[0])  # concat keeps every rank: the widget is unused

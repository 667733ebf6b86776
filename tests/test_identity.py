"""The identity matrix (LyCORIS style): for every layer kind and every operation, ΔW in = ΔW out.

Layer kinds: linear, conv 1×1, conv 3×3, and a Tucker/LoCon layer (``mid``) on a 3×3 conv.
Operations, each applied so that the exact answer is the input ΔW itself:

* extract — ΔW (rank r) decomposed by the per-layer extract functions at rank r (both methods);
* resize — resized to its own rank r (a Tucker layer is folded to a plain LoRA);
* merge — merged with itself at ratios 0.25 and 0.75, concat and SVD back to rank r;
* save→load — written and read back in fp32, fp16 and bf16.

Stated error, ‖ΔW_out − ΔW_in‖_F / ‖ΔW_in‖_F, by the dtype the result is held in:
fp32 ≤ 2e-6 (fp32 round-off of a few GEMMs and one SVD; measured ≤ 4.4e-7), fp16 ≤ 1e-3 (one
cast of each factor, 2⁻¹¹ relative, twice; measured ≤ 3.7e-4), bf16 ≤ 8e-3 (2⁻⁸ per factor;
measured ≤ 2.9e-3).
"""

from __future__ import annotations

import math

import pytest
import torch

from rankwise.core.archs import key_table
from rankwise.core.extract import ExtractOptions, decompose_delta, layer_output
from rankwise.core.io import load_lora, save_lora
from rankwise.core.merge import MergeInput, MergeMode, merge
from rankwise.core.pipeline import LayerInfo, PolicySelector
from rankwise.core.rank import RankPolicy, RankRule
from rankwise.core.resize import resize
from rankwise.core.svd import SvdMethod
from rankwise.core.types import Arch, LayerKind, Lora, LoraLayer, as_matrix

TOLERANCE = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
RANK = 3
KINDS = ("linear", "conv1x1", "conv3x3", "tucker")
OPERATIONS = ("extract-exact", "extract-fast", "resize", "merge-concat", "merge-svd",
              "save-load-fp32", "save-load-fp16", "save-load-bf16")


def _spec(kind: str):
    """The largest layer of that kind in the tiny SD1 key table (real names, so files load back)."""
    want = {"linear": LayerKind.LINEAR, "conv1x1": LayerKind.CONV1X1, "conv3x3": LayerKind.CONV,
            "tucker": LayerKind.CONV}[kind]
    specs = [s for s in key_table(Arch.SD1, "tiny").layers if s.kind is want and not s.is_text_encoder]
    return max(specs, key=lambda s: math.prod(s.shape))


def _layer(kind: str, gen: torch.Generator) -> tuple[str, LoraLayer]:
    spec = _spec(kind)
    shape = spec.shape
    out_f = shape[0]
    r = RANK
    up = torch.randn(out_f, r, generator=gen)
    if len(shape) == 2:
        down = torch.randn(r, shape[1], generator=gen)
        return spec.kohya, LoraLayer(up=up, down=down, alpha=2.0)
    in_ch, kh, kw = shape[1], shape[2], shape[3]
    up4 = up.reshape(out_f, r, 1, 1)
    if kind == "tucker":
        mid = torch.randn(r, r, kh, kw, generator=gen) / math.sqrt(r * kh * kw)
        down = torch.randn(r, in_ch, 1, 1, generator=gen)
        return spec.kohya, LoraLayer(up=up4, down=down, alpha=2.0, mid=mid)
    down = torch.randn(r, in_ch, kh, kw, generator=gen)
    return spec.kohya, LoraLayer(up=up4, down=down, alpha=2.0)


def _apply(op: str, name: str, layer: LoraLayer, tmp_path) -> tuple[torch.Tensor, torch.dtype]:
    policy = RankPolicy(RankRule.parse(str(RANK)))
    lora = Lora({name: layer}, arch=Arch.SD1)
    if op.startswith("extract"):
        method = SvdMethod.FAST if op.endswith("fast") else SvdMethod.EXACT
        options = ExtractOptions(policy=policy, method=method, factor_dtype=torch.float32)
        a = as_matrix(layer.delta())
        info = LayerInfo(name=name, kind=layer.kind, shape=layer.weight_shape, is_text_encoder=False,
                         limit=min(a.shape))
        d = decompose_delta(a, info, [PolicySelector(policy)], options, torch.device("cpu"))
        decision = PolicySelector(policy).decide(d)
        out, stat = layer_output(d, decision, options)
        assert stat.rank == RANK and not stat.capped and stat.fallback is None
        return out.delta(), torch.float32
    if op == "resize":
        out, rep = resize(lora, policy)
        assert rep.layers[0].rank == RANK and rep.layers[0].status.value == "ok"
        return out.layers[name].delta(), torch.float32
    if op.startswith("merge"):
        mode = MergeMode.CONCAT if op.endswith("concat") else MergeMode.SVD
        inputs = [MergeInput(lora, 0.25, "a"), MergeInput(lora, 0.75, "b")]
        out, rep = merge(inputs, mode=mode, policy=policy if mode is MergeMode.SVD else None)
        assert rep.layers[0].rank == (2 * RANK if mode is MergeMode.CONCAT else RANK)
        return out.layers[name].delta(), torch.float32
    assert op.startswith("save-load")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[op.rsplit("-", 1)[1]]
    path = tmp_path / f"{op}.safetensors"
    save_lora(lora, path, dtype=dtype)
    back, _ = load_lora(path)
    assert set(back.layers) == {name}
    return back.layers[name].delta(), dtype


@pytest.mark.parametrize("op", OPERATIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_delta_in_equals_delta_out(kind, op, tmp_path):
    gen = torch.Generator().manual_seed(1000 + KINDS.index(kind) * 17 + OPERATIONS.index(op))
    name, layer = _layer(kind, gen)
    want = layer.delta().double()
    got, dtype = _apply(op, name, layer, tmp_path)
    assert tuple(got.shape) == tuple(want.shape)
    rel = float((got.double() - want).norm() / want.norm())
    assert rel <= TOLERANCE[dtype], f"{kind} × {op}: relative error {rel:.3g} > {TOLERANCE[dtype]:g}"


def test_the_matrix_can_fail(tmp_path):
    """A wrong rank (one short) is caught by the same check: the tolerance is meaningful."""
    gen = torch.Generator().manual_seed(7)
    name, layer = _layer("linear", gen)
    out, _ = resize(Lora({name: layer}), RankPolicy(RankRule.parse(str(RANK - 1))))
    want = layer.delta().double()
    rel = float((out.layers[name].delta().double() - want).norm() / want.norm())
    assert rel > 100 * TOLERANCE[torch.float32]

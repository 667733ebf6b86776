"""fp8 and ComfyUI scaled-fp8 inputs: exact dequantisation, the right ΔW, clear errors, the rounding note."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from rankwise.core import quant
from rankwise.core.extract import ExtractOptions, extract_detailed
from rankwise.core.generic import diffusion_view
from rankwise.core.rank import RankPolicy, parse_rules
from rankwise.core.sources import KeyStyle, open_source

FP8 = getattr(torch, "float8_e4m3fn", None)
pytestmark = pytest.mark.skipif(FP8 is None, reason="this torch has no float8_e4m3fn")


def _scaled(w: torch.Tensor, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI-style per-tensor scaled fp8: scale = max|w| / fp8 max, stored weight = fp8(w / scale)."""
    dtype = dtype or FP8
    scale = (w.abs().max() / torch.finfo(dtype).max).float().reshape(())
    return (w / scale).to(dtype), scale


def _options(rank: int = 8, **kw) -> ExtractOptions:
    return ExtractOptions(policy=RankPolicy(parse_rules(str(rank))[0]), key_style=KeyStyle.GENERIC,
                          factor_dtype=torch.float32, **kw)


def _pair_files(tmp_path, base: dict, tuned: dict):
    bp, tp = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    save_file(base, str(bp))
    save_file(tuned, str(tp))
    return diffusion_view(open_source(bp)), diffusion_view(open_source(tp))


@pytest.mark.parametrize("dtype_name", ["float8_e4m3fn", "float8_e5m2"])
def test_plain_fp8_is_read_exactly_as_fp32(tmp_path, gen, dtype_name):
    dtype = getattr(torch, dtype_name)
    w = (torch.randn(64, 32, generator=gen) * 4).to(dtype)
    save_file({"blocks.0.q.weight": w}, str(tmp_path / "m.safetensors"))
    src = open_source(tmp_path / "m.safetensors")
    got = src.get("blocks.0.q.weight")
    assert got.dtype == torch.float32 and src.dtype("blocks.0.q.weight") == torch.float32
    assert torch.equal(got, w.float())  # every fp8 value is an fp32 value
    assert src.quant_reads["blocks.0.q.weight"][1] == dtype


def test_scaled_fp8_dequantises_exactly_and_hides_scales(tmp_path, gen):
    w = torch.randn(96, 48, generator=gen) * 0.02
    q, s = _scaled(w)
    sd = {"blocks.0.q.weight": q, "blocks.0.q.scale_weight": s, "blocks.0.q.scale_input": torch.ones(()),
          "blocks.0.q.bias": torch.randn(96, generator=gen), "scaled_fp8": torch.empty(0, dtype=FP8)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    src = open_source(tmp_path / "m.safetensors")
    assert sorted(src.keys()) == ["blocks.0.q.bias", "blocks.0.q.weight"]
    got = src.get("blocks.0.q.weight")
    expected = (q.double() * s.double()).float()  # one rounding of the exact product
    assert torch.equal(got, expected)
    # within fp8's rounding of the original weight
    rel = float((got - w).norm() / w.norm())
    assert rel < 2 * quant.relative_rounding(FP8)


def test_per_row_scale_and_new_weight_scale_spelling(tmp_path, gen):
    w = torch.randn(32, 16, generator=gen)
    rows = (w.abs().amax(dim=1) / 448.0).float()
    q = (w / rows[:, None]).to(FP8)
    save_file({"a.weight": q, "a.weight_scale": rows}, str(tmp_path / "m.safetensors"))
    src = open_source(tmp_path / "m.safetensors")
    assert list(src.keys()) == ["a.weight"]
    assert torch.equal(src.get("a.weight"), (q.double() * rows.double()[:, None]).float())


def test_scaled_fp8_pair_gives_the_true_delta(tmp_path, gen):
    """ΔW from a bf16 base and a scaled-fp8 tuned model = dequantised tuned − base, and the planted
    low-rank change is found within the fp8 rounding."""
    base = {"blocks.0.q.weight": torch.randn(128, 64, generator=gen) * 0.02}
    planted = (torch.randn(128, 2, generator=gen) @ torch.randn(2, 64, generator=gen)) * 0.02
    q, s = _scaled(base["blocks.0.q.weight"] + planted)
    b, t = _pair_files(tmp_path, base, {"blocks.0.q.weight": q, "blocks.0.q.scale_weight": s,
                                        "scaled_fp8": torch.empty(0, dtype=FP8)})
    result = extract_detailed(b, t, _options(rank=64))  # full rank: the LoRA is ΔW itself
    layer = result.lora.layers["diffusion_model.blocks.0.q"]
    true_delta = (q.double() * s.double()).float() - base["blocks.0.q.weight"]
    assert torch.allclose(layer.delta(), true_delta, atol=1e-6)
    # without the scale the "difference" would be garbage: the scaled values are ~1/scale larger
    assert float((q.float() - base["blocks.0.q.weight"]).norm()) > 100 * float(true_delta.norm())
    # the rank-2 planted part is recovered up to fp8 rounding
    low = extract_detailed(b, t, _options(rank=2)).lora.layers["diffusion_model.blocks.0.q"]
    assert float((low.delta() - planted).norm() / planted.norm()) < 0.5


def test_rounding_note_when_rank_leaves_out_less_than_fp8_rounding(tmp_path, gen):
    w = torch.randn(128, 64, generator=gen) * 0.02
    tuned = w + (torch.randn(128, 4, generator=gen) @ torch.randn(4, 64, generator=gen)) * 0.002
    qb, sb = _scaled(w)
    qt, st = _scaled(tuned)
    b, t = _pair_files(tmp_path, {"x.weight": qb, "x.scale_weight": sb},
                       {"x.weight": qt, "x.scale_weight": st})
    notes = extract_detailed(b, t, _options(rank=48)).report.notes
    assert any("1 layers read from fp8 weights (float8_e4m3fn)" in n for n in notes)
    assert any("larger than what the chosen rank leaves out in 1 of 1" in n for n in notes)


def test_no_rounding_note_for_bf16_inputs(tmp_path, gen):
    w = torch.randn(32, 16, generator=gen)
    b, t = _pair_files(tmp_path, {"x.weight": w.bfloat16()}, {"x.weight": (w + 0.1).bfloat16()})
    notes = extract_detailed(b, t, _options(rank=2)).report.notes
    assert not any("fp8" in n for n in notes)


def test_missing_scale_in_a_scaled_file_is_an_error(tmp_path, gen):
    w = torch.randn(8, 8, generator=gen)
    q, s = _scaled(w)
    save_file({"a.weight": q, "a.scale_weight": s, "b.weight": q.clone()}, str(tmp_path / "m.safetensors"))
    with pytest.raises(quant.QuantError, match=r"m.safetensors is a scaled-fp8 file.*1 fp8 weights have no "
                                               r"scale_weight.*b\.weight"):
        open_source(tmp_path / "m.safetensors")
    # the marker alone also makes a file scaled
    save_file({"b.weight": q.clone(), "scaled_fp8": torch.empty(0, dtype=FP8)}, str(tmp_path / "n.safetensors"))
    with pytest.raises(quant.QuantError, match="b.weight"):
        open_source(tmp_path / "n.safetensors")


def test_scale_that_does_not_fit_or_has_no_weight_is_an_error(tmp_path, gen):
    q, _ = _scaled(torch.randn(8, 4, generator=gen))
    save_file({"a.weight": q, "a.scale_weight": torch.ones(4)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(quant.QuantError, match=r"do not fit.*a\.scale_weight \[4\] for a\.weight \[8, 4\]"):
        open_source(tmp_path / "m.safetensors")
    save_file({"a.weight": q, "c.scale_weight": torch.ones(())}, str(tmp_path / "o.safetensors"))
    with pytest.raises(quant.QuantError, match=r"no weight beside them: c\.scale_weight"):
        open_source(tmp_path / "o.safetensors")


def test_zero_or_nan_scale_is_an_error_naming_the_key(tmp_path, gen):
    q, _ = _scaled(torch.randn(8, 4, generator=gen))
    save_file({"a.weight": q, "a.scale_weight": torch.zeros(())}, str(tmp_path / "m.safetensors"))
    src = open_source(tmp_path / "m.safetensors")
    with pytest.raises(quant.QuantError, match="scale of a.weight is not a usable number"):
        src.get("a.weight")


def test_relative_rounding_estimate_matches_measured_rounding(gen):
    w = torch.randn(512, 512, generator=gen)
    for name in ("float8_e4m3fn", "float8_e5m2"):
        dtype = getattr(torch, name)
        measured = float((w.to(dtype).float() - w).norm() / w.norm())
        est = quant.relative_rounding(dtype)
        assert 0.85 * est < measured < 1.15 * est, (name, measured, est)


def test_a_safetensors_header_whose_length_starts_with_the_pickle_opcode_is_read_as_safetensors(tmp_path):
    """A header of 0x?80 bytes makes the file's first byte 0x80 (the pickle protocol opcode)."""
    from rankwise.core.io import FileKind, sniff

    for pad in range(0, 300):
        path = tmp_path / "m.safetensors"
        save_file({"a.weight": torch.zeros(2, 2)}, str(path), metadata={"p": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:  # pragma: no cover
        pytest.skip("no header length with a 0x80 low byte found")
    assert sniff(path) is FileKind.SAFETENSORS
    assert list(open_source(path).keys()) == ["a.weight"]

"""State dict ⇄ Lora: every reader format against ΔW computed independently from the format's
documented math, the kohya writer's invariants, naming/architecture checks and error paths."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise.core.archs import Component, key_table
from rankwise.core.errors import FormatError, MismatchError, NonFiniteError
from rankwise.core.formats import (
    LoraFormat,
    detect_format,
    lora_from_state_dict,
    lora_to_comfy_state_dict,
    lora_to_state_dict,
    with_uniform_alpha,
)
from rankwise.core.types import Arch, DiffLayer, LayerKind, Lora, LoraLayer

SD1 = key_table(Arch.SD1, "tiny")
SD2 = key_table(Arch.SD2, "tiny")
SDXL = key_table(Arch.SDXL, "tiny")


def _spec(table, *, kind: LayerKind, component: Component = Component.UNET, contains: str = ""):
    for s in table.layers:
        if s.kind is kind and s.component is component and contains in s.kohya:
            return s
    raise LookupError(kind)


LINEAR = _spec(SD1, kind=LayerKind.LINEAR, contains="attn2_to_k")
CONV = _spec(SD1, kind=LayerKind.CONV, contains="resnets_0_conv1")
CONV1X1 = _spec(SD1, kind=LayerKind.CONV1X1, contains="proj_in")
TE = _spec(SD1, kind=LayerKind.LINEAR, component=Component.TE1, contains="q_proj")


def _flat(shape) -> tuple[int, int]:
    return int(shape[0]), int(math.prod(shape[1:]))


def _factors(shape, rank, gen, scale=0.3):
    out_f, in_f = _flat(shape)
    up = torch.randn(out_f, rank, generator=gen) * scale
    down = torch.randn(rank, in_f, generator=gen) * scale
    if len(shape) == 4:
        return up.reshape(out_f, rank, 1, 1), down.reshape(rank, *shape[1:])
    return up, down


def _lora(table, specs, gen, *, rank=3, alpha=1.5) -> Lora:
    layers = {}
    for s in specs:
        up, down = _factors(s.shape, rank, gen)
        layers[s.kohya] = LoraLayer(up=up, down=down, alpha=alpha)
    return Lora(layers, metadata={"ss_network_dim": str(rank)}, arch=table.arch)


def _close(a, b, tol=1e-5):
    # (torch.testing.assert_close imports torch.distributed on first use: ~2 s)
    a, b = a.float(), b.float()
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    assert torch.allclose(a, b, atol=tol, rtol=tol), f"max |Δ| = {float((a - b).abs().max()):.3g}"


# --- kohya / LoCon ------------------------------------------------------------------------------


def test_kohya_round_trip_keeps_names_factors_alpha_and_metadata(gen):
    lora = _lora(SD1, [LINEAR, CONV, CONV1X1, TE], gen)
    sd = lora_to_state_dict(lora, dtype=torch.float32)
    assert set(sd) == {f"{n}.{s}" for n in lora.layers for s in ("lora_up.weight", "lora_down.weight", "alpha")}
    back, report = lora_from_state_dict(sd, dict(lora.metadata), table=SD1)
    assert report.formats == (LoraFormat.KOHYA,)
    assert report.modules == 4 and not report.unknown_keys and not report.unmapped_modules
    assert back.arch is Arch.SD1 and dict(back.metadata) == dict(lora.metadata)
    for name, layer in lora.layers.items():
        got = back.layers[name]
        assert isinstance(got, LoraLayer) and got.alpha == 1.5 and got.rank == 3
        assert got.weight_shape == tuple(key_table(Arch.SD1, "tiny").by_kohya(name).shape)
        _close(got.delta(), layer.delta())


def test_kohya_without_alpha_means_scale_one(gen):
    up, down = _factors(LINEAR.shape, 4, gen)
    sd = {f"{LINEAR.kohya}.lora_up.weight": up, f"{LINEAR.kohya}.lora_down.weight": down}
    lora, _ = lora_from_state_dict(sd, table=SD1)
    assert lora.layers[LINEAR.kohya].alpha == 4.0
    _close(lora.layers[LINEAR.kohya].delta(), up @ down)


def test_locon_mid_folds_to_the_conv_delta_and_survives_the_writer(gen):
    out_ch, in_ch, kh, kw = CONV.shape
    r = 3
    up = torch.randn(out_ch, r, 1, 1, generator=gen)
    down = torch.randn(r, in_ch, 1, 1, generator=gen)
    mid = torch.randn(r, r, kh, kw, generator=gen)
    sd = {
        f"{CONV.kohya}.lora_up.weight": up,
        f"{CONV.kohya}.lora_down.weight": down,
        f"{CONV.kohya}.lora_mid.weight": mid,
        f"{CONV.kohya}.alpha": torch.tensor(6.0),
    }
    lora, _ = lora_from_state_dict(sd, table=SD1)
    # The LoCon forward is conv(down 1×1) → conv(mid k×k) → conv(up 1×1); as one kernel:
    expected = torch.zeros(out_ch, in_ch, kh, kw)
    for a in range(r):
        for b in range(r):
            expected += up[:, a, 0, 0][:, None, None, None] * mid[a, b][None, None] * down[b, :, 0, 0][None, :, None, None]
    expected *= 6.0 / r
    layer = lora.layers[CONV.kohya]
    assert layer.mid is not None and layer.weight_shape == CONV.shape
    _close(layer.delta(), expected, 1e-4)
    sd2 = lora_to_state_dict(lora, dtype=torch.float32)
    assert f"{CONV.kohya}.lora_mid.weight" in sd2
    again, _ = lora_from_state_dict(sd2, table=SD1)
    _close(again.layers[CONV.kohya].delta(), expected, 1e-4)


# --- LoHa ----------------------------------------------------------------------------------------


def test_loha_linear_is_the_hadamard_product_scaled_by_alpha_over_rank(gen):
    out_f, in_f = _flat(LINEAR.shape)
    r = 2
    w1a, w1b = torch.randn(out_f, r, generator=gen), torch.randn(r, in_f, generator=gen)
    w2a, w2b = torch.randn(out_f, r, generator=gen), torch.randn(r, in_f, generator=gen)
    k = LINEAR.kohya
    sd = {f"{k}.hada_w1_a": w1a, f"{k}.hada_w1_b": w1b, f"{k}.hada_w2_a": w2a, f"{k}.hada_w2_b": w2b,
          f"{k}.alpha": torch.tensor(1.0)}
    lora, report = lora_from_state_dict(sd, table=SD1)
    expected = torch.empty(out_f, in_f)
    for i in range(out_f):
        for j in range(in_f):
            expected[i, j] = (w1a[i] @ w1b[:, j]) * (w2a[i] @ w2b[:, j]) * (1.0 / r)
    assert report.formats == (LoraFormat.LOHA,) and report.densified == (k,)
    assert isinstance(lora.layers[k], DiffLayer)
    _close(lora.layers[k].delta(), expected, 1e-4)


def test_loha_tucker_conv(gen):
    out_ch, in_ch, kh, kw = CONV.shape
    r = 2
    k = CONV.kohya
    t1, t2 = torch.randn(r, r, kh, kw, generator=gen), torch.randn(r, r, kh, kw, generator=gen)
    # Tucker LoHa stores w*_a as (r, out) and w*_b as (r, in) (LyCORIS / ComfyUI weight_adapter/loha.py).
    w1a, w1b = torch.randn(r, out_ch, generator=gen), torch.randn(r, in_ch, generator=gen)
    w2a, w2b = torch.randn(r, out_ch, generator=gen), torch.randn(r, in_ch, generator=gen)
    sd = {f"{k}.hada_t1": t1, f"{k}.hada_t2": t2, f"{k}.hada_w1_a": w1a, f"{k}.hada_w1_b": w1b,
          f"{k}.hada_w2_a": w2a, f"{k}.hada_w2_b": w2b, f"{k}.alpha": torch.tensor(4.0)}
    lora, _ = lora_from_state_dict(sd, table=SD1)

    def rebuild(t, wa, wb):  # W[p, q, h, w] = Σ_ij t[i, j, h, w] · wa[i, p] · wb[j, q]
        return torch.tensordot(wa.T, torch.tensordot(t, wb, dims=([1], [0])), dims=([1], [0])).permute(0, 3, 1, 2)

    expected = rebuild(t1, w1a, w1b) * rebuild(t2, w2a, w2b) * (4.0 / r)
    assert lora.layers[k].weight_shape == CONV.shape
    _close(lora.layers[k].delta(), expected, 1e-4)


def test_loha_conv_with_flat_factors_is_reshaped_to_the_kernel(gen):
    out_ch, in_ch, kh, kw = CONV.shape
    r, k = 2, CONV.kohya
    w = [torch.randn(out_ch, r, generator=gen), torch.randn(r, in_ch * kh * kw, generator=gen),
         torch.randn(out_ch, r, generator=gen), torch.randn(r, in_ch * kh * kw, generator=gen)]
    sd = dict(zip((f"{k}.hada_w1_a", f"{k}.hada_w1_b", f"{k}.hada_w2_a", f"{k}.hada_w2_b"), w))
    lora, _ = lora_from_state_dict(sd, table=SD1)  # no alpha: scale 1
    _close(lora.layers[k].delta(), ((w[0] @ w[1]) * (w[2] @ w[3])).reshape(CONV.shape), 1e-4)


# --- LoKr ----------------------------------------------------------------------------------------


def _kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """kron by its index definition: K[a·B + b, c·D + d, …] = w1[a, c] · w2[b, d, …]."""
    a, c = w1.shape[:2]
    b, d = w2.shape[:2]
    rest = tuple(w2.shape[2:])
    k = torch.einsum("ac,bd...->abcd...", w1, w2)
    return k.reshape(a * b, c * d, *rest)


@pytest.mark.parametrize("layout", ["w1_full_w2_factored", "w1_factored_w2_full", "both_full", "both_factored"])
def test_lokr_linear(layout, gen):
    out_f, in_f = _flat(LINEAR.shape)  # (16, 24)
    a, c = 4, 6
    b, d = out_f // a, in_f // c
    r, k, alpha = 2, LINEAR.kohya, 3.0
    w1a, w1b = torch.randn(a, r, generator=gen), torch.randn(r, c, generator=gen)
    w2a, w2b = torch.randn(b, r, generator=gen), torch.randn(r, d, generator=gen)
    w1, w2 = torch.randn(a, c, generator=gen), torch.randn(b, d, generator=gen)
    sd = {f"{k}.alpha": torch.tensor(alpha)}
    if layout == "w1_full_w2_factored":
        sd |= {f"{k}.lokr_w1": w1, f"{k}.lokr_w2_a": w2a, f"{k}.lokr_w2_b": w2b}
        expected = _kron(w1, w2a @ w2b) * (alpha / r)
    elif layout == "w1_factored_w2_full":
        sd |= {f"{k}.lokr_w1_a": w1a, f"{k}.lokr_w1_b": w1b, f"{k}.lokr_w2": w2}
        expected = _kron(w1a @ w1b, w2) * (alpha / r)
    elif layout == "both_full":  # nothing factored: LyCORIS ignores alpha (scale 1)
        sd |= {f"{k}.lokr_w1": w1, f"{k}.lokr_w2": w2}
        expected = _kron(w1, w2)
    else:  # both factored: the rank is w2_b's (what ComfyUI and LyCORIS divide by)
        w2b3 = torch.randn(3, d, generator=gen)
        w2a3 = torch.randn(b, 3, generator=gen)
        sd |= {f"{k}.lokr_w1_a": w1a, f"{k}.lokr_w1_b": w1b, f"{k}.lokr_w2_a": w2a3, f"{k}.lokr_w2_b": w2b3}
        expected = _kron(w1a @ w1b, w2a3 @ w2b3) * (alpha / 3)
    lora, report = lora_from_state_dict(sd, table=SD1)
    assert report.formats == (LoraFormat.LOKR,) and report.densified == (k,)
    _close(lora.layers[k].delta(), expected, 1e-4)


@pytest.mark.parametrize("tucker", [False, True])
def test_lokr_conv(tucker, gen):
    out_ch, in_ch, kh, kw = CONV.shape  # (16, 16, 3, 3)
    a, c, r, k = 4, 2, 2, CONV.kohya
    b, d = out_ch // a, in_ch // c
    w1 = torch.randn(a, c, generator=gen)
    sd = {f"{k}.lokr_w1": w1, f"{k}.alpha": torch.tensor(1.0)}
    if tucker:
        t2 = torch.randn(r, r, kh, kw, generator=gen)
        w2a, w2b = torch.randn(r, b, generator=gen), torch.randn(r, d, generator=gen)  # (r, out2), (r, in2)
        sd |= {f"{k}.lokr_t2": t2, f"{k}.lokr_w2_a": w2a, f"{k}.lokr_w2_b": w2b}
        w2 = torch.einsum("ijhw,ip,jq->pqhw", t2, w2a, w2b)
    else:
        w2a, w2b = torch.randn(b, r, generator=gen), torch.randn(r, d, kh, kw, generator=gen)
        sd |= {f"{k}.lokr_w2_a": w2a, f"{k}.lokr_w2_b": w2b}
        w2 = torch.einsum("br,rdhw->bdhw", w2a, w2b)
    lora, _ = lora_from_state_dict(sd, table=SD1)
    assert lora.layers[k].weight_shape == CONV.shape
    _close(lora.layers[k].delta(), _kron(w1, w2) * (1.0 / r), 1e-4)


# --- full diff, PEFT, diffusers, ComfyUI ---------------------------------------------------------


def test_full_diff_is_read_and_bias_diff_is_reported_by_name(gen):
    diff = torch.randn(*CONV.shape, generator=gen)
    sd = {f"{CONV.kohya}.diff": diff, f"{CONV.kohya}.diff_b": torch.randn(CONV.shape[0], generator=gen)}
    lora, report = lora_from_state_dict(sd, table=SD1)
    assert report.formats == (LoraFormat.FULL,)
    assert report.unsupported_keys == (f"{CONV.kohya}.diff_b",)
    assert any(f"{CONV.kohya}.diff_b" in n and "bias" in n for n in report.notes)
    _close(lora.layers[CONV.kohya].delta(), diff)
    # the writer keeps dense layers as .diff
    assert f"{CONV.kohya}.diff" in lora_to_state_dict(lora, dtype=torch.float32)


@pytest.mark.parametrize(
    "prefix_of",
    [
        lambda s: s.diffusers,  # diffusers save_lora_weights: "unet.…", "text_encoder.…"
        lambda s: "base_model.model." + s.diffusers.split(".", 1)[1],  # a PEFT-wrapped bare model
    ],
    ids=["diffusers-peft", "base_model.model"],
)
@pytest.mark.parametrize("suffix", [("lora_A.weight", "lora_B.weight"), ("lora_A.default.weight", "lora_B.default.weight")])
def test_peft_keys_map_to_kohya_names_with_scale_one(prefix_of, suffix, gen):
    sd, expected = {}, {}
    for spec in (LINEAR, CONV1X1, TE):
        up, down = _factors(spec.shape, 2, gen)
        sd[f"{prefix_of(spec)}.{suffix[0]}"] = down
        sd[f"{prefix_of(spec)}.{suffix[1]}"] = up
        expected[spec.kohya] = (up.flatten(1) @ down.flatten(1)).reshape(spec.shape)
    lora, report = lora_from_state_dict(sd, table=SD1)
    assert report.formats == (LoraFormat.PEFT,)
    assert set(lora.layers) == set(expected)
    for name, delta in expected.items():
        _close(lora.layers[name].delta(), delta)


def test_peft_alpha_comes_from_diffusers_adapter_metadata(gen):
    up, down = _factors(LINEAR.shape, 4, gen)
    up_te, down_te = _factors(TE.shape, 4, gen)
    sd = {f"{LINEAR.diffusers}.lora_A.weight": down, f"{LINEAR.diffusers}.lora_B.weight": up,
          f"{TE.diffusers}.lora_A.weight": down_te, f"{TE.diffusers}.lora_B.weight": up_te}
    adapter = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {}, "text_encoder.r": 4,
               "text_encoder.lora_alpha": 4, "text_encoder.alpha_pattern": {"q_proj": 2}}
    lora, report = lora_from_state_dict(sd, {"lora_adapter_metadata": json.dumps(adapter)}, table=SD1)
    _close(lora.layers[LINEAR.kohya].delta(), 2.0 * up @ down)
    _close(lora.layers[TE.kohya].delta(), 0.5 * up_te @ down_te)
    assert any("lora_adapter_metadata" in n for n in report.notes)


def test_diffusers_key_spellings(gen):
    attn = _spec(SD1, kind=LayerKind.LINEAR, contains="attn1_to_q")
    out = _spec(SD1, kind=LayerKind.LINEAR, contains="attn1_to_out_0")
    proc = lambda s: s.diffusers.replace(".attn1.", ".attn1.processor.").removesuffix(".0")  # noqa: E731
    spellings = {
        attn: (f"{proc(attn)}_lora.up.weight", f"{proc(attn)}_lora.down.weight"),  # old attn-procs
        out: (f"{proc(out)}_lora.up.weight", f"{proc(out)}_lora.down.weight"),  # …to_out_lora → to_out.0
        LINEAR: (f"{LINEAR.diffusers}.lora.up.weight", f"{LINEAR.diffusers}.lora.down.weight"),
        TE: (f"{TE.diffusers}.lora_linear_layer.up.weight", f"{TE.diffusers}.lora_linear_layer.down.weight"),
    }
    assert proc(out).endswith("processor.to_out")
    sd, expected = {}, {}
    for spec, (k_up, k_down) in spellings.items():
        up, down = _factors(spec.shape, 2, gen)
        sd[k_up], sd[k_down] = up, down
        expected[spec.kohya] = up @ down
    sd[f"{LINEAR.diffusers}.alpha"] = torch.tensor(1.0)  # "network alphas" next to diffusers keys
    expected[LINEAR.kohya] = expected[LINEAR.kohya] * 0.5
    lora, report = lora_from_state_dict(sd, table=SD1)
    assert report.formats == (LoraFormat.DIFFUSERS,)
    for name, delta in expected.items():
        _close(lora.layers[name].delta(), delta)


@pytest.mark.parametrize("table", [SD1, SDXL], ids=["sd1", "sdxl"])
def test_comfy_native_round_trip(table, gen):
    te_components = [c for c in table.components() if c is not Component.UNET]
    specs = [_spec(table, kind=LayerKind.LINEAR, contains="attn2_to_k"),
             _spec(table, kind=LayerKind.CONV)] + [_spec(table, kind=LayerKind.LINEAR, component=c) for c in te_components]
    lora = _lora(table, specs, gen)
    sd = lora_to_comfy_state_dict(lora, dtype=torch.float32, table=table)
    assert all(k.startswith(("diffusion_model.", "text_encoders.")) for k in sd)
    assert any(k.startswith("text_encoders.clip_l.transformer.text_model.encoder.layers.") for k in sd)
    assert detect_format(sd) == (LoraFormat.COMFY,)
    back, report = lora_from_state_dict(sd, table=table)
    assert report.formats == (LoraFormat.COMFY,) and set(back.layers) == set(lora.layers)
    for name, layer in lora.layers.items():
        _close(back.layers[name].delta(), layer.delta())


def test_comfy_extractor_style_without_alpha_and_with_diff(gen):
    """ComfyUI core's LoraSave writes no .alpha (scale 1) and .diff for full layers."""
    up, down = _factors(LINEAR.shape, 2, gen)
    diff = torch.randn(*CONV.shape, generator=gen)
    lin, conv = LINEAR.comfy_key.removesuffix(".weight"), CONV.comfy_key.removesuffix(".weight")
    sd = {f"{lin}.lora_up.weight": up, f"{lin}.lora_down.weight": down, f"{conv}.diff": diff}
    lora, report = lora_from_state_dict(sd, table=SD1)
    assert report.formats == (LoraFormat.FULL, LoraFormat.COMFY)
    _close(lora.layers[LINEAR.kohya].delta(), up @ down)
    _close(lora.layers[CONV.kohya].delta(), diff)


def test_sdxl_diffusers_style_kohya_names_map_to_sgm_names(gen):
    spec = _spec(SDXL, kind=LayerKind.LINEAR, contains="attn2_to_k")
    alias = "lora_unet_" + spec.diffusers.removeprefix("unet.").replace(".", "_")
    assert alias != spec.kohya
    up, down = _factors(spec.shape, 2, gen)
    lora, _ = lora_from_state_dict({f"{alias}.lora_up.weight": up, f"{alias}.lora_down.weight": down}, table=SDXL)
    assert list(lora.layers) == [spec.kohya]


def test_detect_format_lists_every_style():
    keys = ["lora_unet_a.lora_up.weight", "lora_unet_a.alpha", "x.hada_w1_a", "x.lokr_w1", "y.diff",
            "unet.b.lora_A.weight", "unet.c.lora_linear_layer.up.weight", "diffusion_model.d.lora_down.weight",
            "unet:0:up"]
    assert detect_format(keys) == tuple(LoraFormat)
    assert detect_format(["nothing.here"]) == ()


# --- reporting and errors ------------------------------------------------------------------------


def test_unknown_keys_are_reported_by_name_and_the_rest_is_read(gen):
    lora = _lora(SD1, [LINEAR], gen)
    sd = lora_to_state_dict(lora, dtype=torch.float32)
    sd["lora_unet_mystery.some_tensor"] = torch.zeros(3)
    sd[f"{TE.kohya}.lora_up.weight"] = torch.zeros(TE.shape[0], 2)  # up without its down
    back, report = lora_from_state_dict(sd, table=SD1)
    assert set(report.unknown_keys) == {"lora_unet_mystery.some_tensor", f"{TE.kohya}.lora_up.weight"}
    assert list(back.layers) == [LINEAR.kohya]
    assert "lora_unet_mystery.some_tensor" in report.summary()


def test_unmapped_modules_kohya_kept_foreign_dropped_both_reported(gen):
    lora = _lora(SD1, [LINEAR, CONV, TE], gen)
    sd = lora_to_state_dict(lora, dtype=torch.float32)
    sd["lora_unet_extra_layer.lora_up.weight"] = torch.randn(4, 2, generator=gen)
    sd["lora_unet_extra_layer.lora_down.weight"] = torch.randn(2, 5, generator=gen)
    sd["unet.not.a.layer.lora_A.weight"] = torch.randn(2, 5, generator=gen)
    sd["unet.not.a.layer.lora_B.weight"] = torch.randn(4, 2, generator=gen)
    back, report = lora_from_state_dict(sd, table=SD1)
    assert set(report.unmapped_modules) == {"lora_unet_extra_layer", "unet.not.a.layer"}
    assert "lora_unet_extra_layer" in back.layers and "unet.not.a.layer" not in back.layers
    assert any("dropped" in n and "unet.not.a.layer" in n for n in report.notes)
    assert any("kept" in n and "lora_unet_extra_layer" in n for n in report.notes)


def test_nothing_understood_is_a_format_error_listing_keys():
    with pytest.raises(FormatError, match=r"no LoRA module recognised.*model\.weird\.key"):
        lora_from_state_dict({"model.weird.key": torch.zeros(2), "other": torch.zeros(1)})


def test_cloneofsimo_file_that_fits_no_layer_order_is_refused_with_an_explanation():
    """Read by core.cloneofsimo (tests/test_cloneofsimo.py); one layer fits no SD1/SD2 numbering."""
    sd = {"unet:0:up": torch.zeros(4, 1), "unet:0:down": torch.zeros(1, 4)}
    with pytest.raises(MismatchError, match="cloneofsimo file .* fits no SD1/SD2 layer order"):
        lora_from_state_dict(sd, {"unet": '["CrossAttention"]'})


def test_sd1_lora_read_as_sdxl_is_a_mismatch_naming_keys(gen):
    lora = _lora(SD1, [LINEAR, TE], gen)
    sd = lora_to_state_dict(lora, dtype=torch.float32)
    with pytest.raises(MismatchError, match=r"(not layers of|belong to) sdxl.*lora_(unet|te)_"):
        lora_from_state_dict(sd, table=SDXL)
    with pytest.raises(MismatchError, match="sdxl"):
        lora_from_state_dict(sd, arch=Arch.SDXL)  # the full-size SDXL table


def test_same_names_other_shapes_is_a_mismatch_naming_the_layer(gen):
    """SD1 and SD2 share kohya names; the cross-attention / text-encoder widths tell them apart."""
    lora = _lora(SD2, [_spec(SD2, kind=LayerKind.LINEAR, contains="attn2_to_k")], gen)
    sd = lora_to_state_dict(lora, dtype=torch.float32)
    with pytest.raises(MismatchError, match=r"attn2_to_k.*expects \(16, 24\)"):
        lora_from_state_dict(sd, table=SD1)


@pytest.mark.parametrize("arch, te_width", [(Arch.SD1, 768), (Arch.SD2, 1024)])
def test_architecture_is_detected_from_names_and_shapes(arch, te_width, gen):
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    sd = {f"{name}.lora_up.weight": torch.randn(te_width, 1, generator=gen),
          f"{name}.lora_down.weight": torch.randn(1, te_width, generator=gen)}
    lora, _ = lora_from_state_dict(sd)
    assert lora.arch is arch and list(lora.layers) == [name]


def test_without_a_known_architecture_kohya_names_are_kept_and_noted(gen):
    sd = {"lora_unet_custom.lora_up.weight": torch.randn(3, 1, generator=gen),
          "lora_unet_custom.lora_down.weight": torch.randn(1, 3, generator=gen)}
    lora, report = lora_from_state_dict(sd)
    assert lora.arch is None and list(lora.layers) == ["lora_unet_custom"]
    assert any("not recognised" in n for n in report.notes)
    with pytest.raises(FormatError, match="arch="):
        lora_from_state_dict({"unet.custom.lora_A.weight": torch.zeros(1, 3), "unet.custom.lora_B.weight": torch.zeros(3, 1)})


def test_broken_factors_are_a_format_error_naming_the_module():
    sd = {f"{LINEAR.kohya}.lora_up.weight": torch.zeros(16, 3), f"{LINEAR.kohya}.lora_down.weight": torch.zeros(2, 24)}
    with pytest.raises(FormatError, match=LINEAR.kohya):
        lora_from_state_dict(sd, table=SD1)


def test_non_finite_alpha_is_named():
    sd = {f"{LINEAR.kohya}.lora_up.weight": torch.zeros(16, 2), f"{LINEAR.kohya}.lora_down.weight": torch.zeros(2, 24),
          f"{LINEAR.kohya}.alpha": torch.tensor(float("nan"))}
    with pytest.raises(NonFiniteError, match=LINEAR.kohya):
        lora_from_state_dict(sd, table=SD1)


# --- writer --------------------------------------------------------------------------------------


def test_writer_tensors_are_contiguous_private_copies_in_the_save_dtype(gen):
    base = torch.randn(40, 24, generator=gen)
    up = base[:16, :3]  # a non-contiguous view into a larger tensor
    down = base[16:19, :].clone()
    lora = Lora({LINEAR.kohya: LoraLayer(up=up, down=down, alpha=3.0)}, arch=Arch.SD1)
    sd = lora_to_state_dict(lora, dtype=torch.float16)
    ptrs = [t.untyped_storage().data_ptr() for t in sd.values()]
    assert len(set(ptrs)) == len(ptrs) and base.untyped_storage().data_ptr() not in ptrs
    assert all(t.is_contiguous() for t in sd.values())
    assert sd[f"{LINEAR.kohya}.lora_up.weight"].dtype == torch.float16
    alpha = sd[f"{LINEAR.kohya}.alpha"]
    assert alpha.dim() == 0 and alpha.dtype == torch.float16 and alpha.item() == 3.0


def test_alpha_that_the_save_dtype_would_round_is_written_in_fp32(gen):
    up, down = _factors(LINEAR.shape, 3, gen)
    lora = Lora({LINEAR.kohya: LoraLayer(up=up, down=down, alpha=1 / 3)})
    alpha = lora_to_state_dict(lora, dtype=torch.float16)[f"{LINEAR.kohya}.alpha"]
    assert alpha.dtype == torch.float32 and alpha.item() == pytest.approx(1 / 3, rel=1e-7)


def test_fp16_overflow_after_the_cast_names_the_layer(gen):
    up, down = _factors(LINEAR.shape, 2, gen)
    lora = Lora({LINEAR.kohya: LoraLayer(up=up * 1e6, down=down, alpha=2.0),
                 TE.kohya: LoraLayer(*_factors(TE.shape, 2, gen), alpha=2.0)})
    with pytest.raises(NonFiniteError, match=f"overflow float16.*{LINEAR.kohya}") as info:
        lora_to_state_dict(lora, dtype=torch.float16)
    assert info.value.names == (LINEAR.kohya,)
    lora_to_state_dict(lora, dtype=torch.float32)  # fine in fp32


def test_nan_is_named_before_the_cast(gen):
    up, down = _factors(LINEAR.shape, 2, gen)
    down[0, 0] = float("nan")
    lora = Lora({LINEAR.kohya: LoraLayer(up=up, down=down, alpha=2.0)})
    with pytest.raises(NonFiniteError, match=f"NaN.*{LINEAR.kohya}") as info:
        lora_to_state_dict(lora)
    assert info.value.names == (LINEAR.kohya,)


def test_with_uniform_alpha_keeps_every_delta(gen):
    layers = {s.kohya: LoraLayer(*_factors(s.shape, r, gen), alpha=float(r)) for s, r in ((LINEAR, 1), (CONV, 2), (TE, 2))}
    layers[CONV1X1.kohya] = DiffLayer(torch.randn(*CONV1X1.shape, generator=gen))
    lora = Lora(layers, arch=Arch.SD1)
    uniform = with_uniform_alpha(lora)
    assert {l.alpha for l in uniform.layers.values() if isinstance(l, LoraLayer)} == {2.0}
    for name, layer in lora.layers.items():
        _close(uniform.layers[name].delta(), layer.delta())
    assert with_uniform_alpha(lora, 0.5).layers[LINEAR.kohya].alpha == 0.5
    with pytest.raises(ValueError, match="positive"):
        with_uniform_alpha(lora, 0.0)


@settings(max_examples=25, deadline=None)
@given(
    rank=st.integers(1, 6),
    alpha=st.floats(0.25, 64, allow_nan=False),
    which=st.sampled_from(["linear", "conv", "conv1x1", "te"]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(rank, alpha, which, seed):
    spec = {"linear": LINEAR, "conv": CONV, "conv1x1": CONV1X1, "te": TE}[which]
    g = torch.Generator().manual_seed(seed)
    layer = LoraLayer(*_factors(spec.shape, rank, g), alpha=alpha)
    lora = Lora({spec.kohya: layer}, arch=Arch.SD1)
    back, _ = lora_from_state_dict(lora_to_state_dict(lora, dtype=torch.float32), table=SD1)
    got = back.layers[spec.kohya]
    assert got.rank == rank and got.alpha == pytest.approx(alpha, rel=1e-7)
    _close(got.delta(), layer.delta())


def test_tiny_test_tables_are_recognised_too(gen):
    """Files made from the tiny test/demo tables load with their architecture, not as unknown names."""
    lora = _lora(SDXL, [_spec(SDXL, kind=LayerKind.LINEAR, contains="attn2_to_k")], gen)
    sd = lora_to_state_dict(lora, dtype=torch.float32)
    assert lora_from_state_dict(sd)[0].arch is Arch.SDXL
    assert lora_from_state_dict(sd, arch=Arch.SDXL)[0].arch is Arch.SDXL


def test_text_encoder_paths_without_text_model_level(gen):
    """transformers ≥ 5 CLIPTextModel has no ``text_model`` level; PEFT keys saved from it still map."""
    up, down = _factors(TE.shape, 2, gen)
    path = TE.diffusers.replace("text_model.", "")
    lora, _ = lora_from_state_dict({f"{path}.lora_A.weight": down, f"{path}.lora_B.weight": up}, table=SD1)
    assert list(lora.layers) == [TE.kohya]


def test_flat_factors_for_a_1x1_conv_take_the_conv_layout(gen):
    up, down = torch.randn(CONV1X1.shape[0], 2, generator=gen), torch.randn(2, CONV1X1.shape[1], generator=gen)
    k = CONV1X1.kohya
    lora, _ = lora_from_state_dict({f"{k}.lora_up.weight": up, f"{k}.lora_down.weight": down}, table=SD1)
    layer = lora.layers[k]
    assert layer.up.shape == (CONV1X1.shape[0], 2, 1, 1) and layer.down.shape == (2, CONV1X1.shape[1], 1, 1)
    _close(layer.delta(), (up @ down).reshape(CONV1X1.shape))


def test_reading_names_layers_with_nan(gen):
    up, down = _factors(LINEAR.shape, 2, gen)
    up[0, 0] = float("inf")
    _, report = lora_from_state_dict({f"{LINEAR.kohya}.lora_up.weight": up, f"{LINEAR.kohya}.lora_down.weight": down}, table=SD1)
    assert any("NaN/Inf" in n and LINEAR.kohya in n for n in report.notes)

"""The ComfyUI-free logic of the node layer (``nodes/widgets.py``, ``nodes/pair.py``).

Widget strings are parsed once into core types; these tests pin that parsing (rank rules into
policies, labels, dtypes, file-name prefixes, filters), the pair views the Clean CLIP node builds,
the LORA ⇄ LORA_MODEL conversion and the grid layout math. Nothing here imports ComfyUI.
"""

from __future__ import annotations

import functools
import sys

import pytest
import torch

from rankwise.core.archs import Component, key_table
from rankwise.core.clip import text_encoder_report
from rankwise.core.errors import MismatchError, RankwiseError, UnsafePathError
from rankwise.core.formats import lora_from_state_dict, lora_to_comfy_state_dict, lora_to_state_dict
from rankwise.core.rank import RuleKind
from rankwise.core.sources import KeyStyle, StateDictSource
from rankwise.core.synthetic import random_lora, random_weights
from rankwise.core.types import Arch
from rankwise.nodes import pair as pair_mod
from rankwise.nodes import widgets as w

TINY_SD1 = key_table(Arch.SD1, "tiny")
TINY_SDXL = key_table(Arch.SDXL, "tiny")


def test_node_logic_modules_do_not_import_comfyui():
    assert not any(name == "comfy" or name.startswith(("comfy.", "comfy_api", "folder_paths")) for name in sys.modules)


# --------------------------------------------------------------------------------------------- rules


def test_single_fixed_rule_gives_one_policy_without_caps():
    (p,) = w.parse_policies("32", max_rank=0, conv_rank=0, te_rank=0, min_rank=1)
    assert p.rule.kind is RuleKind.FIXED and p.rule.value == 32
    assert (p.max_rank, p.conv_rank, p.te_rank, p.min_rank) == (None, None, None, 1)


def test_sweep_keeps_order_and_drops_duplicates():
    policies = w.parse_policies("8, 16;32,8 ,64")
    assert [int(p.rule.value) for p in policies] == [8, 16, 32, 64]
    assert w.sweep_labels(policies) == ["rank 8", "rank 16", "rank 32", "rank 64"]


def test_dynamic_rules_and_limits_reach_every_policy():
    policies = w.parse_policies("sv_fro:0.8, sv_fro:0.9", max_rank=64, conv_rank=8, te_rank=4, min_rank=2)
    assert [p.rule.kind for p in policies] == [RuleKind.SV_FRO, RuleKind.SV_FRO]
    assert all((p.max_rank, p.conv_rank, p.te_rank, p.min_rank) == (64, 8, 4, 2) for p in policies)
    assert w.sweep_labels(policies) == ["sv_fro 0.8", "sv_fro 0.9"]


@pytest.mark.parametrize("text", ["", " , ", "abc", "sv_fro:1.5", "0", "sv_ratio:0.5", "rank:8"])
def test_bad_rules_raise_a_rankwise_error_quoting_the_widget(text):
    with pytest.raises(RankwiseError, match="rank rules"):
        w.parse_policies(text)


@pytest.mark.parametrize("field", ["max_rank", "conv_rank", "te_rank"])
def test_negative_or_fractional_limits_are_refused(field):
    with pytest.raises(RankwiseError, match=field):
        w.parse_policies("16", **{field: -1})
    with pytest.raises(RankwiseError, match=field):
        w.parse_policies("16", **{field: 2.5})


def test_optional_rank_zero_means_unset():
    assert w.optional_rank(0, "x") is None and w.optional_rank(None, "x") is None
    assert w.optional_rank(12, "x") == 12 and w.optional_rank(12.0, "x") == 12


def test_single_policy_refuses_a_sweep():
    assert w.single_policy("sv_fro:0.95", conv_rank=4).conv_rank == 4
    with pytest.raises(RankwiseError, match="takes one"):
        w.single_policy("8,16")


@pytest.mark.parametrize(
    "label, token",
    [("rank 16", "rank16"), ("sv_fro 0.9", "sv_fro0.9"), ("threshold 0.01", "threshold0.01"), (" a/b:c ", "a_b_c"), ("", "")],
)
def test_label_tokens_are_file_name_safe(label, token):
    assert w.label_token(label) == token


# --------------------------------------------------------------------------------------------- dtypes


def test_dtype_names_are_stable_and_map_to_torch():
    assert [d.value for d in w.SaveDtype] == ["fp16", "bf16", "fp32"]
    assert w.dtype_from_name("fp16") is torch.float16
    assert w.dtype_from_name(" BF16 ") is torch.bfloat16
    assert w.dtype_from_name("fp32") is torch.float32
    with pytest.raises(RankwiseError, match="fp16, bf16, fp32"):
        w.dtype_from_name("fp8")


def test_combo_vocabularies_are_stable():
    assert [m.value for m in w.CleanMode] == [
        "report only", "replace differing encoders with base", "replace all encoders with base"]
    assert [k.value for k in w.LoraModelKeys] == ["comfyui", "kohya"]


# --------------------------------------------------------------------------------------------- file names


@pytest.mark.parametrize(
    "prefix, expected",
    [
        ("", w.DEFAULT_PREFIX),
        ("   ", w.DEFAULT_PREFIX),
        ("rankwise/lora", "rankwise/lora"),
        ("my\\style\\v2", "my/style/v2"),
        ("style.safetensors", "style"),
        ("a//./b/", "a/b"),
        ('we<ird>:na|me?*', "we_ird__na_me__"),
        ("%year%-%month%/x", "%year%-%month%/x"),
        ("./", w.DEFAULT_PREFIX),
    ],
)
def test_prefix_sanitising(prefix, expected):
    assert w.sanitize_prefix(prefix) == expected


@pytest.mark.parametrize("prefix", ["/etc/x", "C:\\loras\\x", "c:x", "../x", "a/../../b", "a\\..\\b"])
def test_prefixes_leaving_the_folder_are_refused(prefix):
    with pytest.raises(UnsafePathError):
        w.sanitize_prefix(prefix)


def test_suffix_counter_and_relative_names():
    assert w.prefix_with_suffix("rankwise/lora", "rank 16") == "rankwise/lora_rank16"
    assert w.prefix_with_suffix("rankwise/lora", "  ") == "rankwise/lora"
    assert w.counter_file_name("lora_rank16", 7) == "lora_rank16_00007_.safetensors"
    assert w.relative_lora_name("", "a.safetensors") == "a.safetensors"
    assert w.relative_lora_name("rankwise", "a.safetensors").replace("\\", "/") == "rankwise/a.safetensors"


# --------------------------------------------------------------------------------------------- merge widgets


def test_filters_split_into_include_and_exclude_globs():
    assert w.parse_filters("") == ((), ())
    inc, exc = w.parse_filters("lora_unet_*, !*ff_net*\n-lora_te; attn2")
    assert inc == ("lora_unet_*", "*attn2*")
    assert exc == ("*ff_net*", "lora_te*") or exc == ("*ff_net*", "*lora_te*")


def test_filter_with_nothing_after_the_bang_is_an_error():
    with pytest.raises(RankwiseError, match="excludes nothing"):
        w.parse_filters("a, !")


def test_merge_ratios_keep_connected_slots_and_their_numbers():
    a, b = object(), object()
    assert w.merge_ratios([(a, 1.0), (None, 5.0), (b, -1)]) == [(1, a, 1.0), (3, b, -1.0)]
    with pytest.raises(RankwiseError, match="ratio_2"):
        w.merge_ratios([(a, 1.0), (b, float("nan"))])


# --------------------------------------------------------------------------------------------- coverage


def test_apply_coverage_names_every_module_not_applied():
    modules = ["lora_unet_a", "lora_unet_b", "lora_unet_c", "lora_te_x"]
    key_map = {"lora_unet_a": "diffusion_model.a.weight", "lora_unet_b": "diffusion_model.b.weight"}
    cov = w.apply_coverage(modules, key_map, {"diffusion_model.a.weight"}, clip_connected=False)
    assert cov.applied == ("lora_unet_a",) and cov.total == 4
    assert cov.missing == {"lora_unet_b": w.NOT_PATCHED, "lora_unet_c": w.NO_TARGET, "lora_te_x": w.NO_CLIP}
    text = cov.summary()
    assert text.startswith("applied 1 of 4 modules; not applied:")
    assert all(name in text for name in ("lora_unet_b", "lora_unet_c", "lora_te_x"))
    full = w.apply_coverage(["lora_unet_a"], key_map, {"diffusion_model.a.weight"}, clip_connected=True)
    assert full.summary() == "applied 1 of 1 modules"


# --------------------------------------------------------------------------------------------- grid


@pytest.mark.parametrize("count, columns, cols, rows", [(1, 0, 1, 1), (4, 0, 2, 2), (5, 0, 3, 2), (10, 0, 4, 3),
                                                        (3, 5, 3, 1), (7, 2, 2, 4)])
def test_grid_layout_rows_and_columns(count, columns, cols, rows):
    g = w.grid_layout(count, 64, 32, columns=columns, label_h=10, gap=4)
    assert (g.columns, g.rows) == (cols, rows)
    assert g.width == cols * 64 + (cols + 1) * 4
    assert g.height == rows * (32 + 10) + (rows + 1) * 4
    # cells never overlap and stay inside the canvas
    boxes = [(*g.origin(i), 64, 42) for i in range(count)]
    for x, y, bw, bh in boxes:
        assert 0 <= x and x + bw <= g.width and 0 <= y and y + bh <= g.height
    assert len({(x, y) for x, y, _, _ in boxes}) == count


def test_grid_layout_errors():
    with pytest.raises(RankwiseError, match="at least one"):
        w.grid_layout(0, 8, 8)
    with pytest.raises(RankwiseError, match="columns"):
        w.grid_layout(3, 8, 8, columns=-1)
    with pytest.raises(IndexError):
        w.grid_layout(3, 8, 8).origin(3)


def test_labels_expand_over_batches():
    assert w.expand_labels(["a", "b"], [1, 1]) == ["a", "b"]
    assert w.expand_labels(["a", "b"], [2, 1]) == ["a #1", "a #2", "b"]
    assert w.expand_labels(["a", "b", "c"], [3]) == ["a", "b", "c"]
    assert w.expand_labels(["a"], [1, 1, 1]) == ["a", "", ""]
    assert w.expand_labels([], [2]) == ["", ""]


def test_image_tensor_round_trip_and_grid_size():
    gen = torch.Generator().manual_seed(0)
    batch = torch.rand(2, 12, 20, 3, generator=gen)
    pils = w.image_to_pils(batch)
    assert [p.size for p in pils] == [(20, 12), (20, 12)]
    back = torch.cat([w.pil_to_image(p) for p in pils])
    assert back.shape == batch.shape and back.dtype == torch.float32
    assert torch.allclose(back, batch, atol=1 / 255)
    grid = w.render_grid(pils + [w.image_to_pils(torch.zeros(1, 6, 10, 1))[0]], ["rank 8", "rank 16", "x"], columns=2)
    bare = w.grid_layout(3, 20, 12, columns=2, label_h=0)
    assert grid.width == bare.width
    band = (grid.height - bare.height) / bare.rows
    assert band > 0 and band == int(band)  # one label band per row
    img = w.pil_to_image(grid)
    assert img.shape[0] == 1 and img.shape[-1] == 3 and float(img.min()) >= 0 and float(img.max()) <= 1


def test_image_to_pils_rejects_bad_shapes():
    with pytest.raises(RankwiseError, match="IMAGE"):
        w.image_to_pils(torch.zeros(4, 4))
    with pytest.raises(RankwiseError, match="channels"):
        w.image_to_pils(torch.zeros(1, 4, 4, 2))


# --------------------------------------------------------------------------------------------- pairs


def _tiny_pair_dicts(table, *, seed: int = 0):
    """Fresh dicts (callers may add keys) over shared tensors, made once per table."""
    base, tuned = _cached_pair(table, seed)
    return dict(base), dict(tuned)


@functools.lru_cache(maxsize=None)
def _cached_pair(table, seed: int, te_scale: float = 0.05, unet_scale: float = 0.05):
    base = dict(random_weights(table, seed=seed, dtype=torch.float32))
    gen = torch.Generator().manual_seed(seed + 1)
    tuned = {}
    te_prefixes = tuple(pair_mod.encoder_prefixes(table.arch, KeyStyle.CHECKPOINT).values())
    for key, t in base.items():
        scale = te_scale if key.startswith(te_prefixes) else unet_scale
        tuned[key] = t + scale * t.std() * torch.randn(t.shape, generator=gen)
    return base, tuned


def test_make_pair_checks_and_describes():
    base, tuned = _tiny_pair_dicts(TINY_SD1)
    pair = pair_mod.make_pair(StateDictSource(base, "base.safetensors"), StateDictSource(tuned, "tuned.safetensors"))
    assert pair.arch is Arch.SD1 and pair.text_encoders == (Component.TE1,)
    text = pair.describe()
    assert "pair OK: SD1 (tiny test layout)" in text and "tuned: tuned.safetensors" in text


def test_make_pair_mismatch_raises_core_error():
    base, _ = _tiny_pair_dicts(TINY_SD1)
    other, _ = _tiny_pair_dicts(TINY_SDXL)
    with pytest.raises(MismatchError, match="architectures differ"):
        pair_mod.make_pair(StateDictSource(base, "a"), StateDictSource(other, "b"))
    broken = dict(base)
    broken.pop(next(iter(broken)))
    with pytest.raises(MismatchError, match="missing"):
        pair_mod.make_pair(StateDictSource(base, "a"), StateDictSource(broken, "b"))


def test_replaced_encoder_view_serves_base_tensors_and_zeroes_their_delta():
    base, tuned = _tiny_pair_dicts(TINY_SDXL)
    pair = pair_mod.make_pair(StateDictSource(base, "base"), StateDictSource(tuned, "tuned"))
    before = {d.component: d for d in text_encoder_report(pair.base, pair.tuned, pair.table)}
    assert before[Component.TE1].differs and before[Component.TE2].differs

    view = pair_mod.with_encoders_from_base(pair, [Component.TE2])
    assert view.replaced == (Component.TE2,) and view.tuned is not pair.tuned
    assert set(view.tuned.keys()) == set(pair.tuned.keys())
    te2 = pair_mod.encoder_prefixes(Arch.SDXL, KeyStyle.CHECKPOINT)[Component.TE2]
    te1 = pair_mod.encoder_prefixes(Arch.SDXL, KeyStyle.CHECKPOINT)[Component.TE1]
    for key in base:
        expected = base[key] if key.startswith(te2) else tuned[key]
        assert view.tuned.get(key) is expected
        assert view.tuned.shape(key) == tuple(expected.shape)
    assert any(k.startswith(te1) for k in base) and any(k.startswith(te2) for k in base)

    after = {d.component: d for d in text_encoder_report(view.base, view.tuned, view.table)}
    assert after[Component.TE2].relative == 0.0 and not after[Component.TE2].differs
    assert after[Component.TE1].relative == pytest.approx(before[Component.TE1].relative)
    # the view checks as a pair again, and the original pair is untouched
    pair_mod.make_pair(view.base, view.tuned)
    assert pair.tuned.get(next(k for k in base if k.startswith(te2))) is tuned[next(k for k in base if k.startswith(te2))]
    assert "text encoders taken from base: te2" in view.describe()


def test_replacing_an_absent_encoder_is_an_error():
    base, tuned = _tiny_pair_dicts(TINY_SD1)
    pair = pair_mod.make_pair(StateDictSource(base, "base"), StateDictSource(tuned, "tuned"))
    with pytest.raises(MismatchError, match="no text encoder te2"):
        pair_mod.with_encoders_from_base(pair, [Component.TE2])
    assert pair_mod.with_encoders_from_base(pair, []).tuned is pair.tuned


def test_position_ids_are_reported_and_served_repaired():
    base, tuned = _tiny_pair_dicts(TINY_SD1)
    key = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    good = torch.arange(77, dtype=torch.int64).reshape(1, 77)
    bad = good.double()
    bad[0, 76] = 75.9999
    base[key], tuned[key] = good, bad
    pair = pair_mod.make_pair(StateDictSource(base, "base"), StateDictSource(tuned, "tuned"))
    assert pair_mod.position_ids_problems(pair.tuned) == {key: (76,)}
    assert pair_mod.position_ids_problems(pair.base) == {}
    view = pair_mod.with_encoders_from_base(pair, [], fix_position_ids=True)
    assert view.position_ids_fixed and torch.equal(view.tuned.get(key), good)
    assert view.tuned.dtype(key) is torch.int64 and view.tuned.shape(key) == (1, 77)
    assert pair_mod.position_ids_problems(view.tuned) == {}


def test_comfy_keyed_pair_replaces_whole_clip_prefix():
    base = {spec.comfy_key: torch.randn(spec.shape) for spec in TINY_SD1.layers}
    tuned = {k: v + 0.1 for k, v in base.items()}
    base["clip_l.logit_scale"] = torch.tensor(1.0)
    tuned["clip_l.logit_scale"] = torch.tensor(2.0)
    pair = pair_mod.make_pair(StateDictSource(base, "b"), StateDictSource(tuned, "t"), key_style=KeyStyle.COMFY)
    view = pair_mod.with_encoders_from_base(pair, [Component.TE1])
    assert view.tuned.get("clip_l.logit_scale") is base["clip_l.logit_scale"]
    unet_key = next(k for k in base if k.startswith("diffusion_model."))
    assert view.tuned.get(unet_key) is tuned[unet_key]
    assert pair_mod.comfy_clip_prefix("clip_g.transformer.") == "clip_g."


def test_union_source_serves_first_owner():
    a = StateDictSource({"x": torch.zeros(2), "y": torch.ones(3)}, "a")
    b = StateDictSource({"y": torch.full((4,), 2.0), "z": torch.ones(1, 1)}, "b")
    u = pair_mod.UnionSource([a, b])
    assert sorted(u.keys()) == ["x", "y", "z"] and u.name == "a + b"
    assert u.shape("y") == (3,) and u.get("z").shape == (1, 1) and u.dtype("x") is torch.float32
    assert "z" in u and "w" not in u
    with pytest.raises(ValueError):
        pair_mod.UnionSource([])


# --------------------------------------------------------------------------------------------- LORA ⇄ LORA_MODEL


@pytest.mark.parametrize("writer", ["comfy", "kohya"])
def test_lora_model_round_trip(writer):
    lora = random_lora(TINY_SD1, rank=4, seed=3)
    if writer == "comfy":
        sd = lora_to_comfy_state_dict(lora, dtype=torch.float32, table=TINY_SD1)
        assert all(k.startswith(("diffusion_model.", "text_encoders.")) for k in sd)
    else:
        sd = lora_to_state_dict(lora, dtype=torch.float32)
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in sd)
    back, read = lora_from_state_dict(sd, table=TINY_SD1)
    assert set(back.layers) == set(lora.layers) and read.unknown_keys == ()
    for name, layer in lora.layers.items():
        torch.testing.assert_close(back.layers[name].delta(), layer.delta(), rtol=1e-6, atol=1e-8)


def test_trainer_style_lora_model_is_read():
    """ComfyUI's Train LoRA node stores `diffusion_model.<module>.lora_up.weight` + `.alpha` tensors."""
    spec = next(s for s in TINY_SD1.layers if s.component is Component.UNET and len(s.shape) == 2)
    stem = spec.comfy_key[: -len(".weight")]
    up, down = torch.randn(spec.shape[0], 2), torch.randn(2, spec.shape[1])
    sd = {f"{stem}.lora_up.weight": up, f"{stem}.lora_down.weight": down, f"{stem}.alpha": torch.tensor(1.0)}
    lora, read = lora_from_state_dict(sd, table=TINY_SD1)
    assert list(lora.layers) == [spec.kohya]
    torch.testing.assert_close(lora.layers[spec.kohya].delta(), 0.5 * up @ down)


# --------------------------------------------------------------------------------------------- validation helpers


def test_widget_problem_returns_the_message_or_none():
    assert w.widget_problem(w.parse_policies, "8,16") is None
    assert "rank rules" in w.widget_problem(w.parse_policies, "sv_fro:2")
    assert "leaves the loras folder" in w.widget_problem(w.sanitize_prefix, "../x")
    assert "takes one" in w.widget_problem(w.single_policy, "8,16")


def test_comfy_glue_imports_without_comfyui():
    from rankwise.nodes import comfy_glue

    assert callable(comfy_glue.apply_lora) and callable(comfy_glue.progress_bar)
    assert not any(name == "comfy" or name.startswith(("comfy.", "comfy_api", "folder_paths")) for name in sys.modules)

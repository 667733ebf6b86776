"""Clean CLIP: the text-encoder difference test, position_ids repair and the cleaned checkpoint.

The difference test must call bf16/fp16 re-quantisation "identical" and a 1 % low-rank tuning
"different"; the cleaned checkpoint must hold the base encoder bit for bit and never replace an input.
"""

from __future__ import annotations

import os

import pytest
import torch

from rankwise.core.archs import Component, key_table, text_encoder_prefixes
from rankwise.core.clip import (
    DEFAULT_TE_THRESHOLD,
    clean_checkpoint,
    repair_position_ids,
    repair_state_dict_position_ids,
    text_encoder_report,
)
from rankwise.core.errors import Cancelled, MismatchError, NonFiniteError, UnsafePathError
from rankwise.core.sources import StateDictSource, open_source
from rankwise.core.synthetic import PlantedDelta, planted_delta, random_weights, write_checkpoint_pair
from rankwise.core.types import Arch

POS_KEY = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def _weights(arch: Arch) -> dict[str, torch.Tensor]:
    return dict(random_weights(key_table(arch, "tiny"), seed=3))


def _with_te(sd: dict, arch: Arch, change, components=(Component.TE1,)) -> dict:
    """A copy of ``sd`` whose text-encoder layers (of ``components``) are ``change(weight, spec)``."""
    out = dict(sd)
    for spec in key_table(arch, "tiny").layers:
        if spec.component in components:
            w = out[spec.checkpoint_key].clone()
            rows = slice(*spec.rows) if spec.rows else slice(None)
            w[rows] = change(w[rows], spec)
            out[spec.checkpoint_key] = w
    return out


@pytest.fixture(scope="module")
def sd1() -> dict[str, torch.Tensor]:
    return _weights(Arch.SD1)


def _report(base: dict, tuned: dict, arch: Arch = Arch.SD1):
    return text_encoder_report(StateDictSource(base, "base"), StateDictSource(tuned, "tuned"), key_table(arch, "tiny"))


def test_identical_encoder_is_identical(sd1):
    (diff,) = _report(sd1, dict(sd1))
    assert diff.component is Component.TE1 and diff.relative == 0.0 and diff.max_abs == 0.0
    assert not diff.differs and diff.layers == 12


@pytest.mark.parametrize("noise", ["bf16", "fp16"])
def test_requantisation_noise_is_identical(sd1, noise):
    if noise == "bf16":
        tuned = _with_te(sd1, Arch.SD1, lambda w, s: w.bfloat16().half())
    else:  # fp16 round trip of fp32 weights: compare against an fp32 base
        gen = torch.Generator().manual_seed(1)
        base = _with_te({k: v.float() for k, v in sd1.items()}, Arch.SD1,
                        lambda w, s: w + 1e-4 * torch.randn(w.shape, generator=gen))
        sd1, tuned = base, _with_te(base, Arch.SD1, lambda w, s: w.half().float())
    (diff,) = _report(sd1, tuned)
    assert 0 < diff.relative < DEFAULT_TE_THRESHOLD / 1.5, diff
    assert not diff.differs


def test_one_percent_tuning_differs(sd1):
    tuned = _with_te(sd1, Arch.SD1, lambda w, s: (w.float() + planted_delta(s, PlantedDelta(rank=4, scale=0.01), seed=0)).half())
    (diff,) = _report(sd1, tuned)
    assert diff.differs and diff.relative == pytest.approx(0.01, rel=0.15)
    assert "differs" in diff.describe()


def test_sdxl_encoders_are_judged_separately():
    sd = _weights(Arch.SDXL)
    tuned = _with_te(sd, Arch.SDXL, lambda w, s: (w.float() + planted_delta(s, PlantedDelta(scale=0.05), seed=0)).half(),
                     components=(Component.TE2,))
    diffs = {d.component: d for d in _report(sd, tuned, Arch.SDXL)}
    assert set(diffs) == {Component.TE1, Component.TE2}
    assert not diffs[Component.TE1].differs and diffs[Component.TE2].differs


def test_non_finite_encoder_weight_is_named(sd1):
    spec = next(s for s in key_table(Arch.SD1, "tiny").layers if s.component is Component.TE1)
    tuned = dict(sd1)
    tuned[spec.checkpoint_key] = sd1[spec.checkpoint_key].clone()
    tuned[spec.checkpoint_key][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=rf"tuned checkpoint 'tuned'.*{spec.checkpoint_key}"):
        _report(sd1, tuned)


# --- position_ids -------------------------------------------------------------------------------


def test_repair_position_ids_float_round_off():
    ids = torch.arange(77, dtype=torch.float32).reshape(1, 77)
    ids[0, 76] = 76.9999
    fixed, broken = repair_position_ids(ids)
    assert broken == (76,)
    assert fixed.dtype == torch.int64 and fixed.shape == (1, 77)
    assert torch.equal(fixed, torch.arange(77).reshape(1, 77))


def test_repair_position_ids_shuffled_and_correct():
    ids = torch.arange(77).reshape(1, 77)
    ids[0, [3, 40]] = ids[0, [40, 3]]
    assert repair_position_ids(ids)[1] == (3, 40)
    fixed, broken = repair_position_ids(torch.arange(77).reshape(1, 77))
    assert broken == () and torch.equal(fixed, torch.arange(77).reshape(1, 77))


def test_repair_state_dict_lists_only_damaged_ids():
    good = torch.arange(77).reshape(1, 77)
    sd = {"a.position_ids": good, "b.position_ids": good.float(), "c.position_ids": good.flip(1), "w": torch.ones(2)}
    fixed, repaired = repair_state_dict_position_ids(sd)
    assert set(repaired) == {"b.position_ids", "c.position_ids"} and repaired["b.position_ids"] == ()
    assert len(repaired["c.position_ids"]) == 76  # all but the middle id 38
    assert all(torch.equal(fixed[k], good) for k in ("a.position_ids", "b.position_ids", "c.position_ids"))
    assert fixed["w"] is sd["w"]


# --- clean_checkpoint ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("clean")
    base, tuned = d / "base.safetensors", d / "tuned.safetensors"
    write_checkpoint_pair(base, tuned, Arch.SD1, delta=PlantedDelta(rank=2, scale=0.05),
                          extra_layout={POS_KEY: ([1, 77], "I64")})
    # A merge-damaged tuned file: float position_ids with round-off.
    with open_source(tuned) as src:
        sd = {k: src.get(k).clone() for k in src.keys()}
    ids = torch.arange(77, dtype=torch.float32).reshape(1, 77)
    ids[0, 10] = 9.9999
    sd[POS_KEY] = ids
    broken = d / "broken.safetensors"
    from safetensors.torch import save_file
    save_file(sd, str(broken))
    return base, broken


@pytest.mark.parametrize("replace", [(Component.TE1,), ()])
def test_clean_checkpoint_replaces_the_encoder_and_repairs_ids(pair, tmp_path, replace):
    base_path, tuned_path = pair
    out = tmp_path / "clean.safetensors"
    with open_source(base_path) as base, open_source(tuned_path) as tuned:
        rep = clean_checkpoint(base, tuned, out, replace=replace)
        prefix = text_encoder_prefixes(Arch.SD1)[Component.TE1] if replace else "-"
        with open_source(out) as cleaned:
            assert set(cleaned.keys()) == set(tuned.keys())
            for key in cleaned.keys():
                if key == POS_KEY:
                    continue
                expected = base.get(key) if key.startswith(prefix) else tuned.get(key)
                assert cleaned.dtype(key) == expected.dtype
                assert torch.equal(cleaned.get(key), expected), key
            assert torch.equal(cleaned.get(POS_KEY), torch.arange(77).reshape(1, 77))
            assert "rankwise.clean" in cleaned.metadata
    # With TE1 replaced, the ids come from the base (already correct); otherwise the tuned ids are repaired.
    assert rep.replaced == replace
    assert rep.position_ids == ({} if replace else {POS_KEY: (10,)})
    with open_source(out) as cleaned:
        assert rep.tensors == len(list(cleaned.keys()))


def test_clean_checkpoint_never_writes_over_an_input(pair):
    base_path, tuned_path = pair
    before = os.stat(tuned_path).st_mtime_ns
    with open_source(base_path) as base, open_source(tuned_path) as tuned:
        for target in (tuned_path, base_path):
            with pytest.raises(UnsafePathError, match="input"):
                clean_checkpoint(base, tuned, target, replace=[Component.TE1], overwrite=True)
    assert os.stat(tuned_path).st_mtime_ns == before


def test_clean_checkpoint_refuses_existing_file_and_cleans_up_on_cancel(pair, tmp_path):
    base_path, tuned_path = pair
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep")
    out = tmp_path / "cancelled.safetensors"

    def cancel(done, total, label):
        if done == 3:
            raise Cancelled()

    with open_source(base_path) as base, open_source(tuned_path) as tuned:
        with pytest.raises(UnsafePathError, match="exists"):
            clean_checkpoint(base, tuned, existing, replace=[])
        with pytest.raises(Cancelled):
            clean_checkpoint(base, tuned, out, replace=[Component.TE1], progress=cancel)
    assert existing.read_bytes() == b"keep"
    assert list(tmp_path.iterdir()) == [existing]


def test_clean_checkpoint_rejects_other_architectures(pair, tmp_path):
    with open_source(pair[0]) as base:
        xl = StateDictSource(_weights(Arch.SDXL), "xl")
        with pytest.raises(MismatchError, match="SD1.*SDXL"):
            clean_checkpoint(base, xl, tmp_path / "x.safetensors", replace=[Component.TE1])

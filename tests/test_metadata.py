"""ss_* / modelspec.* / rankwise.* metadata and kohya's sshs hashes."""

from __future__ import annotations

import datetime
import hashlib
import json

import pytest
import safetensors.torch
import torch

from rankwise.core import metadata as md
from rankwise.core.metadata import (
    BASE_MODEL_VERSION,
    MODELSPEC_ARCH,
    build_metadata,
    network_fields,
    safetensors_file_hashes,
    safetensors_hashes,
)
from rankwise.core.types import Arch, DiffLayer, Lora, LoraLayer


def _layer(out_f, in_f, rank, alpha, gen, kernel=None):
    up = torch.randn(out_f, rank, generator=gen)
    down = torch.randn(rank, in_f, generator=gen)
    if kernel:
        up, down = up.reshape(out_f, rank, 1, 1), torch.randn(rank, in_f, kernel, kernel, generator=gen)
    return LoraLayer(up=up, down=down, alpha=alpha)


def _lora(gen, arch=Arch.SDXL, ranks=(8, 8), alphas=(8.0, 8.0), conv=None) -> Lora:
    layers = {f"lora_unet_l{i}": _layer(6, 5, r, a, gen) for i, (r, a) in enumerate(zip(ranks, alphas))}
    layers["lora_unet_proj"] = _layer(6, 5, ranks[0], alphas[0], gen, kernel=1)  # 1×1 counts as linear
    for i, (r, a) in enumerate(conv or ()):
        layers[f"lora_unet_conv{i}"] = _layer(4, 3, r, a, gen, kernel=3)
    return Lora(layers, arch=arch)


def _build(lora, **kw):
    args = dict(title="t", method="extract", params={"rank": "8"})
    args.update(kw)
    return build_metadata(lora, **args)


def test_all_values_are_strings_and_safetensors_accepts_them(gen):
    meta = _build(_lora(gen, conv=[(4, 4.0)]), merged_from=["a", "b"], comment="c",
                  carry={"ss_output_name": "x", "ss_num_epochs": "3"})
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    data = safetensors.torch.save({"t": torch.zeros(1)}, meta)
    n = int.from_bytes(data[:8], "little")
    assert json.loads(data[8 : 8 + n])["__metadata__"] == meta


def test_uniform_network_dim_and_alpha_like_kohya(gen):
    meta = _build(_lora(gen))
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "8.0")
    assert meta["ss_network_args"] == "{}"


def test_dynamic_ranks_or_alphas(gen):
    meta = network_fields(_lora(gen, ranks=(8, 16), alphas=(8.0, 16.0)))
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("Dynamic", "Dynamic")
    meta = network_fields(_lora(gen, ranks=(8, 8), alphas=(8.0, 4.0)))
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "Dynamic")


def test_conv_layers_go_to_network_args(gen):
    meta = network_fields(_lora(gen, conv=[(4, 2.0), (4, 2.0)]))
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2.0"}
    assert meta["ss_network_dim"] == "8"  # conv 3×3 does not make the linear rank dynamic
    meta = network_fields(_lora(gen, conv=[(4, 2.0), (6, 2.0)]))
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "Dynamic", "conv_alpha": "Dynamic"}


def test_dense_layers_are_not_counted_as_ranks(gen):
    lora = Lora({"lora_unet_a": _layer(6, 5, 4, 4.0, gen), "lora_unet_b": DiffLayer(torch.zeros(6, 5))}, arch=Arch.SD1)
    assert network_fields(lora)["ss_network_dim"] == "4"


@pytest.mark.parametrize(
    "arch, base, v2, spec_arch, impl, reso",
    [
        (Arch.SD1, "sd_v1", "False", "stable-diffusion-v1/lora", "diffusers", "512x512"),
        (Arch.SD2, "sd_v2", "True", "stable-diffusion-v2-512/lora", "diffusers", "512x512"),
        (Arch.SDXL, "sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora",
         "https://github.com/Stability-AI/generative-models", "1024x1024"),
    ],
)
def test_architecture_keys(arch, base, v2, spec_arch, impl, reso, gen):
    meta = _build(_lora(gen, arch=arch))
    assert BASE_MODEL_VERSION[arch] == base and MODELSPEC_ARCH[arch] == spec_arch
    assert meta["ss_base_model_version"] == base and meta["ss_v2"] == v2
    assert meta["modelspec.architecture"] == spec_arch
    assert meta["modelspec.implementation"] == impl
    assert meta["modelspec.resolution"] == reso
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.sai_model_spec"] == "1.0.1"


def test_sd2_v_prediction_is_kept_from_the_input(gen):
    meta = _build(_lora(gen, arch=Arch.SD2), carry={"ss_base_model_version": "sd_v2_v"})
    assert meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v"


def test_unknown_architecture_omits_base_model_keys(gen):
    meta = _build(_lora(gen, arch=None))
    assert "ss_base_model_version" not in meta and "modelspec.architecture" not in meta
    assert meta["modelspec.title"] == "t"


def test_carry_forward_overrides_and_history(gen):
    carry = {"ss_output_name": "orig", "ss_network_dim": "128", "ss_training_comment": "trained by me",
             "modelspec.title": "old title", "prompt": "{}"}
    meta = _build(_lora(gen), title="new", carry=carry, comment="resized to 8 by rankwise",
                  merged_from=["a.safetensors", "b"], params={"rule": "sv_fro:0.9", "n": "2"},
                  timestamp=1_700_000_000)
    assert meta["ss_output_name"] == "orig"
    assert meta["ss_network_dim"] == "8"  # ours overrides
    assert meta["ss_training_comment"] == "trained by me; resized to 8 by rankwise"
    assert meta["modelspec.title"] == "new" and "prompt" not in meta  # only ss_* keys are carried
    assert meta["modelspec.merged_from"] == "a.safetensors, b"
    assert json.loads(meta["rankwise.params"]) == {"rule": "sv_fro:0.9", "n": "2"}
    assert meta["rankwise.method"] == "extract" and meta["rankwise.version"]
    assert meta["modelspec.date"] == datetime.datetime.fromtimestamp(1_700_000_000).isoformat()
    assert _build(_lora(gen), comment="first")["ss_training_comment"] == "first"


# --- hashes --------------------------------------------------------------------------------------


def _addnet_hashes_by_reading(path) -> tuple[str, str]:
    """The hashes as A1111 / additional-networks compute them from a file on disk."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    return hashlib.sha256(raw[8 + n :]).hexdigest(), hashlib.sha256(raw[0x100000 : 0x110000]).hexdigest()[:8]


def _tensors(gen, big=False):
    n = 600_000 if big else 100  # big: the file passes 0x110000 bytes, so the legacy hash sees data
    return {"b.lora_up.weight": torch.randn(n, generator=gen).half(), "a.alpha": torch.tensor(4.0).half(),
            "c.weight": torch.randn(7, 3, generator=gen)}


@pytest.mark.parametrize("big", [False, True])
def test_hashes_equal_those_of_a_file_saved_with_only_ss_metadata(big, gen, tmp_path):
    tensors = _tensors(gen, big)
    meta = {"ss_network_dim": "4", "ss_network_alpha": "4.0", "modelspec.title": "x", "other": "y"}
    path = tmp_path / "ss_only.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    expected = _addnet_hashes_by_reading(path)
    assert safetensors_hashes(tensors, meta) == expected
    assert safetensors_file_hashes(path) == expected
    if big:
        assert expected[1] != hashlib.sha256(b"").hexdigest()[:8]
    else:
        assert expected[1] == hashlib.sha256(b"").hexdigest()[:8]  # small files: hash of nothing


def test_model_hash_ignores_non_ss_metadata_but_legacy_follows_the_header(gen):
    tensors = _tensors(gen, big=True)
    a = safetensors_hashes(tensors, {"ss_x": "1"})
    b = safetensors_hashes(tensors, {"ss_x": "1", "modelspec.title": "changes nothing"})
    c = safetensors_hashes(tensors, {"ss_x": "a much longer value that shifts the data section"})
    assert a == b
    assert a[0] == c[0] and a[1] != c[1]


@pytest.mark.parametrize("meta", [None, {}, {"ss_b": "2", "zeta": "ü \"q\"\n", "ss_a": "1"}])
def test_planned_bytes_are_what_safetensors_writes(gen, meta):
    from rankwise.core.stream_write import iter_data, plan_safetensors

    tensors = {
        "b.lora_up.weight": torch.randn(300, 600, generator=gen).half(),
        "a.lora_down.weight": torch.randn(600, 300, generator=gen).half(),
        "a.alpha": torch.tensor(4.0, dtype=torch.float16),
        "c.alpha": torch.tensor(3.3),
        "pos": torch.arange(77).reshape(1, 77),
        "w": torch.randn(5, 7, generator=gen).to(torch.bfloat16),
        "flag": torch.tensor([True, False]),
    }
    reference = safetensors.torch.save(tensors, meta)
    plan = plan_safetensors([(k, tuple(t.shape), t.dtype, (lambda t=t: t)) for k, t in tensors.items()], meta)
    ours = plan.header + b"".join(bytes(c) for c in iter_data(plan))
    n = int.from_bytes(reference[:8], "little")
    assert len(ours) == len(reference) == plan.total_bytes and ours[:8] == reference[:8]
    assert ours[8 + n:] == reference[8 + n:]  # data, in safetensors' order
    ref_header, our_header = json.loads(reference[8:8 + n]), json.loads(ours[8:8 + n])
    assert list(our_header) == list(ref_header) and our_header == ref_header
    if meta and len(meta) > 1:  # safetensors emits a hash map in random order; we sort
        assert list(our_header["__metadata__"]) == sorted(meta)
    else:
        assert ours == reference


def test_streamed_hashes_equal_hashes_of_safetensors_bytes(gen):
    tensors = _tensors(gen, big=True)
    meta = {"ss_network_dim": "4", "ss_network_alpha": "4.0", "other": "y"}
    data = safetensors.torch.save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    n = int.from_bytes(data[:8], "little")
    expected = (hashlib.sha256(data[8 + n:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8])
    assert safetensors_hashes(tensors, meta) == expected

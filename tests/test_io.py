"""Safe reading (safetensors validation, pickle refusal), streaming, and safe atomic saving."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest
import safetensors.torch
import torch

from rankwise.core.archs import key_table
from rankwise.core.errors import Cancelled, FormatError, NonFiniteError, UnsafePathError
from rankwise.core.formats import LoraFormat
from rankwise.core.io import (
    SafetensorsSource,
    atomic_write,
    file_sha256,
    load_lora,
    load_state_dict,
    read_state_dict,
    save_lora,
)
from rankwise.core.metadata import build_metadata, safetensors_file_hashes
from rankwise.core.types import Arch, Lora, LoraLayer

TABLE = key_table(Arch.SD1, "tiny")
SPECS = [s for s in TABLE.layers if "attn2" in s.kohya or "resnets_0_conv1" in s.kohya][:6]


def _lora(gen, scale: float = 0.3) -> Lora:
    layers = {}
    for i, s in enumerate(SPECS):
        rank = 2 + i % 2
        out_f = s.shape[0]
        in_f = int(torch.tensor(s.shape[1:]).prod())
        up, down = torch.randn(out_f, rank, generator=gen) * scale, torch.randn(rank, in_f, generator=gen) * scale
        if len(s.shape) == 4:
            up, down = up.reshape(out_f, rank, 1, 1), down.reshape(rank, *s.shape[1:])
        layers[s.kohya] = LoraLayer(up=up, down=down, alpha=float(rank))
    return Lora(layers, metadata={"ss_output_name": "test"}, arch=Arch.SD1)


def _saved(tmp_path, gen, name="a.safetensors", **kw):
    lora = _lora(gen)
    return lora, save_lora(lora, tmp_path / name, dtype=torch.float32, **kw)


def _assert_same(a: Lora, b: Lora, tol: float = 1e-6):
    assert set(a.layers) == set(b.layers)
    for name in a.layers:
        assert torch.allclose(a.layers[name].delta(), b.layers[name].delta(), atol=tol, rtol=tol), name


# --- save / load round trip ----------------------------------------------------------------------


def test_save_load_round_trip_with_metadata_and_hashes(tmp_path, gen):
    lora = _lora(gen)
    meta = build_metadata(lora, title="round trip", method="extract", params={"rank": "dyn"})
    result = save_lora(lora, tmp_path / "a.safetensors", dtype=torch.float32, metadata=meta)
    assert result.path == str(tmp_path / "a.safetensors")
    assert result.bytes == os.path.getsize(result.path)
    assert result.sha256 == hashlib.sha256(open(result.path, "rb").read()).hexdigest() == file_sha256(result.path)
    # The model hash kohya stores is the addnet hash of the file itself (independent of metadata).
    assert result.sshs_model_hash == safetensors_file_hashes(result.path)[0]

    back, report = load_lora(result.path, table=TABLE)
    assert report.formats == (LoraFormat.KOHYA,) and not report.unknown_keys
    _assert_same(lora, back)
    expected_meta = {**lora.metadata, **meta, "sshs_model_hash": result.sshs_model_hash,
                     "sshs_legacy_hash": result.sshs_legacy_hash}
    assert dict(back.metadata) == expected_meta
    assert all(isinstance(v, str) for v in back.metadata.values())


def test_saved_hashes_are_kohyas_over_the_ss_only_serialisation(tmp_path, gen):
    lora = _lora(gen)
    meta = build_metadata(lora, title="hashes", method="extract", params={"rank": "4"})
    result = save_lora(lora, tmp_path / "k.safetensors", metadata=meta)
    tensors = safetensors.torch.load_file(result.path)
    with open(result.path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        md = json.loads(f.read(n))["__metadata__"]
    ss_only = {k: v for k, v in md.items() if k.startswith("ss_")}
    data = safetensors.torch.save(tensors, ss_only)  # what kohya hashes
    n = int.from_bytes(data[:8], "little")
    assert result.sshs_model_hash == md["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()
    assert result.sshs_legacy_hash == md["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_fp16_save_is_close_and_smaller(tmp_path, gen):
    lora = _lora(gen)
    r16 = save_lora(lora, tmp_path / "h.safetensors")
    r32 = save_lora(lora, tmp_path / "f.safetensors", dtype=torch.float32)
    assert r16.bytes < r32.bytes
    back, _ = load_lora(r16.path, table=TABLE)
    _assert_same(lora, back, tol=2e-3)
    assert back.layers[SPECS[0].kohya].up.dtype == torch.float16


def test_non_string_metadata_is_refused(tmp_path, gen):
    with pytest.raises(TypeError, match="str"):
        save_lora(_lora(gen), tmp_path / "a.safetensors", metadata={"ss_network_dim": 8})
    assert list(tmp_path.iterdir()) == []


def test_nan_lora_is_refused_naming_the_layer_and_writes_nothing(tmp_path, gen):
    lora = _lora(gen)
    name = SPECS[1].kohya
    bad = lora.layers[name]
    up = bad.up.clone()
    up.view(-1)[0] = float("nan")
    lora = lora.replace(layers={**lora.layers, name: LoraLayer(up=up, down=bad.down, alpha=bad.alpha)})
    with pytest.raises(NonFiniteError, match=name):
        save_lora(lora, tmp_path / "nan.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_fp16_overflow_is_refused_before_writing(tmp_path, gen):
    lora = _lora(gen)
    name = SPECS[0].kohya
    layer = lora.layers[name]
    lora = lora.replace(layers={**lora.layers, name: LoraLayer(up=layer.up * 1e6, down=layer.down, alpha=layer.alpha)})
    with pytest.raises(NonFiniteError, match=f"overflow.*{name}"):
        save_lora(lora, tmp_path / "big.safetensors", dtype=torch.float16)
    assert list(tmp_path.iterdir()) == []


# --- refusing paths ------------------------------------------------------------------------------


def test_save_refuses_an_input_path_and_leaves_it_unchanged(tmp_path, gen):
    _, first = _saved(tmp_path, gen)
    before = open(first.path, "rb").read()
    link = tmp_path / "link.safetensors"
    os.symlink(first.path, link)
    hard = tmp_path / "hard.safetensors"
    os.link(first.path, hard)
    for target in (first.path, link, hard, tmp_path / "sub" / ".." / "a.safetensors"):
        with pytest.raises(UnsafePathError, match="input"):
            save_lora(_lora(gen), target, inputs=[first.path], overwrite=True)
    with pytest.raises(UnsafePathError, match="input"):
        save_lora(_lora(gen), first.path, inputs=[str(link)], overwrite=True)
    assert open(first.path, "rb").read() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "hard.safetensors", "link.safetensors"]


def test_save_refuses_an_existing_path_unless_overwrite(tmp_path, gen):
    _, first = _saved(tmp_path, gen)
    before = open(first.path, "rb").read()
    with pytest.raises(UnsafePathError, match="already exists"):
        save_lora(_lora(gen), first.path)
    assert open(first.path, "rb").read() == before
    again = save_lora(_lora(gen), first.path, overwrite=True, dtype=torch.float32)
    assert open(again.path, "rb").read() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_save_needs_a_safetensors_name(tmp_path, gen):
    with pytest.raises(UnsafePathError, match=".safetensors"):
        save_lora(_lora(gen), tmp_path / "a.ckpt")


# --- atomic write --------------------------------------------------------------------------------


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt(), Cancelled("stop")])
def test_atomic_write_leaves_no_temp_file_and_keeps_the_old_file(tmp_path, exc):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old")

    def writer(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise exc

    with pytest.raises(type(exc)):
        atomic_write(target, writer)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_atomic_write_writes_through_a_temp_name_in_the_same_directory(tmp_path):
    seen = []

    def writer(tmp: str) -> None:
        seen.append(tmp)
        with open(tmp, "wb") as f:
            f.write(b"new")

    atomic_write(tmp_path / "out.bin", writer)
    assert (tmp_path / "out.bin").read_bytes() == b"new"
    assert os.path.dirname(seen[0]) == str(tmp_path) and seen[0].endswith(".tmp")
    assert os.path.basename(seen[0]).startswith(".out.bin.")  # hidden: .<name>.<hex>.tmp
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


# --- reading: corrupt files, pickles -------------------------------------------------------------


def test_truncated_safetensors_names_file_and_cause(tmp_path, gen):
    _, saved = _saved(tmp_path, gen)
    raw = open(saved.path, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FormatError, match=r"cut\.safetensors.*truncated"):
        load_state_dict(cut)
    with pytest.raises(FormatError, match=r"cut\.safetensors.*truncated"):
        load_lora(cut)
    with pytest.raises(FormatError, match="truncated"):
        SafetensorsSource(cut)


def test_garbage_and_odd_headers(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(FormatError, match="garbage.safetensors"):
        load_state_dict(garbage)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(FormatError, match="too short"):
        load_state_dict(tiny)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 200_000_000) + b"{}")
    with pytest.raises(FormatError, match="header length"):
        load_state_dict(huge)
    notjson = tmp_path / "notjson.safetensors"
    notjson.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(FormatError, match="corrupt safetensors header"):
        load_state_dict(notjson)
    padded = tmp_path / "padded.safetensors"
    padded.write_bytes(safetensors.torch.save({"a": torch.zeros(4)}) + b"\0" * 16)
    with pytest.raises(FormatError, match="after the last tensor"):
        load_state_dict(padded)


class Payload:  # a class torch's weights_only unpickler will not construct
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": Payload(str(marker))}, path)
    with pytest.raises(FormatError, match=r"evil\.ckpt.*refusing to unpickle.*safetensors"):
        load_state_dict(path)
    assert not marker.exists()


def test_custom_class_checkpoint_is_refused(tmp_path):
    path = tmp_path / "custom.pt"
    torch.save({"w": torch.zeros(2), "obj": _Custom()}, path)
    with pytest.raises(FormatError, match="refusing to unpickle"):
        load_state_dict(path)


class _Custom:
    pass


def test_plain_tensor_checkpoint_is_accepted_and_unwrapped(tmp_path, gen):
    lora = _lora(gen)
    from rankwise.core.formats import lora_to_state_dict

    sd = lora_to_state_dict(lora, dtype=torch.float32)
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 10}, path)
    loaded = read_state_dict(path)
    assert set(loaded.tensors) == set(sd) and loaded.metadata == {}
    assert any("state_dict" in n for n in loaded.notes)
    back, report = load_lora(path, table=TABLE)
    _assert_same(lora, back)
    assert any("epoch" in n for n in report.notes)


def test_non_tensor_entries_are_dropped_and_reported(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"w.lora_up.weight": torch.zeros(2, 1), "note": "hello", "n": 3}, path)
    loaded = read_state_dict(path)
    assert set(loaded.tensors) == {"w.lora_up.weight"}
    assert any("non-tensor" in n and "note" in n for n in loaded.notes)


def test_legacy_non_zip_checkpoint_and_extensionless_sniffing(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"a": torch.arange(3.0)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_state_dict(path)[0]["a"], torch.arange(3.0))
    bare = tmp_path / "weights"
    safetensors.torch.save_file({"b": torch.ones(2)}, str(bare), metadata={"k": "v"})
    tensors, meta = load_state_dict(bare)
    assert torch.equal(tensors["b"], torch.ones(2)) and meta == {"k": "v"}
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "missing.safetensors")


def test_unknown_keys_in_a_file_are_reported(tmp_path, gen):
    from rankwise.core.formats import lora_to_state_dict

    sd = lora_to_state_dict(_lora(gen), dtype=torch.float32)
    sd["lora_unet_weird.thing"] = torch.zeros(1)
    path = tmp_path / "unknown.safetensors"
    safetensors.torch.save_file(sd, str(path))
    _, report = load_lora(path, table=TABLE)
    assert report.unknown_keys == ("lora_unet_weird.thing",)


# --- streaming source ----------------------------------------------------------------------------


def test_safetensors_source_reads_header_then_tensor_by_tensor(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float16).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    path = tmp_path / "s.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"m": "1"})
    with SafetensorsSource(path) as src:
        assert sorted(src.keys()) == ["a", "b"] and len(src) == 2 and "a" in src
        assert src.shape("a") == (2, 3) and src.dtype("b") == torch.bfloat16
        assert src.metadata == {"m": "1"}
        got = src.get("a")
        assert got.dtype == torch.float16 and torch.equal(got, tensors["a"])
        with pytest.raises(KeyError, match="nope"):
            src.shape("nope")
    with pytest.raises(ValueError, match="closed"):
        src.get("a")


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(3, 5, dtype=torch.float32),
        torch.randn(2, 3, 3, 3).to(torch.float16),
        torch.randn(7).to(torch.bfloat16),
        torch.arange(77, dtype=torch.int64).reshape(1, 77),
        torch.tensor(3.5, dtype=torch.float64),
        torch.zeros(0, 4, dtype=torch.float16),
        torch.tensor([True, False, True]),
    ],
    ids=["f32", "f16-conv", "bf16", "i64", "scalar-f64", "empty", "bool"],
)
def test_safetensors_source_returns_exact_private_copies(tmp_path, tensor):
    path = tmp_path / "t.safetensors"
    safetensors.torch.save_file({"x": tensor, "pad": torch.ones(3, dtype=torch.float16)}, str(path))
    before = path.read_bytes()
    with SafetensorsSource(path) as src:
        got = src.get("x")
        assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor)
        if got.numel() and got.is_floating_point():
            got.fill_(0)  # a private copy: the next read and the file are unchanged
            assert torch.equal(src.get("x"), tensor)
    assert path.read_bytes() == before


def test_safetensors_source_reads_from_threads(tmp_path, gen):
    from concurrent.futures import ThreadPoolExecutor

    tensors = {f"t{i}": torch.randn(64, 33, generator=gen) for i in range(24)}
    path = tmp_path / "many.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    with SafetensorsSource(path) as src, ThreadPoolExecutor(4) as pool:
        got = dict(zip(tensors, pool.map(src.get, list(tensors) * 3)))
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)


def test_safetensors_source_names_a_file_truncated_while_open(tmp_path):
    path = tmp_path / "cut.safetensors"
    safetensors.torch.save_file({"a": torch.ones(1000), "b": torch.ones(1000)}, str(path))
    with SafetensorsSource(path) as src:
        os.truncate(path, os.path.getsize(path) - 2000)
        with pytest.raises(FormatError, match="file ended early"):
            src.get("b")


def test_uniform_alpha_save_keeps_the_deltas(tmp_path, gen):
    lora = _lora(gen)  # alpha = rank, ranks 2 and 3
    result = save_lora(lora, tmp_path / "u.safetensors", dtype=torch.float32, uniform_alpha=True)
    back, _ = load_lora(result.path, table=TABLE)
    assert len({layer.alpha for layer in back.layers.values()}) == 1
    _assert_same(lora, back, tol=1e-5)


def test_an_empty_lora_is_not_saved(tmp_path):
    with pytest.raises(FormatError, match="empty"):
        save_lora(Lora({}, arch=Arch.SD1), tmp_path / "empty.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_save_creates_no_folders_and_names_the_missing_one(tmp_path, gen):
    target = tmp_path / "missing" / "a.safetensors"
    with pytest.raises(UnsafePathError, match="the folder .*missing does not exist"):
        save_lora(_lora(gen), target)
    assert not (tmp_path / "missing").exists()


def test_drop_behind_reads_the_same_tensors(tmp_path, monkeypatch):
    """Drop-behind (forced) changes only page-cache advice: every tensor reads back identical."""
    import safetensors.torch as st_torch

    from rankwise.core.io import SafetensorsSource, drop_behind_wanted

    g = torch.Generator().manual_seed(3)
    tensors = {f"t{i}": torch.randn(17 + i, 9, generator=g).to(torch.float16) for i in range(5)}
    path = tmp_path / "x.safetensors"
    st_torch.save_file(tensors, str(path))
    for forced in ("1", "0"):
        monkeypatch.setenv("RANKWISE_DROP_BEHIND", forced)
        assert drop_behind_wanted(str(path)) is (forced == "1")
        with SafetensorsSource(path) as src:
            for key, want in tensors.items():
                assert torch.equal(src.get(key), want)
    monkeypatch.delenv("RANKWISE_DROP_BEHIND")
    assert drop_behind_wanted(str(path)) is False  # a tiny file is never dropped behind

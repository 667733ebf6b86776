"""Files from the wild: the older SD1 text-encoder layout, modules that do not fit their layer,
files whose name lies about their format, directories given as files, ``.ckpt`` loader notes.

Each case is checked in the core and through ``core.cli.main``; errors are one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rankwise.core.archs import Component, key_table
from rankwise.core.cli import main
from rankwise.core.clip import clean_checkpoint, text_encoder_report
from rankwise.core.errors import FormatError, MismatchError, RankwiseError
from rankwise.core.formats import lora_from_state_dict, lora_to_state_dict
from rankwise.core.io import InputFileError, load_lora, read_state_dict, save_lora, sniff, FileKind
from rankwise.core.sources import FileSource, TELayoutKind, open_source, preflight
from rankwise.core.synthetic import PlantedDelta, random_lora, write_checkpoint_pair
from rankwise.core.types import Arch

TE = "cond_stage_model.transformer."
EXTRA = {
    f"{TE}text_model.embeddings.position_ids": ([1, 16], "I64"),
    f"{TE}text_model.embeddings.token_embedding.weight": ([100, 24], "F16"),
    f"{TE}text_model.embeddings.position_embedding.weight": ([16, 24], "F16"),
    f"{TE}text_model.final_layer_norm.weight": ([24], "F16"),
    f"{TE}text_model.final_layer_norm.bias": ([24], "F16"),
}
TINY = key_table(Arch.SD1, "tiny")


def _legacy(key: str) -> str:
    return key.replace(f"{TE}text_model.", TE)


def _to_legacy(path: Path) -> None:
    """Rewrite a checkpoint with its text encoder in the older layout (no ``text_model.``)."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    sd = load_file(str(path))
    save_file({_legacy(k): v for k, v in sd.items()}, str(path), metadata=meta)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """layout name → (base, tuned) for every combination of the two layouts."""
    root = tmp_path_factory.mktemp("te_layouts")
    out = {}
    for name, (old_base, old_tuned) in {"new-new": (False, False), "old-old": (True, True),
                                        "new-old": (False, True), "old-new": (True, False)}.items():
        base, tuned = root / f"{name}-base.safetensors", root / f"{name}-tuned.safetensors"
        write_checkpoint_pair(base, tuned, Arch.SD1, size="tiny", delta=PlantedDelta(rank=4), extra_layout=EXTRA)
        if old_base:
            _to_legacy(base)
        if old_tuned:
            _to_legacy(tuned)
        out[name] = (base, tuned)
    return out


# ----------------------------------------------------------------------------- older TE layout


def test_legacy_file_is_shown_under_canonical_names(pairs):
    base, tuned = pairs["old-old"]
    with open_source(tuned) as src:
        keys = set(src.keys())
        assert not any(k.startswith(f"{TE}encoder.") for k in keys)
        spec = next(s for s in TINY.layers if s.component is Component.TE1)
        assert spec.checkpoint_key in keys
        assert src.stored_key(spec.checkpoint_key) == _legacy(spec.checkpoint_key)
        assert src.te_layouts() == {TE: TELayoutKind.LEGACY}
        assert src.get(spec.checkpoint_key).shape == spec.shape


@pytest.mark.parametrize("layout", ["old-old", "new-old", "old-new", "new-new"])
def test_preflight_compares_the_text_encoder_in_any_layout(pairs, layout):
    base, tuned = pairs[layout]
    with open_source(base) as b, open_source(tuned) as t:
        table, report = preflight(b, t)
        assert Component.TE1 in report.components
        assert report.layers == len(TINY.layers)
        notes = " ".join(report.notes)
        if layout == "new-new":
            assert "older layout" not in notes
        elif layout == "old-old":
            assert "both use the older layout" in notes
        else:
            old, new = ("tuned", "base") if layout == "new-old" else ("base", "tuned")
            assert f"{old} '{(tuned if old == 'tuned' else base).name}' uses the older layout" in notes
            assert f"{new} '{(tuned if new == 'tuned' else base).name}' uses the current layout" in notes
        diffs = text_encoder_report(b, t, table)
        assert [d.component for d in diffs] == [Component.TE1] and diffs[0].differs


@pytest.mark.parametrize("layout", ["old-old", "new-old", "old-new"])
def test_cli_extract_reads_the_older_layout(pairs, layout, tmp_path, capsys):
    base, tuned = pairs[layout]
    out = tmp_path / "x.safetensors"
    assert main(["extract", str(base), str(tuned), "--rank", "4", "-o", str(out), "--no-progress",
                 "--text-encoders", "all"]) == 0
    assert "older layout" in capsys.readouterr().out
    lora, _ = load_lora(out)
    te = [n for n in lora.layers if n.startswith("lora_te_")]
    assert len(te) == sum(s.component is Component.TE1 for s in TINY.layers)


@pytest.mark.parametrize("layout", ["old-old", "new-old", "old-new"])
@pytest.mark.parametrize("replace", [[], [Component.TE1]])
def test_clean_clip_writes_each_key_in_the_layout_of_the_tuned_file(pairs, layout, replace, tmp_path):
    base, tuned = pairs[layout]
    out = tmp_path / "clean.safetensors"
    with open_source(base) as b, open_source(tuned) as t:
        clean_checkpoint(b, t, out, replace=replace)
    tuned_sd, base_sd, written = load_file(str(tuned)), load_file(str(base)), load_file(str(out))
    assert set(written) == set(tuned_sd)  # the tuned file's names, in its layout
    for key, value in written.items():
        if replace and key.startswith(TE) and not key.endswith("position_ids"):
            base_key = key if key in base_sd else (_legacy(key) if _legacy(key) in base_sd
                                                   else key.replace(TE, f"{TE}text_model.", 1))
            assert torch.equal(value, base_sd[base_key]), key
        elif not key.endswith("position_ids"):
            assert torch.equal(value, tuned_sd[key]), key


def test_cli_clean_clip_prints_the_layout_note(pairs, tmp_path, capsys):
    base, tuned = pairs["new-old"]
    assert main(["clean-clip", str(base), str(tuned), "--report-only"]) == 0
    text = capsys.readouterr().out
    assert "uses the older layout" in text and "te1: relative difference" in text


# ----------------------------------------------------------------------------- bad modules


def _bad_sd(kind: str, gen) -> tuple[dict[str, torch.Tensor], str]:
    """A kohya state dict of the tiny SD1 table with one module that does not fit its layer."""
    lora = random_lora(TINY, rank=2, seed=1)
    sd = lora_to_state_dict(lora, dtype=torch.float32)
    name = next(n for n in lora.layers if n.endswith("attn1_to_q"))
    conv = next(n for n in lora.layers if lora.layers[n].up.dim() == 4 and lora.layers[n].down.shape[2:] == (1, 1))
    if kind == "lora_down":
        sd[f"{name}.lora_down.weight"] = torch.randn(2, 7, generator=gen)
    elif kind == "lokr":
        for suffix in ("lora_up.weight", "lora_down.weight", "alpha"):
            del sd[f"{name}.{suffix}"]
        sd[f"{name}.lokr_w1"] = torch.randn(2, 2, generator=gen)
        sd[f"{name}.lokr_w2"] = torch.randn(8, 3, generator=gen)  # kron → (16, 6), the layer is (16, 16)
    elif kind == "conv_kernel":
        name = conv
        down = sd[f"{name}.lora_down.weight"]
        sd[f"{name}.lora_down.weight"] = torch.randn(down.shape[0], down.shape[1], 3, 3, generator=gen)
    return sd, name


@pytest.mark.parametrize("kind", ["lora_down", "lokr", "conv_kernel"])
def test_module_that_does_not_fit_is_an_error_naming_it(kind, gen):
    sd, name = _bad_sd(kind, gen)
    with pytest.raises(MismatchError) as err:
        lora_from_state_dict(sd)
    msg = str(err.value)
    assert "\n" not in msg
    assert name in msg and "expects" in msg and "--skip-bad-modules" in msg
    shape = tuple(TINY.by_kohya(name).shape)
    assert str(shape) in msg


@pytest.mark.parametrize("kind", ["lora_down", "lokr", "conv_kernel"])
def test_skip_bad_modules_drops_and_counts_them(kind, gen):
    sd, name = _bad_sd(kind, gen)
    lora, report = lora_from_state_dict(sd, skip_bad_modules=True)
    assert name not in lora.layers
    assert report.skipped_modules == (name,) and report.skipped == 1
    assert len(lora) == len(random_lora(TINY, rank=2, seed=1)) - 1
    assert "factors do not fit the layer (1)" in report.summary()


def test_factors_that_do_not_fit_each_other_follow_the_same_policy(gen):
    lora = random_lora(TINY, rank=2, seed=1)
    sd = lora_to_state_dict(lora, dtype=torch.float32)
    name = next(iter(lora.layers))
    sd[f"{name}.lora_up.weight"] = torch.randn(16, 3, generator=gen)  # rank 3 vs down's 2
    with pytest.raises(FormatError, match=rf"{name}: .*not LoRA factors of one rank"):
        lora_from_state_dict(sd)
    out, report = lora_from_state_dict(sd, skip_bad_modules=True)
    assert name not in out.layers and report.skipped_modules == (name,)


def _write(sd, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.mark.parametrize("command", ["resize", "merge", "info"])
def test_cli_bad_module_exit_2_then_skip(command, gen, tmp_path, capsys):
    sd, name = _bad_sd("lora_down", gen)
    path = _write(sd, tmp_path / "bad.safetensors")
    args = {"resize": ["resize", str(path), "--rank", "2", "--dry-run", "--no-progress"],
            "merge": ["merge", f"{path}:1", "--dry-run", "--no-progress"],
            "info": ["info", str(path)]}[command]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rankwise: error: {path}: 1 LoRA module does not fit its sd1 layer: {name}: ")
    assert "\n" not in err and "(2, 7)" in err and "--skip-bad-modules" in err
    assert main(args + ["--skip-bad-modules"]) == 0
    out = capsys.readouterr().out
    assert f"dropped 1 module(s) that do not fit their layer (--skip-bad-modules): {name}" in out


# ----------------------------------------------------------------------------- content, not name


def test_safetensors_named_ckpt_is_read_by_content(tmp_path, capsys):
    lora = random_lora(TINY, rank=2, seed=3)
    real = tmp_path / "real.safetensors"
    save_lora(lora, real, dtype=torch.float32)
    fake = tmp_path / "actually_safetensors.ckpt"
    fake.write_bytes(real.read_bytes())
    assert sniff(fake) is FileKind.SAFETENSORS
    again, report = load_lora(fake)
    assert set(again.layers) == set(lora.layers)
    assert any("is a safetensors file despite its extension" in n for n in report.notes)
    assert main(["info", str(fake)]) == 0
    assert "despite its extension" in capsys.readouterr().out


def test_checkpoint_safetensors_named_ckpt_extracts(pairs, tmp_path, capsys):
    base, tuned = pairs["new-new"]
    fake = tmp_path / "tuned.ckpt"
    fake.write_bytes(tuned.read_bytes())
    with FileSource(fake) as src:
        assert src.notes and "despite its extension" in src.notes[0]
    out = tmp_path / "x.safetensors"
    assert main(["extract", str(base), str(fake), "--rank", "4", "-o", str(out), "--no-progress"]) == 0
    assert "despite its extension" in capsys.readouterr().out


def test_pickle_named_safetensors_is_read_as_a_pickle(tmp_path):
    path = tmp_path / "pickled.safetensors"
    torch.save(lora_to_state_dict(random_lora(TINY, rank=2, seed=4), dtype=torch.float32), path)
    assert sniff(path) is FileKind.PICKLE
    lora, report = load_lora(path)
    assert len(lora) > 0 and any("is a pickle file despite its extension" in n for n in report.notes)


def test_garbage_is_neither_format(tmp_path):
    path = tmp_path / "noise.bin2"
    path.write_bytes(b"hello world, not a model")
    with pytest.raises(FormatError, match="neither a safetensors file nor a PyTorch checkpoint"):
        read_state_dict(path)


@pytest.mark.parametrize("argv", [
    ["resize", "{d}", "--rank", "2", "--dry-run"], ["info", "{d}"], ["merge", "{d}:1", "--dry-run"],
    ["extract", "{d}", "{d}", "--dry-run"], ["clean-clip", "{d}", "{d}", "--report-only"],
])
def test_directory_input_says_it_is_a_directory(argv, tmp_path, capsys):
    d = tmp_path / "folder.safetensors"
    d.mkdir()
    assert main([a.format(d=d) for a in argv] + ["--no-progress"] * (argv[0] != "info")) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"rankwise: error: {d} is a directory, not a file; give the path of a " + (
        "checkpoint file" if argv[0] in ("extract", "clean-clip") else "file")


def test_directory_and_missing_file_in_the_core(tmp_path):
    with pytest.raises(InputFileError, match="is a directory, not a file"):
        load_lora(tmp_path)
    with pytest.raises(InputFileError, match="is a directory, not a file"):
        FileSource(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):  # InputFileError is both
        load_lora(tmp_path / "missing.safetensors")
    with pytest.raises(RankwiseError):
        read_state_dict(tmp_path / "missing.ckpt")


# ----------------------------------------------------------------------------- .ckpt notes


def _ckpt_with_extras(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    torch.save({"state_dict": sd, "global_step": 1234, "epoch": 3,
                "optimizer_states": [{"lr": 1e-4}]}, path)
    return path


def test_ckpt_loader_notes_are_shown_for_loras(tmp_path, capsys):
    path = _ckpt_with_extras(tmp_path / "l.ckpt", lora_to_state_dict(random_lora(TINY, rank=2, seed=5),
                                                                    dtype=torch.float32))
    lora, report = load_lora(path)
    assert any("ignored top-level entries ['epoch', 'global_step', 'optimizer_states']" in n for n in report.notes)
    assert main(["resize", str(path), "--rank", "1", "--dry-run", "--no-progress"]) == 0
    assert "ignored top-level entries" in capsys.readouterr().out


def test_ckpt_loader_notes_are_shown_for_checkpoints(pairs, tmp_path, capsys):
    base, tuned = pairs["new-new"]
    ckpt = _ckpt_with_extras(tmp_path / "tuned.ckpt", load_file(str(tuned)))
    with FileSource(ckpt) as src:
        assert any("global_step" in n for n in src.notes)
    assert main(["extract", str(base), str(ckpt), "--rank", "4", "--dry-run", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "tuned.ckpt: used the 'state_dict' entry; ignored top-level entries" in out
    assert main(["clean-clip", str(base), str(ckpt), "--report-only"]) == 0
    assert "ignored top-level entries" in capsys.readouterr().out

"""The command line end to end on tiny synthetic checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from rankwise.core.cli import main
from rankwise.core.io import load_lora
from rankwise.core.synthetic import DeltaKind, PlantedDelta, write_checkpoint_pair
from rankwise.core.types import Arch


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_pair")
    base, tuned = d / "base.safetensors", d / "tuned.safetensors"
    write_checkpoint_pair(base, tuned, Arch.SD1, size="tiny", delta=PlantedDelta(DeltaKind.LOWRANK, rank=4), seed=3)
    return base, tuned


def test_dry_run_writes_nothing(pair, tmp_path, capsys):
    base, tuned = pair
    out = tmp_path / "x.safetensors"
    assert main(["extract", str(base), str(tuned), "-o", str(out), "--rank", "4", "--dry-run", "--no-progress"]) == 0
    assert list(tmp_path.iterdir()) == []
    assert "layers written" in capsys.readouterr().out


def test_extract_sweep_resize_merge_info(pair, tmp_path, capsys):
    base, tuned = pair
    out = tmp_path / "sweep.safetensors"
    args = ["extract", str(base), str(tuned), "-o", str(out), "--rule", "2,sv_fro:0.99", "--max-rank", "8",
            "--report-json", str(tmp_path / "r.json"), "--spectrum", str(tmp_path / "s.png"), "--no-progress"]
    assert main(args) == 0
    r2, rfro = tmp_path / "sweep_r2.safetensors", tmp_path / "sweep_sv_fro0.99.safetensors"
    assert r2.exists() and rfro.exists() and (tmp_path / "sweep_r2.png").exists()
    report = json.loads((tmp_path / "sweep_r2.report.json").read_text())
    assert report["operation"] == "extract" and report["totals"]["written"] > 0
    lora, _ = load_lora(rfro)
    assert max(lora.ranks().values()) <= 4  # planted rank 4 found by the dynamic rule

    small = tmp_path / "small.safetensors"
    assert main(["resize", str(rfro), "-o", str(small), "--rank", "1", "--strength", "1.05", "--no-progress"]) == 0
    assert set(load_lora(small)[0].ranks().values()) == {1}

    merged = tmp_path / "diff.safetensors"
    assert main(["merge", f"{rfro}:1", f"{r2}:-1", "-o", str(merged), "--no-progress"]) == 0
    m, _ = load_lora(merged)
    a, b = load_lora(rfro)[0], load_lora(r2)[0]
    name = next(iter(m.layers))
    expected = a.layers[name].delta() - b.layers[name].delta()
    torch.testing.assert_close(m.layers[name].delta(), expected, rtol=2e-3, atol=2e-5)

    assert main(["info", str(merged), "--spectrum", str(tmp_path / "info.png"), "--metadata"]) == 0
    assert (tmp_path / "info.png").exists()
    capsys.readouterr()


def test_refuses_to_overwrite_an_input(pair, capsys):
    base, tuned = pair
    assert main(["extract", str(base), str(tuned), "-o", str(tuned), "--rank", "2", "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("rankwise: error: ")


def test_mismatched_architectures_are_a_clear_error(pair, tmp_path, capsys):
    base, _ = pair
    xl_base, xl_tuned = tmp_path / "xl_b.safetensors", tmp_path / "xl_t.safetensors"
    write_checkpoint_pair(xl_base, xl_tuned, Arch.SDXL, size="tiny", seed=1)
    assert main(["extract", str(base), str(xl_tuned), "--rank", "2", "--dry-run", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "sd1" in err.lower() and "sdxl" in err.lower()


def test_demo_runs(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "demo_r16.safetensors").exists()
    assert "done in" in capsys.readouterr().out


def test_progress_off_a_terminal_is_a_few_plain_lines(pair, tmp_path, capsys):
    base, tuned = pair
    assert main(["extract", str(base), str(tuned), "--rank", "2", "--dry-run"]) == 0  # capsys: not a TTY
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("extract: ")]
    assert 2 <= len(lines) <= 12, err
    total = lines[-1].split()[1].split("/")[1]
    assert lines[-1].startswith(f"extract: {total}/{total} layers (100%) ") and lines[-1].endswith(" s")
    done = [int(line.split()[1].split("/")[0]) for line in lines]
    assert done == sorted(done)


def test_plain_progress_lines_every_ten_percent():
    import io as _io

    from rankwise.core.cli import _plain_progress

    stream = _io.StringIO()
    update, close = _plain_progress("extract", "layers", stream)
    for i in range(1, 1059):
        update(i, 1058, "x")
    close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and lines[0].startswith("extract: 106/1058 layers (10%) ")
    assert lines[-1].startswith("extract: 1058/1058 layers (100%) ")


def test_clean_clip_prints_a_readable_summary(pair, tmp_path, capsys):
    base, tuned = pair
    out = tmp_path / "clean.safetensors"
    assert main(["clean-clip", str(base), str(tuned), "-o", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "CleanReport(" not in text
    assert f"tensors" in text and str(out) in text and "text encoders replaced by base: te1" in text
    assert main(["clean-clip", str(base), str(tuned), "-o", str(out), "--no-progress"]) == 2  # exists
    assert "already exists" in capsys.readouterr().err


def test_info_does_not_claim_to_write_layers(pair, tmp_path, capsys):
    base, tuned = pair
    out = tmp_path / "l.safetensors"
    assert main(["extract", str(base), str(tuned), "-o", str(out), "--rank", "2", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "layers written" not in text and "info: " in text and " layers (" in text


def test_demo_never_replaces_a_users_file(tmp_path, capsys):
    (tmp_path / "base.safetensors").write_bytes(b"mine")
    assert main(["demo", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "base.safetensors already exists" in capsys.readouterr().err
    assert (tmp_path / "base.safetensors").read_bytes() == b"mine"


def test_key_names_choice(tmp_path, capsys):
    """--key-names writes the chosen codec where the architecture allows it, and refuses it (one line) elsewhere."""
    from safetensors import safe_open

    from rankwise.core.archs import key_table
    from rankwise.core.io import save_lora
    from rankwise.core.synthetic import random_lora

    flux = tmp_path / "flux.safetensors"
    save_lora(random_lora(key_table(Arch.FLUX, "tiny"), rank=4).replace(arch=Arch.FLUX), flux)
    out = tmp_path / "flux_diffusers.safetensors"
    assert main(["resize", str(flux), "-o", str(out), "--rank", "2", "--key-names", "diffusers", "--no-progress"]) == 0
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    # the transformer in diffusers names; text encoders keep names their loaders read (T5: kohya)
    assert any(k.startswith("transformer.") for k in keys)
    assert all(k.startswith(("transformer.", "text_encoder.", "lora_te")) for k in keys)
    back = load_lora(out)[0].ranks()
    assert set(back) == set(load_lora(flux)[0].ranks()) and set(back.values()) == {2}

    sd1 = tmp_path / "sd1.safetensors"
    save_lora(random_lora(key_table(Arch.SD1, "tiny"), rank=4).replace(arch=Arch.SD1), sd1)
    capsys.readouterr()
    assert main(["resize", str(sd1), "-o", str(tmp_path / "x.safetensors"), "--rank", "2",
                 "--key-names", "diffusers", "--no-progress"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("rankwise: error: --key-names diffusers: ") and "\n" not in err
    assert "layers written" not in captured.out  # refused before the work, not after it
    assert not (tmp_path / "x.safetensors").exists()

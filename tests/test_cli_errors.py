"""Every user mistake on the command line is one line ``rankwise: error: …`` on stderr and exit 2,
never a traceback, and nothing is written."""

from __future__ import annotations

import os
import struct

import pytest
import torch

from rankwise.core import cli
from rankwise.core.cli import _parse_merge_input, main
from rankwise.core.errors import RankwiseError
from rankwise.core.io import save_lora
from rankwise.core.synthetic import DeltaKind, PlantedDelta, random_lora, write_checkpoint_pair
from rankwise.core.archs import key_table
from rankwise.core.types import Arch


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_errors")
    base, tuned = d / "base.safetensors", d / "tuned.safetensors"
    write_checkpoint_pair(base, tuned, Arch.SD1, size="tiny", delta=PlantedDelta(DeltaKind.LOWRANK, rank=4), seed=5)
    lora = d / "l.safetensors"
    save_lora(random_lora(key_table(Arch.SD1, "tiny"), rank=4, seed=2), lora, dtype=torch.float32)
    (d / "folder.safetensors").mkdir()
    empty = d / "empty.safetensors"
    empty.write_bytes(struct.pack("<Q", 2) + b"{}")
    return {"base": str(base), "tuned": str(tuned), "lora": str(lora), "dir": str(d / "folder.safetensors"),
            "missing": str(d / "missing.safetensors"), "empty": str(empty), "root": d}


def _error(capsys, argv) -> str:
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (argv, out, err)
    assert len(lines) == 1 and lines[0].startswith("rankwise: error: "), err
    return lines[0].removeprefix("rankwise: error: ")


RANK_CASES = [
    (["--rank", "0"], "a fixed rank must be a whole number ≥ 1, got 0"),
    (["--rule", "sv_fro:1.5"], "sv_fro takes a fraction in (0, 1], got 1.5"),
    (["--rule", "foo:3"], "unknown rank rule 'foo'; use one of: fixed, sv_ratio, sv_cumulative, sv_fro, threshold, sv_knee, size, params"),
    (["--rule", ","], "no rank rule in ','"),
    (["--min-rank", "0"], "min_rank must be ≥ 1, got 0"),
    (["--rule", "sv_fro:0.9", "--min-rank", "50", "--max-rank", "10"],
     "min_rank 50 is above max_rank 10; no rank can satisfy both"),
    (["--max-rank", "0", "--rule", "sv_fro:0.9"], "max_rank must be ≥ 1 (or unset), got 0"),
    (["--threads", "-1"], "--threads must be a whole number ≥ 1, got -1"),
    (["--threads", "0"], "--threads must be a whole number ≥ 1, got 0"),
    (["--workers", "0"], "--workers must be a whole number ≥ 1, got 0"),
    (["--rank", "4", "--rule", "8"], "give either --rank or --rule, not both"),
]


@pytest.mark.parametrize(("extra", "message"), RANK_CASES)
def test_invalid_rank_options_resize(capsys, files, extra, message):
    out = files["root"] / "never.safetensors"
    assert _error(capsys, ["resize", files["lora"], "-o", str(out), "--no-progress", *extra]) == message
    assert not out.exists()


EXTRACT_CASES = RANK_CASES + [
    (["--clamp-quantile", "2"], "--clamp-quantile must be in (0, 1] (e.g. 0.99), got 2"),
    (["--clamp-quantile", "0"], "--clamp-quantile must be in (0, 1] (e.g. 0.99), got 0"),
    (["--device", "tpu"], "--device tpu: unknown device; use cpu, cuda, cuda:N or mps"),
    (["--device", "meta"], "--device meta: not supported; use cpu, cuda, cuda:N or mps"),
]


@pytest.mark.parametrize(("extra", "message"), EXTRACT_CASES)
def test_invalid_options_extract(capsys, files, extra, message):
    out = files["root"] / "never.safetensors"
    assert _error(capsys, ["extract", files["base"], files["tuned"], "-o", str(out), "--no-progress", *extra]) == message
    assert not out.exists()


def test_device_cuda_without_cuda(capsys, files, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = _error(capsys, ["extract", files["base"], files["tuned"], "--dry-run", "--device", "cuda", "--no-progress"])
    assert message.startswith("--device cuda: CUDA is not available (") and message.endswith("); use --device cpu")


def test_device_cuda_index_beyond_the_gpus(capsys, files, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _error(capsys, ["extract", files["base"], files["tuned"], "--dry-run", "--device", "cuda:3"]) == (
        "--device cuda:3: there is no such GPU (this machine has 1)")


@pytest.mark.parametrize("command", ["extract", "resize", "merge", "info", "clean-clip"])
@pytest.mark.parametrize(("which", "message"), [("missing", "no such file: {}"), ("dir", "{} is a directory, not a file")])
def test_missing_file_or_directory_input(capsys, files, command, which, message):
    bad = files[which]
    out = str(files["root"] / "never.safetensors")
    argv = {
        "extract": ["extract", bad, files["tuned"], "-o", out],
        "resize": ["resize", bad, "-o", out],
        "merge": ["merge", files["lora"], bad, "-o", out],
        "info": ["info", bad],
        "clean-clip": ["clean-clip", files["base"], bad, "-o", out],
    }[command]
    what = "checkpoint file" if command in ("extract", "clean-clip") else "file"
    expected = message.format(bad) + (f"; give the path of a {what}" if which == "dir" else "")
    assert _error(capsys, argv) == expected


def test_merge_ratio_that_is_not_a_number(capsys, files):
    out = str(files["root"] / "never.safetensors")
    assert _error(capsys, ["merge", f"{files['lora']}:abc", "-o", out]) == (
        f"ratio 'abc' of {files['lora']} is not a number (write PATH:RATIO, e.g. {files['lora']}:0.5)")
    assert _error(capsys, ["merge", f"{files['lora']}:inf", "-o", out]) == f"ratio 'inf' of {files['lora']} must be a finite number"


def test_merge_paths_with_colons_of_their_own(tmp_path):
    odd = tmp_path / "a:b.safetensors"
    odd.write_bytes(b"")
    assert _parse_merge_input(str(odd)) == (str(odd), 1.0)  # the suffix is no number and the file exists
    assert _parse_merge_input(f"{odd}:-0.5") == (str(odd), -0.5)
    assert _parse_merge_input("x.safetensors:1e-1") == ("x.safetensors", 0.1)
    assert _parse_merge_input("C:/models/x.safetensors") == ("C:/models/x.safetensors", 1.0)
    assert _parse_merge_input("plain.safetensors") == ("plain.safetensors", 1.0)
    numbered = tmp_path / "v:2"
    numbered.write_bytes(b"")
    assert _parse_merge_input(str(numbered)) == (str(numbered), 1.0)  # "v" does not exist, "v:2" does
    with pytest.raises(RankwiseError, match="ratio '' of"):
        _parse_merge_input("x.safetensors:")


def test_clean_clip_unknown_encoder_names_the_valid_ones(capsys, files):
    out = files["root"] / "never.safetensors"
    assert _error(capsys, ["clean-clip", files["base"], files["tuned"], "--replace", "te9", "-o", str(out)]) == (
        "--replace: unknown text encoder 'te9'; use auto, none or a comma list of te1, te2, te3")
    # te3 exists since SD3 (three text encoders): named against the pair's architecture
    assert _error(capsys, ["clean-clip", files["base"], files["tuned"], "--replace", "te3", "-o", str(out),
                           "--no-progress"]) == "sd1 has no text encoder te3; it has te1"
    assert _error(capsys, ["clean-clip", files["base"], files["tuned"], "--replace", "te2", "-o", str(out),
                           "--no-progress"]) == "sd1 has no text encoder te2; it has te1"
    assert not out.exists()


def test_output_required_and_parent_is_a_file(capsys, files):
    assert _error(capsys, ["resize", files["lora"], "--rank", "2"]) == "-o/--output is required unless --dry-run"
    inside = os.path.join(files["lora"], "x.safetensors")
    assert _error(capsys, ["resize", files["lora"], "-o", inside]) == (
        f"cannot write {inside}: {files['lora']} is a file, not a folder")


def test_an_empty_file_says_so(capsys, files):
    message = _error(capsys, ["info", files["empty"]])
    assert message == f"{files['empty']}: the file holds no tensors, so no LoRA (an empty or placeholder file?)"
    assert "(e.g. )" not in message


def test_unexpected_errors_still_give_a_traceback(files, monkeypatch):
    """Only RankwiseError and OSError become one line; a bug propagates (a traceback)."""
    parser = cli.build_parser()
    parser._subparsers._group_actions[0].choices["info"].set_defaults(func=lambda args: 1 / 0)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    with pytest.raises(ZeroDivisionError):
        main(["info", files["lora"]])

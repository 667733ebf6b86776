"""The output guard (core/io.py): planned before the work, atomic no-overwrite publish, no temp file
left by errors or signals, clear one-line errors for OS failures; and the safetensors header reader
under random and damaged headers."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rankwise
from rankwise.core import io as rio
from rankwise.core.cli import main
from rankwise.core.errors import FormatError, OutputError, UnsafePathError
from rankwise.core.io import (OutputKind, load_lora, plan_outputs, read_safetensors_header,
                              save_image, save_lora, write_output, write_text_output)
from rankwise.core.archs import key_table
from rankwise.core.synthetic import random_lora
from rankwise.core.types import Arch

DRIVER = Path(__file__).with_name("guard_driver.py")
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(rankwise.__file__)))


def _tmp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("guard_lora")
    lora = random_lora(key_table(Arch.SD1, "tiny"), rank=4, seed=1)
    path = d / "in.safetensors"
    save_lora(lora, path, dtype=torch.float32)
    return path


# ----------------------------------------------------------------------------------- planning


def test_plan_refuses_inputs_by_symlink_and_hard_link(tmp_path, lora_file):
    link = tmp_path / "link.json"
    link.symlink_to(lora_file)
    hard = tmp_path / "hard.safetensors"
    os.link(lora_file, hard)
    for path, kind in ((link, OutputKind.REPORT), (hard, OutputKind.LORA)):
        with pytest.raises(UnsafePathError, match="is one of the inputs"):
            plan_outputs([(path, kind)], inputs=[lora_file], overwrite=True)


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("x.ckpt", OutputKind.LORA, "a LoRA is saved as .safetensors"),
        ("x.safetensors", OutputKind.REPORT, "a report is saved as .json"),
        ("x.gif", OutputKind.IMAGE, "a picture is saved as .png, .jpg, .jpeg, .webp"),
        ("missing/x.json", OutputKind.REPORT, "the folder .*missing does not exist"),
    ],
)
def test_plan_refuses_bad_names(tmp_path, name, kind, message):
    with pytest.raises(UnsafePathError, match=message):
        plan_outputs([(tmp_path / name, kind)])


def test_plan_refuses_an_existing_file_a_directory_a_file_parent_and_duplicates(tmp_path):
    (tmp_path / "old.json").write_text("{}")
    (tmp_path / "d.png").mkdir()
    (tmp_path / "f").write_text("")
    with pytest.raises(UnsafePathError, match="already exists"):
        plan_outputs([(tmp_path / "old.json", OutputKind.REPORT)])
    plan_outputs([(tmp_path / "old.json", OutputKind.REPORT)], overwrite=True)
    with pytest.raises(UnsafePathError, match="is a directory"):
        plan_outputs([(tmp_path / "d.png", OutputKind.IMAGE)], overwrite=True)
    with pytest.raises(UnsafePathError, match=r"f is a file, not a folder"):
        plan_outputs([(tmp_path / "f" / "x.json", OutputKind.REPORT)])
    with pytest.raises(UnsafePathError, match="would be written twice"):
        plan_outputs([(tmp_path / "a.safetensors", OutputKind.LORA), (tmp_path / "a.safetensors", OutputKind.CHECKPOINT)])


def test_plan_describes_what_a_dry_run_would_write(tmp_path):
    plan = plan_outputs([(tmp_path / "a.safetensors", OutputKind.LORA)], dry_run=True)
    assert plan.describe() == [f"would write lora {tmp_path / 'a.safetensors'}"]
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------- writing


def test_write_output_publishes_without_replacing_and_leaves_no_temp(tmp_path):
    target = tmp_path / "r.json"
    write_text_output(target, "one")
    assert target.read_text() == "one" and _tmp_files(tmp_path) == []
    with pytest.raises(UnsafePathError, match="already exists"):
        write_text_output(target, "two")
    write_text_output(target, "three", overwrite=True)
    assert target.read_text() == "three" and _tmp_files(tmp_path) == []


def test_a_file_created_while_writing_is_never_replaced(tmp_path):
    target = tmp_path / "r.json"

    def writer(tmp: str) -> None:
        assert os.path.basename(tmp).startswith(".r.json.") and tmp.endswith(".tmp")
        Path(tmp).write_text("ours")
        target.write_text("theirs")  # another process got there first

    with pytest.raises(OutputError, match="was created by another process while this run was writing; nothing was replaced"):
        write_output(target, writer, kind=OutputKind.REPORT)
    assert target.read_text() == "theirs" and _tmp_files(tmp_path) == []


@pytest.mark.parametrize("link_errno", [errno.EPERM, errno.EOPNOTSUPP])
def test_publish_without_hard_links_still_never_replaces(tmp_path, monkeypatch, link_errno):
    def no_link(src, dst, *a, **k):
        raise OSError(link_errno, os.strerror(link_errno))

    monkeypatch.setattr(rio.os, "link", no_link)
    target = tmp_path / "r.json"
    write_text_output(target, "one")
    assert target.read_text() == "one" and _tmp_files(tmp_path) == []

    def writer(tmp: str) -> None:
        Path(tmp).write_text("ours")
        (tmp_path / "s.json").write_text("theirs")

    with pytest.raises(OutputError, match="created by another process"):
        write_output(tmp_path / "s.json", writer, kind=OutputKind.REPORT)
    assert (tmp_path / "s.json").read_text() == "theirs" and _tmp_files(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")])
def test_every_failure_removes_the_temp_file(tmp_path, exc):
    def writer(tmp: str) -> None:
        Path(tmp).write_bytes(b"partial")
        raise exc

    expected = OutputError if isinstance(exc, OSError) else type(exc)
    with pytest.raises(expected):
        write_output(tmp_path / "x.safetensors", writer)
    assert list(tmp_path.iterdir()) == []


def test_os_errors_name_the_path_and_the_reason(tmp_path):
    def writer(tmp: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError) as info:
        write_output(tmp_path / "x.safetensors", writer)
    assert str(info.value) == f"cannot write {tmp_path / 'x.safetensors'}: No space left on device (ENOSPC)"


def test_a_failing_cleanup_is_one_logged_line_not_a_second_exception(tmp_path, monkeypatch, caplog):
    def writer(tmp: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def read_only_remove(path, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(rio.os, "remove", read_only_remove)
    with pytest.raises(OutputError, match="No space left on device"):
        write_output(tmp_path / "x.safetensors", writer)
    lines = [r.getMessage() for r in caplog.records if r.name == "rankwise"]
    assert len(lines) == 1 and "could not remove the temp file" in lines[0] and "EROFS" in lines[0]


def test_save_image_by_extension(tmp_path):
    from PIL import Image

    img = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    for ext, fmt in ((".png", "PNG"), (".jpg", "JPEG"), (".webp", "WEBP")):
        save_image(img, tmp_path / f"s{ext}")
        with Image.open(tmp_path / f"s{ext}") as saved:
            assert saved.format == fmt
    with pytest.raises(UnsafePathError, match="already exists"):
        save_image(img, tmp_path / "s.png")
    assert _tmp_files(tmp_path) == []


# ----------------------------------------------------------------------------------- CLI


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("rankwise: error: "), err
    assert "Traceback" not in err
    return lines[0].removeprefix("rankwise: error: ")


def test_every_output_is_checked_before_any_tensor_is_read(tmp_path, monkeypatch, capsys, lora_file):
    import rankwise.core.extract as extract_mod
    import rankwise.core.sources as sources_mod

    def forbidden(*a, **k):
        raise AssertionError("the work started before the outputs were checked")

    monkeypatch.setattr(extract_mod, "extract_sweep_detailed", forbidden)
    monkeypatch.setattr(sources_mod, "open_source", forbidden)
    monkeypatch.setattr(rio, "load_lora", forbidden)
    base, tuned = tmp_path / "b.safetensors", tmp_path / "t.safetensors"
    base.write_bytes(b"x")
    tuned.write_bytes(b"y")
    existing = tmp_path / "old.safetensors"
    existing.write_bytes(b"old")
    cases = [
        (["extract", base, tuned, "-o", existing], "already exists"),
        (["extract", base, tuned, "-o", base], "is one of the inputs"),
        (["extract", base, tuned, "-o", tmp_path / "x.ckpt"], "a LoRA is saved as .safetensors"),
        (["extract", base, tuned, "-o", tmp_path / "x.safetensors", "--spectrum", tmp_path / "s.bmp"], "a picture is saved as"),
        (["extract", base, tuned, "-o", tmp_path / "x.safetensors", "--report-json", base], "is one of the inputs"),
        (["extract", base, tuned, "--dry-run", "--report-json", base], "is one of the inputs"),
        (["extract", base, tuned, "-o", tmp_path / "s.safetensors", "--rule", "4,sv_fro:0.9", "--spectrum", tmp_path / "x.png"], None),
        (["resize", lora_file, "-o", lora_file, "--report-json", lora_file], "is one of the inputs"),
        (["resize", lora_file, "-o", tmp_path / "r.safetensors", "--report-json", existing.with_suffix(".json")], None),
        (["merge", f"{lora_file}:1", "-o", lora_file], "is one of the inputs"),
        (["info", lora_file, "--spectrum", lora_file], "is one of the inputs"),
        (["clean-clip", base, tuned, "-o", tuned], "is one of the inputs"),
    ]
    existing.with_suffix(".json").write_text("{}")
    (tmp_path / "s_r4.png").write_bytes(b"png")
    cases[6] = (cases[6][0], "s_r4.png already exists")
    cases[8] = (cases[8][0], "old.json already exists")
    for argv, message in cases:
        rc, _, err = _cli(capsys, *argv, *(["--no-progress"] if argv[0] not in ("info",) else []))
        assert rc == 2, (argv, err)
        assert message in _one_error_line(err), (argv, err)
    assert existing.read_bytes() == b"old" and base.read_bytes() == b"x"


def test_dry_run_writes_nothing_at_all(tmp_path, capsys, lora_file):
    folder = tmp_path / "out"
    folder.mkdir()
    rc, out, _ = _cli(capsys, "resize", lora_file, "-o", folder / "r.safetensors", "--rank", "2", "--dry-run",
                      "--report-json", folder / "r.json", "--no-progress")
    assert rc == 0 and list(folder.iterdir()) == []
    assert f"would write the report to {folder / 'r.json'}" in out
    assert f"would write the LoRA to {folder / 'r.safetensors'}" in out
    rc, out, _ = _cli(capsys, "info", lora_file, "--dry-run", "--spectrum", folder / "s.png", "--report-json", folder / "i.json")
    assert rc == 0 and list(folder.iterdir()) == []
    assert "would write the spectrum" in out


def test_report_and_spectrum_never_replace_an_existing_file(tmp_path, capsys, lora_file):
    report, png = tmp_path / "r.json", tmp_path / "s.png"
    report.write_text("keep")
    png.write_bytes(b"keep")
    rc, _, err = _cli(capsys, "info", lora_file, "--report-json", report)
    assert rc == 2 and "r.json already exists" in _one_error_line(err)
    rc, _, err = _cli(capsys, "info", lora_file, "--spectrum", png)
    assert rc == 2 and "s.png already exists" in _one_error_line(err)
    assert report.read_text() == "keep" and png.read_bytes() == b"keep"
    rc, _, _ = _cli(capsys, "info", lora_file, "--spectrum", png, "--report-json", report, "--overwrite")
    assert rc == 0 and json.loads(report.read_text())["operation"] == "info" and png.read_bytes()[:4] == b"\x89PNG"
    assert _tmp_files(tmp_path) == []


@pytest.mark.parametrize(
    ("err_no", "reason"),
    [(errno.EROFS, "Read-only file system (EROFS)"), (errno.ENOSPC, "No space left on device (ENOSPC)"),
     (errno.EACCES, "Permission denied (EACCES)")],
)
def test_os_errors_on_writing_are_one_line_and_leave_nothing(tmp_path, monkeypatch, capsys, lora_file, err_no, reason):
    real_open = os.open

    def failing_open(path, flags, *args, **kwargs):
        if os.fspath(path).endswith(".tmp"):
            raise OSError(err_no, os.strerror(err_no), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(rio.os, "open", failing_open)
    out = tmp_path / "o" / "r.safetensors"
    out.parent.mkdir()
    rc, _, err = _cli(capsys, "resize", lora_file, "-o", out, "--rank", "2", "--no-progress")
    assert rc == 2
    assert _one_error_line(err) == f"cannot write {out}: {reason}"
    assert list(out.parent.iterdir()) == []


def test_disk_full_during_the_write_is_one_line_and_leaves_no_temp(tmp_path, monkeypatch, capsys, lora_file):
    def full(path, plan, fsync=True):
        with open(path, "wb") as f:
            f.write(plan.header)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rio, "write_plan", full)
    out = tmp_path / "o" / "r.safetensors"
    out.parent.mkdir()
    rc, _, err = _cli(capsys, "resize", lora_file, "-o", out, "--rank", "2", "--no-progress")
    assert rc == 2 and _one_error_line(err) == f"cannot write {out}: No space left on device (ENOSPC)"
    assert list(out.parent.iterdir()) == []


# ----------------------------------------------------------------------------------- processes


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PKG_PARENT, env.get("PYTHONPATH")) if p)
    return env


def _start(mode: str, *argv, ignore_sigint: bool = False, env: dict[str, str] | None = None) -> subprocess.Popen:
    def preexec() -> None:
        if ignore_sigint:  # like a job started with '&' from a script: SIGINT inherited as ignored
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    return subprocess.Popen(
        [sys.executable, str(DRIVER), mode, *map(str, argv)], env={**_env(), **(env or {})}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, preexec_fn=preexec,
    )


def _wait_for_temp(folder: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not _tmp_files(folder):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before writing: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("no temp file appeared")
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("sig", "rc", "message", "ignore_sigint"),
    [
        (signal.SIGTERM, 143, "rankwise: terminated (SIGTERM); no partial files were left", False),
        (signal.SIGINT, 130, "rankwise: cancelled; no partial files were left", False),
        (signal.SIGINT, 130, "rankwise: cancelled; no partial files were left", True),
    ],
    ids=["sigterm", "sigint", "sigint-inherited-ignored"],
)
def test_a_signal_during_the_save_stops_it_and_leaves_nothing(tmp_path, lora_file, sig, rc, message, ignore_sigint):
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "r.safetensors"
    proc = _start("slow", "resize", lora_file, "-o", out, "--rank", "2", "--no-progress", ignore_sigint=ignore_sigint)
    _wait_for_temp(folder, proc)
    proc.send_signal(sig)
    try:
        stdout, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the run did not stop on the signal")
    assert proc.returncode == rc, stderr
    assert stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in stderr
    assert list(folder.iterdir()) == []


def test_two_runs_writing_the_same_output_at_once(tmp_path, lora_file):
    """Both runs finish their temp file, then publish together: exactly one wins, the other fails with
    the clear message, and the file is one complete result (repeated 8 times)."""
    for trial in range(8):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        out = folder / "same.safetensors"
        ready = tmp_path / f"ready{trial}"
        ready.mkdir()
        procs = [_start("race", "resize", lora_file, "-o", out, "--rank", str(rank), "--no-progress",
                        env={"RANKWISE_RACE_DIR": str(ready)}) for rank in (1, 2)]
        results = [p.communicate(timeout=180) for p in procs]
        codes = [p.returncode for p in procs]
        assert sorted(codes) == [0, 2], (codes, results)
        loser = results[codes.index(2)][1]
        assert loser.strip().splitlines()[-1] == (
            f"rankwise: error: {out} was created by another process while this run was writing; nothing was replaced"
        )
        winner_rank = (1, 2)[codes.index(0)]
        lora, _ = load_lora(out)
        assert set(lora.ranks().values()) == {winner_rank}  # one complete result, the winner's
        assert [p.name for p in folder.iterdir()] == ["same.safetensors"]
        assert len(list(ready.iterdir())) == 2  # both reached the publish


def test_python_dash_m_rankwise_is_the_cli(lora_file):
    proc = subprocess.run([sys.executable, "-m", "rankwise", "info", str(lora_file)], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "info: " in proc.stdout and "layers written" not in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "rankwise", "resize", str(lora_file), "--rank", "0", "--dry-run"],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "rankwise: error: a fixed rank must be a whole number ≥ 1, got 0"


# ----------------------------------------------------------------------------------- header fuzzing


def _file(tmp_path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
    path = tmp_path / "f.safetensors"
    n = len(header) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + header + data)
    return path


_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**40), st.floats(allow_nan=True),
                          st.text(max_size=6))
_json = st.recursive(_json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                     max_leaves=12)
_entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X9"]) | _json,
        "shape": st.lists(st.integers(-2, 6), max_size=3) | _json,
        "data_offsets": st.lists(st.integers(-4, 300), min_size=0, max_size=3) | _json,
    },
)
_header = st.dictionaries(st.text(max_size=8), _entry | _json, max_size=5)


def _check(path: Path) -> None:
    try:
        infos, meta = read_safetensors_header(path)
    except FormatError:
        return
    # a correct result: the entries tile the data section exactly and fit their dtype and shape
    size = path.stat().st_size
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    spans = sorted(i.offsets for i in infos.values())
    cursor = 0
    for begin, end in spans:
        assert begin == cursor and end >= begin
        cursor = end
    assert cursor == size - 8 - n
    assert all(isinstance(v, str) for v in meta.values())
    for info in infos.values():
        assert all(isinstance(s, int) and s >= 0 for s in info.shape)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=_header, meta=st.one_of(st.none(), _json, st.dictionaries(st.text(max_size=4), st.text(max_size=4))),
       data_len=st.integers(0, 320))
def test_random_headers_give_a_format_error_or_a_correct_result(tmp_path, header, meta, data_len):
    doc = dict(header)
    if meta is not None:
        doc["__metadata__"] = meta
    _check(_file(tmp_path, json.dumps(doc).encode(), b"\0" * data_len))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=200), length=st.one_of(st.none(), st.integers(0, 2**64 - 1)), data=st.binary(max_size=64))
def test_damaged_bytes_give_a_format_error_or_a_correct_result(tmp_path, blob, length, data):
    _check(_file(tmp_path, blob, data, length))


def test_deeply_nested_header_is_a_format_error(tmp_path):
    with pytest.raises(FormatError, match="nested too deeply"):
        read_safetensors_header(_file(tmp_path, b"[" * 100_000 + b"]" * 100_000))


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]},  # a string is not a shape
        {"dtype": "F32", "shape": [4], "data_offsets": "016"},
        {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]},
        {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]},
        {"dtype": "X9", "shape": [-1], "data_offsets": [0, 16]},
    ],
)
def test_header_entries_of_the_wrong_type_are_refused(tmp_path, entry):
    with pytest.raises(FormatError, match="corrupt safetensors header entry"):
        read_safetensors_header(_file(tmp_path, json.dumps({"w": entry}).encode(), b"\0" * 16))


def test_overlapping_or_gapped_tensors_are_refused(tmp_path):
    e = lambda b, n: {"dtype": "U8", "shape": [n], "data_offsets": [b, b + n]}  # noqa: E731
    with pytest.raises(FormatError, match="overlaps"):
        read_safetensors_header(_file(tmp_path, json.dumps({"a": e(0, 8), "b": e(4, 4)}).encode(), b"\0" * 8))
    with pytest.raises(FormatError, match="belong to no tensor"):
        read_safetensors_header(_file(tmp_path, json.dumps({"a": e(0, 4), "b": e(8, 4)}).encode(), b"\0" * 12))

"""Fixtures for the tests that run the pack inside a real ComfyUI.

ComfyUI is found through ``COMFYUI_PATH`` (default ``~/ComfyUI``, must contain ``main.py``) and
runs with its own interpreter, ``COMFYUI_PYTHON`` (default ``<path>/venv/bin/python``), in a
subprocess: this test process never imports ComfyUI. Without either, every test here is skipped
with a reason that names what was looked for.

The session server gets a fresh ``--base-directory`` whose ``custom_nodes/`` links to this repo
(under a folder name other than "rankwise", with a dot and a dash in it) and whose
``models/checkpoints/`` holds a real-size SD1.5-layout random pair (see ``synthetic_pair.py``,
cached between runs). It listens on 127.0.0.1 only and is stopped (process group) at the end.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfy_harness import HERE, TIMINGS, ComfyInstall, ComfyServer, find_comfyui, populate_base_dir  # noqa: E402
from synthetic_pair import BASE_NAME, TUNED_NAME, ensure_sd15_pair  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.section("ComfyUI integration timings (wall / server CPU seconds)")
        for what, wall, cpu in TIMINGS:
            terminalreporter.write_line(f"{wall:8.1f} {cpu:8.1f}  {what}")


COMFY_FIXTURES = frozenset({"comfy_install", "comfy_server", "workflow_results"})


def pytest_collection_modifyitems(config, items):
    """Mark every test here that runs ComfyUI (``-m "not comfyui"`` leaves the pure ones)."""
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents and COMFY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.comfyui)


@pytest.fixture(scope="session")
def comfy_install() -> ComfyInstall:
    install, why = find_comfyui()
    if install is None:
        pytest.skip(why)
    return install


@pytest.fixture(scope="session")
def checkpoint_pair() -> tuple[Path, Path]:
    """The cached real-size SD1.5-layout pair (written on first use, ~1–2 min)."""
    base, tuned, _ = ensure_sd15_pair()
    return base, tuned


@pytest.fixture(scope="session")
def comfy_base_dir(tmp_path_factory, checkpoint_pair) -> Path:
    base = tmp_path_factory.mktemp("comfy-base")
    return populate_base_dir(base, {BASE_NAME: checkpoint_pair[0], TUNED_NAME: checkpoint_pair[1]})


@pytest.fixture(scope="session")
def comfy_server(comfy_install, comfy_base_dir, checkpoint_pair):
    server = ComfyServer(comfy_install, comfy_base_dir, checkpoint_pair)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if os.environ.get("RANKWISE_KEEP_COMFY_LOG"):
            shutil.copy(server.log_path, os.environ["RANKWISE_KEEP_COMFY_LOG"])

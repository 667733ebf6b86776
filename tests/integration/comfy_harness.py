"""The ComfyUI test harness: find a ComfyUI checkout, run it as a subprocess, talk to it over HTTP.

Used by conftest.py (fixtures) and the tests; nothing here imports ComfyUI. ComfyUI is found through
``COMFYUI_PATH`` (default ``~/ComfyUI``, must contain ``main.py``) and runs with its own interpreter,
``COMFYUI_PYTHON`` (default ``<path>/venv/bin/python``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PACK_FOLDER = "Rankwise-LoRA.test_pack"  # deliberately not "rankwise": imports must be relative
NODE_IDS = (
    "RankwiseLoadModelPair", "RankwiseLoadDiffusionModelPair", "RankwiseModelPair", "RankwiseCleanCLIP", "RankwiseExtractLoRA",
    "RankwiseResizeLoRA", "RankwiseMergeLoRAs", "RankwiseLoadLoRA", "RankwiseSaveLoRA",
    "RankwiseApplyLoRA", "RankwiseLoRAInfo", "RankwiseToLoraModel", "RankwiseFromLoraModel",
    "RankwiseImageGrid",
)
START_TIMEOUT_S = float(os.environ.get("RANKWISE_COMFY_START_TIMEOUT", "180"))


TIMINGS: list[tuple[str, float, float]] = []  # (what, wall s, server CPU s), shown at the end


@dataclass(frozen=True)
class ComfyInstall:
    path: Path
    python: Path

    def run_python(self, args: list[str], *, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run a helper script with ComfyUI's interpreter (ComfyUI's folder first on sys.path)."""
        env = dict(os.environ, PYTHONPATH=str(self.path), PYTHONDONTWRITEBYTECODE="1")
        wall0, cpu0 = time.perf_counter(), _children_cpu()
        try:
            return subprocess.run([str(self.python), *args], cwd=str(cwd or self.path), env=env, text=True,
                                  capture_output=True, timeout=timeout)
        finally:
            what = " ".join(Path(a).name if os.sep in a else a for a in args[:2])
            TIMINGS.append((what, time.perf_counter() - wall0, _children_cpu() - cpu0))


def _children_cpu() -> float:
    try:
        import resource
    except ImportError:  # not on Windows
        return 0.0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def find_comfyui() -> tuple[ComfyInstall | None, str]:
    """The ComfyUI checkout and interpreter, or None and why not."""
    raw = os.environ.get("COMFYUI_PATH")
    path = Path(raw).expanduser() if raw else Path.home() / "ComfyUI"
    source = "COMFYUI_PATH" if raw else "default ~/ComfyUI (set COMFYUI_PATH)"
    if not (path / "main.py").is_file():
        return None, f"no ComfyUI checkout: {path}/main.py not found ({source})"
    raw_py = os.environ.get("COMFYUI_PYTHON")
    python = Path(raw_py).expanduser() if raw_py else path / "venv" / "bin" / "python"
    if not (python.is_file() and os.access(python, os.X_OK)):
        how = "COMFYUI_PYTHON" if raw_py else "default <COMFYUI_PATH>/venv/bin/python (set COMFYUI_PYTHON)"
        return None, f"no ComfyUI python: {python} is not an executable file ({how})"
    return ComfyInstall(path.resolve(), python), ""


def populate_base_dir(base: Path, checkpoints: dict[str, Path]) -> Path:
    """Fill a fresh ComfyUI ``--base-directory``: this repo linked into ``custom_nodes/`` under
    :data:`PACK_FOLDER`, ``models/checkpoints/<name>`` links to the given files, empty model,
    input, output, temp and user folders."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(REPO, target_is_directory=True)
    ckpts = base / "models" / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    for name, target in checkpoints.items():
        (ckpts / name).symlink_to(target)
    for sub in ("models/loras", "models/vae", "models/embeddings", "models/diffusion_models", "input", "output",
                "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    return base


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyError(AssertionError):
    pass


class ComfyServer:
    """A running ComfyUI subprocess and a tiny HTTP client for it."""

    def __init__(self, install: ComfyInstall, base_dir: Path, checkpoints: tuple[Path, Path]):
        self.install = install
        self.base_dir = base_dir
        self.base_ckpt, self.tuned_ckpt = checkpoints
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base_dir / "comfyui.log"
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        self._object_info: dict | None = None
        self.start_seconds = 0.0

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        cmd = [
            str(self.install.python), "main.py",
            "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base_dir), "--disable-auto-launch",
            "--disable-api-nodes", "--database-url", "sqlite:///:memory:",
            "--preview-method", "none", "--log-stdout",
        ]
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
        env.pop("COMFYUI_PATH", None)
        self._log = open(self.log_path, "w")
        start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=str(self.install.path), env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            # The HTTP routes can answer while custom nodes are still loading: wait for the
            # "To see the GUI" line (printed once the server has started) before trusting them.
            if "To see the GUI go to" in self.log_tail(4000):
                try:
                    self._object_info = self.get("/object_info", timeout=30)
                    break
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                    pass
            if time.monotonic() > deadline:
                raise ComfyError(f"ComfyUI did not answer /object_info within {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")
            time.sleep(0.5)
        self.start_seconds = time.perf_counter() - start
        TIMINGS.append(("server start", self.start_seconds, self.cpu_seconds()))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=20)
        if getattr(self, "_log", None):
            self._log.close()

    # -- HTTP ---------------------------------------------------------------------------------
    def get(self, route: str, *, timeout: float = 30) -> Any:
        with urllib.request.urlopen(self.url + route, timeout=timeout) as r:
            return json.loads(r.read().decode())

    def post(self, route: str, body: Any, *, timeout: float = 30) -> Any:
        req = urllib.request.Request(self.url + route, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read().decode() or "null")
        except urllib.error.HTTPError as e:
            raise ComfyError(f"POST {route} → HTTP {e.code}: {e.read().decode(errors='replace')[:4000]}") from e

    @property
    def object_info(self) -> dict:
        if self._object_info is None:
            self._object_info = self.get("/object_info")
        return self._object_info

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 6000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else "(no log)"
        return text[-chars:]

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server process has used so far (Linux /proc), else 0."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError, AttributeError):
            return 0.0

    # -- prompts ------------------------------------------------------------------------------
    def run_prompt(self, prompt: dict, *, timeout: float = 300, label: str = "") -> dict:
        """Queue an API-format prompt, wait for it, return its /history entry; raise on any error.

        The entry gets ``_log`` (the server log written meanwhile), ``_wall_s`` and ``_cpu_s``.
        """
        mark = len(self.log_text())
        wall0, cpu0 = time.perf_counter(), self.cpu_seconds()
        reply = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id}, timeout=120)
        if reply.get("node_errors"):
            raise ComfyError(f"prompt rejected: {json.dumps(reply['node_errors'], indent=1)[:4000]}")
        prompt_id = reply["prompt_id"]
        deadline = time.monotonic() + timeout
        while True:
            try:  # a busy server may answer slowly: a slow poll is not a failure
                history = self.get(f"/history/{prompt_id}", timeout=60)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                history = {}
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                entry["status"]["completed"] or entry["status"].get("status_str") == "error"
            ):
                break
            if self.proc is not None and self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI died running the prompt:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.post("/interrupt", {})
                raise ComfyError(f"prompt {prompt_id} not done within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(1.0)
        status = entry["status"]
        TIMINGS.append((label or f"prompt {prompt_id[:8]}", time.perf_counter() - wall0, self.cpu_seconds() - cpu0))
        if status.get("status_str") != "success" or not status.get("completed"):
            errors = [m for m in status.get("messages", []) if m[0] == "execution_error"]
            raise ComfyError(
                f"prompt {prompt_id} failed ({status.get('status_str')}): "
                f"{json.dumps(errors, indent=1)[:6000]}\n--- log ---\n{self.log_text()[mark:][-6000:]}"
            )
        entry["_log"] = self.log_text()[mark:]
        entry["_wall_s"], entry["_cpu_s"] = TIMINGS[-1][1], TIMINGS[-1][2]
        return entry



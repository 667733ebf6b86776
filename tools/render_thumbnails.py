"""Render example_workflows/<name>.jpg: each workflow's graph drawn by ComfyUI's own web page.

Starts a throw-away ComfyUI (``--cpu``, 127.0.0.1 only) whose ``custom_nodes`` links to this repo
and whose models folders hold empty files with the names the workflows use, opens the page
in headless Chromium through Playwright's CDP client (no browser download: Debian's
``/usr/bin/chromium``), loads each workflow with ``app.loadGraphData``, fits the view to the
nodes and screenshots the canvas. It also checks that the frontend reads every node's widget
values the way the file means them (``app.graph.serialize()`` compared with the file) and that no
node is smaller than the frontend's minimum size for it (which would make nodes overlap).

Run it from a tools venv (not the project venv), e.g.:

    python3 -m venv /tmp/tools-venv && /tmp/tools-venv/bin/pip install playwright pillow
    apt-get install -y chromium
    /tmp/tools-venv/bin/python tools/render_thumbnails.py [--comfyui ~/ComfyUI] [--only NAME]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "example_workflows"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
]
SETTINGS = {  # user settings for a clean picture (stored in the throw-away user directory)
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    "Comfy.Workflow.ShowMissingNodesWarning": False,
    "Comfy.Validation.Workflows": False,
    "Comfy.LinkRenderMode": 2,  # spline
    "Comfy.UseNewMenu": "Disabled",  # the legacy floating menu: one element, hidden by HIDE_CSS
    "Comfy.Graph.CanvasMenu": False,
    "Comfy.NodeBadge.NodeSourceBadgeMode": "None",  # no pack-folder badge over the nodes
    "Comfy.NodeBadge.NodeIdBadgeMode": "None",
    "LiteGraph.Canvas.MinFontSizeForLOD": 1,  # draw titles and widgets even when zoomed out
    "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1,
}
MODEL_FILES = {  # the model names the workflows use, by models/ folder
    "checkpoints": ("rankwise_base.safetensors", "rankwise_tuned.safetensors"),
    "diffusion_models": ("flux1-dev.safetensors", "flux1-dev-finetune.safetensors"),
    "text_encoders": ("clip_l.safetensors", "t5xxl_fp16.safetensors"),
    "vae": ("ae.safetensors",),
}
HIDE_CSS = ".comfy-menu, .graph-canvas-menu, .p-toast, .comfy-modal { display: none !important; }"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_comfyui(comfyui: Path, python: Path, base: Path, port: int, log_path: Path) -> subprocess.Popen:
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "rankwise-thumbnails").symlink_to(REPO, target_is_directory=True)
    for folder, names in MODEL_FILES.items():
        (base / "models" / folder).mkdir(parents=True)
        for name in names:
            (base / "models" / folder / name).write_bytes(b"")  # listed by name only; never loaded
    cmd = [str(python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--disable-auto-launch", "--disable-api-nodes",
           "--database-url", "sqlite:///:memory:", "--log-stdout"]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=str(comfyui), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while "To see the GUI go to" not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise SystemExit(f"ComfyUI did not start:\n{log_path.read_text(errors='replace')[-4000:]}")
        time.sleep(0.5)
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def post_setting(url: str, key: str, value) -> None:
    req = urllib.request.Request(f"{url}/settings/{key}", data=json.dumps(value).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(req, timeout=30).read()


FIT_JS = """
(margin) => {
  const app = window.app, canvas = app.canvas, nodes = app.graph._nodes;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  const title = (window.LiteGraph && LiteGraph.NODE_TITLE_HEIGHT) || 30;
  for (const n of nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  for (const g of (app.graph._groups || app.graph.groups || [])) {
    const b = g._bounding || g.bounding;
    x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]); x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]);
  }
  const el = canvas.canvas, w = el.clientWidth, h = el.clientHeight;
  const scale = Math.min((w - 2 * margin) / (x1 - x0), (h - 2 * margin) / (y1 - y0), 1.2);
  canvas.ds.scale = scale;
  canvas.ds.offset[0] = (w / scale - (x1 - x0)) / 2 - x0;
  canvas.ds.offset[1] = (h / scale - (y1 - y0)) / 2 - y0;
  canvas.setDirty(true, true);
  canvas.draw(true, true);
  const left = (x0 + canvas.ds.offset[0]) * scale, top = (y0 + canvas.ds.offset[1]) * scale;
  return {x0, y0, x1, y1, scale, w, h, crop: [Math.max(0, left - margin), Math.max(0, top - margin),
          Math.min(w, left + (x1 - x0) * scale + margin), Math.min(h, top + (y1 - y0) * scale + margin)]};
}
"""


def widget_mismatches(saved: dict, original: dict) -> list[str]:
    """Nodes whose widget values the frontend reads differently from the file."""
    by_id = {n["id"]: n for n in saved.get("nodes", [])}
    problems = []
    for node in original["nodes"]:
        got = by_id.get(node["id"])
        if got is None:
            problems.append(f"node {node['id']} {node['type']} vanished")
            continue
        if got.get("widgets_values") != node.get("widgets_values"):
            problems.append(f"node {node['id']} {node['type']}: file {node.get('widgets_values')} → "
                            f"frontend {got.get('widgets_values')}")
    if len(saved.get("links", [])) != len(original.get("links", [])):
        problems.append(f"links: file {len(original['links'])} → frontend {len(saved.get('links', []))}")
    return problems


def to_jpeg(png: bytes, path: Path, max_bytes: int, width: int, crop: list[float] | None = None) -> int:
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    if crop:
        img = img.crop(tuple(int(round(v)) for v in crop))
    if img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    for quality in (88, 82, 76, 70, 64, 58, 50, 42):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality, optimize=True, progressive=True)
        if buf.tell() <= max_bytes:
            break
    path.write_bytes(buf.getvalue())
    return buf.tell()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", type=Path, default=Path(os.environ.get("COMFYUI_PATH", "~/ComfyUI")).expanduser())
    ap.add_argument("--python", type=Path, default=None, help="ComfyUI's python (default <comfyui>/venv/bin/python)")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--only", action="append", default=[], help="render only these workflow names")
    ap.add_argument("--viewport", default="2400x1350")
    ap.add_argument("--width", type=int, default=1200, help="thumbnail width in pixels")
    ap.add_argument("--max-bytes", type=int, default=150_000)
    ap.add_argument("--png-dir", type=Path, default=None, help="also keep the full-size PNG screenshots here")
    ap.add_argument("--dump-serialized", type=Path, default=None,
                    help="write the frontend's own serialization of each workflow here (for comparison)")
    args = ap.parse_args(argv)

    from playwright.sync_api import sync_playwright

    python = args.python or args.comfyui / "venv" / "bin" / "python"
    paths = sorted(WORKFLOWS.glob("*.json"))
    if args.only:
        paths = [p for p in paths if p.stem in args.only]
    vw, vh = (int(v) for v in args.viewport.split("x"))
    failures = 0
    with tempfile.TemporaryDirectory(prefix="rankwise-thumbs-") as tmp:
        base = Path(tmp) / "base"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_comfyui(args.comfyui, python, base, port, Path(tmp) / "comfyui.log")
        try:
            for key, value in SETTINGS.items():
                post_setting(url, key, value)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_FLAGS)
                context = browser.new_context(viewport={"width": vw, "height": vh}, device_scale_factor=1)
                page = context.new_page()
                console: list[str] = []
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
                page.goto(url, wait_until="networkidle", timeout=120_000)
                page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=120_000)
                time.sleep(2)
                page.add_style_tag(content=HIDE_CSS)
                for path in paths:
                    workflow = json.loads(path.read_text())
                    page.evaluate("async (wf) => { await window.app.loadGraphData(wf, true, true, null); }", workflow)
                    time.sleep(1.0)
                    page.keyboard.press("Escape")
                    box = page.evaluate(FIT_JS, 30)
                    time.sleep(1.0)
                    saved = page.evaluate("() => window.app.graph.serialize()")
                    problems = widget_mismatches(saved, workflow)
                    # nodes the frontend needs taller/wider than the file says (they would overlap)
                    small = page.evaluate("""() => window.app.graph._nodes
                        .map(n => [n.id, n.type, n.computeSize(), n.size])
                        .filter(([, , c, s]) => c[0] > s[0] + 1 || c[1] > s[1] + 1)""")
                    problems += [f"node {i} {t}: frontend minimum size {[round(v) for v in c]} > file {s}"
                                 for i, t, c, s in small]
                    if args.dump_serialized:
                        args.dump_serialized.mkdir(parents=True, exist_ok=True)
                        (args.dump_serialized / path.name).write_text(json.dumps(saved, indent=1))
                    canvas = page.locator("#graph-canvas")
                    png = canvas.screenshot(type="png")
                    if args.png_dir:
                        args.png_dir.mkdir(parents=True, exist_ok=True)
                        (args.png_dir / f"{path.stem}.png").write_bytes(png)
                    size = to_jpeg(png, path.with_suffix(".jpg"), args.max_bytes, args.width, box["crop"])
                    state = "OK" if not problems else "PROBLEMS"
                    print(f"{path.with_suffix('.jpg').name}: {size} bytes, scale {box['scale']:.2f} — {state}")
                    for p in problems:
                        print("   ", p)
                    failures += bool(problems)
                browser.close()
                errors = [c for c in console if c.startswith("error")]
                if errors:
                    print("browser console errors:\n  " + "\n  ".join(errors[:20]))
        finally:
            stop(proc)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Rankwise next to kohya sd-scripts' ``networks/extract_lora_from_models.py`` on the same SD1.5 pair.

Both tools extract the same layer set (kohya's default targets: Transformer2DModel Linear/1×1 conv and the
text encoder's CLIPAttention/CLIPMLP = Rankwise ``--preset attn_mlp --text-encoders all``) at the same rank
from the cached real-size random-weight SD1.5 pair of the integration tests (planted rank-8 ΔW plus nothing
else, so a rank ≥ 8 extraction is exact up to the save dtype). Each runs in its own process; the bench prints
wall time, CPU time (user + sys of that process) and peak resident memory (``wait4`` rusage of that child),
and, on a sample of layers, each file's error ‖ΔW − ΔW_file‖_F against the Eckart–Young optimum at that rank.

kohya is never part of this repository: point ``--sd-scripts`` (or ``RANKWISE_SD_SCRIPTS``) at a checkout
outside it and ``--kohya-python`` (or ``RANKWISE_KOHYA_PYTHON``) at an interpreter that has its
requirements (its requirements.txt: torch, torchvision, transformers 4.x, diffusers, accelerate, opencv, toml, imagesize …). Without them the bench prints
why and exits 0.

    python bench/bench_kohya_peer.py --rank 32
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))
sys.path.insert(0, str(HERE))

from common import load_average  # noqa: E402


@dataclass(frozen=True)
class Run:
    wall: float
    cpu: float
    peak_rss: int  # bytes
    rc: int
    tail: str


def _run(cmd: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> Run:
    start = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        log.seek(0)
        tail = log.read()[-2000:]
    return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, proc.returncode, tail)


def _errors(lora_path: Path, base: Path, tuned: Path, rank: int, sample: int) -> tuple[int, float, float]:
    """(layers in the file, max error/optimum − 1, max relative error) over every ``sample``-th common layer."""
    from rankwise.core.archs import key_table
    from rankwise.core.io import load_lora
    from rankwise.core.sources import open_source, read_layer
    from rankwise.core.types import Arch, as_matrix

    lora, _ = load_lora(lora_path, arch=Arch.SD1)
    specs = {s.kohya: s for s in key_table(Arch.SD1)}
    names = sorted(n for n in lora.layers if n in specs)[::sample]
    worst_excess, worst_rel = 0.0, 0.0
    with open_source(base) as b, open_source(tuned) as t:
        for name in names:
            spec = specs[name]
            delta = as_matrix(read_layer(t, spec).float() - read_layer(b, spec).float()).double()
            got = as_matrix(lora.layers[name].delta()).double()
            err = float(torch.linalg.matrix_norm(delta - got))
            s = torch.linalg.svdvals(delta)
            optimum = float(s[rank:].square().sum().sqrt())
            norm = float(s.square().sum().sqrt())
            worst_rel = max(worst_rel, err / norm if norm else 0.0)
            # both files are fp16: count the save rounding (≈ 2⁻¹¹ relative) as part of the optimum's floor
            floor = max(optimum, 2.0**-11 * norm)
            worst_excess = max(worst_excess, err / floor - 1.0)
    return len(lora.layers), worst_excess, worst_rel


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sd-scripts", default=os.environ.get("RANKWISE_SD_SCRIPTS", ""))
    p.add_argument("--kohya-python", default=os.environ.get("RANKWISE_KOHYA_PYTHON", ""))
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--sample", type=int, default=8, help="check every N-th common layer against the optimum")
    p.add_argument("--method", default="exact", choices=("exact", "fast"))
    p.add_argument("--workdir", default=None, help="where both LoRAs are written (default: a temp folder)")
    args = p.parse_args(argv)

    script = Path(args.sd_scripts) / "networks" / "extract_lora_from_models.py"
    if not args.sd_scripts or not script.is_file():
        print(f"skipped: no kohya sd-scripts checkout (looked for {script}; set --sd-scripts / RANKWISE_SD_SCRIPTS)")
        return 0
    kohya_py = args.kohya_python or sys.executable
    probe = subprocess.run([kohya_py, "-c", "import torchvision, cv2, diffusers, transformers, accelerate, toml, imagesize"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        print(f"skipped: {kohya_py} lacks kohya's requirements ({probe.stderr.strip().splitlines()[-1]})")
        return 0

    from synthetic_pair import ensure_sd15_pair

    base, tuned, wrote = ensure_sd15_pair()
    if wrote:
        print(f"wrote the SD1.5 pair in {wrote:.0f} s")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="rankwise-peer-"))
    work.mkdir(parents=True, exist_ok=True)
    out_k, out_r = work / f"kohya_r{args.rank}.safetensors", work / f"rankwise_r{args.rank}.safetensors"
    for f in (out_k, out_r):
        f.unlink(missing_ok=True)

    load0 = load_average()
    env = dict(os.environ, PYTHONPATH=str(Path(args.sd_scripts)))
    kohya = _run([kohya_py, str(script), "--model_org", str(base), "--model_tuned", str(tuned),
                  "--save_to", str(out_k), "--dim", str(args.rank), "--device", "cpu",
                  "--save_precision", "fp16", "--clamp_quantile", "1.0", "--min_diff", "0"],
                 env=env, cwd=args.sd_scripts)
    if kohya.rc != 0:
        print(f"kohya failed (exit {kohya.rc}):\n{kohya.tail}")
        return 1
    ours = _run([sys.executable, "-m", "rankwise.core.cli", "extract", str(base), str(tuned), "-o", str(out_r),
                 "--rank", str(args.rank), "--preset", "attn_mlp", "--text-encoders", "all",
                 "--method", args.method, "--dtype", "fp16", "--no-progress"])
    if ours.rc != 0:
        print(f"rankwise failed (exit {ours.rc}):\n{ours.tail}")
        return 1
    load1 = load_average()

    rows = []
    for name, run, path in (("kohya sd-scripts", kohya, out_k), (f"Rankwise ({args.method})", ours, out_r)):
        layers, excess, rel = _errors(path, base, tuned, args.rank, args.sample)
        rows.append((name, run, layers, excess, rel))
    print(f"SD1.5 pair, rank {args.rank}, kohya default layer set; load average {load0:.1f} → {load1:.1f}; "
          f"errors on every {args.sample}th common layer")
    print(f"{'tool':<20} {'wall s':>8} {'CPU s':>8} {'peak RSS GB':>12} {'layers':>7} {'max excess':>11} {'max rel err':>12}")
    for name, run, layers, excess, rel in rows:
        print(f"{name:<20} {run.wall:8.1f} {run.cpu:8.1f} {run.peak_rss / 1e9:12.2f} {layers:7d} "
              f"{excess:11.2e} {rel:12.2e}")
    k, r = rows[0][1], rows[1][1]
    print(f"ratio kohya/Rankwise: wall {k.wall / r.wall:.1f}×, CPU {k.cpu / r.cpu:.1f}×, "
          f"peak memory {k.peak_rss / r.peak_rss:.1f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: full-size Flux.1 extraction from a streamed pair, in bounded memory (issue #9, §4).

What a user runs — ``rankwise extract base tuned -o lora.safetensors --rank 32`` on a
flux1-dev-layout pair of diffusion-model-only files — timed as a subprocess, once per method
(``--methods exact,fast``). Printed for each run:

* wall time, CPU time (the child's user + system), peak anonymous memory (``RssAnon`` of the child
  polled every 20 ms; the memory-mapped inputs are page cache, not anonymous) and bytes read from
  storage (``ru_inblock``), plus how far wall time is from one raw sequential read of both files;
* the file written and the report's error against the Eckart–Young optimum (median / max).

Then the reference: per-layer ``torch.linalg.svd(ΔW, full_matrices=True)`` (what kohya, LyCORIS and
ComfyUI run), 1 thread, on ``--ref-per-shape`` sampled layers of every distinct written shape, scaled
by the number of layers of that shape. Its singular values give the exact optimum of the sampled
layers, against which the written file (loaded back, in its stored dtype) is measured directly.
Ratios: reference CPU / run CPU, and reference CPU spread over 2 cores / run wall.

The pair: :func:`rankwise.core.synthetic.write_checkpoint_pair` with the full Flux layout (flux1-dev's
780 tensors, 11.9 G parameters: the key table's weights plus biases and norm scales), bf16, no prefix (as flux1-dev.safetensors ships), random weights and a
planted rank-8 ΔW in every block layer, written by streaming (a few layers of memory). 2 × 23.8 GB:
it needs ~48 GB of free disk, is cached in ``--dir`` and is not part of ``make test``. ``--delete``
removes it at the end.

    python bench/bench_flux.py [--dir DIR] [--rank 32] [--methods exact,fast] [--ref-per-shape 1] [--delete]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_end_to_end import drop_cache, raw_read  # noqa: E402
from common import MemoryPeaks, load_average  # noqa: E402

from rankwise.core.archs import key_table, record  # noqa: E402
from rankwise.core.io import read_safetensors_header  # noqa: E402
from rankwise.core.synthetic import DeltaKind, PlantedDelta, write_checkpoint_pair  # noqa: E402
from rankwise.core.types import Arch  # noqa: E402

PLANTED = PlantedDelta(kind=DeltaKind.LOWRANK, rank=8, scale=0.05)
SEED = 11
VERSION = "v2"  # v2: biases and norms written too (the whole flux1-dev layout, which ComfyUI detects)
BASE_NAME, TUNED_NAME = "flux_base.safetensors", "flux_tuned.safetensors"


def default_dir() -> Path:
    root = Path(os.environ.get("RANKWISE_TEST_CACHE") or Path.home() / ".cache" / "rankwise-tests")
    return root / f"flux-full-bf16-bare-lowrank{PLANTED.rank}-scale{PLANTED.scale}-seed{SEED}-{VERSION}"


def keep_filter(blocks: tuple[int, int] | None):
    """Diffusion-model keys only; with ``blocks`` only the first (double, single) blocks (a smoke run)."""
    prefix = record(Arch.FLUX).diffusion_prefixes.checkpoint
    if blocks is None:
        return lambda key: key.startswith(prefix)
    from rankwise.core.synthetic import reduced_depth

    inner = reduced_depth(Arch.FLUX, double=blocks[0], single=blocks[1])
    return lambda key: key.startswith(prefix) and inner(key)


def extras() -> dict[str, tuple[tuple[int, ...], str]]:
    """The layout's tensors that are not table layers (biases, norm scales), bf16, same in both files."""
    from rankwise.core.archs import diffusion_layout

    prefix = record(Arch.FLUX).diffusion_prefixes.checkpoint
    return {prefix + k: (tuple(s), "bfloat16") for k, s in diffusion_layout(Arch.FLUX, "full").items()
            if not (k.endswith(".weight") and len(s) >= 2)}


def file_keys(keep) -> list[str]:
    return [k for k in [*key_table(Arch.FLUX, "full").checkpoint_keys(), *extras()] if keep(k)]


def complete(path: Path, want: int) -> bool:
    try:
        tensors, _ = read_safetensors_header(path)
    except Exception:
        return False
    return len(tensors) == want


def ensure_pair(directory: Path, blocks: tuple[int, int] | None) -> tuple[Path, Path, float]:
    base, tuned = directory / BASE_NAME, directory / TUNED_NAME
    keep = keep_filter(blocks)
    keys = file_keys(keep)
    if complete(base, len(keys)) and complete(tuned, len(keys)):
        return base, tuned, 0.0
    directory.mkdir(parents=True, exist_ok=True)
    table = key_table(Arch.FLUX, "full")
    shapes = {k: shape for k, (shape, _) in extras().items()}
    need = 2 * sum(2 * math.prod(shapes[k] if k in shapes else table.checkpoint_shape(k)) for k in keys) + (2 << 30)
    free = shutil.disk_usage(directory).free + sum(p.stat().st_size for p in (base, tuned) if p.exists())
    if free < need:
        raise SystemExit(f"bench_flux: the pair needs {need / 1e9:.1f} GB free in {directory}, "
                         f"there are {free / 1e9:.1f} GB; free some space or pass --dir")
    for p in (base, tuned):
        p.unlink(missing_ok=True)
    t0 = time.perf_counter()
    write_checkpoint_pair(base, tuned, Arch.FLUX, size="full", delta=PLANTED, seed=SEED, dtype=torch.bfloat16,
                          layouts=("bare", "bare"), return_deltas=False, extra_layout=extras(), keep=keep)
    return base, tuned, time.perf_counter() - t0


def run_extract(base: Path, tuned: Path, out_dir: str, method: str, rank: int, workers: int | None) -> dict:
    out = os.path.join(out_dir, f"flux_{method}_r{rank}.safetensors")
    report = os.path.join(out_dir, f"flux_{method}_r{rank}.json")
    cmd = [sys.executable, "-m", "rankwise.core.cli", "extract", str(base), str(tuned), "-o", out,
           "--rank", str(rank), "--method", method, "--dtype", "bf16", "--report-json", report, "--no-progress"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    for p in (base, tuned):
        drop_cache(str(p))
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = load_average()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with MemoryPeaks(proc.pid, period=0.02) as mem:
        output, _ = proc.communicate()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"bench_flux: {' '.join(cmd)} exited {proc.returncode}:\n{output[-3000:]}")
    with open(report) as f:
        rep = json.load(f)
    return {
        "method": method, "out": out, "wall": wall, "load": (load0, load_average()),
        "cpu": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime),
        "read": (r1.ru_inblock - r0.ru_inblock) * 512,
        "anon": mem.peak["RssAnon"], "rss": mem.peak["VmRSS"], "size": os.path.getsize(out),
        "report": rep, "tail": output.strip().splitlines()[-3:],
    }


def sample_layers(rep: dict, per_shape: int) -> dict[tuple[int, ...], list[str]]:
    by_shape: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for s in rep["layers"]:
        if s["status"] != "skipped" and s["rank"] > 0:
            by_shape[tuple(s["shape"])].append(s["name"])
    return {shape: names[:: max(1, len(names) // per_shape)][:per_shape] for shape, names in by_shape.items()}


def file_key(name: str) -> str:
    spec = key_table(Arch.FLUX, "full").by_kohya(name)
    prefix = record(Arch.FLUX).diffusion_prefixes.checkpoint
    return spec.checkpoint_key[len(prefix):]


def delta(base: Path, tuned: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    key = file_key(name)
    with safe_open(str(base), "pt") as fb, safe_open(str(tuned), "pt") as ft:
        return ft.get_tensor(key).float() - fb.get_tensor(key).float()


def written_error(path: str, name: str, dW: torch.Tensor) -> float:
    """‖ΔW − (alpha/r)·up·down‖_F in fp64, with the factors as stored in the file."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        up = f.get_tensor(f"{name}.lora_up.weight").double()
        down = f.get_tensor(f"{name}.lora_down.weight").double()
        alpha = float(f.get_tensor(f"{name}.alpha")) if f"{name}.alpha" in f.keys() else up.shape[1]
    return float(torch.linalg.matrix_norm(dW.double() - (alpha / up.shape[1]) * (up @ down)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=None, help="where the pair is cached (default: ~/.cache/rankwise-tests/flux-…)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--methods", default="exact,fast")
    p.add_argument("--workers", type=int, default=None, help="--workers of the extraction (default: the CLI's)")
    p.add_argument("--ref-per-shape", type=int, default=1, help="reference SVDs per distinct shape (0: none)")
    p.add_argument("--delete", action="store_true", help="remove the pair at the end")
    p.add_argument("--blocks", default=None, help="D,S: only the first D double and S single blocks (a smoke run)")
    args = p.parse_args(argv)

    blocks = None if args.blocks is None else tuple(int(x) for x in args.blocks.split(","))
    directory = args.dir or (default_dir() if blocks is None else Path(f"{default_dir()}-blocks{blocks[0]}x{blocks[1]}"))
    base, tuned, wrote = ensure_pair(directory, blocks)
    size = base.stat().st_size + tuned.stat().st_size
    print(f"bench_flux: Flux.1 {'full' if blocks is None else '%d+%d-block' % blocks} pair {size / 1e9:.1f} GB bf16 in {directory} "
          f"({'written in %.0f s' % wrote if wrote else 'cached'}), rank {args.rank}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs; load {load_average():.2f}", flush=True)
    for x in (base, tuned):
        drop_cache(str(x))
    read_s, nbytes = raw_read([str(base), str(tuned)])
    print(f"  raw sequential read of both files (cache dropped first): {read_s:.1f} s, "
          f"{nbytes / read_s / 2**20:.0f} MiB/s; load {load_average():.2f}", flush=True)

    work = tempfile.mkdtemp(prefix="rw-bench-flux-", dir=os.environ.get("RANKWISE_BENCH_OUT"))
    runs = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        r = run_extract(base, tuned, work, method, args.rank, args.workers)
        runs.append(r)
        t = r["report"]["totals"]
        print(f"  {method:>5}: {r['wall']:.1f} s wall ({r['wall'] / read_s:.2f}× the raw read), {r['cpu']:.1f} s CPU, "
              f"peak anonymous {r['anon'] / 2**30:.2f} GiB (RSS {r['rss'] / 2**30:.2f} GiB), read from storage "
              f"{r['read'] / 1e9:.1f} GB; {int(t['written'])} layers, file {r['size'] / 1e6:.1f} MB; "
              f"report error vs optimum median +{100 * t['median_excess']:.4f}%, max +{100 * t['max_excess']:.4f}%; "
              f"fallbacks {int(t['fallbacks'])}; load {r['load'][0]:.2f} → {r['load'][1]:.2f}", flush=True)

    if args.ref_per_shape > 0 and runs:
        torch.set_num_threads(1)
        samples = sample_layers(runs[0]["report"], args.ref_per_shape)
        counts = defaultdict(int)
        for s in runs[0]["report"]["layers"]:
            if s["status"] != "skipped" and s["rank"] > 0:
                counts[tuple(s["shape"])] += 1
        ref_total = 0.0
        worst = {r["method"]: -math.inf for r in runs}
        worst_vs_ref = {r["method"]: -math.inf for r in runs}
        worst_ref = -math.inf
        print(f"  reference torch.linalg.svd(full_matrices=True), 1 thread, {args.ref_per_shape} per shape:", flush=True)
        for shape, names in sorted(samples.items()):
            per = []
            for name in names:
                dW = delta(base, tuned, name)
                c0 = time.process_time()
                U, S, Vh = torch.linalg.svd(dW, full_matrices=True)
                per.append(time.process_time() - c0)
                k = args.rank
                opt = float(S.double()[k:].square().sum().sqrt())
                root = S[:k].sqrt()
                up, down = (U[:, :k] * root).to(torch.bfloat16), (root[:, None] * Vh[:k]).to(torch.bfloat16)
                del U, Vh
                ref_bf16 = float(torch.linalg.matrix_norm(dW.double() - up.double() @ down.double()))
                worst_ref = max(worst_ref, ref_bf16 / opt - 1.0)
                for r in runs:
                    e = written_error(r["out"], name, dW)
                    worst[r["method"]] = max(worst[r["method"]], e / opt - 1.0)
                    worst_vs_ref[r["method"]] = max(worst_vs_ref[r["method"]], e / ref_bf16 - 1.0)
                del S, dW, up, down
            mean = sum(per) / len(per)
            ref_total += mean * counts[shape]
            print(f"    {shape[0]:>5} × {shape[1]:<5} {counts[shape]:>3} layers × {mean:6.1f} CPU-s", flush=True)
        print(f"  reference total ≈ {ref_total:.0f} CPU-s ({ref_total / 2:.0f} s on 2 cores); the reference's own "
              f"rank-{args.rank} factors rounded to bf16: max excess {100 * worst_ref:+.4f}% over the optimum", flush=True)
        for r in runs:
            print(f"  {r['method']:>5}: {ref_total / r['cpu']:.1f}× less CPU than the reference, "
                  f"{ref_total / 2 / r['wall']:.1f}× its 2-core wall time; sampled layers, the written bf16 file: max excess "
                  f"{100 * worst[r['method']]:+.4f}% over the optimum, {100 * worst_vs_ref[r['method']]:+.4f}% over the "
                  f"reference in bf16", flush=True)

    shutil.rmtree(work, ignore_errors=True)
    if args.delete:
        for x in (base, tuned):
            x.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

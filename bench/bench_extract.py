"""Benchmark: whole-model LoRA extraction from synthetic full-size checkpoint pairs.

Pairs (written once into ``--workdir``, fp16, full-size key tables incl. text encoders):

* ``lowrank``    a rank-64 ΔW (σ 1 → 0.5) plus dense noise with ‖noise‖ = 0.5‖signal‖ in every layer
* ``heavy_tail`` a full-rank ΔW with σᵢ ∝ i^-0.5 in every layer (a full fine-tune's spectrum)

Each configuration (arch × delta × method × threads) runs ``core.extract`` at rank 128 in a fresh
child process, so that the peaks are its own:

* wall time and process CPU time (1 and 2 threads);
* peak RSS (``VmHWM``) and peak anonymous memory (``RssAnon`` sampled every 10 ms in a thread;
  file-backed pages of the memory-mapped checkpoints are page cache, not counted there);
* the engine's own error vs optimum (report totals), and an independent check on a sample of
  layers (one per distinct shape): the stored fp16 factors' error ‖ΔW − up·down‖_F against the
  Eckart–Young optimum from a dense fp64 ``svdvals``.

The kohya-style baseline (``torch.linalg.svd`` with ``full_matrices=True``, 1 thread) is timed on
one layer per distinct shape and multiplied by the shape counts (``--reference``; default on with
``--quick``; the widest SD1.5 conv alone takes ~70 s).

Run: ``python bench/bench_extract.py --workdir /tmp/rw-bench --quick`` (SD1.5 attention layers),
or without ``--quick`` for SD1.5 + SDXL, all layers (long: tens of minutes of CPU; the SDXL pair
files take 2 × 7 GB per delta kind plus a shared base).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch

from rankwise.core.archs import LayerPreset, key_table
from rankwise.core.extract import ExtractOptions, TextEncoderMode, extract
from rankwise.core.rank import RankPolicy, RankRule
from rankwise.core.sources import open_source, read_layer
from rankwise.core.svd import SvdMethod, set_threads
from rankwise.core.synthetic import DeltaKind, PlantedDelta, write_checkpoint_pair
from rankwise.core.types import Arch, as_matrix

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import MemoryPeaks, proc_status  # noqa: E402

DELTAS = {
    "lowrank": PlantedDelta(kind=DeltaKind.LOWRANK, rank=64, noise=0.5, scale=0.05),
    "heavy_tail": PlantedDelta(kind=DeltaKind.HEAVY_TAIL, scale=0.05),
}


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --------------------------------------------------------------------------------------------
# pair files


def pair_paths(workdir: str, arch: Arch, kind: str) -> tuple[str, str]:
    return (os.path.join(workdir, f"{arch.value}_base.safetensors"),
            os.path.join(workdir, f"{arch.value}_{kind}.safetensors"))


def ensure_pair(workdir: str, arch: Arch, kind: str) -> tuple[str, str]:
    """Write the pair unless both files exist (they appear atomically, so existing means complete)."""
    base, tuned = pair_paths(workdir, arch, kind)
    if os.path.exists(base) and os.path.exists(tuned):
        return base, tuned
    os.makedirs(workdir, exist_ok=True)
    base_target = base if not os.path.exists(base) else os.path.join(workdir, f".{arch.value}_base_dup.safetensors")
    t0, c0 = time.perf_counter(), cpu_s()
    write_checkpoint_pair(base_target, tuned, arch, size="full", delta=DELTAS[kind], seed=0, dtype=torch.float16)
    if base_target != base:
        os.remove(base_target)  # same seed → identical to the cached base
    print(f"  wrote {os.path.basename(tuned)} ({os.path.getsize(tuned) / 2**30:.2f} GiB) in "
          f"{time.perf_counter() - t0:.0f}s wall / {cpu_s() - c0:.0f}s CPU", flush=True)
    return base, tuned


# --------------------------------------------------------------------------------------------
# one configuration (child process)


CHECK_MAX_WORK = 4e9  # m·n·min(m, n) of the largest layer checked with a dense fp64 SVD (~1280×2048)


def sample_layers(lora, n: int) -> list[str]:
    """One layer per distinct matrix shape, the largest affordable shapes first (FAST only runs its
    randomized path where k = 128 is well below the short side)."""
    by_shape: dict[tuple[int, int], str] = {}
    for name, layer in lora.layers.items():
        m = layer.weight_shape[0]
        by_shape.setdefault((m, math.prod(layer.weight_shape[1:])), name)
    shapes = sorted((s for s in by_shape if s[0] * s[1] * min(s) <= CHECK_MAX_WORK),
                    key=lambda s: s[0] * s[1] * min(s), reverse=True)
    return [by_shape[s] for s in shapes[:n]]


def run_child(spec: dict) -> dict:
    arch, kind = Arch(spec["arch"]), spec["kind"]
    base_path, tuned_path = pair_paths(spec["workdir"], arch, kind)
    policy = RankPolicy(RankRule.parse(str(spec["rank"])))
    opts = ExtractOptions(
        policy,
        preset=LayerPreset(spec["preset"]),
        text_encoders=TextEncoderMode.ALL,
        method=SvdMethod(spec["method"]),
        device="cpu",
        threads=spec["threads"],
        factor_dtype=torch.float16,
    )
    set_threads(spec["threads"])
    import scipy.linalg  # noqa: F401  (import cost outside the timing)

    with open_source(base_path) as base, open_source(tuned_path) as tuned:
        with MemoryPeaks(period=0.01) as mem:
            w0, c0 = time.perf_counter(), cpu_s()
            lora, report = extract(base, tuned, opts)
            wall, cpu = time.perf_counter() - w0, cpu_s() - c0
        totals = report.totals()
        result = {
            **spec,
            "layers": len(lora),
            "wall_s": wall,
            "cpu_s": cpu,
            "peak_rss_mib": proc_status().get("VmHWM", 0) / 2**20,
            "peak_anon_mib": mem.peak["RssAnon"] / 2**20,
            "anon_before_mib": mem.start.get("RssAnon", 0) / 2**20,
            "lora_mib": lora.nbytes() / 2**20,
            "engine_median_excess": totals["median_excess"],
            "engine_max_excess": totals["max_excess"],
            "fallbacks": int(totals["fallbacks"]),
            "retained_energy": totals["retained_energy"],
        }
        if spec.get("verify", 0):
            table = key_table(arch)
            excess = []
            set_threads(spec["threads"])
            for name in sample_layers(lora, spec["verify"]):
                layer_spec = table.by_kohya(name)
                dw = as_matrix(read_layer(tuned, layer_spec).double() - read_layer(base, layer_spec).double())
                layer = lora.layers[name]
                got = (dw - as_matrix(layer.delta()).double()).norm().item()
                sv = torch.linalg.svdvals(dw.mT if dw.shape[0] > dw.shape[1] else dw)
                opt = math.sqrt(max(float((sv[layer.rank:] ** 2).sum()), 0.0))
                excess.append(got / opt - 1 if opt > 0 else 0.0)
            excess.sort()
            result["check_layers"] = len(excess)
            result["check_median_excess"] = excess[len(excess) // 2]
            result["check_max_excess"] = excess[-1]
    return result


def reference_baseline(arch: Arch, preset: LayerPreset, rank: int, max_seconds: float) -> tuple[float, int, int]:
    """kohya-style per-layer body (full_matrices=True SVD), 1 thread, per distinct shape × count.

    Returns (estimated total CPU s, shapes timed, shapes skipped as too slow (estimated from m·n·p))."""
    set_threads(1)
    counts: collections.Counter = collections.Counter()
    for spec in key_table(arch).select(preset):
        counts[(spec.shape[0], math.prod(spec.shape[1:]))] += 1
    g = torch.Generator().manual_seed(0)
    total, timed, skipped = 0.0, 0, 0
    rate = None  # s per (m·n·min(m,n)) from the timed shapes
    for (m, n), count in sorted(counts.items(), key=lambda kv: kv[0][0] * kv[0][1] * min(kv[0])):
        work = m * n * min(m, n)
        if rate is not None and rate * work * max(m, n) / min(m, n) > max_seconds:
            total += rate * work * count  # too slow to time here: extrapolate (optimistic)
            skipped += 1
            continue
        a = torch.randn(m, n, generator=g)
        c0 = cpu_s()
        u, s, vh = torch.linalg.svd(a)  # kohya / ComfyUI LoraSave / LyCORIS default
        _ = (u[:, :rank] * s[:rank]).contiguous(), vh[:rank].contiguous()
        dt = cpu_s() - c0
        rate = dt / work
        total += dt * count
        timed += 1
    return total, timed, skipped


# --------------------------------------------------------------------------------------------
# driver


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="cache folder for the synthetic pairs")
    p.add_argument("--quick", action="store_true", help="SD1.5 only, attention layers")
    p.add_argument("--arch", default=None, help="comma list: sd1,sdxl (default: sd1 with --quick, else both)")
    p.add_argument("--kinds", default="lowrank,heavy_tail")
    p.add_argument("--methods", default="exact,fast")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--preset", default=None, help="attention | attn_mlp | all (default: attention with --quick, else all)")
    p.add_argument("--verify", type=int, default=6, help="layers checked against a dense fp64 SVD (0: none)")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=None,
                   help="time the kohya-style full SVD per shape (default: on with --quick)")
    p.add_argument("--json", default=None, help="write all results here (default: <workdir>/bench_extract.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        print(json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0

    archs = [Arch(a) for a in (args.arch or ("sd1" if args.quick else "sd1,sdxl")).split(",")]
    preset = LayerPreset(args.preset or ("attention" if args.quick else "all"))
    kinds = args.kinds.split(",")
    methods = args.methods.split(",")
    threads = [int(t) for t in args.threads.split(",")]
    reference = args.quick if args.reference is None else args.reference
    print(f"bench_extract: {','.join(a.value for a in archs)} preset {preset.value}, rank {args.rank}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)

    results = []
    for arch in archs:
        for kind in kinds:
            ensure_pair(args.workdir, arch, kind)
        for kind in kinds:
            for method in methods:
                for t in threads:
                    spec = {"arch": arch.value, "kind": kind, "method": method, "threads": t, "rank": args.rank,
                            "preset": preset.value, "workdir": args.workdir,
                            "verify": args.verify if t == threads[0] else 0}
                    load0 = os.getloadavg()[0]
                    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--workdir", args.workdir,
                                          "--child", json.dumps(spec)], capture_output=True, text=True)
                    if out.returncode != 0:
                        print(out.stderr[-3000:], file=sys.stderr)
                        return out.returncode
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    r["load_before"] = load0
                    results.append(r)
                    check = (f"; check on {r['check_layers']} layers: median +{100 * r['check_median_excess']:.2g}%, "
                             f"max +{100 * r['check_max_excess']:.2g}%") if "check_layers" in r else ""
                    print(f"  {arch.value:4} {kind:10} {method:5} {t}T: {r['layers']} layers, {r['wall_s']:6.1f}s wall, "
                          f"{r['cpu_s']:6.1f}s CPU; peak RSS {r['peak_rss_mib']:.0f} MiB, peak anon "
                          f"{r['peak_anon_mib']:.0f} MiB (before {r['anon_before_mib']:.0f}); LoRA {r['lora_mib']:.0f} MiB; "
                          f"engine excess median +{100 * r['engine_median_excess']:.2g}% max "
                          f"+{100 * r['engine_max_excess']:.2g}%, fallbacks {r['fallbacks']}{check} "
                          f"(load {load0:.1f})", flush=True)
        if reference:
            est, timed, skipped = reference_baseline(arch, preset, args.rank, max_seconds=30.0)
            best = min(r["cpu_s"] for r in results if r["arch"] == arch.value and r["threads"] == 1
                       and r["method"] == "exact")
            results.append({"arch": arch.value, "reference_cpu_s": est, "shapes_timed": timed, "shapes_skipped": skipped})
            print(f"  {arch.value} kohya-style full SVD (1T, per shape × count): ≈ {est:.0f} CPU-s "
                  f"({timed} shapes timed, {skipped} extrapolated); exact 1T extraction incl. I/O: {best:.1f} CPU-s "
                  f"→ {est / best:.1f}×", flush=True)

    path = args.json or os.path.join(args.workdir, "bench_extract.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"results: {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

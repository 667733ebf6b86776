"""Benchmark: LoRA resize and merge (QR trick) against the dense kohya approach.

What it measures, in one run, on synthetic rank-128 LoRAs covering every layer of the key table
(UNet incl. conv + text encoders, ``synthetic.random_lora`` preset ALL, fp16 on disk):

1. resize 128 → 32 and 128 → sv_fro 0.9, timed end to end (read file, resize, write file) with
   ``--workers`` layers at a time × ``--threads`` BLAS threads (default 2 × 1: one layer per core;
   2-thread BLAS on small matrices collapses on a busy machine), wall + process CPU, and the resize
   compute alone, sequential at 1 thread (CPU seconds);
2. exactness: per-layer error / Eckart–Young optimum from the report (must be ≤ 1.001) and the
   singular values of a sample of layers against a dense fp64 SVD;
3. the kohya baseline: form ΔW = up@down and ``torch.linalg.svd(full_matrices=True)`` (what
   ``resize_lora.py``/``svd_merge_lora.py`` do), timed at 1 thread on one layer per distinct shape
   and multiplied by the shape counts (the full loop would take ~2000 s on SDXL);
4. SVD merge of four rank-128 LoRAs → rank 128 (vs forming the 4-term ΔW + the same full SVD);
5. exact concat merge with signed ratios: ‖ΔW − Σ ratioᵢ ΔWᵢ‖/‖Σ ratioᵢ ΔWᵢ‖ on a layer sample
   (one layer per shape; a full fp32 concat of four SDXL LoRAs would need ~8 GB).

Memory: the SDXL run holds four fp16 LoRAs (~4 GB) plus the merge result.

Run: ``python bench/bench_resize_merge.py`` (SDXL, minutes) or ``--quick`` (SD1.5 attention/MLP
layers + TE, under a minute of compute). ``--skip-merge`` leaves out 4 and 5.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import resource
import sys
import tempfile
import time

import torch

from rankwise.core.archs import LayerPreset, key_table
from rankwise.core.io import load_lora, save_lora
from rankwise.core.merge import MergeInput, MergeMode, merge
from rankwise.core.rank import RankPolicy, RankRule
from rankwise.core.resize import resize
from rankwise.core.svd import set_threads
from rankwise.core.synthetic import random_lora
from rankwise.core.types import Arch, Lora, as_matrix


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Timer:
    def __enter__(self) -> "Timer":
        self.w0, self.c0 = time.perf_counter(), cpu_s()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.w0
        self.cpu = cpu_s() - self.c0


def shape_counts(lora: Lora) -> dict[tuple[int, int], int]:
    counts: collections.Counter = collections.Counter()
    for layer in lora.layers.values():
        m = layer.weight_shape[0]
        counts[(m, math.prod(layer.weight_shape[1:]))] += 1
    return dict(counts)


def kohya_baseline(counts: dict[tuple[int, int], int], rank: int, terms: int) -> tuple[float, float]:
    """(resize seconds, merge-of-``terms`` seconds), 1-thread CPU, summed over the shape counts."""
    set_threads(1)
    g = torch.Generator().manual_seed(0)
    resize_total = merge_total = 0.0
    for (m, n), count in sorted(counts.items()):
        r = min(rank, m, n)
        ups = [torch.randn(m, r, generator=g) for _ in range(terms)]
        downs = [torch.randn(r, n, generator=g) for _ in range(terms)]
        t0 = cpu_s()
        dense = ups[0] @ downs[0]
        t_form1 = cpu_s() - t0
        t0 = cpu_s()
        for u, d in zip(ups[1:], downs[1:]):
            dense = dense + u @ d
        t_form_rest = cpu_s() - t0
        t0 = cpu_s()
        torch.linalg.svd(dense, full_matrices=True)
        t_svd = cpu_s() - t0
        resize_total += count * (t_form1 + t_svd)
        merge_total += count * (t_form1 + t_form_rest + t_svd)
        print(f"    kohya {m:>6}×{n:<6} ×{count:<4} form {t_form1:6.3f}s  svd(full) {t_svd:7.3f}s", flush=True)
    return resize_total, merge_total


def sample_names(lora: Lora, k: int) -> list[str]:
    """One layer per distinct shape (largest first), up to k."""
    seen: dict[tuple[int, ...], str] = {}
    for name, layer in lora.layers.items():
        seen.setdefault(layer.weight_shape, name)
    items = sorted(seen.items(), key=lambda kv: -math.prod(kv[0]))
    return [name for _, name in items[:k]]


def check_singular_values(src: Lora, names: list[str], rank: int) -> float:
    """Max relative difference of the top ``rank`` singular values: QR trick vs dense fp64 SVD."""
    from rankwise.core.svd import decompose_factored

    worst = 0.0
    for name in names:
        layer = src.layers[name]
        up, down = layer.up_matrix() * layer.scale, layer.down_matrix()
        s_qr = decompose_factored(up, down).S.double()[:rank]
        s_ref = torch.linalg.svdvals((up.double() @ down.double()))[:rank]
        worst = max(worst, float(((s_qr - s_ref).abs() / s_ref[0]).max()))
    return worst


def report_line(label: str, rep) -> str:
    t = rep.totals()
    worst = max((1 + s.excess for s in rep.written if math.isfinite(s.excess)), default=1.0)
    return (f"{label}: {int(t['written'])} layers, mean rank {t['mean_rank']:.1f}, retained "
            f"{100 * t['retained_energy']:.2f}%, max error/optimum {worst:.6f}, {t['bytes'] / 2**20:.0f} MiB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="SD1.5 attention/MLP layers + TE instead of full SDXL")
    p.add_argument("--threads", type=int, default=1, help="torch/BLAS threads for the end-to-end timings (default 1)")
    p.add_argument("--workers", type=int, default=2, help="layers processed concurrently (default 2: one per core)")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--skip-merge", action="store_true")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--merge-serial", action="store_true",
                   help="also time the SVD merge at 1 worker × 1 thread (CPU-s comparable to the 1-thread baseline)")
    p.add_argument("--baseline-merge", type=float, default=None,
                   help="merge baseline CPU-s from an earlier run (ratios printed with --skip-baseline)")
    p.add_argument("--baseline-resize", type=float, default=None,
                   help="resize baseline CPU-s from an earlier run (ratios printed with --skip-baseline)")
    p.add_argument("--skip-resize", action="store_true", help="leave out 1-3 (resize, exactness, baseline)")
    p.add_argument("--dir", default=None, help="where to write the temporary files (default: a temp dir)")
    args = p.parse_args(argv)

    arch, preset = (Arch.SD1, LayerPreset.ATTN_MLP) if args.quick else (Arch.SDXL, LayerPreset.ALL)
    table = key_table(arch)
    print(f"bench_resize_merge: {arch.value} preset {preset.value}, rank {args.rank}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, end-to-end with {args.workers} worker(s) × {args.threads} thread(s); "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    work = tempfile.TemporaryDirectory(dir=args.dir)
    src_path = os.path.join(work.name, "in.safetensors")

    with Timer() as t:
        lora = random_lora(table, rank=args.rank, seed=0, preset=preset, dtype=torch.float16)
    counts = shape_counts(lora)
    save_lora(lora, src_path, dtype=torch.float16)
    size = os.path.getsize(src_path)
    print(f"  input: {len(lora)} layers, {len(counts)} distinct shapes, {size / 2**20:.0f} MiB on disk "
          f"(generated in {t.wall:.1f}s)", flush=True)

    results: dict[str, float] = {}
    cfg = f"{args.workers} worker(s) × {args.threads} thread(s)"
    loaded = lora
    base_merge = args.baseline_merge
    for label, rule in (() if args.skip_resize else (("rank 32", "32"), ("sv_fro 0.9", "sv_fro:0.9"))):
        policy = RankPolicy(RankRule.parse(rule), max_rank=args.rank)
        set_threads(args.threads)
        out_path = os.path.join(work.name, f"out_{rule.replace(':', '_')}.safetensors")
        with Timer() as t_all:
            with Timer() as t_read:
                loaded, _ = load_lora(src_path)
            with Timer() as t_comp:
                out, rep = resize(loaded, policy, workers=args.workers)
            with Timer() as t_write:
                save_lora(out, out_path, dtype=torch.float16)
        set_threads(1)
        with Timer() as t_one:
            resize(loaded, policy)
        results[f"resize {label} wall"] = t_all.wall
        results[f"resize {label} 1T cpu"] = t_one.cpu
        print(f"  resize → {label}: end to end {t_all.wall:.2f}s wall / {t_all.cpu:.2f}s CPU ({cfg}) "
              f"(read {t_read.wall:.2f}s, resize {t_comp.wall:.2f}s, write {t_write.wall:.2f}s); "
              f"resize alone at 1T: {t_one.cpu:.2f} CPU-s", flush=True)
        print("    " + report_line(label, rep), flush=True)
        if args.baseline_resize:
            print(f"    speed-up vs the given baseline {args.baseline_resize:.0f} CPU-s: "
                  f"{args.baseline_resize / t_one.cpu:.0f}× (1T compute); load average {os.getloadavg()[0]:.1f}",
                  flush=True)
        results[f"resize {label} worst"] = max(
            (1 + s.excess for s in rep.written if math.isfinite(s.excess)), default=1.0)
        os.remove(out_path)

    names = sample_names(lora, 8)
    sv_err = check_singular_values(loaded, names, args.rank)
    print(f"  singular values, QR trick vs dense fp64 SVD on {len(names)} layers (one per shape, largest): "
          f"max |Δσ|/σ₁ = {sv_err:.2e}", flush=True)

    if not args.skip_baseline and not args.skip_resize:
        print("  kohya baseline (1 thread, CPU s, one layer per shape × count):", flush=True)
        base_resize, base_merge = kohya_baseline(counts, args.rank, 4)
        print(f"  kohya-style resize total ≈ {base_resize:.0f} CPU-s; merge-4 total ≈ {base_merge:.0f} CPU-s", flush=True)
        for label in ("rank 32", "sv_fro 0.9"):
            print(f"    speed-up resize {label}: {base_resize / results[f'resize {label} 1T cpu']:.0f}× "
                  f"(1T compute vs 1T compute); {base_resize / results[f'resize {label} wall']:.0f}× "
                  f"(1T kohya vs our wall incl. I/O, {cfg})", flush=True)

    if not args.skip_merge:
        set_threads(args.threads)
        others = [random_lora(table, rank=args.rank, seed=s, preset=preset, dtype=torch.float16) for s in (1, 2, 3)]
        ratios = (0.7, -0.4, 1.1, -1.0)
        inputs = [MergeInput(x, w, f"lora{i}") for i, (x, w) in enumerate(zip([loaded] + others, ratios))]
        policy = RankPolicy(RankRule.parse(str(args.rank)))
        with Timer() as t_m:
            merged, mrep = merge(inputs, mode=MergeMode.SVD, policy=policy, workers=args.workers)
        print(f"  SVD merge 4 × rank {args.rank} → {args.rank}: {t_m.wall:.1f}s wall / {t_m.cpu:.1f}s CPU ({cfg}), "
              f"inputs in memory", flush=True)
        print("    " + report_line("merge", mrep), flush=True)
        if base_merge:
            print(f"    speed-up vs dense ΔW + full SVD (1T kohya estimate): {base_merge / t_m.wall:.1f}× "
                  f"(vs our wall, {cfg}), {base_merge / t_m.cpu:.1f}× (CPU-s vs CPU-s)", flush=True)
        del merged, mrep
        if args.merge_serial:
            set_threads(1)
            with Timer() as t_s:
                merged, mrep = merge(inputs, mode=MergeMode.SVD, policy=policy, workers=1)
            print(f"  SVD merge at 1 worker × 1 thread: {t_s.wall:.1f}s wall / {t_s.cpu:.1f}s CPU; load average "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
            if base_merge:
                print(f"    speed-up (1T CPU-s vs 1T CPU-s): {base_merge / t_s.cpu:.1f}×", flush=True)
            del merged, mrep
            set_threads(args.threads)
        sample = sample_names(loaded, 12)
        with Timer() as t_c:
            cat, _ = merge(inputs, mode=MergeMode.CONCAT, dtype=torch.float32, include=sample)
        worst = 0.0
        for name in sample:
            want = sum(w * as_matrix(x.lora.layers[name].delta()).double() for x, w in zip(inputs, ratios))
            got = as_matrix(cat.layers[name].delta()).double()
            worst = max(worst, float((got - want).norm() / want.norm()))
        print(f"  concat merge (fp32 output) on {len(sample)} layers, one per shape: {t_c.wall:.2f}s wall, rank "
              f"{cat.layers[sample[0]].rank}; max relative ΔW error vs Σ ratioᵢ·ΔWᵢ: {worst:.2e}", flush=True)
    work.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: the SVD engine per layer shape — REFERENCE vs EXACT vs FAST — summed over a UNet.

For every distinct SD1.5 / SDXL layer shape (kohya targets incl. conv, sets A+B of the performance
notes) two fp32 test matrices with an exactly known spectrum are built:

* ``heavy``   σᵢ = i^-0.5 (a full fine-tune's delta);
* ``planted`` a rank-64 signal (σ 1 → 0.05) over a Marchenko–Pastur noise floor with
  ‖noise‖ = 0.5‖signal‖ (a LoRA merged into a noisy fine-tune).

Each method runs at rank k (default 128) with ``torch.set_num_threads(--threads)`` (default 1),
timed as process CPU time and wall time. REFERENCE (``torch.linalg.svd(full_matrices=True)``, what
kohya / LyCORIS / ComfyUI do) runs once per distinct shape on the heavy matrix; its timings can be
kept in ``--reference-cache FILE`` (JSON) and reused. EXACT and FAST run on both matrices; their
timings are averaged over the two. Per-layer times × layer counts give whole-model sums.

Accuracy: the excess error ‖A − A_k‖_F / ‖A − A_k^opt‖_F − 1 of the returned rank-k factors,
measured directly in fp64 against the known spectrum (resolution ≈ 1e-7). Max and
count-weighted median over layers are reported per method.

Run: ``python bench/bench_svd.py --quick`` (4 shapes, ~1 min), ``--shapes sd15``, or the full
SDXL table (~5–10 min of CPU for the references, once; cache them with --reference-cache).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    INVENTORIES,
    format_table,
    heavy_tail_spectrum,
    load_average,
    planted_spectrum,
    spectral_matrix,
    timed,
    weighted_median,
)

from rankwise.core.svd import SvdMethod, decompose, set_threads, split_factors  # noqa: E402

QUICK_SHAPES = ((640, 640), (1280, 1280), (1280, 5120), (640, 5760))
SPECTRA = ("heavy", "planted")


def excess(A: torch.Tensor, dec, k: int, sigma: np.ndarray) -> float:
    """‖A − up·down‖_F / Eckart–Young optimum − 1, in fp64."""
    up, down = split_factors(dec, k)
    err = float(torch.linalg.matrix_norm(A.double() - up.double() @ down.double()))
    opt = math.sqrt(float(np.sum(sigma[k:] ** 2)))
    return err / opt - 1.0


def run_shape(m: int, n: int, k: int, *, ref_cache: dict, do_reference: bool, repeats: int, seed: int) -> dict:
    p = min(m, n)
    k = min(k, p)
    row: dict = {"shape": f"{m}x{n}", "m": m, "n": n}
    for spec in SPECTRA:
        sigma = heavy_tail_spectrum(p) if spec == "heavy" else planted_spectrum(m, n)
        A = spectral_matrix(m, n, sigma, seed=seed + (0 if spec == "heavy" else 1)).float()
        for method in (SvdMethod.EXACT, SvdMethod.FAST):
            best = None
            for _ in range(repeats):
                with timed() as t:
                    dec = decompose(A, k, method=method, seed=seed)
                best = t if best is None or t.cpu < best.cpu else best
            row[f"{method.value}_{spec}_cpu"] = best.cpu
            row[f"{method.value}_{spec}_wall"] = best.wall
            row[f"{method.value}_{spec}_excess"] = excess(A, dec, k, sigma)
            row[f"{method.value}_{spec}_how"] = dec.method + ("*" if dec.notes else "")
            if dec.notes:
                row.setdefault("notes", []).extend(dec.notes)
        if spec == "heavy":
            key = f"{m}x{n}"
            if key in ref_cache:
                row["reference_cpu"], row["reference_wall"] = ref_cache[key]["cpu"], ref_cache[key]["wall"]
                row["reference_cached"] = True
            elif do_reference:
                with timed() as t:
                    dec = decompose(A, k, method=SvdMethod.REFERENCE)
                row["reference_cpu"], row["reference_wall"] = t.cpu, t.wall
                row["reference_excess"] = excess(A, dec, k, sigma)
                ref_cache[key] = {"cpu": t.cpu, "wall": t.wall}
        del A
    for method in ("exact", "fast"):
        for what in ("cpu", "wall"):
            row[f"{method}_{what}"] = sum(row[f"{method}_{s}_{what}"] for s in SPECTRA) / len(SPECTRA)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", choices=sorted(INVENTORIES), default="sdxl")
    ap.add_argument("--quick", action="store_true", help="only " + ", ".join(f"{m}x{n}" for m, n in QUICK_SHAPES))
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="EXACT/FAST repeats per matrix (min CPU time)")
    ap.add_argument("--reference-cache", default=None, help="JSON file of REFERENCE timings (read + updated)")
    ap.add_argument("--no-reference", action="store_true", help="skip REFERENCE timings not in the cache")
    ap.add_argument("--json", default=None, help="write the per-shape rows here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    set_threads(args.threads)
    import scipy.linalg  # noqa: F401  (import cost outside the timings)

    decompose(torch.randn(300, 400), 8)  # warm up LAPACK/BLAS
    decompose(torch.randn(300, 400), 8, method=SvdMethod.FAST)

    inventory = INVENTORIES[args.shapes]
    if args.quick:
        inventory = tuple(row for row in inventory if (row[0], row[1]) in QUICK_SHAPES)
    cache: dict = {}
    cache_key = f"torch {torch.__version__}, {args.threads} thread(s), k={args.rank}"
    if args.reference_cache and os.path.exists(args.reference_cache):
        with open(args.reference_cache) as f:
            cache = json.load(f).get(cache_key, {})

    print(f"# bench_svd: {args.shapes}{' (quick)' if args.quick else ''}, rank {args.rank}, "
          f"{args.threads} thread(s), torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"load average at start {load_average():.2f}")
    rows = []
    for m, n, count in inventory:
        row = run_shape(m, n, args.rank, ref_cache=cache, do_reference=not args.no_reference,
                        repeats=args.repeats, seed=args.seed)
        row["count"] = count
        rows.append(row)
        ref = row.get("reference_cpu")
        print(f"  {row['shape']:>11} ×{count:<3} ref {'-' if ref is None else f'{ref:8.3f}'}  "
              f"exact {row['exact_cpu']:.3f}  fast {row['fast_cpu']:.3f}  "
              f"excess exact {max(row['exact_heavy_excess'], row['exact_planted_excess']):.1e}  "
              f"fast {row['fast_heavy_excess']:.2%}/{row['fast_planted_excess']:.2%}  "
              f"load {load_average():.1f}", flush=True)
        if args.reference_cache:
            _save_cache(args.reference_cache, cache_key, cache)

    headers = ["shape", "count", "ref cpu", "exact cpu", "fast cpu", "exact wall", "fast wall", "ex/ref",
               "fast/ref", "exact excess", "fast heavy", "fast planted", "fast ran"]
    table = []
    for r in rows:
        ref = r.get("reference_cpu")
        ref_text = "-" if ref is None else f"{ref:.3f}" + ("c" if r.get("reference_cached") else "")
        table.append([
            r["shape"], str(r["count"]), ref_text,
            f"{r['exact_cpu']:.3f}", f"{r['fast_cpu']:.3f}", f"{r['exact_wall']:.3f}", f"{r['fast_wall']:.3f}",
            "-" if ref is None else f"{ref / r['exact_cpu']:.1f}×",
            "-" if ref is None else f"{ref / r['fast_cpu']:.1f}×",
            f"{max(r['exact_heavy_excess'], r['exact_planted_excess']):.1e}",
            f"{r['fast_heavy_excess']:.3%}", f"{r['fast_planted_excess']:.3%}",
            f"{r['fast_heavy_how']}/{r['fast_planted_how']}",
        ])
    print()
    print("Per distinct shape (seconds per layer; CPU = process time at the thread count above; c = cached):")
    print(format_table(headers, table))

    counts = [r["count"] for r in rows]
    total = lambda key: sum(r[key] * r["count"] for r in rows)  # noqa: E731
    layers = sum(counts)
    print()
    subset = ", quick subset" if args.quick else ""
    print(f"Whole-model sums over {layers} layers ({args.shapes}{subset}), rank {args.rank}:")
    have_ref = all("reference_cpu" in r for r in rows)
    ref_cpu = total("reference_cpu") if have_ref else None
    for name, key in (("REFERENCE (full_matrices=True)", "reference"), ("EXACT", "exact"), ("FAST", "fast")):
        if key == "reference" and not have_ref:
            print(f"  {name:32s} (not timed; run without --no-reference)")
            continue
        cpu, wall = total(f"{key}_cpu"), total(f"{key}_wall")
        ratio = "" if ref_cpu is None or key == "reference" else f"   {ref_cpu / cpu:5.1f}× vs reference (CPU)"
        print(f"  {name:32s} CPU {cpu:9.1f} s   wall {wall:9.1f} s{ratio}")
    print()
    print("Excess error over Eckart–Young, per layer (count-weighted over the model):")
    for method in ("exact", "fast"):
        for spec in SPECTRA:
            vals = [r[f"{method}_{spec}_excess"] for r in rows]
            print(f"  {method:5s} {spec:8s} max {max(vals):.2e}  median {weighted_median(vals, counts):.2e}")
        both = [r[f"{method}_{s}_excess"] for r in rows for s in SPECTRA]
        weights = [r["count"] for r in rows for _ in SPECTRA]
        print(f"  {method:5s} both     max {max(both):.2e}  median {weighted_median(both, weights):.2e}")
    notes = sorted({note for r in rows for note in r.get("notes", [])})
    if notes:
        print("Fallbacks noted: " + "; ".join(notes))
    print(f"load average at end {load_average():.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def _save_cache(path: str, key: str, cache: dict) -> None:
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data[key] = cache
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())

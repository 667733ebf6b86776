"""Benchmark: file-size budgets (``size:…``) against fixed ranks and ``sv_fro`` on a planted SDXL pair.

For a synthetic SDXL pair (``--quick``: the tiny key table; otherwise the full-size one, 2 × ~7 GB
written once into ``--workdir``) with a heavy-tailed ΔW whose scale varies by layer:

1. one extraction sweep of fixed ranks and ``sv_fro`` rules (the references), each saved as fp16;
2. one extraction of a single budget (``size:160MB``; quick: 1/4 of the rank-128 size);
3. one extraction sweep of three budgets (``size:80MB,size:160MB,size:320MB``; quick: 1/8, 1/4, 1/2).

Printed: each budget's file size against its target (must be within 1 % under), its weighted retained
energy Σ_l E_l(r_l)/‖W_base,l‖² against every reference whose file is no larger (must be ≥), the
wall/CPU time of the three-budget sweep against the single budget (target ≤ 1.3×), the number of
decompositions of each run (a sweep decomposes each layer once) and the time of the allocation itself.

Run: ``python bench/bench_budget.py --workdir /tmp/rw-bench --quick``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch

from rankwise.core import extract as extract_mod
from rankwise.core.archs import LayerPreset, key_table
from rankwise.core.budget import BudgetSelector, reference_bytes
from rankwise.core.extract import ExtractOptions, TextEncoderMode, extract_sweep_detailed
from rankwise.core.io import save_lora
from rankwise.core.rank import RankPolicy, RankRule
from rankwise.core.sources import open_source
from rankwise.core.synthetic import DeltaKind, PlantedDelta, write_checkpoint_pair
from rankwise.core.types import Arch, DiffLayer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import MemoryPeaks  # noqa: E402


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def ensure_pair(workdir: str, size: str) -> tuple[str, str]:
    os.makedirs(workdir, exist_ok=True)
    base = os.path.join(workdir, f"budget-sdxl-{size}-base.safetensors")
    tuned = os.path.join(workdir, f"budget-sdxl-{size}-tuned.safetensors")
    if not (os.path.exists(base) and os.path.exists(tuned)):
        t = time.perf_counter()
        write_checkpoint_pair(base, tuned, Arch.SDXL, size=size,
                              delta=PlantedDelta(kind=DeltaKind.HEAVY_TAIL, scale=0.05), seed=11)
        print(f"wrote the {size} SDXL pair in {time.perf_counter() - t:.1f} s")
    return base, tuned


class Counter:
    """Counts extract's decompositions (monkeypatched ``extract._decompose``)."""

    def __init__(self) -> None:
        self.n = 0
        self._real = extract_mod._decompose

        def counted(*a, **k):
            self.n += 1
            return self._real(*a, **k)

        extract_mod._decompose = counted


def run(base, tuned, selectors, options, counter: Counter, label: str):
    counter.n = 0
    w, c = time.perf_counter(), cpu_s()
    with MemoryPeaks() as mem:
        results = extract_sweep_detailed(base, tuned, selectors, options)
    wall, cpu = time.perf_counter() - w, cpu_s() - c
    anon = (mem.peak["RssAnon"] - mem.start.get("RssAnon", 0)) / 2**30
    print(f"{label}: {wall:.1f} s wall, {cpu:.1f} CPU-s, {counter.n} decompositions, {len(results[0].lora)} layers, "
          f"peak anonymous memory +{anon:.2f} GiB over the start ({mem.peak['RssAnon'] / 1e9:.2f} GB in all, "
          f"the process's imports and the references' results included)")
    return results, wall, cpu, counter.n


def weighted(result, base_fro2) -> float:
    total = 0.0
    for name, layer in result.lora.layers.items():
        spec = result.spectra[name]
        e = spec.fro2 if isinstance(layer, DiffLayer) else spec.energy(layer.rank)
        total += e / base_fro2[name]
    return total


def base_norms(base_path: str, names) -> dict[str, float]:
    table = key_table(Arch.SDXL, "tiny" if "tiny" in base_path else "full")
    src = open_source(base_path)
    out = {}
    for spec in table.layers:
        if spec.kohya in names:
            w = src.get(spec.checkpoint_key).float()
            if spec.rows is not None:
                w = w[spec.rows[0]:spec.rows[1]]
            out[spec.kohya] = float(w.double().pow(2).sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/rw-bench")
    ap.add_argument("--quick", action="store_true", help="tiny SDXL key table (seconds)")
    ap.add_argument("--skip-reference", action="store_true", help="no fixed/sv_fro reference sweep")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2, help="layers decomposed at once (default 2, the CLI's default)")
    ap.add_argument("--json", help="write the figures as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = "tiny" if args.quick else "full"
    base_p, tuned_p = ensure_pair(args.workdir, size)
    base, tuned = open_source(base_p), open_source(tuned_p)
    out_dir = os.path.join(args.workdir, f"budget-out-{size}")
    os.makedirs(out_dir, exist_ok=True)
    counter = Counter()
    opts = lambda p: ExtractOptions(policy=p, preset=LayerPreset.ALL, text_encoders=TextEncoderMode.ALL,
                                     workers=args.workers)

    if args.quick:
        probe = RankPolicy(RankRule.parse("1"))
        first, _, _, _ = run(base, tuned, [probe], opts(probe), counter, "probe (layer list)")
        from rankwise.core.budget import LayerInfo

        infos = [LayerInfo(n, tuple(l.weight_shape), first[0].spectra[n]) for n, l in first[0].lora.layers.items()]
        ref128 = reference_bytes(infos, torch.float16, {})
        targets = [ref128 // 8, ref128 // 4, ref128 // 2]
        fixed = [2, 4, 8, 16, 32, 64]
    else:
        targets = [80_000_000, 160_000_000, 320_000_000]
        fixed = [8, 16, 32, 48, 64]
    single_rule = RankRule(RankRule.parse("size:1MB").kind, targets[1])
    figures: dict = {"size": size, "targets": targets}

    refs = []
    if not args.skip_reference:
        pols = [RankPolicy(RankRule.parse(str(r))) for r in fixed]
        pols += [RankPolicy(RankRule.parse(f"sv_fro:{t}"), max_rank=128) for t in ((0.3, 0.5, 0.7, 0.8, 0.9) if args.quick else (0.5, 0.7, 0.8, 0.9))]
        results, wall, cpu, n = run(base, tuned, pols, opts(pols[0]), counter, f"reference sweep ({len(pols)} rules)")
        for p, r in zip(pols, results):
            path = os.path.join(out_dir, f"ref_{str(p.rule).replace(':', '')}.safetensors")
            got = save_lora(r.lora, path, dtype=torch.float16, overwrite=True)
            refs.append((str(p.rule), got.bytes, r))
        figures["reference"] = {"wall_s": wall, "cpu_s": cpu, "decompositions": n}

    single = BudgetSelector(RankPolicy(single_rule))
    _, wall1, cpu1, n1 = run(base, tuned, [single], opts(single.policy), counter, f"single {single.rule}")
    sweep = [BudgetSelector(RankPolicy(RankRule(single_rule.kind, t))) for t in targets]
    results, wall3, cpu3, n3 = run(base, tuned, sweep, opts(sweep[0].policy), counter,
                                   "sweep " + ",".join(str(s.rule) for s in sweep))
    print(f"three budgets vs one: {wall3 / wall1:.2f}× wall, {cpu3 / cpu1:.2f}× CPU (target ≤ 1.3×); "
          f"decompositions {n3} vs {n1}")
    figures.update(single={"wall_s": wall1, "cpu_s": cpu1, "decompositions": n1},
                   sweep={"wall_s": wall3, "cpu_s": cpu3, "decompositions": n3})

    names = set(results[0].lora.layers)
    norms = base_norms(base_p, names)
    t = time.perf_counter()
    plan = sweep[1].plan(sweep[1].last_infos)
    figures["allocation_s"] = time.perf_counter() - t
    print(f"one allocation over {len(names)} layers: {figures['allocation_s']:.2f} s "
          f"(gap to the optimum ≤ {plan.allocation.gap_bound:.3g} of {plan.allocation.objective:.6g})")
    figures["budgets"] = []
    for sel, r in zip(sweep, results):
        path = os.path.join(out_dir, f"{str(sel.rule).replace(':', '')}.safetensors")
        got = save_lora(r.lora, path, dtype=torch.float16, overwrite=True)
        target = sel.last_plan.target
        ok = 0.99 * target <= got.bytes <= target
        mine = weighted(r, norms)
        worse = [(lbl, b, weighted(rr, norms)) for lbl, b, rr in refs if b <= got.bytes]
        beaten = all(mine >= w * (1 - 1e-9) for _, _, w in worse)
        best = max(worse, key=lambda x: x[2], default=None)
        ranks = [l.rank for l in r.lora.layers.values()]
        print(f"{sel.rule}: file {got.bytes:,} B of {target:,} ({100 * got.bytes / target:.2f}%, within 1% under: {ok}); "
              f"ranks mean {sum(ranks) / len(ranks):.1f} min {min(ranks)} max {max(ranks)}; weighted energy {mine:.6g}"
              + (f" vs best no-larger reference {best[0]} ({best[1]:,} B) {best[2]:.6g}: {'≥' if beaten else '<'}"
                 if best else " (no reference file is as small)"))
        figures["budgets"].append({"rule": str(sel.rule), "bytes": got.bytes, "target": target, "within_1pct": ok,
                                   "weighted_energy": mine, "beats_all_no_larger": beaten,
                                   "best_reference": None if best is None else {"rule": best[0], "bytes": best[1],
                                                                                "weighted_energy": best[2]}})
    for lbl, b, rr in refs:
        print(f"  reference {lbl:>14}: {b:>12,} B, weighted energy {weighted(rr, norms):.6g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: what a rank sweep costs against one rule, on SD1.5-size layers.

For each distinct SD1.5 layer shape of the chosen preset (one layer per shape, its time multiplied
by how many layers have that shape), a planted ΔW is extracted with the per-layer functions of
:mod:`rankwise.core.extract` — ``decompose_delta`` (phase 1) and ``layer_output`` per rule
(phase 2) — exactly what ``extract_sweep`` does per layer, without the file reading:

* every single rule of the sweep alone, and the sweep ``16,32,64,sv_fro:0.9`` in one pass;
* ``before``: what the sweep did before the partial-spectrum decision (an uncapped ``sv_fro`` rule
  asked for all p = min(m, n) triplets, i.e. a full decomposition of every layer).

Printed: CPU seconds (1 torch thread) per configuration and the ratios sweep / one rule. The cost
of a dynamic rule is set by the rank it chooses (sv_fro:0.9 of a full fine-tune's heavy-tailed
spectrum keeps about a third of the spectrum), so the fair "one rule" for a sweep containing it is
that rule alone; the ratio to the fixed rank 16 is printed too.

Run: ``flock /tmp/heavy.lock python bench/bench_sweep.py --quick`` (attention layers, exact and
fast), or ``--preset all`` for every SD1.5 UNet layer shape (convs included; minutes).
"""

from __future__ import annotations

import argparse
import collections
import resource
import time

import torch

from rankwise.core.archs import LayerPreset, key_table
from rankwise.core.extract import ExtractOptions, _layer_info, decompose_delta, layer_output
from rankwise.core.pipeline import PolicySelector
from rankwise.core.rank import RankPolicy, RankRule, parse_rules
from rankwise.core.svd import SvdMethod, decompose, set_threads
from rankwise.core.synthetic import DeltaKind, PlantedDelta, planted_delta
from rankwise.core.types import Arch

DELTAS = {
    "lowrank": PlantedDelta(kind=DeltaKind.LOWRANK, rank=64, noise=0.5, scale=0.05),
    "heavy_tail": PlantedDelta(kind=DeltaKind.HEAVY_TAIL, scale=0.05),
}


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(a, info, policies, options, device) -> float:
    selectors = [PolicySelector(p) for p in policies]
    t0 = cpu_s()
    d = decompose_delta(a, info, selectors, options, device)
    for s in selectors:
        layer_output(d, s.decide(d), options)
    return cpu_s() - t0


def run_before(a, info, policies, options) -> float:
    """The old sweep: k = max needed_values, which is p for an uncapped dynamic rule."""
    p = min(a.shape)
    k = max(pol.needed_values(p, info.kind, False) for pol in policies)
    t0 = cpu_s()
    dec = decompose(a, k, method=options.method, full_spectrum=False)
    _ = dec.spectrum
    return cpu_s() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="attention layers only")
    ap.add_argument("--preset", default=None, help="attention | attn_mlp | all (default: attention with --quick)")
    ap.add_argument("--rules", default="16,32,64,sv_fro:0.9")
    ap.add_argument("--methods", default="exact,fast")
    ap.add_argument("--deltas", default="heavy_tail,lowrank")
    ap.add_argument("--before", action="store_true", help="also time the old full-decomposition sweep")
    args = ap.parse_args()
    set_threads(1)
    preset = LayerPreset(args.preset or ("attention" if args.quick else "all"))
    table = key_table(Arch.SD1)
    specs = [s for s in table.select(preset, table.components()) if not s.is_text_encoder]
    by_shape: dict[tuple, list] = collections.defaultdict(list)
    for s in specs:
        by_shape[tuple(s.shape)].append(s)
    rules = parse_rules(args.rules)
    policies = [RankPolicy(r) for r in rules]
    device = torch.device("cpu")
    print(f"SD1.5 {preset.value}: {len(specs)} layers, {len(by_shape)} distinct shapes; 1 torch thread; CPU seconds "
          f"scaled by the layer count per shape")
    for delta_name in args.deltas.split(","):
        delta = DELTAS[delta_name]
        for method in args.methods.split(","):
            options = ExtractOptions(policy=policies[0], method=SvdMethod(method))
            totals: dict[str, float] = collections.Counter()
            for shape, group in by_shape.items():
                spec = group[0]
                a = planted_delta(spec, delta, seed=0).reshape(shape[0], -1).float()
                info = _layer_info(spec, torch.float16)
                for pol, rule in zip(policies, rules):
                    totals[str(rule)] += len(group) * run(a, info, [pol], options, device)
                totals["sweep"] += len(group) * run(a, info, policies, options, device)
                if args.before:
                    totals["before"] += len(group) * run_before(a, info, policies, options)
            singles = {str(r): totals[str(r)] for r in rules}
            worst = max(singles, key=singles.get)
            line = ", ".join(f"{k} {v:.1f}" for k, v in singles.items())
            print(f"[{delta_name} {method}] one rule: {line}; sweep {totals['sweep']:.1f}"
                  + (f"; before {totals['before']:.1f}" if args.before else ""))
            print(f"    sweep / costliest single rule ({worst}) = {totals['sweep'] / singles[worst]:.2f}; "
                  f"sweep / rank {rules[0]} = {totals['sweep'] / max(singles[str(rules[0])], 1e-9):.2f}"
                  + (f"; before / sweep = {totals['before'] / totals['sweep']:.1f}" if args.before else ""))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"wall {time.perf_counter() - t0:.0f} s")

"""Command line: ``rankwise extract|resize|merge|info|clean-clip|demo``.

The only module that parses command-line strings; everything else takes typed values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from .errors import Cancelled, RankwiseError
from .progress import ProgressFn
from .rank import RankPolicy, RankRule, parse_rules
from .report import Report
from .types import Lora

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- helpers


def _progress_bar(enabled: bool) -> tuple[ProgressFn | None, Callable[[], None]]:
    """A terminal progress bar (tqdm when present) bound to the core's ProgressFn."""
    if not enabled:
        return None, lambda: None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None, lambda: None
    bar = None

    def update(done: int, total: int, label: str) -> None:
        nonlocal bar
        if bar is None or bar.total != total:
            if bar is not None:
                bar.close()
            bar = tqdm(total=total, unit="layer", dynamic_ncols=True, file=sys.stderr)
        bar.n = done
        if label:
            bar.set_postfix_str(label[-48:], refresh=False)
        bar.refresh()

    def close() -> None:
        if bar is not None:
            bar.close()

    return update, close


def _policies(args: argparse.Namespace) -> list[RankPolicy]:
    if args.rule is not None and args.rank is not None:
        raise RankwiseError("give either --rank or --rule, not both")
    text = args.rule if args.rule is not None else str(args.rank if args.rank is not None else 32)
    return [
        RankPolicy(
            rule=rule,
            max_rank=args.max_rank,
            conv_rank=args.conv_rank,
            te_rank=args.te_rank,
            min_rank=args.min_rank,
            kohya_compat=args.kohya_compat,
        )
        for rule in parse_rules(text)
    ]


def _output_paths(out: str, policies: Sequence[RankPolicy]) -> list[str]:
    """One output per policy; a sweep needs ``{rule}`` in the name or gets a suffix."""
    if len(policies) == 1:
        return [out.replace("{rule}", _rule_tag(policies[0].rule))]
    if "{rule}" in out:
        return [out.replace("{rule}", _rule_tag(p.rule)) for p in policies]
    stem, ext = os.path.splitext(out)
    return [f"{stem}_{_rule_tag(p.rule)}{ext or '.safetensors'}" for p in policies]


def _rule_tag(rule: RankRule) -> str:
    return ("r" + str(rule)) if rule.is_fixed else str(rule).replace(":", "")


def _emit_report(report: Report, args: argparse.Namespace, path: str | None = None) -> None:
    print(report.to_table(limit=None if args.verbose else 25))
    if getattr(args, "report_json", None):
        target = args.report_json if path is None else f"{os.path.splitext(path)[0]}.report.json"
        Path(target).write_text(report.to_json())
        print(f"report written to {target}")


def _save(lora: Lora, path: str, args: argparse.Namespace, inputs: Sequence[str]) -> None:
    from .io import save_lora

    result = save_lora(
        lora, path, dtype=DTYPES[args.dtype], inputs=list(inputs), overwrite=args.overwrite
    )
    print(f"saved {result.path} ({result.bytes / 2**20:.1f} MiB, sha256 {result.sha256[:10]})")


def _add_rank_args(p: argparse.ArgumentParser, *, default_help: str) -> None:
    g = p.add_argument_group("rank")
    g.add_argument("--rank", type=int, help=f"fixed rank ({default_help})")
    g.add_argument(
        "--rule",
        help="rank rule(s): 32 | sv_fro:0.9 | sv_ratio:20 | sv_cumulative:0.9 | threshold:0.01; "
        "a comma list makes a sweep",
    )
    g.add_argument("--max-rank", type=int, help="cap for dynamic rules")
    g.add_argument("--conv-rank", type=int, help="rank (or cap) for 3x3 conv layers")
    g.add_argument("--te-rank", type=int, help="rank (or cap) for text-encoder layers")
    g.add_argument("--min-rank", type=int, default=1, help="floor for dynamic rules")
    g.add_argument(
        "--kohya-compat",
        action="store_true",
        help="reproduce kohya resize_lora's +1 on dynamic ranks",
    )


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=False, help="output .safetensors path")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="save dtype")
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing output")
    p.add_argument("--dry-run", action="store_true", help="print the report, write nothing")
    p.add_argument("--report-json", help="also write the per-layer report as JSON")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads per worker (default 1: multi-threaded BLAS on small layers collapses "
        "when anything else is busy; extraction reads the next layer on a second thread)",
    )
    p.add_argument("--workers", type=int, default=2, help="layers processed in parallel (resize/merge)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="print every layer")


def _add_skip_bad_modules(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-bad-modules", action="store_true",
                   help="drop (and count) LoRA modules whose factors do not fit their layer instead of failing")


# ----------------------------------------------------------------------------- commands


def cmd_extract(args: argparse.Namespace) -> int:
    from .archs import LayerPreset
    from .extract import ExtractOptions, TextEncoderMode, extract_sweep_detailed
    from .sources import open_source
    from .svd import SvdMethod

    policies = _policies(args)
    if not args.dry_run and not args.output:
        raise RankwiseError("-o/--output is required unless --dry-run")
    options = ExtractOptions(
        policy=policies[0],
        preset=LayerPreset(args.preset),
        text_encoders=TextEncoderMode(args.text_encoders),
        method=SvdMethod(args.method),
        clamp_quantile=args.clamp_quantile,
        device=args.device,
        seed=args.seed,
    )
    progress, close = _progress_bar(not args.no_progress)
    base, tuned = open_source(args.base), open_source(args.tuned)
    try:
        results = extract_sweep_detailed(base, tuned, policies, options, progress=progress)
    finally:
        close()
    paths = _output_paths(args.output or "dry_run.safetensors", policies)
    for result, path in zip(results, paths):
        _emit_report(result.report, args, path if len(paths) > 1 else None)
        if args.spectrum:
            png = args.spectrum if len(paths) == 1 else f"{os.path.splitext(path)[0]}.png"
            _write_spectrum(result, png)
        if not args.dry_run:
            _save(result.lora, path, args, inputs=[args.base, args.tuned])
    return 0


def _write_spectrum(result, png: str) -> None:
    from .spectrum import render_spectrum, select_layers_for_plot

    names = [n for n in select_layers_for_plot(result.report) if n in result.spectra]
    if not names:
        print(f"note: no layer was decomposed; no spectrum written to {png}")
        return
    ranks = {n: result.lora.layers[n].rank for n in names if n in result.lora.layers}
    render_spectrum({n: result.spectra[n] for n in names}, ranks).save(png)
    print(f"spectrum written to {png}")


def cmd_resize(args: argparse.Namespace) -> int:
    from .io import load_lora
    from .resize import resize_sweep

    policies = _policies(args)
    lora, read = load_lora(args.input, skip_bad_modules=args.skip_bad_modules)
    _print_read_report(read)
    paths = _output_paths(args.output or "dry_run.safetensors", policies)
    progress, close = _progress_bar(not args.no_progress)
    try:  # one pass for the whole sweep
        results = resize_sweep(lora, policies, strength=args.strength, progress=progress, workers=args.workers)
    finally:
        close()
    for (out, report), path in zip(results, paths):
        _emit_report(report, args, path if len(paths) > 1 else None)
        if not args.dry_run:
            if not args.output:
                raise RankwiseError("-o/--output is required unless --dry-run")
            _save(out, path, args, inputs=[args.input])
    return 0


def _parse_merge_input(text: str) -> tuple[str, float]:
    path, sep, ratio = text.rpartition(":")
    if not sep or not path:
        return text, 1.0
    try:
        return path, float(ratio)
    except ValueError:
        return text, 1.0


def cmd_merge(args: argparse.Namespace) -> int:
    from .io import load_lora
    from .merge import MergeInput, MergeMode, merge

    if args.concat and (args.rank is not None or args.rule is not None):
        raise RankwiseError("--concat keeps every rank exactly; drop --rank/--rule or --concat")
    inputs = []
    for spec in args.inputs:
        path, ratio = _parse_merge_input(spec)
        lora, read = load_lora(path, skip_bad_modules=args.skip_bad_modules)
        _print_read_report(read, prefix=f"{path}: ")
        inputs.append(MergeInput(lora=lora, ratio=ratio, name=os.path.basename(path)))
    mode = MergeMode.CONCAT if args.concat or (args.rank is None and args.rule is None) else MergeMode.SVD
    policy = None if mode is MergeMode.CONCAT else _policies(args)[0]
    progress, close = _progress_bar(not args.no_progress)
    try:
        out, report = merge(inputs, mode=mode, policy=policy, progress=progress, workers=args.workers)
    finally:
        close()
    _emit_report(report, args)
    if not args.dry_run:
        if not args.output:
            raise RankwiseError("-o/--output is required unless --dry-run")
        _save(out, args.output, args, inputs=[_parse_merge_input(s)[0] for s in args.inputs])
    return 0


def _print_read_report(read, prefix: str = "") -> None:
    formats = ", ".join(f.value for f in read.formats)
    print(f"{prefix}read {read.modules} modules ({formats})")
    if read.unknown_keys:
        shown = ", ".join(read.unknown_keys[:10])
        more = f" … (+{len(read.unknown_keys) - 10})" if len(read.unknown_keys) > 10 else ""
        print(f"{prefix}WARNING: {len(read.unknown_keys)} keys not understood: {shown}{more}")
    if read.skipped_modules:
        print(f"{prefix}WARNING: dropped {read.skipped} module(s) that do not fit their layer "
              f"(--skip-bad-modules): {', '.join(read.skipped_modules[:10])}")
    for note in read.notes:
        print(f"{prefix}note: {note}")


def cmd_info(args: argparse.Namespace) -> int:
    from .info import lora_info
    from .io import load_lora

    lora, read = load_lora(args.input, skip_bad_modules=args.skip_bad_modules)
    _print_read_report(read)
    report, image = lora_info(lora, spectrum=bool(args.spectrum))
    _emit_report(report, args)
    if args.metadata:
        print(json.dumps(dict(lora.metadata), indent=1))
    if args.spectrum and image is not None:
        image.save(args.spectrum)
        print(f"spectrum written to {args.spectrum}")
    return 0


def cmd_clean_clip(args: argparse.Namespace) -> int:
    from .archs import Component
    from .clip import clean_checkpoint, text_encoder_report
    from .sources import open_source, preflight

    base, tuned = open_source(args.base), open_source(args.tuned)
    table, pair = preflight(base, tuned)
    for note in pair.notes:
        print(f"note: {note}")
    diffs = text_encoder_report(base, tuned, table)
    for d in diffs:
        verdict = "DIFFERS" if d.differs else "same"
        print(f"{d.component.value}: relative difference {d.relative:.3e} ({verdict})")
    if args.report_only:
        return 0
    if not args.output:
        raise RankwiseError("-o/--output is required (or use --report-only)")
    if args.replace == "auto":
        replace = [d.component for d in diffs if d.differs]
    elif args.replace == "none":
        replace = []
    else:
        replace = [Component(c.strip()) for c in args.replace.split(",") if c.strip()]
    progress, close = _progress_bar(not args.no_progress)
    try:
        result = clean_checkpoint(
            base, tuned, args.output, replace=replace, fix_position_ids=not args.keep_position_ids,
            progress=progress,
        )
    finally:
        close()
    print(result)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Built-in example: a synthetic SD1-layout pair with a planted rank-8 change, extracted end to end."""
    from .archs import LayerPreset
    from .extract import ExtractOptions, extract_sweep
    from .io import load_lora, save_lora
    from .rank import RankPolicy
    from .resize import resize
    from .sources import open_source
    from .synthetic import DeltaKind, PlantedDelta, write_checkpoint_pair
    from .types import Arch

    out_dir = Path(args.out or tempfile.mkdtemp(prefix="rankwise-demo-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    base_path, tuned_path = out_dir / "base.safetensors", out_dir / "tuned.safetensors"
    t0 = time.perf_counter()
    write_checkpoint_pair(
        base_path, tuned_path, Arch.SD1, size="tiny",
        delta=PlantedDelta(kind=DeltaKind.LOWRANK, rank=8, noise=1e-4), seed=args.seed,
    )
    print(f"[1/4] wrote a synthetic SD1-layout pair with a planted rank-8 change to {out_dir} "
          f"({time.perf_counter() - t0:.1f} s)")
    policies = [RankPolicy(RankRule.parse(r)) for r in ("16", "sv_fro:0.99")]
    options = ExtractOptions(policy=policies[0], preset=LayerPreset.ALL, seed=args.seed)
    progress, close = _progress_bar(not args.no_progress)
    try:
        results = extract_sweep(open_source(base_path), open_source(tuned_path), policies, options,
                                progress=progress)
    finally:
        close()
    for (lora, report), policy in zip(results, policies):
        print(f"\n[2/4] extract with rule {policy.rule}:")
        print(report.to_table(limit=12))
    lora16, _ = results[0]
    path16 = out_dir / "demo_r16.safetensors"
    saved = save_lora(lora16, path16, overwrite=True, inputs=[base_path, tuned_path])
    print(f"\n[3/4] saved {saved.path} ({saved.bytes / 1024:.0f} KiB, kohya format)")
    loaded, read = load_lora(path16)
    small, rreport = resize(loaded, RankPolicy(RankRule.parse("8")), strength=1.0)
    print("\n[4/4] resize the saved file 16 → 8 (the planted rank):")
    print(rreport.summary())
    print(f"\ndone in {time.perf_counter() - t0:.1f} s; files in {out_dir}")
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankwise", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="checkpoint pair → LoRA by SVD")
    p.add_argument("base")
    p.add_argument("tuned")
    _add_rank_args(p, default_help="default 32")
    _add_output_args(p)
    p.add_argument("--preset", choices=["attention", "attn_mlp", "all"], default="all",
                   help="which layers: attention only / attention + MLP / everything incl. conv")
    p.add_argument("--text-encoders", choices=["auto", "all", "none"], default="auto",
                   help="auto: only encoders that really differ")
    p.add_argument("--method", choices=["exact", "fast"], default="exact")
    p.add_argument("--clamp-quantile", type=float, help="clamp factors at this quantile (off by default)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spectrum", help="write a singular-value spectrum PNG")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("resize", help="LoRA → LoRA of a fixed or dynamic rank")
    p.add_argument("input")
    _add_rank_args(p, default_help="default 32")
    _add_output_args(p)
    p.add_argument("--strength", type=float, default=1.0, help="fold this multiplier into the weights")
    _add_skip_bad_modules(p)
    p.set_defaults(func=cmd_resize)

    p = sub.add_parser("merge", help="merge LoRAs with signed ratios (PATH:RATIO …)")
    p.add_argument("inputs", nargs="+", help="LoRA files with ratios, e.g. a.safetensors:1 b.safetensors:-1")
    _add_rank_args(p, default_help="with --rank/--rule: SVD re-compression")
    _add_output_args(p)
    p.add_argument("--concat", action="store_true", help="exact concatenation (ranks add up; the default)")
    _add_skip_bad_modules(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("info", help="per-layer statistics of any LoRA file")
    p.add_argument("input")
    p.add_argument("--spectrum", help="write a singular-value spectrum PNG")
    p.add_argument("--metadata", action="store_true", help="print the metadata")
    p.add_argument("--report-json", help="also write the report as JSON")
    p.add_argument("-v", "--verbose", action="store_true")
    _add_skip_bad_modules(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("clean-clip", help="report / replace drifted text encoders, repair position_ids")
    p.add_argument("base")
    p.add_argument("tuned")
    p.add_argument("-o", "--output", help="cleaned copy of the tuned checkpoint")
    p.add_argument("--replace", default="auto", help="auto | none | te1,te2: encoders to take from base")
    p.add_argument("--keep-position-ids", action="store_true", help="do not repair position_ids")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_clean_clip)

    p = sub.add_parser("demo", help="run the whole job on a built-in synthetic example")
    p.add_argument("--out", help="directory for the example files (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("cancelled; no partial files were left", file=sys.stderr)
        return 130
    except Cancelled:
        print("cancelled; no partial files were left", file=sys.stderr)
        return 130
    except RankwiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

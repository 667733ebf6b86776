"""Command line: ``rankwise extract|resize|merge|info|clean-clip|demo``.

The only module that parses command-line strings; everything else takes typed values.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch

from .errors import Cancelled, RankwiseError, Terminated
from .memory import keep_freed_memory
from .io import OutputKind, OutputPlan, os_reason, plan_outputs, save_image, write_text_output
from .progress import ProgressFn
from .rank import RankPolicy, RankRule, parse_rules
from .report import Report
from .types import Lora

if TYPE_CHECKING:  # pragma: no cover
    from .archs import Component

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- helpers

PLAIN_PROGRESS_STEP = 10  # percent between two plain progress lines (stderr not a terminal)


def _progress_bar(
    enabled: bool, operation: str = "progress", unit: str = "layers"
) -> tuple[ProgressFn | None, Callable[[], None]]:
    """A progress display bound to the core's ProgressFn: a tqdm bar on a terminal, otherwise (logs,
    CI, ``| tee``) a plain line every 10% and at the end: ``extract: 120/1058 layers (11%) 35 s``."""
    if not enabled:
        return None, lambda: None
    if not _is_terminal(sys.stderr):
        return _plain_progress(operation, unit, sys.stderr)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return _plain_progress(operation, unit, sys.stderr)
    bar = None

    def update(done: int, total: int, label: str) -> None:
        nonlocal bar
        if bar is None or bar.total != total:
            if bar is not None:
                bar.close()
            bar = tqdm(total=total, unit=unit.rstrip("s"), dynamic_ncols=True, file=sys.stderr)
        bar.n = done
        if label:
            bar.set_postfix_str(label[-48:], refresh=False)
        bar.refresh()

    def close() -> None:
        if bar is not None:
            bar.close()

    return update, close


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _plain_progress(operation: str, unit: str, stream) -> tuple[ProgressFn, Callable[[], None]]:
    start = time.perf_counter()
    state = {"total": -1, "next": 0, "done": 0, "printed": -1}

    def line(done: int, total: int) -> None:
        pct = 100 * done // total if total else 100
        print(f"{operation}: {done}/{total} {unit} ({pct}%) {time.perf_counter() - start:.0f} s",
              file=stream, flush=True)
        state["printed"] = done

    def update(done: int, total: int, label: str) -> None:
        if total != state["total"]:
            state.update(total=total, next=PLAIN_PROGRESS_STEP, printed=-1)
        state["done"] = done
        if total <= 0:
            return
        pct = 100 * done // total
        if done >= total or pct >= state["next"]:
            line(done, total)
            state["next"] = (pct // PLAIN_PROGRESS_STEP + 1) * PLAIN_PROGRESS_STEP

    def close() -> None:
        total, done = state["total"], state["done"]
        if total > 0 and done >= total and state["printed"] != done:
            line(done, total)

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


def _selectors(policies: Sequence[RankPolicy], args: argparse.Namespace, metadata=None, arch=None) -> list:
    """Global rules (``size:…``, ``params:…``) become budget selectors at the save dtype; their
    allocation (size, ranks per kind and block, retained energy) is in the report notes, printed
    before anything is written."""
    from .budget import BudgetOptions, Weighting, budget_selectors

    block_of = None
    if arch is not None:
        from .archs import key_table

        table = key_table(arch)

        def block_of(name: str):
            spec = table.by_kohya(name)
            return None if spec is None else spec.block

    options = BudgetOptions(weighting=Weighting(getattr(args, "budget_weighting", "relative")),
                            full_diff=bool(getattr(args, "full_diff", False)), dtype=DTYPES[args.dtype],
                            metadata=dict(metadata or {}))
    return budget_selectors(policies, options, block_of=block_of)


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


def _report_path(args: argparse.Namespace, path: str | None) -> str | None:
    """Where the JSON report of one result goes (a sweep: next to each output)."""
    if not getattr(args, "report_json", None):
        return None
    return args.report_json if path is None else f"{os.path.splitext(path)[0]}.report.json"


def _check_input_file(path: str, what: str = "file") -> str:
    """A readable input file, or a one-line error (core's check: missing, a directory, a broken link)."""
    from .io import check_input_file

    return check_input_file(path, what)


def _check_count(value: int | None, option: str) -> None:
    if value is not None and value < 1:
        raise RankwiseError(f"{option} must be a whole number ≥ 1, got {value}")


def _check_device(text: str | None) -> str | None:
    """``--device``: cpu, cuda, cuda:N or mps, and only one this machine has."""
    if text is None:
        return None
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise RankwiseError(f"--device {text}: unknown device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return text
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise RankwiseError(f"--device {text}: CUDA is not available ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise RankwiseError(f"--device {text}: there is no such GPU (this machine has {count})")
        return text
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise RankwiseError(f"--device {text}: Apple MPS is not available here; use --device cpu")
        return text
    raise RankwiseError(f"--device {text}: not supported; use cpu, cuda, cuda:N or mps")


def _check_run_options(args: argparse.Namespace) -> None:
    """Options every LoRA command shares, refused before any work."""
    _check_count(getattr(args, "threads", None), "--threads")
    _check_count(getattr(args, "workers", None), "--workers")


def _outputs(runs: Iterable[tuple[str | None, str | None, str | None]]) -> list[tuple[str, OutputKind]]:
    """The outputs of a run, in order: for each (LoRA, report JSON, picture) the paths that are given."""
    kinds = (OutputKind.LORA, OutputKind.REPORT, OutputKind.IMAGE)
    return [(path, kind) for run in runs for path, kind in zip(run, kinds) if path]


def _plan(args: argparse.Namespace, outputs: Sequence[tuple[str, OutputKind]], inputs: Sequence[str]) -> OutputPlan:
    return plan_outputs(outputs, inputs=inputs, overwrite=bool(getattr(args, "overwrite", False)),
                        dry_run=bool(getattr(args, "dry_run", False)))


def _emit_report(report: Report, args: argparse.Namespace, plan: OutputPlan, target: str | None = None) -> None:
    print(report.to_table(limit=None if args.verbose else 25))
    if target is None:
        return
    if plan.dry_run:
        print(f"dry run: would write the report to {os.path.abspath(target)}")
        return
    written = write_text_output(target, report.to_json(), inputs=plan.inputs, overwrite=plan.overwrite)
    print(f"report written to {written}")


def _save(lora: Lora, path: str, args: argparse.Namespace, plan: OutputPlan) -> None:
    from .io import save_lora

    if plan.dry_run:
        print(f"dry run: would write the LoRA to {os.path.abspath(path)}")
        return
    result = save_lora(lora, path, dtype=DTYPES[args.dtype], inputs=plan.inputs, overwrite=plan.overwrite,
                       naming=getattr(args, "key_names", "auto"))
    print(f"saved {result.path} ({result.bytes / 2**20:.1f} MiB, sha256 {result.sha256[:10]})")


def _check_key_names(args: argparse.Namespace, arch) -> None:
    """``--key-names`` the architecture cannot be saved in: refused before the work, not after it."""
    from .formats import naming_styles

    chosen = getattr(args, "key_names", "auto")
    if chosen not in ("auto", "kohya") and arch is not None and chosen not in naming_styles(arch):
        raise RankwiseError(f"--key-names {chosen}: {arch.value} LoRAs are saved with "
                            f"{' or '.join(naming_styles(arch))} names")


def _save_picture(image, png: str, plan: OutputPlan) -> None:
    if plan.dry_run:
        print(f"dry run: would write the spectrum to {os.path.abspath(png)}")
        return
    written = save_image(image, png, inputs=plan.inputs, overwrite=plan.overwrite)
    print(f"spectrum written to {written}")


def _add_rank_args(p: argparse.ArgumentParser, *, default_help: str) -> None:
    g = p.add_argument_group("rank")
    g.add_argument("--rank", type=int, help=f"fixed rank ({default_help})")
    g.add_argument(
        "--rule",
        help="rank rule(s): 32 | sv_fro:0.9 | sv_ratio:20 | sv_cumulative:0.9 | threshold:0.01 | sv_knee | "
        "size:160MB (file-size budget; MB = 10^6 B, MiB = 2^20 B) | size:0.25 (of the rank-128 size) | "
        "params:20M; a comma list makes a sweep (one decomposition for all)",
    )
    g.add_argument("--budget-weighting", choices=["relative", "absolute"], default="relative",
                   help="size/params budgets: weigh each layer's kept ‖ΔW‖² by 1/‖W_base‖² (relative; extract "
                   "only, resize/merge have no base) or not (absolute)")
    g.add_argument("--full-diff", action="store_true",
                   help="size/params budgets: a layer whose rank would pass min(out,in)/2 may be stored as an "
                   "exact full difference (.diff), counted at its real size")
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
    p.add_argument("--key-names", choices=("auto", "kohya", "comfy", "diffusers"), default="auto",
                   help="key names in the saved file: auto = the architecture's default (kohya; diffusers for SD3); "
                   "comfy = diffusion_model.…; diffusers = transformer.… lora_A/lora_B (Flux, SD3)")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads per worker (default 1: multi-threaded BLAS on small layers collapses "
        "when anything else is busy; extraction reads the next layer on a second thread)",
    )
    p.add_argument("--workers", type=int, default=2, help="layers processed in parallel (extract/resize/merge)")
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
    _check_run_options(args)
    device = _check_device(args.device)
    q = args.clamp_quantile
    if q is not None and not (0.0 < q <= 1.0):
        raise RankwiseError(f"--clamp-quantile must be in (0, 1] (e.g. 0.99), got {q:g}")
    if not args.dry_run and not args.output:
        raise RankwiseError("-o/--output is required unless --dry-run")
    inputs = [_check_input_file(args.base, "checkpoint file"), _check_input_file(args.tuned, "checkpoint file")]
    paths = _output_paths(args.output or "dry_run.safetensors", policies)
    sweep = len(paths) > 1
    pngs = [(args.spectrum if not sweep else f"{os.path.splitext(p)[0]}.png") if args.spectrum else None
            for p in paths]
    reports = [_report_path(args, p if sweep else None) for p in paths]
    outputs = _outputs((path if args.output else None, report_json, png)
                       for path, report_json, png in zip(paths, reports, pngs))
    plan = _plan(args, outputs, inputs)  # every output checked before a tensor is read
    options = ExtractOptions(
        policy=policies[0],
        preset=LayerPreset(args.preset),
        text_encoders=TextEncoderMode(args.text_encoders),
        method=SvdMethod(args.method),
        clamp_quantile=args.clamp_quantile,
        device=device,
        seed=args.seed,
        workers=args.workers,
    )
    base, tuned = open_source(args.base), open_source(args.tuned)
    base, tuned, options = _generic_mode(args, base, tuned, options)
    selectors = _selectors(policies, args)
    progress, close = _progress_bar(not args.no_progress, "extract")
    try:
        results = extract_sweep_detailed(base, tuned, selectors, options, progress=progress)
    finally:
        close()
    for result, path, report_json, png in zip(results, paths, reports, pngs):
        _emit_report(result.report, args, plan, report_json)
        if png:
            _write_spectrum(result, png, plan)
        if args.output:
            _save(result.lora, path, args, plan)
    return 0


def _generic_mode(args: argparse.Namespace, base, tuned, options):
    """``--generic``, or no architecture record for the pair: name layers by their keys (core.generic)."""
    import dataclasses

    from .generic import diffusion_view, has_record
    from .sources import KeyStyle

    generic = bool(args.generic)
    if not generic and not has_record(base, tuned):
        generic = True
        print("note: no architecture record matches these models; extracting in generic mode "
              "(every Linear/Conv weight, ComfyUI-native 'diffusion_model.<key>' names)", file=sys.stderr)
    if not generic:
        if args.exact_parts:
            raise RankwiseError("--exact-parts (.diff / .diff_b) needs generic mode: add --generic")
        return base, tuned, options
    options = dataclasses.replace(options, key_style=KeyStyle.GENERIC, exact_parts=bool(args.exact_parts))
    return diffusion_view(base), diffusion_view(tuned), options


def _write_spectrum(result, png: str, plan: OutputPlan) -> None:
    from .spectrum import render_spectrum, select_layers_for_plot

    names = [n for n in select_layers_for_plot(result.report) if n in result.spectra]
    if not names:
        print(f"note: no layer was decomposed; no spectrum written to {png}")
        return
    ranks = {n: result.lora.layers[n].rank for n in names if n in result.lora.layers}
    if plan.dry_run:
        _save_picture(None, png, plan)
        return
    _save_picture(render_spectrum({n: result.spectra[n] for n in names}, ranks), png, plan)


def cmd_resize(args: argparse.Namespace) -> int:
    from .io import load_lora
    from .resize import resize_sweep

    policies = _policies(args)
    _check_run_options(args)
    if not args.dry_run and not args.output:
        raise RankwiseError("-o/--output is required unless --dry-run")
    inputs = [_check_input_file(args.input)]
    paths = _output_paths(args.output or "dry_run.safetensors", policies)
    sweep = len(paths) > 1
    reports = [_report_path(args, p if sweep else None) for p in paths]
    outputs = _outputs((path if args.output else None, report_json, None) for path, report_json in zip(paths, reports))
    plan = _plan(args, outputs, inputs)
    lora, read = load_lora(args.input, skip_bad_modules=args.skip_bad_modules)
    _print_read_report(read)
    _check_key_names(args, lora.arch)
    selectors = _selectors(policies, args, metadata=lora.metadata, arch=lora.arch)
    progress, close = _progress_bar(not args.no_progress, "resize")
    try:  # one pass for the whole sweep
        results = resize_sweep(lora, selectors, strength=args.strength, progress=progress, workers=args.workers)
    finally:
        close()
    for (out, report), path, report_json in zip(results, paths, reports):
        _emit_report(report, args, plan, report_json)
        if args.output:
            _save(out, path, args, plan)
    return 0


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|infinity|nan)", re.IGNORECASE)


def _parse_merge_input(text: str) -> tuple[str, float]:
    """``PATH[:RATIO]``. The ratio is after the last colon (paths may hold colons of their own): it is
    read as one when it looks like a number or when the whole text is not an existing file."""
    path, sep, ratio = text.rpartition(":")
    if not sep or not path:
        return text, 1.0
    if not _NUMBER.fullmatch(ratio.strip()):
        if os.path.lexists(text) or os.sep in ratio or (os.altsep and os.altsep in ratio):
            return text, 1.0  # a path with a colon of its own
        raise RankwiseError(f"ratio {ratio!r} of {path} is not a number (write PATH:RATIO, e.g. {path}:0.5)")
    if os.path.lexists(text) and not os.path.lexists(path):
        return text, 1.0  # the file really is called "x:1"
    value = float(ratio)
    if not math.isfinite(value):
        raise RankwiseError(f"ratio {ratio!r} of {path} must be a finite number")
    return path, value


def cmd_merge(args: argparse.Namespace) -> int:
    from .io import load_lora
    from .merge import MergeInput, MergeMode, merge

    if args.concat and (args.rank is not None or args.rule is not None):
        raise RankwiseError("--concat keeps every rank exactly; drop --rank/--rule or --concat")
    _check_run_options(args)
    mode = MergeMode.CONCAT if args.concat or (args.rank is None and args.rule is None) else MergeMode.SVD
    policy = None if mode is MergeMode.CONCAT else _policies(args)[0]
    if not args.dry_run and not args.output:
        raise RankwiseError("-o/--output is required unless --dry-run")
    specs = [_parse_merge_input(s) for s in args.inputs]
    inputs = [_check_input_file(path) for path, _ in specs]
    plan = _plan(args, _outputs([(args.output, args.report_json, None)]), inputs)
    merge_inputs = []
    for path, ratio in specs:
        lora, read = load_lora(path, skip_bad_modules=args.skip_bad_modules)
        _print_read_report(read, prefix=f"{path}: ")
        merge_inputs.append(MergeInput(lora=lora, ratio=ratio, name=os.path.basename(path)))
    _check_key_names(args, next((i.lora.arch for i in merge_inputs if i.lora.arch is not None), None))
    if policy is not None:  # a size budget becomes a budget selector at the save dtype
        arch = next((i.lora.arch for i in merge_inputs if i.lora.arch is not None), None)
        policy = _selectors([policy], args, arch=arch)[0]
    progress, close = _progress_bar(not args.no_progress, "merge")
    try:
        out, report = merge(merge_inputs, mode=mode, policy=policy, progress=progress, workers=args.workers)
    finally:
        close()
    _emit_report(report, args, plan, args.report_json)
    if args.output:
        _save(out, args.output, args, plan)
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

    inputs = [_check_input_file(args.input)]
    plan = _plan(args, _outputs([(None, args.report_json, args.spectrum)]), inputs)
    lora, read = load_lora(args.input, skip_bad_modules=args.skip_bad_modules)
    _print_read_report(read)
    report, image = lora_info(lora, spectrum=bool(args.spectrum) and not plan.dry_run)
    _emit_report(report, args, plan, args.report_json)
    if args.metadata:
        print(json.dumps(dict(lora.metadata), indent=1))
    if args.spectrum and (image is not None or plan.dry_run):
        _save_picture(image, args.spectrum, plan)
    return 0


def _replace_choice(text: str) -> list[Component] | str:
    """``--replace``: ``"auto"``, ``"none"`` or a comma list of text encoders."""
    from .archs import Component

    value = text.strip().lower()
    if value in ("auto", "none"):
        return value
    encoders = [c for c in Component if c is not Component.UNET]
    names = [part.strip() for part in value.split(",") if part.strip()]
    valid = {c.value: c for c in encoders}
    for name in names:
        if name not in valid:
            raise RankwiseError(
                f"--replace: unknown text encoder {name!r}; use auto, none or a comma list of "
                f"{', '.join(valid)}"
            )
    if not names:
        raise RankwiseError(f"--replace {text!r} names no text encoder; use auto, none or {', '.join(valid)}")
    return [valid[n] for n in dict.fromkeys(names)]


def cmd_clean_clip(args: argparse.Namespace) -> int:
    from .clip import clean_checkpoint, text_encoder_report
    from .sources import open_source, preflight

    choice = _replace_choice(args.replace)
    inputs = [_check_input_file(args.base, "checkpoint file"), _check_input_file(args.tuned, "checkpoint file")]
    if not args.report_only and not args.output:
        raise RankwiseError("-o/--output is required (or use --report-only)")
    outputs = [] if args.report_only else [(args.output, OutputKind.CHECKPOINT)]
    plan = _plan(args, outputs, inputs)
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
    if choice == "auto":
        replace = [d.component for d in diffs if d.differs]
    elif choice == "none":
        replace = []
    else:
        replace = list(choice)
    progress, close = _progress_bar(not args.no_progress, "clean-clip", "tensors")
    try:
        result = clean_checkpoint(
            base, tuned, args.output, replace=replace, fix_position_ids=not args.keep_position_ids,
            overwrite=plan.overwrite, progress=progress,
        )
    finally:
        close()
    print(result.summary())
    if not result.replaced:
        print("text encoders replaced by base: none")
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
    path16 = out_dir / "demo_r16.safetensors"
    # the example files never replace a file of the user's in --out (unless --overwrite)
    plan = _plan(args, [(str(base_path), OutputKind.CHECKPOINT), (str(tuned_path), OutputKind.CHECKPOINT),
                        (str(path16), OutputKind.LORA)], [])
    t0 = time.perf_counter()
    write_checkpoint_pair(
        base_path, tuned_path, Arch.SD1, size="tiny",
        delta=PlantedDelta(kind=DeltaKind.LOWRANK, rank=8, noise=1e-4), seed=args.seed,
    )
    print(f"[1/4] wrote a synthetic SD1-layout pair with a planted rank-8 change to {out_dir} "
          f"({time.perf_counter() - t0:.1f} s)")
    policies = [RankPolicy(RankRule.parse(r)) for r in ("16", "sv_fro:0.99")]
    options = ExtractOptions(policy=policies[0], preset=LayerPreset.ALL, seed=args.seed)
    progress, close = _progress_bar(not args.no_progress, "demo")
    try:
        results = extract_sweep(open_source(base_path), open_source(tuned_path), policies, options,
                                progress=progress)
    finally:
        close()
    for (lora, report), policy in zip(results, policies):
        print(f"\n[2/4] extract with rule {policy.rule}:")
        print(report.to_table(limit=12))
    lora16, _ = results[0]
    saved = save_lora(lora16, path16, overwrite=plan.overwrite, inputs=[base_path, tuned_path])
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
    p.add_argument("--generic", action="store_true",
                   help="any architecture: every 2-D/4-D/5-D weight of two same-layout diffusion models, saved "
                        "with ComfyUI-native diffusion_model.<key> names (automatic when no record matches)")
    p.add_argument("--exact-parts", action="store_true",
                   help="generic mode: also store changed 1-D weights as .diff and biases as .diff_b (exact)")
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
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing report/picture")
    p.add_argument("--dry-run", action="store_true", help="print the report, write nothing")
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
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing output")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_clean_clip)

    p = sub.add_parser("demo", help="run the whole job on a built-in synthetic example")
    p.add_argument("--out", help="directory for the example files (default: a temp dir)")
    p.add_argument("--overwrite", action="store_true", help="replace example files left in --out by an earlier run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


class _Signals:
    """SIGINT → KeyboardInterrupt, SIGTERM → :class:`Terminated`, raised in the main thread while the
    command runs (installed by :func:`main` only; the library installs no handlers). SIGINT is handled
    even when it was inherited as ignored (a job started with ``&`` from a script). A repeat within a
    second is ignored, so a double Ctrl-C cannot cut the removal of a temp file short."""

    REPEAT_S = 1.0

    def __init__(self) -> None:
        self._previous: dict[int, object] = {}
        self._last = 0.0

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if now - self._last < self.REPEAT_S:
            return
        self._last = now
        if signum == signal.SIGTERM:
            raise Terminated(signum)
        raise KeyboardInterrupt

    def __enter__(self) -> "_Signals":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):  # pragma: no cover - platform without it
                    pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, RankwiseError):
        where = exc.filename if exc.filename is not None else None
        if exc.strerror:
            return f"{where}: {os_reason(exc)}" if where else os_reason(exc)
    return str(exc).strip() or type(exc).__name__


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"rankwise: {record.levelname.lower()}: {record.getMessage()}"


def _log_to_stderr() -> Callable[[], None]:
    logger = logging.getLogger("rankwise")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    logger.addHandler(handler)
    return lambda: logger.removeHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A user mistake or an OS error is one line ``rankwise: error: …`` on stderr and
    exit 2; Ctrl-C exits 130 and SIGTERM 143 after the temp files are gone; only a bug gives a traceback."""
    args = build_parser().parse_args(argv)
    unlog = _log_to_stderr()
    try:
        with _Signals():
            keep_freed_memory()  # this process runs Rankwise alone (memory.keep_freed_memory)
            threads = getattr(args, "threads", None)
            if threads is not None:
                _check_count(threads, "--threads")
                torch.set_num_threads(threads)
            return int(args.func(args) or 0)
    except Terminated:
        print("rankwise: terminated (SIGTERM); no partial files were left", file=sys.stderr)
        return 143
    except (KeyboardInterrupt, Cancelled):
        print("rankwise: cancelled; no partial files were left", file=sys.stderr)
        return 130
    except (RankwiseError, OSError) as exc:
        print(f"rankwise: error: {_error_line(exc)}", file=sys.stderr)
        return 2
    finally:
        unlog()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Peak memory of LoRA extraction inside a real ComfyUI (``main.py --cpu``), against the base model's own.

Target (issue: ComfyUI nodes): extracting from two SDXL-layout checkpoints must peak below the
memory ComfyUI needs to load the base model, plus 3 GB.

Each scenario runs on a fresh ComfyUI server (same flags as the integration tests) whose
``models/checkpoints`` holds a random-weight real-size pair with a planted rank-8 ΔW (written
once and cached, see ``tests/integration/synthetic_pair.py``), as one or two steps (prompts).
Before each step the kernel's peak counter is reset (``/proc/<pid>/clear_refs``); while it runs
``/proc/<pid>/status`` is polled every 20 ms; ``VmHWM`` (the exact peak resident memory of the
step: anonymous + file-backed) is read when it is done.

Scenarios (steps)
  base          load: CheckpointLoaderSimple(base) → Preview Any — ComfyUI's memory for the base model
  extract       load: Load Model Pair with the base loaded for sampling; then
                extract: the same (cached) node → Extract LoRA → Save LoRA
  extract_only  extract: the same with ``load_base_for_sampling`` off (the tuned side is always streamed)
  two_models    load: CheckpointLoaderSimple × 2 — ComfyUI's memory for both models
  graph         load: as two_models; extract: Model Pair from Graph (both CLIPs) → Extract → Save
                (default for sd1 only: two SDXL models in fp32 do not fit a 24 GB machine)
  core          load: as two_models; extract: ComfyUI core's ModelMergeSubtract + CLIPMergeSubtract →
                "Extract and Save Lora" at the same rank (only when asked: --scenarios core)

Loading a checkpoint, ComfyUI maps the whole file and builds the fp32 model, so its load peak is
well above what it holds afterwards; the extraction step is judged against both.

Extraction uses the example workflows' full settings by default: every layer (UNet conv 3×3
included), text encoders that differ, exact SVD; ``--rules`` (default 128) sets the rank.

Flux (``--arch flux``): the pair is two diffusion-model-only bf16 files of the flux1-dev layout at real width
with the first ``--flux-blocks D,S`` double/single blocks (default 2,4: full Flux in two fp32 models would not
fit a 24 GB machine; every layer has its real size, so the extraction's extra memory is that of the full
model), placed in ``models/diffusion_models`` as ``flux1-dev.safetensors`` / ``flux1-dev-finetune.safetensors``:
  flux_base     load: UNETLoader(base) → Preview Any
  flux_two      load: UNETLoader × 2
  flux_graph    load: as flux_two; extract: Model Pair from Graph → Extract LoRA → Save LoRA
  flux_extract  load: Load Diffusion Model Pair with the base loaded for sampling; extract: → Extract → Save

Run:  python bench/bench_comfy_memory.py [--arch sdxl|sd1|flux] [--rules 128] [--comfyui ~/ComfyUI]
Needs a ComfyUI checkout with its venv (COMFYUI_PATH / COMFYUI_PYTHON as for the integration tests).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))

from common import MemoryPeaks  # noqa: E402
from comfy_harness import ComfyServer, find_comfyui, populate_base_dir  # noqa: E402
from synthetic_pair import BASE_NAME, TUNED_NAME, ensure_pair  # noqa: E402

from rankwise.core.types import Arch  # noqa: E402

GIB = 1024**3
TARGET_EXTRA_BYTES = 3 * 10**9  # "base model memory + 3 GB"


@dataclass
class Sample:
    """Peaks seen in /proc/<pid>/status while a prompt ran (bytes)."""

    hwm: int = 0  # VmHWM at the end: exact peak resident set (anon + file + shmem)
    rss: int = 0  # highest VmRSS polled
    anon: int = 0  # highest RssAnon polled
    file: int = 0  # highest RssFile polled
    idle_rss: int = 0  # VmRSS of the idle server before the prompt
    end_rss: int = 0  # VmRSS when the prompt is done (what its cached outputs hold)
    end_anon: int = 0


def reset_peak(pid: int) -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of ``pid``; False where that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_step(pid: int, run):
    """``run()`` with the memory of ``pid`` watched: VmHWM is reset first (where allowed), so the
    Sample's ``hwm`` is this step's own peak. Returns ``(run's result, Sample)``."""
    reset = reset_peak(pid)
    with MemoryPeaks(pid) as mem:
        result = run()
    end = mem.end
    sample = Sample(
        hwm=end.get("VmHWM", 0) if reset else max(mem.peak["VmRSS"], end.get("VmRSS", 0)),
        rss=mem.peak["VmRSS"], anon=mem.peak["RssAnon"], file=mem.peak["RssFile"],
        idle_rss=mem.start.get("VmRSS", 0), end_rss=end.get("VmRSS", 0), end_anon=end.get("RssAnon", 0),
    )
    return result, sample


@dataclass
class Result:
    scenario: str
    step: str
    wall_s: float
    server_cpu_s: float
    peak: Sample
    lora_bytes: int = 0


def prompt_base() -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": BASE_NAME}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }


def prompt_extract(args: argparse.Namespace, *, load_base: bool, prefix: str) -> dict:
    return {
        **prompt_extract_nodes(load_base=load_base),
        "2": {"class_type": "RankwiseExtractLoRA",
              "inputs": {"pair": ["1", 3], "rules": args.rules, "max_rank": args.max_rank, "conv_rank": args.conv_rank,
                         "te_rank": 0, "min_rank": 1, "layers": args.layers, "text_encoders": "auto",
                         "method": args.method, "clamp_quantile": 0.0, "seed": 0}},
        "3": {"class_type": "RankwiseSaveLoRA",
              "inputs": {"lora": ["2", 0], "filename_prefix": prefix, "dtype": "fp16", "suffix": ""}},
    }


def prompt_pair_load() -> dict:
    """Step 1 of ``extract``: Load Model Pair with the base loaded for sampling (cached for step 2)."""
    prompt = prompt_extract_nodes(load_base=True)
    prompt["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["1", 4]}}
    return prompt


def prompt_extract_nodes(*, load_base: bool) -> dict:
    return {"1": {"class_type": "RankwiseLoadModelPair",
                  "inputs": {"base_ckpt": BASE_NAME, "tuned_ckpt": TUNED_NAME, "load_base_for_sampling": load_base}}}


def prompt_two_models() -> dict:
    """Both checkpoints loaded by ComfyUI; node ids as in :func:`prompt_graph` (so step 2 reuses them)."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": BASE_NAME}},
        "5": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TUNED_NAME}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}},
    }


def prompt_graph(args: argparse.Namespace, *, prefix: str) -> dict:
    prompt = prompt_extract(args, load_base=False, prefix=prefix)
    prompt["1"] = {"class_type": "RankwiseModelPair",
                   "inputs": {"base_model": ["4", 0], "tuned_model": ["5", 0], "base_clip": ["4", 1], "tuned_clip": ["5", 1]}}
    prompt["2"]["inputs"]["pair"] = ["1", 0]
    two = prompt_two_models()
    prompt["4"], prompt["5"] = two["4"], two["5"]
    return prompt


def prompt_core(args: argparse.Namespace) -> dict:
    """ComfyUI core's own path: Model/CLIP Subtract → "Extract and Save Lora" (LoraSave), same rank."""
    rank = int(args.rules) if args.rules.strip().isdigit() else args.max_rank
    prompt = {k: v for k, v in prompt_two_models().items() if k in ("4", "5")}
    prompt["10"] = {"class_type": "ModelMergeSubtract", "inputs": {"model1": ["5", 0], "model2": ["4", 0], "multiplier": 1.0}}
    prompt["11"] = {"class_type": "CLIPMergeSubtract", "inputs": {"clip1": ["5", 1], "clip2": ["4", 1], "multiplier": 1.0}}
    prompt["12"] = {"class_type": "LoraSave", "inputs": {"filename_prefix": "loras/core", "rank": rank, "lora_type": "standard",
                                                         "bias_diff": False, "model_diff": ["10", 0], "text_encoder_diff": ["11", 0]}}
    return prompt


FLUX_BASE, FLUX_TUNED = "flux1-dev.safetensors", "flux1-dev-finetune.safetensors"


def prompt_flux_load(*, two: bool) -> dict:
    prompt = {"4": {"class_type": "UNETLoader", "inputs": {"unet_name": FLUX_BASE, "weight_dtype": "default"}},
              "6": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}}}
    if two:
        prompt["5"] = {"class_type": "UNETLoader", "inputs": {"unet_name": FLUX_TUNED, "weight_dtype": "default"}}
        prompt["7"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}}
    return prompt


def prompt_flux_graph(args: argparse.Namespace, *, prefix: str) -> dict:
    prompt = prompt_extract(args, load_base=False, prefix=prefix)
    prompt["1"] = {"class_type": "RankwiseModelPair", "inputs": {"base_model": ["4", 0], "tuned_model": ["5", 0]}}
    prompt["2"]["inputs"]["pair"] = ["1", 0]
    prompt["3"]["inputs"]["dtype"] = "bf16"
    prompt.update({k: v for k, v in prompt_flux_load(two=True).items() if k in ("4", "5")})
    return prompt


def prompt_flux_pair_nodes() -> dict:
    return {"1": {"class_type": "RankwiseLoadDiffusionModelPair",
                  "inputs": {"base_model_name": FLUX_BASE, "tuned_model_name": FLUX_TUNED,
                             "load_base_for_sampling": True, "weight_dtype": "default", "exact_parts": False}}}


def prompt_flux_pair_load() -> dict:
    prompt = prompt_flux_pair_nodes()
    prompt["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}
    return prompt


def prompt_flux_extract(args: argparse.Namespace, *, prefix: str) -> dict:
    prompt = prompt_extract(args, load_base=False, prefix=prefix)
    prompt.update(prompt_flux_pair_nodes())
    prompt["2"]["inputs"]["pair"] = ["1", 1]
    prompt["3"]["inputs"]["dtype"] = "bf16"
    return prompt


def make_base_dir(root: Path, pair: tuple[Path, Path], flux: bool = False) -> Path:
    base = Path(tempfile.mkdtemp(prefix="comfy-mem-", dir=root))
    if not flux:
        return populate_base_dir(base, {BASE_NAME: pair[0], TUNED_NAME: pair[1]})
    populate_base_dir(base, {})
    for name, target in ((FLUX_BASE, pair[0]), (FLUX_TUNED, pair[1])):
        (base / "models" / "diffusion_models" / name).symlink_to(target)
    return base


def run_scenario(name: str, steps: list[tuple[str, dict]], install, pair, root: Path, timeout: float) -> list[Result]:
    """Run the steps' prompts one after another on one fresh server; one Result (peak) per step."""
    base_dir = make_base_dir(root, pair, flux=name.startswith("flux"))
    server = ComfyServer(install, base_dir, pair)
    server.start()
    out: list[Result] = []
    try:
        time.sleep(2.0)  # let start-up allocations settle before the idle reading
        for step, prompt in steps:
            entry, sample = measure_step(
                server.proc.pid, lambda: server.run_prompt(prompt, timeout=timeout, label=f"{name}/{step}"))
            loras = sorted((base_dir / "models" / "loras").rglob("*.safetensors"))
            out.append(Result(name, step, entry["_wall_s"], entry["_cpu_s"], sample,
                              lora_bytes=sum(p.stat().st_size for p in loras)))
        return out
    finally:
        server.stop()
        shutil.rmtree(base_dir, ignore_errors=True)


def gb(n: int) -> str:
    return f"{n / 10**9:6.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="sdxl", choices=[a.value for a in (Arch.SD1, Arch.SDXL, Arch.FLUX)])
    ap.add_argument("--flux-blocks", default="2,4", help="flux: D,S double/single blocks at real width (default 2,4)")
    ap.add_argument("--rules", default="128", help="Extract LoRA rules (default: fixed rank 128)")
    ap.add_argument("--max-rank", type=int, default=128)
    ap.add_argument("--conv-rank", type=int, default=0)
    ap.add_argument("--layers", default="all", choices=["attention", "attn_mlp", "all"])
    ap.add_argument("--method", default="exact", choices=["exact", "fast", "reference"])
    ap.add_argument("--scenarios", default=None,
                    help="comma list (default: base,extract,extract_only; sd1 adds two_models,graph; also: core)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--workdir", default=None, help="where the temporary ComfyUI base directories go")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    install, why = find_comfyui()
    if install is None:
        print(f"cannot run: {why}")
        return 2
    arch = Arch(args.arch)
    if arch is Arch.FLUX:
        import bench_flux

        blocks = tuple(int(x) for x in args.flux_blocks.split(","))
        base_ckpt, tuned_ckpt, secs = bench_flux.ensure_pair(
            Path(f"{bench_flux.default_dir()}-blocks{blocks[0]}x{blocks[1]}"), blocks)
    else:
        base_ckpt, tuned_ckpt, secs = ensure_pair(arch)
    if secs:
        print(f"wrote the {arch.value} pair in {secs:.0f} s")
    pair = (base_ckpt, tuned_ckpt)
    root = Path(args.workdir or tempfile.gettempdir())
    print(f"ComfyUI {install.path}  pair {base_ckpt.parent.name}  ({base_ckpt.stat().st_size / GIB:.2f} GiB each)")
    print(f"extract: rules={args.rules} max_rank={args.max_rank} conv_rank={args.conv_rank} "
          f"layers={args.layers} method={args.method}; load average {os.getloadavg()[0]:.1f}\n")

    scenarios = {
        "base": [("load", prompt_base())],
        "extract": [("load", prompt_pair_load()),
                    ("extract", prompt_extract(args, load_base=True, prefix="bench/extract"))],
        "extract_only": [("extract", prompt_extract(args, load_base=False, prefix="bench/extract_only"))],
        "two_models": [("load", prompt_two_models())],
        "graph": [("load", prompt_two_models()), ("extract", prompt_graph(args, prefix="bench/graph"))],
        "core": [("load", prompt_two_models()), ("extract", prompt_core(args))],
        "flux_base": [("load", prompt_flux_load(two=False))],
        "flux_two": [("load", prompt_flux_load(two=True))],
        "flux_graph": [("load", prompt_flux_load(two=True)), ("extract", prompt_flux_graph(args, prefix="bench/flux_graph"))],
        "flux_extract": [("load", prompt_flux_pair_load()), ("extract", prompt_flux_extract(args, prefix="bench/flux_extract"))],
    }
    default = "base,extract,extract_only" + (",two_models,graph" if arch is Arch.SD1 else "")
    if arch is Arch.FLUX:
        default = "flux_base,flux_extract,flux_two,flux_graph"
    chosen = args.scenarios or default
    results: list[Result] = []
    for name in [s.strip() for s in chosen.split(",") if s.strip()]:
        for r in run_scenario(name, scenarios[name], install, pair, root, args.timeout):
            results.append(r)
            p = r.peak
            print(f"{name + '/' + r.step:22s} wall {r.wall_s:7.1f} s  CPU {r.server_cpu_s:7.1f} s  "
                  f"peak {gb(p.hwm)} GB (anon {gb(p.anon)}, file {gb(p.file)})  "
                  f"before {gb(p.idle_rss)}  after {gb(p.end_rss)} (anon {gb(p.end_anon)}) GB  "
                  f"LoRA {r.lora_bytes / 2**20:.0f} MiB", flush=True)

    by = {(r.scenario, r.step): r for r in results}
    verdict = 0
    print()
    for ref_name, extractions in (("base", ("extract", "extract_only")), ("two_models", ("graph", "core")),
                                  ("flux_base", ("flux_extract",)), ("flux_two", ("flux_graph",))):
        if (ref_name, "load") not in by:
            continue
        ref = by[(ref_name, "load")].peak
        limit = ref.hwm + TARGET_EXTRA_BYTES
        print(f"{ref_name}: ComfyUI's peak loading it {gb(ref.hwm).strip()} GB (anon {gb(ref.anon).strip()}), "
              f"held afterwards {gb(ref.end_rss).strip()} GB")
        for name in extractions:
            if (name, "extract") not in by:
                continue
            peak = by[(name, "extract")].peak.hwm
            lines = [(f"{name} peak vs loading the model", peak, limit, "ComfyUI's load peak + 3 GB")]
            if (name, "load") in by:  # the models were loaded by an earlier step and are held
                held = by[(name, "load")].peak.end_rss
                lines.append((f"{name} peak vs the model held", peak, held + TARGET_EXTRA_BYTES,
                              f"held {gb(held).strip()} GB + 3 GB; extraction adds {gb(peak - held).strip()} GB"))
            for label, value, bound, how in lines:
                ok = value <= bound
                if name != "core":  # ComfyUI's own path is shown for comparison, not judged
                    verdict |= 0 if ok else 1
                mark = ("OK" if ok else "OVER TARGET") if name != "core" else "(ComfyUI core, for comparison)"
                print(f"  {label:34s} {gb(value)} GB, limit {gb(bound).strip()} GB ({how})  {mark}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return verdict


if __name__ == "__main__":
    sys.exit(main())

"""The real-size random-weight checkpoint pairs loaded in ComfyUI (integration tests, memory bench).

base  = N(0, 0.02²) weights in the full original ("LDM") layout, fp16 (SD1.5 ~2 GB, SDXL ~6.9 GB);
tuned = base + a planted rank-8 ΔW in every UNet and text-encoder layer of the key table.

The files are cached between runs in ``$RANKWISE_TEST_CACHE`` (default ``~/.cache/rankwise-tests``)
under a directory named by :func:`cache_version`; bump :data:`VERSION` whenever what is written changes.
Run this file directly (``python synthetic_pair.py [sd1|sdxl] [cache dir]``) to build a cache ahead of time.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from rankwise.core.archs import key_table
from rankwise.core.layouts import extra_layout, load_layout
from rankwise.core.synthetic import DeltaKind, PlantedDelta, write_checkpoint_pair
from rankwise.core.types import Arch

VERSION = "v1"
ARCH_TAGS = {Arch.SD1: "sd15", Arch.SD2: "sd2", Arch.SDXL: "sdxl"}
BASE_NAME = "rankwise_base.safetensors"
TUNED_NAME = "rankwise_tuned.safetensors"
PLANTED = PlantedDelta(kind=DeltaKind.LOWRANK, rank=8, scale=0.05)
SEED = 7


def cache_version(arch: Arch = Arch.SD1) -> str:
    return f"{ARCH_TAGS[arch]}-full-fp16-lowrank{PLANTED.rank}-scale{PLANTED.scale}-seed{SEED}-{VERSION}"


def cache_root() -> Path:
    return Path(os.environ.get("RANKWISE_TEST_CACHE") or Path.home() / ".cache" / "rankwise-tests")


def _complete(base: Path, tuned: Path, arch: Arch) -> bool:
    """Both files exist and hold every key of the arch's layout (a cheap header check)."""
    from rankwise.core.io import read_safetensors_header

    want = set(load_layout(arch))
    for path in (base, tuned):
        if not path.is_file():
            return False
        try:
            tensors, _ = read_safetensors_header(path)
        except Exception:
            return False
        if set(tensors) != want:
            return False
    return True


def ensure_pair(arch: Arch = Arch.SD1, root: Path | None = None) -> tuple[Path, Path, float]:
    """Paths of the cached (base, tuned) pair, writing it first if needed; and the seconds spent writing."""
    directory = (root or cache_root()) / cache_version(arch)
    base, tuned = directory / BASE_NAME, directory / TUNED_NAME
    if _complete(base, tuned, arch):
        return base, tuned, 0.0
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    write_checkpoint_pair(
        base, tuned, arch, size="full", delta=PLANTED, seed=SEED,
        dtype=torch.float16, extra_layout=extra_layout(arch), return_deltas=False,
    )
    (directory / "about.json").write_text(json.dumps({
        "version": cache_version(arch), "arch": arch.value, "planted_rank": PLANTED.rank, "scale": PLANTED.scale,
        "seed": SEED, "table_layers": len(key_table(arch)),
    }, indent=1))
    return base, tuned, time.perf_counter() - start


def ensure_sd15_pair(root: Path | None = None) -> tuple[Path, Path, float]:
    return ensure_pair(Arch.SD1, root)


if __name__ == "__main__":
    which = Arch(sys.argv[1]) if len(sys.argv) > 1 else Arch.SD1
    b, t, secs = ensure_pair(which, Path(sys.argv[2]) if len(sys.argv) > 2 else None)
    print(f"{b}\n{t}\nwritten in {secs:.1f} s" if secs else f"{b}\n{t}\n(cached)")

"""The real-size SD1.5-layout random-weight checkpoint pair the integration tests load in ComfyUI.

base  = N(0, 0.02²) weights in the full SD1.5 original ("LDM") layout, fp16 (~2 GB);
tuned = base + a planted rank-8 ΔW in every UNet and text-encoder layer of the key table.

The files are cached between runs in ``$RANKWISE_TEST_CACHE`` (default ``~/.cache/rankwise-tests``)
under a directory named by :data:`CACHE_VERSION`; change it whenever what is written changes.
Run this file directly to build the cache ahead of a test run.
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

CACHE_VERSION = "sd15-full-fp16-lowrank8-scale0.05-seed7-v1"
BASE_NAME = "rankwise_base.safetensors"
TUNED_NAME = "rankwise_tuned.safetensors"
PLANTED = PlantedDelta(kind=DeltaKind.LOWRANK, rank=8, scale=0.05)
SEED = 7


def cache_root() -> Path:
    return Path(os.environ.get("RANKWISE_TEST_CACHE") or Path.home() / ".cache" / "rankwise-tests")


def _complete(base: Path, tuned: Path) -> bool:
    """Both files exist and hold every key of the SD1.5 layout (a cheap header check)."""
    from rankwise.core.io import read_safetensors_header

    want = set(load_layout(Arch.SD1))
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


def ensure_sd15_pair(root: Path | None = None) -> tuple[Path, Path, float]:
    """Paths of the cached (base, tuned) pair, writing it first if needed; and the seconds spent writing."""
    directory = (root or cache_root()) / CACHE_VERSION
    base, tuned = directory / BASE_NAME, directory / TUNED_NAME
    if _complete(base, tuned):
        return base, tuned, 0.0
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    write_checkpoint_pair(
        base, tuned, Arch.SD1, size="full", delta=PLANTED, seed=SEED,
        dtype=torch.float16, extra_layout=extra_layout(Arch.SD1), return_deltas=False,
    )
    (directory / "about.json").write_text(json.dumps({
        "version": CACHE_VERSION, "arch": "sd1", "planted_rank": PLANTED.rank, "scale": PLANTED.scale,
        "seed": SEED, "table_layers": len(key_table(Arch.SD1)),
    }, indent=1))
    return base, tuned, time.perf_counter() - start


if __name__ == "__main__":
    b, t, secs = ensure_sd15_pair(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(f"{b}\n{t}\nwritten in {secs:.1f} s" if secs else f"{b}\n{t}\n(cached)")

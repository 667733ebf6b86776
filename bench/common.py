"""Shared benchmark helpers: layer-shape inventories, CPU/wall timing, process memory, matrices with
a known spectrum.

The inventories are the SD1.5 / SDXL UNet layers that kohya extracts with ``--conv_dim`` (sets A+B
of the performance notes §1: every Linear/Conv in the transformer blocks, resnets and
up/down-samplers), as (out, in·kh·kw, count). They are benchmark data, not key tables.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

# (m, n, layer count) — matrix out × in·kh·kw
SDXL_AB: tuple[tuple[int, int, int], ...] = (
    (10240, 1280, 60), (1280, 5120, 60), (5120, 640, 10), (1280, 2048, 120), (640, 2560, 10),
    (1280, 1280, 379), (640, 2048, 20), (640, 640, 70),
    (1280, 23040, 2), (1280, 17280, 1), (1280, 11520, 11), (640, 17280, 1), (1280, 5760, 1),
    (640, 11520, 1), (640, 8640, 1), (640, 5760, 8), (1280, 2560, 2), (320, 8640, 1),
    (1280, 1920, 1), (640, 2880, 1), (320, 5760, 2), (640, 1920, 1), (320, 2880, 8),
    (640, 1280, 6), (1280, 640, 1), (640, 960, 1), (320, 1280, 5), (320, 960, 1), (640, 320, 1),
    (320, 640, 2),
)  # 788 layers (1280×1280: 372 in set A + 7 resnet time-embedding projections)

SD15_AB: tuple[tuple[int, int, int], ...] = (
    (10240, 1280, 6), (1280, 5120, 6), (5120, 640, 5), (640, 2560, 5), (1280, 1280, 60),
    (1280, 768, 12), (2560, 320, 5), (640, 768, 10), (640, 640, 40), (320, 1280, 10),
    (320, 768, 10), (320, 320, 40),
    (1280, 23040, 5), (1280, 17280, 1), (1280, 11520, 20), (640, 17280, 1), (1280, 5760, 1),
    (640, 11520, 1), (640, 8640, 1), (640, 5760, 8), (1280, 2560, 5), (320, 8640, 1),
    (1280, 1920, 1), (640, 2880, 1), (320, 5760, 2), (640, 1920, 1), (320, 2880, 8),
    (640, 1280, 6), (1280, 640, 1), (640, 960, 1), (320, 960, 1), (640, 320, 1), (320, 640, 2),
)  # 278 layers (320×1280: 5 ff-out + 5 time-embedding; 1280×1280: 48 + 12)

INVENTORIES = {"sdxl": SDXL_AB, "sd15": SD15_AB}


@dataclass
class Timing:
    cpu: float = 0.0
    wall: float = 0.0


class timed:
    """``with timed() as t: ...`` → ``t.cpu`` (process CPU seconds, all threads) and ``t.wall``."""

    def __enter__(self) -> Timing:
        self._t = Timing()
        self._cpu0, self._wall0 = time.process_time(), time.perf_counter()
        return self._t

    def __exit__(self, *exc) -> None:
        self._t.cpu = time.process_time() - self._cpu0
        self._t.wall = time.perf_counter() - self._wall0


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return float("nan")


# ------------------------------------------------------------------------------------------
# process memory (Linux /proc; elsewhere every reading is 0)
# ------------------------------------------------------------------------------------------

_MEMORY_FIELD = re.compile(r"(VmHWM|VmRSS|RssAnon|RssFile|RssShmem):\s+(\d+) kB")


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile, RssShmem of ``/proc/<pid>/status`` in bytes ({} if unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return {}
    return {m.group(1): int(m.group(2)) * 1024 for m in _MEMORY_FIELD.finditer(text)}


class MemoryPeaks:
    """``with MemoryPeaks(pid) as mem: ...`` → ``mem.start`` / ``mem.end`` (:func:`proc_status` before
    and after) and ``mem.peak`` (highest VmRSS, RssAnon, RssFile seen), polled on a daemon thread."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self, pid: int | str = "self", period: float = 0.02) -> None:
        self.pid, self.period = pid, period
        self.start = proc_status(pid)
        self.end: dict[str, int] = {}
        self.peak = {f: self.start.get(f, 0) for f in self.FIELDS}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _poll(self) -> dict[str, int]:
        status = proc_status(self.pid)
        for f in self.FIELDS:
            self.peak[f] = max(self.peak[f], status.get(f, 0))
        return status

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll()
            time.sleep(self.period)

    def __enter__(self) -> MemoryPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.end = self._poll()


# ------------------------------------------------------------------------------------------
# matrices with a prescribed spectrum
# ------------------------------------------------------------------------------------------


def heavy_tail_spectrum(p: int, power: float = 0.5) -> np.ndarray:
    """σᵢ = i^-power (i = 1…p): a full fine-tune's delta."""
    return (np.arange(p, dtype=np.float64) + 1.0) ** -power


def planted_spectrum(m: int, n: int, rank: int = 64, noise_ratio: float = 0.5) -> np.ndarray:
    """A rank-``rank`` signal (σ 1 → 0.05) over a Marchenko–Pastur noise floor.

    The noise singular values are the quantiles of a Gaussian m × n matrix's spectrum, scaled so
    that ‖noise‖_F = noise_ratio·‖signal‖_F (the performance notes' ``lr64+noise``).
    """
    p = min(m, n)
    signal = np.linspace(1.0, 0.05, rank)
    c = p / max(m, n)
    lo, hi = (1 - math.sqrt(c)) ** 2, (1 + math.sqrt(c)) ** 2
    x = np.linspace(lo, hi, 20001)
    density = np.sqrt(np.clip((hi - x) * (x - lo), 0, None)) / (2 * math.pi * c * np.maximum(x, 1e-300))
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(x))])
    cdf /= cdf[-1]
    q = (np.arange(p - rank, dtype=np.float64) + 0.5) / (p - rank)
    noise = np.sqrt(np.interp(q, cdf, x))
    noise *= noise_ratio * np.linalg.norm(signal) / np.linalg.norm(noise)
    return np.sort(np.concatenate([signal, noise]))[::-1].copy()


def _orthonormal_columns(n: int, p: int, rng: np.random.Generator) -> np.ndarray:
    """p orthonormal columns of length n: random DCT-II basis vectors, row signs and order shuffled.

    Exactly orthonormal (to fp64 round-off) at O(n·p) cost, where QR of an n × p Gaussian would
    cost O(n·p²) — the widest SDXL conv needs 23040 × 1280.
    """
    freq = rng.choice(n, size=p, replace=False)
    rows = np.arange(n, dtype=np.float64)[:, None] + 0.5
    C = np.cos((math.pi / n) * rows * freq[None, :].astype(np.float64))
    C *= math.sqrt(2.0 / n)
    C[:, freq == 0] = math.sqrt(1.0 / n)
    C *= rng.choice(np.array([-1.0, 1.0]), size=n)[:, None]
    return C[rng.permutation(n)]


def spectral_matrix(m: int, n: int, sigma: np.ndarray, seed: int) -> torch.Tensor:
    """An m × n fp64 matrix U·diag(σ)·Vᵀ with exactly the singular values ``sigma`` (descending)."""
    rng = np.random.default_rng(seed)
    p = min(m, n)
    U = _orthonormal_columns(m, p, rng)
    V = _orthonormal_columns(n, p, rng)
    return torch.from_numpy((U * sigma[None, :p]) @ V.T)


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def weighted_median(values: list[float], weights: list[int]) -> float:
    pairs = sorted(zip(values, weights))
    total = sum(weights)
    acc = 0
    for v, w in pairs:
        acc += w
        if acc * 2 >= total:
            return v
    return float("nan")

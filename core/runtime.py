"""Runtime settings of the numerics: threads (torch and scipy's bundled OpenBLAS), scipy loading,
the compute device, and the GPU cache.

Kept apart from the math so :mod:`.decompositions` stays pure and the thread policy lives in one
place (see :func:`set_threads` for the measured reason to run 1 thread on a busy machine).
"""

from __future__ import annotations

import os

import torch


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` → CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def set_threads(n: int | None) -> None:
    """Set the thread count of torch and of scipy's bundled OpenBLAS (best effort).

    ``None`` means one thread per CPU core. On a busy 2-core machine 1 thread is often faster
    (spinning BLAS threads contend); benchmarks use 1 and measure CPU time.
    """
    count = int(n) if n is not None else (os.cpu_count() or 1)
    if count < 1:
        raise ValueError(f"thread count must be ≥ 1, got {n}")
    torch.set_num_threads(count)
    openblas_set_threads(count)


def scipy_linalg():
    """scipy.linalg with its BLAS thread count synced to torch's, or None if scipy is missing."""
    try:
        import scipy.linalg as sl
    except ImportError:  # pragma: no cover - scipy ships with ComfyUI and with this package
        return None
    _OPENBLAS.follow_torch()
    return sl


def release_cache(dev: torch.device) -> None:
    if dev.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def openblas_library_paths() -> list[str]:
    """The OpenBLAS libraries bundled with scipy (Linux wheels: ``scipy.libs``; macOS: ``.dylibs``)."""
    import glob

    try:
        import scipy
    except ImportError:  # pragma: no cover
        return []
    base = os.path.dirname(scipy.__file__)
    return sorted(glob.glob(os.path.join(base + ".libs", "*openblas*")) + glob.glob(os.path.join(base, ".dylibs", "*openblas*")))


class _OpenBlasThreads:
    """scipy's bundled OpenBLAS thread count, kept equal to torch's (found lazily via ctypes).

    scipy's OpenBLAS starts with one thread per core; on a busy 2-core machine its spinning
    threads made a 300×300 partial eigh take 0.9 s instead of 0.007 s (measured). Every scipy call
    here therefore runs with ``torch.get_num_threads()`` threads, so :func:`set_threads` (or the
    caller's ``torch.set_num_threads``) governs both libraries.
    """

    def __init__(self) -> None:
        self._setters: list | None = None
        self._current: int | None = None

    def _find(self) -> list:
        import ctypes

        setters = []
        try:
            import scipy.linalg  # noqa: F401  (loads the BLAS library)
        except ImportError:  # pragma: no cover
            return setters
        for path in openblas_library_paths():
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            names = ("scipy_openblas_set_num_threads", "scipy_openblas_set_num_threads64_", "openblas_set_num_threads")
            for sym in names:
                fn = getattr(lib, sym, None)
                if fn is not None:
                    setters.append(fn)
                    break
        return setters

    def set(self, n: int) -> None:
        if self._setters is None:
            self._setters = self._find()
        if n != self._current:
            for fn in self._setters:
                fn(int(n))
            self._current = n

    def follow_torch(self) -> None:
        self.set(torch.get_num_threads())


_OPENBLAS = _OpenBlasThreads()


def openblas_set_threads(n: int) -> None:
    _OPENBLAS.set(int(n))


def layer_parallelism(device: str | torch.device | None, cpus: int | None = None) -> tuple[int, int | None]:
    """``(workers, threads per worker)`` for a layer loop on ``device`` when the caller has no say
    (the ComfyUI nodes; the command line has ``--workers``/``--threads``).

    On the CPU: up to 4 layers at once, the cores split between them (2 cores: 2 workers × 1
    thread). One worker with 2 BLAS threads on the 2-core machine ran the SDXL rank-128 extraction
    inside ComfyUI in 163 s wall / 309 CPU-s, against 68 s / 127 CPU-s for 2 × 1 (spinning threads
    on small layers). On a GPU: 1 worker, threads left as they are.
    """
    dev = resolve_device(device)
    if dev.type != "cpu":
        return 1, None
    n = max(1, int(cpus if cpus is not None else (os.cpu_count() or 1)))
    workers = min(4, n)
    return workers, max(1, n // workers)

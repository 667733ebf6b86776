"""BLAS ``syrk`` and LAPACK ``syevr`` called through ctypes, so they run without the GIL.

scipy's f2py wrappers hold the GIL for the whole call (measured: two threads each running a
1280 × 1280 partial ``eigh`` or a ``syrk`` take exactly as long as running them one after the
other), so the layer pipeline's workers — Python threads — could not overlap the two costliest
steps of EXACT. A ctypes call releases the GIL, and these routines are the very same ones in the
very same library (scipy's bundled OpenBLAS, exported as ``scipy_ssyrk_`` … or plain ``ssyrk_``),
so results are identical to scipy's.

Each function returns ``None`` when the library or a symbol is not found (another scipy build, a
platform where the library is not a loadable file); the caller then uses scipy. A LAPACK failure
(``info ≠ 0``) raises :class:`numpy.linalg.LinAlgError`, which the fallback ladder handles.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Callable

import numpy as np

from .runtime import openblas_library_paths

_c_int = ctypes.c_int
_p = ctypes.c_void_p
_LOCK = threading.Lock()
_ROUTINES: dict[str, Callable | None] | None = None


def _symbol(lib: ctypes.CDLL, name: str):
    for prefix in ("scipy_", ""):
        fn = getattr(lib, f"{prefix}{name}_", None)
        if fn is not None:
            return fn
    return None


def _load() -> dict[str, Callable | None]:
    global _ROUTINES
    with _LOCK:
        if _ROUTINES is not None:
            return _ROUTINES
        found: dict[str, Callable | None] = {n: None for n in ("ssyrk", "dsyrk", "ssyevr", "dsyevr")}
        if os.environ.get("RANKWISE_NO_CTYPES_LAPACK"):
            _ROUTINES = found
            return found
        try:
            import scipy.linalg  # noqa: F401  (loads the library the way scipy does)
        except ImportError:  # pragma: no cover
            _ROUTINES = found
            return found
        for path in openblas_library_paths():
            if "64_" in os.path.basename(path):  # ILP64 builds take 64-bit integers
                continue
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for name in found:
                if found[name] is None:
                    fn = _symbol(lib, name)
                    if fn is not None:
                        fn.restype = None
                        found[name] = fn
        _ROUTINES = found
        return found


def available() -> bool:
    r = _load()
    return all(r[n] is not None for n in r)


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return a.ctypes.data_as(_p)


def _char(c: str) -> ctypes.c_char_p:
    return ctypes.c_char_p(c.encode())


def _real(dtype: np.dtype):
    return ctypes.c_float if dtype == np.float32 else ctypes.c_double


def syrk_upper(W: np.ndarray) -> np.ndarray | None:
    """``G = W·Wᵀ`` (upper triangle, Fortran order, s × s) for a C- or Fortran-contiguous float32/64 ``W`` (s × L)."""
    if W.dtype not in (np.float32, np.float64) or W.ndim != 2 or not (W.flags.c_contiguous or W.flags.f_contiguous):
        return None
    fn = _load()["ssyrk" if W.dtype == np.float32 else "dsyrk"]
    if fn is None:
        return None
    s, L = W.shape
    G = np.zeros((s, s), dtype=W.dtype, order="F")
    if s == 0:
        return G
    real = _real(W.dtype)
    # C order: read as Fortran, the buffer is Wᵀ (L × s, lda = L) and C = AᵀA (TRANS = 'T');
    # Fortran order: the buffer is W (s × L, lda = s) and C = A·Aᵀ (TRANS = 'N').
    trans, lda = ("N", s) if W.flags.f_contiguous and not W.flags.c_contiguous else ("T", L)
    fn(_char("U"), _char(trans), ctypes.byref(_c_int(s)), ctypes.byref(_c_int(L)), ctypes.byref(real(1.0)),
       _ptr(W), ctypes.byref(_c_int(max(1, lda))), ctypes.byref(real(0.0)), _ptr(G), ctypes.byref(_c_int(max(1, s))),
       ctypes.c_size_t(1), ctypes.c_size_t(1))
    return G


def syevr_upper(G: np.ndarray, top: int | None, vectors: bool = True) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Eigenvalues (ascending) and, with ``vectors``, eigenvectors of the symmetric ``G`` (upper
    triangle used; G is overwritten): all of them (``top=None``) or the ``top`` largest.

    Returns ``(w, Z)`` with Z s × m (Fortran order, columns ascending like ``w``), or None when the
    routine is not available. Raises :class:`numpy.linalg.LinAlgError` when LAPACK reports failure.
    """
    if G.dtype not in (np.float32, np.float64) or G.ndim != 2 or G.shape[0] != G.shape[1]:
        return None
    fn = _load()["ssyevr" if G.dtype == np.float32 else "dsyevr"]
    if fn is None:
        return None
    if not G.flags.f_contiguous:
        G = np.asfortranarray(G)
    n = G.shape[0]
    real = _real(G.dtype)
    select = top is not None and top < n
    k = int(top) if select else n
    if n == 0 or k <= 0:
        return np.zeros(0, dtype=G.dtype), (np.zeros((n, 0), dtype=G.dtype, order="F") if vectors else None)
    w = np.zeros(n, dtype=G.dtype)
    Z = np.zeros((n, k) if vectors else (1, 1), dtype=G.dtype, order="F")
    ldz = n if vectors else 1
    isuppz = np.zeros(2 * max(1, n), dtype=np.int32)
    m = _c_int(0)
    info = _c_int(0)
    jobz, rng = _char("V" if vectors else "N"), _char("I" if select else "A")
    il, iu = _c_int(n - k + 1 if select else 1), _c_int(n if select else n)
    vl = vu = real(0.0)
    abstol = real(0.0)

    def call(work: np.ndarray, lwork: int, iwork: np.ndarray, liwork: int) -> None:
        fn(jobz, rng, _char("U"), ctypes.byref(_c_int(n)), _ptr(G), ctypes.byref(_c_int(max(1, n))),
           ctypes.byref(vl), ctypes.byref(vu), ctypes.byref(il), ctypes.byref(iu), ctypes.byref(abstol),
           ctypes.byref(m), _ptr(w), _ptr(Z), ctypes.byref(_c_int(ldz)), _ptr(isuppz),
           _ptr(work), ctypes.byref(_c_int(lwork)), _ptr(iwork), ctypes.byref(_c_int(liwork)), ctypes.byref(info),
           ctypes.c_size_t(1), ctypes.c_size_t(1), ctypes.c_size_t(1))

    qwork = np.zeros(1, dtype=G.dtype)
    qiwork = np.zeros(1, dtype=np.int32)
    call(qwork, -1, qiwork, -1)
    if info.value != 0:
        raise np.linalg.LinAlgError(f"syevr workspace query failed (info {info.value})")
    lwork = max(1, int(qwork[0]) + 1, 26 * n)
    liwork = max(1, int(qiwork[0]), 10 * n)
    call(np.zeros(lwork, dtype=G.dtype), lwork, np.zeros(liwork, dtype=np.int32), liwork)
    if info.value != 0:
        raise np.linalg.LinAlgError(f"syevr failed (info {info.value})")
    got = m.value
    if got != k:
        raise np.linalg.LinAlgError(f"syevr returned {got} eigenvalues, {k} asked")
    return w[:k].copy(), (Z if vectors else None)

"""The ctypes syrk/syevr bindings: same numbers as scipy, and the GIL is released during the call."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from rankwise.core import lapack

scipy_linalg = pytest.importorskip("scipy.linalg")
pytestmark = pytest.mark.skipif(not lapack.available(), reason="scipy's OpenBLAS library was not found as a loadable file")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("order", ["C", "F"])
def test_syrk_matches_scipy(dtype, order):
    rng = np.random.default_rng(0)
    W = np.asarray(rng.standard_normal((37, 91)), dtype=dtype, order=order)
    G = lapack.syrk_upper(W)
    assert G is not None and G.flags.f_contiguous and G.shape == (37, 37)
    want = W.astype(np.float64) @ W.T.astype(np.float64)
    tol = 1e-4 if dtype == np.float32 else 1e-11
    assert np.allclose(np.triu(G), np.triu(want), rtol=tol, atol=tol * np.abs(want).max())


def test_syrk_refuses_strided_input():
    W = np.ones((8, 10), dtype=np.float32)[:, ::2]
    assert lapack.syrk_upper(W) is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("top", [None, 1, 5, 40])
def test_syevr_matches_scipy(dtype, top):
    rng = np.random.default_rng(1)
    A = rng.standard_normal((40, 60))
    G = np.asfortranarray((A @ A.T).astype(dtype))
    w_ref, v_ref = scipy_linalg.eigh(G.astype(np.float64))
    got = lapack.syevr_upper(G.copy(order="F"), top)
    assert got is not None
    w, Z = got
    k = 40 if top is None else top
    assert w.shape == (k,) and Z.shape == (40, k)
    tol = 1e-3 if dtype == np.float32 else 1e-9
    assert np.allclose(w, w_ref[40 - k:], rtol=tol, atol=tol * w_ref[-1])
    cos = np.abs(np.sum(Z.astype(np.float64) * v_ref[:, 40 - k:], axis=0))
    assert cos.min() > 1 - 10 * tol  # the spectrum of a Wishart matrix has no tight clusters here
    values = lapack.syevr_upper(G.copy(order="F"), None, vectors=False)
    assert values is not None and values[1] is None
    assert np.allclose(values[0], w_ref, rtol=tol, atol=tol * w_ref[-1])


def test_syevr_nan_raises_or_flags():
    G = np.asfortranarray(np.full((6, 6), np.nan))
    try:
        got = lapack.syevr_upper(G, 2)
    except np.linalg.LinAlgError:
        return
    assert got is None or not np.isfinite(got[0]).all()


def test_calls_release_the_gil():
    """While one thread is inside syevr, another Python thread keeps running at about the rate it has
    while the first one sleeps. (Through scipy's f2py wrapper it ran at ~25% of that rate: the GIL
    is held during the LAPACK call.)"""
    import time

    rng = np.random.default_rng(2)
    A = rng.standard_normal((700, 900)).astype(np.float32)
    G = np.asfortranarray(A @ A.T)
    lapack.syevr_upper(G.copy(order="F"), 50)  # warm up (library load, page faults)
    ticks = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            ticks[0] += 1

    def rate(work) -> float:
        before, t0 = ticks[0], time.perf_counter()
        work()
        return (ticks[0] - before) / (time.perf_counter() - t0)

    t = threading.Thread(target=spin)
    t.start()
    try:
        ratios = []
        for _ in range(3):
            idle = rate(lambda: time.sleep(0.05))
            work = G.copy(order="F")
            busy = rate(lambda: lapack.syevr_upper(work, 700))
            ratios.append(busy / max(idle, 1.0))
    finally:
        stop.set()
        t.join()
    assert max(ratios) > 0.5, ratios

"""The SVD engine: exactness, the QR trick, factor splitting, verification and the fallback ladder."""

from __future__ import annotations

import math

import pytest
import scipy.linalg  # noqa: F401  (imported at collection: the first test should not pay ~0.5 s)
import torch

import rankwise.core.decompositions as dx
import rankwise.core.runtime as runtime
import rankwise.core.svd as svd
from rw_helpers import RTOL, lowrank
from rankwise.core.errors import MismatchError, NonFiniteError, RankwiseError
from rankwise.core.rank import RankRule, select_rank
from rankwise.core.svd import Decomposition, SvdMethod, decompose, decompose_factored, split_factors

ALL_METHODS = list(SvdMethod)


@pytest.fixture(autouse=True)
def one_thread():
    """2-thread BLAS collapses when the machine is busy (performance notes §0); tests use 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def heavy_tail(m: int, n: int, *, generator: torch.Generator, power: float = 0.5) -> torch.Tensor:
    """σᵢ ∝ i^-power: the spectrum of a full fine-tune delta."""
    p = min(m, n)
    s = (torch.arange(p, dtype=torch.float64) + 1) ** -power
    return lowrank(m, n, p, generator=generator, spectrum=s)


def optimal_error(A: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(A.double())
    return float(torch.sqrt((s[k:] ** 2).sum()))


def reconstruction_error(A: torch.Tensor, dec: Decomposition, k: int) -> float:
    up, down = split_factors(dec, k)
    return float((A.double() - up.double() @ down.double()).norm())


# ------------------------------------------------------------------------------------------
# exactness
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize(
    "shape",
    [(120, 80), (80, 120), (96, 96), (64, 576), (300, 1200), (1152, 288)],
    ids=["tall", "wide", "square", "conv3x3", "conv-large", "tall-large"],
)
def test_planted_rank_recovered_exactly(gen, method, shape):
    m, n = shape
    r = 5
    A = lowrank(m, n, r, generator=gen)
    for k in (r, r + 3):
        dec = decompose(A, k, method=method)
        norm = float(A.double().norm())
        assert reconstruction_error(A, dec, k) <= 2e-5 * norm
        # the identity √(‖A‖² − ΣS²) is a difference of nearly equal energies: √ε₃₂ floor
        assert dec.error(k) <= 1e-3 * norm
        planted = torch.linspace(r, 1, r, dtype=torch.float64)
        torch.testing.assert_close(dec.S[:r].double(), planted, rtol=1e-5, atol=1e-5)
    if method is SvdMethod.FAST and min(shape) >= 256:
        assert dec.method == "krylov"  # the randomized path itself ran (not the EXACT shortcut)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(40, 40), (60, 25), (25, 60), (200, 90), (90, 260)])
@pytest.mark.parametrize("k", [1, 5, 12])
def test_exact_matches_torch_svd(gen, dtype, shape, k):
    A32 = torch.randn(*shape, generator=gen)
    A = A32.to(dtype)
    dec = decompose(A, k)
    upcast = A.float()
    s = torch.linalg.svdvals(upcast.double())
    # against the SVD of the (upcast) input itself: fp32 round-off
    assert float((dec.S.double() - s[:k]).abs().max()) <= 1e-5 * float(s[0])
    opt = float(torch.sqrt((s[k:] ** 2).sum()))
    assert dec.error(k) == pytest.approx(opt, rel=1e-5)
    assert reconstruction_error(upcast, dec, k) == pytest.approx(opt, rel=1e-5)
    assert dec.optimal_error(k) == pytest.approx(opt, rel=1e-5)
    # against the fp32 original: the cast's own error, per dtype
    s0 = torch.linalg.svdvals(A32.double())
    assert float((dec.S.double() - s0[:k]).abs().max()) <= RTOL[dtype] * float(s0[0]) * 4
    # contract: orthonormal U, descending S, fp32, shapes
    assert dec.U.dtype == dec.S.dtype == dec.Vh.dtype == torch.float32
    assert dec.U.shape == (shape[0], k) and dec.Vh.shape == (k, shape[1])
    torch.testing.assert_close(dec.U.mT @ dec.U, torch.eye(k), atol=1e-5, rtol=0)
    assert bool((dec.S[:-1] >= dec.S[1:]).all())
    assert dec.notes == ()


@pytest.mark.parametrize("shape", [(400, 400), (256, 1024), (1024, 256)])
def test_exact_excess_on_heavy_tail_is_negligible(gen, shape):
    A = heavy_tail(*shape, generator=gen)
    k = 32
    dec = decompose(A, k)
    assert dec.method == "gram-eigh"
    opt = optimal_error(A, k)
    assert reconstruction_error(A, dec, k) / opt - 1 <= 1e-6
    assert abs(dec.error(k) / opt - 1) <= 1e-6


def test_reference_method_matches(gen):
    A = torch.randn(70, 50, generator=gen)
    dec = decompose(A, 10, method=SvdMethod.REFERENCE)
    assert dec.method == "reference"
    assert dec.spectrum.complete  # the full SVD gives every value for free
    s = torch.linalg.svdvals(A.double())
    torch.testing.assert_close(dec.spectrum.values, s, rtol=0, atol=1e-5 * float(s[0]))
    assert dec.error(10) == pytest.approx(float(torch.sqrt((s[10:] ** 2).sum())), rel=1e-5)


@pytest.mark.parametrize("shape", [(300, 90), (90, 300), (64, 64)])
@pytest.mark.parametrize("method", [SvdMethod.EXACT, SvdMethod.FAST])
def test_full_spectrum_matches_svdvals(gen, shape, method):
    A = lowrank(*shape, 20, generator=gen) + 1e-3 * torch.randn(*shape, generator=gen)
    dec = decompose(A, 8, method=method, full_spectrum=True)
    p = min(shape)
    s = torch.linalg.svdvals(A.double())
    assert dec.spectrum.known == p and dec.spectrum.complete
    torch.testing.assert_close(dec.spectrum.values, s, rtol=0, atol=2e-6 * float(s[0]))
    assert dec.spectrum.values.dtype == torch.float64
    # the nuclear norm (what sv_cumulative needs) to fp32 round-off
    assert float(dec.spectrum.values.sum()) == pytest.approx(float(s.sum()), rel=1e-6)
    assert bool((dec.spectrum.values[:-1] >= dec.spectrum.values[1:]).all())


def test_fro2_is_exact_sum_of_squares(gen):
    A = torch.randn(33, 77, generator=gen) * 1e3
    dec = decompose(A, 4)
    assert dec.spectrum.fro2 == pytest.approx(float((A.double() ** 2).sum()), rel=1e-14)
    assert dec.spectrum.full_rank == 33


def test_k_is_clamped_and_empty_matrix():
    A = torch.randn(6, 9)
    assert decompose(A, 50).rank == 6
    assert decompose(A, 0).rank == 1
    empty = decompose(torch.zeros(0, 5), 3)
    assert empty.rank == 0 and empty.U.shape == (0, 0) and empty.Vh.shape == (0, 5)
    assert empty.error(3) == 0.0


def test_zero_matrix_gives_zero_values_not_failure():
    dec = decompose(torch.zeros(50, 40), 5)
    assert float(dec.S.abs().max()) == 0.0 and dec.error(5) == 0.0
    torch.testing.assert_close(dec.U.mT @ dec.U, torch.eye(5), atol=1e-5, rtol=0)


def test_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        decompose(torch.randn(4, 4, 3, 3), 2)


# ------------------------------------------------------------------------------------------
# FAST: accuracy, verification, determinism
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["heavy", "planted+noise"])
def test_fast_is_accurate_and_its_estimate_is_conservative(gen, kind):
    m, n, k = 512, 1024, 16
    if kind == "heavy":
        A = heavy_tail(m, n, generator=gen)
    else:
        signal = lowrank(m, n, 24, generator=gen, spectrum=torch.linspace(1, 0.05, 24))
        noise = torch.randn(m, n, generator=gen)
        A = signal + noise * (0.5 * float(signal.norm()) / float(noise.norm()))
    dec = decompose(A, k, method=SvdMethod.FAST)
    assert dec.method == "krylov" and dec.notes == ()
    opt = optimal_error(A, k)
    err = reconstruction_error(A, dec, k)
    assert err == pytest.approx(dec.error(k), rel=1e-5)  # projection identity
    assert err / opt - 1 <= 0.01
    # the verified estimate never claims a better optimum than the truth, and is in range
    assert opt * (1 + 1e-4) >= dec.optimal_error(k) >= err / 1.01
    assert dec.energy_gap is not None and dec.energy_gap.numel() == k


@pytest.mark.parametrize("form", [True, False], ids=["gram-formed", "gram-applied"])
def test_fast_both_gram_operators_agree(gen, monkeypatch, form):
    monkeypatch.setattr(dx, "form_gram", lambda *args: form)
    A = heavy_tail(300, 900, generator=gen)
    dec = decompose(A, 12, method=SvdMethod.FAST)
    assert dec.method == "krylov"
    opt = optimal_error(A, 12)
    assert reconstruction_error(A, dec, 12) == pytest.approx(dec.error(12), rel=1e-5)
    assert dec.error(12) / opt - 1 <= 0.01
    torch.testing.assert_close(dec.U.mT @ dec.U, torch.eye(12), atol=1e-5, rtol=0)


def test_fast_is_deterministic_per_seed(gen):
    A = heavy_tail(300, 700, generator=gen)
    a = decompose(A, 8, method=SvdMethod.FAST, seed=7)
    b = decompose(A, 8, method=SvdMethod.FAST, seed=7)
    c = decompose(A, 8, method=SvdMethod.FAST, seed=8)
    assert a.method == "krylov"
    for x, y in ((a.U, b.U), (a.S, b.S), (a.Vh, b.Vh)):
        assert torch.equal(x, y)
    assert not torch.equal(a.U, c.U)
    assert c.error(8) == pytest.approx(a.error(8), rel=1e-3)


def test_fast_falls_back_to_exact_when_the_check_fails(gen, monkeypatch):
    A = heavy_tail(300, 700, generator=gen)
    monkeypatch.setattr(svd, "FAST_TOLERANCE", -1.0)
    dec = decompose(A, 8, method=SvdMethod.FAST)
    assert dec.method == "gram-eigh"
    assert any(note.startswith("fast→exact: estimated excess") for note in dec.notes)
    assert dec.error(8) == pytest.approx(optimal_error(A, 8), rel=1e-6)


def test_fast_on_small_matrices_runs_exact(gen):
    A = torch.randn(100, 300, generator=gen)
    dec = decompose(A, 10, method=SvdMethod.FAST)
    assert dec.method == "gram-eigh" and dec.notes == ()


# ------------------------------------------------------------------------------------------
# the QR trick and split_factors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "m,n,r",
    [(200, 150, 8), (150, 300, 16), (64, 576, 32), (90, 60, 60), (60, 90, 100), (40, 40, 40)],
    ids=["tall", "wide", "conv", "R=min", "R>min", "square-R=min"],
)
def test_factored_equals_dense_svd(gen, m, n, r):
    up = torch.randn(m, r, generator=gen)
    down = torch.randn(r, n, generator=gen)
    dense = up.double() @ down.double()
    s = torch.linalg.svdvals(dense)
    dec = decompose_factored(up, down)
    p = min(m, n)
    assert dec.method == ("qr-factored" if r < p else "thin-svd")
    assert dec.spectrum.complete and dec.spectrum.known == p and dec.spectrum.full_rank == p
    torch.testing.assert_close(dec.spectrum.values, s, rtol=0, atol=1e-5 * float(s[0]))
    if r < p:
        assert bool((dec.spectrum.values[r:] == 0).all())  # exact zeros beyond the rank
    assert dec.spectrum.fro2 == pytest.approx(float((dense**2).sum()), rel=1e-6)
    norm = float(dense.norm())
    for k in (1, min(r, p) // 2, min(r, p)):
        opt = float(torch.sqrt((s[k:] ** 2).sum()))
        assert dec.error(k) == pytest.approx(opt, rel=1e-4, abs=1e-3 * norm)  # √ε floor of the identity
        assert reconstruction_error(dense, dec, k) == pytest.approx(opt, rel=1e-4, abs=1e-5 * norm)


def test_factored_truncates_to_k_but_keeps_the_spectrum(gen):
    up, down = torch.randn(100, 12, generator=gen), torch.randn(12, 80, generator=gen)
    dec = decompose_factored(up, down, k=4)
    assert dec.rank == 4 and dec.U.shape == (100, 4) and dec.Vh.shape == (4, 80)
    assert dec.spectrum.known == 80 and dec.spectrum.complete
    choice = select_rank(dec.spectrum, RankRule.parse("sv_cumulative:0.5"))
    assert choice.certain


def test_factored_accepts_half_precision_and_rejects_mismatch(gen):
    up, down = torch.randn(50, 6, generator=gen), torch.randn(6, 40, generator=gen)
    dec = decompose_factored(up.half(), down.bfloat16())
    ref = decompose_factored(up.half().float(), down.bfloat16().float())
    torch.testing.assert_close(dec.S, ref.S)
    with pytest.raises(MismatchError, match="disagree on the rank"):
        decompose_factored(up, torch.randn(5, 40))
    with pytest.raises(ValueError, match="2-D"):
        decompose_factored(up.reshape(50, 6, 1, 1), down)


def test_factored_zero_rank_is_empty():
    dec = decompose_factored(torch.zeros(10, 0), torch.zeros(0, 7))
    assert dec.rank == 0 and dec.spectrum.fro2 == 0.0 and dec.spectrum.complete


@pytest.mark.parametrize("source", ["decompose", "factored"])
def test_split_factors_reconstruct_and_own_their_storage(gen, source):
    A = lowrank(60, 90, 10, generator=gen)
    if source == "decompose":
        dec = decompose(A, 10)
    else:
        dec = decompose_factored(torch.randn(60, 10, generator=gen), torch.randn(10, 90, generator=gen))
        A = None
    k = 6
    up, down = split_factors(dec, k)
    assert up.shape == (60, k) and down.shape == (k, 90)
    assert up.is_contiguous() and down.is_contiguous()
    storages = {t.untyped_storage().data_ptr() for t in (dec.U, dec.S, dec.Vh)}
    assert up.untyped_storage().data_ptr() not in storages
    assert down.untyped_storage().data_ptr() not in storages
    torch.testing.assert_close(up @ down, (dec.U[:, :k] * dec.S[:k]) @ dec.Vh[:k])
    torch.testing.assert_close(up.norm(dim=0), dec.S[:k])  # singular values live on `up`
    if A is not None:
        assert reconstruction_error(A, dec, k) == pytest.approx(dec.error(k), rel=1e-4)


def test_split_factors_beyond_the_held_rank(gen):
    fac = decompose_factored(torch.randn(30, 4, generator=gen), torch.randn(4, 20, generator=gen))
    up, down = split_factors(fac, 9)  # the extra values are known zeros: zero columns
    assert up.shape == (30, 9) and float(up[:, 4:].abs().max()) == 0.0
    dense = decompose(torch.randn(30, 20, generator=gen), 4)
    with pytest.raises(ValueError, match="holds 4 singular triplets"):
        split_factors(dense, 9)
    with pytest.raises(ValueError, match="≥ 0"):
        split_factors(dense, -1)


# ------------------------------------------------------------------------------------------
# non-finite input, fallback ladder
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_non_finite_input_raises(bad, method):
    A = torch.randn(20, 30)
    A[3, 4] = bad
    with pytest.raises(NonFiniteError, match="NaN" if math.isnan(bad) else "Inf"):
        decompose(A, 4, method=method)


@pytest.mark.parametrize("which", ["up", "down"])
def test_non_finite_factors_raise(which):
    up, down = torch.randn(20, 4), torch.randn(4, 30)
    (up if which == "up" else down)[1, 1] = math.inf
    with pytest.raises(NonFiniteError, match=f"{which}: 0 NaN and 1") as info:
        decompose_factored(up, down)
    assert info.value.names == (which,)


def test_fp16_overflow_is_caught_after_upcast():
    A = torch.full((8, 8), 60000.0, dtype=torch.float16) * 2  # overflows to +Inf in fp16
    with pytest.raises(NonFiniteError):
        decompose(A, 2)


def test_primary_failure_takes_the_fallback_and_says_so(gen, monkeypatch):
    A = torch.randn(120, 300, generator=gen)
    original = dx.gram_eigh

    def flaky(W, k, full, driver="evr"):
        if driver == "evr":
            raise torch.linalg.LinAlgError("induced: the algorithm failed to converge")
        return original(W, k, full, driver=driver)

    monkeypatch.setattr(dx, "gram_eigh", flaky)
    dec = decompose(A, 10)
    assert dec.notes == ("eigh driver evd (gram-eigh: LinAlgError)",)
    assert dec.error(10) == pytest.approx(optimal_error(A, 10), rel=1e-5)


def test_ladder_reaches_float64_thin_svd(gen, monkeypatch):
    A = torch.randn(120, 300, generator=gen)

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("induced")

    monkeypatch.setattr(dx, "gram_eigh", broken)
    dec = decompose(A, 10)
    assert [note.split(" (")[0] for note in dec.notes] == ["eigh driver evd", "float64", "thin-svd float64, rescaled"]
    assert dec.error(10) == pytest.approx(optimal_error(A, 10), rel=1e-5)


def test_non_finite_output_is_a_failure_not_a_result(gen, monkeypatch):
    A = torch.randn(80, 200, generator=gen)
    original = dx.gram_eigh

    def nan_values(W, k, full, driver="evr"):
        res = original(W, k, full, driver=driver)
        return res._replace(S=torch.full_like(res.S, math.nan)) if driver == "evr" else res

    monkeypatch.setattr(dx, "gram_eigh", nan_values)
    dec = decompose(A, 5)
    assert dec.notes and dec.notes[0].startswith("eigh driver evd")
    assert bool(torch.isfinite(dec.S).all())


def test_silent_zeros_are_rejected(gen, monkeypatch):
    A = torch.randn(80, 200, generator=gen)
    original = dx.gram_eigh

    def zeros(W, k, full, driver="evr"):
        res = original(W, k, full, driver=driver)
        return res._replace(S=torch.zeros_like(res.S)) if driver == "evr" else res

    monkeypatch.setattr(dx, "gram_eigh", zeros)
    dec = decompose(A, 5)
    assert dec.notes and float(dec.S[0]) > 0


def test_every_fallback_failing_raises(gen, monkeypatch):
    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("induced")

    monkeypatch.setattr(dx, "gram_eigh", broken)
    monkeypatch.setattr(dx, "thin_svd_rescaled", broken)
    with pytest.raises(RankwiseError, match="failed on every fallback"):
        decompose(torch.randn(60, 90, generator=gen), 4)


def test_fast_failure_falls_back_to_exact(gen, monkeypatch):
    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("induced")

    monkeypatch.setattr(dx, "block_krylov", broken)
    A = heavy_tail(300, 700, generator=gen)
    dec = decompose(A, 8, method=SvdMethod.FAST)
    assert dec.method == "gram-eigh"
    assert dec.notes == ("gram-eigh (krylov: LinAlgError)",)


def test_factored_fallback_to_float64(gen, monkeypatch):
    original = dx.qr_factored

    def fp32_fails(up, down, k=None):
        if up.dtype == torch.float32:
            raise torch.linalg.LinAlgError("induced")
        return original(up, down, k)

    monkeypatch.setattr(dx, "qr_factored", fp32_fails)
    dec = decompose_factored(torch.randn(50, 5, generator=gen), torch.randn(5, 40, generator=gen))
    assert dec.notes == ("float64 (qr-factored: LinAlgError)",) and dec.S.dtype == torch.float32


def test_out_of_memory_retries_on_cpu(gen, monkeypatch):
    original = svd._decompose_on

    def oom_off_cpu(A, k, method, full, dev, *rest):
        if dev.type != "cpu":
            raise torch.OutOfMemoryError("induced")
        return original(A, k, method, full, dev, *rest)

    monkeypatch.setattr(svd, "_decompose_on", oom_off_cpu)
    dec = decompose(torch.randn(40, 50, generator=gen), 3, device="meta")
    assert dec.notes == ("cpu (meta out of memory)",)
    assert dec.U.device.type == "cpu"


def test_torch_only_path_without_scipy(gen, monkeypatch):
    monkeypatch.setattr(runtime, "scipy_linalg", lambda: None)
    A = heavy_tail(300, 700, generator=gen)
    exact = decompose(A, 8, full_spectrum=True)
    fast = decompose(A, 8, method=SvdMethod.FAST)
    assert exact.method == "gram-eigh" and fast.method == "krylov"
    opt = optimal_error(A, 8)
    assert exact.error(8) == pytest.approx(opt, rel=1e-6)
    assert fast.error(8) / opt - 1 <= 0.01
    s = torch.linalg.svdvals(A.double())
    torch.testing.assert_close(exact.spectrum.values, s, rtol=0, atol=2e-6 * float(s[0]))


def test_requires_grad_input_is_fine(gen):
    A = torch.randn(30, 40, generator=gen, requires_grad=True)
    dec = decompose(A, 3)
    assert not dec.U.requires_grad


def test_set_threads():
    before = torch.get_num_threads()
    try:
        svd.set_threads(1)
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="≥ 1"):
            svd.set_threads(0)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("m, n, r, k", [(60, 70, 20, 5), (200, 40, 30, 8), (30, 300, 12, 12), (64, 64, 16, 1)])
def test_factored_with_k_matches_full(gen, m, n, r, k):
    """With k < R only the kept columns of Q are formed (geqrf + ormqr); same triplets as without k."""
    up, down = torch.randn(m, r, generator=gen), torch.randn(r, n, generator=gen)
    full, part = decompose_factored(up, down), decompose_factored(up, down, k=k)
    assert part.U.shape == (m, k) and part.Vh.shape == (k, n)
    torch.testing.assert_close(part.S, full.S[:k])
    torch.testing.assert_close((part.U * part.S) @ part.Vh, (full.U[:, :k] * full.S[:k]) @ full.Vh[:k],
                               rtol=1e-4, atol=1e-4 * float(full.S[0]))
    torch.testing.assert_close(part.U.mT @ part.U, torch.eye(k), atol=1e-5, rtol=0)
    assert part.spectrum.complete and torch.equal(part.spectrum.values, full.spectrum.values)


def _householder(up, down, k):
    """The Householder path of the QR trick alone (the Cholesky-QR fast path switched off)."""
    r = up.shape[1]
    Qu, Ru = torch.linalg.qr(up.double())
    Qd, Rd = torch.linalg.qr(down.double().mT)
    Uc, S, Vch = torch.linalg.svd(Ru @ Rd.mT)
    return (Qu @ Uc)[:, :k], S[:min(k, r)], (Vch @ Qd.mT)[:k]


@pytest.mark.parametrize("m, n, scales", [(300, 200, (1.0, 1.0, 1.0, 1.0)), (200, 500, (1e-2, 1.0, 30.0, 3.0)),
                                           (150, 150, (1.0, 0.5, 0.25, 0.125))])
def test_cholesky_qr_matches_householder(gen, m, n, scales):
    """Stacked factors of four LoRAs (very different scales): the Cholesky-QR path runs, its factors
    are orthonormal, its values and rank-k truncation match an fp64 Householder QR trick."""
    k = 16
    ups = [torch.randn(m, 24, generator=gen) * s for s in scales]
    downs = [torch.randn(24, n, generator=gen) for _ in scales]
    up, down = torch.cat(ups, 1), torch.cat(downs, 0)
    fast = dx.cholesky_qr_kept(up, down, k)
    assert fast is not None
    U, S, Vh = _householder(up, down, k)
    torch.testing.assert_close(fast.S.double()[:k], S, rtol=1e-5, atol=1e-6 * float(S[0]))
    torch.testing.assert_close(fast.U.mT @ fast.U, torch.eye(k), atol=dx.CHOLQR_ORTH_TOL, rtol=0)
    torch.testing.assert_close(fast.Vh @ fast.Vh.mT, torch.eye(k), atol=dx.CHOLQR_ORTH_TOL, rtol=0)
    A = up.double() @ down.double()
    opt = float((A - (U * S) @ Vh).norm())
    got = float((A - (fast.U.double() * fast.S[:k].double()) @ fast.Vh.double()).norm())
    assert got <= opt * (1 + 1e-6)
    assert math.isclose(fast.fro2, float((A ** 2).sum()), rel_tol=1e-5)


def test_cholesky_qr_declines_dependent_factors(gen):
    """The same LoRA stacked twice (a rank-deficient Gram): the fast path declines, the Householder
    path gives the exact result, and the product's spectrum is right."""
    up1, down1 = torch.randn(120, 10, generator=gen), torch.randn(10, 90, generator=gen)
    up, down = torch.cat([up1, up1], 1), torch.cat([down1, down1], 0)
    assert dx.cholesky_qr_kept(up, down, 5) is None
    dec = decompose_factored(up, down, k=5)
    ref = torch.linalg.svdvals(up.double() @ down.double())
    torch.testing.assert_close(dec.S.double(), ref[:5], rtol=1e-5, atol=1e-5 * float(ref[0]))
    assert dec.notes == ()


@pytest.mark.parametrize("R,k", [(512, 128), (400, 64), (256, 64), (512, 300)])
def test_core_svd_matches_a_full_svd(R, k):
    """The QR trick's core: leading k triplets at the Eckart–Young optimum, every value close."""
    from rankwise.core.decompositions import core_svd

    g = torch.Generator().manual_seed(R + k)
    core = torch.randn(R, R, generator=g) @ torch.diag(torch.logspace(0, -3, R)) @ torch.randn(R, R, generator=g)
    U, S, Vh = core_svd(core, k)
    ref = torch.linalg.svdvals(core.double())
    assert S.shape == (R,)
    assert float((S.double() - ref).abs().max()) <= 1e-5 * float(ref[0])
    approx = U[:, :k].double() @ torch.diag(S[:k].double()) @ Vh[:k].double()
    err = float((core.double() - approx).norm())
    opt = float(ref[k:].square().sum().sqrt())
    assert err <= opt * (1 + 1e-6)
    assert bool((S[:-1] >= S[1:]).all())

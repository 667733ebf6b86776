"""The SVD engine: top-k singular triplets of one layer's matrix, fast and with a fallback ladder.

Methods (:class:`SvdMethod`)
----------------------------
``EXACT``
    Work on the *wide* orientation ``W`` (s × L, s = min(m, n) the short side; a tall matrix is
    transposed, which is free). Form the Gram matrix ``G = W·Wᵀ`` (s × s) with one BLAS ``syrk``
    (half the flops of a GEMM), take its top-k eigenvectors ``U₀`` with a *partial* symmetric
    eigensolver (LAPACK ``syevr`` with an index range through ``scipy.linalg.eigh``; on GPU a full
    ``torch.linalg.eigh``), then finish with a Rayleigh–Ritz step on ``W`` itself: ``B = U₀ᵀ·W``
    (k × L) and the thin SVD of the tall ``Bᵀ = P·Σ·Rᵀ`` give ``U = U₀·R``, ``S = Σ``, ``Vh = Pᵀ``.
    The singular values therefore come from ``W`` (fp32 round-off relative to σ₁), not from the
    squared Gram eigenvalues; the Gram matrix only chooses the subspace, and subspace errors enter
    the truncation error quadratically (measured excess over Eckart–Young ≤ 1e-8 on heavy-tailed
    spectra). When ``2k > s`` (or the matrix is tiny) a thin SVD of the tall orientation runs
    instead (``"thin-svd"``); ``full_matrices=True`` is never used.
``FAST``
    Block Krylov (block Lanczos with full re-orthogonalisation) on the same Gram operator, started
    from a seeded Gaussian block: basis ``K = [Q₀, G·Q₀, G²·Q₀, …]`` of max(2.5·k, k + 40) columns
    in blocks of ≈ k/2 (16…64 columns), then a Rayleigh–Ritz step on ``G`` (eigh of the small
    ``KᵀGK``). ``G`` is formed (syrk + symm) or applied as ``W·(Wᵀ·X)``, whichever a flop model
    says is cheaper (applying wins for squarish layers and small k). The Ritz vectors ``U`` make
    the rows of ``B = Uᵀ·W`` nearly orthogonal, so ``S`` = their norms and ``Vh`` = the normalised
    rows (no SVD of ``B``); the projection identity below holds exactly all the same. Each block
    costs one thin multiply instead of a tridiagonalisation of ``G``. Where the basis would exceed
    a quarter of the short side (or s < 256), EXACT runs: its partial eigh is as cheap there.
    Measured excess over Eckart–Young at k = 128: ≤ 0.07% (heavy tail), ≤ 0.3% (rank-64 + noise).

    **Verification** (every layer). The residuals of the top-k Ritz pairs of ``G``,
    ``rᵢ = ‖G·xᵢ − θᵢ·xᵢ‖`` (less the fp32 round-off level of ``G·x``), come from products already
    formed. Each Ritz value is within ``min(rᵢ, rᵢ²/gapᵢ)`` of an eigenvalue (Kato–Temple), with
    ``gapᵢ = θᵢ − θ_{k+1}`` standing in for the distance to the unresolved spectrum, so
    ``E = Σ_{i≤k} min(rᵢ, rᵢ²/gapᵢ)`` estimates the energy Σ_{i≤k}(σᵢ² − Sᵢ²) the subspace misses
    (measured 1.5–10× above the truth on heavy-tail, power-law, exponential, flat and
    planted-rank spectra, never below). The achieved error is known exactly,
    ``err² = ‖A‖_F² − Σ_{i≤k} Sᵢ²``, so the estimated excess is ``√(err² / (err² − E)) − 1``. A
    layer whose estimate exceeds :data:`FAST_TOLERANCE` (1%) is recomputed with EXACT and the note
    ``"fast→exact: estimated excess 2.3%"`` is recorded. ``Decomposition.optimal_error`` of a FAST
    result is ``√(err² − E)``: the verified estimate.
``REFERENCE``
    ``torch.linalg.svd(A, full_matrices=True)`` in fp32, as kohya, LyCORIS and ComfyUI do; for
    benchmarks and tests.

The truncation error (:meth:`Decomposition.error`)
---------------------------------------------------
Every method here returns ``U`` with orthonormal columns and ``diag(S)·Vh = Uᵀ·A`` with unit-norm
rows of ``Vh`` (for EXACT, thin-svd, reference and the QR trick ``(S, Vh)`` is moreover the exact
SVD of ``Uᵀ·A``, so ``Vh`` has orthonormal rows). Then ``U_k·S_k·Vh_k = U_k·U_kᵀ·A`` is an
orthogonal projection of ``A`` and, for every k ≤ q,

    ‖A − U_k S_k Vh_k‖_F² = ‖A‖_F² − ‖U_kᵀA‖_F² = ‖A‖_F² − Σ_{i≤k} Sᵢ²

exactly (the projection identity; with exact singular vectors it is Eckart–Young). ``‖A‖_F²`` is
the sum of squares of the entries, accumulated in fp64. Being a difference of two energies known
to fp32 round-off, the formula's absolute accuracy is about √ε₃₂·‖A‖_F ≈ 3e-4·‖A‖_F: fine for
reports and rank rules, too coarse to tell a 1e-6 residual from zero (measure that directly).

Robustness
----------
Inputs are upcast to fp32; NaN/Inf raise :class:`~.errors.NonFiniteError` (the caller names the
layer). When the primary routine raises (``LinAlgError``, a solver error) or returns non-finite
or inconsistent values, the ladder tries, in order: the other driver (CPU: eigh ``evd``; CUDA:
thin SVD with ``gesvd``) → the CPU (from CUDA) → float64 → an fp64 thin SVD of the tall
orientation after rescaling by the max-abs entry. Each step taken is listed in
``Decomposition.notes``; if all fail an error is raised — never silent zeros. CUDA out-of-memory
retries on the CPU (noted). Results come back on the device the input came from; ``device`` only
says where to compute.
"""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import torch

from .errors import MismatchError, NonFiniteError, RankwiseError
from .rank import Spectrum

Tensor = torch.Tensor

#: FAST: a layer whose estimated excess error over Eckart–Young exceeds this is redone with EXACT.
FAST_TOLERANCE = 0.01

_EPS32 = float(torch.finfo(torch.float32).eps)
# Estimated excess energy below this fraction of ‖A‖_F² counts as zero (fp32 round-off level:
# an error of ~1e-5·‖A‖_F).
_ENERGY_FLOOR = 1e-10
_FRO_CHUNK = 1 << 16


class SvdMethod(str, enum.Enum):
    """How :func:`decompose` computes the top-k singular triplets (module docstring)."""

    EXACT = "exact"
    FAST = "fast"
    REFERENCE = "reference"


@dataclass(frozen=True, eq=False)
class Decomposition:
    """Top-q singular triplets of a matrix A (m × n): ``A ≈ U·diag(S)·Vh``.

    ``U`` (m × q) has orthonormal columns, ``S`` (q) is descending, ``Vh`` (q × n); all fp32 on
    the input's device. ``spectrum`` holds at least these q values (fp64, CPU), all p = min(m, n)
    of them when a complete spectrum was asked for or came for free, plus the exact ``‖A‖_F²``.
    ``method`` names what ran; ``notes`` lists the fallbacks taken (empty when none).
    ``energy_gap`` (FAST only): for each k ≤ q, the verified estimate of Σ_{i≤k}(σᵢ² − Sᵢ²).
    """

    U: Tensor
    S: Tensor
    Vh: Tensor
    spectrum: Spectrum
    method: str
    notes: tuple[str, ...] = ()
    energy_gap: Tensor | None = field(default=None, repr=False)

    @property
    def fallback(self) -> str | None:
        """The fallback-ladder rung(s) taken, ``"; "``-joined, or None when the primary routine ran."""
        return "; ".join(self.notes) if self.notes else None

    @property
    def rank(self) -> int:
        """q, the number of triplets held."""
        return int(self.S.numel())

    def _captured(self, k: int) -> float:
        k = max(0, min(int(k), self.rank))
        return float((self.S[:k].detach().double().cpu() ** 2).sum())

    def error(self, k: int) -> float:
        """‖A − U_k·S_k·Vh_k‖_F, exactly, by the projection identity (module docstring).

        Holds for every method here because ``U`` is orthonormal and ``diag(S)·Vh = Uᵀ·A`` with
        unit-norm rows. k ≥ q gives the error of ``U·S·Vh`` itself. Absolute accuracy ≈
        √ε₃₂·‖A‖_F (a difference of two energies; module docstring).
        """
        return math.sqrt(max(self.spectrum.fro2 - self._captured(k), 0.0))

    def optimal_error(self, k: int) -> float:
        """The Eckart–Young optimum √(‖A‖_F² − Σ_{i≤k} σᵢ²) from the best known σ.

        Exact methods: the same as :meth:`error`. FAST: the verified estimate (``energy_gap``
        subtracted). For k beyond the known values: an upper bound (the unknown σ count as 0).
        """
        if self.energy_gap is None or self.energy_gap.numel() == 0 or k <= 0:
            return self.spectrum.optimal_error(max(int(k), 0))
        kk = min(int(k), int(self.energy_gap.numel()))
        gap = float(self.energy_gap[kk - 1])
        err2 = max(self.spectrum.fro2 - self._captured(k), 0.0)
        return math.sqrt(max(err2 - gap, 0.0))


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def decompose_factored(up: Tensor, down: Tensor, *, k: int | None = None) -> Decomposition:
    """SVD of ``up @ down`` (up m × R, down R × n; no scale) without forming the m × n product.

    QR trick: ``up = Qu·Ru``, ``downᵀ = Qd·Rd``, SVD of the R × R core ``Ru·Rdᵀ = Uc·Σ·Vcᵀ``, then
    ``U = Qu·Uc``, ``Vh = Vcᵀ·Qdᵀ``; cost O((m + n)·R²). The spectrum is complete and exact: the R
    values of the core, padded with exact zeros up to p = min(m, n) (the product has rank ≤ R), and
    ``fro2`` comes from the core (‖up·down‖_F = ‖Ru·Rdᵀ‖_F). When R ≥ min(m, n) the dense product is
    formed and a thin SVD of its tall orientation runs instead (cheaper there). ``k`` keeps only
    the leading k triplets (the spectrum stays complete). Computed in fp32 on ``up``'s device.
    """
    if up.dim() != 2 or down.dim() != 2:
        raise ValueError(
            f"decompose_factored needs 2-D factors, got up {tuple(up.shape)} and down {tuple(down.shape)}"
        )
    if up.shape[1] != down.shape[0]:
        raise MismatchError(
            f"up {tuple(up.shape)} and down {tuple(down.shape)} disagree on the rank "
            f"({up.shape[1]} vs {down.shape[0]})"
        )
    m, r = int(up.shape[0]), int(up.shape[1])
    n = int(down.shape[1])
    p = min(m, n)
    out_device = up.device
    with torch.no_grad():
        up32 = up.detach().to(torch.float32)
        down32 = down.detach().to(device=up32.device, dtype=torch.float32)
        fro_up, fro_down = sum_squares(up32), sum_squares(down32)
        if not (math.isfinite(fro_up) and math.isfinite(fro_down)):
            bad = {name: t for name, t in (("up", up32), ("down", down32)) if not _all_finite(t)}
            detail = "; ".join(f"{name}: {_nonfinite_counts(t)}" for name, t in bad.items())
            raise NonFiniteError(
                f"LoRA factor(s) contain non-finite values ({detail}); the source file is damaged "
                "or was saved after an overflow — re-export it or skip this layer",
                names=tuple(bad),
            )
        if r == 0 or p == 0:
            return _empty(m, n, p, out_device, method="qr-factored")
        if r >= p:
            dense = up32 @ down32
            dense_fro2 = sum_squares(dense)
            q = p if k is None else max(1, min(int(k), p))
            tall = m > n
            res, notes = _ladder(dense.mT if tall else dense, q, [("thin-svd", _thin_svd)], full=True, fro2=dense_fro2)
            return _assemble(res, tall, dense_fro2, p, out_device, notes)
        kept = None if k is None else max(1, min(int(k), r))
        res, notes = _factored_ladder(up32, down32, kept)
        q = res.S.numel() if k is None else max(1, min(int(k), res.S.numel(), res.U.shape[1]))
        core_fro2 = res.fro2 if res.fro2 is not None else float((res.S.double() ** 2).sum())
        values = torch.zeros(p, dtype=torch.float64)
        values[: res.S.numel()] = res.S.detach().double().cpu()
        spectrum = Spectrum(values=values, fro2=core_fro2, full_rank=p)
        return Decomposition(
            U=_fresh(res.U[:, :q], out_device),
            S=_fresh(res.S[:q], out_device),
            Vh=_fresh(res.Vh[:q], out_device),
            spectrum=spectrum,
            method=res.method,
            notes=tuple(notes),
        )


def split_factors(dec: Decomposition, k: int) -> tuple[Tensor, Tensor]:
    """LoRA factors of the rank-k truncation: ``up = U_k·diag(S_k)`` (m × k), ``down = Vh_k`` (k × n).

    Singular values go onto ``up`` (the kohya / LyCORIS / ComfyUI convention). Both are fresh,
    contiguous fp32 tensors that share no storage with ``dec`` (safetensors refuses shared
    storage). k beyond the q held triplets is allowed only where the spectrum says the extra
    singular values are exactly zero (a factored decomposition); those columns are zeros.
    """
    k = int(k)
    q = dec.rank
    if k < 0:
        raise ValueError(f"rank must be ≥ 0, got {k}")
    if k <= q:
        up = dec.U[:, :k] * dec.S[:k]
        down = dec.Vh[:k].clone(memory_format=torch.contiguous_format)
        return up.contiguous(), down
    sp = dec.spectrum
    known_zero = sp.complete and k <= sp.known and bool((sp.values[q:k] == 0).all())
    if not known_zero:
        raise ValueError(
            f"the decomposition holds {q} singular triplets; rank {k} needs decompose(..., k={k})"
        )
    m, n = dec.U.shape[0], dec.Vh.shape[1]
    up = torch.zeros(m, k, dtype=dec.U.dtype, device=dec.U.device)
    down = torch.zeros(k, n, dtype=dec.Vh.dtype, device=dec.Vh.device)
    up[:, :q] = dec.U * dec.S
    down[:q] = dec.Vh
    return up, down


def decompose(
    A: Tensor,
    k: int,
    *,
    method: SvdMethod = SvdMethod.EXACT,
    full_spectrum: bool = False,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> Decomposition:
    """Top-k singular triplets of the 2-D matrix ``A`` (k is clamped to [1, min(m, n)]).

    ``full_spectrum=True`` also returns all p = min(m, n) singular values in ``spectrum.values``
    (the top k from the Rayleigh–Ritz step, the rest from an fp64 Gram matrix, accurate to about
    1e-8·σ₁) — what ``sv_cumulative`` needs when the partial certificate is inconclusive.
    ``device`` says where to compute (default: where ``A`` is); results return to ``A``'s device.
    ``seed`` makes FAST deterministic. Raises :class:`NonFiniteError` for NaN/Inf in ``A``.
    """
    method = SvdMethod(method)
    if A.dim() != 2:
        raise ValueError(f"decompose needs a 2-D matrix, got shape {tuple(A.shape)}; flatten conv weights first")
    out_device = A.device
    dev = torch.device(device) if device is not None else A.device
    with torch.no_grad():
        try:
            return _decompose_on(A, k, method, full_spectrum, dev, seed, out_device, [])
        except torch.OutOfMemoryError:
            if dev.type == "cpu":
                raise
            _release_cache(dev)
            return _decompose_on(
                A, k, method, full_spectrum, torch.device("cpu"), seed, out_device,
                [f"cpu ({dev.type} out of memory)"],
            )


def set_threads(n: int | None) -> None:
    """Set the thread count of torch and of scipy's bundled OpenBLAS (best effort).

    ``None`` means one thread per CPU core. On a busy 2-core machine 1 thread is often faster
    (spinning BLAS threads contend); benchmarks use 1 and measure CPU time.
    """
    count = int(n) if n is not None else (os.cpu_count() or 1)
    if count < 1:
        raise ValueError(f"thread count must be ≥ 1, got {n}")
    torch.set_num_threads(count)
    _openblas_set_threads(count)


# --------------------------------------------------------------------------------------------
# internals: results, assembly, validation
# --------------------------------------------------------------------------------------------


class _Result(NamedTuple):
    """Triplets of the wide orientation (U s×q, S q, Vh q×L), or of A itself for the factored path."""

    U: Tensor
    S: Tensor
    Vh: Tensor
    method: str
    values: Tensor | None = None  # all singular values (fp64 CPU, descending) when known
    gap: Tensor | None = None  # FAST: cumulative estimated missed energy (fp64 CPU)
    fro2: float | None = None


class _BadOutput(RuntimeError):
    """A routine returned non-finite or inconsistent values."""


_FAILURES: tuple[type[BaseException], ...] = (RuntimeError, ValueError, np.linalg.LinAlgError)


def _decompose_on(
    A: Tensor,
    k: int,
    method: SvdMethod,
    full: bool,
    dev: torch.device,
    seed: int,
    out_device: torch.device,
    notes: list[str],
) -> Decomposition:
    m, n = int(A.shape[0]), int(A.shape[1])
    p = min(m, n)
    A32 = A.detach().to(device=dev, dtype=torch.float32)
    fro2 = sum_squares(A32)
    if not math.isfinite(fro2):
        raise NonFiniteError(
            f"the {m}×{n} matrix contains {_nonfinite_counts(A32)}; SVD of non-finite values is "
            "meaningless — check the source weights (an fp16 overflow or a damaged file)"
        )
    if p == 0:
        return _empty(m, n, p, out_device, method="empty")
    k = max(1, min(int(k), p))
    transposed = m > n
    W = A32.mT if transposed else A32  # wide orientation: s × L with s ≤ L

    if method is SvdMethod.REFERENCE:
        ref = ("reference", lambda w, kk, f: _reference(A32, kk, transposed))
        res, more = _ladder(W, k, [ref], full=True, fro2=fro2)
        return _assemble(res, transposed, fro2, p, out_device, notes + more)

    if method is SvdMethod.FAST and not full and _krylov_plan(W.shape[0], k) is not None:
        try:
            res, more = _ladder(W, k, [("krylov", lambda w, kk, f: _fast_krylov(w, kk, seed))], full=False, fro2=fro2)
            excess = _fast_excess(res, fro2, k)
            if excess <= FAST_TOLERANCE:
                return _assemble(res, transposed, fro2, p, out_device, notes + more)
            notes = notes + more + [f"fast→exact: estimated excess {_pct(excess)}"]
        except RankwiseError as exc:
            notes = notes + [f"fast→exact: {exc}"]
    elif method is SvdMethod.FAST and full:
        notes = notes + ["fast→exact: full spectrum asked"]

    primary = ("gram-eigh", _gram_eigh) if _use_gram(W.shape[0], k) else ("thin-svd", _thin_svd)
    res, more = _ladder(W, k, [primary], full=full, fro2=fro2)
    return _assemble(res, transposed, fro2, p, out_device, notes + more)


def _pct(x: float) -> str:
    return "inf" if not math.isfinite(x) else f"{100 * x:.2g}%"


def _use_gram(s: int, k: int) -> bool:
    """Gram + partial eigh pays off while k is well below the short side."""
    return s > 32 and 2 * k <= s


def _assemble(
    res: _Result, transposed: bool, fro2: float, p: int, out_device: torch.device, notes: list[str]
) -> Decomposition:
    if transposed:
        U, Vh = res.Vh.mT, res.U.mT
    else:
        U, Vh = res.U, res.Vh
    S = res.S
    values = S.detach().double().cpu()
    if res.values is not None and res.values.numel() > values.numel():
        tail = res.values[values.numel():].clamp(min=0.0, max=float(values[-1]) if values.numel() else None)
        values = torch.cat([values, tail])
    gap = None if res.gap is None else res.gap.detach().double().cpu()
    return Decomposition(
        U=_fresh(U, out_device),
        S=_fresh(S, out_device),
        Vh=_fresh(Vh, out_device),
        spectrum=Spectrum(values=values, fro2=float(fro2), full_rank=p),
        method=res.method,
        notes=tuple(notes),
        energy_gap=gap,
    )


def _empty(m: int, n: int, p: int, out_device: torch.device, *, method: str) -> Decomposition:
    z = torch.zeros(0, dtype=torch.float32, device=out_device)
    return Decomposition(
        U=torch.zeros(m, 0, dtype=torch.float32, device=out_device),
        S=z,
        Vh=torch.zeros(0, n, dtype=torch.float32, device=out_device),
        spectrum=Spectrum(values=torch.zeros(p, dtype=torch.float64), fro2=0.0, full_rank=p),
        method=method,
    )


def _fresh(t: Tensor, device: torch.device) -> Tensor:
    """fp32, contiguous, on ``device``, and owning exactly its storage (no view of a larger buffer)."""
    t = t.to(device=device, dtype=torch.float32)
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def sum_squares(t: Tensor) -> float:
    """Σ t², accumulated in fp64 in cache-sized chunks (exact to fp64 round-off); inf/nan if non-finite."""
    if t.device.type != "cpu":  # one reduction on the device (no per-chunk synchronisation)
        return float(torch.linalg.vector_norm(t, dtype=torch.float64) ** 2)
    flat = t.reshape(-1)
    total = 0.0
    for chunk in flat.split(_FRO_CHUNK):
        c = chunk.double()
        total += float(torch.dot(c, c))
    return total


def _all_finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _nonfinite_counts(t: Tensor) -> str:
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    return f"{nan} NaN and {inf} ±Inf value(s)"


def _check(res: _Result, fro2: float, s: int) -> _Result:
    """Reject non-finite or impossible results (they trigger the next ladder step)."""
    S = res.S
    # a sum is finite iff every entry is (entries are O(1) or O(σ₁)): far cheaper than isfinite()
    if not all(math.isfinite(float(t.sum())) for t in (S, res.U, res.Vh)):
        raise _BadOutput("non-finite singular values or vectors")
    if S.numel():
        if res.U.shape[1] == S.numel() and bool((S[1:] > S[:-1]).any()):  # keep the contract: descending
            order = torch.argsort(S, descending=True)
            res = res._replace(S=S[order], U=res.U[:, order], Vh=res.Vh[order])
            S = res.S
        captured = float((S.double() ** 2).sum())
        if captured > fro2 * (1 + 1e-3) + 1e-30:
            raise _BadOutput(f"singular values exceed the matrix norm ({captured:.6g} > {fro2:.6g})")
        if fro2 > 0 and float(S[0]) ** 2 < 0.25 * fro2 / max(s, 1):
            raise _BadOutput("leading singular value is implausibly small (solver returned zeros?)")
    return res


# --------------------------------------------------------------------------------------------
# the fallback ladder
# --------------------------------------------------------------------------------------------


def _ladder(
    W: Tensor,
    k: int,
    primary: list[tuple[str, Callable[..., _Result]]],
    *,
    full: bool,
    fro2: float,
) -> tuple[_Result, list[str]]:
    """Run the primary routine, then the fallbacks in order; return the result and the notes."""
    s = min(W.shape)
    on_gpu = W.device.type != "cpu"
    steps = list(primary)
    if on_gpu:
        steps.append(("gesvd driver", lambda w, kk, f: _thin_svd(w, kk, f, driver="gesvd")))
        steps.append(("cpu", lambda w, kk, f: primary[0][1](w.cpu(), kk, f)))
    else:
        if primary[0][0] == "gram-eigh":
            steps.append(("eigh driver evd", lambda w, kk, f: _gram_eigh(w, kk, f, driver="evd")))
        else:
            steps.append(("gram-eigh", lambda w, kk, f: _gram_eigh(w, kk, f)))
    steps.append(("float64", lambda w, kk, f: _gram_eigh(w.cpu().double(), kk, f, driver="evd")))
    steps.append(("thin-svd float64, rescaled", _thin_svd_rescaled))
    notes: list[str] = []
    reasons: list[str] = []
    for i, (name, fn) in enumerate(steps):
        if i > 0:
            notes.append(f"{name} ({reasons[-1]})")
        try:
            res = fn(W, k, full)
            return _check(res, fro2, s), notes
        except torch.OutOfMemoryError:
            raise
        except _FAILURES as exc:  # LinAlgError subclasses RuntimeError
            reasons.append(f"{steps[i][0]}: {_kind(exc)}")
            last = exc
    raise RankwiseError(
        f"SVD of a {tuple(W.shape)} matrix failed on every fallback "
        f"({'; '.join(reasons)}); last error: {last}"
    ) from last


def _factored_ladder(up: Tensor, down: Tensor, k: int | None = None) -> tuple[_Result, list[str]]:
    steps: list[tuple[str, Callable[[], _Result]]] = [("qr-factored", lambda: _qr_factored(up, down, k))]
    if up.device.type != "cpu":
        steps.append(("cpu", lambda: _qr_factored(up.cpu(), down.cpu(), k)))
    steps.append(("float64", lambda: _qr_factored(up.cpu().double(), down.cpu().double(), k)))
    notes: list[str] = []
    reasons: list[str] = []
    for i, (name, fn) in enumerate(steps):
        if i > 0:
            notes.append(f"{name} ({reasons[-1]})")
        try:
            res = fn()
            fro2 = res.fro2 if res.fro2 is not None else float((res.S.double() ** 2).sum())
            return _check(res, fro2, min(up.shape[0], down.shape[1])), notes
        except torch.OutOfMemoryError:
            if up.device.type == "cpu":
                raise
            reasons.append(f"{name}: out of memory")
            last: BaseException = RuntimeError("out of memory")
        except _FAILURES as exc:
            reasons.append(f"{name}: {_kind(exc)}")
            last = exc
    raise RankwiseError(
        f"SVD of up {tuple(up.shape)} @ down {tuple(down.shape)} failed on every fallback "
        f"({'; '.join(reasons)}); last error: {last}"
    ) from last


def _kind(exc: BaseException) -> str:
    """A short name for a failure (torch's LinAlgError is the private ``_LinAlgError``)."""
    if isinstance(exc, torch.linalg.LinAlgError):
        return "LinAlgError"
    return type(exc).__name__.lstrip("_")


def _release_cache(dev: torch.device) -> None:
    if dev.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# routines (each takes the wide orientation W: s × L, s ≤ L, unless noted)
# --------------------------------------------------------------------------------------------


def _reference(A: Tensor, k: int, transposed: bool) -> _Result:
    """What the peers do: ``full_matrices=True`` on A as it is; returned in the wide orientation."""
    U, S, Vh = torch.linalg.svd(A.float(), full_matrices=True)
    Uk, Vhk = U[:, :k].clone(), Vh[:k].clone()
    del U, Vh  # the full square factors can be huge (23040² for the widest conv)
    if transposed:  # W = Aᵀ = V·S·Uᵀ
        Uk, Vhk = Vhk.mT, Uk.mT
    return _Result(Uk, S[:k], Vhk, "reference", values=S.double().cpu())


def _thin_svd(W: Tensor, k: int, full: bool, driver: str | None = None) -> _Result:
    """Thin SVD of the tall orientation ``Wᵀ`` (LAPACK is fast for tall inputs)."""
    T = W.mT  # L × s, tall
    if driver is not None:
        P, S, Qh = torch.linalg.svd(T, full_matrices=False, driver=driver)
    else:
        P, S, Qh = torch.linalg.svd(T, full_matrices=False)
    # W = Qhᵀ·S·Pᵀ
    values = S.double().cpu()
    return _Result(Qh[:k].mT.float(), S[:k].float(), P[:, :k].mT.float(), "thin-svd", values=values)


def _thin_svd_rescaled(W: Tensor, k: int, full: bool) -> _Result:
    """Last resort: fp64 on the CPU, scaled so the largest entry is 1."""
    W64 = W.detach().cpu().double()
    scale = float(W64.abs().max()) if W64.numel() else 0.0
    if scale == 0.0 or not math.isfinite(scale):
        scale = 1.0
    res = _thin_svd(W64 / scale, k, full)
    values = None if res.values is None else res.values * scale
    return res._replace(S=res.S * scale, values=values)


def _ritz(W: Tensor, U0: Tensor, method: str, values: Tensor | None = None, gap: Tensor | None = None) -> _Result:
    """Rayleigh–Ritz on W: B = U0ᵀW, thin SVD of the tall Bᵀ = P·Σ·Rᵀ → U = U0·R, Vh = Pᵀ."""
    B = U0.mT @ W  # k × L
    P, S, Rh = torch.linalg.svd(B.mT, full_matrices=False)  # Bᵀ = P·S·Rh
    U = U0 @ Rh.mT
    return _Result(U.float(), S.float(), P.mT.float(), method, values=values, gap=gap)


def _gram_eigh(W: Tensor, k: int, full: bool, driver: str = "evr") -> _Result:
    """EXACT: Gram on the short side + top-k eigenvectors, then Rayleigh–Ritz on W."""
    s = W.shape[0]
    values = None
    if W.device.type == "cpu" and _scipy() is not None:
        if full:
            G64 = _gram_numpy(W, np.float64)
            values = _sqrt_desc(_eigvalsh_numpy(G64))
            G = np.asfortranarray(G64, dtype=np.float32) if W.dtype != torch.float64 else G64
        else:
            G = _gram_numpy(W, np.float32 if W.dtype != torch.float64 else np.float64)
        U0 = _top_eigvecs_numpy(G, k, driver)
        U0 = torch.from_numpy(U0).to(W.dtype)
    else:
        G = W @ W.mT
        if full:
            Wd = W.double()
            values = _sqrt_desc(torch.linalg.eigvalsh(Wd @ Wd.mT).cpu().numpy())
        _, vecs = torch.linalg.eigh(G)
        U0 = vecs[:, s - k:].flip(1)
    method = "gram-eigh" if W.dtype != torch.float64 else "gram-eigh-f64"
    return _ritz(W, U0, method, values=values)


def _sqrt_desc(eigvals: np.ndarray) -> Tensor:
    v = torch.from_numpy(np.array(eigvals, dtype=np.float64, copy=True))
    return v.clamp(min=0.0).sqrt().flip(0)


def _krylov_plan(s: int, k: int) -> tuple[int, int] | None:
    """(block size, number of blocks) for FAST, or None where EXACT is as cheap (small matrices).

    The basis holds max(2.5·k, k + 40) columns in blocks of ≈ k/2 (8…64): measured excess on
    heavy-tail and planted-rank spectra ≤ 0.06% / 0.26% at k = 128, ≤ 0.12% for k ≤ 64.
    """
    b = min(64, max(16, math.ceil(k / 2)))  # GEMMs narrower than 16 columns run slowly
    blocks = math.ceil(max(2.5 * k, k + 40) / b)
    if s < 256 or 4 * b * blocks > s:
        return None
    return b, blocks


def _form_gram(s: int, L: int, b: int, nblocks: int, k: int) -> bool:
    """FAST: form G = W·Wᵀ (syrk, s²L flops) or apply it as W·(Wᵀ·X) block by block?

    Flop model (measured on SD shapes at k = 128: applying wins for short-side-1280 layers up to
    L ≈ 2s, forming for wider ones; at k ≤ 32 applying wins up to L ≈ 4s). Forming costs
    s²·L + (blocks + 1)·2s²b + 2ksL (the final Uᵀ·W); applying costs (blocks + 1)·4sLb + 2kdL
    (Uᵀ·W comes from the kept Wᵀ·K). Narrow GEMMs run slower than syrk, hence the 1.25 weight.
    """
    d = b * nblocks
    formed = s * s * L + (nblocks + 1) * 2 * s * s * b + 2 * k * s * L
    applied = (nblocks + 1) * 4 * s * L * b + 2 * k * d * L
    return formed <= 1.25 * applied


class _GramOperator:
    """X ↦ G·X for G = W·Wᵀ, either formed once or applied as W·(Wᵀ·X) (then Wᵀ·K is kept)."""

    def __init__(self, W: Tensor, d: int, form: bool) -> None:
        self.W = W
        self.formed = _gram_operator(W) if form else None
        self.WtK = None if form else torch.empty(W.shape[1], d, dtype=W.dtype, device=W.device)

    def __call__(self, X: Tensor, cols: slice | None = None) -> Tensor:
        if self.formed is not None:
            return self.formed(X)
        Y = self.W.mT @ X
        if cols is not None:
            self.WtK[:, cols] = Y
        return self.W @ Y

    def projected(self, Xk: Tensor, Vk: Tensor) -> Tensor:
        """Xkᵀ·W for Xk = K·Vk (from the kept Wᵀ·K when there is one: d·L·k instead of s·L·k flops)."""
        if self.WtK is not None:
            return (self.WtK @ Vk).mT
        return Xk.mT @ self.W


def _fast_krylov(W: Tensor, k: int, seed: int, form: bool | None = None) -> _Result:
    """FAST: block Krylov on the Gram matrix + Ritz residual estimate (module docstring)."""
    s, L = W.shape
    plan = _krylov_plan(s, k)
    if plan is None:
        raise ValueError(f"no Krylov plan for short side {s} and k={k}")
    b, nblocks = plan
    d = b * nblocks
    if form is None:
        form = _form_gram(s, L, b, nblocks, k)
    gmul = _GramOperator(W, d, form)
    dtype, device = W.dtype, W.device
    gen = torch.Generator().manual_seed(int(seed))
    K = torch.empty(s, d, dtype=dtype, device=device)
    GK = torch.empty(s, d, dtype=dtype, device=device)

    def project(Z: Tensor, Kj: Tensor) -> Tensor:
        return Z - Kj @ (Kj.mT @ Z)

    def next_block(Z: Tensor, j: int) -> Tensor:
        """Orthonormalise Z against K[:, :j] (CGS2 + QR).

        Columns that (nearly) vanish in the projection — an invariant subspace was found, or the
        block is rank-deficient — would come out of QR as arbitrary directions that need not be
        orthogonal to K; they are replaced by fresh random directions, orthonormalised twice.
        """
        if j == 0:
            return torch.linalg.qr(Z)[0]  # Householder Q is orthonormal even if Z is deficient
        Kj = K[:, :j]
        before = Z.norm(dim=0)
        Z = project(project(Z, Kj), Kj)
        Q, Rz = torch.linalg.qr(Z)
        weak = Rz.diagonal().abs() < 1e-2 * before
        if not bool(weak.any()):
            return Q
        Z = Z.clone()
        Z[:, weak] = torch.randn(s, int(weak.sum()), generator=gen).to(device=device, dtype=dtype)
        Z = project(project(Z, Kj), Kj)
        Q, _ = torch.linalg.qr(Z)
        Q, _ = torch.linalg.qr(project(Q, Kj))
        return Q

    omega = torch.randn(s, b, generator=gen).to(device=device, dtype=dtype)
    K[:, :b] = next_block(gmul(omega), 0)
    for j in range(nblocks):
        cols = slice(j * b, (j + 1) * b)
        GK[:, cols] = gmul(K[:, cols], cols)
        if j + 1 < nblocks:
            K[:, (j + 1) * b:(j + 2) * b] = next_block(GK[:, cols], (j + 1) * b)
    H = K.mT @ GK
    H = 0.5 * (H + H.mT)
    theta, V = torch.linalg.eigh(H)  # ascending
    theta, V = theta.flip(0), V.flip(1)
    Vk = V[:, :k]
    Xk = K @ Vk
    R = GK @ Vk - Xk * theta[:k]
    th = theta.double().cpu()
    # residual norms, less what fp32 round-off in G·X alone produces (≈ ε·√s·‖G‖₂ per column)
    noise = 4 * _EPS32 * math.sqrt(s) * max(float(th[0]), 0.0)
    r = (R.double().norm(dim=0).cpu() - noise).clamp(min=0.0)
    sep = th[:k] - th[k]  # distance to the next Ritz value: a proxy for the unresolved spectrum
    quad = torch.where(sep > 0, r * r / sep.clamp(min=1e-300), torch.full_like(r, math.inf))
    missed = torch.minimum(r, quad).cumsum(0)  # Σ_{i≤k'} min(rᵢ, rᵢ²/gapᵢ) ≥ Σ (λᵢ − θᵢ)
    drift = float((Xk.mT @ Xk - torch.eye(k, dtype=dtype, device=device)).abs().max())
    if drift > 1e-5:  # K lost orthogonality (restarted blocks): re-orthonormalise, full Rayleigh–Ritz
        Xk, _ = torch.linalg.qr(Xk)
        return _ritz(W, Xk, "krylov", gap=missed)
    # Xk holds Ritz vectors of G: UᵀW has nearly orthogonal rows already, so their norms are the
    # singular values and no SVD of Bᵀ is needed. The projection identity still holds exactly
    # (U orthonormal, U·diag(S)·Vh = U·Uᵀ·W for every leading k'); Vh rows are orthonormal to the
    # accuracy of the Ritz vectors.
    B = gmul.projected(Xk, Vk)
    S = B.norm(dim=1)
    order = torch.argsort(S, descending=True)
    S, Xk, B = S[order], Xk[:, order], B[order]
    Vh = B / torch.where(S > 0, S, torch.ones_like(S))[:, None]
    return _Result(Xk, S, Vh, "krylov", gap=missed)


def _fast_excess(res: _Result, fro2: float, k: int) -> float:
    """Estimated excess error of the FAST rank-k truncation over Eckart–Young (module docstring)."""
    if res.gap is None:
        return 0.0
    q = res.S.numel()
    kk = min(k, q)
    E = float(res.gap[kk - 1])
    if E <= _ENERGY_FLOOR * fro2:
        return 0.0
    err2 = max(fro2 - float((res.S[:kk].double() ** 2).sum()), 0.0)
    if not math.isfinite(E) or E >= err2:
        return math.inf
    return math.sqrt(err2 / (err2 - E)) - 1.0


def _qr_factored(up: Tensor, down: Tensor, k: int | None = None) -> _Result:
    """QR trick on A = up·down (U, Vh of A itself, not of a wide orientation).

    With ``k`` (fewer triplets than the rank R), Q is never formed: the Householder reflectors of
    ``geqrf`` are applied to the k kept core vectors only (``ormqr``), which saves the m×R Q and its
    m×R×R product — about a third of the time for stacked merges (R = 512, k = 128).
    """
    r = int(up.shape[1])
    if k is None or k >= r:
        Qu, Ru = torch.linalg.qr(up)
        Qd, Rd = torch.linalg.qr(down.mT)
        core = Ru @ Rd.mT
        Uc, S, Vch = torch.linalg.svd(core)
        fro2 = float((core.double() ** 2).sum())
        return _Result((Qu @ Uc).float(), S.float(), (Vch @ Qd.mT).float(), "qr-factored", fro2=fro2)
    hu, tau_u = torch.geqrf(up)
    hd, tau_d = torch.geqrf(down.mT.contiguous())
    core = hu[:r].triu() @ hd[:r].triu().mT
    Uc, S, Vch = torch.linalg.svd(core)
    fro2 = float((core.double() ** 2).sum())
    x = up.new_zeros(up.shape[0], k)
    x[:r] = Uc[:, :k]
    y = up.new_zeros(down.shape[1], k)
    y[:r] = Vch[:k].mT
    U = torch.ormqr(hu, tau_u, x)
    V = torch.ormqr(hd, tau_d, y)
    return _Result(U.float(), S.float(), V.mT.float(), "qr-factored", fro2=fro2)


# --------------------------------------------------------------------------------------------
# scipy / BLAS helpers (CPU)
# --------------------------------------------------------------------------------------------


def _scipy():
    """scipy.linalg with its BLAS thread count synced to torch's, or None if scipy is missing."""
    try:
        import scipy.linalg as sl
    except ImportError:  # pragma: no cover - scipy ships with ComfyUI and with this package
        return None
    _OPENBLAS.follow_torch()
    return sl


def _gram_numpy(W: Tensor, dtype) -> np.ndarray:
    """G = W·Wᵀ with BLAS syrk (upper triangle filled, Fortran order), no copy of W in fp32."""
    from scipy.linalg import blas

    Wn = W.detach().numpy()
    if Wn.dtype != dtype:
        Wn = Wn.astype(dtype, order="K")
    syrk = blas.dsyrk if dtype == np.float64 else blas.ssyrk
    if Wn.flags.f_contiguous:
        return syrk(1.0, Wn, trans=0)
    if not Wn.flags.c_contiguous:
        Wn = np.ascontiguousarray(Wn)
    return syrk(1.0, Wn.T, trans=1)


def _gram_operator(W: Tensor) -> Callable[[Tensor], Tensor]:
    """X ↦ (W·Wᵀ)·X with the Gram matrix formed once (syrk + symm on CPU, GEMM elsewhere)."""
    if W.device.type == "cpu" and _scipy() is not None:
        from scipy.linalg import blas

        G = _gram_numpy(W, np.float64 if W.dtype == torch.float64 else np.float32)
        symm = blas.dsymm if G.dtype == np.float64 else blas.ssymm

        def apply(X: Tensor) -> Tensor:
            # X (s×b, C order) is Xᵀ in Fortran order; symm(side=1) gives Xᵀ·G = (G·X)ᵀ, which
            # read back in C order is G·X. Only G's upper triangle is used.
            Xt = np.ascontiguousarray(X.numpy()).T
            return torch.from_numpy(np.ascontiguousarray(symm(1.0, G, Xt, side=1, lower=0).T))

        return apply
    G = W @ W.mT
    G = 0.5 * (G + G.mT)
    return lambda X: G @ X


def _top_eigvecs_numpy(G: np.ndarray, k: int, driver: str) -> np.ndarray:
    """Top-k eigenvectors (descending) of the upper-triangle symmetric G; G is overwritten."""
    sl = _scipy()
    s = G.shape[0]
    if driver == "evr":
        _, v = sl.eigh(
            G, lower=False, subset_by_index=[s - k, s - 1], driver="evr", overwrite_a=True, check_finite=False
        )
    else:
        _, v = sl.eigh(G, lower=False, driver=driver, overwrite_a=True, check_finite=False)
        v = v[:, s - k:]
    return v[:, ::-1].copy()  # (ascontiguousarray keeps a negative stride for one column)


def _eigvalsh_numpy(G: np.ndarray) -> np.ndarray:
    sl = _scipy()
    return sl.eigh(G, lower=False, eigvals_only=True, overwrite_a=False, check_finite=False)


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
        import glob

        setters = []
        try:
            import scipy
            import scipy.linalg  # noqa: F401  (loads the BLAS library)
        except ImportError:  # pragma: no cover
            return setters
        base = os.path.dirname(scipy.__file__)
        candidates = glob.glob(os.path.join(base + ".libs", "*openblas*")) + glob.glob(
            os.path.join(base, ".dylibs", "*openblas*")
        )
        for path in candidates:
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


def _openblas_set_threads(n: int) -> None:
    _OPENBLAS.set(int(n))

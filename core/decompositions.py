"""Pure decompositions: each routine returns the leading singular triplets of one matrix.

Every routine here takes a matrix (or the two factors of a product), returns a :class:`Triplets`
— ``(U, S, Vh)`` first, then what the caller may use (the complete spectrum when it came for
free, FAST's energy-gap estimate, the exact ‖A‖_F² of a factored product) — and has no other
effect: no fallback, no device moves, no notes. The methods and their accuracy are described in
:mod:`.svd`; which routine runs, and what happens when one fails, is :mod:`.svd` and
:mod:`.fallback`.

* :func:`gram_eigh` — EXACT: Gram matrix on the short side + partial symmetric eigensolver, then
  Rayleigh–Ritz on the matrix itself.
* :func:`block_krylov` — FAST: block Lanczos on the Gram operator with full re-orthogonalisation,
  plus the Kato–Temple residual estimate of the missed energy.
* :func:`qr_factored` — the QR trick for ``up @ down`` without forming the product.
* :func:`thin_svd`, :func:`thin_svd_rescaled` — LAPACK thin SVD of the tall orientation (fp64,
  rescaled: the last resort).
* :func:`reference_svd` — what the peers do (``full_matrices=True``), for benchmarks and tests.

Routines named "wide" take the wide orientation ``W`` (s × L, s ≤ L) unless noted.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import torch

from . import lapack, memory, runtime

Tensor = torch.Tensor

_EPS32 = float(torch.finfo(torch.float32).eps)
# Estimated excess energy below this fraction of ‖A‖_F² counts as zero (fp32 round-off level:
# an error of ~1e-5·‖A‖_F).
ENERGY_FLOOR = 1e-10
_FRO_CHUNK = 1 << 16


class Triplets(NamedTuple):
    """Triplets of the wide orientation (U s×q, S q, Vh q×L), or of A itself for the factored path."""

    U: Tensor
    S: Tensor
    Vh: Tensor
    method: str
    values: Tensor | None = None  # all singular values (fp64 CPU, descending) when known
    gap: Tensor | None = None  # FAST: cumulative estimated missed energy (fp64 CPU)
    fro2: float | None = None


def use_gram(s: int, k: int) -> bool:
    """Gram + partial eigh pays off while k is well below the short side."""
    return s > 32 and 2 * k <= s


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


def difference_sum_squares(base: Tensor, tuned: Tensor) -> tuple[Tensor, float, float]:
    """``(tuned − base, Σ (tuned − base)², Σ base²)``: the difference in fp32 (each side upcast
    exactly before subtracting), both sums as :func:`sum_squares` computes them (same chunks, fp64:
    the same bits; inf/nan if non-finite).

    On the CPU it runs chunk by chunk in one pass, into a buffer from :func:`.memory.empty_cpu`:
    a whole-tensor ``d.sub_(fp16)`` materialises an fp32 temporary of the other side, and both
    buffers were faulted in page by page (measured on 10240 × 1280 fp16, with both sums: 68 ms → 16 ms).
    """
    chunked = (torch.float16, torch.bfloat16, torch.float32)  # the dtypes the chunked pass reads
    if tuned.device.type != "cpu" or base.device != tuned.device or base.dtype not in chunked or tuned.dtype not in chunked:
        if torch.float64 in (base.dtype, tuned.dtype):
            d = (tuned.double() - base.double()).float()
        else:
            d = tuned.to(torch.float32, copy=True).sub_(base.float())
        return d, sum_squares(d), sum_squares(base)
    d = memory.empty_cpu(tuple(tuned.shape))
    fd, ft, fb = d.view(-1), tuned.reshape(-1), base.reshape(-1)
    total = base_total = 0.0
    for i in range(0, fd.numel(), _FRO_CHUNK):
        c = fd[i:i + _FRO_CHUNK]
        c.copy_(fb[i:i + _FRO_CHUNK])
        c64 = c.double()
        base_total += float(torch.dot(c64, c64))
        c.sub_(ft[i:i + _FRO_CHUNK]).neg_()  # −(b − t) is exactly t − b; the fp16 temporary is chunk-sized
        c64 = c.double()
        total += float(torch.dot(c64, c64))
    return d, total, base_total


def all_finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def nonfinite_counts(t: Tensor) -> str:
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    return f"{nan} NaN and {inf} ±Inf value(s)"


def reference_svd(A: Tensor, k: int, transposed: bool) -> Triplets:
    """What the peers do: ``full_matrices=True`` on A as it is; returned in the wide orientation."""
    U, S, Vh = torch.linalg.svd(A.float(), full_matrices=True)
    Uk, Vhk = U[:, :k].clone(), Vh[:k].clone()
    del U, Vh  # the full square factors can be huge (23040² for the widest conv)
    if transposed:  # W = Aᵀ = V·S·Uᵀ
        Uk, Vhk = Vhk.mT, Uk.mT
    return Triplets(Uk, S[:k], Vhk, "reference", values=S.double().cpu())


def thin_svd(W: Tensor, k: int, full: bool, driver: str | None = None) -> Triplets:
    """Thin SVD of the tall orientation ``Wᵀ`` (LAPACK is fast for tall inputs)."""
    T = W.mT  # L × s, tall
    if driver is not None:
        P, S, Qh = torch.linalg.svd(T, full_matrices=False, driver=driver)
    else:
        P, S, Qh = torch.linalg.svd(T, full_matrices=False)
    # W = Qhᵀ·S·Pᵀ
    values = S.double().cpu()
    return Triplets(Qh[:k].mT.float(), S[:k].float(), P[:, :k].mT.float(), "thin-svd", values=values)


def thin_svd_rescaled(W: Tensor, k: int, full: bool) -> Triplets:
    """Last resort: fp64 on the CPU, scaled so the largest entry is 1."""
    W64 = W.detach().cpu().double()
    scale = float(W64.abs().max()) if W64.numel() else 0.0
    if scale == 0.0 or not math.isfinite(scale):
        scale = 1.0
    res = thin_svd(W64 / scale, k, full)
    values = None if res.values is None else res.values * scale
    return res._replace(S=res.S * scale, values=values)


def ritz(W: Tensor, U0: Tensor, method: str, values: Tensor | None = None, gap: Tensor | None = None) -> Triplets:
    """Rayleigh–Ritz on W: B = U0ᵀW, thin SVD of the tall Bᵀ = P·Σ·Rᵀ → U = U0·R, Vh = Pᵀ."""
    B = U0.mT @ W  # k × L
    P, S, Rh = torch.linalg.svd(B.mT, full_matrices=False)  # Bᵀ = P·S·Rh
    U = U0 @ Rh.mT
    return Triplets(U.float(), S.float(), P.mT.float(), method, values=values, gap=gap)


def gram_eigh(W: Tensor, k: int, full: bool, driver: str = "evr") -> Triplets:
    """EXACT: Gram on the short side + top-k eigenvectors, then Rayleigh–Ritz on W."""
    s = W.shape[0]
    values = None
    if W.device.type == "cpu" and runtime.scipy_linalg() is not None:
        if full:
            G64 = gram_numpy(W, np.float64)
            values = sqrt_desc(eigvalsh_numpy(G64))
            G = np.asfortranarray(G64, dtype=np.float32) if W.dtype != torch.float64 else G64
        else:
            G = gram_numpy(W, np.float32 if W.dtype != torch.float64 else np.float64)
        U0 = top_eigvecs_numpy(G, k, driver)
        U0 = torch.from_numpy(U0).to(W.dtype)
    else:
        G = W @ W.mT
        if full:
            Wd = W.double()
            values = sqrt_desc(torch.linalg.eigvalsh(Wd @ Wd.mT).cpu().numpy())
        _, vecs = torch.linalg.eigh(G)
        U0 = vecs[:, s - k:].flip(1)
    method = "gram-eigh" if W.dtype != torch.float64 else "gram-eigh-f64"
    return ritz(W, U0, method, values=values)


def sqrt_desc(eigvals: np.ndarray) -> Tensor:
    v = torch.from_numpy(np.array(eigvals, dtype=np.float64, copy=True))
    return v.clamp(min=0.0).sqrt().flip(0)


def krylov_plan(s: int, k: int) -> tuple[int, int] | None:
    """(block size, number of blocks) for FAST, or None where EXACT is as cheap (small matrices).

    The basis holds max(2.5·k, k + 40) columns in blocks of ≈ k/2 (8…64): measured excess on
    heavy-tail and planted-rank spectra ≤ 0.06% / 0.26% at k = 128, ≤ 0.12% for k ≤ 64.
    """
    b = min(64, max(16, math.ceil(k / 2)))  # GEMMs narrower than 16 columns run slowly
    blocks = math.ceil(max(2.5 * k, k + 40) / b)
    if s < 256 or 4 * b * blocks > s:
        return None
    return b, blocks


def form_gram(s: int, L: int, b: int, nblocks: int, k: int) -> bool:
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


class GramOperator:
    """X ↦ G·X for G = W·Wᵀ, either formed once or applied as W·(Wᵀ·X) (then Wᵀ·K is kept)."""

    def __init__(self, W: Tensor, d: int, form: bool) -> None:
        self.W = W
        self.formed = gram_operator(W) if form else None
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


def block_krylov(W: Tensor, k: int, seed: int, form: bool | None = None) -> Triplets:
    """FAST: block Krylov on the Gram matrix + Ritz residual estimate (module docstring)."""
    s, L = W.shape
    plan = krylov_plan(s, k)
    if plan is None:
        raise ValueError(f"no Krylov plan for short side {s} and k={k}")
    b, nblocks = plan
    d = b * nblocks
    if form is None:
        form = form_gram(s, L, b, nblocks, k)
    gmul = GramOperator(W, d, form)
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
        return ritz(W, Xk, "krylov", gap=missed)
    # Xk holds Ritz vectors of G: UᵀW has nearly orthogonal rows already, so their norms are the
    # singular values and no SVD of Bᵀ is needed. The projection identity still holds exactly
    # (U orthonormal, U·diag(S)·Vh = U·Uᵀ·W for every leading k'); Vh rows are orthonormal to the
    # accuracy of the Ritz vectors.
    B = gmul.projected(Xk, Vk)
    S = B.norm(dim=1)
    order = torch.argsort(S, descending=True)
    S, Xk, B = S[order], Xk[:, order], B[order]
    Vh = B / torch.where(S > 0, S, torch.ones_like(S))[:, None]
    return Triplets(Xk, S, Vh, "krylov", gap=missed)


def fast_excess(res: Triplets, fro2: float, k: int) -> float:
    """Estimated excess error of the FAST rank-k truncation over Eckart–Young (module docstring)."""
    if res.gap is None:
        return 0.0
    q = res.S.numel()
    kk = min(k, q)
    E = float(res.gap[kk - 1])
    if E <= ENERGY_FLOOR * fro2:
        return 0.0
    err2 = max(fro2 - float((res.S[:kk].double() ** 2).sum()), 0.0)
    if not math.isfinite(E) or E >= err2:
        return math.inf
    return math.sqrt(err2 / (err2 - E)) - 1.0


def qr_factored(up: Tensor, down: Tensor, k: int | None = None) -> Triplets:
    """QR trick on A = up·down (U, Vh of A itself, not of a wide orientation).

    First :func:`cholesky_qr_kept` (R factors from Gram matrices, only the kept columns formed,
    verified a posteriori; SDXL 4-LoRA merge 93 → 73 CPU-s, resize 128 → 32 7.5 → 4.5 CPU-s).
    Where it declines, Householder QR runs; with ``k`` (fewer triplets than the rank R) Q is not
    formed there either: the reflectors of ``geqrf`` are applied to the k kept core vectors only
    (``ormqr``), which saves the m×R Q and its m×R×R product.
    """
    r = int(up.shape[1])
    fast = cholesky_qr_kept(up, down, r if k is None else min(int(k), r))
    if fast is not None:
        return fast
    if k is None or k >= r:
        Qu, Ru = torch.linalg.qr(up)
        Qd, Rd = torch.linalg.qr(down.mT)
        core = Ru @ Rd.mT
        Uc, S, Vch = torch.linalg.svd(core)
        fro2 = float((core.double() ** 2).sum())
        return Triplets((Qu @ Uc).float(), S.float(), (Vch @ Qd.mT).float(), "qr-factored", fro2=fro2)
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
    return Triplets(U.float(), S.float(), V.mT.float(), "qr-factored", fro2=fro2)


# Largest |UᵀU − I| (and |Vh·Vhᵀ − I|) accepted from the Cholesky-QR path: ~170 fp32 ulps. Measured
# 1.0e-6…1.5e-6 on stacked random SDXL-shaped factors (κ(up) 5…34), where the truncation's excess
# over Eckart–Young matched the Householder path's (≈ 2e-12 relative).
CHOLQR_ORTH_TOL = 1e-5


def cholesky_qr_kept(up: Tensor, down: Tensor, k: int) -> Triplets | None:
    """The QR trick's k leading triplets with the R factors from Gram matrices (Cholesky QR).

    ``upᵀup = RuᵀRu`` and ``down·downᵀ = RdᵀRd`` (fp32 syrk, Cholesky in fp64), SVD of the R×R
    core ``Ru·Rdᵀ``, then only the kept columns are formed: ``U = up·(Ru⁻¹·Uc_k)``,
    ``Vh = (Rd⁻¹·Vc_k)ᵀ·down`` — half the flops of Householder QR + ``ormqr``, all in GEMMs. The
    Gram squares the condition number, so the result is verified a posteriori: U and Vh must be
    orthonormal to :data:`CHOLQR_ORTH_TOL` (that bounds how far the core's values are from A's).
    Returns None — and the caller runs the Householder path — on a CPU/fp32 mismatch, a Cholesky
    breakdown (rank-deficient stacked factors, e.g. the same LoRA merged twice) or a failed check.
    """
    if up.device.type != "cpu" or up.dtype != torch.float32 or runtime.scipy_linalg() is None:
        return None
    from scipy.linalg import lapack

    factors = []
    for side in (up.mT, down):  # wide R × m and R × n: Gram = side·sideᵀ
        G = gram_numpy(side, np.float32).astype(np.float64, order="F")
        R, info = lapack.dpotrf(G, lower=0, clean=1, overwrite_a=1)
        if info != 0 or not np.isfinite(R).all():
            return None
        diag = np.abs(np.diag(R))
        if diag.min() <= 1e-6 * diag.max():  # nearly dependent columns: the Gram lost them
            return None
        factors.append(torch.from_numpy(R))
    Ru, Rd = factors
    core = Ru.float() @ Rd.float().mT
    Uc, S, Vch = core_svd(core, k)
    fro2 = float((core.double() ** 2).sum())
    X = torch.linalg.solve_triangular(Ru, Uc[:, :k].double(), upper=True).float()
    Y = torch.linalg.solve_triangular(Rd, Vch[:k].mT.double(), upper=True).float()
    U = up @ X
    Vh = Y.mT @ down
    eye = torch.eye(k, dtype=U.dtype)
    drift = max(float((U.mT @ U - eye).abs().max()), float((Vh @ Vh.mT - eye).abs().max()))
    if not drift <= CHOLQR_ORTH_TOL:  # also catches NaN
        return None
    return Triplets(U, S.float(), Vh, "qr-factored", fro2=fro2)


def core_svd(core: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(Uc, S, Vch)`` of the R × R core of the QR trick: the leading k columns of Uc / rows of Vch
    and all R singular values S (descending).

    Where k ≤ R/2 and R ≥ 384 on the CPU, EXACT's route (:func:`gram_eigh` with the complete
    spectrum: fp64 Gram eigenvalues for the tail, the leading k from Rayleigh–Ritz on the core
    itself) replaces a full SVD: 512 × 512 at k = 128, 35 → 27 ms (a 4-LoRA SDXL merge runs ~950
    such cores). Otherwise, and if that route fails, a full LAPACK SVD.
    """
    R = core.shape[0]
    if core.device.type == "cpu" and R >= 384 and use_gram(R, k) and runtime.scipy_linalg() is not None:
        try:
            res = gram_eigh(core, k, True)
        except (np.linalg.LinAlgError, RuntimeError):
            res = None
        if res is not None and res.values is not None and bool(torch.isfinite(res.S).all()):
            S = res.values.to(torch.float32).clone()
            S[:k] = res.S
            S[k:] = S[k:].clamp(max=float(res.S[-1]))  # the tail never above the kept values
            return res.U, S, res.Vh
    return torch.linalg.svd(core)


def gram_numpy(W: Tensor, dtype) -> np.ndarray:
    """G = W·Wᵀ with BLAS syrk (upper triangle filled, Fortran order), no copy of W in fp32.

    Through :mod:`.lapack` (no GIL held, so the pipeline's workers overlap) where the library is
    found, else through scipy."""
    from scipy.linalg import blas

    Wn = W.detach().numpy()
    if Wn.dtype != dtype:
        Wn = Wn.astype(dtype, order="K")
    G = lapack.syrk_upper(Wn)
    if G is not None:
        return G
    syrk = blas.dsyrk if dtype == np.float64 else blas.ssyrk
    if Wn.flags.f_contiguous:
        return syrk(1.0, Wn, trans=0)
    if not Wn.flags.c_contiguous:
        Wn = np.ascontiguousarray(Wn)
    return syrk(1.0, Wn.T, trans=1)


def gram_operator(W: Tensor) -> Callable[[Tensor], Tensor]:
    """X ↦ (W·Wᵀ)·X with the Gram matrix formed once (syrk, then a torch GEMM: no GIL held)."""
    if W.device.type == "cpu" and runtime.scipy_linalg() is not None:
        upper = torch.from_numpy(gram_numpy(W, np.float64 if W.dtype == torch.float64 else np.float32)).triu()
        G = upper + upper.triu(1).mT
        del upper
    else:
        G = W @ W.mT
        G = 0.5 * (G + G.mT)
    return lambda X: G @ X


def top_eigvecs_numpy(G: np.ndarray, k: int, driver: str) -> np.ndarray:
    """Top-k eigenvectors (descending) of the upper-triangle symmetric G; G is overwritten."""
    sl = runtime.scipy_linalg()
    s = G.shape[0]
    if driver == "evr":
        got = lapack.syevr_upper(G, k) if G.flags.f_contiguous else None
        if got is not None:
            return got[1][:, ::-1].copy()
        _, v = sl.eigh(
            G, lower=False, subset_by_index=[s - k, s - 1], driver="evr", overwrite_a=True, check_finite=False
        )
    else:
        _, v = sl.eigh(G, lower=False, driver=driver, overwrite_a=True, check_finite=False)
        v = v[:, s - k:]
    return v[:, ::-1].copy()  # (ascontiguousarray keeps a negative stride for one column)


def eigvalsh_numpy(G: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """All eigenvalues (ascending) of the upper-triangle symmetric G (G is kept unless ``overwrite``)."""
    sl = runtime.scipy_linalg()
    work = G if overwrite and G.flags.f_contiguous else np.array(G, order="F", copy=True)
    got = lapack.syevr_upper(work, None, vectors=False)
    if got is not None:
        return got[0]
    return sl.eigh(G, lower=False, eigvals_only=True, overwrite_a=overwrite, check_finite=False)


def gram_singular_values(W: Tensor) -> Tensor:
    """All s singular values of the wide ``W`` (s × L), descending, fp64 on the CPU, from the fp64
    Gram matrix (no vectors; accurate to about 1e-8·σ₁): what a rank rule needs to decide when the
    leading values alone cannot."""
    if W.device.type == "cpu" and runtime.scipy_linalg() is not None:
        return sqrt_desc(eigvalsh_numpy(gram_numpy(W, np.float64), overwrite=True))
    Wd = W.double()
    return sqrt_desc(torch.linalg.eigvalsh(Wd @ Wd.mT).cpu().numpy())

"""The one fallback ladder: when a decomposition fails, try the next rung, and say which one ran.

A *rung* is a name and a thunk returning :class:`~.decompositions.Triplets`. :func:`run_ladder`
runs the rungs in order and returns the first result that passes :func:`check_triplets` (finite,
descending, no more energy than the matrix holds, no silent zeros), together with the notes of
the rungs taken — ``("eigh driver evd (gram-eigh: LinAlgError)",)`` — which become
``Decomposition.notes`` and ``LayerStat.fallback``. When every rung fails a
:class:`~.errors.RankwiseError` names each failure; nothing is ever replaced by zeros.

The ladders (:func:`dense_rungs`, :func:`factored_rungs`) are the same shape for both kinds of
input: the primary routine → the other driver → the CPU (from a GPU) → float64 → (dense only) an
fp64 thin SVD after rescaling by the largest entry. CUDA out-of-memory on the factored path moves
to the CPU; on the dense path :func:`.svd.decompose` retries the whole layer on the CPU.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from . import decompositions as dx
from .decompositions import Triplets
from .errors import RankwiseError

Tensor = torch.Tensor


class Rung(NamedTuple):
    name: str
    run: Callable[[], Triplets]


class BadOutput(RuntimeError):
    """A routine returned non-finite or inconsistent values."""


FAILURES: tuple[type[BaseException], ...] = (RuntimeError, ValueError, np.linalg.LinAlgError)


def check_triplets(res: Triplets, fro2: float, s: int) -> Triplets:
    """Reject non-finite or impossible results (they trigger the next ladder step)."""
    S = res.S
    # a sum is finite iff every entry is (entries are O(1) or O(σ₁)): far cheaper than isfinite()
    if not all(math.isfinite(float(t.sum())) for t in (S, res.U, res.Vh)):
        raise BadOutput("non-finite singular values or vectors")
    if S.numel():
        if res.U.shape[1] == S.numel() and bool((S[1:] > S[:-1]).any()):  # keep the contract: descending
            order = torch.argsort(S, descending=True)
            res = res._replace(S=S[order], U=res.U[:, order], Vh=res.Vh[order])
            S = res.S
        captured = float((S.double() ** 2).sum())
        if captured > fro2 * (1 + 1e-3) + 1e-30:
            raise BadOutput(f"singular values exceed the matrix norm ({captured:.6g} > {fro2:.6g})")
        if fro2 > 0 and float(S[0]) ** 2 < 0.25 * fro2 / max(s, 1):
            raise BadOutput("leading singular value is implausibly small (solver returned zeros?)")
    return res


def failure_kind(exc: BaseException) -> str:
    """A short name for a failure (torch's LinAlgError is the private ``_LinAlgError``)."""
    if isinstance(exc, torch.linalg.LinAlgError):
        return "LinAlgError"
    return type(exc).__name__.lstrip("_")


def run_ladder(
    rungs: Sequence[Rung], check: Callable[[Triplets], Triplets], what: str, *, oom_moves_on: bool = False
) -> tuple[Triplets, list[str]]:
    """Run ``rungs`` in order; the first result ``check`` accepts wins. Returns it and the notes of
    the rungs taken after the first (``"name (previous failure)"``); raises RankwiseError naming
    every failure when none works. ``torch.OutOfMemoryError`` propagates unless ``oom_moves_on``."""
    notes: list[str] = []
    reasons: list[str] = []
    last: BaseException | None = None
    for i, rung in enumerate(rungs):
        if i > 0:
            notes.append(f"{rung.name} ({reasons[-1]})")
        try:
            return check(rung.run()), notes
        except torch.OutOfMemoryError as exc:
            if not oom_moves_on:
                raise
            reasons.append(f"{rung.name}: out of memory")
            last = exc
        except FAILURES as exc:  # LinAlgError subclasses RuntimeError
            reasons.append(f"{rung.name}: {failure_kind(exc)}")
            last = exc
    raise RankwiseError(f"SVD of {what} failed on every fallback ({'; '.join(reasons)}); last error: {last}") from last


WideRoutine = Callable[[Tensor, int, bool], Triplets]


def dense_rungs(W: Tensor, k: int, full: bool, primary: Sequence[tuple[str, WideRoutine]]) -> list[Rung]:
    """The ladder of a dense matrix in its wide orientation ``W``: primary routine(s) → the other
    driver (CPU: eigh ``evd``; GPU: thin SVD with ``gesvd``) → the CPU (from a GPU) → float64 →
    an fp64 thin SVD after rescaling. Routines are looked up when the rung runs (tests patch them)."""
    on_gpu = W.device.type != "cpu"
    steps: list[tuple[str, WideRoutine]] = list(primary)
    first_name, first = primary[0]
    if on_gpu:
        steps.append(("gesvd driver", lambda w, kk, f: dx.thin_svd(w, kk, f, driver="gesvd")))
        steps.append(("cpu", lambda w, kk, f: first(w.cpu(), kk, f)))
    elif first_name == "gram-eigh":
        steps.append(("eigh driver evd", lambda w, kk, f: dx.gram_eigh(w, kk, f, driver="evd")))
    else:
        steps.append(("gram-eigh", lambda w, kk, f: dx.gram_eigh(w, kk, f)))
    steps.append(("float64", lambda w, kk, f: dx.gram_eigh(w.cpu().double(), kk, f, driver="evd")))
    steps.append(("thin-svd float64, rescaled", lambda w, kk, f: dx.thin_svd_rescaled(w, kk, f)))
    return [Rung(name, (lambda fn=fn: fn(W, k, full))) for name, fn in steps]


def dense_ladder(
    W: Tensor, k: int, primary: Sequence[tuple[str, WideRoutine]], *, full: bool, fro2: float
) -> tuple[Triplets, list[str]]:
    """:func:`run_ladder` over :func:`dense_rungs`, results checked against ‖W‖_F² = ``fro2``."""
    s = min(W.shape)
    return run_ladder(dense_rungs(W, k, full, primary), lambda r: check_triplets(r, fro2, s),
                      f"a {tuple(W.shape)} matrix")


def factored_rungs(up: Tensor, down: Tensor, k: int | None) -> list[Rung]:
    """The ladder of ``up @ down``: the QR trick → the CPU (from a GPU) → float64."""
    rungs = [Rung("qr-factored", lambda: dx.qr_factored(up, down, k))]
    if up.device.type != "cpu":
        rungs.append(Rung("cpu", lambda: dx.qr_factored(up.cpu(), down.cpu(), k)))
    rungs.append(Rung("float64", lambda: dx.qr_factored(up.cpu().double(), down.cpu().double(), k)))
    return rungs


def factored_ladder(up: Tensor, down: Tensor, k: int | None = None) -> tuple[Triplets, list[str]]:
    s = min(up.shape[0], down.shape[1])

    def check(res: Triplets) -> Triplets:
        fro2 = res.fro2 if res.fro2 is not None else float((res.S.double() ** 2).sum())
        return check_triplets(res, fro2, s)

    return run_ladder(factored_rungs(up, down, k), check, f"up {tuple(up.shape)} @ down {tuple(down.shape)}",
                      oom_moves_on=up.device.type != "cpu")

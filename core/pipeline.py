"""The one layer loop of extract, resize and merge.

Every operation is the same pipeline over layers::

    read (ahead, in a thread)  →  phase 1: decompose  →  phase 2: choose ranks  →  build layers + stats
                                   (once per layer)        (every rule of a sweep, same spectrum)

This module owns everything around the per-layer math, which lives in :mod:`.extract`,
:mod:`.resize` and :mod:`.merge` as small functions (ΔW → decomposition; factors → decomposition):

* :class:`LayerFilter` — the one include/exclude semantics for layer names.
* :class:`ReadAhead` — a bounded read-ahead thread (extract reads two checkpoints while it decomposes).
* :func:`iter_layers` / :func:`run_layers` — workers, progress and cancellation, memory hand-back.
* :class:`RankSelector` / :class:`PolicySelector` / :class:`RankPhase` — the two-phase rank choice
  (see *Two phases* below).
* :func:`layer_stat` / :func:`skipped_stat` — the one :class:`~.report.LayerStat` builder.
* the non-finite policy is :mod:`.finite` (re-exported here).

Two phases
----------
Phase 1 turns a layer into a :class:`Decomposed`: its :class:`~.svd.Decomposition` (the spectrum
plus the leading triplets) and what the rank rules need to know about it (:class:`LayerInfo`).
Phase 2 asks each :class:`RankSelector` of the sweep for a :class:`RankDecision` per layer and
builds one output per selector from the same triplets.

* A **per-layer** selector (``is_global = False``; every :class:`~.rank.RankPolicy`) decides from
  one layer's spectrum. :class:`RankPhase` then runs phase 2 as soon as a layer is decomposed, and
  the triplets are dropped right after: no extra memory.
* A **global** selector (``is_global = True``; e.g. a size budget over the whole file) needs every
  layer's spectrum before it can choose any rank. :class:`RankPhase` then keeps each layer's
  :class:`Decomposed`, truncated to the largest rank any selector may choose for it
  (:meth:`RankSelector.needed`; ``U`` and ``Vh`` in the layer's 16-bit output dtype ``extra["dtype"]``
  when it has one, :meth:`Decomposed.held`), until the last layer; then it calls
  ``select(all_layers)`` once and builds every output. ``LayerInfo.rank_bytes`` gives the exact
  size of the stored layer at any rank (for byte budgets).

Progress and cancellation
-------------------------
``progress(done, total, label)`` is called after each layer on the calling thread. It may raise
anything to cancel (ComfyUI's interrupt exception, :class:`~.errors.Cancelled`); queued layers
are dropped, running ones finish, the exception propagates unchanged. A ``KeyboardInterrupt``
during the loop is turned into :class:`~.errors.Cancelled` (the command line prints one line).
"""

from __future__ import annotations

import fnmatch
import math
import collections
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Generic, Iterable, Iterator, Protocol, Sequence, TypeVar, runtime_checkable

import torch

from .archs import is_text_encoder, text_encoder_kohya_prefixes  # noqa: F401 (re-exported)
from .errors import Cancelled
from .finite import non_finite_parts, overflows, raise_non_finite  # noqa: F401  (the one policy)
from .memory import release_free_memory
from .progress import ProgressFn, report as report_progress
from .rank import RankPolicy, Spectrum, select_rank
from .report import LayerStat
from .svd import Decomposition
from .types import LayerKind, LayerStatus, LoraLayer, SkipReason

Tensor = torch.Tensor
T = TypeVar("T")
R = TypeVar("R")

TEXT_ENCODER_PREFIXES = text_encoder_kohya_prefixes()  # "is this a text encoder?": the architecture records


# ---------------------------------------------------------------------------------------------
# Layer filter
# ---------------------------------------------------------------------------------------------

_GLOB = "*?["


@dataclass(frozen=True)
class LayerFilter:
    """Which layers an operation touches, by kohya module name (``lora_unet_…``, ``lora_te1_…``).

    One semantics everywhere (extract, merge, the nodes' filter widgets, the command line):

    * a pattern with a glob character (``*``, ``?``, ``[``) is a shell glob matched against the
      whole name with :func:`fnmatch.fnmatchcase` (``lora_unet_*attn2*``);
    * a pattern without one is a case-sensitive **substring** (``attn2`` = ``*attn2*``);
    * a layer is kept when it matches some ``include`` pattern (or ``include`` is empty) and no
      ``exclude`` pattern.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", tuple(str(p) for p in self.include if str(p)))
        object.__setattr__(self, "exclude", tuple(str(p) for p in self.exclude if str(p)))

    @staticmethod
    def matches(name: str, pattern: str) -> bool:
        if any(c in pattern for c in _GLOB):
            return fnmatch.fnmatchcase(name, pattern)
        return pattern in name

    def selects(self, name: str) -> bool:
        if self.include and not any(self.matches(name, p) for p in self.include):
            return False
        return not any(self.matches(name, p) for p in self.exclude)

    @property
    def everything(self) -> bool:
        return not self.include and not self.exclude

    def params(self) -> dict[str, str]:
        """Report/metadata parameters (empty entries left out)."""
        out = {}
        if self.include:
            out["include"] = ",".join(self.include)
        if self.exclude:
            out["exclude"] = ",".join(self.exclude)
        return out


# ---------------------------------------------------------------------------------------------
# Read-ahead
# ---------------------------------------------------------------------------------------------


@dataclass
class _Slot(Generic[R]):
    value: R | None = None
    error: BaseException | None = None


class ReadAhead(Generic[T, R]):
    """``read(item)`` for every item, up to ``depth`` items ahead of the consumer, in a daemon thread.

    ``with ReadAhead(items, read, depth) as values: for v in values: …``. With ``depth == 0`` it
    reads in the caller's thread. With ``max_bytes`` (and ``size``, the bytes of a read value) the
    values waiting also stay within that many bytes — except one, so a value larger than the bound
    still passes (at most ``depth`` waiting, plus the one being read). An exception raised by
    ``read`` is re-raised by the consumer at that item's position; leaving the ``with`` (normally,
    by an error or a cancel) stops the thread.
    """

    def __init__(self, items: Sequence[T], read: Callable[[T], R], depth: int = 1,
                 name: str = "rankwise-read-ahead", *, max_bytes: int | None = None,
                 size: Callable[[R], int] | None = None) -> None:
        self._items = tuple(items)
        self._read = read
        self._depth = int(depth)
        self._name = name
        self._max_bytes = max_bytes
        self._size = size if max_bytes is not None else None
        self._stop = threading.Event()
        self._ready: collections.deque[tuple[_Slot, int]] = collections.deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Iterator[R]:
        if self._depth <= 0:
            return (self._read(item) for item in self._items)
        self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
        self._thread.start()
        return self._consume()

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._stop.set()
            self._ready.clear()  # drop what was read ahead (the producer may hold one more)
            self._bytes = 0
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _consume(self) -> Iterator[R]:
        for _ in self._items:
            with self._cond:
                while not self._ready:
                    self._cond.wait()
                slot, nbytes = self._ready.popleft()
                self._bytes -= nbytes
                self._cond.notify_all()
            if slot.error is not None:
                raise slot.error
            yield slot.value

    def _room(self, nbytes: int) -> bool:
        if len(self._ready) >= self._depth:
            return False
        return self._max_bytes is None or not self._ready or self._bytes + nbytes <= self._max_bytes

    def _work(self) -> None:
        for item in self._items:
            if self._stop.is_set():
                return
            slot: _Slot = _Slot()
            try:
                with torch.no_grad():
                    slot.value = self._read(item)
            except BaseException as e:  # noqa: BLE001 — handed to the consumer
                slot.error = e
            nbytes = int(self._size(slot.value)) if self._size is not None and slot.error is None else 0
            with self._cond:
                while not self._stop.is_set() and not self._room(nbytes):
                    self._cond.wait()
                if self._stop.is_set():
                    return
                self._ready.append((slot, nbytes))
                self._bytes += nbytes
                self._cond.notify_all()
            if slot.error is not None:
                return


# ---------------------------------------------------------------------------------------------
# Workers, progress, cancellation, memory
# ---------------------------------------------------------------------------------------------


class LayerLoop:
    """Context for one operation's layer loop: progress after each layer, ``KeyboardInterrupt`` →
    :class:`Cancelled`, and freed heap memory handed back to the OS at the end (:mod:`.memory`)."""

    def __init__(self, total: int, progress: ProgressFn | None) -> None:
        self.total = int(total)
        self.progress = progress
        self.done = 0

    def tick(self, label: str) -> None:
        self.done += 1
        report_progress(self.progress, self.done, self.total, label)

    def __enter__(self) -> "LayerLoop":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        release_free_memory()
        if exc_type is KeyboardInterrupt:
            raise Cancelled(f"cancelled after {self.done} of {self.total} layers") from exc
        return False


def iter_layers(
    fn: Callable[[str], R], names: Sequence[str], *, workers: int = 1, progress: ProgressFn | None = None
) -> Iterator[R]:
    """``fn(name)`` for each name, in order, optionally on ``workers`` threads, with progress.

    With ``workers > 1`` each worker runs its torch ops single-threaded (layer-level parallelism:
    two 1-thread layers at once degrade gracefully on a busy machine, where 2-thread BLAS calls on
    small matrices can be 10× slower than 1 thread). The torch thread count is restored afterwards.
    See the module docstring for progress and cancellation.
    """
    names = list(names)
    total = len(names)

    def call(name: str) -> R:
        with torch.no_grad():  # grad mode is per thread
            return fn(name)

    with LayerLoop(total, progress) as loop:
        if workers <= 1 or total <= 1:
            for name in names:
                result = call(name)
                loop.tick(name)
                yield result
            return
        before = torch.get_num_threads()
        pool = ThreadPoolExecutor(max_workers=int(workers), initializer=torch.set_num_threads, initargs=(1,))
        try:
            # a bounded window of submitted layers: results are consumed in order, so at most
            # 2·workers layers are held at once
            window = 2 * int(workers)
            futures = [pool.submit(call, name) for name in names[:window]]
            for i, name in enumerate(names):
                result = futures[i].result()
                futures[i] = None  # type: ignore[call-overload]
                if i + window < total:
                    futures.append(pool.submit(call, names[i + window]))
                loop.tick(name)
                yield result
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(before)


def run_layers(
    fn: Callable[[str], R], names: Sequence[str], *, workers: int = 1, progress: ProgressFn | None = None
) -> list[R]:
    """``list(iter_layers(...))``."""
    return list(iter_layers(fn, names, workers=workers, progress=progress))


# ---------------------------------------------------------------------------------------------
# Two-phase rank choice
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerInfo:
    """What a rank rule may know about a layer before its spectrum.

    ``limit``: the largest meaningful rank, min(out, in·kh·kw, input rank). ``bytes_per_rank``:
    the stored size of one rank of the output (``(out + in·kh·kw) · element size``), so a layer of
    rank r costs ``rank_bytes(r)`` bytes in the file (plus ``overhead``: alpha and the like).
    """

    name: str
    kind: LayerKind
    shape: tuple[int, ...]
    is_text_encoder: bool
    limit: int
    bytes_per_rank: int = 0
    overhead: int = 0

    def rank_bytes(self, rank: int) -> int:
        return self.overhead + int(rank) * self.bytes_per_rank


@dataclass(frozen=True, eq=False)
class Decomposed:
    """Phase-1 result of one layer: its decomposition and facts about it.

    ``exact_beyond_limit``: every singular value past ``info.limit`` is exactly zero and the
    decomposition is exact there (the QR trick), so rank ``limit`` reproduces ΔW to round-off.
    ``source``: the dense ΔW, kept only while phase 2 runs right away (extract's clamp needs it);
    :class:`RankPhase` drops it when it must hold the layer. ``extra``: per-operation data phase 2
    needs (the output dtype, alpha scale…).
    """

    info: LayerInfo
    dec: Decomposition
    exact_beyond_limit: bool = False
    source: Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def spectrum(self) -> Spectrum:
        return self.dec.spectrum

    def truncated(self, k: int) -> "Decomposed":
        """The same layer holding only its leading k triplets (fresh tensors), without ``source``."""
        k = max(0, min(int(k), self.dec.rank))
        d = self.dec
        if k < d.rank:
            gap = None if d.energy_gap is None else d.energy_gap[:k].clone()
            d = replace(d, U=d.U[:, :k].clone(), S=d.S[:k].clone(), Vh=d.Vh[:k].clone(), energy_gap=gap)
        return replace(self, dec=d, source=None)

    def held(self, k: int, dtype: torch.dtype = torch.float32) -> "Decomposed":
        """:meth:`truncated` for holding until a global allocation: ``U`` and ``Vh`` stored in
        ``dtype`` (the layer's 16-bit output dtype, :func:`hold_dtype`), ``S`` as it is.

        Singular vectors have |values| ≤ 1 (orthonormal columns of ``U``, unit rows of ``Vh``), so a
        16-bit cast cannot overflow; a factor whose cast is not finite or loses more than twice the
        dtype's unit roundoff in relative Frobenius norm (many values flushed to subnormals or zero)
        stays fp32. :meth:`restored` turns them back into fp32 before phase 2.
        """
        k = max(0, min(int(k), self.dec.rank))
        d = self.dec
        gap = None if d.energy_gap is None else (d.energy_gap[:k].clone() if k < d.rank else d.energy_gap)
        U = _held_factor(d.U[:, :k], dtype, copy=k < d.rank)
        Vh = _held_factor(d.Vh[:k], dtype, copy=k < d.rank)
        S = d.S[:k].clone() if k < d.rank else d.S
        return replace(self, dec=replace(d, U=U, S=S, Vh=Vh, energy_gap=gap), source=None)

    def restored(self) -> "Decomposed":
        """The layer with fp32 ``U`` and ``Vh`` again (a no-op when they are)."""
        d = self.dec
        if d.U.dtype == torch.float32 and d.Vh.dtype == torch.float32:
            return self
        return replace(self, dec=replace(d, U=d.U.float(), Vh=d.Vh.float()))

    @property
    def held_bytes(self) -> int:
        """Bytes of the tensors this layer holds (the decomposition's factors and ``source``)."""
        d = self.dec
        parts = [d.U, d.S, d.Vh, d.energy_gap, self.source]
        return sum(t.numel() * t.element_size() for t in parts if t is not None and t.device.type != "meta")


def hold_dtype(output_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a held layer's singular vectors are kept in until phase 2: its output dtype when
    that is fp16 or bf16 (the factors are rounded to it anyway), fp32 otherwise or when unknown."""
    return output_dtype if output_dtype in (torch.float16, torch.bfloat16) else torch.float32


def _held_factor(x: Tensor, dtype: torch.dtype, *, copy: bool) -> Tensor:
    if dtype != torch.float32 and x.dtype == torch.float32 and x.numel() > 0:
        c = x.to(dtype, memory_format=torch.contiguous_format)
        unit = torch.finfo(dtype).eps / 2
        ref2 = float(x.double().pow(2).sum())
        err2 = float((c.float() - x).double().pow(2).sum())
        if math.isfinite(err2) and err2 <= (2 * unit) ** 2 * ref2:
            return c
    return x.clone() if copy else x


@dataclass(frozen=True)
class RankDecision:
    """The rank phase 2 gives one layer. ``capped``: a fixed rank asked above the layer's limit."""

    rank: int
    capped: bool = False
    requested: int | None = None
    certain: bool = True
    full: bool = False  # store the exact full difference (.diff) instead of rank-``rank`` factors


@runtime_checkable
class RankSelector(Protocol):
    """Chooses ranks from phase-1 results (see the module docstring).

    ``needed(info)``: the largest rank this selector may choose for the layer (None: it cannot tell
    before the spectrum; phase 1 then provides enough triplets for what it does choose, or, for a
    global selector, everything up to ``info.limit``). ``select(layers)``: one decision per layer,
    in order; a per-layer selector is called with one layer at a time, a global one once with all.
    ``label``: for reports and metadata.
    """

    is_global: bool

    def needed(self, info: LayerInfo) -> int | None: ...

    def select(self, layers: Sequence[Decomposed]) -> list[RankDecision]: ...

    @property
    def label(self) -> str: ...


@dataclass(frozen=True)
class PolicySelector:
    """A :class:`~.rank.RankPolicy` as a per-layer selector."""

    policy: RankPolicy
    is_global: bool = False

    @property
    def label(self) -> str:
        return self.policy.describe()

    def needed(self, info: LayerInfo) -> int | None:
        cap = self.policy.cap(info.kind, info.is_text_encoder)
        if cap is None:
            return None
        k = min(int(cap), info.limit)
        if self.policy.kohya_compat and not self.policy.rule.is_fixed:
            k = min(k + 1, info.limit)
        return max(k, 1)

    def select(self, layers: Sequence[Decomposed]) -> list[RankDecision]:
        return [self.decide(layer) for layer in layers]

    def decide(self, layer: Decomposed) -> RankDecision:
        info, policy = layer.info, self.policy
        cap = policy.cap(info.kind, info.is_text_encoder)
        spec = layer.spectrum
        limit = max(1, info.limit)
        if spec.full_rank > limit:  # every value past the limit is zero: the rules see [0, limit)
            spec = Spectrum(spec.values[:limit], spec.fro2, limit)
        choice = select_rank(spec, policy.rule, cap=cap, min_rank=policy.min_rank,
                             kohya_compat=policy.kohya_compat)
        requested = cap if policy.rule.is_fixed else None
        rank = max(1, min(choice.rank, limit))
        return RankDecision(rank, capped=requested is not None and requested > limit, requested=requested,
                            certain=choice.certain)


def selectors_of(policies: Sequence[RankPolicy | RankSelector]) -> tuple[RankSelector, ...]:
    """Policies (or selectors) → selectors; a global rule (``size:…``) becomes a
    :class:`~.budget.BudgetSelector` with its default options."""
    from .budget import budget_selectors

    return tuple(p if not isinstance(p, RankPolicy) else PolicySelector(p) for p in budget_selectors(policies))


def triplets_needed(selectors: Sequence[RankSelector], layer: Decomposed) -> int:
    """How many leading triplets phase 2 may use for this layer: the largest per-layer decision
    and, for each global selector, what it declares it may need (its ``limit`` when None)."""
    k = 0
    for s in selectors:
        if s.is_global:
            n = s.needed(layer.info)
            k = max(k, layer.info.limit if n is None else n)
        else:
            k = max(k, max(d.rank for d in s.select([layer])))
    return max(k, 1)


def all_certain(selectors: Sequence[RankSelector], layer: Decomposed) -> bool:
    """Whether the per-layer selectors can decide from the triplets and spectrum held."""
    return all(all(d.certain for d in s.select([layer])) for s in selectors if not s.is_global)


Emit = Callable[[Decomposed, Sequence[RankDecision]], None]


class SpillFile:
    """Held singular vectors parked on disk until the global allocation, in one anonymous temporary
    file (``tempfile.TemporaryFile``: on Linux it has no name, so nothing is left behind by a
    cancel, a crash or SIGKILL). ``park`` writes a tensor's bytes and returns a *meta* tensor of the
    same shape and dtype (no memory; touching its data fails loudly); ``fetch`` reads it back.

    A write that fails (no space in the temp folder, …) disables spilling: the tensor stays in
    memory, and ``failed`` says why.
    """

    def __init__(self, directory: str | None = None) -> None:
        self._dir = directory
        self._file = None
        # id(placeholder) → (placeholder, offset): the placeholder is kept so its id stays unique
        self._where: dict[int, tuple[Tensor, int]] = {}
        self._next = 0
        self.failed: str | None = None
        self.parked_bytes = 0

    def park(self, t: Tensor) -> Tensor:
        if self.failed is not None or t.numel() == 0 or t.device.type != "cpu":
            return t
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="rankwise-held-", dir=self._dir)
            self._file.seek(self._next)
            self._file.write(memoryview(flat))
        except OSError as exc:
            self.failed = f"{type(exc).__name__}: {exc}"
            return t
        placeholder = torch.empty(t.shape, dtype=t.dtype, device="meta")
        self._where[id(placeholder)] = (placeholder, self._next)
        self._next += flat.nbytes
        self.parked_bytes += flat.nbytes
        return placeholder

    def fetch(self, t: Tensor) -> Tensor:
        if t.device.type != "meta":
            return t
        _, offset = self._where.pop(id(t))
        shape, dtype = t.shape, t.dtype
        nbytes = t.numel() * t.element_size()
        buf = bytearray(nbytes)
        self._file.seek(offset)
        view = memoryview(buf)
        got = 0
        while got < nbytes:
            n = self._file.readinto(view[got:])
            if not n:
                raise OSError(f"the spill file ended {nbytes - got} bytes early")
            got += n
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)  # park never parks an empty tensor

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._where.clear()


class RankPhase:
    """Phase 2 driver. ``add(layer)`` hands in a decomposed layer, ``skip(payload)`` a layer that
    was not decomposed (in order), ``finish()`` ends the pass.

    ``emit(layer, decisions)`` (one decision per selector) and ``on_skip(payload)`` are called in
    the layers' order: right away when every selector is per-layer, after the last layer otherwise
    (the held layers truncated to :func:`triplets_needed`).

    ``spill``: park the held layers' singular vectors in a :class:`SpillFile` (the default for a
    global selector: SDXL's held payload is ~1 GB; only S and the spectra stay in memory, which is
    all a selector reads), or keep them in memory (``False``).
    """

    def __init__(self, selectors: Sequence[RankSelector], emit: Emit, on_skip: Callable[[object], None],
                 spill: bool | SpillFile = True) -> None:
        if not selectors:
            raise ValueError("a rank phase needs at least one selector")
        self.selectors = tuple(selectors)
        self.emit = emit
        self.on_skip = on_skip
        self.is_global = any(s.is_global for s in self.selectors)
        self._held: list[tuple[bool, object]] = []
        self.spill: SpillFile | None = None
        if self.is_global and spill is not False:
            self.spill = spill if isinstance(spill, SpillFile) else SpillFile()

    def add(self, layer: Decomposed) -> None:
        if not self.is_global:
            self.emit(layer, [s.select([layer])[0] for s in self.selectors])
            return
        # held compactly: U and Vh in the layer's 16-bit output dtype (``extra["dtype"]``), except
        # where a selector may store the exact full difference (.diff), formed from all triplets
        dtype = torch.float32 if self._may_store_full(layer.info) else hold_dtype(layer.extra.get("dtype"))
        held = layer.held(triplets_needed(self.selectors, layer), dtype)
        if self.spill is not None:
            d = held.dec
            held = replace(held, dec=replace(d, U=self.spill.park(d.U), Vh=self.spill.park(d.Vh)))
        self._held.append((True, held))

    def _fetched(self, layer: Decomposed) -> Decomposed:
        if self.spill is None:
            return layer
        d = layer.dec
        return replace(layer, dec=replace(d, U=self.spill.fetch(d.U), Vh=self.spill.fetch(d.Vh)))

    @property
    def spilled_bytes(self) -> int:
        """Bytes of singular vectors parked on disk (0 without a spill file)."""
        return 0 if self.spill is None else self.spill.parked_bytes

    def _may_store_full(self, info: LayerInfo) -> bool:
        return any(bool(getattr(s, "may_store_full", _never)(info)) for s in self.selectors)

    @property
    def held_bytes(self) -> int:
        """Bytes of the factors held for the global selectors (0 when every selector is per-layer)."""
        return sum(p.held_bytes for is_layer, p in self._held if is_layer)

    @property
    def held_layers(self) -> tuple[Decomposed, ...]:
        return tuple(p for is_layer, p in self._held if is_layer)

    def skip(self, payload: object) -> None:
        if not self.is_global:
            self.on_skip(payload)
        else:
            self._held.append((False, payload))

    def finish(self) -> None:
        if not self.is_global:
            return
        layers = [p for is_layer, p in self._held if is_layer]
        columns = [s.select(layers) if s.is_global else [s.select([x])[0] for x in layers] for s in self.selectors]
        for c in columns:
            if len(c) != len(layers):
                raise ValueError(f"a rank selector returned {len(c)} decisions for {len(layers)} layers")
        i = 0
        held, self._held = self._held, []
        try:
            for j, (is_layer, payload) in enumerate(held):
                held[j] = None  # type: ignore[call-overload]  (each layer's factors go once it is built)
                if is_layer:
                    layers[i] = None  # type: ignore[call-overload]
                    self.emit(self._fetched(payload).restored(), [col[i] for col in columns])
                    i += 1
                else:
                    self.on_skip(payload)
                del payload
        finally:
            if self.spill is not None:
                self.spill.close()


def _never(info: LayerInfo) -> bool:
    return False


# ---------------------------------------------------------------------------------------------
# The one LayerStat builder
# ---------------------------------------------------------------------------------------------


def layer_stat(
    layer: Decomposed,
    decision: RankDecision,
    out_layer: LoraLayer,
    *,
    input_rank: int | None = None,
    error: float | None = None,
    note: str = "",
    dense_input: bool = False,
    missing_in: Sequence[str] = (),
    kept_fp32: bool = False,
) -> LayerStat:
    """The row of a written layer. ``error`` overrides the projection-identity error (clamped factors)."""
    info, dec, k = layer.info, layer.dec, decision.rank
    exact = layer.exact_beyond_limit and k >= info.limit
    # every nonzero singular value kept by an exact re-factorisation: the error is round-off, while
    # √(‖ΔW‖² − Σ S²) would report its fp32 cancellation floor (~3e-4·‖ΔW‖)
    err = 0.0 if exact else dec.error(k)
    optimal = 0.0 if exact else dec.optimal_error(k)
    fallback = dec.fallback
    notes = []
    if decision.capped:
        notes.append(f"rank {decision.requested} capped at {info.limit} (the layer's rank limit)")
    notes.extend(n for n in (fallback or "", note) if n)
    return LayerStat(
        name=info.name,
        kind=info.kind,
        shape=info.shape,
        rank=k,
        input_rank=input_rank,
        retained=dec.spectrum.retained(k),
        error=float(err if error is None else error),
        optimal_error=float(optimal),
        norm=math.sqrt(max(dec.spectrum.fro2, 0.0)),
        nbytes=out_layer.nbytes(),
        status=LayerStatus.FALLBACK if fallback else LayerStatus.OK,
        note="; ".join(notes),
        capped=decision.capped,
        fallback=fallback,
        dense_input=dense_input,
        missing_in=tuple(missing_in),
        kept_fp32=kept_fp32,
    )


def skipped_stat(
    name: str,
    shape: tuple[int, ...],
    reason: SkipReason,
    *,
    input_rank: int | None = None,
    note: str = "",
    norm: float = 0.0,
    non_finite: Sequence[str] = (),
    missing_in: Sequence[str] = (),
    dense_input: bool = False,
) -> LayerStat:
    """The row of a layer that was not written (near-zero rows keep their error = norm)."""
    near_zero = reason is SkipReason.NEAR_ZERO
    return LayerStat(
        name=name,
        kind=LayerKind.of_shape(tuple(shape)),
        shape=tuple(shape),
        rank=0,
        input_rank=input_rank,
        retained=0.0 if (not near_zero or norm > 0) else 1.0,
        error=norm if near_zero else 0.0,
        optimal_error=norm if near_zero else 0.0,
        norm=norm,
        status=LayerStatus.SKIPPED,
        note=note,
        skip=reason,
        non_finite=tuple(non_finite),
        missing_in=tuple(missing_in),
        dense_input=dense_input,
    )


def storage_bytes_per_rank(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes one rank of a plain LoRA layer of this weight shape takes in ``dtype``."""
    out = int(shape[0])
    inner = 1
    for s in shape[1:]:
        inner *= int(s)
    return (out + inner) * torch.empty(0, dtype=dtype).element_size()


def names_in(stats: Iterable[LayerStat], pred: Callable[[LayerStat], bool]) -> list[str]:
    return [s.name for s in stats if pred(s)]

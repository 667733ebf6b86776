"""Safe file IO: reading state dicts, streaming safetensors, loading and saving LoRAs.

* ``.safetensors`` is read natively; its header is validated first, so a truncated or corrupt file gives
  a :class:`FormatError` naming the file and the cause.
* ``.ckpt/.pt/.pth/.bin`` are read with ``torch.load(weights_only=True)``; a pickle that needs anything
  but tensors and plain containers is refused (it could run code).
* Every file Rankwise writes goes through the output guard (:func:`plan_outputs` before the work,
  :func:`write_output` for the bytes): never an input (also via symlink or hard link), never an
  existing file unless asked to, a known extension per kind; the data goes to ``.<name>.<hex>.tmp`` in
  the target folder, is fsync'ed and published atomically (``os.link`` without overwrite, so a
  concurrent run cannot be replaced; ``os.replace`` with it). The temp file is removed in ``finally``
  (errors, Ctrl-C, SIGTERM, cancellation).
"""

from __future__ import annotations

import enum
import errno
import hashlib
import json
import logging
import os
import pickle
import secrets
import struct
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from .errors import FormatError, MismatchError, OutputError, UnsafePathError
from .formats import ReadReport, common_alpha, lora_from_state_dict, lora_items
from .metadata import streamed_hashes
from .stream_write import plan_safetensors, write_plan
from .memory import empty_cpu
from .types import Arch, Lora

if TYPE_CHECKING:
    from PIL.Image import Image

    from .archs import KeyTable

Tensor = torch.Tensor


class InputFileError(FormatError, FileNotFoundError):
    """An input path that is missing, a directory or not a regular file (one-line message)."""

    def __str__(self) -> str:  # OSError would format (errno, strerror); keep the plain message
        return str(self.args[0]) if self.args else ""


MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit (MAX_HEADER_SIZE)
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pt2", ".pkl")

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # as in the header ("F16", "BF16", …)
    shape: tuple[int, ...]
    offsets: tuple[int, int]


@dataclass(frozen=True)
class LoadedFile:
    """A state dict read from disk, with its string metadata and what was dropped on the way."""

    path: str
    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    notes: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# safetensors header


def _is_count(value: object) -> bool:
    """A JSON whole number ≥ 0 (not a bool, not a float)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a .safetensors header without reading tensor data.

    Raises :class:`FormatError` (naming the file and the cause) for a file that is too short, a
    header that is too large or not JSON, tensor entries that do not fit, or a data section that
    does not match the header (truncated or padded file).
    """
    p = os.fspath(path)
    size = os.path.getsize(p)
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{p}: not a safetensors file ({size} bytes, too short for a header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise FormatError(
                f"{p}: not a safetensors file or corrupt (header length {n} exceeds "
                f"{MAX_HEADER_BYTES} bytes)"
            )
        if 8 + n > size:
            raise FormatError(
                f"{p}: truncated or not a safetensors file (header needs {n} bytes, file has {size - 8})"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise FormatError(f"{p}: corrupt safetensors header ({reason})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{p}: corrupt safetensors header (not a JSON object)")
    meta_raw = header.pop("__metadata__", None) or {}
    if not isinstance(meta_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta_raw.items()
    ):
        raise FormatError(f"{p}: corrupt safetensors metadata (must be string → string)")
    infos: dict[str, TensorInfo] = {}
    data_len = size - 8 - n
    for key, entry in header.items():
        if not isinstance(entry, dict):
            raise FormatError(f"{p}: corrupt safetensors header entry for {key!r}")
        dtype, shape_raw, offsets_raw = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if (
            not isinstance(dtype, str)
            or not isinstance(shape_raw, list)
            or not all(_is_count(s) for s in shape_raw)
            or not isinstance(offsets_raw, list)
            or len(offsets_raw) != 2
            or not all(_is_count(o) for o in offsets_raw)
        ):
            raise FormatError(f"{p}: corrupt safetensors header entry for {key!r}")
        shape = tuple(shape_raw)
        begin, end = offsets_raw
        if end < begin:
            raise FormatError(f"{p}: corrupt safetensors header: bad offsets for {key!r}")
        if dtype in _DTYPES:
            itemsize = torch.empty((), dtype=_DTYPES[dtype]).element_size()
            numel = 1
            for s in shape:
                numel *= s
            if end - begin != numel * itemsize:
                raise FormatError(
                    f"{p}: corrupt safetensors header: {key!r} {dtype}{list(shape)} needs "
                    f"{numel * itemsize} bytes, offsets give {end - begin}"
                )
        infos[key] = TensorInfo(dtype, shape, (begin, end))
    end_max = max((i.offsets[1] for i in infos.values()), default=0)
    if end_max > data_len:
        raise FormatError(
            f"{p}: truncated safetensors file (tensor data needs {end_max} bytes after the header, "
            f"the file has {data_len}); download or copy it again"
        )
    cursor = 0  # as safetensors itself requires: the tensors tile the data section, no gaps or overlaps
    for key, info in sorted(infos.items(), key=lambda kv: kv[1].offsets):
        begin, end = info.offsets
        if begin < cursor:
            raise FormatError(f"{p}: corrupt safetensors header: {key!r} overlaps another tensor")
        if begin > cursor:
            raise FormatError(
                f"{p}: corrupt safetensors header: {begin - cursor} bytes before {key!r} belong to no tensor"
            )
        cursor = end
    if end_max < data_len:
        raise FormatError(
            f"{p}: corrupt safetensors file ({data_len - end_max} bytes after the last tensor)"
        )
    return infos, dict(meta_raw)


def _advise_sequential(fd: int) -> bool:
    """Tell the kernel the file is read sequentially; False where ``posix_fadvise`` is missing."""
    if not hasattr(os, "posix_fadvise"):
        return False
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except OSError:
        return False
    return True


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def drop_behind_wanted(path: str) -> bool:
    """Read ``path`` drop-behind? ``RANKWISE_DROP_BEHIND=1``/``0`` decides; otherwise yes when the file
    is larger than a quarter of the memory available now (Linux; elsewhere no)."""
    forced = os.environ.get("RANKWISE_DROP_BEHIND")
    if forced in ("0", "1"):
        return forced == "1"
    avail = _available_memory()
    if avail is None:
        return False
    try:
        return os.path.getsize(path) > avail // 4
    except OSError:
        return False


class SafetensorsSource:
    """Streaming read of one .safetensors file, tensor by tensor.

    ``shape``/``dtype``/``keys`` come from the validated header and read no tensor data. ``get``
    reads exactly that tensor's bytes into a fresh CPU tensor (positional reads, no memory map):
    once the caller drops it, nothing of the file stays in this process's memory, so streaming a
    6.9 GB checkpoint costs one tensor at a time (the OS page cache is not process memory). Safe
    to call from several threads. Use as a context manager or call :meth:`close`.

    Reading is announced as sequential to the kernel. A file larger than a quarter of the memory
    available when it is opened (:func:`drop_behind_wanted`) is read *drop-behind*: the pages of a
    tensor just read leave the page cache, which such a file could not stay in anyway. On the
    2-core machine, reading both SDXL checkpoints tensor by tensor from a cold cache took 5.6–17 s
    of kernel CPU time (page-cache churn) and 2.5–3.4 s drop-behind.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._infos, self.metadata = read_safetensors_header(self.path)
        try:
            self._fh = open(self.path, "rb", buffering=0)
            (n,) = struct.unpack("<Q", self._fh.read(8))
        except OSError as e:
            raise FormatError(f"{self.path}: cannot open as safetensors ({e})") from None
        self._data_start = 8 + n
        self._lock = threading.Lock()
        self._drop_behind = _advise_sequential(self._fh.fileno()) and drop_behind_wanted(self.path)

    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, key: str) -> bool:
        return key in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def _info(self, key: str) -> TensorInfo:
        try:
            return self._infos[key]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor {key!r}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info(key).shape

    def dtype(self, key: str) -> torch.dtype:
        name = self._info(key).dtype
        if name not in _DTYPES:
            raise FormatError(f"{self.path}: tensor {key!r} has dtype {name}, which torch here cannot read")
        return _DTYPES[name]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: i.shape for k, i in self._infos.items()}

    def get(self, key: str) -> Tensor:
        """The tensor on CPU, in its stored dtype (a private copy: writing to it changes nothing on disk)."""
        info = self._info(key)
        dtype = self.dtype(key)
        begin, end = info.offsets
        buf = empty_cpu((end - begin,), torch.uint8)  # huge pages for big tensors (memory.empty_cpu)
        if end > begin:
            self._read_into(memoryview(buf.numpy()), self._data_start + begin, key)
        return buf.view(dtype).reshape(info.shape)

    def _read_into(self, view: memoryview, offset: int, key: str) -> None:
        with self._lock:
            fh = self._fh
            if fh is None:
                raise ValueError(f"{self.path} is closed")
            try:
                fh.seek(offset)
                done = 0
                while done < len(view):
                    got = fh.readinto(view[done:])
                    if not got:
                        raise FormatError(
                            f"{self.path}: cannot read tensor {key!r} (file ended early; was it changed "
                            f"or truncated while open?)"
                        )
                    done += got
                if self._drop_behind and done:
                    try:
                        os.posix_fadvise(fh.fileno(), offset, done, os.POSIX_FADV_DONTNEED)
                    except OSError:  # advice only
                        self._drop_behind = False
            except OSError as e:
                raise FormatError(f"{self.path}: cannot read tensor {key!r} ({e})") from None

    def close(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()

    def __enter__(self) -> "SafetensorsSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# --------------------------------------------------------------------------------------------
# reading


class FileKind(str, enum.Enum):
    SAFETENSORS = "safetensors"
    PICKLE = "pickle"  # a PyTorch zip archive or a legacy pickle stream
    UNKNOWN = "unknown"


def sniff(path: str | os.PathLike) -> FileKind:
    """What a file holds, by its first bytes (never by its name).

    safetensors: an 8-byte little-endian header length, then ``{``; PyTorch: a zip archive (``PK``)
    or a pickle stream (protocol opcode ``0x80``).
    """
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors first: its header length is little-endian, so its first byte may well be 0x80
    # (a header of 384 bytes) — the pickle opcode
    if len(head) == 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= MAX_HEADER_BYTES:
            return FileKind.SAFETENSORS
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return FileKind.PICKLE
    return FileKind.UNKNOWN


def check_input_file(path: str | os.PathLike, what: str = "file") -> str:
    """The path as a string; :class:`InputFileError` (one line) for a missing path, a directory, a broken
    symbolic link or anything else that is not a regular file."""
    p = os.fspath(path)
    if not os.path.lexists(p):
        raise InputFileError(f"no such file: {p}")
    if os.path.isdir(p):
        raise InputFileError(f"{p} is a directory, not a file; give the path of a {what}")
    if not os.path.exists(p):
        raise InputFileError(f"{p} is a broken symbolic link (it points to {os.readlink(p)})")
    if not os.path.isfile(p):
        raise InputFileError(f"{p} is not a regular file (a device or a pipe?); give the path of a {what}")
    return p


def file_kind(path: str) -> tuple[FileKind, tuple[str, ...]]:
    """How to read ``path`` (content first, then its extension) and a note when the two disagree."""
    kind = sniff(path)
    lower = path.lower()
    by_name = (FileKind.SAFETENSORS if lower.endswith(SAFETENSORS_SUFFIXES)
               else FileKind.PICKLE if lower.endswith(PICKLE_SUFFIXES) else FileKind.UNKNOWN)
    if kind is FileKind.UNKNOWN:
        if by_name is FileKind.UNKNOWN:
            raise FormatError(
                f"{path}: neither a safetensors file nor a PyTorch checkpoint (its first bytes match "
                "neither format)"
            )
        return by_name, ()  # let the reader of that format say what is wrong
    if by_name is not FileKind.UNKNOWN and by_name is not kind:
        return kind, (f"{os.path.basename(path)} is a {kind.value} file despite its extension; read by content",)
    return kind, ()


def _read_safetensors(path: str) -> LoadedFile:
    with SafetensorsSource(path) as src:
        tensors = {k: src.get(k) for k in src.keys()}
        return LoadedFile(path, tensors, dict(src.metadata))


def _unsafe_pickle(path: str, err: BaseException) -> FormatError:
    return FormatError(
        f"{path}: refusing to unpickle it — the file needs Python objects beyond plain tensors "
        f"({str(err).splitlines()[0] if str(err) else type(err).__name__}), and unpickling those can run "
        "code. Convert it to .safetensors with a tool you trust, or load it from a trusted source."
    )


def _torch_load(path: str):
    if path.lower().endswith(SAFETENSORS_SUFFIXES):
        # torch.load hands *.safetensors names to the safetensors library; read the bytes we sniffed
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zipfile" not in str(e).lower():
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format


def _read_pickle(path: str) -> LoadedFile:
    try:
        obj = _torch_load(path)
    except pickle.UnpicklingError as e:
        raise _unsafe_pickle(path, e) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise _unsafe_pickle(path, e) from None
        raise FormatError(f"{path}: cannot read as a PyTorch checkpoint ({e})") from None
    notes: list[str] = []
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        dropped_top = [k for k in obj if k != "state_dict"]
        if dropped_top:
            notes.append(f"used the 'state_dict' entry; ignored top-level entries {sorted(map(str, dropped_top))[:6]}")
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise FormatError(f"{path}: holds a {type(obj).__name__}, not a state dict of named tensors")
    tensors: dict[str, Tensor] = {}
    dropped: list[str] = []
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            tensors[str(k)] = v
        else:
            dropped.append(str(k))
    if dropped:
        notes.append(f"dropped {len(dropped)} non-tensor entries: {dropped[:6]}")
    return LoadedFile(path, tensors, {}, tuple(notes))


def read_state_dict(path: str | os.PathLike) -> LoadedFile:
    """Read a state dict (see :func:`load_state_dict`), keeping notes about dropped entries.

    The format is told by content (a safetensors file named ``.ckpt`` is read as safetensors).
    Raises :class:`InputFileError` (also a ``FileNotFoundError``) for a missing path or a directory.
    """
    p = check_input_file(path)
    kind, notes = file_kind(p)
    loaded = _read_safetensors(p) if kind is FileKind.SAFETENSORS else _read_pickle(p)
    if notes:
        loaded = replace(loaded, notes=notes + loaded.notes)
    return loaded


def load_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a .safetensors or a .ckpt/.pt/.pth/.bin file (CPU, stored dtypes).

    Pickles are read with ``weights_only=True`` (memory-mapped where the format allows) and a top-level
    ``"state_dict"`` entry is unwrapped; non-tensor entries are dropped. Raises :class:`FormatError` for
    truncated/corrupt files and for pickles that need code to load.
    """
    loaded = read_state_dict(path)
    return loaded.tensors, loaded.metadata


def load_lora(
    path: str | os.PathLike, *, arch: Arch | None = None, table: KeyTable | None = None,
    skip_bad_modules: bool = False,
) -> tuple[Lora, ReadReport]:
    """Read a LoRA file in any supported format (see :mod:`.formats`).

    ``skip_bad_modules``: drop modules whose factors do not fit their layer (counted in
    ``report.skipped_modules``) instead of raising. The file loader's notes (format told by
    content, ignored ``.ckpt`` entries) are appended to ``report.notes``.
    """
    loaded = read_state_dict(path)
    if not loaded.tensors:
        raise FormatError(f"{loaded.path}: the file holds no tensors, so no LoRA (an empty or placeholder file?)")
    try:
        lora, report = lora_from_state_dict(loaded.tensors, loaded.metadata, arch=arch, table=table,
                                            skip_bad_modules=skip_bad_modules)
    except (FormatError, MismatchError) as e:
        raise type(e)(f"{loaded.path}: {e}") from None
    if loaded.notes:
        report = replace(report, notes=report.notes + loaded.notes)
    return lora, report


# --------------------------------------------------------------------------------------------
# writing


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(directory: str) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# the output guard: every file Rankwise writes (LoRA, cleaned checkpoint, report, picture) goes
# through check_output/plan_outputs (before any work) and write_output (temp file + atomic publish)

_log = logging.getLogger("rankwise")


class OutputKind(str, enum.Enum):
    """What an output file holds; decides the extensions it may have."""

    LORA = "lora"
    CHECKPOINT = "checkpoint"
    REPORT = "report"
    IMAGE = "image"


_EXTENSIONS: Mapping[OutputKind, tuple[str, ...]] = {
    OutputKind.LORA: (".safetensors",),
    OutputKind.CHECKPOINT: (".safetensors",),
    OutputKind.REPORT: (".json",),
    OutputKind.IMAGE: (".png", ".jpg", ".jpeg", ".webp"),
}
_WHAT: Mapping[OutputKind, str] = {
    OutputKind.LORA: "a LoRA",
    OutputKind.CHECKPOINT: "a checkpoint",
    OutputKind.REPORT: "a report",
    OutputKind.IMAGE: "a picture",
}
IMAGE_FORMATS: Mapping[str, str] = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}

# os.link fails with one of these where the filesystem has no hard links (FAT/exFAT, some FUSE/SMB)
_NO_HARD_LINKS = frozenset(
    getattr(errno, name) for name in ("EPERM", "EOPNOTSUPP", "ENOTSUP", "ENOSYS", "EMLINK", "EXDEV")
    if hasattr(errno, name)
)


@dataclass(frozen=True)
class PlannedOutput:
    path: str  # absolute
    kind: OutputKind


@dataclass(frozen=True)
class OutputPlan:
    """Every file one run will write, checked before the run reads a tensor (see :func:`plan_outputs`)."""

    outputs: tuple[PlannedOutput, ...]
    inputs: tuple[str, ...] = ()
    overwrite: bool = False
    dry_run: bool = False

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(o.path for o in self.outputs)

    def describe(self) -> list[str]:
        """``would write <kind> <path>`` lines (what a dry run prints)."""
        return [f"would write {o.kind.value} {o.path}" for o in self.outputs]


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _same_file(a: str, b: str) -> bool:
    """The same file by real path (symlinks) or by device and inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    ia, ib = _identity(a), _identity(b)
    return ia is not None and ia == ib


def os_reason(exc: OSError) -> str:
    """``"No space left on device (ENOSPC)"``: the OS reason of an error, in one line."""
    text = exc.strerror or str(exc) or type(exc).__name__
    code = errno.errorcode.get(exc.errno or -1)
    return f"{text} ({code})" if code else text


def _missing_parent(directory: str) -> str:
    """Why ``directory`` cannot hold a new file: the first part of it that is missing or is a file."""
    probe = directory
    while probe and not os.path.lexists(probe):
        up = os.path.dirname(probe)
        if up == probe:
            break
        probe = up
    if probe != directory and os.path.lexists(probe) and not os.path.isdir(probe):
        return f"{probe} is a file, not a folder"
    if os.path.lexists(directory) and not os.path.isdir(directory):
        return f"{directory} is a file, not a folder"
    return f"the folder {directory} does not exist"


def check_output(
    path: str | os.PathLike,
    kind: OutputKind = OutputKind.LORA,
    *,
    inputs: Sequence[str | os.PathLike] = (),
    overwrite: bool = False,
) -> str:
    """The absolute output path, or :class:`UnsafePathError` when the name has the wrong extension for
    ``kind``, is one of ``inputs`` (same real path, symlink or hard link), is a directory, exists and
    ``overwrite`` is False, or its folder is missing, a file or not writable. Reads no file data."""
    p = os.path.abspath(os.fspath(path))
    for inp in inputs:
        if _same_file(p, os.fspath(inp)):
            raise UnsafePathError(
                f"{p} is one of the inputs ({os.fspath(inp)}); refusing to write over an input — "
                "choose another name"
            )
    exts = _EXTENSIONS[OutputKind(kind)]
    if not p.lower().endswith(exts):
        names = ", ".join(exts)
        raise UnsafePathError(f"{p}: {_WHAT[kind]} is saved as {names}; give a name ending in {exts[0]}")
    directory = os.path.dirname(p)
    if not os.path.isdir(directory):
        raise UnsafePathError(f"cannot write {p}: {_missing_parent(directory)}")
    if os.path.isdir(p):
        raise UnsafePathError(f"{p} is a directory, not a file name")
    if os.path.lexists(p) and not overwrite:
        raise UnsafePathError(f"{p} already exists; choose another name or allow overwriting (--overwrite)")
    if not os.access(directory, os.W_OK):
        raise UnsafePathError(f"cannot write {p}: the folder {directory} is not writable")
    return p


def check_output_path(
    path: str | os.PathLike, *, inputs: Sequence[str | os.PathLike] = (), overwrite: bool = False
) -> str:
    """:func:`check_output` for a ``.safetensors`` file (LoRA or checkpoint)."""
    return check_output(path, OutputKind.LORA, inputs=inputs, overwrite=overwrite)


def plan_outputs(
    outputs: Iterable[tuple[str | os.PathLike, OutputKind]],
    *,
    inputs: Sequence[str | os.PathLike] = (),
    overwrite: bool = False,
    dry_run: bool = False,
) -> OutputPlan:
    """Check every output of a run before it starts (:func:`check_output` for each, and no two the same
    file); call it before reading any tensor so a bad name fails at once. Raises :class:`UnsafePathError`."""
    planned: list[PlannedOutput] = []
    for path, kind in outputs:
        p = check_output(path, OutputKind(kind), inputs=inputs, overwrite=overwrite)
        for other in planned:
            if os.path.realpath(other.path) == os.path.realpath(p):
                raise UnsafePathError(
                    f"{p} would be written twice by this run (as {other.kind.value} and as {OutputKind(kind).value}); "
                    "give each output its own name"
                )
        planned.append(PlannedOutput(p, OutputKind(kind)))
    return OutputPlan(tuple(planned), tuple(os.fspath(i) for i in inputs), overwrite, dry_run)


def _remove_quietly(path: str) -> None:
    """Remove a temp file; a failure (read-only filesystem…) is one logged line, never a second exception."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        _log.warning("could not remove the temp file %s: %s", path, os_reason(e))


def _create_temp(target: str) -> str:
    """A new empty ``.<name>.<hex>.tmp`` next to ``target`` (O_EXCL: never someone else's file)."""
    directory, name = os.path.split(target)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
        os.close(fd)
        return tmp


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _race_error(target: str) -> OutputError:
    return OutputError(
        f"{target} was created by another process while this run was writing; nothing was replaced"
    )


def _publish(tmp: str, target: str, overwrite: bool) -> None:
    """Move the finished temp file to ``target``. Without ``overwrite`` this never replaces a file,
    even one created a moment ago by a concurrent run: ``os.link`` fails if the name exists."""
    if overwrite:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise _race_error(target) from None
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        # No hard links here (FAT/exFAT, some network or FUSE mounts): claim the name first with an
        # empty placeholder created with O_EXCL — only one process can create it, so a concurrent run
        # fails here just as it would at os.link — then os.replace our temp file over our own
        # placeholder. Readers may see an empty file for a moment, but no run's result can replace
        # another's, and a failed replace removes the placeholder again.
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            raise _race_error(target) from None
        os.close(fd)
        try:
            os.replace(tmp, target)
        except BaseException:
            _remove_quietly(target)
            raise
        return
    _remove_quietly(tmp)  # the file now lives at target


def _write_atomically(target: str, write: Callable[[str], None], *, overwrite: bool, fsync: bool) -> None:
    tmp: str | None = None
    try:
        try:
            tmp = _create_temp(target)
            write(tmp)
            if not os.path.isfile(tmp):
                raise OutputError(f"writing {target}: the writer produced no file")
            if fsync:
                _fsync_file(tmp)
            _publish(tmp, target, overwrite)
            _fsync_dir(os.path.dirname(target))
        except OSError as e:
            raise OutputError(f"cannot write {target}: {os_reason(e)}") from None
    finally:
        if tmp is not None:
            _remove_quietly(tmp)


def write_output(
    path: str | os.PathLike,
    write: Callable[[str], None],
    *,
    kind: OutputKind = OutputKind.LORA,
    inputs: Sequence[str | os.PathLike] = (),
    overwrite: bool = False,
    fsync: bool = True,
) -> str:
    """Write one output file safely and return its absolute path.

    The path is checked (:func:`check_output`), then ``write(tmp)`` fills a temp file
    ``.<name>.<hex>.tmp`` created with O_EXCL in the target folder; it is fsync'ed and published:
    without ``overwrite`` by ``os.link`` (a file that appeared meanwhile is never replaced:
    :class:`OutputError`), with it by ``os.replace``. The temp file is removed whatever happens
    (exceptions, KeyboardInterrupt, SIGTERM raised as :class:`~.errors.Terminated`,
    :class:`~.errors.Cancelled`). Every OS error is an :class:`OutputError` naming the path and the reason.
    """
    target = check_output(path, kind, inputs=inputs, overwrite=overwrite)
    _write_atomically(target, write, overwrite=overwrite, fsync=fsync)
    return target


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, overwrite: bool = True) -> None:
    """Low-level :func:`write_output` without the name checks (any extension; replaces by default)."""
    _write_atomically(os.path.abspath(os.fspath(path)), write, overwrite=overwrite, fsync=True)


def write_text_output(
    path: str | os.PathLike,
    text: str,
    *,
    kind: OutputKind = OutputKind.REPORT,
    inputs: Sequence[str | os.PathLike] = (),
    overwrite: bool = False,
) -> str:
    """Write a text file (a JSON report) through the guard."""
    data = text.encode("utf-8")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return write_output(path, write, kind=kind, inputs=inputs, overwrite=overwrite)


def save_image(
    image: "Image",
    path: str | os.PathLike,
    *,
    inputs: Sequence[str | os.PathLike] = (),
    overwrite: bool = False,
) -> str:
    """Save a PIL image as .png/.jpg/.webp (by the name) through the guard."""
    fmt = IMAGE_FORMATS.get(os.path.splitext(os.fspath(path))[1].lower())
    picture = image
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        picture = image.convert("RGB")
    return write_output(
        path, lambda tmp: picture.save(tmp, format=fmt), kind=OutputKind.IMAGE, inputs=inputs, overwrite=overwrite
    )


@dataclass(frozen=True)
class SaveResult:
    path: str
    bytes: int
    sha256: str  # of the whole file (A1111/Civitai "AutoV2" = first 10 hex digits)
    sshs_model_hash: str
    sshs_legacy_hash: str


def save_lora(
    lora: Lora,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float16,
    inputs: Sequence[str | os.PathLike] = (),
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
    uniform_alpha: bool = True,
    naming: str = "auto",
) -> SaveResult:
    """Save ``lora`` as a .safetensors file, with the names ``naming`` says: ``kohya``, ``comfy``
    (``diffusion_model.…``), ``diffusers`` (``transformer.…lora_A/B``) or ``auto`` (the architecture
    record's default: kohya, diffusers for SD3; see ``formats.lora_items``).

    The metadata is ``lora.metadata`` updated with ``metadata``, plus ``sshs_model_hash`` /
    ``sshs_legacy_hash`` (kohya's hashes over the tensors and the ``ss_*`` keys). With
    ``uniform_alpha`` (the default) every low-rank layer is written with one alpha and the same ΔW
    (:func:`~.formats.with_uniform_alpha`): diffusers 0.42 mis-scales files whose alphas vary per
    layer, while ComfyUI, A1111 and kohya read both forms identically.
    Raises :class:`UnsafePathError` (see :func:`check_output_path`), :class:`NonFiniteError` naming
    layers with NaN/Inf before or after the cast, ``TypeError`` for non-string metadata.
    """
    target = check_output_path(path, inputs=inputs, overwrite=overwrite)
    if len(lora) == 0:
        raise FormatError(
            f"{target}: the LoRA is empty (no layers) — nothing to save; check the inputs, filters or "
            "merge ratios that produced it"
        )
    items = lora_items(lora, naming, dtype=dtype, alpha=common_alpha(lora) if uniform_alpha else None)
    md: dict[str, str] = dict(lora.metadata)
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata must be str → str; {k!r} has {type(v).__name__}")
        md[k] = v
    md.pop("sshs_model_hash", None)
    md.pop("sshs_legacy_hash", None)
    header_size = sum(len(k) + len(v) for k, v in md.items())
    if header_size > MAX_HEADER_BYTES // 2:
        raise FormatError(f"{target}: metadata of {header_size} bytes is too large for a safetensors header")
    # Two streaming passes (hash, then write): each tensor is cast when needed and dropped, so
    # saving costs one tensor of memory beyond the LoRA itself.
    model_hash, legacy_hash = streamed_hashes(items, md)
    md["sshs_model_hash"] = model_hash
    md["sshs_legacy_hash"] = legacy_hash
    plan = plan_safetensors(items, md)
    write_output(target, lambda tmp: write_plan(tmp, plan, fsync=False), kind=OutputKind.LORA,
                 inputs=inputs, overwrite=overwrite)
    return SaveResult(
        path=target,
        bytes=os.path.getsize(target),
        sha256=file_sha256(target),
        sshs_model_hash=model_hash,
        sshs_legacy_hash=legacy_hash,
    )

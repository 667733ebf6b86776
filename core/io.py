"""Safe file IO: reading state dicts, streaming safetensors, loading and saving LoRAs.

* ``.safetensors`` is read natively; its header is validated first, so a truncated or corrupt file gives
  a :class:`FormatError` naming the file and the cause.
* ``.ckpt/.pt/.pth/.bin`` are read with ``torch.load(weights_only=True)``; a pickle that needs anything
  but tensors and plain containers is refused (it could run code).
* Writes go to ``<path>.<random>.tmp`` in the target directory, are fsync'ed and moved into place with
  ``os.replace``; the temp file is removed in ``finally`` (errors, Ctrl-C, cancellation). A write never
  replaces one of its inputs, nor an existing file unless asked to.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import pickle
import secrets
import struct
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

import torch

from .errors import FormatError, MismatchError, UnsafePathError
from .formats import ReadReport, common_alpha, lora_from_state_dict, lora_state_items
from .metadata import streamed_hashes
from .stream_write import plan_safetensors, write_plan
from .types import Arch, Lora

if TYPE_CHECKING:
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
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{p}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{p}: corrupt safetensors header (not a JSON object)")
    meta_raw = header.pop("__metadata__", None) or {}
    if not isinstance(meta_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta_raw.items()
    ):
        raise FormatError(f"{p}: corrupt safetensors metadata (must be string → string)")
    infos: dict[str, TensorInfo] = {}
    data_len = size - 8 - n
    end_max = 0
    for key, entry in header.items():
        try:
            dtype = str(entry["dtype"])
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{p}: corrupt safetensors header entry for {key!r}") from None
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
        if begin < 0 or end < begin:
            raise FormatError(f"{p}: corrupt safetensors header: bad offsets for {key!r}")
        end_max = max(end_max, end)
        infos[key] = TensorInfo(dtype, shape, (begin, end))
    if end_max > data_len:
        raise FormatError(
            f"{p}: truncated safetensors file (tensor data needs {end_max} bytes after the header, "
            f"the file has {data_len}); download or copy it again"
        )
    if end_max < data_len:
        raise FormatError(
            f"{p}: corrupt safetensors file ({data_len - end_max} bytes after the last tensor)"
        )
    return infos, dict(meta_raw)


class SafetensorsSource:
    """Streaming read of one .safetensors file, tensor by tensor.

    ``shape``/``dtype``/``keys`` come from the validated header and read no tensor data. ``get``
    reads exactly that tensor's bytes into a fresh CPU tensor (positional reads, no memory map):
    once the caller drops it, nothing of the file stays in this process's memory, so streaming a
    6.9 GB checkpoint costs one tensor at a time (the OS page cache is not process memory). Safe
    to call from several threads. Use as a context manager or call :meth:`close`.
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
        buf = torch.empty(end - begin, dtype=torch.uint8)
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
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return FileKind.PICKLE
    if len(head) == 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= MAX_HEADER_BYTES:
            return FileKind.SAFETENSORS
    return FileKind.UNKNOWN


def check_input_file(path: str | os.PathLike, what: str = "file") -> str:
    """The path as a string; :class:`InputFileError` (one line) for a missing path or a directory."""
    p = os.fspath(path)
    if os.path.isdir(p):
        raise InputFileError(f"{p} is a directory, not a file; give the path of a {what}")
    if not os.path.isfile(p):
        if os.path.lexists(p):
            raise InputFileError(f"{p} is not a regular file (a broken link or a device); give the path of a {what}")
        raise InputFileError(f"no such file: {p}")
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


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write ``path`` atomically: ``write(tmp)`` fills ``<path>.<random>.tmp`` in the same directory,
    which is fsync'ed and moved over ``path`` with ``os.replace``. The temp file is removed whatever
    happens (exceptions, KeyboardInterrupt, :class:`~.errors.Cancelled`)."""
    target = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(target)
    tmp = f"{target}.{secrets.token_hex(6)}.tmp"
    try:
        write(tmp)
        if not os.path.isfile(tmp):
            raise FormatError(f"writing {target}: the writer produced no file")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        _fsync_dir(directory)
    finally:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(
    path: str | os.PathLike, *, inputs: Sequence[str | os.PathLike] = (), overwrite: bool = False
) -> str:
    """The absolute output path, or :class:`UnsafePathError` when it is not a ``.safetensors`` name,
    is one of ``inputs`` (same real path or same file), or exists and ``overwrite`` is False."""
    p = os.path.abspath(os.fspath(path))
    if not p.lower().endswith(".safetensors"):
        raise UnsafePathError(f"{p}: a LoRA is saved as .safetensors; give a name ending in .safetensors")
    for inp in inputs:
        if _same_file(p, os.fspath(inp)):
            raise UnsafePathError(
                f"{p} is one of the inputs ({os.fspath(inp)}); refusing to write over an input — "
                "choose another name"
            )
    if os.path.isdir(p):
        raise UnsafePathError(f"{p} is a directory")
    if os.path.lexists(p) and not overwrite:
        raise UnsafePathError(f"{p} already exists; choose another name or allow overwriting")
    return p


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
) -> SaveResult:
    """Save ``lora`` as a kohya-format .safetensors file.

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
    items = lora_state_items(lora, dtype=dtype, alpha=common_alpha(lora) if uniform_alpha else None)
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
    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
    # Two streaming passes (hash, then write): each tensor is cast when needed and dropped, so
    # saving costs one tensor of memory beyond the LoRA itself.
    model_hash, legacy_hash = streamed_hashes(items, md)
    md["sshs_model_hash"] = model_hash
    md["sshs_legacy_hash"] = legacy_hash
    plan = plan_safetensors(items, md)
    atomic_write(target, lambda tmp: write_plan(tmp, plan, fsync=False))
    return SaveResult(
        path=target,
        bytes=os.path.getsize(target),
        sha256=file_sha256(target),
        sshs_model_hash=model_hash,
        sshs_legacy_hash=legacy_hash,
    )

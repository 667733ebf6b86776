"""Write a .safetensors file one tensor at a time (checkpoints of any size with little memory)."""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch

_ST_DTYPES: Mapping[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_TORCH_DTYPES: Mapping[str, torch.dtype] = {v: k for k, v in _ST_DTYPES.items()}

Producer = Callable[[], torch.Tensor]
StreamItem = tuple[str, Sequence[int], torch.dtype, Producer]


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A torch dtype from a safetensors name (``"F16"``, ``"I64"``) or a torch name (``"float16"``)."""
    if isinstance(name, torch.dtype):
        return name
    if name in _TORCH_DTYPES:
        return _TORCH_DTYPES[name]
    found = getattr(torch, str(name).removeprefix("torch."), None)
    if isinstance(found, torch.dtype):
        return found
    raise ValueError(f"unknown dtype {name!r}; use a safetensors name such as 'F16', 'F32', 'I64'")


def _default_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


# safetensors orders tensors by dtype (its enum, descending) and then by name; reproducing that
# makes our files byte-for-byte what ``safetensors.torch.save`` writes, up to metadata key order
# (safetensors emits a hash map; we sort), so kohya's hashes over them are the same.
_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64")
_RANK = {name: i for i, name in enumerate(_ORDER)}


@dataclass(frozen=True)
class SafetensorsPlan:
    """The exact bytes of a .safetensors file before any tensor is produced.

    ``header`` is the 8-byte length plus the JSON header padded with spaces to a multiple of 8;
    ``items`` are in file order; ``data_bytes`` is the size of the data section.
    """

    header: bytes
    items: tuple[StreamItem, ...]
    data_bytes: int

    @property
    def total_bytes(self) -> int:
        return len(self.header) + self.data_bytes


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def plan_safetensors(items: Iterable[StreamItem], metadata: Mapping[str, str] | None = None) -> SafetensorsPlan:
    """Lay out a file: header JSON and tensor order as safetensors writes them (see ``_ORDER``).

    ``metadata=None`` writes no ``__metadata__`` entry, ``{}`` an empty one (as safetensors does).
    Raises ``ValueError`` for a duplicate key, an unsupported dtype or non-string metadata.
    """
    entries: list[StreamItem] = []
    seen: set[str] = set()
    for key, shape, dtype, producer in items:
        if key in seen or key == "__metadata__":
            raise ValueError(f"duplicate tensor key {key!r}")
        if dtype not in _ST_DTYPES:
            raise ValueError(f"{key}: dtype {dtype} cannot be stored in safetensors")
        seen.add(key)
        entries.append((str(key), tuple(int(x) for x in shape), dtype, producer))
    entries.sort(key=lambda e: (-_RANK[_ST_DTYPES[e[2]]], e[0]))
    header: dict[str, object] = {}
    if metadata is not None:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValueError(f"safetensors metadata must be str → str; {k!r} is {type(v).__name__}")
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    for key, shape, dtype, _ in entries:
        size = _nbytes(shape, dtype)
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    return SafetensorsPlan(struct.pack("<Q", len(blob)) + blob, tuple(entries), offset)


def iter_data(plan: SafetensorsPlan) -> Iterator[memoryview]:
    """The data section, one tensor at a time: each producer is called once, in file order, and
    its result checked against the declared shape and dtype (``ValueError`` otherwise)."""
    for key, shape, dtype, producer in plan.items:
        tensor = producer()
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{key}: producer returned {tuple(tensor.shape)} {tensor.dtype}, declared {shape} {dtype}")
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        del tensor
        yield memoryview(raw.numpy())
        del raw


def write_plan(path: str | os.PathLike, plan: SafetensorsPlan, *, fsync: bool = True) -> None:
    """Write ``plan`` to ``path`` directly (the caller handles temp files and renames)."""
    with open(os.fspath(path), "wb") as f:
        f.write(plan.header)
        for chunk in iter_data(plan):
            f.write(chunk)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def write_safetensors_streaming(
    path: str | os.PathLike,
    items: Iterable[StreamItem],
    metadata: Mapping[str, str] | None = None,
    *,
    fsync: bool = True,
) -> None:
    """Write a .safetensors file one tensor at a time.

    The header (offsets computed from the declared shapes and dtypes, see :func:`plan_safetensors`)
    is written first, then each ``producer()`` is called and its bytes appended, so only one tensor
    is in memory at a time. The file appears atomically (temp file in the target directory, fsync,
    os.replace).

    Args:
        path: the target file.
        items: ``(key, shape, dtype, producer)``; the producer returns a tensor of exactly that
            shape and dtype.
        metadata: string → string, stored under ``__metadata__``.
        fsync: flush the file to disk before the rename (off for throw-away test files).

    Raises:
        ValueError: a duplicate key, an unsupported dtype, non-string metadata, or a producer that
            returned another shape/dtype (no file is left behind).
    """
    plan = plan_safetensors(items, dict(metadata) if metadata else None)
    target = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=os.path.dirname(os.path.abspath(target)))
    os.close(fd)
    try:
        write_plan(tmp, plan, fsync=fsync)
        os.chmod(tmp, _default_file_mode())  # mkstemp creates 0600
        os.replace(tmp, target)
        tmp = None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)

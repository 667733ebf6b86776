"""Write a .safetensors file one tensor at a time (checkpoints of any size with little memory)."""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from typing import Callable, Iterable, Mapping, Sequence

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


def write_safetensors_streaming(
    path: str | os.PathLike,
    items: Iterable[StreamItem],
    metadata: Mapping[str, str] | None = None,
    *,
    fsync: bool = True,
) -> None:
    """Write a .safetensors file one tensor at a time.

    The header (offsets computed from the declared shapes and dtypes) is written first, then each
    ``producer()`` is called in order and its bytes appended, so only one tensor is in memory at
    a time. The file appears atomically (temp file in the target directory, fsync, os.replace).

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
    entries = [(key, tuple(int(s) for s in shape), dtype, producer) for key, shape, dtype, producer in items]
    header: dict[str, object] = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValueError(f"safetensors metadata must be str → str; {k!r} is {type(v).__name__}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for key, shape, dtype, _ in entries:
        if key in header:
            raise ValueError(f"duplicate tensor key {key!r}")
        if dtype not in _ST_DTYPES:
            raise ValueError(f"{key}: dtype {dtype} cannot be stored in safetensors")
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    target = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=os.path.dirname(os.path.abspath(target)))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for key, shape, dtype, producer in entries:
                tensor = producer()
                if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                    raise ValueError(
                        f"{key}: producer returned {tuple(tensor.shape)} {tensor.dtype}, declared {shape} {dtype}"
                    )
                raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                f.write(memoryview(raw.numpy()))
                del tensor, raw
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, _default_file_mode())  # mkstemp creates 0600
        os.replace(tmp, target)
        tmp = None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)

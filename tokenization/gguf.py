"""Reading a GGUF file's metadata (its key-value header), where a model keeps its tokenizer and chat
template. The tensors that follow are never read. Format: llama.cpp's `gguf` specification, version 2
and 3 (little-endian)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class NotGGUF(ValueError):
    """The file is not a GGUF model, or its header is cut short."""


def read_metadata(path: Path) -> dict[str, Any]:
    """Every metadata key of the file, with its value (arrays as lists)."""
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            raise NotGGUF(f"{path} is not a GGUF file")
        version = _unpack(f, "<I")
        if version not in (2, 3):
            raise NotGGUF(f"{path}: GGUF version {version} is not read here")
        _unpack(f, "<Q")  # tensors
        count = _unpack(f, "<Q")
        return {_string(f): _value(f, _unpack(f, "<I")) for _ in range(count)}


def _unpack(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    raw = f.read(size)
    if len(raw) != size:
        raise NotGGUF("the GGUF header is cut short")
    return struct.unpack(fmt, raw)[0]


def _string(f: BinaryIO) -> str:
    size = _unpack(f, "<Q")
    raw = f.read(size)
    if len(raw) != size:
        raise NotGGUF("the GGUF header is cut short")
    return raw.decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int) -> Any:
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        item_kind, count = _unpack(f, "<I"), _unpack(f, "<Q")
        if item_kind in _SCALARS:  # one read for the whole array
            fmt = _SCALARS[item_kind]
            size = struct.calcsize(fmt) * count
            raw = f.read(size)
            if len(raw) != size:
                raise NotGGUF("the GGUF header is cut short")
            return list(struct.unpack(f"<{count}{fmt[1]}", raw))
        return [_value(f, item_kind) for _ in range(count)]
    if kind in _SCALARS:
        return _unpack(f, _SCALARS[kind])
    raise NotGGUF(f"unknown GGUF value type {kind}")

"""Raw safetensors files: read a header, read one tensor with pread, write with aligned data.

The flash format needs two things the `safetensors` library does not give: every FFN tensor's
data must start at a file offset that is a multiple of 16 KiB (so bundles can be read with
O_DIRECT), and a source model larger than memory must be read one tensor at a time without
mapping the whole file. Both are small given the format: an 8-byte little-endian header
length, a JSON header (which may be padded with spaces), then the tensors' bytes.

Alignment between tensors in one file is made with padding tensors (uint8, named
``__padding_N__``), which keeps the file a valid safetensors file that any reader can open.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MlxFlashError

# safetensors dtype name -> (numpy dtype used to hold the raw bytes, bytes per element).
# bfloat16 has no numpy dtype: its raw bits are held as uint16.
DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
    "F64": (np.dtype("<f8"), 8),
    "I64": (np.dtype("<i8"), 8),
    "I32": (np.dtype("<i4"), 4),
    "I16": (np.dtype("<i2"), 2),
    "I8": (np.dtype("i1"), 1),
    "U32": (np.dtype("<u4"), 4),
    "U16": (np.dtype("<u2"), 2),
    "U8": (np.dtype("u1"), 1),
    "BOOL": (np.dtype("?"), 1),
}

PADDING_PREFIX = "__padding_"


class SafetensorsError(MlxFlashError):
    """A safetensors file that cannot be read: names the file and what is wrong."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name: F32, F16, BF16, ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors header: (tensors by name, metadata). Checks every bound."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{path}: truncated safetensors file ({size} bytes)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > 100_000_000 or 8 + hlen > size:
                raise SafetensorsError(f"{path}: corrupt or truncated safetensors header")
            raw = f.read(hlen)
    except OSError as e:
        raise SafetensorsError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SafetensorsError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: corrupt safetensors header")
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + hlen
    tensors: dict[str, TensorInfo] = {}
    for name, spec in header.items():
        try:
            dtype = spec["dtype"]
            shape = tuple(int(s) for s in spec["shape"])
            begin, end = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: corrupt header entry for {name!r}") from None
        if dtype not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        info = TensorInfo(name, dtype, shape, data_start + begin, end - begin)
        if info.nbytes != info.numel * DTYPES[dtype][1] or begin < 0:
            raise SafetensorsError(f"{path}: tensor {name!r} size does not match its shape")
        if data_start + end > size:
            raise SafetensorsError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + end}, file has {size}"
            )
        tensors[name] = info
    return tensors, meta


def pread_exact(fd: int, nbytes: int, offset: int, what: str = "file") -> bytes:
    """os.pread that loops over short reads and raises on end of file."""
    chunks = []
    got = 0
    while got < nbytes:
        b = os.pread(fd, nbytes - got, offset + got)
        if not b:
            raise SafetensorsError(f"{what}: unexpected end of file at byte {offset + got}")
        chunks.append(b)
        got += len(b)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_tensor(path: str | os.PathLike, info: TensorInfo, rows: slice | None = None) -> np.ndarray:
    """Read a tensor (or a range of its leading dimension) with pread: no mmap, no page-in of
    anything else. bfloat16 comes back as uint16 raw bits."""
    np_dtype, esize = DTYPES[info.dtype]
    shape = list(info.shape)
    offset, nbytes = info.offset, info.nbytes
    if rows is not None:
        start, stop, step = rows.indices(shape[0])
        assert step == 1
        row_bytes = nbytes // shape[0] if shape[0] else 0
        offset += start * row_bytes
        nbytes = (stop - start) * row_bytes
        shape[0] = stop - start
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = pread_exact(fd, nbytes, offset, str(path))
    finally:
        os.close(fd)
    return np.frombuffer(buf, dtype=np_dtype).reshape(shape)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    align: int = 1  # the data must start at a file offset that is a multiple of this

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for s in self.shape:
            n *= s
        return n


def plan_file(tensors: list[PlannedTensor], header_align: int = 8) -> tuple[bytes, dict[str, int]]:
    """Lay out a safetensors file: returns (the 8-byte length + padded header, absolute data
    offset of each tensor). Padding tensors keep every aligned tensor's data on its boundary.

    The header is padded with spaces so that the data section starts at a multiple of the
    largest alignment asked for (and at least of 8, as the format recommends)."""
    max_align = max([header_align] + [t.align for t in tensors])
    # The header's size depends on the padding tensors, which depend on the data start:
    # fix the data start first with a generous header estimate, then fill the header.
    entries: list[tuple[str, str, tuple[int, ...], int, int]] = []
    for attempt in range(4):
        reserve = _header_estimate(tensors) * (2 if attempt else 1) + 1024 * attempt
        data_start = _round_up(8 + reserve, max_align)
        entries = []
        pos = 0  # relative to data_start
        for i, t in enumerate(tensors):
            abs_pos = data_start + pos
            pad = _round_up(abs_pos, t.align) - abs_pos
            if pad:
                entries.append((f"{PADDING_PREFIX}{i}__", "U8", (pad,), pos, pos + pad))
                pos += pad
            entries.append((t.name, t.dtype, tuple(t.shape), pos, pos + t.nbytes))
            pos += t.nbytes
        header = {
            name: {"dtype": dt, "shape": list(shape), "data_offsets": [b, e]}
            for name, dt, shape, b, e in entries
        }
        raw = json.dumps(header, separators=(",", ":")).encode()
        if 8 + len(raw) <= data_start:
            raw = raw + b" " * (data_start - 8 - len(raw))
            offsets = {
                name: data_start + b for name, _, _, b, _ in entries if not name.startswith(PADDING_PREFIX)
            }
            return struct.pack("<Q", len(raw)) + raw, offsets
    raise AssertionError("could not lay out safetensors header")  # pragma: no cover


def _header_estimate(tensors: list[PlannedTensor]) -> int:
    per = [len(t.name) + 24 * (len(t.shape) + 1) + 80 for t in tensors]
    return 2 * sum(per) + 64


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


class SafetensorsWriter:
    """Writes a planned safetensors file tensor by tensor (streaming: each tensor may be
    written in several chunks), in the planned order. Padding bytes are zeros.

    Use as a context manager; on an exception the partial file is removed."""

    def __init__(self, path: str | os.PathLike, tensors: list[PlannedTensor]):
        self.path = Path(path)
        self.tensors = tensors
        self.header, self.offsets = plan_file(tensors)
        self._f = open(self.path, "wb")
        self._f.write(self.header)
        self._index = 0
        self._written = 0  # bytes of the current tensor written

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()
            self.path.unlink(missing_ok=True)

    def write(self, name: str, data: np.ndarray | bytes | memoryview) -> None:
        """Append bytes of tensor `name`: the current planned tensor, or the next one once the
        current one is complete."""
        t = self.tensors[self._index]
        if name != t.name:
            if self._written != t.nbytes:
                raise ValueError(f"tensor {t.name} incomplete before {name}")
            self._index += 1
            self._written = 0
            if self._index >= len(self.tensors) or self.tensors[self._index].name != name:
                raise ValueError(f"tensor {name} written out of the planned order")
            t = self.tensors[self._index]
        if self._written == 0:
            gap = self.offsets[t.name] - self._f.tell()
            if gap < 0:
                raise AssertionError("safetensors writer out of place")
            self._f.write(b"\0" * gap)
        if isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data)
        mv = memoryview(data).cast("B")
        if self._written + len(mv) > t.nbytes:
            raise ValueError(f"too many bytes for tensor {t.name}")
        self._f.write(mv)
        self._written += len(mv)

    def close(self) -> None:
        if self._f.closed:
            return
        rest = self.tensors[self._index + 1 :] if self.tensors else []
        current = self.tensors[self._index] if self.tensors else None
        if (current is not None and self._written != current.nbytes) or any(t.nbytes for t in rest):
            self._f.close()
            self.path.unlink(missing_ok=True)
            raise ValueError(f"safetensors file {self.path} closed before all tensors were written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

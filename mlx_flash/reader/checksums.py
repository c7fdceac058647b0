"""Rows verified against checksums: a reader that checks every neuron row it delivers against
the crc32 of that row taken while the whole folder's checksums were verified at load."""

from __future__ import annotations

import errno
import zlib
from concurrent.futures import Future

import numpy as np

from ..errors import MlxFlashError
from ..layout import Manifest
from .errors import FlashReadError
from .flash_reader import FlashReader
from .request import ReadFuture


class FlashChecksumError(FlashReadError, MlxFlashError):
    """A neuron read from flash does not match the checksum taken when the folder was verified."""


class VerifyingReader(FlashReader):
    """A FlashReader (`verify=True`) that checks every neuron row it delivers against the crc32
    of that row taken while the whole folder's checksums were verified at load
    (`layout.verify_layer`): a file changed or corrupted after load is caught at the read.

    The check runs on the float32 rows the reader returns, converted back to the stored dtype
    (exact for float32, float16 and bfloat16), one crc32 per row; in a quantized folder, on the
    stored fields (packed weights as they are, scales and biases converted back), before any
    dequantization."""

    def __init__(self, folder, manifest: Manifest, row_checksums: list[list[np.ndarray]], **kwargs):
        super().__init__(folder, manifest, **kwargs)
        self.row_checksums = row_checksums

    def _submit(self, layer: int, ids: np.ndarray, out=None, rows=None) -> ReadFuture:
        inner = super()._submit(layer, ids, out, rows)
        ids = np.asarray(ids).astype(np.int64, copy=False)
        where = None if rows is None else np.asarray(rows).astype(np.int64, copy=False)
        checked = ReadFuture(self.stats, layer)
        checked.set_running_or_notify_cancel()

        def check(f: Future) -> None:
            try:
                got = Future.result(f, 0)
                self._check(layer, ids, got if where is None else {k: v[where] for k, v in got.items()})
            except BaseException as exc:
                checked.set_exception(exc)
            else:
                checked.set_result(got)

        inner.add_done_callback(check)
        checked._driver = inner.drive  # waiting on it delivers the read here
        return checked

    def _check(self, layer: int, ids: np.ndarray, rows: dict[str, np.ndarray]) -> None:
        entry = self.manifest.layers[layer]
        for seg, crc in zip(entry.segments, self.row_checksums[layer]):
            stored = np.ascontiguousarray(
                np.concatenate(
                    [_stored(rows[c.key], c.dtype).view(np.uint8) for c in self.manifest.columns(seg)], axis=1
                )
            )
            want = crc[ids]
            for j in range(len(ids)):
                if zlib.crc32(stored[j]) != want[j]:
                    n = int(ids[j])
                    raise FlashChecksumError(
                        f"{self.folder / entry.file}: neuron {n} of layer {layer} (tensor {seg.tensor}, byte "
                        f"{seg.row_offset(n)}) does not match the checksum taken at load: the file changed or is "
                        "corrupt; check it with python -m mlx_flash.convert --verify, or convert again",
                        path=str(self.folder / entry.file),
                        offset=seg.row_offset(n),
                        layer=layer,
                        err=errno.EIO,
                    )


def _stored(rows: np.ndarray, dtype: str) -> np.ndarray:
    """float32 rows as they are stored on flash (the inverse of the reader's exact conversion)."""
    if dtype == "float16":
        return rows.astype(np.float16)
    if dtype == "bfloat16":
        return (np.ascontiguousarray(rows).view(np.uint32) >> 16).astype(np.uint16)
    return rows

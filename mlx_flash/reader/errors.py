"""The reader's errors: a failed read names its file, offset and layer."""

from __future__ import annotations

import errno


class FlashReadError(OSError):
    """A read of neuron bundles failed: names the file, the byte offset and the layer."""

    def __init__(self, message: str, *, path: str, offset: int, layer: int, err: int = errno.EIO):
        super().__init__(err, message)
        self.path, self.offset, self.layer = path, offset, layer

    def __str__(self) -> str:
        return str(self.strerror)


class ReaderClosedError(RuntimeError):
    """The reader was closed before (or while) this request ran."""

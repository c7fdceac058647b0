"""The flash folder's files as the reader holds them: opened bypassing the page cache
(O_DIRECT on Linux, F_NOCACHE with read-ahead off on macOS) or, where the filesystem refuses,
through it; the alignment their uncached reads accept; aligned buffers to read into."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..layout import SECTOR

# macOS fcntl commands (sys/fcntl.h), for Pythons whose fcntl module does not name them.
_F_RDAHEAD, _F_NOCACHE = 45, 48


@dataclass(frozen=True)
class FlashFile:
    """An open file of the folder, with its size and mtime when it was opened."""

    fd: int
    path: str
    size: int
    mtime_ns: int

    def changed(self) -> str:
        """'; the file changed since it was opened (...)' when its size or mtime moved, else ''."""
        try:
            st = os.fstat(self.fd)
        except OSError:
            return ""
        if (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns):
            return f"; the file changed since it was opened ({self.size} -> {st.st_size} bytes)"
        return ""


def aligned_empty(nbytes: int) -> np.ndarray:
    """A uint8 array of `nbytes` whose address is a multiple of SECTOR (O_DIRECT needs it)."""
    raw = np.empty(nbytes + SECTOR, dtype=np.uint8)
    skip = -raw.ctypes.data % SECTOR
    return raw[skip : skip + nbytes]


def aligned_scratch(nbytes: int) -> np.ndarray:
    """`aligned_empty` rounded up to whole SECTORs."""
    return aligned_empty(-(-nbytes // SECTOR) * SECTOR)


def direct_alignment(fd: int, size: int) -> int:
    """The smallest alignment of offset, length and buffer address that O_DIRECT reads of the
    open file `fd` (of `size` bytes) accept: 512, 1024 or 2048 bytes when a probe read at that
    alignment (and not a larger one) succeeds, else SECTOR. It is the device's logical block
    size on Linux block devices; probing also covers stacked devices and filesystems that
    sysfs does not describe."""
    buf = memoryview(aligned_empty(2 * SECTOR))
    for a in (512, 1024, 2048):
        if size < 2 * a:
            break
        try:  # offset a, length a, address a past a SECTOR boundary: aligned to a, not to 2a
            if os.preadv(fd, [buf[a : 2 * a]], a) == a:
                return a
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
    return SECTOR


def open_uncached(path: str, opener: Callable[[str, int], int]) -> int:
    """Open `path` bypassing the page cache (O_DIRECT, probed with one aligned read since some
    filesystems accept the flag and refuse the read; on macOS F_NOCACHE and read-ahead off).
    Raises OSError where that is refused or impossible; `opener` is os.open or a test's hook."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    if hasattr(os, "O_DIRECT"):
        fd = opener(path, flags | os.O_DIRECT)
        try:
            os.preadv(fd, [aligned_empty(SECTOR)], 0)
        except OSError:
            os.close(fd)
            raise
        return fd
    if sys.platform != "darwin":
        raise OSError(errno.EINVAL, "no way to bypass the page cache on this platform")
    import fcntl

    fd = opener(path, flags)
    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", _F_NOCACHE), 1)
        fcntl.fcntl(fd, getattr(fcntl, "F_RDAHEAD", _F_RDAHEAD), 0)
    except OSError:
        os.close(fd)
        raise
    return fd

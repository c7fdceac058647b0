"""Linux native asynchronous I/O (io_setup / io_submit / io_getevents), through ctypes.

One thread hands the kernel many O_DIRECT reads in one system call and collects their
completions in another, where a pool of Python threads makes one blocking call per read and
takes the GIL back after each (on a 2-core VM that costs more CPU than the read itself:
benchmarks/RESULTS.md). This is what fio's `libaio` engine does, without libaio: the system
calls are made with libc's `syscall` and the kernel's own structures (linux/aio_abi.h), which
are the same on every Linux architecture listed in `_SYSCALLS`. Elsewhere (macOS, other
architectures) `available()` is False and the reader keeps its threads.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys

IOCB_CMD_PREADV = 7

# io_setup, io_destroy, io_getevents, io_submit
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}


class IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class IOCB(ctypes.Structure):
    """struct iocb (little-endian field order)."""

    _fields_ = [
        ("data", ctypes.c_uint64),
        ("key", ctypes.c_uint32),
        ("rw_flags", ctypes.c_int32),
        ("opcode", ctypes.c_uint16),
        ("reqprio", ctypes.c_int16),
        ("fildes", ctypes.c_uint32),
        ("buf", ctypes.c_uint64),
        ("nbytes", ctypes.c_uint64),
        ("offset", ctypes.c_int64),
        ("reserved2", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("resfd", ctypes.c_uint32),
    ]


class IOEvent(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


assert ctypes.sizeof(IOCB) == 64 and ctypes.sizeof(IOEvent) == 32


def available() -> bool:
    """Whether this platform has the system calls (a kernel may still refuse them: KernelAIO
    then raises OSError)."""
    return sys.platform.startswith("linux") and platform.machine() in _SYSCALLS and sys.byteorder == "little"


class KernelAIO:
    """An AIO context for up to `depth` reads in flight. `submit` takes prepared IOCBs (the
    caller keeps them, their iovecs and buffers alive until their completion is reaped)."""

    def __init__(self, depth: int):
        if not available():
            raise OSError(f"Linux native AIO is not available on {sys.platform} {platform.machine()}")
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._nr = _SYSCALLS[platform.machine()]
        self._syscall = self._libc.syscall
        self._syscall.restype = ctypes.c_long
        self.depth = depth
        self.last_errno = 0
        self._ctx = ctypes.c_ulong(0)
        self._events = (IOEvent * depth)()
        self._check(self._syscall(self._nr[0], ctypes.c_long(depth), ctypes.byref(self._ctx)), "io_setup")

    def _check(self, ret: int, what: str) -> int:
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return ret

    def submit(self, iocbs: list[IOCB]) -> int:
        """Queue the reads; returns how many the kernel took: all of them, unless it refused
        one (then `last_errno` says why, and that one and the rest were not queued)."""
        ptrs = (ctypes.c_void_p * len(iocbs))(*(ctypes.addressof(c) for c in iocbs))
        done = 0
        while done < len(iocbs):
            n = self._syscall(
                self._nr[3],
                self._ctx,
                ctypes.c_long(len(iocbs) - done),
                ctypes.byref(ptrs, done * ctypes.sizeof(ctypes.c_void_p)),
            )
            if n <= 0:
                self.last_errno = ctypes.get_errno() if n < 0 else errno.EAGAIN
                break
            done += n
        return done

    def reap(self, min_nr: int) -> list[tuple[int, int]]:
        """Wait for at least `min_nr` completions; returns (data, res) pairs: res the bytes
        read, or -errno."""
        while True:
            n = self._syscall(
                self._nr[2], self._ctx, ctypes.c_long(min_nr), ctypes.c_long(self.depth), self._events, None
            )
            if (
                n >= 0 or ctypes.get_errno() != errno.EINTR
            ):  # EINTR: a signal arrived (Ctrl-C is handled by Python later)
                break
        self._check(n, "io_getevents")
        return [(self._events[i].data, self._events[i].res) for i in range(n)]

    def close(self) -> None:
        """Destroy the context (the kernel waits for reads still in flight)."""
        if self._ctx.value:
            self._syscall(self._nr[1], self._ctx)
            self._ctx = ctypes.c_ulong(0)

"""Fault injection, an argument of every engine: `Fault(kind, at)` makes the engine's `at`-th
low-level read (1-based, counted over the engine's life, continuations and retries included)
behave as if the kernel had answered:

- "eio": the read fails with EIO;
- "short": it returns 0 bytes (end of file);
- "partial": it returns only its first 512 bytes (the engine must continue the read);
- "eintr": it is interrupted by a signal (EINTR; the engine must retry it).

The Python engines apply it around their read call (`FaultyPread`); the native engine applies
the same faults in C, to the result of the system call or io_uring completion."""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterable
from dataclasses import dataclass

FAULT_KINDS = ("eio", "short", "partial", "eintr")
PARTIAL_BYTES = 512


@dataclass(frozen=True)
class Fault:
    kind: str
    at: int

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS or self.at < 1:
            raise ValueError(f"Fault(kind in {FAULT_KINDS}, at >= 1), got {self.kind!r}, {self.at}")


def fault_table(faults: Iterable[Fault]) -> dict[int, str]:
    """{read ordinal: kind}, refusing two faults on one read."""
    table: dict[int, str] = {}
    for f in faults:
        if f.at in table:
            raise ValueError(f"two faults injected into read {f.at}")
        table[f.at] = f.kind
    return table


class FaultCounter:
    """Counts an engine's low-level reads and says which fault, if any, the next one gets."""

    def __init__(self, faults: Iterable[Fault]):
        self._table = fault_table(faults)
        self._lock = threading.Lock()
        self.calls = 0

    def next_kind(self) -> str | None:
        with self._lock:
            self.calls += 1
            return self._table.get(self.calls)


class FaultyPread:
    """A preadv-like callable that injects the faults of `counter` into the reads it passes
    to `pread`."""

    def __init__(self, counter: FaultCounter, pread):
        self.counter, self._pread = counter, pread

    def __call__(self, fd: int, bufs: list[memoryview], offset: int) -> int:
        kind = self.counter.next_kind()
        if kind == "eio":
            raise OSError(errno.EIO, "Input/output error")
        if kind == "eintr":
            raise InterruptedError(errno.EINTR, "Interrupted system call")
        if kind == "short":
            return 0
        if kind == "partial":
            return self._pread(fd, [bufs[0][: min(len(bufs[0]), PARTIAL_BYTES)]], offset)
        return self._pread(fd, bufs, offset)

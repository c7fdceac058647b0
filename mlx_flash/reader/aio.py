"""The Linux native AIO engine (`kernel_aio`): one thread keeps up to `depth` O_DIRECT reads
in flight (one IOCB each: a vectored read into the output rows, or a read into a per-slot
scratch buffer that is converted into the outputs when it completes), and resolves each
request when its last read has completed."""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .errors import ReaderClosedError
from .faults import PARTIAL_BYTES, Fault, FaultCounter, FaultyPread
from .files import aligned_scratch
from .kernel_aio import IOCB, IOCB_CMD_PREADV, IOVec, KernelAIO
from .plan import IOV_MAX, Chunk
from .request import Request, continue_read, pread_retrying
from .stats import LayerIOStats


@dataclass
class _Progress:
    """One request's reads on the AIO thread."""

    inflight: int = 0
    exhausted: bool = False  # no chunk of it is left to issue
    finished: bool = False
    bytes_read: int = 0
    bytes_used: int = 0
    into_outputs: int = 0
    via_scratch: int = 0
    latencies: list[float] = field(default_factory=list)


class AioEngine:
    """Runs requests on one thread with up to `depth` reads in flight through Linux AIO.
    faults: `Fault`s applied to the kernel's completions (and the synchronous continuations)."""

    name = "aio"
    requires_direct = True

    def __init__(self, depth: int, *, faults: tuple[Fault, ...] = ()):
        self._aio = KernelAIO(depth)  # OSError where the kernel refuses
        self._depth = depth
        self._faults = FaultCounter(faults) if faults else None
        self._pread = FaultyPread(self._faults, os.preadv) if faults else os.preadv
        self._queue: deque[Request] = deque()
        self._progress: dict[Request, _Progress] = {}
        self._cv = threading.Condition()
        self._closing = False
        self._broken: BaseException | None = None
        # Per slot (one read in flight each, its IOCB's data = the slot): an IOCB and an iovec
        # array made once, a scratch buffer grown as needed, and what the read is for.
        self._cbs = [IOCB() for _ in range(depth)]
        self._iovs = [(IOVec * IOV_MAX)() for _ in range(depth)]
        for cb, iov in zip(self._cbs, self._iovs):
            cb.opcode, cb.buf = IOCB_CMD_PREADV, ctypes.addressof(iov)
        self._scratch: list[np.ndarray | None] = [None] * depth
        self._flights: list[tuple | None] = [None] * depth  # (req, chunk, vectored, addresses)
        self._t0 = [0.0] * depth  # when the slot's read was submitted
        self._thread = threading.Thread(target=self._run, name="mlx_flash-aio", daemon=True)
        self._thread.start()

    def start(self, req: Request) -> None:
        """Queue a request; OSError if the AIO thread has stopped on an error (the engine is
        then unusable). Never resolves the request's future itself."""
        req.worker_started()
        with self._cv:
            if self._broken is not None:
                raise OSError(f"the reader's AIO thread stopped: {self._broken!r}")
            if self._closing:
                raise ReaderClosedError("FlashReader is closed")
            self._progress[req] = _Progress()
            self._queue.append(req)
            self._cv.notify()

    def close(self) -> None:
        """Stop issuing, wait for the reads in flight, fail what is left, destroy the context."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join()
        self._aio.close()

    # -- the AIO thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
            error: BaseException | None = None
        except BaseException as exc:  # noqa: BLE001 - a failure here must not leave futures hanging
            error = exc
            self._aio.close()  # waits for the reads in flight: none lands in a buffer later
        with self._cv:
            self._broken = error
            left, self._queue = list(self._queue), deque()
        left += [f[0] for f in self._flights if f is not None and f[0] not in left]
        for req in left:
            req.fail(error or ReaderClosedError("FlashReader closed before the request finished"), now=True)

    def _loop(self) -> None:
        free = list(range(self._depth))
        while True:
            with self._cv:
                while not self._queue and len(free) == self._depth and not self._closing:
                    self._cv.wait()
                closing = self._closing
            if closing and len(free) == self._depth:
                return
            batch = [] if closing else self._issue(free)
            if batch:
                self._submit(batch, free)
            if len(free) < self._depth:
                for slot, res in self._aio.reap(1):
                    self._complete(slot, res, free)

    def _issue(self, free: list[int]) -> list[int]:
        """Prepare the next chunks of the queued requests, one free slot each."""
        batch = []
        while free:
            with self._cv:
                if not self._queue:
                    break
                req = self._queue[0]
            i = len(req.chunks) if req.failed else next(req.next_job)
            if i >= len(req.chunks):
                with self._cv:
                    self._queue.popleft()
                self._progress[req].exhausted = True
                self._finish_if_done(req)
                continue
            slot = free.pop()
            self._prepare(req, req.chunks[i], slot)
            batch.append(slot)
        return batch

    def _prepare(self, req: Request, chunk: Chunk, slot: int) -> None:
        vectored = req.vectored(chunk)
        scratch = self._scratch[slot]
        if scratch is None or len(scratch) < chunk.length:
            scratch = self._scratch[slot] = aligned_scratch(max(chunk.length, req.max_length))
        bufs = req.buffers(chunk, vectored, memoryview(scratch))
        iov = self._iovs[slot]
        for k, b in enumerate(bufs):  # addresses of the buffers (kept alive in _flights)
            v = iov[k]
            v.base, v.len = ctypes.addressof(ctypes.c_char.from_buffer(b)), len(b)
        cb = self._cbs[slot]
        cb.data, cb.fildes, cb.nbytes, cb.offset = slot, chunk.reads.file.fd, len(bufs), chunk.offset
        self._flights[slot] = (req, chunk, vectored, bufs)
        self._progress[req].inflight += 1

    def _submit(self, batch: list[int], free: list[int]) -> None:
        t0 = time.perf_counter()
        for slot in batch:
            self._t0[slot] = t0
        done = self._aio.submit([self._cbs[slot] for slot in batch])
        for slot in batch[done:]:  # refused by the kernel: those requests fail
            req, chunk = self._flights[slot][:2]
            err = self._aio.last_errno
            self._settle(slot, free, req.read_error(chunk, 0, err, os.strerror(err)))

    def _complete(self, slot: int, res: int, free: list[int]) -> None:
        req, chunk, vectored, bufs = self._flights[slot]
        p = self._progress[req]
        p.latencies.append(time.perf_counter() - self._t0[slot])
        kind = self._faults.next_kind() if self._faults is not None else None
        res = {"eio": -errno.EIO, "eintr": -errno.EINTR, "short": 0}.get(kind, res)
        if kind == "partial":
            res = min(res, PARTIAL_BYTES)
        error = None
        if not req.failed:
            try:
                if res == -errno.EINTR:  # retried synchronously
                    res = pread_retrying(self._pread, req, chunk, list(bufs), 0, p.latencies)
                if res < 0:
                    raise req.read_error(chunk, 0, -res, os.strerror(-res))
                got = res
                if got < chunk.need:  # a short read: go on synchronously from where it stopped
                    got = continue_read(self._pread, req, chunk, list(bufs), got, p.latencies)
                p.bytes_read += got
                p.bytes_used += (chunk.stop - chunk.first) * chunk.reads.segment.row_bytes
                if vectored:
                    p.into_outputs += 1
                else:
                    req.scatter(chunk, self._scratch[slot])
                    p.via_scratch += 1
            except BaseException as exc:  # noqa: BLE001 - it reaches the caller through the future
                error = exc
        self._settle(slot, free, error)

    def _settle(self, slot: int, free: list[int], error: BaseException | None) -> None:
        req = self._flights[slot][0]
        self._flights[slot] = None
        free.append(slot)
        self._progress[req].inflight -= 1
        if error is not None:
            req.fail(error)
        self._finish_if_done(req)

    def _finish_if_done(self, req: Request) -> None:
        p = self._progress[req]
        if p.finished or not p.exhausted or p.inflight:
            return
        p.finished = True
        del self._progress[req]
        req.worker_done(
            LayerIOStats.of_reads(p.bytes_read, p.bytes_used, p.latencies, p.into_outputs, p.via_scratch)
        )

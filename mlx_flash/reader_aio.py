"""The FlashReader's reads issued through Linux native AIO (`kernel_aio`) by one thread.

The thread takes the chunks of the queued requests in order, keeps up to `depth` of them in
flight (one IOCB each: a vectored read into the output rows, or a read into a scratch buffer
that is converted into the outputs when it completes), and resolves each request when its last
read has completed. Planning, vectored row buffers, conversion, short-read continuation and
error messages are the reader's own (`FlashReader`), shared with the thread pool.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .io_stats import LayerIOStats
from .kernel_aio import IOCB, IOCB_CMD_PREADV, IOVec, KernelAIO

if TYPE_CHECKING:  # pragma: no cover
    from .reader import FlashReader, _Chunk, _Request


@dataclass
class _Progress:
    """One request's reads on the AIO thread."""

    inflight: int = 0
    exhausted: bool = False  # no chunk of it is left to issue
    finished: bool = False
    bytes_read: int = 0
    bytes_used: int = 0
    latencies: list[float] = field(default_factory=list)


class AioDriver:
    """Runs a reader's requests on one thread with up to `depth` reads in flight."""

    def __init__(self, reader: FlashReader, depth: int, iov_max: int):
        self._reader = reader
        self._aio = KernelAIO(depth)  # OSError where the kernel refuses
        self._depth = depth
        self._queue: deque[_Request] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._broken: BaseException | None = None
        # Per slot (one read in flight each, its IOCB's data = the slot): an IOCB and an iovec
        # array made once, a scratch buffer grown as needed, and what the read is for.
        self._cbs = [IOCB() for _ in range(depth)]
        self._iovs = [(IOVec * iov_max)() for _ in range(depth)]
        for cb, iov in zip(self._cbs, self._iovs):
            cb.opcode, cb.buf = IOCB_CMD_PREADV, ctypes.addressof(iov)
        self._scratch: list[np.ndarray | None] = [None] * depth
        self._scratch_at = [0] * depth
        self._flights: list[tuple | None] = [None] * depth  # (req, chunk, vectored, spans)
        self._t0 = [0.0] * depth  # when the slot's read was submitted
        self._thread = threading.Thread(target=self._run, name="mlx_flash-aio", daemon=True)
        self._thread.start()

    def start(self, req: _Request) -> None:
        """Queue a request; OSError if the AIO thread has stopped on an error (the reader is
        then unusable). Never resolves the request's future itself."""
        req.aio_progress = _Progress()
        req.out_addresses = {k: v.ctypes.data for k, v in req.out.items()}  # for the iovecs
        req.worker_started()
        with self._cv:
            if self._broken is not None:
                raise OSError(f"the reader's AIO thread stopped: {self._broken!r}")
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
        from .reader import ReaderClosedError

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
                req.aio_progress.exhausted = True
                self._finish_if_done(req)
                continue
            slot = free.pop()
            self._prepare(req, req.chunks[i], slot)
            batch.append(slot)
        return batch

    def _prepare(self, req: _Request, chunk: _Chunk, slot: int) -> None:
        reads = chunk.reads
        vectored = self._reader._vectored(req, chunk)
        scratch = self._scratch[slot]
        if scratch is None or len(scratch) < chunk.length:
            scratch = self._scratch[slot] = self._reader._new_scratch(max(chunk.length, req.max_length))
            self._scratch_at[slot] = scratch.ctypes.data
        iov, s0 = self._iovs[slot], self._scratch_at[slot]
        if vectored:
            spans = self._reader._row_spans(req, chunk)
            bases = req.out_addresses
            for k, (name, off, n) in enumerate(spans):
                v = iov[k]
                v.base, v.len = (s0 if name is None else bases[name]) + off, n
        else:
            spans = None
            v = iov[0]
            v.base, v.len = s0, chunk.length
        cb = self._cbs[slot]
        cb.data, cb.fildes, cb.nbytes, cb.offset = (
            slot,
            reads.file.fd,
            len(spans) if vectored else 1,
            chunk.offset,
        )
        self._flights[slot] = (req, chunk, vectored, spans)
        req.aio_progress.inflight += 1

    def _submit(self, batch: list[int], free: list[int]) -> None:
        t0 = time.perf_counter()
        for slot in batch:
            self._t0[slot] = t0
        done = self._aio.submit([self._cbs[slot] for slot in batch])
        for slot in batch[done:]:  # refused by the kernel: those requests fail
            req, chunk = self._flights[slot][:2]
            err = OSError(self._aio.last_errno, os.strerror(self._aio.last_errno))
            self._settle(slot, free, self._reader._read_error(req.layer, chunk, 0, err))

    def _complete(self, slot: int, res: int, free: list[int]) -> None:
        req, chunk, vectored, spans = self._flights[slot]
        p = req.aio_progress
        p.latencies.append(time.perf_counter() - self._t0[slot])
        r = self._reader
        error = None
        if not req.failed:
            try:
                if res < 0:
                    raise r._read_error(req.layer, chunk, 0, OSError(-res, os.strerror(-res)))
                got = res
                if got < chunk.need:  # a short read: go on synchronously from where it stopped
                    scratch = memoryview(self._scratch[slot])
                    bufs = r._span_buffers(req, spans, scratch) if vectored else [scratch[: chunk.length]]
                    got = r._read_rest(req.layer, chunk, bufs, got, p.latencies)
                p.bytes_read += got
                p.bytes_used += (chunk.stop - chunk.first) * chunk.reads.segment.row_bytes
                if not vectored:
                    r._scatter(req, chunk, self._scratch[slot])
            except BaseException as exc:  # noqa: BLE001 - it reaches the caller through the future
                error = exc
        self._settle(slot, free, error)

    def _settle(self, slot: int, free: list[int], error: BaseException | None) -> None:
        req = self._flights[slot][0]
        self._flights[slot] = None
        free.append(slot)
        req.aio_progress.inflight -= 1
        if error is not None:
            req.fail(error)
        self._finish_if_done(req)

    def _finish_if_done(self, req: _Request) -> None:
        p = req.aio_progress
        if p.finished or not p.exhausted or p.inflight:
            return
        p.finished = True
        local = LayerIOStats()
        local.bytes_read, local.bytes_used, local.reads = p.bytes_read, p.bytes_used, len(p.latencies)
        local.read_latency.add_many(p.latencies)
        req.worker_done(local, self._reader.stats)

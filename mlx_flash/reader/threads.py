"""The thread engine: a pool of Python threads, each taking a request's next read and making
one blocking `os.preadv` (which releases the GIL). Pure Python: the reference engine in tests,
and the fallback where the native engine is not built."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .errors import ReaderClosedError
from .faults import Fault, FaultCounter, FaultyPread
from .files import aligned_scratch
from .request import Pread, Request, continue_read, pread_retrying
from .stats import LayerIOStats


class ThreadEngine:
    """`threads` threads, one blocking read each. pread: the low-level read (os.preadv; a test
    may pass its own, e.g. one that blocks); faults: `Fault`s injected into it."""

    name = "threads"

    def __init__(self, threads: int, *, pread: Pread | None = None, faults: tuple[Fault, ...] = ()):
        if threads < 1:
            raise ValueError("threads must be >= 1")
        self.threads = threads
        self.pread: Pread = (
            FaultyPread(FaultCounter(faults), pread or os.preadv) if faults else (pread or os.preadv)
        )
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._closed = False

    def start(self, req: Request) -> None:
        with self._lock:
            if self._closed:
                raise ReaderClosedError("FlashReader is closed")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="mlx_flash-reader")
            workers = min(self.threads, len(req.chunks))
            for _ in range(workers):  # all counted first: else the first one could finish the request alone,
                req.worker_started()  # and a later one finish it again (its stats counted twice)
            for _ in range(workers):
                self._pool.submit(self._drain, req)

    def close(self) -> None:
        """Stop taking reads and wait for the threads (reads in flight finish first)."""
        with self._lock:
            self._closed = True
            pool = self._pool
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _drain(self, req: Request) -> None:
        """A worker: take the request's next read until none is left or one failed. The hot
        loop of the engine: names bound once, one read and one clock pair per chunk, the rare
        short read continued apart (`continue_read`)."""
        latencies: list[float] = []
        read_bytes = used_bytes = direct = scratched = 0
        try:
            scratch = self._scratch(req.max_length)
            scratch_view = memoryview(scratch)
            chunks, n, next_job, pread = req.chunks, len(req.chunks), req.next_job, self.pread
            while not req.failed and not self._closed:
                i = next(next_job)
                if i >= n:
                    break
                chunk = chunks[i]
                vectored = req.vectored(chunk)
                bufs = req.buffers(chunk, vectored, scratch_view)
                got = pread_retrying(pread, req, chunk, bufs, 0, latencies)
                if got < chunk.need:
                    got = continue_read(pread, req, chunk, bufs, got, latencies)
                read_bytes += got
                used_bytes += (chunk.stop - chunk.first) * chunk.reads.segment.row_bytes
                if vectored:
                    direct += 1
                else:
                    req.scatter(chunk, scratch)
                    scratched += 1
            if self._closed and not req.failed:
                raise ReaderClosedError("FlashReader closed while a request was running")
        except BaseException as exc:  # every error reaches the caller; the worker lives on
            req.fail(exc)
        finally:
            req.worker_done(LayerIOStats.of_reads(read_bytes, used_bytes, latencies, direct, scratched))

    def _scratch(self, nbytes: int) -> np.ndarray:
        """This thread's scratch buffer, grown to `nbytes` when needed."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < nbytes:
            buf = self._local.buf = aligned_scratch(nbytes)
        return buf

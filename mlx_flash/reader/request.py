"""One submitted request as the engines see it: its reads (`Chunk`s), where each read's bytes
go, how a finished read is delivered into the outputs, the errors a read turns into, and the
future that resolves when its last read has stopped.

Engines only execute reads and report back through these methods: `vectored`/`spans`/
`buffers`/`iovecs` say where a read lands, `scatter` converts a read that landed in scratch,
`read_error`/`short_read_error` name what failed, and `worker_started`/`worker_done`/`fail`
resolve the future."""

from __future__ import annotations

import errno
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import FINISHED
from functools import cached_property

import numpy as np

from .errors import FlashReadError
from .plan import IOV_MAX, RAW_DTYPES, Chunk, Planner, SegmentPlan, SegmentReads, convert_into
from .stats import IOStats, LayerIOStats

Pread = Callable[[int, list[memoryview], int], int]  # os.preadv's signature


class ReadFuture(Future):
    """A Future of a read request; `result()` adds the time the caller blocked in it to the
    reader's `wait_seconds` for the layer. An engine that delivers a request in the thread that
    waits for it (the native one) sets `_driver(block)`: `result()`, `exception()` and `done()`
    call it first, so that the caller's own thread delivers the request when it is finished
    (`block`: once it has finished) instead of waking another thread to do it."""

    _driver: Callable[[bool], None] | None = None

    def __init__(self, stats: IOStats, layer: int):
        super().__init__()
        self._stats, self._layer = stats, layer

    def drive(self, block: bool = True) -> None:
        """Deliver the request here if it finished (block: wait until it has)."""
        if self._driver is not None and self._state != FINISHED:
            self._driver(block)

    def result(self, timeout: float | None = None):
        if self._state == FINISHED:
            return super().result(0)
        t0 = time.perf_counter()
        try:
            if timeout is None:
                self.drive()
            return super().result(timeout)
        finally:
            self._stats.add_wait(self._layer, time.perf_counter() - t0)

    def exception(self, timeout: float | None = None):
        if timeout is None:
            self.drive()
        return super().exception(timeout)

    def done(self) -> bool:
        if self._state != FINISHED:
            self.drive(block=False)
        return super().done()


class Request:
    """One submitted request: its ids, outputs, progress, and the future to resolve. Its reads
    (`plans`, `chunks`) are planned by the Python planner on first use (the native engine plans
    them in C from `ids`, `dest` and `reads`)."""

    def __init__(
        self,
        layer: int,
        ids: np.ndarray,
        reads: tuple[SegmentReads, ...],
        planner: Planner,
        out: dict[str, np.ndarray],
        dest: np.ndarray | None,
        gather: tuple[np.ndarray, dict[str, np.ndarray]] | None,
        future: ReadFuture,
        stats: IOStats,
    ):
        """reads: the layer's segments; dest: output row of each sorted id (None: the same row);
        gather: (inverse, final) when ids repeat: the unique rows read into `out` are gathered
        into `final` at the end."""
        self.layer, self.ids, self.out, self.dest, self.gather = layer, ids, out, dest, gather
        self.reads, self.planner = reads, planner
        self.future = future
        self.batch = None  # the native engine's handle
        self._chunks: list[Chunk] | None = None
        self.next_job = itertools.count()  # next(...) is atomic under the GIL
        self.failed = False
        self._error: BaseException | None = None
        self.t_submit = time.perf_counter()
        self._lock = threading.Lock()
        self._workers = 0
        self._stats: LayerIOStats | None = None  # the Python engines' counts, merged per worker
        self._sink = stats

    @cached_property
    def plans(self) -> list[SegmentPlan]:
        return [self.planner.plan(r, self.ids) for r in self.reads]

    @cached_property
    def aligned(self) -> bool:
        """Whether rows may go straight into the outputs (aligned for O_DIRECT)."""
        return all(a.ctypes.data % self.planner.align == 0 for a in self.out.values())

    @cached_property
    def max_length(self) -> int:
        return max(int(p.length.max()) for p in self.plans)

    # What the engines that build each read in Python use (made on first use).
    @cached_property
    def id_list(self) -> list[int]:
        return self.ids.tolist()

    @cached_property
    def dest_list(self) -> list[int] | None:
        return None if self.dest is None else self.dest.tolist()

    @cached_property
    def out_bytes(self) -> dict[str, memoryview]:
        """The outputs as flat byte views, for preadv."""
        return {k: memoryview(v).cast("B") for k, v in self.out.items()}

    @property
    def chunks(self) -> list[Chunk]:
        """The reads one by one (made on first use: the native engine takes the arrays)."""
        if self._chunks is None:
            self._chunks = [c for p in self.plans for c in p.chunks()]
        return self._chunks

    # -- where a read lands -------------------------------------------------------------

    def where(self, first: int, stop: int) -> slice | np.ndarray:
        """Output rows of sorted ids [first, stop)."""
        return slice(first, stop) if self.dest is None else self.dest[first:stop]

    def vectored(self, chunk: Chunk) -> bool:
        """Whether a read goes straight into the output rows (`spans`), not via scratch."""
        reads = chunk.reads
        return (
            self.aligned
            and reads.vectored
            and (chunk.stop - chunk.first) * (len(reads.columns) + 1) <= IOV_MAX
        )

    def spans(self, chunk: Chunk) -> list[tuple[str | None, int, int]]:
        """The iovecs of a vectored read, as (output, byte offset in it, length): each part of
        each wanted row into its output row, the bytes between wanted rows into scratch
        (output None, offset 0: discarded). All are whole blocks."""
        seg, ids, dest = chunk.reads.segment, self.id_list, self.dest_list
        base, row_bytes = seg.data_offset, seg.row_bytes
        parts = [(name, c1 - c0) for name, c0, c1, _ in chunk.reads.columns]
        spans, pos = [], chunk.offset
        for k in range(chunk.first, chunk.stop):
            start = base + ids[k] * row_bytes
            if start > pos:
                spans.append((None, 0, start - pos))
            row = k if dest is None else dest[k]
            for name, n in parts:
                spans.append((name, row * n, n))
            pos = start + row_bytes
        return spans

    def buffers(self, chunk: Chunk, vectored: bool, scratch: memoryview) -> list[memoryview]:
        """The buffers a read fills, in order: its `spans` (the gaps into `scratch`), or the
        first `chunk.length` bytes of `scratch`."""
        if not vectored:
            return [scratch[: chunk.length]]
        out = self.out_bytes
        return [
            scratch[:n] if name is None else out[name][off : off + n] for name, off, n in self.spans(chunk)
        ]

    def out_addresses(self) -> dict[str, int]:
        """Each output's address (for engines that build iovecs themselves)."""
        return {k: v.ctypes.data for k, v in self.out.items()}

    def scatter(self, chunk: Chunk, scratch: np.ndarray) -> None:
        """Convert the rows of a read that landed in `scratch` into the request's outputs."""
        ids = self.ids[chunk.first : chunk.stop]
        seg, lo = chunk.reads.segment, int(ids[0])
        span = int(ids[-1]) - lo + 1  # the rows from the first to the last wanted one
        begin = seg.row_offset(lo) - chunk.offset
        rows = scratch[begin : begin + span * seg.row_bytes].reshape(span, seg.row_bytes)
        if span != chunk.stop - chunk.first:  # a coalesced read also holds unwanted rows: pick ours
            rows = rows[ids - lo]
        where = self.where(chunk.first, chunk.stop)
        for name, c0, c1, dtype in chunk.reads.columns:
            if dtype == "uint32":  # packed quantized weights: the bytes as they are
                self.out[name].view(np.uint8)[where] = rows[:, c0:c1]
            else:
                convert_into(self.out[name], where, rows[:, c0:c1].view(RAW_DTYPES[dtype]), dtype)

    # -- what a failed read becomes -----------------------------------------------------

    def read_error(self, chunk: Chunk, got: int, err: int, reason: str) -> FlashReadError:
        f, at = chunk.reads.file, chunk.offset + got
        return FlashReadError(
            f"{f.path}: read of {chunk.length - got} bytes at offset {at} (layer {self.layer}) failed: "
            f"{reason}{f.changed()}",
            path=f.path,
            offset=at,
            layer=self.layer,
            err=err or errno.EIO,
        )

    def short_read_error(self, chunk: Chunk, got: int) -> FlashReadError:
        f = chunk.reads.file
        return FlashReadError(
            f"{f.path}: short read at offset {chunk.offset + got} (layer {self.layer}): got {got} of "
            f"{chunk.need} bytes{f.changed()}",
            path=f.path,
            offset=chunk.offset + got,
            layer=self.layer,
        )

    # -- resolving the future -----------------------------------------------------------

    def fail(self, exc: BaseException, now: bool = False) -> None:
        """Stop the request with `exc`. The future fails when no worker is writing into the
        outputs any more (the last one to stop resolves it), so that a caller who reuses its
        buffers after the error (the streaming buffers, a scratch buffer) never has a
        straggling read land in them; `now`: workers that never ran (the engine was shut
        down) are not waited for."""
        with self._lock:
            if self.future._state == FINISHED:
                return
            if not self.failed:
                self.failed, self._error = True, exc
            if self._workers and not now:
                return
            exc = self._error
        _resolve(self.future.set_exception, exc)

    def worker_started(self) -> None:
        with self._lock:
            self._workers += 1

    def worker_done(self, local: LayerIOStats) -> None:
        """Merge a worker's counts; the last worker to finish resolves the future."""
        with self._lock:
            if self._stats is None:
                self._stats = LayerIOStats()
            self._stats.merge(local)
            self._workers -= 1
            if self._workers:
                return
        self._stats.requests = 1
        self._stats.neurons = len(self.ids) if self.gather is None else len(self.gather[0])
        self._stats.request_latency.add(time.perf_counter() - self.t_submit)
        self._sink.add(self.layer, self._stats)  # failed requests count too: their reads happened
        self._resolve_done()

    def complete(self, counts: tuple, error: BaseException | None) -> None:
        """An engine that counted the whole request itself (the native one): its `counts`
        (`IOStats.add_counts`) into the reader's statistics, then the future resolved with
        `error` or the outputs."""
        self._sink.add_counts(
            self.layer, len(self.ids) if self.gather is None else len(self.gather[0]), *counts
        )
        if error is not None:
            self.failed, self._error = True, error
        self._resolve_done()

    def _resolve_done(self) -> None:
        """Resolve the future of a request whose reads have all stopped."""
        if self.future._state == FINISHED:
            return
        if self.failed:
            _resolve(self.future.set_exception, self._error)
            return
        try:
            result = self.out
            if self.gather is not None:
                inverse, result = self.gather
                for k, v in self.out.items():
                    np.take(v, inverse, axis=0, out=result[k])
        except BaseException as exc:  # the future must resolve, whatever happens
            self.fail(exc)
            return
        _resolve(self.future.set_result, result)


def _resolve(setter, value) -> None:
    """Resolve a future unless a closing reader resolved it meanwhile."""
    try:
        setter(value)
    except InvalidStateError:
        pass


def pread_retrying(
    pread: Pread, req: Request, chunk: Chunk, bufs: list[memoryview], got: int, latencies: list[float]
) -> int:
    """One read of `chunk` into `bufs` from its byte `got` on, retried while it is interrupted
    (EINTR), its time appended to `latencies`; returns the bytes it read. Raises
    FlashReadError naming file, offset and layer on an error."""
    while True:
        t0 = time.perf_counter()
        try:
            n = pread(chunk.reads.file.fd, bufs, chunk.offset + got)
        except InterruptedError:
            latencies.append(time.perf_counter() - t0)
            continue
        except OSError as e:
            raise req.read_error(chunk, got, e.errno, e.strerror or str(e)) from e
        latencies.append(time.perf_counter() - t0)
        return n


def continue_read(
    pread: Pread, req: Request, chunk: Chunk, bufs: list[memoryview], got: int, latencies: list[float]
) -> int:
    """After a first read of `chunk` into `bufs` delivered only `got` bytes: read on from there
    until `chunk.need` bytes arrived, returning the bytes read. Raises FlashReadError at end of
    file (a read that returns nothing)."""
    i, n = 0, got
    while got < chunk.need:
        if n <= 0:
            raise req.short_read_error(chunk, got)
        while i < len(bufs) and n >= len(bufs[i]):  # skip what the last read filled
            n -= len(bufs[i])
            i += 1
        if n:
            bufs[i] = bufs[i][n:]
        n = pread_retrying(pread, req, chunk, bufs[i:], got, latencies)
        got += max(n, 0)
    return got

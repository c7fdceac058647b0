"""The native engine: each request's reads go to the C extension (`_native.c`) in one call, as
arrays of (fd, offset, bytes needed, iovecs) built with numpy, and are executed there with the
GIL released (io_uring, or a pthread pool of preads). One Python thread waits for finished
requests and delivers them: reads that landed in scratch are converted into the outputs, a
failed read becomes the request's error.

Where a read lands: straight into the output rows when the request's outputs are aligned and
the segment's parts fill whole blocks of float32 (each part of each row one iovec, the gaps
between wanted rows into a shared junk buffer), else into the request's own span of an aligned
scratch buffer (reused from request to request)."""

from __future__ import annotations

import errno
import importlib.util
import itertools
import os
import threading

import numpy as np

from .errors import ReaderClosedError
from .faults import FAULT_KINDS, Fault, fault_table
from .files import aligned_scratch
from .plan import IOV_MAX, Chunk, SegmentPlan
from .request import Request
from .stats import LayerIOStats

try:
    from . import _native
except ImportError as e:  # not built (no compiler at install) or built for another Python
    _native = None
    _LOAD_ERROR = (
        "its C extension was not built when mlx_flash was installed (no C compiler?)"
        if importlib.util.find_spec(f"{__package__}._native") is None
        else f"its C extension does not load: {e}"
    )
else:
    _LOAD_ERROR = None

_SHORT = -1  # the C engine's status of a read that ended before the bytes it needed
_FAULT_CODES = {k: i + 1 for i, k in enumerate(FAULT_KINDS)}  # the C side's numbering
BACKENDS = ("pthreads", "io_uring")  # fastest first
# The default backend ("native"): on the project's Linux VM the pthread pool read faster than
# io_uring in 35 of 40 cells of bench_io's grid (4 KiB-1 MiB, 1-64 in flight, quiet and busy;
# fio's own io_uring engine was no faster than its psync either), while io_uring took 20-40%
# less CPU per read: "native-io_uring" is there for a machine short of CPU (RESULTS.md).
DEFAULT_BACKEND = "pthreads"
_probed: dict[str, str | None] = {}


def load_error() -> str | None:
    """Why the extension does not load here (None: it does)."""
    return _LOAD_ERROR


def backend_error(backend: str) -> str | None:
    """Why `backend` cannot run here (None: it can), tried once per process."""
    if _LOAD_ERROR:
        return _LOAD_ERROR
    if backend not in _probed:
        try:
            _native.Engine(1, backend).close()
            _probed[backend] = None
        except OSError as e:
            _probed[backend] = str(e)
    return _probed[backend]


class _Batch:
    """A request as submitted to C: the arrays C reads and writes, what each read is."""

    __slots__ = ("req", "reads", "iovs", "results", "chunks", "vectored", "into_outputs", "scratch", "keep")

    def __init__(self, req: Request):
        self.req = req


class NativeEngine:
    """`depth` reads in flight in C. backend: "io_uring", "pthreads" or "auto" (io_uring where
    the kernel allows it); faults: `Fault`s injected by the C code."""

    def __init__(self, depth: int, *, backend: str = "auto", faults: tuple[Fault, ...] = ()):
        if _native is None:
            raise OSError(errno.ENOSYS, f"the native engine is not built: {_LOAD_ERROR}")
        codes = [(at, _FAULT_CODES[kind]) for at, kind in fault_table(faults).items()]
        self._c = _native.Engine(depth, backend, codes)
        self.backend: str = self._c.backend
        self.name = f"native-{self.backend}"
        self._batches: dict[int, _Batch] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._closing = False
        self._junk = aligned_scratch(1)
        self._free_scratch: list[np.ndarray] = []
        self._thread = threading.Thread(target=self._deliver_loop, name="mlx_flash-native", daemon=True)
        self._thread.start()

    # -- submitting --------------------------------------------------------------------

    def start(self, req: Request) -> None:
        batch = self._build(req)
        bid = next(self._ids)
        req.worker_started()
        with self._lock:
            if self._closing:
                req.worker_done(LayerIOStats())
                raise ReaderClosedError("FlashReader is closed")
            self._batches[bid] = batch
        try:
            self._c.submit(bid, batch.reads, batch.iovs, batch.results)
        except BaseException:
            with self._lock:
                self._batches.pop(bid, None)
            self._give_back(batch)
            req.worker_done(LayerIOStats())
            raise

    def _build(self, req: Request) -> _Batch:
        """The arrays of a request's reads: per read (fd, offset, need, first iovec, iovecs),
        with the iovecs' addresses (output rows, the junk buffer, the request's scratch)."""
        b = _Batch(req)
        addresses = req.out_addresses() if req.aligned else None
        iov_max = min(IOV_MAX, _native.IOV_MAX)
        masks = []  # per segment: which reads go straight into the outputs
        scratch_bytes = 0
        for plan in req.plans:
            if addresses is not None and plan.reads.vectored:
                vec = (plan.stop - plan.first) * (len(plan.reads.columns) + 1) <= iov_max
            else:
                vec = np.zeros(len(plan.first), dtype=bool)
            masks.append(vec)
            scratch_bytes += int(plan.length[~vec].sum())
        b.scratch = self._take_scratch(scratch_bytes) if scratch_bytes else None
        scratch_at = 0 if b.scratch is None else b.scratch.ctypes.data
        with self._lock:
            if req.max_length > len(self._junk):  # a gap between the rows of a read is shorter
                self._junk = aligned_scratch(req.max_length)
            b.keep = self._junk  # the gaps' buffer, alive until the reads are done
        junk_at = b.keep.ctypes.data
        reads, iovs, b.vectored, b.into_outputs = [], [], [], 0
        n_iov = used = 0
        for plan, vec in zip(req.plans, masks):
            n = len(plan.first)
            r = np.empty((n, 5), dtype=np.int64)
            r[:, 0], r[:, 1], r[:, 2] = plan.reads.file.fd, plan.offset, plan.need
            at = np.empty(0, dtype=np.int64)
            if vec.any():
                d = np.flatnonzero(vec)
                iov, counts = self._direct_iovecs(req, plan, d, addresses, junk_at)
                r[d, 4] = counts
                r[d, 3] = n_iov + np.cumsum(counts) - counts
                iovs.append(iov)
                n_iov += len(iov)
            if not vec.all():
                k = np.flatnonzero(~vec)
                lengths = plan.length[k]
                at = used + np.cumsum(lengths) - lengths  # each read's place in the scratch
                used += int(lengths.sum())
                iov = np.empty((len(k), 2), dtype=np.uint64)
                iov[:, 0] = scratch_at + at
                iov[:, 1] = lengths
                r[k, 3] = n_iov + np.arange(len(k))
                r[k, 4] = 1
                iovs.append(iov)
                n_iov += len(k)
            reads.append(r)
            b.vectored.append((vec, at))
            b.into_outputs += int(vec.sum())
        b.iovs = iovs[0] if len(iovs) == 1 else np.concatenate(iovs)
        b.reads = reads[0] if len(reads) == 1 else np.concatenate(reads)
        b.results = np.zeros((len(b.reads), 4), dtype=np.int64)
        b.chunks = req.plans
        return b

    @staticmethod
    def _direct_iovecs(
        req: Request, plan: SegmentPlan, c: np.ndarray, addresses: dict[str, int], junk_at: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The iovecs of reads `c` of a segment, which go straight into the outputs: per row,
        the gap before it (into the junk buffer) if any, then each part into its output row.
        Returns (iovecs uint64 [m, 2], iovecs per read)."""
        seg = plan.reads.segment
        parts = [(name, c1 - c0) for name, c0, c1, _ in plan.reads.columns]
        first, rows = plan.first[c], plan.stop[c] - plan.first[c]
        if len(c) == int(rows.sum()):  # one row per read (the common case): no gap inside a read
            k = first
            per_row = np.full(len(c), len(parts))
            g = np.zeros(len(c), dtype=bool)
            gap = None
        else:
            which = np.repeat(np.arange(len(c)), rows)
            row0 = np.cumsum(rows) - rows
            k = np.arange(len(which)) + np.repeat(first - row0, rows)  # the sorted ids of the reads
            start = seg.data_offset + req.ids[k] * seg.row_bytes
            prev_end = np.empty_like(start)
            prev_end[1:] = start[:-1] + seg.row_bytes
            head = np.ones(len(k), dtype=bool)
            head[1:] = which[1:] != which[:-1]
            prev_end[head] = plan.offset[c]
            gap = start - prev_end
            g = gap > 0
            per_row = len(parts) + g
        dest = k if req.dest is None else req.dest[k]
        iov = np.empty((int(per_row.sum()), 2), dtype=np.uint64)
        pos = np.cumsum(per_row) - per_row
        if gap is not None and g.any():
            iov[pos[g], 0] = junk_at
            iov[pos[g], 1] = gap[g]
        for p, (name, n) in enumerate(parts):
            at = pos + g + p
            iov[at, 0] = addresses[name] + dest * n
            iov[at, 1] = n
        if gap is None:
            return iov, per_row
        return iov, np.add.reduceat(per_row, row0) if len(row0) else per_row

    def _take_scratch(self, nbytes: int) -> np.ndarray:
        with self._lock:
            fits = [i for i, s in enumerate(self._free_scratch) if len(s) >= nbytes]
            if fits:
                return self._free_scratch.pop(min(fits, key=lambda i: len(self._free_scratch[i])))
        return aligned_scratch(nbytes)

    def _give_back(self, batch: _Batch) -> None:
        if batch.scratch is not None:
            with self._lock:
                self._free_scratch.append(batch.scratch)
                if len(self._free_scratch) > 4:  # keep the largest few
                    self._free_scratch.sort(key=len)
                    del self._free_scratch[0]

    # -- delivering --------------------------------------------------------------------

    def _deliver_loop(self) -> None:
        while True:
            done = self._c.wait()
            if done is None:
                return
            for bid in done:
                with self._lock:
                    batch = self._batches.pop(bid)
                self._deliver(batch)

    def _deliver(self, b: _Batch) -> None:
        req = b.req
        res = b.results
        stats = LayerIOStats()
        try:
            error: BaseException | None = None
            via_scratch = 0
            if res[:, 0].any():  # a read failed (or was cancelled): the first one names the error
                row = 0
                for plan in b.chunks:
                    bad = np.flatnonzero(res[row : row + len(plan.first), 0])
                    if len(bad):
                        error = self._error(req, plan, int(bad[0]), res[row + int(bad[0])])
                        break
                    row += len(plan.first)
            else:
                for plan, (vec, at) in zip(b.chunks, b.vectored):
                    if len(at):
                        for j, place in zip(np.flatnonzero(~vec).tolist(), at.tolist()):
                            req.scatter(_chunk(plan, j), b.scratch[place:])
                        via_scratch += len(at)
            ok = res[:, 0] == 0
            used = (
                len(req.ids) * sum(p.reads.segment.row_bytes for p in b.chunks)
                if error is None
                else int(sum(((p.stop - p.first) * p.reads.segment.row_bytes).sum() for p in b.chunks))
            )
            stats = LayerIOStats.of_reads(
                int(res[ok, 1].sum()), used, (res[:, 2] * 1e-9).tolist(), b.into_outputs, via_scratch
            )
            stats.reads = int(res[:, 3].sum())
            if error is not None:
                req.fail(error)
        except BaseException as exc:  # the future must resolve, whatever happens
            req.fail(exc)
        finally:
            self._give_back(b)
            req.worker_done(stats)

    def _error(self, req: Request, plan: SegmentPlan, j: int, result: np.ndarray) -> BaseException:
        status, got = int(result[0]), int(result[1])
        chunk = _chunk(plan, j)
        if status == errno.ECANCELED and self._closing:
            return ReaderClosedError("FlashReader closed before the request finished")
        if status == _SHORT:
            return req.short_read_error(chunk, got)
        return req.read_error(chunk, got, status, os.strerror(status))

    # -- closing -----------------------------------------------------------------------

    def close(self) -> None:
        """Cancel the reads not yet issued, wait for those in flight and their delivery."""
        with self._lock:
            self._closing = True
        self._c.close()
        self._thread.join()


def _chunk(plan: SegmentPlan, j: int) -> Chunk:
    return Chunk(
        plan.reads,
        int(plan.first[j]),
        int(plan.stop[j]),
        int(plan.offset[j]),
        int(plan.length[j]),
        int(plan.need[j]),
    )

"""The native engine: a request goes to the C extension (`_native.c`) in one call, as its sorted
ids, where each row goes and the output arrays, with its layer's `Layout` (made once per layer
and reader): C plans the reads (the same plan as `plan.plan_chunks`, tested against it), builds
their iovecs, executes them with the GIL released (io_uring, or a pthread pool of preads),
converts the rows that landed in scratch into the outputs in the thread that read them, and
sums the request's statistics.

Delivery (the request's error or result, its statistics, once) happens in the thread that
waits for it: `ReadFuture.result()` blocks in C on its batch and, when the batch finishes,
delivers it there (no other thread is woken). A batch nobody waits for is delivered by one
Python thread (`_deliver_loop`), so that done-callbacks run and `done()` turns true.

Where a read lands: straight into the output rows when the request's outputs are aligned and
the segment's parts fill whole blocks of float32 (each part of each row one iovec, the gaps
between wanted rows into a shared junk buffer), else into the request's own span of an aligned
scratch buffer (reused from request to request)."""

from __future__ import annotations

import errno
import importlib.util
import os
import threading
from functools import partial

from .errors import ReaderClosedError
from .faults import FAULT_KINDS, Fault, fault_table
from .plan import Chunk, SegmentReads
from .request import Request

API = 2  # the interface of _native.c this module speaks (its NATIVE_API)
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
    _LOAD_ERROR = (
        None
        if getattr(_native, "API", None) == API
        else "its C extension is a build of another version (rebuild it: pip install -e ., or "
        "python setup.py build_ext --inplace)"
    )
    if _LOAD_ERROR:
        _native = None

_SHORT = -1  # the C engine's status of a read that ended before the bytes it needed
_FAULT_CODES = {k: i + 1 for i, k in enumerate(FAULT_KINDS)}  # the C side's numbering
BACKENDS = ("io_uring", "pthreads")  # fastest first
# The default backend ("native"): "auto", io_uring where the kernel and the container allow it,
# else the pthread pool. On the project's Linux VM (bench_io's grid, 4 KiB-1 MiB, 1-64 in flight,
# quiet and busy; RESULTS.md, issue 19) io_uring takes less CPU per read than the pool in most
# cells (1.13-1.23x fio's lower, median, against 1.33-1.63x); in throughput the two are within
# 0.02 of each other in median once bench_io shuffles the order of its rounds (with the fixed
# order of before, io_uring ran right after fio in every round and lost in all 32 cells of
# 16 KiB and more; moved to the end of the round, it split them 8 to 8).
DEFAULT_BACKEND = "auto"
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


_CONVERSIONS = {"float32": 0, "uint32": 0, "float16": 1, "bfloat16": 2}  # _native.c's CONV_*


def layout_of(reads: tuple[SegmentReads, ...], align: int, coalesce_gap: int, max_read: int):
    """A layer's segments as the C engine takes them: (its `_native.Layout`, the output names in
    the layout's order)."""
    names: list[str] = []
    row_bytes: list[int] = []
    segments = []
    for r in reads:
        cols = []
        for name, c0, c1, dtype in r.columns:
            conv = _CONVERSIONS[dtype]
            names.append(name)
            row_bytes.append((c1 - c0) * (2 if conv else 1))
            cols.append((len(names) - 1, c0, c1, conv))
        seg = r.segment
        segments.append((r.file.fd, seg.data_offset, seg.row_bytes, r.vectored, cols))
    return _native.Layout(segments, row_bytes, align, coalesce_gap, max_read), tuple(names)


class NativeEngine:
    """`depth` reads in flight in C. backend: "io_uring", "pthreads" or "auto" (io_uring where
    the kernel allows it); faults: `Fault`s injected by the C code. `close()` resolves every
    request it was given (the reader need not track them)."""

    resolves_all_at_close = True

    def __init__(self, depth: int, *, backend: str = "auto", faults: tuple[Fault, ...] = ()):
        if _native is None:
            raise OSError(errno.ENOSYS, f"the native engine is not built: {_LOAD_ERROR}")
        codes = [(at, _FAULT_CODES[kind]) for at, kind in fault_table(faults).items()]
        self._c = _native.Engine(depth, backend, codes)
        self.backend: str = self._c.backend
        self.name = f"native-{self.backend}"
        self._layouts: dict[tuple, tuple] = {}
        self._running: dict = {}  # batch -> its Request, until delivered
        self._lock = threading.Lock()
        self._closing = False
        self._thread = threading.Thread(target=self._deliver_loop, name="mlx_flash-native", daemon=True)
        self._thread.start()

    # -- submitting --------------------------------------------------------------------

    def start(self, req: Request) -> None:
        p = req.planner
        key = (id(req.reads), p.align, p.coalesce_gap, p.max_read)
        layout = self._layouts.get(key)
        if layout is None:  # (the reads tuple is kept alive with it: its id stays unique)
            layout = self._layouts[key] = (*layout_of(req.reads, *key[1:]), req.reads)
        out = req.out
        with self._lock:
            if self._closing:
                raise ReaderClosedError("FlashReader is closed")
            batch = self._c.submit(layout[0], req.ids, req.dest, tuple([out[k] for k in layout[1]]))
            self._running[batch] = req
        req.batch = batch
        req.future._driver = partial(self._drive, req)

    def _drive(self, req: Request, block: bool) -> None:
        """Deliver `req` in this thread if it finished (`block`: wait for it); nothing when the
        delivery thread took it (its future resolves there)."""
        batch = req.batch
        if (block or batch.done()) and batch.wait():
            with self._lock:
                self._running.pop(batch, None)
            self._deliver(req, batch)

    def busy(self) -> bool:
        """Whether a request it was given is not delivered yet."""
        with self._lock:
            return bool(self._running)

    # -- delivering --------------------------------------------------------------------

    def _deliver_loop(self) -> None:
        while True:
            done = self._c.wait()
            if done is None:
                return
            for batch in done:
                with self._lock:
                    req = self._running.pop(batch)
                self._deliver(req, batch)

    def _deliver(self, req: Request, batch) -> None:
        try:
            failed = batch.error()
            req.complete(batch.stats(), None if failed is None else self._error(req, failed))
        except BaseException as exc:  # the future must resolve, whatever happens
            req.fail(exc, now=True)

    def _error(self, req: Request, failed: tuple) -> BaseException:
        status, got, seg, *rest = failed
        if status == errno.ECANCELED and self._closing:
            return ReaderClosedError("FlashReader closed before the request finished")
        chunk = Chunk(req.reads[seg], *rest)
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


def plan(req: Request) -> tuple:
    """The C engine's plan of `req` (for the tests): (reads int64 [n, 14]: the `_native.c`
    ReadDesc fields, iovecs uint64 [m, 2]: address, length, with the gaps' and scratch's bases
    0), and the output names in the layout's order."""
    import numpy as np

    p = req.planner
    layout, names = layout_of(req.reads, p.align, p.coalesce_gap, p.max_read)
    reads, iovs = _native.plan(layout, req.ids, req.dest, tuple(req.out[k] for k in names))
    return (
        np.frombuffer(reads, np.int64).reshape(-1, _native.READ_FIELDS),
        np.frombuffer(iovs, np.uint64).reshape(-1, 2),
        names,
    )

"""FlashReader: reads FFN neuron bundles of a flash folder, aligned, bypassing the page cache,
many reads in flight, asynchronously.

`FlashReader.submit(layer, ids)` returns a future of ``{part: float32 [len(ids), elems]}``,
row j holding neuron ``ids[j]``. In a quantized folder (see `layout`), ``submit(..., raw=True)``
returns the stored fields instead, ``{"gate.weight": uint32 [len(ids), packed], "gate.scales":
float32 [len(ids), groups], "gate.biases": ..., ...}`` (what `Manifest.row_fields` lists), which
the FFN computes on; without `raw` they are dequantized into float32 rows. Every byte offset
comes from the manifest (`layout`): a neuron's bytes in a segment start at
``segment.row_offset(neuron)``.

The reader validates a request and plans it (`plan`: rows to aligned, coalesced reads), then
hands it to its engine (`engines`), which only executes the reads and reports them back
through the `Request`. `self.align` is the alignment reads are widened to: the smallest every
file accepts without the page cache (`files.direct_alignment`: the device's logical block
size, 512 B on most disks), SECTOR when reading through the page cache.
"""

from __future__ import annotations

import errno
import os
import threading
import warnings
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from ..layout import SECTOR, FlashFormatError, LayerEntry, Manifest
from ..quantize import dequantize
from .engines import make_engine
from .errors import ReaderClosedError
from .faults import Fault
from .files import FlashFile, aligned_empty, direct_alignment, open_uncached
from .plan import DEFAULT_COALESCE_GAP, DEFAULT_MAX_READ, DEFAULT_THREADS, Planner
from .request import ReadFuture, Request
from .stats import IOStats

# A default gap spans at most this many rows: on the tiny preset (1 KiB bundles, ~100 of 2048 read
# a layer) the 28 KiB gap read 3.3 MB a token for 0.4 MB of needed bundles; 4 rows read 0.67 MB
# in the same reader time (benchmarks/RESULTS.md, issue 16).
COALESCE_ROWS = 4


class FlashReader:
    """Parallel, aligned, page-cache-bypassing reader of a flash folder's neuron bundles.

    folder, manifest: the flash folder and its parsed `Manifest` (offsets come from it only).
    threads: reads in flight (threads of the thread engine; default `DEFAULT_THREADS`).
    direct: True: bypass the page cache or raise; False: buffered reads; None (default):
        bypass when the filesystem allows, else buffered with one warning. `self.direct` says
        what was done.
    coalesce_gap: merge neighbouring reads whose gap on flash is at most this many bytes
        (default `DEFAULT_COALESCE_GAP`, at most `COALESCE_ROWS` of the folder's smallest rows:
        small bundles would otherwise read many unneeded ones per needed one; negative: merge
        only reads sharing a sector).
    max_read: a merged read stops growing at about this many bytes (default `DEFAULT_MAX_READ`).
    engine: an engine name (`engines.ENGINE_NAMES`; None: the default, the fastest that loads)
        or an engine object (e.g. `ThreadEngine(4, faults=[Fault("eio", 3)])`); `self.engine`
        is its name.
    faults: `Fault`s injected into the engine made from a name (tests).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        manifest: Manifest,
        *,
        threads: int | None = None,
        direct: bool | None = None,
        coalesce_gap: int | None = None,
        max_read: int | None = None,
        engine=None,
        faults: tuple[Fault, ...] = (),
    ):
        self.folder = Path(folder)
        self.manifest = manifest
        self.threads = threads or DEFAULT_THREADS
        rows = [seg.row_bytes for entry in manifest.layers for seg in entry.segments]
        self.coalesce_gap = (
            min(DEFAULT_COALESCE_GAP, COALESCE_ROWS * min(rows, default=DEFAULT_COALESCE_GAP))
            if coalesce_gap is None
            else coalesce_gap
        )
        self.max_read = max_read or DEFAULT_MAX_READ
        if self.threads < 1 or self.max_read < SECTOR:
            raise ValueError(f"threads must be >= 1 and max_read >= {SECTOR}")
        self.stats = IOStats()
        self._fields = {
            k: (e, np.dtype(t)) for k, (e, t) in manifest.row_fields().items()
        }  # what a raw read returns
        self._closed = False
        self._files: dict[str, FlashFile] = {}
        self._requests: set[Request] = set()
        self._lock = threading.Lock()
        self.direct = direct is not False
        self.align = (
            512 if self.direct and hasattr(os, "O_DIRECT") else SECTOR
        )  # raised by _open as files need
        self._engine = (
            make_engine(engine, self.threads, faults=tuple(faults))
            if engine is None or isinstance(engine, str)
            else engine
        )
        self.engine: str = self._engine.name
        try:
            for entry in manifest.layers:
                if entry.file not in self._files:
                    self._files[entry.file] = self._open(entry, direct)
        except BaseException:
            self._engine.close()
            self._close_files()
            raise
        self._planner = Planner(manifest, self.align, self.coalesce_gap, self.max_read)
        self._layer_reads = [
            tuple(self._planner.segment_reads(seg, self._files[entry.file]) for seg in entry.segments)
            for entry in manifest.layers
        ]

    def swap_engine(self, engine) -> None:
        """Replace the engine (an engine object) while no request is running; the old one is
        closed. For tests that inject faults into a reader someone else opened."""
        with self._lock:
            if self._requests or getattr(self._engine, "busy", lambda: False)():
                raise RuntimeError("swap_engine while requests are running")
            old, self._engine, self.engine = self._engine, engine, engine.name
        old.close()

    # -- opening -------------------------------------------------------------------------

    def _os_open(self, path: str, flags: int) -> int:
        """os.open; a hook for tests that simulate a filesystem refusing O_DIRECT."""
        return os.open(path, flags)

    def _open(self, entry: LayerEntry, direct: bool | None) -> FlashFile:
        path = str(self.folder / entry.file)
        fd = self._open_uncached(path, direct) if self.direct else self._os_open(path, os.O_RDONLY)
        st = os.fstat(fd)
        end = max(s.data_offset + s.row_bytes * entry.num_neurons for s in entry.segments)
        if st.st_size < end:
            os.close(fd)
            raise FlashFormatError(
                f"{path}: truncated ({st.st_size} bytes, manifest needs {end}); re-run mlx_flash.convert"
            )
        if self.direct and hasattr(os, "O_DIRECT"):
            try:
                self.align = max(self.align, direct_alignment(fd, st.st_size))
            except BaseException:
                os.close(fd)
                raise
        else:
            self.align = SECTOR
        return FlashFile(fd, path, st.st_size, st.st_mtime_ns)

    def _open_uncached(self, path: str, direct: bool | None) -> int:
        """Open bypassing the page cache; fall back to buffered (once warned) unless required."""
        try:
            return open_uncached(path, self._os_open)
        except FileNotFoundError:
            raise FlashFormatError(f"{path}: missing; re-run mlx_flash.convert") from None
        except OSError as e:
            if direct or e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
        if self.direct:
            self.direct = False
            warnings.warn(
                f"{self.folder}: the filesystem refuses uncached (O_DIRECT/F_NOCACHE) reads; "
                "reading through the page cache, so I/O timings will look better than a cold disk",
                RuntimeWarning,
                stacklevel=5,
            )
        return self._os_open(path, os.O_RDONLY)

    # -- requests ------------------------------------------------------------------------

    def submit(
        self,
        layer: int,
        ids: np.ndarray,
        out: dict[str, np.ndarray] | None = None,
        *,
        raw: bool = False,
        rows: np.ndarray | None = None,
    ) -> ReadFuture:
        """Start reading neurons `ids` of `layer`; the future resolves to {part: float32
        [len(ids), elems]} with row j = neuron ids[j] (ids may be in any order, repeated).

        out: optional arrays to fill and return (C-contiguous, of the shapes and dtypes of
        `empty_rows`, best 4 KiB-aligned: then float32 rows are read straight into them); a
        caller that reuses them saves the page faults of fresh memory, which cost as much as
        the reads on large requests.
        raw: in a quantized folder, the stored fields ({"part.weight": uint32, "part.scales",
        "part.biases": float32}) instead of dequantized float32 rows (no effect otherwise).
        rows: with `out` (arrays of any number of rows), neuron ids[j] goes into row rows[j] of
        them and no other row is written (e.g. a cache's free slots: read straight into the
        cache's buffers; `IOStats` says which reads landed there and which went through
        scratch). ids must be distinct then, rows distinct."""
        if self.manifest.quantized and not raw:
            if rows is not None:
                raise ValueError("rows= takes the stored fields (raw=True) in a quantized folder")
            return self._dequantized(layer, ids, out)
        return self._submit(layer, ids, out, rows)

    def _submit(
        self, layer: int, ids: np.ndarray, out: dict[str, np.ndarray] | None, rows: np.ndarray | None = None
    ) -> ReadFuture:
        """`submit` of the stored fields (`row_fields`): the one path every read takes."""
        if self._closed:
            raise ReaderClosedError("FlashReader is closed")
        entry = self._entry(layer)
        ids = self._ids(ids, "ids")
        if ids.size and (ids.min() < 0 or ids.max() >= entry.num_neurons):
            raise IndexError(f"layer {layer}: neuron ids must lie in [0, {entry.num_neurons})")
        future = ReadFuture(self.stats, layer)
        future.set_running_or_notify_cancel()
        dest = gather = None
        if rows is not None:
            out, ids, dest = self._into_rows(out, ids, rows)
        else:
            out = self._check_out(out, len(ids)) if out is not None else self.empty_rows(len(ids), raw=True)
        if not ids.size:
            future.set_result(out)
            return future
        if rows is None and ids.size > 1 and not np.all(ids[1:] > ids[:-1]):
            ids, dest, inverse = np.unique(ids, return_index=True, return_inverse=True)
            if len(ids) < len(inverse):  # repeats: fill unique rows, gather into `out` at the end
                gather, out = (inverse, out), self.empty_rows(len(ids), raw=True)
                dest = None
        req = Request(
            layer, ids, self._layer_reads[layer], self._planner, out, dest, gather, future, self.stats
        )
        self._start(req)
        return future

    @staticmethod
    def _ids(ids, what: str) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise ValueError(f"{what} must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
        return ids.astype(np.int64, copy=False)

    def _into_rows(
        self, out: dict[str, np.ndarray] | None, ids: np.ndarray, rows
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """`submit(rows=)`: (the checked outputs, the sorted ids, the output row of each)."""
        rows = self._ids(rows, "rows")
        if out is None or len(rows) != len(ids):
            raise ValueError("rows= needs out= and one row per id")
        n = len(next(iter(out.values()), ()))
        out = self._check_out(out, n)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"rows must lie in [0, {n}) (the rows of out)")
        order = np.argsort(ids, kind="stable")
        ids, rows = ids[order], rows[order]
        if len(ids) > 1 and (np.any(ids[1:] == ids[:-1]) or len(np.unique(rows)) < len(rows)):
            raise ValueError("with rows=, ids must be distinct and rows distinct")
        return out, ids, rows

    def _start(self, req: Request) -> None:
        with self._lock:
            if self._closed:
                raise ReaderClosedError("FlashReader is closed")
            engine = self._engine
            if getattr(engine, "resolves_all_at_close", False):  # nothing to track here
                engine.start(req)
                return
            self._requests.add(req)
            req.future.add_done_callback(lambda _f: self._forget(req))
        try:
            engine.start(req)
        except BaseException:
            self._forget(req)
            raise

    def _forget(self, req: Request) -> None:
        with self._lock:
            self._requests.discard(req)

    def read(
        self, layer: int, ids: np.ndarray, out: dict[str, np.ndarray] | None = None, **kw
    ) -> dict[str, np.ndarray]:
        """`submit(layer, ids, out, **kw).result()` (raw=, rows= as `submit` takes them)."""
        return self.submit(layer, ids, out, **kw).result()

    def empty_rows(self, n: int, *, raw: bool = False) -> dict[str, np.ndarray]:
        """Fresh 4 KiB-aligned arrays per output, as `submit` (with `raw`) fills them."""
        return {
            name: aligned_empty(n * e * t.itemsize).view(t).reshape(n, e)
            for name, (e, t) in self._outputs(raw).items()
        }

    def _outputs(self, raw: bool) -> dict[str, tuple[int, np.dtype]]:
        if raw or not self.manifest.quantized:
            return self._fields
        return {p.name: (p.elems, np.dtype(np.float32)) for p in self.manifest.parts}

    def _check_out(self, out: dict[str, np.ndarray], n: int, raw: bool = True) -> dict[str, np.ndarray]:
        for name, (e, t) in self._outputs(raw).items():
            a = out.get(name)
            if (
                a is None
                or a.shape != (n, e)
                or a.dtype != t
                or not a.flags.c_contiguous
                or not a.flags.writeable
            ):
                raise ValueError(f"out[{name!r}] must be a writable C-contiguous {t} array of shape {(n, e)}")
        return out

    def _dequantized(self, layer: int, ids: np.ndarray, out: dict[str, np.ndarray] | None) -> ReadFuture:
        """A read of a quantized folder's fields, dequantized into float32 rows per part."""
        n = len(np.asarray(ids))
        out = self._check_out(out, n, raw=False) if out is not None else self.empty_rows(n)
        inner = self._submit(layer, ids, None)
        future = ReadFuture(self.stats, layer)
        future.set_running_or_notify_cancel()
        q = self.manifest.quantization

        def done(f: Future) -> None:
            try:
                fields = Future.result(f, 0)
                for p in self.manifest.parts:
                    k = p.name
                    dequantize(
                        fields[f"{k}.weight"],
                        fields[f"{k}.scales"],
                        fields[f"{k}.biases"],
                        q.bits,
                        q.group_size,
                        out=out[k],
                    )
            except BaseException as exc:  # the future must resolve, whatever happens
                future.set_exception(exc)
            else:
                future.set_result(out)

        inner.add_done_callback(done)
        future._driver = inner.drive  # waiting on it delivers the read here
        return future

    def submit_rows(self, layer: int, start: int, stop: int, *, raw: bool = False) -> ReadFuture:
        """Start reading the contiguous neurons [start, stop) of a layer: large sequential
        reads of `max_read` bytes spread over the reads in flight (for streaming a layer)."""
        entry = self._entry(layer)
        if not 0 <= start <= stop <= entry.num_neurons:
            raise IndexError(f"layer {layer}: rows [{start}, {stop}) outside [0, {entry.num_neurons})")
        return self.submit(layer, np.arange(start, stop, dtype=np.int64), raw=raw)

    def read_rows(self, layer: int, start: int, stop: int, *, raw: bool = False) -> dict[str, np.ndarray]:
        """`submit_rows(layer, start, stop, raw=raw).result()`."""
        return self.submit_rows(layer, start, stop, raw=raw).result()

    def _entry(self, layer: int) -> LayerEntry:
        if not 0 <= layer < len(self.manifest.layers):
            raise IndexError(f"layer {layer} not in the flash folder (0..{len(self.manifest.layers) - 1})")
        return self.manifest.layers[layer]

    # -- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the engine and close the files; requests still running fail with
        ReaderClosedError (once their reads in flight have stopped). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._engine.close()
        with self._lock:
            pending = list(self._requests)
        for req in pending:
            req.fail(ReaderClosedError("FlashReader closed before the request finished"), now=True)
        self._close_files()

    def _close_files(self) -> None:
        for f in self._files.values():
            os.close(f.fd)
        self._files.clear()

    def __enter__(self) -> FlashReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Reads FFN neuron bundles from a flash folder: aligned, page-cache-bypassing, parallel, async.

`FlashReader.submit(layer, ids)` returns a future of ``{part: float32 [len(ids), elems]}``,
row j holding neuron ``ids[j]``. In a quantized folder (see `layout`), ``submit(..., raw=True)``
returns the stored fields instead, ``{"gate.weight": uint32 [len(ids), packed], "gate.scales":
float32 [len(ids), groups], "gate.biases": ..., ...}`` (what `Manifest.row_fields` lists), which
the FFN computes on; without `raw` they are dequantized into float32 rows. Every byte offset
comes from the manifest (`layout`): a neuron's bytes in a segment start at
``segment.row_offset(neuron)``.

How a request becomes reads: per segment (one when bundled, one per part otherwise), each
wanted neuron's byte range is widened to whole blocks of the reader's `align` (O_DIRECT needs
aligned offsets, lengths and buffers: `align` is the smallest alignment the file accepts, probed
at open: the device's logical block size, 512 B on most disks, 4 KiB on 4Kn drives and where the
page cache is not bypassed; a bundle that is not a multiple of it is read as part of an aligned
range), neighbours whose gap on flash is at most `coalesce_gap` bytes are merged into one read
(reading the gap and discarding it is cheaper than a second read), and no read grows past
about `max_read` bytes (so that a dense range still spreads over the threads). The reads go to
a pool of threads (``os.preadv`` releases the GIL), or, opt-in on Linux (``engine="aio"``), to
one thread that keeps them in flight through Linux native AIO (`reader_aio`). Where every part fills whole sectors
(float32 with d a multiple of 128 at 512 B blocks: the paper's CPU setting), one vectored read puts each
part of each row straight into its (aligned) output row: no copy at all. Otherwise a thread reads
into its own aligned scratch buffer and converts the rows to float32 into the outputs (on
Linux MLX cannot adopt a host buffer without a copy, so one copy is needed anyway).

The defaults (`DEFAULT_THREADS`, `DEFAULT_COALESCE_GAP`, `DEFAULT_MAX_READ`) were chosen by
the cost model measured with ``benchmarks/bench_io.py``; see the comment above them.
"""

from __future__ import annotations

import errno
import itertools
import os
import sys
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import kernel_aio
from .io_stats import IOStats, LayerIOStats
from .layout import SECTOR, FlashFormatError, LayerEntry, Manifest, Segment
from .quantize import dequantize

# Defaults chosen by the cost model that `python benchmarks/bench_io.py --out DIR --file-gb 8`
# measured on the project's Linux machine (2 cores shared at load 10-16, virtio disk, ext4,
# O_DIRECT), in two runs of the full grid (tables in benchmarks/RESULTS.md; the disk's speed
# drifts, so each run alone picks differently). The reader's aggregate time per random read of
# c bytes fits t(c) = a + b*c; at 32 threads a = 17.8 / 19.4 us, b = 0.70 / 0.52 ns per byte.
# - threads: the fewest reaching 95% of the best mean throughput over 16-64 KiB chunks (bundle
#   sizes), both runs pooled: 8 / 16 / 32 threads gave 637 / 680 / 721 MB/s: 32 (the paper's).
# - coalesce_gap: merging two reads g bytes apart saves a and costs b*g, so a gap below a/b is
#   read and discarded: a/b at 32 threads was 24.9 and 36.2 KiB; their mean, in whole sectors.
# - max_read: the smallest chunk reaching 95% of the best throughput at 32 threads: 1 MiB in
#   both runs.
DEFAULT_THREADS = 32
DEFAULT_COALESCE_GAP = 28 * 1024
DEFAULT_MAX_READ = 1024 * 1024

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_RAW_DTYPES = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
}


class FlashReadError(OSError):
    """A read of neuron bundles failed: names the file, the byte offset and the layer."""

    def __init__(self, message: str, *, path: str, offset: int, layer: int, err: int = errno.EIO):
        super().__init__(err, message)
        self.path, self.offset, self.layer = path, offset, layer

    def __str__(self) -> str:
        return str(self.strerror)


class ReaderClosedError(RuntimeError):
    """The reader was closed before (or while) this request ran."""


@dataclass(frozen=True)
class _File:
    fd: int
    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class _SegmentReads:
    """How one segment of a layer is read. Vectored: the stored rows are float32 and every part
    fills whole sectors, so one preadv puts each part of each row straight into its output row
    (no copy, no scratch); otherwise a read lands in a scratch buffer and its rows are
    converted into the outputs."""

    segment: Segment
    file: _File
    columns: tuple[tuple[str, int, int, str], ...]  # (output, first byte, end byte, stored dtype) in a row
    vectored: bool


class _Chunk(NamedTuple):
    """One aligned read: sorted ids [first, stop) of a request, bytes [offset, offset+length)
    of the file, of which the first `need` must arrive (the rest may lie past end of file).
    (A NamedTuple: made and read per read, in the hot loop.)"""

    reads: _SegmentReads
    first: int
    stop: int
    offset: int
    length: int
    need: int


def plan_chunks(
    starts: np.ndarray, row_bytes: int, coalesce_gap: int, max_read: int, align: int = SECTOR
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Group rows starting at sorted byte offsets `starts` into aligned reads.

    Returns (first, stop, offset, length, need): read c covers rows first[c]..stop[c]-1, starts
    at the `align`-aligned `offset[c]`, is `length[c]` bytes (a multiple of `align`) and must
    deliver at least `need[c]` bytes (its last row's end; the rest may lie past end of file).
    Two rows share a read when the bytes between their aligned ranges are <= coalesce_gap (a
    negative gap merges only rows that share a sector); a read stops growing once it spans
    `max_read` bytes, so it is at most max_read + row_bytes + align long."""
    ends = starts + row_bytes
    a0 = starts // align * align
    a1 = -(-ends // align) * align
    n = len(starts)
    gap_break = np.zeros(n, dtype=bool)
    gap_break[0] = True
    gap_break[1:] = a0[1:] - a1[:-1] > coalesce_gap
    group = np.cumsum(gap_break) - 1
    group_start = a0[np.flatnonzero(gap_break)][group]
    window = (a1 - 1 - group_start) // max(max_read, 1)
    new = gap_break.copy()
    new[1:] |= window[1:] != window[:-1]
    first = np.flatnonzero(new)
    stop = np.append(first[1:], n)
    offset = a0[first]
    return first, stop, offset, a1[stop - 1] - offset, ends[stop - 1] - offset


def _aligned_empty(nbytes: int) -> np.ndarray:
    """A uint8 array of `nbytes` whose address is a multiple of SECTOR (O_DIRECT needs it)."""
    raw = np.empty(nbytes + SECTOR, dtype=np.uint8)
    skip = -raw.ctypes.data % SECTOR
    return raw[skip : skip + nbytes]


def direct_alignment(fd: int, size: int) -> int:
    """The smallest alignment of offset, length and buffer address that O_DIRECT reads of the
    open file `fd` (of `size` bytes) accept: 512, 1024 or 2048 bytes when a probe read at that
    alignment (and not a larger one) succeeds, else SECTOR. It is the device's logical block
    size on Linux block devices; probing also covers stacked devices and filesystems that
    sysfs does not describe."""
    buf = memoryview(_aligned_empty(2 * SECTOR))
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


def _convert_into(out: np.ndarray, where: slice | np.ndarray, src: np.ndarray, dtype: str) -> None:
    """out[where] = src as float32 (float16 by numpy's cast; bfloat16 bits shifted into the
    high half of a float32, which is exact)."""
    if dtype == "bfloat16":
        if isinstance(where, slice):
            np.left_shift(src, 16, out=out[where].view(np.uint32), dtype=np.uint32)
            return
        src = (src.astype(np.uint32) << 16).view(np.float32)
    out[where] = src


class ReadFuture(Future):
    """A Future of a read request; `result()` adds the time the caller blocked in it to the
    reader's `wait_seconds` for the layer."""

    def __init__(self, stats: IOStats, layer: int):
        super().__init__()
        self._stats, self._layer = stats, layer

    def result(self, timeout: float | None = None):
        if self.done():
            return super().result(0)
        t0 = time.perf_counter()
        try:
            return super().result(timeout)
        finally:
            self._stats.add_wait(self._layer, time.perf_counter() - t0)


class _Request:
    """One submitted request: its plan, outputs, progress, and the future to resolve."""

    def __init__(
        self,
        layer: int,
        ids: np.ndarray,
        chunks: list[_Chunk],
        out: dict[str, np.ndarray],
        dest: np.ndarray | None,
        gather: tuple[np.ndarray, dict[str, np.ndarray]] | None,
        future: ReadFuture,
        align: int,
    ):
        """dest: output row of each sorted id (None: the same row); gather: (inverse, final)
        when ids repeat: the unique rows read into `out` are gathered into `final` at the end."""
        self.layer, self.ids, self.out, self.dest, self.gather = layer, ids, out, dest, gather
        # Rows go straight into the outputs only if these are aligned for O_DIRECT.
        self.aligned = all(a.ctypes.data % align == 0 for a in out.values())
        self.id_list = ids.tolist()
        self.dest_list = None if dest is None else dest.tolist()
        self.out_bytes = {k: memoryview(v).cast("B") for k, v in out.items()}  # flat, for preadv
        self.future = future
        self.chunks = chunks
        self.max_length = max(c.length for c in chunks)
        self.next_job = itertools.count()  # next(...) is atomic under the GIL
        self.failed = False
        self._error: BaseException | None = None
        self.t_submit = time.perf_counter()
        self._lock = threading.Lock()
        self._workers = 0
        self._stats = LayerIOStats()

    def where(self, first: int, stop: int) -> slice | np.ndarray:
        """Output rows of sorted ids [first, stop)."""
        return slice(first, stop) if self.dest is None else self.dest[first:stop]

    def fail(self, exc: BaseException, now: bool = False) -> None:
        """Stop the request with `exc`. The future fails when no worker is writing into the
        outputs any more (the last one to stop resolves it), so that a caller who reuses its
        buffers after the error (the streaming buffers, a scratch buffer) never has a
        straggling read land in them; `now`: workers that never ran (the pool was shut down)
        are not waited for."""
        with self._lock:
            if self.failed or self.future.done():
                return
            self.failed = True
            self._error = exc
            if self._workers and not now:
                return
        self.future.set_exception(exc)

    def worker_started(self) -> None:
        with self._lock:
            self._workers += 1

    def worker_done(self, local: LayerIOStats, stats: IOStats) -> None:
        """Merge a worker's counts; the last worker to finish resolves the future."""
        with self._lock:
            self._stats.merge(local)
            self._workers -= 1
            if self._workers:
                return
        self._stats.requests = 1
        self._stats.neurons = len(self.ids) if self.gather is None else len(self.gather[0])
        self._stats.request_latency.add(time.perf_counter() - self.t_submit)
        stats.add(self.layer, self._stats)  # failed requests count too: their reads happened
        if self.future.done():
            return
        if self.failed:
            self.future.set_exception(self._error)
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
        self.future.set_result(result)


class FlashReader:
    """Parallel, aligned, page-cache-bypassing reader of a flash folder's neuron bundles.

    folder, manifest: the flash folder and its parsed `Manifest` (offsets come from it only).
    threads: reader threads (default `DEFAULT_THREADS`).
    direct: True: bypass the page cache or raise; False: buffered reads; None (default):
        bypass when the filesystem allows, else buffered with one warning. `self.direct` says
        what was done.
    coalesce_gap: merge neighbouring reads whose gap on flash is at most this many bytes
        (default `DEFAULT_COALESCE_GAP`; negative: merge only reads sharing a sector).
    max_read: a merged read stops growing at about this many bytes (default `DEFAULT_MAX_READ`).
    engine: "threads" (default): a pool of `threads` threads, one blocking read each; "aio"
        (Linux, O_DIRECT): one thread keeping `threads` reads in flight through Linux native
        AIO (`reader_aio`), an experiment: on the project's 2-core VM it beat the pool at 32
        reads in flight and lost at 8 (benchmarks/RESULTS.md). A reader whose `_pread_into` is
        replaced (fault injection) reads on threads whatever the engine.

    `self.align` is the alignment reads are widened to: the smallest every file accepts without
    the page cache (`direct_alignment`), SECTOR when reading through the page cache.
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
        engine: str | None = None,
    ):
        self.folder = Path(folder)
        self.manifest = manifest
        self.threads = threads or DEFAULT_THREADS
        self.coalesce_gap = DEFAULT_COALESCE_GAP if coalesce_gap is None else coalesce_gap
        self.max_read = max_read or DEFAULT_MAX_READ
        if self.threads < 1 or self.max_read < SECTOR:
            raise ValueError(f"threads must be >= 1 and max_read >= {SECTOR}")
        if engine not in (None, "threads", "aio"):
            raise ValueError(f"engine must be 'threads' or 'aio', got {engine!r}")
        self.stats = IOStats()
        self._fields = {
            k: (e, np.dtype(t)) for k, (e, t) in manifest.row_fields().items()
        }  # what a raw read returns
        self._closed = False
        self._files: dict[str, _File] = {}
        self._requests: set[_Request] = set()
        self._lock = threading.Lock()
        self._local = threading.local()
        self.direct = direct is not False
        self.align = (
            512 if self.direct and hasattr(os, "O_DIRECT") else SECTOR
        )  # raised by _open as files need
        try:
            for entry in manifest.layers:
                if entry.file not in self._files:
                    self._files[entry.file] = self._open(entry, direct)
        except BaseException:
            self._close_files()
            raise
        self._pool: ThreadPoolExecutor | None = None
        self._aio = None
        if engine == "aio":
            if not (self.direct and hasattr(os, "O_DIRECT") and kernel_aio.available()):
                self._close_files()
                raise OSError(errno.ENOTSUP, "engine='aio' needs Linux and reads that bypass the page cache")
            from .reader_aio import AioDriver

            try:
                self._aio = AioDriver(self, depth=self.threads, iov_max=_IOV_MAX)
            except OSError:
                self._close_files()
                raise
        self.engine = "aio" if self._aio is not None else "threads"

    # -- opening -------------------------------------------------------------------------

    def _os_open(self, path: str, flags: int) -> int:
        """os.open; a hook for tests that simulate a filesystem refusing O_DIRECT."""
        return os.open(path, flags)

    def _open(self, entry: LayerEntry, direct: bool | None) -> _File:
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
        return _File(fd, path, st.st_size, st.st_mtime_ns)

    def _open_uncached(self, path: str, direct: bool | None) -> int:
        """Open bypassing the page cache; fall back to buffered (once warned) unless required."""
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        try:
            if hasattr(os, "O_DIRECT"):
                fd = self._os_open(path, flags | os.O_DIRECT)
                try:
                    # Some filesystems accept O_DIRECT at open and refuse the read: probe one sector.
                    os.preadv(fd, [_aligned_empty(SECTOR)], 0)
                except OSError:
                    os.close(fd)
                    raise
                return fd
            fd = self._os_open(path, flags)
            if sys.platform == "darwin":
                import fcntl

                try:
                    fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", 48), 1)
                except OSError:
                    os.close(fd)
                    raise
                return fd
            os.close(fd)
            raise OSError(errno.EINVAL, "no way to bypass the page cache on this platform")
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
                stacklevel=4,
            )
        return self._os_open(path, os.O_RDONLY)

    # -- requests ------------------------------------------------------------------------

    def submit(
        self, layer: int, ids: np.ndarray, out: dict[str, np.ndarray] | None = None, *, raw: bool = False
    ) -> ReadFuture:
        """Start reading neurons `ids` of `layer`; the future resolves to {part: float32
        [len(ids), elems]} with row j = neuron ids[j] (ids may be in any order, repeated).

        out: optional arrays to fill and return (C-contiguous, of the shapes and dtypes of
        `empty_rows`, best 4 KiB-aligned); a caller that reuses them saves the page faults of
        fresh memory, which cost as much as the reads on large requests.
        raw: in a quantized folder, the stored fields ({"part.weight": uint32, "part.scales",
        "part.biases": float32}) instead of dequantized float32 rows (no effect otherwise)."""
        if self.manifest.quantized and not raw:
            return self._dequantized(layer, ids, out)
        return self._submit(layer, ids, out)

    def _submit(self, layer: int, ids: np.ndarray, out: dict[str, np.ndarray] | None) -> ReadFuture:
        """`submit` of the stored fields (`row_fields`): the one path every read takes."""
        if self._closed:
            raise ReaderClosedError("FlashReader is closed")
        entry = self._entry(layer)
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise ValueError(f"ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
        ids = ids.astype(np.int64, copy=False)
        if ids.size and (ids.min() < 0 or ids.max() >= entry.num_neurons):
            raise IndexError(f"layer {layer}: neuron ids must lie in [0, {entry.num_neurons})")
        future = ReadFuture(self.stats, layer)
        future.set_running_or_notify_cancel()
        out = self._check_out(out, len(ids)) if out is not None else self.empty_rows(len(ids), raw=True)
        if not ids.size:
            future.set_result(out)
            return future
        dest = gather = None
        if ids.size > 1 and not np.all(ids[1:] > ids[:-1]):
            ids, dest, inverse = np.unique(ids, return_index=True, return_inverse=True)
            if len(ids) < len(inverse):  # repeats: fill unique rows, gather into `out` at the end
                gather, out = (inverse, out), self.empty_rows(len(ids), raw=True)
                dest = None
        chunks = [c for s in entry.segments for c in self._plan(entry, s, ids)]
        req = _Request(layer, ids, chunks, out, dest, gather, future, self.align)
        self._start(req)
        return future

    def read(
        self, layer: int, ids: np.ndarray, out: dict[str, np.ndarray] | None = None, *, raw: bool = False
    ) -> dict[str, np.ndarray]:
        """`submit(layer, ids, out, raw=raw).result()`."""
        return self.submit(layer, ids, out, raw=raw).result()

    def empty_rows(self, n: int, *, raw: bool = False) -> dict[str, np.ndarray]:
        """Fresh 4 KiB-aligned arrays per output, as `submit` (with `raw`) fills them."""
        return {
            name: _aligned_empty(n * e * t.itemsize).view(t).reshape(n, e)
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
        return future

    def submit_rows(self, layer: int, start: int, stop: int, *, raw: bool = False) -> ReadFuture:
        """Start reading the contiguous neurons [start, stop) of a layer: large sequential
        reads of `max_read` bytes spread over the threads (for streaming a whole layer)."""
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

    def _plan(self, entry: LayerEntry, seg: Segment, ids: np.ndarray) -> list[_Chunk]:
        cols = [(c.key, c.start, c.stop, c.dtype) for c in self.manifest.columns(seg)]
        vectored = (
            not self.manifest.quantized
            and self.manifest.dtype == "float32"
            and all((c1 - c0) % self.align == 0 for _, c0, c1, _ in cols)
        )
        reads = _SegmentReads(seg, self._files[entry.file], tuple(cols), vectored)
        starts = seg.data_offset + ids * seg.row_bytes
        planned = plan_chunks(starts, seg.row_bytes, self.coalesce_gap, self.max_read, self.align)
        return [_Chunk(reads, *c) for c in zip(*(a.tolist() for a in planned))]

    def _start(self, req: _Request) -> None:
        with self._lock:
            if self._closed:
                raise ReaderClosedError("FlashReader is closed")
            self._requests.add(req)
            req.future.add_done_callback(lambda _f: self._forget(req))
            if (
                self._aio is not None
                and getattr(self._pread_into, "__func__", None) is FlashReader._pread_into
            ):
                try:
                    self._aio.start(req)
                except OSError:
                    self._requests.discard(req)
                    raise
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="mlx_flash-reader")
            workers = min(self.threads, len(req.chunks))
            for _ in range(workers):  # all counted first: else the first one could finish the request alone,
                req.worker_started()  # and a later one finish it again (its stats counted twice)
            for _ in range(workers):
                self._pool.submit(self._drain, req)

    def _forget(self, req: _Request) -> None:
        with self._lock:
            self._requests.discard(req)

    # -- worker side ---------------------------------------------------------------------

    def _drain(self, req: _Request) -> None:
        """A worker: take the request's next read until none is left or one failed. The hot
        loop of the reader: names bound once, one read and one clock pair per chunk, the rare
        short read continued apart (`_read_rest`)."""
        local = LayerIOStats()
        latencies: list[float] = []
        read_bytes = used_bytes = 0
        try:
            scratch = self._scratch(req.max_length)
            scratch_view = memoryview(scratch)
            chunks, n, next_job = req.chunks, len(req.chunks), req.next_job
            pread, clock, lap = self._pread_into, time.perf_counter, latencies.append
            while not req.failed and not self._closed:
                i = next(next_job)
                if i >= n:
                    break
                chunk = chunks[i]
                reads = chunk.reads
                vectored = self._vectored(req, chunk)
                bufs = (
                    self._span_buffers(req, self._row_spans(req, chunk), scratch_view)
                    if vectored
                    else [scratch_view[: chunk.length]]
                )
                t0 = clock()
                try:
                    got = pread(reads.file.fd, bufs, chunk.offset)
                except OSError as e:
                    raise self._read_error(req.layer, chunk, 0, e) from e
                lap(clock() - t0)
                if got < chunk.need:
                    got = self._read_rest(req.layer, chunk, bufs, got, latencies)
                read_bytes += got
                used_bytes += (chunk.stop - chunk.first) * reads.segment.row_bytes
                if not vectored:
                    self._scatter(req, chunk, scratch)
            if self._closed and not req.failed:
                raise ReaderClosedError("FlashReader closed while a request was running")
        except BaseException as exc:  # every error reaches the caller; the worker lives on
            req.fail(exc)
        finally:
            local.bytes_read, local.bytes_used, local.reads = read_bytes, used_bytes, len(latencies)
            local.read_latency.add_many(latencies)
            req.worker_done(local, self.stats)

    def _scratch(self, nbytes: int) -> np.ndarray:
        """This thread's scratch buffer, grown to `nbytes` when needed."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < nbytes:
            buf = self._local.buf = self._new_scratch(nbytes)
        return buf

    @staticmethod
    def _new_scratch(nbytes: int) -> np.ndarray:
        return _aligned_empty(-(-nbytes // SECTOR) * SECTOR)

    def _pread_into(self, fd: int, bufs: list[memoryview], offset: int) -> int:
        """One positioned read filling `bufs` in order, returning the bytes read; the single
        low-level read of the reader (tests override it to inject faults)."""
        return os.preadv(fd, bufs, offset)

    @staticmethod
    def _vectored(req: _Request, chunk: _Chunk) -> bool:
        """Whether a read goes straight into the output rows (`_row_spans`), not via scratch."""
        reads = chunk.reads
        return (
            req.aligned
            and reads.vectored
            and (chunk.stop - chunk.first) * (len(reads.columns) + 1) <= _IOV_MAX
        )

    @staticmethod
    def _row_spans(req: _Request, chunk: _Chunk) -> list[tuple[str | None, int, int]]:
        """The iovecs of a vectored read, as (output, byte offset in it, length): each part of
        each wanted row into its output row, the bytes between wanted rows into scratch
        (output None, offset 0: discarded). All are whole sectors."""
        seg, ids, dest = chunk.reads.segment, req.id_list, req.dest_list
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

    @staticmethod
    def _span_buffers(
        req: _Request, spans: list[tuple[str | None, int, int]], scratch: memoryview
    ) -> list[memoryview]:
        """`_row_spans` as buffers for os.preadv."""
        out = req.out_bytes
        return [scratch[:n] if name is None else out[name][off : off + n] for name, off, n in spans]

    def _read_rest(
        self, layer: int, chunk: _Chunk, bufs: list[memoryview], got: int, latencies: list[float]
    ) -> int:
        """After a first read of `chunk` delivered only `got` bytes: read on from there until
        `chunk.need` bytes arrived, returning the bytes read. Raises FlashReadError naming file,
        offset and layer at end of file or on an error."""
        f, i, n = chunk.reads.file, 0, got
        while got < chunk.need:
            if n <= 0:
                raise FlashReadError(
                    f"{f.path}: short read at offset {chunk.offset + got} (layer {layer}): got {got} of "
                    f"{chunk.need} bytes{self._changed(f)}",
                    path=f.path,
                    offset=chunk.offset + got,
                    layer=layer,
                )
            while i < len(bufs) and n >= len(bufs[i]):  # skip what the last read filled
                n -= len(bufs[i])
                i += 1
            if n:
                bufs[i] = bufs[i][n:]
            t0 = time.perf_counter()
            try:
                n = self._pread_into(f.fd, bufs[i:], chunk.offset + got)
            except OSError as e:
                raise self._read_error(layer, chunk, got, e) from e
            latencies.append(time.perf_counter() - t0)
            got += max(n, 0)
        return got

    def _read_error(self, layer: int, chunk: _Chunk, got: int, e: OSError) -> FlashReadError:
        f, at = chunk.reads.file, chunk.offset + got
        return FlashReadError(
            f"{f.path}: read of {chunk.length - got} bytes at offset {at} (layer {layer}) failed: "
            f"{e.strerror or e}{self._changed(f)}",
            path=f.path,
            offset=at,
            layer=layer,
            err=e.errno or errno.EIO,
        )

    def _scatter(self, req: _Request, chunk: _Chunk, scratch: np.ndarray) -> None:
        """Convert the rows of a read from the scratch buffer into the request's outputs."""
        ids = req.ids[chunk.first : chunk.stop]
        seg, lo = chunk.reads.segment, int(ids[0])
        span = int(ids[-1]) - lo + 1  # the rows from the first to the last wanted one
        begin = seg.row_offset(lo) - chunk.offset
        rows = scratch[begin : begin + span * seg.row_bytes].reshape(span, seg.row_bytes)
        if span != chunk.stop - chunk.first:  # a coalesced read also holds unwanted rows: pick ours
            rows = rows[ids - lo]
        where = req.where(chunk.first, chunk.stop)
        for name, c0, c1, dtype in chunk.reads.columns:
            if dtype == "uint32":  # packed quantized weights: the bytes as they are
                req.out[name].view(np.uint8)[where] = rows[:, c0:c1]
            else:
                _convert_into(req.out[name], where, rows[:, c0:c1].view(_RAW_DTYPES[dtype]), dtype)

    @staticmethod
    def _changed(f: _File) -> str:
        """' (the file changed since it was opened)' when its size or mtime moved, else ''."""
        try:
            st = os.fstat(f.fd)
        except OSError:
            return ""
        if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
            return f"; the file changed since it was opened ({f.size} -> {st.st_size} bytes)"
        return ""

    # -- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the threads and close the files; requests still running fail with
        ReaderClosedError. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._requests)
        if self._aio is not None:
            self._aio.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
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

"""FlashReader: exact bytes for random id sets, every layout and dtype; fault injection;
fallback when the filesystem refuses O_DIRECT; no leaked threads or descriptors."""

from __future__ import annotations

import concurrent.futures
import errno
import io
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash.layout import (
    DATA_ALIGNMENT,
    SECTOR,
    FlashFormatError,
    LayerEntry,
    Manifest,
    Part,
    Segment,
    bundle_tensor_name,
    layer_digest,
    layer_file,
    part_tensor_name,
    verify_layer,
    write_manifest,
)
from mlx_flash.reader import (
    Fault,
    FlashChecksumError,
    FlashReader,
    FlashReadError,
    ReaderClosedError,
    ThreadEngine,
    VerifyingReader,
    available_engines,
    make_engine,
    plan_chunks,
)
from mlx_flash.reader import native as native_reader
from mlx_flash.reader.request import ReadFuture, Request
from mlx_flash.safetensors_file import PlannedTensor, SafetensorsWriter

ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
RAW = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def make_flash_folder(
    folder, *, dtype="float16", bundled=True, elems=(40, 40, 40), num_neurons=300, num_layers=2, seed=0
):
    """Write random neuron data as a flash folder; returns (manifest, raw) where raw[layer][part]
    is the [num_neurons, elems] array of the stored values (bfloat16 as uint16 bits)."""
    rng = np.random.default_rng(seed)
    names = ("gate", "up", "down")[: len(elems)]
    parts = tuple(Part(n, e) for n, e in zip(names, elems))
    esize = np.dtype(RAW[dtype]).itemsize
    (folder / "ffn").mkdir(parents=True, exist_ok=True)
    raw, layers = [], []
    for layer in range(num_layers):
        data = {}
        for p in parts:
            x = rng.standard_normal((num_neurons, p.elems)).astype(np.float32)
            data[p.name] = (
                (x.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16" else x.astype(RAW[dtype])
            )
        raw.append(data)
        groups = (
            [(bundle_tensor_name(layer), names)]
            if bundled
            else [(part_tensor_name(layer, n), (n,)) for n in names]
        )
        planned = [
            PlannedTensor(t, ST[dtype], (num_neurons, sum(data[n].shape[1] for n in ps)), DATA_ALIGNMENT)
            for t, ps in groups
        ]
        path = folder / layer_file(layer)
        with SafetensorsWriter(path, planned) as w:
            for t, ps in groups:
                w.write(t, np.concatenate([data[n] for n in ps], axis=1))
        segs = tuple(
            Segment(t, ps, w.offsets[t], sum(data[n].shape[1] for n in ps) * esize) for t, ps in groups
        )
        entry = LayerEntry(layer, layer_file(layer), num_neurons, sum(s.row_bytes for s in segs), "", segs)
        layers.append(LayerEntry(**{**entry.__dict__, "checksum": layer_digest(folder, entry)}))
    m = Manifest("test", "llama", "gated", "relu", dtype, 64, num_layers, bundled, parts, layers)
    write_manifest(folder, m)
    return m, raw


def as_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """The stored values as float32, converted by MLX (independent of the reader's numpy path)."""
    a = mx.array(raw)
    if dtype == "bfloat16":
        a = a.view(mx.bfloat16)
    return np.array(a.astype(mx.float32))


ROOT = Path(__file__).resolve().parents[1]  # the checkout whose mlx_flash the tests import
ENGINES = available_engines()  # every engine that loads here: the same results from each


def open_reader(folder, manifest, engine, **kw) -> FlashReader:
    """A FlashReader on `engine`."""
    return FlashReader(folder, manifest, engine=engine, **kw)


def check_rows(out, raw_layer, ids, dtype):
    assert set(out) == set(raw_layer)
    for name, x in raw_layer.items():
        assert out[name].dtype == np.float32 and out[name].shape == (len(ids), x.shape[1])
        np.testing.assert_array_equal(out[name], as_float32(x[np.asarray(ids, dtype=np.int64)], dtype))


# bundle bytes per dtype: 40*3*2 = 240 (not a sector multiple), 1024*4 = 4 KiB exactly, 1400*3*4 > 4 KiB
LAYOUTS = [
    ("float16", True, (40, 40, 40)),
    ("bfloat16", True, (40, 40, 40)),
    ("float32", True, (384, 384, 256)),
    ("float32", False, (384, 384, 256)),
    ("float16", False, (40, 60, 24)),
    ("bfloat16", False, (1400, 1400, 1400)),
    ("float32", True, (1400, 1400, 1400)),
    ("float32", True, (1024, 1024, 1024)),  # parts of whole sectors: read straight into the outputs
    ("float32", False, (1024, 2048, 1024)),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype,bundled,elems", LAYOUTS)
def test_random_id_sets_return_exact_rows(tmp_path, dtype, bundled, elems, engine):
    m, raw = make_flash_folder(tmp_path, dtype=dtype, bundled=bundled, elems=elems)
    rng = np.random.default_rng(1)
    for gap, max_read in [(-1, 4096), (0, 8192), (16384, 65536), (1 << 30, 1 << 20)]:
        with open_reader(tmp_path, m, engine, threads=3, coalesce_gap=gap, max_read=max_read) as r:
            assert r.engine == engine
            for _ in range(4):
                layer = int(rng.integers(2))
                ids = np.sort(rng.choice(300, size=int(rng.integers(1, 120)), replace=False))
                check_rows(r.read(layer, ids), raw[layer], ids, dtype)
            check_rows(r.read(1, [299, 0, 298, 1]), raw[1], [299, 0, 298, 1], dtype)  # both ends of the file


@pytest.mark.parametrize("engine", ENGINES)
def test_any_order_repeats_empty_and_rows(tmp_path, engine):
    m, raw = make_flash_folder(tmp_path)
    with open_reader(tmp_path, m, engine, threads=2) as r:
        for ids in ([5, 3, 9, 4], [7, 7, 2, 7], [12], []):
            check_rows(r.read(0, np.array(ids, dtype=np.int32)), raw[0], ids, "float16")
        check_rows(r.read_rows(1, 10, 290), raw[1], np.arange(10, 290), "float16")
        futures = [r.submit(layer, np.arange(layer, 300, 7)) for layer in (0, 1, 0, 1)]  # several in flight
        for layer, f in zip((0, 1, 0, 1), futures):
            check_rows(f.result(), raw[layer], np.arange(layer, 300, 7), "float16")
        with pytest.raises(IndexError):
            r.read(0, [300])
        with pytest.raises(IndexError):
            r.read(2, [0])
        with pytest.raises(ValueError):
            r.read(0, np.array([1.0]))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("elems", [(1024, 2048, 1024), (40, 40, 40)])
def test_caller_buffers_filled_aligned_or_not(tmp_path, elems, engine):
    m, raw = make_flash_folder(tmp_path, dtype="float32", bundled=False, elems=elems)
    with open_reader(tmp_path, m, engine, threads=3) as r:
        for ids in ([4, 9, 100, 101, 250], [9, 4, 9, 250]):
            aligned = r.empty_rows(len(ids))
            offset = {k: np.empty(v.size + 1, np.float32)[1:].reshape(v.shape) for k, v in aligned.items()}
            for out in (aligned, offset):  # unaligned buffers take the scratch path
                got = r.read(0, ids, out=out)
                assert all(got[k] is out[k] for k in out)
                check_rows(got, raw[0], ids, "float32")
        with pytest.raises(ValueError, match="out"):
            r.read(0, [1, 2], out=r.empty_rows(3))


class SlowAndFailingRead:
    """The fourth read fails at once, while the three before it (one per other thread) are still
    running: the error must not reach the caller while any read is still writing into its
    buffers."""

    def __init__(self):
        self.calls, self.running = 0, 0
        self._count_lock = threading.Lock()

    def __call__(self, fd, bufs, offset):
        with self._count_lock:
            self.calls += 1
            fail = self.calls == 4
            self.running += 1
        try:
            if fail:
                raise OSError(errno.EIO, "Input/output error")
            time.sleep(0.2)
            return os.preadv(fd, bufs, offset)
        finally:
            with self._count_lock:
                self.running -= 1


def test_failed_request_resolves_after_its_last_read(tmp_path):
    m, raw = make_flash_folder(tmp_path)
    pread = SlowAndFailingRead()
    with FlashReader(tmp_path, m, coalesce_gap=-1, engine=ThreadEngine(4, pread=pread)) as r:
        with pytest.raises(FlashReadError):
            r.read(1, np.arange(0, 300, 5))
        assert pread.running == 0 and pread.calls >= 4


@pytest.mark.parametrize("align", [512, SECTOR])
def test_plan_chunks_aligned_coalesced_and_bounded(align):
    starts = 16384 + np.array([0, 1, 2, 10, 11, 60, 200, 201, 202, 203]) * 3000
    for gap, max_read in [(-1, 4096), (0, 4096), (8192, 8192), (1 << 20, 12288), (1 << 20, 1 << 20)]:
        first, stop, offset, length, need = plan_chunks(starts, 3000, gap, max_read, align)
        assert first[0] == 0 and stop[-1] == len(starts) and np.all(first[1:] == stop[:-1])
        assert np.all(offset % align == 0) and np.all(length % align == 0)
        assert np.all(offset <= starts[first]) and np.all(offset + need == starts[stop - 1] + 3000)
        assert np.all(need <= length) and np.all(length <= max_read + 3000 + align)
        gaps = offset[1:] - (offset[:-1] + length[:-1])
        group = np.concatenate([[0], np.cumsum(gaps > gap)])  # reads not split by a gap: one range,
        for g in np.unique(group):  # cut only at max_read boundaries
            c = np.flatnonzero(group == g)
            assert len(c) <= (offset[c[-1]] + length[c[-1]] - offset[c[0]]) // max_read + 1
        if gap < 0:  # lone rows: each read is the row widened to whole blocks, no more
            lone = stop - first == 1
            s0 = starts[first][lone]
            assert np.all(length[lone] == -(-(s0 + 3000) // align) * align - s0 // align * align)
    assert len(plan_chunks(starts, 3000, 1 << 20, 1 << 20)[0]) == 1
    assert len(plan_chunks(starts, 3000, -1, 1 << 20)[0]) == 4  # rows sharing a sector merge


def test_reads_small_bundles_at_the_device_alignment(tmp_path):
    """O_DIRECT reads are widened only to the alignment the file accepts (probed: the device's
    logical block size), not to 4 KiB: a 240-byte bundle costs one block, and the rows are exact."""
    m, raw = make_flash_folder(tmp_path, dtype="float16", elems=(40, 40, 40), num_neurons=300)
    ids = np.array([3, 40, 41, 150, 299])
    with FlashReader(tmp_path, m, coalesce_gap=-1) as r:
        assert r.align in (512, 1024, 2048, SECTOR) and (r.align == SECTOR or r.direct)
        r.stats.take()
        check_rows(r.read(0, ids), raw[0], ids, "float16")
        s = r.stats.take()[0]
        want = sum(
            len(range(o // r.align, -(-(o + 240) // r.align))) * r.align
            for o in {m.layers[0].segments[0].row_offset(int(i)) for i in ids}
        )
        # 40 and 41 may share a block (one read); each read is its rows widened to whole blocks
        assert s.bytes_read <= want  # (the read at the end of the file returns what is there)
        if r.direct and r.align < SECTOR:
            assert s.bytes_read < len(ids) * SECTOR


def faulty(engine: str, threads: int, kind: str, at: int):
    """An engine (by name) whose `at`-th low-level read gets the fault `kind`."""
    return make_engine(engine, threads, faults=(Fault(kind, at),))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fault", ["eio", "short"])
def test_fault_raises_clear_error_and_pool_keeps_working(tmp_path, fault, engine):
    m, raw = make_flash_folder(tmp_path)
    ids = np.arange(0, 300, 5)
    with FlashReader(tmp_path, m, threads=4, coalesce_gap=-1, engine=faulty(engine, 4, fault, 7)) as r:
        with pytest.raises(FlashReadError) as ei:
            r.read(1, ids)
        e = ei.value
        assert isinstance(e, OSError) and e.layer == 1 and e.path.endswith(layer_file(1))
        assert e.offset % r.align == 0 and str(e.offset) in str(e) and "layer 1" in str(e)
        for _ in range(3):  # the same pool serves later requests
            check_rows(r.read(1, ids), raw[1], ids, "float16")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fault", ["partial", "eintr"])
@pytest.mark.parametrize("elems", [(1400, 1400, 1400), (1024, 2048, 1024)])
def test_partial_or_interrupted_read_is_continued(tmp_path, elems, fault, engine):
    m, raw = make_flash_folder(tmp_path, dtype="float32", elems=elems)
    with FlashReader(tmp_path, m, threads=2, max_read=65536, engine=faulty(engine, 2, fault, 2)) as r:
        ids = np.arange(100, 140)
        r.stats.take()
        check_rows(r.read(0, ids), raw[0], ids, "float32")
        reads = r.stats.take()[0]
        # the fault was injected (an extra low-level read: the continuation or the retry)
        assert reads.reads > reads.reads_into_outputs + reads.reads_via_scratch


@pytest.mark.parametrize("engine", ENGINES)
def test_file_truncated_underneath(tmp_path, engine):
    m, _ = make_flash_folder(tmp_path)
    with open_reader(tmp_path, m, engine, threads=2) as r:
        os.truncate(tmp_path / layer_file(0), m.layers[0].segments[0].data_offset + 1000)
        with pytest.raises(FlashReadError, match="changed since it was opened"):
            r.read(0, [250, 251])


def test_missing_or_short_file_at_open(tmp_path):
    m, _ = make_flash_folder(tmp_path)
    os.truncate(tmp_path / layer_file(1), 20000)
    with pytest.raises(FlashFormatError, match="truncated"):
        FlashReader(tmp_path, m)
    os.remove(tmp_path / layer_file(1))
    with pytest.raises(FlashFormatError, match="missing"):
        FlashReader(tmp_path, m)


class NoDirectReader(FlashReader):
    """A filesystem that refuses O_DIRECT at open, as some do."""

    def _os_open(self, path, flags):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return super()._os_open(path, flags)


def test_buffered_fallback_warns_once(tmp_path):
    m, raw = make_flash_folder(tmp_path)
    with pytest.warns(RuntimeWarning, match="page cache") as rec:
        r = NoDirectReader(tmp_path, m, threads=2)
    assert len(rec) == 1 and r.direct is False
    with r:
        check_rows(r.read(1, [3, 200]), raw[1], [3, 200], "float16")
    if hasattr(os, "O_DIRECT"):
        with pytest.raises(OSError):
            NoDirectReader(tmp_path, m, direct=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with FlashReader(tmp_path, m, direct=False) as r:
            assert r.direct is False
            check_rows(r.read(0, [7]), raw[0], [7], "float16")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


@pytest.mark.parametrize("engine", ENGINES)
def test_close_leaks_nothing_and_is_idempotent(tmp_path, engine):
    m, _ = make_flash_folder(tmp_path)
    fds, threads = _open_fds(), threading.active_count()
    r = FlashReader(tmp_path, m, coalesce_gap=-1, engine=faulty(engine, 5, "eio", 3))
    with pytest.raises(FlashReadError):
        r.read(0, np.arange(0, 300, 20))  # 15 reads, 4800 bytes apart
    r.read(0, np.arange(0, 300, 20))
    r.close()
    r.close()
    assert _open_fds() == fds and threading.active_count() == threads
    with pytest.raises(ReaderClosedError):
        r.submit(0, [1])


class GatedRead:
    """Every read waits until the test lets it go."""

    def __init__(self):
        self.gate, self.started = threading.Event(), threading.Event()

    def __call__(self, fd, bufs, offset):
        self.started.set()
        self.gate.wait(5)
        return os.preadv(fd, bufs, offset)


def test_close_while_reading_fails_the_request_not_hangs(tmp_path):
    m, _ = make_flash_folder(tmp_path)
    threads = threading.active_count()
    pread = GatedRead()
    r = FlashReader(tmp_path, m, coalesce_gap=-1, engine=ThreadEngine(2, pread=pread))
    future = r.submit(0, np.arange(0, 300, 20))
    assert pread.started.wait(5)
    threading.Timer(0.05, pread.gate.set).start()  # let the reads in flight finish during close()
    r.close()
    with pytest.raises(ReaderClosedError):
        future.result(timeout=5)
    assert threading.active_count() <= threads + 1  # + the Timer, which is ending


@pytest.mark.parametrize("engine", ENGINES)
def test_stats_count_reads_bytes_and_take_resets(tmp_path, engine):
    m, _ = make_flash_folder(tmp_path, dtype="float32", elems=(384, 384, 256))  # 4 KiB bundles
    with open_reader(tmp_path, m, engine, threads=2, coalesce_gap=0) as r:
        r.read(0, [1, 5, 9])  # 12 KiB gaps: three reads
        r.read(1, [2, 3])  # neighbours: one 8 KiB read
        s = r.stats.take()
        assert (s[0].reads, s[0].bytes_read, s[0].bytes_used, s[0].neurons) == (3, 3 * 4096, 3 * 4096, 3)
        assert (s[1].reads, s[1].bytes_read, s[1].requests) == (1, 8192, 1)
        assert (s[0].reads_into_outputs, s[0].reads_via_scratch) == (3, 0)  # float32 parts of whole blocks
        assert s[0].read_latency.count == 3 and s[0].request_latency.count == 1
        assert 0 < s[0].read_latency.quantile(0.5) <= s[0].read_latency.max_seconds
        assert s[0].wait_seconds >= 0
        assert r.stats.snapshot() == {}
        unaligned = {
            k: np.empty(v.size + 1, np.float32)[1:].reshape(v.shape) for k, v in r.empty_rows(2).items()
        }
        r.read(0, [1, 5], out=unaligned)  # outputs not aligned for O_DIRECT: through scratch
        s = r.stats.take()[0]
        assert (s.reads_into_outputs, s.reads_via_scratch) == (0, 2)


@pytest.mark.parametrize("engine", ENGINES)
def test_close_with_requests_queued_fails_or_finishes_them_and_leaks_nothing(tmp_path, engine):
    m, raw = make_flash_folder(tmp_path, dtype="float32", elems=(1024, 1024, 1024))
    fds, threads = _open_fds(), threading.active_count()
    r = open_reader(tmp_path, m, engine, threads=2, coalesce_gap=-1)
    ids = np.arange(0, 300, 2)
    futures = [r.submit(k % 2, ids) for k in range(20)]  # 150 reads each, 2 in flight at a time
    r.close()
    outcomes = []
    for k, f in enumerate(futures):
        try:
            check_rows(f.result(timeout=10), raw[k % 2], ids, "float32")
            outcomes.append("done")
        except ReaderClosedError:
            outcomes.append("closed")
    assert "closed" in outcomes  # the queue was not drained before closing
    assert _open_fds() == fds and threading.active_count() == threads


def test_unknown_engine_is_refused_before_any_file_is_opened(tmp_path):
    m, _ = make_flash_folder(tmp_path)
    fds = _open_fds()
    with pytest.raises(ValueError, match="engine"):
        FlashReader(tmp_path, m, engine="uring")
    assert _open_fds() == fds


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype,elems", [("float16", (40, 40, 40)), ("float32", (1024, 1024, 1024))])
def test_rows_match_the_checksums_taken_at_load_on_every_engine(tmp_path, engine, dtype, elems):
    m, raw = make_flash_folder(tmp_path, dtype=dtype, elems=elems)
    crcs = [verify_layer(tmp_path, e) for e in m.layers]
    ids = np.array([0, 7, 8, 150, 299])
    with VerifyingReader(tmp_path, m, crcs, engine=engine, threads=3) as r:
        check_rows(r.read(1, ids), raw[1], ids, dtype)
        seg = m.layers[1].segments[0]
        with open(tmp_path / layer_file(1), "r+b") as f:  # flip one bit of neuron 150
            f.seek(seg.row_offset(150) + 5)
            b = f.read(1)
            f.seek(seg.row_offset(150) + 5)
            f.write(bytes([b[0] ^ 1]))
            f.flush()
            os.fsync(f.fileno())
        with pytest.raises(FlashChecksumError, match="neuron 150 of layer 1"):
            r.read(1, ids)


def _kernel_gives_a_plain_ring() -> bool:
    """Whether io_uring_setup with no flags works in this process (libc's syscall, not ours)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed: no flags
    fd = libc.syscall(425, 1, params)  # __NR_io_uring_setup (the same on x86-64 and arm64)
    if fd < 0:
        return False
    os.close(fd)
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="io_uring is Linux's")
def test_native_engine_runs_io_uring_wherever_the_kernel_gives_a_plain_ring(tmp_path):
    """The engine's ring setup (fio's flags, falling back to older sets by EINVAL, enabled by its
    worker thread) must not lose io_uring where a plain ring works: else the default would fall
    back to the pthread pool silently and the io_uring tests would not run."""
    if native_reader.load_error() is not None or not _kernel_gives_a_plain_ring():
        pytest.skip("no native extension, or the kernel refuses io_uring here")
    assert native_reader.backend_error("io_uring") is None
    m, raw = make_flash_folder(tmp_path)
    ids = np.array([3, 40, 41, 299], dtype=np.int64)
    with FlashReader(tmp_path, m) as r:
        assert r.engine == "native-io_uring"
        check_rows(r.read(1, ids), raw[1], ids, m.dtype)


def test_default_engine_is_native_where_built_else_threads_said_once(tmp_path, monkeypatch, caplog):
    from mlx_flash.reader import engines, native

    m, _ = make_flash_folder(tmp_path)
    if native.load_error() is None:
        with FlashReader(tmp_path, m) as r:
            assert r.engine.startswith("native-")
    elif os.environ.get("MLX_FLASH_REQUIRE_NATIVE"):
        pytest.fail(f"the native engine was not built: {native.load_error()}")
    monkeypatch.setattr(native, "load_error", lambda: "no C compiler at install")
    monkeypatch.setattr(engines, "_said_fallback", False)
    with caplog.at_level("WARNING", logger="mlx_flash"):
        for _ in range(2):
            with FlashReader(tmp_path, m) as r:
                assert r.engine == "threads"
    assert [rec.getMessage() for rec in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "no C compiler at install" in caplog.records[0].getMessage()


def test_without_the_extension_a_fresh_process_reads_with_threads_saying_so_once(tmp_path):
    """An install without a C compiler has no `_native` module: a new interpreter that cannot
    import it (no monkeypatching of the reader) reads the same bytes with the thread engine,
    lists only it, and warns once for several readers."""
    m, raw = make_flash_folder(tmp_path, dtype="float32", elems=(1024, 1024, 1024))
    probe = (
        "import logging, sys\n"
        "import numpy as np\n"
        "sys.modules['mlx_flash.reader._native'] = None  # import fails as for a module never built\n"
        "logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')\n"
        "from mlx_flash.layout import read_manifest\n"
        "from mlx_flash.reader import FlashReader, available_engines\n"
        f"folder = {str(tmp_path)!r}\n"
        "for _ in range(2):\n"
        "    with FlashReader(folder, read_manifest(folder)) as r:\n"
        "        got = r.read(1, np.array([3, 7, 250]))\n"
        "print(r.engine, ','.join(available_engines()))\n"
        "np.save(sys.stdout.buffer, got['up'])\n"
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, env=env, check=True, timeout=120
    )
    first, rest = done.stdout.split(b"\n", 1)
    assert first.decode() == "threads threads"
    np.testing.assert_array_equal(np.load(io.BytesIO(rest)), raw[1]["up"][[3, 7, 250]])
    warned = [line for line in done.stderr.decode().splitlines() if line.startswith("WARNING")]
    assert len(warned) == 1 and "native reader engine is not available" in warned[0]
    assert "not built" in warned[0] and "C compiler" in warned[0]


@pytest.mark.parametrize("engine", [e for e in ENGINES if e.startswith("native")])
def test_native_engine_reads_many_requests_in_flight_from_several_threads(tmp_path, engine):
    m, raw = make_flash_folder(tmp_path, dtype="float32", elems=(1024, 1024, 1024), num_neurons=300)
    rng = np.random.default_rng(3)
    with FlashReader(tmp_path, m, engine=engine, threads=8, coalesce_gap=-1) as r:
        jobs = [np.sort(rng.choice(300, size=int(rng.integers(1, 200)), replace=False)) for _ in range(40)]
        results: dict[int, dict] = {}

        def run(k0):
            futures = [(k, r.submit(k % 2, jobs[k])) for k in range(k0, len(jobs), 4)]
            for k, f in futures:
                results[k] = f.result(timeout=30)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for k, ids in enumerate(jobs):
            check_rows(results[k], raw[k % 2], ids, "float32")


NATIVE_ERROR = native_reader.load_error()


@pytest.mark.skipif(NATIVE_ERROR is not None, reason=f"native engine not built: {NATIVE_ERROR}")
@pytest.mark.parametrize(
    "dtype,bundled,elems",
    [
        ("float32", True, (1024, 1024, 1024)),
        ("float32", False, (1024, 2048, 1024)),
        ("float16", True, (40, 40, 40)),
    ]
    + [("float32", True, (384, 384, 256)), ("bfloat16", False, (1400, 1400, 1400))],
)
def test_native_plan_equals_the_python_planner_on_random_cases(tmp_path, dtype, bundled, elems):
    """One planning source of truth: the C engine's reads (rows to aligned, coalesced ranges)
    and iovecs (straight into the output rows, gaps into junk, else a span of scratch) are the
    Python planner's (`plan_chunks`, `Request.vectored`/`spans`), on random requests."""
    m, _ = make_flash_folder(tmp_path, dtype=dtype, bundled=bundled, elems=elems, num_neurons=300)
    rng = np.random.default_rng(7)
    cases, seen = 0, set()
    for gap, max_read in [(-1, 4096), (0, 8192), (5000, 20000), (16384, 65536), (1 << 30, 1 << 20)]:
        with FlashReader(tmp_path, m, coalesce_gap=gap, max_read=max_read, engine="threads") as r:
            for _ in range(12):
                layer = int(rng.integers(2))
                ids = np.sort(rng.choice(300, size=int(rng.integers(1, 300)), replace=False)).astype(np.int64)
                dest = rng.permutation(len(ids)).astype(np.int64) if rng.integers(2) else None
                out = r.empty_rows(len(ids), raw=True)
                if rng.integers(3) == 0:  # unaligned outputs: every read through scratch
                    out = {k: np.empty(v.size + 1, v.dtype)[1:].reshape(v.shape) for k, v in out.items()}
                req = Request(
                    layer,
                    ids,
                    r._layer_reads[layer],
                    r._planner,
                    out,
                    dest,
                    None,
                    ReadFuture(r.stats, layer),
                    r.stats,
                )
                reads, iovs, names = native_reader.plan(req)
                chunks = req.chunks
                assert len(reads) == len(chunks)
                scratch_at = 0
                for d, c in zip(reads, chunks):
                    seg = req.reads.index(c.reads)
                    assert d[4:7].tolist() == [seg, c.first, c.stop]
                    assert d[1:4].tolist() == [c.offset, c.need, c.length]
                    got = iovs[d[7] : d[7] + d[8]].tolist()
                    if req.vectored(c):
                        assert d[9] == -1
                        want = [
                            [0 if k is None else out[k].ctypes.data + off, n] for k, off, n in req.spans(c)
                        ]
                        assert got == want
                        seen.add("into outputs, gaps" if any(a == 0 for a, _ in got) else "into outputs")
                    else:
                        assert d[9] == scratch_at and got == [[scratch_at, c.length]]
                        scratch_at += c.length
                        seen.add("scratch")
                cases += 1
    assert cases == 60
    vectored = dtype == "float32" and all(e % 128 == 0 for e in elems)  # parts of whole 512 B blocks
    assert seen == ({"into outputs", "into outputs, gaps", "scratch"} if vectored else {"scratch"})


@pytest.mark.parametrize("engine", ENGINES)
def test_a_request_nobody_waits_for_resolves_and_runs_its_callbacks(tmp_path, engine):
    """A request is delivered in the thread that waits for it; one nobody waits for is still
    delivered (by the engine): its callbacks run, `done()` turns true, `wait` returns it."""
    m, raw = make_flash_folder(tmp_path)
    with open_reader(tmp_path, m, engine, threads=2) as r:
        called = threading.Event()
        f = r.submit(0, np.arange(0, 300, 3))
        f.add_done_callback(lambda _f: called.set())
        assert called.wait(10) and f.done()
        check_rows(f.result(), raw[0], np.arange(0, 300, 3), "float16")
        futures = [r.submit(1, np.arange(k, 300, 7)) for k in range(3)]
        done, _ = concurrent.futures.wait(futures, timeout=10)
        assert len(done) == 3
        for k, f in enumerate(futures):
            check_rows(f.result(), raw[1], np.arange(k, 300, 7), "float16")
        f = r.submit(1, [3, 9])
        while not f.done():  # polling delivers it too
            time.sleep(0.001)
        check_rows(f.result(), raw[1], [3, 9], "float16")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("elems", [(1024, 1024, 1024), (40, 40, 40)])
def test_rows_go_straight_into_the_given_rows_of_a_larger_buffer(tmp_path, engine, elems):
    """submit(rows=): neuron ids[j] lands in row rows[j] of `out` (a cache's buffers) and no
    other row is touched; aligned float32 parts of whole blocks are read straight there, the
    rest through scratch, and the statistics say which."""
    m, raw = make_flash_folder(tmp_path, dtype="float32", elems=elems)
    crcs = [verify_layer(tmp_path, e) for e in m.layers]
    rng = np.random.default_rng(5)
    direct = all(e % 128 == 0 for e in elems)  # parts of whole 512-byte blocks
    with VerifyingReader(tmp_path, m, crcs, engine=engine, threads=3, coalesce_gap=4096) as r:
        for aligned in (True, False):
            buffers = r.empty_rows(64)
            if not aligned:  # not aligned for O_DIRECT: through scratch
                buffers = {
                    k: np.empty(v.size + 1, np.float32)[1:].reshape(v.shape)
                    for k, v in r.empty_rows(64).items()
                }
            for v in buffers.values():
                v.fill(np.nan)
            ids = rng.choice(300, size=20, replace=False)
            rows = rng.choice(64, size=20, replace=False)
            r.stats.take()
            got = r.read(1, ids, out=buffers, rows=rows)
            s = r.stats.take()[1]
            assert all(got[k] is buffers[k] for k in buffers)
            check_rows({k: v[rows] for k, v in got.items()}, raw[1], ids, "float32")
            untouched = np.setdiff1d(np.arange(64), rows)
            assert all(np.isnan(v[untouched]).all() for v in got.values())
            if aligned and direct:
                assert s.reads_into_outputs > 0 and s.reads_via_scratch == 0
            else:
                assert s.reads_into_outputs == 0 and s.reads_via_scratch > 0
        with pytest.raises(ValueError, match="distinct"):
            r.read(1, [3, 3], out=r.empty_rows(8), rows=[0, 1])
        with pytest.raises(IndexError, match="rows"):
            r.read(1, [3, 4], out=r.empty_rows(8), rows=[0, 8])
        with pytest.raises(ValueError, match="rows= needs out="):
            r.read(1, [3, 4], rows=[0, 1])


def test_default_coalesce_gap_spans_at_most_a_few_rows(tmp_path):
    """Small rows (here 240 B bundles, 80 B parts unbundled) get a gap of COALESCE_ROWS rows, so a
    sparse read does not fetch many unneeded neighbours; large rows keep DEFAULT_COALESCE_GAP; a
    gap given by the caller is kept."""
    from mlx_flash.reader.flash_reader import COALESCE_ROWS, DEFAULT_COALESCE_GAP

    m, _ = make_flash_folder(tmp_path / "b", dtype="float16", elems=(40, 40, 40))
    with FlashReader(tmp_path / "b", m) as r:
        assert r.coalesce_gap == COALESCE_ROWS * 240
    with FlashReader(tmp_path / "b", m, coalesce_gap=0) as r:
        assert r.coalesce_gap == 0
    m, _ = make_flash_folder(tmp_path / "u", dtype="float16", bundled=False, elems=(40, 40, 40))
    with FlashReader(tmp_path / "u", m) as r:
        assert r.coalesce_gap == COALESCE_ROWS * 80
    m, _ = make_flash_folder(tmp_path / "l", dtype="float32", elems=(4096, 4096), num_neurons=8)
    with FlashReader(tmp_path / "l", m) as r:
        assert r.coalesce_gap == DEFAULT_COALESCE_GAP

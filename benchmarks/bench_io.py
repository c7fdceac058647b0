"""The reader's engines against fio, and the flash cost model, measured in one run: random-read
throughput and CPU time per read by request size and reads in flight, on a quiet machine and
beside a CPU-busy neighbour; the fixed cost of a request (8 contiguous rows against 1); and the
neuron cache's memory-management cost per token against a bare memcpy of the same rows.

    python benchmarks/bench_io.py --out DIR [--file-gb N] [--quick]
        [--engines native-io_uring,threads,...] [--chunks 4,16,...] [--depths 1,4,...]
        [--conditions quiet,busy]

Every cell runs each engine (all that load here, by default) and fio (psync with one job per
read in flight, and io_uring with that iodepth: the better of the two is the reference) on the
same file, alternately, `--repeats` times in a fresh random order each time (the disk's speed
depends on what ran just before: a fixed order gave one engine the place after fio's every
round), medians. Throughput is MB/s of flash bytes; CPU per
read is the process's user+system CPU time (getrusage, every thread) over the reads it made,
and fio's own usr+sys CPU over its reads. "busy": a second process spins on one core meanwhile.
The reader keeps two requests in flight, each filling one of two reused output sets, as a
prefetching caller would; the random ids are drawn before the clock starts.

Writes DIR/bench_io.json (cells, targets, the fitted cost model, batch and cache rows),
DIR/bench_io.png, and prints tables. The data file (random bytes, so that no layer of storage
can skip the reads) is written in DIR and deleted at the end unless --keep-file; the page cache
is bypassed with O_DIRECT on both sides.

Cost model: at a depth T, the time per read (aggregate: elapsed / reads) of the default engine
on the quiet machine is fitted as t(c) = a + b*c over chunk sizes c. Merging two reads that lie
g bytes apart saves `a` and costs `b*g`, so gaps below a/b are worth reading and discarding
(the reader's coalesce_gap); the depth is the smallest reaching 95% of the best throughput at
bundle-sized chunks, and the largest useful read (max_read) the smallest chunk reaching 95% of
the best at that depth.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_flash.cache import NeuronCache  # noqa: E402
from mlx_flash.layout import DATA_ALIGNMENT, LayerEntry, Manifest, Part, Segment  # noqa: E402
from mlx_flash.reader import FlashReader, available_engines  # noqa: E402

KIB = 1024
FULL_CHUNKS = [4, 16, 64, 256, 1024]  # KiB
FULL_DEPTHS = [1, 4, 16, 64]
QUICK_CHUNKS = [4, 64]
QUICK_DEPTHS = [1, 16]
BUNDLE_CHUNKS = (16 * KIB, 32 * KIB, 64 * KIB)  # the bundle sizes of real models (fp16..fp32)
DATA_NAME = "bench_io.data"


# -- the data file -------------------------------------------------------------------------


def write_data_file(path: Path, nbytes: int) -> None:
    """Random bytes (incompressible, not sparse), reused when a file of that size exists."""
    if path.exists() and path.stat().st_size == nbytes:
        return
    rng = np.random.default_rng(0)
    block = 64 << 20
    with open(path, "wb") as f:
        for pos in range(0, nbytes, block):
            f.write(rng.integers(0, 2**63, size=min(block, nbytes - pos) // 8, dtype=np.uint64).tobytes())
        f.flush()
        os.fsync(f.fileno())


def bench_manifest(path: Path, chunk: int, dtype: str = "float32") -> Manifest:
    """A one-layer manifest over the data file whose neurons are `chunk`-byte rows: float32
    rows go straight into the outputs, float16 rows through scratch and a conversion."""
    n = (path.stat().st_size - DATA_ALIGNMENT) // chunk
    elems = chunk // (4 if dtype == "float32" else 2)
    seg = Segment("bench", ("up",), DATA_ALIGNMENT, chunk)
    entry = LayerEntry(0, path.name, n, chunk, "", (seg,))
    return Manifest(
        "bench", "bench", "two_matrix", "relu", dtype, elems, 1, True, (Part("up", elems),), [entry]
    )


# -- one point of the grid -----------------------------------------------------------------

BUFFER_KINDS = ("small_pages", "huge_pages", "numpy")
HUGE_PAGE = 2 << 20


def host_buffer(reader: FlashReader, n: int, kind: str = "small_pages") -> dict[str, np.ndarray]:
    """Output arrays for `n` rows, touched once. small_pages / huge_pages: anonymous memory
    with transparent huge pages refused / asked for (2 MiB-aligned); numpy: the reader's own
    `empty_rows` (numpy asks for huge pages on large arrays, 4 KiB-aligned). The grid uses
    small pages by default, as fio's own buffers are; with huge_pages, fio's buffers are given
    huge pages too (`fio_huge_pages.c`): on the project's virtio disk a read into huge pages is
    up to 2x faster than into small ones, for either side."""
    if kind == "numpy":
        out = reader.empty_rows(n)
    else:
        out = {}
        for p in reader.manifest.parts:
            nbytes = max(n * p.elems * 4, 1)
            # private (a shared anonymous map is shmem, which takes no transparent huge pages)
            mm = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            skip = -np.frombuffer(mm, dtype=np.uint8).ctypes.data % HUGE_PAGE
            advice = getattr(mmap, "MADV_HUGEPAGE" if kind == "huge_pages" else "MADV_NOHUGEPAGE", None)
            if advice is not None:
                mm.madvise(advice)
            out[p.name] = np.frombuffer(mm, dtype=np.float32, count=n * p.elems, offset=skip).reshape(
                n, p.elems
            )
    for a in out.values():
        a.fill(0)
    return out


def cpu_seconds() -> float:
    """This process's user + system CPU time so far (every thread)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def id_sets(n: int, per_request: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`count` sorted random sets of `per_request` distinct rows of [0, n), drawn in advance."""
    return [np.sort(rng.choice(n, size=per_request, replace=False)) for _ in range(count)]


def reader_run(
    path: Path,
    chunk: int,
    depth: int,
    seconds: float,
    rng: np.random.Generator,
    engine: str | None = None,
    dtype: str = "float32",
    buffers: str = "small_pages",
) -> dict:
    """Random `chunk`-byte reads through FlashReader for `seconds` with `depth` reads in
    flight: MB/s of flash bytes, CPU microseconds per read, and how the reads landed. Two
    requests stay in flight, each filling one of two reused output sets (`out=`)."""
    m = bench_manifest(path, chunk, dtype)
    n = m.layers[0].num_neurons
    per_request = max(2 * depth, (4 << 20) // chunk)
    sets = id_sets(n, per_request, 16, rng)
    with FlashReader(
        path.parent, m, threads=depth, direct=True, coalesce_gap=-1, max_read=chunk, engine=engine
    ) as r:
        outs = [host_buffer(r, per_request, buffers) for _ in range(2)]
        r.read(0, sets[0], out=outs[0])  # warm: threads started, buffers touched
        r.stats.take()

        def submit(k: int):
            return r.submit(0, sets[k % len(sets)], out=outs[k % 2])

        c0, t0 = cpu_seconds(), time.perf_counter()
        pending, k = submit(0), 1
        while time.perf_counter() - t0 < seconds:
            nxt = submit(k)
            pending.result()
            pending, k = nxt, k + 1
        pending.result()
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        st = r.stats.take().get(0)
        reads = k * per_request
        return {
            "mbps": reads * chunk / wall / 1e6,
            "cpu_us_per_read": cpu / reads * 1e6,
            "engine": r.engine,
            "reads_into_outputs": st.reads_into_outputs if st else 0,
            "reads_via_scratch": st.reads_via_scratch if st else 0,
        }


def children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def fio_command(path: Path, chunk: int, depth: int, ioengine: str, *limit: str) -> list[str]:
    size = (path.stat().st_size - DATA_ALIGNMENT) // chunk * chunk
    jobs = ["--numjobs", str(depth)] if ioengine == "psync" else ["--iodepth", str(depth)]
    return [
        "fio",
        "--name=bench",
        f"--filename={path}",
        f"--offset={DATA_ALIGNMENT}",
        f"--size={size}",
        "--direct=1",
        "--rw=randread",
        f"--bs={chunk}",
        f"--ioengine={ioengine}",
        *jobs,
        "--thread",
        "--group_reporting",
        "--norandommap",
        "--randrepeat=0",
        "--output-format=json",
        *limit,
    ]


def fio_run(
    path: Path, chunk: int, depth: int, seconds: float, ioengine: str, huge_pages: Path | None = None
) -> dict:
    """fio's random reads over the same bytes of the same file, O_DIRECT: `ioengine` psync
    with `depth` jobs (threads), or io_uring with iodepth `depth`; into buffers of transparent
    huge pages when `huge_pages` (the `fio_huge_pages.c` library, preloaded). MB/s, and CPU per read:
    fio's user+system time by getrusage (the instrument used for the reader), less that of the
    same command stopped after one read per job (its start-up and set-up). It agrees with
    fio's own JSON figure for one job; the JSON's figure for several psync jobs is not
    consistent (2% to 30x off), so it is not used."""
    env = None
    if huge_pages is not None:  # fio 3.x's buffer of a job: bs x iodepth plus two page masks
        io_bytes = chunk * (1 if ioengine == "psync" else depth)
        env = dict(os.environ, LD_PRELOAD=str(huge_pages), FIO_HUGE_PAGES_MIN=str(io_bytes))
        env["FIO_HUGE_PAGES_MAX"] = str(io_bytes + 16 * KIB)
    c0 = children_cpu_seconds()
    subprocess.run(
        fio_command(path, chunk, depth, ioengine, "--number_ios=1"), capture_output=True, check=True, env=env
    )
    c1 = children_cpu_seconds()
    timed = fio_command(path, chunk, depth, ioengine, "--time_based", f"--runtime={int(seconds * 1000)}ms")
    out = subprocess.run(timed, capture_output=True, text=True, check=True, env=env).stdout
    c2 = children_cpu_seconds()
    job = json.loads(out[out.index("{") :])["jobs"][0]
    ios = max(job["read"]["total_ios"], 1)
    return {
        "mbps": job["read"]["bw_bytes"] / 1e6,
        "cpu_us_per_read": max((c2 - c1) - (c1 - c0), 1e-9) / ios * 1e6,
        "cpu_us_per_read_with_setup": (c2 - c1) / ios * 1e6,
    }


FIO_ENGINES = ("psync", "io_uring")
FIO_HUGE_PAGES = Path(__file__).with_name("fio_huge_pages.c")


def build_fio_huge_pages(out: Path) -> Path:
    """`fio_huge_pages.c` compiled into DIR (for `--buffers huge_pages`). Raises OSError (no C
    compiler, not Linux) or CalledProcessError (it does not build)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not sys.platform.startswith("linux"):
        raise OSError("giving fio huge pages needs Linux and a C compiler (cc)")
    lib = out / "fio_huge_pages.so"
    subprocess.run(
        [cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(FIO_HUGE_PAGES)], check=True, capture_output=True
    )
    return lib


class BusyNeighbour:
    """A second process computing (a Python loop spinning on one core) while in the block."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.2)
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def measure_cell(
    path: Path,
    chunk: int,
    depth: int,
    seconds: float,
    repeats: int,
    engines: list[str],
    rng,
    buffers: str = "small_pages",
    fio_huge_pages: Path | None = None,
) -> dict:
    """Every engine and both fio engines alternately, `repeats` times each, each round in a
    random order, medians: the disk's throughput drifts from second to second and depends on
    what ran just before; alternation in shuffled rounds spreads both evenly.
    fio_huge_pages: the preload library giving fio's buffers huge pages (with `buffers`
    huge_pages)."""
    runs = {e: partial(reader_run, path, chunk, depth, seconds, rng, e, buffers=buffers) for e in engines}
    for f in FIO_ENGINES:
        runs[f"fio-{f}"] = partial(fio_run, path, chunk, depth, seconds, f, fio_huge_pages)
    sides = list(runs)
    samples: dict[str, list[dict]] = {s: [] for s in sides}
    for _ in range(repeats):
        for k in rng.permutation(len(sides)):
            samples[sides[k]].append(runs[sides[k]]())
    cell = {"chunk_bytes": chunk, "depth": depth, "results": {}}
    for name, runs in samples.items():
        cell["results"][name] = {
            "mbps": float(np.median([r["mbps"] for r in runs])),
            "cpu_us_per_read": float(np.median([r["cpu_us_per_read"] for r in runs])),
            "mbps_samples": [r["mbps"] for r in runs],
            **(
                {"reads_into_outputs": runs[-1]["reads_into_outputs"]}
                if "reads_into_outputs" in runs[-1]
                else {}
            ),
        }
    fio = [cell["results"][f"fio-{f}"] for f in FIO_ENGINES]
    cell["fio_best_mbps"] = max(f["mbps"] for f in fio)
    cell["fio_best_cpu_us_per_read"] = min(f["cpu_us_per_read"] for f in fio)
    return cell


def batch_cost(path: Path, row: int, engines: list[str], requests: int, rng) -> list[dict]:
    """The fixed cost of a request: median wall time (and CPU) of reading 1 row against 8
    contiguous rows (one coalesced read), one request at a time, random places, per engine;
    fio at the same two sizes, depth 1, as the disk's own ratio."""
    rows = []
    m = bench_manifest(path, row)
    n = m.layers[0].num_neurons
    for e in engines:
        with FlashReader(path.parent, m, threads=8, direct=True, engine=e) as r:
            outs = {k: host_buffer(r, k) for k in (1, 8)}
            r.read(0, np.arange(8), out=outs[8])
            got = {}
            for k in (1, 8):
                starts = rng.integers(0, n - 8, size=requests)
                times, c0 = [], cpu_seconds()
                for s in starts:
                    t0 = time.perf_counter()
                    r.read(0, np.arange(s, s + k), out=outs[k])
                    times.append(time.perf_counter() - t0)
                got[k] = (float(np.median(times)), (cpu_seconds() - c0) / requests)
            rows.append(
                {
                    "engine": e,
                    "engine_used": r.engine,
                    "row_bytes": row,
                    "one_row_us": got[1][0] * 1e6,
                    "eight_rows_us": got[8][0] * 1e6,
                    "ratio": got[8][0] / got[1][0],
                    "one_row_cpu_us": got[1][1] * 1e6,
                    "eight_rows_cpu_us": got[8][1] * 1e6,
                }
            )
    f1 = fio_lat(path, row)
    f8 = fio_lat(path, 8 * row)
    rows.append(
        {"engine": "fio-psync", "row_bytes": row, "one_row_us": f1, "eight_rows_us": f8, "ratio": f8 / f1}
    )
    return rows


def fio_lat(path: Path, chunk: int) -> float:
    """fio's median completion latency of single `chunk`-byte random reads (psync, depth 1), us."""
    cmd = fio_command(path, chunk, 1, "psync", "--time_based", "--runtime=1500ms")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    lat = json.loads(out[out.index("{") :])["jobs"][0]["read"]["clat_ns"]["percentile"]
    return lat["50.000000"] / 1e3


# -- the cost model ------------------------------------------------------------------------


def fit_cost_model(points: list[dict]) -> dict:
    """Per thread count: t(c) = a + b*c fitted to the reader's aggregate time per read; the
    break-even gap a/b; then the chosen defaults (see the module docstring)."""
    by_threads: dict[int, dict[int, float]] = {}
    for p in points:
        by_threads.setdefault(p["threads"], {})[p["chunk_bytes"]] = p["mlx_flash_mbps"]
    fits = {}
    for t, curve in sorted(by_threads.items()):
        c = np.array(sorted(curve), dtype=float)
        secs = c / (np.array([curve[int(x)] for x in c]) * 1e6)  # aggregate seconds per read
        b, a = np.polyfit(c, secs, 1, w=1 / secs)  # relative error weights: small chunks count
        fits[t] = {
            "a_us": a * 1e6,
            "b_ns_per_byte": b * 1e9,
            "break_even_gap_bytes": max(a / b, 0.0) if b > 0 else 0.0,
        }
    bundle = [c for c in BUNDLE_CHUNKS if all(c in v for v in by_threads.values())] or sorted(
        next(iter(by_threads.values()))
    )
    score = {t: np.mean([by_threads[t][c] for c in bundle]) for t in by_threads}
    best = max(score.values())
    threads = min(t for t, s in score.items() if s >= 0.95 * best)
    curve = by_threads[threads]
    max_read = min(c for c, v in curve.items() if v >= 0.95 * max(curve.values()))
    gap = fits[threads]["break_even_gap_bytes"] // 4096 * 4096
    return {
        "fits": fits,
        "bundle_chunks": bundle,
        "threads": threads,
        "coalesce_gap": int(gap),
        "max_read": int(max_read),
    }


# -- the cache's memory management ---------------------------------------------------------


def cache_cost(capacity: int, d: int, changed: int, tokens: int, rng: np.random.Generator) -> dict:
    """Per token: NeuronCache.begin_token + insert + active_mask (a lazy MLX gather, evaluated
    with the FFN's graph, as in the runtime) with `changed` neurons leaving and `changed`
    arriving, the active set sorted as the runtime passes it (np.flatnonzero of the
    selection), against a bare copy of the same rows with numpy into a preallocated,
    touched float32 buffer of the same shape: into the same rows the cache chose (scattered),
    and into its first rows (contiguous: the lower bound of any copy)."""
    parts = {"gate": d, "up": d, "down": d}
    cache = NeuronCache(parts, capacity, window=1, num_neurons=8 * capacity)
    active = rng.choice(8 * capacity, size=capacity // 2, replace=False)
    pool = [
        {k: rng.standard_normal((changed, e)).astype(np.float32) for k, e in parts.items()} for _ in range(4)
    ]
    first = cache.begin_token(active)
    cache.insert(
        first, {k: rng.standard_normal((len(first), e)).astype(np.float32) for k, e in parts.items()}
    )
    dst = {k: np.ones((capacity, e), np.float32) for k, e in parts.items()}
    times = {"cache": [], "same_rows": [], "contiguous": []}
    for t in range(tokens):
        rows = pool[t % len(pool)]
        fresh = np.setdiff1d(rng.choice(8 * capacity, size=3 * changed, replace=False), active)[:changed]
        active = np.sort(np.concatenate([rng.permutation(active)[changed:], fresh]))
        t0 = time.perf_counter()
        missing = cache.begin_token(active)
        cache.insert(missing, {k: v[: len(missing)] for k, v in rows.items()})
        mask = cache.active_mask()
        t1 = time.perf_counter()
        slots = cache.slots(missing)
        t2 = time.perf_counter()
        for k, v in rows.items():
            dst[k][slots] = v[: len(missing)]
        t3 = time.perf_counter()
        for k, v in rows.items():
            np.copyto(dst[k][: len(missing)], v[: len(missing)])
        t4 = time.perf_counter()
        mx.eval(mask)
        for key, dt in (("cache", t1 - t0), ("same_rows", t3 - t2), ("contiguous", t4 - t3)):
            times[key].append(dt)
    ms = {k: float(np.median(v) * 1e3) for k, v in times.items()}
    return {
        "capacity": capacity,
        "d": d,
        "rows_changed": changed,
        "tokens": tokens,
        "cache_ms": ms["cache"],
        "memcpy_same_rows_ms": ms["same_rows"],
        "memcpy_contiguous_ms": ms["contiguous"],
        "ratio_same_rows": ms["cache"] / ms["same_rows"],
        "ratio_contiguous": ms["cache"] / ms["contiguous"],
        "moved_per_token": cache.stats.moved / tokens,
    }


# -- output --------------------------------------------------------------------------------


def machine() -> dict:
    try:
        disk = subprocess.run(
            ["lsblk", "-d", "-o", "NAME,MODEL,ROTA,SIZE"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        disk = "unknown"
    fio = (
        subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout.strip()
        if shutil.which("fio")
        else None
    )
    return {
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "numpy": np.__version__,
        "fio": fio,
        "disk": disk,
        "load_avg": os.getloadavg(),
    }


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = sorted({c["condition"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    fig, axes = plt.subplots(
        len(conditions), len(depths), figsize=(4 * len(depths), 3.5 * len(conditions)), squeeze=False
    )
    for i, cond in enumerate(conditions):
        for j, d in enumerate(depths):
            ax = axes[i][j]
            row = sorted(
                (c for c in cells if c["condition"] == cond and c["depth"] == d),
                key=lambda c: c["chunk_bytes"],
            )
            kib = [c["chunk_bytes"] / KIB for c in row]
            for name in row[0]["results"]:
                style = "--x" if name.startswith("fio") else "-o"
                ax.plot(kib, [c["results"][name]["mbps"] for c in row], style, label=name)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{cond}, {d} in flight", fontsize=9)
            ax.set_xlabel("request (KiB)")
            ax.set_ylabel("MB/s")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Random reads, O_DIRECT: the reader's engines against fio")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def targets(cells: list[dict], engines: list[str], batch: list[dict]) -> dict:
    """The issue's targets per engine: throughput against the better fio at >= 16 KiB (median,
    worst; quiet and busy; also against fio's engine of the same kind), CPU per read against
    fio's (median over cells), 8 rows / 1 row."""
    out = {}
    for e in engines:
        t = {}
        for cond in sorted({c["condition"] for c in cells}):
            big = [c for c in cells if c["condition"] == cond and c["chunk_bytes"] >= 16 * KIB]
            ratios = [c["results"][e]["mbps"] / c["fio_best_mbps"] for c in big]
            cpu = [
                c["results"][e]["cpu_us_per_read"] / c["fio_best_cpu_us_per_read"]
                for c in cells
                if c["condition"] == cond
            ]
            kind = "fio-io_uring" if "io_uring" in e else "fio-psync"  # fio's engine of the same kind
            cpu_kind = [
                c["results"][e]["cpu_us_per_read"] / c["results"][kind]["cpu_us_per_read"]
                for c in cells
                if c["condition"] == cond
            ]
            if ratios:
                same = [c["results"][e]["mbps"] / c["results"][kind]["mbps"] for c in big]
                t[cond] = {
                    "throughput_median": float(np.median(ratios)),
                    "throughput_worst": float(np.min(ratios)),
                    "cells": len(ratios),
                    "same_kind": kind,
                    "throughput_vs_same_kind_median": float(np.median(same)),
                    "throughput_vs_same_kind_worst": float(np.min(same)),
                }
            t.setdefault(cond, {})["cpu_per_read_median"] = float(np.median(cpu))
            t[cond]["cpu_per_read_worst"] = float(np.max(cpu))
            t[cond][f"cpu_per_read_vs_{kind}_median"] = float(np.median(cpu_kind))
        t["batch_8_over_1"] = {f"{b['row_bytes'] // KIB} KiB": b["ratio"] for b in batch if b["engine"] == e}
        out[e] = t
    return out


def fio_spread(cells: list[dict]) -> dict:
    """How far fio's worse engine is from its better one, per condition, at >= 16 KiB (the cells
    the throughput target counts): a bound on what a ratio to "the better fio" can resolve."""
    out = {}
    for cond in sorted({c["condition"] for c in cells}):
        r = [
            min(c["results"][f"fio-{f}"]["mbps"] for f in FIO_ENGINES) / c["fio_best_mbps"]
            for c in cells
            if c["condition"] == cond and c["chunk_bytes"] >= 16 * KIB
        ]
        if r:
            out[cond] = {"median": float(np.median(r)), "worst": float(np.min(r))}
    return out


def print_tables(
    cells: list[dict], engines: list[str], model: dict | None, batch: list[dict], goals: dict
) -> None:
    for cond in sorted({c["condition"] for c in cells}):
        print(f"\nRandom reads, {cond}: MB/s (ratio to the better fio) | CPU us per read")
        names = list(cells[0]["results"])
        print("| request | in flight | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 2) + "|")
        for c in (c for c in cells if c["condition"] == cond):
            row = []
            for name in names:
                r = c["results"][name]
                ratio = "" if name.startswith("fio") else f" ({r['mbps'] / c['fio_best_mbps']:.2f})"
                row.append(f"{r['mbps']:.0f}{ratio} \\| {r['cpu_us_per_read']:.1f}")
            print(f"| {c['chunk_bytes'] // KIB} KiB | {c['depth']} | " + " | ".join(row) + " |")
    if batch:
        print(
            "\nA request of 8 contiguous rows against 1 row (median wall us, one at a time; CPU us per request)"
        )
        print("| engine | row | 1 row | 8 rows | ratio | CPU 1 | CPU 8 |")
        print("|---|---|---|---|---|---|---|")
        for b in batch:
            cpu = (
                f"{b['one_row_cpu_us']:.1f} | {b['eight_rows_cpu_us']:.1f}"
                if "one_row_cpu_us" in b
                else "- | -"
            )
            print(
                f"| {b['engine']} | {b['row_bytes'] // KIB} KiB | {b['one_row_us']:.0f} | {b['eight_rows_us']:.0f} | {b['ratio']:.2f} | {cpu} |"
            )
    print("\nTargets (throughput at >= 16 KiB vs the better fio; CPU per read vs fio's lower):")
    for e, t in goals.items():
        parts = []
        for cond, v in t.items():
            if cond == "batch_8_over_1":
                parts.append("8 rows/1 row " + ", ".join(f"{k} {r:.2f}" for k, r in v.items()))
            elif "throughput_median" in v:
                same = next(f"{v[k]:.2f}x {k[16:-7]}" for k in v if k.startswith("cpu_per_read_vs_"))
                parts.append(
                    f"{cond}: median {v['throughput_median']:.2f}, worst {v['throughput_worst']:.2f} "
                    f"({v['throughput_vs_same_kind_median']:.2f}, {v['throughput_vs_same_kind_worst']:.2f} "
                    f"vs {v['same_kind']}), "
                    f"CPU/read {v['cpu_per_read_median']:.2f}x (worst {v['cpu_per_read_worst']:.2f}x; {same})"
                )
        print(f"  {e}: " + "; ".join(parts))
    for cond, v in fio_spread(cells).items():
        print(
            f"  fio's worse engine against its better, {cond}: median {v['median']:.2f}, worst {v['worst']:.2f}"
        )
    if model:
        print("\nCost model t(c) = a + b*c (aggregate time per read, the default engine, quiet):")
        for t, f in model["fits"].items():
            print(
                f"  {t:>2} in flight: a = {f['a_us']:.1f} us, b = {f['b_ns_per_byte']:.3f} ns/B, "
                f"break-even gap = {f['break_even_gap_bytes'] / KIB:.1f} KiB"
            )
        print(
            f"  chosen: depth={model['threads']}, coalesce_gap={model['coalesce_gap']}, max_read={model['max_read']}"
        )


def print_cache_table(cache_rows: list[dict]) -> None:
    print("\nCache management per token vs a bare numpy copy of the inserted rows (median ms; 3 parts)")
    print(
        "| capacity | d | rows changed | cache | copy, same rows | ratio | copy, contiguous | ratio | moved/token |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in cache_rows:
        print(
            f"| {r['capacity']} | {r['d']} | {r['rows_changed']} | {r['cache_ms']:.3f} | {r['memcpy_same_rows_ms']:.3f} | "
            f"{r['ratio_same_rows']:.2f} | {r['memcpy_contiguous_ms']:.3f} | {r['ratio_contiguous']:.2f} | {r['moved_per_token']:.1f} |"
        )


def cache_grid(quick: bool, rng: np.random.Generator) -> list[dict]:
    return [
        cache_cost(capacity, 4096, changed, 40 if quick else 100, rng)
        for capacity in ((2048,) if quick else (2048, 8192))
        for changed in (8, 32, 128, 512)
    ]


def cache_only(out: Path, quick: bool) -> int:
    """--cache-only: the cache rows alone, in DIR/bench_io_cache.json."""
    out.mkdir(parents=True, exist_ok=True)
    rows = cache_grid(quick, np.random.default_rng(0))
    result = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "machine": machine(),
        "cache": rows,
    }
    (out / "bench_io_cache.json").write_text(json.dumps(result, indent=1))
    print_cache_table(rows)
    return 0


def _ints(text: str | None) -> list[int]:
    return [int(x) for x in text.split(",")] if text else []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", required=True, type=Path, help="folder for bench_io.json, bench_io.png and the data file"
    )
    ap.add_argument("--file-gb", type=float, default=None, help="data file size in GB (default 2, --quick 1)")
    ap.add_argument(
        "--seconds", type=float, default=None, help="seconds per measurement (default 0.5, --quick 0.3)"
    )
    ap.add_argument(
        "--repeats", type=int, default=2, help="alternating measurements per cell and side (median)"
    )
    ap.add_argument("--quick", action="store_true", help="a small grid, short points")
    ap.add_argument("--keep-file", action="store_true", help="keep the data file for a later run")
    ap.add_argument(
        "--data",
        type=Path,
        default=None,
        help="read this existing file (e.g. a converted model's shard; never written or deleted) "
        "instead of writing --file-gb of random bytes",
    )
    ap.add_argument("--skip-cache", action="store_true", help="no cache rows")
    ap.add_argument("--skip-batch", action="store_true", help="no 8-rows-against-1 rows")
    ap.add_argument(
        "--cache-only", action="store_true", help="only the cache's memory-management rows (no fio)"
    )
    ap.add_argument(
        "--engines", type=str, default=None, help="comma-separated engines (default: all that load here)"
    )
    ap.add_argument("--chunks", type=str, default=None, help="comma-separated request sizes in KiB")
    ap.add_argument("--depths", type=str, default=None, help="comma-separated reads in flight")
    ap.add_argument(
        "--conditions", type=str, default="quiet,busy", help="quiet, busy (a CPU-busy neighbour), or both"
    )
    ap.add_argument(
        "--buffers",
        choices=BUFFER_KINDS,
        default="small_pages",
        help="the reader's output buffers: small pages (as fio's own; the default), huge pages (fio's "
        "too, by a preloaded allocator built here: Linux and a C compiler), numpy's",
    )
    args = ap.parse_args(argv)
    if args.cache_only:
        return cache_only(args.out, args.quick)
    if shutil.which("fio") is None:
        print(
            "error: fio is not installed, and bench_io measures the reader against it: install it "
            "(Debian/Ubuntu: apt-get install fio; macOS: brew install fio) and run again "
            "(--cache-only runs without it)",
            file=sys.stderr,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    gb = args.file_gb or (1.0 if args.quick else 2.0)
    seconds = args.seconds or (0.3 if args.quick else 0.5)
    chunks = [c * KIB for c in (_ints(args.chunks) or (QUICK_CHUNKS if args.quick else FULL_CHUNKS))]
    depths = _ints(args.depths) or (QUICK_DEPTHS if args.quick else FULL_DEPTHS)
    engines = args.engines.split(",") if args.engines else available_engines()
    conditions = args.conditions.split(",")
    if not set(conditions) <= {"quiet", "busy"}:
        print(f"error: --conditions takes quiet and/or busy, got {args.conditions}", file=sys.stderr)
        return 2
    fio_huge_pages = None
    if args.buffers == "huge_pages":
        try:
            fio_huge_pages = build_fio_huge_pages(args.out)
        except (OSError, subprocess.CalledProcessError) as e:
            print(
                f"error: --buffers huge_pages: {e}; run without it (small pages on both sides)",
                file=sys.stderr,
            )
            return 2
    data = args.data or args.out / DATA_NAME
    rng = np.random.default_rng(0)
    if args.data:
        if not data.is_file():
            print(f"error: --data {data}: no such file", file=sys.stderr)
            return 2
        gb = data.stat().st_size / 1e9
        print(f"reading {data} ({gb:.2f} GB)", flush=True)
    else:
        print(f"writing {gb:g} GB of random data to {data} ...", flush=True)
        write_data_file(data, int(gb * 1e9) // (1 << 20) * (1 << 20))
    cells, batch = [], []
    t_start = time.perf_counter()
    try:
        for cond in conditions:
            with BusyNeighbour() if cond == "busy" else contextlib.nullcontext():
                for c in chunks:
                    for d in depths:
                        cell = measure_cell(
                            data, c, d, seconds, args.repeats, engines, rng, args.buffers, fio_huge_pages
                        )
                        cell["condition"] = cond
                        cells.append(cell)
                        print(
                            f"  {cond:5} {c // KIB:>5} KiB x {d:>2}: "
                            + ", ".join(
                                f"{k} {v['mbps']:.0f} ({v['cpu_us_per_read']:.1f} us)"
                                for k, v in cell["results"].items()
                            ),
                            flush=True,
                        )
        if not args.skip_batch:
            for row in (4 * KIB, 32 * KIB):
                batch += batch_cost(data, row, engines, 200 if args.quick else 400, rng)
    finally:
        if not args.keep_file and not args.data:
            data.unlink(missing_ok=True)
    default = engines[0]  # the fastest that loads here, when the engines are not named
    quiet = [c for c in cells if c["condition"] == "quiet"]
    model = None
    if quiet and len(chunks) > 1:
        model = fit_cost_model(
            [
                {
                    "threads": c["depth"],
                    "chunk_bytes": c["chunk_bytes"],
                    "mlx_flash_mbps": c["results"][default]["mbps"],
                }
                for c in quiet
            ]
        )
    goals = targets(cells, engines, batch)
    cache_rows = [] if args.skip_cache else cache_grid(args.quick, rng)
    result = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "machine": machine(),
        "engines": engines,
        "buffers": args.buffers,
        "fio_buffers": "huge pages (fio_huge_pages.c preloaded)" if fio_huge_pages else "fio's own (malloc)",
        "seconds_per_point": seconds,
        "repeats": args.repeats,
        "file_bytes": int(gb * 1e9),
        "wall_seconds": time.perf_counter() - t_start,
        "cells": cells,
        "targets": goals,
        "fio_spread": fio_spread(cells),
        "batch": batch,
        "cost_model": model,
        "cost_model_engine": default,
        "cache": cache_rows,
    }
    (args.out / "bench_io.json").write_text(json.dumps(result, indent=1))
    print_tables(cells, engines, model, batch, goals)
    if cache_rows:
        print_cache_table(cache_rows)
    try:
        plot(cells, args.out / "bench_io.png")
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The flash cost model, measured: random-read throughput vs chunk size and threads, through
mlx_flash's FlashReader and through fio (the independent reference) in the same run; and the
neuron cache's memory-management cost per token against a bare memcpy of the same rows.

    python benchmarks/bench_io.py --out DIR [--file-gb N] [--quick]

Writes DIR/bench_io.json (points: chunk_bytes, threads, mlx_flash_mbps, fio_mbps, each the
median of --repeats alternating measurements; the fitted cost model; the cache rows),
DIR/bench_io.png (both curves), and prints tables. The data file
(random bytes, so that no layer of storage can skip the reads) is written in DIR and deleted
at the end unless --keep-file; page cache is bypassed with O_DIRECT on both sides.

Cost model: at a thread count T, the time per read (aggregate: elapsed / reads) is fitted as
t(c) = a + b*c over chunk sizes c. Merging two reads that lie g bytes apart saves `a` and costs
`b*g`, so gaps below a/b are worth reading and discarding (the reader's coalesce_gap); the
thread count is the smallest reaching 95% of the best throughput at bundle-sized chunks, and
the largest useful read (max_read) the smallest chunk reaching 95% of the best at that count.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_flash.cache import NeuronCache  # noqa: E402
from mlx_flash.layout import DATA_ALIGNMENT, LayerEntry, Manifest, Part, Segment  # noqa: E402
from mlx_flash.reader import FlashReader  # noqa: E402

KIB = 1024
FULL_CHUNKS = [4, 8, 16, 32, 64, 128, 256, 1024]  # KiB
FULL_THREADS = [1, 4, 8, 16, 32]
QUICK_CHUNKS = [4, 16, 64, 1024]
QUICK_THREADS = [1, 4, 16]
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
    small pages, as fio's buffers are: on this virtual disk the placement of the buffer changes
    large-read throughput (see `buffer_placement`)."""
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


def reader_mbps(
    path: Path,
    chunk: int,
    threads: int,
    seconds: float,
    rng: np.random.Generator,
    dtype: str = "float32",
    buffers: str = "small_pages",
    engine: str | None = None,
) -> float:
    """Random `chunk`-byte reads through FlashReader for `seconds`, MB/s of flash bytes. Two
    requests stay in flight, each filling one of two reused output sets (`out=`), as a
    prefetching caller would: the pool never idles, no request pays for fresh memory."""
    m = bench_manifest(path, chunk, dtype)
    n = m.layers[0].num_neurons
    per_request = max(2 * threads, (8 << 20) // chunk)
    with FlashReader(
        path.parent, m, threads=threads, direct=True, coalesce_gap=-1, max_read=chunk, engine=engine
    ) as r:
        outs = [host_buffer(r, per_request, buffers) for _ in range(2)]

        def submit(k: int):
            return r.submit(0, np.sort(rng.choice(n, size=per_request, replace=False)), out=outs[k % 2])

        t0 = time.perf_counter()
        pending, k = submit(0), 1
        while time.perf_counter() - t0 < seconds:
            nxt = submit(k)
            pending.result()
            pending, k = nxt, k + 1
        pending.result()
        return k * per_request * chunk / (time.perf_counter() - t0) / 1e6


def fio_mbps(path: Path, chunk: int, threads: int, seconds: float) -> float:
    """fio's random-read throughput over the same bytes of the same file, psync, O_DIRECT."""
    size = (path.stat().st_size - DATA_ALIGNMENT) // chunk * chunk
    cmd = [
        "fio",
        "--name=bench",
        f"--filename={path}",
        f"--offset={DATA_ALIGNMENT}",
        f"--size={size}",
        "--direct=1",
        "--rw=randread",
        f"--bs={chunk}",
        "--ioengine=psync",
        f"--numjobs={threads}",
        "--thread",
        "--group_reporting",
        "--time_based",
        f"--runtime={int(seconds * 1000)}ms",
        "--norandommap",
        "--randrepeat=0",
        "--output-format=json",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("{") :])["jobs"][0]["read"]["bw_bytes"] / 1e6


def measure_point(
    path: Path,
    chunk: int,
    threads: int,
    seconds: float,
    repeats: int,
    rng: np.random.Generator,
    engine: str | None = None,
) -> dict:
    """mlx_flash and fio alternately, `repeats` times each, medians: the disk's throughput
    drifts from second to second (a shared virtual disk), alternation spreads the drift evenly."""
    ours, ref = [], []
    for _ in range(repeats):
        ours.append(reader_mbps(path, chunk, threads, seconds, rng, engine=engine))
        ref.append(fio_mbps(path, chunk, threads, seconds))
    return {
        "chunk_bytes": chunk,
        "threads": threads,
        "mlx_flash_mbps": float(np.median(ours)),
        "fio_mbps": float(np.median(ref)),
        "mlx_flash_samples": ours,
        "fio_samples": ref,
    }


def buffer_placement(
    path: Path,
    chunk: int,
    threads: int,
    seconds: float,
    repeats: int,
    rng: np.random.Generator,
    engine: str | None = None,
) -> dict:
    """The reader's throughput by kind of output buffer (medians of alternating runs)."""
    samples: dict[str, list[float]] = {k: [] for k in BUFFER_KINDS}
    for _ in range(repeats):
        for kind in BUFFER_KINDS:
            samples[kind].append(reader_mbps(path, chunk, threads, seconds, rng, buffers=kind, engine=engine))
    return {
        "chunk_bytes": chunk,
        "threads": threads,
        **{f"{k}_mbps": float(np.median(v)) for k, v in samples.items()},
    }


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


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, t in enumerate(sorted({p["threads"] for p in points})):
        row = sorted((p for p in points if p["threads"] == t), key=lambda p: p["chunk_bytes"])
        kib = [p["chunk_bytes"] / KIB for p in row]
        color = f"C{i}"
        ax.plot(kib, [p["mlx_flash_mbps"] for p in row], "-o", color=color, label=f"mlx_flash, {t} threads")
        ax.plot(kib, [p["fio_mbps"] for p in row], "--x", color=color, label=f"fio, {t} jobs")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("chunk size (KiB)")
    ax.set_ylabel("random read throughput (MB/s)")
    ax.set_title("Random reads, O_DIRECT: FlashReader vs fio (psync)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_tables(
    points: list[dict], fp16: list[dict], placement: list[dict], model: dict, cache_rows: list[dict]
) -> None:
    threads = sorted({p["threads"] for p in points})
    print("\nRandom-read throughput, MB/s: mlx_flash / fio (ratio)")
    print("| chunk | " + " | ".join(f"{t} thr" for t in threads) + " |")
    print("|---" * (len(threads) + 1) + "|")
    for c in sorted({p["chunk_bytes"] for p in points}):
        cells = []
        for t in threads:
            p = next(p for p in points if p["chunk_bytes"] == c and p["threads"] == t)
            cells.append(
                f"{p['mlx_flash_mbps']:.0f} / {p['fio_mbps']:.0f} ({p['mlx_flash_mbps'] / p['fio_mbps']:.2f})"
            )
        print(f"| {c // KIB} KiB | " + " | ".join(cells) + " |")
    print("\nCost model t(c) = a + b*c (aggregate time per read):")
    for t, f in model["fits"].items():
        print(
            f"  {t:>2} threads: a = {f['a_us']:.1f} us, b = {f['b_ns_per_byte']:.3f} ns/B, break-even gap = {f['break_even_gap_bytes'] / KIB:.1f} KiB"
        )
    print(
        f"  chosen: threads={model['threads']}, coalesce_gap={model['coalesce_gap']}, max_read={model['max_read']}"
    )
    print(
        f"\nfloat16 on flash -> float32 (scratch + conversion), {model['threads']} threads, MB/s of flash bytes:"
    )
    print("  " + ", ".join(f"{p['chunk_bytes'] // KIB} KiB {p['mlx_flash_fp16_mbps']:.0f}" for p in fp16))
    print(
        "\nReader MB/s by output buffer: "
        + "; ".join(
            f"{p['chunk_bytes'] // KIB} KiB x {p['threads']}: "
            + ", ".join(f"{k} {p[k + '_mbps']:.0f}" for k in BUFFER_KINDS)
            for p in placement
        )
    )
    print_cache_table(cache_rows)


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
    ap.add_argument("--file-gb", type=float, default=None, help="data file size in GB (default 4, --quick 1)")
    ap.add_argument(
        "--seconds", type=float, default=None, help="seconds per measurement (default 0.7, --quick 0.4)"
    )
    ap.add_argument(
        "--repeats", type=int, default=3, help="alternating measurements per point and side (median)"
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
    ap.add_argument("--skip-cache", action="store_true", help="only the I/O grid")
    ap.add_argument(
        "--cache-only", action="store_true", help="only the cache's memory-management rows (no fio)"
    )
    ap.add_argument(
        "--engine",
        choices=("threads", "aio"),
        default=None,
        help="the reader's engine for the grid (default: the reader's default, threads)",
    )
    ap.add_argument(
        "--chunks", type=str, default=None, help="comma-separated chunk sizes in KiB (default: the full grid)"
    )
    ap.add_argument(
        "--threads", type=str, default=None, help="comma-separated thread counts (default: the full grid)"
    )
    args = ap.parse_args(argv)
    if args.cache_only:
        return cache_only(args.out, args.quick)
    if shutil.which("fio") is None:
        print("error: fio is not installed (apt-get install fio / brew install fio)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    gb = args.file_gb or (1.0 if args.quick else 4.0)
    seconds = args.seconds or (0.4 if args.quick else 0.7)
    chunks = [c * KIB for c in (_ints(args.chunks) or (QUICK_CHUNKS if args.quick else FULL_CHUNKS))]
    threads = _ints(args.threads) or (QUICK_THREADS if args.quick else FULL_THREADS)
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
    points = []
    try:
        for c in chunks:
            for t in threads:
                p = measure_point(data, c, t, seconds, args.repeats, rng, args.engine)
                points.append(p)
                print(
                    f"  {c // KIB:>5} KiB x {t:>2} threads: mlx_flash {p['mlx_flash_mbps']:7.1f} MB/s, "
                    f"fio {p['fio_mbps']:7.1f} MB/s ({p['mlx_flash_mbps'] / p['fio_mbps']:.2f})",
                    flush=True,
                )
        model = fit_cost_model(points)
        fp16 = []  # the conversion path (float16 on flash, float32 out) at the chosen thread count
        for c in chunks:
            mbps = reader_mbps(data, c, model["threads"], seconds, rng, "float16", engine=args.engine)
            fp16.append({"chunk_bytes": c, "threads": model["threads"], "mlx_flash_fp16_mbps": mbps})
            print(
                f"  {c // KIB:>5} KiB x {model['threads']:>2} threads, float16 -> float32: {mbps:7.1f} MB/s",
                flush=True,
            )
        placement = [
            buffer_placement(data, c, t, seconds, args.repeats, rng, args.engine)
            for c, t in ((chunks[-1], 16), (64 * KIB, 16))
        ]
    finally:
        if not args.keep_file and not args.data:
            data.unlink(missing_ok=True)
    cache_rows = [] if args.skip_cache else cache_grid(args.quick, rng)
    result = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "machine": machine(),
        "engine": args.engine or "threads",
        "seconds_per_point": seconds,
        "file_bytes": int(gb * 1e9),
        "points": points,
        "fp16_points": fp16,
        "buffer_placement": placement,
        "cost_model": model,
        "cache": cache_rows,
    }
    (args.out / "bench_io.json").write_text(json.dumps(result, indent=1))
    print_tables(points, fp16, placement, model, cache_rows)
    try:
        plot(points, args.out / "bench_io.png")
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

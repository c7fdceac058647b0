"""benchmarks/bench_io.py: it says clearly when fio, its reference, is missing."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_io.py"


def load_bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_io_under_test", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_io_under_test", bench)
    spec.loader.exec_module(bench)
    return bench


def test_bench_io_says_fio_is_missing(tmp_path, monkeypatch, capsys):
    bench = load_bench(monkeypatch)
    real_which = shutil.which
    monkeypatch.setattr(bench.shutil, "which", lambda name: None if name == "fio" else real_which(name))
    assert bench.main(["--out", str(tmp_path / "out"), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "fio is not installed" in err and "apt-get install fio" in err
    assert not (tmp_path / "out").exists()  # nothing written before the check


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("cc") is None, reason="needs Linux and a C compiler"
)
def test_fio_huge_pages_library_serves_only_the_sizes_asked_2mib_aligned(tmp_path, monkeypatch):
    """--buffers huge_pages gives fio's I/O buffers huge pages by a preloaded malloc: a block of
    the sizes named in the environment is 2 MiB-aligned and survives free/realloc;
    other sizes are glibc's as before."""
    lib = load_bench(monkeypatch).build_fio_huge_pages(tmp_path)
    probe = (
        "import ctypes\n"
        "c = ctypes.CDLL(None)\n"
        "c.malloc.restype = c.realloc.restype = ctypes.c_void_p\n"
        "c.malloc.argtypes = [ctypes.c_size_t]\n"
        "c.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]\n"
        "c.free.argtypes = [ctypes.c_void_p]\n"
        "big = c.malloc(1 << 20)\n"
        "ctypes.memset(big, 7, 1 << 20)\n"
        "c.free(big)\n"
        "assert ctypes.string_at(big, 4) == bytes([7] * 4)  # never freed: fio keeps it\n"
        "grown = c.realloc(big, (1 << 20) + 100)\n"
        "assert ctypes.string_at(grown, 4) == bytes([7] * 4)\n"
        "small = c.malloc(3 << 20)\n"
        "print(big % (2 << 20), grown % (2 << 20), small % (2 << 20) != 0)\n"
        "c.free(small)\n"
    )
    env = dict(
        os.environ,
        LD_PRELOAD=str(lib),
        FIO_HUGE_PAGES_MIN=str(1 << 20),
        FIO_HUGE_PAGES_MAX=str((1 << 20) + 4096),
    )
    got = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.split() == ["0", "0", "True"]


def test_targets_report_the_same_kind_of_fio_and_fio_against_itself(monkeypatch):
    bench = load_bench(monkeypatch)

    def cell(chunk, ours, psync, uring):
        res = {"native-io_uring": ours, "fio-psync": psync, "fio-io_uring": uring}
        return {
            "condition": "quiet",
            "chunk_bytes": chunk,
            "results": {k: {"mbps": v, "cpu_us_per_read": 10.0} for k, v in res.items()},
            "fio_best_mbps": max(psync, uring),
            "fio_best_cpu_us_per_read": 10.0,
        }

    cells = [cell(4096, 1.0, 9.0, 9.0), cell(16384, 90.0, 100.0, 90.0), cell(65536, 60.0, 50.0, 100.0)]
    t = bench.targets(cells, ["native-io_uring"], [])["native-io_uring"]["quiet"]
    assert t["cells"] == 2 and t["same_kind"] == "fio-io_uring"  # 4 KiB is not counted
    assert (t["throughput_median"], t["throughput_worst"]) == (0.75, 0.6)
    assert (t["throughput_vs_same_kind_median"], t["throughput_vs_same_kind_worst"]) == (0.8, 0.6)
    assert bench.fio_spread(cells) == {"quiet": {"median": 0.7, "worst": 0.5}}

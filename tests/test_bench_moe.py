"""benchmarks/bench_moe.py on the tiny-moe preset (built here) at 50%: every row and column, the
cache reads far fewer bytes than naive, the look-ahead leaves the token fewer experts to wait for
than the cache (deterministic counts; the times are the benchmark's to report)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
import bench_moe  # noqa: E402 (benchmarks/, on the path from conftest)

COLUMNS = ("name", "budget", "ms_per_token", "io_ms", "bytes_per_token", "hit_rate", "peak_memory_bytes")


@pytest.fixture(scope="module")
def result(tmp_path_factory, tiny_moe_preset):
    root = tmp_path_factory.mktemp("bench_moe")
    argv = ["--model", str(tiny_moe_preset[0]), "--memory-budget", "50%", "--out", str(root / "out")]
    assert bench_moe.main([*argv, "--prompt-tokens", "16", "--max-tokens", "12", "--in-process"]) == 0
    return root / "out", json.loads((root / "out" / "bench_moe.json").read_text())


def test_every_row_and_column(result):
    out, res = result
    rows = {r["name"]: r for r in res["rows"]}
    assert sorted(rows) == sorted(bench_moe.ROWS)
    for r in res["rows"]:
        assert "error" not in r, r
        assert all(c in r for c in COLUMNS), r
        assert r["budget"] == (None if r["name"] == "dense" else "50%")
        assert r["decode_tokens"] == 12
    assert res["bandwidth_bytes_per_s"] > 0 and res["compute_floor_ms"] == rows["dense"]["ms_per_token"]
    assert all(
        r["io_floor_ms"] == r["bytes_per_token"] / res["bandwidth_bytes_per_s"] * 1e3 for r in res["rows"]
    )
    table = (out / "bench_moe.md").read_text()
    assert all(f"| {name} |" in table for name in bench_moe.ROWS) and "I/O floor" in table
    assert (out / "bench_moe.png").stat().st_size > 0


def test_cache_reads_far_fewer_bytes_than_naive(result):
    rows = {r["name"]: r for r in result[1]["rows"]}
    assert rows["naive"]["hit_rate"] == 0.0
    assert rows["cache"]["bytes_per_token"] < 0.5 * rows["naive"]["bytes_per_token"]
    for name in ("lfu", "pinned", "overlap", "lookahead"):
        assert rows[name]["bytes_per_token"] < 0.5 * rows["naive"]["bytes_per_token"]
    assert rows["overlap"]["hit_rate"] == rows["cache"]["hit_rate"]  # the same reads, overlapped


def test_lookahead_leaves_fewer_experts_to_wait_for(result):
    rows = {r["name"]: r for r in result[1]["rows"]}
    la = rows["lookahead"]
    assert la["ahead_reads"] > 0 and 0 < la["guess_hit_rate"] <= 1
    assert la["hit_rate"] > rows["cache"]["hit_rate"]  # the experts read ahead were resident when needed

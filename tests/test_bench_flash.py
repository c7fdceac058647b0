"""benchmarks/bench_flash.py end to end on the tiny synthetic model: every row runs and the JSON,
table and chart are written with every key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_flash.py"

import bench_flash as bench  # noqa: E402 (benchmarks/, on the path from conftest)

KEYS = (
    "name",
    "ms_per_token",
    "io_ms",
    "reader_busy_ms",
    "mem_ms",
    "compute_ms",
    "selection_ms",
    "bytes_per_token",
    "reads_per_token",
    "flash_mbps",
    "peak_memory_bytes",
    "peak_rss_bytes",
    "tokens_per_s",
    "speedup_vs_naive",
    "decode_tokens",
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import make_synthetic_model as msm

    out = tmp_path_factory.mktemp("bench") / "tiny"
    msm.build("tiny", out, log=lambda *a: None)
    return out


def bench_args(tiny, out, budget="80%", prompt=16, tokens=6, *extra) -> list[str]:
    """bench_flash.py's arguments for a short run of the tiny preset into `out`, then `extra`."""
    args = ["--model", str(tiny), "--out", str(out), "--memory-budget", budget]
    return args + ["--prompt-tokens", str(prompt), "--max-tokens", str(tokens), *extra]


def test_every_row_end_to_end(tiny, tmp_path):
    out = tmp_path / "out"
    args = bench_args(tiny, out, "90%", 24, 10, "--slow-tokens", "6", "--in-process")
    assert bench.main(args) == 0
    result = json.loads((out / "bench_flash.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == list(bench.ROWS)
    for name, r in rows.items():
        assert "error" not in r, (name, r.get("error"))
        for k in KEYS:
            assert k in r, (name, k)
        assert r["ms_per_token"] > 0 and r["peak_memory_bytes"] > 0 and r["tokens_match_text"]
        assert r["decode_tokens"] == (6 if name in ("naive", "hybrid") else 10)
    # sparse rows read less than naive; the window reuses neurons
    b = {n: rows[n]["bytes_per_token"] for n in rows}
    assert (
        b["naive"] > b["hybrid"] > 0 and b["naive"] > b["predictor"] > b["windowing"] > 0 and b["dense"] == 0
    )
    assert rows["windowing"]["window_hit_rate"] > 0.3 and rows["predictor"]["window_hit_rate"] == 0
    assert rows["bundling"]["reads_per_token"] < rows["windowing"]["reads_per_token"]
    assert rows["bundling"]["selection"] == "exact"  # no predictors trained in this folder
    la = rows["lookahead"]  # the same tokens as bundling, teacher-forced, with what the look-ahead did
    assert la["selection"] == "exact" and la["tokens_match_text"] and la["reader_busy_ms"] > 0
    assert 0 < la["lookahead_recall"] <= 1 and la["lookahead_wasted_fraction"] <= 0.25 + 1e-9
    assert rows["naive"]["speedup_vs_naive"] == 1.0
    flash_budget = rows["bundling"]["budget_bytes"]
    assert rows["bundling"]["plan_bytes"] <= flash_budget
    assert (out / "bench_flash.md").read_text().count("\n| ") == len(bench.ROWS) + 1
    assert (out / "bench_flash.png").stat().st_size > 1000
    assert result["machine"]["blas"] and result["paper"]["speedup"]["cpu"] == 4.8
    # the unbundled folder, made from the bundled one, is what convert(bundle=False) writes; the
    # dense file is shared between the two
    from mlx_flash import layout
    from mlx_flash.convert import convert

    flash = out / "flash"
    assert (flash / "bundled-float32" / "dense.safetensors").stat().st_ino == (
        flash / "unbundled-float32" / "dense.safetensors"
    ).stat().st_ino
    ref = convert(tiny, tmp_path / "ref", dtype="float32", bundle=False, progress=False)
    got = layout.read_manifest(flash / "unbundled-float32")
    assert not got.bundled and [(e.checksum, e.segments) for e in got.layers] == [
        (e.checksum, e.segments) for e in ref.layers
    ]


def test_quantized_row(tiny, tmp_path):
    """--quantize 4 adds the full method on 4-bit bundles: fewer bytes a token than float32."""
    out = tmp_path / "out"
    args = bench_args(
        tiny, out, "80%", 16, 6, "--in-process", "--rows", "bundling,bundling-q4", "--quantize", "4"
    )
    assert bench.main(args) == 0
    rows = {r["name"]: r for r in json.loads((out / "bench_flash.json").read_text())["rows"]}
    assert "error" not in rows["bundling-q4"], rows["bundling-q4"].get("error")
    q, f = rows["bundling-q4"], rows["bundling"]
    assert q["quant_bits"] == 4 and f["quant_bits"] is None and q["tokens_match_text"]
    assert 0 < q["bytes_per_token"] < f["bytes_per_token"]
    assert bench.main(args[:-2] + ["--quantize", "3"]) == 2


def test_row_in_its_own_process(tiny, tmp_path):
    r = subprocess.run(
        [sys.executable, str(BENCH), *bench_args(tiny, tmp_path, "80%", 16, 6, "--rows", "bundling,naive")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "bench_flash.json").read_text())["rows"]
    assert [x["name"] for x in rows] == ["bundling", "naive"] and all("error" not in x for x in rows)
    assert rows[0]["speedup_vs_naive"] > 0 and rows[0]["cached_bytes_at_start"] in (0, -1)


def test_errors_are_one_line(tiny, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True)

    r = run("--model", str(tiny), "--out", str(tmp_path), "--rows", "naive,fast")
    assert r.returncode == 2 and "unknown row" in r.stderr and "Traceback" not in r.stderr
    r = run("--model", str(tmp_path / "nothing"), "--out", str(tmp_path))
    assert r.returncode == 2 and "not a model folder" in r.stderr
    # a budget too small for a row is that row's error, the others still run
    r = run(*bench_args(tiny, tmp_path / "small", "1MB", 8, 4, "--rows", "naive,dense", "--in-process"))
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "small" / "bench_flash.json").read_text())["rows"]
    assert "too small" in rows[0]["error"] and "error" not in rows[1]


def test_svd_predictors_installed_and_used(tiny, tmp_path):
    """--svd-predictors RANK:XDIR adds the row bundling-svd: a linked copy of the bundled folder
    with predictors in the trained ones' format (thresholds at the trained ones' threshold recall,
    96%, on the given calibration inputs), selecting with them; the headline rows keep the folder's own
    selection (here: no predictors, the exact selector)."""
    import numpy as np

    xdir = tmp_path / "x"
    xdir.mkdir()
    rng = np.random.default_rng(0)
    for layer in range(4):  # stand-in calibration inputs (the trainer's --keep-work leaves real ones)
        np.save(xdir / f"x_layer_{layer:03d}.npy", rng.standard_normal((512, 128)).astype(np.float32))
    out = tmp_path / "out"
    args = bench_args(tiny, out, "80%", 16, 6, "--rows", "bundling,bundling-svd", "--in-process")
    args += ["--svd-predictors", f"16:{xdir}"]
    assert bench.main(args) == 0
    result = json.loads((out / "bench_flash.json").read_text())
    assert result["predictors"] is None
    assert result["svd_predictors"]["kind"] == "svd-16" and len(result["svd_predictors"]["ranks"]) == 4
    rows = {r["name"]: r for r in result["rows"]}
    assert all("error" not in r for r in rows.values()), rows
    assert rows["bundling"]["selection"] == "exact" and rows["bundling-svd"]["selection"] == "predictor"
    assert "row bundling-svd: svd-16" in (out / "bench_flash.md").read_text()
    from mlx_flash import layout

    bundled, svd = out / "flash" / "bundled-float32", out / "flash" / "bundled-float32-svd16"
    assert not layout.read_manifest(bundled).predictors_file
    m = layout.read_manifest(svd)
    assert m.predictors_file and m.extra["predictors"]["kind"] == "svd-16"
    assert all(abs(l["recall"] - 0.96) < 0.005 for l in m.extra["predictors"]["layers"])
    assert (svd / m.dense_file).stat().st_ino == (bundled / m.dense_file).stat().st_ino  # linked, not copied
    assert bench.main(args) == 0  # a second run reuses the folder


def test_trained_predictors_full_method_reads_8x_fewer_bytes(tiny, tmp_path):
    """--train-predictors on the tiny preset at the default budget (50%): the headline rows select
    with the trained predictors and the full method reads at least 8x fewer bytes a token than
    naive (the bytes are deterministic: teacher-forced tokens; the timing is benchmarks/' job)."""
    out = tmp_path / "out"
    args = ["--model", str(tiny), "--out", str(out), "--rows", "naive,bundling", "--train-predictors", "2048"]
    args += ["--prompt-tokens", "32", "--max-tokens", "24", "--slow-tokens", "4", "--in-process"]
    assert bench.main(args) == 0
    result = json.loads((out / "bench_flash.json").read_text())
    assert result["predictors"]["kind"] == "trained" and result["predictors"]["fraction_of_model"] <= 0.05
    rows = {r["name"]: r for r in result["rows"]}
    assert all("error" not in r for r in rows.values()), rows
    assert rows["bundling"]["selection"] == "predictor"
    assert rows["naive"]["bytes_per_token"] >= 8 * rows["bundling"]["bytes_per_token"], (
        rows["naive"]["bytes_per_token"],
        rows["bundling"]["bytes_per_token"],
    )


def test_cache_note_when_a_token_selects_more_than_the_cache_holds():
    """The tiny preset at the defaults (128 + 256 tokens) before the KV cache's steps fitted the
    context: the KV cache left 46 rows a layer for ~143 selected neurons, so most are read again
    every token; the row says so, and stays silent otherwise."""
    row = {"mode": "flash", "num_layers": 4, "cache_capacity": 46, "neurons_active_per_token": 573.0}
    row.update(context=385, kv_bytes=2_097_152, budget_bytes=5_138_432)
    note = bench.cache_note(row)
    assert "46 cache rows a layer, fewer than the 143 a token selects" in note
    assert "385 positions takes 2.1 MB of the 5.1 MB" in note
    assert bench.cache_note({**row, "cache_capacity": 285}) is None
    assert bench.cache_note({**row, "mode": "hybrid"}) is None

"""Mixture-of-experts decode from flash, technique by technique, against mlx-lm with the whole
model in memory (the same quantization).

    python benchmarks/bench_moe.py --model M [--memory-budget 50%] [--prompt-tokens 32]
        [--max-tokens 32] --out DIR

M is a mixture-of-experts model folder (Hugging Face / mlx-lm layout, e.g. a preset of
tools/make_synthetic_model.py, converted once into --work, default OUT/flash) or a flash folder
(its source, for the dense row, is the manifest's `source_model`). For each budget (without
--memory-budget: 25%, 50% and 75% of the model's in-memory size) the rows below run, each in
its own process, cold (the page cache of the model's files dropped first; the reader bypasses
it anyway), on the same prompt of real text and the same continuation (teacher-forced, as in
bench_flash.py):

  naive      every routed expert of every token read from flash (no reuse)
  cache      the LRU expert cache (misses read, then the layer computed)
  lfu        the cache with LFU (with aging) eviction
  pinned     the cache with each layer's hottest experts pinned
  overlap    LRU + the resident experts computed while the missing ones are read
  lookahead  + the next layer's router on this layer's input names experts read ahead
  dense      mlx-lm with the whole model in memory (once, when it fits in free memory)

DIR/bench_moe.json holds `rows`: {name, budget, ms_per_token, io_ms (the time the token waited on
reads), bytes_per_token, hit_rate, peak_memory_bytes, ...}, and the floors: the disk's bandwidth
measured with the reader (cold, a decoded token's reads: k experts a request, layer after layer),
the I/O floor of each row (its bytes per token at that bandwidth) and the compute floor (the
dense row's time per token). DIR/bench_moe.md holds the table, DIR/bench_moe.png the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_flash as bf  # noqa: E402

DEFAULT_BUDGETS = ("25%", "50%", "75%")


@dataclass(frozen=True)
class MoERow:
    name: str
    budget: str | None  # None: the dense row
    policy: str = "lru"
    overlap: bool = False
    lookahead: bool = False
    layers: int | None = None  # dense: only the first `layers` decoder layers (see dense_rows)


WHAT = {
    "naive": "every routed expert read per token",
    "cache": "LRU expert cache",
    "lfu": "LFU (aging) expert cache",
    "pinned": "hottest experts pinned, LRU over the rest",
    "overlap": "LRU + resident experts computed while the missing are read",
    "lookahead": "overlap + next layer's experts read ahead",
    "dense": "mlx-lm, whole model in memory",
}
ROWS = tuple(WHAT)


def row_specs(budget: str) -> list[MoERow]:
    return [
        MoERow("naive", budget, policy="naive"),
        MoERow("cache", budget),
        MoERow("lfu", budget, policy="lfu"),
        MoERow("pinned", budget, policy="pinned"),
        MoERow("overlap", budget, overlap=True),
        MoERow("lookahead", budget, overlap=True, lookahead=True),
    ]


def run_row(spec: MoERow, cfg: dict) -> dict:
    """Load and decode one row in this process; its measurements."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.utils import load_tokenizer

    import mlx_flash

    prompt, cont = cfg["prompt"], cfg["continuation"]
    res: dict = {"name": spec.name, "budget": spec.budget, "what": WHAT[spec.name]}
    bf._reset_peak_rss()
    res["baseline_rss_bytes"] = bf._peak_rss()  # Python, MLX, mlx-lm before the model: not the model's
    t0 = time.perf_counter()
    if spec.budget is None:
        model, rt = dense_model(Path(cfg["source"]), spec.layers), None
        tokenizer = load_tokenizer(Path(cfg["source"]))
        res["layers"] = len(model.layers)
    else:
        model, tokenizer = mlx_flash.load(
            cfg["folder"],
            memory_budget=spec.budget,
            context=len(prompt) + len(cont) + 1,
            threads=cfg["threads"],
            lookahead=spec.lookahead,
            overlap=spec.overlap,
            expert_policy=spec.policy,
        )
        rt = model.flash
        res.update(
            budget_bytes=rt.plan.budget_bytes, plan_bytes=rt.plan.total_bytes, slots=rt.plan.cache_capacity
        )
    mx.eval(model.parameters())
    res["load_s"] = time.perf_counter() - t0
    mx.reset_peak_memory()
    bf._reset_peak_rss()
    sampler = bf.ForcedSampler(cont)
    gen = mlx_flash.stream_generate if rt is not None else mlx_lm.stream_generate
    stamps, tokens = [], []
    for r in gen(model, tokenizer, mx.array(prompt), max_tokens=len(cont), sampler=sampler):
        stamps.append(time.perf_counter())
        tokens.append(int(r.token))
    res["peak_memory_bytes"] = mx.get_peak_memory()
    res["peak_rss_bytes"] = bf._peak_rss()
    res["model_rss_bytes"] = res["peak_rss_bytes"] - res["baseline_rss_bytes"]  # against the budget
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    res["decode_tokens"] = len(tokens)
    res["wall_ms_per_token"] = 1e3 * sum(intervals) / max(1, len(intervals))
    if rt is None:
        res.update(ms_per_token=res["wall_ms_per_token"], io_ms=0.0, bytes_per_token=0.0, hit_rate=1.0)
        res.update(reader_busy_ms=0.0, mem_ms=0.0, selection_ms=0.0, compute_ms=res["ms_per_token"])
        return res
    s = rt.stats()
    ex = s.extra["experts"]
    res.update(
        ms_per_token=s.ms_per_token,
        io_ms=s.io_ms,
        io_ms_by_layer=s.io_ms_by_layer,
        bytes_per_token=s.bytes_per_token,
        hit_rate=ex["hit_rate"],
        reader_busy_ms=s.reader_busy_ms,
        mem_ms=s.memory_ms,
        selection_ms=s.selection_ms,
        compute_ms=s.compute_ms,
        reads_per_token=s.reads_per_token,
        guess_hit_rate=ex["guess_hit_rate"],
        lookahead_recall=s.lookahead_recall,
        ahead_reads=ex["ahead_reads"],
        lookahead_wasted_fraction=s.lookahead_wasted_fraction,
        experts=ex["experts"],
        policy=ex["policy"],
    )
    rt.close()
    return res


def dense_model(source: Path, layers: int | None):
    """mlx-lm's model of `source` in memory, float32 (as the flash path computes); with `layers`,
    only its first `layers` decoder layers, loaded lazily so that the others are never read."""
    import mlx.core as mx
    from mlx.utils import tree_map

    from mlx_flash.model import load_dense

    if layers is None:
        return load_dense(source)
    from mlx_lm.utils import load_model

    model, _ = load_model(source, lazy=True)
    model.model.layers = model.model.layers[:layers]
    floats = lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a  # noqa: E731
    model.update(tree_map(floats, model.parameters()))
    mx.eval(model.parameters())
    model.eval()
    return model


def dense_rows(results: list[dict], total_layers: int) -> dict | None:
    """The dense row: the whole model's, or, when it did not fit, extrapolated from two partial
    models (a quarter and half of the layers, in memory: time per token is linear in layers)."""
    whole = next((r for r in results if r["name"] == "dense" and "error" not in r), None)
    if whole is not None:
        return whole
    parts = sorted((r for r in results if r.get("partial") and "error" not in r), key=lambda r: r["layers"])
    if len(parts) < 2:
        return None
    a, b = parts[0], parts[-1]
    per_layer = (b["ms_per_token"] - a["ms_per_token"]) / (b["layers"] - a["layers"])
    ms = b["ms_per_token"] + per_layer * (total_layers - b["layers"])
    row = {
        **{k: b[k] for k in ("io_ms", "bytes_per_token", "hit_rate", "decode_tokens")},
        "name": "dense",
        "budget": None,
        "what": WHAT["dense"]
        + f" (extrapolated from {a['layers']} and {b['layers']} of {total_layers} layers)",
        "ms_per_token": ms,
        "extrapolated_from": [a["layers"], b["layers"]],
        "per_layer_ms": per_layer,
        "peak_memory_bytes": int(b["peak_memory_bytes"] * total_layers / b["layers"]),
        "peak_rss_bytes": 0,
        "model_rss_bytes": 0,
        "reader_busy_ms": 0.0,
        "mem_ms": 0.0,
        "selection_ms": 0.0,
        "compute_ms": ms,
    }
    results.append(row)
    return row


def disk_bandwidth(folder: Path, k: int, seconds: float = 3.0) -> float:
    """Bytes/s of the reader on the expert file, cold: k experts a request (a decoded token's
    reads of one layer), layer after layer, for about `seconds`."""
    import numpy as np

    from mlx_flash import layout
    from mlx_flash.reader import FlashReader

    manifest = layout.read_manifest(folder)
    reader = FlashReader(folder, manifest.expert_rows())
    try:
        n = manifest.experts[0].num_experts
        out = reader.empty_rows(k, raw=True)
        done, t0 = 0, time.perf_counter()
        rng = np.random.default_rng(0)
        while time.perf_counter() - t0 < seconds:
            for layer in range(len(manifest.experts)):
                ids = np.sort(rng.choice(n, k, replace=False))
                reader.submit(layer, ids, out=out, raw=True).result()
                done += k * manifest.experts[layer].expert_bytes
                if time.perf_counter() - t0 >= seconds:
                    break
        return done / (time.perf_counter() - t0)
    finally:
        reader.close()


def fmt_table(rows: list[dict], bandwidth: float, dense_ms: float | None) -> str:
    from mlx_flash.budget import fmt_bytes

    head = (
        "| row | budget | ms/token | tok/s | I/O wait ms | reader busy ms | MB read/token | hit rate | guess hit rate "
        "| I/O floor ms | vs max(floors) | vs dense tok/s | peak memory (MLX) | peak RSS - baseline | budget |"
    )
    lines, ok = bf.table_lines(head, rows, ("name", "budget"))
    for r in ok:
        floor = r["bytes_per_token"] / bandwidth * 1e3 if bandwidth else 0.0
        both = max(floor, dense_ms or 0.0)
        ms = r["ms_per_token"] or float("nan")
        lines.append(
            f"| {r['name']} | {r.get('budget') or 'whole model'} | {ms:.1f} | {1e3 / ms:.2f} | {r['io_ms']:.1f} | "
            f"{r.get('reader_busy_ms', 0.0):.1f} | {r['bytes_per_token'] / 1e6:.2f} | {100 * r['hit_rate']:.1f}% | "
            + (f"{100 * r['guess_hit_rate']:.1f}%" if r.get("ahead_reads") else "—")
            + f" | {floor:.1f} | {ms / both if both else float('nan'):.2f}x | "
            + (f"{dense_ms / ms:.2f}x" if dense_ms else "—")
            + f" | {fmt_bytes(r['peak_memory_bytes'])} | {fmt_bytes(r['model_rss_bytes'])} | "
            + (fmt_bytes(r["budget_bytes"]) if r.get("budget_bytes") else "—")
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_row"]:
        return bf._row_main(argv[1], argv[2], run_row, MoERow)
    ap = argparse.ArgumentParser(
        prog="benchmarks/bench_moe.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", required=True, type=Path, help="MoE model folder, or a flash folder")
    ap.add_argument("--memory-budget", default=None, help="e.g. 50%% or 8GB (default: 25%%, 50%% and 75%%)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens decoded per row (default 32)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--work", type=Path, default=None, help="where M is converted (default OUT/flash)")
    ap.add_argument("--rows", default=None, help=f"comma-separated rows (default all: {','.join(ROWS)})")
    ap.add_argument("--threads", type=int, default=None, help="flash reader threads")
    ap.add_argument(
        "--in-process", action="store_true", help="rows in this process (tests; peak memory shared)"
    )
    ap.add_argument("--row-timeout", type=float, default=None)
    args = ap.parse_args(argv)
    rows = [r.strip() for r in (args.rows or ",".join(ROWS)).split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        print(f"error: unknown row(s) {', '.join(unknown)} (choose from {', '.join(ROWS)})", file=sys.stderr)
        return 2
    if not (args.model / "config.json").is_file():
        print(f"error: {args.model}: not a model folder (no config.json)", file=sys.stderr)
        return 2
    try:
        return run(args, rows)
    except bf.BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def prepare(model: Path, work: Path, log) -> tuple[Path, Path]:
    """(the flash folder, the source folder) of --model, converting it once into `work`."""
    from mlx_flash import layout
    from mlx_flash.convert import convert

    if layout.is_flash_folder(model):
        return model, Path(layout.read_manifest(model).source_model or model)
    folder = work / model.name
    if not layout.is_flash_folder(folder):
        log(f"converting {model} into {folder} ...")
        convert(model, folder, progress=False)
    return folder, model


def run(args, rows: list[str]) -> int:
    from mlx_lm.utils import load_tokenizer

    from mlx_flash import layout

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or out / "flash"
    work.mkdir(parents=True, exist_ok=True)
    folder, source = prepare(args.model.resolve(), work, log)
    tokenizer = load_tokenizer(folder)
    prompt, cont = bf.text_tokens(tokenizer, bf.default_text(), args.prompt_tokens, args.max_tokens)
    cfg = {
        "source": str(source),
        "folder": str(folder),
        "threads": args.threads,
        "prompt": prompt,
        "continuation": cont,
    }
    budgets = [args.memory_budget] if args.memory_budget else list(DEFAULT_BUDGETS)
    specs = [s for b in budgets for s in row_specs(b) if s.name in rows]
    total_layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    mach = bf.machine()
    if "dense" in rows and source.is_dir():
        nbytes = sum(f.stat().st_size for f in source.glob("*.safetensors"))
        avail = mach["mem_available_bytes"] or 0
        if nbytes * 1.15 + (1 << 30) < avail:
            specs.append(MoERow("dense", None))
        else:  # the whole model does not fit: a quarter and half of its layers do
            log(
                f"dense: the model ({nbytes / 1e9:.1f} GB) does not fit in free memory ({avail / 1e9:.1f} GB)"
            )
            specs += [MoERow("dense", None, layers=max(1, total_layers * q // 4)) for q in (1, 2)]
    files = bf.model_files([folder] + ([source] if source.is_dir() and source != folder else []))
    manifest = layout.read_manifest(folder)
    k = json.loads((folder / "config.json").read_text()).get("num_experts_per_tok", 8)
    bf.drop_page_cache(files, False)
    bandwidth = disk_bandwidth(folder, k)
    log(f"reader bandwidth (cold, {k} experts a request): {bandwidth / 1e6:.0f} MB/s")
    results = []
    if "dense" in rows and not any(sp.name == "dense" for sp in specs):
        results.append(
            {"name": "dense", "budget": None, "error": f"skipped: the source {source} is not here"}
        )
    for spec in specs:
        bf.drop_page_cache(files, False)
        t0 = time.perf_counter()
        res = bf.run_row_somewhere(
            spec, cfg, work, args.in_process, args.row_timeout, run_row, Path(__file__)
        )
        res.setdefault("budget", spec.budget)
        if spec.layers is not None:
            res.update(name=f"dense-{spec.layers}-layers", partial=True, layers=spec.layers)
        res["row_seconds"] = time.perf_counter() - t0
        results.append(res)
        if "error" in res:
            log(f"{spec.name} @ {spec.budget}: error: {res['error']}")
        else:
            log(
                f"{spec.name} @ {spec.budget or 'whole model'}: {res['ms_per_token']:.1f} ms/token, I/O wait "
                f"{res['io_ms']:.1f} ms, {res['bytes_per_token'] / 1e6:.2f} MB/token, hit rate "
                f"{100 * res['hit_rate']:.1f}%; {res['row_seconds']:.0f} s"
            )
    dense = dense_rows(results, total_layers)
    dense_ms = dense["ms_per_token"] if dense else None
    for r in results:
        if "error" not in r:
            r["io_floor_ms"] = r["bytes_per_token"] / bandwidth * 1e3
            r["compute_floor_ms"] = dense_ms
    mach["load_avg_end"] = os.getloadavg()
    result = {
        "command": " ".join(["python", "benchmarks/bench_moe.py", *(argv_of())]),
        "model": str(args.model),
        "flash_folder": str(folder),
        "budgets": budgets,
        "prompt_tokens": len(prompt),
        "max_tokens": len(cont),
        "experts": manifest.experts[0].num_experts,
        "experts_per_token": k,
        "expert_bytes": manifest.experts[0].expert_bytes,
        "bandwidth_bytes_per_s": bandwidth,
        "compute_floor_ms": dense_ms,
        "machine": mach,
        "rows": results,
    }
    (out / "bench_moe.json").write_text(json.dumps(result, indent=1))
    header = (
        f"{args.model.name}: {manifest.experts[0].num_experts} experts, top-{k}, "
        f"{manifest.experts[0].expert_bytes / 1e6:.2f} MB an expert; prompt {len(prompt)}, {len(cont)} tokens decoded "
        f"(teacher-forced); {mach['cpu']} x{mach['nproc']}, {mach['blas']}\n"
        f"I/O floor: bytes per token / {bandwidth / 1e6:.0f} MB/s (the reader, cold); compute floor: the dense row "
        + (f"{dense_ms:.1f} ms/token" if dense_ms else "(not run)")
    )
    table = fmt_table(results, bandwidth, dense_ms)
    (out / "bench_moe.md").write_text(f"{header}\n\n{table}\n")
    print(header)
    print(table)
    try:
        plot_rows = [{**r, "name": f"{r['name']} {r.get('budget') or ''}".strip()} for r in results]
        bf.plot(plot_rows, out / "bench_moe.png", header.splitlines()[0])
    except ImportError:
        log("matplotlib is not installed: no plot")
    return 0


def argv_of() -> list[str]:
    return sys.argv[1:] if Path(sys.argv[0]).name == "bench_moe.py" else []


if __name__ == "__main__":
    sys.exit(main())

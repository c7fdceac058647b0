"""Quantized neuron bundles on the demo model: bytes read per token and held-out perplexity of
the flash path, float16 bundles against 8-bit and 4-bit ones.

    python benchmarks/bench_quantized.py [--model mlx_flash/demo_model] [--work DIR] [--tokens N]

Each variant is converted from the same source (`convert(..., dtype="float16", quantize=bits)`:
float16 rows, or quantized rows with float16 scales and biases), loaded in flash mode with
exact selection, and run teacher-forced over the demo model's held-out text (the definition of
``tools/train_demo_model.py --evaluate``: its held-out topics, windows of the training length),
one token at a time through the decode path (selection, neuron cache, reads, FFN on the
cached rows), each window from an empty KV cache. Perplexity is exp(mean NLL) of the
next-token predictions. Bytes per token are the reader's (sector-aligned, coalesced reads);
"used" counts only the bundles of the neurons loaded. Dense references (mlx-lm in memory: the
float model, and the same quantized weights via `load_dense(quantize=...)`) are computed over
the same windows.

The demo model's bundles (d = 256) are far smaller than the 4 KiB sectors an O_DIRECT reader
reads, so its bytes read per token are set by sectors, not bundle sizes. A second table reads
random neuron sets (--io-active of a layer per token, the paper's 2.4% new neurons per token)
from one layer of a model at the paper's size (--io-hidden x --io-neurons, random float16
weights), with the reader's defaults and with coalescing off (coalesce_gap -1). Writes JSON
(--json) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import train_demo_model as tool  # noqa: E402 (tools/)

import mlx_flash  # noqa: E402
from mlx_flash.convert import convert  # noqa: E402
from mlx_flash.model import load_dense  # noqa: E402


def held_out(source: Path) -> tuple[np.ndarray, int]:
    """The held-out token stream and window length, as ``train_demo_model.py --evaluate``."""
    card_path = source / "demo_model_card.json"
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    held = card.get("held_out_topics") or tool.split_topics(tool.load_topics())[1]
    seq_len = card.get("training", {}).get("seq_len", 128)
    return tool.held_out_stream(tool.load_tokenizer(source), held), seq_len


def windows(stream: np.ndarray, seq_len: int, max_tokens: int | None) -> list[tuple[int, int]]:
    """(start, length) of consecutive windows; every token but the first is predicted once."""
    n = len(stream) - 1
    if max_tokens:
        n = min(n, max_tokens)
    return [(s, min(seq_len, n - s)) for s in range(0, n, seq_len)]


def dense_nll(model, stream: np.ndarray, wins: list[tuple[int, int]]) -> tuple[float, int]:
    nll, count = 0.0, 0
    for s, length in wins:
        x = mx.array(stream[s : s + length])[None]
        y = mx.array(stream[s + 1 : s + length + 1])[None]
        loss = nn.losses.cross_entropy(model(x).astype(mx.float32), y, reduction="sum")
        nll += loss.item()
        count += length
    return nll, count


def flash_decode_nll(model, stream: np.ndarray, wins: list[tuple[int, int]]) -> tuple[float, int]:
    """Teacher forcing through the decode path: one token per forward pass."""
    from mlx_lm.models.cache import make_prompt_cache

    nll, count = 0.0, 0
    for s, length in wins:
        cache = make_prompt_cache(model)
        for t in range(length):
            logits = model(mx.array([[int(stream[s + t])]]), cache=cache)[0, -1].astype(mx.float32)
            nll += (mx.logsumexp(logits) - logits[int(stream[s + t + 1])]).item()
            count += 1
    return nll, count


def io_layer(
    work: Path, hidden: int, neurons: int, active: float, tokens: int, group_size: int
) -> list[dict]:
    """Bytes the reader reads for random active sets of one layer at d = hidden, per variant."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from mlx_flash.reader import FlashReader

    src = work / f"layer-{hidden}x{neurons}"
    if not (src / "config.json").exists():
        cfg = {
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": neurons,
            "num_hidden_layers": 1,
            "num_attention_heads": hidden // 128,
            "num_key_value_heads": hidden // 128,
            "vocab_size": 64,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "hidden_act": "relu",
        }
        mx.random.seed(0)
        weights = {
            k: v.astype(mx.float16)
            for k, v in tree_flatten(llama.Model(llama.ModelArgs.from_dict(cfg)).parameters())
        }
        src.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(src / "model.safetensors"), weights)
        (src / "config.json").write_text(json.dumps(cfg))
        del weights
    rng = np.random.default_rng(0)
    sets = [np.sort(rng.choice(neurons, int(active * neurons), replace=False)) for _ in range(tokens)]
    rows = []
    for label, bits in (("float16", None), ("8-bit", 8), ("4-bit", 4)):
        folder = work / f"layer-{label}"
        m = convert(
            src,
            folder,
            quantize=bits,
            group_size=group_size if bits else None,
            overwrite=True,
            progress=False,
        )
        for gap in (None, -1):
            with FlashReader(folder, m, coalesce_gap=gap) as reader:
                for ids in sets:
                    reader.read(0, ids, raw=True)
                st = reader.stats.take()[0]
                rows.append(
                    {
                        "variant": label,
                        "coalesce_gap": reader.coalesce_gap,
                        "bundle_bytes": m.layers[0].bundle_bytes,
                        "bytes_read_per_token": st.bytes_read / tokens,
                        "bytes_used_per_token": st.bytes_used / tokens,
                        "reads_per_token": st.reads / tokens,
                        "direct": reader.direct,
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        default=str(ROOT / "mlx_flash" / "demo_model"),
        help="source model folder (default: the demo model)",
    )
    ap.add_argument(
        "--work", default="/tmp/mlx_flash_bench_quantized", help="where the flash folders are converted"
    )
    ap.add_argument(
        "--tokens", type=int, default=0, help="predict at most this many held-out tokens (default: all)"
    )
    ap.add_argument("--window", type=int, default=5, help="flash window (default 5)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument(
        "--io-hidden", type=int, default=4096, help="hidden size of the I/O table's layer (0: skip it)"
    )
    ap.add_argument("--io-neurons", type=int, default=11008, help="neurons of the I/O table's layer")
    ap.add_argument("--io-active", type=float, default=0.024, help="fraction of the layer read per token")
    ap.add_argument("--io-tokens", type=int, default=200, help="tokens (random neuron sets) of the I/O table")
    ap.add_argument("--skip-demo", action="store_true", help="only the I/O table")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    source, work = Path(args.model), Path(args.work)
    stream, seq_len = held_out(source)
    wins = windows(stream, seq_len, args.tokens or None)
    rows = []
    dense = {}
    for label, model in (
        ()
        if args.skip_demo
        else (
            ("dense float32", lambda: load_dense(source)),
            ("dense 8-bit", lambda: load_dense(source, quantize=8, group_size=args.group_size)),
            ("dense 4-bit", lambda: load_dense(source, quantize=4, group_size=args.group_size)),
        )
    ):
        nll, count = dense_nll(model(), stream, wins)
        dense[label] = math.exp(nll / count)
    for label, bits in () if args.skip_demo else (("float16", None), ("8-bit", 8), ("4-bit", 4)):
        folder = work / label
        m = convert(
            source,
            folder,
            dtype="float16",
            quantize=bits,
            group_size=args.group_size if bits else None,
            overwrite=True,
            progress=False,
        )
        model, _ = mlx_flash.load(
            folder, mode="flash", selection="exact", window=args.window, context=seq_len + 1
        )
        rt = model.flash
        rt.reset_stats()
        t0 = time.perf_counter()
        nll, count = flash_decode_nll(model, stream, wins)
        seconds = time.perf_counter() - t0
        s = rt.stats()
        rt.close()
        rows.append(
            {
                "variant": label,
                "bundle_bytes": m.layers[0].bundle_bytes,
                "ffn_bytes": m.ffn_bytes(),
                "perplexity": math.exp(nll / count),
                "tokens": count,
                "bytes_read_per_token": s.bytes_per_token,
                "reads_per_token": s.reads_per_token,
                "neurons_loaded_per_token": s.neurons_loaded_per_token,
                "bytes_used_per_token": s.neurons_loaded_per_token * m.layers[0].bundle_bytes,
                "ms_per_token": 1e3 * seconds / count,
                "reader_direct": rt.reader.direct,
            }
        )
    io = (
        io_layer(work, args.io_hidden, args.io_neurons, args.io_active, args.io_tokens, args.group_size)
        if args.io_hidden
        else []
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "dense_perplexity": dense,
                    "flash": rows,
                    "io_layer": io,
                    "seq_len": seq_len,
                    "window": args.window,
                    "group_size": args.group_size,
                },
                indent=1,
            )
        )
    if io:
        print(
            f"one layer of {args.io_hidden} x {args.io_neurons}, {args.io_active:.1%} of its neurons read per token "
            f"({args.io_tokens} random sets), float16 scales, {'O_DIRECT' if io[0]['direct'] else 'buffered'} reads"
        )
        print(
            f"{'variant':<8} {'gap':>6} {'bundle B':>9} {'read B/tok':>11} {'vs fp16':>8} {'used B/tok':>11} {'reads/tok':>9}"
        )
        for r in io:
            ref = next(x for x in io if x["variant"] == "float16" and x["coalesce_gap"] == r["coalesce_gap"])
            print(
                f"{r['variant']:<8} {r['coalesce_gap']:>6} {r['bundle_bytes']:>9} {r['bytes_read_per_token']:>11.0f} "
                f"{r['bytes_read_per_token'] / ref['bytes_read_per_token']:>8.1%} {r['bytes_used_per_token']:>11.0f} "
                f"{r['reads_per_token']:>9.1f}"
            )
    if not rows:
        return 0
    base = rows[0]
    print(
        f"held-out tokens predicted: {rows[0]['tokens']} (windows of {seq_len}), flash window {args.window}, "
        f"exact selection, group size {args.group_size}, float16 scales"
    )
    print("dense (mlx-lm, in memory, same windows): " + ", ".join(f"{k} {v:.4f}" for k, v in dense.items()))
    print(
        f"{'variant':<8} {'bundle B':>9} {'perplexity':>10} {'vs fp16':>8} {'read B/tok':>11} {'vs fp16':>8} "
        f"{'used B/tok':>11} {'vs fp16':>8} {'reads/tok':>9} {'ms/tok':>7}"
    )
    for r in rows:
        print(
            f"{r['variant']:<8} {r['bundle_bytes']:>9} {r['perplexity']:>10.4f} {r['perplexity'] / base['perplexity'] - 1:>+8.2%} "
            f"{r['bytes_read_per_token']:>11.0f} {r['bytes_read_per_token'] / base['bytes_read_per_token']:>8.1%} "
            f"{r['bytes_used_per_token']:>11.0f} {r['bytes_used_per_token'] / base['bytes_used_per_token']:>8.1%} "
            f"{r['reads_per_token']:>9.1f} {r['ms_per_token']:>7.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

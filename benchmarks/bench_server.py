"""Tokens/s through `python -m mlx_flash.server` against `mlx_flash.generate` in-process, on the
same model with the same load options, measured side by side in one run.

    python benchmarks/bench_server.py [--model DIR] [--max-tokens 128] [--rounds 5]
        [--concurrent 4] [--json OUT.json] [load options of mlx_flash.generate]

The server runs in a subprocess on a free loopback port (its prompt cache off, so that no
request reuses an earlier one's KV cache; the in-process side has none either). Each round
runs, one after the other: the in-process generation, the same request to the server through
the `openai` client unstreamed, and streamed, in an order that rotates from round to round.
Every call decodes exactly --max-tokens tokens (greedy, end-of-text banned by a logit bias on
both sides) from the same prompt, and its tokens/s is the tokens over the call's wall time as its caller sees it (prefill included). The
overhead is 1 - server / in-process, per round (the two runs of a round are seconds apart),
and the median over rounds is reported. Then --concurrent clients send one request each at
once (the server queues them): their total tokens over the wall time until the last answer,
against the in-process rate. Inside the server, each request's `usage.flash.ms_per_token` says
how long its decode steps took, which separates a slower decode from the HTTP side.

Writes a table to stdout and, with --json, every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "The for statement"
LOAD_OPTIONS = ("model", "mode", "memory_budget", "window", "selection", "threads", "context")


def server_command(args) -> list[str]:
    cmd = [sys.executable, "-m", "mlx_flash.server", "--port", "0", "--prompt-cache-bytes", "0"]
    for name in LOAD_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    return cmd


def start_server(args) -> tuple[subprocess.Popen, str, list[str]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        server_command(args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    lines: list[str] = []
    for line in proc.stderr:
        lines.append(line.rstrip())
        m = re.search(r"on (http://\S+)/v1", line)
        if m:
            threading.Thread(
                target=lambda: lines.extend(x.rstrip() for x in proc.stderr), daemon=True
            ).start()
            return proc, m.group(1), lines
    raise SystemExit("bench_server: the server did not start:\n" + "\n".join(lines))


def main() -> int:
    from mlx_flash.generate import add_model_arguments

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(ap)
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per request (default 128)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    ap.add_argument("--concurrent", type=int, default=4, help="clients at once in the last part (default 4)")
    ap.add_argument("--json", type=Path, help="write every measurement here")
    args = ap.parse_args()

    import openai
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    import mlx_flash
    from mlx_flash.generate import load_from_args

    model, tokenizer = load_from_args(args)
    eos = sorted(tokenizer.eos_token_ids)
    bias = {t: -100.0 for t in eos}
    n = args.max_tokens

    def in_process() -> dict:
        t0 = time.perf_counter()
        count = sum(
            1
            for _ in mlx_flash.stream_generate(
                model,
                tokenizer,
                PROMPT,
                max_tokens=n,
                sampler=make_sampler(0.0),
                logits_processors=make_logits_processors(logit_bias=bias),
            )
        )
        wall = time.perf_counter() - t0
        s = mlx_flash.flash_stats(model)
        return {"tokens": count, "wall_s": wall, "tok_s": count / wall, "decode_ms_per_token": s.ms_per_token}

    proc, url, lines = start_server(args)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=600, max_retries=0)
    request = dict(
        model=args.model or "mlx_flash-demo",
        prompt=PROMPT,
        max_tokens=n,
        temperature=0,
        logit_bias={str(t): -100 for t in eos},
    )

    def through_server(stream: bool) -> dict:
        t0 = time.perf_counter()
        if stream:
            tokens, flash = 0, {}
            for chunk in client.completions.create(
                stream=True, stream_options={"include_usage": True}, **request
            ):
                if chunk.usage is not None:
                    tokens, flash = chunk.usage.completion_tokens, chunk.usage.model_extra["flash"]
        else:
            r = client.completions.create(**request)
            tokens, flash = r.usage.completion_tokens, r.usage.model_extra["flash"]
        wall = time.perf_counter() - t0
        return {
            "tokens": tokens,
            "wall_s": wall,
            "tok_s": tokens / wall,
            "decode_ms_per_token": flash["ms_per_token"],
        }

    try:
        in_process(), through_server(False), through_server(True)  # warm up both sides
        rounds = []
        for i in range(args.rounds):
            runs = [("in_process", in_process), ("server", lambda: through_server(False))]
            runs.append(("server_stream", lambda: through_server(True)))
            row = {}
            for key, run in runs[i % 3 :] + runs[: i % 3]:  # each side takes each place in turn
                row[key] = run()
            row["load_average"] = os.getloadavg()[0]
            for k in ("server", "server_stream"):
                row[k]["overhead"] = 1 - row[k]["tok_s"] / row["in_process"]["tok_s"]
            rounds.append(row)
            print(
                f"round {i + 1}: in-process {row['in_process']['tok_s']:.1f} tok/s, server "
                f"{row['server']['tok_s']:.1f} ({100 * row['server']['overhead']:+.1f}%), streamed "
                f"{row['server_stream']['tok_s']:.1f} ({100 * row['server_stream']['overhead']:+.1f}%)",
                flush=True,
            )
        # --concurrent clients at once, then the in-process rate right after
        results: list[dict] = []
        t0 = time.perf_counter()
        threads = [
            threading.Thread(target=lambda: results.append(through_server(False)))
            for _ in range(args.concurrent)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        concurrent = {
            "clients": args.concurrent,
            "tokens": sum(r["tokens"] for r in results),
            "wall_s": wall,
            "tok_s": sum(r["tokens"] for r in results) / wall,
            "latency_s": sorted(r["wall_s"] for r in results),
            "in_process_tok_s": in_process()["tok_s"],
        }
        concurrent["overhead"] = 1 - concurrent["tok_s"] / concurrent["in_process_tok_s"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    def med(key: str, field: str = "tok_s") -> float:
        return statistics.median(r[key][field] for r in rounds)

    print()
    print(
        f"model {args.model or 'demo'}, mode {args.mode}, {n} tokens a request, {args.rounds} rounds (medians)"
    )
    print(f"{'':28s} {'tok/s':>8s} {'decode ms/token':>16s} {'overhead':>9s}")
    print(
        f"{'in-process generate':28s} {med('in_process'):8.1f} {med('in_process', 'decode_ms_per_token'):16.2f}"
    )
    for key, label in (("server", "server, one client"), ("server_stream", "server, one client, streamed")):
        print(
            f"{label:28s} {med(key):8.1f} {med(key, 'decode_ms_per_token'):16.2f} "
            f"{100 * statistics.median(r[key]['overhead'] for r in rounds):8.1f}%"
        )
    print(
        f"{f'server, {args.concurrent} clients at once':28s} {concurrent['tok_s']:8.1f} {'':16s} "
        f"{100 * concurrent['overhead']:8.1f}%  (in-process just after: {concurrent['in_process_tok_s']:.1f} tok/s; "
        f"latencies {', '.join(f'{x:.2f}' for x in concurrent['latency_s'])} s)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "command": " ".join([Path(sys.executable).name, *sys.argv]),
                    "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores",
                    "blas": "OpenBLAS (LD_PRELOAD)"
                    if "openblas" in os.environ.get("LD_PRELOAD", "")
                    else "MLX's bundled reference BLAS",
                    "max_tokens": n,
                    "rounds": rounds,
                    "concurrent": concurrent,
                    "server_log": lines,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

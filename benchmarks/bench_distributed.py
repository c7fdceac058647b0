"""One process against N local ranks (`mlx.launch -n N --backend ring`) sharing each FFN layer's
neurons: the greedy tokens of every rank, and per rank the bytes read from flash and the time
per decoded token (with the time spent in the per-layer all_sum).

    python benchmarks/bench_distributed.py --model DIR [--ranks 2] [--max-tokens 32]
        [--memory-budget 50%] [--mode flash] --out OUT

DIR is a flash folder or a model folder (converted once into the cache, as mlx_flash.load
does; a model folder converted by two ranks at once is what the conversion lock is for). Every
run uses the same prompt of real text (Python's own documentation) and greedy decoding. Each
run is its own set of processes: 1 rank (no launcher), then N ranks under mlx.launch; every
rank writes what it measured to OUT/run-N/rank-R.json, and the script writes
OUT/bench_distributed.json and a table (OUT/bench_distributed.md).

N local ranks share one machine's cores and disk: on one machine this measures what sharding
saves each rank in bytes and memory, not the speed of N machines (see RESULTS.md for that
model). `measure` and `launch` are what tests/test_distributed.py runs too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_PROMPT_CHARS = 400


def prompt_text(chars: int = DEFAULT_PROMPT_CHARS) -> str:
    """Real text for the prompt: the start of a topic of Python's documentation."""
    from pydoc_data.topics import topics

    return topics["for"][:chars]


def measure(
    model: str | None,
    *,
    prompt: str,
    max_tokens: int,
    mode: str = "flash",
    memory_budget: str | None = None,
    threads: int | None = None,
) -> dict:
    """Load `model` in this process (sharded if it is a rank of a launch), decode `max_tokens`
    greedy tokens after `prompt`, and return what this rank saw: its tokens, rank and group
    size, bytes and reads per decoded token, ms per token, all_sum ms, memory."""
    import mlx.core as mx

    import mlx_flash

    t0 = time.perf_counter()
    m, tok = mlx_flash.load(model, mode=mode, memory_budget=memory_budget, threads=threads)
    load_s = time.perf_counter() - t0
    tokens = [
        int(r.token) for r in mlx_flash.stream_generate(m, tok, prompt, max_tokens=max_tokens)
    ]  # greedy: mlx-lm's default sampler
    s = mlx_flash.flash_stats(m)
    res = {
        "rank": s.extra["rank"],
        "size": s.extra["group_size"],
        "tokens": tokens,
        "decode_tokens": s.decode_tokens,
        "bytes_per_token": s.bytes_per_token,
        "reads_per_token": s.reads_per_token,
        "neurons_loaded_per_token": s.neurons_loaded_per_token,  # MoE: experts
        "ms_per_token": s.ms_per_token,
        "io_ms": s.io_ms,
        "all_sum_ms": s.all_sum_ms,
        "compute_ms": s.compute_ms,
        "prefill_bytes": s.prefill_bytes,
        "bytes_total": s.prefill_bytes + round(s.bytes_per_token * s.decode_tokens),  # the whole run's
        "plan_bytes": s.resident_bytes,
        "peak_memory_bytes": s.peak_memory_bytes,
        "peak_rss_bytes": s.peak_rss_bytes,
        "load_s": load_s,
        "device": str(mx.default_device()),
    }
    if "experts" in s.extra:  # MoE: this rank's experts (of each layer's) and their pools' slots
        ex = s.extra["experts"]
        res["experts"] = {k: ex[k] for k in ("owned", "experts", "slots", "hit_rate", "bytes_read")}
    if res["size"] > 1:
        res["all_sum_alone_us"] = all_sum_latency_us(m.flash.shard, m.flash.manifest.hidden_size)
    m.flash.close()
    return res


def all_sum_latency_us(shard, hidden: int, repeats: int = 200) -> dict:
    """The all_sum of one decoded token's layer output alone ([1, 1, hidden] float32, as the
    FFN sums it), in microseconds: median and 10th percentile over `repeats`."""
    import mlx.core as mx
    import numpy as np

    x = mx.ones((1, 1, hidden), dtype=mx.float32)
    mx.eval(shard.all_sum(x))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(shard.all_sum(x))
        times.append((time.perf_counter() - t0) * 1e6)
    return {"median": float(np.median(times)), "p10": float(np.percentile(times, 10)), "bytes": hidden * 4}


def free_port(count: int) -> int:
    """A port P such that P .. P + count - 1 were free a moment ago (the ring backend listens on
    one port per rank, from --starting-port up)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + count > 65535:
            continue
        try:
            socks = []
            for p in range(port, port + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports for the ring backend")


def mlx_launch() -> str:
    """MLX's launcher: the `mlx.launch` script installed beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / "mlx.launch"
    found = str(beside) if beside.is_file() else shutil.which("mlx.launch")
    if not found:
        raise RuntimeError("mlx.launch not found: install mlx (pip install mlx)")
    return found


def launch(ranks: int, out_dir: Path, worker_args: list[str], timeout: float = 600.0, env=None) -> list[dict]:
    """Run this script's worker as `ranks` processes (1: plainly; more: `mlx.launch -n ranks
    --backend ring` on this machine) and return each rank's result, by rank. A run that fails
    or takes longer than `timeout` seconds raises RuntimeError with its output's tail."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in out_dir.glob("rank-*.json"):
        f.unlink()
    worker = [str(Path(__file__).resolve()), "--worker", "--out", str(out_dir), *worker_args]
    if ranks == 1:
        cmd = [sys.executable, *worker]
    else:
        cmd = [mlx_launch(), "-n", str(ranks), "--backend", "ring"]
        cmd += ["--starting-port", str(free_port(ranks)), "--python", sys.executable, *worker]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a run that hangs is killed whole
        env=env,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise RuntimeError(f"{ranks} ranks did not finish in {timeout:.0f} s:\n{output[-3000:]}") from None
    results = sorted(
        (json.loads(f.read_text()) for f in out_dir.glob("rank-*.json")), key=lambda r: r["rank"]
    )
    if proc.returncode != 0 or len(results) != ranks:
        raise RuntimeError(
            f"{ranks} ranks: exit status {proc.returncode}, {len(results)} results:\n{output[-3000:]}"
        )
    return results


def worker_args(args: argparse.Namespace) -> list[str]:
    """The options a worker needs, from the main script's (or a test's) namespace."""
    out = [
        "--max-tokens",
        str(args.max_tokens),
        "--mode",
        args.mode,
        "--prompt-chars",
        str(args.prompt_chars),
    ]
    if args.model:
        out += ["--model", str(args.model)]
    if args.memory_budget:
        out += ["--memory-budget", args.memory_budget]
    if args.threads:
        out += ["--threads", str(args.threads)]
    return out


def run_worker(args: argparse.Namespace) -> int:
    res = measure(
        args.model,
        prompt=prompt_text(args.prompt_chars),
        max_tokens=args.max_tokens,
        mode=args.mode,
        memory_budget=args.memory_budget,
        threads=args.threads,
    )
    out = Path(args.out)
    tmp = out / f".rank-{res['rank']}.json.tmp"
    tmp.write_text(json.dumps(res))
    os.replace(tmp, out / f"rank-{res['rank']}.json")
    return 0


def table(runs: dict[int, list[dict]]) -> str:
    one = runs[1][0]
    moe = "experts" in one  # MoE: each rank's experts, pool slots and expert bytes of the whole run
    lines = [
        "| ranks | rank | tokens equal to 1 process | KB read / token | share of 1 process | ms / token | "
        "I/O wait ms | all_sum ms / token | one all_sum alone, us (median) | plan MB | peak RSS MB |"
        + (" experts owned (slots) | expert KB read, run | share of 1 process |" if moe else ""),
        "| --- " * (14 if moe else 11) + "|",
    ]
    for n, results in sorted(runs.items()):
        for r in results:
            share = r["bytes_per_token"] / one["bytes_per_token"] if one["bytes_per_token"] else float("nan")
            line = (
                f"| {n} | {r['rank']} | {'yes' if r['tokens'] == one['tokens'] else 'NO'} | "
                f"{r['bytes_per_token'] / 1e3:.1f} | {share:.3f} | {r['ms_per_token']:.1f} | "
                f"{r['io_ms']:.1f} | {r['all_sum_ms']:.2f} | "
                f"{r['all_sum_alone_us']['median'] if 'all_sum_alone_us' in r else 0:.0f} | "
                f"{r['plan_bytes'] / 1e6:.1f} | {r['peak_rss_bytes'] / 1e6:.0f} |"
            )
            if moe:
                ex, ex1 = r["experts"], one["experts"]
                line += (
                    f" {ex['owned']} ({ex['slots']}) | {ex['bytes_read'] / 1e3:.1f} | "
                    f"{ex['bytes_read'] / ex1['bytes_read'] if ex1['bytes_read'] else float('nan'):.3f} |"
                )
            lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="benchmarks/bench_distributed.py",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", help="flash folder or model folder (default: the bundled demo model)")
    ap.add_argument(
        "--ranks", type=int, default=2, help="local ranks to compare with one process (default 2)"
    )
    ap.add_argument("--max-tokens", type=int, default=32, help="greedy tokens to decode (default 32)")
    ap.add_argument("--mode", default="flash", choices=("flash", "hybrid", "naive"))
    ap.add_argument("--memory-budget", help="each rank's memory budget (default: no limit)")
    ap.add_argument("--threads", type=int, help="flash reader threads per rank")
    ap.add_argument(
        "--prompt-chars", type=int, default=DEFAULT_PROMPT_CHARS, help="prompt length in characters"
    )
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds a run may take")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return run_worker(args)
    if args.ranks < 2:
        ap.error("--ranks must be at least 2")
    out = Path(args.out)
    runs = {}
    for n in (1, args.ranks):
        t0 = time.perf_counter()
        runs[n] = launch(n, out / f"run-{n}", worker_args(args), timeout=args.timeout)
        print(f"{n} rank(s): {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores",
        "model": args.model or "demo",
        "mode": args.mode,
        "memory_budget": args.memory_budget,
        "runs": {str(n): r for n, r in runs.items()},
    }
    (out / "bench_distributed.json").write_text(json.dumps(result, indent=1))
    md = table(runs)
    (out / "bench_distributed.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

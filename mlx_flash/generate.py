"""python -m mlx_flash.generate: generate text with the FFN read from flash.

With no --model it runs the bundled demo model (converted to a flash folder on first use).
It streams the text, then says what was read from flash; --stats adds the memory plan and
where every millisecond of each token went. Under `mlx.launch -n N` every rank generates (each
reads its share of every FFN layer) and rank 0 alone prints: the text, and its own statistics.
"""

from __future__ import annotations

import argparse
import sys

from .budget import MODES, SELECTIONS
from .distributed import print_primary
from .errors import run_cli

DEFAULT_PROMPT = "The for statement"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options that choose and load a model, shared by the generate and chat CLIs."""
    p.add_argument(
        "--model", help="flash folder, model folder or Hugging Face repo id (default: the bundled demo model)"
    )
    p.add_argument(
        "--mode", choices=MODES, default="flash", help="flash (the paper's method, default), hybrid or naive"
    )
    p.add_argument(
        "--memory-budget",
        help="memory for the model: bytes, a size like 6GB, or a percentage like 50%% (default: no limit)",
    )
    p.add_argument("--window", type=int, help="tokens whose neurons stay cached (default 5)")
    p.add_argument(
        "--selection",
        choices=SELECTIONS,
        help="how active neurons are chosen (default: exact, or predictor when the folder has predictors and the budget cannot hold the exact selector)",
    )
    p.add_argument("--threads", type=int, help="flash reader threads")
    p.add_argument(
        "--context",
        type=int,
        help="most tokens a conversation or generation may hold: the KV cache is planned "
        "for it (default: 2048, or the model's maximum if smaller)",
    )
    p.add_argument(
        "--verify", action="store_true", help="check every checksum of the flash folder before loading"
    )
    p.add_argument(
        "--lookahead",
        action="store_true",
        help="read each next layer's guessed neurons while a layer computes (flash mode; exact stays exact)",
    )
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")


def load_from_args(args: argparse.Namespace):
    import mlx.core as mx

    from .api import load

    mx.random.seed(args.seed)
    return load(
        args.model,
        mode=args.mode,
        memory_budget=args.memory_budget,
        window=args.window,
        selection=args.selection,
        threads=args.threads,
        context=args.context,
        verify=args.verify,
        lookahead=getattr(args, "lookahead", False),
        verbose=getattr(args, "stats", False),
    )


def format_pass(i: int, r) -> str:
    return (
        f"{i:5d} {r.wall_ms:9.2f} {r.selection_ms:9.2f} {r.io_ms:9.2f} {r.reader_busy_ms:9.2f} {r.memory_ms:9.2f} "
        f"{r.compute_ms:9.2f} "
        f"{r.bytes_read / 1e3:10.1f} {r.reads:6d} {r.neurons_loaded:7d} {100 * r.window_hit_rate:6.1f}"
    )


PASS_HEADER = (
    f"{'token':>5s} {'total ms':>9s} {'select':>9s} {'I/O wait':>9s} {'reader':>9s} {'cache':>9s} {'compute':>9s} "
    f"{'KB read':>10s} {'reads':>6s} {'loaded':>7s} {'hit %':>6s}"
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlx_flash.generate", description=__doc__.splitlines()[0])
    add_model_arguments(p)
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the prompt (default {DEFAULT_PROMPT!r})")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--stats", action="store_true", help="print the memory plan and a per-token breakdown")
    args = p.parse_args(argv)

    from mlx_lm.sample_utils import make_sampler

    from .api import flash_stats, stream_generate

    model, tokenizer = load_from_args(args)
    say = print_primary  # under mlx.launch: rank 0 only
    say(args.prompt, end="", flush=True)
    for response in stream_generate(
        model, tokenizer, args.prompt, max_tokens=args.max_tokens, sampler=make_sampler(args.temp)
    ):
        say(response.text, end="", flush=True)
    say()
    records = model.flash.records
    summary = flash_stats(model)
    if args.stats:
        say(PASS_HEADER)
        for i, r in enumerate(records):
            if not r.is_prefill:
                say(format_pass(i, r))
    say("==========")
    say(summary.format())
    model.flash.close()
    return 0


def cli() -> None:
    """The `mlx-flash-generate` command: main() with errors as one line and an exit status."""
    sys.exit(run_cli(main, prog="mlx_flash.generate"))


if __name__ == "__main__":
    cli()

"""python -m mlx_flash.server: an OpenAI-compatible HTTP server for a model whose FFN is read from flash.

    python -m mlx_flash.server [--model PATH] [--host 127.0.0.1] [--port 8080] [--api-key KEY]

Endpoints: POST /v1/completions, POST /v1/chat/completions (with "stream": true as server-sent
events), GET /v1/models, GET /health. It is mlx-lm's server (its request handling and OpenAI
schemas, mlx_flash/mlx_lm_server.py) over a model loaded with mlx_flash.load, with every load
option of `python -m mlx_flash.generate`. The flash cache is one per model, so requests are
queued and answered one at a time. Each response's `usage` has a `flash` object: what that
request read from flash, its I/O wait and the cache hit rate. SIGTERM or Ctrl-C cancels the
running request, closes the flash reader and exits 0.

Under ``mlx.launch`` (the model's layers shared among the ranks, see distributed.py) only rank
0 listens and prints; every other rank loads its share and follows rank 0's requests token by
token (mlx_lm_server.GroupQueue), and stops when rank 0 stops (signals to it are ignored:
rank 0's SIGTERM stops the group).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from types import SimpleNamespace

from .distributed import is_primary
from .errors import MlxFlashError, run_cli
from .generate import add_model_arguments, load_from_args

PROG = "mlx_flash.server"


def say(message: str) -> None:
    """Every line the server prints goes through here (to stderr; rank 0's only, under mlx.launch)."""
    if is_primary():
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


class _SayHandler(logging.Handler):
    """mlx-lm's log records (warnings and errors) printed through `say`."""

    def emit(self, record: logging.LogRecord) -> None:
        say(f"{record.levelname.lower()}: {record.getMessage()}")


def _size(text: str) -> int:
    """Bytes from "0", "123" or a size like "1GB" (an argparse type)."""
    from .budget import parse_budget

    if text.strip() == "0":
        return 0
    try:
        if text.strip().endswith("%"):
            raise MlxFlashError("a percentage")
        return parse_budget(text, 0)
    except MlxFlashError:
        raise argparse.ArgumentTypeError(f"{text!r}: give bytes or a size like 512MB") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    add_model_arguments(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080; 0: a free one)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request (401 otherwise)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=512,
        help="max_tokens of a request that gives none (default 512, or what the context leaves)",
    )
    p.add_argument("--top-p", type=float, default=1.0, help="default nucleus sampling top_p (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="default top-k sampling (default 0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="default min-p sampling (default 0: off)")
    p.add_argument(
        "--prompt-cache-size",
        type=int,
        default=4,
        help="KV caches of earlier requests kept for reuse by a request that starts the same way (default 4)",
    )
    p.add_argument(
        "--prompt-cache-bytes",
        type=_size,
        help="most memory those KV caches may hold, outside the memory plan: bytes or a size like 1GB "
        "(default: one context's KV cache, as the plan reserves; 0: no reuse)",
    )
    p.add_argument(
        "--chat-template-args",
        type=json.loads,
        default={},
        help="JSON arguments for the chat template, e.g. '{\"enable_thinking\": false}'",
    )
    p.add_argument(
        "--allowed-origins", type=lambda s: s.split(","), default=["*"], help="CORS origins (default *)"
    )
    p.add_argument("--log-requests", action="store_true", help="print one line per HTTP request")
    args = p.parse_args(argv)
    if args.max_tokens < 1:
        p.error("--max-tokens must be at least 1")
    if args.prompt_cache_size < 0:
        p.error("--prompt-cache-size must be at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from mlx_lm.models.cache import LRUPromptCache

    from . import mlx_lm_server as glue
    from .api import resolve_flash_folder, runtime_of

    logging.basicConfig(level=logging.WARNING, handlers=[_SayHandler()], force=True)
    model_id = args.model or "mlx_flash-demo"
    cli_args = glue.mlx_lm_cli_args(
        model=model_id,
        max_tokens=args.max_tokens,
        temp=args.temp,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        chat_template_args=args.chat_template_args,
        allowed_origins=args.allowed_origins,
        prompt_cache_size=args.prompt_cache_size,
    )
    # Bind before the (possibly long) load: a port in use is an error at once.
    service = SimpleNamespace(
        say=say,
        api_key=args.api_key,
        log_requests=args.log_requests,
        model_id=model_id,
        created=int(time.time()),
    )
    primary = is_primary()
    httpd = glue.make_http_server(args.host, args.port, service) if primary else None
    folder = resolve_flash_folder(args.model)  # converts once, here, with progress; never downloads later
    args.model = str(folder)
    provider = glue.FlashModelProvider(
        cli_args, lambda: load_from_args(args), model_id, glue.model_names(model_id, folder, model_id), say
    )
    prompt_cache = LRUPromptCache(max_size=max(args.prompt_cache_size, 0))
    generator = glue.FlashResponseGenerator(provider, prompt_cache)  # its thread loads the model
    try:
        provider.ready.wait()
        if provider.error is not None:
            raise provider.error
        plan = runtime_of(provider.model).plan
        prompt_cache.max_bytes = plan.kv_bytes if args.prompt_cache_bytes is None else args.prompt_cache_bytes
        service.provider, service.generator, service.context = provider, generator, plan.context
        if not primary:  # rank 0's requests come through the generation thread; it ends when rank 0's does
            for s in (signal.SIGTERM, signal.SIGINT):
                signal.signal(s, signal.SIG_IGN)
            generator.join()
            return 0
        host, port = httpd.server_address[:2]
        stop = threading.Event()

        def on_signal(signum, frame):
            if not stop.is_set():
                stop.set()
                say(f"{signal.Signals(signum).name}: stopping")
                threading.Thread(target=httpd.shutdown, daemon=True).start()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        say(
            f"serving {model_id} ({plan.mode}, context {plan.context} tokens) on "
            f"http://{host if ':' not in host else f'[{host}]'}:{port}/v1"
            + (" (API key required)" if args.api_key else "")
        )
        try:
            httpd.serve_forever(poll_interval=0.2)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    finally:
        generator.cancel_all()
        generator.stop_and_join()  # the generation thread ends; the provider closes the reader
        if httpd is not None:
            httpd.server_close()  # waits for the responses being written
    say("stopped")
    return 0


def cli() -> None:
    """The `mlx-flash-server` command: main() with errors as one line and an exit status."""
    sys.exit(run_cli(main, prog=PROG))


if __name__ == "__main__":
    cli()

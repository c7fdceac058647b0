"""mlx-lm's OpenAI-compatible server driven by a flash model: the one module that relies on
`mlx_lm.server`'s internals.

`mlx_lm.server` (mlx-lm 0.32) has the HTTP handling and the OpenAI schemas (`APIHandler`), and
a generation thread that serves the queued requests one by one (`ResponseGenerator`), given a
*model provider* (an object with `model`, `tokenizer`, `draft_model`, `processor`,
`is_batchable`, `model_key`, `cli_args`, `load()`, `load_default()`, `reset()`). What is ours:

- `FlashModelProvider` loads the one model with `mlx_flash.load` (on the generation thread, so
  all MLX work stays on it) and never downloads: a request naming another model, an adapter or
  a draft model is refused with a 400, not looked up on the hub. Not batchable: the flash
  cache is one per model, so requests are queued and served one at a time.
- `FlashAPIHandler` adds the bearer-token check, validates what mlx-lm does not (messages,
  prompt, stop, the model's name, the prompt against the context), lists our model on
  `/v1/models` (mlx-lm's scans the Hugging Face cache), adds `usage.flash` (what the request
  read from flash) and ends a request quietly when its client has gone.
- `FlashResponseGenerator` tokenizes a request once, on the handler's thread (so that a prompt
  longer than the context is a 400 before it is queued), resets the flash statistics per
  request, and can cancel what is running when the server stops. Under `mlx.launch` it keeps
  the ranks in step (`GroupQueue`): only rank 0 serves HTTP; every other rank runs the same
  generation thread on rank 0's requests, so that the layers' all_sums meet.

The private parts of mlx-lm used here are listed in `MLX_LM_CONTRACT`; `check_contract()` (run
by tests/test_server.py) says what a new mlx-lm changed.
"""

from __future__ import annotations

import argparse
import copy
import hmac
import inspect
import json
import re
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote

import mlx.core as mx
import mlx_lm.server as mls
from mlx_lm.models.cache import LRUPromptCache

from . import distributed
from .errors import MlxFlashError, one_line

# What this module relies on in mlx_lm.server, name -> the parameters it must take. A test runs
# check_contract(): when mlx-lm renames or reshapes one of these, it fails and says which.
MLX_LM_CONTRACT: dict[str, tuple[str, ...]] = {
    "ResponseGenerator.__init__": ("model_provider", "prompt_cache"),
    "ResponseGenerator._generate": (),
    "ResponseGenerator._next_request": ("timeout",),
    "ResponseGenerator.join": (),
    "GenerationContext.stop": (),
    "Response.__init__": ("text", "token"),
    "ResponseGenerator._serve_single": ("request", "stream"),
    "ResponseGenerator._tokenize": ("tokenizer", "request", "args"),
    "ResponseGenerator.generate": ("request", "generation_args", "progress_callback"),
    "ResponseGenerator.stop_and_join": (),
    "APIHandler.__init__": ("response_generator",),
    "APIHandler.do_GET": (),
    "APIHandler.do_POST": (),
    "APIHandler.validate_model_parameters": (),
    "APIHandler.handle_text_completions": (),
    "APIHandler.handle_chat_completions": (),
    "APIHandler.handle_models_request": (),
    "APIHandler.generate_response": ("text", "finish_reason", "prompt_token_count", "completion_token_count"),
    "APIHandler.completion_usage_response": ("prompt_token_count", "completion_token_count"),
    "APIHandler._set_completion_headers": ("status_code",),
    "get_system_fingerprint": (),
}
# Attributes of the handler that APIHandler.do_POST sets before the request factories run.
HANDLER_ATTRIBUTES = (
    "body",
    "seed",
    "requested_model",
    "requested_draft_model",
    "adapter",
    "max_tokens",
    "stream",
    "chat_template_kwargs",
)

MAX_BODY_BYTES = 16 << 20


def check_contract() -> list[str]:
    """What in mlx_lm.server differs from what this module was written against (empty: nothing)."""
    problems = []
    for name, params in MLX_LM_CONTRACT.items():
        obj = mls
        try:
            for part in name.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            problems.append(f"mlx_lm.server.{name} is gone")
            continue
        have = inspect.signature(obj).parameters
        missing = [p for p in params if p not in have]
        if missing:
            problems.append(f"mlx_lm.server.{name} no longer takes {', '.join(missing)}")
    source = inspect.getsource(mls.APIHandler.do_POST)
    problems += [
        f"mlx_lm.server.APIHandler.do_POST no longer sets self.{a}"
        for a in HANDLER_ATTRIBUTES
        if f"self.{a} =" not in source
    ]
    if "self.model_provider.load(" not in inspect.getsource(mls.ResponseGenerator._generate):
        problems.append("mlx_lm.server.ResponseGenerator._generate no longer calls model_provider.load()")
    if "self._is_distributed =" not in inspect.getsource(mls.ResponseGenerator.__init__):
        problems.append("mlx_lm.server.ResponseGenerator.__init__ no longer sets self._is_distributed")
    serve = inspect.getsource(mls.ResponseGenerator._serve_single)
    if not re.search(r"rqueue\.put\(\s*Response\((.|\n)*?if ctx\._should_stop:", serve):
        problems.append(
            "mlx_lm.server.ResponseGenerator._serve_single no longer checks ctx._should_stop after putting a token"
        )
    return problems


# mlx_lm.server's own command-line defaults for the options this server does not offer
# (read by its ResponseGenerator and APIHandler from cli_args).
MLX_LM_DEFAULTS = dict(
    adapter_path=None,
    draft_model=None,
    num_draft_tokens=3,
    trust_remote_code=False,
    chat_template="",
    use_default_chat_template=False,
    decode_concurrency=1,
    prompt_concurrency=1,
    prefill_step_size=2048,
    kv_bits=None,
    kv_group_size=64,
    quantized_kv_start=mls.DEFAULT_QUANTIZED_KV_START,
    pipeline=False,
    chat_template_args={},
    allowed_origins=["*"],
    max_tokens=512,
    temp=0.0,
    top_p=1.0,
    top_k=0,
    min_p=0.0,
    prompt_cache_size=10,
    prompt_cache_bytes=None,
)


def mlx_lm_cli_args(**ours) -> argparse.Namespace:
    """The `cli_args` mlx_lm.server's classes read: its defaults, overridden by `ours`."""
    return argparse.Namespace(**{**MLX_LM_DEFAULTS, **ours})


class RequestRefused(ValueError):
    """A request this server will not serve (mlx-lm answers a ValueError here with a 400)."""


@dataclass
class FlashUsage:
    """What one request read from flash, filled on the generation thread when it ends."""

    done: threading.Event = field(default_factory=threading.Event)
    flash: dict | None = None

    def wait(self, timeout: float = 30.0) -> dict | None:
        self.done.wait(timeout)
        return self.flash


def flash_usage(model) -> dict:
    """The `usage.flash` object of a request: the flash statistics of the model since its last
    reset (one request): bytes read, reads, I/O wait, the cache hit rate, time per token."""
    from .api import flash_stats, runtime_of

    s = flash_stats(model)
    records = runtime_of(model).records
    return {
        "bytes_read": sum(r.bytes_read for r in records),
        "reads": sum(r.reads for r in records),
        "io_ms": round(sum(r.io_ms for r in records), 3),  # the tokens waited on reads
        "reader_busy_ms": round(sum(r.reader_busy_ms for r in records), 3),  # reads in flight
        "cache_hit_rate": round(s.window_hit_rate, 4),  # active neurons already in memory (decode)
        "decode_passes": s.decode_tokens,
        "ms_per_token": round(s.ms_per_token, 3),
        "prefill_tokens": s.prefill_tokens,
        "prefill_ms": round(s.prefill_ms, 3),
        "peak_memory_bytes": s.peak_memory_bytes,
        **s.extra,
    }


class FlashModelProvider:
    """mlx_lm.server's model provider for one model loaded with mlx_flash.load (never a download).

    `load_default()` runs on the generation thread (mlx-lm calls it first there); `ready` is set
    when it has finished, with `error` holding what went wrong, if anything."""

    def __init__(
        self, cli_args: argparse.Namespace, load: Callable[[], tuple], model_id: str, names: set[str], say
    ):
        self.cli_args = cli_args
        self.model_id = model_id
        self._load_model = load
        self.names = names  # model names a request may give for this model
        self.say = say
        self.model = None
        self.tokenizer = None
        self.draft_model = None
        self.processor = None
        self.is_batchable = False  # one flash cache per model: requests take turns
        self.model_key = None
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def load_default(self) -> None:
        try:
            self.model, self.tokenizer = self._load_model()
            self.model_key = (self.model_id, None, None)
        except BaseException as e:  # noqa: BLE001 - reported by the thread that waits on `ready`
            self.error = e
        finally:
            self.ready.set()

    def check(self, model: str, adapter: str | None = None, draft: str | None = "default_model") -> None:
        if model not in self.names:
            raise RequestRefused(
                f"this server serves one model, {self.model_id!r}; the request asked for {model!r} "
                "(GET /v1/models lists it)"
            )
        if adapter is not None:
            raise RequestRefused("adapters are not supported by mlx_flash.server")
        if draft not in (None, "default_model"):
            raise RequestRefused("draft models are not supported by mlx_flash.server")

    def load(self, model_path, adapter_path=None, draft_model_path=None):
        self.check(model_path, adapter_path, draft_model_path)
        if self.model is None:
            raise RequestRefused("the model is not loaded")
        return self.model, self.tokenizer

    def reset(self) -> None:
        """Called by mlx-lm on the generation thread as it ends: closes the flash reader."""
        if self.model is not None:
            from .api import runtime_of

            runtime_of(self.model).close()
            self.say("flash reader closed")
        self.model = self.tokenizer = None


class GroupContext(mls.GenerationContext):
    """A request's GenerationContext under mlx.launch: `stop()` (the handler's, or the server's
    when it stops) only asks; whether generation stops at a token is rank 0's answer, the
    same on every rank (set by `GroupQueue` as the token is put)."""

    stop_asked = False

    def stop(self):
        self.stop_asked = True


class GroupQueue:
    """A request's response queue under mlx.launch (the queue the generation thread puts the
    request's context, its tokens and its end on): on rank 0 it forwards to the handler's queue;
    on the others it drops everything. With each token it shares rank 0's stop: one all_sum
    per token, so that every rank ends the request at the same token, as it ends on rank 0
    (mlx-lm checks the context's stop right after putting the token)."""

    def __init__(self, queue, shard: distributed.Shard):
        self.queue, self.shard, self.ctx = queue, shard, None

    def put(self, item) -> None:
        if isinstance(item, mls.GenerationContext):
            item.__class__ = GroupContext
            self.ctx = item
        elif isinstance(item, mls.Response) and self.ctx is not None:
            self.ctx._should_stop = distributed.broadcast_flag(self.ctx.stop_asked, self.shard)
        if self.queue is not None:
            self.queue.put(item)


STOP_SERVING = "stop serving"  # rank 0 to the others: the server stops


class FlashResponseGenerator(mls.ResponseGenerator):
    """mlx-lm's generation thread, with per-request flash statistics and cancellation.

    Under mlx.launch every rank runs it; rank 0's requests reach the others here
    (`_next_request`: each poll of rank 0's queue is shared, as mlx-lm's own distributed mode
    does), then the stop of each request (`GroupQueue`) and the end of serving
    (`STOP_SERVING`). mlx-lm's own mode is kept off (`_is_distributed`): it cannot stop a
    request early."""

    @property
    def _is_distributed(self) -> bool:
        return False

    @_is_distributed.setter
    def _is_distributed(self, _value) -> None:  # mlx-lm's __init__ sets it: the group is ours
        pass

    def __init__(self, provider: FlashModelProvider, prompt_cache: LRUPromptCache):
        self._live: dict[int, weakref.ref] = {}  # the GenerationContexts of requests not yet finished
        self._live_lock = threading.Lock()
        self.stopping = False
        super().__init__(provider, prompt_cache)  # starts the generation thread

    # -- the handler's thread ---------------------------------------------------------------
    def tokenize(self, request: mls.CompletionRequest, chat_template_kwargs) -> None:
        """Tokenize on the caller's thread (no MLX work) and keep the result for the generation
        thread; it is read back by `_tokenize`."""
        args = SimpleNamespace(chat_template_kwargs=chat_template_kwargs)
        request.flash_tokens = super()._tokenize(self.model_provider.tokenizer, request, args)

    def generate(self, request, generation_args, progress_callback=None):
        if self.stopping:
            raise RuntimeError("the server is shutting down")
        ctx, responses = super().generate(request, generation_args, progress_callback)
        with self._live_lock:
            self._live = {k: r for k, r in self._live.items() if r() is not None}
            self._live[id(ctx)] = weakref.ref(ctx)
        return ctx, responses

    def cancel_all(self) -> None:
        """Stop the running request after its current token and refuse the queued ones."""
        self.stopping = True
        with self._live_lock:
            for ref in self._live.values():
                if (ctx := ref()) is not None:
                    ctx.stop()

    # -- the generation thread ----------------------------------------------------------------
    def _generate(self):
        shard = distributed.process_shard()
        try:
            if shard.size > 1:  # one random state on every rank: the same sampled tokens
                mx.random.seed(shard.all_sum(mx.random.state[0]).view(mx.uint64).item())
            super()._generate()
        finally:
            if shard.size > 1 and shard.primary:
                distributed.broadcast_object(STOP_SERVING, shard)
            mx.clear_streams()  # MLX 0.32 may abort at exit if a thread that used MLX leaves them

    def _next_request(self, timeout=None):
        """The next request (None: none yet), rank 0's on every rank of a group."""
        shard = distributed.process_shard()
        if shard.size == 1:
            return super()._next_request(timeout)
        request = super()._next_request(timeout) if shard.primary else None
        if shard.primary:
            shared = None if request is None else (_shareable(request[1]), request[2])
            distributed.broadcast_object(shared, shard)
            return None if request is None else (GroupQueue(request[0], shard), *request[1:])
        shared = distributed.broadcast_object(None, shard)
        if shared == STOP_SERVING:
            self._stop = True
            return None
        return None if shared is None else (GroupQueue(None, shard), *shared)

    def _tokenize(self, tokenizer, request, args):
        tokens = getattr(request, "flash_tokens", None)
        return tokens if tokens is not None else super()._tokenize(tokenizer, request, args)

    def _serve_single(self, request, stream):
        from .api import runtime_of

        rqueue, completion, args = request
        usage: FlashUsage | None = getattr(completion, "flash_usage", None)
        if distributed.broadcast_flag(self.stopping):  # rank 0's, on every rank of a group
            rqueue.put(RuntimeError("the server is shutting down"))
            return
        model = self.model_provider.model
        runtime = runtime_of(model)
        start = time.perf_counter()
        with runtime.lock:
            runtime.reset_stats()
            try:
                super()._serve_single(request, stream)
            finally:
                flash = flash_usage(model)
                if usage is not None:
                    usage.flash = flash
                    usage.done.set()
                prompt = getattr(completion, "flash_tokens", None)
                self.model_provider.say(
                    f"request: {len(prompt[0]) if prompt else '?'} prompt tokens, "
                    f"{flash['decode_passes']} decode passes (max_tokens {args.max_tokens}), "
                    f"{time.perf_counter() - start:.2f} s, {flash['bytes_read'] / 1e6:.1f} MB from flash"
                )


def _shareable(completion):
    """A request as sent to the other ranks: without what lives on rank 0 only (its usage slot)."""
    out = copy.copy(completion)
    out.__dict__.pop("flash_usage", None)
    return out


class FlashAPIHandler(mls.APIHandler):
    """mlx-lm's request handler with an API key, stricter validation, our /v1/models and
    `usage.flash`. `service` (set on a subclass by `make_handler`) holds the shared state."""

    service: SimpleNamespace
    timeout = 120  # seconds a socket read or write may block (a client that stopped reading)

    # -- plumbing -------------------------------------------------------------------------------
    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        if self.service.log_requests:
            self.service.say(f"{self.address_string()} {format % args}")

    def send_error_json(self, status: int, message: str, headers: dict | None = None) -> None:
        """An error as mlx-lm writes its own: status and {"error": message}."""
        body = json.dumps({"error": message}).encode()
        self._set_completion_headers(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def authorized(self) -> bool:
        key = self.service.api_key
        if key is None:
            return True
        given = self.headers.get("Authorization", "")
        if given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(), key.encode()):
            return True
        self.send_error_json(
            401, "a valid API key is required: Authorization: Bearer KEY", {"WWW-Authenticate": "Bearer"}
        )
        return False

    def end_headers(self):
        self._headers_sent = True
        super().end_headers()

    def _serve(self, method) -> None:
        self._headers_sent = False
        try:
            if self.authorized():
                method()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
            self.service.say(f"{self.address_string()} {self.command} {self.path}: the client went away")
        except Exception as e:  # a failure while generating (a flash read, a checksum): one line, a 500
            self.close_connection = True
            message = f"generation failed: {type(e).__name__}: {one_line(e)}"
            self.service.say(f"{self.address_string()} {self.command} {self.path}: {message}")
            try:
                if not self._headers_sent:
                    self._headers_buffer = []  # BaseHTTPRequestHandler's: drop a 200 not yet sent
                    self.send_error_json(500, message)
                elif getattr(self, "stream", False):  # mid-stream: an error event, then the end
                    self.wfile.write(f"data: {json.dumps({'error': message})}\n\n".encode())
                    self.wfile.flush()
            except OSError:
                pass

    def do_GET(self):
        self._serve(super().do_GET)

    def do_POST(self):
        length = self.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            if self.authorized():
                self.send_error_json(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB")
            self.close_connection = True
            return
        self._serve(super().do_POST)

    # -- validation (a ValueError raised here is answered by mlx-lm with a 400) ----------------
    def validate_model_parameters(self) -> None:
        super().validate_model_parameters()
        self.service.provider.check(self.requested_model, self.adapter, self.requested_draft_model)
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise RequestRefused("seed must be at least 0 and below 2**64")
        stop = self.body.get("stop")
        if not (
            stop is None
            or isinstance(stop, str)
            or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
        ):
            raise RequestRefused("stop must be a string or a list of strings")

    def handle_text_completions(self):
        prompt = self.body.get("prompt")
        if not isinstance(prompt, str):
            raise RequestRefused(
                "prompt must be a string" if "prompt" in self.body else "the request has no prompt"
            )
        return self._prepared(super().handle_text_completions())

    def handle_chat_completions(self):
        messages = self.body.get("messages")
        if messages is None:
            raise RequestRefused("the request has no messages")
        check_messages(messages)
        return self._prepared(super().handle_chat_completions())

    def _prepared(self, completion):
        """Tokenize `completion` and check it against the context (400 if it does not fit)."""
        self.service.generator.tokenize(completion, self.chat_template_kwargs)
        n = len(completion.flash_tokens[0])
        context = self.service.context
        if n == 0:
            raise RequestRefused("the prompt is empty")
        asked = "max_tokens" in self.body or "max_completion_tokens" in self.body
        if not asked:  # the server's default max_tokens: as much of it as the context leaves
            self.max_tokens = max(1, min(self.max_tokens, context - n))
        if n + self.max_tokens > context:
            raise RequestRefused(
                f"{n} prompt tokens plus max_tokens {self.max_tokens} exceed the context of {context} "
                "tokens this server was started with (--context)"
            )
        self._flash_usage = completion.flash_usage = FlashUsage()
        return completion

    # -- responses ------------------------------------------------------------------------------
    def _with_flash(self, response: dict) -> dict:
        usage = getattr(self, "_flash_usage", None)
        if "usage" in response and usage is not None:
            response["usage"]["flash"] = usage.wait()
        return response

    def generate_response(self, *args, **kwargs) -> dict:
        return self._with_flash(super().generate_response(*args, **kwargs))

    def completion_usage_response(self, *args, **kwargs) -> dict:
        return self._with_flash(super().completion_usage_response(*args, **kwargs))

    def handle_models_request(self):
        service = self.service
        entry = {
            "id": service.model_id,
            "object": "model",
            "created": service.created,
            "owned_by": "mlx_flash",
        }
        wanted = unquote(self.path.split("?")[0][len("/v1/models") :])
        wanted = wanted[1:] if wanted.startswith("/") else wanted
        if not wanted:
            body = {"object": "list", "data": [entry]}
        elif wanted in service.provider.names:
            body = entry
        else:
            self.send_error_json(404, f"no model {wanted!r} here; this server serves {service.model_id!r}")
            return
        data = json.dumps(body).encode()
        self._set_completion_headers(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()


def check_messages(messages) -> None:
    """Chat messages as this server takes them: a non-empty list of {role, content}, content a
    string, a list of text parts, or null (an assistant's tool calls). Images are refused."""
    if not isinstance(messages, list) or not messages:
        raise RequestRefused("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestRefused(f"messages[{i}] must be an object with a string role")
        content = m.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise RequestRefused(f"messages[{i}].content must be a string or a list of parts")
        for part in content:
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise RequestRefused(f"messages[{i}].content: only text parts are supported")


class FlashHTTPServer(ThreadingHTTPServer):
    """One thread per connection; `server_close()` waits for the running ones (each bounded by
    the handler's socket timeout), so that a response being written is finished at shutdown."""

    daemon_threads = False


def make_http_server(host: str, port: int, service: SimpleNamespace) -> FlashHTTPServer:
    """Bind (host, port) (IPv4 or IPv6, port 0: a free one) for a handler bound to `service`."""
    import socket

    try:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise MlxFlashError(f"cannot resolve --host {host!r}: {one_line(e)}") from None
    handler = type("BoundFlashAPIHandler", (FlashAPIHandler,), {"service": service})
    fingerprint = mls.get_system_fingerprint()

    def make(*args, **kwargs):
        return handler(service.generator, *args, system_fingerprint=fingerprint, **kwargs)

    server_class = type("FlashHTTPServerFamily", (FlashHTTPServer,), {"address_family": family})
    try:
        return server_class(address, make)
    except OSError as e:
        raise MlxFlashError(f"cannot listen on {host}:{port}: {e.strerror or one_line(e)}") from None


def model_names(model_arg: str | None, folder: Path | None, model_id: str) -> set[str]:
    """The names a request may give for the served model."""
    names = {"default_model", model_id}
    if model_arg:
        names.add(model_arg)
        p = Path(model_arg).expanduser()
        if p.exists():
            names.add(str(p.resolve()))
    if folder is not None:
        names.add(str(folder))
    return names

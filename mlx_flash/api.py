"""The Python API: load, generate, stream_generate (shaped like mlx-lm's, built on it).

    model, tokenizer = mlx_flash.load("path/to/model", memory_budget="50%")
    text = mlx_flash.generate(model, tokenizer, "Hello", max_tokens=64)
    print(mlx_flash.flash_stats(model).format())

The model returned is an mlx-lm model whose MLPs are FlashFFNs: `mlx_lm.generate` and
`mlx_lm.stream_generate` accept it as well; these wrappers add the flash statistics and make
generations on one model take turns.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import mlx.nn as nn

from . import layout
from .convert import check_source, conversion_lock, convert, resolve_source
from .distributed import is_primary
from .errors import MlxFlashError, closed_on_error, one_line
from .model import FlashOptions, load_flash_model
from .runtime import FlashRuntime
from .stats import StatsSummary

DEMO_SOURCE = Path(__file__).parent / "demo_model"


def cache_root() -> Path:
    """Where converted flash folders are kept ($MLX_FLASH_CACHE, or ~/.cache/mlx_flash)."""
    return Path(os.environ.get("MLX_FLASH_CACHE") or Path.home() / ".cache" / "mlx_flash")


def _converted_folder(source: Path, label: str) -> Path:
    """A flash folder converted once from `source` into the cache (keyed by its weights)."""
    check_source(source)  # a folder that cannot be converted fails here, before it is hashed
    h = hashlib.sha256()
    for f in sorted(source.glob("*.safetensors")) + [source / "config.json"]:
        h.update(f.name.encode())
        h.update(
            layout.file_digest(f).encode()
            if f.stat().st_size < (64 << 20)
            else str(f.stat().st_size).encode()
        )
    out = cache_root() / f"{label}-{h.hexdigest()[:12]}"
    # Under mlx.launch only rank 0 prints; asked before the lock: joining the group waits for
    # every rank, and the others may be waiting for this one's lock.
    loud = is_primary()
    with conversion_lock(out):  # another process (a rank beside this one) may be converting it
        if not layout.is_flash_folder(out):
            if loud:
                print(f"mlx_flash: converting {source} into the flash folder {out} (once)", file=sys.stderr)
            convert(source, out, overwrite=True, progress=loud)
    return out


def resolve_flash_folder(path: str | os.PathLike | None) -> Path:
    """A flash folder for `path`: itself if it is one; the bundled demo model when None; else
    a model folder or Hugging Face repo id converted once into the cache."""
    if path is None:
        return _converted_folder(DEMO_SOURCE, "demo")
    p = Path(path).expanduser()
    if p.is_dir() and layout.is_flash_folder(p):
        return p
    source = resolve_source(str(path))
    label = "".join(c if c.isalnum() or c in "-_." else "_" for c in source.name) or "model"
    return _converted_folder(source, label)


def load(
    path: str | os.PathLike | None = None,
    *,
    mode: str = "flash",
    memory_budget: int | float | str | None = None,
    window: int | None = None,
    selection: str | None = None,
    threads: int | None = None,
    context: int | None = None,
    verify: bool = False,
    lookahead: bool = False,
    expert_policy: str = "lru",
    overlap: bool = True,
    verbose: bool = False,
) -> tuple[nn.Module, object]:
    """Load a model with its FFN on flash; returns (model, tokenizer) like mlx_lm.load.

    mode: "flash" (selection + windowing + bundles, the paper's method), "hybrid" (the FFN
        neurons that fit the budget stay in memory, the rest are read every token) or "naive"
        (every token reads the whole FFN).
    memory_budget: bytes, "6GB", or "50%" of the model's in-memory size; None: no limit.
    window: tokens whose neurons stay cached (default 5). selection: "exact" (the resident
        gate / up projection computes the true active set) or "predictor" (the folder's
        low-rank predictors, trained with `python -m mlx_flash.predictors train`); default:
        "exact", or "predictor" when the folder has predictors and the budget cannot hold the
        exact selector.
    verify: check every checksum of the folder at load (one read of all of it), then check
        every neuron read afterwards against a crc32 of its row taken then, so that a file
        changed or corrupted after load is an error (FlashChecksumError), not wrong text.
        Without it, load checks what is cheap: the manifest, each shard's size and header, and
        config.json against them.
    lookahead: (flash mode) while a layer computes, read the next layer's neurons guessed from
        the residual stream after this layer's attention (its predictor or exact selector, see
        ffn.py), wasted reads capped at 25% of the rows read; exact selection stays exact (the
        guess only warms the cache).
        A mixture of experts: the next MoE layer's router on a guess of its input (the residual
        stream here plus the last token's step between the two layers) names the experts read
        ahead; the first MoE layer's router on the token's input plus the last token's
        attention step names its own, read while its attention runs.
    expert_policy: (mixtures of experts) the expert pools' eviction policy: "lru" (default),
        "lfu" (with aging), "pinned" (the hottest experts of each layer pinned), "naive" (no
        reuse: every token reads all its experts; a baseline).
    overlap: (mixtures of experts) a decoded token computes its resident experts while the
        missing ones are read (default on; off: a baseline).
    """
    from mlx_lm.utils import load_tokenizer

    folder = resolve_flash_folder(path)
    options = FlashOptions(
        mode=mode,
        memory_budget=memory_budget,
        window=window,
        selection=selection,
        threads=threads,
        context=context,
        verify=verify,
        lookahead=lookahead,
        expert_policy=expert_policy,
        overlap=overlap,
    )
    model, runtime = load_flash_model(folder, options)
    with closed_on_error(runtime):
        try:
            # Config files are data: no code from the folder runs (no remote code, no prompt asking).
            tokenizer = load_tokenizer(folder, tokenizer_config_extra={"trust_remote_code": False})
        except Exception as e:
            raise MlxFlashError(
                f"{folder}: cannot load the tokenizer ({type(e).__name__}: {one_line(e)})"
            ) from None
    model.flash = runtime
    if verbose and runtime.shard.primary:
        print(runtime.plan.describe(), file=sys.stderr)
    return model, tokenizer


def runtime_of(model: nn.Module) -> FlashRuntime:
    rt = getattr(model, "flash", None)
    if not isinstance(rt, FlashRuntime):
        raise MlxFlashError("this model was not loaded with mlx_flash.load")
    return rt


def flash_stats(model: nn.Module) -> StatsSummary:
    """Mean per-token breakdown (selection, I/O, cache, compute), bytes read, memory."""
    return runtime_of(model).stats()


class ContextLengthError(MlxFlashError):
    """The prompt and the tokens asked for do not fit the context the model was loaded for."""


def prompt_tokens(tokenizer, prompt):
    """The prompt as mlx_lm.stream_generate would tokenize it (an mx.array of token ids)."""
    import mlx.core as mx
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    if isinstance(prompt, mx.array):
        return prompt
    if isinstance(prompt, str):
        if not isinstance(tokenizer, TokenizerWrapper):
            tokenizer = TokenizerWrapper(tokenizer)
        add_special_tokens = tokenizer.bos_token is None or not prompt.startswith(tokenizer.bos_token)
        prompt = tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    return mx.array(prompt)


def stream_generate(model: nn.Module, tokenizer, prompt, max_tokens: int = 256, **kwargs) -> Iterator:
    """mlx_lm.stream_generate on a flash model; each response carries `flash`, the statistics
    of the last finished forward pass. Statistics restart with each call.

    Generations on one model take turns (the runtime's lock, held for the whole generation);
    `mlx_lm.stream_generate` called directly on the same model from several threads is safe
    too (each FlashFFN layer takes the lock), but its statistics are then mixed. An empty
    prompt, or a prompt (plus what a `prompt_cache` already holds) plus `max_tokens` longer
    than the context the model was loaded for, is a one-line MlxFlashError. (A thread of your
    own that generates should call `mx.clear_streams()` before it ends: MLX 0.32 otherwise may
    abort the process at exit.)"""
    import mlx_lm

    rt = runtime_of(model)
    if isinstance(prompt, str) and not prompt:
        raise MlxFlashError("the prompt is empty")
    prompt = prompt_tokens(tokenizer, prompt)
    if prompt.size == 0:
        raise MlxFlashError("the prompt is empty")
    cached = max((getattr(c, "offset", 0) or 0 for c in kwargs.get("prompt_cache") or ()), default=0)
    context = rt.plan.context
    wanted = cached + prompt.size + max(max_tokens, 0)
    if wanted > context:
        raise ContextLengthError(
            f"{prompt.size} prompt tokens"
            + (f" after {cached} cached ones" if cached else "")
            + (f" plus max_tokens {max_tokens}" if max_tokens > 0 else "")
            + f" exceed the context of {context} tokens the model was loaded for; "
            "shorten the prompt, lower max_tokens, or load the model with a larger context"
        )
    with rt.lock:
        rt.reset_stats()
        for n, response in enumerate(
            mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs)
        ):
            if max_tokens < 0 and cached + prompt.size + n >= context:
                raise ContextLengthError(
                    f"the generation reached the context of {context} tokens the model was loaded for"
                )
            response.flash = rt.records[-1] if rt.records else None
            yield response
        rt.end_pass()


def generate(
    model: nn.Module, tokenizer, prompt, max_tokens: int = 256, verbose: bool = False, **kwargs
) -> str:
    """Generate text; with verbose, stream it to stdout and print the flash statistics."""
    text = ""
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs):
        text += response.text
        if verbose:
            print(response.text, end="", flush=True)
    if verbose:
        print()
        print(flash_stats(model).format())
    return text

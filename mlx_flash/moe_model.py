"""Loading a mixture-of-experts flash folder: mlx-lm's model, its routed experts on flash.

The architecture's mlx-lm model is built (weights not evaluated); every routed-experts module
the manifest lists (`expert_convert.switch_modules`) gets its stacked parameters replaced by
the layer's expert pool (`experts.ExpertPool`, made quantized first where the experts are) and
is wrapped in a `switch.FlashSwitch`, before any weight is loaded: the dense weights then come
from ``dense.safetensors`` alone, through the model's own `sanitize` and quantization, as
mlx-lm loads a model. Slots per layer come from the budget planner (`budget.plan_experts`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from . import layout, vocab
from .budget import ExpertSizes, parse_budget, plan_experts
from .distributed import process_shard
from .errors import MlxFlashError, closed_on_error
from .expert_convert import switch_modules
from .experts import ExpertCache, ExpertPool
from .ffn import tap_input
from .reader import FlashReader
from .runtime import FlashRuntime
from .safetensors_file import read_header
from .stats import StatsSummary
from .switch import FlashSwitch

STAGE_BYTES = 64 << 20  # the staging buffer holds k experts, or as many as fit in this
EXPERT_LOOKAHEAD_START = 1.5  # experts read ahead per expert the layer missed last time, to begin with


class ExpertRuntime(FlashRuntime):
    """The runtime of an MoE model: the reader of its experts, the plan, the expert cache and
    the per-pass statistics (a FlashRuntime whose "layers" are the MoE layers)."""

    experts: ExpertCache
    switches: list[FlashSwitch]
    # look-ahead: experts read ahead per expert a layer missed on its last call, adapted per
    # layer by `count_lookahead` (the dense layers' rule: larger while the layer's waste is under
    # 80% of LOOKAHEAD_WASTE_CAP, smaller above)
    lookahead_start = EXPERT_LOOKAHEAD_START
    lookahead_max = 8.0

    def stats(self) -> StatsSummary:
        s = super().stats()
        s.extra.pop("window", None)
        s.extra["experts"] = self.experts.summary()
        s.extra["experts"]["owned"] = len(self.shard.experts(s.extra["experts"]["experts"]))  # this rank's
        return s

    def reset_stats(self) -> None:
        super().reset_stats()
        self.experts.reset_stats()


def experts_per_token(config: dict, model: nn.Module) -> int:
    """The router's k: config.json's, else the attribute of the model's MoE blocks."""
    for key in ("num_experts_per_tok", "moe_top_k", "top_k", "num_selected_experts", "moe_k"):
        v = config.get(key)
        if isinstance(v, int) and v > 0:
            return v
    raise layout.FlashFormatError(
        "config.json does not say how many experts each token uses (num_experts_per_tok)"
    )


def load_moe_model(folder: Path, manifest: layout.Manifest, options) -> tuple[nn.Module, ExpertRuntime]:
    from .model import (
        _config_int,
        _context,
        build_model_skeleton,
        compute_dtype_for,
        dense_weights,
        load_dense_weights,
        read_config,
    )

    if options.mode != "flash" or options.selection not in (None, "exact"):
        raise MlxFlashError(
            f"mode {options.mode!r} / selection {options.selection!r}: a mixture-of-experts model runs in flash "
            "mode, its router selecting the experts"
        )
    if options.verify:
        layout.verify_dense(folder, manifest)
    config = read_config(folder)
    if config.get("model_type") != manifest.model_type:
        raise layout.FlashFormatError(
            f"{folder}: config.json and {layout.MANIFEST_NAME} disagree on model_type; re-run mlx_flash.convert"
        )
    dtype = compute_dtype_for(manifest.dtype)
    model = build_model_skeleton(config)
    switches = {sw.path: sw for sw in switch_modules(model)}
    if sorted(switches) != sorted(e.module for e in manifest.experts):
        raise layout.FlashFormatError(
            f"{folder}: the model's routed experts ({len(switches)} modules) are not the {len(manifest.experts)} "
            f"MoE layers of {layout.MANIFEST_NAME}; re-run mlx_flash.convert"
        )
    k = experts_per_token(config, model)
    header, _ = read_header(folder / manifest.dense_file)
    header = {n: t for n, t in header.items() if not n.startswith("__padding")}
    dense_bytes = vocab.memory_bytes(header.values(), dtype.size)
    vocab_sizes, tables = vocab.vocab_sizes(
        model, header, manifest.hidden_size, dtype.size, config.get("vocab_size")
    )
    heads = _config_int(config, "num_attention_heads")
    kv_heads = _config_int(config, "num_key_value_heads", heads)
    head_dim = _config_int(
        config, "head_dim", getattr(model.args, "head_dim", None) or manifest.hidden_size // heads
    )
    first = manifest.experts[0]
    slot_bytes = ExpertPool.slot_bytes(first, dtype.size)
    sizes = ExpertSizes(
        dense_bytes=dense_bytes,
        kv_bytes_per_token=manifest.num_layers * 2 * kv_heads * head_dim * dtype.size,
        moe_layers=len(manifest.experts),
        num_experts=first.num_experts,
        experts_per_token=k,
        slot_bytes=slot_bytes,
        stage_experts=min(first.num_experts, max(k, STAGE_BYTES // first.expert_bytes)),
        stage_bytes=first.expert_bytes,
    )
    if k > first.num_experts:
        raise layout.FlashFormatError(f"{folder}: num_experts_per_tok {k} > {first.num_experts} experts")
    shard = options.shard or process_shard()
    owned = len(shard.experts(first.num_experts))
    if owned == 0:
        raise MlxFlashError(
            f"{shard.size} processes share {first.num_experts} experts a layer: rank {shard.rank} would own none; "
            "launch fewer processes"
        )
    if owned < first.num_experts:  # the plan is of this rank's memory: its own experts only
        sizes = replace(
            sizes,
            num_experts=owned,
            experts_per_token=min(k, owned),
            stage_experts=min(owned, sizes.stage_experts),
        )
    plan = plan_experts(
        sizes,
        budget_bytes=parse_budget(options.memory_budget, sizes.model_bytes),
        context=_context(config, options.context),
        vocab=vocab_sizes,
        auto_context=options.context is None,
    )
    view = manifest.expert_rows()
    reader = FlashReader(folder, view, threads=options.threads)
    with closed_on_error(reader):
        runtime = ExpertRuntime(view, reader, plan=plan, compute_dtype=dtype, shard=shard)
    with closed_on_error(runtime):
        cache = ExpertCache(
            manifest.experts,
            reader,
            plan.cache_capacity,
            plan.stream_bytes // first.expert_bytes,
            dtype,
            verify=options.verify,
            policy=options.expert_policy,
            submit=runtime.submit,
        )
        runtime.experts = cache
        runtime.switches = []
        for j, entry in enumerate(manifest.experts):
            inner = switches[entry.module].module
            _pool_parameters(inner, entry, cache.pools[j])
            runtime.switches.append(FlashSwitch(inner, j, cache, runtime))
            runtime.switches[-1].overlap = options.overlap
            vocab.set_module(model, entry.module, runtime.switches[-1])
        skip = vocab.install(model, folder, manifest.dense_file, tables, plan, runtime)
        load_dense_weights(
            model, config, dense_weights(folder, manifest, dtype), folder / manifest.dense_file, skip
        )
        if options.lookahead:
            residuals = [tap_residuals(model, e.module) for e in manifest.experts]
            for j, (a, b) in enumerate(zip(manifest.experts, manifest.experts[1:])):
                runtime.switches[j].residuals = residuals[j]
                runtime.switches[j].guess = next_router(
                    model, a.module, b.module, b.num_experts, residuals[j], residuals[j + 1]
                )
            runtime.switches[-1].residuals = residuals[-1]
            guess_first_layer(model, manifest.experts[0], runtime.switches[0], residuals[0], runtime, k)
        vocab.plan_kv_cache(model, plan.context)
    model.eval()
    return model, runtime


def _pool_parameters(inner: nn.Module, entry: layout.ExpertLayer, pool: ExpertPool) -> None:
    """Make `inner`'s stacked parameters the pool's buffers (quantized projections first where
    the experts are quantized); its parameters must be exactly the bundle's fields."""
    from mlx_lm.models.switch_layers import SwitchLinear

    if entry.bits:
        for name, child in list(inner.children().items()):
            if isinstance(child, SwitchLinear):
                setattr(inner, name, child.to_quantized(group_size=entry.group_size, bits=entry.bits))
    have = {n for n, _ in tree_flatten(inner.parameters())}
    want = {f.name for f in entry.fields}
    if have != want:
        raise layout.FlashFormatError(
            f"{entry.module}: the module's parameters {sorted(have)} are not the experts' fields {sorted(want)} "
            "on flash; re-run mlx_flash.convert"
        )
    inner.update(tree_unflatten(list(pool.buffers.items())))


class Residuals:
    """The residual stream at an MoE layer's input as its norm is given it (`tap_residuals`):
    `now`, this call's (until the layer's FlashSwitch has made its guess), and `last`, the last
    token's of the call before."""

    def __init__(self) -> None:
        self.plain_norm: Callable[[mx.array], mx.array] | None = None  # the norm's own call, untapped
        self.now: mx.array | None = None
        self.last: mx.array | None = None

    def record(self, h: mx.array) -> None:
        self.now = h

    def roll(self) -> None:
        if self.now is not None:
            self.last, self.now = self.now.reshape(-1, self.now.shape[-1])[-1:], None


def _decoder_norm(model: nn.Module, path: str) -> nn.Module | None:
    """The `post_attention_layernorm` of the decoder layer whose MoE block holds the switch
    module at `path` (mlx-lm's pre-norm MoE families), or None."""
    block = path.rsplit(".", 1)[0]
    norm = getattr(_get_module(model, block.rsplit(".", 1)[0]), "post_attention_layernorm", None)
    return norm if isinstance(norm, nn.Module) else None


def tap_residuals(model: nn.Module, path: str) -> Residuals | None:
    """For look-ahead: the `Residuals` the norm in front of the MoE block of the switch at `path`
    records as it normalises (its outputs unchanged: `ffn.tap_input`); None without such a norm."""
    norm = _decoder_norm(model, path)
    if norm is None:
        return None
    r = Residuals()
    r.plain_norm = functools.partial(tap_input(norm, r.record), norm)
    return r


def next_router(
    model: nn.Module,
    here: str,
    there: str,
    num_experts: int,
    here_residuals: Residuals | None = None,
    there_residuals: Residuals | None = None,
):
    """The look-ahead's guess for MoE layer `there` from the input of MoE layer `here` (paths of
    their switch modules): `there`'s router on what its input will be, guessed as the dense
    look-ahead guesses (ffn.FlashFFN._guess_input): the residual stream `here` sees plus what the
    last token added to it between the two (`here`'s MoE block and `there`'s attention), through
    `there`'s norm. Without the residuals (no taps, the first decoded token): the router on
    `here`'s input renormalised for `there` (a pre-norm block's MoE input is rmsnorm(h) * g, so
    rmsnorm(h) * g' is the input times g' / g). On the tiny-moe preset's held-out text the
    residual guess's top 8 hold 76-82% of the next layer's experts, the renormalised input's
    29-52%. None when `there` has no router (no look-ahead for the layer)."""
    router = _router(model, there, num_experts)
    if router is None:
        return None
    g_here, g_there = (getattr(_decoder_norm(model, p), "weight", None) for p in (here, there))
    if g_here is None or g_there is None:
        fallback = router
    else:
        ratio = mx.where(mx.abs(g_here) > 1e-6, g_there / g_here, g_there)
        fallback = lambda x: router(x * ratio.astype(x.dtype))  # noqa: E731
    if here_residuals is None or there_residuals is None:
        return fallback

    def guess(x: mx.array) -> mx.array:
        h, last, nxt = here_residuals.now, here_residuals.last, there_residuals.last
        if h is None or last is None or nxt is None:
            return fallback(x)
        est = h.reshape(-1, h.shape[-1])[-1:] + (nxt - last)
        return router(there_residuals.plain_norm(est).astype(x.dtype))

    return guess


def guess_first_layer(
    model: nn.Module,
    entry: layout.ExpertLayer,
    switch: FlashSwitch,
    residuals: Residuals | None,
    runtime: FlashRuntime,
    k: int,
) -> None:
    """Look-ahead for the first MoE layer, which no layer before it guesses: when a decoded
    token enters the decoder layer that holds it (its `input_layernorm`, tapped), that layer's
    router scores the guess of its MoE input the others get (`next_router`: this input plus what
    the last token's attention added to it, through the MoE block's norm), and the switch of
    `entry` reads its likeliest experts (`k` routed) while the layer's attention computes.
    Nothing is tapped where the layer has no such norm or router."""
    norm = getattr(_get_module(model, entry.module.rsplit(".", 2)[0]), "input_layernorm", None)
    router = _router(model, entry.module, entry.num_experts)
    if not isinstance(norm, nn.Module) or router is None or residuals is None:
        return
    entered: list[mx.array] = []  # the last token's input to the layer

    def record(h: mx.array) -> None:
        rows = h.reshape(-1, h.shape[-1])
        if rows.shape[0] == 1 and entered and residuals.last is not None:
            with runtime.lock:
                t0 = time.perf_counter()
                logits = router(residuals.plain_norm(rows + (residuals.last - entered[0])).astype(h.dtype))
                mx.eval(logits)
                runtime.add_time("selection", time.perf_counter() - t0)
                switch.prefetch(logits, k)
        entered[:] = [rows[-1:]]

    tap_input(norm, record)


def _router(model: nn.Module, path: str, num_experts: int) -> nn.Module | None:
    """The router of the MoE block holding the switch module at `path`: its linear layer with
    one output per expert, or None."""
    router = None
    for child in _get_module(model, path.rsplit(".", 1)[0]).children().values():
        if isinstance(child, (nn.Linear, nn.QuantizedLinear)) and child.weight.shape[0] == num_experts:
            router = child
    return router


def _get_module(model: nn.Module, path: str) -> object:
    node: object = model
    for p in path.split("."):
        node = node[int(p)] if isinstance(node, list) else getattr(node, p)
    return node

"""Memory budget planning: what stays in memory, and how many neurons each layer may cache.

The plan adds up, in the dtype weights are computed in:
- the dense part (embeddings, attention, norms, lm_head, FFN biases): always resident;
- the KV cache for the context the user asks for, as mlx-lm's caches allocate it (in steps:
  `kv_step` sets the step so that a context of 385 tokens holds 386, where mlx-lm's own step of
  `KV_STEP` tokens would hold 512);
- a streaming buffer: when a layer is streamed (naive and hybrid decoding, prefill, a token
  whose active set overflows the cache) blocks of neurons are read into two MLX buffers kept
  for the model's life (the block computed on and the next one being read), plus one block of
  headroom for what is computed from them: three blocks (a prefill seeds the neuron cache by
  writing the rows it needs straight from the blocks into the cache's own rows);
- per mode: `naive` nothing more; `hybrid` the first neurons of every layer that fit;
  `flash` the exact selector (gate or up projection) when selection is "exact", the predictors,
  and a neuron cache per layer with the capacity that is left.
A budget smaller than the fixed part is a one-line BudgetError naming the minimum.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import MlxFlashError

MODES = ("naive", "hybrid", "flash")
SELECTIONS = ("exact", "predictor")
STREAM_BLOCK_NEURONS = 4096  # at most this many neurons per block when a layer is streamed
KV_STEP = 256  # mlx-lm's KVCache grows in steps of this many tokens (mlx_lm.models.cache.KVCache.step)
STREAM_BUFFERS = 3  # blocks of memory streaming may use (see the module docstring)


def stream_block_neurons(num_neurons: int) -> int:
    """Neurons per streamed block: at least 8 blocks a layer (so reading the next overlaps
    computing this one), at most STREAM_BLOCK_NEURONS (so the buffer stays small)."""
    return max(1, min(STREAM_BLOCK_NEURONS, -(-num_neurons // 8)))


def kv_step(context: int) -> int:
    """The step a flash model's KV caches grow by (`model.plan_kv_cache` sets it): the context
    cut into as few equal steps of at most mlx-lm's KV_STEP as it takes, so the cache reserves
    at most a token a step more than the context (385 tokens: two steps of 193, not 512 slots)."""
    context = max(1, context)
    return -(-context // -(-context // KV_STEP))


def kv_tokens(context: int) -> int:
    """Token slots the KV cache holds for `context` tokens: whole steps of `kv_step`."""
    step = kv_step(context)
    return -(-max(context, 1) // step) * step


MIN_AUTO_CONTEXT = 32  # the shortest context a budget may shrink the default context to


@dataclass(frozen=True)
class VocabSizes:
    """The vocabulary tables the planner may leave on flash (`vocab.py`), bytes in memory."""

    embed_bytes: int = 0  # the token embedding table (0: stays resident)
    head_bytes: int = 0  # an untied lm_head (0: none, or stays resident)
    tied: bool = False  # the head is the embedding table (`as_linear`): on flash together
    embed_stream_bytes: int = 0  # buffers of streaming the embedding table (a tied head)
    head_stream_bytes: int = 0  # buffers of streaming the untied head

    def steps(self) -> list[tuple[bool, bool]]:
        """(embedding on flash, head on flash), cheapest first: all resident; the embedding
        table read by rows (untied); then the head streamed too."""
        out = [(False, False)]
        if self.embed_bytes and not self.tied:
            out.append((True, False))
        if self.head_bytes or (self.tied and self.embed_bytes):
            out.append((bool(self.embed_bytes), True))
        return out

    def moved(self, step: tuple[bool, bool]) -> int:
        """Resident bytes a step leaves on flash."""
        embed, head = step
        if self.tied:
            return self.embed_bytes if head else 0
        return (self.embed_bytes if embed else 0) + (self.head_bytes if head else 0)

    def buffers(self, step: tuple[bool, bool]) -> int:
        """Memory the step's streaming needs."""
        if not step[1]:
            return 0
        return self.embed_stream_bytes if self.tied else self.head_stream_bytes

    def saved(self, step: tuple[bool, bool]) -> int:
        return self.moved(step) - self.buffers(step)


@dataclass(frozen=True)
class Fit:
    """What `fit_budget` chose: the vocabulary tables on flash and the context reserved."""

    embed_on_flash: bool
    head_on_flash: bool
    context: int
    moved: int  # resident bytes left on flash
    buffers: int  # memory of streaming them

    def plan_fields(self) -> dict:
        """MemoryPlan's fields of this fit."""
        return dict(
            embed_on_flash=self.embed_on_flash,
            head_on_flash=self.head_on_flash,
            vocab_stream_bytes=self.buffers,
            vocab_flash_bytes=self.moved,
            context=self.context,
        )


def fit_budget(
    budget: int | None,
    *,
    fixed: int,
    kv_per_token: int,
    minimum: int,
    full: int,
    vocab: VocabSizes,
    context: int,
    auto_context: bool,
) -> Fit | None:
    """The cheapest way to hold `fixed` bytes (the resident part with every vocabulary table in
    memory, without the KV cache), the KV cache, and `minimum` bytes of cache (the most useful
    extra being up to `full`), tried in this order: everything resident (all of `full` if it
    fits, else `minimum`); the embedding table read by rows (a row a token); a shorter context, down to one
    KV step (only if the caller did not ask for a context); the lm_head streamed too (the whole
    table every forward pass) with the whole context; then shorter, down to MIN_AUTO_CONTEXT.
    None: nothing fits (see `smallest_budget`)."""
    steps = vocab.steps()

    def need(step, ctx: int, extra: int) -> int:
        return fixed - vocab.saved(step) + kv_per_token * kv_tokens(ctx) + extra

    def fit(step, ctx: int) -> Fit:
        return Fit(step[0], step[1], ctx, vocab.moved(step), vocab.buffers(step))

    def shorter(step, floor: int) -> Fit | None:
        """`step` with the longest context down to `floor` that fits."""
        if not auto_context or not kv_per_token:
            return None
        room = min(context, (budget - (fixed - vocab.saved(step) + minimum)) // kv_per_token)
        ctx = room // KV_STEP * KV_STEP if room >= KV_STEP else room
        return fit(step, ctx) if ctx >= min(floor, context) else None

    if budget is None or need(steps[0], context, full) <= budget:
        return fit(steps[0], context)
    resident = [s for s in steps if not s[1]]
    for step in resident:
        if need(step, context, minimum) <= budget:
            return fit(step, context)
    found = shorter(resident[-1], KV_STEP)
    if found is not None:
        return found
    if steps[-1][1] and need(steps[-1], context, minimum) <= budget:  # the head streamed too
        return fit(steps[-1], context)
    return shorter(steps[-1], MIN_AUTO_CONTEXT)


def smallest_budget(
    *, fixed: int, kv_per_token: int, minimum: int, vocab: VocabSizes, context: int, auto_context: bool
) -> tuple[int, int, Fit]:
    """The smallest budget `fit_budget` accepts: (bytes, the context it reserves, the fit)."""
    step = vocab.steps()[-1]
    ctx = min(MIN_AUTO_CONTEXT, context) if auto_context else context
    f = Fit(step[0], step[1], ctx, vocab.moved(step), vocab.buffers(step))
    return fixed - f.moved + f.buffers + kv_per_token * kv_tokens(ctx) + minimum, ctx, f


class BudgetError(MlxFlashError):
    """The memory budget cannot hold what the chosen mode needs."""


_UNITS = {
    "": 1,
    "B": 1,
    "K": 1 << 10,
    "KB": 1 << 10,
    "KIB": 1 << 10,
    "M": 1 << 20,
    "MB": 1 << 20,
    "MIB": 1 << 20,
    "G": 1 << 30,
    "GB": 1 << 30,
    "GIB": 1 << 30,
    "T": 1 << 40,
    "TB": 1 << 40,
    "TIB": 1 << 40,
}


def fmt_bytes(n: float) -> str:
    """A byte count for people: 512 B, 16.8 KB, 2.1 MB, 6.40 GB (powers of 1000)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GB" else f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def parse_budget(budget: int | float | str | None, model_bytes: int) -> int | None:
    """Bytes from 123, "6GB", "512MiB", or "50%" (of the model's in-memory size)."""
    if budget is None:
        return None
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        if budget <= 0:
            raise BudgetError(f"memory budget must be positive, got {budget}")
        return int(budget)
    text = str(budget).strip().upper().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)(%|[KMGT]?I?B?)", text)
    if not m or (m.group(2) not in _UNITS and m.group(2) != "%"):
        raise BudgetError(
            f"cannot read memory budget {budget!r}: use bytes, a size like 6GB or 512MB, or a percentage like 50%"
        )
    value = float(m.group(1))
    nbytes = value / 100 * model_bytes if m.group(2) == "%" else value * _UNITS[m.group(2)]
    if nbytes <= 0:
        raise BudgetError(f"memory budget must be positive, got {budget!r}")
    return int(nbytes)


@dataclass(frozen=True)
class ModelSizes:
    """What the planner needs to know of a model, in elements."""

    dense_elems: int  # every resident weight that is not an FFN neuron
    num_layers: int
    num_neurons: int  # per layer
    hidden_size: int
    num_parts: int  # neuron-indexed parts per neuron (3 gated, 2 two-matrix)
    kv_elems_per_token: int  # keys + values of all layers for one token
    predictor_elems: int = 0  # all layers' predictors' float numbers (held in the compute dtype)
    predictor_packed_bytes: int = 0  # and their 8-bit factors' packed bytes
    # Quantized models give their sizes in bytes (0: elements times the compute dtype's size):
    dense_bytes: int = 0  # the dense weights in memory (packed weights, scales, ...)
    neuron_bytes: int = 0  # one neuron of one layer, all parts, as the cache holds it
    selector_neuron_bytes: int = 0  # one neuron's row of the exact selector

    @property
    def neuron_elems(self) -> int:
        return self.num_parts * self.hidden_size

    @property
    def ffn_elems(self) -> int:
        return self.num_layers * self.num_neurons * self.neuron_elems

    def dense_bytes_for(self, dtype_bytes: int) -> int:
        return self.dense_bytes or self.dense_elems * dtype_bytes

    def neuron_bytes_for(self, dtype_bytes: int) -> int:
        return self.neuron_bytes or self.neuron_elems * dtype_bytes

    def model_bytes(self, dtype_bytes: int) -> int:
        return self.dense_bytes_for(dtype_bytes) + self.num_layers * self.num_neurons * self.neuron_bytes_for(
            dtype_bytes
        )


@dataclass(frozen=True)
class MemoryPlan:
    mode: str
    budget_bytes: int | None
    dtype_bytes: int
    dense_bytes: int
    kv_bytes: int
    stream_bytes: int
    selector_bytes: int
    predictor_bytes: int
    resident_neurons: int  # hybrid: neurons per layer kept in memory
    cache_capacity: int  # flash: neuron slots per layer
    context: int

    @property
    def resident_bytes(self) -> int:
        return self.resident_neurons * self.neuron_bytes_all_layers

    @property
    def cache_bytes(self) -> int:
        return self.cache_capacity * self.neuron_bytes_all_layers

    @property
    def total_bytes(self) -> int:
        return (
            self.dense_bytes
            + self.kv_bytes
            + self.stream_bytes
            + self.selector_bytes
            + self.predictor_bytes
            + self.resident_bytes
            + self.cache_bytes
            + self.vocab_stream_bytes
        )

    neuron_bytes_all_layers: int = 0
    cache_label: str = ""  # what the cache rows are, when not neurons ("experts of 128")
    embed_on_flash: bool = False  # the token embedding table is read from flash by rows
    head_on_flash: bool = False  # the lm_head (or the tied table) is streamed from flash
    vocab_stream_bytes: int = 0  # the buffers of streaming it
    vocab_flash_bytes: int = 0  # resident bytes the vocabulary tables on flash would take

    def describe(self) -> str:
        rows = [
            ("dense weights", self.dense_bytes),
            (f"KV cache ({self.context} tokens)", self.kv_bytes),
            ("streaming buffer", self.stream_bytes),
        ]
        if self.embed_on_flash or self.head_on_flash:
            what = " and ".join(
                w for w, on in (("embeddings", self.embed_on_flash), ("lm_head", self.head_on_flash)) if on
            )
            rows.append(
                (f"{what} on flash ({fmt_bytes(self.vocab_flash_bytes)}): buffers", self.vocab_stream_bytes)
            )
        if self.selector_bytes:
            rows.append(("exact selector", self.selector_bytes))
        if self.predictor_bytes:
            rows.append(("predictors", self.predictor_bytes))
        if self.mode == "hybrid":
            rows.append((f"resident FFN ({self.resident_neurons} neurons/layer)", self.resident_bytes))
        if self.mode == "flash" and self.cache_label:
            rows.append((f"expert pools ({self.cache_capacity} {self.cache_label}/layer)", self.cache_bytes))
        elif self.mode == "flash":
            rows.append((f"neuron caches ({self.cache_capacity} slots/layer)", self.cache_bytes))
        budget = "unlimited" if self.budget_bytes is None else fmt_bytes(self.budget_bytes)
        lines = [f"memory plan ({self.mode}, budget {budget}):"]
        lines += [f"  {name:<42s} {fmt_bytes(b):>10s}" for name, b in rows]
        lines.append(f"  {'total':<42s} {fmt_bytes(self.total_bytes):>10s}")
        return "\n".join(lines)


def plan_memory(
    sizes: ModelSizes,
    *,
    mode: str,
    budget_bytes: int | None,
    dtype_bytes: int,
    context: int,
    selection: str = "exact",
    min_cache_neurons: int = 1,
    vocab: VocabSizes = VocabSizes(),
    auto_context: bool = False,
) -> MemoryPlan:
    """Split the budget (`fit_budget` chooses what of the vocabulary tables stays on flash, and
    with `auto_context` the context). Raises BudgetError when the fixed part alone does not fit."""
    if mode not in MODES:
        raise BudgetError(f"unknown mode {mode!r} (choose one of {', '.join(MODES)})")
    if selection not in SELECTIONS:
        raise BudgetError(f"unknown selection {selection!r} (choose one of {', '.join(SELECTIONS)})")
    b = dtype_bytes
    per_neuron_layer = sizes.neuron_bytes_for(b)  # one neuron, one layer
    per_neuron_all = per_neuron_layer * sizes.num_layers
    fixed = {
        "dense": sizes.dense_bytes_for(b),
        "stream": STREAM_BUFFERS * stream_block_neurons(sizes.num_neurons) * per_neuron_layer,
        "selector": 0,
        "predictor": 0,
    }
    if mode == "flash" and selection == "exact":
        fixed["selector"] = (
            sizes.num_layers * sizes.num_neurons * (sizes.selector_neuron_bytes or sizes.hidden_size * b)
        )
    if mode == "flash" and selection == "predictor":
        fixed["predictor"] = sizes.predictor_elems * b + sizes.predictor_packed_bytes
    n = sizes.num_neurons
    extra = {
        "naive": (0, 0),
        "hybrid": (0, n * per_neuron_all),
        "flash": (min_cache_neurons * per_neuron_all, n * per_neuron_all),
    }[mode]
    kv_per_token = sizes.kv_elems_per_token * b
    shape = dict(fixed=sum(fixed.values()), kv_per_token=kv_per_token, minimum=extra[0], vocab=vocab)
    fit = fit_budget(budget_bytes, full=extra[1], context=context, auto_context=auto_context, **shape)
    if fit is None:
        need, ctx, f = smallest_budget(context=context, auto_context=auto_context, **shape)
        raise BudgetError(
            f"memory budget {fmt_bytes(budget_bytes)} is too small for mode {mode}: it needs at least "
            f"{fmt_bytes(need)} (dense weights {fmt_bytes(fixed['dense'] - f.moved)}"
            + _vocab_note(f)
            + f", KV cache {fmt_bytes(kv_per_token * kv_tokens(ctx))} for {ctx} tokens, streaming buffer "
            f"{fmt_bytes(fixed['stream'])}"
            + (f", exact selector {fmt_bytes(fixed['selector'])}" if fixed["selector"] else "")
            + (f", predictors {fmt_bytes(fixed['predictor'])}" if fixed["predictor"] else "")
            + f"); pass memory_budget >= {need}"
        )
    kv = kv_per_token * kv_tokens(fit.context)
    if budget_bytes is None:
        resident = capacity = n
    else:
        spare = budget_bytes - (sum(fixed.values()) - fit.moved + fit.buffers + kv)
        resident = capacity = min(n, spare // per_neuron_all)
    if mode != "hybrid":
        resident = 0
    if mode != "flash":
        capacity = 0
    if mode == "hybrid" and resident == n:
        fixed["stream"] = 0  # nothing left to stream
    return MemoryPlan(
        mode=mode,
        budget_bytes=budget_bytes,
        dtype_bytes=b,
        dense_bytes=fixed["dense"] - fit.moved,
        kv_bytes=kv,
        stream_bytes=fixed["stream"],
        selector_bytes=fixed["selector"],
        predictor_bytes=fixed["predictor"],
        resident_neurons=int(resident),
        cache_capacity=int(capacity),
        neuron_bytes_all_layers=per_neuron_all,
        **fit.plan_fields(),
    )


def _vocab_note(f: Fit) -> str:
    """What a budget error's breakdown says of the vocabulary tables on flash."""
    if not f.moved:
        return ""
    return f" with the vocabulary tables on flash ({fmt_bytes(f.moved)}; streaming buffers {fmt_bytes(f.buffers)})"


def plan_with_selection(
    sizes: ModelSizes,
    *,
    mode: str,
    budget_bytes: int | None,
    dtype_bytes: int,
    context: int,
    selection: str | None,
    has_predictors: bool,
    **kw,
) -> tuple[MemoryPlan, str]:
    """`plan_memory` (`kw`: its vocab and auto_context) and the selection it was made for.
    With `selection` None: "exact", unless the mode is flash, the folder has predictors
    (`sizes.predictor_elems`) and the budget cannot hold the exact selector with the rest
    resident; then "predictor" (whose bytes are then planned); only if neither fits so, the
    vocabulary tables and the context give way, for "exact" first."""
    kw.update(mode=mode, budget_bytes=budget_bytes, dtype_bytes=dtype_bytes, context=context)
    if selection is not None or mode != "flash" or not has_predictors:
        selection = selection or "exact"
        return plan_memory(sizes, selection=selection, **kw), selection
    # The predictors before any vocabulary table goes to flash or the context shortens.
    everything = dict(kw, vocab=VocabSizes(), auto_context=False)
    for options in (everything, kw):
        for selection in SELECTIONS:
            try:
                return plan_memory(sizes, selection=selection, **options), selection
            except BudgetError as e:
                error = e
    raise error


@dataclass(frozen=True)
class ExpertSizes:
    """What the planner needs to know of an MoE model, in bytes as held in memory."""

    dense_bytes: int  # everything resident: attention, embeddings, routers, shared experts, dense FFNs
    kv_bytes_per_token: int
    moe_layers: int
    num_experts: int  # per MoE layer
    experts_per_token: int  # the router's k
    slot_bytes: int  # one expert of one layer in its pool
    stage_experts: int  # rows of the staging buffer the reads land in, at most (k at least)
    stage_bytes: int = 0  # one row of the staging buffer: an expert's bundle as stored (0: slot_bytes)

    def __post_init__(self):
        if not self.stage_bytes:
            object.__setattr__(self, "stage_bytes", self.slot_bytes)

    @property
    def model_bytes(self) -> int:
        return self.dense_bytes + self.moe_layers * self.num_experts * self.slot_bytes


def plan_experts(
    sizes: ExpertSizes,
    *,
    budget_bytes: int | None,
    context: int,
    vocab: VocabSizes = VocabSizes(),
    auto_context: bool = False,
) -> MemoryPlan:
    """The MoE plan: dense weights, KV cache, staging buffer, and per MoE layer a pool of as many
    expert slots as fit (all experts without a budget; at least k, else a BudgetError naming
    the smallest budget that works); `fit_budget` chooses what of the vocabulary tables stays
    on flash, and with `auto_context` the context."""
    per_slot = sizes.slot_bytes * sizes.moe_layers
    k, n = sizes.experts_per_token, sizes.num_experts
    kv_per_token = sizes.kv_bytes_per_token
    shape = dict(kv_per_token=kv_per_token, minimum=k * per_slot, vocab=vocab)

    def fit_with(stage: int) -> Fit | None:
        return fit_budget(
            budget_bytes,
            fixed=sizes.dense_bytes + stage,
            full=n * per_slot,
            context=context,
            auto_context=auto_context,
            **shape,
        )

    stage = max(k, sizes.stage_experts) * sizes.stage_bytes
    fit = fit_with(stage)
    if fit is None or fit.head_on_flash or fit.context < context:  # tight: reads staged k experts at a time
        stage = k * sizes.stage_bytes
        fit = fit_with(stage)
    if fit is None:
        need, ctx, f = smallest_budget(
            fixed=sizes.dense_bytes + stage, context=context, auto_context=auto_context, **shape
        )
        raise BudgetError(
            f"memory budget {fmt_bytes(budget_bytes)} is too small for this mixture-of-experts model: it needs at "
            f"least {fmt_bytes(need)} (dense weights {fmt_bytes(sizes.dense_bytes - f.moved)}{_vocab_note(f)}, "
            f"KV cache {fmt_bytes(kv_per_token * kv_tokens(ctx))} for {ctx} tokens, staging buffer {fmt_bytes(stage)}, "
            f"and {k} experts per layer, one token's, {fmt_bytes(k * per_slot)}); pass memory_budget >= {need}"
        )
    kv = kv_per_token * kv_tokens(fit.context)
    fixed = sizes.dense_bytes - fit.moved + fit.buffers + kv + stage
    slots = n if budget_bytes is None else min(n, (budget_bytes - fixed) // per_slot)
    return MemoryPlan(
        mode="flash",
        budget_bytes=budget_bytes,
        dtype_bytes=0,
        dense_bytes=sizes.dense_bytes - fit.moved,
        kv_bytes=kv,
        stream_bytes=stage,
        selector_bytes=0,
        predictor_bytes=0,
        resident_neurons=0,
        cache_capacity=int(slots),
        neuron_bytes_all_layers=per_slot,
        cache_label=f"of {n} experts",
        **fit.plan_fields(),
    )

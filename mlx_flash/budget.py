"""Memory budget planning: what stays in memory, and how many neurons each layer may cache.

The plan adds up, in the dtype weights are computed in:
- the dense part (embeddings, attention, norms, lm_head, FFN biases): always resident;
- the KV cache for the context the user asks for, as mlx-lm allocates it (in steps of
  `KV_STEP` tokens: a context of 137 tokens holds 256);
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


def kv_tokens(context: int) -> int:
    """Token slots mlx-lm's KV cache holds for `context` tokens: whole steps of KV_STEP."""
    return -(-max(context, 1) // KV_STEP) * KV_STEP


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
    predictor_elems: int = 0  # all layers' predictors
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
        )

    neuron_bytes_all_layers: int = 0
    cache_label: str = ""  # what the cache rows are, when not neurons ("experts of 128")

    def describe(self) -> str:
        rows = [
            ("dense weights", self.dense_bytes),
            (f"KV cache ({self.context} tokens)", self.kv_bytes),
            ("streaming buffer", self.stream_bytes),
        ]
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
) -> MemoryPlan:
    """Split the budget. Raises BudgetError when the fixed part alone does not fit."""
    if mode not in MODES:
        raise BudgetError(f"unknown mode {mode!r} (choose one of {', '.join(MODES)})")
    if selection not in SELECTIONS:
        raise BudgetError(f"unknown selection {selection!r} (choose one of {', '.join(SELECTIONS)})")
    b = dtype_bytes
    per_neuron_layer = sizes.neuron_bytes_for(b)  # one neuron, one layer
    per_neuron_all = per_neuron_layer * sizes.num_layers
    fixed = {
        "dense": sizes.dense_bytes_for(b),
        "kv": sizes.kv_elems_per_token * kv_tokens(context) * b,
        "stream": STREAM_BUFFERS * stream_block_neurons(sizes.num_neurons) * per_neuron_layer,
        "selector": 0,
        "predictor": 0,
    }
    if mode == "flash" and selection == "exact":
        fixed["selector"] = (
            sizes.num_layers * sizes.num_neurons * (sizes.selector_neuron_bytes or sizes.hidden_size * b)
        )
    if mode == "flash" and selection == "predictor":
        fixed["predictor"] = sizes.predictor_elems * b
    fixed_total = sum(fixed.values())
    n = sizes.num_neurons
    if budget_bytes is None:
        resident = capacity = n
    else:
        need = fixed_total + (min_cache_neurons * per_neuron_all if mode == "flash" else 0)
        if budget_bytes < need:
            raise BudgetError(
                f"memory budget {fmt_bytes(budget_bytes)} is too small for mode {mode}: it needs at least "
                f"{fmt_bytes(need)} (dense weights {fmt_bytes(fixed['dense'])}, KV cache {fmt_bytes(fixed['kv'])} for "
                f"{context} tokens, streaming buffer {fmt_bytes(fixed['stream'])}"
                + (f", exact selector {fmt_bytes(fixed['selector'])}" if fixed["selector"] else "")
                + (f", predictors {fmt_bytes(fixed['predictor'])}" if fixed["predictor"] else "")
                + ")"
            )
        spare = budget_bytes - fixed_total
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
        dense_bytes=fixed["dense"],
        kv_bytes=fixed["kv"],
        stream_bytes=fixed["stream"],
        selector_bytes=fixed["selector"],
        predictor_bytes=fixed["predictor"],
        resident_neurons=int(resident),
        cache_capacity=int(capacity),
        context=context,
        neuron_bytes_all_layers=per_neuron_all,
    )


def plan_with_selection(
    sizes: ModelSizes,
    *,
    mode: str,
    budget_bytes: int | None,
    dtype_bytes: int,
    context: int,
    selection: str | None,
    has_predictors: bool,
) -> tuple[MemoryPlan, str]:
    """`plan_memory` and the selection it was made for. With `selection` None: "exact", unless
    the mode is flash, the folder has predictors (`sizes.predictor_elems`) and the budget cannot
    hold the exact selector; then "predictor" (whose bytes are then planned)."""
    if selection is not None or mode != "flash" or not has_predictors:
        selection = selection or "exact"
        plan = plan_memory(
            sizes,
            mode=mode,
            budget_bytes=budget_bytes,
            dtype_bytes=dtype_bytes,
            context=context,
            selection=selection,
        )
        return plan, selection
    try:
        plan = plan_memory(
            sizes, mode=mode, budget_bytes=budget_bytes, dtype_bytes=dtype_bytes, context=context
        )
        return plan, "exact"
    except BudgetError:
        plan = plan_memory(
            sizes,
            mode=mode,
            budget_bytes=budget_bytes,
            dtype_bytes=dtype_bytes,
            context=context,
            selection="predictor",
        )
        return plan, "predictor"


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

    @property
    def model_bytes(self) -> int:
        return self.dense_bytes + self.moe_layers * self.num_experts * self.slot_bytes


def plan_experts(sizes: ExpertSizes, *, budget_bytes: int | None, context: int) -> MemoryPlan:
    """The MoE plan: dense weights, KV cache, staging buffer, and per MoE layer a pool of as many
    expert slots as fit (all experts without a budget; at least k, else a BudgetError naming
    the smallest budget that works)."""
    per_slot = sizes.slot_bytes * sizes.moe_layers
    dense, kv = sizes.dense_bytes, sizes.kv_bytes_per_token * kv_tokens(context)
    k, n = sizes.experts_per_token, sizes.num_experts
    stage = max(k, sizes.stage_experts) * sizes.slot_bytes
    if budget_bytes is not None and budget_bytes < dense + kv + stage + k * per_slot:
        stage = k * sizes.slot_bytes  # a tight budget: reads staged k experts at a time
    fixed = dense + kv + stage
    if budget_bytes is None:
        slots = n
    else:
        need = fixed + k * per_slot
        if budget_bytes < need:
            raise BudgetError(
                f"memory budget {fmt_bytes(budget_bytes)} is too small for this mixture-of-experts model: it needs at "
                f"least {fmt_bytes(need)} (dense weights {fmt_bytes(dense)}, KV cache {fmt_bytes(kv)} for {context} "
                f"tokens, staging buffer {fmt_bytes(stage)}, and {k} experts per layer, one token's, "
                f"{fmt_bytes(k * per_slot)}); pass memory_budget >= {need}"
            )
        slots = min(n, (budget_bytes - fixed) // per_slot)
    return MemoryPlan(
        mode="flash",
        budget_bytes=budget_bytes,
        dtype_bytes=0,
        dense_bytes=dense,
        kv_bytes=kv,
        stream_bytes=stage,
        selector_bytes=0,
        predictor_bytes=0,
        resident_neurons=0,
        cache_capacity=int(slots),
        context=context,
        neuron_bytes_all_layers=per_slot,
        cache_label=f"of {n} experts",
    )

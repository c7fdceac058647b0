"""FlashSwitch: the module that replaces an mlx-lm routed-experts module, its experts on flash.

mlx-lm builds every family's routed experts from `SwitchGLU` / `SwitchMLP`
(mlx_lm/models/switch_layers.py), called as ``switch(x, indices) -> [..., k, hidden]`` by the
family's own MoE block (router, top-k, scoring, shared experts and scaling stay mlx-lm's). A
FlashSwitch keeps the original module (its activation, biases, sorting: gpt-oss's clamped
SwiGLU included) with its stacked ``[E, ...]`` parameters replaced by the layer's pool buffers
``[slots, ...]`` (`experts.ExpertPool`), and calls it with the router's ids remapped to slots:
the same `gather_mm` / `gather_qmm` on the same expert weights, so the same result.

Prefill, expert-major: all tokens of a call share one plan, so each expert a chunk needs is read
once per layer, not once per token. When a call needs more distinct experts than the pool has
slots, its tokens are split, in order, into parts whose experts fit; each part is computed and
evaluated before the next one overwrites slots (still exact: a token's output depends on its own
experts only).

Under ``mlx.launch`` (`distributed.Shard`), a rank reads and caches only its own experts; the
(token, k) entries of the others' experts are computed on slot 0 and replaced by zeros, and one
all_sum of the ``[..., k, hidden]`` output gives every rank one process's output exactly (the
same kernels on the same shapes; the matmuls are not shared, the reads and the memory are).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .experts import ExpertCache
    from .runtime import FlashRuntime


class FlashSwitch(nn.Module):
    """`inner` (the mlx-lm switch module, its parameters already the pool's buffers) on the
    experts of MoE layer `moe_layer` of `cache`."""

    def __init__(self, inner: nn.Module, moe_layer: int, cache: ExpertCache, runtime: FlashRuntime):
        super().__init__()
        # Held outside the module tree: the pools are not weights to load or save.
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_cache", cache)
        object.__setattr__(self, "_runtime", runtime)
        self.moe_layer = moe_layer

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        rt, cache = self._runtime, self._cache
        with rt.lock:
            lead, k = indices.shape[:-1], indices.shape[-1]
            tokens = int(np.prod(lead)) if lead else 1
            rt.begin_layer(self.moe_layer, tokens)
            t0 = time.perf_counter()
            ids = np.array(indices).reshape(tokens, k).astype(np.int64)  # evaluates the router
            rt.add_time("selection", time.perf_counter() - t0)
            pool = cache.pools[self.moe_layer]
            # Under mlx.launch: only this rank's experts (distributed.py); -1 marks the others'.
            mine = rt.shard.owned_entries(ids, pool.entry.num_experts)
            own = ids if mine is None else np.where(mine, ids, -1)
            parts = split_tokens(own, pool.slots)
            outs = []
            xs = x.reshape(tokens, x.shape[-1]) if len(parts) > 1 else x
            for lo, hi in parts:
                needed = np.unique(own[lo:hi])
                needed = needed[needed >= 0]
                plan = cache.fetch(self.moe_layer, needed, rt.add_time)
                rt.count_token_layer(
                    self.moe_layer, active=len(needed), loaded=len(plan.missing), used=pool.resident
                )
                # Another rank's expert computes on slot 0, its result dropped below.
                slots = mx.array(np.maximum(pool.slot_of[ids[lo:hi]], 0).astype(np.uint32))
                if len(parts) == 1:
                    return self._group_sum(self._inner(x, slots.reshape(indices.shape)), mine)
                y = self._inner(xs[lo:hi], slots)
                mx.eval(y)  # the next part may overwrite the slots this one computed on
                outs.append(y)
            return self._group_sum(mx.concatenate(outs, axis=0).reshape(*lead, k, -1), mine)

    def _group_sum(self, y: mx.array, mine: np.ndarray | None) -> mx.array:
        """One process: y. A rank of a group: its own (token, k) entries of y, zeros elsewhere,
        summed over the group (each entry owned by one rank: exactly one process's y)."""
        if mine is None:
            return y
        keep = mx.array(mine.reshape(*y.shape[:-1], 1))
        return self._runtime.all_sum(mx.where(keep, y, mx.zeros((), dtype=y.dtype)))


def split_tokens(ids: np.ndarray, slots: int) -> list[tuple[int, int]]:
    """Token ranges [lo, hi) of `ids` ([tokens, k] expert ids; -1: another rank's expert, not
    counted), in order, each needing at most `slots` distinct experts (one range when all fit)."""
    if len(np.unique(ids[ids >= 0])) <= slots:
        return [(0, len(ids))]
    parts, lo, seen = [], 0, set()
    for t, row in enumerate(ids.tolist()):
        grown = seen.union(e for e in row if e >= 0)
        if len(grown) > slots:
            parts.append((lo, t))
            lo, grown = t, {e for e in row if e >= 0}
        seen = grown
    parts.append((lo, len(ids)))
    return parts

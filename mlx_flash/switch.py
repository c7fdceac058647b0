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
            parts = split_tokens(ids, pool.slots)
            outs = []
            xs = x.reshape(tokens, x.shape[-1]) if len(parts) > 1 else x
            for lo, hi in parts:
                needed = np.unique(ids[lo:hi])
                plan = cache.fetch(self.moe_layer, needed, rt.add_time)
                rt.count_token_layer(
                    self.moe_layer, active=len(needed), loaded=len(plan.missing), used=pool.resident
                )
                slots = mx.array(pool.slot_of[ids[lo:hi]].astype(np.uint32))
                if len(parts) == 1:
                    return self._inner(x, slots.reshape(indices.shape))
                y = self._inner(xs[lo:hi], slots)
                mx.eval(y)  # the next part may overwrite the slots this one computed on
                outs.append(y)
            return mx.concatenate(outs, axis=0).reshape(*lead, k, -1)


def split_tokens(ids: np.ndarray, slots: int) -> list[tuple[int, int]]:
    """Token ranges [lo, hi) of `ids` ([tokens, k] expert ids), in order, each needing at most
    `slots` distinct experts (one range when all fit)."""
    if len(np.unique(ids)) <= slots:
        return [(0, len(ids))]
    parts, lo, seen = [], 0, set()
    for t, row in enumerate(ids.tolist()):
        grown = seen.union(row)
        if len(grown) > slots:
            parts.append((lo, t))
            lo, grown = t, set(row)
        seen = grown
    parts.append((lo, len(ids)))
    return parts

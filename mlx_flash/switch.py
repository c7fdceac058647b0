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
slots, its experts are split into groups that fit (`expert_groups`: those already in the pool
first), and each group computes the (token, k) entries routed to it, evaluated before the next
group overwrites slots: each expert is still read at most once per call, and the output is
exact (an entry depends on its own token and expert only).

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
        # decode: compute the resident experts while the missing ones are read (overlap); read
        # the next layer's guessed experts ahead (guess: x -> its router's logits, set at load)
        self.overlap = True
        self.guess = None
        self.residuals = None  # the residual stream at this layer's input (moe_model.Residuals), or None
        self._ahead_sent = 0  # experts read ahead for this layer's next call
        self._last_missed = 0  # experts its last decoded call would have missed without them

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        rt, cache = self._runtime, self._cache
        with rt.lock:
            lead, k = indices.shape[:-1], indices.shape[-1]
            tokens = int(np.prod(lead)) if lead else 1
            rt.begin_layer(self.moe_layer, tokens)
            decode = tokens == 1 and (self.overlap or self.guess is not None)
            guess = self.guess(x) if decode and self.guess is not None else None
            if self.residuals is not None:  # after the guess: it uses this call's and the last token's
                self.residuals.roll()
            t0 = time.perf_counter()
            if guess is not None:  # the next layer's guess in the same evaluation as the router
                mx.eval(indices, guess)
            ids = np.array(indices).reshape(tokens, k).astype(np.int64)  # evaluates the router
            rt.add_time("selection", time.perf_counter() - t0)
            pool = cache.pools[self.moe_layer]
            # Under mlx.launch: only this rank's experts (distributed.py); -1 marks the others'.
            mine = rt.shard.owned_entries(ids, pool.entry.num_experts)
            own = ids if mine is None else np.where(mine, ids, -1)
            if decode and len(np.unique(own[own >= 0])) <= pool.slots:
                y = self._overlapped(x, indices, own, guess)
                return self._group_sum(y, mine)
            needed = np.unique(own)
            needed = needed[needed >= 0]
            if len(needed) <= pool.slots:
                plan = cache.fetch(self.moe_layer, needed, rt.add_time)
                rt.count_token_layer(
                    self.moe_layer, active=len(needed), loaded=len(plan.missing), used=pool.resident
                )
                # Another rank's expert computes on slot 0, its result dropped below.
                slots = mx.array(np.maximum(pool.slot_of[ids], 0).astype(np.uint32))
                return self._group_sum(self._inner(x, slots.reshape(indices.shape)), mine)
            flat = own.reshape(-1)
            xs = x.reshape(tokens, x.shape[-1])
            entries, outs = [], []
            for group in expert_groups(needed, pool.slot_of[needed] >= 0, pool.slots):
                plan = cache.fetch(self.moe_layer, group, rt.add_time)
                rt.count_token_layer(
                    self.moe_layer, active=len(group), loaded=len(plan.missing), used=pool.resident
                )
                at = np.flatnonzero(np.isin(flat, group))  # the (token, k) entries of this group
                slots = mx.array(pool.slot_of[flat[at]].astype(np.uint32)[:, None])
                y = self._inner(xs[mx.array(at // k)], slots)[:, 0]
                mx.eval(y)  # the next group may overwrite the slots this one computed on
                entries.append(at)
                outs.append(y)
            y = mx.concatenate(outs, axis=0)
            out = mx.zeros((tokens * k, y.shape[-1]), dtype=y.dtype)
            out[mx.array(np.concatenate(entries))] = y  # another rank's entries stay zero
            return self._group_sum(out.reshape(*lead, k, -1), mine)

    def _overlapped(
        self, x: mx.array, indices: mx.array, own: np.ndarray, guess: mx.array | None
    ) -> mx.array:
        """One decoded token: its missing experts are read while the resident ones compute
        (evaluated asynchronously: the host does not wait for them), then the missing ones are
        computed from the pool; the k outputs are put back in the router's order, each the same
        as in one call. Then, with a guess (the next MoE layer's router on this input, `guess`
        logits), the next layer's likeliest experts not resident are read ahead, at most what
        that layer missed last time times the runtime's look-ahead factor."""
        rt, cache, layer = self._runtime, self._cache, self.moe_layer
        pool = cache.pools[layer]
        needed = np.unique(own[own >= 0])
        pending = cache.submit(layer, needed, rt.add_time)
        plan = pending.plan
        rt.count_token_layer(layer, active=len(needed), loaded=len(plan.missing), used=pool.resident)
        self._last_missed = len(plan.missing) + plan.ahead_hits
        # the experts read for this call, and how the guess made for it did (the waste cap's totals)
        rt.count_lookahead(layer, needed=self._last_missed, hits=plan.ahead_hits, fetched=self._ahead_sent)
        self._ahead_sent = 0
        row = own.reshape(-1)
        late = np.isin(row, plan.missing)  # entries waiting on a read
        slots = np.maximum(pool.slot_of[row], 0).astype(np.uint32)  # another rank's: slot 0, dropped
        k = len(row)
        shape = indices.shape[:-1]
        if not late.any() or late.all() or not self.overlap:
            ready = None
        else:
            early = np.flatnonzero(~late)
            ready = self._inner(x, mx.array(slots[early]).reshape(*shape, len(early)))
            mx.async_eval(ready)  # computes while the reads arrive
        cache.complete(pending, rt.add_time)
        if guess is not None and layer + 1 < len(cache.pools):
            rt.switches[layer + 1].prefetch(guess, len(plan.needed))
        slots = np.maximum(pool.slot_of[row], 0).astype(np.uint32)
        if ready is None:
            return self._inner(x, mx.array(slots).reshape(*shape, k))
        tail = np.flatnonzero(late)
        rest = self._inner(x, mx.array(slots[tail]).reshape(*shape, len(tail)))
        order = np.argsort(np.concatenate([early, tail]), kind="stable")
        return mx.take(mx.concatenate([ready, rest], axis=-2), mx.array(order.astype(np.uint32)), axis=-2)

    def prefetch(self, logits: mx.array, count: int) -> None:
        """Read ahead this layer's likeliest experts for its next call (`logits`: its router's on
        a guess of its input, `count` experts routed): of the `count` best scored, those
        not resident, best first, as many as the layer missed last call (at least one)
        times its look-ahead factor, within the waste cap's room (`FlashRuntime.lookahead_room`).
        Its next call counts how the guess did."""
        rt, cache = self._runtime, self._cache
        entry = cache.pools[self.moe_layer].entry
        scores = np.array(logits.astype(mx.float32)).reshape(-1)  # numpy has no bfloat16
        best = np.argsort(-scores, kind="stable")[:count]
        mine = rt.shard.experts(entry.num_experts)
        if len(mine) < entry.num_experts:  # under mlx.launch: this rank's experts only
            best = best[np.isin(best, mine)]
        limit = int(np.ceil(rt.lookahead_factor(self.moe_layer) * max(1, self._last_missed)))
        self._ahead_sent = cache.read_ahead(self.moe_layer, best, min(limit, rt.lookahead_room()))

    def _group_sum(self, y: mx.array, mine: np.ndarray | None) -> mx.array:
        """One process: y. A rank of a group: its own (token, k) entries of y, zeros elsewhere,
        summed over the group (each entry owned by one rank: exactly one process's y)."""
        if mine is None:
            return y
        keep = mx.array(mine.reshape(*y.shape[:-1], 1))
        return self._runtime.all_sum(mx.where(keep, y, mx.zeros((), dtype=y.dtype)))


def expert_groups(needed: np.ndarray, resident: np.ndarray, slots: int) -> list[np.ndarray]:
    """The experts `needed` (sorted) in groups of at most `slots`, those `resident` (a bool per
    needed expert) first: each group's experts fit the pool at once."""
    order = np.concatenate([needed[resident], needed[~resident]])
    return [order[i : i + slots] for i in range(0, len(order), slots)]

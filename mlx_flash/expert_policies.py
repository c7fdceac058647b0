"""Eviction policies of an MoE layer's expert pool, and the pool's expert-to-slot map.

A policy is told which slots each call of the layer uses (`touch`) and asked for victims among
the slots the current call does not use (`victims`; empty slots first): a slot the current call
uses is never evicted. Three policies:

- `lru`: least recently used first (the default).
- `lfu`: least frequently used, with aging: an expert's count halves every `half_life` calls
  of the layer, so an expert that was hot long ago does not stay forever; counts outlive
  evictions (an expert needed again comes back with its history). It needs `touch`'s
  `experts` (the experts the touched slots hold).
- `pinned`: layer-aware pinning of the hottest experts: the slots whose aged count is above
  `hot` times the layer's mean are pinned (a layer whose routing is concentrated pins many, an
  even one none), LRU over the rest; pinned slots are evicted only when nothing else is left.

`SlotMap` is the mapping a pool keeps (which expert each slot holds) with the policy deciding
where each missing expert goes; `simulate` replays a router's top-k ids through it, which
measures a policy's hit rate on a routing trace without reading anything.
"""

from __future__ import annotations

import numpy as np


class EvictionPolicy:
    """Which slots of a pool to overwrite. Subclasses keep whatever they need per slot."""

    def __init__(self, slots: int):
        self.slots = slots

    def touch(self, slots: np.ndarray, clock: int, experts: np.ndarray | None = None) -> None:
        """`slots` (holding `experts`) were used by call number `clock` of the layer."""

    def victims(self, n: int, protected: np.ndarray, empty: np.ndarray) -> np.ndarray:
        """`n` slots to overwrite: none where `protected` (used by the current call); slots
        where `empty` (holding no expert) first."""
        raise NotImplementedError


def _lowest(key: np.ndarray, n: int, protected: np.ndarray, empty: np.ndarray) -> np.ndarray:
    """The `n` unprotected slots with the lowest key, empty slots first."""
    free = np.flatnonzero(~protected)
    order = np.lexsort((key[free], ~empty[free]))
    return free[order[:n]]


class LRUPolicy(EvictionPolicy):
    """Least recently used first."""

    def __init__(self, slots: int):
        super().__init__(slots)
        self.last = np.full(slots, -1, dtype=np.int64)

    def touch(self, slots: np.ndarray, clock: int, experts: np.ndarray | None = None) -> None:
        self.last[slots] = clock

    def victims(self, n: int, protected: np.ndarray, empty: np.ndarray) -> np.ndarray:
        return _lowest(self.last, n, protected, empty)


class LFUPolicy(EvictionPolicy):
    """Least frequently used first: each expert's count of calls that used it, halved every
    `half_life` calls of the layer (aging), kept while the expert is out of the pool too (an
    expert evicted and needed again comes back with its history); ties to the least recent."""

    def __init__(self, slots: int, half_life: float = 32.0):
        super().__init__(slots)
        self.decay = 0.5 ** (1.0 / half_life)
        self.count = np.zeros(0)  # per expert, aged as of call `self.clock`
        self.expert_in = np.full(slots, -1, dtype=np.int64)
        self.last = np.full(slots, -1, dtype=np.int64)
        self.clock = 0

    def touch(self, slots: np.ndarray, clock: int, experts: np.ndarray | None = None) -> None:
        if experts is None:
            raise TypeError(f"{type(self).__name__} needs the experts of the touched slots")
        if clock != self.clock:
            self.count *= self.decay ** (clock - self.clock)
            self.clock = clock
        if len(experts) and experts.max() >= len(self.count):
            self.count = np.concatenate([self.count, np.zeros(int(experts.max()) + 1 - len(self.count))])
        self.count[experts] += 1.0
        self.expert_in[slots] = experts
        self.last[slots] = clock

    def slot_counts(self, empty: np.ndarray) -> np.ndarray:
        held = np.where(empty, -1, self.expert_in)
        return np.where(held >= 0, self.count[np.maximum(held, 0)] if len(self.count) else 0.0, 0.0)

    def victims(self, n: int, protected: np.ndarray, empty: np.ndarray) -> np.ndarray:
        recency = (self.last - self.last.min()) / (1 + np.ptp(self.last))
        return _lowest(self.slot_counts(empty) + recency * 1e-9, n, protected, empty)


class PinnedPolicy(LFUPolicy):
    """LRU, except that the slots holding this layer's hottest experts (aged count above `hot`
    times the mean over the resident experts) are pinned while anything else can go."""

    def __init__(self, slots: int, half_life: float = 64.0, hot: float = 2.0):
        super().__init__(slots, half_life)
        self.hot = hot

    def victims(self, n: int, protected: np.ndarray, empty: np.ndarray) -> np.ndarray:
        counts = self.slot_counts(empty)
        used = counts[~empty]
        pinned = counts > self.hot * (used.mean() if used.size else 0.0)
        return _lowest(self.last + np.where(pinned, 1 << 40, 0), n, protected, empty)


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy, "lfu": LFUPolicy, "pinned": PinnedPolicy}


class SlotMap:
    """Which expert each of a pool's slots holds; `plan` places one call's experts."""

    def __init__(self, experts: int, slots: int, policy: EvictionPolicy):
        self.slot_of = np.full(experts, -1, dtype=np.int64)
        self.expert_of = np.full(slots, -1, dtype=np.int64)
        self.policy = policy
        self.clock = 0

    def plan(self, needed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For the sorted unique experts `needed` by one call: (the missing ones, the slot each
        goes to, evicting what the policy names; never a slot a needed expert holds)."""
        if len(needed) > len(self.expert_of):
            raise ValueError(f"{len(needed)} experts do not fit in a pool of {len(self.expert_of)} slots")
        self.clock += 1
        have = self.slot_of[needed]
        missing = needed[have < 0]
        protected = np.zeros(len(self.expert_of), dtype=bool)
        protected[have[have >= 0]] = True
        slots = self.policy.victims(len(missing), protected, self.expert_of < 0)
        old = self.expert_of[slots]
        self.slot_of[old[old >= 0]] = -1
        self.expert_of[slots] = missing
        self.slot_of[missing] = slots
        self.policy.touch(self.slot_of[needed], self.clock, needed)
        return missing, slots


def simulate(policy: str, inds: np.ndarray, experts: int, slots: int, warmup: int = 32) -> float:
    """Hit rate of a pool of `slots` under `policy` fed a router's top-k ids `inds`
    ([sequences, tokens, k] or [tokens, k]; each sequence from an empty pool; the first
    `warmup` tokens of each fill it and are not counted)."""
    inds = np.asarray(inds)
    seqs = inds[None] if inds.ndim == 2 else inds
    hits = total = 0
    for seq in seqs:
        pool = SlotMap(experts, slots, POLICIES[policy](slots))
        for t, chosen in enumerate(seq):
            needed = np.unique(chosen)
            missing, _ = pool.plan(needed)
            if t >= warmup:
                hits += len(needed) - len(missing)
                total += len(needed)
    return hits / max(1, total)

"""mlx_flash.expert_policies: the eviction policies of an expert pool, replayed on routing traces."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_flash.expert_policies import POLICIES, SlotMap, simulate
from mlx_flash.routing_stats import lru_hit_rate


def _trace(seed: int, tokens: int = 300, experts: int = 32, k: int = 4) -> np.ndarray:
    """Top-k ids that drift: each token keeps some of the previous token's experts."""
    rng = np.random.default_rng(seed)
    out = [rng.choice(experts, k, replace=False)]
    for _ in range(tokens - 1):
        keep = [e for e in out[-1] if rng.random() < 0.5]
        rest = [e for e in rng.permutation(experts) if e not in keep][: k - len(keep)]
        out.append(np.array(keep + rest))
    return np.stack(out)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("slots", [4, 9, 16])
def test_lru_replay_equals_the_reference_lru(seed, slots):
    """Two independent LRUs (the pool's slot map with LRUPolicy; an ordered dict) agree, up to
    which of one token's experts goes first (the same last use: a tie either may break)."""
    t = _trace(seed)
    assert simulate("lru", t, 32, slots) == pytest.approx(lru_hit_rate(t, slots), abs=0.02)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_never_evicts_what_the_call_uses(policy):
    rng = np.random.default_rng(3)
    pool = SlotMap(32, 6, POLICIES[policy](6))
    for _ in range(400):
        needed = np.unique(rng.choice(32, rng.integers(1, 7), replace=False))
        before = pool.slot_of[needed].copy()
        missing, slots = pool.plan(needed)
        assert set(missing) == set(needed[before < 0])
        assert not set(slots) & set(before[before >= 0])  # a needed expert's slot is kept
        assert (pool.slot_of[needed] >= 0).all() and len(set(pool.slot_of[needed])) == len(needed)
        held = pool.expert_of[pool.expert_of >= 0]
        assert len(set(held)) == len(held) and (pool.slot_of[held] >= 0).all()
    with pytest.raises(ValueError, match="do not fit"):
        pool.plan(np.arange(7))


def test_frequency_policies_keep_a_hot_expert_that_lru_drops():
    """Expert 0 is used every third call; between its uses, two calls of two new experts each
    fill a pool of 4 slots. LRU evicts expert 0 every time; LFU and pinning learn to keep it."""
    calls = []
    new = iter(range(1, 10_000))
    for _ in range(60):
        calls += [np.array([0])] + [np.array([next(new), next(new)]) for _ in range(2)]
    hits = {}
    for policy in POLICIES:
        pool = SlotMap(10_000, 4, POLICIES[policy](4))
        hits[policy] = sum((len(c) - len(pool.plan(c)[0])) * (c[0] == 0) for c in calls)
    assert hits["lru"] == 0
    assert hits["lfu"] >= 50 and hits["pinned"] >= 50, hits

"""NeuronCache: invariants under random sequences of active sets (hypothesis), the adaptive
window, the per-token protocol's errors, and that steady-state updates never copy a buffer."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_flash.cache import CacheCapacityError, NeuronCache, host_writable_buffer

ELEMS = {"gate": 3, "up": 2, "down": 4}
N = 40


def rows_of(ids) -> dict[str, np.ndarray]:
    """Each neuron's rows are a function of its id, so any row can be checked."""
    ids = np.asarray(ids, dtype=np.float32)[:, None]
    return {
        name: ids * 10 + np.arange(e, dtype=np.float32) + k * 0.25
        for k, (name, e) in enumerate(ELEMS.items())
    }


def step(cache: NeuronCache, active, order_seed: int = 0) -> np.ndarray:
    """One token: begin, insert the missing rows in a shuffled order and in two parts."""
    missing = cache.begin_token(np.asarray(active, dtype=np.int64))
    perm = np.random.default_rng(order_seed).permutation(missing)
    half = len(perm) // 2
    for part in (perm[:half], perm[half:]):
        cache.insert(part, rows_of(part))
    return missing


def check_invariants(cache: NeuronCache, active: set[int], resident: set[int]) -> None:
    used = cache.used
    ids = cache.resident_ids()
    assert used <= cache.capacity and len(ids) == used
    assert set(ids.tolist()) == resident and len(set(ids.tolist())) == used
    np.testing.assert_array_equal(np.array(cache.resident_rows()), ids)
    np.testing.assert_array_equal(cache.slots(ids), np.arange(used))
    others = np.setdiff1d(np.arange(N + 5), ids)
    assert np.all(cache.slots(others) == -1)
    expect = rows_of(ids)
    views = cache.views()
    for name in ELEMS:
        np.testing.assert_array_equal(cache.host_view(name), expect[name])
        np.testing.assert_array_equal(np.array(views[name]), expect[name])
    mask = np.array(cache.active_mask())
    np.testing.assert_array_equal(mask, np.isin(ids, list(active)).astype(np.float32))


active_sets = st.lists(st.sets(st.integers(0, N - 1), max_size=14), min_size=1, max_size=25)


@settings(max_examples=120, deadline=None)
@given(seq=active_sets, capacity=st.integers(1, 30), window=st.integers(1, 5), clear_at=st.integers(0, 30))
def test_invariants_under_random_active_sets(seq, capacity, window, clear_at):
    cache = NeuronCache(ELEMS, capacity, window)
    address = {name: cache.buffer_address(name) for name in ELEMS}
    history: list[set[int]] = []
    eff = 0
    for t, active in enumerate(seq):
        if t == clear_at:  # a new sequence: nothing of the earlier tokens stays
            cache.clear()
            history, eff = [], 0
        before = set(cache.resident_ids().tolist())
        if len(active) > capacity:
            with pytest.raises(CacheCapacityError):
                cache.begin_token(sorted(active))
            return
        missing = step(cache, sorted(active), t)
        history.append(active)
        # Reference window: grows by one a token up to `window`, shrinks until the union fits.
        eff = min(window, eff + 1)
        while len(set().union(*history[-eff:])) > capacity:
            eff -= 1
        resident = set().union(*history[-eff:])
        assert cache.effective_window == eff
        assert missing.tolist() == sorted(active - before)
        check_invariants(cache, active, resident)
    assert {name: cache.buffer_address(name) for name in ELEMS} == address


def test_window_keeps_recent_tokens_and_swap_deletes():
    cache = NeuronCache(ELEMS, capacity=10, window=2, num_neurons=N)
    assert step(cache, [1, 2, 3]).tolist() == [1, 2, 3]
    assert step(cache, [3, 4]).tolist() == [4]
    check_invariants(cache, {3, 4}, {1, 2, 3, 4})
    assert step(cache, [5]).tolist() == [5]  # 1 and 2 leave: 5 takes a freed row, one row moves
    check_invariants(cache, {5}, {3, 4, 5})
    assert cache.stats.moved == 1 and cache.stats.evicted == 2 and cache.stats.inserted == 5
    s = cache.stats.take()
    assert s.tokens == 3 and s.seconds > 0 and cache.stats.tokens == 0


def test_adaptive_window_shrinks_never_correctness():
    cache = NeuronCache(ELEMS, capacity=4, window=3)
    step(cache, [0, 1])
    step(cache, [2, 3])
    step(cache, [4, 5])  # the three sets need 6 rows: the window drops to the last two
    assert cache.effective_window == 2 and cache.stats.window_shrinks == 1
    check_invariants(cache, {4, 5}, {2, 3, 4, 5})
    step(cache, [4])
    assert cache.effective_window == 3
    check_invariants(cache, {4}, {2, 3, 4, 5})
    with pytest.raises(CacheCapacityError, match="do not fit"):
        cache.begin_token(np.arange(5))


def test_protocol_errors():
    cache = NeuronCache(ELEMS, capacity=8, window=2)
    missing = cache.begin_token([1, 2, 3])
    with pytest.raises(RuntimeError, match="insert"):
        cache.views()
    with pytest.raises(RuntimeError, match="never inserted"):
        cache.begin_token([1])
    with pytest.raises(ValueError, match="begin_token"):
        cache.insert([7], rows_of([7]))
    with pytest.raises(ValueError, match="shape"):
        cache.insert(missing, rows_of(missing[:2]))
    cache.insert(missing, rows_of(missing))
    with pytest.raises(ValueError, match="begin_token"):
        cache.insert([1], rows_of([1]))  # already resident
    with pytest.raises(ValueError):
        NeuronCache(ELEMS, capacity=0, window=1)
    cache.clear()
    assert cache.used == 0 and cache.begin_token([2]).tolist() == [2]


@settings(max_examples=60, deadline=None)
@given(seq=active_sets, capacity=st.integers(1, 30), window=st.integers(1, 5), before=st.integers(0, 3))
def test_seed_equals_stepping_the_same_sets(seq, capacity, window, before):
    """seed(sets) then the rows written in blocks, as a prefill does, leaves the cache exactly
    as stepping the sets one token at a time: same window, same neurons, right rows."""
    seq = [sorted(a) for a in seq if len(a) <= capacity]
    stepped, seeded = NeuronCache(ELEMS, capacity, window), NeuronCache(ELEMS, capacity, window)
    for a in seq[:before]:  # a cache that already holds earlier tokens (a second prompt)
        step(stepped, a)
        step(seeded, a)
    for a in seq[before:]:
        step(stepped, a)
    need = seeded.seed([np.asarray(a, dtype=np.int64) for a in seq[before:]])
    if len(need):
        with pytest.raises(RuntimeError, match="insert"):
            seeded.views()
    for lo in range(0, N, 7):  # a streamed layer, block by block
        pick = need[(need >= lo) & (need < lo + 7)]
        seeded.insert(pick, rows_of(pick))
    assert seeded.effective_window == stepped.effective_window
    resident = set(stepped.resident_ids().tolist())
    assert set(seeded.resident_ids().tolist()) == resident
    check_invariants(seeded, set(seq[-1]) if seq else set(), resident)


def test_steady_state_updates_write_in_place_while_views_are_alive():
    """Many tokens with compute on the views in between and an old view held: the MLX buffers
    keep their memory (no copy, no reallocation), and the views see the rows written."""
    elems = {"gate": 64, "up": 64, "down": 64}
    cache = NeuronCache(elems, capacity=256, window=4, num_neurons=1000)
    address = {name: cache.buffer_address(name) for name in elems}
    rng = np.random.default_rng(0)
    data = {name: rng.standard_normal((1000, e)).astype(np.float32) for name, e in elems.items()}
    x = mx.array(rng.standard_normal((1, 64)).astype(np.float32))
    held = None
    for _t in range(60):
        active = rng.choice(1000, size=40, replace=False)
        missing = cache.begin_token(active)
        cache.insert(missing, {k: v[missing] for k, v in data.items()})
        views = cache.views()
        y = (mx.maximum(x @ views["gate"].T, 0) * (x @ views["up"].T) * cache.active_mask()) @ views["down"]
        mx.eval(y)
        ids = cache.resident_ids()
        ref = (
            np.maximum(np.array(x) @ data["gate"][ids].T, 0)
            * (np.array(x) @ data["up"][ids].T)
            * np.isin(ids, active)
        ) @ data["down"][ids]
        np.testing.assert_allclose(np.array(y), ref, rtol=1e-4, atol=1e-4)
        held = held if held is not None else views["gate"]  # an old view stays alive throughout
        assert {name: cache.buffer_address(name) for name in elems} == address
    assert cache.stats.evicted > 0 and cache.stats.inserted > 256  # rows were recycled


def _huge_page_bytes(a: np.ndarray) -> int:
    """Bytes of `a` that Linux backs with transparent huge pages (from /proc/self/smaps)."""
    lo, hi, vma, total = a.ctypes.data, a.ctypes.data + a.nbytes, None, 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            vma = (int(m.group(1), 16), int(m.group(2), 16))
        elif line.startswith("AnonHugePages:") and vma[0] < hi and vma[1] > lo:
            total += int(line.split()[1]) << 10
    return total


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not THP.exists() or "[never]" in THP.read_text(),
    reason="transparent huge pages are a Linux feature, here disabled or absent",
)
def test_aligned_buffers_get_huge_pages():
    """The streaming buffers (aligned, O_DIRECT reads land in them) are backed by huge pages
    like numpy's large arrays: one DMA segment per 2 MiB instead of per 4 KiB page."""
    buf, host = host_writable_buffer((1024, 4096), np.float32, align=4096)
    host[:] = 1.0
    assert _huge_page_bytes(host) >= host.nbytes // 2
    assert float(mx.sum(buf)) == host.size

"""Locality of a mixture-of-experts router's choices, measured on a sequence of routed tokens.

The figures an expert cache lives on (published for Qwen3-30B-A3B: about 45% of a layer's
experts repeat from the previous token, 80% appear within the last 8 tokens, an LRU cache over
40% of the experts hits 90-95%). Input everywhere: ``inds``, the router's top-k expert ids of
one layer, ``[sequences, tokens, k]`` (or ``[tokens, k]``: one sequence).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

LRU_FRACTIONS = (0.25, 0.40, 0.50)
WITHIN = 8  # "appears within the last 8 tokens"
LRU_WARMUP = 32  # tokens of each sequence that fill the cache before hits are counted


def _sequences(inds: np.ndarray) -> np.ndarray:
    inds = np.asarray(inds)
    return inds[None] if inds.ndim == 2 else inds


def repeat_rate(inds: np.ndarray, window: int = 1) -> float:
    """Share of each token's experts that were also chosen by one of the `window` tokens before
    it (mean over the tokens that have `window` predecessors; a token's k experts are distinct)."""
    seqs = _sequences(inds)
    S, T, k = seqs.shape
    if T <= window:
        return 0.0
    chosen = np.zeros((S, T + 1, int(seqs.max()) + 1), dtype=np.int32)  # row t + 1: token t
    np.put_along_axis(chosen[:, 1:], seqs, 1, axis=-1)
    seen = np.cumsum(chosen, axis=1)  # row t: chosen by tokens < t
    recent = seen[:, window:T] - seen[:, : T - window] > 0  # by one of tokens t - window .. t - 1
    hits = np.logical_and(recent, chosen[:, window + 1 :] > 0).sum()
    return int(hits) / (S * (T - window) * k)


def lru_hit_rate(inds: np.ndarray, slots: int, warmup: int = LRU_WARMUP) -> float:
    """Hit rate of an LRU cache of `slots` experts fed the tokens in order (per sequence, from
    empty; tokens before `warmup` fill it and are not counted). A token's own experts are never
    evicted to make room for each other (slots >= k)."""
    hits = total = 0
    for seq in _sequences(inds):
        cache: OrderedDict[int, None] = OrderedDict()
        for t, chosen in enumerate(seq.tolist()):
            h = 0
            for e in chosen:
                if e in cache:
                    h += 1
                    cache.move_to_end(e)
                else:
                    cache[e] = None
            while len(cache) > slots:
                cache.popitem(last=False)
            if t >= warmup:
                hits += h
                total += len(chosen)
    return hits / max(1, total)


def recall(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Share of the actual top-k experts that a guess of the same shape [..., k] names."""
    p = np.asarray(predicted).reshape(-1, np.shape(predicted)[-1])
    a = np.asarray(actual).reshape(-1, np.shape(actual)[-1])
    hits = sum(int(np.isin(x, y).sum()) for x, y in zip(a, p))
    return hits / max(1, a.size)


def locality(inds: np.ndarray, experts: int) -> dict[str, float]:
    """The published locality figures for one layer: repeat from the previous token, within the
    last WITHIN tokens, LRU hit rate at each of LRU_FRACTIONS of the experts, and the load of
    the busiest expert over the mean load."""
    seqs = _sequences(inds)
    counts = np.bincount(seqs.reshape(-1), minlength=experts)
    out = {"repeat_prev": repeat_rate(seqs, 1), f"within_{WITHIN}": repeat_rate(seqs, WITHIN)}
    for f in LRU_FRACTIONS:
        out[f"lru_{round(100 * f)}"] = lru_hit_rate(seqs, max(seqs.shape[-1], round(f * experts)))
    out["load_max"] = float(counts.max() / counts.mean())
    return out

"""Several processes sharing each FlashFFN layer's neurons, on MLX's distributed engine.

Under ``mlx.launch -n N`` (any backend: ring, MPI, JACCL), `mlx_flash.load` gives rank r of N
a fixed, contiguous part of every FFN layer's neurons (`Shard.neurons`): it reads, caches and
selects only those, computes its partial FFN output (the FFN is a sum over neurons), and one
``mx.distributed.all_sum`` per layer (`Shard.all_sum`) makes the layer's output, the same on
every rank. Attention, embeddings and norms are replicated: every rank runs the whole model
and samples the same token. Each rank's memory budget is its own (see `model.py`).

A mixture-of-experts model shares each MoE layer's routed experts instead (`Shard.experts`:
rank r owns experts r, r + N, r + 2N, ...): a rank reads and caches only its own experts, its
expert pools are planned for them, and `switch.FlashSwitch` computes the routed output
``[..., k, hidden]`` with the (token, k) entries of experts it does not own set to zero
(`owned_entries`), then sums it over the group. Every entry is owned by exactly one rank and
x + 0 = x exactly, so each rank gets, bit for bit, the output one process computes; the
family's own code (scores, the weighted sum over k, shared experts) runs after it unchanged.
Summing after the family's weighted sum would send k times less but is not exact (the ranks'
partial sums over k, added, round differently from one sum over k) and needs the family's code.

One process (no launcher, or N = 1) is the group of one: nothing is shared and nothing is
summed. What a program does once for the group (printing, reading a terminal) it does on the
primary rank (`is_primary`); a line typed on rank 0 reaches the others with `broadcast_text`.
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass

import mlx.core as mx
import numpy as np


@dataclass(frozen=True)
class Shard:
    """This process's place in the group: rank `rank` of `size` (the group of one by default)."""

    rank: int = 0
    size: int = 1
    group: mx.distributed.Group | None = None  # None: the group of one

    def neurons(self, num_neurons: int) -> tuple[int, int]:
        """The [first, stop) neurons of a layer this rank owns: contiguous, as even as they
        divide (rank r: r * n // size up to (r + 1) * n // size)."""
        return self.rank * num_neurons // self.size, (self.rank + 1) * num_neurons // self.size

    def experts(self, num_experts: int) -> np.ndarray:
        """The experts of an MoE layer this rank owns, sorted: every `size`-th one from `rank`
        (interleaved, so that each rank's share stays even however experts' ids are grouped)."""
        return np.arange(self.rank, num_experts, self.size, dtype=np.int64)

    def owned_entries(self, ids: np.ndarray, num_experts: int) -> np.ndarray | None:
        """Which entries of the router's expert ids `ids` (of a layer of `num_experts`) this rank
        computes: a bool array of their shape; None for one process (every entry)."""
        if self.size == 1:
            return None
        mine = np.zeros(num_experts, dtype=bool)
        mine[self.experts(num_experts)] = True
        return mine[ids]

    def all_sum(self, y: mx.array) -> mx.array:
        """y summed over the group (lazy: evaluated with what uses it); y itself for one process."""
        if self.size == 1:
            return y
        return mx.distributed.all_sum(y, group=self.group)

    @property
    def primary(self) -> bool:
        return self.rank == 0


@functools.cache
def process_shard() -> Shard:
    """The shard of this process: `mx.distributed.init()`'s group (a launcher's environment
    names it; without one, the group of one)."""
    group = mx.distributed.init()
    if group.size() == 1:
        return Shard()
    return Shard(rank=group.rank(), size=group.size(), group=group)


def is_primary() -> bool:
    """Whether this process prints and talks to the user for its group (rank 0, or alone).
    The hook for every front end (generate, chat, the server): other ranks compute in silence."""
    return process_shard().primary


def print_primary(*args, **kwargs) -> None:
    """`print` on the primary rank only."""
    if is_primary():
        print(*args, **kwargs)


def broadcast_bytes(data: bytes | None, shard: Shard | None = None) -> bytes | None:
    """Rank 0's `data` on every rank (the others pass anything, e.g. None); None stays None.
    Two all_sums: the length (-1 for None), then the bytes (zeros from other ranks)."""
    shard = shard or process_shard()
    if shard.size == 1:
        return data
    mine = data if shard.primary else None
    n = -1 if mine is None else len(mine)
    length = int(shard.all_sum(mx.array([n if shard.primary else 0], dtype=mx.int32)).item())
    if length < 0:
        return None
    if length == 0:
        return b""
    own = np.frombuffer(mine, np.uint8) if shard.primary else np.zeros(length, np.uint8)
    return bytes(np.array(shard.all_sum(mx.array(own.astype(np.int32)))).astype(np.uint8))


def broadcast_text(text: str | None, shard: Shard | None = None) -> str | None:
    """Rank 0's `text` on every rank (the others pass anything); None stays None."""
    data = broadcast_bytes(None if text is None else text.encode(), shard)
    return None if data is None else data.decode()


def broadcast_object(obj, shard: Shard | None = None):
    """Rank 0's picklable `obj` on every rank (the others pass anything); None stays None.
    For the group's own processes only (a pickle runs what it is given)."""
    data = broadcast_bytes(None if obj is None else pickle.dumps(obj), shard)
    return None if data is None else pickle.loads(data)


def broadcast_flag(flag: bool, shard: Shard | None = None) -> bool:
    """Rank 0's `flag` on every rank: one all_sum of one integer."""
    shard = shard or process_shard()
    if shard.size == 1:
        return flag
    return int(shard.all_sum(mx.array([int(bool(flag)) if shard.primary else 0], dtype=mx.int32)).item()) > 0

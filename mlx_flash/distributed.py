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
    # Per layer, the size + 1 bounds of the ranks' parts (`balanced`); None: even parts.
    bounds: tuple[tuple[int, ...], ...] | None = None

    def neurons(self, num_neurons: int, layer: int | None = None) -> tuple[int, int]:
        """The [first, stop) neurons of a layer this rank owns: contiguous; as even as they
        divide (rank r: r * n // size up to (r + 1) * n // size), or layer `layer`'s balanced
        part when the shard has bounds."""
        if self.bounds is not None and layer is not None:
            return self.bounds[layer][self.rank], self.bounds[layer][self.rank + 1]
        return self.rank * num_neurons // self.size, (self.rank + 1) * num_neurons // self.size

    def most_neurons(self, num_neurons: int, num_layers: int) -> int:
        """The largest part this rank owns of any layer (what its memory plan is made for)."""
        return max(b - a for a, b in (self.neurons(num_neurons, i) for i in range(num_layers)))

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


# -- balancing the ranks' reads -----------------------------------------------------------------
LOADS_FILE = "neuron_loads.npy"  # in a flash folder: per layer, how often each neuron was read


def part_bounds(loads: np.ndarray, size: int) -> tuple[int, ...]:
    """The size + 1 bounds of `size` contiguous parts of a layer whose neurons were read
    `loads` times each, with about equal reads per part (every part at least one neuron)."""
    n = len(loads)
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(loads, np.float64) + 1e-9)])  # reads of [0, c)
    cuts = [0]
    for j in range(1, size):
        c = int(np.argmin(np.abs(prefix - prefix[-1] * j / size)))
        cuts.append(min(max(c, cuts[-1] + 1), n - (size - j)))
    return (*cuts, n)


def balanced(shard: Shard, folder, num_layers: int, num_neurons: int) -> Shard:
    """`shard` with bounds balancing the ranks' reads per layer, from the folder's calibration
    (`LOADS_FILE`, written by ``python -m mlx_flash.distributed calibrate``); the shard as it
    is without one, alone, or when its shape is not the model's. A group uses rank 0's bounds
    (sent to the others), so that ranks whose files differ still cover each neuron once."""
    from pathlib import Path

    if shard.size == 1 or shard.bounds is not None:
        return shard
    bounds = None
    path = Path(folder) / LOADS_FILE
    if (shard.primary or shard.group is None) and path.is_file():
        loads = np.load(path)
        if loads.shape == (num_layers, num_neurons) and num_neurons >= shard.size:
            bounds = tuple(part_bounds(row, shard.size) for row in loads)
    if shard.group is not None:  # a real group (tests build ranks of one process without one)
        bounds = broadcast_object(bounds, shard)
    return shard if bounds is None else Shard(shard.rank, shard.size, shard.group, bounds)


def calibrate_loads(model, tokenizer, text: str, max_tokens: int = 512) -> np.ndarray:
    """How often each neuron of each layer is read when `model` (one process, flash mode) decodes
    `text` token by token: [layers, neurons], from what enters each layer's neuron cache."""
    from mlx_lm.models.cache import make_prompt_cache

    layers = model.flash.layers
    n = layers[0]._state.num_neurons
    loads = np.zeros((len(layers), n), dtype=np.int64)
    held = [np.zeros(0, np.int64) for _ in layers]
    cache = make_prompt_cache(model)
    for t in tokenizer.encode(text[: 16 * max_tokens])[:max_tokens]:  # a token is rarely 16 characters
        mx.eval(model(mx.array([[t]]), cache=cache))
        for i, ffn in enumerate(layers):
            now = ffn._state.cache.resident_ids()
            loads[i, np.setdiff1d(now, held[i], assume_unique=True)] += 1
            held[i] = np.sort(now)
    return loads


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os
    import sys
    from pathlib import Path

    from .api import load, resolve_flash_folder

    p = argparse.ArgumentParser(
        prog="python -m mlx_flash.distributed",
        description="calibrate: how often each neuron is read (one process, flash mode), written into the "
        f"flash folder as {LOADS_FILE}; under mlx.launch the ranks' parts of each layer then balance their reads",
    )
    p.add_argument("command", choices=["calibrate"])
    p.add_argument("--model", help="flash folder or model folder (default: the demo model)")
    p.add_argument("--text", required=True, help="a UTF-8 text file, decoded token by token")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens of the text decoded (default 512)")
    p.add_argument("--window", type=int, help="the window the model will run with (default: load's)")
    args = p.parse_args(argv)
    folder = resolve_flash_folder(args.model)
    model, tok = load(folder, mode="flash", window=args.window)
    try:
        loads = calibrate_loads(model, tok, Path(args.text).read_text(encoding="utf-8"), args.max_tokens)
    finally:
        model.flash.close()
    tmp = folder / f".{LOADS_FILE}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, loads)
    os.replace(tmp, folder / LOADS_FILE)
    even = loads[:, : loads.shape[1] // 2].sum() / max(1, loads.sum())
    print(
        f"wrote {folder / LOADS_FILE}: {loads.sum()} neuron reads; two even halves would read {even:.3f} / {1 - even:.3f}"
    )
    print("(under mlx.launch, the ranks' parts balance these reads)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from .errors import run_cli

    raise SystemExit(run_cli(main, prog="mlx_flash.distributed"))

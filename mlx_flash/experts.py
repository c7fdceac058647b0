"""The expert cache of an MoE model: per MoE layer a slot pool of experts read from flash.

`ExpertPool` (one per MoE layer) holds, per field of an expert's bundle (``gate_proj.weight``,
``gate_proj.scales``, ...), one preallocated MLX buffer ``[slots, *shape]``: packed quantized
weights as they are (uint32), floats in the compute dtype. The mlx-lm switch module computes on
these buffers with the router's expert ids remapped to slots (`gather_mm` / `gather_qmm` on the
pool), which gives exactly mlx-lm's result. An expert-to-slot map says what is resident.

Per call of a layer (`ExpertCache.fetch`):

    plan = pool.plan(needed)          # hits, misses, and a slot for each miss (evicting)
    future = reader.submit(...)       # all misses of the layer in one request (ExpertCache.submit)
    pool.write(plan.slots, rows)      # once the reads are done (ExpertCache.complete)
    slots = pool.slot_of[indices]     # the router's ids as slots

Eviction is a small pluggable object (`EvictionPolicy`; `LRUPolicy` by default): it is told which
slots each call uses (`touch`) and asked for victims among the slots the current call does not
use (`victims`): a slot the current call uses is never evicted. An empty slot goes first.

Writes follow the neuron cache's rule (`cache` module): each buffer is written only through a
zero-copy numpy view, and whatever MLX computed from the pool is evaluated before the next write
(a decoder does this: the next token's router needs the previous token's output; a prefill
chunk split in parts evaluates each part, see `switch.FlashSwitch`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .cache import host_writable_buffer
from .dtypes import to_float32
from .errors import MlxFlashError
from .expert_policies import POLICIES, EvictionPolicy, LRUPolicy, SlotMap
from .layout import DTYPE_TO_ST, ExpertLayer
from .reader import FlashReader, FlashReadError, ReadFuture


class ExpertChecksumError(FlashReadError, MlxFlashError):
    """An expert read from flash does not match its checksum in the manifest (verify=True)."""


@dataclass
class LayerExpertStats:
    """Counts of one MoE layer since the last reset."""

    calls: int = 0
    needed: int = 0  # distinct experts the calls needed (summed over calls)
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0  # the calls' misses and the look-ahead's reads
    ahead_reads: int = 0  # experts read ahead (ExpertCache.read_ahead), not counted as calls
    ahead_hits: int = 0  # of those, needed by the call they were read for

    @property
    def hit_rate(self) -> float:
        return self.hits / self.needed if self.needed else 0.0


@dataclass
class Plan:
    """What one call of a layer needs: the missing experts and the slots they go to."""

    needed: np.ndarray  # sorted unique expert ids
    missing: np.ndarray
    slots: np.ndarray  # slot of each missing expert
    ahead_hits: int = 0  # needed experts that were resident because they had been read ahead


class ExpertPool(SlotMap):
    """The resident experts of one MoE layer (see the module docstring): the slot map of
    `expert_policies.SlotMap` with the slots' buffers and the layer's hit/miss counts.
    naive: nothing is reused, every call reads all the experts it needs (a baseline)."""

    def __init__(
        self,
        entry: ExpertLayer,
        slots: int,
        compute_dtype: mx.Dtype,
        policy: EvictionPolicy | None = None,
        *,
        naive: bool = False,
    ):
        if not 1 <= slots <= entry.num_experts:
            raise ValueError(f"slots must lie in [1, {entry.num_experts}], got {slots}")
        super().__init__(entry.num_experts, slots, policy or LRUPolicy(slots))
        self.entry = entry
        self.slots = slots
        self.naive = naive
        self.stats = LayerExpertStats()
        self.ahead = np.zeros(entry.num_experts, dtype=bool)  # read ahead for the next call
        pool_float = np.float32 if compute_dtype == mx.float32 else np.float16
        self.buffers: dict[str, mx.array] = {}
        self._host: dict[str, np.ndarray] = {}
        for f in entry.fields:
            dt = np.uint32 if f.dtype == "uint32" else pool_float
            self.buffers[f.name], self._host[f.name] = host_writable_buffer((slots, *f.shape), dt)

    @staticmethod
    def slot_bytes(entry: ExpertLayer, compute_bytes: int) -> int:
        """Memory of one slot: packed weights as stored, floats in the compute dtype."""
        return sum(
            f.nbytes if f.dtype == "uint32" else f.nbytes // _float_bytes(f.dtype) * compute_bytes
            for f in entry.fields
        )

    def plan(self, needed: np.ndarray) -> Plan:
        """Slots for the experts `needed` (sorted, unique) of one call: the resident ones are
        hits; each missing one gets a slot no needed expert holds (evicting its expert)."""
        if self.naive:
            self.slot_of[:] = -1
            self.expert_of[:] = -1
        ahead_hits = int((self.ahead[needed] & (self.slot_of[needed] >= 0)).sum())
        self.ahead[:] = False  # a guess is judged by the call it was read for
        missing, slots = super().plan(needed)
        s = self.stats
        s.calls += 1
        s.needed += len(needed)
        s.misses += len(missing)
        s.hits += len(needed) - len(missing)
        s.ahead_hits += ahead_hits
        return Plan(needed, missing, slots, ahead_hits)

    def place_ahead(self, guess: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slots for guessed experts (`guess`: best first) that are not resident, evicting what the
        policy names (never a guessed resident one), without counting a call or touching the
        policy (a guess is not a use: a wrong one is the first to go again): (experts sorted,
        their slots)."""
        guess = np.asarray(guess, dtype=np.int64)
        have = self.slot_of[guess]
        new = np.unique(guess[have < 0])
        if not len(new):
            return new, new
        protected = np.zeros(len(self.expert_of), dtype=bool)
        protected[have[have >= 0]] = True
        slots = self.policy.victims(len(new), protected, self.expert_of < 0)
        new = new[: len(slots)]
        old = self.expert_of[slots]
        self.slot_of[old[old >= 0]] = -1
        self.expert_of[slots] = new
        self.slot_of[new] = slots
        self.ahead[new] = True
        self.stats.ahead_reads += len(new)
        return new, slots

    def write(self, slots: np.ndarray, bundles: np.ndarray) -> None:
        """Write experts' bundles (uint8 [n, expert_bytes], as stored) into `slots`."""
        n = len(slots)
        for f in self.entry.fields:
            raw = bundles[:, f.offset : f.offset + f.nbytes]
            host = self._host[f.name]
            if f.dtype == "uint32":
                host[slots] = raw.view(np.uint32).reshape(n, *f.shape)
            else:
                st = DTYPE_TO_ST[f.dtype]
                host[slots] = to_float32(np.ascontiguousarray(raw).view(_RAW[st]), st).reshape(n, *f.shape)

    def forget(self, experts: np.ndarray) -> None:
        """Unmap experts whose slots were reserved but never written (a failed read)."""
        slots = self.slot_of[experts]
        self.expert_of[slots[slots >= 0]] = -1
        self.slot_of[experts] = -1

    @property
    def resident(self) -> int:
        return int((self.expert_of >= 0).sum())


_RAW = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def _float_bytes(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]


@dataclass
class Pending:
    """Reads of one call's misses in flight: the plan, and the future of each staged block."""

    layer: int
    plan: Plan
    blocks: list[tuple[np.ndarray, ReadFuture]] = field(default_factory=list)


@dataclass
class Ahead:
    """A look-ahead read in flight: guessed experts of a layer, their slots, the read's future."""

    layer: int
    experts: np.ndarray
    slots: np.ndarray
    future: ReadFuture


class ExpertCache:
    """The pools of all MoE layers, the reader of their bundles, and the staging buffer.

    reader: a FlashReader over `manifest.expert_rows()` (its layer j is MoE layer j).
    stage: experts read per request at most (the staging buffer's rows); a call with more
    misses reads them in several requests, one after the other.
    verify: check every expert read against the manifest's sha256 of its bundle."""

    def __init__(
        self,
        entries: list[ExpertLayer],
        reader: FlashReader,
        slots: int,
        stage: int,
        compute_dtype: mx.Dtype,
        *,
        verify: bool = False,
        policy: str = "lru",
        submit=None,
    ):
        if policy != "naive" and policy not in POLICIES:
            raise MlxFlashError(f"unknown expert policy {policy!r} (one of naive, {', '.join(POLICIES)})")
        self.entries = entries
        self.reader = reader
        self.policy = policy
        naive = policy == "naive"
        self.pools = [
            ExpertPool(e, slots, compute_dtype, POLICIES["lru" if naive else policy](slots), naive=naive)
            for e in entries
        ]
        self.stage = stage
        self.verify = verify
        self._submit = submit  # the runtime's (it times the reader's busy spans), else the reader's
        self._staging = reader.empty_rows(stage, raw=True)["expert.bundle"]
        self._ahead: Ahead | None = None  # one look-ahead read at a time (it uses the staging buffer)

    def fetch(self, layer: int, needed: np.ndarray, timer=None) -> Plan:
        """Make the experts `needed` (sorted, unique) of MoE layer `layer` resident."""
        return self.complete(self.submit(layer, needed, timer), timer)

    def submit(self, layer: int, needed: np.ndarray, timer=None) -> Pending:
        """Plan a call's slots and start reading its misses (the first staged block of them:
        all of them when they fit the staging buffer, as a decoded token's do). A look-ahead
        read still in flight is finished first (it holds the staging buffer; its experts may be
        among these)."""
        self.finish_ahead(timer)
        plan = self.pools[layer].plan(needed)
        pending = Pending(layer, plan)
        if len(plan.missing):
            pending.blocks.append(self._read(layer, plan.missing[: self.stage]))
        return pending

    def complete(self, pending: Pending, timer=None) -> Plan:
        """Wait for a call's reads and write them into the pool; `timer(key, seconds)` is told
        the time spent waiting ("io") and writing ("memory")."""
        layer, plan = pending.layer, pending.plan
        pool = self.pools[layer]
        try:
            for lo in range(0, len(plan.missing), self.stage):
                ids = plan.missing[lo : lo + self.stage]
                if not pending.blocks:
                    pending.blocks.append(self._read(layer, ids))
                _, future = pending.blocks.pop(0)
                t0 = time.perf_counter()
                rows = future.result()["expert.bundle"].view(np.uint8)
                t1 = time.perf_counter()
                if self.verify:
                    self._check(layer, ids, rows)
                pool.write(plan.slots[lo : lo + self.stage], rows)
                pool.stats.bytes_read += len(ids) * pool.entry.expert_bytes
                if timer is not None:
                    timer("io", t1 - t0)
                    timer("memory", time.perf_counter() - t1)
        except BaseException:
            pool.forget(plan.missing)
            raise
        return plan

    def read_ahead(self, layer: int, guess: np.ndarray, limit: int) -> int:
        """Start reading up to `limit` of the experts `guess` (best first) of MoE layer `layer`
        that are not resident, into slots of its pool (`ExpertPool.place_ahead`: not a call, not
        a hit); the layer's next call finds them resident (`submit` finishes the read first).
        Returns how many are read."""
        self.finish_ahead()
        pool = self.pools[layer]
        if pool.naive or limit <= 0:
            return 0
        guess = np.asarray(guess, dtype=np.int64)
        fresh = guess[pool.slot_of[guess] < 0][: min(limit, self.stage)]
        experts, slots = pool.place_ahead(fresh)
        if len(experts):
            _, future = self._read(layer, experts)
            self._ahead = Ahead(layer, experts, slots, future)
        return len(experts)

    def finish_ahead(self, timer=None) -> None:
        """Wait for the look-ahead read in flight, if any, and write it into its pool."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return
        pool = self.pools[ahead.layer]
        try:
            t0 = time.perf_counter()
            rows = ahead.future.result()["expert.bundle"].view(np.uint8)
            t1 = time.perf_counter()
            if self.verify:
                self._check(ahead.layer, ahead.experts, rows)
            pool.write(ahead.slots, rows)
        except BaseException:
            pool.forget(ahead.experts)
            pool.ahead[ahead.experts] = False
            raise
        pool.stats.bytes_read += len(ahead.experts) * pool.entry.expert_bytes
        if timer is not None:
            timer("io", t1 - t0)
            timer("memory", time.perf_counter() - t1)

    def _read(self, layer: int, ids: np.ndarray) -> tuple[np.ndarray, ReadFuture]:
        out = {"expert.bundle": self._staging[: len(ids)]}
        if self._submit is not None:
            return ids, self._submit(layer, ids, out)
        return ids, self.reader.submit(layer, ids, out=out, raw=True)

    def _check(self, layer: int, ids: np.ndarray, rows: np.ndarray) -> None:
        from .layout import expert_digest

        e = self.entries[layer]
        for j, x in enumerate(ids.tolist()):
            if expert_digest(rows[j]) != e.checksums[x]:
                path = str(self.reader.folder / e.file)
                raise ExpertChecksumError(
                    f"{path}: expert {x} of layer {e.layer} (byte {e.expert_offset(x)}) does not match its checksum: "
                    "the file is corrupt; check it with python -m mlx_flash.convert --verify, or convert again",
                    path=path,
                    offset=e.expert_offset(x),
                    layer=e.layer,
                )

    def layer_stats(self) -> list[tuple[int, LayerExpertStats]]:
        return [(e.layer, p.stats) for e, p in zip(self.entries, self.pools)]

    def reset_stats(self) -> None:
        for p in self.pools:
            p.stats = LayerExpertStats()

    def summary(self) -> dict:
        """Per layer hits, misses and bytes, and the run's hit rate (for `flash_stats`)."""
        layers = {
            str(layer): {
                "hits": s.hits,
                "misses": s.misses,
                "bytes_read": s.bytes_read,
                "hit_rate": s.hit_rate,
            }
            for layer, s in self.layer_stats()
        }
        needed = sum(s.needed for _, s in self.layer_stats())
        hits = sum(s.hits for _, s in self.layer_stats())
        ahead = sum(s.ahead_reads for _, s in self.layer_stats())
        ahead_hits = sum(s.ahead_hits for _, s in self.layer_stats())
        return {
            "slots": self.pools[0].slots if self.pools else 0,
            "experts": self.entries[0].num_experts if self.entries else 0,
            "policy": self.policy,
            "hits": hits,
            "misses": needed - hits,
            "bytes_read": sum(s.bytes_read for _, s in self.layer_stats()),
            "hit_rate": hits / needed if needed else 0.0,
            "ahead_reads": ahead,  # look-ahead: experts read on a guess
            "ahead_hits": ahead_hits,  # of those, used by the call they were read for
            "guess_hit_rate": ahead_hits / ahead if ahead else 0.0,
            "layers": layers,
        }

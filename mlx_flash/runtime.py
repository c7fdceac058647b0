"""FlashRuntime: what the FlashFFN layers of one model share.

It owns the flash reader, the mode and selection settings, the memory plan, and the per-pass
statistics: FlashFFN layers report time and counts here, and `stats()` reads them in one place.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from .budget import MemoryPlan, stream_block_neurons
from .cache import host_writable_buffer
from .distributed import Shard
from .layout import SECTOR, Manifest
from .reader import FlashReader, ReadFuture
from .reader.checksums import FlashChecksumError, VerifyingReader  # noqa: F401 - importable from here
from .stats import PassStats, StatsSummary, peak_rss_bytes, summarize


class NeuronBlock(NamedTuple):
    """A block of a layer's neurons as streamed: ids, numpy rows and MLX rows (the same memory
    when read into the streaming buffers)."""

    ids: np.ndarray
    host: dict[str, np.ndarray]
    rows: dict[str, mx.array]


LOOKAHEAD_START = 1.0  # rows read ahead per uncached neuron the guess selects, to begin with
OVERLAP_MIN_ELEMS = 1 << 22  # see FlashRuntime.overlap_min_elems
LOOKAHEAD_WASTE_CAP = 0.25  # wasted look-ahead bytes stay under this share of the bytes read


@dataclass
class Staged:
    """A look-ahead read: layer, the guessed ids (sorted) and the future of their rows."""

    layer: int
    ids: np.ndarray
    future: ReadFuture


class FlashRuntime:
    lookahead_start = LOOKAHEAD_START  # each layer's look-ahead factor, to begin with
    lookahead_max = 4.0  # and at most

    def __init__(
        self,
        manifest: Manifest,
        reader: FlashReader,
        *,
        plan: MemoryPlan,
        compute_dtype: mx.Dtype,
        mode: str = "flash",
        selection: str = "exact",
        window: int = 1,
        act: Callable[[mx.array], mx.array] | None = None,
        shard: Shard | None = None,
    ):
        self.manifest = manifest
        self.reader = reader
        self.mode = mode
        self.selection = selection
        self.window = window
        self.plan = plan
        self.act = act
        self.compute_dtype = compute_dtype
        self.shard = shard or Shard()  # this process's part of each layer's neurons (distributed.py)
        owned = self.shard.most_neurons(manifest.layers[0].num_neurons, len(manifest.layers))
        self.stream_block = stream_block_neurons(owned)
        self.bundle_bytes = manifest.layers[0].bundle_bytes  # bytes of one neuron on flash
        self.records: list[PassStats] = []
        self._current: PassStats | None = None
        self._pass_start = 0.0
        self._layers_seen = 0
        self.predictors = None  # set when predictor selection is loaded
        self.mask_inactive = False  # zero cached neurons not selected for this token (non-ReLU predictors)
        self.lookahead = False  # read layer l+1's guessed neurons while layer l computes (see ffn.py)
        self.layers: list = []  # the FlashFFN of each layer (set at load)
        self.lookahead_factors: dict[int, float] = {}  # per layer, see lookahead_size
        self._layer_waste: dict[int, list[int]] = {}  # per layer: [rows read, rows wasted]
        # look-ahead: a layer computes on its cached rows while the rest is read when they hold at
        # least this many elements (below, the split's second graph costs more than it hides)
        self.overlap_min_elems = OVERLAP_MIN_ELEMS
        self.lookahead_tapped = 0  # layers whose guess comes from the residual stream (ffn.tap_residuals)
        self.lookahead_read_rows = 0  # decoded layers' rows read since the last reset_stats
        self.lookahead_wasted_rows = 0  # of those, read ahead and not needed
        self._staged: Staged | None = None  # the look-ahead read in flight (one at a time)
        self._busy: list[tuple[float, float]] = []  # this pass's read requests (submit, done) times
        self._busy_lock = threading.Lock()
        self._stream_buffers: list[
            tuple[dict[str, np.ndarray], dict[str, mx.array]]
        ] = []  # see stream_blocks
        self.lock = threading.RLock()  # one generation at a time per model
        self.vocab: dict = {}  # "embed" / "head": the vocab.VocabTableReader of a table on flash
        self._opened_by_embedding = False

    # -- statistics ---------------------------------------------------------------------------
    def begin_layer(self, layer: int, tokens: int = 1) -> None:
        """Called by each FlashFFN as it starts; the first layer opens a new pass record (unless
        the embedding read from flash opened it, `begin_pass`)."""
        if layer == 0:
            if self._opened_by_embedding:
                self._opened_by_embedding = False
                return
            self.begin_pass(tokens)
            self._opened_by_embedding = False

    def begin_pass(self, tokens: int) -> None:
        """Open a new pass record (the embedding table on flash calls it, its reads being the
        pass's first)."""
        self.end_pass()
        self._current = PassStats(tokens=tokens)
        self._pass_start = time.perf_counter()
        for r in self.readers():
            r.stats.take()
        self._opened_by_embedding = True

    def readers(self) -> list[FlashReader]:
        """The FFN's (or experts') reader, and those of the vocabulary tables on flash."""
        return [self.reader] + [v.reader for v in self.vocab.values()]

    def end_pass(self) -> None:
        """Close the open pass record (its wall time runs until now)."""
        cur = self._current
        if cur is None:
            return
        cur.wall_ms = (time.perf_counter() - self._pass_start) * 1e3
        taken = [r.stats.take() for r in self.readers()]
        io = [s for t in taken for s in t.values()]
        cur.bytes_read = sum(s.bytes_read for s in io)
        cur.reads = sum(s.reads for s in io)
        cur.io_ms = 1e3 * sum(s.wait_seconds for s in io)  # the reader's clock of waiting callers
        cur.io_ms_by_layer = {layer: 1e3 * s.wait_seconds for layer, s in taken[0].items()}  # the FFN's
        with self._busy_lock:
            spans, self._busy = sorted(self._busy), []
        cur.reader_busy_ms = 1e3 * _union_seconds(spans, self._pass_start)
        self.records.append(cur)
        self._current = None

    def add_time(self, key: str, seconds: float) -> None:
        if self._current is not None:
            setattr(self._current, f"{key}_ms", getattr(self._current, f"{key}_ms") + seconds * 1e3)

    def count_lookahead(self, layer: int, *, needed: int, hits: int, fetched: int | None) -> None:
        """A decoded layer's reads under look-ahead: of `needed` missing neurons (experts, for an
        MoE layer), `hits` had been read ahead, of `fetched` read ahead (None or 0: nothing was
        read ahead for this layer); the rest of `fetched` was wasted. Keeps the running totals
        the cap is on, and adapts the layer's look-ahead size: larger while its waste is under
        80% of the cap, smaller above (a layer whose guess is poor, such as the first, reads
        ahead little)."""
        fetched = fetched or 0
        wasted = fetched - hits
        read = needed - hits + fetched
        self.lookahead_read_rows += read
        self.lookahead_wasted_rows += wasted
        totals = self._layer_waste.setdefault(layer, [0, 0])
        totals[0] += read
        totals[1] += wasted
        if fetched:
            self.record_guess(
                needed=needed, hits=hits, fetched=fetched, wasted_bytes=wasted * self.bundle_bytes
            )
            f = self.lookahead_factor(layer)
            f *= 0.9 if totals[1] > 0.8 * LOOKAHEAD_WASTE_CAP * totals[0] else 1.05
            self.lookahead_factors[layer] = min(max(f, 0.05), self.lookahead_max)

    def lookahead_factor(self, layer: int) -> float:
        """How much `layer` reads ahead per row (expert) its guess names, as `count_lookahead`
        has adapted it."""
        return self.lookahead_factors.get(layer, self.lookahead_start)

    def record_guess(self, *, needed: int, hits: int, fetched: int, wasted_bytes: int) -> None:
        """A guess's outcome in the pass's statistics: of `needed` missing neurons (or experts),
        `hits` had been read ahead, of `fetched` read ahead, `wasted_bytes` of them not used."""
        cur = self._current
        if cur is not None:
            cur.lookahead_needed += needed
            cur.lookahead_hits += hits
            cur.lookahead_rows += fetched
            cur.lookahead_wasted_bytes += wasted_bytes

    def lookahead_size(self, layer: int, selected: int) -> int:
        """Rows to read ahead for `layer` when its guess selects `selected` uncached neurons: the
        layer's adaptive factor times that, within one streaming block and within the waste
        cap's room (`lookahead_room`)."""
        f = self.lookahead_factor(layer)
        return max(0, min(int(f * selected + 0.5), self.lookahead_room(), self.stream_block))

    def lookahead_room(self) -> int:
        """Rows (experts) that may be read ahead now: were every one of them wasted, the wasted
        rows would stay at most LOOKAHEAD_WASTE_CAP of the rows read since the last reset_stats."""
        cap = LOOKAHEAD_WASTE_CAP
        return max(0, int((cap * self.lookahead_read_rows - self.lookahead_wasted_rows) / (1 - cap)))

    def count_token_layer(
        self, layer: int, *, active: int, loaded: int, used: int, overflow: bool = False
    ) -> None:
        cur = self._current
        if cur is not None:
            cur.neurons_active += active
            cur.neurons_loaded += loaded
            cur.cache_used += used
            cur.overflow_layers += int(overflow)

    def reset_stats(self) -> None:
        self.end_pass()
        self.records = []
        self.lookahead_read_rows = self.lookahead_wasted_rows = 0
        self._layer_waste = {}
        mx.reset_peak_memory()

    def stats(self) -> StatsSummary:
        self.end_pass()
        s = summarize(
            self.records,
            resident_bytes=self.plan.total_bytes,
            peak_memory_bytes=mx.get_peak_memory(),
            peak_rss_bytes=peak_rss_bytes(),
        )
        s.extra["mode"] = self.mode
        s.extra["selection"] = self.selection
        s.extra["window"] = self.window
        s.extra["rank"] = self.shard.rank
        s.extra["group_size"] = self.shard.size
        return s

    def all_sum(self, y: mx.array) -> mx.array:
        """A layer's partial output summed over the group, evaluated; the time it took (the
        exchange, and the wait for the slowest rank) is counted apart from compute. One
        process: y as it is, nothing evaluated here."""
        if self.shard.size == 1:
            return y
        mx.eval(y)
        t0 = time.perf_counter()
        y = self.shard.all_sum(y)
        mx.eval(y)
        self.add_time("all_sum", time.perf_counter() - t0)
        return y

    # -- streaming ----------------------------------------------------------------------------
    def submit(
        self, layer: int, ids: np.ndarray, into: dict[str, np.ndarray] | None = None, raw: bool = True
    ) -> ReadFuture:
        """Start reading neurons `ids` of a layer (into the first rows of the buffers `into`, else
        fresh memory); every read of the token path goes through here, so that the reader's busy
        time (the union of its requests' lifetimes, timed by the reader's completion) is known."""
        out = None if into is None else {k: v[: len(ids)] for k, v in into.items()}
        t0 = time.perf_counter()
        future = self.reader.submit(layer, ids, out=out, raw=raw)

        def done(_f, t0=t0) -> None:
            with self._busy_lock:
                self._busy.append((t0, time.perf_counter()))

        future.add_done_callback(done)
        return future

    def missing_buffer(self) -> tuple[dict[str, np.ndarray], dict[str, mx.array]]:
        """The buffer a decoded token's missing rows are read into (numpy and MLX views of it):
        the first streaming buffer, idle while decoding; `stream_block` rows."""
        return self._streaming_buffers()[0]

    def read_missing(self, layer: int, ids: np.ndarray) -> ReadFuture:
        """Start reading a decoded token's missing neurons: a future of their numpy rows, in the
        missing buffer when they fit (valid until the next read into it), else fresh memory."""
        if len(ids) > self.stream_block:
            return self.submit(layer, ids)
        return self.submit(layer, ids, self.missing_buffer()[0])

    # -- look-ahead ---------------------------------------------------------------------------
    def stage(self, layer: int, ids: np.ndarray) -> None:
        """Start reading layer `layer`'s guessed neurons `ids` (sorted) into the look-ahead buffer
        (the second streaming buffer); `take_staged(layer)` collects them."""
        self.drop_staged()
        ids = ids[: self.stream_block]
        if len(ids):
            self._staged = Staged(layer, ids, self.submit(layer, ids, self._streaming_buffers()[1][0]))

    def take_staged(self, layer: int) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, mx.array]] | None:
        """The look-ahead rows of `layer` (ids, numpy rows, MLX rows over the same memory; valid
        until the buffer is next read into), waiting for them if still in flight; None (and
        anything staged for another layer dropped) when there are none."""
        st = self._staged
        if st is None or st.layer != layer:
            self.drop_staged()
            return None
        self._staged = None
        rows = st.future.result()
        return st.ids, rows, {k: v[: len(st.ids)] for k, v in self._streaming_buffers()[1][1].items()}

    def drop_staged(self) -> None:
        """Forget the look-ahead read, once it has landed (its buffer is reused next)."""
        st, self._staged = self._staged, None
        if st is not None:
            self.count_lookahead(st.layer, needed=0, hits=0, fetched=len(st.ids))  # read, and not used
            try:
                st.future.result()
            except BaseException:  # noqa: BLE001 - a guess's failure is nobody's error
                pass

    def stream_blocks(self, layer: int, ids: np.ndarray, *, floats: bool = False) -> Iterator[NeuronBlock]:
        """Neurons `ids` of a layer in blocks of the streaming buffer's size, as `NeuronBlock`s
        (block ids, numpy rows, MLX rows over the same memory), the next block's read running
        while the caller computes on the current one: the one double-buffered block loop.

        Each block is read straight into one of two aligned MLX buffers that live as long as the
        runtime, alternately: no copy into MLX, no fresh memory per block (a 7B layer streamed
        into fresh arrays spends more time in page faults than in reads). The caller evaluates
        whatever it computed from a block before asking for the next one: the read of block i+1
        goes into the buffer of block i-1. Rows are the stored fields in a quantized folder;
        `floats`: float32 rows instead (read into fresh memory, then copied into MLX)."""
        self.drop_staged()  # the look-ahead's buffer is the second streaming buffer
        dequantize = floats and self.manifest.quantized
        buffers = None if dequantize else self._streaming_buffers()
        blocks = [ids[i : i + self.stream_block] for i in range(0, len(ids), self.stream_block)]

        def submit(i: int) -> ReadFuture:
            if buffers is None:
                return self.submit(layer, blocks[i], raw=False)
            return self.submit(layer, blocks[i], buffers[i % 2][0])

        pending = submit(0) if blocks else None
        try:
            for i, block in enumerate(blocks):
                rows = pending.result()
                pending = submit(i + 1) if i + 1 < len(blocks) else None
                n = len(block)
                if buffers is None:
                    arrays = {k: mx.array(v) for k, v in rows.items()}
                else:
                    arrays = {k: v[:n] for k, v in buffers[i % 2][1].items()}
                yield NeuronBlock(block, rows, arrays)
        finally:
            if (
                pending is not None
            ):  # abandoned (an error, Ctrl-C): the read must not land in a buffer in use later
                try:
                    pending.result()
                except BaseException:  # noqa: BLE001 - its error is not this caller's
                    pass

    def _streaming_buffers(self) -> list[tuple[dict[str, np.ndarray], dict[str, mx.array]]]:
        """The two aligned streaming buffers (made on first use), each as (numpy views, MLX arrays)."""
        if not self._stream_buffers:
            for _ in range(2):
                fields = self.reader.empty_rows(
                    0, raw=True
                )  # (0, elems) arrays: each field's width and dtype
                pairs = {
                    k: host_writable_buffer((self.stream_block, v.shape[1]), v.dtype, align=SECTOR)
                    for k, v in fields.items()
                }  # aligned: O_DIRECT reads land in them directly
                self._stream_buffers.append(
                    ({k: h for k, (_, h) in pairs.items()}, {k: b for k, (b, _) in pairs.items()})
                )
        return self._stream_buffers

    def predict(self, layer: int, x: mx.array) -> np.ndarray:
        if self.predictors is None:
            raise RuntimeError("selection='predictor' but no predictors are loaded")
        return self.predictors.predict(layer, x)

    def close(self) -> None:
        self.drop_staged()
        for r in self.readers():
            r.close()


def _union_seconds(spans: list[tuple[float, float]], start: float) -> float:
    """Total length of the union of sorted (begin, end) intervals, clipped to begin at `start`."""
    total, hi = 0.0, start
    for a, b in spans:
        a = max(a, hi)
        if b > a:
            total += b - a
            hi = b
    return total

"""I/O counters of the flash reader: bytes, reads (and whether they landed straight in the
caller's buffers or went through scratch), waiting time and a latency distribution, per layer,
resettable per token.

The reader's engines count where the work happens (one locked update per finished
request, not per read) and the caller reads one consistent copy with `IOStats.snapshot()`, or
takes it and starts a new token's count at once with `IOStats.take()`.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np

# Latency histogram: bucket k holds latencies in [2**(k/4), 2**((k+1)/4)) microseconds, i.e.
# four buckets per doubling (a quantile is known to within 19%), from 1 us to about 70 s.
_BUCKETS_PER_DOUBLING = 4
_NUM_BUCKETS = 26 * _BUCKETS_PER_DOUBLING


class LatencyHistogram:
    """A log-bucketed histogram of durations: constant memory however long the run."""

    __slots__ = ("counts", "total_seconds", "max_seconds")

    def __init__(self) -> None:
        self.counts = np.zeros(_NUM_BUCKETS, dtype=np.int64)
        self.total_seconds = 0.0
        self.max_seconds = 0.0

    @staticmethod
    def bucket_of(seconds: float) -> int:
        us = max(seconds * 1e6, 1.0)
        return min(int(math.log2(us) * _BUCKETS_PER_DOUBLING), _NUM_BUCKETS - 1)

    @staticmethod
    def bucket_upper_seconds(k: int) -> float:
        return 2.0 ** ((k + 1) / _BUCKETS_PER_DOUBLING) * 1e-6

    def add(self, seconds: float) -> None:
        self.counts[self.bucket_of(seconds)] += 1
        self.total_seconds += seconds
        self.max_seconds = max(self.max_seconds, seconds)

    def add_many(self, seconds: list[float]) -> None:
        if not seconds:
            return
        x = np.maximum(np.asarray(seconds, dtype=np.float64) * 1e6, 1.0)
        k = np.minimum((np.log2(x) * _BUCKETS_PER_DOUBLING).astype(np.int64), _NUM_BUCKETS - 1)
        self.counts += np.bincount(k, minlength=_NUM_BUCKETS)
        self.total_seconds += float(np.sum(seconds))
        self.max_seconds = max(self.max_seconds, float(np.max(seconds)))

    def merge(self, other: LatencyHistogram) -> None:
        self.counts += other.counts
        self.total_seconds += other.total_seconds
        self.max_seconds = max(self.max_seconds, other.max_seconds)

    def copy(self) -> LatencyHistogram:
        h = LatencyHistogram()
        h.merge(self)
        return h

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    @property
    def mean_seconds(self) -> float:
        n = self.count
        return self.total_seconds / n if n else 0.0

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile q (0..1), in seconds; 0 when empty."""
        n = self.count
        if not n:
            return 0.0
        k = int(np.searchsorted(np.cumsum(self.counts), max(1, math.ceil(q * n))))
        return min(self.bucket_upper_seconds(k), self.max_seconds)


@dataclass
class LayerIOStats:
    """What one layer's reads cost. `bytes_read` counts whole aligned reads (what the disk
    delivered); `bytes_used` the bundle bytes asked for (the rest was read and discarded to
    make fewer, larger reads)."""

    requests: int = 0
    neurons: int = 0
    reads: int = 0
    bytes_read: int = 0
    bytes_used: int = 0
    reads_into_outputs: int = 0  # reads whose rows landed straight in the caller's buffers
    reads_via_scratch: int = 0  # reads that landed in scratch and were copied/converted
    wait_seconds: float = 0.0  # time callers blocked in Future.result()
    read_latency: LatencyHistogram = field(default_factory=LatencyHistogram)  # one pread
    request_latency: LatencyHistogram = field(default_factory=LatencyHistogram)  # submit -> done

    @classmethod
    def of_reads(
        cls, bytes_read: int, bytes_used: int, latencies, into_outputs: int, via_scratch: int
    ) -> LayerIOStats:
        """The counts of a batch of reads (`latencies`: seconds, one per low-level read)."""
        s = cls(bytes_read=bytes_read, bytes_used=bytes_used, reads=len(latencies))
        s.reads_into_outputs, s.reads_via_scratch = into_outputs, via_scratch
        s.read_latency.add_many(latencies)
        return s

    def merge(self, other: LayerIOStats) -> None:
        self.requests += other.requests
        self.neurons += other.neurons
        self.reads += other.reads
        self.bytes_read += other.bytes_read
        self.bytes_used += other.bytes_used
        self.reads_into_outputs += other.reads_into_outputs
        self.reads_via_scratch += other.reads_via_scratch
        self.wait_seconds += other.wait_seconds
        self.read_latency.merge(other.read_latency)
        self.request_latency.merge(other.request_latency)

    def copy(self) -> LayerIOStats:
        c = LayerIOStats()
        c.merge(self)
        return c


class IOStats:
    """Per-layer `LayerIOStats`, safe to update from the reader's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._layers: dict[int, LayerIOStats] = {}

    def add(self, layer: int, delta: LayerIOStats) -> None:
        with self._lock:
            self._layers.setdefault(layer, LayerIOStats()).merge(delta)

    def add_counts(
        self,
        layer: int,
        neurons: int,
        bytes_read: int,
        bytes_used: int,
        calls: int,
        into_outputs: int,
        via_scratch: int,
        timed: int,
        total_ns: int,
        max_ns: int,
        request_ns: int,
        histogram: bytes,
    ) -> None:
        """One request counted by an engine that summed it itself (the native engine's batch
        statistics: its reads' latency histogram as int64 bucket counts, in nanoseconds)."""
        with self._lock:
            s = self._layers.get(layer)
            if s is None:
                s = self._layers[layer] = LayerIOStats()
            s.requests += 1
            s.neurons += neurons
            s.reads += calls
            s.bytes_read += bytes_read
            s.bytes_used += bytes_used
            s.reads_into_outputs += into_outputs
            s.reads_via_scratch += via_scratch
            h = s.read_latency
            if timed:
                h.counts += np.frombuffer(histogram, dtype=np.int64)
                h.total_seconds += total_ns * 1e-9
                h.max_seconds = max(h.max_seconds, max_ns * 1e-9)
            s.request_latency.add(request_ns * 1e-9)

    def add_wait(self, layer: int, seconds: float) -> None:
        with self._lock:
            s = self._layers.get(layer)
            if s is None:
                s = self._layers[layer] = LayerIOStats()
            s.wait_seconds += seconds

    def snapshot(self) -> dict[int, LayerIOStats]:
        """A consistent copy of every layer's counters."""
        with self._lock:
            return {k: v.copy() for k, v in self._layers.items()}

    def take(self) -> dict[int, LayerIOStats]:
        """The counters since the last take/reset, zeroing them (e.g. once per token)."""
        with self._lock:
            out, self._layers = self._layers, {}
        return out

    def reset(self) -> None:
        self.take()

    def total(self) -> LayerIOStats:
        """All layers summed."""
        out = LayerIOStats()
        for s in self.snapshot().values():
            out.merge(s)
        return out

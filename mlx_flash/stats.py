"""Where every millisecond of a token went: per-forward-pass records and their summary.

A record covers one forward pass of the model (one decoded token, or one prefill chunk). It is
opened when the first FFN layer starts and closed when the next pass starts (or when asked),
so its wall time covers the whole token; `compute_ms` is what is left after selection, waiting
for I/O and cache management, i.e. the attention, the FFN matmuls and the sampling.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass, field

TIME_KEYS = ("selection", "io", "memory", "all_sum", "compute")


def peak_rss_bytes() -> int:
    """The process's peak resident memory in bytes (getrusage gives kB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


@dataclass
class PassStats:
    tokens: int  # tokens in this pass (1 when decoding)
    wall_ms: float = 0.0
    selection_ms: float = 0.0
    io_ms: float = 0.0  # the token waited on flash reads (the reader's clock of blocked callers)
    memory_ms: float = 0.0  # neuron cache management
    all_sum_ms: float = 0.0  # several processes: summing the layers' outputs over the group
    bytes_read: int = 0
    reads: int = 0
    neurons_active: int = 0  # summed over layers
    neurons_loaded: int = 0  # summed over layers: read from flash this pass
    cache_used: int = 0  # summed over layers: cached rows the FFN computed on
    streamed_ms: float = 0.0  # compute of streamed blocks (part of compute)
    overflow_layers: int = 0  # layers whose active set exceeded the cache (read and computed in blocks)
    reader_busy_ms: float = 0.0  # the reader had a request in flight (overlapped with compute or not)
    lookahead_needed: int = 0  # summed over layers: missing neurons when the layer ran
    lookahead_hits: int = 0  # of those, read ahead while the layer before computed
    lookahead_rows: int = 0  # neurons read ahead
    lookahead_wasted_bytes: int = 0  # read ahead and not needed
    io_ms_by_layer: dict[int, float] = field(default_factory=dict)  # the FFN's (experts') I/O wait per layer

    @property
    def compute_ms(self) -> float:
        return max(0.0, self.wall_ms - self.selection_ms - self.io_ms - self.memory_ms - self.all_sum_ms)

    @property
    def is_prefill(self) -> bool:
        return self.tokens > 1

    @property
    def window_hit_rate(self) -> float:
        """Fraction of this token's active neurons already in memory."""
        return 1.0 - self.neurons_loaded / self.neurons_active if self.neurons_active else 0.0

    @property
    def lookahead_recall(self) -> float:
        """Fraction of the neurons the layers had to load that the look-ahead had read."""
        return self.lookahead_hits / self.lookahead_needed if self.lookahead_needed else 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["lookahead_recall"] = self.lookahead_recall
        d["compute_ms"] = self.compute_ms
        d["window_hit_rate"] = self.window_hit_rate
        return d


@dataclass
class StatsSummary:
    """Mean per decoded token (prefill reported apart)."""

    decode_tokens: int
    ms_per_token: float
    selection_ms: float
    io_ms: float
    memory_ms: float
    compute_ms: float
    bytes_per_token: float
    reads_per_token: float
    neurons_loaded_per_token: float
    window_hit_rate: float
    prefill_tokens: int
    prefill_ms: float
    prefill_bytes: int
    reader_busy_ms: float = 0.0
    lookahead_recall: float = 0.0
    lookahead_wasted_bytes_per_token: float = 0.0
    lookahead_wasted_fraction: float = 0.0  # of the bytes read
    resident_bytes: int = 0
    peak_memory_bytes: int = 0  # MLX's allocations
    peak_rss_bytes: int = 0  # the whole process (Python, libraries, reader buffers)
    all_sum_ms: float = 0.0  # several processes: the layers' outputs summed over the group
    io_ms_by_layer: list[float] = field(default_factory=list)  # I/O wait per token, per FFN (MoE) layer
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def group_size(self) -> int:
        """Processes sharing the model's FFN neurons (1: one process; see distributed.py)."""
        return self.extra.get("group_size", 1)

    def format(self) -> str:
        ms = self.ms_per_token or 1e-9
        lines = [
            f"decode: {self.decode_tokens} tokens, {self.ms_per_token:.1f} ms/token ({1000 / ms:.1f} tok/s)",
            "  per token: "
            + ", ".join(
                f"{name} {v:.1f} ms ({100 * v / ms:.0f}%)"
                for name, v in (
                    ("selection", self.selection_ms),
                    ("I/O wait", self.io_ms),
                    ("cache", self.memory_ms),
                    *((("all_sum", self.all_sum_ms),) if self.group_size > 1 else ()),
                    ("compute", self.compute_ms),
                )
            ),
            f"  reader busy {self.reader_busy_ms:.1f} ms per token (I/O wait is the part the token waited for)"
            + (
                f"; look-ahead recall {100 * self.lookahead_recall:.1f}%, wasted "
                f"{self.lookahead_wasted_bytes_per_token / 1e6:.2f} MB/token "
                f"({100 * self.lookahead_wasted_fraction:.1f}% of bytes read)"
                if self.lookahead_recall or self.lookahead_wasted_bytes_per_token
                else ""
            ),
            f"  flash: {self.bytes_per_token / 1e6:.2f} MB in {self.reads_per_token:.0f} reads per token, "
            f"{self.neurons_loaded_per_token:.0f} neurons loaded, window hit rate {100 * self.window_hit_rate:.1f}%",
        ]
        if self.group_size > 1:
            lines.append(
                f"group: rank {self.extra.get('rank', 0)} of {self.group_size} processes; "
                "flash figures and memory are this rank's own"
            )
        ex = self.extra.get("experts")
        if ex:
            mine = ex.get("owned", ex["experts"])
            of = f"this rank's {mine} (of {ex['experts']})" if mine < ex["experts"] else f"{ex['experts']}"
            lines.append(
                f"  experts: {ex['slots']} of {of} per layer in memory, hit rate {100 * ex['hit_rate']:.1f}% "
                f"({ex['hits']} hits, {ex['misses']} misses, {ex['bytes_read'] / 1e6:.1f} MB read, prefill included)"
            )
        if self.prefill_tokens:
            lines.append(
                f"prefill: {self.prefill_tokens} tokens in {self.prefill_ms:.0f} ms, {self.prefill_bytes / 1e6:.1f} MB read"
            )
        lines.append(
            f"memory: plan {self.resident_bytes / 1e6:.1f} MB, peak {self.peak_memory_bytes / 1e6:.1f} MB of MLX "
            f"allocations, process peak RSS {self.peak_rss_bytes / 1e6:.0f} MB"
        )
        return "\n".join(lines)


def summarize(
    records: list[PassStats], resident_bytes: int = 0, peak_memory_bytes: int = 0, peak_rss_bytes: int = 0
) -> StatsSummary:
    dec = [r for r in records if not r.is_prefill]
    pre = [r for r in records if r.is_prefill]
    n = len(dec) or 1

    def mean(key: str) -> float:
        return sum(getattr(r, key) for r in dec) / n

    needed = sum(r.lookahead_needed for r in dec)
    read = sum(r.bytes_read for r in dec)
    wasted = sum(r.lookahead_wasted_bytes for r in dec)
    active = sum(r.neurons_active for r in dec)
    loaded = sum(r.neurons_loaded for r in dec)
    layers = 1 + max((k for r in dec for k in r.io_ms_by_layer), default=-1)
    return StatsSummary(
        decode_tokens=len(dec),
        ms_per_token=mean("wall_ms"),
        selection_ms=mean("selection_ms"),
        io_ms=mean("io_ms"),
        memory_ms=mean("memory_ms"),
        compute_ms=mean("compute_ms"),
        all_sum_ms=mean("all_sum_ms"),
        bytes_per_token=mean("bytes_read"),
        reads_per_token=mean("reads"),
        neurons_loaded_per_token=mean("neurons_loaded"),
        window_hit_rate=1.0 - loaded / active if active else 0.0,
        reader_busy_ms=mean("reader_busy_ms"),
        lookahead_recall=sum(r.lookahead_hits for r in dec) / needed if needed else 0.0,
        lookahead_wasted_bytes_per_token=mean("lookahead_wasted_bytes"),
        lookahead_wasted_fraction=wasted / read if read else 0.0,
        io_ms_by_layer=[sum(r.io_ms_by_layer.get(k, 0.0) for r in dec) / n for k in range(layers)],
        prefill_tokens=sum(r.tokens for r in pre),
        prefill_ms=sum(r.wall_ms for r in pre),
        prefill_bytes=sum(r.bytes_read for r in pre),
        resident_bytes=resident_bytes,
        peak_memory_bytes=peak_memory_bytes,
        peak_rss_bytes=peak_rss_bytes,
    )

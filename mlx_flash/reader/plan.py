"""Planning: a request's rows become aligned, coalesced reads (the cost model's defaults), and
what each read's bytes become (straight into the output rows, or converted from scratch).

Per segment (one when bundled, one per part otherwise), each wanted neuron's byte range is
widened to whole blocks of the reader's `align` (O_DIRECT needs aligned offsets, lengths and
buffers), neighbours whose gap on flash is at most `coalesce_gap` bytes are merged into one
read (reading the gap and discarding it is cheaper than a second read), and no read grows past
about `max_read` bytes (so that a dense range still spreads over the engine's reads in flight).
Where every part of a row fills whole blocks and is stored as the output's dtype (float32:
the paper's CPU setting), a read is *vectored*: each part of each row goes straight into its
output row, the gaps into a junk buffer. Otherwise it lands in scratch and `scatter` converts
its rows into the outputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..layout import SECTOR, Manifest, Segment
from .files import FlashFile

# Defaults chosen by the cost model that `python benchmarks/bench_io.py --out DIR --file-gb 8`
# measured on the project's Linux machine (2 cores shared at load 10-16, virtio disk, ext4,
# O_DIRECT), in two runs of the full grid (tables in benchmarks/RESULTS.md; the disk's speed
# drifts, so each run alone picks differently). The reader's aggregate time per random read of
# c bytes fits t(c) = a + b*c; at 32 threads a = 17.8 / 19.4 us, b = 0.70 / 0.52 ns per byte.
# - threads (reads in flight): the fewest reaching 95% of the best mean throughput over
#   16-64 KiB chunks (bundle sizes), both runs pooled: 8 / 16 / 32 gave 637 / 680 / 721 MB/s:
#   32 (the paper's).
# - coalesce_gap: merging two reads g bytes apart saves a and costs b*g, so a gap below a/b is
#   read and discarded: a/b at 32 threads was 24.9 and 36.2 KiB; their mean, in whole sectors.
# - max_read: the smallest chunk reaching 95% of the best throughput at 32 threads: 1 MiB in
#   both runs.
DEFAULT_THREADS = 32
DEFAULT_COALESCE_GAP = 28 * 1024
DEFAULT_MAX_READ = 1024 * 1024

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
RAW_DTYPES = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
}


@dataclass(frozen=True)
class SegmentReads:
    """How one segment of a layer is read. Vectored: the stored rows are float32 and every part
    fills whole blocks, so one vectored read puts each part of each row straight into its
    output row (no copy, no scratch); otherwise a read lands in scratch and its rows are
    converted into the outputs."""

    segment: Segment
    file: FlashFile
    columns: tuple[tuple[str, int, int, str], ...]  # (output, first byte, end byte, stored dtype) in a row
    vectored: bool


class Chunk(NamedTuple):
    """One aligned read: sorted ids [first, stop) of a request, bytes [offset, offset+length)
    of the file, of which the first `need` must arrive (the rest may lie past end of file).
    (A NamedTuple: made and read per read, in the hot loop.)"""

    reads: SegmentReads
    first: int
    stop: int
    offset: int
    length: int
    need: int


class SegmentPlan(NamedTuple):
    """The reads of one segment of a request, as arrays (see `plan_chunks`): read c covers the
    request's sorted ids first[c]..stop[c]-1, bytes [offset[c], offset[c] + length[c]) of
    which need[c] must arrive."""

    reads: SegmentReads
    first: np.ndarray
    stop: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    need: np.ndarray

    def chunks(self) -> list[Chunk]:
        return [Chunk(self.reads, *c) for c in zip(*(a.tolist() for a in self[1:]))]


def plan_chunks(
    starts: np.ndarray, row_bytes: int, coalesce_gap: int, max_read: int, align: int = SECTOR
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Group rows starting at sorted byte offsets `starts` into aligned reads.

    Returns (first, stop, offset, length, need): read c covers rows first[c]..stop[c]-1, starts
    at the `align`-aligned `offset[c]`, is `length[c]` bytes (a multiple of `align`) and must
    deliver at least `need[c]` bytes (its last row's end; the rest may lie past end of file).
    Two rows share a read when the bytes between their aligned ranges are <= coalesce_gap (a
    negative gap merges only rows that share a sector); a read stops growing once it spans
    `max_read` bytes, so it is at most max_read + row_bytes + align long."""
    ends = starts + row_bytes
    a0 = starts // align * align
    a1 = -(-ends // align) * align
    n = len(starts)
    gap_break = np.zeros(n, dtype=bool)
    gap_break[0] = True
    gap_break[1:] = a0[1:] - a1[:-1] > coalesce_gap
    group = np.cumsum(gap_break) - 1
    group_start = a0[np.flatnonzero(gap_break)][group]
    window = (a1 - 1 - group_start) // max(max_read, 1)
    new = gap_break.copy()
    new[1:] |= window[1:] != window[:-1]
    first = np.flatnonzero(new)
    stop = np.append(first[1:], n)
    offset = a0[first]
    return first, stop, offset, a1[stop - 1] - offset, ends[stop - 1] - offset


@dataclass(frozen=True)
class Planner:
    """Turns (layer, sorted unique ids) into the `Chunk`s that read them."""

    manifest: Manifest
    align: int
    coalesce_gap: int
    max_read: int

    def segment_reads(self, seg: Segment, file: FlashFile) -> SegmentReads:
        cols = tuple((c.key, c.start, c.stop, c.dtype) for c in self.manifest.columns(seg))
        vectored = (
            not self.manifest.quantized
            and self.manifest.dtype == "float32"
            and all((c1 - c0) % self.align == 0 for _, c0, c1, _ in cols)
            and seg.data_offset % self.align == 0  # rows start on blocks (a flash file's do; a
            and seg.row_bytes % self.align == 0  # vocabulary table in the dense file's need not)
        )
        return SegmentReads(seg, file, cols, vectored)

    def plan(self, reads: SegmentReads, ids: np.ndarray) -> SegmentPlan:
        seg = reads.segment
        starts = seg.data_offset + ids * seg.row_bytes
        return SegmentPlan(
            reads, *plan_chunks(starts, seg.row_bytes, self.coalesce_gap, self.max_read, self.align)
        )


def convert_into(out: np.ndarray, where: slice | np.ndarray, src: np.ndarray, dtype: str) -> None:
    """out[where] = src as float32 (float16 by numpy's cast; bfloat16 bits shifted into the
    high half of a float32, which is exact)."""
    if dtype == "bfloat16":
        if isinstance(where, slice):
            np.left_shift(src, 16, out=out[where].view(np.uint32), dtype=np.uint32)
            return
        src = (src.astype(np.uint32) << 16).view(np.float32)
    out[where] = src

"""The flash reader: aligned, page-cache-bypassing reads of neuron bundles, many in flight.

A planning layer (`plan`: rows to aligned, coalesced reads and the cost model's defaults;
`request`: where each read lands and what it becomes; `checksums`: rows verified against the
checksums taken at load) and engines that only execute reads (`native`, the C extension `_native.c`: io_uring or
pthreads; `threads`; chosen in `engines`), with the I/O counters in `stats`. `FlashReader` (`flash_reader`) puts them
together; this package's names are its public API."""

from .checksums import FlashChecksumError, VerifyingReader
from .engines import ENGINE_NAMES, available_engines, default_engine_name, make_engine
from .errors import FlashReadError, ReaderClosedError
from .faults import Fault
from .files import direct_alignment
from .flash_reader import FlashReader
from .plan import DEFAULT_COALESCE_GAP, DEFAULT_MAX_READ, DEFAULT_THREADS, plan_chunks
from .request import ReadFuture
from .stats import IOStats, LatencyHistogram, LayerIOStats
from .threads import ThreadEngine

__all__ = [
    "DEFAULT_COALESCE_GAP",
    "DEFAULT_MAX_READ",
    "DEFAULT_THREADS",
    "ENGINE_NAMES",
    "Fault",
    "FlashChecksumError",
    "FlashReadError",
    "FlashReader",
    "IOStats",
    "LatencyHistogram",
    "LayerIOStats",
    "ReadFuture",
    "ReaderClosedError",
    "ThreadEngine",
    "VerifyingReader",
    "available_engines",
    "default_engine_name",
    "direct_alignment",
    "make_engine",
    "plan_chunks",
]

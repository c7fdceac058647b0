"""The engines that execute a reader's reads, and the choice among them.

An engine takes `Request`s (`start`) and executes their reads, reporting each through the
request's methods; `close` stops it once the reads in flight have stopped. Every engine takes
fault injection as an argument (`faults`, see `faults.Fault`).

- "native-io_uring", "native-pthreads": the C extension (`native`, `_native.c`): a whole
  request's reads submitted in one call, executed with the GIL released, through io_uring
  (Linux, where the kernel and container allow it) or a pthread pool of preads (everywhere,
  macOS included, where the files are opened with F_NOCACHE and read-ahead off). "native" is
  `native.DEFAULT_BACKEND`: io_uring where it runs (less CPU per read, as fast), else pthreads.
- "threads": a pool of Python threads (`threads`), the reference and the fallback.

(A Linux native AIO engine through ctypes was removed once the native engine existed: in
`benchmarks/bench_io.py` it was slower than the native engine in 38 of 40 cells and used more
CPU per read in all of them; benchmarks/RESULTS.md.)

The default is the fastest that loads: native, else threads (said once, in a log warning).
"""

from __future__ import annotations

import logging

from . import native
from .faults import Fault
from .threads import ThreadEngine

ENGINE_NAMES = ("native", "native-io_uring", "native-pthreads", "threads")
_log = logging.getLogger("mlx_flash")
_said_fallback = False


def available_engines() -> list[str]:
    """The engines that run on this machine, by their concrete names, fastest first."""
    names = [f"native-{b}" for b in native.BACKENDS if native.backend_error(b) is None]
    names.append("threads")
    return names


def default_engine_name() -> str:
    """native where it loads, else threads (saying so once per process)."""
    global _said_fallback
    why = native.load_error()
    if why is None:
        return "native"
    if not _said_fallback:
        _said_fallback = True
        _log.warning(
            "mlx_flash: the native reader engine is not available (%s); reading with Python threads, "
            "which costs more CPU per read. Reinstall mlx_flash where a C compiler is present to build it.",
            why,
        )
    return "threads"


def make_engine(name: str | None, depth: int, *, faults: tuple[Fault, ...] = ()):
    """An engine by name (None: `default_engine_name()`) with `depth` reads in flight."""
    name = name or default_engine_name()
    if name == "threads":
        return ThreadEngine(depth, faults=faults)
    if name in ("native", "native-io_uring", "native-pthreads"):
        backend = native.DEFAULT_BACKEND if name == "native" else name.split("-", 1)[1]
        return native.NativeEngine(depth, backend=backend, faults=faults)
    raise ValueError(f"engine must be one of {', '.join(ENGINE_NAMES)}, got {name!r}")

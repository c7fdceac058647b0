"""The engines that execute a reader's reads, and the choice among them.

An engine takes `Request`s (`start`) and executes their reads, reporting each through the
request's methods; `close` stops it once the reads in flight have stopped. Every engine takes
fault injection as an argument (`faults`, see `faults.Fault`).

- "threads": a pool of Python threads (`threads`), the reference and the default.
- "aio": Linux native AIO through ctypes (`aio`), needs O_DIRECT.
"""

from __future__ import annotations

import os

from . import kernel_aio
from .aio import AioEngine
from .faults import Fault
from .threads import ThreadEngine

ENGINE_NAMES = ("threads", "aio")


def available_engines() -> list[str]:
    """The engines that load on this machine, fastest first."""
    names = ["threads"]
    if kernel_aio.available() and hasattr(os, "O_DIRECT"):
        names.append("aio")
    return names


def default_engine_name() -> str:
    return "threads"


def make_engine(name: str | None, depth: int, *, faults: tuple[Fault, ...] = ()):
    """An engine by name (None: `default_engine_name()`) with `depth` reads in flight."""
    name = name or default_engine_name()
    if name == "threads":
        return ThreadEngine(depth, faults=faults)
    if name == "aio":
        return AioEngine(depth, faults=faults)
    raise ValueError(f"engine must be one of {', '.join(ENGINE_NAMES)}, got {name!r}")

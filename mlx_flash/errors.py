"""The project's user-facing errors, and how a command-line entry point reports them.

Every mistake a user can make (a bad folder, a corrupt shard, a budget too small, an
unsupported model) raises a subclass of `MlxFlashError` whose message is one line saying what
is wrong and what to do. The CLIs print that line and exit non-zero, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

_Closable = TypeVar("_Closable")


class MlxFlashError(ValueError):
    """A user-facing error with a one-line message."""


def one_line(text: object, limit: int = 300) -> str:
    """A message from elsewhere (a library's exception) made into one line of at most `limit`."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


@contextmanager
def closed_on_error(resource: _Closable) -> Iterator[_Closable]:
    """Close `resource` (a reader, a runtime) if the block raises, then re-raise: a loader owns
    what it opened until it hands it back."""
    try:
        yield resource
    except BaseException:
        resource.close()
        raise


def run_cli(
    main: Callable[[list[str] | None], int | None], argv: list[str] | None = None, prog: str = "mlx_flash"
) -> int:
    """Run a CLI main function; print user errors and I/O errors as one line on stderr with
    exit code 1, and Ctrl-C as exit code 130."""
    try:
        return int(main(argv) or 0)
    except MlxFlashError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        print(f"{prog}: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    except OSError as e:  # a failed read of the flash folder (FlashReadError), a full disk: one line
        print(f"{prog}: error: {one_line(e, 1000)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130

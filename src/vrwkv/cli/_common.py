"""Helpers shared by the training-related subcommands (kept free of heavy imports)."""
from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from typing import Iterator


def setup_logging() -> None:
    """Plain ``message`` lines on stderr for the ``vrwkv`` logger (progress bars also use stderr)."""
    log = logging.getLogger("vrwkv")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's user-facing errors (bad config, bad data, bad checkpoint, non-finite loss) into
    :class:`vrwkv.cli.CLIError` (one line, exit 2)."""
    from vrwkv.cli import CLIError
    from vrwkv.engine.loop import NonFiniteLossError

    try:
        yield
    except (ValueError, NonFiniteLossError) as e:
        raise CLIError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None

"""Where a command's log messages go while it runs: a handler on the ``rwcflow`` logger that lives as long
as the command. Commands are also called in-process (tests, a user's script); a handler left behind would
write a later call's messages to a stream or file of the earlier one."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

LOGGER = logging.getLogger("rwcflow")


@contextlib.contextmanager
def command_logging(level: int, formatter: logging.Formatter) -> Iterator[logging.Logger]:
    """Messages of ``level`` and above on stderr for the block (``rwcflow``'s logger, not propagated to
    the root's); every handler added to that logger in the block is closed and removed at its end."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    saved = LOGGER.handlers[:], LOGGER.level, LOGGER.propagate
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(level)
    LOGGER.propagate = False
    try:
        yield LOGGER
    finally:
        for added in LOGGER.handlers:
            if added not in saved[0]:
                added.close()
        LOGGER.handlers[:], LOGGER.level, LOGGER.propagate = saved

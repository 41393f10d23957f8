"""SIGTERM (``scancel``, a SLURM time limit, ``kill``) and SIGINT (Ctrl-C) as an orderly stop: inside
:func:`stop_on_signals` either raises :class:`Stopped` in the main thread, so the run unwinds through its
``finally`` blocks and context managers (staging removed, the work folder's lock released, job processes
stopped by :class:`rwcflow.worker.ForkServerWorker`), and the command exits with ``128 + signal``
(130, 143). Pydra's cache keeps every finished job, so running the same command again resumes.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """A stop signal arrived. A ``BaseException``, as ``KeyboardInterrupt``: ``except Exception`` (one
    participant's failure, ...) does not swallow it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Raise :class:`Stopped` at the first SIGTERM or SIGINT; later ones are ignored while the run unwinds
    (SLURM sends SIGTERM, and SIGKILL only after its grace period). Handlers restored on leaving."""
    stopping = []

    def handler(signum, frame):
        if not stopping:
            stopping.append(signum)
            raise Stopped(signum)

    previous = {signum: signal.signal(signum, handler) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)

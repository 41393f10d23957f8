"""The Pydra worker to run rwcflow's tasks on one machine: Pydra's ``cf`` worker, with its processes
forked from a fork server instead of from the submitting process.

On Linux Pydra's ``cf`` worker forks the submitting process. Once that process has run a multi-threaded
torch operation (or initialised CUDA), a forked job hangs at its first parallel operation: the OpenMP
thread pool does not survive ``fork``. A fork server is a fresh interpreter that imports rwcflow's tasks
and runs nothing, so the jobs forked from it start as quickly and inherit no thread pool. Each job runs
with ``threads`` torch threads, and what it logs is handled by the submitting process's loggers (its
console and log files), as it would be in a forked job::

    from pydra.engine.submitter import Submitter
    from rwcflow.worker import ForkServerWorker

    if __name__ == "__main__":  # as for any multiprocessing start method but fork
        with Submitter(worker=ForkServerWorker(n_procs=4, threads=2), cache_root="cache") as submitter:
            outputs = submitter(task).outputs
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import attrs
import torch
from pydra.workers.cf import ConcurrentFuturesWorker


@attrs.define
class ForkServerWorker(ConcurrentFuturesWorker):
    """``n_procs`` jobs at once (default: the available CPUs), each in a process forked from a fork
    server and running ``threads`` torch threads (default: the submitting process's count)."""

    _plugin_name = "cf-forkserver"

    threads: int = attrs.field(factory=torch.get_num_threads)
    _log_listener: logging.handlers.QueueListener | None = attrs.field(init=False, default=None, eq=False,
                                                                        repr=False)

    async def run(self, job, rerun: bool = False):
        """Run ``job`` in one of the pool's processes (started with the first job)."""
        if self._log_listener is None:
            self._start()
        return await super().run(job, rerun)

    def close(self) -> None:
        """Shut the pool down, then stop relaying the jobs' log records."""
        super().close()
        if self._log_listener is not None:
            self._log_listener.stop()
            self._log_listener = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_log_listener"] = None
        return state

    def _start(self) -> None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["rwcflow.tasks"])  # imported once, by the server
        records = context.Queue()
        self._log_listener = logging.handlers.QueueListener(records, _Relay())
        self._log_listener.start()
        self.pool.shutdown()  # Pydra's forking pool, never used: it starts its processes with a first job
        self.pool = ProcessPoolExecutor(self.n_procs, mp_context=context, initializer=_start_job_process,
                                        initargs=(self.threads, records, _logger_levels()))


class _Relay(logging.Handler):
    """Hands a job's log record to the submitting process's logger of the same name."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(record.name).handle(record)


def _logger_levels() -> dict[str, int]:
    """The effective level of the root logger ("") and of every logger given a level in this process."""
    manager = logging.root.manager
    names = [name for name, logger in manager.loggerDict.items() if isinstance(logger, logging.Logger)
             and logger.level != logging.NOTSET]
    return {"": logging.root.level, **{name: logging.getLogger(name).getEffectiveLevel() for name in names}}


def _start_job_process(threads: int, records, levels: dict[str, int]) -> None:
    """A job process: ``threads`` torch threads, the submitter's log levels, records sent back to it."""
    torch.set_num_threads(threads)
    logging.root.handlers[:] = [logging.handlers.QueueHandler(records)]
    for name, level in levels.items():
        logging.getLogger(name or None).setLevel(level)

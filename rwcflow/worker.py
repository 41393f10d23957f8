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
import multiprocessing.connection
import os
import sys
import threading
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
    _stop: multiprocessing.connection.Connection | None = attrs.field(init=False, default=None, eq=False,
                                                                       repr=False)

    async def run(self, job, rerun: bool = False):
        """Run ``job`` in one of the pool's processes (started with the first job)."""
        if self._log_listener is None:
            self._start()
        return await super().run(job, rerun)

    def close(self) -> None:
        """Shut the pool down, then stop relaying the jobs' log records. Jobs still running (the run was
        stopped by a signal, or failed and is unwinding) are terminated, not waited for: their Pydra
        folders stay unfinished and a re-run runs them again."""
        if self._stop is not None and getattr(self.pool, "_pending_work_items", None):
            # jobs queued or running (ProcessPoolExecutor._pending_work_items: no public API tells)
            self.pool.shutdown(wait=False, cancel_futures=True)
            self._stop.close()  # each job process sees the end of its pipe and ends
        super().close()
        if self._stop is not None:
            self._stop.close()
            self._stop = None
        if self._log_listener is not None:
            self._log_listener.stop()
            self._log_listener = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_log_listener"] = state["_stop"] = None
        return state

    def _start(self) -> None:
        # Python's resource tracker (started with the first of the pool's queues, with this process's -W
        # options) warns of "leaked semaphore objects" (the pool's queues, which it then removes itself)
        # after job processes were ended mid-job by close(): expected then, and not for the user
        if _TRACKER_WARNING not in sys.warnoptions:
            sys.warnoptions.append(_TRACKER_WARNING)
        context = multiprocessing.get_context("forkserver")
        # imported once, by the server: rwcflow's tasks, and MONAI's networks, which the tasks import only
        # where a network is built (:class:`rwcflow.models.Encoder`)
        context.set_forkserver_preload(["rwcflow.tasks", "monai.networks.nets"])
        records = context.Queue()
        self._log_listener = logging.handlers.QueueListener(records, _Relay())
        self._log_listener.start()
        self.pool.shutdown()  # Pydra's forking pool, never used: it starts its processes with a first job
        # the job processes watch the reading end; only this process holds the writing end (not inheritable)
        watched, self._stop = context.Pipe(duplex=False)
        self.pool = ProcessPoolExecutor(self.n_procs, mp_context=context, initializer=_start_job_process,
                                        initargs=(self.threads, records, _logger_levels(), watched))


_TRACKER_WARNING = "ignore:resource_tracker:UserWarning"


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


def _start_job_process(threads: int, records, levels: dict[str, int], watched) -> None:
    """A job process: ends when the submitting process closes ``watched``'s other end or ends itself (even
    by SIGKILL), ``threads`` torch threads, the submitter's log levels, records sent back to it."""
    threading.Thread(target=_end_with_submitter, args=(watched,), daemon=True, name="rwcflow-watch").start()
    torch.set_num_threads(threads)
    logging.root.handlers[:] = [logging.handlers.QueueHandler(records)]
    for name, level in levels.items():
        logging.getLogger(name or None).setLevel(level)


def _end_with_submitter(watched) -> None:
    """End this job process at once (no result is saved: a re-run runs the job again) when the pipe's
    writing end, held by the submitting process alone, is closed: by :meth:`ForkServerWorker.close` with
    jobs running, or by the submitting process's end. A job process is the fork server's child, and the
    fork server (like the resource tracker) lives as long as any job process, so neither would end
    with the submitter by itself."""
    try:
        watched.recv_bytes()
    except (EOFError, OSError):
        pass
    os._exit(143)

"""A Pydra submitter whose re-runs resume what an earlier run left, however that run ended.

Pydra resumes from its cache, but two things an earlier run can leave stop it: a job that failed stays
failed (a nested workflow that failed once is reported as failed again, without being run), and a job
that a killed run left unfinished keeps its lock files (the job's, and the one guarding the writing of
its records), which a re-run waits for for ever whenever their owner cannot be proved dead (on another
node after a SLURM time limit, or a zombie where nothing reaps orphaned processes).
:class:`ResumingSubmitter` forgets the failed jobs and clears those locks, so that both are run again::

    with ResumingSubmitter(worker=ForkServerWorker(), cache_root="cache") as submitter:
        outputs = submitter(task).outputs

A submission whose jobs fail raises :class:`~rwcflow.errors.JobsFailed`, naming each failed job, its
exception and its traceback (Pydra's own error of a failed workflow names a workflow folder, often one
that does not exist). A run stopped by a signal leaves nothing a re-run would take for finished work.

One run at a time per cache and workflow: a second, concurrent run would clear the first's locks and run
the same jobs again.
"""

from __future__ import annotations

import asyncio
import pickle
import re
import shutil
import time
from datetime import datetime
from pathlib import Path

from pydra.engine.submitter import Submitter

from rwcflow.errors import JobFailure, JobsFailed


class ResumingSubmitter(Submitter):
    """Pydra's :class:`~pydra.engine.submitter.Submitter` (same arguments) that forgets the failed jobs
    in its cache when created, and clears the locks that predate the run of the submitted job and of
    every job of the submitted workflows as they become ready to run. Failed jobs raise
    :class:`~rwcflow.errors.JobsFailed` (from Pydra's error)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        forget_failures(self.cache_root)

    def __call__(self, task, *args, **kwargs):
        if not task._splitter:  # a split task runs inside a workflow of Pydra's, whose jobs are cleared
            _clear_locks(self.cache_root / task._checksum, datetime.now())
        start = time.time()
        try:
            return super().__call__(task, *args, **kwargs)
        except Exception as error:
            failures = failed_jobs(self.cache_root, start) or failures_in_message(str(error))
            if not failures:
                raise
            raise JobsFailed(failures) from error
        except BaseException:  # a signal (rwcflow.signals.Stopped), KeyboardInterrupt
            self._cancel_pending()
            forget_interrupted(self.cache_root, start)
            raise

    def close(self) -> None:
        """Close the worker and Pydra's event loop, after cancelling the jobs' asyncio tasks a run
        interrupted by a signal left pending (else each is reported as destroyed while pending)."""
        self._cancel_pending()
        super().close()

    def _cancel_pending(self) -> None:
        """Cancel the asyncio tasks of the jobs an interrupted run left suspended, and let them unwind."""
        if not self.loop.is_closed() and not self.loop.is_running():
            pending = [task for task in asyncio.all_tasks(self.loop) if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))

    def _check_locks(self, tasks: list) -> None:
        """Pydra's hook on the jobs ready to run (its own clears their job locks only)."""
        for job in tasks:
            _clear_locks(job.cache_dir, self.run_start_time)


def _clear_locks(job: Path, before: datetime) -> None:
    """Remove the lock files of the job folder ``job`` last written before ``before``."""
    for lock in (job.with_suffix(".lock"), job.parent / f"{job.name}_save.lock"):
        try:
            if lock.stat().st_mtime < before.timestamp():
                lock.unlink()
        except FileNotFoundError:
            pass


def forget_interrupted(cache: Path, since: float) -> list[Path]:
    """Remove the cache folders of the jobs an interruption (a signal, Ctrl-C) ended since ``since``
    while they ran in this process (workflows): Pydra saves their result as they unwind, with no outputs
    and no error, which a re-run would take for finished work. (Jobs in job processes are killed before
    they save anything.)"""
    interrupted = []
    for path in cache.glob("*/_result.pklz") if cache.is_dir() else []:
        if path.stat().st_mtime < since:
            continue
        with path.open("rb") as file:
            result = pickle.load(file)
        if result.outputs is None and not result.errored:
            interrupted.append(path.parent)
            shutil.rmtree(path.parent, ignore_errors=True)
    return interrupted


def forget_failures(cache: Path) -> list[Path]:
    """Remove the cache folders of failed jobs (those holding ``_error.pklz``); finished jobs stay."""
    failed = [job for job in cache.glob("*") if (job / "_error.pklz").exists()] if cache.is_dir() else []
    for job in failed:
        shutil.rmtree(job, ignore_errors=True)
    return failed


def failed_jobs(cache: Path, since: float) -> list[JobFailure]:
    """The task jobs in ``cache`` that failed at or after ``since`` (a ``time.time()``), oldest first, read
    from the files Pydra writes into a failed job's folder (``_error.pklz``: the traceback; ``_job.pklz``:
    the job). Workflow folders are skipped: their errors repeat their jobs'."""
    errors = [path for path in cache.glob("*/_error.pklz")
              if not path.parent.name.startswith("workflow-") and path.stat().st_mtime >= since]
    failures = []
    for path in sorted(errors, key=lambda path: path.stat().st_mtime):
        with path.open("rb") as file:
            lines = pickle.load(file)["error message"]
        traceback = "".join(lines) if isinstance(lines, list) else str(lines)
        with (path.parent / "_job.pklz").open("rb") as file:
            job = pickle.load(file)
        name = job.name if job.state_index is None else f"{job.name}[{job.state_index}]"
        failures.append(JobFailure(name, type(job.task).__name__, *exception_of(traceback), traceback))
    return failures


# A failed job in Pydra's error of a failed workflow: "Job 'name', Task(inputs...), errored:traceback"
_FAILED_JOB = re.compile(r"Job '(?P<job>[^']+)', (?P<task>\w+)\(.*?, errored:", re.DOTALL)


def failures_in_message(message: str) -> list[JobFailure]:
    """The failed jobs that Pydra's error of a failed workflow names, for failures it left no error file
    for (a job whose inputs' hashes changed while it ran); a nested workflow's entry is left for the jobs
    it names in turn."""
    found = list(_FAILED_JOB.finditer(message))
    failures = []
    for match, following in zip(found, [*found[1:], None]):
        traceback = message[match.end():following.start() if following else len(message)]
        traceback = traceback.split("\n\nSee output directory for details:")[0].strip()
        if "failed with errors" not in traceback:
            job = re.sub(r"\((\d+)\)$", r"[\1]", match["job"])  # Pydra's "register(1)": as failed_jobs names it
            failures.append(JobFailure(job, match["task"], *exception_of(traceback), traceback))
    return failures


def exception_of(traceback: str) -> tuple[str, str]:
    """The type (without its module) and the first line of the message of the exception a formatted
    traceback ends with."""
    lines = traceback.rstrip().splitlines()
    frames = [n for n, line in enumerate(lines) if line.startswith('  File "')]
    after = lines[frames[-1] + 1:] if frames else lines
    exception = next((line for line in after if line and not line[0].isspace()), lines[-1] if lines else "")
    kind, _, message = exception.partition(": ")
    return kind.rsplit(".", 1)[-1], message.strip()

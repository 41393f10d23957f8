"""A Pydra submitter whose re-runs resume what an earlier run left, however that run ended.

Pydra resumes from its cache, but two things an earlier run can leave stop it: a job that failed stays
failed (a nested workflow that failed once is reported as failed again, without being run), and a job
that a killed run left unfinished keeps its lock files (the job's, and the one guarding the writing of
its records), which a re-run waits for for ever whenever their owner cannot be proved dead (on another
node after a SLURM time limit, or a zombie where nothing reaps orphaned processes).
:class:`ResumingSubmitter` forgets the failed jobs and clears those locks, so that both are run again::

    with ResumingSubmitter(worker=ForkServerWorker(), cache_root="cache") as submitter:
        outputs = submitter(task).outputs

One run at a time per cache and workflow: a second, concurrent run would clear the first's locks and run
the same jobs again.
"""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

from pydra.engine.submitter import Submitter


class ResumingSubmitter(Submitter):
    """Pydra's :class:`~pydra.engine.submitter.Submitter` (same arguments) that forgets the failed jobs
    in its cache when created, and clears the locks that predate the run of the submitted job and of
    every job of the submitted workflows as they become ready to run."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        forget_failures(self.cache_root)

    def __call__(self, task, *args, **kwargs):
        if not task._splitter:  # a split task runs inside a workflow of Pydra's, whose jobs are cleared
            _clear_locks(self.cache_root / task._checksum, datetime.now())
        return super().__call__(task, *args, **kwargs)

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


def forget_failures(cache: Path) -> list[Path]:
    """Remove the cache folders of failed jobs (those holding ``_error.pklz``); finished jobs stay."""
    failed = [job for job in cache.glob("*") if (job / "_error.pklz").exists()] if cache.is_dir() else []
    for job in failed:
        shutil.rmtree(job, ignore_errors=True)
    return failed

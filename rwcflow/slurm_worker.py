"""The Pydra worker for ``--plugin slurm``: Pydra's SLURM worker (each job an ``sbatch`` job, polled
with ``squeue``/``sacct``) whose :meth:`~CancellingSlurmWorker.close` cancels the jobs it submitted that
have not ended. A run stopped by a signal (``scancel`` or a time limit of the job running ``rwcflow``,
Ctrl-C) thus leaves no job of its own queued or running on the cluster; the same command run again
submits them again (the finished ones are served from the work folder's cache)."""

from __future__ import annotations

import logging
import subprocess

import attrs
from pydra.workers.slurm import SlurmWorker

log = logging.getLogger(__name__)


@attrs.define
class CancellingSlurmWorker(SlurmWorker):
    """Pydra's :class:`~pydra.workers.slurm.SlurmWorker` (same arguments) that cancels its unfinished jobs
    when closed."""

    _plugin_name = "slurm-cancelling"

    _ended: set[str] = attrs.field(init=False, factory=set, eq=False, repr=False)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        del state["_ended"]
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__({**state, "_ended": set()})

    async def _poll_job(self, jobid: str):
        """Pydra's poll of one job (``False`` while it is queued or running), noting the jobs that ended
        (completed, or failed: Pydra raises their error); a cancelled or timed-out job, which Pydra
        requeues, has not ended."""
        try:
            done = await super()._poll_job(jobid)
        except Exception:
            self._ended.add(jobid)
            raise
        if done is True:
            self._ended.add(jobid)
        return done

    def unfinished(self) -> list[str]:
        """The IDs of the jobs submitted and not seen to end, in submission order."""
        return [jobid for jobid in self.error if jobid not in self._ended]

    def close(self) -> None:
        """Cancel the jobs not seen to end (``scancel``; a job that ended meanwhile is left as it is)."""
        unfinished = self.unfinished()
        if unfinished:
            cancelled = subprocess.run(["scancel", *unfinished], capture_output=True, text=True, timeout=120)
            log.info("cancelled %d unfinished SLURM job(s): %s%s", len(unfinished), " ".join(unfinished),
                     f" ({cancelled.stderr.strip()})" if cancelled.returncode else "")
        super().close()

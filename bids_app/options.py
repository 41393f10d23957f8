"""The run options both levels share, and the Pydra submitter they run workflows with."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pydra.engine.submitter import Submitter

from .spaces import TemplateChoice


@dataclass
class RunOptions:
    """What the command line decided (see ``rwcflow --help``)."""

    template: TemplateChoice
    work_dir: Path
    model: str = "default"
    io_iters: int | None = None
    device: str = "auto"
    longitudinal_iterations: int = 2
    group_iterations: int = 3
    nprocs: int = 1
    omp_nthreads: int = 1
    plugin: str = "cf"
    slurm_args: str = ""
    seed: int = 0

    def parameters(self) -> dict:
        """The options recorded in sidecars and reports."""
        return {"template": self.template.name, "model": self.model, "io_iters": self.io_iters,
                "device": self.device, "longitudinal_iterations": self.longitudinal_iterations,
                "group_iterations": self.group_iterations, "random_seed": self.seed}

    def submitter(self) -> Submitter:
        """A Pydra submitter caching into the work folder: ``cf`` runs ``nprocs / omp_nthreads`` jobs at
        once (forked, each with ``omp_nthreads`` threads), ``slurm`` submits each job with ``slurm_args``
        (plus ``--cpus-per-task=omp_nthreads`` unless they set it; the jobs inherit this process's
        environment, thread limits included). Jobs that failed in an earlier run are forgotten first,
        so that a re-run retries them."""
        cache = self.work_dir / "pydra"
        forget_failures(cache)
        if self.plugin == "slurm":
            return Submitter(worker="slurm", cache_root=cache, sbatch_args=self.sbatch_args())
        return Submitter(worker="cf", cache_root=cache, n_procs=max(1, self.nprocs // self.omp_nthreads))

    def sbatch_args(self) -> str:
        """``slurm_args``, with ``--cpus-per-task=omp_nthreads`` added when they do not set it."""
        if re.search(r"(^|\s)(-c|--cpus-per-task)(\s|=|\d|$)", self.slurm_args):
            return self.slurm_args
        return f"{self.slurm_args} --cpus-per-task={self.omp_nthreads}".strip()


def forget_failures(cache: Path) -> list[Path]:
    """Remove the cache folders of failed jobs (those holding ``_error.pklz``): Pydra would otherwise
    report a nested workflow that failed once as failed again, without running it. Finished jobs stay."""
    failed = [job for job in cache.glob("*") if (job / "_error.pklz").exists()] if cache.is_dir() else []
    for job in failed:
        shutil.rmtree(job, ignore_errors=True)
    return failed


def limit_threads(threads: int) -> None:
    """Threads of this process and of the jobs it forks (torch and the OpenMP/BLAS libraries)."""
    import torch

    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = str(threads)
    torch.set_num_threads(threads)


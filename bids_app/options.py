"""The run options both levels share, and the Pydra submitter they run workflows with."""

from __future__ import annotations

import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from rwcflow.checkpoint import model_sha256
from rwcflow.groupwise import GroupwiseRefinement
from rwcflow.slurm_worker import CancellingSlurmWorker
from rwcflow.submitter import ResumingSubmitter
from rwcflow.worker import ForkServerWorker

from .spaces import TemplateChoice

REFINE_ITERS = GroupwiseRefinement.iterations
"""L-BFGS iterations of each participant's groupwise refinement, by default."""
GROUP_ITERATIONS = 2
"""Updates of the group template, by default: on the demo the second update moves the template by about as
much as the third, the registrations' own noise (``benchmarks/results/example_cpu.md``)."""


@dataclass
class RunOptions:
    """What the command line decided (see ``rwcflow --help``)."""

    template: TemplateChoice
    work_dir: Path
    model: str = "default"
    io_iters: int | None = None
    device: str = "auto"
    refine_iters: int = REFINE_ITERS
    group_iterations: int = GROUP_ITERATIONS
    nprocs: int = 1
    omp_nthreads: int = 1
    plugin: str = "cf"
    slurm_args: str = ""
    seed: int = 0
    command: str = ""
    """The command line that started the run, shown in the reports."""
    run_id: str = field(default_factory=lambda: f"{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4()}")
    """This run's name, as fMRIPrep's: its crash files go into a folder of that name."""

    def parameters(self) -> dict:
        """The options recorded in sidecars and reports, with the sha256 of the model file used."""
        return {"template": self.template.name, "model": self.model, "model_sha256": model_sha256(self.model),
                "io_iters": self.io_iters,
                "device": self.device, "refine_iters": self.refine_iters,
                "group_iterations": self.group_iterations, "random_seed": self.seed}

    def submitter(self) -> ResumingSubmitter:
        """A Pydra submitter caching into the work folder: ``cf`` runs ``nprocs / omp_nthreads`` jobs at
        once (:class:`~rwcflow.worker.ForkServerWorker`, each with ``omp_nthreads`` threads), ``slurm``
        submits each job with ``slurm_args`` (plus ``--cpus-per-task=omp_nthreads`` unless they set it;
        the jobs inherit this process's environment, thread limits included) and cancels those not ended
        when the run stops (:class:`~rwcflow.slurm_worker.CancellingSlurmWorker`).

        Re-running resumes (:class:`~rwcflow.submitter.ResumingSubmitter`): the jobs that failed, or
        that a killed run left unfinished (a SLURM time limit, a node lost), are run again. One run at a
        time per participant and work folder."""
        cache = self.work_dir / "pydra"
        if self.plugin == "slurm":
            return ResumingSubmitter(worker=CancellingSlurmWorker(sbatch_args=self.sbatch_args()), cache_root=cache)
        worker = ForkServerWorker(n_procs=max(1, self.nprocs // self.omp_nthreads), threads=self.omp_nthreads)
        return ResumingSubmitter(worker=worker, cache_root=cache)

    def sbatch_args(self) -> str:
        """``slurm_args``, with ``--cpus-per-task=omp_nthreads`` added when they do not set it."""
        if re.search(r"(^|\s)(-c|--cpus-per-task)(\s|=|\d|$)", self.slurm_args):
            return self.slurm_args
        return f"{self.slurm_args} --cpus-per-task={self.omp_nthreads}".strip()


def limit_threads(threads: int) -> None:
    """Threads of this process and of the jobs it starts (torch and the OpenMP/BLAS libraries)."""
    import torch

    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = str(threads)
    torch.set_num_threads(threads)


"""Run options of the BIDS App: the submitter they make (jobs at once, threads per job, the cache), and
how ``--slurm-args`` reach SLURM."""

from __future__ import annotations

import pytest

from rwcflow.bids_app.cli import build_parser, default_omp_nthreads
from rwcflow.bids_app.options import RunOptions
from rwcflow.bids_app.spaces import TemplateChoice
from rwcflow.submitter import ResumingSubmitter


def test_local_jobs_run_nprocs_over_omp_nthreads_at_once_with_omp_nthreads_threads(tmp_path):
    options = RunOptions(template=TemplateChoice("unbiased", None), work_dir=tmp_path, nprocs=8, omp_nthreads=3)
    with options.submitter() as submitter:
        assert isinstance(submitter, ResumingSubmitter)
        assert submitter.cache_root == tmp_path / "pydra"
        assert (submitter.worker.n_procs, submitter.worker.threads) == (2, 3)


@pytest.mark.parametrize(("slurm_args", "expected"), [
    ("", "--cpus-per-task=4"),
    ("-p gpu --gres=gpu:1", "-p gpu --gres=gpu:1 --cpus-per-task=4"),
    ("-p gpu -c 8", "-p gpu -c 8"),
    ("-c8", "-c8"),
    ("--cpus-per-task=2 --mem=8G", "--cpus-per-task=2 --mem=8G"),
])
def test_slurm_jobs_get_the_thread_count_as_cpus_unless_the_user_sets_it(tmp_path, slurm_args, expected):
    options = RunOptions(template=TemplateChoice("unbiased", None), work_dir=tmp_path, omp_nthreads=4,
                         plugin="slurm", slurm_args=slurm_args)
    assert options.sbatch_args() == expected


@pytest.mark.parametrize("argv", [["--slurm-args", "-p gpu --gres=gpu:1"], ["--slurm-args=-p gpu --gres=gpu:1"]])
def test_slurm_args_are_taken_as_one_value(argv):
    args = build_parser().parse_args(["bids", "out", "participant", "--plugin", "slurm", *argv])
    assert args.slurm_args == "-p gpu --gres=gpu:1"


def test_jobs_take_every_cpu_at_the_participant_level_run_locally_and_one_elsewhere():
    """A participant's workflow is a chain of jobs (rigid midspace, refinement, small per-session jobs): run
    locally, each takes all --nprocs CPUs; the group level's registrations run side by side, one thread
    each, and SLURM jobs ask for one CPU unless --omp-nthreads says otherwise."""
    assert default_omp_nthreads("participant", "cf", 2) == 2
    assert default_omp_nthreads("participant", "cf", 8) == 8
    assert default_omp_nthreads("group", "cf", 8) == 1
    assert default_omp_nthreads("participant", "slurm", 8) == 1

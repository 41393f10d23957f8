"""Run options of the BIDS App: a job that failed is retried by the next run (Pydra alone would report a
nested workflow that failed once as failed again, without running it)."""

from __future__ import annotations

import pytest
import torch

from rwcflow.bids_app.cli import build_parser
from rwcflow.bids_app.options import RunOptions, forget_failures
from rwcflow.bids_app.spaces import TemplateChoice
from rwcflow.example import make_example_pair
from rwcflow.io import save_image
from rwcflow.workflows.pairwise import Pairwise


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA for a job that fails")
def test_a_failed_job_is_run_again_by_the_next_submission(tmp_path):
    pair = make_example_pair(resolution_mm=8.0)
    fixed, moving = save_image(pair.fixed, tmp_path / "f.nii.gz"), save_image(pair.moving, tmp_path / "m.nii.gz")
    options = RunOptions(template=TemplateChoice("unbiased", None), work_dir=tmp_path / "work")
    cache = tmp_path / "work" / "pydra"
    # a job asking for CUDA on a CPU machine fails (as on a login node, before moving to a GPU node)
    workflow = Pairwise(fixed=fixed, moving=moving, model="none", io_iters=0, device="cuda")
    with options.submitter() as submitter, pytest.raises(Exception, match="CUDA was asked for"):
        submitter(workflow, raise_errors=True)
    failed = sorted(job for job in cache.glob("*") if (job / "_error.pklz").exists())
    assert failed
    everything = set(cache.glob("*"))
    assert sorted(forget_failures(cache)) == failed
    assert set(cache.glob("*")) == everything - set(failed)
    # the next run runs the job again: the real error again, not a stale "failed" record
    with options.submitter() as submitter, pytest.raises(Exception, match="CUDA was asked for"):
        submitter(workflow, raise_errors=True)


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

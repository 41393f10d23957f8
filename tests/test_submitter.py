"""ResumingSubmitter: a job that failed is run again by the next submission (Pydra alone would report a
nested workflow that failed once as failed again, without running it), and so is every job a killed run
left locked (Pydra alone would wait for those locks for ever when their owner cannot be proved dead)."""

from __future__ import annotations

import pytest
import torch

from rwcflow.example import make_example_pair
from rwcflow.io import load_image, save_image
from rwcflow.submitter import ResumingSubmitter, forget_failures
from rwcflow.worker import ForkServerWorker
from rwcflow.workflows.pairwise import Pairwise


@pytest.fixture
def pair_files(tmp_path):
    pair = make_example_pair(resolution_mm=8.0)
    return save_image(pair.fixed, tmp_path / "f.nii.gz"), save_image(pair.moving, tmp_path / "m.nii.gz")


def _submitter(cache) -> ResumingSubmitter:
    return ResumingSubmitter(worker=ForkServerWorker(n_procs=1), cache_root=cache)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA for a job that fails")
def test_a_failed_job_is_run_again_by_the_next_submission(pair_files, tmp_path):
    fixed, moving = pair_files
    cache = tmp_path / "cache"
    # a job asking for CUDA on a CPU machine fails (as on a login node, before moving to a GPU node)
    workflow = Pairwise(fixed=fixed, moving=moving, model="none", io_iters=0, device="cuda")
    with _submitter(cache) as submitter, pytest.raises(Exception, match="CUDA was asked for"):
        submitter(workflow, raise_errors=True)
    failed = sorted(job for job in cache.glob("*") if (job / "_error.pklz").exists())
    assert failed
    everything = set(cache.glob("*"))
    with _submitter(cache) as submitter:
        assert set(cache.glob("*")) == everything - set(failed)  # forgotten when created
        # the job is run again: the real error again, not a stale "failed" record
        with pytest.raises(Exception, match="CUDA was asked for"):
            submitter(workflow, raise_errors=True)
    assert sorted(forget_failures(cache)) == failed


@pytest.mark.timeout(300)  # the failure is a re-run that waits for ever
def test_every_job_left_locked_by_a_run_killed_on_another_node_is_run_again(pair_files, tmp_path):
    fixed, moving = pair_files
    cache = tmp_path / "cache"
    workflow = Pairwise(fixed=fixed, moving=moving, model="none", io_iters=5, device="cpu")
    with _submitter(cache) as submitter:
        first = submitter(workflow, raise_errors=True).outputs
    # as a run killed on a node that is gone leaves them: every job locked, and so is the writing of its
    # records, none finished; each lock records its owner (PID, host), which cannot be proved dead here
    jobs = [job for job in cache.glob("*") if (job / "_result.pklz").exists()]
    assert any(job.name.startswith("workflow-") for job in jobs) and any(job.name.startswith("python-")
                                                                          for job in jobs)
    for job in jobs:
        (job / "_result.pklz").unlink()
        for lock in (job.with_suffix(".lock"), job.parent / f"{job.name}_save.lock"):
            lock.write_text("4242\nnode-that-is-gone\n1\n")
    with _submitter(cache) as submitter:
        again = submitter(workflow, raise_errors=True).outputs
    assert all((job / "_result.pklz").exists() for job in jobs)
    assert load_image(again.warped).data.tobytes() == load_image(first.warped).data.tobytes()

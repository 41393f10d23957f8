"""ResumingSubmitter: a job that failed is run again by the next submission (Pydra alone would report a
nested workflow that failed once as failed again, without running it), and so is every job a killed run
left locked (Pydra alone would wait for those locks for ever when their owner cannot be proved dead); a
failed submission names the failed job, its exception and traceback."""

from __future__ import annotations

import traceback

import pytest
import torch
from pydra.engine.submitter import Submitter

from rwcflow.errors import JobsFailed
from rwcflow.example import make_example_pair
from rwcflow.io import load_image, save_image
from rwcflow.submitter import ResumingSubmitter, exception_of, failed_jobs, failures_in_message, forget_failures
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


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA for a job that fails")


@NO_CUDA
def test_a_failed_submission_names_the_job_its_exception_and_traceback(pair_files, tmp_path):
    fixed, moving = pair_files
    workflow = Pairwise(fixed=fixed, moving=moving, model="none", io_iters=0, device="cuda")
    with _submitter(tmp_path / "cache") as submitter, pytest.raises(JobsFailed) as raised:
        submitter(workflow, raise_errors=True)
    (failure,) = raised.value.failures
    assert (failure.job, failure.task, failure.error_type) == ("register", "Register", "InputError")
    assert "CUDA was asked for" in failure.message
    assert str(raised.value) == f"task register (Register) failed: InputError: {failure.message}"
    # the job process's traceback, down to where the device was refused
    assert failure.traceback.startswith("Traceback (most recent call last)")
    assert 'rwcflow/register.py", line' in failure.traceback
    assert failure.traceback.rstrip().endswith(f"rwcflow.errors.InputError: {failure.message}")


@NO_CUDA
def test_failed_jobs_in_pydras_error_and_in_the_cache_agree(pair_files, tmp_path):
    """Pydra's own error of a failed workflow (nested: the registration inside Pairwise) names the same
    failed job as its error file: the message is the fallback where a job left no file."""
    fixed, moving = pair_files
    cache = tmp_path / "cache"
    workflow = Pairwise(fixed=fixed, moving=moving, model="none", io_iters=0, device="cuda")
    with Submitter(worker=ForkServerWorker(n_procs=1), cache_root=cache) as submitter, \
            pytest.raises(RuntimeError) as raised:
        submitter(workflow, raise_errors=True)
    assert "See output directory for details" in str(raised.value)
    (from_message,) = failures_in_message(str(raised.value))
    (from_cache,) = failed_jobs(cache, since=0)
    assert from_message.job == from_cache.job == "register" and from_message.task == from_cache.task == "Register"
    assert (from_message.error_type, from_message.message) == (from_cache.error_type, from_cache.message)
    failed_at = max(path.stat().st_mtime for path in cache.glob("*/_error.pklz"))
    assert failed_jobs(cache, since=failed_at + 1) == []  # only the failures of a submission since then


def test_exception_of_a_traceback_is_its_last_exception_and_first_message_line():
    try:
        try:
            {}["key"]
        except KeyError as error:
            raise ValueError("first line\nsecond line") from error
    except ValueError as error:
        chained = "".join(traceback.format_exception(error))
    assert exception_of(chained) == ("ValueError", "first line")
    assert exception_of("Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    g()\n"
                        "rwcflow.errors.ModelFileError: m.safetensors: corrupt\n") == ("ModelFileError",
                                                                                        "m.safetensors: corrupt")
    assert exception_of("KeyboardInterrupt\n") == ("KeyboardInterrupt", "")


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

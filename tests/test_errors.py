"""rwcflow's errors cross process boundaries (Pydra's workers pickle them) with their message intact."""

from __future__ import annotations

import pickle

import pytest

from rwcflow.errors import InputError, JobFailure, JobsFailed, ModelFileError, RwcflowError

FAILURE = JobFailure("register[1]", "Register", "ValueError", "bad", "Traceback ...\nValueError: bad\n")


@pytest.mark.parametrize("error", [InputError("/data/sub-01_T1w.nii.gz", "file not found"),
                                   ModelFileError("model.safetensors", "format version 9 is not supported"),
                                   RwcflowError("something went wrong"), JobsFailed([FAILURE, FAILURE])])
def test_errors_survive_pickling(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    if isinstance(error, InputError):
        assert (copy.path, copy.problem) == (error.path, error.problem)
    if isinstance(error, JobsFailed):
        assert copy.failures == error.failures


def test_jobs_failed_names_the_first_failure_and_counts_the_others():
    assert str(JobsFailed([FAILURE])) == "task register[1] (Register) failed: ValueError: bad"
    assert str(JobsFailed([FAILURE] * 3)).endswith("failed: ValueError: bad (and 2 more failed job(s))")

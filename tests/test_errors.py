"""rwcflow's errors cross process boundaries (Pydra's workers pickle them) with their message intact."""

from __future__ import annotations

import pickle

import pytest

from rwcflow.errors import InputError, ModelFileError, RwcflowError


@pytest.mark.parametrize("error", [InputError("/data/sub-01_T1w.nii.gz", "file not found"),
                                   ModelFileError("model.safetensors", "format version 9 is not supported"),
                                   RwcflowError("something went wrong")])
def test_errors_survive_pickling(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    if isinstance(error, InputError):
        assert (copy.path, copy.problem) == (error.path, error.problem)

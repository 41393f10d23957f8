"""Re-runs resume from Pydra's cache: an Atlas run killed part-way, started again with the same cache,
finishes without redoing the registrations it had finished and gives the outputs of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pydra.engine.result import load_result

from rwcflow import spatial, transforms
from rwcflow.example import mni152_brain
from rwcflow.io import load_image, save_image
from rwcflow.submitter import ResumingSubmitter
from rwcflow.synth import random_smooth_field
from rwcflow.worker import ForkServerWorker
from rwcflow.workflows.atlas import Atlas

OPTIONS = dict(iterations=1, model="none", io_iters=10, affine=True, device="cpu")

# The same workflow, submitted by a separate process that the test kills (with its forked jobs).
RUN = """
import sys, torch
torch.set_num_threads(1)
from pydra.engine.result import load_result
from pydra.engine.submitter import Submitter
from rwcflow.worker import ForkServerWorker
from rwcflow.workflows.atlas import Atlas
images, cache = sys.argv[1:-1], sys.argv[-1]
with Submitter(worker=ForkServerWorker(n_procs=1), cache_root=cache) as submitter:
    submitter(Atlas(images=images, **{options}), raise_errors=True)
"""


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("subjects")
    brain, _ = mni152_brain(6.0)
    paths = []
    for seed in range(3):
        field = random_smooth_field(brain.data.shape, 1.5, seed=seed)
        data = spatial.warp(brain.tensor(), field)[0, 0].numpy()
        paths.append(save_image(brain.with_data(data), folder / f"sub-{seed}_T1w.nii.gz"))
    return paths


def _finished_registrations(cache: Path) -> dict[Path, int]:
    """Register jobs (their folders hold ``*_affine.txt``) whose result is complete (loads, not errored,
    no save in progress), with the result file's modification time."""
    finished = {}
    for job in cache.glob("python-*"):
        if not any(job.glob("*_affine.txt")) or (cache / f"{job.name}_save.lock").exists():
            continue
        result = load_result(job.name, [cache], retries=1)
        if result is not None and not result.errored:
            finished[job] = (job / "_result.pklz").stat().st_mtime_ns
    return finished


def test_interrupted_atlas_resumes_without_redoing_finished_registrations(images, tmp_path, submit):
    reference = submit(Atlas(images=images, **OPTIONS))

    cache = tmp_path / "interrupted"
    script = RUN.format(options=repr(OPTIONS))
    process = subprocess.Popen([sys.executable, "-c", script, *map(str, images), str(cache)],
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(_finished_registrations(cache)) < 4 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be interrupted"
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    finished = _finished_registrations(cache)
    assert 4 <= len(finished) < 6  # 3 affine + 3 registrations in all (the final maps follow the update)

    # the killed jobs' lock files are left behind, and their owners cannot always be proved dead (a
    # zombie where nothing reaps orphans)
    with ResumingSubmitter(worker=ForkServerWorker(n_procs=1), cache_root=cache) as submitter:
        resumed = submitter(Atlas(images=images, **OPTIONS), raise_errors=True).outputs

    after = _finished_registrations(cache)
    assert len(after) == 6
    assert {job: after[job] for job in finished} == finished  # none of them was run again
    np.testing.assert_array_equal(load_image(resumed.template).data, load_image(reference.template).data)
    for ours, theirs in zip(resumed.xfms, reference.xfms):
        np.testing.assert_array_equal(transforms.read_displacement_field(ours)[0],
                                      transforms.read_displacement_field(theirs)[0])

"""rwcflow's Pydra worker: jobs submitted by a process that has already run multi-threaded torch code
finish (with Pydra's forking ``cf`` worker they hang at their first parallel operation), run with the
thread count asked for, and their log records reach the submitting process's loggers."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A task of the user's own, defined as rwcflow's are (its function found by name: see rwcflow.tasks), in a
# module in the script's working folder (on its sys.path, and its job processes')
JOBS_MODULE = """
import logging, torch
from pydra.compose import python


def threads_and_log() -> int:
    logging.getLogger("rwcflow.job").info("logged in the job")
    logging.getLogger("rwcflow.job").debug("below the level set in the submitting process")
    return torch.get_num_threads()


ThreadsAndLog = python.define(threads_and_log, name="ThreadsAndLog")
"""

# Run in a fresh process: it must have used torch's thread pool before it submits.
SCRIPT = """
import logging, sys, torch
from pydra.engine.submitter import Submitter
from rwcflow.tasks import Register
from rwcflow.worker import ForkServerWorker
from jobs import ThreadsAndLog

torch.set_num_threads(2)
torch.randn(64, 64, 64).exp().sum(dim=0).mean()  # the OpenMP thread pool now runs

logging.basicConfig(stream=sys.stdout, format="%(name)s %(levelname)s %(message)s")
logging.getLogger("rwcflow").setLevel(logging.INFO)

fixed, moving, cache = sys.argv[1:]
with Submitter(worker=ForkServerWorker(n_procs=2, threads=3), cache_root=cache) as submitter:
    print("threads", submitter(ThreadsAndLog(), raise_errors=True).outputs.out)
    print("warped", submitter(Register(fixed=fixed, moving=moving, model="none", io_iters=5, device="cpu"),
                              raise_errors=True).outputs.warped)
"""


@pytest.mark.smoke
def test_jobs_of_a_process_that_ran_multithreaded_torch_finish_with_its_threads_and_logging(tmp_path):
    from rwcflow.example import make_example_pair
    from rwcflow.io import load_image, save_image

    pair = make_example_pair(resolution_mm=8.0)
    fixed, moving = save_image(pair.fixed, tmp_path / "f.nii.gz"), save_image(pair.moving, tmp_path / "m.nii.gz")
    (tmp_path / "jobs.py").write_text(JOBS_MODULE)
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(fixed), str(moving), str(tmp_path / "cache")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "threads 3" in lines
    assert "rwcflow.job INFO logged in the job" in lines
    assert not any("below the level" in line for line in lines)
    warped = next(line.split(" ", 1)[1] for line in lines if line.startswith("warped "))
    assert load_image(warped).data.shape == pair.fixed.data.shape

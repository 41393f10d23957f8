"""rwcflow's tasks hash the same in the submitting process and in a job process, whatever cloudpickle does
with functions it pickles by value (3.1.3 gives them the file name ``"<dynamic-code>"``, whose source
Pydra cannot read): every task's function is found by name, so it is pickled by reference. Checked
directly (plain pickle, a fresh interpreter) and through real submissions with Pydra's ``cf`` worker and
rwcflow's fork-server worker, whose jobs stop if the hashes of their inputs changed on the way."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import attrs
import cloudpickle
import pytest
from pydra.compose.python import PythonTask

from rwcflow import tasks
from rwcflow.example import make_example_pair
from rwcflow.io import load_image, save_image

pytestmark = pytest.mark.smoke

TASKS = sorted(name for name, value in vars(tasks).items()
               if isinstance(value, type) and issubclass(value, PythonTask) and value is not PythonTask)


def task_function(task_class: type):
    return attrs.fields_dict(task_class)["function"].default


def test_every_task_function_is_pickled_by_reference():
    """Plain pickle stores functions by module and name only: it succeeds, and loads the very function,
    exactly when cloudpickle also pickles it by reference."""
    assert len(TASKS) == 17
    for name in TASKS:
        function = task_function(getattr(tasks, name))
        assert pickle.loads(pickle.dumps(function)) is function, name


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pair")
    pair = make_example_pair(resolution_mm=8.0)
    return save_image(pair.fixed, folder / "f.nii.gz"), save_image(pair.moving, folder / "m.nii.gz")


HASH_IN_A_FRESH_PROCESS = """
import sys, cloudpickle
task = cloudpickle.loads(sys.stdin.buffer.read())
print(task._compute_hashes()[0])
"""


def test_a_pickled_task_hashes_the_same_in_a_fresh_interpreter(pair_files):
    fixed, moving = pair_files
    task = tasks.Register(fixed=fixed, moving=moving, model="none", io_iters=3, device="cpu")
    here = task._compute_hashes()[0]
    run = subprocess.run([sys.executable, "-c", HASH_IN_A_FRESH_PROCESS], input=cloudpickle.dumps(task),
                         capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    assert run.stdout.decode().strip() == here


# In a fresh process: Pydra's cf worker forks the submitting process, which must not have run
# multi-threaded torch code (pytest's process has).
SUBMIT = """
import sys
from pydra.engine.submitter import Submitter
from rwcflow.tasks import JacobianMaps, Register
from rwcflow.worker import ForkServerWorker

worker_name, fixed, moving, cache = sys.argv[1:]
worker = ForkServerWorker(n_procs=2, threads=1) if worker_name == "forkserver" else "cf"
register = Register(fixed=fixed, moving=moving, model="none", io_iters=3, device="cpu")
with Submitter(worker=worker, cache_root=cache) as submitter:
    registered = submitter(register, raise_errors=True).outputs
    maps = submitter(JacobianMaps(xfm=registered.xfm), raise_errors=True).outputs
print("hash", register._hash)
print("log_jacobian", maps.log_jacobian)
"""


@pytest.mark.parametrize("worker", ["cf", "forkserver"])
def test_jobs_in_other_processes_keep_their_hashes(worker, pair_files, tmp_path):
    fixed, moving = pair_files
    cache = tmp_path / "cache"
    run = subprocess.run([sys.executable, "-c", SUBMIT, worker, str(fixed), str(moving), str(cache)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "hashes have changed" not in run.stdout + run.stderr
    printed = dict(line.split(" ", 1) for line in run.stdout.splitlines() if " " in line)
    # the job ran in the cache folder named by the submitting process's hash, and its result is there
    job_folder = next(cache.glob(f"*{printed['hash']}"))
    assert (job_folder / "_result.pklz").is_file()
    assert load_image(printed["log_jacobian"]).grid == load_image(fixed).grid

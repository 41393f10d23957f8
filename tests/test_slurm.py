"""The BIDS App on a real one-node SLURM cluster (tests/slurm/cluster.sh: munged, MariaDB, slurmdbd,
slurmctld, slurmd): ``--plugin slurm`` (every Pydra job a SLURM job) and the sbatch recipe
(bids_app/slurm/submit.sh: a participant job array, then a dependent group job) must give the same
derivatives as a local ``cf`` run of the same dataset (tests/conftest.py's ``demo_study``).

The cluster of ``.ci/run`` is used when ``SLURM_CONF`` names one that answers; otherwise, as root, the
tests start their own; not as root they are skipped."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from demo_study import FAST

from rwcflow.bids_app.cli import main

REPOSITORY = Path(__file__).resolve().parents[1]
CLUSTER = REPOSITORY / "tests" / "slurm" / "cluster.sh"
SUBMIT = REPOSITORY / "bids_app" / "slurm" / "submit.sh"


def _answers() -> bool:
    """Whether the cluster named by ``SLURM_CONF`` has an idle node and accounting."""
    try:
        node = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=20)
        accounting = subprocess.run(["sacct", "-n", "-X"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return node.returncode == 0 and "idle" in node.stdout and accounting.returncode == 0


@pytest.fixture(scope="module")
def cluster():
    """A running cluster: ``.ci/run``'s, or one started here (and stopped after the module)."""
    if os.environ.get("SLURM_CONF") and _answers():
        yield os.environ["SLURM_CONF"]
        return
    if os.geteuid() != 0:
        pytest.skip("SLURM tests need root to start the local one-node cluster (munged, slurmd, MariaDB): "
                    "run them as root, or with SLURM_CONF naming a running cluster")
    root = Path(tempfile.mkdtemp(prefix="rwcflow-slurm-"))  # not under pytest's private folders: the
    # database runs as the mysql user
    started = subprocess.run(["bash", str(CLUSTER), "start", str(root)], capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=600)
    assert started.returncode == 0, f"the local SLURM cluster did not start: {started.stderr.strip()}"
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(root / "etc" / "slurm.conf")
    try:
        yield os.environ["SLURM_CONF"]
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(root)], capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)
        if previous is None:
            os.environ.pop("SLURM_CONF")
        else:
            os.environ["SLURM_CONF"] = previous


def _derivatives(folder: Path) -> dict[str, bytes]:
    """Every derivative's bytes, but logs, and reports without the time and command line of their run."""
    files = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_file() and not name.startswith("logs/"):
            files[name] = path.read_bytes()
            if path.suffix == ".html":  # the time it was written and the command line differ
                files[name] = re.sub(rb"report written [^<]*|<th>command</th><td><code>[^<]*", b"", files[name])
    return files


def _jobs(first: int) -> list[tuple[str, str, str]]:
    """(job ID, name, state) of the jobs from ID ``first`` on, array tasks one by one, as sacct lists them."""
    listing = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,JobName%200,State", "-S", "now-1days"],
                             capture_output=True, text=True, check=True).stdout
    jobs = [tuple(line.split("|")) for line in listing.splitlines() if line]
    return [job for job in jobs if int(job[0].split("_")[0]) >= first]


def _next_job_id() -> int:
    jobs = _jobs(0)
    return max((int(job[0].split("_")[0]) for job in jobs), default=0) + 1


def test_plugin_slurm_runs_each_task_as_a_job_cancels_them_when_stopped_and_resumes(cluster, demo_study, tmp_path):
    """``rwcflow --plugin slurm`` (here sub-01's participant level): every task a SLURM job; stopped by
    SIGTERM (``scancel`` of the job running ``rwcflow``, a time limit) while its jobs run, it cancels them;
    the same command resumes, to the local run's derivatives."""
    raw, local = demo_study["raw"], demo_study["out"]
    first = _next_job_id()
    out = tmp_path / "slurm"
    command = [str(raw), str(out), "participant", "--participant-label", "01", "-w", str(tmp_path / "work"),
               "--plugin", "slurm", "--slurm-args=--mem=1G", *FAST]
    run = subprocess.Popen([sys.executable, "-m", "rwcflow.bids_app.cli", *command], stderr=subprocess.PIPE,
                           text=True)
    _wait_until(lambda: any(state == "RUNNING" for _, _, state in _jobs(first)), "a job of the run is running")
    run.send_signal(signal.SIGTERM)
    stderr = run.communicate(timeout=120)[1]
    assert run.returncode == 143, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("rwcflow: stopped by SIGTERM")
    _wait_until(lambda: not _queued(first), "the run's jobs have left the queue")
    assert "CANCELLED" in {state.split()[0] for _, _, state in _jobs(first)}

    assert main(command) == 0
    jobs = _jobs(first)
    # job names: the workflow nodes'. The rigid midspace and the groupwise refinement completed once each,
    # whether before the stop or when resumed
    completed = [name for _, name, state in jobs if state == "COMPLETED"]
    assert [sum(name.startswith(node) for name in completed) for node in ("midspace", "refine")] == [1, 1], jobs
    assert {state.split()[0] for _, _, state in jobs} <= {"COMPLETED", "CANCELLED"}
    assert _participant_level(_derivatives(out), "01") == _participant_level(_derivatives(local), "01")


def _participant_level(derivatives: dict[str, bytes], label: str) -> dict[str, bytes]:
    """The files of one participant's folder that its participant level writes (the group level adds
    those in the group template's space)."""
    return {name: data for name, data in derivatives.items()
            if name.startswith(f"sub-{label}/") and "unbiased" not in name}


def _queued(first: int) -> list[str]:
    """The IDs of the jobs from ID ``first`` on that are still queued or running."""
    listing = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    return [job for job in listing.split() if int(job.split("_")[0]) >= first]


def _wait_until(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:.0f} s: {what}")
        time.sleep(1)


def _wait_for(first: int, last: str, timeout: float = 900) -> dict[str, tuple[str, str]]:
    """Wait until job ``last`` has ended; then {job ID: (name, state)} of the jobs from ID ``first`` on."""

    def ended() -> bool:
        states = {job_id: state for job_id, _, state in _jobs(first)}
        return last in states and states[last] not in ("PENDING", "RUNNING")

    _wait_until(ended, f"SLURM job {last} has ended", timeout)
    return {job_id: (name, state) for job_id, name, state in _jobs(first)}


def _submit(*arguments: str, **variables: str) -> str:
    """Run the sbatch recipe (CPU-only tasks, rwcflow from this Python's installation); its output."""
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                   "RWCFLOW_GPUS": "0", "RWCFLOW_SBATCH_ARGS": "--cpus-per-task=1 --mem=1G", **variables}
    return subprocess.run(["bash", str(SUBMIT), *arguments], env=environment, capture_output=True, text=True,
                          check=True).stdout


def test_sbatch_recipe_job_array_then_group_matches_the_local_run(cluster, demo_study, tmp_path):
    raw, local = demo_study["raw"], demo_study["out"]
    out, work = tmp_path / "derivatives", tmp_path / "work"
    submitted = _submit(str(raw), str(out), str(work), *FAST)
    array, group = (int(number) for number in re.findall(r"job(?: array)? (\d+)", submitted))
    jobs = _wait_for(array, str(group))
    assert jobs == {f"{array}_1": ("rwcflow-participant", "COMPLETED"),
                    f"{array}_2": ("rwcflow-participant", "COMPLETED"),
                    str(group): ("rwcflow-group", "COMPLETED")}, \
        "\n".join(path.read_text() for path in sorted((work / "slurm").glob("*.out")))
    assert (work / "participants.txt").read_text() == "01\n02\n"
    logs = (out / "logs").glob("rwcflow-*.log")  # named by level, start time, then job: one per job
    assert sorted(path.name.split("-job")[1] for path in logs) == sorted([f"{group}.log", f"{array}_1.log",
                                                                          f"{array}_2.log"])
    assert _derivatives(out) == _derivatives(local)


def test_sbatch_recipe_runs_the_selected_participants_only(cluster, demo_study, tmp_path):
    raw, local = demo_study["raw"], demo_study["out"]
    out, work = tmp_path / "derivatives", tmp_path / "work"
    submitted = _submit(str(raw), str(out), str(work), "--participant-label", "sub-02", *FAST,
                        RWCFLOW_GROUP="no")
    array = int(re.fullmatch(r"participant level: job array (\d+) \(1 participants\)\n", submitted).group(1))
    assert _wait_for(array, f"{array}_1") == {f"{array}_1": ("rwcflow-participant", "COMPLETED")}
    assert (work / "participants.txt").read_text() == "02\n"
    written = _derivatives(out)
    assert {name.split("/")[0] for name in written if name.startswith("sub-")} == {"sub-02", "sub-02.html"}
    assert {name: data for name, data in written.items() if name.startswith("sub-02/")} == \
        _participant_level(_derivatives(local), "02")

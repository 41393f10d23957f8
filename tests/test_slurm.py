"""The BIDS App on a real one-node SLURM cluster (tests/slurm/cluster.sh: munged, MariaDB, slurmdbd,
slurmctld, slurmd): ``--plugin slurm`` (every Pydra job a SLURM job) and the sbatch recipe
(bids_app/slurm/submit.sh: a participant job array, then a dependent group job) must give the same
derivatives as a local ``cf`` run of the same dataset.

The cluster of ``.ci/run`` is used when ``SLURM_CONF`` names one that answers; otherwise, as root, the
tests start their own; not as root they are skipped."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rwcflow.bids_app.cli import main
from rwcflow.bids_app.demo import write_demo_dataset

REPOSITORY = Path(__file__).resolve().parents[1]
CLUSTER = REPOSITORY / "tests" / "slurm" / "cluster.sh"
SUBMIT = REPOSITORY / "bids_app" / "slurm" / "submit.sh"
OPTIONS = ["--model", "none", "--io-iters", "10", "--skip-bids-validation", "--longitudinal-iterations", "1",
           "--group-iterations", "1", "--device", "cpu"]


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


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """A 2 participants x 2 sessions dataset (6 mm), and both levels run on it with the local cf worker."""
    root = tmp_path_factory.mktemp("study")
    raw = write_demo_dataset(root / "raw", participants=2, sessions=2, resolution_mm=6.0)
    out = root / "local"
    for level in ("participant", "group"):
        assert main([str(raw), str(out), level, "-w", str(root / "work-local"), "--nprocs", "1", *OPTIONS]) == 0
    return raw, out


def _derivatives(folder: Path) -> dict[str, bytes]:
    """Every derivative's bytes, but logs, and reports without the time they were written."""
    files = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_file() and not name.startswith("logs/"):
            files[name] = path.read_bytes()
            if path.suffix == ".html":
                files[name] = re.sub(rb"report written [^<]*", b"", files[name])
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


def test_plugin_slurm_runs_each_registration_as_a_job_and_matches_the_local_run(cluster, local_run, tmp_path):
    raw, local = local_run
    first = _next_job_id()
    out = tmp_path / "slurm"
    for level in ("participant", "group"):
        assert main([str(raw), str(out), level, "-w", str(tmp_path / "work"), "--plugin", "slurm",
                     "--slurm-args=--mem=1G", *OPTIONS]) == 0
    jobs = _jobs(first)
    registrations = [job for job in jobs if job[1].startswith("register")]  # job names: the workflow nodes'
    # one template update: each session registered to the current template, then to the final one (2
    # participants x 2 sessions x 2); the group level the same over the 2 within-subject templates
    assert len(registrations) == 2 * 2 * 2 + 2 * 2
    assert {state for _, _, state in jobs} == {"COMPLETED"}
    assert _derivatives(out) == _derivatives(local)


def _wait_for(first: int, last: str, timeout: float = 900) -> dict[str, tuple[str, str]]:
    """Wait until job ``last`` has ended; then {job ID: (name, state)} of the jobs from ID ``first`` on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = {job_id: (name, state) for job_id, name, state in _jobs(first)}
        if last in jobs and jobs[last][1] not in ("PENDING", "RUNNING"):
            return jobs
        time.sleep(2)
    raise TimeoutError(f"SLURM job {last} did not end in {timeout:.0f} s")


def _submit(*arguments: str, **variables: str) -> str:
    """Run the sbatch recipe (CPU-only tasks, rwcflow from this Python's installation); its output."""
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                   "RWCFLOW_GPUS": "0", "RWCFLOW_SBATCH_ARGS": "--cpus-per-task=1 --mem=1G", **variables}
    return subprocess.run(["bash", str(SUBMIT), *arguments], env=environment, capture_output=True, text=True,
                          check=True).stdout


def test_sbatch_recipe_job_array_then_group_matches_the_local_run(cluster, local_run, tmp_path):
    raw, local = local_run
    out, work = tmp_path / "derivatives", tmp_path / "work"
    submitted = _submit(str(raw), str(out), str(work), *OPTIONS)
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


def test_sbatch_recipe_runs_the_selected_participants_only(cluster, local_run, tmp_path):
    raw, local = local_run
    out, work = tmp_path / "derivatives", tmp_path / "work"
    submitted = _submit(str(raw), str(out), str(work), "--participant-label", "sub-02", *OPTIONS,
                        RWCFLOW_GROUP="no")
    array = int(re.fullmatch(r"participant level: job array (\d+) \(1 participants\)\n", submitted).group(1))
    assert _wait_for(array, f"{array}_1") == {f"{array}_1": ("rwcflow-participant", "COMPLETED")}
    assert (work / "participants.txt").read_text() == "02\n"
    written = _derivatives(out)
    assert {name.split("/")[0] for name in written if name.startswith("sub-")} == {"sub-02", "sub-02.html"}
    participant_level = {name: data for name, data in _derivatives(local).items()
                         if name.startswith("sub-02/") and "unbiased" not in name}  # group level: into tpl-unbiased
    assert {name: data for name, data in written.items() if name.startswith("sub-02/")} == participant_level

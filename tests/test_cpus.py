"""The CPUs a process may use: the fewest of its CPU affinity (``taskset``, in a real process), its
cgroup's CPU quota (cgroup v2 and v1 files at the paths this process's ``/proc/self/cgroup`` names, in a
folder standing for ``/sys/fs/cgroup``) and SLURM's ``SLURM_CPUS_PER_TASK`` inside a job."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rwcflow.cpus import available_cpus, cgroup_cpu_quota

PRINT_CPUS = "from rwcflow.cpus import available_cpus; print(available_cpus())"


def _own_cgroup(root: Path, version: int) -> Path:
    """This process's cgroup folder (v2, or v1's ``cpu`` controller) as it would lie under ``root``,
    made; skips the test when the process has none of that version."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (version == 2 and controllers == "") or (version == 1 and "cpu" in controllers.split(",")):
            folder = root / ("" if version == 2 else controllers) / path.lstrip("/")
            folder.mkdir(parents=True, exist_ok=True)
            return folder
    pytest.skip(f"no cgroup v{version} cpu entry in /proc/self/cgroup")


def test_no_quota_files_no_quota(tmp_path):
    assert cgroup_cpu_quota(tmp_path) is None
    assert available_cpus(tmp_path) == len(os.sched_getaffinity(0))


def test_cgroup_v2_quota_rounded_up_and_the_tightest_of_the_ancestors_wins(tmp_path):
    own = _own_cgroup(tmp_path, 2)
    (own / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: 2 whole ones
    assert cgroup_cpu_quota(tmp_path) == 2
    (own / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    if own != tmp_path:  # a parent's quota counts too
        (own.parent / "cpu.max").write_text("100000 100000\n")
        assert cgroup_cpu_quota(tmp_path) == 1


def test_cgroup_v1_quota(tmp_path):
    own = _own_cgroup(tmp_path, 1)
    (own / "cpu.cfs_period_us").write_text("100000\n")
    (own / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path) is None
    (own / "cpu.cfs_quota_us").write_text("50000\n")  # half a CPU: still one
    assert cgroup_cpu_quota(tmp_path) == 1
    assert available_cpus(tmp_path) == 1


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_cpu_affinity_of_a_real_process():
    run = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", PRINT_CPUS], capture_output=True, text=True,
                         check=True)
    assert run.stdout.strip() == "1"


def test_slurm_cpus_per_task_counts_inside_a_job_only():
    env = {**os.environ, "SLURM_CPUS_PER_TASK": "1"}
    env.pop("SLURM_JOB_ID", None)
    outside = subprocess.run([sys.executable, "-c", PRINT_CPUS], env=env, capture_output=True, text=True, check=True)
    assert outside.stdout.strip() == str(available_cpus())
    inside = subprocess.run([sys.executable, "-c", PRINT_CPUS], env={**env, "SLURM_JOB_ID": "42"},
                            capture_output=True, text=True, check=True)
    assert inside.stdout.strip() == "1"

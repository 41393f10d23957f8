"""The CPUs this process may use, as a scheduler grants them: not ``os.cpu_count()`` (every CPU of the
machine), but the fewest of the CPU affinity (``taskset``, SLURM's task binding), the cgroup's CPU quota
(SLURM with cgroups, containers, systemd) and ``SLURM_CPUS_PER_TASK`` inside a SLURM job."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may use (at least 1)."""
    counts = [len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1]
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        counts.append(quota)
    if os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        counts.append(int(os.environ["SLURM_CPUS_PER_TASK"]))
    return max(1, min(counts))


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT) -> int | None:
    """The tightest CPU quota of this process's cgroup and its ancestors, rounded up to whole CPUs;
    ``None`` without one. cgroup v2 (``cpu.max``: ``"<quota> <period>"`` or ``"max <period>"``) or v1
    (``cpu.cfs_quota_us``, -1 for none, and ``cpu.cfs_period_us``), in the folders ``/proc/self/cgroup``
    names under ``cgroup_root``."""
    quotas = [quota for folder in _own_cgroup_folders(cgroup_root) if (quota := _quota(folder)) is not None]
    return min(quotas) if quotas else None


def _quota(folder: Path) -> int | None:
    try:
        if (folder / "cpu.max").is_file():
            quota, period = (folder / "cpu.max").read_text().split()
            return None if quota == "max" else math.ceil(int(quota) / int(period))
        if (folder / "cpu.cfs_quota_us").is_file():
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            return None if quota < 0 else math.ceil(quota / int((folder / "cpu.cfs_period_us").read_text()))
    except (OSError, ValueError):
        pass
    return None


def _own_cgroup_folders(cgroup_root: Path) -> list[Path]:
    """This process's cgroup folders and their ancestors up to the root (inside a container the cgroup
    namespace makes its own cgroup the root): v2's (``0::/path``) and v1's ``cpu`` controller's."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    folders = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            mounts = [cgroup_root]
        elif "cpu" in controllers.split(","):
            mounts = [cgroup_root / controllers, cgroup_root / "cpu"]
        else:
            continue
        parts = Path(path).relative_to("/").parts
        folders += [mount.joinpath(*parts[:n]) for mount in mounts for n in range(len(parts), -1, -1)]
    return list(dict.fromkeys(folders))

"""Signals to a running ``rwcflow``: SIGTERM (``scancel``, a SLURM time limit) and SIGINT stop it with one
line and exit 143/130, every process it started (job processes, fork server, resource tracker) gone and
its work folder released; SIGKILL leaves no process behind either. Run again, each resumes to the bytes
of a run never interrupted; temporary files a killed run left are removed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from demo_study import FAST, digests

from rwcflow.run_lock import LOCK_NAME

# two one-thread jobs at once (the participant level would otherwise run one job with both threads), whose
# results match the reference run's one-thread jobs bit for bit
OPTIONS = ["--participant-label", "01", "--nprocs", "2", "--omp-nthreads", "1", *FAST]


@pytest.fixture
def dataset(demo_study):
    """The demo dataset and the digests of sub-01's participant-level images in an uninterrupted run of
    it (tests/conftest.py's ``demo_study``; the group level adds those in the group template's space)."""
    reference = {name: digest for name, digest in digests(demo_study["out"]).items()
                 if name.startswith("sub-01/") and name.endswith(".nii.gz") and "unbiased" not in name}
    return demo_study["raw"], reference


def _command(raw: Path, out: Path, work: Path) -> list[str]:
    return [sys.executable, "-m", "rwcflow.bids_app.cli", str(raw), str(out), "participant", "-w", str(work),
            *OPTIONS]


def _digests(out: Path) -> dict[str, str]:
    return {name: digest for name, digest in digests(out).items() if name.endswith(".nii.gz")}


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.add(pid)
        except OSError:
            pass
    return alive


def _interrupt(raw: Path, out: Path, work: Path, signum: int) -> tuple[subprocess.Popen, str, set[int]]:
    """Start the App, send ``signum`` once its first groupwise refinement runs; its exit status, stderr and
    the processes it had started."""
    run = subprocess.Popen(_command(raw, out, work), stderr=subprocess.PIPE, text=True)
    lines = []
    for line in run.stderr:
        lines.append(line)
        if line.rstrip().endswith(": refining"):
            break
    time.sleep(0.5)  # the refinement (seconds) is in its job process
    started = _descendants(run.pid)
    assert len(started) >= 3, started  # fork server, resource tracker, job processes
    run.send_signal(signum)
    lines += run.stderr.readlines()
    run.wait(timeout=120)
    return run, "".join(lines), started


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_every_process_with_one_line(dataset, tmp_path, signum):
    raw, reference = dataset
    out, work = tmp_path / "out", tmp_path / "work"
    run, stderr, started = _interrupt(raw, out, work, signum)
    assert run.returncode == 128 + signum
    after_progress = stderr.split(": refining\n")[-1].strip().splitlines()
    assert after_progress == [f"rwcflow: stopped by {signal.Signals(signum).name}: every job stopped, nothing "
                              f"half-written; run the same command again (same work folder) to resume"]
    deadline = time.monotonic() + 10
    while _alive(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(started)
    assert not (work / LOCK_NAME).exists()
    if signum == signal.SIGTERM:  # (the same unwinding for SIGINT: its resume is not run again here)
        resumed = subprocess.run(_command(raw, out, work), capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert _digests(out) == reference


def test_sigkill_leaves_no_process_and_the_next_run_resumes(dataset, tmp_path):
    raw, reference = dataset
    out, work = tmp_path / "out", tmp_path / "work"
    run, _, started = _interrupt(raw, out, work, signal.SIGKILL)
    assert run.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 15  # job processes see their pipe close, then the fork server ends
    while _alive(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(started)
    assert (work / LOCK_NAME).exists()  # left behind; the next run takes it over
    # a temporary file as a run killed between writing and renaming leaves it
    stale = out / "sub-01" / "anat" / ".sub-01_desc-template_T1w.nii.gz.0123456789ab.tmp.nii.gz"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"half")
    resumed = subprocess.run(_command(raw, out, work), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "taking over" in resumed.stderr
    assert not stale.exists()
    assert _digests(out) == reference

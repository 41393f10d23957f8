"""A job that fails inside the App's workflows says what failed: the task, the exception's type and
message on the terminal, in the log and in the report, and the traceback in a crash file per participant
(``sub-XX/log/<run>/``) or for the group level (``logs/<run>/``) that the next run leaves alone. The
failure here is the one clusters make most: a job process killed mid-job (as by the kernel's OOM
killer). ``make run-example`` runs the group level after a failed participant level and exits non-zero."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from demo_study import FAST


ROOT = Path(__file__).resolve().parents[1]
# registrations (group level) and refinements (participant level) long enough to be killed mid-job
OPTIONS = ["--nprocs", "2", "--omp-nthreads", "1", *FAST, "--io-iters", "60", "--refine-iters", "100"]
BROKEN = r"failed: BrokenProcessPool: A process in the process pool was terminated abruptly"
PARTICIPANT_KILLED = re.compile(r"task refine \(GroupwiseRefine\) " + BROKEN)
GROUP_KILLED = re.compile(r"task (affine_to_first|register_0)\[\d\] \(Register\) " + BROKEN)


@pytest.fixture
def raw(demo_study) -> Path:
    """The demo dataset (2 participants x 2 sessions; tests/conftest.py's ``demo_study``)."""
    return demo_study["raw"]


def _job_processes(pid: int) -> list[int]:
    """The job processes of a running ``rwcflow``: the children of its fork server."""
    parents, commands = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            commands[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
    servers = [child for child, parent in parents.items() if parent == pid and b"forkserver" in commands[child]]
    return [child for child, parent in parents.items() if parent in servers]


def _run_killing_a_job(command: list[str], started: str) -> tuple[int, str]:
    """Run ``rwcflow`` and SIGKILL its job processes once a job starts (a line ending in ``started``); its
    status and stderr."""
    run = subprocess.Popen([sys.executable, "-m", "rwcflow.bids_app.cli", *command], stderr=subprocess.PIPE,
                           text=True)
    lines = []
    for line in run.stderr:
        lines.append(line)
        if line.rstrip().endswith(started):
            break
    time.sleep(1)
    killed = _job_processes(run.pid)
    assert killed
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    lines += run.stderr.readlines()
    return run.wait(timeout=300), "".join(lines)


def _crash_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/crash-*.txt"))


def test_failed_job_is_named_everywhere_and_its_traceback_survives_the_next_run(raw, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    command = [str(raw), str(out), "participant", "-w", str(work), *OPTIONS]
    code, err = _run_killing_a_job(command, ": refining")  # sub-01's refinement
    assert code == 1
    # the others go on
    assert "sub-02 done" in err and (out / "sub-02" / "anat" / "sub-02_desc-template_T1w.nii.gz").is_file()
    line = next(line for line in err.splitlines() if "sub-01 failed" in line)
    assert PARTICIPANT_KILLED.search(line), line
    assert "See output directory" not in err and "Traceback" not in err
    # the line in the log file and the report, the traceback in the crash file it names
    assert PARTICIPANT_KILLED.search(next((out / "logs").glob("rwcflow-participant-*.log")).read_text())
    assert PARTICIPANT_KILLED.search((out / "sub-01.html").read_text())
    first = _crash_files(out / "sub-01" / "log")
    assert any(f"traceback: {path.relative_to(out)}" in line for path in first)
    crash = first[0].read_text()
    assert re.match(r"Job: refine\nTask: GroupwiseRefine\n", crash), crash[:200]
    assert "BrokenProcessPool" in crash
    # the next run (same work folder) completes, and keeps the first run's crash file
    rerun = subprocess.run([sys.executable, "-m", "rwcflow.bids_app.cli", *command], capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _crash_files(out / "sub-01" / "log") == first and first[0].read_text() == crash


def test_group_level_failure_is_one_line_with_a_crash_file(raw, tmp_path):
    out = tmp_path / "out"
    code, err = _run_killing_a_job([str(raw), str(out), "group", "-w", str(tmp_path / "work"), *OPTIONS],
                                   ": registering")
    assert code == 1
    line = next(line for line in err.splitlines() if "group level failed" in line)
    assert GROUP_KILLED.search(line) and "Traceback" not in err
    crashes = _crash_files(out / "logs")
    assert any(f"traceback: {path.relative_to(out)}" in line for path in crashes)
    assert all("BrokenProcessPool" in path.read_text() for path in crashes)


def test_make_runs_the_group_level_after_a_failed_participant_level_and_fails(raw, tmp_path):
    """A participant level that stops (here on bad input) does not keep make from the group level."""
    example = tmp_path / "example"
    shutil.copytree(raw, example / "bids")
    missing = tmp_path / "missing.safetensors"
    bin_dir = Path(sys.executable).parent
    run = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "run-example", f"BIN={bin_dir}",
                          f"EXAMPLE={example}", f"EXAMPLE_ARGS=--model {missing} --skip-bids-validation"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    refusals = [line for line in run.stderr.splitlines() if line.startswith("rwcflow: error: ")]
    assert len(refusals) == 2 and all("no such model file" in line for line in refusals)  # both levels ran
    assert "participant -w" in run.stdout and "group -w" in run.stdout

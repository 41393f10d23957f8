"""A job that fails inside the App's workflows (a corrupt model file: read, and refused, in the
registration jobs) says what failed: the task, the exception's type and message on the terminal, in the
log and in the report, and the traceback in a crash file per participant (``sub-XX/log/<run>/``) or for
the group level (``logs/<run>/``) that the next run leaves alone; ``make run-example`` runs the group level
after a failed participant level and exits non-zero."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rwcflow.bids_app.cli import main
from rwcflow.bids_app.demo import write_demo_dataset

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--io-iters", "5", "--nprocs", "1", "--skip-bids-validation", "--longitudinal-iterations", "1",
        "--group-iterations", "1", "--device", "cpu"]
MODEL_ERROR = re.compile(r"task register_0\[\d\] \(Register\) failed: ModelFileError: \S*corrupt\.safetensors: "
                         r"not a readable safetensors model file")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("failures")
    raw = write_demo_dataset(root / "raw", participants=2, sessions=2, resolution_mm=6.0)
    corrupt = root / "corrupt.safetensors"
    corrupt.write_bytes((ROOT / "rwcflow" / "data" / "default.safetensors").read_bytes()[:1000])
    return raw, corrupt


def _crash_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/crash-*.txt"))


def test_failed_job_is_named_everywhere_and_its_traceback_survives_the_next_run(study, tmp_path, capsys):
    raw, corrupt = study
    out, work = tmp_path / "out", tmp_path / "work"
    run = [str(raw), str(out), "participant", "-w", str(work), "--participant-label", "01",
           "--model", str(corrupt), *FAST]
    assert main(run) == 1
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "sub-01 failed" in line)
    assert MODEL_ERROR.search(line), line
    assert "See output directory" not in err and "Traceback" not in err
    # the line in the log file and the report, the traceback in the crash file it names
    assert MODEL_ERROR.search(next((out / "logs").glob("rwcflow-participant-*.log")).read_text())
    assert MODEL_ERROR.search((out / "sub-01.html").read_text())
    first = _crash_files(out / "sub-01" / "log")
    assert any(f"traceback: {path.relative_to(out)}" in line for path in first)
    crash = first[0].read_text()
    assert crash.startswith("Job: register_0[") and "Task: Register\n" in crash
    assert "Traceback (most recent call last)" in crash and "rwcflow.errors.ModelFileError:" in crash
    assert "checkpoint.py" in crash  # the frames of the job process, where the model was read
    # the next run (same work folder) fails again into a folder of its own, and keeps the first run's
    assert main(run) == 1
    second = _crash_files(out / "sub-01" / "log")
    assert set(first) < set(second) and len({path.parent for path in second}) == 2
    assert first[0].read_text() == crash


def test_group_level_failure_is_one_line_with_a_crash_file(study, tmp_path, capsys):
    raw, corrupt = study
    out = tmp_path / "out"
    code = main([str(raw), str(out), "group", "-w", str(tmp_path / "work"), "--model", str(corrupt), *FAST])
    assert code == 1
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "group level failed" in line)
    assert MODEL_ERROR.search(line) and "Traceback" not in err
    crashes = _crash_files(out / "logs")
    assert crashes and f"traceback: {crashes[0].relative_to(out)}" in line
    assert "rwcflow.errors.ModelFileError:" in crashes[0].read_text()


def test_make_runs_the_group_level_after_a_failed_participant_and_fails(study, tmp_path):
    raw, corrupt = study
    example = tmp_path / "example"
    shutil.copytree(raw, example / "bids")
    bin_dir = Path(sys.executable).parent
    run = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "run-example", f"BIN={bin_dir}",
                          f"EXAMPLE={example}", f"EXAMPLE_ARGS=--model {corrupt} {' '.join(FAST)}"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    assert "sub-01 failed" in run.stderr and "sub-02 failed" in run.stderr
    assert "group level failed" in run.stderr  # it ran, after both participants failed
    assert _crash_files(example / "derivatives" / "logs")

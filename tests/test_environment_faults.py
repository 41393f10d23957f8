"""Faults of the machine, not of the input: a disk that fills up while rwcflow writes (a real, small tmpfs
mounted for the test, so as root) stops ``rwcflow-register`` with one line and nothing written, and fails
the App's participant with one line (exit 1) without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from demo_study import LOCAL

from rwcflow import cli
from rwcflow.errors import os_error_line
from rwcflow.example import make_example_pair
from rwcflow.io import save_image


@pytest.fixture
def small_disk(tmp_path):
    """A 96 KiB tmpfs at ``tmp_path / "disk"``: room for a few small files, not for registration outputs."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_os_error_line_names_the_file_written():
    error = OSError(28, "No space left on device", "/work/src.nii.gz", None, "/out/dst.nii.gz")
    assert os_error_line(error) == "/out/dst.nii.gz: No space left on device"
    assert os_error_line(PermissionError(13, "Permission denied", "/out")) == "/out: Permission denied"


def test_register_on_a_full_disk_says_so_and_writes_nothing(small_disk, tmp_path, capsys):
    pair = make_example_pair(resolution_mm=4.0)
    fixed, moving = save_image(pair.fixed, tmp_path / "f.nii.gz"), save_image(pair.moving, tmp_path / "m.nii.gz")
    code = cli.main(["--fixed", str(fixed), "--moving", str(moving), "--out-dir", str(small_disk / "out"),
                     "--model", "none", "--io-iters", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(small_disk / "out") in err and "No space left on device; nothing was written" in err
    assert not any((small_disk / "out").iterdir())  # the staging folder removed


def test_app_participant_on_a_full_disk_fails_with_one_line(small_disk, demo_study, tmp_path):
    run = subprocess.run([sys.executable, "-m", "rwcflow.bids_app.cli", str(demo_study["raw"]),
                          str(small_disk / "out"), "participant", "-w", str(tmp_path / "work"),
                          "--participant-label", "01", *LOCAL],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr and "Logging error" not in run.stderr, run.stderr[-3000:]
    (line,) = [line for line in run.stderr.splitlines() if "sub-01 failed" in line]
    assert "No space left on device" in line and str(small_disk / "out") in line
    assert not [path for path in Path(small_disk).rglob(".*.tmp*")]  # no temporary file left

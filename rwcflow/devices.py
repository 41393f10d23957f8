"""Where computations run: the device an option names, and what happens when a GPU runs out of memory.

``auto`` is the GPU when this machine has one, else the CPU. A computation run through
:func:`run_on_device` that runs out of GPU memory (a GPU shared with other jobs, a 1 mm volume on a
small card) is run again on the CPU when the device was ``auto``, with a warning saying so, and stops
with one line (:class:`GpuMemoryError`) when the GPU was asked for by name: a user who named the GPU
gets no silently slower run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

from rwcflow.errors import InputError, RwcflowError

log = logging.getLogger(__name__)

T = TypeVar("T")


class GpuMemoryError(RwcflowError):
    """A computation ran out of memory on the GPU it was told to use."""


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when present, else the CPU; anything else is passed to :class:`torch.device`."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device", "CUDA was asked for but no CUDA device is available")
    return device


def run_on_device(work: Callable[[torch.device], T], device: str | torch.device, what: str) -> T:
    """``work(d)`` on the device ``device`` names; out of GPU memory, on the CPU when ``device`` is
    ``"auto"`` (:func:`with_cpu_fallback`)."""
    return with_cpu_fallback(work, resolve_device(device), fallback=str(device) == "auto", what=what)


def with_cpu_fallback(work: Callable[[torch.device], T], device: torch.device, *, fallback: bool, what: str) -> T:
    """``work(device)``; if it raises :class:`torch.OutOfMemoryError` on a GPU, ``work`` again on the CPU
    (``fallback``, logged as a warning) or :class:`GpuMemoryError` naming ``what``, the device and the
    allocation that failed."""
    try:
        return work(device)
    except torch.OutOfMemoryError as exc:
        if device.type == "cpu":
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
    # out of the except block: the error's traceback, and the GPU tensors its frames hold, are released
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()  # what the failed attempt held, for the next user of the GPU
    if not fallback:
        raise GpuMemoryError(f"{what}: out of memory on {device} ({reason}); run with --device cpu, or on a "
                             f"GPU with more free memory")
    log.warning("%s: out of memory on %s (%s); running it on the CPU instead", what, device, reason)
    return work(torch.device("cpu"))

"""rwcflow.devices: the device an option names, and the fallback when a GPU runs out of memory (the
failed allocation raised where the work would allocate, since this machine has no GPU to fill)."""

from __future__ import annotations

import logging

import pytest
import torch

from rwcflow.devices import GpuMemoryError, resolve_device, run_on_device, with_cpu_fallback
from rwcflow.errors import InputError

CUDA = torch.device("cuda", 0)


def _work_that_fills_the_gpu(calls: list[torch.device]):
    """A computation (a sum) that, like a 1 mm registration on a small card, cannot allocate on a GPU."""

    def work(device: torch.device) -> float:
        calls.append(device)
        if device.type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB (GPU 0; 7.8 GiB total)")
        return float(torch.arange(4, device=device, dtype=torch.float32).sum())

    return work


def test_auto_is_the_cpu_without_a_gpu_and_names_pass_through():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_bad_input():
    with pytest.raises(InputError, match="no CUDA device is available"):
        resolve_device("cuda")


def test_out_of_gpu_memory_falls_back_to_the_cpu_and_says_so(caplog):
    calls: list[torch.device] = []
    with caplog.at_level(logging.WARNING, logger="rwcflow.devices"):
        result = with_cpu_fallback(_work_that_fills_the_gpu(calls), CUDA, fallback=True, what="registering a to b")
    assert result == 6.0
    assert calls == [CUDA, torch.device("cpu")]
    (record,) = caplog.records
    assert record.getMessage() == ("registering a to b: out of memory on cuda:0 (CUDA out of memory. Tried to "
                                   "allocate 2.50 GiB (GPU 0; 7.8 GiB total)); running it on the CPU instead")


def test_out_of_memory_on_a_named_gpu_stops_with_one_line():
    calls: list[torch.device] = []
    with pytest.raises(GpuMemoryError) as raised:
        with_cpu_fallback(_work_that_fills_the_gpu(calls), CUDA, fallback=False, what="registering a to b")
    assert calls == [CUDA]  # not run again on the CPU
    assert str(raised.value) == ("registering a to b: out of memory on cuda:0 (CUDA out of memory. Tried to "
                                 "allocate 2.50 GiB (GPU 0; 7.8 GiB total)); run with --device cpu, or on a GPU "
                                 "with more free memory")
    assert raised.value.__context__ is None  # one line: no chained traceback


def test_out_of_memory_on_the_cpu_is_not_handled():
    def work(device: torch.device) -> None:
        raise torch.OutOfMemoryError("no memory")

    with pytest.raises(torch.OutOfMemoryError):
        run_on_device(work, "cpu", "anything")


def test_run_on_device_passes_the_resolved_device():
    assert run_on_device(lambda device: device, "auto", "anything") == resolve_device("auto")

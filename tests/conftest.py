"""Shared fixtures: small smooth random displacement fields and synthetic volumes (deterministic), a
Pydra submitter, and the BIDS App run once on the demo dataset."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from pydra.engine.submitter import Submitter
from scipy import ndimage

from demo_study import LOCAL, digests
from rwcflow.bids_app.cli import main
from rwcflow.bids_app.demo import write_demo_dataset


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Test tensors are small: one torch thread is as fast, and cannot thrash on a busy 2-core machine. Every
    test starts so, and what it changed is undone after it: the App run in this process sets its own threads
    (:func:`rwcflow.bids_app.options.limit_threads`), which must not carry over into the next test."""
    threads, variables = torch.get_num_threads(), {name: os.environ.get(name) for name in THREAD_VARIABLES}
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for name, value in variables.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _smooth_noise(shape: Sequence[int], channels: int, sigma: float, seed: int) -> np.ndarray:
    """``channels`` Gaussian-smoothed white-noise volumes of ``shape``, each with zero mean and max |value| 1."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((channels, *shape))
    smooth = np.stack([ndimage.gaussian_filter(c, sigma, mode="wrap") for c in noise])
    smooth -= smooth.mean(axis=(1, 2, 3), keepdims=True)
    return smooth / np.abs(smooth).max(axis=(1, 2, 3), keepdims=True)


@pytest.fixture
def smooth_field() -> Callable[..., torch.Tensor]:
    """Factory ``smooth_field(shape, amplitude=2.0, sigma=None, seed=0)``: a ``(1, 3, X, Y, Z)`` float32
    displacement field in voxels whose channels each peak at ``amplitude``; ``sigma`` (voxels, default
    ``min(shape) / 6``) sets its smoothness, so ``|grad u|`` is roughly ``amplitude / (2 sigma)``."""

    def make(shape: Sequence[int], amplitude: float = 2.0, sigma: float | None = None, seed: int = 0) -> torch.Tensor:
        sigma = min(shape) / 6 if sigma is None else sigma
        field = amplitude * _smooth_noise(shape, 3, sigma, seed)
        return torch.from_numpy(field.astype(np.float32))[None]

    return make


@pytest.fixture
def smooth_volume() -> Callable[..., torch.Tensor]:
    """Factory ``smooth_volume(shape, sigma=None, seed=0)``: a ``(1, 1, X, Y, Z)`` float32 image with values
    in ``[0, 1]`` (smoothed noise; ``sigma`` in voxels, default ``min(shape) / 8``)."""

    def make(shape: Sequence[int], sigma: float | None = None, seed: int = 0) -> torch.Tensor:
        sigma = min(shape) / 8 if sigma is None else sigma
        volume = (_smooth_noise(shape, 1, sigma, seed) + 1.0) / 2.0
        return torch.from_numpy(volume.astype(np.float32))[None]

    return make


@pytest.fixture
def submit(tmp_path):
    """``submit(task)``: run ``task`` through a "cf" Submitter with a cache in ``tmp_path``; its outputs.
    (Pydra's "cf" worker forks this process, which runs torch with one thread: see rwcflow.worker.)"""
    cache = tmp_path / "cache"

    def run(task):
        with Submitter(worker="cf", cache_root=cache, n_procs=1) as submitter:
            result = submitter(task, raise_errors=True)
        assert not result.errored
        return result.outputs

    return run


@pytest.fixture(scope="session")
def demo_study(tmp_path_factory) -> dict:
    """The demo dataset (2 participants x 2 sessions, 6 mm) and both levels of the App run on it with
    ``demo_study.LOCAL``: ``raw``, ``out``, ``work``, the two exit ``codes`` and the ``raw_digests`` before
    the runs. Shared by the App's tests and the SLURM tests' reference: read it, write elsewhere."""
    root = tmp_path_factory.mktemp("study")
    raw = write_demo_dataset(root / "raw", participants=2, sessions=2, resolution_mm=6.0)
    out, work = root / "derivatives", root / "work"
    before = digests(raw)
    codes = tuple(main([str(raw), str(out), level, "-w", str(work), *LOCAL]) for level in ("participant", "group"))
    return {"raw": raw, "out": out, "work": work, "codes": codes, "raw_digests": before}

"""Voxel-wise maps from transforms and images: Jacobian determinants of a world displacement field,
a displacement field carried onto another grid, and the average of several images.

Displacement fields here are what :func:`rwcflow.transforms.read_displacement_field` gives: RAS-mm
displacements ``d`` ``(X, Y, Z, 3)`` on a grid, the mapping being ``p -> p + d(p)`` in world mm.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rwcflow import spatial
from rwcflow.io import Grid, Image, resample

LOG_JACOBIAN_FLOOR = 1e-6
"""Folded voxels (``J <= 0``) get ``log(LOG_JACOBIAN_FLOOR)`` in :func:`log_jacobian`, not NaN."""


def _to_voxel_units(disp_ras_mm: np.ndarray, grid: Grid) -> torch.Tensor:
    """World displacements ``(X, Y, Z, 3)`` as a ``(1, 3, X, Y, Z)`` float64 field in voxels of ``grid``."""
    inverse = np.linalg.inv(grid.affine[:3, :3])
    voxels = np.asarray(disp_ras_mm, dtype=np.float64) @ inverse.T
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(voxels, -1, 0)))[None]


def jacobian_from_world_field(disp_ras_mm: np.ndarray, grid: Grid) -> np.ndarray:
    """Determinant of the Jacobian of ``p -> p + d(p)`` (world mm) on every voxel of ``grid``, ``(X, Y, Z)``.

    With ``p = L x + t`` the Jacobian is ``I + (dd/dx) L^-1``, whose determinant equals that of
    ``I + L^-1 (dd/dx)``, the Jacobian of the field in voxel units ``u = L^-1 d``: exact for anisotropic
    and oblique grids alike. A value of 2 means the mapping doubles volumes there.
    """
    if np.shape(disp_ras_mm) != (*grid.shape, 3):
        raise ValueError(f"displacements of shape {np.shape(disp_ras_mm)} do not match the grid {(*grid.shape, 3)}")
    return spatial.jacobian_determinant(_to_voxel_units(disp_ras_mm, grid))[0, 0].numpy()


def log_jacobian(jacobian: np.ndarray) -> np.ndarray:
    """``log J``, with folded voxels (``J <= 0``) floored at ``log(LOG_JACOBIAN_FLOOR)``."""
    return np.log(np.maximum(jacobian, LOG_JACOBIAN_FLOOR))


def resample_displacement(disp_ras_mm: np.ndarray, grid: Grid, reference: Grid) -> np.ndarray:
    """World displacements on ``grid`` carried onto the ``reference`` grid, ``(X', Y', Z', 3)`` RAS mm.

    Linear interpolation in world space; outside the field's grid the displacement fades to zero
    within one voxel (ITK's displacement-field transforms leave points outside their field unmoved).
    """
    points = reference.voxel_to_world(np.moveaxis(np.indices(reference.shape, dtype=np.float64), 0, -1))
    coords = torch.from_numpy(np.moveaxis(grid.world_to_voxel(points), -1, 0)[None])
    field = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(disp_ras_mm, dtype=np.float64), -1, 0)))[None]
    sampled = spatial.sample(field, coords, padding_mode="zeros")
    return np.moveaxis(sampled[0].numpy(), 0, -1)


def average_images(images: Sequence[Image], method: str = "mean") -> Image:
    """Voxel-wise ``"mean"`` or ``"median"`` of ``images`` on the first image's grid.

    Images on other grids are first resampled onto it in world space (linear, 0 outside).
    """
    if method not in ("mean", "median"):
        raise ValueError(f"unknown averaging method {method!r}; expected 'mean' or 'median'")
    if not images:
        raise ValueError("no images to average")
    grid = images[0].grid
    stack = np.stack([
        (image if image.grid == grid else resample(image, grid)).data.astype(np.float32) for image in images
    ])
    data = stack.mean(axis=0) if method == "mean" else np.median(stack, axis=0)
    return Image(data.astype(np.float32), grid.affine.copy(), images[0].path)

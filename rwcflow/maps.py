"""Voxel-wise maps from transforms and images: Jacobian determinants of a world displacement field,
displacement fields carried onto another grid, composed, inverted and averaged, and the average of
several images, sharpened on request.

Displacement fields here are what :func:`rwcflow.transforms.read_displacement_field` gives: RAS-mm
displacements ``d`` ``(X, Y, Z, 3)`` on a grid, the mapping being ``p -> p + d(p)`` in world mm.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from rwcflow import spatial
from rwcflow.io import Grid, Image, resample

LOG_JACOBIAN_FLOOR = 1e-6
"""Folded voxels (``J <= 0``) get ``log(LOG_JACOBIAN_FLOOR)`` in :func:`log_jacobian`, not NaN."""


def _to_voxel_units(disp_ras_mm: np.ndarray, grid: Grid) -> torch.Tensor:
    """World displacements ``(X, Y, Z, 3)`` as a ``(1, 3, X, Y, Z)`` float64 field in voxels of ``grid``."""
    if np.shape(disp_ras_mm) != (*grid.shape, 3):
        raise ValueError(f"displacements of shape {np.shape(disp_ras_mm)} do not match the grid {(*grid.shape, 3)}")
    inverse = np.linalg.inv(grid.affine[:3, :3])
    voxels = np.asarray(disp_ras_mm, dtype=np.float64) @ inverse.T
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(voxels, -1, 0)))[None]


def jacobian_from_world_field(disp_ras_mm: np.ndarray, grid: Grid) -> np.ndarray:
    """Determinant of the Jacobian of ``p -> p + d(p)`` (world mm) on every voxel of ``grid``, ``(X, Y, Z)``.

    With ``p = L x + t`` the Jacobian is ``I + (dd/dx) L^-1``, whose determinant equals that of
    ``I + L^-1 (dd/dx)``, the Jacobian of the field in voxel units ``u = L^-1 d``: exact for anisotropic
    and oblique grids alike. A value of 2 means the mapping doubles volumes there.
    """
    return spatial.jacobian_determinant(_to_voxel_units(disp_ras_mm, grid))[0, 0].numpy()


def log_jacobian(jacobian: np.ndarray) -> np.ndarray:
    """``log J``, with folded voxels (``J <= 0``) floored at ``log(LOG_JACOBIAN_FLOOR)``."""
    return np.log(np.maximum(jacobian, LOG_JACOBIAN_FLOOR))


def _sample_displacement(disp_ras_mm: np.ndarray, grid: Grid, points: np.ndarray) -> np.ndarray:
    """World displacements on ``grid`` at world ``points`` ``(X', Y', Z', 3)``: linear, fading to zero
    within one voxel outside the grid (ITK's displacement-field transforms leave points outside unmoved)."""
    coords = torch.from_numpy(np.moveaxis(grid.world_to_voxel(points), -1, 0)[None])
    field = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(disp_ras_mm, dtype=np.float64), -1, 0)))[None]
    sampled = spatial.sample(field, coords, padding_mode="zeros")
    return np.moveaxis(sampled[0].numpy(), 0, -1)


def resample_displacement(disp_ras_mm: np.ndarray, grid: Grid, reference: Grid) -> np.ndarray:
    """World displacements on ``grid`` carried onto the ``reference`` grid, ``(X', Y', Z', 3)`` RAS mm.

    Linear interpolation in world space; outside the field's grid the displacement fades to zero
    within one voxel (ITK's displacement-field transforms leave points outside their field unmoved).
    """
    return _sample_displacement(disp_ras_mm, grid, reference.world_points())


def compose_displacements(fields: Sequence[tuple[np.ndarray, Grid]], reference: Grid) -> np.ndarray:
    """One world displacement field on ``reference`` for a chain of ``(disp, grid)`` fields, ``(X, Y, Z, 3)``.

    ITK/ANTs order (``antsApplyTransforms -t A -t B``): the last field acts first, ``p -> A(B(p))``.
    Each field is sampled linearly at the point it receives, as :func:`resample_displacement` does.
    """
    if not fields:
        raise ValueError("no displacement fields to compose")
    start = reference.world_points()
    points = start
    for disp, grid in reversed(fields):
        points = points + _sample_displacement(disp, grid, points)
    return points - start


def invert_displacement(disp_ras_mm: np.ndarray, grid: Grid, iterations: int = 30) -> np.ndarray:
    """The inverse of ``p -> p + d(p)`` as world displacements on the same grid, ``(X, Y, Z, 3)`` RAS mm.

    Fixed-point iteration (:func:`rwcflow.spatial.invert_field`) on the field in voxel units
    ``u = L^-1 d``: ``p = L x + t`` makes the voxel mapping ``x -> x + u(x)`` the world one seen in
    voxels, so the inverse is exact for anisotropic and oblique grids alike.
    """
    inverse = spatial.invert_field(_to_voxel_units(disp_ras_mm, grid), iterations)
    return np.moveaxis(inverse[0].numpy(), 0, -1) @ grid.affine[:3, :3].T


def average_displacements(fields: Sequence[tuple[np.ndarray, Grid]]) -> tuple[np.ndarray, Grid]:
    """Voxel-wise mean of ``(disp, grid)`` world displacement fields on the first field's grid.

    Fields on other grids are first resampled onto it in world space (:func:`resample_displacement`).
    """
    if not fields:
        raise ValueError("no displacement fields to average")
    grid = fields[0][1]
    stack = [disp if other == grid else resample_displacement(disp, other, grid) for disp, other in fields]
    return np.mean(stack, axis=0), grid


def average_images(images: Sequence[Image], method: str = "mean", sharpen: float = 0.0) -> Image:
    """Voxel-wise ``"mean"`` or ``"median"`` of ``images`` on the first image's grid, then
    :func:`laplacian_sharpen` ed by ``sharpen`` (0: not at all).

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
    return Image(laplacian_sharpen(data, sharpen).astype(np.float32), grid.affine.copy(), images[0].path)


def foreground_mask(image: Image, fraction: float = 0.1) -> np.ndarray:
    """Voxels of ``image`` above ``fraction`` of its 99th percentile (robust to a few bright voxels)."""
    return image.data > fraction * np.percentile(image.data, 99)


def laplacian_sharpen(data: np.ndarray, strength: float) -> np.ndarray:
    """``data - strength * laplacian(data)`` (the 7-point Laplacian in voxel units, edges mirrored), clipped
    to ``data``'s range: ANTs' template sharpening, which restores the edges that averaging blurs.
    Away from the edges, linear ramps are unchanged and a quadratic ``a x**2`` loses ``2 a strength``.
    """
    if strength < 0:
        raise ValueError(f"sharpening strength must be >= 0, got {strength}")
    if strength == 0:
        return data
    sharpened = data - strength * ndimage.laplace(data.astype(np.float64), mode="mirror")
    return np.clip(sharpened, data.min(), data.max()).astype(data.dtype)

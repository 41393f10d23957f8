"""The metrics of one registration, computed the same way for every method (DESIGN.md §5).

A method's output is the whole fixed→moving mapping as RAS-mm displacements ``d`` on the fixed grid
(an ITK displacement field). The moving labels are sampled at ``p + d(p)`` (nearest neighbour), the
Jacobian is that of the mapping in fixed voxels (the affine part included: a constant factor),
the endpoint error compares ``d`` with the true displacements inside the mask, and the TRE maps the
fixed keypoints through ``d`` (trilinear) onto the moving ones. The numbers come from
:mod:`rwcflow.metrics`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from benchmarks.cases import Case
from rwcflow import metrics
from rwcflow.io import Grid, load_image
from rwcflow.transforms import apply_displacement, read_displacement_field


def voxel_field(displacement_mm: np.ndarray, grid: Grid) -> np.ndarray:
    """RAS-mm displacements ``(X, Y, Z, 3)`` on ``grid`` as a ``(3, X, Y, Z)`` field in voxels of ``grid``."""
    voxels = grid.world_to_voxel(grid.world_points() + displacement_mm)
    return np.moveaxis(voxels - np.indices(grid.shape).transpose(1, 2, 3, 0), -1, 0)


def keypoints_mm(path, grid: Grid, units: str) -> np.ndarray:
    """Keypoints ``(N, 3)`` of a CSV file in RAS mm (``units="voxel"``: voxel indices of ``grid``)."""
    points = np.loadtxt(path, delimiter=",", ndmin=2)[:, :3]
    return grid.voxel_to_world(points) if units == "voxel" else points


def sample_displacement(displacement_mm: np.ndarray, grid: Grid, points_mm: np.ndarray) -> np.ndarray:
    """The displacement at world points ``(N, 3)``, trilinear (nearest edge value outside the grid)."""
    voxels = grid.world_to_voxel(points_mm).T
    return np.stack([ndimage.map_coordinates(displacement_mm[..., d], voxels, order=1, mode="nearest")
                     for d in range(3)], axis=1)


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def evaluate(case: Case, xfm) -> dict:
    """Metrics of the mapping in ``xfm`` (an ITK displacement field on the fixed grid) for ``case``.

    Always ``sdlogj``, ``std_log_jacobian``, ``folding_percent``; with labels ``dice``/``hd95`` per
    label and their means, ``dice_std`` (over labels), ``n_labels``; with a true transform
    ``epe_mean_mm``/``epe_p95_mm``; with keypoints ``tre_mm`` (mean) and ``tre_p95_mm``.
    """
    displacement, grid = read_displacement_field(xfm)
    fixed = load_image(case.fixed)
    if grid != fixed.grid:
        raise ValueError(f"{xfm}: the field's grid is not the fixed image's")
    field = voxel_field(displacement, grid)
    fixed_labels = None
    if case.fixed_labels is not None:
        fixed_labels = load_image(case.fixed_labels, labels=True)
        moving_labels = load_image(case.moving_labels, labels=True)
        warped = apply_displacement(moving_labels, displacement, grid, labels=True)
        result = metrics.registration_metrics(field, fixed_labels.data, warped.data, grid.spacing,
                                              moving_labels=moving_labels.data)
        scores = [v for v in result["dice"].values() if v is not None]
        result["dice_std"] = _finite(np.std(scores)) if scores else None
    else:
        result = metrics.registration_metrics(field)
    if case.true_xfm is not None:
        true, _ = read_displacement_field(case.true_xfm)
        if case.mask is not None:
            mask = load_image(case.mask, labels=True).data > 0
        elif fixed_labels is not None:
            mask = fixed_labels.data > 0
        else:
            mask = None
        mean, p95 = metrics.endpoint_error(np.moveaxis(displacement, -1, 0), np.moveaxis(true, -1, 0), mask)
        result.update(epe_mean_mm=mean, epe_p95_mm=p95)
    if case.fixed_keypoints is not None:
        moving_grid = load_image(case.moving).grid
        fixed_points = keypoints_mm(case.fixed_keypoints, grid, case.keypoint_units)
        moving_points = keypoints_mm(case.moving_keypoints, moving_grid, case.keypoint_units)
        mapped = fixed_points + sample_displacement(displacement, grid, fixed_points)
        mean, distances = metrics.tre(mapped, moving_points)
        result.update(tre_mm=mean, tre_p95_mm=float(np.percentile(distances, 95)))
    return result

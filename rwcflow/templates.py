"""Template shape update of ANTs' ``antsMultivariateTemplateConstruction2.sh``, on world displacement fields.

After registering every image to the current template, ``average`` is the mean of the warped images and
``d`` the mean of the template→subject fields (RAS mm on the template grid, the mapping ``p -> p + d(p)``,
as :func:`rwcflow.transforms.read_displacement_field` gives it). ``d`` is the template's shape bias: the
update resamples ``average`` through ``-gradient_step * d`` composed ``repeats`` times, moving the
template against it.
"""

from __future__ import annotations

import numpy as np

from rwcflow import maps
from rwcflow.io import Grid, Image, resample


def update_displacement(mean_disp: np.ndarray, grid: Grid, gradient_step: float = 0.25, repeats: int = 4) -> np.ndarray:
    """The template update as world displacements on ``grid``: ``p -> p - gradient_step * d(p)`` applied
    ``repeats`` times (ANTs applies it 4 times), ``d`` being the mean template→subject field ``mean_disp``.
    It takes a point of the new template to the previous template's."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    return maps.compose_displacements([(-gradient_step * np.asarray(mean_disp), grid)] * repeats, grid)


def update_norms(mean_disp: np.ndarray, grid: Grid, average: Image) -> dict[str, float]:
    """Mean length in mm of the mean field ``d``: ``update_norm_mm`` over the template's foreground
    (:func:`rwcflow.maps.foreground_mask` of ``average``; in the background the fields are set by
    regularisation alone) and ``update_norm_grid_mm`` over the whole grid."""
    lengths = np.linalg.norm(mean_disp, axis=-1)
    foreground = maps.foreground_mask(average if average.grid == grid else resample(average, grid))
    return {"update_norm_mm": float(lengths[foreground].mean()), "update_norm_grid_mm": float(lengths.mean())}

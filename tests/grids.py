"""Grids the spatial tests share."""

from __future__ import annotations

import numpy as np

from rwcflow.io import Grid


def oblique_grid(shape=(14, 12, 10)) -> Grid:
    """An oblique, anisotropic grid (rotated about two axes, one axis flipped)."""
    c, s = np.cos(0.4), np.sin(0.4)
    rotation = np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.2, -1.6, 2.0])
    affine[:3, 3] = [-8.0, 12.0, 3.0]
    return Grid(shape, affine)

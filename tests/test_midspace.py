"""The rigid midspace against known motions: the mean of rigid matrices half-way along a rotation, and the
midspace of a session moved in its header by a known rotation and shift (no resampling of its voxels)."""

from __future__ import annotations

import numpy as np
import pytest

from rwcflow.example import make_example_pair, rigid_matrix
from rwcflow.io import Image
from rwcflow.midspace import mean_rigid, rigid_midspace


def test_the_mean_of_a_motion_and_the_identity_is_half_the_motion():
    """About the same centre: half the angle about the same axis and, the rotation's fixed point kept,
    half the shift along that axis (a screw motion halved)."""
    centre = np.array([10.0, -20.0, 5.0])
    motion = rigid_matrix([0.0, 0.0, 8.0], [0.0, 0.0, 3.0], centre)
    np.testing.assert_allclose(mean_rigid([np.eye(4), motion]), rigid_matrix([0.0, 0.0, 4.0], [0.0, 0.0, 1.5], centre),
                               atol=1e-10)
    # applying the half twice is the whole motion; the mean of one matrix is itself
    half = mean_rigid([np.eye(4), motion])
    np.testing.assert_allclose(half @ half, motion, atol=1e-10)
    np.testing.assert_allclose(mean_rigid([motion]), motion, atol=1e-12)


@pytest.fixture(scope="module")
def moved_pair() -> tuple[Image, Image, np.ndarray]:
    """Session 1 (the 4 mm example brain) and session 2, its voxels moved in world space by ``motion``
    (session-1 world -> session-2 world: 3° about each axis and (2, -1.5, 1) mm) through the header."""
    first = make_example_pair(resolution_mm=4.0).fixed
    centre = first.grid.voxel_to_world((np.array(first.grid.shape) - 1) / 2.0)
    motion = rigid_matrix([3.0, -3.0, 3.0], [2.0, -1.5, 1.0], centre)
    return first, Image(first.data.copy(), motion @ first.affine), motion


def _largest_distance(a: np.ndarray, b: np.ndarray, points: np.ndarray) -> float:
    """The largest distance (mm) between where the world matrices ``a`` and ``b`` put ``points`` ``(N, 3)``."""
    return float(np.linalg.norm((points @ a[:3, :3].T + a[:3, 3]) - (points @ b[:3, :3].T + b[:3, 3]), axis=1).max())


def test_the_sessions_meet_half_way(moved_pair):
    """Over the brain, the registered motion within 0.25 mm of the known one (1/16 of the 4 mm voxels) and
    each half within half that."""
    first, second, motion = moved_pair
    grid, maps = rigid_midspace([first, second])
    half = mean_rigid([np.eye(4), motion])
    brain = grid.world_points()[first.data > 0]
    # template -> session 1 is the inverse half motion, template -> session 2 the other half: the two maps
    # differ by the whole motion
    assert _largest_distance(maps[0], np.linalg.inv(half), brain) < 0.125
    assert _largest_distance(maps[1], motion @ np.linalg.inv(half), brain) < 0.125
    assert _largest_distance(maps[1] @ np.linalg.inv(maps[0]), motion, brain) < 0.25
    # the template grid is session 1's moved half-way: each template voxel starts on the same voxel of
    # either session (their data are the same array)
    assert grid.shape == first.grid.shape
    voxels = np.argwhere(first.data > 0).astype(float)
    template_points = grid.voxel_to_world(voxels)
    for matrix, session in zip(maps, (first, second)):
        landed = session.grid.world_to_voxel(template_points @ matrix[:3, :3].T + matrix[:3, 3])
        assert np.abs(landed - voxels).max() < 0.25 / 4.0


def test_without_alignment_every_map_is_the_identity(moved_pair):
    first, second, _ = moved_pair
    grid, maps = rigid_midspace([first, second], align=False)
    assert grid == first.grid
    for matrix in maps:
        np.testing.assert_array_equal(matrix, np.eye(4))

"""Groupwise refinement of a participant's sessions, against known answers: a local volume loss between two
textured sessions, and a known translation between sessions on different grids, split at the midpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from rwcflow import maps, spatial
from rwcflow.groupwise import GroupwiseRefinement, refine_groupwise
from rwcflow.io import Grid, Image

SHAPE = (40, 40, 40)
CENTRE = np.array([19.5, 19.5, 19.5])
RADIUS = 8.0
LOSS = 0.05


def _texture(seed: int = 0) -> np.ndarray:
    """Smooth random texture in [0, 1]: structure everywhere, so every displacement is seen."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(SHAPE), 2.0)
    return ((noise - noise.min()) / np.ptp(noise)).astype(np.float32)


def _log_jacobian(displacement: np.ndarray, grid: Grid) -> np.ndarray:
    return maps.log_jacobian(maps.jacobian_from_world_field(displacement, grid))


@pytest.fixture(scope="module")
def shrunk_pair():
    """Session 2 is session 1 with the ball of ``RADIUS`` voxels around ``CENTRE`` scaled down by ``LOSS`` of
    its volume (``u = a w(r) (x - c)``, ``w`` 1 inside, a raised cosine to 0 at twice the radius), on 3 mm
    voxels: a 24 mm ball, which the refinement's 10 mm smoothing resolves."""
    grid = Grid(SHAPE, np.diag([3.0, 3.0, 3.0, 1.0]))
    offset = np.indices(SHAPE, dtype=np.float64) - CENTRE.reshape(3, 1, 1, 1)
    distance = np.sqrt((offset**2).sum(axis=0))
    weight = 0.5 * (1 + np.cos(np.pi * np.clip(distance / RADIUS - 1, 0, 1)))
    scale = (1 - LOSS) ** (-1 / 3) - 1
    field = torch.from_numpy((scale * weight * offset)[None].astype(np.float32))
    first = _texture()
    second = spatial.warp(torch.from_numpy(first)[None, None], field)[0, 0].numpy()
    return grid, Image(first, grid.affine.copy()), Image(second, grid.affine.copy()), distance


def test_a_local_volume_loss_is_recovered_between_two_sessions(shrunk_pair):
    grid, first, second, distance = shrunk_pair
    zero = np.zeros((*SHAPE, 3))
    refined, warped, template = refine_groupwise([first, second], [zero, zero], grid, GroupwiseRefinement())
    change = _log_jacobian(refined[1], grid) - _log_jacobian(refined[0], grid)
    inside, far = distance <= RADIUS - 2, (distance >= 2.5 * RADIUS) & (distance <= 3.2 * RADIUS)
    measured = np.exp(change[inside].mean()) - 1
    assert measured == pytest.approx(-LOSS, abs=0.01)
    assert np.abs(change[far]).mean() < 0.002
    # no session privileged: the corrections have zero mean, so the template lies half-way
    np.testing.assert_allclose(refined[0] + refined[1], 0.0, atol=1e-5)
    # the template is the mean of the resampled sessions, which now agree better than the inputs did
    np.testing.assert_allclose(template.data, (warped[0].data + warped[1].data) / 2, atol=1e-6)
    before = np.abs(first.data - second.data)[distance <= 2 * RADIUS].mean()
    after = np.abs(warped[0].data - warped[1].data)[distance <= 2 * RADIUS].mean()
    assert after < 0.5 * before


def test_a_known_translation_between_grids_is_kept_and_an_error_split_at_the_midpoint():
    """Session 2 holds session 1's voxels on a grid shifted by ``t`` mm, so ``S2(q) = S1(q - t)``: maps
    ``d1 = 0`` and ``d2 = t + delta`` (``delta`` an error) refine to ``d2 - d1 = t``, ``d1 = delta / 2``."""
    spacing, shift, delta = 1.5, np.array([3.0, -4.5, 1.5]), np.array([0.3, -0.2, 0.25])
    affine = np.diag([spacing, spacing, spacing, 1.0])
    shifted = affine.copy()
    shifted[:3, 3] = shift
    data = _texture(seed=1)
    first, second = Image(data, affine), Image(data.copy(), shifted)
    grid = first.grid
    initial = [np.zeros((*SHAPE, 3)), np.broadcast_to(shift + delta, (*SHAPE, 3)).copy()]
    refined, warped, _ = refine_groupwise([first, second], initial, grid, GroupwiseRefinement())
    interior = (slice(8, -8),) * 3
    np.testing.assert_allclose((refined[1] - refined[0])[interior].mean(axis=(0, 1, 2)), shift, atol=0.02)
    np.testing.assert_allclose(refined[0][interior].mean(axis=(0, 1, 2)), delta / 2, atol=0.03)
    assert np.abs(warped[0].data - warped[1].data)[interior].mean() < 0.01


def test_a_session_cut_by_its_field_of_view_keeps_its_map_near_the_cut():
    """Session 2 holds only the first 28 of session 1's 40 x-slices, both maps are right (zero): correlation
    windows that reach past the cut would compare session 1 with session 2's padding and pull the maps."""
    data = _texture(seed=2)
    first, second = Image(data, np.eye(4)), Image(data[:28].copy(), np.eye(4))
    zero = np.zeros((*SHAPE, 3))
    refined, _, _ = refine_groupwise([first, second], [zero, zero], first.grid, GroupwiseRefinement())
    assert np.abs(refined[1]).max() < 0.01


def test_no_iterations_keeps_the_maps_and_averages_the_resampled_sessions(shrunk_pair):
    grid, first, second, _ = shrunk_pair
    initial = [np.zeros((*SHAPE, 3)), np.full((*SHAPE, 3), 3.0)]  # session 2 read 3 mm (a voxel) further along each axis
    refined, warped, template = refine_groupwise([first, second], initial, grid, GroupwiseRefinement(iterations=0))
    np.testing.assert_allclose(refined[1], 3.0, atol=1e-5)
    np.testing.assert_allclose(warped[1].data[:-1, :-1, :-1], second.data[1:, 1:, 1:], atol=1e-5)
    np.testing.assert_allclose(template.data, (warped[0].data + warped[1].data) / 2, atol=1e-6)


@pytest.mark.parametrize("options, message", [
    (dict(iterations=-1), "iterations"), (dict(history=0), "history"), (dict(regularization=-1), "regular"),
    (dict(window=4), "window"), (dict(interpolation="cubic"), "interpolation"),
])
def test_invalid_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        GroupwiseRefinement(**options)


def test_one_session_is_refused(shrunk_pair):
    grid, first, _, _ = shrunk_pair
    with pytest.raises(ValueError, match="two or more sessions"):
        refine_groupwise([first], [np.zeros((*SHAPE, 3))], grid)


@pytest.mark.parametrize("voxel_mm, expected", [(1.0, (6, 4)), (2.0, (3, 4)), (3.0, (2, 4)), (4.0, (2, 2)),
                                                (8.0, (1, 2))])
def test_the_control_grid_is_physical(voxel_mm, expected):
    """6 mm between control points and a Gaussian of 10 mm whatever the voxel size: spacing round(6 / voxel),
    box passes round(1.5 (10 / (spacing voxel))²) (a 3-point box has variance 2/3 of its spacing²)."""
    grid = Grid((8, 8, 8), np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0]))
    assert GroupwiseRefinement().control_grid(grid) == expected

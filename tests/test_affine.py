"""Affine pre-alignment on the real MNI152 T1: known random affines of the brain are recovered.

The fixed image is the nilearn MNI152 2009a brain (2 mm, brain-masked) resampled to 3 mm around the
brain; a moving image is the same brain resampled through a known world matrix ``M`` onto a grid around
the moved brain (any orientation and voxel size), so ``M`` is the answer. The error is the mean
distance ``|M_est p - M p|`` over the fixed brain's world points ``p``.
"""

from __future__ import annotations

import numpy as np
import pytest
from nilearn.datasets import load_mni152_brain_mask, load_mni152_template
from scipy.spatial.transform import Rotation

from rwcflow.affine import affine_align
from rwcflow.errors import InputError
from rwcflow.io import Grid, Image, resample

RAS = np.eye(3)
LIA = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # columns: i -> L, j -> I, k -> A


def grid_around(points: np.ndarray, spacing, directions: np.ndarray = RAS, margin: float = 6.0) -> Grid:
    """A grid whose axes point along the unit ``directions`` columns and covers ``points`` (N, 3) + margin."""
    spacing = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))
    along = points @ directions  # coordinates along each grid axis
    start = along.min(axis=0) - margin
    shape = tuple(int(n) for n in np.ceil((along.max(axis=0) + margin - start) / spacing) + 1)
    affine = np.eye(4)
    affine[:3, :3] = directions * spacing
    affine[:3, 3] = directions @ start
    return Grid(shape, affine)


@pytest.fixture(scope="module")
def mni():
    """The MNI152 T1 at 2 mm (head), its brain mask, and the world points of the brain voxels."""
    template, mask = load_mni152_template(resolution=2), load_mni152_brain_mask(resolution=2)
    head = Image(template.get_fdata().astype(np.float32), template.affine)
    brain_mask = Image((mask.get_fdata() > 0).astype(np.int32), mask.affine)
    points = brain_mask.grid.voxel_to_world(np.argwhere(brain_mask.data > 0).astype(float))
    return head, brain_mask, points


@pytest.fixture(scope="module")
def fixed(mni):
    """The brain on a 3 mm RAS grid around it, and the world points of its brain voxels."""
    head, brain_mask, points = mni
    grid = grid_around(points, 3.0, margin=4.0)
    assert max(grid.shape) <= 64
    brain = resample(head.with_data(head.data * brain_mask.data), grid)
    inside = resample(brain_mask, grid, labels=True).data > 0
    return brain, grid.voxel_to_world(np.argwhere(inside).astype(float))


def random_affine(seed: int, *, rigid: bool = False) -> np.ndarray:
    """Rotations up to 15 degrees, scalings within 10 % (none if ``rigid``), shifts up to 20 mm."""
    rng = np.random.default_rng(seed)
    matrix = np.eye(4)
    matrix[:3, :3] = Rotation.from_euler("xyz", rng.uniform(-15, 15, 3), degrees=True).as_matrix()
    if not rigid:
        matrix[:3, :3] = matrix[:3, :3] @ np.diag(rng.uniform(0.9, 1.1, 3))
    matrix[:3, 3] = rng.uniform(-20, 20, 3)
    return matrix


def moved(mni, matrix, spacing=3.5, directions=RAS, *, skull=False, invert=False) -> tuple[Image, Image]:
    """The brain (or head) whose world point ``matrix @ p`` shows fixed point ``p``, and its brain mask."""
    head, brain_mask, points = mni
    grid = grid_around(points @ matrix[:3, :3].T + matrix[:3, 3], spacing, directions)
    assert max(grid.shape) <= 64
    inverse = np.linalg.inv(matrix)
    mask = resample(brain_mask, grid, world_matrix=inverse, labels=True)
    image = resample(head if skull else head.with_data(head.data * brain_mask.data), grid, world_matrix=inverse)
    if invert:
        image = image.with_data(np.where(mask.data > 0, 1.0 - image.data, 0.0).astype(np.float32))
    return image, mask


def mean_error(estimate: np.ndarray, truth: np.ndarray, points: np.ndarray) -> float:
    """Mean distance in mm between the two mappings of ``points`` (N, 3)."""
    difference = estimate - truth
    return float(np.linalg.norm(points @ difference[:3, :3].T + difference[:3, 3], axis=1).mean())


@pytest.mark.parametrize("seed", [0, 1])
def test_random_affine_recovered_to_sub_millimetre(mni, fixed, seed):
    image, points = fixed
    truth = random_affine(seed)
    assert mean_error(np.eye(4), truth, points) > 10.0  # a real misalignment to start from
    estimate = affine_align(image, moved(mni, truth)[0])
    assert mean_error(estimate, truth, points) < 1.0


def test_identity_pair_gives_identity(fixed):
    image, points = fixed
    estimate = affine_align(image, image)
    assert mean_error(estimate, np.eye(4), points) < 0.25
    np.testing.assert_allclose(estimate[:3, :3], np.eye(3), atol=0.01)


def test_moving_in_lia_with_anisotropic_voxels(mni, fixed):
    image, points = fixed
    truth = random_affine(2)
    moving, _ = moved(mni, truth, spacing=(3.5, 3.5, 4.5), directions=LIA)
    estimate = affine_align(image, moving)
    assert mean_error(estimate, truth, points) < 1.0
    # the documented use: the matrix puts the moving image on the fixed grid, aligned
    aligned = resample(moving, image.grid, world_matrix=estimate).data
    assert np.corrcoef(aligned.ravel(), image.data.ravel())[0, 1] > 0.95


def test_mutual_information_across_contrasts(mni, fixed):
    image, points = fixed
    truth = random_affine(3)
    moving, _ = moved(mni, truth, spacing=(3.5, 3.5, 4.5), directions=LIA, invert=True)
    assert mean_error(affine_align(image, moving, similarity="mi"), truth, points) < 1.0
    # correlation cannot align inverted contrast: the test pair really needs mutual information
    assert mean_error(affine_align(image, moving, similarity="ncc"), truth, points) > 2.0


def test_masks_remove_skull_and_artefact(mni, fixed):
    image, points = fixed
    head, brain_mask, _ = mni
    truth = random_affine(4)
    moving, moving_mask = moved(mni, truth, skull=True)
    moving.data[:12, :12, :] = 2.0  # a bright artefact outside the brain
    fixed_head = resample(head, image.grid)
    fixed_mask = resample(brain_mask, image.grid, labels=True).data  # an array on the fixed grid
    estimate = affine_align(fixed_head, moving, fixed_mask=fixed_mask, moving_mask=moving_mask)
    assert mean_error(estimate, truth, points) < 1.0


def test_rigid_only_returns_a_rigid_matrix(mni, fixed):
    image, points = fixed
    truth = random_affine(5, rigid=True)
    moving, _ = moved(mni, truth, spacing=(3.5, 3.5, 4.5), directions=LIA)
    estimate = affine_align(image, moving, rigid_only=True)
    rotation = estimate[:3, :3]
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(3), atol=1e-5)
    assert np.linalg.det(rotation) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(estimate[3], [0.0, 0.0, 0.0, 1.0])
    assert mean_error(estimate, truth, points) < 1.0


def test_invalid_arguments_are_refused(fixed):
    image, _ = fixed
    with pytest.raises(ValueError, match="similarity"):
        affine_align(image, image, similarity="mse")
    with pytest.raises(ValueError, match="iteration count per level"):
        affine_align(image, image, levels=(4, 2), iterations=(10, 10, 10))
    with pytest.raises(InputError, match="no intensity"):
        affine_align(image, image, moving_mask=np.zeros(image.data.shape))

"""``register()``: the same world-space answer whatever the storage orientation, and keypoint guidance."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from rwcflow.example import make_example_pair
from rwcflow.io import Grid, Image, resample
from rwcflow.register import register


@pytest.fixture(scope="module")
def pair():
    return make_example_pair(resolution_mm=4.0, max_displacement_mm=8.0, seed=5)


@pytest.fixture(scope="module")
def reference(pair):
    return register(pair.fixed, pair.moving, model=None, device="cpu")


def reoriented(image: Image, axcodes: str) -> Image:
    """The same voxels stored in another orientation (axes permuted and flipped, world unchanged)."""
    img = nib.Nifti1Image(image.data, image.affine)
    current = nib.orientations.io_orientation(image.affine)
    wanted = nib.orientations.axcodes2ornt(tuple(axcodes))
    out = img.as_reoriented(nib.orientations.ornt_transform(current, wanted))
    return Image(np.asarray(out.dataobj), out.affine)


def world_values_on(grid: Grid, image: Image) -> np.ndarray:
    return resample(image, grid).data


@pytest.mark.parametrize("axcodes", ["LIA", "LAS"])
def test_fixed_orientation_does_not_change_the_world_mapping(pair, reference, axcodes):
    fixed = reoriented(pair.fixed, axcodes)
    result = register(fixed, pair.moving, model=None, device="cpu")
    # the displacement of every world point, brought back onto the reference grid
    displacement = result.world_displacement()
    back = np.stack([resample(fixed.with_data(displacement[..., d]), pair.fixed.grid).data for d in range(3)], -1)
    brain = pair.fixed_labels.data > 0
    difference = np.linalg.norm(back - reference.world_displacement(), axis=-1)[brain]
    assert difference.mean() < 0.3, difference.mean()  # mm, with 4 mm voxels: a mix-up costs several mm
    warped = world_values_on(pair.fixed.grid, result.warped)
    assert np.abs(warped - reference.warped.data)[brain].mean() < 0.01 * reference.warped.data.max()


def test_moving_orientation_and_anisotropic_voxels_give_the_same_result(pair, reference):
    moving = reoriented(pair.moving, "LSA")
    anisotropic = Grid(moving.data.shape, moving.affine).resized(
        [int(round(n * f)) for n, f in zip(moving.data.shape, (1.0, 1.6, 0.8))])
    moving = resample(moving, anisotropic)
    result = register(pair.fixed, moving, model=None, device="cpu")
    brain = pair.fixed_labels.data > 0
    difference = np.linalg.norm(result.world_displacement() - reference.world_displacement(), axis=-1)[brain]
    assert difference.mean() < 1.0, difference.mean()  # 4 mm voxels; only resampling of the moving differs
    correlation = np.corrcoef(result.warped.data[brain], reference.warped.data[brain])[0, 1]
    assert correlation > 0.98


def test_keypoints_pull_the_mapping_to_them(pair):
    rng = np.random.default_rng(0)
    brain = np.argwhere(pair.fixed_labels.data > 0)
    chosen = brain[rng.choice(len(brain), 40, replace=False)]
    fixed_points = pair.fixed.grid.voxel_to_world(chosen.astype(float))
    moving_points = fixed_points + pair.true_displacement[tuple(chosen.T)]

    def error(result):
        found = fixed_points + result.world_displacement()[tuple(chosen.T)]
        return np.linalg.norm(found - moving_points, axis=-1).mean()

    plain = register(pair.fixed, pair.moving, model=None, device="cpu", instance_optimization=20)
    guided = register(pair.fixed, pair.moving, model=None, device="cpu", instance_optimization=20,
                      fixed_keypoints=fixed_points, moving_keypoints=moving_points)
    assert error(guided) < 0.7 * error(plain), (error(guided), error(plain))

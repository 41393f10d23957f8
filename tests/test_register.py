"""``register()``: the same world-space answer whatever the storage orientation, and keypoint guidance."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from rwcflow.example import make_example_pair
from rwcflow.io import Grid, Image, resample
from rwcflow.models import RWCNet, RWCNetConfig
from rwcflow.register import network_field, network_shape, register


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


def _centre_of_mass_shift(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """A registration of pure translations, in voxels of its input grid: the shift of the centre of mass,
    as a constant field; it records the grids it ran on."""
    _centre_of_mass_shift.shapes.append(tuple(fixed.shape[2:]))
    axes = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in fixed.shape[2:]), indexing="ij")
    centre = [torch.stack([(a * image[0, 0]).sum() / image[0, 0].sum() for a in axes]) for image in (fixed, moving)]
    return (centre[1] - centre[0]).view(1, 3, 1, 1, 1).expand(1, 3, *fixed.shape[2:])


def test_network_runs_at_its_training_voxel_size_and_its_field_keeps_millimetres():
    # a blob on a grid of 1 x 2 x 1.5 mm voxels, moved by (6, 4, 6) mm; the "network" is trained at 2 mm
    shape, spacing, shift_mm = (33, 17, 25), (1.0, 2.0, 1.5), np.array([6.0, 4.0, 6.0])
    axes = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij")
    centre = np.array([16.0, 16.0, 18.0])
    blob = lambda c: np.exp(-sum((a - x) ** 2 for a, x in zip(axes, c)) / (2 * 3.0**2))  # noqa: E731
    fixed = torch.from_numpy(blob(centre)).float()[None, None]
    moving = torch.from_numpy(blob(centre + shift_mm)).float()[None, None]
    _centre_of_mass_shift.shapes = []

    field = network_field(_centre_of_mass_shift, fixed, moving, spacing, 2.0)

    assert network_shape(shape, spacing, 2.0) == (17, 17, 19)
    assert _centre_of_mass_shift.shapes == [(17, 17, 19)]
    assert field.shape == (1, 3, *shape)
    expected_voxels = torch.tensor(shift_mm / spacing, dtype=torch.float32).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(field, expected_voxels.expand_as(field), atol=0.02, rtol=0)
    # no training voxel size, or already the images' own: the network runs on the fixed grid
    for input_spacing in (None, 1.0):
        _centre_of_mass_shift.shapes = []
        same = network_field(_centre_of_mass_shift, fixed, moving, (1.0, 1.0, 1.0), input_spacing)
        assert _centre_of_mass_shift.shapes == [shape] and same.shape == (1, 3, *shape)


def test_register_runs_a_network_trained_at_another_voxel_size(pair):
    network = RWCNet(RWCNetConfig.tiny(input_spacing_mm=8.0)).eval()
    result = register(pair.fixed, pair.moving, model=network, affine=False, instance_optimization=False, device="cpu")
    assert result.field.shape == (1, 3, *pair.fixed.data.shape) and torch.isfinite(result.field).all()
    assert result.warped.grid == pair.fixed.grid

"""Pydra tasks, submitted for real with the "cf" worker into a temporary cache."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from rwcflow import maps, transforms
from rwcflow.affine import affine_align
from rwcflow.example import make_example_pair
from rwcflow.io import Grid, Image, load_image, save_image
from rwcflow.optimize import InstanceOptimization
from rwcflow.register import register
from rwcflow.tasks import AffineAlign, ApplyTransform, AverageImages, JacobianMaps, Register


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    pair = make_example_pair(resolution_mm=6.0)
    return pair.write(tmp_path_factory.mktemp("pair"))


def _data(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def _oblique_grid(shape=(12, 10, 9)) -> Grid:
    """An anisotropic, oblique grid (rotated about two axes, LAS-like flip)."""
    c, s = np.cos(0.3), np.sin(0.3)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, c, s], [0, -s, c]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1.5, 2.0, 2.5])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    return Grid(shape, affine)


def _world_points(grid: Grid) -> np.ndarray:
    return grid.voxel_to_world(np.moveaxis(np.indices(grid.shape, dtype=np.float64), 0, -1))


def test_register_task_matches_register_and_is_cached(pair_files, submit):
    files = pair_files
    task = Register(fixed=files["fixed"], moving=files["moving"], model="none", io_iters=5,
                    fixed_labels=files["fixed_labels"], moving_labels=files["moving_labels"], device="cpu")
    out = submit(task)
    direct = register(files["fixed"], files["moving"], model="none", instance_optimization=5, device="cpu",
                      fixed_labels=files["fixed_labels"], moving_labels=files["moving_labels"])
    np.testing.assert_allclose(_data(out.warped), direct.warped.data, atol=1e-5)
    np.testing.assert_array_equal(_data(out.warped_labels), direct.warped_labels.data)
    np.testing.assert_allclose(transforms.read_affine(out.affine), direct.affine, atol=1e-9)
    metrics = json.loads(Path(out.metrics).read_text())
    assert metrics["dice_mean"] == pytest.approx(direct.metrics["dice_mean"], abs=1e-6)
    disp, grid = transforms.read_displacement_field(out.xfm)
    assert grid == direct.fixed.grid
    np.testing.assert_allclose(disp, direct.world_displacement(), atol=1e-4)  # float32 on disk

    # the field holds the whole mapping: applying it to the moving image gives the warped image
    applied = submit(ApplyTransform(image=files["moving"], xfm=out.xfm))
    warped = _data(out.warped)
    np.testing.assert_allclose(_data(applied.out), warped, atol=1e-3 * np.abs(warped).max())

    # same inputs, same cache: the stored result comes back, nothing is written again
    stamp = Path(out.warped).stat().st_mtime_ns
    again = submit(Register(fixed=files["fixed"], moving=files["moving"], model="none", io_iters=5,
                            fixed_labels=files["fixed_labels"], moving_labels=files["moving_labels"],
                            device="cpu"))
    assert Path(again.warped) == Path(out.warped)
    assert Path(again.warped).stat().st_mtime_ns == stamp


def test_register_task_passes_its_instance_optimisation_options(pair_files, submit):
    files = pair_files
    out = submit(Register(fixed=files["fixed"], moving=files["moving"], model="none", io_iters=5, io_grid_factor=1,
                          io_similarity="mse", io_regularization=0.01, io_interpolation="bspline", device="cpu"))
    options = InstanceOptimization(iterations=5, grid_factor=1, similarity="mse", regularization=0.01,
                                   interpolation="bspline")
    direct = register(files["fixed"], files["moving"], model="none", instance_optimization=options, device="cpu")
    default = register(files["fixed"], files["moving"], model="none", instance_optimization=5, device="cpu")
    np.testing.assert_allclose(_data(out.warped), direct.warped.data, atol=1e-5)
    assert np.abs(direct.warped.data - default.warped.data).max() > 1e-3  # the options made a difference


def test_register_task_without_labels_has_no_label_outputs(pair_files, submit):
    out = submit(Register(fixed=pair_files["fixed"], moving=pair_files["moving"], model="none", io_iters=0,
                          affine=False, device="cpu"))
    assert out.warped_labels is None and out.metrics is None
    np.testing.assert_allclose(transforms.read_affine(out.affine), np.eye(4), atol=1e-12)


def test_affine_align_task_matches_engine(pair_files, submit):
    out = submit(AffineAlign(fixed=pair_files["fixed"], moving=pair_files["moving"], device="cpu"))
    expected = affine_align(load_image(pair_files["fixed"]), load_image(pair_files["moving"]), device="cpu")
    np.testing.assert_allclose(transforms.read_affine(out.affine), expected, atol=1e-9)


def test_apply_transform_onto_another_reference_grid(tmp_path, submit):
    """A linear image ``f(p) = a·p + b`` through a translation ``t``, onto a finer reference: ``f(q + t)``."""
    slope, offset, shift = np.array([0.5, -0.25, 0.75]), 40.0, np.array([1.5, -2.0, 1.0])
    field_grid = Grid((16, 16, 16), np.diag([2.0, 2.0, 2.0, 1.0]))
    image_grid = Grid((20, 20, 20), np.diag([2.0, 2.0, 2.0, 1.0]) @ np.array(
        [[1, 0, 0, -2], [0, 1, 0, -2], [0, 0, 1, -2], [0, 0, 0, 1.0]]))
    reference = Grid((13, 11, 12), np.diag([1.5, 1.7, 1.9, 1.0]) @ np.array(
        [[1, 0, 0, 4], [0, 1, 0, 3], [0, 0, 1, 4], [0, 0, 0, 1.0]]))
    image = save_image(Image((_world_points(image_grid) @ slope + offset).astype(np.float32), image_grid.affine),
                       tmp_path / "ramp.nii.gz")
    ref = save_image(Image(np.ones(reference.shape, np.float32), reference.affine), tmp_path / "ref.nii.gz")
    xfm = transforms.write_displacement_field(tmp_path / "shift.nii.gz",
                                              np.broadcast_to(shift, (*field_grid.shape, 3)), field_grid)
    out = submit(ApplyTransform(image=image, xfm=xfm, reference=ref))
    moved = load_image(out.out)
    assert moved.grid == reference
    np.testing.assert_allclose(moved.data, (_world_points(reference) + shift) @ slope + offset, atol=1e-3)


def test_jacobian_maps_of_a_scaling_field(tmp_path, submit):
    """``p -> S (p - c) + c`` on an oblique anisotropic grid: ``J = det S`` everywhere."""
    grid = _oblique_grid()
    scale = np.array([[1.2, 0.1, 0.0], [0.0, 0.9, 0.05], [0.0, 0.0, 1.5]])
    points = _world_points(grid)
    centre = points.mean(axis=(0, 1, 2))
    disp = (points - centre) @ (scale - np.eye(3)).T
    xfm = transforms.write_displacement_field(tmp_path / "scale.nii.gz", disp, grid)
    out = submit(JacobianMaps(xfm=xfm))
    jacobian, log_jacobian = load_image(out.jacobian), load_image(out.log_jacobian)
    assert jacobian.grid == grid
    np.testing.assert_allclose(jacobian.data, np.linalg.det(scale), rtol=1e-4)
    np.testing.assert_allclose(log_jacobian.data, np.log(np.linalg.det(scale)), atol=1e-4)


def test_average_images_mean_median_and_other_grids(tmp_path, smooth_volume, submit):
    grid = _oblique_grid((10, 9, 8))
    volumes = [smooth_volume(grid.shape, seed=seed)[0, 0].numpy() for seed in range(3)]
    paths = [save_image(Image(v, grid.affine), tmp_path / f"v{i}.nii.gz") for i, v in enumerate(volumes)]
    mean = submit(AverageImages(images=paths[:2]))
    np.testing.assert_allclose(_data(mean.average), (volumes[0] + volumes[1]) / 2, atol=1e-6)
    median = submit(AverageImages(images=paths, method="median"))
    np.testing.assert_allclose(_data(median.average), np.median(volumes, axis=0), atol=1e-6)

    # the same content stored flipped along i (another grid, same world): resampled back exactly
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, grid.shape[0] - 1
    flipped = save_image(Image(volumes[1][::-1].copy(), grid.affine @ flip), tmp_path / "flipped.nii.gz")
    mixed = submit(AverageImages(images=[paths[0], flipped]))
    assert load_image(mixed.average).grid == grid
    np.testing.assert_allclose(_data(mixed.average), (volumes[0] + volumes[1]) / 2, atol=1e-5)


def test_average_images_sharpened_by_the_laplacian(tmp_path, submit):
    """``a - s * laplacian(a)``: a quadratic bowl loses ``2 s`` per axis inside, values stay in range."""
    grid = _oblique_grid((12, 11, 10))
    i, j, k = np.indices(grid.shape, dtype=np.float64)
    bowl = (0.01 * ((i - 5.5) ** 2 + (j - 5) ** 2 + (k - 4.5) ** 2) + 1.0).astype(np.float32)
    path = save_image(Image(bowl, grid.affine), tmp_path / "bowl.nii.gz")
    sharpened = _data(submit(AverageImages(images=[path, path], sharpen=0.5)).average)
    interior = (slice(1, -1),) * 3
    np.testing.assert_allclose(sharpened[interior], (bowl - 0.5 * 3 * 2 * 0.01)[interior].clip(bowl.min()), atol=1e-5)
    assert sharpened.min() >= bowl.min() and sharpened.max() <= bowl.max()
    # a blurred edge gets steeper, a linear ramp is left alone inside
    edge = ndimage.gaussian_filter((i > 5.5).astype(np.float64), 1.0).astype(np.float32)
    steep = maps.laplacian_sharpen(edge, 0.5)
    assert np.abs(np.diff(steep, axis=0)).max() > 1.2 * np.abs(np.diff(edge, axis=0)).max()
    ramp = (i + 2 * j - k).astype(np.float32)
    np.testing.assert_allclose(maps.laplacian_sharpen(ramp, 1.0)[interior], ramp[interior], atol=1e-4)
    with pytest.raises(ValueError, match="strength"):
        maps.laplacian_sharpen(ramp, -1.0)

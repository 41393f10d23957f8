"""rwcflow's Nipype interfaces, each run for real as a Nipype node (hashed inputs, its own working
directory): the registration against the engine run directly, the others against analytic answers on
small oblique, anisotropic grids."""

from __future__ import annotations

import os

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no network check of Nipype's latest version

import json
from pathlib import Path

import numpy as np
import pytest
from nipype.interfaces.base import isdefined
from nipype.pipeline import engine as pe

from rwcflow import templates, transforms
from rwcflow.example import make_example_pair
from rwcflow.interfaces import (ApplyTransform, AverageFields, AverageImages, ComposeTransforms, InvertTransform,
                                JacobianMaps, Register, RigidMidspace, ShapeUpdate, SingleSession)
from rwcflow.io import Grid, Image, load_image, save_image
from rwcflow.optimize import InstanceOptimization
from rwcflow.register import register

from grids import oblique_grid


def _run(interface, tmp_path: Path, name: str = "node"):
    """``interface`` run as a Nipype node working under ``tmp_path``; its outputs."""
    return pe.Node(interface, name=name, base_dir=str(tmp_path)).run().outputs


def _field(path: Path, disp: np.ndarray, grid: Grid) -> Path:
    """``disp`` (one vector, or a field ``(X, Y, Z, 3)``) written as an ITK displacement field on ``grid``."""
    return transforms.write_displacement_field(path, np.broadcast_to(disp, (*grid.shape, 3)), grid)


def _inside(grid: Grid, points: np.ndarray) -> np.ndarray:
    """Which world ``points`` lie within ``grid``'s outermost voxel centres."""
    voxels = grid.world_to_voxel(points)
    return np.all((voxels >= -1e-6) & (voxels <= np.array(grid.shape) - 1 + 1e-6), axis=-1)


SLOPE, OFFSET = np.array([0.5, -0.25, 0.75]), 40.0


def _ramp(path: Path, grid: Grid) -> Path:
    """The linear image ``f(p) = SLOPE·p + OFFSET`` on ``grid`` (linear interpolation is exact on it)."""
    return save_image(Image((grid.world_points() @ SLOPE + OFFSET).astype(np.float32), grid.affine), path)


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    return make_example_pair(resolution_mm=6.0).write(tmp_path_factory.mktemp("pair"))


def test_register_matches_the_engine_and_names_outputs_after_the_moving_image(pair_files, tmp_path):
    files = pair_files
    out = _run(Register(fixed=files["fixed"], moving=files["moving"], model="none", io_iters=5, device="cpu",
                        fixed_labels=files["fixed_labels"], moving_labels=files["moving_labels"], num_threads=1),
               tmp_path)
    direct = register(files["fixed"], files["moving"], model="none", instance_optimization=5, device="cpu",
                      fixed_labels=files["fixed_labels"], moving_labels=files["moving_labels"])
    assert [Path(out.warped).name, Path(out.xfm).name, Path(out.affine).name, Path(out.warped_labels).name,
            Path(out.metrics).name] == ["moving_T1w_warped.nii.gz", "moving_T1w_xfm.nii.gz", "moving_T1w_affine.txt",
                                        "moving_T1w_warped_labels.nii.gz", "moving_T1w_metrics.json"]
    assert Path(out.xfm).parent == tmp_path / "node"  # the node's working directory
    np.testing.assert_allclose(load_image(out.warped).data, direct.warped.data, atol=1e-5)
    np.testing.assert_array_equal(load_image(out.warped_labels, labels=True).data, direct.warped_labels.data)
    np.testing.assert_allclose(transforms.read_affine(out.affine), direct.affine, atol=1e-9)
    disp, grid = transforms.read_displacement_field(out.xfm)
    assert grid == direct.fixed.grid
    np.testing.assert_allclose(disp, direct.world_displacement(), atol=1e-4)  # float32 on disk
    metrics = json.loads(Path(out.metrics).read_text())
    assert metrics["dice_mean"] == pytest.approx(direct.metrics["dice_mean"], abs=1e-6)

    # without label maps: no label outputs; with io_iters=0 and no affine the mapping is the identity in world space
    bare = _run(Register(fixed=files["fixed"], moving=files["fixed"], model="none", io_iters=0, affine=False,
                         device="cpu"), tmp_path, "bare")
    assert not isdefined(bare.warped_labels) and not isdefined(bare.metrics)
    assert np.abs(transforms.read_displacement_field(bare.xfm)[0]).max() < 1e-5

    # the instance-optimisation options reach the engine
    tuned = _run(Register(fixed=files["fixed"], moving=files["moving"], model="none", io_iters=5, io_similarity="mse",
                          io_regularization=0.01, io_interpolation="bspline", device="cpu", num_threads=1),
                 tmp_path, "tuned")
    options = InstanceOptimization(iterations=5, similarity="mse", regularization=0.01, interpolation="bspline")
    direct = register(files["fixed"], files["moving"], model="none", instance_optimization=options, device="cpu")
    np.testing.assert_allclose(load_image(tuned.warped).data, direct.warped.data, atol=1e-5)


def test_apply_transform_of_a_ramp_through_a_translation_onto_a_reference(tmp_path):
    """``f(p) = a·p + b`` through the translation ``t``, onto a finer oblique reference inside: ``f(q + t)``."""
    field_grid, shift = oblique_grid((16, 16, 16)), np.array([1.5, -2.0, 1.0])
    reference = Grid((9, 8, 7), field_grid.affine @ np.diag([0.8, 0.9, 1.1, 1.0]) @ np.array(
        [[1, 0, 0, 4], [0, 1, 0, 3], [0, 0, 1, 4], [0, 0, 0, 1.0]]))
    image_grid = Grid((24, 24, 24), field_grid.affine @ np.array(
        [[1, 0, 0, -4], [0, 1, 0, -4], [0, 0, 1, -4], [0, 0, 0, 1.0]]))
    ref = save_image(Image(np.ones(reference.shape, np.float32), reference.affine), tmp_path / "ref.nii.gz")
    out = _run(ApplyTransform(image=_ramp(tmp_path / "ramp.nii.gz", image_grid),
                              xfm=_field(tmp_path / "shift.nii.gz", shift, field_grid), reference=ref), tmp_path)
    moved = load_image(out.out)
    assert Path(out.out).name == "ramp_resampled.nii.gz"
    assert moved.grid == reference
    assert _inside(field_grid, reference.world_points()).all()
    np.testing.assert_allclose(moved.data, (reference.world_points() + shift) @ SLOPE + OFFSET, atol=1e-3)

    # label maps by nearest neighbour: a shift by whole voxels (2, -1, 1) of an oblique grid moves them exactly
    grid = oblique_grid((11, 10, 9))
    labels = np.random.default_rng(0).integers(0, 6, grid.shape).astype(np.int16)
    xfm = _field(tmp_path / "step.nii.gz", grid.affine[:3, :3] @ np.array([2, -1, 1]), grid)
    out = _run(ApplyTransform(image=save_image(Image(labels, grid.affine), tmp_path / "labels.nii.gz"), xfm=xfm,
                              labels=True), tmp_path, "labels")
    expected = np.zeros_like(labels)
    expected[:-2, 1:, :-1] = labels[2:, :-1, 1:]
    np.testing.assert_array_equal(load_image(out.out, labels=True).data, expected)


def test_compose_translations_and_invert_a_smooth_field(tmp_path, smooth_field):
    grid = oblique_grid()
    points = grid.world_points()
    t1, t2 = np.array([1.5, -2.0, 0.7]), np.array([-0.6, 1.1, 2.3])
    first, second = _field(tmp_path / "t1.nii.gz", t1, grid), _field(tmp_path / "t2.nii.gz", t2, grid)
    out = _run(ComposeTransforms(xfms=[first, second]), tmp_path, "compose")
    disp, composed_grid = transforms.read_displacement_field(out.out)
    assert Path(out.out).name == "t1_composed.nii.gz" and composed_grid == grid
    inside = _inside(grid, points + t2)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(disp[inside], np.broadcast_to(t1 + t2, disp[inside].shape), atol=1e-4)
    # ANTs order: [A, B] is p -> A(B(p)), B acting first (A a scaling about the centre, B the translation t2)
    scale, centre = np.diag([1.1, 0.9, 1.05]), points.mean(axis=(0, 1, 2))
    scaling = _field(tmp_path / "scale.nii.gz", (points - centre) @ (scale - np.eye(3)).T, grid)
    out = _run(ComposeTransforms(xfms=[scaling, second]), tmp_path, "compose_order")
    disp = transforms.read_displacement_field(out.out)[0]
    np.testing.assert_allclose(disp[inside], ((points + t2 - centre) @ scale.T + centre - points)[inside], atol=1e-4)

    # a translation inverts to its opposite; a smooth field composed with its inverse is ~ the identity
    inverse = _run(InvertTransform(xfm=first), tmp_path, "invert_t1").out
    assert Path(inverse).name == "t1_inverse.nii.gz"
    np.testing.assert_allclose(transforms.read_displacement_field(inverse)[0], np.broadcast_to(-t1, disp.shape),
                               atol=1e-5)
    voxels = smooth_field(grid.shape, amplitude=1.5, seed=3)
    smooth = _field(tmp_path / "smooth.nii.gz", np.moveaxis(voxels[0].double().numpy(), 0, -1) @ grid.affine[:3, :3].T,
                    grid)
    smooth_inverse = _run(InvertTransform(xfm=smooth), tmp_path, "invert_smooth").out
    residual = transforms.read_displacement_field(
        _run(ComposeTransforms(xfms=[smooth, smooth_inverse]), tmp_path, "round_trip").out)[0]
    interior = (slice(3, -3),) * 3
    assert np.abs(transforms.read_displacement_field(smooth)[0]).max() > 1.5  # mm: not trivially small
    assert np.abs(residual[interior]).max() < 0.1


def test_jacobian_maps_of_a_scaling_field(tmp_path):
    """``p -> S (p - c) + c`` on an oblique anisotropic grid: ``J = det S`` everywhere."""
    grid = oblique_grid()
    scale = np.array([[1.2, 0.1, 0.0], [0.0, 0.9, 0.05], [0.0, 0.0, 1.5]])
    points = grid.world_points()
    centre = points.mean(axis=(0, 1, 2))
    xfm = _field(tmp_path / "scale.nii.gz", (points - centre) @ (scale - np.eye(3)).T, grid)
    out = _run(JacobianMaps(xfm=xfm), tmp_path)
    assert (Path(out.jacobian).name, Path(out.log_jacobian).name) == ("scale_jacobian.nii.gz",
                                                                      "scale_log_jacobian.nii.gz")
    jacobian = load_image(out.jacobian)
    assert jacobian.grid == grid
    np.testing.assert_allclose(jacobian.data, np.linalg.det(scale), rtol=1e-4)
    np.testing.assert_allclose(load_image(out.log_jacobian).data, np.log(np.linalg.det(scale)), atol=1e-4)


def test_average_images_and_fields(tmp_path, smooth_volume):
    grid = oblique_grid((10, 9, 8))
    volumes = [smooth_volume(grid.shape, seed=seed)[0, 0].numpy() for seed in range(3)]
    paths = [save_image(Image(v, grid.affine), tmp_path / f"v{i}.nii.gz") for i, v in enumerate(volumes)]
    mean = load_image(_run(AverageImages(images=paths), tmp_path, "mean").average)
    assert mean.grid == grid
    np.testing.assert_allclose(mean.data, np.mean(volumes, axis=0), atol=1e-6)
    median = _run(AverageImages(images=paths, method="median"), tmp_path, "median").average
    np.testing.assert_allclose(load_image(median).data, np.median(volumes, axis=0), atol=1e-6)

    shifts = [np.array([1.0, -2.0, 0.5]), np.array([3.0, 0.0, -1.5])]
    fields = [_field(tmp_path / f"shift{i}.nii.gz", shift, grid) for i, shift in enumerate(shifts)]
    disp, average_grid = transforms.read_displacement_field(_run(AverageFields(xfms=fields), tmp_path, "fields").out)
    assert average_grid == grid
    np.testing.assert_allclose(disp, np.broadcast_to(np.mean(shifts, axis=0), disp.shape), atol=1e-5)


def test_shape_update_moves_the_average_against_the_mean_field(tmp_path):
    """A ramp ``f`` and a uniform mean field ``t``: ``repeats`` steps of ``-g t`` give ``f(p - repeats g t)``."""
    grid, shift, step, repeats = oblique_grid((16, 14, 12)), np.array([2.0, -1.0, 1.5]), 0.25, 4
    average = _ramp(tmp_path / "average.nii.gz", grid)
    mean_field = _field(tmp_path / "mean_xfm.nii.gz", shift, grid)
    out = _run(ShapeUpdate(average=average, average_xfm=mean_field, gradient_step=step, repeats=repeats),
               tmp_path, "update_1")
    assert Path(out.template).name == "template_update-1.nii.gz"
    template = load_image(out.template)
    points = grid.world_points()
    inside = _inside(grid, points - repeats * step * shift)
    update, _ = transforms.read_displacement_field(out.update_xfm)  # new template point p -> the average's
    np.testing.assert_allclose(update[inside], np.broadcast_to(-repeats * step * shift, update.shape)[inside], atol=1e-5)
    assert template.grid == grid and inside.mean() > 0.5
    np.testing.assert_allclose(template.data[inside], ((points - repeats * step * shift) @ SLOPE + OFFSET)[inside],
                               atol=1e-3)
    entry, = json.loads(Path(out.log).read_text())
    assert entry["update"] == 1
    assert entry["update_norm_mm"] == pytest.approx(np.linalg.norm(shift), rel=1e-5)
    assert entry["update_norm_grid_mm"] == pytest.approx(np.linalg.norm(shift), rel=1e-5)

    # a second update extends the log of the first
    second = _run(ShapeUpdate(average=out.template, average_xfm=mean_field, gradient_step=step, repeats=1, log=out.log),
                  tmp_path, "update_2")
    assert Path(second.template).name == "template_update-2.nii.gz"
    assert [entry["update"] for entry in json.loads(Path(second.log).read_text())] == [1, 2]
    with pytest.raises(ValueError, match="repeats"):
        templates.update_displacement(np.zeros((*grid.shape, 3)), grid, step, repeats=0)


def test_single_session_is_its_own_template_with_an_identity_transform(tmp_path):
    grid = oblique_grid((8, 7, 6))
    session = _ramp(tmp_path / "ses-1_T1w.nii.gz", grid)
    out = _run(SingleSession(session=session), tmp_path)
    assert (Path(out.xfm).name, Path(out.warped).name) == ("ses-1_T1w_xfm.nii.gz", "ses-1_T1w_warped.nii.gz")
    disp, xfm_grid = transforms.read_displacement_field(out.xfm)
    assert xfm_grid == grid and not disp.any()
    for copy in (out.template, out.warped):
        np.testing.assert_array_equal(load_image(copy).data, load_image(session).data)


def test_rigid_midspace_puts_the_template_half_way_between_two_shifted_sessions(pair_files, tmp_path):
    """Session 2 is session 1 moved by ``t`` through its header: the template grid is session 1's moved by
    ``t / 2`` and the template→session maps are ``-t / 2`` and ``+t / 2`` (their difference ``t``)."""
    shift = np.array([3.0, -2.0, 1.5])
    brain = load_image(pair_files["fixed"])
    moved = brain.affine.copy()
    moved[:3, 3] += shift
    sessions = [save_image(brain, tmp_path / "ses-1_T1w.nii.gz"),
                save_image(Image(brain.data, moved), tmp_path / "ses-2_T1w.nii.gz")]
    out = _run(RigidMidspace(sessions=sessions, device="cpu"), tmp_path, "midspace")
    assert [Path(path).name for path in out.xfms] == ["ses-1_T1w_xfm.nii.gz", "ses-2_T1w_xfm.nii.gz"]
    (first, grid), (second, second_grid) = (transforms.read_displacement_field(path) for path in out.xfms)
    assert grid == second_grid and grid.shape == brain.grid.shape
    # session 1's grid moved by t / 2 (a residual rotation of the rigid estimate below 0.1 degree)
    centre = (np.array(grid.shape) - 1) / 2
    np.testing.assert_allclose(grid.affine[:3, :3], brain.affine[:3, :3], atol=0.01)
    np.testing.assert_allclose(grid.voxel_to_world(centre), brain.grid.voxel_to_world(centre) + shift / 2, atol=0.1)
    inside = brain.data > 0.1 * brain.data.max()  # mm, on 6 mm voxels
    assert np.abs(second - first - shift)[inside].max() < 0.25
    assert np.abs(first + shift / 2)[inside].max() < 0.15

    # without alignment the sessions are taken as aligned in world space: identity maps on session 1's grid
    out = _run(RigidMidspace(sessions=sessions, align=False, device="cpu"), tmp_path, "world")
    for path in out.xfms:
        disp, world_grid = transforms.read_displacement_field(path)
        assert world_grid == brain.grid and not disp.any()

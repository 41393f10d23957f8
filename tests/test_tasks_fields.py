"""Pydra tasks on displacement fields (compose, invert, average, groupwise refinement) and label propagation,
submitted for real with the "cf" worker; analytic answers on small oblique, anisotropic grids."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from rwcflow import steps, transforms
from rwcflow.errors import InputError
from rwcflow.io import Grid, Image, load_image, save_image
from rwcflow.tasks import AverageFields, ComposeTransforms, GroupwiseRefine, InvertTransform, LabelPropagation

from grids import oblique_grid


def _inside(grid: Grid, points: np.ndarray) -> np.ndarray:
    """Which world ``points`` lie within ``grid``'s outermost voxel centres."""
    voxels = grid.world_to_voxel(points)
    return np.all((voxels >= -1e-6) & (voxels <= np.array(grid.shape) - 1 + 1e-6), axis=-1)


def _field(tmp_path, name: str, disp: np.ndarray, grid: Grid):
    """``disp`` (one vector, or a field ``(X, Y, Z, 3)``) written as an ITK displacement field on ``grid``."""
    return transforms.write_displacement_field(tmp_path / f"{name}.nii.gz",
                                               np.broadcast_to(disp, (*grid.shape, 3)), grid)


def _voxel_field_in_mm(field, grid: Grid) -> np.ndarray:
    """A ``(1, 3, X, Y, Z)`` field in voxels of ``grid`` as world RAS-mm displacements ``(X, Y, Z, 3)``."""
    return np.moveaxis(field[0].double().numpy(), 0, -1) @ grid.affine[:3, :3].T


def test_compose_translations_sum_and_ants_order(tmp_path, submit):
    grid = oblique_grid()
    points = grid.world_points()
    t1, t2 = np.array([1.5, -2.0, 0.7]), np.array([-0.6, 1.1, 2.3])
    out = submit(ComposeTransforms(xfms=[_field(tmp_path, "t1", t1, grid), _field(tmp_path, "t2", t2, grid)]))
    disp, composed_grid = transforms.read_displacement_field(out.out)
    assert composed_grid == grid
    inside = _inside(grid, points + t2)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(disp[inside], np.broadcast_to(t1 + t2, disp[inside].shape), atol=1e-4)

    # a scaling A about the centre and the translation t2 (B): [A, B] is p -> A(p + t2), B acting first
    scale = np.array([[1.1, 0.05, 0.0], [0.0, 0.9, 0.1], [0.0, 0.0, 1.05]])
    centre = points.mean(axis=(0, 1, 2))
    scaling = _field(tmp_path, "scale", (points - centre) @ (scale - np.eye(3)).T, grid)
    out = submit(ComposeTransforms(xfms=[scaling, _field(tmp_path, "t2", t2, grid)]))
    disp = transforms.read_displacement_field(out.out)[0]
    expected = (points + t2 - centre) @ scale.T + centre - points
    np.testing.assert_allclose(disp[inside], expected[inside], atol=1e-4)

    # the other order, onto a finer axis-aligned reference grid inside the fields' one: p -> A(p) + t2
    affine = np.diag([0.9, 1.0, 1.1, 1.0])
    affine[:3, 3] = centre - affine[:3, :3] @ [4.0, 3.5, 3.0]
    reference = Grid((9, 8, 7), affine)
    ref = save_image(Image(np.ones(reference.shape, np.float32), reference.affine), tmp_path / "ref.nii.gz")
    out = submit(ComposeTransforms(xfms=[_field(tmp_path, "t2", t2, grid), scaling], reference=ref))
    disp, composed_grid = transforms.read_displacement_field(out.out)
    assert composed_grid == reference
    ref_points = reference.world_points()
    assert _inside(grid, ref_points).all()
    np.testing.assert_allclose(disp, (ref_points - centre) @ (scale - np.eye(3)).T + t2, atol=1e-4)


def test_invert_translation_and_smooth_field(tmp_path, smooth_field, submit):
    grid = oblique_grid((16, 16, 16))
    shift = np.array([2.0, -1.3, 0.8])
    out = submit(InvertTransform(xfm=_field(tmp_path, "shift", shift, grid)))
    disp, inverse_grid = transforms.read_displacement_field(out.out)
    assert inverse_grid == grid
    np.testing.assert_allclose(disp, np.broadcast_to(-shift, disp.shape), atol=1e-5)

    # a smooth random field (1.5 voxels) composed with its inverse, either way: the identity inside, to
    # the iteration's precision one way and to trilinear interpolation error the other
    grid = oblique_grid((24, 24, 24))
    xfm = _field(tmp_path, "smooth", _voxel_field_in_mm(smooth_field(grid.shape, amplitude=1.5, seed=3), grid), grid)
    inverse = submit(InvertTransform(xfm=xfm)).out
    spacing = np.linalg.norm(grid.affine[:3, :3], axis=0).min()
    interior = (slice(3, -3),) * 3
    for chain, tolerance in (([xfm, inverse], 1e-4), ([inverse, xfm], 0.1)):
        residual = transforms.read_displacement_field(submit(ComposeTransforms(xfms=chain)).out)[0]
        assert np.abs(residual[interior]).max() < tolerance * spacing
    # the inverse is not trivially small: it undoes a displacement of up to 1.5 voxels
    assert np.abs(transforms.read_displacement_field(inverse)[0]).max() > spacing


def test_average_fields_on_one_grid_and_in_world_space(tmp_path, smooth_field, submit):
    grid = oblique_grid((12, 10, 9))
    first, second = (_voxel_field_in_mm(smooth_field(grid.shape, amplitude=2.0, seed=seed), grid) for seed in (1, 2))
    paths = [_field(tmp_path, name, disp, grid) for name, disp in (("first", first), ("second", second))]
    disp, average_grid = transforms.read_displacement_field(submit(AverageFields(xfms=paths)).out)
    assert average_grid == grid
    np.testing.assert_allclose(disp, (first + second) / 2, atol=1e-5)

    # the second field stored flipped along j (another grid, same world points): resampled back exactly
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1.0, grid.shape[1] - 1
    flipped = _field(tmp_path, "flipped", second[:, ::-1], Grid(grid.shape, grid.affine @ flip))
    disp, average_grid = transforms.read_displacement_field(submit(AverageFields(xfms=[paths[0], flipped])).out)
    assert average_grid == grid
    np.testing.assert_allclose(disp, (first + second) / 2, atol=1e-5)


def test_label_propagation_by_whole_voxels(tmp_path, submit):
    """A translation by (2, -1, 1) voxels of an oblique grid shifts the labels exactly, values kept."""
    grid = oblique_grid((11, 10, 9))
    labels = np.random.default_rng(0).integers(0, 6, grid.shape).astype(np.int16)
    path = save_image(Image(labels, grid.affine), tmp_path / "labels.nii.gz")
    step = np.array([2, -1, 1])
    xfm = _field(tmp_path, "step", grid.affine[:3, :3] @ step, grid)
    out = submit(LabelPropagation(labels=path, xfm=xfm))
    warped = np.asanyarray(nib.load(str(out.out)).dataobj)
    assert np.issubdtype(warped.dtype, np.integer)
    assert load_image(out.out, labels=True).grid == grid
    expected = np.zeros_like(labels)
    expected[:-2, 1:, :-1] = labels[2:, :-1, 1:]
    np.testing.assert_array_equal(warped, expected)


def test_groupwise_refine_keeps_a_known_translation_and_names_outputs_after_sessions(tmp_path, submit):
    """Session 2 is session 1's voxels on a grid shifted 4 mm along x; fields: zero for session 1, the
    translation for session 2. The refined fields still differ by it and both sessions land on the template."""
    data = ndimage.gaussian_filter(np.random.default_rng(3).random((24, 24, 24)), 1.5).astype(np.float32)
    first = Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    shifted = first.affine.copy()
    shifted[0, 3] = 4.0
    sessions = [save_image(first, tmp_path / "ses-1_T1w.nii.gz"),
                save_image(Image(data, shifted), tmp_path / "ses-2_T1w.nii.gz")]
    shift = np.broadcast_to([4.0, 0.0, 0.0], (24, 24, 24, 3))
    xfms = [transforms.write_displacement_field(tmp_path / name, disp, first.grid)
            for name, disp in (("a_xfm.nii.gz", 0 * shift), ("b_xfm.nii.gz", shift))]
    out = submit(GroupwiseRefine(sessions=sessions, xfms=xfms, iterations=100, device="cpu"))
    assert [Path(p).name for p in out.xfms] == ["ses-1_T1w_xfm.nii.gz", "ses-2_T1w_xfm.nii.gz"]
    assert [Path(p).name for p in out.warped] == ["ses-1_T1w_warped.nii.gz", "ses-2_T1w_warped.nii.gz"]
    refined = [transforms.read_displacement_field(path)[0] for path in out.xfms]
    np.testing.assert_allclose((refined[1] - refined[0])[4:-4, 4:-4, 4:-4], shift[4:-4, 4:-4, 4:-4], atol=0.01)
    template, warped = load_image(out.template), [load_image(path).data for path in out.warped]
    np.testing.assert_allclose(template.data, (warped[0] + warped[1]) / 2, atol=1e-6)
    np.testing.assert_allclose(warped[0][4:-4, 4:-4, 4:-4], warped[1][4:-4, 4:-4, 4:-4], atol=1e-3)


def test_groupwise_refine_refuses_fields_on_different_grids(tmp_path):
    image = Image(np.ones((8, 8, 8), np.float32), np.eye(4))
    session = save_image(image, tmp_path / "ses-1_T1w.nii.gz")
    xfms = [transforms.write_displacement_field(tmp_path / "a_xfm.nii.gz", np.zeros((8, 8, 8, 3)), image.grid),
            transforms.write_displacement_field(tmp_path / "b_xfm.nii.gz", np.zeros((9, 8, 8, 3)),
                                                Grid((9, 8, 8), np.eye(4)))]
    with pytest.raises(InputError, match="b_xfm.nii.gz: not on the grid of a_xfm.nii.gz"):
        steps.groupwise_refine_files([session, session], xfms, tmp_path)

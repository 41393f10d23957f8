"""Transforms out and in: every written file is applied by nitransforms (a second implementation) and
compared with rwcflow's own resampling; analytic answers pin the conventions (order, units, LPS signs)."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nitransforms import linear as nt_linear
from nitransforms import nonlinear as nt_nonlinear
from nitransforms.io.itk import ITKLinearTransform
from nitransforms.manip import TransformChain
from nitransforms.resampling import apply as nt_apply

from rwcflow import spatial, transforms
from rwcflow.errors import InputError
from rwcflow.io import Grid, Image, normalize_intensity, resample


def lia_grid(shape=(24, 20, 28), spacing=(2.2, 1.8, 2.5), centre=(0.0, 0.0, 8.0)) -> Grid:
    """A FreeSurfer-like LIA grid (i -> Left, j -> Inferior, k -> Anterior), anisotropic, centred on ``centre``."""
    affine = np.eye(4)
    affine[:3, :3] = np.array([[-1, 0, 0], [0, 0, 1], [0, -1, 0]]) * np.array(spacing)
    affine[:3, 3] = np.asarray(centre) - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return Grid(shape, affine)


def voxel_centres(shape) -> np.ndarray:
    """Voxel coordinates ``(X, Y, Z, 3)`` of every voxel of ``shape``."""
    return np.moveaxis(np.indices(shape, dtype=np.float64), 0, -1)


def rotation(axis, degrees: float) -> np.ndarray:
    """3x3 rotation about ``axis`` (Rodrigues)."""
    k = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    angle = np.radians(degrees)
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def translation(vector) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = vector
    return matrix


def pre_alignment(centre=(0.0, 0.0, 8.0)) -> np.ndarray:
    """Rotation (8 deg) + anisotropic scaling about ``centre`` + translation, RAS mm."""
    linear = np.eye(4)
    linear[:3, :3] = rotation((1, 2, 3), 8.0) @ np.diag([1.06, 0.94, 1.03])
    return translation(np.array((2.5, -3.0, 1.5)) + centre) @ linear @ translation(-np.asarray(centre))


@pytest.fixture(scope="module")
def moving() -> Image:
    """nibabel's real T1 crop (LAS, 2 mm, 33x41x25), intensities scaled to [0, 1]."""
    img = nib.load(Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii")
    return Image(normalize_intensity(img.get_fdata()), img.affine.astype(np.float64))


def nifti(image: Image) -> nib.Nifti1Image:
    return nib.Nifti1Image(image.data.astype(np.float32), image.affine)


def interior(disp: np.ndarray, grid: Grid, image: Image, margin: float = 1.0) -> np.ndarray:
    """Voxels of ``grid`` whose mapped point ``p + d(p)`` lies ``margin`` voxels inside ``image``."""
    points = grid.voxel_to_world(voxel_centres(grid.shape)) + disp
    coords = image.grid.world_to_voxel(points)
    upper = np.array(image.data.shape) - 1 - margin
    return np.all((coords >= margin) & (coords <= upper), axis=-1)


# --- analytic answers ------------------------------------------------------------------------------


def test_world_displacement_from_moving_voxels_on_another_grid():
    fixed = Grid((5, 6, 7), np.diag([2.0, 2.0, 2.0, 1.0]))
    moving = Grid((12, 14, 16), translation((10.0, 0.0, 0.0)))  # 1 mm voxels, origin at x = 10
    coords = 2.0 * torch.from_numpy(np.moveaxis(voxel_centres(fixed.shape), -1, 0))[None]
    disp = transforms.world_displacement(coords, fixed, moving)  # same voxel index * 2 -> +10 mm in x
    assert disp.shape == (5, 6, 7, 3)
    np.testing.assert_allclose(disp, np.broadcast_to([10.0, 0.0, 0.0], disp.shape), atol=1e-12)


def test_compose_voxel_field_uses_the_fixed_voxel_axes_and_spacing():
    grid = lia_grid()
    shift = torch.zeros(1, 3, *grid.shape)
    shift[:, 0] = 1.0  # one voxel along i: 2.2 mm to the Left (-x)
    shift[:, 1] = 2.0  # two voxels along j: 3.6 mm Inferior (-z)
    disp = transforms.compose_world_displacement(grid, np.eye(4), shift)
    np.testing.assert_allclose(disp, np.broadcast_to([-2.2, 0.0, -3.6], disp.shape), atol=1e-6)


def test_compose_scaling_about_the_origin():
    grid = lia_grid()
    scale = np.diag([1.1, 0.9, 1.2, 1.0])
    disp = transforms.compose_world_displacement(grid, scale, torch.zeros(1, 3, *grid.shape))
    points = grid.voxel_to_world(voxel_centres(grid.shape))
    np.testing.assert_allclose(disp, points * np.array([0.1, -0.1, 0.2]), atol=1e-9)


def test_compose_applies_the_voxel_field_first_then_the_affine():
    grid = lia_grid()
    quarter_turn = np.eye(4)
    quarter_turn[:3, :3] = rotation((0, 0, 1), 90.0)  # (x, y, z) -> (-y, x, z)
    shift = torch.zeros(1, 3, *grid.shape)
    shift[:, 0] = 1.0  # 2.2 mm along -x in fixed space, which the rotation turns into -y
    disp = transforms.compose_world_displacement(grid, quarter_turn, shift)
    rotation_only = transforms.compose_world_displacement(grid, quarter_turn, torch.zeros_like(shift))
    np.testing.assert_allclose(disp - rotation_only, np.broadcast_to([0.0, -2.2, 0.0], disp.shape), atol=1e-6)


def test_apply_displacement_samples_a_linear_image_exactly(moving):
    grid = lia_grid()
    slope = np.array([0.02, -0.01, 0.03])
    points = moving.grid.voxel_to_world(voxel_centres(moving.grid.shape))
    ramp = moving.with_data((points @ slope + 1.0).astype(np.float32))
    shift = np.array([3.0, -2.0, 1.0])
    disp = np.broadcast_to(shift, (*grid.shape, 3))
    out = transforms.apply_displacement(ramp, disp, grid)
    expected = (grid.voxel_to_world(voxel_centres(grid.shape)) + shift) @ slope + 1.0
    inside = interior(disp, grid, ramp, margin=0.0)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(out.data[inside], expected[inside], atol=1e-5)
    assert np.all(out.data[~interior(disp, grid, ramp, margin=-1.0)] == 0)  # zero well outside
    np.testing.assert_array_equal(out.affine, grid.affine)


def test_apply_displacement_to_labels_keeps_integer_values():
    grid = Grid((10, 9, 8), np.diag([1.0, 1.0, 1.0, 1.0]))
    labels = Image(np.random.default_rng(0).integers(0, 40, size=grid.shape).astype(np.int32), grid.affine)
    disp = np.broadcast_to([2.0, 0.0, -1.0], (*grid.shape, 3))  # whole voxels
    out = transforms.apply_displacement(labels, disp, grid, labels=True)
    assert out.data.dtype == np.int32
    np.testing.assert_array_equal(out.data[:-2, :, 1:], labels.data[2:, :, :-1])
    assert np.all(out.data[-2:] == 0) and np.all(out.data[:, :, 0] == 0)


# --- files: round trips and the on-disk convention -------------------------------------------------


def test_displacement_field_file_layout_and_round_trip(tmp_path, smooth_field):
    grid = lia_grid()
    disp = transforms.compose_world_displacement(grid, pre_alignment(), smooth_field(grid.shape, amplitude=1.5))
    path = transforms.write_displacement_field(tmp_path / "xfm.nii.gz", disp, grid)
    img = nib.load(path)
    assert img.shape == (*grid.shape, 1, 3)
    assert int(img.header["intent_code"]) == 1007 and img.header.get_intent()[0] == "vector"
    np.testing.assert_allclose(img.affine, grid.affine, atol=1e-6)  # world position kept
    assert int(img.header["sform_code"]) > 0 and int(img.header["qform_code"]) > 0
    np.testing.assert_allclose(np.asarray(img.dataobj)[:, :, :, 0, :], disp * [-1, -1, 1], atol=1e-4)  # LPS
    read, read_grid = transforms.read_displacement_field(path)
    np.testing.assert_allclose(read, disp.astype(np.float32), rtol=0, atol=1e-6)
    assert read_grid == grid
    assert [p.name for p in tmp_path.iterdir()] == ["xfm.nii.gz"]  # no temporary file left behind


def test_translation_along_ras_x_is_stored_as_minus_x_in_lps(tmp_path):
    grid = lia_grid()  # not RAS: the stored vectors must not follow the voxel axes
    t = 3.5
    disp = transforms.compose_world_displacement(grid, translation((t, 0.0, 0.0)), torch.zeros(1, 3, *grid.shape))
    path = transforms.write_displacement_field(tmp_path / "xfm.nii.gz", disp, grid)
    stored = np.asarray(nib.load(path).dataobj)[:, :, :, 0, :]
    np.testing.assert_allclose(stored, np.broadcast_to([-t, 0.0, 0.0], stored.shape), atol=1e-6)
    # nitransforms reads it back as a move of +t along RAS x
    corner = grid.voxel_to_world(np.array([[3.0, 4.0, 5.0]]))
    mapped = nt_nonlinear.load(path, fmt="itk").map(corner)
    np.testing.assert_allclose(mapped, corner + [t, 0.0, 0.0], atol=1e-5)
    # the affine file holds the same translation as -t in LPS
    affine_path = transforms.write_affine(tmp_path / "affine.txt", translation((t, 0.0, 0.0)))
    parameters = [line for line in affine_path.read_text().splitlines() if line.startswith("Parameters:")]
    np.testing.assert_allclose(np.array(parameters[0].split()[1:], dtype=float), [1, 0, 0, 0, 1, 0, 0, 0, 1, -t, 0, 0])


def test_affine_file_round_trip(tmp_path):
    matrix = pre_alignment()
    path = transforms.write_affine(tmp_path / "affine.txt", matrix)
    lines = path.read_text().splitlines()
    assert lines[0] == "#Insight Transform File V1.0"
    assert lines[2] == "Transform: AffineTransform_double_3_3"
    np.testing.assert_allclose(transforms.read_affine(path), matrix, rtol=0, atol=1e-12)


@pytest.mark.parametrize("suffix", [".tfm", ".mat"])
def test_read_affine_with_a_centre_as_nitransforms_does(tmp_path, suffix):
    lps = np.eye(4)
    lps[:3, :3] = [[0.98, -0.17, 0.05], [0.17, 0.97, -0.1], [-0.03, 0.11, 1.02]]
    lps[:3, 3] = [4.5, -2.25, 7.0]
    itk = ITKLinearTransform(parameters=lps, offset=np.array([10.0, -6.0, 3.0]))
    itk.to_filename(tmp_path / f"centred{suffix}")  # ANTs writes .mat by default
    np.testing.assert_allclose(transforms.read_affine(tmp_path / f"centred{suffix}"), itk.to_ras(), atol=1e-6)


# --- each written transform applied by nitransforms ------------------------------------------------


def test_written_field_applied_by_nitransforms_reproduces_rwcflow(tmp_path, moving, smooth_field):
    grid, matrix = lia_grid(), pre_alignment()
    field = smooth_field(grid.shape, amplitude=2.0, seed=3)
    disp = transforms.compose_world_displacement(grid, matrix, field)
    path = transforms.write_displacement_field(tmp_path / "xfm.nii.gz", disp, grid)

    theirs = nt_apply(nt_nonlinear.load(path, fmt="itk"), nifti(moving), order=1, mode="constant")
    np.testing.assert_allclose(theirs.affine, grid.affine, atol=1e-6)
    ours = transforms.apply_displacement(moving, *transforms.read_displacement_field(path))
    inside = interior(disp, grid, moving)
    assert inside.mean() > 0.6
    assert np.abs(ours.data - np.asarray(theirs.dataobj))[inside].max() < 1e-4

    # ...and rwcflow's own warped image, the moving image sampled once at M . F(x + u(x)), computed
    # here from the voxel field without going through the displacement file
    voxel_map = torch.from_numpy(np.linalg.inv(moving.affine) @ matrix @ grid.affine).float()
    points = spatial.identity_grid(grid.shape) + field
    coords = torch.einsum("ij,bjxyz->bixyz", voxel_map[:3, :3], points) + voxel_map[:3, 3].view(1, 3, 1, 1, 1)
    warped = spatial.sample(moving.tensor(), coords, padding_mode="zeros")[0, 0].numpy()
    assert np.abs(warped - np.asarray(theirs.dataobj))[inside].max() < 1e-4


def test_field_then_affine_chain_in_nitransforms_equals_the_composed_field(tmp_path, smooth_field):
    grid, matrix = lia_grid(), pre_alignment()
    field = smooth_field(grid.shape, amplitude=2.0, seed=4)
    deformable = transforms.compose_world_displacement(grid, np.eye(4), field)
    warp_path = transforms.write_displacement_field(tmp_path / "warp.nii.gz", deformable, grid)
    affine_path = transforms.write_affine(tmp_path / "affine.txt", matrix)
    # ANTs' `-t warp.nii.gz -t affine.txt`: the warp acts on the fixed point first
    chain = TransformChain([nt_nonlinear.load(warp_path, fmt="itk"), nt_linear.load(affine_path, fmt="itk")])
    points = grid.voxel_to_world(voxel_centres(grid.shape)).reshape(-1, 3)
    mapped = chain.map(points).reshape(*grid.shape, 3)
    expected = points.reshape(*grid.shape, 3) + transforms.compose_world_displacement(grid, matrix, field)
    np.testing.assert_allclose(mapped, expected, atol=1e-3)


def test_written_affine_applied_by_nitransforms_matches_rwcflow_resampling(tmp_path, moving):
    grid, matrix = lia_grid(), pre_alignment()
    path = transforms.write_affine(tmp_path / "affine.txt", matrix)
    xfm = nt_linear.load(path, fmt="itk")
    np.testing.assert_allclose(xfm.matrix, matrix, atol=1e-5)
    reference = nib.Nifti1Image(np.zeros(grid.shape, np.float32), grid.affine)
    theirs = np.asarray(nt_apply(xfm, nifti(moving), reference=reference, order=1, mode="constant").dataobj)
    ours = resample(moving, grid, world_matrix=transforms.read_affine(path)).data
    disp = transforms.compose_world_displacement(grid, matrix, torch.zeros(1, 3, *grid.shape))
    inside = interior(disp, grid, moving)
    assert inside.mean() > 0.6
    assert np.abs(ours - theirs)[inside].max() < 1e-4


# --- refusals --------------------------------------------------------------------------------------


def test_bad_inputs_are_refused_with_the_file_named(tmp_path):
    grid = lia_grid()
    with pytest.raises(ValueError, match="do not match"):
        transforms.write_displacement_field(tmp_path / "x.nii.gz", np.zeros((3, 3, 3, 3)), grid)
    with pytest.raises(ValueError, match=".mat"):
        transforms.write_affine(tmp_path / "affine.mat", np.eye(4))
    with pytest.raises(InputError, match="file not found"):
        transforms.read_displacement_field(tmp_path / "missing.nii.gz")
    plain = tmp_path / "plain.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), plain)
    with pytest.raises(InputError, match=r"plain\.nii\.gz: expected an ITK displacement field"):
        transforms.read_displacement_field(plain)
    two = tmp_path / "two.txt"
    one = transforms.write_affine(tmp_path / "one.txt", np.eye(4)).read_text()
    two.write_text(one + one.replace("#Insight Transform File V1.0\n", "").replace("#Transform 0", "#Transform 1"))
    with pytest.raises(InputError, match="holds 2 transforms"):
        transforms.read_affine(two)
    euler = tmp_path / "euler.txt"
    euler.write_text(one.replace("AffineTransform_double_3_3", "Euler3DTransform_double_3_3"))
    with pytest.raises(InputError, match="unsupported transform type"):
        transforms.read_affine(euler)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a transform\n")
    with pytest.raises(InputError, match="not an ITK text transform"):
        transforms.read_affine(notes)

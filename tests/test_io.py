"""rwcflow.io on real files: round trips, orientations and voxel sizes through world space, bad inputs."""

from __future__ import annotations

import math
import os

import nibabel as nib
import numpy as np
from scipy.spatial.transform import Rotation
import pytest

from rwcflow import io
from rwcflow.errors import InputError

# The common RAS grid: 2 mm voxels centred near the world origin.
RAS_SHAPE = (16, 18, 14)
RAS_AFFINE = np.array([[2.0, 0, 0, -15], [0, 2.0, 0, -17], [0, 0, 2.0, -13], [0, 0, 0, 1]])


def world_function(points: np.ndarray) -> np.ndarray:
    """A smooth function of world position (mm), ``(..., 3) -> (...)``."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    blob = np.exp(-((x - 4) ** 2 + (y + 3) ** 2 + (z - 2) ** 2) / (2 * 12.0**2))
    return blob + 0.3 * np.sin(x / 7.0) * np.cos(y / 9.0) + 0.2 * np.sin(z / 8.0) + 0.5


def voxel_points(shape) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)


def sampled(grid: io.Grid) -> np.ndarray:
    """``world_function`` at the voxel centres of ``grid``, as float32."""
    return world_function(grid.voxel_to_world(voxel_points(grid.shape))).astype(np.float32)


def rotation(angles) -> np.ndarray:
    """Rotation matrix from angles (radians) about the x, y and z axes (``Rz @ Ry @ Rx``)."""
    return Rotation.from_euler("xyz", angles).as_matrix()


def centred_grid(axcodes: str, spacing, angles=(0.0, 0.0, 0.0), extent: float = 54.0) -> io.Grid:
    """A grid of orientation ``axcodes`` (before rotation), voxel sizes ``spacing``, covering ``extent`` mm
    around the world origin (enough to hold the whole common RAS grid, rotated or not)."""
    axes = np.zeros((3, 3))
    for axis, (world, sign) in enumerate(nib.orientations.axcodes2ornt(axcodes)):
        axes[int(world), axis] = sign
    shape = tuple(int(math.ceil(extent / s)) + 1 for s in spacing)
    linear = rotation(angles) @ axes @ np.diag(spacing)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ ((np.array(shape) - 1) / 2)
    return io.Grid(shape, affine)


def save_nifti(data: np.ndarray, affine: np.ndarray, path) -> str:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def save_with_singular_affine(path) -> str:
    """A NIfTI file whose sform (the affine nibabel uses) is all zeros."""
    header = nib.Nifti1Header()
    header["sform_code"] = 1
    for row in ("srow_x", "srow_y", "srow_z"):
        header[row] = 0.0
    nib.save(nib.Nifti1Image(np.ones((5, 4, 3), np.float32), None, header=header), str(path))
    return str(path)


# --- round trips and atomic writes -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["image.nii.gz", "image.nii", "image.mgz"])
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8, np.int32])
def test_save_load_round_trip(tmp_path, name, dtype):
    grid = centred_grid("LIA", (1.0, 1.5, 2.0), angles=(0.1, 0.0, -0.2), extent=20.0)
    data = np.round(sampled(grid) * 100).astype(dtype)
    path = io.save_image(io.Image(data, grid.affine), tmp_path / name)
    assert path == tmp_path / name
    assert nib.load(str(path)).get_data_dtype().newbyteorder("=") == np.dtype(dtype)  # MGZ is big-endian
    loaded = io.load_image(path)
    assert loaded.data.dtype == np.float32 and loaded.path == str(path)
    assert np.array_equal(loaded.data, data.astype(np.float32))
    assert np.allclose(loaded.affine, grid.affine, atol=1e-4)
    assert nib.aff2axcodes(loaded.affine) == ("L", "I", "A")
    labels = io.load_image(path, labels=True)
    assert labels.data.dtype == np.int32 and np.array_equal(labels.data, np.round(data).astype(np.int32))


def test_save_narrows_types_the_format_cannot_hold(tmp_path):
    labels = np.zeros((6, 5, 4), dtype=np.int64)
    labels[2:4, 1:3, 1:3] = 17
    for name in ["labels.nii.gz", "labels.mgz"]:
        path = io.save_image(io.Image(labels, np.eye(4)), tmp_path / name)
        assert nib.load(str(path)).get_data_dtype().newbyteorder("=") == np.int32
        assert np.array_equal(io.load_image(path, labels=True).data, labels)
    path = io.save_image(io.Image(np.ones((4, 4, 4)), np.eye(4)), tmp_path / "double.mgz")
    assert nib.load(str(path)).get_data_dtype().newbyteorder("=") == np.float32
    with pytest.raises(ValueError, match="int32"):
        io.save_image(io.Image(np.full((2, 2, 2), 2**40), np.eye(4)), tmp_path / "huge.nii.gz")


def test_saved_nifti_header(tmp_path):
    grid = centred_grid("LAS", (1.0, 1.2, 3.0), extent=10.0)
    path = io.save_image(io.Image(sampled(grid), grid.affine), tmp_path / "image.nii.gz")
    header = nib.load(str(path)).header
    assert header.get_xyzt_units()[0] == "mm"
    assert int(header["qform_code"]) == 1 and int(header["sform_code"]) == 1
    assert np.allclose(header.get_qform(), grid.affine, atol=1e-4)
    assert np.allclose(header.get_zooms(), (1.0, 1.2, 3.0))


def test_atomic_save_leaves_only_the_target(tmp_path):
    image = io.Image(np.arange(60, dtype=np.float32).reshape(5, 4, 3), np.eye(4))
    io.save_image(image, tmp_path / "out" / "image.nii.gz")
    io.save_image(image.with_data(image.data * 2), tmp_path / "out" / "image.nii.gz")  # overwrite
    assert os.listdir(tmp_path / "out") == ["image.nii.gz"]
    assert np.array_equal(io.load_image(tmp_path / "out" / "image.nii.gz").data, image.data * 2)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "out" / "image.nii.gz").st_mode & 0o777 == 0o666 & ~umask


def test_failed_save_removes_its_temporary_file(tmp_path):
    blocker = tmp_path / "image.nii.gz"  # a non-empty folder where the file should go: rename fails
    blocker.mkdir()
    (blocker / "keep").write_text("x")
    with pytest.raises(OSError):
        io.save_image(io.Image(np.ones((4, 4, 4), np.float32), np.eye(4)), blocker)
    assert sorted(os.listdir(tmp_path)) == ["image.nii.gz"]
    assert os.listdir(blocker) == ["keep"]


def test_stale_temporaries_of_a_killed_write_are_found_and_removed(tmp_path):
    """What atomic_write leaves when killed between writing and renaming, and nothing else."""
    image = io.Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    (tmp_path / "sub").mkdir()
    left = tmp_path / "sub" / ".image.nii.gz.0123456789ab.tmp.nii.gz"
    io.save_image(image, left)  # as a SIGKILL between writing and renaming leaves it
    kept = [io.save_image(image, tmp_path / "sub" / "image.nii.gz"), tmp_path / ".rwcflow-run.lock",
            tmp_path / ".image.nii.gz.not-hex-name.tmp.nii.gz"]
    for path in kept[1:]:
        path.write_text("x")
    assert io.is_temporary(left) and not any(io.is_temporary(path) for path in kept)
    assert io.remove_stale_temporaries(tmp_path) == [left]
    assert not left.exists() and all(path.exists() for path in kept)


def test_image_tensor_and_grid():
    image = io.Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), RAS_AFFINE)
    tensor = image.tensor()
    assert tensor.shape == (1, 1, 2, 3, 4) and tensor.dtype.is_floating_point
    assert tensor[0, 0, 1, 2, 3] == 23
    assert image.grid == io.Grid((2, 3, 4), RAS_AFFINE.copy())
    assert image.grid != io.Grid((2, 3, 5), RAS_AFFINE)
    assert np.allclose(image.grid.spacing, (2.0, 2.0, 2.0))


# --- world space: orientations, oblique and anisotropic grids ---------------------------------------------


@pytest.mark.parametrize("axcodes, suffix", [("RAS", ".nii.gz"), ("LIA", ".mgz"), ("LAS", ".nii.gz"), ("LSA", ".nii")])
def test_reoriented_copies_resample_to_the_same_world_data(tmp_path, axcodes, suffix):
    ras = nib.Nifti1Image(sampled(io.Grid(RAS_SHAPE, RAS_AFFINE)), RAS_AFFINE)
    orientations = nib.orientations
    transform = orientations.ornt_transform(orientations.axcodes2ornt("RAS"), orientations.axcodes2ornt(axcodes))
    stored = ras.as_reoriented(transform)
    path = io.save_image(io.Image(np.asarray(stored.dataobj), stored.affine), tmp_path / f"image{suffix}")
    loaded = io.load_image(path)
    assert nib.aff2axcodes(loaded.affine) == tuple(axcodes)
    on_ras = io.resample(loaded, io.Grid(RAS_SHAPE, RAS_AFFINE))
    assert on_ras.grid == io.Grid(RAS_SHAPE, RAS_AFFINE)
    assert np.abs(on_ras.data - ras.get_fdata()).max() < 1e-4


@pytest.mark.parametrize(
    "axcodes, spacing, angles",
    [
        ("RAS", (2.0, 2.0, 2.0), (0.0, 0.0, 0.0)),  # the reference: same voxel centres
        ("RAS", (1.2, 2.5, 1.6), (0.0, 0.0, 0.0)),  # anisotropic
        ("LIA", (1.5, 2.5, 1.4), (0.0, 0.0, 0.0)),  # anisotropic, FreeSurfer orientation
        ("RAS", (1.6, 1.6, 1.6), (0.35, -0.2, 0.5)),  # oblique
        ("LAS", (1.4, 2.0, 2.4), (-0.3, 0.25, 0.15)),  # oblique, anisotropic, flipped
    ],
)
def test_any_grid_resamples_to_the_world_function(tmp_path, axcodes, spacing, angles):
    source = centred_grid(axcodes, spacing, angles)
    assert max(source.shape) <= 48
    path = io.save_image(io.Image(sampled(source), source.affine), tmp_path / "image.nii.gz")
    target = io.Grid(RAS_SHAPE, RAS_AFFINE)
    on_ras = io.resample(io.load_image(path), target)
    # linear interpolation of a function varying over ~10 mm: errors of a few thousandths
    assert np.abs(on_ras.data - sampled(target)).max() < 0.02


@pytest.mark.parametrize("axcodes, voxels", [("RAS", -4), ("LAS", 4)])
def test_world_matrix_translation_moves_content(axcodes, voxels):
    grid = centred_grid(axcodes, (1.25, 2.0, 2.0), extent=30.0)
    image = io.Image(sampled(grid), grid.affine)
    shift = np.eye(4)
    shift[0, 3] = 5.0  # the output at p takes the input at p + 5 mm along x
    moved = io.resample(image, grid, world_matrix=shift)
    # +5 mm in x is +4 voxels along i for RAS, -4 for LAS: content moves the other way
    if voxels < 0:
        assert np.allclose(moved.data[:voxels], image.data[-voxels:], atol=1e-5)
        assert np.all(moved.data[voxels:] == 0)
    else:
        assert np.allclose(moved.data[voxels:], image.data[:-voxels], atol=1e-5)
        assert np.all(moved.data[:voxels] == 0)


def test_labels_resample_by_nearest_neighbour():
    source = centred_grid("LIA", (2.0, 2.5, 2.0), extent=56.0)
    rng = np.random.default_rng(0)
    values = np.array([0, 2, 17, 41, 1000])
    labels = io.Image(values[rng.integers(0, 5, size=source.shape)].astype(np.int32), source.affine)
    target = centred_grid("RAS", (1.3, 1.1, 1.7), angles=(0.2, -0.1, 0.3), extent=30.0)
    out = io.resample(labels, target, labels=True)
    assert out.data.dtype == np.int32
    assert set(np.unique(out.data)) <= set(values)
    # each output voxel holds the label of the source voxel nearest to its centre
    nearest = np.rint(source.world_to_voxel(target.voxel_to_world(voxel_points(target.shape)))).astype(int)
    assert np.all((nearest >= 0) & (nearest < np.array(source.shape)))
    assert np.array_equal(out.data, labels.data[nearest[..., 0], nearest[..., 1], nearest[..., 2]])


def test_resample_keeps_edge_voxels_and_is_zero_outside():
    grid = centred_grid("LIA", (1.1, 1.3, 0.9), angles=(0.3, -0.2, 0.1), extent=12.0)
    image = io.Image(np.ones(grid.shape, np.float32), grid.affine)
    same = io.resample(image, grid)  # voxel coordinates off by rounding only, some just outside the edges
    assert np.allclose(same.data, 1.0)
    shifted = np.eye(4)
    shifted[2, 3] = 40.0
    assert np.all(io.resample(image, grid, world_matrix=shifted).data == 0)


def test_grid_resized_keeps_corner_voxel_centres():
    grid = centred_grid("LIA", (1.0, 1.5, 2.0), angles=(0.2, 0.1, -0.3), extent=20.0)
    for shape in [(41, 7, 30), (5, 5, 5)]:
        resized = grid.resized(shape)
        assert resized.shape == shape
        for corner in [(0, 0, 0), (1, 1, 1), (1, 0, 1)]:
            old = np.array(corner) * (np.array(grid.shape) - 1)
            new = np.array(corner) * (np.array(shape) - 1)
            assert np.allclose(resized.voxel_to_world(new), grid.voxel_to_world(old))
        expected = grid.spacing * (np.array(grid.shape) - 1) / (np.array(shape) - 1)
        assert np.allclose(resized.spacing, expected)
    half = grid.scaled(0.5)
    assert half.shape == tuple(max(2, round(n * 0.5)) for n in grid.shape)
    points = np.random.default_rng(1).uniform(-5, 5, (7, 3))
    assert np.allclose(grid.voxel_to_world(grid.world_to_voxel(points)), points)


# --- intensities -----------------------------------------------------------------------------------------


def test_normalize_mri_maps_percentiles_to_zero_and_one():
    rng = np.random.default_rng(2)
    data = np.zeros((20, 20, 20), np.float32)
    data[5:15, 5:15, 5:15] = rng.uniform(100, 1100, (10, 10, 10))
    low, high = np.percentile(data[data != 0], (0.5, 99.5))
    out = io.normalize_intensity(data)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    inside = (data >= low) & (data <= high)
    assert np.allclose(out[inside], (data[inside] - low) / (high - low), atol=1e-6)
    assert np.all(out[data > high] == 1.0) and np.all(out[data == 0] == 0.0)
    mask = np.zeros_like(data)
    mask[5:10] = 1
    low, high = np.percentile(data[mask > 0], (0.5, 99.5))
    assert np.allclose(io.normalize_intensity(data, mask=mask), np.clip((data - low) / (high - low), 0, 1), atol=1e-6)
    assert np.all(io.normalize_intensity(np.full((4, 4, 4), 7.0)) == 0.0)  # constant image: no division by zero
    # the near-zero halo resampling leaves around a brain is not tissue: same scaling with or without it
    halo = data.copy()
    halo[3:17, 3:17, 3:17][data[3:17, 3:17, 3:17] == 0] = 1e-6
    assert np.array_equal(io.normalize_intensity(halo)[data != 0], io.normalize_intensity(data)[data != 0])


def test_normalize_ct_clips_the_window():
    data = np.array([-3000.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0]).reshape(6, 1, 1)
    assert np.allclose(io.normalize_intensity(data, modality="ct")[:, 0, 0], [0, 0, 0.5, 0.75, 1, 1])
    assert np.allclose(io.normalize_intensity(data, modality="ct", window=(0.0, 500.0))[:, 0, 0], [0, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="modality"):
        io.normalize_intensity(data, modality="pet")


# --- bad input ---------------------------------------------------------------------------------------------


def assert_one_line_error(error: pytest.ExceptionInfo, path, problem: str) -> None:
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert problem in message


def test_squeezes_a_singleton_fourth_axis(tmp_path):
    data = np.ones((5, 4, 3, 1), np.float32)
    image = io.load_image(save_nifti(data, np.eye(4), tmp_path / "single.nii.gz"))
    assert image.data.shape == (5, 4, 3)


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda p: p / "missing.nii.gz", "not found"),
        (lambda p: (p / "text.nii.gz").write_text("not an image") and p / "text.nii.gz", "not a readable"),
        (lambda p: (p / "folder.nii.gz").mkdir() or p / "folder.nii.gz", "folder"),
        (lambda p: save_nifti(np.ones((5, 4, 3, 2), np.float32), np.eye(4), p / "series.nii.gz"), "2 volumes"),
        (lambda p: save_nifti(np.ones((5, 4), np.float32), np.eye(4), p / "flat.nii.gz"), "3-D"),
        (lambda p: save_nifti(np.zeros((5, 4, 3), np.float32), np.eye(4), p / "zeros.nii.gz"), "all zeros"),
        (lambda p: save_nifti(np.full((5, 4, 3), np.nan, np.float32), np.eye(4), p / "nan.nii.gz"), "NaN"),
        (lambda p: save_with_singular_affine(p / "affine.nii"), "affine"),
    ],
)
def test_bad_images_raise_one_line_input_errors(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(InputError) as error:
        io.load_image(path)
    assert_one_line_error(error, path, problem)
    assert error.value.path == str(path)


def test_truncated_file(tmp_path):
    path = save_nifti(np.ones((16, 16, 16), np.float32), np.eye(4), tmp_path / "cut.nii")
    with open(path, "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(InputError) as error:
        io.load_image(path)
    assert_one_line_error(error, path, "not a readable")


def test_nan_among_values_and_non_integer_labels(tmp_path):
    data = np.ones((5, 4, 3), np.float32)
    data[2, 2, 2] = np.nan
    path = save_nifti(data, np.eye(4), tmp_path / "some_nan.nii.gz")
    with pytest.raises(InputError) as error:
        io.load_image(path)
    assert_one_line_error(error, path, "NaN")
    labels = np.zeros((5, 4, 3), np.float32)
    labels[1:3] = 2.0
    labels[0, 0, 0] = 1.5
    path = save_nifti(labels, np.eye(4), tmp_path / "labels.nii.gz")
    with pytest.raises(InputError) as error:
        io.load_image(path, labels=True)
    assert_one_line_error(error, path, "non-integer")
    labels[0, 0, 0] = 1.0  # integer values stored as floats are fine
    path = save_nifti(labels, np.eye(4), tmp_path / "labels.nii.gz")
    assert set(np.unique(io.load_image(path, labels=True).data)) == {0, 1, 2}

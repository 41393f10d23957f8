"""Transforms out and in, in the formats ANTs and nitransforms read (DESIGN.md §4).

Inside rwcflow a registration is an affine world matrix ``M`` (4x4, RAS+ mm, fixed world point to
moving world point) and a voxel displacement field ``u`` on the fixed grid ``F``. Together they take
the fixed world point ``p`` of voxel ``x`` to the moving world point

    ``M · F(x + u(x))``:

the deformable field acts first, in fixed space, then the affine. This is ANTs' order for
``antsApplyTransforms -t warp.nii.gz -t affine.txt`` and nitransforms' ``TransformChain([warp, affine])``.

Files follow ITK, whose physical space is LPS+ (RAS+ with x and y negated) and whose transforms map a
point of the fixed (reference) space to the point of the moving space:

* a displacement field is a 5-D NIfTI of shape ``X×Y×Z×1×3``, intent ``vector`` (code 1007), holding
  ``d`` in LPS mm on the fixed grid, whose header keeps the fixed affine: ``q_moving = p + d(p)``;
* an affine is an ITK text transform (``AffineTransform_double_3_3``, LPS). It is written directly,
  not through nitransforms, whose ITK writer prints 6 significant digits and reads back in float32.

In memory every quantity is RAS+ mm, as nibabel and :mod:`rwcflow.io` have it.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy.io import loadmat

from rwcflow import spatial
from rwcflow.errors import InputError
from rwcflow.io import Grid, Image, PathLike, atomic_write, read_nibabel, write_atomically

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_RAS_TO_LPS = _LPS[:3, :3].diagonal()
_AFFINE_TYPES = ("AffineTransform", "MatrixOffsetTransformBase")
_ITK_BANNER = "#Insight Transform File V1.0"


def _channels_last(field: torch.Tensor | np.ndarray) -> np.ndarray:
    """A ``(1, 3, X, Y, Z)`` or ``(3, X, Y, Z)`` tensor or array as a float64 ``(X, Y, Z, 3)`` array."""
    if isinstance(field, torch.Tensor):
        field = field.detach().cpu().numpy()
    field = np.asarray(field, dtype=np.float64)
    if field.ndim == 5 and field.shape[0] == 1:
        field = field[0]
    if field.ndim != 4 or field.shape[0] != 3:
        raise ValueError(f"expected a (1, 3, X, Y, Z) or (3, X, Y, Z) field, got shape {field.shape}")
    return np.moveaxis(field, 0, -1)


def world_displacement(
    coords_moving_voxel: torch.Tensor | np.ndarray, fixed_grid: Grid, moving_grid: Grid
) -> np.ndarray:
    """RAS-mm displacements ``(X, Y, Z, 3)`` on ``fixed_grid`` from voxel coordinates in ``moving_grid``.

    ``coords_moving_voxel`` ``(1, 3, X, Y, Z)`` gives, for every fixed voxel ``x``, the voxel of
    ``moving_grid`` it maps to; the result is ``moving_world(coords(x)) - fixed_world(x)``.
    """
    coords = _channels_last(coords_moving_voxel)
    if coords.shape[:3] != tuple(fixed_grid.shape):
        raise ValueError(f"coordinates of shape {coords.shape[:3]} do not lie on a grid of shape {fixed_grid.shape}")
    return moving_grid.voxel_to_world(coords) - fixed_grid.world_points()


def compose_world_displacement(
    fixed_grid: Grid, world_matrix: np.ndarray, field: torch.Tensor | np.ndarray
) -> np.ndarray:
    """The whole fixed->moving mapping ``p -> M · F(x + u(x))`` as RAS-mm displacements ``(X, Y, Z, 3)``.

    ``world_matrix`` ``M`` (4x4, RAS mm) maps a fixed world point to a moving world point; ``field``
    ``u`` ``(1, 3, X, Y, Z)`` is in voxels of ``fixed_grid`` ``F`` and acts first, in fixed space.
    """
    field = torch.as_tensor(field).detach().cpu().to(torch.float64)
    coords = spatial.identity_grid(field.shape[-3:], dtype=torch.float64) + field
    # the fixed grid as seen in moving world space through M: its voxel x + u(x) lies at M . F(x + u(x))
    aligned = Grid(fixed_grid.shape, np.asarray(world_matrix, dtype=np.float64) @ fixed_grid.affine)
    return world_displacement(coords, fixed_grid, aligned)


def mapped_coordinates(fixed_grid: Grid, image_grid: Grid, world_matrix: np.ndarray, field: torch.Tensor) -> torch.Tensor:
    """Voxel coordinates in ``image_grid`` of ``M · F(x + u(x))`` for every fixed voxel ``x``, ``(1, 3, X, Y, Z)``.

    Computed in torch on ``field``'s device (the GPU path of :func:`rwcflow.register.register`).
    """
    voxel_map = np.linalg.inv(image_grid.affine) @ np.asarray(world_matrix, dtype=np.float64) @ fixed_grid.affine
    matrix = torch.as_tensor(voxel_map, dtype=field.dtype, device=field.device)
    points = spatial.identity_grid(fixed_grid.shape, device=field.device, dtype=field.dtype) + field
    return torch.einsum("ij,bjxyz->bixyz", matrix[:3, :3], points) + matrix[:3, 3].view(1, 3, 1, 1, 1)


def sample_image(image: Image, coords: torch.Tensor, grid: Grid, *, labels: bool = False) -> Image:
    """``image`` sampled at its voxel coordinates ``coords`` ``(1, 3, X, Y, Z)``, as an image on ``grid``.

    Linear interpolation, or nearest neighbour for ``labels=True`` (integer values kept); 0 outside.
    """
    values = image.tensor(coords.device, torch.float32)
    mode = "nearest" if labels else "bilinear"
    out = spatial.sample(values, coords.float(), mode=mode, padding_mode="zeros")[0, 0].cpu().numpy()
    data = np.rint(out).astype(image.data.dtype) if labels else out
    return Image(data, grid.affine.copy(), image.path)


def apply_displacement(image: Image, disp_ras_mm: np.ndarray, grid: Grid, *, labels: bool = False) -> Image:
    """``image`` (any grid) sampled at ``p + d(p)`` for every voxel ``p`` of ``grid``, as an image on ``grid``."""
    points = grid.world_points() + np.asarray(disp_ras_mm, dtype=np.float64)
    coords = torch.from_numpy(np.moveaxis(image.grid.world_to_voxel(points), -1, 0)[None].astype(np.float32))
    return sample_image(image, coords, grid, labels=labels)


def write_displacement_field(path: PathLike, disp_ras_mm: np.ndarray, grid: Grid) -> Path:
    """Write RAS-mm displacements ``(X, Y, Z, 3)`` on ``grid`` as an ITK/ANTs displacement field (atomic)."""
    disp = np.asarray(disp_ras_mm, dtype=np.float64)
    if disp.shape != (*grid.shape, 3):
        raise ValueError(f"displacements of shape {disp.shape} do not match the grid {(*grid.shape, 3)}")
    lps = (disp * _RAS_TO_LPS)[:, :, :, None, :].astype(np.float32)
    img = nib.Nifti1Image(lps, grid.affine)
    img.set_qform(grid.affine, code=1)
    img.set_sform(grid.affine, code=1)
    img.header.set_intent("vector")
    img.header.set_xyzt_units("mm")
    return write_atomically(img, path)


def read_displacement_field(path: PathLike) -> tuple[np.ndarray, Grid]:
    """Read an ITK/ANTs displacement field: RAS-mm displacements ``(X, Y, Z, 3)`` and the grid they lie on."""
    path = Path(path)
    img, data = read_nibabel(path, "NIfTI image")
    if data.ndim != 5 or data.shape[3:] != (1, 3):
        raise InputError(path, f"expected an ITK displacement field of shape X×Y×Z×1×3, got {tuple(data.shape)}")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "header has an invalid voxel-to-world affine")
    disp = data[:, :, :, 0, :].astype(np.float64) * _RAS_TO_LPS
    if not np.all(np.isfinite(disp)):
        raise InputError(path, "displacement field contains NaN or infinite values")
    return disp, Grid(tuple(int(n) for n in disp.shape[:3]), affine)


def write_affine(path: PathLike, matrix_ras: np.ndarray) -> Path:
    """Write a 4x4 RAS world matrix (fixed point to moving point) as an ITK text transform (atomic)."""
    path = Path(path)
    matrix = np.asarray(matrix_ras, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.allclose(matrix[3], [0, 0, 0, 1]):
        raise ValueError(f"expected a 4x4 affine matrix with last row 0 0 0 1, got {matrix.tolist()}")
    if path.suffix == ".mat":
        raise ValueError(f"{path}: ITK reads .mat files as binary; write the text transform to .txt or .tfm")
    lps = _LPS @ matrix @ _LPS
    numbers = " ".join(format(v, ".17g") for v in [*lps[:3, :3].ravel(), *lps[:3, 3]])
    text = (
        f"{_ITK_BANNER}\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
        f"Parameters: {numbers}\nFixedParameters: 0 0 0\n"
    )
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def read_affine(path: PathLike) -> np.ndarray:
    """Read one ITK affine (text ``.txt``/``.tfm``, or ANTs' binary ``.mat``) as a 4x4 RAS world matrix."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    kind, parameters, centre = _read_mat_affine(path) if path.suffix == ".mat" else _read_text_affine(path)
    if not kind.startswith(_AFFINE_TYPES) or not kind.endswith("_3_3"):
        raise InputError(path, f"unsupported transform type {kind!r}; expected a 3-D AffineTransform")
    if parameters.size != 12 or centre.size != 3:
        raise InputError(path, f"expected 12 parameters and 3 fixed ones, got {parameters.size} and {centre.size}")
    linear, translation = parameters[:9].reshape(3, 3), parameters[9:]
    lps = np.eye(4)
    lps[:3, :3] = linear
    lps[:3, 3] = translation + centre - linear @ centre
    return _LPS @ lps @ _LPS


def _read_text_affine(path: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """Transform type, parameters and fixed parameters (the centre) of a one-transform ITK text file."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not a readable ITK text transform ({type(exc).__name__})") from None
    if not lines or not lines[0].startswith("#Insight Transform File"):
        raise InputError(path, "not an ITK text transform (no '#Insight Transform File' header)")
    fields: dict[str, list[str]] = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep and not key.startswith("#"):
            fields.setdefault(key.strip(), []).append(value.strip())
    kinds = fields.get("Transform", [])
    if len(kinds) != 1:
        raise InputError(path, f"holds {len(kinds)} transforms; expected exactly one affine")
    try:
        parameters = np.array(fields["Parameters"][0].split(), dtype=np.float64)
        centre = np.array(fields.get("FixedParameters", ["0 0 0"])[0].split(), dtype=np.float64)
    except (KeyError, ValueError):
        raise InputError(path, "ITK transform parameters are missing or not numbers") from None
    return kinds[0], parameters, centre


def _read_mat_affine(path: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """Transform type, parameters and centre of an ANTs/ITK binary (MATLAB v4) ``.mat`` transform."""
    try:
        contents = loadmat(str(path))
    except Exception as exc:  # scipy raises several types for files it cannot parse
        raise InputError(path, f"not a readable ITK .mat transform ({type(exc).__name__})") from None
    kinds = [key for key in contents if not key.startswith("__") and key != "fixed"]
    if len(kinds) != 1 or "fixed" not in contents:
        raise InputError(path, f"expected one transform and its 'fixed' centre, found {sorted(contents)}")
    return kinds[0], np.ravel(contents[kinds[0]]).astype(np.float64), np.ravel(contents["fixed"]).astype(np.float64)

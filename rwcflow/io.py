"""Images and grids: NIfTI/MGZ I/O through nibabel, world-space resampling, intensity normalisation.

A :class:`Grid` is a shape and a voxel-to-world affine (RAS+ millimetres, as nibabel gives it); an
:class:`Image` is a 3-D array on a grid. Any orientation (RAS, LIA, LAS, LSA), oblique affines and
anisotropic voxels are handled by going through world coordinates, never by "same shape".
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from rwcflow.errors import InputError

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape`` (X, Y, Z) and the 4x4 voxel-to-world ``affine`` (RAS+ mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def __eq__(self, other: object) -> bool:
        """Same shape and (to 1e-6 mm) the same affine; arrays never reach ``bool()``."""
        if not isinstance(other, Grid):
            return NotImplemented
        return tuple(self.shape) == tuple(other.shape) and bool(np.allclose(self.affine, other.affine, atol=1e-6))

    @property
    def spacing(self) -> np.ndarray:
        """Voxel sizes in mm along the three array axes."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def resized(self, shape: Sequence[int]) -> Grid:
        """The grid of ``shape`` covering the same extent, corner voxel centres kept (``align_corners``)."""
        scale = [(o - 1) / max(n - 1, 1) for o, n in zip(self.shape, shape)]
        return Grid(tuple(int(n) for n in shape), self.affine @ np.diag([*scale, 1.0]))

    def scaled(self, factor: float) -> Grid:
        """The grid with about ``factor`` times as many voxels along each axis (at least 2)."""
        return self.resized([max(2, int(round(n * factor))) for n in self.shape])

    def voxel_to_world(self, points: np.ndarray) -> np.ndarray:
        """Map voxel coordinates ``(..., 3)`` to world coordinates in mm."""
        return points @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_points(self) -> np.ndarray:
        """World position (RAS mm) of every voxel centre, ``(X, Y, Z, 3)``."""
        return self.voxel_to_world(np.moveaxis(np.indices(self.shape, dtype=np.float64), 0, -1))

    def world_to_voxel(self, points: np.ndarray) -> np.ndarray:
        """Map world coordinates ``(..., 3)`` in mm to voxel coordinates."""
        inverse = np.linalg.inv(self.affine)
        return points @ inverse[:3, :3].T + inverse[:3, 3]


@dataclass
class Image:
    """A 3-D volume on a grid; ``path`` is where it came from (for error messages), if anywhere."""

    data: np.ndarray
    affine: np.ndarray
    path: str | None = None

    @property
    def grid(self) -> Grid:
        return Grid(tuple(int(n) for n in self.data.shape), np.asarray(self.affine, dtype=np.float64))

    def with_data(self, data: np.ndarray) -> Image:
        """A new image on the same grid holding ``data``."""
        return Image(np.asarray(data), self.affine.copy(), self.path)

    def tensor(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The data as a ``(1, 1, X, Y, Z)`` tensor."""
        return torch.as_tensor(np.ascontiguousarray(self.data), device=device).to(dtype)[None, None]


def read_nibabel(path: PathLike, what: str = "NIfTI/MGZ image") -> tuple[nib.spatialimages.SpatialImage, np.ndarray]:
    """Open ``path`` with nibabel and read its data; an InputError names the file if that fails."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, "is a folder, not an image file")
    try:
        img = nib.load(str(path))
        return img, np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise InputError(path, f"not a readable {what} ({type(exc).__name__})") from None


def read_keypoints(path: PathLike) -> np.ndarray:
    """Keypoints ``(N, 3)`` from a CSV or whitespace-separated text file of ``x, y, z`` rows (world mm for
    rwcflow's own inputs; Learn2Reg's files hold voxel indices)."""
    path = Path(path)
    try:
        points = np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None, ndmin=2)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"not a readable keypoint file ({exc})") from None
    if points.shape[1] != 3:
        raise InputError(path, f"keypoints need 3 columns (x, y, z), got {points.shape[1]}")
    return points


def load_image(path: PathLike, *, labels: bool = False) -> Image:
    """Load a NIfTI or MGZ volume, checking it is usable; errors name the file and the problem.

    A 4-D image with a singleton fourth axis is squeezed; several volumes, NaNs or an all-zero image are
    refused. ``labels=True`` keeps integer label values (and refuses non-integer values).
    """
    path = Path(path)
    img, data = read_nibabel(path)
    affine = np.asarray(img.affine, dtype=np.float64)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        raise InputError(path, f"holds {data.shape[3]} volumes (shape {tuple(img.shape)}); expected one 3-D volume")
    if data.ndim != 3:
        raise InputError(path, f"expected a 3-D image, got shape {tuple(img.shape)}")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "header has an invalid voxel-to-world affine")
    if labels:
        if not np.issubdtype(data.dtype, np.integer):
            if not np.all(np.isfinite(data)) or not np.all(np.equal(np.mod(data, 1), 0)):
                raise InputError(path, "label map holds non-integer values")
        data = data.astype(np.int32)
    else:
        data = data.astype(np.float32)
        if not np.all(np.isfinite(data)):
            raise InputError(path, "image contains NaN or infinite values")
    if not np.any(data):
        raise InputError(path, "image is all zeros")
    return Image(data, affine, str(path))


def save_image(image: Image, path: PathLike, *, dtype: np.dtype | type | None = None) -> Path:
    """Write ``image`` atomically (a temporary file renamed into place) as NIfTI or MGZ, by extension.

    Types the format cannot hold are narrowed: bool to uint8, 64-bit integers to int32 (values must
    fit) and, for MGZ, float64 to float32.
    """
    path = Path(path)
    mgz = path.name.endswith((".mgz", ".mgh"))
    data = _storable(np.asarray(image.data if dtype is None else image.data.astype(dtype)), mgz=mgz)
    if mgz:
        img = nib.MGHImage(data, image.affine)
    else:
        img = nib.Nifti1Image(data, image.affine)
        img.set_qform(image.affine, code=1)
        img.set_sform(image.affine, code=1)
        img.header.set_xyzt_units("mm")
    return write_atomically(img, path)


def _storable(data: np.ndarray, *, mgz: bool) -> np.ndarray:
    """``data`` in a type NIfTI (or MGZ) stores; see :func:`save_image`."""
    if data.dtype == np.bool_:
        return data.astype(np.uint8)
    if np.issubdtype(data.dtype, np.integer) and data.dtype.itemsize == 8:
        info = np.iinfo(np.int32)
        if data.size and (data.min() < info.min or data.max() > info.max):
            raise ValueError(f"integer values outside the int32 range cannot be saved ({data.dtype})")
        return data.astype(np.int32)
    if mgz and data.dtype == np.float64:
        return data.astype(np.float32)
    return data


def atomic_write(path: PathLike, writer: Callable[[Path], object]) -> Path:
    """Run ``writer(tmp)`` on a temporary file beside ``path``, then rename it into place.

    The temporary name keeps ``path``'s extension (writers choose formats by it); the file is created by
    the writer, so it gets the usual (umask) permissions. On failure it is removed and an existing
    ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp{suffix}"
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None and not (exc.filename or exc.filename2):
            raise named_os_error(exc, path) from exc  # a writer's error without the file (gzip, nibabel)
        raise
    return path


def named_os_error(exc: OSError, path: PathLike) -> OSError:
    """``exc`` (the system's error, such as a full disk) naming ``path`` as the file written."""
    return type(exc)(exc.errno, exc.strerror, str(path))


_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{12}\.tmp(\.[\w.]+)?")
"""The name :func:`atomic_write` gives its temporary files."""


def is_temporary(path: PathLike) -> bool:
    """``path`` is a file named as :func:`atomic_write` names its temporary files."""
    return Path(path).is_file() and _TEMPORARY.fullmatch(Path(path).name) is not None


def remove_stale_temporaries(folder: PathLike) -> list[Path]:
    """Remove the temporary files that :func:`atomic_write` left in ``folder`` and below when its process
    was killed (SIGKILL, a lost node) between writing and renaming. Only for folders no other process is
    writing into."""
    stale = [path for path in Path(folder).rglob(".*") if is_temporary(path)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def write_atomically(img: nib.spatialimages.SpatialImage, path: PathLike) -> Path:
    """Save a nibabel image to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: nib.save(img, tmp))


def resample(
    image: Image,
    grid: Grid,
    *,
    world_matrix: np.ndarray | None = None,
    labels: bool = False,
) -> Image:
    """Resample ``image`` onto ``grid`` in world coordinates.

    ``world_matrix`` (4x4, RAS mm) maps a world point of ``grid`` to the world point of ``image`` it
    takes its value from (identity by default). Linear interpolation for intensities, nearest
    neighbour for label maps (``labels=True``). Outside the image the value is 0: a label keeps its
    voxel's full extent (half a voxel beyond the edge centres), an intensity fades to 0 one voxel
    beyond them, and points on the edge centres keep their value despite rounding.
    """
    world = np.eye(4) if world_matrix is None else np.asarray(world_matrix, dtype=np.float64)
    voxel_map = np.linalg.inv(image.affine) @ world @ grid.affine
    data = ndimage.affine_transform(
        image.data.astype(np.float32) if not labels else image.data,
        voxel_map[:3, :3],
        voxel_map[:3, 3],
        output_shape=grid.shape,
        order=0 if labels else 1,
        mode="grid-constant",
        cval=0,
    )
    return Image(data, grid.affine.copy(), image.path)


def normalize_intensity(
    data: np.ndarray,
    *,
    modality: str = "mri",
    percentiles: tuple[float, float] = (0.5, 99.5),
    window: tuple[float, float] = (-1000.0, 1000.0),
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Scale intensities to about ``[0, 1]``.

    ``modality="mri"``: robust percentiles of the foreground (or masked) voxels map to 0 and 1, values
    clipped; the foreground is what exceeds 1e-3 of the largest magnitude, so that the near-zero halo
    resampling leaves around a skull-stripped brain does not count as tissue (it would pull the low
    percentile to 0, and two sessions with different halos would be scaled differently).
    ``modality="ct"``: the fixed Hounsfield ``window`` maps to 0 and 1, values clipped.
    """
    data = np.asarray(data, dtype=np.float32)
    if modality == "ct":
        low, high = window
    elif modality == "mri":
        region = data[mask > 0] if mask is not None else data[np.abs(data) > 1e-3 * np.abs(data).max(initial=0)]
        if region.size == 0:
            region = data.ravel()
        low, high = np.percentile(region, percentiles)
        if high <= low:
            high = low + 1.0
    else:
        raise ValueError(f"unknown modality {modality!r}; expected 'mri' or 'ct'")
    return np.clip((data - low) / (high - low), 0.0, 1.0).astype(np.float32)

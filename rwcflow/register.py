"""The one high-level entry point: ``register(fixed, moving, ...) -> Registration``.

Tasks, Nipype interfaces and command lines all call :func:`register`; nothing else re-implements
registration logic. The mapping it finds takes a fixed world point ``p`` (voxel ``x`` of the fixed
grid) to the moving world point ``A · F(x + u(x))``: the voxel displacement field ``u`` acts first, on
the fixed grid ``F``, then the affine pre-alignment ``A`` (RAS mm). The warped image is the moving image
sampled once at those points (no double interpolation).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path

import numpy as np
import torch

from rwcflow import spatial, transforms
from rwcflow.transforms import mapped_coordinates, sample_image
from rwcflow.affine import affine_align
from rwcflow.checkpoint import resolve_model
from rwcflow.devices import run_on_device
from rwcflow.errors import InputError
from rwcflow.io import Grid, Image, load_image, named_os_error, normalize_intensity, read_keypoints, save_image
from rwcflow.metrics import registration_metrics
from rwcflow.models import RWCNet, resize
from rwcflow.optimize import InstanceOptimization, instance_optimize

STAGING_PREFIX = ".rwcflow-"
STALE_STAGING_S = 3600.0
"""A staging folder of :meth:`Registration.write` older than this was left by a killed run."""

log = logging.getLogger(__name__)

ImageLike = Image | str | os.PathLike


@dataclass
class Registration:
    """The result of :func:`register`.

    ``affine`` is the 4x4 RAS world matrix taking a fixed world point to the moving world point of the
    pre-alignment; ``field`` is the voxel displacement ``(1, 3, X, Y, Z)`` on the fixed grid applied
    before it; ``warped`` is the moving image on the fixed grid.
    """

    fixed: Image
    moving: Image
    affine: np.ndarray
    field: torch.Tensor
    warped: Image
    warped_labels: Image | None = None
    metrics: dict | None = None
    timings: dict[str, float] = dataclass_field(default_factory=dict)

    def coordinates(self, image: Image) -> torch.Tensor:
        """Voxel coordinates in ``image`` (any grid in moving world space) of every fixed voxel, ``(1, 3, X, Y, Z)``."""
        return mapped_coordinates(self.fixed.grid, image.grid, self.affine, self.field)

    def apply(self, image: ImageLike, *, labels: bool = False) -> Image:
        """Resample an image in moving space (any grid) onto the fixed grid through the whole mapping."""
        image = image if isinstance(image, Image) else load_image(image, labels=labels)
        return sample_image(image, self.coordinates(image), self.fixed.grid, labels=labels)

    def world_displacement(self, *, include_affine: bool = True) -> np.ndarray:
        """The fixed→moving mapping as RAS-mm displacements ``(X, Y, Z, 3)`` on the fixed grid.

        With ``include_affine=False``, the deformable part alone (``p -> F(x + u(x))``), to be followed
        by the affine: ANTs' ``-t affine.txt -t field.nii.gz``.
        """
        world = self.affine if include_affine else np.eye(4)
        return transforms.compose_world_displacement(self.fixed.grid, world, self.field)

    def write_transforms(self, out_dir: str | os.PathLike, *, xfm: str = "xfm.nii.gz",
                         affine: str = "affine.txt", include_affine: bool = True) -> dict[str, Path]:
        """Write ``xfm`` (ITK displacement field) and ``affine`` (ITK text transform) into ``out_dir``.

        ``xfm`` holds the whole mapping, affine included, unless ``include_affine=False``.
        """
        out_dir = Path(out_dir)
        field = self.world_displacement(include_affine=include_affine)
        return {
            "xfm": transforms.write_displacement_field(out_dir / xfm, field, self.fixed.grid),
            "affine": transforms.write_affine(out_dir / affine, self.affine),
        }


    def write(self, out_dir: str | os.PathLike, *, include_affine: bool = True, prefix: str = "") -> list[Path]:
        """Write ``warped.nii.gz``, the transforms and, with labels, ``warped_labels.nii.gz`` and
        ``metrics.json`` (each name after ``prefix``) into ``out_dir``: all together or none, through a
        temporary folder inside it. Such folders a killed run left (older than an hour) are removed."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(f"{STAGING_PREFIX}*"):  # left by a killed run: a staging lives seconds
            if stale.is_dir() and time.time() - stale.stat().st_mtime > STALE_STAGING_S:
                shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
        try:
            save_image(self.warped, staging / f"{prefix}warped.nii.gz")
            self.write_transforms(staging, xfm=f"{prefix}xfm.nii.gz", affine=f"{prefix}affine.txt",
                                  include_affine=include_affine)
            if self.warped_labels is not None:
                save_image(self.warped_labels, staging / f"{prefix}warped_labels.nii.gz")
            if self.metrics is not None:
                (staging / f"{prefix}metrics.json").write_text(json.dumps(self.metrics, indent=2) + "\n")
            written = []
            for item in sorted(staging.iterdir()):
                os.replace(item, out_dir / item.name)
                written.append(out_dir / item.name)
            return written
        except OSError as exc:
            if exc.errno is not None and not (exc.filename or exc.filename2):
                raise named_os_error(exc, out_dir) from exc  # a full disk, found by gzip or nibabel
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _as_image(value: ImageLike | None, *, labels: bool = False) -> Image | None:
    if value is None or isinstance(value, Image):
        return value
    return load_image(value, labels=labels)


def _check_same_grid(image: Image, other: Image | None, what: str) -> None:
    """Labels and masks must lie on their image's grid (same shape and affine)."""
    if other is None:
        return
    if other.data.shape != image.data.shape or not np.allclose(other.affine, image.affine, atol=1e-3):
        raise InputError(other.path or what, f"{what} is on another grid than its image {image.path or ''}".rstrip())


def _load_keypoints(points: np.ndarray | str | os.PathLike | None) -> np.ndarray | None:
    """Keypoints given as an array, or read from a file (:func:`rwcflow.io.read_keypoints`)."""
    if points is None or isinstance(points, np.ndarray):
        return points
    return read_keypoints(points)


def _options(instance_optimization: bool | int | InstanceOptimization | None) -> InstanceOptimization | None:
    if isinstance(instance_optimization, InstanceOptimization):
        return instance_optimization
    if instance_optimization is None or instance_optimization is False or instance_optimization == 0:
        return None
    if instance_optimization is True:
        return InstanceOptimization()
    return InstanceOptimization(iterations=int(instance_optimization))


def network_shape(shape: Sequence[int], spacing: Sequence[float], input_spacing_mm: float) -> tuple[int, ...]:
    """The grid of voxel size ``input_spacing_mm`` spanning the same extent as the grid ``shape`` with
    ``spacing`` (corner voxel centres shared, as :func:`rwcflow.spatial.resize_field`)."""
    return tuple(max(2, int(round((n - 1) * s / input_spacing_mm)) + 1) for n, s in zip(shape, spacing))


def network_field(run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], fixed: torch.Tensor,
                  moving: torch.Tensor, spacing: Sequence[float], input_spacing_mm: float | None) -> torch.Tensor:
    """``run(fixed, moving)`` (a network's displacement in voxels of its input grid) on the grid of
    ``fixed``: the images are first resampled to the voxel size the network was trained at (when given
    and not already theirs), and the field back to ``fixed``'s grid and voxel units."""
    shape = tuple(fixed.shape[2:])
    inner = shape if input_spacing_mm is None else network_shape(shape, spacing, input_spacing_mm)
    if inner == shape:
        return run(fixed, moving)
    return spatial.resize_field(run(resize(fixed, inner), resize(moving, inner)), shape)


def register(
    fixed: ImageLike,
    moving: ImageLike,
    *,
    model: str | os.PathLike | RWCNet | None = "default",
    affine: bool | np.ndarray = True,
    instance_optimization: bool | int | InstanceOptimization | None = True,
    device: str | torch.device = "auto",
    fixed_mask: ImageLike | None = None,
    moving_mask: ImageLike | None = None,
    fixed_labels: ImageLike | None = None,
    moving_labels: ImageLike | None = None,
    fixed_keypoints: np.ndarray | str | os.PathLike | None = None,
    moving_keypoints: np.ndarray | str | os.PathLike | None = None,
    label_guided: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Registration:
    """Register ``moving`` to ``fixed``: affine pre-alignment, RWCNet, then instance optimisation.

    Images are paths or :class:`~rwcflow.io.Image`. ``model`` is ``"default"``, ``"none"``/``None``, a
    model file or a network; ``affine`` is ``True`` (estimate), ``False`` (identity in world space) or a
    given 4x4 RAS world matrix; ``instance_optimization`` is ``True``, ``False``, a number of iterations
    or options. Labels give Dice/HD95 metrics (and, with ``label_guided``, a Dice term in the
    optimisation); keypoints (RAS mm, ``(N, 3)`` or a CSV) add a distance term. Out of GPU memory, it
    runs again on the CPU when ``device`` is ``"auto"``, else stops (:func:`rwcflow.devices.run_on_device`).
    """
    options = dict(locals())  # every argument, for the run on the device chosen
    del options["device"]
    what = f"registering {_name(moving)} to {_name(fixed)}"
    return run_on_device(lambda chosen: _register(device=chosen, **options), device, what)


def _name(image: ImageLike) -> str:
    return "an image" if isinstance(image, Image) else Path(image).name


def _register(fixed: ImageLike, moving: ImageLike, *, model, affine, instance_optimization, device: torch.device,
              fixed_mask, moving_mask, fixed_labels, moving_labels, fixed_keypoints, moving_keypoints,
              label_guided: bool, progress) -> Registration:
    """:func:`register` on ``device``."""
    say = progress or (lambda message: log.info(message))
    timings: dict[str, float] = {}
    fixed, moving = _as_image(fixed), _as_image(moving)
    fixed_mask, moving_mask = _as_image(fixed_mask, labels=True), _as_image(moving_mask, labels=True)
    fixed_labels, moving_labels = _as_image(fixed_labels, labels=True), _as_image(moving_labels, labels=True)
    _check_same_grid(fixed, fixed_mask, "mask")
    _check_same_grid(moving, moving_mask, "mask")
    _check_same_grid(fixed, fixed_labels, "label map")
    _check_same_grid(moving, moving_labels, "label map")
    fixed_points, moving_points = _load_keypoints(fixed_keypoints), _load_keypoints(moving_keypoints)
    network = resolve_model(model, device=device)
    options = _options(instance_optimization)
    if options is not None:
        options = options.resolved(refining=network is not None)

    start = time.perf_counter()
    if isinstance(affine, np.ndarray):
        world = np.asarray(affine, dtype=np.float64)
    elif affine:
        say("affine pre-alignment")
        world = affine_align(fixed, moving, device=device, fixed_mask=fixed_mask, moving_mask=moving_mask)
    else:
        world = np.eye(4)
    timings["affine_s"] = time.perf_counter() - start

    def on_fixed_grid(image: Image, field: torch.Tensor, labels: bool = False) -> Image:
        coords = mapped_coordinates(fixed.grid, image.grid, world, field)
        return sample_image(image, coords, fixed.grid, labels=labels)

    zero = torch.zeros((1, 3, *fixed.data.shape), device=device)
    fixed_t = fixed.with_data(normalize_intensity(fixed.data, mask=_data(fixed_mask))).tensor(device)
    moving_norm = moving.with_data(normalize_intensity(moving.data, mask=_data(moving_mask)))
    moving_t = on_fixed_grid(moving_norm, zero).tensor(device)
    field = zero

    start = time.perf_counter()
    if network is not None:
        say("RWCNet")
        with torch.no_grad():
            field = network_field(lambda f, m: network(f, m, return_hidden=False).field, fixed_t, moving_t,
                                  fixed.grid.spacing, network.config.input_spacing_mm)
    timings["network_s"] = time.perf_counter() - start

    start = time.perf_counter()
    if options is not None:
        say(f"instance optimisation ({options.iterations} Adam steps per level, control grid of "
            f"{options.grid_factor} voxels)")
        guide = {}
        if label_guided and fixed_labels is not None and moving_labels is not None:
            values = [int(v) for v in np.intersect1d(fixed_labels.data, moving_labels.data) if v != 0]
            guide["fixed_labels"] = spatial.one_hot(fixed_labels.tensor(device, torch.int64), values)
            guide["moving_labels"] = spatial.one_hot(
                on_fixed_grid(moving_labels, zero, labels=True).tensor(device, torch.int64), values)
        if fixed_points is not None and moving_points is not None:
            # moving keypoints in voxels of the fixed grid once the affine is applied
            aligned = Grid(fixed.grid.shape, world @ fixed.affine)
            guide["fixed_keypoints"] = torch.as_tensor(fixed.grid.world_to_voxel(fixed_points), device=device).float()
            guide["moving_keypoints"] = torch.as_tensor(aligned.world_to_voxel(moving_points), device=device).float()
        field = instance_optimize(
            fixed_t, moving_t, options, init_field=field if network is not None else None,
            fixed_mask=fixed_mask.tensor(device) if fixed_mask else None,
            spacing=fixed.grid.spacing, **guide,
        )
    timings["instance_optimization_s"] = time.perf_counter() - start

    field = field.detach().float()
    result = Registration(fixed, moving, world, field.cpu(), on_fixed_grid(moving, field), timings=timings)
    if moving_labels is not None:
        result.warped_labels = on_fixed_grid(moving_labels, field, labels=True)
    if fixed_labels is not None and result.warped_labels is not None:
        result.metrics = registration_metrics(
            result.field, fixed_labels.data, result.warped_labels.data, fixed.grid.spacing,
            moving_labels=moving_labels.data)
    return result


def _data(image: Image | None) -> np.ndarray | None:
    return None if image is None else image.data

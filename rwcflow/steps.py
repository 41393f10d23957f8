"""File-in/file-out steps: each reads its input files, calls the engine and writes its outputs into
``out_dir``, returning their paths. The Pydra tasks (:mod:`rwcflow.tasks`) and the Nipype interfaces
(:mod:`rwcflow.interfaces`) are thin wrappers over these, so both write the same files under the same
names: outputs are named after their input image (``sub-01_T1w_xfm.nii.gz``, ...), so that lists
collected from several jobs never clash.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rwcflow import maps, templates, transforms
from rwcflow.errors import InputError
from rwcflow.groupwise import GroupwiseRefinement, refine_groupwise
from rwcflow.io import Image, load_image, save_image
from rwcflow.midspace import rigid_midspace
from rwcflow.optimize import InstanceOptimization
from rwcflow.devices import run_on_device
from rwcflow.register import register

log = logging.getLogger("rwcflow")

PathLike = str | os.PathLike
REGISTRATION_FILES = {"warped": "warped.nii.gz", "xfm": "xfm.nii.gz", "affine": "affine.txt",
                      "warped_labels": "warped_labels.nii.gz", "metrics": "metrics.json"}
"""What :func:`register_files` writes (after the moving image's stem), by the key it returns it under;
the last two only with label maps."""


def stem(image: PathLike) -> str:
    """``name`` of an input ``name.nii[.gz]``/``name.mgz``."""
    name = Path(image).name
    for extension in (".nii.gz", ".nii", ".mgz", ".mgh"):
        if name.endswith(extension):
            return name[: -len(extension)]
    return name


def _names(images: Sequence[PathLike]) -> str:
    """The images' file names, for progress messages."""
    return ", ".join(Path(image).name for image in images)


def output_name(image: PathLike, suffix: str) -> str:
    """``name_suffix.nii.gz`` for an input ``name.nii[.gz]``/``name.mgz``."""
    return f"{stem(image)}_{suffix}.nii.gz"


def instance_optimization_options(io_iters: int | None = None, io_grid_factor: int | None = None,
                                  io_similarity: str | None = None, io_regularization: float | None = None,
                                  io_interpolation: str | None = None) -> InstanceOptimization | bool:
    """:func:`~rwcflow.register.register`'s ``instance_optimization`` for ``io_iters`` Adam steps per level
    (``None``: the default; 0: off) on a control grid of ``io_grid_factor`` fixed voxels per control voxel
    (``None``: the default, 2 from zero, 1 refining a network's field; 1 resolves small local changes),
    with ``io_similarity`` (``"mind"``, ``"ncc"``, ``"mse"``), ``io_regularization`` and
    ``io_interpolation`` (``"linear"``, ``"bspline"``) as :class:`~rwcflow.optimize.InstanceOptimization`
    (``None``: its defaults)."""
    if io_iters == 0:
        return False
    chosen = (("iterations", io_iters), ("grid_factor", io_grid_factor), ("similarity", io_similarity),
              ("regularization", io_regularization), ("interpolation", io_interpolation))
    return InstanceOptimization(**{key: value for key, value in chosen if value is not None})


def register_files(fixed: PathLike, moving: PathLike, out_dir: PathLike, *, model: str = "default",
                   io_iters: int | None = None, io_grid_factor: int | None = None,
                   io_similarity: str | None = None, io_regularization: float | None = None,
                   io_interpolation: str | None = None, affine: bool = True,
                   device: str = "auto", fixed_labels: PathLike | None = None,
                   moving_labels: PathLike | None = None, fixed_mask: PathLike | None = None,
                   moving_mask: PathLike | None = None) -> dict[str, Path | None]:
    """Register ``moving`` to ``fixed`` (:func:`rwcflow.register.register`) and write the result into
    ``out_dir`` as ``rwcflow-register`` does, each name prefixed with the moving image's :func:`stem`.

    Returns the paths of ``warped`` (moving on the fixed grid), ``xfm`` (ITK displacement field, affine
    included), ``affine`` (ITK text transform), ``warped_labels`` (with ``moving_labels``) and ``metrics``
    (JSON: Dice, HD95, SDlogJ, folding; with both label maps), else ``None``.
    """
    name, start = f"{Path(moving).name} -> {Path(fixed).name}", time.perf_counter()
    log.info("%s: registering", name)
    result = register(
        fixed, moving, model=model, affine=affine,
        instance_optimization=instance_optimization_options(io_iters, io_grid_factor, io_similarity,
                                                            io_regularization, io_interpolation), device=device,
        fixed_mask=fixed_mask, moving_mask=moving_mask, fixed_labels=fixed_labels, moving_labels=moving_labels,
        progress=lambda message: log.debug("%s: %s", name, message),
    )
    log.info("%s: registered in %.1f s", name, time.perf_counter() - start)
    prefix = f"{stem(moving)}_"
    written = {path.name[len(prefix):]: path for path in result.write(out_dir, prefix=prefix)}
    return {key: written.get(file) for key, file in REGISTRATION_FILES.items()}


def apply_transform(image: PathLike, xfm: PathLike, out_dir: PathLike, reference: PathLike | None = None,
                    labels: bool = False) -> Path:
    """``image`` (any grid) resampled through the ITK displacement field ``xfm`` (fixed→moving) onto
    ``reference``'s grid (default: the field's own), nearest neighbour for ``labels``:
    ``<image>_resampled.nii.gz``."""
    disp, grid = transforms.read_displacement_field(xfm)
    if reference is not None:
        target = load_image(reference).grid
        if target != grid:
            disp, grid = maps.resample_displacement(disp, grid, target), target
    moved = transforms.apply_displacement(load_image(image, labels=labels), disp, grid, labels=labels)
    return save_image(moved, Path(out_dir) / output_name(image, "resampled"))


def compose_transforms(xfms: Sequence[PathLike], out_dir: PathLike, reference: PathLike | None = None,
                       name: str = "composed_xfm.nii.gz") -> Path:
    """One ITK displacement field ``name`` for a chain of them in ANTs order (``-t A -t B``: ``B`` acts
    first), on ``reference``'s grid (default: the first field's grid)."""
    fields = [transforms.read_displacement_field(xfm) for xfm in xfms]
    grid = fields[0][1] if reference is None else load_image(reference).grid
    composed = maps.compose_displacements(fields, grid)
    return transforms.write_displacement_field(Path(out_dir) / name, composed, grid)


def invert_transform(xfm: PathLike, out_dir: PathLike) -> Path:
    """The inverse of an ITK displacement field on the same grid, ``<xfm>_inverse.nii.gz``."""
    disp, grid = transforms.read_displacement_field(xfm)
    return transforms.write_displacement_field(Path(out_dir) / output_name(xfm, "inverse"),
                                               maps.invert_displacement(disp, grid), grid)


def average_transforms(xfms: Sequence[PathLike], out_dir: PathLike) -> Path:
    """Voxel-wise mean of ITK displacement fields on the first field's grid (others resampled in world
    space), ``average_xfm.nii.gz``."""
    disp, grid = maps.average_displacements([transforms.read_displacement_field(xfm) for xfm in xfms])
    return transforms.write_displacement_field(Path(out_dir) / "average_xfm.nii.gz", disp, grid)


def jacobian_maps(xfm: PathLike, out_dir: PathLike) -> tuple[Path, Path]:
    """Jacobian determinant of an ITK displacement field's mapping (world mm) and its logarithm (folded
    voxels floored, :func:`rwcflow.maps.log_jacobian`): ``<xfm>_jacobian.nii.gz``, ``<xfm>_log_jacobian.nii.gz``."""
    disp, grid = transforms.read_displacement_field(xfm)
    jacobian = maps.jacobian_from_world_field(disp, grid).astype(np.float32)
    image = Image(jacobian, grid.affine.copy())
    return (save_image(image, Path(out_dir) / output_name(xfm, "jacobian")),
            save_image(image.with_data(maps.log_jacobian(jacobian)), Path(out_dir) / output_name(xfm, "log_jacobian")))


def average_images(images: Sequence[PathLike], out_dir: PathLike, method: str = "mean",
                   sharpen: float = 0.0) -> Path:
    """Voxel-wise ``"mean"`` or ``"median"`` of ``images`` on the first image's grid, Laplacian-sharpened by
    ``sharpen`` (:func:`rwcflow.maps.average_images`), ``average.nii.gz``."""
    start = time.perf_counter()
    average = maps.average_images([load_image(image) for image in images], method, sharpen)
    path = save_image(average, Path(out_dir) / "average.nii.gz")
    log.info("%s of %d images: averaged in %.1f s", method, len(images), time.perf_counter() - start)
    return path


def shape_update(average: PathLike, average_xfm: PathLike, out_dir: PathLike, gradient_step: float = 0.25,
                 repeats: int = 4, log_file: PathLike | None = None) -> tuple[Path, Path, Path]:
    """One template update (:func:`rwcflow.templates.shape_update`) of the mean warped image ``average``
    by the mean template→subject field ``average_xfm``.

    ``log_file`` (JSON, a list with one entry per update, from the previous update) is extended with this
    update's :func:`rwcflow.templates.update_norms` into ``shape_update.json``; the new template is
    ``template_update-<n>.nii.gz``, ``n`` the update's number, and the update itself (an ITK field taking
    a new template point to the previous template's, which resamples ``average`` into the new template)
    ``template_update-<n>_xfm.nii.gz``. Returns the three paths.
    """
    start = time.perf_counter()
    disp, grid = transforms.read_displacement_field(average_xfm)
    average_image = load_image(average)
    update = templates.update_displacement(disp, grid, gradient_step, repeats)
    updated = transforms.apply_displacement(average_image, update, grid)
    history = [] if log_file is None else json.loads(Path(log_file).read_text())
    history.append({"update": len(history) + 1, **templates.update_norms(disp, grid, average_image)})
    log_path = Path(out_dir) / "shape_update.json"
    log_path.write_text(json.dumps(history, indent=2))
    path = save_image(updated, Path(out_dir) / f"template_update-{len(history)}.nii.gz")
    update_path = transforms.write_displacement_field(Path(out_dir) / f"template_update-{len(history)}_xfm.nii.gz",
                                                      update, grid)
    log.info("template update %d (mean field %.2f mm): updated in %.1f s", len(history),
             history[-1]["update_norm_mm"], time.perf_counter() - start)
    return path, log_path, update_path


def follow_update(moving: PathLike, xfm: PathLike, update_xfm: PathLike, out_dir: PathLike,
                  moving_labels: PathLike | None = None) -> tuple[Path, Path, Path | None]:
    """A registration of ``moving`` to a template (its field ``xfm``) carried through the template's update
    ``update_xfm`` (:func:`shape_update`): the updated template's map is the update, then ``xfm``, on the
    update's grid. Written as :func:`register_files` names them: ``<moving>_warped.nii.gz`` (``moving``
    sampled once through the map), ``<moving>_xfm.nii.gz`` and, with ``moving_labels``,
    ``<moving>_warped_labels.nii.gz`` (nearest neighbour), else ``None``."""
    update, grid = transforms.read_displacement_field(update_xfm)
    composed = maps.compose_displacements([transforms.read_displacement_field(xfm), (update, grid)], grid)
    out = Path(out_dir) / f"{stem(moving)}_"
    xfm_path = transforms.write_displacement_field(f"{out}{REGISTRATION_FILES['xfm']}", composed, grid)
    warped = save_image(transforms.apply_displacement(load_image(moving), composed, grid),
                        f"{out}{REGISTRATION_FILES['warped']}")
    labels = None if moving_labels is None else save_image(
        transforms.apply_displacement(load_image(moving_labels, labels=True), composed, grid, labels=True),
        f"{out}{REGISTRATION_FILES['warped_labels']}")
    return warped, xfm_path, labels


def single_session(session: PathLike, out_dir: PathLike) -> tuple[Path, Path, Path]:
    """Pass-through of a participant with one session: the template ``template.nii.gz`` (a copy of the
    session), its transform ``<session>_xfm.nii.gz`` (the identity: a zero displacement field on the
    session's grid) and its warped image ``<session>_warped.nii.gz`` (a copy)."""
    image = load_image(session)
    identity = np.zeros((*image.grid.shape, 3))
    xfm = transforms.write_displacement_field(Path(out_dir) / output_name(session, "xfm"), identity, image.grid)
    return (save_image(image, Path(out_dir) / "template.nii.gz"), xfm,
            save_image(image, Path(out_dir) / output_name(session, "warped")))


def rigid_midspace_files(sessions: Sequence[PathLike], out_dir: PathLike, *, align: bool = True,
                         device: str = "auto") -> list[Path]:
    """The sessions' rigid midspace (:func:`rwcflow.midspace.rigid_midspace`): per session the
    template→session map ``<session>_xfm.nii.gz``, an ITK displacement field on the template grid."""
    name, start = f"rigid midspace of {_names(sessions)}", time.perf_counter()
    log.info("%s: aligning", name)
    images = [load_image(session) for session in sessions]
    grid, matrices = run_on_device(lambda chosen: rigid_midspace(images, align=align, device=chosen), device, name)
    log.info("%s: done in %.1f s", name, time.perf_counter() - start)
    zero = np.zeros((1, 3, *grid.shape))
    return [transforms.write_displacement_field(Path(out_dir) / output_name(session, "xfm"),
                                                transforms.compose_world_displacement(grid, matrix, zero), grid)
            for session, matrix in zip(sessions, matrices)]


def groupwise_refine_files(sessions: Sequence[PathLike], xfms: Sequence[PathLike], out_dir: PathLike, *,
                           iterations: int = GroupwiseRefinement.iterations,
                           regularization: float = GroupwiseRefinement.regularization,
                           device: str = "auto") -> tuple[Path, list[Path], list[Path]]:
    """Refine the template→session fields ``xfms`` (ITK, on the template's grid) of ``sessions`` jointly
    (:func:`rwcflow.groupwise.refine_groupwise`): ``template.nii.gz`` (the mean of the resampled
    sessions), and per session ``<session>_xfm.nii.gz`` and ``<session>_warped.nii.gz``."""
    fields = [transforms.read_displacement_field(xfm) for xfm in xfms]
    grid = fields[0][1]
    for xfm, (_, field_grid) in zip(xfms, fields):
        if field_grid != grid:
            raise InputError(xfm, f"not on the grid of {Path(xfms[0]).name}: the fields must share the template's grid")
    displacements = [disp for disp, _ in fields]
    name, start = f"groupwise refinement of {_names(sessions)}", time.perf_counter()
    log.info("%s: refining", name)
    images = [load_image(session) for session in sessions]
    refinement = GroupwiseRefinement(iterations=iterations, regularization=regularization)
    refined, warped, template = run_on_device(lambda chosen: refine_groupwise(
        images, displacements, grid, refinement, device=chosen,
        progress=lambda done, total, loss: log.debug("%s: step %d/%d, loss %.4g", name, done, total, loss)),
        device, name)
    log.info("%s: done in %.1f s", name, time.perf_counter() - start)
    out_dir = Path(out_dir)
    xfm_paths = [transforms.write_displacement_field(out_dir / output_name(session, "xfm"), disp, grid)
                 for session, disp in zip(sessions, refined)]
    warped_paths = [save_image(image, out_dir / output_name(session, "warped"))
                    for session, image in zip(sessions, warped)]
    return save_image(template, out_dir / "template.nii.gz"), xfm_paths, warped_paths

"""Pydra 1.0 tasks: thin, file-in/file-out wrappers over the rwcflow engine.

Each task reads its input files, calls one engine function and writes its outputs into the current
folder, which Pydra makes the job's own cache folder; so results are cached by input content and the
tasks run unchanged under any Pydra worker (``"cf"``, ``"slurm"``, ...). Run one with
``Submitter(worker="cf", cache_root=...)(Register(fixed=..., moving=...))``.

With the ``"cf"`` worker on Linux, jobs run in forked processes: a submitting process that has
already run multi-threaded torch code (or initialised CUDA) makes them hang or fail. Submit from a
process that has not, call ``torch.set_num_threads(1)`` first, or use
``multiprocessing.set_start_method("forkserver")``. ``device="auto"`` is resolved inside each job.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from fileformats.generic import File
from pydra.compose import python

from rwcflow import maps, transforms
from rwcflow.affine import affine_align
from rwcflow.io import Image, load_image, resample, save_image
from rwcflow.optimize import InstanceOptimization
from rwcflow.register import register, resolve_device

log = logging.getLogger("rwcflow")


def _optional(file: File | None, *, labels: bool = True) -> Image | None:
    return None if file is None else load_image(file, labels=labels)


@python.define(outputs={"affine": File})
def AffineAlign(fixed: File, moving: File, fixed_mask: File | None = None, moving_mask: File | None = None,
                device: str = "auto") -> File:
    """Affine pre-alignment (:func:`rwcflow.affine.affine_align`): ``affine`` is an ITK text transform
    taking fixed points to moving points."""
    matrix = affine_align(load_image(fixed), load_image(moving), device=resolve_device(device),
                          fixed_mask=_optional(fixed_mask), moving_mask=_optional(moving_mask))
    return transforms.write_affine(Path.cwd() / "affine.txt", matrix)


@python.define(outputs={"warped": File, "xfm": File, "affine": File,
                        "warped_labels": File | None, "metrics": File | None})
def Register(fixed: File, moving: File, model: str = "default", io_iters: int | None = None,
             io_grid_factor: int | None = None, affine: bool = True, device: str = "auto",
             fixed_labels: File | None = None, moving_labels: File | None = None,
             fixed_mask: File | None = None, moving_mask: File | None = None,
             ) -> tuple[File, File, File, File | None, File | None]:
    """Register ``moving`` to ``fixed`` (:func:`rwcflow.register.register`), written as by ``rwcflow-register``.

    ``warped`` (moving on the fixed grid), ``xfm`` (ITK displacement field, affine included), ``affine``
    (ITK text transform) and, with label maps, ``warped_labels`` and ``metrics`` (JSON). ``io_iters``
    is the instance-optimisation iterations (``None``: the default; 0: off) and ``io_grid_factor`` its
    fixed voxels per control-grid voxel (``None``: the default, 2; 1 resolves small local changes);
    ``device="auto"`` picks CUDA when the job's machine has it.
    """
    options = False if io_iters == 0 else InstanceOptimization(**{
        key: value for key, value in (("iterations", io_iters), ("grid_factor", io_grid_factor)) if value is not None})
    name, start = f"{Path(moving).name} -> {Path(fixed).name}", time.perf_counter()
    log.info("%s: registering", name)
    result = register(
        fixed, moving, model=model, affine=affine, instance_optimization=options,
        device=device, fixed_mask=fixed_mask, moving_mask=moving_mask,
        fixed_labels=fixed_labels, moving_labels=moving_labels,
        progress=lambda message: log.debug("%s: %s", name, message),
    )
    log.info("%s: registered in %.1f s", name, time.perf_counter() - start)
    # named after the moving image, so a workflow collecting several registrations keeps their names apart
    prefix = f"{_stem(moving)}_"
    written = {path.name[len(prefix):]: path for path in result.write(Path.cwd(), prefix=prefix)}
    return (written["warped.nii.gz"], written["xfm.nii.gz"], written["affine.txt"],
            written.get("warped_labels.nii.gz"), written.get("metrics.json"))


@python.define(outputs={"out": File})
def ApplyTransform(image: File, xfm: File, reference: File | None = None, labels: bool = False) -> File:
    """Resample ``image`` (any grid) through an ITK displacement field ``xfm`` (fixed→moving) onto
    ``reference``'s grid (default: the field's own grid); nearest neighbour for ``labels``."""
    return _apply_transform(image, xfm, reference, labels)


@python.define(outputs={"out": File})
def LabelPropagation(labels: File, xfm: File, reference: File | None = None) -> File:
    """Carry a label map through ``xfm`` onto ``reference``'s grid: :class:`ApplyTransform` with ``labels=True``."""
    return _apply_transform(labels, xfm, reference, labels=True)


@python.define(outputs={"out": File})
def ComposeTransforms(xfms: list[File], reference: File | None = None) -> File:
    """One ITK displacement field for a chain of them, in ANTs order (``-t A -t B``: ``B`` acts first),
    on ``reference``'s grid (default: the first field's grid)."""
    return _compose(xfms, reference, "composed_xfm.nii.gz")


@python.define(outputs={"out": File})
def ComposeTransformPair(outer: File, inner: File, reference: File | None = None) -> File:
    """:class:`ComposeTransforms` of two fields, ``p -> outer(inner(p))`` (ANTs: ``-t outer -t inner``),
    for splitting over one of them; named after ``outer`` (``<outer>_composed.nii.gz``)."""
    return _compose([outer, inner], reference, _output_name(outer, "composed"))


def _compose(xfms: list[File], reference: File | None, name: str) -> File:
    """The work of the compose tasks, written into the job's folder."""
    fields = [transforms.read_displacement_field(xfm) for xfm in xfms]
    grid = fields[0][1] if reference is None else load_image(reference).grid
    composed = maps.compose_displacements(fields, grid)
    return transforms.write_displacement_field(Path.cwd() / name, composed, grid)


@python.define(outputs={"out": File})
def InvertTransform(xfm: File) -> File:
    """The inverse of an ITK displacement field, on the same grid (:func:`rwcflow.maps.invert_displacement`)."""
    disp, grid = transforms.read_displacement_field(xfm)
    return transforms.write_displacement_field(Path.cwd() / _output_name(xfm, "inverse"),
                                               maps.invert_displacement(disp, grid), grid)


@python.define(outputs={"out": File})
def AverageFields(xfms: list[File]) -> File:
    """Voxel-wise mean of ITK displacement fields on the first field's grid (others resampled in world space)."""
    disp, grid = maps.average_displacements([transforms.read_displacement_field(xfm) for xfm in xfms])
    return transforms.write_displacement_field(Path.cwd() / "average_xfm.nii.gz", disp, grid)


@python.define(outputs={"jacobian": File, "log_jacobian": File})
def JacobianMaps(xfm: File) -> tuple[File, File]:
    """Jacobian determinant of an ITK displacement field's mapping (world mm), and its logarithm
    (folded voxels floored, see :func:`rwcflow.maps.log_jacobian`)."""
    disp, grid = transforms.read_displacement_field(xfm)
    jacobian = maps.jacobian_from_world_field(disp, grid).astype(np.float32)
    image = Image(jacobian, grid.affine.copy())
    return (save_image(image, Path.cwd() / _output_name(xfm, "jacobian")),
            save_image(image.with_data(maps.log_jacobian(jacobian)), Path.cwd() / _output_name(xfm, "log_jacobian")))


@python.define(outputs={"average": File})
def AverageImages(images: list[File], method: str = "mean", sharpen: float = 0.0) -> File:
    """Voxel-wise ``"mean"`` or ``"median"`` of ``images`` on the first image's grid (others resampled
    in world space), Laplacian-sharpened by ``sharpen`` (:func:`rwcflow.maps.laplacian_sharpen`; 0: off)."""
    average = maps.average_images([load_image(image) for image in images], method, sharpen)
    return save_image(average, Path.cwd() / "average.nii.gz")


def _apply_transform(image: File, xfm: File, reference: File | None, labels: bool) -> File:
    """The work of :class:`ApplyTransform`, written into the job's folder."""
    disp, grid = transforms.read_displacement_field(xfm)
    if reference is not None:
        target = load_image(reference).grid
        if target != grid:
            disp, grid = maps.resample_displacement(disp, grid, target), target
    moved = transforms.apply_displacement(load_image(image, labels=labels), disp, grid, labels=labels)
    return save_image(moved, Path.cwd() / _output_name(image, "resampled"))


def _stem(image: os.PathLike) -> str:
    """``name`` of an input ``name.nii[.gz]``/``name.mgz``."""
    name = Path(image).name
    for extension in (".nii.gz", ".nii", ".mgz", ".mgh"):
        if name.endswith(extension):
            return name[: -len(extension)]
    return name


def _output_name(image: os.PathLike, suffix: str) -> str:
    """``name_suffix.nii.gz`` for an input ``name.nii[.gz]``/``name.mgz``."""
    return f"{_stem(image)}_{suffix}.nii.gz"


@python.define(outputs={"template": File, "log": File, "templates": list[File]})
def ShapeUpdate(average: File, average_xfm: File, gradient_step: float = 0.25, repeats: int = 4,
                log: File | None = None, template: File | None = None, templates: list[File] | None = None,
                ) -> tuple[File, File, list[File]]:
    """Template shape update of ANTs' ``antsMultivariateTemplateConstruction2.sh``.

    ``average`` is the mean of the images registered to the current template and ``average_xfm`` the
    mean of their template→subject fields: its displacement is the template's shape bias, so
    ``average`` is resampled through the field ``-gradient_step * average_xfm`` composed ``repeats``
    times (ANTs applies it 4 times), moving the template against it. ``log`` (JSON, a list with one
    entry per update) gets this update's ``update_norm_mm``, the mean length of the average field over
    the template's foreground (``average`` above 10 % of its 99th percentile: in the background the
    fields are set by regularisation alone), and ``update_norm_grid_mm``, over the whole grid.
    ``template`` is the template the registrations were made to: it is appended to ``templates`` (the
    previous update's output), so a chain of updates lists the template of every iteration; the new
    one is ``template_update-<n>.nii.gz``.
    """
    disp, grid = transforms.read_displacement_field(average_xfm)
    average_image = load_image(average)
    update = maps.compose_displacements([(-gradient_step * disp, grid)] * repeats, grid)
    updated = transforms.apply_displacement(average_image, update, grid)
    lengths = np.linalg.norm(disp, axis=-1)
    foreground = maps.foreground_mask(average_image if average_image.grid == grid else resample(average_image, grid))
    history = [] if log is None else json.loads(Path(log).read_text())
    history.append({"update": len(history) + 1, "update_norm_mm": float(lengths[foreground].mean()),
                    "update_norm_grid_mm": float(lengths.mean())})
    log_path = Path.cwd() / "shape_update.json"
    log_path.write_text(json.dumps(history, indent=2))
    updated = save_image(updated, Path.cwd() / f"template_update-{len(history)}.nii.gz")
    registered_to = [] if template is None else [template]
    return updated, log_path, [*(templates or []), *registered_to]


@python.define(outputs={"probabilities": File, "label_values": list[int]})
def LabelProbabilities(label_maps: list[File]) -> tuple[File, list[int]]:
    """Per-label probability maps from label maps on one grid: a 4-D float32 NIfTI whose volume ``n`` is
    the fraction of ``label_maps`` holding ``label_values[n]`` at each voxel (background 0 left out)."""
    images = [load_image(path, labels=True) for path in label_maps]
    stack = np.stack([image.data for image in images])
    values = [int(v) for v in np.unique(stack) if v != 0]
    probabilities = np.stack([(stack == v).mean(axis=0) for v in values], axis=-1).astype(np.float32)
    return save_image(Image(probabilities, images[0].affine.copy()), Path.cwd() / "label_probabilities.nii.gz"), values

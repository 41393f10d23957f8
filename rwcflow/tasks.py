"""Pydra 1.0 tasks: thin, file-in/file-out wrappers over the rwcflow engine.

Each task calls one engine step (:mod:`rwcflow.steps`, shared with the Nipype interfaces) that reads
its input files and writes its outputs into the current folder, which Pydra makes the job's own cache
folder; so results are cached by input content and the tasks run unchanged under any Pydra worker
(``"slurm"``, ...). Run one with
``Submitter(worker=ForkServerWorker(), cache_root=...)(Register(fixed=..., moving=...))``
(:class:`rwcflow.worker.ForkServerWorker`: Pydra's ``"cf"`` worker forks the submitting process, and a
fork of a process that has run multi-threaded torch code or initialised CUDA hangs or fails).
``device="auto"`` is resolved inside each job.

Each task's function is a module-level function of its own name (``_register_job`` for :class:`Register`),
and the task class is made from it with ``python.define(function, name=...)`` rather than by decorating
it. Pydra hashes a task's function by its source, in the submitting process and again in the job process
after unpickling the job; a decorated function's name holds the task class, so cloudpickle cannot find the
function by name and pickles it by value, and cloudpickle >= 3.1.3 gives such functions the file name
``"<dynamic-code>"``: the job process then cannot read their source, hashes them otherwise and stops
("input field hashes have changed"). Found by name, the function is pickled by reference and the job
process hashes the same source. Define your own tasks the same way when they run in other processes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fileformats.generic import File
from pydra.compose import python

from rwcflow import steps, transforms
from rwcflow.affine import affine_align
from rwcflow.devices import run_on_device
from rwcflow.groupwise import GroupwiseRefinement
from rwcflow.io import Image, load_image, save_image


def _optional(file: File | None, *, labels: bool = True) -> Image | None:
    return None if file is None else load_image(file, labels=labels)


def _affine_align_job(fixed: File, moving: File, fixed_mask: File | None = None, moving_mask: File | None = None,
                      device: str = "auto") -> File:
    """Affine pre-alignment (:func:`rwcflow.affine.affine_align`): ``affine`` is an ITK text transform
    taking fixed points to moving points."""
    images = load_image(fixed), load_image(moving)
    masks = dict(fixed_mask=_optional(fixed_mask), moving_mask=_optional(moving_mask))
    matrix = run_on_device(lambda chosen: affine_align(*images, device=chosen, **masks), device,
                           f"affine pre-alignment of {Path(moving).name} to {Path(fixed).name}")
    return transforms.write_affine(Path.cwd() / "affine.txt", matrix)


AffineAlign = python.define(_affine_align_job, name="AffineAlign", outputs={"affine": File})


def _register_job(fixed: File, moving: File, model: str = "default", io_iters: int | None = None,
                  io_grid_factor: int | None = None, io_similarity: str | None = None,
                  io_regularization: float | None = None, io_interpolation: str | None = None,
                  affine: bool = True, device: str = "auto",
                  fixed_labels: File | None = None, moving_labels: File | None = None,
                  fixed_mask: File | None = None, moving_mask: File | None = None,
                  ) -> tuple[File, File, File, File | None, File | None]:
    """Register ``moving`` to ``fixed`` (:func:`rwcflow.steps.register_files`), written as by ``rwcflow-register``.

    ``warped`` (moving on the fixed grid), ``xfm`` (ITK displacement field, affine included), ``affine``
    (ITK text transform) and, with label maps, ``warped_labels`` and ``metrics`` (JSON), each named after
    the moving image. ``io_iters`` is the instance-optimisation iterations (``None``: the default; 0: off)
    and ``io_grid_factor`` its fixed voxels per control-grid voxel (``None``: the default, 2 from zero, 1
    refining a network's field; 1 resolves small local changes); ``io_similarity``, ``io_regularization``,
    ``io_interpolation``: as :class:`rwcflow.optimize.InstanceOptimization` (``None``: its defaults);
    ``device="auto"`` picks CUDA when the job's machine has it.
    """
    written = steps.register_files(
        fixed, moving, Path.cwd(), model=model, io_iters=io_iters, io_grid_factor=io_grid_factor,
        io_similarity=io_similarity, io_regularization=io_regularization, io_interpolation=io_interpolation,
        affine=affine,
        device=device, fixed_labels=fixed_labels, moving_labels=moving_labels, fixed_mask=fixed_mask,
        moving_mask=moving_mask)
    return tuple(written[key] for key in steps.REGISTRATION_FILES)


Register = python.define(_register_job, name="Register", outputs={
    "warped": File, "xfm": File, "affine": File, "warped_labels": File | None, "metrics": File | None})


def _apply_transform_job(image: File, xfm: File, reference: File | None = None, labels: bool = False) -> File:
    """Resample ``image`` (any grid) through an ITK displacement field ``xfm`` (fixed→moving) onto
    ``reference``'s grid (default: the field's own grid); nearest neighbour for ``labels``."""
    return steps.apply_transform(image, xfm, Path.cwd(), reference, labels)


ApplyTransform = python.define(_apply_transform_job, name="ApplyTransform", outputs={"out": File})


def _label_propagation_job(labels: File, xfm: File, reference: File | None = None) -> File:
    """Carry a label map through ``xfm`` onto ``reference``'s grid: :class:`ApplyTransform` with ``labels=True``."""
    return steps.apply_transform(labels, xfm, Path.cwd(), reference, labels=True)


LabelPropagation = python.define(_label_propagation_job, name="LabelPropagation", outputs={"out": File})


def _compose_transforms_job(xfms: list[File], reference: File | None = None) -> File:
    """One ITK displacement field for a chain of them, in ANTs order (``-t A -t B``: ``B`` acts first),
    on ``reference``'s grid (default: the first field's grid)."""
    return steps.compose_transforms(xfms, Path.cwd(), reference)


ComposeTransforms = python.define(_compose_transforms_job, name="ComposeTransforms", outputs={"out": File})


def _compose_transform_pair_job(outer: File, inner: File, reference: File | None = None) -> File:
    """:class:`ComposeTransforms` of two fields, ``p -> outer(inner(p))`` (ANTs: ``-t outer -t inner``),
    for splitting over one of them; named after ``outer`` (``<outer>_composed.nii.gz``)."""
    return steps.compose_transforms([outer, inner], Path.cwd(), reference, name=steps.output_name(outer, "composed"))


ComposeTransformPair = python.define(_compose_transform_pair_job, name="ComposeTransformPair", outputs={"out": File})


def _invert_transform_job(xfm: File) -> File:
    """The inverse of an ITK displacement field, on the same grid (:func:`rwcflow.maps.invert_displacement`)."""
    return steps.invert_transform(xfm, Path.cwd())


InvertTransform = python.define(_invert_transform_job, name="InvertTransform", outputs={"out": File})


def _average_fields_job(xfms: list[File]) -> File:
    """Voxel-wise mean of ITK displacement fields on the first field's grid (others resampled in world space)."""
    return steps.average_transforms(xfms, Path.cwd())


AverageFields = python.define(_average_fields_job, name="AverageFields", outputs={"out": File})


def _jacobian_maps_job(xfm: File) -> tuple[File, File]:
    """Jacobian determinant of an ITK displacement field's mapping (world mm), and its logarithm
    (folded voxels floored, see :func:`rwcflow.maps.log_jacobian`)."""
    return steps.jacobian_maps(xfm, Path.cwd())


JacobianMaps = python.define(_jacobian_maps_job, name="JacobianMaps", outputs={"jacobian": File, "log_jacobian": File})


def _average_images_job(images: list[File], method: str = "mean", sharpen: float = 0.0) -> File:
    """Voxel-wise ``"mean"`` or ``"median"`` of ``images`` on the first image's grid (others resampled
    in world space), Laplacian-sharpened by ``sharpen`` (:func:`rwcflow.maps.laplacian_sharpen`; 0: off)."""
    return steps.average_images(images, Path.cwd(), method, sharpen)


AverageImages = python.define(_average_images_job, name="AverageImages", outputs={"average": File})


def _shape_update_job(average: File, average_xfm: File, gradient_step: float = 0.25, repeats: int = 4,
                      log: File | None = None, template: File | None = None, templates: list[File] | None = None,
                      ) -> tuple[File, File, list[File], File]:
    """Template shape update of ANTs' ``antsMultivariateTemplateConstruction2.sh``
    (:func:`rwcflow.steps.shape_update`).

    ``average`` is the mean of the images registered to the current template and ``average_xfm`` the
    mean of their template→subject fields: its displacement is the template's shape bias, so
    ``average`` is resampled through the field ``-gradient_step * average_xfm`` composed ``repeats``
    times (ANTs applies it 4 times), moving the template against it. ``log`` (JSON, a list with one
    entry per update) gets this update's ``update_norm_mm``, the mean length of the average field over
    the template's foreground (in the background the fields are set by regularisation alone), and
    ``update_norm_grid_mm``, over the whole grid. ``template`` is the template the registrations were
    made to: it is appended to ``templates`` (the previous update's output), so a chain of updates lists
    the template of every iteration; the new one is ``template_update-<n>.nii.gz``, and ``update_xfm`` the
    update itself (an ITK field from the new template to ``template``, for :class:`FollowUpdate`).
    """
    updated, log_path, update_xfm = steps.shape_update(average, average_xfm, Path.cwd(), gradient_step, repeats, log)
    registered_to = [] if template is None else [template]
    return updated, log_path, [*(templates or []), *registered_to], update_xfm


ShapeUpdate = python.define(_shape_update_job, name="ShapeUpdate",
                            outputs={"template": File, "log": File, "templates": list[File], "update_xfm": File})


def _follow_update_job(moving: File, xfm: File, update_xfm: File, moving_labels: File | None = None,
                       ) -> tuple[File, File, File | None]:
    """A registration carried through a template update (:func:`rwcflow.steps.follow_update`): ``moving``'s
    map ``xfm`` to the previous template, after the update ``update_xfm`` (:class:`ShapeUpdate`), with
    ``warped`` (and ``warped_labels``) resampled through it, named as :class:`Register` names them."""
    return steps.follow_update(moving, xfm, update_xfm, Path.cwd(), moving_labels)


FollowUpdate = python.define(_follow_update_job, name="FollowUpdate",
                             outputs={"warped": File, "xfm": File, "warped_labels": File | None})


def _rigid_midspace_job(sessions: list[File], align: bool = True, device: str = "auto") -> list[File]:
    """The sessions' rigid midspace (:func:`rwcflow.midspace.rigid_midspace`; ``align`` False: the sessions are
    aligned in world space already): per session its template→session map (ITK field on the template grid)."""
    return steps.rigid_midspace_files(sessions, Path.cwd(), align=align, device=device)


RigidMidspace = python.define(_rigid_midspace_job, name="RigidMidspace", outputs={"xfms": list[File]})


def _groupwise_refine_job(sessions: list[File], xfms: list[File], iterations: int = GroupwiseRefinement.iterations,
                          regularization: float = GroupwiseRefinement.regularization,
                          device: str = "auto") -> tuple[File, list[File], list[File]]:
    """Refine the template→session fields ``xfms`` (ITK, one per session, on the template's grid) of
    ``sessions`` jointly, every session resampled alike and compared with the others
    (:func:`rwcflow.groupwise.refine_groupwise`), so that sub-voxel changes are not biased towards the
    template: the ``template`` (mean of the resampled sessions), refined ``xfms`` and ``warped`` sessions,
    each named after its session. ``iterations`` L-BFGS iterations, ``regularization`` the diffusion weight."""
    template, refined, warped = steps.groupwise_refine_files(sessions, xfms, Path.cwd(), iterations=iterations,
                                                            regularization=regularization, device=device)
    return template, refined, warped


GroupwiseRefine = python.define(_groupwise_refine_job, name="GroupwiseRefine",
                                outputs={"template": File, "xfms": list[File], "warped": list[File]})


def _single_session_job(session: File) -> tuple[File, list[File], list[File]]:
    """Pass-through for a participant with one session: the template is the session itself (copied), its
    transform the identity (a zero displacement field on the session's grid), its warped image a copy."""
    template, xfm, warped = steps.single_session(session, Path.cwd())
    return template, [xfm], [warped]


SingleSession = python.define(_single_session_job, name="SingleSession",
                              outputs={"template": File, "xfms": list[File], "warped": list[File]})


def _label_probabilities_job(label_maps: list[File]) -> tuple[File, list[int]]:
    """Per-label probability maps from label maps on one grid: a 4-D float32 NIfTI whose volume ``n`` is
    the fraction of ``label_maps`` holding ``label_values[n]`` at each voxel (background 0 left out)."""
    images = [load_image(path, labels=True) for path in label_maps]
    stack = np.stack([image.data for image in images])
    values = [int(v) for v in np.unique(stack) if v != 0]
    probabilities = np.stack([(stack == v).mean(axis=0) for v in values], axis=-1).astype(np.float32)
    return save_image(Image(probabilities, images[0].affine.copy()), Path.cwd() / "label_probabilities.nii.gz"), values


LabelProbabilities = python.define(_label_probabilities_job, name="LabelProbabilities",
                                   outputs={"probabilities": File, "label_values": list[int]})


def _train_stage_job(config: File, stage: int, init_model: File | None = None, work_dir: str | None = None,
                     device: str | None = None) -> tuple[File, File, dict]:
    """Train stage ``stage`` of the network of a training config (:func:`rwcflow.train.train_stage`).

    ``config`` is a training config file (``rwcflow-train --print-config paper``); the stages before
    ``stage`` come from ``init_model`` (the previous stage's ``model``) and stay frozen. Checkpoints go to
    ``work_dir`` (default: the job's folder), where a resubmitted job resumes; ``device`` overrides the
    config's. ``model`` is the network trained up to this stage, ``log`` its CSV log and ``validation``
    its final validation numbers (MSE and, as the data allow, Dice, TRE and endpoint error).
    """
    from dataclasses import replace

    from rwcflow.train import load_config, train_stage

    settings = load_config(config)
    if device is not None:
        settings = replace(settings, device=device)
    folder = Path(work_dir) if work_dir else Path.cwd()
    result = train_stage(settings, stage, folder, init_model=init_model, progress=False)
    return result.model, result.log, result.validation


TrainStage = python.define(_train_stage_job, name="TrainStage",
                           outputs={"model": File, "log": File, "validation": dict})

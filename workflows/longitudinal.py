"""Longitudinal workflow: an unbiased within-subject template from all sessions of one participant, and
each session's transforms and volume-change (Jacobian) maps in template space.

The template is built by iterative groupwise registration, as ANTs' template construction does, so that
no session is privileged: start from the voxel-wise average of the sessions (in world space, on the first
session's grid); then, ``iterations`` times, register every session to the current template, average the
warped sessions and remove the mean shape of the template->session fields by warping that average with
``-step`` times their mean (``T(p) <- mean_i warped_i(p - step * mean_i u_i(p))``). A last round registers
every session to the final template; its fields give the outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fileformats.generic import File
from pydra.compose import python, workflow

from rwcflow import transforms
from rwcflow.io import load_image, save_image
from rwcflow.tasks import (AverageFields, AverageImages, InvertTransform, JacobianMaps, Register, ShapeUpdate,
                           _output_name)


@python.define(outputs={"template": File, "xfms": list[File], "warped": list[File]})
def SingleSession(session: File) -> tuple[File, list[File], list[File]]:
    """Pass-through for a participant with one session: the template is the session itself (copied), its
    transform the identity (a zero displacement field on the session's grid), its warped image a copy."""
    image = load_image(session)
    identity = np.zeros((*image.grid.shape, 3))
    xfm = transforms.write_displacement_field(Path.cwd() / _output_name(session, "xfm"), identity, image.grid)
    return (save_image(image, Path.cwd() / "template.nii.gz"), [xfm],
            [save_image(image, Path.cwd() / _output_name(session, "warped"))])


@workflow.define(outputs=["template", "xfms", "inverse_xfms", "warped", "jacobians", "log_jacobians"])
def Longitudinal(sessions: list[File], iterations: int = 2, step: float = 0.5, model: str = "default",
                 io_iters: int | None = None, io_grid_factor: int = 1, affine: bool = True, device: str = "auto"):
    """All sessions of one participant -> an unbiased within-subject template, transforms and change maps.

    Args:
        sessions: the participant's T1w images (any grids; same participant, roughly aligned in world space).
        iterations: template updates (register all, average, remove the mean shape); 0 keeps the average.
        step: fraction ``g`` (0 < g <= 1) of the mean template->session field removed at each update.
        model: registration network (``"default"``, ``"none"`` or a model file).
        io_iters: instance-optimisation iterations per registration (``None``: the default; 0: off).
        io_grid_factor: template voxels per instance-optimisation control voxel (1: full resolution,
            which local longitudinal changes need; 2: the pairwise default).
        affine: estimate an affine pre-alignment in every registration.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``, resolved inside each job.

    Returns:
        template: the within-subject template (on the first session's grid).
        xfms: per session, the template->session mapping (ITK displacement field on the template grid,
            pull-back: the session resampled through it lies on the template).
        inverse_xfms: per session, the inverse of ``xfms`` (session->template, on the template grid).
        warped: per session, the session resampled onto the template.
        jacobians: per session, the Jacobian determinant of ``xfms`` in template space (> 1: the session
            is larger there than the template).
        log_jacobians: per session, its logarithm; the difference between two sessions is the log
            volume change between them.

    A participant with a single session passes through: the template is that session, the transforms
    are the identity, the Jacobian is 1 and the log-Jacobian 0 everywhere.
    """
    if not sessions:
        raise ValueError("Longitudinal needs at least one session")
    if not 0.0 < step <= 1.0:
        raise ValueError(f"step must be in (0, 1], got {step}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if len(sessions) == 1:
        single = workflow.add(SingleSession(session=sessions[0]))
        jacobians = workflow.add(JacobianMaps().split(xfm=single.xfms).combine("xfm"), name="jacobians")
        return single.template, single.xfms, single.xfms, single.warped, jacobians.jacobian, jacobians.log_jacobian

    def register_all(template, name: str):
        return workflow.add(
            Register(fixed=template, model=model, io_iters=io_iters, io_grid_factor=io_grid_factor,
                     affine=affine, device=device).split(moving=sessions).combine("moving"),
            name=name,
        )

    template = workflow.add(AverageImages(images=sessions), name="initial_average").average
    for k in range(iterations):
        registered = register_all(template, f"register_{k}")
        average = workflow.add(AverageImages(images=registered.warped), name=f"average_{k}")
        mean_field = workflow.add(AverageFields(xfms=registered.xfm), name=f"mean_field_{k}")
        template = workflow.add(ShapeUpdate(average=average.average, average_xfm=mean_field.out,
                                            gradient_step=step, repeats=1), name=f"update_{k}").template
    final = register_all(template, "register_final")
    inverse = workflow.add(InvertTransform().split(xfm=final.xfm).combine("xfm"), name="invert")
    jacobians = workflow.add(JacobianMaps().split(xfm=final.xfm).combine("xfm"), name="jacobians")
    # every per-session file is named after its session (Register, then the tasks on its outputs)
    return template, final.xfm, inverse.out, final.warped, jacobians.jacobian, jacobians.log_jacobian

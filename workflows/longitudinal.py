"""Longitudinal workflow: an unbiased within-subject template from all sessions of one participant, and
each session's transforms and volume-change (Jacobian) maps in template space.

The template is the :func:`~rwcflow.workflows.atlas.Atlas` of the sessions (iterative groupwise
registration, as ANTs' template construction does, so that no session is privileged), with the mean
shape removed in one step of ``step`` per update (``T(p) <- mean_i warped_i(p - step * mean_i u_i(p))``).
Its final registrations are then refined jointly (:class:`~rwcflow.tasks.GroupwiseRefine`: every session
resampled alike and compared with the others, so that sub-voxel changes are not pulled towards the
template's blur) and give the outputs, with their inverses and Jacobian maps. Given a group template,
the within-subject template is registered to it and every session's transform into group space is the
composition of the two (one interpolation from the session to the group grid).
"""

from __future__ import annotations

import logging

from fileformats.generic import File
from pydra.compose import workflow

from rwcflow.tasks import (ApplyTransform, ComposeTransformPair, GroupwiseRefine, InvertTransform, JacobianMaps,
                           Register, SingleSession)
from rwcflow.workflows.atlas import Atlas

log = logging.getLogger("rwcflow")


@workflow.define(outputs=["template", "xfms", "inverse_xfms", "warped", "jacobians", "log_jacobians",
                          "group_xfm", "group_xfms", "group_warped"])
def Longitudinal(sessions: list[File], iterations: int = 2, step: float = 0.5, model: str = "default",
                 io_iters: int | None = None, io_grid_factor: int = 1, io_similarity: str | None = None,
                 io_regularization: float | None = None, io_interpolation: str | None = None,
                 refine_iters: int = 200, affine: bool = True, device: str = "auto",
                 group_template: File | None = None):
    """All sessions of one participant -> an unbiased within-subject template, transforms and change maps.

    Args:
        sessions: the participant's T1w images (any grids; same participant, roughly aligned in world space).
        iterations: template updates (register all, average, remove the mean shape), at least 1.
        step: fraction ``g`` (0 < g <= 1) of the mean template->session field removed at each update.
        model: registration network (``"default"``, ``"none"`` or a model file).
        io_iters: instance-optimisation iterations per registration (``None``: the default; 0: off).
        io_grid_factor: template voxels per instance-optimisation control voxel (1: full resolution,
            which local longitudinal changes need; 2: the pairwise default).
        io_similarity, io_regularization, io_interpolation: the within-subject registrations' instance
            optimisation (as :class:`rwcflow.optimize.InstanceOptimization`; ``None``: its defaults).
            Sessions share their contrast, so ``"mse"`` or ``"ncc"`` fit, and ``"bspline"`` sampling
            resolves sub-voxel changes that trilinear sampling pulls towards zero.
        refine_iters: Adam steps of the joint refinement of the final template->session fields
            (:func:`rwcflow.groupwise.refine_groupwise`; 0: off, the final registrations are the outputs).
        affine: estimate an affine pre-alignment in every registration (and start from the average of
            the sessions affinely aligned to the first; without it, from their plain world-space average).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``, resolved inside each job.
        group_template: an optional group template (e.g. a cohort's :func:`~rwcflow.workflows.atlas.Atlas`
            or MNI152) to carry the sessions into.

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
        group_xfm: with ``group_template``, the group->template mapping (the within-subject template
            registered to the group template; a field on the group grid), else ``None``.
        group_xfms: with ``group_template``, per session, the group->session mapping composed through
            the template (the session resampled through it lies on the group template), else ``None``.
        group_warped: with ``group_template``, per session, the session resampled onto the group
            template through ``group_xfms``, else ``None``.

    A participant with a single session passes through with a logged notice: the template is that
    session, the transforms are the identity, the Jacobian is 1 and the log-Jacobian 0 everywhere.
    """
    if not sessions:
        raise ValueError("Longitudinal needs at least one session")
    if not 0.0 < step <= 1.0:
        raise ValueError(f"step must be in (0, 1], got {step}")
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    if refine_iters < 0:
        raise ValueError(f"refine_iters must be >= 0, got {refine_iters}")
    if len(sessions) == 1:
        log.warning("%s: a single session, so no within-subject template is built: the session is its own "
                    "template, with identity transforms and no change maps", sessions[0])
        single = workflow.add(SingleSession(session=sessions[0]))
        template, xfms, inverse_xfms, warped = single.template, single.xfms, single.xfms, single.warped
    else:
        atlas = workflow.add(Atlas(images=sessions, iterations=iterations, gradient_step=step, shape_repeats=1,
                                   model=model, io_iters=io_iters, io_grid_factor=io_grid_factor,
                                   io_similarity=io_similarity, io_regularization=io_regularization,
                                   io_interpolation=io_interpolation, affine=affine, device=device), name="template")
        template, xfms, warped = atlas.template, atlas.xfms, atlas.warped
        if refine_iters > 0:
            refined = workflow.add(GroupwiseRefine(sessions=sessions, xfms=xfms, iterations=refine_iters,
                                                   device=device), name="refine")
            template, xfms, warped = refined.template, refined.xfms, refined.warped
        inverse_xfms = workflow.add(InvertTransform().split(xfm=xfms).combine("xfm"), name="invert").out
    jacobians = workflow.add(JacobianMaps().split(xfm=xfms).combine("xfm"), name="jacobians")
    group_xfm = group_xfms = group_warped = None
    if group_template is not None:
        to_group = workflow.add(Register(fixed=group_template, moving=template, model=model, io_iters=io_iters,
                                         affine=affine, device=device), name="template_to_group")
        # the group->template field acts first, then the template->session one
        composed = workflow.add(ComposeTransformPair(inner=to_group.xfm, reference=group_template)
                                .split(outer=xfms).combine("outer"), name="compose_to_group")
        group_xfm, group_xfms = to_group.xfm, composed.out
        resampled = workflow.add(ApplyTransform(reference=group_template).split(("image", "xfm"), image=sessions,
                                                                                xfm=group_xfms)
                                 .combine("image"), name="sessions_to_group")
        group_warped = resampled.out
    # every per-session file is named after its session (Register, then the tasks on its outputs)
    return (template, xfms, inverse_xfms, warped, jacobians.jacobian, jacobians.log_jacobian,
            group_xfm, group_xfms, group_warped)

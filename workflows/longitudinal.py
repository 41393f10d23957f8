"""Longitudinal workflow: an unbiased within-subject template from all sessions of one participant, and
each session's transforms and volume-change (Jacobian) maps in template space.

Sessions of one participant show the same anatomy, moved and changed a little, so the template is built
as FreeSurfer's longitudinal stream builds its base: the sessions are aligned rigidly into the space
half-way between them (:class:`~rwcflow.tasks.RigidMidspace`, no session privileged), then their maps are
refined jointly (:class:`~rwcflow.tasks.GroupwiseRefine`: every session resampled alike and compared with
the others, smooth corrections of zero mean), which measures the local change; the template is the mean of
the refined sessions. No network runs here: a learned inter-subject registration of each session adds its
own noise to every session's map, which the change maps would show (README, Benchmarks). Given a group
template, the within-subject template is registered to it (the network's job) and every session's
transform into group space is the composition of the two (one interpolation from the session to the
group grid).
"""

from __future__ import annotations

import logging

from fileformats.generic import File
from pydra.compose import workflow

from rwcflow.groupwise import GroupwiseRefinement
from rwcflow.tasks import (ApplyTransform, ComposeTransformPair, GroupwiseRefine, InvertTransform, JacobianMaps,
                           Register, RigidMidspace, SingleSession)

log = logging.getLogger("rwcflow")


@workflow.define(outputs=["template", "xfms", "inverse_xfms", "warped", "jacobians", "log_jacobians",
                          "group_xfm", "group_xfms", "group_warped"])
def Longitudinal(sessions: list[File], refine_iters: int = GroupwiseRefinement.iterations, affine: bool = True,
                 model: str = "default", io_iters: int | None = None, device: str = "auto",
                 group_template: File | None = None):
    """All sessions of one participant -> an unbiased within-subject template, transforms and change maps.

    Args:
        sessions: the participant's T1w images (any grids; same participant, roughly aligned in world space).
        refine_iters: L-BFGS iterations of the joint refinement of the sessions' maps
            (:func:`rwcflow.groupwise.refine_groupwise`; 0: off, the maps stay rigid and show no change).
        affine: align the sessions rigidly (without it they are taken as aligned in world space), and
            estimate an affine pre-alignment of the template to ``group_template``.
        model: registration network of the template to ``group_template`` (``"default"``, ``"none"`` or a
            model file).
        io_iters: instance-optimisation iterations of that registration (``None``: the default; 0: off).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``, resolved inside each job.
        group_template: an optional group template (e.g. a cohort's :func:`~rwcflow.workflows.atlas.Atlas`
            or MNI152) to carry the sessions into.

    Returns:
        template: the within-subject template (on session 1's grid moved into the midspace).
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
    if refine_iters < 0:
        raise ValueError(f"refine_iters must be >= 0, got {refine_iters}")
    if len(sessions) == 1:
        log.warning("%s: a single session, so no within-subject template is built: the session is its own "
                    "template, with identity transforms and no change maps", sessions[0])
        single = workflow.add(SingleSession(session=sessions[0]))
        template, xfms, inverse_xfms, warped = single.template, single.xfms, single.xfms, single.warped
    else:
        midspace = workflow.add(RigidMidspace(sessions=sessions, align=affine, device=device), name="midspace")
        refined = workflow.add(GroupwiseRefine(sessions=sessions, xfms=midspace.xfms, iterations=refine_iters,
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

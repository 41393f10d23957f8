"""Nipype workflows of rwcflow's interfaces, built by factories in the NiPreps style: options are given
when the workflow is built, files flow in through ``inputnode`` and out of ``outputnode`` (both
``IdentityInterface`` nodes), so the workflow plugs into a larger one like a node.

They mirror the Pydra workflows :class:`rwcflow.workflows.pairwise.Pairwise` and
:class:`rwcflow.workflows.longitudinal.Longitudinal` (the latter without a group template, so without the
options of its registration to one), with the same defaults and the same output names. With the
``MultiProc`` plugin jobs run in forked processes: run the workflow from a process that has not run
multi-threaded torch code (or call ``torch.set_num_threads(1)`` first), and for CUDA jobs pass
``plugin_args={"mp_context": "forkserver"}``.
"""

from __future__ import annotations

import logging

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from rwcflow.groupwise import GroupwiseRefinement

from .maps import JacobianMaps
from .registration import InvertTransform, Register
from .templates import GroupwiseRefine, RigidMidspace, SingleSession

log = logging.getLogger("rwcflow")

PAIRWISE_INPUTS = ["fixed", "moving", "fixed_labels", "moving_labels", "fixed_mask", "moving_mask"]
PAIRWISE_OUTPUTS = ["warped", "xfm", "affine", "warped_labels", "metrics", "jacobian", "log_jacobian"]
LONGITUDINAL_OUTPUTS = ["template", "xfms", "inverse_xfms", "warped", "jacobians", "log_jacobians"]


def _register(name: str, omp_nthreads: int | None, **options) -> pe.Node:
    """A :class:`Register` node with the options that are set; Nipype schedules it on ``omp_nthreads``
    processors (its ``num_threads``; ``None``: one, torch's threads untouched)."""
    interface = Register(**{key: value for key, value in (*options.items(), ("num_threads", omp_nthreads))
                            if value is not None})
    return pe.Node(interface, name=name)


def init_pairwise_wf(*, model: str = "default", io_iters: int | None = None, affine: bool = True,
                     device: str = "auto", omp_nthreads: int | None = None,
                     name: str = "pairwise_wf") -> pe.Workflow:
    """Register ``moving`` to ``fixed`` and map the volume change of the result.

    Parameters
    ----------
    model
        RWCNet model: ``"default"``, ``"none"`` (instance optimisation alone) or a model file.
    io_iters
        Instance-optimisation Adam steps per level (``None``: the default; 0: off).
    affine
        Estimate an affine pre-alignment.
    device
        ``"auto"`` (CUDA when the job's machine has it), ``"cpu"`` or ``"cuda"``.
    omp_nthreads
        Threads of the registration job (its ``n_procs`` and torch threads); ``None``: the job keeps the
        torch threads of the process that runs it (forked jobs inherit the submitting process's).
    name
        The workflow's name.

    Inputs (``inputnode``)
    ----------------------
    fixed, moving
        NIfTI/MGZ images, any grids.
    fixed_labels, moving_labels, fixed_mask, moving_mask
        Optional label maps and masks on their image's grid (leave unset when absent).

    Outputs (``outputnode``)
    ------------------------
    warped
        ``moving`` resampled onto the fixed grid.
    xfm
        The fixed→moving mapping, affine included: an ITK displacement field (``antsApplyTransforms`` reads it).
    affine
        The affine pre-alignment, an ITK text transform.
    warped_labels, metrics
        With label maps: the moving labels on the fixed grid and a JSON file with Dice, HD95, SDlogJ and
        folding (undefined without them).
    jacobian, log_jacobian
        Jacobian determinant of ``xfm``'s mapping on the fixed grid, and its logarithm.
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=PAIRWISE_INPUTS, mandatory_inputs=False), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=PAIRWISE_OUTPUTS), name="outputnode")
    register = _register("register", omp_nthreads, model=model, io_iters=io_iters, affine=affine, device=device)
    jacobian = pe.Node(JacobianMaps(), name="jacobian")
    workflow.connect([
        (inputnode, register, [(field, field) for field in PAIRWISE_INPUTS]),
        (register, jacobian, [("xfm", "xfm")]),
        (register, outputnode, [(field, field) for field in ("warped", "xfm", "affine", "warped_labels", "metrics")]),
        (jacobian, outputnode, [("jacobian", "jacobian"), ("log_jacobian", "log_jacobian")]),
    ])
    return workflow


def init_longitudinal_wf(num_sessions: int, *, refine_iters: int = GroupwiseRefinement.iterations,
                         affine: bool = True, device: str = "auto", name: str = "longitudinal_wf") -> pe.Workflow:
    """All sessions of one participant -> an unbiased within-subject template, transforms and change maps.

    As :class:`rwcflow.workflows.longitudinal.Longitudinal`: align the sessions rigidly into the space
    half-way between them (:class:`RigidMidspace`, no session privileged), then refine all sessions' maps
    jointly (:class:`GroupwiseRefine`); the template is the mean of the refined sessions. No registration
    network runs within a subject. With one session the workflow is a pass-through (its own template,
    identity transforms).

    Parameters
    ----------
    num_sessions
        The number of sessions ``inputnode.sessions`` will hold (1: the pass-through).
    refine_iters
        L-BFGS iterations of the joint refinement of the sessions' maps (0: off, the maps stay rigid and show no
        change; the template is still the mean of the sessions in the midspace).
    affine
        Align the sessions rigidly (without it they are taken as aligned in world space).
    device
        ``"auto"`` (CUDA when the job's machine has it), ``"cpu"`` or ``"cuda"``.
    name
        The workflow's name.

    Inputs (``inputnode``)
    ----------------------
    sessions
        The participant's T1w images (any grids, roughly aligned in world space).

    Outputs (``outputnode``)
    ------------------------
    template
        The within-subject template, on the first session's grid moved into the midspace.
    xfms
        Per session, the template→session mapping (ITK displacement field on the template grid: the
        session resampled through it lies on the template), named after the session.
    inverse_xfms
        Per session, the inverse of ``xfms`` (session→template, on the template grid).
    warped
        Per session, the session resampled onto the template.
    jacobians, log_jacobians
        Per session, the Jacobian determinant of ``xfms`` in template space (> 1: the session is larger
        there than the template) and its logarithm; the difference between two sessions' log-Jacobians
        is the log volume change between them.
    """
    if num_sessions < 1:
        raise ValueError(f"a longitudinal workflow needs at least one session, got {num_sessions}")
    if refine_iters < 0:
        raise ValueError(f"refine_iters must be >= 0, got {refine_iters}")
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["sessions"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=LONGITUDINAL_OUTPUTS), name="outputnode")
    jacobians = pe.MapNode(JacobianMaps(), iterfield=["xfm"], name="jacobians")
    workflow.connect([
        (jacobians, outputnode, [("jacobian", "jacobians"), ("log_jacobian", "log_jacobians")]),
    ])
    if num_sessions == 1:
        log.warning("%s: a single session, so no within-subject template is built: the session is its own "
                    "template, with identity transforms", name)
        single = pe.Node(SingleSession(), name="single_session")
        workflow.connect([
            (inputnode, single, [(("sessions", _first), "session")]),
            (single, jacobians, [("xfm", "xfm")]),
            (single, outputnode, [("template", "template"), (("xfm", _as_list), "xfms"),
                                  (("xfm", _as_list), "inverse_xfms"), (("warped", _as_list), "warped")]),
        ])
        return workflow

    midspace = pe.Node(RigidMidspace(align=affine, device=device), name="midspace")
    refine = pe.Node(GroupwiseRefine(iterations=refine_iters, device=device), name="refine")
    invert = pe.MapNode(InvertTransform(), iterfield=["xfm"], name="invert")
    workflow.connect([
        (inputnode, midspace, [("sessions", "sessions")]),
        (inputnode, refine, [("sessions", "sessions")]),
        (midspace, refine, [("xfms", "xfms")]),
        (refine, invert, [("xfms", "xfm")]),
        (refine, jacobians, [("xfms", "xfm")]),
        (refine, outputnode, [("template", "template"), ("xfms", "xfms"), ("warped", "warped")]),
        (invert, outputnode, [("out", "inverse_xfms")]),
    ])
    return workflow


def _first(files):
    """The first of a list of files (a connection function: Nipype runs it from its source)."""
    return files[0]


def _as_list(file):
    """A file as a one-element list (a connection function: Nipype runs it from its source)."""
    return [file]

"""Participant level: for each participant, the longitudinal workflow over its sessions (a single
session passes through), carried into the group template when one is given; derivatives and report.

Participants run one after the other, each in its own Pydra submission sharing the work folder's cache
(so a re-run resumes); one that fails is reported and the others go on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from rwcflow.errors import RwcflowError
from rwcflow.io import Image, load_image, read_nibabel, resample
from rwcflow.maps import foreground_mask
from rwcflow.metrics import image_correlation
from rwcflow.workflows.longitudinal import Longitudinal

from . import derivatives as names
from .dataset import Participant, entities
from .failures import record_failure
from .options import RunOptions
from .reports import ParticipantResult, SessionResult, participant_report

log = logging.getLogger("rwcflow")


def run_participants(participants: list[Participant], bids_dir: Path, output_dir: Path,
                     options: RunOptions) -> dict[str, str]:
    """Run every participant; returns the failed ones (label -> one-line reason)."""
    failed = {}
    for number, participant in enumerate(participants, start=1):
        start = time.perf_counter()
        log.info("[%d/%d] sub-%s: %d %s image(s)", number, len(participants), participant.label,
                 len(participant.images), "structural")
        try:
            result = run_participant(participant, bids_dir, output_dir, options)
        except Exception as exc:  # one participant's failure must not sink the others
            failed[participant.label] = record_failure(exc, output_dir, options.run_id, participant.label)
            log.error("sub-%s failed: %s", participant.label, failed[participant.label])
            participant_report(output_dir, ParticipantResult(
                participant.label, template=None, sessions=[], parameters=options.parameters(),
                errors=[failed[participant.label]], command=options.command))
            continue
        written = time.perf_counter()
        participant_report(output_dir, result)
        log.info("sub-%s: report written in %.1f s", participant.label, time.perf_counter() - written)
        log.info("sub-%s done in %.0f s", participant.label, time.perf_counter() - start)
    return failed


def run_participant(participant: Participant, bids_dir: Path, output_dir: Path,
                    options: RunOptions) -> ParticipantResult:
    """The longitudinal workflow on one participant, its derivatives written into ``output_dir``."""
    if not participant.images:
        raise RwcflowError(f"sub-{participant.label}: no structural image found")
    names.remove_stale_staging(output_dir, participant.label)
    group = options.template.path
    workflow = Longitudinal(sessions=participant.images, refine_iters=options.refine_iters, model=options.model,
                            io_iters=options.io_iters, device=options.device, group_template=group)
    with options.submitter() as submitter:
        outputs = submitter(workflow, raise_errors=True).outputs
    return _write(participant, outputs, bids_dir, output_dir, options)


def _write(participant: Participant, out, bids_dir: Path, output_dir: Path, options: RunOptions) -> ParticipantResult:
    """Copy the workflow's outputs into the derivatives, with sidecars, all appearing together
    (:func:`~rwcflow.bids_app.derivatives.publish_together`); the report's view of them."""
    label, space, group = participant.label, names.SUBJECT_SPACE, options.template
    sources = [names.bids_uri(image, bids_dir, "raw") for image in participant.images]
    files: list[tuple[Path, Path, dict | None]] = []  # (produced, derivative, sidecar)

    def add(produced, path: Path, description: str, sources: list[str], **extra) -> Path:
        files.append((Path(produced), path, {"Description": description, "Sources": sources,
                                             "rwcflow": options.parameters(), **extra}))
        return path

    template = add(out.template, names.participant_path(output_dir, label, "desc-template_T1w.nii.gz"),
                   "Unbiased within-subject template of the participant's sessions (space T1w)", sources)
    template_image = load_image(out.template)  # read once for every session's metrics
    field = {"TransformType": "displacement field (ITK, LPS mm)"}
    sessions = []
    for n, image in enumerate(participant.images):
        source = [names.bids_uri(image, bids_dir, "raw")]
        def derivative(name: str) -> Path:
            return names.derivative_path(output_dir, image, name)

        xfm = add(out.xfms[n], derivative(f"from-orig_to-{space}_mode-image_xfm.nii.gz"),
                  "Resamples the session into the within-subject template", source, **field)
        add(out.inverse_xfms[n], derivative(f"from-{space}_to-orig_mode-image_xfm.nii.gz"),
            "Resamples the within-subject template into the session", source, **field)
        registered = add(out.warped[n], derivative(f"space-{space}_desc-registered_T1w.nii.gz"),
                         "The session resampled into the within-subject template", source,
                         SpatialReference=str(xfm.name))
        jacobian = add(out.jacobians[n], derivative(f"space-{space}_jacobian.nii.gz"),
                       "Jacobian determinant of the template->session mapping: > 1 where the session is larger "
                       "than the template", source)
        log_jacobian = add(out.log_jacobians[n], derivative(f"space-{space}_desc-log_jacobian.nii.gz"),
                           "Natural log of the Jacobian determinant (tensor-based morphometry)", source)
        if group.path is not None:
            add(out.group_xfms[n], derivative(f"from-orig_to-{group.name}_mode-image_xfm.nii.gz"),
                f"Resamples the session into {group.name}, through the within-subject template", source, **field)
            add(out.group_warped[n], derivative(f"space-{group.name}_desc-registered_T1w.nii.gz"),
                f"The session resampled into {group.name}", source)
        single = len(participant.images) == 1
        sessions.append(SessionResult(
            session=entities(image).get("ses"), t1w=image, registered=registered,
            jacobian=None if single else jacobian, log_jacobian=None if single else log_jacobian,
            metrics=_session_metrics(template_image, Path(out.warped[n]), Path(out.log_jacobians[n]))))
    group_registered = None
    if group.path is not None:
        add(out.group_xfm,
            names.participant_path(output_dir, label, f"from-{space}_to-{group.name}_mode-image_xfm.nii.gz"),
            f"Resamples the within-subject template into {group.name}", sources, **field)
        first = participant.images[0]
        group_registered = names.derivative_path(output_dir, first, f"space-{group.name}_desc-registered_T1w.nii.gz")
    names.publish_together(output_dir, f"sub-{label}", files)
    return ParticipantResult(label, template=template, sessions=sessions, group_template=group.path,
                             group_registered=group_registered, parameters=options.parameters(),
                             command=options.command)


def fit_to_template(template: Path | Image, registered: Path) -> float:
    """Correlation of an image registered onto ``template`` with it, over the template's foreground."""
    fixed, moved = template if isinstance(template, Image) else load_image(template), load_image(registered)
    if moved.grid != fixed.grid:
        moved = resample(moved, fixed.grid)
    return round(image_correlation(fixed.data, moved.data, foreground_mask(fixed)), 4)


def _session_metrics(template: Image, registered: Path, log_jacobian: Path) -> dict:
    """How well a session fits the template and how much it differs from it in volume (mean |log J|
    over the template's foreground)."""
    _, log_j = read_nibabel(log_jacobian)  # not load_image: a no-change log-Jacobian is all zeros
    return {"correlation_to_template": fit_to_template(template, registered),
            "mean_abs_log_jacobian": round(float(np.abs(log_j[foreground_mask(template)]).mean()), 5)}

"""Group level: an unbiased template (atlas) of the selected participants, from their within-subject
templates when the participant level has run (read from the output folder), otherwise from their
first structural image; every participant's transform to it, and the group report.

A participant whose within-subject template cannot be read is left out with a message; the template needs two.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from rwcflow.errors import InputError, RwcflowError
from rwcflow.io import load_image
from rwcflow.workflows.atlas import Atlas

from . import derivatives as names
from .dataset import Participant
from .options import RunOptions
from .failures import failure_reason
from .participant import fit_to_template
from .reports import GroupResult, group_report
from .spaces import UNBIASED

log = logging.getLogger("rwcflow")


def group_inputs(participants: list[Participant], output_dir: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Each participant's image for the template (within-subject template if written, else its first
    structural image) and the participants left out (label -> reason)."""
    images, failed = {}, {}
    for participant in participants:
        template = names.participant_path(output_dir, participant.label, "desc-template_T1w.nii.gz")
        image = template if template.exists() else (participant.images[0] if participant.images else None)
        if image is None:
            failed[participant.label] = f"sub-{participant.label}: no structural image found"
            continue
        try:
            load_image(image)
        except RwcflowError as exc:
            failed[participant.label] = failure_reason(exc)
            continue
        images[participant.label] = image
    return images, failed


def run_group(participants: list[Participant], bids_dir: Path, output_dir: Path, options: RunOptions) -> dict[str, str]:
    """Build the group template into ``output_dir/tpl-unbiased/``; returns the participants left out."""
    names.remove_stale_staging(output_dir)
    images, failed = group_inputs(participants, output_dir)
    for label, reason in failed.items():
        log.error("sub-%s left out of the group template: %s", label, reason)
    if len(images) < 2:
        raise InputError(output_dir, f"a group template needs two or more participants with a usable image; "
                                     f"found {len(images)}")
    labels = sorted(images)
    within = [images[label].name.endswith("_desc-template_T1w.nii.gz") for label in labels]
    log.info("group template from %d participants (%d within-subject templates), %d iterations",
             len(labels), sum(within), options.group_iterations)
    start = time.perf_counter()
    workflow = Atlas(images=[images[label] for label in labels], iterations=options.group_iterations,
                     model=options.model, io_iters=options.io_iters, device=options.device,
                     initial_template=options.template.path)
    with options.submitter() as submitter:
        out = submitter(workflow, raise_errors=True).outputs
    log.info("group template built in %.0f s", time.perf_counter() - start)

    name = UNBIASED
    # within-subject templates are this dataset's own files (BIDS URI ``bids::``), raw images the source's
    sources = [names.bids_uri(images[label], output_dir, "") if is_within else names.bids_uri(images[label], bids_dir, "raw")
               for label, is_within in zip(labels, within)]
    sidecar = {"Description": "Unbiased group template (ANTs-style iterative averaging and shape update)",
               "Sources": sources, "rwcflow": options.parameters()}
    template = names.copy_output(Path(out.template), names.template_path(output_dir, name), sidecar)
    iterations = [names.copy_output(Path(path), names.template_path(output_dir, name, f"desc-iteration{k}_T1w.nii.gz"))
                  for k, path in enumerate(out.templates)]
    convergence = json.loads(Path(out.log).read_text())
    names.write_json(names.template_path(output_dir, name, "desc-convergence_log.json"), {"updates": convergence})

    field = {"TransformType": "displacement field (ITK, LPS mm)", "rwcflow": options.parameters()}
    registered, fit = {}, {}
    for label, is_within, source, xfm, warped in zip(labels, within, sources, out.xfms, out.warped):
        image = images[label]
        if is_within:
            xfm_path = names.participant_path(output_dir, label, f"from-{names.SUBJECT_SPACE}_to-{name}_mode-image_xfm.nii.gz")
            warped_path = names.participant_path(output_dir, label, f"space-{name}_desc-registered_T1w.nii.gz")
        else:
            xfm_path = names.derivative_path(output_dir, image, f"from-orig_to-{name}_mode-image_xfm.nii.gz")
            warped_path = names.derivative_path(output_dir, image, f"space-{name}_desc-registered_T1w.nii.gz")
        names.copy_output(Path(xfm), xfm_path, {"Description": f"Resamples sub-{label} into the group template",
                                                 "Sources": [source], **field})
        registered[label] = names.copy_output(Path(warped), warped_path, {
            "Description": f"sub-{label} resampled into the group template", "Sources": [source]})
        fit[label] = fit_to_template(template, registered[label])
    written = time.perf_counter()
    group_report(output_dir, GroupResult(template=template, iteration_templates=iterations, convergence=convergence,
                                         participants=registered, fit=fit, parameters=options.parameters(),
                                         failed=failed, command=options.command))
    log.info("group report written in %.1f s", time.perf_counter() - written)
    return failed



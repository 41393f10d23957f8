"""BIDS derivatives: the names rwcflow writes (NiPreps conventions), their JSON sidecars, and the
dataset description. Every file is written atomically (a temporary file renamed into place), so an
interrupted run never leaves a half-written output.

Names, for a source image ``<src>`` (its entities, e.g. ``sub-01_ses-1``) of participant ``sub-01``:

| file | what |
|---|---|
| ``sub-01/anat/sub-01_desc-template_T1w.nii.gz`` | the within-subject template (space ``T1w``) |
| ``<dir>/<src>_from-orig_to-T1w_mode-image_xfm.nii.gz`` | resamples the session into the template |
| ``<dir>/<src>_from-T1w_to-orig_mode-image_xfm.nii.gz`` | its inverse |
| ``<dir>/<src>_space-T1w_desc-registered_T1w.nii.gz`` | the session resampled into the template |
| ``<dir>/<src>_space-T1w_jacobian.nii.gz``, ``..._desc-log_jacobian.nii.gz`` | volume change maps |
| ``sub-01/anat/sub-01_from-T1w_to-<tpl>_mode-image_xfm.nii.gz`` | the template into group space |
| ``<dir>/<src>_from-orig_to-<tpl>_mode-image_xfm.nii.gz``, ``<src>_space-<tpl>_desc-registered_T1w.nii.gz`` | the session into group space |
| ``tpl-<tpl>/tpl-<tpl>_T1w.nii.gz`` | a group template built by the group level |
| ``sub-01/log/<run>/crash-<job>.txt``, ``logs/<run>/crash-<job>.txt`` | a failed job's traceback (participant, group level) |

``<dir>`` is the source's own folder (``sub-01/ses-1/anat``). Transforms are ITK displacement fields.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from rwcflow import __version__
from rwcflow.errors import JobFailure
from rwcflow.io import atomic_write, is_temporary, remove_stale_temporaries

from .dataset import entities, source_prefix
from .spaces import UNBIASED

SUBJECT_SPACE = "T1w"
"""The space of the within-subject template, as NiPreps call a participant's anatomical reference."""


def source_folder(output_dir: Path, source: Path) -> Path:
    """Where the derivatives of ``source`` go: its own ``sub-*/[ses-*/]anat`` folder in ``output_dir``."""
    names = entities(source)
    folder = output_dir / f"sub-{names['sub']}"
    if "ses" in names:
        folder = folder / f"ses-{names['ses']}"
    return folder / "anat"


def derivative_path(output_dir: Path, source: Path, name: str) -> Path:
    """``output_dir/sub-*/[ses-*/]anat/<source entities>_<name>``."""
    return source_folder(output_dir, source) / f"{source_prefix(source)}_{name}"


def participant_path(output_dir: Path, participant: str, name: str) -> Path:
    """``output_dir/sub-<participant>/anat/sub-<participant>_<name>`` (participant-wide files)."""
    return output_dir / f"sub-{participant}" / "anat" / f"sub-{participant}_{name}"


def crash_folder(output_dir: Path, run_id: str, participant: str | None = None) -> Path:
    """Where a run's crash files go, as fMRIPrep's: ``sub-<participant>/log/<run_id>/`` for a participant,
    ``logs/<run_id>/`` for the group level. A run's own folder: later runs leave it alone."""
    return output_dir / f"sub-{participant}" / "log" / run_id if participant else output_dir / "logs" / run_id


def remove_stale_staging(output_dir: Path, participant: str | None = None) -> list[Path]:
    """Clear what a killed run left in what this run writes: a participant's folder and report, or the
    group level's template folder and report (runs of other participants may be writing beside them).
    Temporary files (:func:`rwcflow.io.remove_stale_temporaries`) and staging folders
    (:func:`publish_together`) are removed; a folder set aside just before its replacement was moved in is
    put back."""
    own = f"sub-{participant}" if participant else f"tpl-{UNBIASED}"
    report = f"{own}.html" if participant else "group.html"
    stale = remove_stale_temporaries(output_dir / own) if (output_dir / own).is_dir() else []
    for path in output_dir.glob(f".{report}.*"):
        if is_temporary(path):
            path.unlink(missing_ok=True)
            stale.append(path)
    for path in sorted(output_dir.glob(f".{own}.*.old")) + sorted(output_dir.glob(f".{own}.*.staging")):
        if path.suffix == ".old" and not (output_dir / own).exists():
            os.rename(path, output_dir / own)
        else:
            shutil.rmtree(path, ignore_errors=True)
        stale.append(path)
    return stale


def write_crash_files(folder: Path, failures: list[JobFailure]) -> list[Path]:
    """Each failed job's traceback as ``folder/crash-<job>.txt``, headed by the job, its task and its error."""
    paths = []
    for failure in failures:
        name = "".join(c if c.isalnum() or c in "-_" else "-" for c in failure.job).strip("-")
        text = (f"Job: {failure.job}\nTask: {failure.task}\nError: {failure.error_type}: {failure.message}\n\n"
                f"{failure.traceback.rstrip()}\n")
        paths.append(write_text(folder / f"crash-{name}.txt", text))
    return paths


def template_path(output_dir: Path, template: str, name: str = "T1w.nii.gz") -> Path:
    """``output_dir/tpl-<template>/tpl-<template>_<name>``."""
    return output_dir / f"tpl-{template}" / f"tpl-{template}_{name}"


def bids_uri(path: Path, root: Path, dataset: str) -> str:
    """``bids:<dataset>:<relative path>`` for a file of ``root`` (BIDS URIs of sidecars' ``Sources``)."""
    return f"bids:{dataset}:{Path(os.path.relpath(path, root)).as_posix()}"


def write_text(path: Path, text: str) -> Path:
    """``text`` into ``path``, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, content: dict) -> Path:
    """``content`` as indented JSON, atomically."""
    return write_text(path, json.dumps(content, indent=2) + "\n")


def copy_output(produced: Path, path: Path, sidecar: dict | None = None) -> Path:
    """Copy a workflow output into the derivatives atomically, with a JSON sidecar beside it if given."""
    atomic_write(path, lambda tmp: shutil.copyfile(produced, tmp))
    if sidecar is not None:
        write_json(path.parent / (path.name.split(".")[0] + ".json"), sidecar)
    return path


def publish_together(output_dir: Path, folder: str, files: list[tuple[Path, Path, dict | None]]) -> None:
    """Copy ``files`` (each: a produced file, its derivative path under ``output_dir/folder``, its sidecar
    or ``None``) so that they appear together. They are written into a staging copy of the folder beside
    it, which replaces the folder in one rename; files of the old folder not in the set (another level's
    outputs, crash files, figures) are carried over, as hard links. A run killed before the rename leaves
    the old folder as it was; one killed between the two renames (the old folder set aside, the new one
    not yet in place) has its old folder put back by the next run (:func:`remove_stale_staging`)."""
    token = secrets.token_hex(6)
    final = output_dir / folder
    staging, retired = output_dir / f".{folder}.{token}.staging", output_dir / f".{folder}.{token}.old"
    try:
        for produced, path, sidecar in files:
            copy_output(produced, staging / path.relative_to(final), sidecar)
        for old in final.rglob("*") if final.is_dir() else []:
            new = staging / old.relative_to(final)
            if old.is_file() and not new.exists():
                new.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(old, new)
                except OSError:  # a file system without hard links
                    shutil.copy2(old, new)
        if final.is_dir():
            os.rename(final, retired)
        try:
            os.rename(staging, final)
        except BaseException:
            if retired.is_dir():
                os.rename(retired, final)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(retired, ignore_errors=True)


def dataset_description(output_dir: Path, bids_dir: Path) -> Path:
    """``dataset_description.json`` of the derivatives: ``DatasetType: derivative``, ``GeneratedBy``
    (with the container only when run inside one, :func:`container`), the source dataset by the DOI
    and version its own description gives (``SourceDatasets``, left out without them) and its folder
    as ``DatasetLinks.raw`` (the ``bids:raw:`` of the sidecars' ``Sources``)."""
    generated_by = {"Name": "rwcflow", "Version": __version__,
                    "Description": "RWCNet deformable registration: longitudinal and group templates",
                    "CodeURL": "https://github.com/rwcflow/rwcflow"}
    if (running_in := container()) is not None:
        generated_by["Container"] = running_in
    source = json.loads((bids_dir / "dataset_description.json").read_text())
    identity = {key: source[field] for key, field in (("DOI", "DatasetDOI"), ("Version", "DatasetVersion"))
                if isinstance(source.get(field), str) and source[field]}
    return write_json(output_dir / "dataset_description.json", {
        "Name": f"rwcflow derivatives of {source.get('Name', bids_dir.name)}",
        "BIDSVersion": source.get("BIDSVersion", "1.9.0"),
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
        **({"SourceDatasets": [identity]} if "DOI" in identity else {}),
        "DatasetLinks": {"raw": bids_dir.resolve().as_uri()},
        "HowToAcknowledge": "Cite rwcflow and the works listed in logs/CITATION.md (written for this run's options).",
    })


def container() -> dict | None:
    """``GeneratedBy.Container`` when this process runs inside an Apptainer or Singularity image: the
    runtimes set ``APPTAINER_CONTAINER``/``SINGULARITY_CONTAINER`` to the image inside it (and nowhere
    else). Files such as ``/.dockerenv`` are not evidence: machines that are no container have them, and
    rwcflow ships no Docker image."""
    for kind in ("apptainer", "singularity"):
        image = os.environ.get(f"{kind.upper()}_CONTAINER")
        if image:
            return {"Type": kind, "Tag": __version__, "URI": image}
    return None

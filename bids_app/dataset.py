"""The input BIDS dataset: checks, validation, and which T1w images each participant contributes.

Every problem is an :class:`~rwcflow.errors.InputError` naming the file or folder, so the command line
reports it in one line. The dataset is only ever read.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from rwcflow.errors import InputError
from rwcflow.io import load_image

log = logging.getLogger("rwcflow")

DEFAULT_FILTERS = {"t1w": {"datatype": "anat", "extension": [".nii", ".nii.gz"]}}
"""The query for the structural images (their suffix is ``--modality``), overridden entity by entity by a
``--bids-filter-file``."""


@dataclass
class Participant:
    """One participant's structural images (one per session, or per run), in session order."""

    label: str
    images: list[Path] = field(default_factory=list)

    @property
    def sessions(self) -> list[str | None]:
        return [entities(image).get("ses") for image in self.images]


def entities(path: Path) -> dict[str, str]:
    """BIDS entities of a file name (``sub-01_ses-1_T1w.nii.gz`` -> ``{"sub": "01", "ses": "1"}``)."""
    name = Path(path).name.split(".")[0]
    return dict(part.split("-", 1) for part in name.split("_") if "-" in part)


def source_prefix(path: Path) -> str:
    """The entities part of a BIDS file name, its suffix dropped: ``sub-01_ses-1_run-2``."""
    return "_".join(part for part in Path(path).name.split(".")[0].split("_") if "-" in part)


def strip_prefix(labels: list[str] | None, prefix: str) -> list[str] | None:
    """``["sub-01", "02"]`` -> ``["01", "02"]`` (labels may be given with or without their prefix)."""
    return None if labels is None else [label[len(prefix):] if label.startswith(prefix) else label for label in labels]


def check_dataset(bids_dir: Path) -> None:
    """A BIDS raw dataset folder: it exists and holds a readable ``dataset_description.json``."""
    if not bids_dir.is_dir():
        raise InputError(bids_dir, "not a folder (expected a BIDS dataset)")
    description = bids_dir / "dataset_description.json"
    if not description.is_file():
        raise InputError(bids_dir, "missing dataset_description.json: not a BIDS dataset")
    try:
        content = json.loads(description.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(description, f"not valid JSON ({exc})") from None
    if not isinstance(content, dict) or "Name" not in content or "BIDSVersion" not in content:
        raise InputError(description, "must hold at least 'Name' and 'BIDSVersion'")


def check_output_location(bids_dir: Path, folder: Path, what: str) -> None:
    """Refuse an output or work folder inside the input dataset (nothing is ever written there)."""
    bids_dir, folder = bids_dir.resolve(), folder.resolve()
    if folder == bids_dir or bids_dir in folder.parents:
        raise InputError(folder, f"the {what} is inside the input dataset {bids_dir}; choose a folder outside it")


def validate(bids_dir: Path) -> None:
    """Run the BIDS validator: ``bids-validator-deno`` (or the legacy ``bids-validator``) when installed,
    else the file-name checks of the ``bids_validator`` Python package that pybids brings (with a notice
    that the full validator is not installed). A dataset that fails is an error naming what is wrong."""
    for command in ("bids-validator-deno", "bids-validator"):
        executable = shutil.which(command)
        if executable is None:
            continue
        result = subprocess.run([executable, str(bids_dir)], capture_output=True, text=True)
        if result.returncode != 0:
            lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
            detail = lines[-1] if lines else f"exit code {result.returncode}"
            raise InputError(bids_dir, f"fails BIDS validation ({command}: {detail}); "
                                       "fix it or pass --skip-bids-validation")
        return
    from bids_validator import BIDSValidator

    log.warning("the BIDS validator (bids-validator-deno) is not installed: checking file names only")
    validator = BIDSValidator()
    invalid = [path for path in sorted(bids_dir.rglob("*")) if path.is_file() and not path.name.startswith(".")
               and not validator.is_bids("/" + path.relative_to(bids_dir).as_posix())]
    if invalid:
        shown = ", ".join(str(path.relative_to(bids_dir)) for path in invalid[:3])
        more = f" and {len(invalid) - 3} more" if len(invalid) > 3 else ""
        raise InputError(bids_dir, f"fails BIDS validation: file names not in BIDS: {shown}{more}; "
                                   "fix them or pass --skip-bids-validation")


def read_filters(path: Path | None) -> dict:
    """The ``--bids-filter-file`` (fMRIPrep's format: ``{"t1w": {entity: value, ...}}``) over the defaults."""
    filters = {key: dict(value) for key, value in DEFAULT_FILTERS.items()}
    if path is None:
        return filters
    try:
        given = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (OSError, ValueError) as exc:
        raise InputError(path, f"not valid JSON ({exc})") from None
    if not isinstance(given, dict) or not all(isinstance(value, dict) for value in given.values()):
        raise InputError(path, 'expected {"t1w": {"entity": value, ...}}')
    unknown = set(given) - set(filters)
    if unknown:
        raise InputError(path, f"unknown image kind(s) {sorted(unknown)}; known: {sorted(filters)}")
    for key, value in given.items():
        filters[key].update(value)
    return filters


def find_participants(bids_dir: Path, *, participants: list[str] | None = None, sessions: list[str] | None = None,
                      modality: str = "T1w", filters: dict | None = None) -> list[Participant]:
    """The selected participants and their structural images (pybids query), in label order.

    Unknown participant or session labels are errors; a selected participant without a matching image
    is kept with no images (the caller reports it as failed, the others go on).
    """
    from bids import BIDSLayout  # indexing is slow to import; only the levels need it

    layout = BIDSLayout(str(bids_dir), validate=False, derivatives=False)
    known = sorted(layout.get_subjects())
    if not known:
        raise InputError(bids_dir, "no participants (sub-*) found")
    wanted = strip_prefix(participants, "sub-") or known
    missing = sorted(set(wanted) - set(known))
    if missing:
        raise InputError(bids_dir, f"participant(s) {', '.join(missing)} not found; the dataset has {', '.join(known)}")
    session_labels = strip_prefix(sessions, "ses-")
    if session_labels:
        missing = sorted(set(session_labels) - set(layout.get_sessions()))
        if missing:
            raise InputError(bids_dir, f"session(s) {', '.join(missing)} not found; the dataset has "
                                       f"{', '.join(sorted(layout.get_sessions())) or 'no sessions'}")
    query = {"suffix": modality, **(filters or DEFAULT_FILTERS)["t1w"]}
    if session_labels:
        query["session"] = session_labels
    selected = []
    for label in wanted:
        files = layout.get(subject=label, return_type="filename", **query)
        selected.append(Participant(label, sorted(Path(path) for path in files)))
    if not any(participant.images for participant in selected):
        raise InputError(bids_dir, f"no {query['suffix']} images found for the selected participants")
    return selected


def check_images(participants: list[Participant]) -> None:
    """Every selected structural image reads as one 3-D volume of finite values, not all zero
    (:func:`rwcflow.io.load_image`): an unreadable one is bad input, refused before any work."""
    for participant in participants:
        for image in participant.images:
            load_image(image)

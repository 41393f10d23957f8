"""A benchmark case: a fixed and a moving image and what is known about how they correspond.

A case is stored as ``case.json`` beside its files (paths relative to that folder, or absolute for
files elsewhere, such as a Learn2Reg dataset). What is known decides the metrics (DESIGN.md §5):
label maps give Dice and HD95, a true transform gives the endpoint error inside ``mask`` (default:
the fixed labels > 0), keypoints give the TRE. The true transform is an ITK displacement field on
the fixed grid holding the fixed→moving mapping, as rwcflow writes them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

_PATHS = ("fixed", "moving", "fixed_labels", "moving_labels", "mask", "true_xfm", "fixed_keypoints", "moving_keypoints")
KEYPOINT_UNITS = ("mm", "voxel")


@dataclass
class Case:
    """One image pair. ``group`` gathers cases summarised together (e.g. the seeds of one setting).

    Keypoints are CSV files of ``x,y,z`` rows, in RAS world mm (``keypoint_units="mm"``) or in voxel
    indices of their own image (``"voxel"``, Learn2Reg's convention); row ``i`` of the fixed and the
    moving file correspond.
    """

    name: str
    group: str
    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    mask: Path | None = None
    true_xfm: Path | None = None
    fixed_keypoints: Path | None = None
    moving_keypoints: Path | None = None
    keypoint_units: str = "mm"
    description: str = ""

    def __post_init__(self) -> None:
        for key in _PATHS:
            value = getattr(self, key)
            if value is not None:
                setattr(self, key, Path(value))
        if self.keypoint_units not in KEYPOINT_UNITS:
            raise ValueError(f"keypoint_units must be one of {KEYPOINT_UNITS}, got {self.keypoint_units!r}")
        if (self.fixed_keypoints is None) != (self.moving_keypoints is None):
            raise ValueError(f"case {self.name}: keypoints must be given for both images or neither")

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``case.json`` at ``path``; files inside its folder are stored relative to it."""
        path = Path(path)
        record = asdict(self)
        for key in _PATHS:
            value = getattr(self, key)
            if value is not None:
                value = value.resolve()
                folder = path.parent.resolve()
                record[key] = str(value.relative_to(folder)) if value.is_relative_to(folder) else str(value)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        return path

    def digest(self) -> str:
        """SHA-256 of the images and of what is known about them: a record of a run on this case stays
        valid only while it is unchanged (a rebuilt case with new data gets a new digest)."""
        digest = hashlib.sha256()
        for key in _PATHS:
            value = getattr(self, key)
            digest.update(key.encode() + (value.read_bytes() if value is not None else b"-"))
        return digest.hexdigest()

    @classmethod
    def load(cls, path: str | os.PathLike) -> Case:
        """Read a ``case.json`` written by :meth:`save`."""
        path = Path(path)
        record = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        record = {key: value for key, value in record.items() if key in known}
        for key in _PATHS:
            if record.get(key) is not None:
                record[key] = path.parent / record[key]
        return cls(**record)

"""Cases from a Learn2Reg ``dataset.json`` (OASIS, NLST, ThoraxCBCT, ...), read where the data lies.

The file lists image pairs (``registration_val``, ``registration_test`` or ``training_paired_images``:
entries ``{"fixed": ..., "moving": ...}``) and, per image (in ``training``/``test``), its ``label``,
``mask`` and keypoint files (``keypoints``, ``keypoints01``, ...). Paths are relative to the
dataset.json's folder. Keypoint CSVs hold voxel indices of their image; some releases list them with
a ``.nii.gz`` name for a ``.csv`` file, which is accepted. Labels of both images give Dice/HD95, a
keypoint key present for both images gives the TRE (the first such key, in name order).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from benchmarks.cases import Case

SPLITS = ("registration_val", "registration_test", "training_paired_images", "test_paired_images")


def _key(path: str) -> str:
    return os.path.normpath(path)


def _stem(path: str) -> str:
    return Path(path).name.split(".")[0]


def _resolve(root: Path, path: str | None, *, keypoints: bool = False) -> Path | None:
    """``path`` under ``root``; a listed keypoint file may exist as ``.csv`` only; None if absent."""
    if not path:
        return None
    full = root / path
    if full.exists():
        return full
    if keypoints and full.name.endswith(".nii.gz"):
        csv = full.with_name(full.name[: -len(".nii.gz")] + ".csv")
        if csv.exists():
            return csv
    return None


def learn2reg_cases(dataset_json: str | os.PathLike, split: str = "registration_val",
                    limit: int | None = None) -> list[Case]:
    """The pairs of ``split`` in a Learn2Reg ``dataset_json`` as cases (at most ``limit``)."""
    dataset_json = Path(dataset_json)
    if split not in SPLITS:
        raise ValueError(f"unknown Learn2Reg split {split!r}; expected one of {SPLITS}")
    try:
        description = json.loads(dataset_json.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{dataset_json}: not a readable Learn2Reg dataset.json ({exc})") from None
    root = dataset_json.parent
    dataset = description.get("name") or dataset_json.parent.name
    entries = {_key(e["image"]): e for part in ("training", "test") for e in description.get(part, []) if "image" in e}
    pairs = description.get(split) or []
    if not pairs:
        raise ValueError(f"{dataset_json}: no pairs in {split!r}")
    cases = []
    for pair in pairs[:limit]:
        fixed_entry, moving_entry = entries.get(_key(pair["fixed"]), {}), entries.get(_key(pair["moving"]), {})
        fixed, moving = _resolve(root, pair["fixed"]), _resolve(root, pair["moving"])
        if fixed is None or moving is None:
            raise ValueError(f"{dataset_json}: image of pair {pair} not found under {root}")
        labels = [_resolve(root, e.get("label")) for e in (fixed_entry, moving_entry)]
        if None in labels:
            labels = [None, None]
        keypoints = [None, None]
        for name in sorted(set(fixed_entry) & set(moving_entry)):
            if name.startswith("keypoints"):
                found = [_resolve(root, e[name], keypoints=True) for e in (fixed_entry, moving_entry)]
                if None not in found:
                    keypoints = found
                    break
        cases.append(Case(
            name=f"{dataset}-{_stem(pair['fixed'])}-{_stem(pair['moving'])}",
            group=f"{dataset}-{split}",
            fixed=fixed, moving=moving, fixed_labels=labels[0], moving_labels=labels[1],
            mask=_resolve(root, fixed_entry.get("mask")),
            fixed_keypoints=keypoints[0], moving_keypoints=keypoints[1], keypoint_units="voxel",
            description=f"Learn2Reg {dataset} {split}",
        ))
    return cases

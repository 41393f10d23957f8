"""``--template``: a group template given as a file, a built-in standard space, or ``unbiased`` (built
from the data by the group level).

Built-in: ``MNI152NLin2009aSym`` (the ICBM 2009a nonlinear symmetric T1 template shipped with nilearn,
so nothing is downloaded), with fMRIPrep-style modifiers ``:res-1`` (1 mm, the default) or ``:res-2``
and ``:desc-brain`` (masked to the brain, for skull-stripped inputs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rwcflow.errors import InputError
from rwcflow.io import Image, load_image, save_image

UNBIASED = "unbiased"
BUILTIN = "MNI152NLin2009aSym"


@dataclass(frozen=True)
class TemplateChoice:
    """The group template: its name in derivative file names (``to-<name>``, ``space-<name>``) and its
    image (``None`` for ``unbiased``, which the group level builds)."""

    name: str
    path: Path | None


def resolve_template(spec: str, work_dir: Path) -> TemplateChoice:
    """The template ``spec`` names; built-in ones are written (once) into ``work_dir``."""
    if spec == UNBIASED:
        return TemplateChoice(UNBIASED, None)
    if spec.split(":")[0] == BUILTIN:
        return _builtin(spec, work_dir)
    path = Path(spec)
    if not path.exists():
        raise InputError(path, f"template not found (expected a file, {BUILTIN}[:res-2][:desc-brain] or {UNBIASED})")
    load_image(path)  # readable, one volume
    match = re.search(r"tpl-([A-Za-z0-9]+)", path.name)
    name = match.group(1) if match else re.sub(r"[^A-Za-z0-9]", "", path.name.split(".")[0]) or "custom"
    return TemplateChoice(name, path)


def _builtin(spec: str, work_dir: Path) -> TemplateChoice:
    from nilearn import datasets

    modifiers = spec.split(":")[1:]
    unknown = [m for m in modifiers if m not in ("res-1", "res-2", "desc-brain")]
    if unknown:
        raise InputError(spec, f"unknown template modifier(s) {unknown}; use :res-1, :res-2, :desc-brain")
    resolution = 2 if "res-2" in modifiers else 1
    brain = "desc-brain" in modifiers
    path = work_dir / "templates" / f"tpl-{BUILTIN}_res-{resolution}{'_desc-brain' if brain else ''}_T1w.nii.gz"
    if not path.exists():
        template = datasets.load_mni152_template(resolution=resolution)
        data = template.get_fdata(dtype=np.float32)
        if brain:
            data = data * (datasets.load_mni152_brain_mask(resolution=resolution).get_fdata() > 0)
        save_image(Image(data.astype(np.float32), template.affine), path)
    return TemplateChoice(BUILTIN, path)

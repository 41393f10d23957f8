"""The demo's check of its own result: ``rwcflow-demo-check BIDS_DIR DERIVATIVES_DIR [--json FILE]``.

The demo dataset (:mod:`rwcflow.bids_app.demo`) carries its truth in ``sourcedata/truth/``: per
participant a sphere (centre in each session's world coordinates, radius) whose tissue loses a known
fraction of its volume from session 1 to each later session, and no change anywhere else. After the
participant level, this compares what the derivatives say with it, per participant and later session:

* **recovered change**: the region is the sphere of session 1 carried into the within-subject template
  through the written template->session-1 transform (``from-orig_to-T1w``: template voxels ``p`` whose
  mapped point ``p + d_1(p)`` lies within the radius of the centre, less one template voxel), and its
  volume in each session is the sum of that session's Jacobian map (``space-T1w_jacobian``) over it; the
  recovered change is ``sum J_k / sum J_1 - 1``, to be within ``--tolerance`` percentage points of the
  truth. The tissue loses the same fraction everywhere in the sphere, so its core has the sphere's true
  change; the voxel left out at its surface is where a finite-difference Jacobian mixes in the fading
  change around it (with the true mapping itself: -4.84 % for -5 % over the whole sphere at 3 mm, -4.99 %
  over its core);
* **far field**: the mean ``|log J_k - log J_1|`` over the template's brain voxels mapped farther than
  twice the radius (where the simulated change fades to nothing) plus two template voxels from the
  centre, where the truth is 0, to be below ``--far-limit``.

After the group level, the group template (``tpl-unbiased``) against the truth too. The participants'
brains are the template brain ``T`` deformed by known maps ``psi_i`` (template point to session-1 point),
so their true mean shape is ``T`` seen through the mean map, ``T(mean_i psi_i)^-1``, which is also where
the group template's shape update stops (the mean of the template->participant maps is then the
identity). Its **error** is ``1 - r``, ``r`` the correlation of the intensities over the true mean
shape's brain once that shape is rigidly aligned onto the image (shape, not position, is what the truth
fixes: the within-subject templates lie in each participant's own midspace). The group template's error
must be at most ``--template-ratio`` times the plain average's: the group level's starting point
(``desc-iteration0``, the participants' images affinely aligned to the first and averaged).

It prints the tables, writes them as JSON (default ``DERIVATIVES_DIR/demo_validation.json``, atomically)
and exits 0 when every row passes, 1 when one does not, 2 on bad input (no truth, missing derivatives).
Without a group template (the group level not run) only the participants are checked.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rwcflow import __version__, maps, transforms
from rwcflow.affine import affine_align
from rwcflow.errors import InputError, RwcflowError
from rwcflow.io import Image, atomic_write, load_image, read_nibabel, resample
from rwcflow.maps import foreground_mask
from rwcflow.metrics import image_correlation

from . import derivatives as names
from .spaces import UNBIASED

PROG = "rwcflow-demo-check"
TOLERANCE_PP = 0.5
"""Largest accepted |recovered - true| volume change, in percentage points."""
FAR_LIMIT = 0.005
"""Largest accepted far-field mean |log J_k - log J_1|."""
CORE_MARGIN_VOXELS = 1.0
"""Template voxels in from the sphere's surface to its core, the region measured."""
FAR_MARGIN_VOXELS = 2.0
"""Template voxels beyond twice the radius before the far field starts (the fade's edge, interpolated)."""
TEMPLATE_RATIO = 0.5
"""Largest accepted group template error, as a fraction of the plain average's."""


@dataclass(frozen=True)
class ChangeRow:
    """One participant's later session against session 1."""

    participant: str
    session: str
    true_change_percent: float
    recovered_change_percent: float
    region_voxels: int
    far_field_mean_abs_log_change: float
    far_voxels: int
    tolerance_pp: float
    far_limit: float

    @property
    def error_pp(self) -> float:
        return self.recovered_change_percent - self.true_change_percent

    @property
    def passed(self) -> bool:
        return abs(self.error_pp) <= self.tolerance_pp and self.far_field_mean_abs_log_change < self.far_limit


def participant_rows(bids_dir: Path, derivatives_dir: Path, truth: dict, *, tolerance_pp: float = TOLERANCE_PP,
                     far_limit: float = FAR_LIMIT) -> list[ChangeRow]:
    """The rows of one participant (its truth file's contents ``truth``), one per later session."""
    label = truth["participant_id"]
    raw = {session: bids_dir / label / session / "anat" / f"{label}_{session}_T1w.nii.gz"
           for session in truth["atrophy"]["sessions"]}
    space = names.SUBJECT_SPACE
    template = load_image(names.participant_path(derivatives_dir, label.removeprefix("sub-"),
                                                 "desc-template_T1w.nii.gz"))
    displacement, grid = transforms.read_displacement_field(
        names.derivative_path(derivatives_dir, raw["ses-1"], f"from-orig_to-{space}_mode-image_xfm.nii.gz"))
    if grid != template.grid:
        raise InputError(derivatives_dir / label, "the session-1 transform is not on the template's grid")
    jacobians = {session: read_nibabel(names.derivative_path(derivatives_dir, path, f"space-{space}_jacobian.nii.gz"))[1]
                 for session, path in raw.items()}
    return change_rows(truth, template, displacement, jacobians, tolerance_pp=tolerance_pp, far_limit=far_limit)


def change_rows(truth: dict, template: Image, first_displacement: np.ndarray, jacobians: dict[str, np.ndarray], *,
                tolerance_pp: float = TOLERANCE_PP, far_limit: float = FAR_LIMIT) -> list[ChangeRow]:
    """One participant's rows from its within-subject ``template``, session 1's template->session map
    (``first_displacement``, RAS mm on the template's grid) and every session's Jacobian map on that grid
    (``jacobians``, by session name): the measure of the module docstring."""
    label, sessions = truth["participant_id"], truth["atrophy"]["sessions"]
    radius = float(truth["atrophy"]["radius_mm"])
    grid = template.grid
    mapped = grid.world_points() + first_displacement  # each template voxel's point in session 1 (RAS mm)
    distance = np.linalg.norm(mapped - np.asarray(sessions["ses-1"]["centre_mm"]), axis=-1)
    voxel_mm = float(np.mean(grid.spacing))
    region = distance < radius - CORE_MARGIN_VOXELS * voxel_mm
    far = (distance > 2 * radius + FAR_MARGIN_VOXELS * voxel_mm) & foreground_mask(template)
    before = np.asarray(jacobians["ses-1"], dtype=np.float64)
    rows = []
    for session, entry in sessions.items():
        if session == "ses-1":
            continue
        after = np.asarray(jacobians[session], dtype=np.float64)
        recovered = 100.0 * (after[region].sum() / before[region].sum() - 1.0)
        log_change = np.log(np.maximum(after[far], 1e-6)) - np.log(np.maximum(before[far], 1e-6))
        rows.append(ChangeRow(label, session, float(entry["volume_change_percent"]), round(float(recovered), 4),
                              int(region.sum()), round(float(np.abs(log_change).mean()), 6), int(far.sum()),
                              tolerance_pp, far_limit))
    return rows


@dataclass(frozen=True)
class TemplateRow:
    """The group template and the plain average against the participants' true mean shape."""

    participants: tuple[str, ...]
    template_error: float
    average_error: float
    ratio_limit: float

    @property
    def ratio(self) -> float:
        return self.template_error / self.average_error if self.average_error > 0 else float("inf")

    @property
    def passed(self) -> bool:
        return self.ratio <= self.ratio_limit


def true_mean_shape(truth_dir: Path, truths: Sequence[dict]) -> Image:
    """The template brain seen through the mean of the participants' (``truths``) template->session-1
    maps, on the template's grid: ``T(psi^-1(x))`` with ``psi(p) = p + mean_i d_i(p)``."""
    template = load_image(truth_dir / truths[0]["participant_id"] / truths[0]["anatomy"]["template"])
    fields = [transforms.read_displacement_field(truth_dir / truth["participant_id"] / truth["anatomy"]["xfm"])
              for truth in truths]
    mean, grid = maps.average_displacements(fields)
    return transforms.apply_displacement(template, maps.invert_displacement(mean, grid), grid)


def shape_error(image: Image, shape: Image) -> float:
    """``1 - r`` of ``image`` and ``shape`` rigidly aligned onto it, over ``shape``'s brain."""
    aligned = resample(shape, image.grid, world_matrix=affine_align(image, shape, rigid_only=True))
    return 1.0 - image_correlation(aligned.data, image.data, foreground_mask(aligned))


def template_row(bids_dir: Path, derivatives_dir: Path, *, ratio_limit: float = TEMPLATE_RATIO) -> TemplateRow | None:
    """The group template's row (see the module docstring), ``None`` when no group template was built."""
    path = names.template_path(derivatives_dir, UNBIASED)
    if not path.exists():
        return None
    sidecar = path.with_name(path.name.removesuffix(".nii.gz") + ".json")
    try:
        sources = json.loads(sidecar.read_text())["Sources"]
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(sidecar, f"cannot read the group template's sources ({exc})") from exc
    labels = sorted({part for source in sources for part in Path(source.split(":", 2)[-1]).parts
                     if re.fullmatch(r"sub-[A-Za-z0-9]+", part)})
    truth_dir = bids_dir / "sourcedata" / "truth"
    truths = []
    for label in labels:
        truth_file = truth_dir / label / f"{label}_truth.json"
        if not truth_file.exists():
            raise InputError(truth_file, "no truth for a participant of the group template")
        truths.append(json.loads(truth_file.read_text()))
    shape = true_mean_shape(truth_dir, truths)
    average = load_image(names.template_path(derivatives_dir, UNBIASED, "desc-iteration0_T1w.nii.gz"))
    return TemplateRow(tuple(labels), round(shape_error(load_image(path), shape), 6),
                       round(shape_error(average, shape), 6), ratio_limit)


def check_demo(bids_dir: Path, derivatives_dir: Path, *, tolerance_pp: float = TOLERANCE_PP,
               far_limit: float = FAR_LIMIT) -> list[ChangeRow]:
    """Every participant of the demo dataset ``bids_dir`` with two or more sessions, against its truth."""
    truth_dir = bids_dir / "sourcedata" / "truth"
    files = sorted(truth_dir.glob("sub-*/sub-*_truth.json"))
    if not files:
        raise InputError(truth_dir, "no truth files (sub-*/sub-*_truth.json): not a dataset of rwcflow-demo-data")
    rows = []
    for path in files:
        truth = json.loads(path.read_text())
        if len(truth["atrophy"]["sessions"]) > 1:
            rows += participant_rows(bids_dir, derivatives_dir, truth, tolerance_pp=tolerance_pp, far_limit=far_limit)
    return rows


def table(rows: Sequence[ChangeRow]) -> str:
    """The rows as a Markdown table."""
    lines = ["| participant | session | true change | recovered change | error | far-field mean abs "
             "Δ log J | result |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.participant} | {row.session} | {row.true_change_percent:.2f} % "
                     f"| {row.recovered_change_percent:.2f} % | {row.error_pp:+.2f} pp "
                     f"| {row.far_field_mean_abs_log_change:.4f} | {'pass' if row.passed else 'FAIL'} |")
    return "\n".join(lines)


def template_table(row: TemplateRow) -> str:
    """The group template's row as a Markdown table."""
    return "\n".join([
        "| group template of | its error (1 - r with the true mean shape) | plain average's error | ratio | result |",
        "|---|---|---|---|---|",
        f"| {', '.join(row.participants)} | {row.template_error:.4f} | {row.average_error:.4f} | {row.ratio:.2f} "
        f"| {'pass' if row.passed else 'FAIL'} |"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("bids_dir", type=Path, help="the demo dataset (rwcflow-demo-data)")
    parser.add_argument("derivatives_dir", type=Path, help="rwcflow's output folder for it")
    parser.add_argument("--json", type=Path, help="where to write the table (default: DERIVATIVES_DIR/demo_validation.json)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE_PP,
                        help=f"largest accepted |recovered - true| change in percentage points (default {TOLERANCE_PP})")
    parser.add_argument("--far-limit", type=float, default=FAR_LIMIT,
                        help=f"largest accepted far-field mean |Δ log J| (default {FAR_LIMIT})")
    parser.add_argument("--template-ratio", type=float, default=TEMPLATE_RATIO,
                        help=f"largest accepted group template error over the plain average's (default {TEMPLATE_RATIO})")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)
    try:
        rows = check_demo(args.bids_dir, args.derivatives_dir, tolerance_pp=args.tolerance, far_limit=args.far_limit)
        group = template_row(args.bids_dir, args.derivatives_dir, ratio_limit=args.template_ratio)
    except RwcflowError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    passed = all(row.passed for row in rows) and (group is None or group.passed)
    report = {"passed": passed, "tolerance_pp": args.tolerance, "far_limit": args.far_limit,
              "rows": [{**asdict(row), "error_pp": round(row.error_pp, 4), "passed": row.passed} for row in rows],
              "group_template": None if group is None else {**asdict(group), "ratio": round(group.ratio, 4),
                                                            "passed": group.passed}}
    out = args.json or args.derivatives_dir / "demo_validation.json"
    atomic_write(out, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
    print(table(rows))
    print(template_table(group) if group else "no group template (the group level has not run): not checked")
    print(f"{'every check passes' if passed else 'NOT every check passes'} (±{args.tolerance:g} pp, far field < "
          f"{args.far_limit:g}, template error at most {args.template_ratio:g} x the plain average's); written to {out}")
    return 0 if passed else 1

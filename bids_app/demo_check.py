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

It prints a table, writes it as JSON (default ``DERIVATIVES_DIR/demo_validation.json``, atomically) and
exits 0 when every row passes, 1 when one does not, 2 on bad input (no truth, missing derivatives).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rwcflow import __version__, transforms
from rwcflow.errors import InputError, RwcflowError
from rwcflow.io import atomic_write, load_image, read_nibabel
from rwcflow.maps import foreground_mask

from . import derivatives as names

PROG = "rwcflow-demo-check"
TOLERANCE_PP = 0.5
"""Largest accepted |recovered - true| volume change, in percentage points."""
FAR_LIMIT = 0.005
"""Largest accepted far-field mean |log J_k - log J_1|."""
CORE_MARGIN_VOXELS = 1.0
"""Template voxels in from the sphere's surface to its core, the region measured."""
FAR_MARGIN_VOXELS = 2.0
"""Template voxels beyond twice the radius before the far field starts (the fade's edge, interpolated)."""


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
    sessions = truth["atrophy"]["sessions"]
    radius = float(truth["atrophy"]["radius_mm"])
    raw = {session: bids_dir / label / session / "anat" / f"{label}_{session}_T1w.nii.gz" for session in sessions}
    space = names.SUBJECT_SPACE
    template = load_image(names.participant_path(derivatives_dir, label.removeprefix("sub-"),
                                                 "desc-template_T1w.nii.gz"))
    first = "ses-1"
    displacement, grid = transforms.read_displacement_field(
        names.derivative_path(derivatives_dir, raw[first], f"from-orig_to-{space}_mode-image_xfm.nii.gz"))
    if grid != template.grid:
        raise InputError(derivatives_dir / label, "the session-1 transform is not on the template's grid")
    mapped = grid.world_points() + displacement  # each template voxel's point in session 1 (RAS mm)
    distance = np.linalg.norm(mapped - np.asarray(sessions[first]["centre_mm"]), axis=-1)
    voxel_mm = float(np.mean(grid.spacing))
    region = distance < radius - CORE_MARGIN_VOXELS * voxel_mm
    far = (distance > 2 * radius + FAR_MARGIN_VOXELS * voxel_mm) & foreground_mask(template)

    def jacobian(session: str) -> np.ndarray:
        _, data = read_nibabel(names.derivative_path(derivatives_dir, raw[session], f"space-{space}_jacobian.nii.gz"))
        return data.astype(np.float64)

    before = jacobian(first)
    rows = []
    for session, entry in sessions.items():
        if session == first:
            continue
        after = jacobian(session)
        recovered = 100.0 * (after[region].sum() / before[region].sum() - 1.0)
        log_change = np.log(np.maximum(after[far], 1e-6)) - np.log(np.maximum(before[far], 1e-6))
        rows.append(ChangeRow(label, session, float(entry["volume_change_percent"]), round(float(recovered), 4),
                              int(region.sum()), round(float(np.abs(log_change).mean()), 6), int(far.sum()),
                              tolerance_pp, far_limit))
    return rows


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("bids_dir", type=Path, help="the demo dataset (rwcflow-demo-data)")
    parser.add_argument("derivatives_dir", type=Path, help="rwcflow's output folder for it")
    parser.add_argument("--json", type=Path, help="where to write the table (default: DERIVATIVES_DIR/demo_validation.json)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE_PP,
                        help=f"largest accepted |recovered - true| change in percentage points (default {TOLERANCE_PP})")
    parser.add_argument("--far-limit", type=float, default=FAR_LIMIT,
                        help=f"largest accepted far-field mean |Δ log J| (default {FAR_LIMIT})")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)
    try:
        rows = check_demo(args.bids_dir, args.derivatives_dir, tolerance_pp=args.tolerance, far_limit=args.far_limit)
    except RwcflowError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    passed = all(row.passed for row in rows)
    report = {"passed": passed, "tolerance_pp": args.tolerance, "far_limit": args.far_limit,
              "rows": [{**asdict(row), "error_pp": round(row.error_pp, 4), "passed": row.passed} for row in rows]}
    out = args.json or args.derivatives_dir / "demo_validation.json"
    atomic_write(out, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
    print(table(rows))
    print(f"{'every participant passes' if passed else 'NOT every participant passes'} "
          f"(±{args.tolerance:g} pp, far field < {args.far_limit:g}); written to {out}")
    return 0 if passed else 1

"""The App's participant level with default options on a varied longitudinal set with known atrophy.

Run from the repository root: ``python -m benchmarks.bench_longitudinal [--resolution MM ...] [--folder DIR]``.

Five participants that differ as real ones do (:data:`CASES`): three source brains available offline
(the MNI152 2009a brain from nilearn, FreeSurfer's fsaverage, the deepmriprep template; the last two need
the ``bench`` extra, see ``benchmarks/README.md``), each deformed by its own smooth field and moved
(:func:`rwcflow.bids_app.demo.make_participant`); an atrophy at a different site (by the brain's own
aseg labels where it has them, else MNI coordinates), of a different radius and amount; and between
the sessions a rigid repositioning and an intensity change (a gain and a linear bias field of up to
:data:`SESSION_INTENSITY`). Per resolution the set is written as a BIDS dataset with the demo's truth
files, ``rwcflow BIDS OUT participant`` runs on it with no option but the work folder, and
``rwcflow-demo-check``'s measure compares every participant with the truth: recovered volume change
within ±0.5 percentage points, far-field mean |Δ log J| under 0.005. Prints a table and writes
``benchmarks/results/longitudinal_cpu_<resolutions>.{json,md}`` (e.g. ``_1mm_2mm``).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.system import REPOSITORY, environment
from rwcflow.anatomy import available_anatomies, load_anatomy
from rwcflow.bids_app.demo import T1W_SIDECAR, make_participant
from rwcflow.bids_app.demo_check import ChangeRow, check_demo
from rwcflow.io import save_image

SESSION_INTENSITY = 0.1
"""A later session's gain within 1 ± this, times a linear bias field of 1 ± this across the grid."""
REPOSITIONING = (3.0, 3.0)
"""Largest rotation (degrees) and shift (mm) per axis of a later session against the first."""


@dataclass(frozen=True)
class Case:
    """One participant: its source ``brain`` (an anatomy name), the atrophy's ``site``, centred at an aseg
    ``label``'s centroid or at ``centre_mm`` (the brain's world coordinates), its radius and volume loss."""

    brain: str
    site: str
    radius_mm: float
    atrophy_percent: float
    seed: int
    label: int | None = None
    centre_mm: tuple[float, float, float] | None = None


CASES = (
    Case("mni152", "the left hippocampus", 12.0, 5.0, seed=11, centre_mm=(-26.0, -22.0, -14.0)),
    Case("fsaverage", "the right caudate", 10.0, 4.0, seed=12, label=50),
    Case("deepmriprep-ibsr", "the left thalamus", 14.0, 6.0, seed=13, label=10),
    Case("mni152", "the right putamen", 9.0, 3.0, seed=14, centre_mm=(26.0, 2.0, 0.0)),
    Case("fsaverage", "the left hippocampus", 12.0, 8.0, seed=15, label=17),
)


def site_centre(case: Case, resolution_mm: float) -> np.ndarray:
    """The atrophy's centre in the brain's world coordinates (RAS mm)."""
    if case.centre_mm is not None:
        return np.asarray(case.centre_mm, dtype=np.float64)
    labels = load_anatomy(case.brain, resolution_mm).labels
    voxels = np.argwhere(labels.data == case.label)
    if len(voxels) == 0:
        raise SystemExit(f"{case.brain}: no voxel of label {case.label} ({case.site})")
    return labels.grid.voxel_to_world(voxels.mean(axis=0))


def write_set(root: Path, cases: tuple[Case, ...], resolution_mm: float) -> Path:
    """The BIDS dataset of ``cases`` at ``resolution_mm`` in ``root`` (with the demo's truth files)."""
    for number, case in enumerate(cases, start=1):
        anatomy = load_anatomy(case.brain, resolution_mm)
        name = case.brain.replace("-", "")
        participant = make_participant(
            f"{number:02d}", resolution_mm=resolution_mm, atrophy_percent=case.atrophy_percent, seed=case.seed,
            brain=(anatomy.image, anatomy.labels), template=name, site=case.site,
            centre_mm=site_centre(case, resolution_mm), radius_mm=case.radius_mm, repositioning=REPOSITIONING,
            session_intensity=SESSION_INTENSITY)
        participant.write(root)
        save_image(participant.template, root / "sourcedata" / "truth" / f"tpl-{name}_desc-brain_T1w.nii.gz")
    (root / "dataset_description.json").write_text(json.dumps({
        "Name": "rwcflow benchmark: varied longitudinal set with known atrophy", "BIDSVersion": "1.9.0",
        "DatasetType": "raw", "GeneratedBy": [{"Name": "benchmarks.bench_longitudinal"}]}, indent=2))
    (root / "README").write_text(f"Written by benchmarks/bench_longitudinal.py at {resolution_mm:g} mm; "
                                 f"T1w sidecars: {json.dumps(T1W_SIDECAR)}\n")
    return root


def run_participant_level(root: Path, out: Path, work: Path) -> tuple[float, dict[str, float]]:
    """``rwcflow ROOT OUT participant -w WORK`` (default options); its wall time and each participant's."""
    app = Path(sys.executable).parent / "rwcflow"
    start = time.perf_counter()
    subprocess.run([str(app), str(root), str(out), "participant", "-w", str(work)], check=False)
    wall = time.perf_counter() - start
    log = sorted((out / "logs").glob("rwcflow-participant-*.log"))[-1]  # this run's (a resumed folder has more)
    times = {f"sub-{m[1]}": float(m[2]) for m in re.finditer(r"sub-(\w+) done in ([\d.]+) s", log.read_text())}
    return wall, times


def measure(folder: Path, resolution_mm: float, cases: tuple[Case, ...]) -> dict:
    """Write, run and check one resolution's set in ``folder/<resolution>mm``."""
    base = folder / f"{resolution_mm:g}mm"
    root, out = base / "bids", base / "derivatives"
    if not root.exists():
        write_set(root, cases, resolution_mm)
    wall, times = run_participant_level(root, out, base / "work")
    rows = check_demo(root, out)
    return {"resolution_mm": resolution_mm, "wall_s": round(wall, 1), "participant_s": times,
            "rows": [{**asdict(row), "error_pp": round(row.error_pp, 4), "passed": row.passed} for row in rows]}


def table(results: list[dict], cases: tuple[Case, ...]) -> str:
    lines = ["| resolution | participant | brain | site | radius | true change | recovered | error | far field "
             "mean abs Δ log J | time | result |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for case, row in zip(cases, result["rows"]):
            change = ChangeRow(**{k: v for k, v in row.items() if k not in ("error_pp", "passed")})
            lines.append(
                f"| {result['resolution_mm']:g} mm | {change.participant} | {case.brain} | {case.site} "
                f"| {case.radius_mm:g} mm | {change.true_change_percent:.2f} % | {change.recovered_change_percent:.2f} % "
                f"| {change.error_pp:+.2f} pp | {change.far_field_mean_abs_log_change:.4f} "
                f"| {result['participant_s'].get(change.participant, float('nan')):.0f} s "
                f"| {'pass' if change.passed else 'FAIL'} |")
    for result in results:
        passed = sum(row["passed"] for row in result["rows"])
        lines.append(f"\n{result['resolution_mm']:g} mm: {passed} of {len(result['rows'])} participants pass; "
                     f"participant level {result['wall_s']:.0f} s.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=float, nargs="+", default=[2.0], help="voxel sizes in mm (default 2)")
    parser.add_argument("--folder", type=Path, help="where to write and run (default: a new temporary folder; "
                                                     "an existing one resumes)")
    parser.add_argument("--out", type=Path, default=REPOSITORY / "benchmarks" / "results")
    args = parser.parse_args(argv)
    missing = sorted({case.brain for case in CASES} - set(available_anatomies()))
    if missing:
        print(f"bench_longitudinal: {', '.join(missing)} not installed (see benchmarks/README.md)", file=sys.stderr)
        return 2
    folder = args.folder or Path(tempfile.mkdtemp(prefix="rwcflow-longitudinal-"))
    results = [measure(folder, resolution, CASES) for resolution in args.resolution]
    text = table(results, CASES)
    print(text)
    report = {"command": "rwcflow BIDS OUT participant -w WORK (default options)", "folder": str(folder),
              "cases": [asdict(case) for case in CASES], "session_intensity": SESSION_INTENSITY,
              "repositioning": REPOSITIONING, "results": results, "environment": environment()}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "longitudinal_cpu_" + "_".join(f"{resolution:g}mm" for resolution in args.resolution)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(
        f"# The participant level's default path on a varied longitudinal set\n\n{report['environment']['processor']}, "
        f"{report['environment']['cpu_count']} CPUs, {report['environment']['date']}. "
        f"`python -m benchmarks.bench_longitudinal --resolution {' '.join(f'{r:g}' for r in args.resolution)}`\n\n"
        f"{text}\n")
    return 0 if all(row["passed"] for result in results for row in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The groupwise refinement's settings on the varied longitudinal set: recovered change against far field.

Run from the repository root: ``python -m benchmarks.bench_longitudinal_settings [--resolution MM] [--folder DIR]
[--participants sub-02 sub-03] [--setting JSON ...]``.

The participant level's default path misses its truth on :mod:`benchmarks.bench_longitudinal`'s set;
this measures where that comes from, without the App (:mod:`benchmarks.bench_refinement` does the same
on one brain): for every participant of that set (written into ``--folder``, or read from it when it is
there) the sessions' rigid midspace (:func:`rwcflow.midspace.rigid_midspace`, as the participant level),
then per setting
:func:`rwcflow.groupwise.refine_groupwise` with :class:`~rwcflow.groupwise.GroupwiseRefinement`'s fields
given as JSON (``'{}'``: the defaults; ``'{"smoothing_mm": 6, "control_spacing_mm": 4}'``: finer
corrections), and ``rwcflow-demo-check``'s measure on the refined maps (recovered against true volume
change, far-field mean |Δ log J|). Prints a table and writes
``benchmarks/results/longitudinal_settings_cpu_<resolution>mm.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_longitudinal import CASES, write_set
from benchmarks.system import REPOSITORY, environment
from rwcflow import maps, transforms
from rwcflow.bids_app.demo_check import change_rows
from rwcflow.groupwise import GroupwiseRefinement, refine_groupwise
from rwcflow.io import load_image
from rwcflow.midspace import rigid_midspace

DEFAULT_SETTINGS = ("{}", '{"smoothing_mm": 8.0, "control_spacing_mm": 4.0}',
                    '{"smoothing_mm": 6.0, "control_spacing_mm": 4.0}')


def measure_participant(root: Path, label: str, settings: list[dict]) -> list[dict]:
    """Participant ``label`` of the set in ``root``: its rigid midspace once, then one row per setting."""
    truth = json.loads((root / "sourcedata" / "truth" / label / f"{label}_truth.json").read_text())
    names = list(truth["atrophy"]["sessions"])
    images = [load_image(root / label / name / "anat" / f"{label}_{name}_T1w.nii.gz") for name in names]
    grid, matrices = rigid_midspace(images)
    zero = np.zeros((1, 3, *grid.shape))
    rigid = [transforms.compose_world_displacement(grid, matrix, zero) for matrix in matrices]
    rows = []
    for setting in settings:
        start = time.perf_counter()
        refined, _, template = refine_groupwise(images, rigid, grid, GroupwiseRefinement(**setting))
        seconds = time.perf_counter() - start
        jacobians = {name: maps.jacobian_from_world_field(d, grid) for name, d in zip(names, refined)}
        for row in change_rows(truth, template, refined[0], jacobians):
            rows.append({"setting": setting, "participant": label, "true_change_percent": row.true_change_percent,
                         "recovered_change_percent": row.recovered_change_percent, "error_pp": round(row.error_pp, 4),
                         "far_field_mean_abs_log_change": row.far_field_mean_abs_log_change,
                         "passed": row.passed, "refinement_s": round(seconds, 1)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| setting | participant | true change | recovered | error | far field mean abs Δ log J | "
             "refinement | result |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| `{json.dumps(row['setting'])}` | {row['participant']} | {row['true_change_percent']:.2f} % "
                     f"| {row['recovered_change_percent']:.2f} % | {row['error_pp']:+.2f} pp "
                     f"| {row['far_field_mean_abs_log_change']:.4f} | {row['refinement_s']:.0f} s "
                     f"| {'pass' if row['passed'] else 'FAIL'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=float, default=2.0, help="voxel size in mm (default 2)")
    parser.add_argument("--folder", type=Path, help="where bench_longitudinal's set is or is written "
                                                     "(default: a new temporary folder)")
    parser.add_argument("--participants", nargs="+", help="e.g. sub-02 sub-03 (default: all five)")
    parser.add_argument("--setting", nargs="+", default=list(DEFAULT_SETTINGS),
                        help="GroupwiseRefinement fields as JSON, one per setting (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPOSITORY / "benchmarks" / "results")
    args = parser.parse_args(argv)
    try:
        settings = [json.loads(text) for text in args.setting]
        for setting in settings:
            GroupwiseRefinement(**setting)
    except (ValueError, TypeError) as exc:
        print(f"bench_longitudinal_settings: --setting: {exc}", file=sys.stderr)
        return 2
    root = (args.folder or Path(tempfile.mkdtemp(prefix="rwcflow-longitudinal-"))) / f"{args.resolution:g}mm" / "bids"
    if not root.exists():
        write_set(root, CASES, args.resolution)
    labels = args.participants or [f"sub-{number:02d}" for number in range(1, len(CASES) + 1)]
    rows = [row for label in labels for row in measure_participant(root, label, settings)]
    rows.sort(key=lambda row: (json.dumps(row["setting"]), row["participant"]))
    text = table(rows)
    print(text)
    report = {"resolution_mm": args.resolution, "folder": str(root), "rows": rows, "environment": environment()}
    name = f"longitudinal_settings_cpu_{args.resolution:g}mm"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    command = shlex.join(["python", "-m", "benchmarks.bench_longitudinal_settings",
                          *(argv if argv is not None else sys.argv[1:])])
    (args.out / f"{name}.md").write_text(
        f"# The groupwise refinement's settings on the varied longitudinal set\n\n"
        f"{report['environment']['processor']}, {report['environment']['cpu_count']} CPUs, "
        f"{report['environment']['date']}. `{command}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

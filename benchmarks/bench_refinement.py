"""Settings of the longitudinal workflow's groupwise refinement compared on the same registrations.

Run from the repository root, best after ``benchmarks.bench_workflows --parts longitudinal`` with the same
``--work-dir``, ``--resolution`` and ``--simulation``, whose final within-subject registrations then come
from the Pydra cache (otherwise they are computed first)::

    python -m benchmarks.bench_refinement --simulation acquired \\
        --settings '{"interpolation": "linear"}' '{"smoothing_mm": 8}' '{}'

Each setting is keyword arguments of :class:`rwcflow.groupwise.GroupwiseRefinement` over its defaults;
each refines the same rigid midspace (:func:`rwcflow.groupwise.refine_groupwise`) and is measured as
in ``bench_workflows`` (the sphere's change against the truth, the far field, and 4 mm shells).
``--crop MM`` refines only the box of ±MM around the sphere's centre (a 1 mm grid in minutes rather than
hours; its far field is then the part of the box beyond 3 radii). Prints a Markdown table and writes
``benchmarks/results/workflows_longitudinal_refinement_settings_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from pydra.engine.submitter import Submitter

from benchmarks.bench_workflows import (SIMULATIONS, acquired_sessions, add_simulation_arguments, change_measures,
                                        resampled_sessions)
from benchmarks.system import REPOSITORY, environment
from rwcflow import maps, spatial, transforms
from rwcflow.bids_app.demo import LEFT_HIPPOCAMPUS_MNI_MM, shrink_sphere
from rwcflow.groupwise import GroupwiseRefinement, refine_groupwise
from rwcflow.io import Grid, Image, save_image
from rwcflow.worker import ForkServerWorker
from rwcflow.workflows.longitudinal import Longitudinal


def final_registrations(folder: Path, submitter: Submitter, sessions: list[Image]) -> list[np.ndarray]:
    """The template→session displacements (RAS mm) of the longitudinal workflow without refinement (the rigid
    midspace), on the template grid; the same inputs as ``bench_workflows``, so its cache answers."""
    paths = [save_image(image, folder / f"ses-{n}_T1w.nii.gz") for n, image in enumerate(sessions, start=1)]
    out = submitter(Longitudinal(sessions=paths, affine=True, device="cpu", refine_iters=0),
                    raise_errors=True).outputs
    return [transforms.read_displacement_field(xfm)[0] for xfm in out.xfms]


def crop_box(grid: Grid, half_mm: float | None) -> tuple[tuple[slice, ...], Grid]:
    """The voxels of ``grid`` within ±``half_mm`` of the sphere's centre along each axis (all: ``None``)."""
    if half_mm is None:
        return tuple(slice(0, n) for n in grid.shape), grid
    centre = grid.world_to_voxel(np.asarray(LEFT_HIPPOCAMPUS_MNI_MM, dtype=float)[None])[0]
    low = np.clip(np.floor(centre - half_mm / grid.spacing).astype(int), 0, None)
    high = np.minimum(np.ceil(centre + half_mm / grid.spacing).astype(int) + 1, grid.shape)
    affine = grid.affine.copy()
    affine[:3, 3] = grid.voxel_to_world(low.astype(float)[None])[0]
    return tuple(slice(a, b) for a, b in zip(low, high)), Grid(tuple(int(n) for n in high - low), affine)


def run_setting(sessions: list[Image], displacements: list[np.ndarray], grid: Grid, brain: np.ndarray,
                radius: float, setting: dict) -> dict:
    options = GroupwiseRefinement(**setting)
    start = time.perf_counter()
    refined, _, _ = refine_groupwise(sessions, displacements, grid, options)
    seconds = time.perf_counter() - start
    first, second = (maps.log_jacobian(maps.jacobian_from_world_field(d, grid)) for d in refined)
    return {"setting": setting, "options": dataclasses.asdict(options), "wall_s": seconds,
            **change_measures(second - first, grid, brain, radius)}


def table(record: dict) -> str:
    crop = f", refined on ±{record['crop_mm']} mm around the sphere" if record["crop_mm"] else ""
    lines = ["### Longitudinal: groupwise refinement settings on the same rigid midspace", "",
             f"{record['resolution_mm']} mm{crop}; session 2 {SIMULATIONS[record['simulation']]}; "
             f"true change {record['true_change_percent']:.2f} %; settings over the defaults "
             f"({', '.join(f'{k} {v}' for k, v in record['defaults'].items())}); one torch thread.", "",
             "| setting | measured change | error | far-field mean abs log-J change | change by 4 mm shell (%) "
             "| wall time |", "|---|---|---|---|---|---|"]
    for row in record["rows"]:
        setting = ", ".join(f"{k} {v}" for k, v in row["setting"].items()) or "defaults"
        shells = " ".join(f"{value:+.2f}" for value in row["shells_percent"])
        lines.append(f"| {setting} | {row['measured_change_percent']:.2f} % "
                     f"| {row['measured_change_percent'] - record['true_change_percent']:+.2f} pp "
                     f"| {row['far_mean_abs_log_change']:.4f} | {shells} | {row['wall_s']:.0f} s |")
    truth = " ".join(f"{value:+.2f}" for value in record["true_shells_percent"])
    lines += ["", f"True change by 4 mm shell (%): {truth}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_simulation_arguments(parser)
    parser.add_argument("--settings", nargs="+", type=json.loads, default=[{}],
                        help="JSON objects of GroupwiseRefinement options over the defaults, one per row")
    parser.add_argument("--crop", type=float, help="refine only within ±CROP mm of the sphere's centre")
    parser.add_argument("--jobs", type=int, default=2, help="parallel Pydra jobs for the registrations")
    parser.add_argument("--work-dir", type=Path, default=Path("bench_work/workflows"))
    parser.add_argument("--out", type=Path,
                        default=REPOSITORY / "benchmarks" / "results"
                        / "workflows_longitudinal_refinement_settings_cpu")
    args = parser.parse_args(argv)

    simulate = acquired_sessions if args.simulation == "acquired" else resampled_sessions
    sessions = list(simulate(args.resolution, args.loss / 100, args.radius))
    (args.work_dir / "longitudinal").mkdir(parents=True, exist_ok=True)
    worker = ForkServerWorker(n_procs=args.jobs, threads=1)
    with Submitter(worker=worker, cache_root=args.work_dir / "cache") as submitter:
        displacements = final_registrations(args.work_dir / "longitudinal", submitter, sessions)
    torch.set_num_threads(1)
    box, grid = crop_box(sessions[0].grid, args.crop)
    brain = sessions[0].data[box] > 0
    # the truth on session 1's grid: session 2 is session 1 pulled back through u, so the change from session
    # 1 to 2 is the log-Jacobian of u's inverse, -log det(I + grad u) (to first order in u's sub-voxel size,
    # at the same points of the template, which lies half-way between the sessions)
    field = shrink_sphere(grid, LEFT_HIPPOCAMPUS_MNI_MM, args.radius, args.loss / 100).double()
    truth = -torch.log(spatial.jacobian_determinant(field))[0, 0].numpy()
    true_shells = change_measures(truth, grid, brain, args.radius)
    record = {"environment": environment(["pydra"]), "resolution_mm": args.resolution, "simulation": args.simulation,
              "true_change_percent": -args.loss, "crop_mm": args.crop, "shape": list(grid.shape),
              "defaults": dataclasses.asdict(GroupwiseRefinement()),
              "true_shells_percent": true_shells["shells_percent"],
              "true_far_mean_abs_log_change": true_shells["far_mean_abs_log_change"], "rows": []}
    for setting in args.settings:
        record["rows"].append(run_setting(sessions, [d[box] for d in displacements], grid, brain, args.radius, setting))
        print(table(record).splitlines()[-3], flush=True)
    report = table(record)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.parent.joinpath(args.out.name + ".json").write_text(json.dumps(record, indent=2))
    args.out.parent.joinpath(args.out.name + ".md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

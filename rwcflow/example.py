"""A bundled example pair built from the MNI152 2009a template shipped in nilearn (no download).

The fixed image is the skull-stripped MNI152 T1 with tissue labels (1 CSF, 2 grey matter, 3 white
matter, from the template's probability maps), cropped to the brain. The moving image is the same
anatomy deformed by a known random smooth field, moved by a known small rigid transform (stored in its
header affine, so it lies elsewhere in world space) and given a mild intensity change. The true
fixed→moving mapping is written as an ITK displacement field, like the ones rwcflow writes.

Command: ``rwcflow-example OUT_DIR [--resolution MM] [--max-displacement MM] [--seed N]``.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nilearn import datasets
from scipy.spatial.transform import Rotation

from rwcflow import spatial, transforms
from rwcflow.io import Grid, Image, resample, save_image
from rwcflow.synth import random_smooth_field

TISSUE_LABELS = {1: "CSF", 2: "GM", 3: "WM"}


@dataclass
class ExamplePair:
    """An example pair in memory; ``true_displacement`` is the fixed→moving mapping in RAS mm ``(X, Y, Z, 3)``."""

    fixed: Image
    moving: Image
    fixed_labels: Image
    moving_labels: Image
    true_field: torch.Tensor
    true_affine: np.ndarray
    true_displacement: np.ndarray

    def write(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write the images, labels and the true transform into ``out_dir``."""
        out_dir = Path(out_dir)
        return {
            "fixed": save_image(self.fixed, out_dir / "fixed_T1w.nii.gz"),
            "moving": save_image(self.moving, out_dir / "moving_T1w.nii.gz"),
            "fixed_labels": save_image(self.fixed_labels, out_dir / "fixed_dseg.nii.gz", dtype=np.int16),
            "moving_labels": save_image(self.moving_labels, out_dir / "moving_dseg.nii.gz", dtype=np.int16),
            "true_xfm": transforms.write_displacement_field(
                out_dir / "true_xfm.nii.gz", self.true_displacement, self.fixed.grid),
        }


def mni152_brain(resolution_mm: float = 2.0, margin_mm: float = 4.0) -> tuple[Image, Image]:
    """The skull-stripped MNI152 T1 and its tissue labels, cropped to the brain, at ``resolution_mm``
    (fresh copies of a cached resampling: nilearn's 1 mm tissue maps take seconds to load)."""
    brain, labels = _mni152_brain(resolution_mm, margin_mm)
    return (Image(brain.data.copy(), brain.affine.copy()), Image(labels.data.copy(), labels.affine.copy()))


@functools.lru_cache(maxsize=8)
def _mni152_brain(resolution_mm: float, margin_mm: float) -> tuple[Image, Image]:
    source = 1 if resolution_mm < 2 else 2  # nilearn's 1 mm maps for finer grids, not an upsampled 2 mm brain
    t1 = datasets.load_mni152_template(resolution=source)
    mask = datasets.load_mni152_brain_mask(resolution=source).get_fdata() > 0
    gm = datasets.load_mni152_gm_template(resolution=source).get_fdata()
    wm = datasets.load_mni152_wm_template(resolution=source).get_fdata()
    tissues = np.stack([1.0 - gm - wm, gm, wm])
    labels = np.where(mask, tissues.argmax(axis=0) + 1, 0).astype(np.int32)
    data = np.where(mask, t1.get_fdata(), 0.0).astype(np.float32)

    corners = np.argwhere(mask)
    low = t1.affine[:3, :3] @ corners.min(axis=0) + t1.affine[:3, 3] - margin_mm
    high = t1.affine[:3, :3] @ corners.max(axis=0) + t1.affine[:3, 3] + margin_mm
    shape = tuple(int(n) for n in np.floor((high - low) / resolution_mm) + 1)
    grid = Grid(shape, np.array([[resolution_mm, 0, 0, low[0]], [0, resolution_mm, 0, low[1]],
                                 [0, 0, resolution_mm, low[2]], [0, 0, 0, 1.0]]))
    brain = resample(Image(data, t1.affine), grid)
    return brain, resample(Image(labels, t1.affine), grid, labels=True)


def rigid_matrix(angles_deg: Sequence[float], shift_mm: Sequence[float], centre: np.ndarray) -> np.ndarray:
    """A 4x4 world rotation (x, y, z Euler angles in degrees) about ``centre``, then a shift."""
    matrix = np.eye(4)
    matrix[:3, :3] = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()
    matrix[:3, 3] = centre - matrix[:3, :3] @ centre + np.asarray(shift_mm)
    return matrix


def make_example_pair(
    *,
    resolution_mm: float = 2.0,
    max_displacement_mm: float = 8.0,
    rotation_deg: float = 4.0,
    shift_mm: float = 5.0,
    seed: int = 0,
    brain: tuple[Image, Image] | None = None,
) -> ExamplePair:
    """Build the example pair (see the module docstring); ``brain``: the fixed image and its labels, on one
    grid (default: the MNI152 brain at ``resolution_mm``; a given brain keeps its own voxel size)."""
    fixed, fixed_labels = brain if brain is not None else mni152_brain(resolution_mm)
    resolution_mm = float(np.mean(fixed.grid.spacing))
    rng = np.random.default_rng(seed)
    field = random_smooth_field(fixed.data.shape, max_displacement_mm / resolution_mm, seed=seed)

    # moving(y) = fixed(y + v(y)) on the same voxel grid, so the fixed->moving pull-back field is v^-1.
    inverse = spatial.invert_field(field)
    moving_data = spatial.warp(fixed.tensor(), inverse)[0, 0].numpy()
    moving_labels = spatial.warp_labels(fixed_labels.tensor(dtype=torch.int32), inverse)[0, 0].numpy()
    gamma, gain = 0.9, 1.15
    moving_data = gain * np.power(np.clip(moving_data / max(moving_data.max(), 1e-6), 0, 1), gamma) * fixed.data.max()

    centre = fixed.grid.voxel_to_world((np.array(fixed.data.shape) - 1) / 2.0)
    rigid = rigid_matrix(rng.uniform(-rotation_deg, rotation_deg, 3), rng.uniform(-shift_mm, shift_mm, 3), centre)
    moving_affine = rigid @ fixed.affine
    return ExamplePair(
        fixed=fixed,
        moving=Image(moving_data.astype(np.float32), moving_affine),
        fixed_labels=fixed_labels,
        moving_labels=Image(moving_labels.astype(np.int32), moving_affine),
        true_field=field,
        true_affine=rigid,
        true_displacement=transforms.compose_world_displacement(fixed.grid, rigid, field),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rwcflow-example", description="Write the bundled MNI152 example pair.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--resolution", type=float, default=2.0, help="voxel size in mm (default 2)")
    parser.add_argument("--max-displacement", type=float, default=8.0, help="largest deformation in mm (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pair = make_example_pair(resolution_mm=args.resolution, max_displacement_mm=args.max_displacement, seed=args.seed)
    for path in pair.write(args.out_dir).values():
        print(path)
    return 0

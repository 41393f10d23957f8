"""Instance optimisation: Adam on a displacement field for one image pair (ConvexAdam-style).

It refines the field a network predicted (``init_field``), or registers the pair on its own from zero
through a coarse-to-fine pyramid. When refining, it works on a finer control grid for fewer steps and the
diffusion term penalises only the correction, so the network's own detail is kept where the images do
not call for a change (:data:`REFINING`). At each level the field lives on a control grid of every ``s``-th
voxel (``s = grid_factor`` at the finest level, as ConvexAdam's ``grid_sp_adam``, doubled at each
coarser level), is smoothed by box filters at every step and scored there against descriptors or
images box-averaged onto that grid; the result is upsampled with :func:`rwcflow.spatial.resize_field`.
The images are padded at their far ends (edge values repeated) so that every control grid shares the
corner voxels of the image grid. MIND-SSC descriptors of both images are computed once, at full
resolution, and the moving descriptors are warped at each step instead of being recomputed. They are
sampled trilinearly, or, for sub-voxel changes, through the cubic B-spline kernel (``interpolation``).

Fields follow :mod:`rwcflow.spatial`: ``(B, 3, X, Y, Z)`` in voxels of the fixed grid, ``moving(x + u(x))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from rwcflow import spatial
from rwcflow.losses import diffusion_loss, keypoint_loss, mind_ssc, mse_loss, ncc_loss, soft_dice_loss

Tensor = torch.Tensor

#: Diffusion weight of each similarity when ``regularization`` is not given. MIND-SSC's is ConvexAdam's
#: lambda of 1.25 in this module's normalisation (means over the 12 channels and the 3 axes, not sums);
#: the others were tuned on synthetic deformations of the MNI152 brain at 2 mm.
DEFAULT_REGULARIZATION = {"mind": 0.3, "ncc": 0.5, "mse": 0.03}
#: Diffusion weight of each similarity when it penalises only the correction of an initial field
#: (``regularize_correction``), tuned refining networks' fields on synthetic deformations of MNI152 at
#: 2 mm other than the benchmark's: MIND-SSC's on both control grids (0.5 and 2.0 did worse), NCC's on
#: the half-resolution one only; MSE's is its default scaled as MIND-SSC's is, untuned.
REFINEMENT_REGULARIZATION = {"mind": 1.0, "ncc": 4.0, "mse": 0.1}
#: The options left ``None`` when starting from zero (ConvexAdam's) and when refining an initial field
#: (tuned with MIND-SSC as :data:`REFINEMENT_REGULARIZATION`: a network's field is refined best at full
#: resolution, where a few steps suffice).
FROM_ZERO = {"iterations": 80, "grid_factor": 2, "regularize_correction": False}
REFINING = {"iterations": 20, "grid_factor": 1, "regularize_correction": True}
SIMILARITIES = tuple(DEFAULT_REGULARIZATION)
INTERPOLATIONS = ("linear", "bspline")

# Control voxels kept around the mask's box (MIND-SSC's reach and the smoothing's).
_MARGIN = 4


@dataclass
class InstanceOptimization:
    """Options of :func:`instance_optimize`; the defaults suit brain MRI at 1-2 mm. Options left ``None``
    take the values of :data:`FROM_ZERO` or :data:`REFINING` (see :meth:`resolved`).

    * ``iterations``: Adam steps per pyramid level.
    * ``learning_rate``: Adam's initial step, in control-grid voxels (cosine-decayed to 0 over a level).
    * ``similarity``: ``"mind"`` (MIND-SSC descriptors, squared difference), ``"ncc"`` (local normalised
      cross-correlation) or ``"mse"`` (intensities).
    * ``regularization``: weight of the diffusion term (:func:`rwcflow.losses.diffusion_loss` of the
      field on the control grid, in control-grid voxels; of the velocity when diffeomorphic); ``None``:
      the similarity's default (:data:`DEFAULT_REGULARIZATION`, or :data:`REFINEMENT_REGULARIZATION`
      when the correction is penalised).
    * ``grid_factor``: fixed voxels per control-grid voxel at the finest level (2: half resolution,
      as ConvexAdam, from zero; 1: full resolution, when refining).
    * ``pyramid_levels``: levels when starting from zero, each twice as coarse as the next; with an
      ``init_field`` only the finest level runs.
    * ``label_weight``, ``keypoint_weight``: weights of the soft-Dice term (when labels are given) and
      of the keypoint-distance term in mm (when keypoints are given).
    * ``diffeomorphic``: optimise a stationary velocity, integrated by scaling and squaring and
      applied before the initial field, so that the result folds no more than ``init_field`` does.
    * ``regularize_correction``: the diffusion term penalises the correction only, not the whole
      field, so that an initial field keeps its own detail (always so when ``diffeomorphic``);
      ``None``: when an ``init_field`` is refined.
    * ``smoothing``: passes of a 3-voxel box filter over the control field at every step.
    * ``interpolation``: how the moving image (or descriptors) is sampled on the control grid:
      ``"linear"`` (trilinear) or ``"bspline"`` (the cubic B-spline kernel, the fixed image filtered
      by the same kernel; see :func:`rwcflow.spatial.bspline_sample`), which sub-voxel changes need.
    """

    iterations: int | None = None
    learning_rate: float = 1.0
    similarity: str = "mind"
    regularization: float | None = None
    grid_factor: int | None = None
    pyramid_levels: int = 3
    label_weight: float = 0.1
    keypoint_weight: float = 0.01
    diffeomorphic: bool = False
    regularize_correction: bool | None = None
    smoothing: int = 3
    interpolation: str = "linear"

    def __post_init__(self) -> None:
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if (self.iterations or 0) < 0 or self.pyramid_levels < 1 or self.smoothing < 0:
            raise ValueError("iterations and smoothing must be >= 0 and pyramid_levels >= 1")
        factor = self.grid_factor
        if (factor is not None and (int(factor) != factor or factor < 1)) or self.learning_rate <= 0:
            raise ValueError("grid_factor must be a whole number >= 1 and learning_rate > 0")
        if min(self.regularization or 0.0, self.label_weight, self.keypoint_weight) < 0:
            raise ValueError("loss weights must be >= 0")

    def resolved(self, refining: bool) -> InstanceOptimization:
        """These options with those left ``None`` chosen for a run that refines an initial field
        (``refining``: :data:`REFINING`) or starts from zero (:data:`FROM_ZERO`); the diffusion weight
        from :data:`REFINEMENT_REGULARIZATION` when the correction is penalised, else
        :data:`DEFAULT_REGULARIZATION`."""
        defaults = REFINING if refining else FROM_ZERO
        chosen = {name: default if getattr(self, name) is None else getattr(self, name)
                  for name, default in defaults.items()}
        table = REFINEMENT_REGULARIZATION if chosen["regularize_correction"] else DEFAULT_REGULARIZATION
        weight = table[self.similarity] if self.regularization is None else self.regularization
        return replace(self, regularization=weight, **chosen)


@dataclass
class _Level:
    """One pyramid level, on a control grid of ``shape``. The fixed side is cut to ``box`` (what is
    optimised), the moving side is whole, keypoints are in box coordinates."""

    shape: tuple[int, ...]
    box: tuple[slice, slice, slice]
    grid: Tensor  # control-grid coordinates of the box's voxels, (1, 3, *box shape)
    fixed: Tensor
    moving: Tensor
    mask: Tensor | None
    fixed_labels: Tensor | None
    moving_labels: Tensor | None
    fixed_points: Tensor | None
    moving_points: Tensor | None
    spacing: Tensor  # control-grid voxel size, in mm (or in fixed voxels when no spacing is given)


def _pad(volume: Tensor, shape: Sequence[int]) -> Tensor:
    """``volume`` grown to ``shape`` by repeating its last voxels along each axis."""
    pad = []
    for n, m in zip(reversed(volume.shape[2:]), reversed(shape)):
        pad += [0, m - n]
    return F.pad(volume, pad, mode="replicate") if any(pad) else volume


def _pool(volume: Tensor, stride: int) -> Tensor:
    """Box averages of ``volume`` over about ``stride`` voxels, centred on every ``stride``-th voxel."""
    if stride == 1:
        return volume
    radius = stride // 2
    return F.avg_pool3d(volume, 2 * radius + 1, stride=stride, padding=radius, count_include_pad=False)


def _region(mask: Tensor | None, points: Tensor | None, shape: Sequence[int]) -> tuple[list[float], list[float]]:
    """First and last voxel coordinates, per axis, of the mask's non-zero voxels and the keypoints."""
    if mask is None:
        return [0.0] * 3, [n - 1.0 for n in shape]
    inside = torch.nonzero(mask.flatten(0, 1).amax(0)).float()
    if points is not None:
        inside = torch.cat([inside, points.to(inside)])
    if inside.numel() == 0:
        raise ValueError("fixed_mask is empty")
    return inside.amin(0).tolist(), inside.amax(0).tolist()


def _levels(
    volumes: dict[str, Tensor | None],
    strides: Sequence[int],
    points: tuple[Tensor, Tensor] | None,
    region: tuple[list[float], list[float]],
    spacing: Tensor,
    bspline: bool,
) -> list[_Level]:
    """The pyramid, coarsest level first, from padded full-resolution ``volumes`` (fixed, moving, mask,
    fixed_labels, moving_labels); each level is pooled from the next finer one. With ``bspline`` the
    fixed image of each level is filtered as :func:`rwcflow.spatial.bspline_sample` samples the moving one."""
    levels = []
    previous = 1
    for stride in sorted(strides):
        volumes = {key: None if v is None else _pool(v, stride // previous) for key, v in volumes.items()}
        previous = stride
        shape = tuple(volumes["fixed"].shape[2:])
        box = tuple(
            slice(max(0, math.floor(a / stride) - _MARGIN), min(n, math.ceil(b / stride) + _MARGIN + 1))
            for a, b, n in zip(*region, shape)
        )
        cut = {key: v if v is None or key.startswith("moving") else v[(..., *box)] for key, v in volumes.items()}
        if bspline:
            cut["fixed"] = spatial.box_smooth(volumes["fixed"], 1, spatial.BSPLINE_AT_VOXELS)[(..., *box)]
        origin = torch.tensor([b.start for b in box], dtype=spacing.dtype, device=spacing.device)
        grid = spatial.identity_grid(cut["fixed"].shape[2:], device=spacing.device) + origin.view(1, 3, 1, 1, 1)
        level_points = (None, None) if points is None else tuple(p / stride - origin for p in points)
        levels.append(_Level(shape, box, grid, cut["fixed"], cut["moving"], cut["mask"],
                             cut["fixed_labels"], cut["moving_labels"], *level_points, spacing * stride))
    return levels[::-1]


def _combine(correction: Tensor, init: Tensor | None, diffeomorphic: bool) -> Tensor:
    """The field of ``correction`` on top of ``init`` (both on one grid): a sum, or a diffeomorphic
    correction ``exp(correction)`` applied before ``init``."""
    if diffeomorphic:
        correction = spatial.integrate_velocity(correction)
        return correction if init is None else spatial.compose(correction, init)
    return correction if init is None else init + correction


def _loss(field: Tensor, smooth: Tensor, level: _Level, options: InstanceOptimization) -> Tensor:
    """Similarity (+ soft Dice, + keypoint distance) of a control-grid ``field``, + diffusion of ``smooth``."""
    sample = spatial.bspline_sample if options.interpolation == "bspline" else spatial.sample
    warped = sample(level.moving, level.grid + field)
    if options.similarity == "ncc":
        loss = ncc_loss(level.fixed, warped, mask=level.mask)
    else:
        loss = mse_loss(level.fixed, warped, mask=level.mask)
    loss = loss + options.regularization * diffusion_loss(smooth)
    if level.fixed_labels is not None and options.label_weight > 0:
        warped_labels = spatial.sample(level.moving_labels, level.grid + field, padding_mode="zeros")
        loss = loss + options.label_weight * soft_dice_loss(level.fixed_labels, warped_labels)
    if level.fixed_points is not None and options.keypoint_weight > 0:
        distance = keypoint_loss(level.fixed_points, level.moving_points, field, spacing=level.spacing)
        loss = loss + options.keypoint_weight * distance
    return loss


def _optimise_level(
    level: _Level, init: Tensor | None, options: InstanceOptimization, step: Callable[[Tensor], None]
) -> Tensor:
    """Adam on a control-grid correction on top of ``init``; returns the smoothed correction."""
    shape = (level.fixed.shape[0], 3, *level.fixed.shape[2:])
    parameter = torch.zeros(shape, device=level.fixed.device, requires_grad=True)
    optimizer = torch.optim.Adam([parameter], lr=options.learning_rate)
    # Adam steps by about the learning rate even where the gradient is rounding noise: decay it.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(options.iterations, 1))
    for _ in range(options.iterations):
        correction = spatial.box_smooth(parameter, options.smoothing)
        field = _combine(correction, init, options.diffeomorphic)
        # The diffusion term smooths the whole field, or the correction (the velocity if diffeomorphic).
        penalized = correction if options.diffeomorphic or options.regularize_correction else field
        loss = _loss(field, penalized, level, options)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step(loss)
    return spatial.box_smooth(parameter.detach(), options.smoothing)


def _expand(correction: Tensor, level: _Level, shape: Sequence[int]) -> Tensor:
    """A correction on the box of ``level`` carried to its whole control grid (edge values repeated
    outside the box), then resampled onto ``shape``."""
    pad = []
    for cut, n in zip(reversed(level.box), reversed(level.shape)):
        pad += [cut.start, n - cut.stop]
    return spatial.resize_field(F.pad(correction, pad, mode="replicate"), shape)


def _check(fixed: Tensor, moving: Tensor, labels: tuple, keypoints: tuple, **on_grid: Tensor | None) -> None:
    """Refuse inputs of the wrong shapes, or given for one image only."""
    if fixed.dim() != 5 or fixed.shape[1] != 1 or fixed.shape != moving.shape:
        shapes = f"{tuple(fixed.shape)}, {tuple(moving.shape)}"
        raise ValueError(f"fixed and moving must both be (B, 1, X, Y, Z), got {shapes}")
    for name, value in {**on_grid, "fixed_labels": labels[0], "moving_labels": labels[1]}.items():
        if value is not None and (value.shape[0] != fixed.shape[0] or value.shape[2:] != fixed.shape[2:]):
            raise ValueError(f"{name} {tuple(value.shape)} does not lie on the fixed grid {tuple(fixed.shape)}")
    for pair in (labels, keypoints):
        if (pair[0] is None) != (pair[1] is None) or (pair[0] is not None and pair[0].shape != pair[1].shape):
            raise ValueError("labels and keypoints must be given for both images, in the same shape, or not at all")
    if keypoints[0] is not None and fixed.shape[0] != 1:
        raise ValueError("keypoints need a batch of one image pair")


def instance_optimize(
    fixed: Tensor,
    moving: Tensor,
    options: InstanceOptimization | None = None,
    *,
    init_field: Tensor | None = None,
    fixed_mask: Tensor | None = None,
    fixed_labels: Tensor | None = None,
    moving_labels: Tensor | None = None,
    fixed_keypoints: Tensor | None = None,
    moving_keypoints: Tensor | None = None,
    spacing: Sequence[float] | Tensor | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> Tensor:
    """Optimise the displacement field registering ``moving`` to ``fixed``; returns it ``(B, 3, X, Y, Z)``.

    ``fixed`` and ``moving`` are ``(B, 1, X, Y, Z)`` on the same (fixed) grid, intensities about
    ``[0, 1]``. Without ``init_field`` the field starts from zero on a pyramid of
    ``options.pyramid_levels`` levels; with it, it is refined at the finest level. ``fixed_mask``
    restricts the similarity to its non-zero voxels, and the optimisation to the box around them (and
    the keypoints); outside the box the correction keeps its edge values. ``fixed_labels`` and
    ``moving_labels`` (one-hot ``(B, L, X, Y, Z)``, without background) add a soft-Dice term;
    ``fixed_keypoints`` and ``moving_keypoints`` (``(N, 3)`` voxel coordinates of the fixed grid,
    paired by row; batch of one) add a distance term, in mm with ``spacing`` (the fixed voxel sizes).
    ``progress(done, total, loss)`` is called after every step.
    """
    options = (options or InstanceOptimization()).resolved(refining=init_field is not None)
    _check(fixed, moving, (fixed_labels, moving_labels), (fixed_keypoints, moving_keypoints),
           init_field=init_field, fixed_mask=fixed_mask)
    levels = 1 if init_field is not None else options.pyramid_levels
    strides = [int(options.grid_factor) * 2**k for k in range(levels)]
    shape = tuple(fixed.shape[2:])
    # Every control grid then holds the first and last voxel of the padded grid.
    padded = tuple(max(1, math.ceil((n - 1) / strides[-1])) * strides[-1] + 1 for n in shape)
    spacing = torch.ones(3) if spacing is None else torch.as_tensor(spacing, dtype=torch.float32)
    points = None if fixed_keypoints is None else (fixed_keypoints.float(), moving_keypoints.float())
    total, done = levels * options.iterations, 0

    def step(loss: Tensor) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, float(loss.detach()))

    with torch.no_grad():
        mask = None if fixed_mask is None else (fixed_mask > 0).float()
        if options.similarity == "mind":
            fixed, moving = mind_ssc(fixed.float()), mind_ssc(moving.float())
        volumes = {"fixed": fixed, "moving": moving, "mask": mask, "fixed_labels": fixed_labels,
                   "moving_labels": moving_labels}
        volumes = {key: None if v is None else _pad(v.float(), padded) for key, v in volumes.items()}
        region = _region(mask, None if points is None else points[0], shape)
        pyramid = _levels(volumes, strides, points, region, spacing.to(fixed.device),
                          options.interpolation == "bspline")
        field = None if init_field is None else _pad(init_field.detach().float(), padded)
    for index, level in enumerate(pyramid):
        init = None if field is None else spatial.resize_field(field, level.shape)[(..., *level.box)]
        with torch.enable_grad():
            correction = _optimise_level(level, init, options, step)
        with torch.no_grad():
            target = padded if index == len(pyramid) - 1 else level.shape
            base = None if field is None else spatial.resize_field(field, target)
            field = _combine(_expand(correction, level, target), base, options.diffeomorphic)
    return field[:, :, : shape[0], : shape[1], : shape[2]]

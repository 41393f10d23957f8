"""Affine pre-alignment in world space: centre-of-mass start, then multi-resolution rigid and affine fits.

Everything happens in world coordinates (RAS+ mm): each image is smoothed and resampled onto a coarse
working grid in its own orientation, the fixed working voxels are mapped to world points ``p``, the
current matrix takes them to moving world points and the moving working image is sampled there in
torch. Any orientation, oblique affine or anisotropic voxel size therefore works on either side.

The matrix is ``M(p) = A (p - c) + c + t`` with ``c`` the fixed centre of mass and
``A = R · (I + K) · diag(s)`` (rotation, upper-triangular shear, scaling). Its twelve parameters are
all in millimetres: translations directly, rotation, shear and log-scaling as the displacement they
cause at the brain's radius, so one optimiser step size suits all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from rwcflow import spatial
from rwcflow.errors import InputError
from rwcflow.io import Grid, Image, normalize_intensity, resample

Tensor = torch.Tensor

SIMILARITIES = ("ncc", "mi")

# Infinitesimal rotations about the world x, y, z axes (cross-product matrices), then the three shears.
_GENERATORS = torch.tensor(
    [
        [[0, 0, 0], [0, 0, -1], [0, 1, 0]],
        [[0, 0, 1], [0, 0, 0], [-1, 0, 0]],
        [[0, -1, 0], [1, 0, 0], [0, 0, 0]],
        [[0, 1, 0], [0, 0, 0], [0, 0, 0]],
        [[0, 0, 1], [0, 0, 0], [0, 0, 0]],
        [[0, 0, 0], [0, 0, 1], [0, 0, 0]],
    ],
    dtype=torch.float32,
)

# Bins of the B-spline Parzen joint histogram of mutual information (intensities normalised to [0, 1]).
_MI_BINS = 32


@dataclass
class _Level:
    """One resolution: fixed working intensities at world points, and the moving working image."""

    points: Tensor  # (N, 3) fixed working voxel centres in world mm, minus the centre c
    fixed: Tensor  # (N,) fixed intensities at those points
    fixed_bins: Tensor  # (N, bins + 3) their Parzen histogram weights, for mutual information
    moving: Tensor  # (1, 1, X, Y, Z) moving working image
    to_moving: Tensor  # (4, 4) world mm relative to c -> moving working voxel
    voxel_size: float  # working voxel size in mm


@dataclass
class _Parameters:
    """The twelve parameters, in mm: ``rigid`` = rotation (at ``radius``), translation; ``deform`` =
    log-scaling, shear (at ``radius``)."""

    rigid: Tensor
    deform: Tensor
    radius: float

    def matrix(self) -> Tensor:
        """The 4x4 matrix ``[[A, t], [0, 1]]`` acting on world points relative to the fixed centre."""
        generators = _GENERATORS.to(self.rigid)
        rotation = torch.linalg.matrix_exp(torch.einsum("k,kij->ij", self.rigid[:3] / self.radius, generators[:3]))
        shear = torch.einsum("k,kij->ij", self.deform[3:] / self.radius, generators[3:])
        shear = shear + torch.eye(3, dtype=shear.dtype, device=shear.device)
        linear = rotation @ shear * torch.exp(self.deform[:3] / self.radius)  # A = R (I + K) diag(s)
        bottom = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=linear.dtype, device=linear.device)
        return torch.cat([torch.cat([linear, self.rigid[3:, None]], dim=1), bottom])


def affine_align(
    fixed: Image,
    moving: Image,
    *,
    similarity: str = "ncc",
    levels: Sequence[float] = (4, 2, 1),
    iterations: Sequence[int] = (100, 50, 25),
    device: str | torch.device = "cpu",
    fixed_mask: Image | np.ndarray | None = None,
    moving_mask: Image | np.ndarray | None = None,
    rigid_only: bool = False,
    min_spacing: float = 2.0,
    max_points: int = 32768,
) -> np.ndarray:
    """The 4x4 RAS world matrix ``M`` (float64) taking a fixed world point to the corresponding moving one.

    ``rwcflow.io.resample(moving, fixed.grid, world_matrix=M)`` puts the moving image on the fixed grid,
    aligned. The images may have any orientation, oblique affine and voxel size (e.g. from different
    scanners), as all work is done in world millimetres.

    Method: the moving intensity-weighted centre of mass is brought onto the fixed one; a rigid fit
    at the first (coarsest) level follows, then the rigid (``rigid_only``) or affine fit at each level
    in turn, ``iterations[i]`` Adam steps at level ``levels[i]`` (give levels coarse to fine).

    Args:
        similarity: ``"ncc"``, global normalised cross-correlation (same contrast), or ``"mi"``,
            Mattes mutual information from a B-spline Parzen joint histogram (any contrasts).
        levels: shrink factors; level ``f`` works on grids with voxels of about
            ``f * max(min_spacing, finest fixed voxel size)`` mm (never finer than an image's own).
        iterations: Adam steps per level.
        device: where the optimisation runs (``"cpu"``, ``"cuda"``, a ``torch.device``).
        fixed_mask, moving_mask: binary masks, an :class:`~rwcflow.io.Image` on any grid or an array
            on the image's grid; intensities outside are zeroed (e.g. to skull-strip).
        rigid_only: return a rotation and a translation only.
        min_spacing: finest working voxel size in mm.
        max_points: at most this many fixed working voxels (a fixed random choice) enter the similarity
            per level; it is measured at those mapped inside the moving image.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}; expected one of {SIMILARITIES}")
    if len(levels) != len(iterations) or not levels:
        raise ValueError(f"need one iteration count per level, got levels {levels} and iterations {iterations}")
    sizes = [max(min_spacing, float(fixed.grid.spacing.min())) * f for f in levels]
    fixed_work = _pyramid(fixed.with_data(_prepared(fixed, fixed_mask)), sizes)
    moving_work = _pyramid(moving.with_data(_prepared(moving, moving_mask)), sizes)
    centre, radius = _centre_and_radius(fixed_work[min(sizes)])
    moving_centre, _ = _centre_and_radius(moving_work[min(sizes)])
    pyramid = [_level(fixed_work[size], moving_work[size], size, centre, max_points, device) for size in sizes]

    start = np.r_[np.zeros(3), moving_centre - centre]  # no rotation; the centre-of-mass shift
    params = _Parameters(
        rigid=torch.as_tensor(start, dtype=torch.float32, device=device),
        deform=torch.zeros(6, dtype=torch.float32, device=device),
        radius=radius,
    )
    model = [params.rigid] if rigid_only else [params.rigid, params.deform]
    stages = [] if rigid_only else [(pyramid[0], iterations[0], [params.rigid])]
    stages += [(level, steps, model) for level, steps in zip(pyramid, iterations)]
    for level, steps, trainable in stages:
        _optimise(level, params, trainable, steps, similarity)

    centred = params.matrix().detach().cpu().double().numpy()
    return _translation(centre) @ centred @ _translation(-centre)


def _translation(shift: np.ndarray) -> np.ndarray:
    """The 4x4 matrix translating by ``shift`` mm."""
    matrix = np.eye(4)
    matrix[:3, 3] = shift
    return matrix


def _prepared(image: Image, mask: Image | np.ndarray | None) -> np.ndarray:
    """Intensities normalised to ``[0, 1]`` (robustly, within ``mask``), zero outside ``mask``."""
    if isinstance(mask, Image):
        mask = mask.data if mask.grid == image.grid else resample(mask, image.grid, labels=True).data
    if mask is not None:
        mask = np.asarray(mask) > 0
        if mask.shape != image.data.shape:
            raise ValueError(f"mask shape {mask.shape} differs from image shape {image.data.shape}")
    data = normalize_intensity(image.data, mask=mask)
    return data if mask is None else data * mask


def _centre_and_radius(image: Image) -> tuple[np.ndarray, float]:
    """Intensity-weighted centre of mass (world mm) and root-mean-square distance to it (mm)."""
    total = float(image.data.sum())
    if total <= 0:
        raise InputError(image.path or "image", "no intensity to align (inside its mask)")
    weights = image.data / total
    voxels = np.stack(np.meshgrid(*[np.arange(n) for n in image.data.shape], indexing="ij"), axis=-1)
    world = image.grid.voxel_to_world(voxels.astype(np.float64))
    centre = np.einsum("xyz,xyzd->d", weights, world)
    radius = np.sqrt(np.einsum("xyz,xyz->", weights, ((world - centre) ** 2).sum(-1)))
    return centre, float(radius)


def _working_grid(grid: Grid, voxel_size: float) -> Grid:
    """``grid`` resized to voxels of about ``voxel_size`` mm, never finer than its own."""
    shape = [
        max(2, min(n, int(round((n - 1) * s / voxel_size)) + 1)) for n, s in zip(grid.shape, grid.spacing)
    ]
    return grid.resized(shape)


def _downsampled(image: Image, voxel_size: float) -> Image:
    """``image`` Gaussian-smoothed against aliasing and resampled onto its working grid."""
    grid = _working_grid(image.grid, voxel_size)
    ratio = grid.spacing / image.grid.spacing
    sigma = 0.5 * np.sqrt(np.maximum(ratio**2 - 1.0, 0.0))
    smoothed = ndimage.gaussian_filter(image.data, sigma, mode="constant")
    return resample(image.with_data(smoothed), grid)


def _pyramid(image: Image, voxel_sizes: Sequence[float]) -> dict[float, Image]:
    """Working images of ``image`` by voxel size, each made from the next finer one."""
    images, source = {}, image
    for size in sorted(set(voxel_sizes)):
        source = images[size] = _downsampled(source, size)
    return images


def _level(fixed: Image, moving: Image, voxel_size: float, centre: np.ndarray, max_points: int, device) -> _Level:
    """One resolution level on ``device``, from working images; at most ``max_points`` fixed voxels (a
    fixed random choice) are used."""
    count = fixed.data.size
    chosen = np.arange(count)
    if count > max_points:
        chosen = np.sort(np.random.default_rng(0).choice(count, max_points, replace=False))
    voxels = np.stack(np.unravel_index(chosen, fixed.data.shape), axis=1).astype(np.float64)
    points = fixed.grid.voxel_to_world(voxels) - centre
    fixed_values = fixed.data.reshape(-1)[chosen]

    def as_tensor(array: np.ndarray) -> Tensor:
        return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32, device=device)

    return _Level(
        points=as_tensor(points),
        fixed=as_tensor(fixed_values),
        fixed_bins=_bspline_bins(as_tensor(fixed_values)),
        moving=moving.tensor(device),
        to_moving=as_tensor(np.linalg.inv(moving.affine) @ _translation(centre)),
        voxel_size=voxel_size,
    )


def _optimise(level: _Level, params: _Parameters, trainable: list[Tensor], steps: int, similarity: str) -> None:
    """``steps`` Adam steps on the ``trainable`` tensors of ``params`` (in place) maximising the similarity
    at ``level``; the step size starts at a quarter of a working voxel and decays (cosine) to 1 %."""
    for p in trainable:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(trainable, lr=0.25 * level.voxel_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(steps, 1), eta_min=0.01 * level.voxel_size)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = -_similarity(level, params.matrix(), similarity)
        loss.backward()
        optimiser.step()
        schedule.step()
    for p in trainable:
        p.requires_grad_(False)


def _similarity(level: _Level, matrix: Tensor, similarity: str) -> Tensor:
    """Similarity of the fixed points and the moving image sampled where ``matrix`` maps them."""
    to_voxels = level.to_moving @ matrix
    voxels = level.points @ to_voxels[:3, :3].T + to_voxels[:3, 3]
    shape = torch.tensor(level.moving.shape[2:], dtype=voxels.dtype, device=voxels.device)
    inside = ((voxels >= 0) & (voxels <= shape - 1)).all(dim=1).to(voxels.dtype)
    coords = voxels.T.reshape(1, 3, -1, 1, 1)
    values = spatial.sample(level.moving, coords, padding_mode="zeros").reshape(-1)
    if similarity == "ncc":
        return _ncc(level.fixed, values, inside)
    return _mutual_information(level.fixed_bins, values, inside)


def _ncc(fixed: Tensor, moving: Tensor, weights: Tensor) -> Tensor:
    """Weighted global normalised cross-correlation of two intensity vectors."""
    weights = weights / weights.sum().clamp_min(1e-12)
    fixed = fixed - (weights * fixed).sum()
    moving = moving - (weights * moving).sum()
    covariance = (weights * fixed * moving).sum()
    variance = (weights * fixed**2).sum() * (weights * moving**2).sum()
    return covariance / torch.sqrt(variance + 1e-12)


def _bspline_bins(values: Tensor, bins: int = _MI_BINS) -> Tensor:
    """Cubic B-spline Parzen weights ``(N, bins + 3)`` of intensities in ``[0, 1]`` (rows sum to 1).

    Bin ``b`` is centred on intensity ``(b - 1) / (bins - 1)``; each value touches four neighbouring
    bins, so the weights are built sparsely and stay differentiable in ``values``.
    """
    position = values.clamp(0.0, 1.0) * (bins - 1)
    first = position.detach().floor()
    t = (position - first)[:, None]
    weights = torch.cat([(1 - t) ** 3, 3 * t**3 - 6 * t**2 + 4, -3 * t**3 + 3 * t**2 + 3 * t + 1, t**3], dim=1) / 6
    index = first.long()[:, None] + torch.arange(4, device=values.device)
    return values.new_zeros(len(values), bins + 3).scatter_add(1, index, weights)


def _mutual_information(fixed_bins: Tensor, moving: Tensor, weights: Tensor) -> Tensor:
    """Mattes-style mutual information (nats) from the joint B-spline Parzen histogram.

    ``fixed_bins`` are the fixed intensities' :func:`_bspline_bins`; ``weights`` (N,) weigh the points.
    """
    joint = fixed_bins.T @ (_bspline_bins(moving, fixed_bins.shape[1] - 3) * weights[:, None])
    joint = joint / joint.sum().clamp_min(1e-12)
    marginals = joint.sum(dim=1, keepdim=True) * joint.sum(dim=0, keepdim=True)
    return (joint * (torch.log(joint + 1e-12) - torch.log(marginals + 1e-12))).sum()

"""Spatial operations on displacement fields, in torch (CPU or GPU, batched).

Conventions (DESIGN.md §4), used everywhere in rwcflow:

* Images are tensors ``(B, C, X, Y, Z)`` whose spatial axes are the array axes ``i, j, k`` of the
  NIfTI data (no axis is ever reordered).
* A displacement field ``u`` is a tensor ``(B, 3, X, Y, Z)`` on the fixed image's grid, in voxel
  units of that grid; channel ``d`` is the displacement along array axis ``d``.
* ``u`` maps fixed voxel ``x`` to the moving position ``x + u(x)``; the warped moving image is
  ``moving(x + u(x))`` (pull-back).
* Voxel coordinates are sampled with ``align_corners=True``: voxel centre ``0`` and ``n - 1`` are the
  ends of the normalised range, so a grid resized from ``n`` to ``m`` voxels along an axis has a voxel
  size ``(n - 1) / (m - 1)`` times the original (see :func:`rwcflow.io.Grid.resized`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def identity_grid(shape: Sequence[int], *, device=None, dtype=torch.float32) -> Tensor:
    """Voxel coordinates of every voxel of ``shape``, as a ``(1, 3, X, Y, Z)`` tensor."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)[None]


def _normalised_grid(coords: Tensor, shape: Sequence[int]) -> Tensor:
    """Voxel coordinates ``(B, 3, ...)`` to ``grid_sample``'s ``(B, ..., 3)`` in ``[-1, 1]``, xyz reversed."""
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in shape], device=coords.device, dtype=coords.dtype)
    normalised = coords * scale.view(1, 3, 1, 1, 1) - 1.0
    return normalised.permute(0, 2, 3, 4, 1).flip(-1)


def sample(image: Tensor, coords: Tensor, *, mode: str = "bilinear", padding_mode: str = "border") -> Tensor:
    """Sample ``image`` ``(B, C, X, Y, Z)`` at voxel coordinates ``coords`` ``(B, 3, X', Y', Z')``.

    ``mode`` is ``"bilinear"`` (trilinear) or ``"nearest"``; ``padding_mode`` is ``"border"`` or
    ``"zeros"``. A batch of one in either argument is broadcast against the other. Sampling runs in the
    wider of the two dtypes (a half-precision image sampled at float32 coordinates gives float32), so
    that coordinates keep their sub-voxel precision on large grids.
    """
    if coords.shape[0] != image.shape[0]:
        batch = max(coords.shape[0], image.shape[0])
        coords = coords.expand(batch, *coords.shape[1:])
        image = image.expand(batch, *image.shape[1:])
    dtype = torch.promote_types(image.dtype, coords.dtype)
    grid = _normalised_grid(coords.to(dtype), image.shape[2:])
    return F.grid_sample(image.to(dtype), grid, mode=mode, padding_mode=padding_mode, align_corners=True)


# The cubic B-spline's values at whole voxels: what sampling through it does to an image at voxel centres.
BSPLINE_AT_VOXELS = (1 / 6, 4 / 6, 1 / 6)


def bspline_sample(image: Tensor, coords: Tensor) -> Tensor:
    """``image`` at voxel ``coords`` through the cubic B-spline kernel, as 8 trilinear samples (Sigg and
    Hadwiger, GPU Gems 2, 2005); borders replicated.

    Unlike trilinear interpolation, whose blur vanishes at voxel centres and peaks half-way between
    them (so that a similarity favours whole-voxel shifts), the kernel blurs alike, by a variance of
    1/3 voxel², at every sub-voxel position, and is twice differentiable: sub-voxel displacements are
    then not pulled towards the grid. It approximates rather than interpolates: an image it is compared
    with is filtered by the same kernel (:data:`BSPLINE_AT_VOXELS`), unless it is sampled alike.
    """
    base = coords.detach().floor()
    t = coords - base
    # per axis: the weights of voxels base-1..base+2, paired into two trilinear taps (weight, position)
    w1 = (3 * t**3 - 6 * t**2 + 4) / 6
    g0 = (1 - t) ** 3 / 6 + w1
    taps = ((g0, base - 1 + w1 / g0), (1 - g0, base + 1 + t**3 / (6 * (1 - g0))))
    out = 0
    for (gx, hx), (gy, hy), (gz, hz) in itertools.product(taps, repeat=3):
        weight = gx[:, 0:1] * gy[:, 1:2] * gz[:, 2:3]
        out = out + weight * sample(image, torch.cat([hx[:, 0:1], hy[:, 1:2], hz[:, 2:3]], 1))
    return out


def warp(image: Tensor, field: Tensor, *, mode: str = "bilinear", padding_mode: str = "border") -> Tensor:
    """Pull ``image`` back through ``field``: ``out(x) = image(x + field(x))``.

    ``image`` must lie on the same grid as ``field``; use :func:`sample` for other grids.
    """
    coords = identity_grid(field.shape[2:], device=field.device, dtype=field.dtype) + field
    return sample(image, coords, mode=mode, padding_mode=padding_mode)


def warp_labels(labels: Tensor, field: Tensor) -> Tensor:
    """Warp an integer label map ``(B, 1, X, Y, Z)`` by nearest neighbour (not differentiable)."""
    warped = warp(labels.to(field.dtype), field, mode="nearest", padding_mode="zeros")
    return warped.round().to(labels.dtype)


def one_hot(labels: Tensor, label_values: Sequence[int]) -> Tensor:
    """One channel per value of ``label_values`` from an integer map ``(B, 1, X, Y, Z)``, as float."""
    values = torch.as_tensor(list(label_values), device=labels.device).view(1, -1, 1, 1, 1)
    return (labels == values).float()


def warp_one_hot(one_hot_labels: Tensor, field: Tensor) -> Tensor:
    """Warp one-hot labels ``(B, L, X, Y, Z)`` linearly: soft labels through which gradients reach ``field``."""
    return warp(one_hot_labels.to(field.dtype), field, mode="bilinear", padding_mode="zeros")


def compose(first: Tensor, second: Tensor) -> Tensor:
    """The field of ``x -> x + first(x)`` followed by ``y -> y + second(y)``.

    ``warp(warp(m, second), first) == warp(m, compose(first, second))``.
    """
    return first + warp(second, first, padding_mode="border")


def resize_field(field: Tensor, shape: Sequence[int]) -> Tensor:
    """Resample ``field`` onto a grid of ``shape`` spanning the same extent, rescaling its voxel units.

    Both grids share their corner voxel centres (``align_corners=True``), so displacements along axis
    ``d`` are multiplied by ``(shape[d] - 1) / (old[d] - 1)``.
    """
    old = field.shape[2:]
    resized = F.interpolate(field, size=tuple(shape), mode="trilinear", align_corners=True)
    scale = [(new - 1) / max(o - 1, 1) for new, o in zip(shape, old)]
    return resized * torch.tensor(scale, device=field.device, dtype=field.dtype).view(1, 3, 1, 1, 1)


def box_smooth(volume: Tensor, passes: int, weights: tuple[float, float, float] | None = None) -> Tensor:
    """``passes`` separable 3-voxel filters along each spatial axis of ``(B, C, X, Y, Z)``: a box, or
    ``weights`` (left, centre, right); borders replicated."""
    for _ in range(passes):
        for dim in (2, 3, 4):
            n = volume.shape[dim]
            padded = torch.cat([volume.narrow(dim, 0, 1), volume, volume.narrow(dim, n - 1, 1)], dim)
            left, centre, right = (padded.narrow(dim, k, n) for k in range(3))
            if weights is None:
                volume = (left + centre + right) / 3
            else:
                volume = weights[0] * left + weights[1] * centre + weights[2] * right
    return volume


def integrate_velocity(velocity: Tensor, steps: int = 7) -> Tensor:
    """Scaling and squaring: the displacement of the flow of a stationary velocity field after unit time."""
    field = velocity / (2**steps)
    for _ in range(steps):
        field = compose(field, field)
    return field


def spatial_gradient(field: Tensor) -> Tensor:
    """Derivatives of every channel along each axis: ``(B, C, 3, X, Y, Z)``, central differences inside,
    one-sided at the borders (``torch.gradient``)."""
    grads = torch.gradient(field, dim=(2, 3, 4))
    return torch.stack(grads, dim=2)


def jacobian_matrix(field: Tensor) -> Tensor:
    """Jacobian of ``x -> x + field(x)``: ``(B, X, Y, Z, 3, 3)``, row = output axis, column = derivative axis."""
    grad = spatial_gradient(field).permute(0, 3, 4, 5, 1, 2)
    return grad + torch.eye(3, device=field.device, dtype=field.dtype)


def jacobian_determinant(field: Tensor) -> Tensor:
    """Determinant of the Jacobian of ``x -> x + field(x)``, ``(B, 1, X, Y, Z)``.

    In voxel units of the field's grid; the value is the same in millimetres, anisotropic voxels
    included (``det(S (I + grad u) S^-1) = det(I + grad u)``).
    """
    return torch.linalg.det(jacobian_matrix(field))[:, None]


def invert_field(field: Tensor, iterations: int = 30) -> Tensor:
    """Inverse displacement by fixed-point iteration ``v(x) = -field(x + v(x))``.

    ``compose(invert_field(field), field)`` is what the iteration drives to zero; it converges like
    ``|grad field| ** iterations``, so 30 iterations suit fields with ``|grad field|`` up to about 0.6.
    ``compose(field, invert_field(field))`` is also close to zero, up to trilinear interpolation error
    (a few hundredths of a voxel for smooth fields), where the mapping stays inside the grid.
    """
    inverse = -field
    for _ in range(iterations):
        inverse = -warp(field, inverse, padding_mode="border")
    return inverse


def affine_field(matrix: Tensor, shape: Sequence[int]) -> Tensor:
    """Displacement field ``(B, 3, X, Y, Z)`` of the voxel-to-voxel affine ``matrix`` ``(B, 4, 4)`` or ``(4, 4)``."""
    if matrix.dim() == 2:
        matrix = matrix[None]
    grid = identity_grid(shape, device=matrix.device, dtype=matrix.dtype)
    mapped = torch.einsum("bij,bjxyz->bixyz", matrix[:, :3, :3], grid.expand(matrix.shape[0], -1, -1, -1, -1))
    return mapped + matrix[:, :3, 3].view(-1, 3, 1, 1, 1) - grid

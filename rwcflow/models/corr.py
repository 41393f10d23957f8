"""Local correlation cost volume: feature distances for every displacement in a cube of search offsets.

Channel ``k`` of the volume holds, at fixed voxel ``x``, the mean over feature channels of
``|fixed(x) - moving(x + d_k)|`` for the ``k``-th offset ``d_k`` of :func:`search_offsets`, averaged
over the 3x3x3 voxels around ``x`` (a box filter with zero padding, as the reference RWCNet). Low cost
means a good match: a moving image that matches the fixed image after a displacement ``u``
(``moving(x + u) = fixed(x)``, the convention of :mod:`rwcflow.spatial`) has its minimum at ``d = u``.

On a CPU the volume is built one offset at a time into one reused feature-sized buffer, and its gradient
likewise (memory traffic is what costs there); on a GPU, where launching a few kernels per offset costs
more than their arithmetic, a chunk of offsets at a time (:data:`CHUNK_ELEMENTS`). Either way it is
box-filtered a plane of offsets at a time, so memory stays at the size of the output plus one plane of
offsets and a chunk, never ``(2r+1)^3`` feature maps on a large grid.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

Tensor = torch.Tensor


def search_offsets(radius: int) -> list[tuple[int, int, int]]:
    """The ``(2r+1)^3`` integer offsets ``(di, dj, dk)`` in channel order (the last axis varies fastest)."""
    steps = range(-radius, radius + 1)
    return list(itertools.product(steps, steps, steps))


def _windows(padded: Tensor, radius: int):
    """Index of the ``radius``-padded moving features shifted by each offset, on the unpadded grid."""
    shape = [n - 2 * radius for n in padded.shape[2:]]
    for offset in search_offsets(radius):
        yield (..., *(slice(radius + d, radius + d + n) for d, n in zip(offset, shape)))


def _box(volume: Tensor) -> Tensor:
    """3x3x3 mean with zero padding; a symmetric convolution, hence its own adjoint."""
    return F.avg_pool3d(volume, 3, stride=1, padding=1)


def _boxed_planes(volume: Tensor, radius: int):
    """``(k0, box(volume[:, k0:k0 + n]))`` for each plane of ``n = (2r+1)^2`` offsets (channels) in turn."""
    plane = (2 * radius + 1) ** 2
    for start in range(0, volume.shape[1], plane):
        yield start, _box(volume[:, start : start + plane])


#: On a GPU, the most feature values (batch x channels x offsets x voxels) a chunk of offsets holds: 2**25
#: float32 values are 128 MB, a whole plane of offsets on a first-stage grid.
CHUNK_ELEMENTS = 2**25


def _chunk_size(features: Tensor) -> int:
    """Offsets per chunk for features like ``features``: one on a CPU, on a GPU as many as
    :data:`CHUNK_ELEMENTS` allows."""
    return max(1, CHUNK_ELEMENTS // features.numel()) if features.is_cuda else 1


def _chunks(windows: list, features: Tensor) -> list[tuple[int, list]]:
    """``windows`` as ``(k0, windows[k0:k0 + n])`` with ``n`` of :func:`_chunk_size`."""
    size = _chunk_size(features)
    return [(start, windows[start : start + size]) for start in range(0, len(windows), size)]


def _differences(fixed: Tensor, padded: Tensor, windows: list, buffer: Tensor) -> Tensor:
    """``fixed - padded[window]`` for each window, as ``(B, C, len(windows), X, Y, Z)``; a single window
    into ``buffer`` (``fixed``'s shape), several with one copy of all the shifted views."""
    if len(windows) == 1:
        return torch.sub(fixed, padded[windows[0]], out=buffer).unsqueeze(2)
    return fixed.unsqueeze(2) - torch.stack([padded[window] for window in windows], dim=2)


class _CostVolume(torch.autograd.Function):
    """``cost[:, k] = box(mean_c |fixed - padded[window_k]|)``, forward and backward an offset or a chunk of offsets at a time."""

    @staticmethod
    def forward(ctx, fixed: Tensor, padded: Tensor, radius: int) -> Tensor:
        ctx.save_for_backward(fixed, padded)
        ctx.radius = radius
        cost = fixed.new_empty((fixed.shape[0], (2 * radius + 1) ** 3, *fixed.shape[2:]))
        buffer = torch.empty_like(fixed)
        for start, windows in _chunks(list(_windows(padded, radius)), fixed):
            cost[:, start : start + len(windows)] = _differences(fixed, padded, windows, buffer).abs_().mean(dim=1)
        for start, boxed in _boxed_planes(cost, radius):
            cost[:, start : start + boxed.shape[1]] = boxed
        return cost

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_cost: Tensor):
        fixed, padded = ctx.saved_tensors
        grad_fixed = torch.zeros_like(fixed) if ctx.needs_input_grad[0] else None
        grad_padded = torch.zeros_like(padded) if ctx.needs_input_grad[1] else None
        buffer = torch.empty_like(fixed)
        windows = list(_windows(padded, ctx.radius))
        for plane_start, boxed in _boxed_planes(grad_cost, ctx.radius):
            boxed.div_(fixed.shape[1])
            plane = windows[plane_start : plane_start + boxed.shape[1]]
            for start, chunk in _chunks(plane, fixed):
                grad_mean = boxed[:, start : start + len(chunk)].unsqueeze(1)
                grad = _differences(fixed, padded, chunk, buffer).sign_().mul_(grad_mean)
                if grad_fixed is not None:
                    grad_fixed += grad.sum(dim=2) if len(chunk) > 1 else grad[:, :, 0]
                if grad_padded is not None:
                    for k, window in enumerate(chunk):
                        grad_padded[window] -= grad[:, :, k]
        return grad_fixed, grad_padded, None


def standardize_costs(cost: Tensor, eps: float = 1e-3) -> Tensor:
    """Each voxel's costs over the search offsets shifted to mean 0 and scaled to standard deviation 1.

    The raw costs share a large common part (the features' mean difference) with small differences
    between offsets, which a network learns to read only slowly; standardised, the matching signal is
    all that is left, whatever the features' scale. ``eps`` keeps flat (featureless) voxels near 0.
    """
    return (cost - cost.mean(dim=1, keepdim=True)) / (cost.std(dim=1, keepdim=True, correction=0) + eps)


def correlation(fixed_features: Tensor, moving_features: Tensor, radius: int) -> Tensor:
    """Cost volume ``(B, (2r+1)^3, X, Y, Z)`` between features ``(B, C, X, Y, Z)`` on one grid.

    Outside the grid the moving features repeat their edge values. Differentiable in both inputs.
    """
    if fixed_features.shape != moving_features.shape:
        raise ValueError(f"feature shapes differ: {tuple(fixed_features.shape)} vs {tuple(moving_features.shape)}")
    padded = F.pad(moving_features, (radius,) * 6, mode="replicate") if radius else moving_features
    return _CostVolume.apply(fixed_features, padded, radius)

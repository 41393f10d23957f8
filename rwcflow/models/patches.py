"""Overlapping patches: run a network patch by patch and blend its outputs without seams, on the device.

A grid is cut into ``count`` patches per axis (``count**3`` in all) that share a fraction ``overlap``
of their size with each neighbour. Outputs are blended with separable weights that ramp up as a
raised cosine across each shared band (and stay 1 elsewhere, image borders included); the ramps of two
neighbours add to one, and the blend is normalised by the summed weights. A patch's unreliable rim,
where its own border cuts its receptive field, thus counts for little, and the stitched output is
continuous.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch

Tensor = torch.Tensor


def axis_patches(length: int, count: int, overlap: float) -> list[tuple[int, int]]:
    """``(start, size)`` of ``count`` equal patches covering ``length`` voxels; neighbours share ``overlap``
    of a patch (rounded to whole voxels)."""
    if count == 1:
        return [(0, length)]
    size = min(length, math.ceil(length / (count - (count - 1) * overlap)))
    return [(round(i * (length - size) / (count - 1)), size) for i in range(count)]


def _raised_cosine(length: int, *, device, dtype) -> Tensor:
    """Weights rising from near 0 to near 1 over ``length`` voxels; ``w(i) + w(length - 1 - i) = 1``."""
    steps = (torch.arange(length, device=device, dtype=dtype) + 0.5) / length
    return 0.5 - 0.5 * torch.cos(math.pi * steps)


def _axis_weights(patches: list[tuple[int, int]], *, device, dtype) -> list[Tensor]:
    """Blending weights of each patch along one axis, ramping across the bands shared with its neighbours."""
    weights = []
    for i, (start, size) in enumerate(patches):
        weight = torch.ones(size, device=device, dtype=dtype)
        if i > 0:
            shared = patches[i - 1][0] + patches[i - 1][1] - start
            weight[:shared] *= _raised_cosine(shared, device=device, dtype=dtype)
        if i < len(patches) - 1:
            shared = start + size - patches[i + 1][0]
            weight[size - shared :] *= _raised_cosine(shared, device=device, dtype=dtype).flip(0)
        weights.append(weight)
    return weights


def patch_regions(
    shape: Sequence[int], count: int, overlap: float, *, device=None, dtype=torch.float32
) -> list[tuple[tuple[slice, ...], Tensor]]:
    """Each patch of a grid of ``shape`` as ``(index, weight)``: ``index`` selects it from a ``(B, C, X, Y, Z)``
    tensor, ``weight`` ``(1, 1, x, y, z)`` is its blending weight."""
    per_axis = [axis_patches(n, count, overlap) for n in shape]
    weights = [_axis_weights(p, device=device, dtype=dtype) for p in per_axis]
    regions = []
    for choice in itertools.product(*(range(len(p)) for p in per_axis)):
        index = (..., *(slice(p[c][0], p[c][0] + p[c][1]) for p, c in zip(per_axis, choice)))
        wx, wy, wz = (w[c] for w, c in zip(weights, choice))
        regions.append((index, (wx[:, None, None] * wy[None, :, None] * wz[None, None, :])[None, None]))
    return regions


def run_patched(
    fn: Callable[[tuple[slice, ...]], Sequence[Tensor]],
    grid: Tensor,
    *,
    count: int,
    overlap: float,
) -> list[Tensor]:
    """Run ``fn`` on each patch of the grid of ``grid`` (a ``(B, C, X, Y, Z)`` tensor) and blend its outputs.

    ``fn(index)`` gets the patch's index (``..., slice, slice, slice``), with which it crops its own
    inputs, and returns tensors ``(B, C', x, y, z)`` on the patch. Each output is blended into a tensor
    over the whole grid, on ``grid``'s device and dtype. ``count=1`` calls ``fn`` once on the whole grid.
    Differentiable.
    """
    shape = grid.shape[2:]
    if count == 1:
        return list(fn((..., *(slice(0, n) for n in shape))))
    total = grid.new_zeros((1, 1, *shape))
    outputs: list[Tensor] = []
    for index, weight in patch_regions(shape, count, overlap, device=grid.device, dtype=grid.dtype):
        results = fn(index)
        if not outputs:
            outputs = [r.new_zeros((*r.shape[:2], *shape)) for r in results]
        for output, result in zip(outputs, results):
            output[index].addcmul_(weight, result)
        total[index].add_(weight)
    return [output.div_(total) for output in outputs]

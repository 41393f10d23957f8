"""Training and instance-optimisation losses, in torch (CPU or GPU, batched, differentiable).

Every function returns a scalar tensor to *minimise*. Images are ``(B, C, X, Y, Z)``, displacement
fields ``(B, 3, X, Y, Z)`` in voxel units (the conventions of :mod:`rwcflow.spatial`). Intensity losses
expect intensities of order one (:func:`rwcflow.io.normalize_intensity`).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import torch
import torch.nn.functional as F

from rwcflow import spatial

Tensor = torch.Tensor

# Floor of the product of the local variances in NCC, relative to the product of the global variances.
_NCC_EPS = 1e-6

# MIND-SSC compares the 12 pairs of the six face neighbours that are sqrt(2) apart (Heinrich 2013).
_SIX_NEIGHBOURS = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))
_SSC_PAIRS = tuple(
    (p, q) for p, q in combinations(_SIX_NEIGHBOURS, 2) if sum((a - b) ** 2 for a, b in zip(p, q)) == 2
)


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` over all elements, or over the voxels where ``mask`` (broadcastable) is non-zero."""
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype).expand_as(values)
    return (values * weights).sum() / weights.sum().clamp_min(torch.finfo(values.dtype).eps)


def mse_loss(fixed: Tensor, warped: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared intensity difference, over ``mask`` ``(B, 1, X, Y, Z)`` if given."""
    return _masked_mean((fixed - warped) ** 2, mask)


def _box_mean(image: Tensor, window: int) -> Tensor:
    """Local mean over a cubic ``window`` (odd, shrunk to fit small axes), borders averaged over the inside."""
    for dim, n in enumerate(image.shape[2:], start=2):
        radius = min(window, n if n % 2 else n - 1) // 2
        # one axis at a time (the border counts factor per axis), each as a difference of running sums (in
        # double precision, which the difference of two long sums needs): the means of
        # ``avg_pool3d(count_include_pad=False)``, in a time that does not grow with the window
        padding = [0] * (2 * (image.dim() - 2))
        padding[2 * (image.dim() - 1 - dim)] = radius + 1
        padding[2 * (image.dim() - 1 - dim) + 1] = radius
        sums = F.pad(image, padding).cumsum(dim, dtype=torch.float64)
        index = torch.arange(n, device=image.device)
        count = (index + radius).clamp(max=n - 1) - (index - radius).clamp(min=0) + 1
        shape = [n if d == dim else 1 for d in range(image.dim())]
        image = ((sums.narrow(dim, 2 * radius + 1, n) - sums.narrow(dim, 0, n)) / count.view(shape)).to(image.dtype)
    return image


def ncc_loss(fixed: Tensor, warped: Tensor, window: int = 9, mask: Tensor | None = None, *,
             squared: bool = False) -> Tensor:
    """``1 -`` the mean local normalised cross-correlation over cubic windows of ``window`` voxels.

    Per voxel, ``cov(f, w) / sqrt(var(f) var(w) + eps)`` over the window around it (windows are cut at
    the image border), with ``eps = 1e-6`` times the product of the images' global variances, so the loss
    is invariant to a positive linear intensity change of either image. 0 for a perfect match, 2 for an
    inverted one; windows with almost no contrast count as uncorrelated (NCC near 0). ``squared``: the
    square of the correlation, ``cov² / (var(f) var(w) + eps)``, as ANTs' ``CC`` metric (0 to 1).
    """
    if window % 2 == 0:
        raise ValueError(f"window must be odd, got {window}")
    dims = tuple(range(2, fixed.dim()))
    fixed = fixed - fixed.mean(dims, keepdim=True)  # centred: less cancellation in var = E[x^2] - E[x]^2
    warped = warped - warped.mean(dims, keepdim=True)
    eps = _NCC_EPS * fixed.detach().pow(2).mean(dims, keepdim=True) * warped.detach().pow(2).mean(dims, keepdim=True)
    mean_f, mean_w = _box_mean(fixed, window), _box_mean(warped, window)
    cov = _box_mean(fixed * warped, window) - mean_f * mean_w
    var_f = (_box_mean(fixed * fixed, window) - mean_f**2).clamp_min(0.0)
    var_w = (_box_mean(warped * warped, window) - mean_w**2).clamp_min(0.0)
    floor = var_f * var_w + eps.clamp_min(torch.finfo(eps.dtype).tiny)
    ncc = cov.square() / floor if squared else cov / torch.sqrt(floor)
    return 1.0 - _masked_mean(ncc, mask)


def _neighbour(padded: Tensor, direction: Sequence[int], distance: int) -> Tensor:
    """``image(x + distance * direction)`` on the image's grid, from the image padded by ``distance``."""
    ends = padded.shape[2:]
    return padded[(..., *(slice(distance * (1 + d), n - distance * (1 - d)) for d, n in zip(direction, ends)))]


def mind_ssc(image: Tensor, radius: int = 1, dilation: int = 2) -> Tensor:
    """MIND-SSC descriptor (Heinrich et al., MICCAI 2013), computed as in ConvexAdam.

    For each of the 12 pairs ``(p, q)`` of six-neighbourhood offsets ``sqrt(2)`` apart, scaled by
    ``dilation``: the patch distance ``D = mean over a (2 radius + 1)^3 box of (I(x + p) - I(x + q))^2``
    (replicated borders). Then ``MIND = exp(-(D - min D) / V)`` with ``V`` the mean of ``D - min D`` over
    the 12 channels, clamped to ``[1e-3, 1e3]`` times its image mean. Each input channel gives 12
    output channels: ``(B, 12 C, X, Y, Z)`` (channel order differs from ConvexAdam's, which only
    matters to compare descriptors channel by channel). Invariant to linear intensity changes.
    """
    batch, channels, *shape = image.shape
    flat = image.reshape(batch * channels, 1, *shape)
    padded = F.pad(flat, (dilation,) * 6, mode="replicate")
    distances = torch.cat(
        [(_neighbour(padded, p, dilation) - _neighbour(padded, q, dilation)) ** 2 for p, q in _SSC_PAIRS], dim=1
    )
    ssd = F.avg_pool3d(F.pad(distances, (radius,) * 6, mode="replicate"), 2 * radius + 1, stride=1)
    mind = ssd - ssd.min(dim=1, keepdim=True).values
    variance = mind.mean(dim=1, keepdim=True)
    level = variance.mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-12)
    variance = torch.clamp(variance, min=level * 1e-3, max=level * 1e3)
    mind = torch.exp(-mind / variance)
    return mind.reshape(batch, channels * len(_SSC_PAIRS), *shape)


def mind_loss(fixed: Tensor, warped: Tensor, radius: int = 1, dilation: int = 2) -> Tensor:
    """Mean squared difference of the MIND-SSC descriptors of the two images (0 for identical images)."""
    return ((mind_ssc(fixed, radius, dilation) - mind_ssc(warped, radius, dilation)) ** 2).mean()


def soft_dice_loss(fixed_onehot: Tensor, warped_onehot: Tensor, eps: float = 1e-5) -> Tensor:
    """``1 -`` the mean soft Dice over batch and channels of ``(B, L, X, Y, Z)`` (soft) one-hot labels.

    Per channel ``(2 sum(f w) + eps) / (sum(f) + sum(w) + eps)``; a channel empty in both counts as a
    perfect match. Pass only the channels to score (usually without background). Use
    :func:`rwcflow.spatial.warp_one_hot` for ``warped_onehot`` so that the gradient reaches the field.
    """
    dims = tuple(range(2, fixed_onehot.dim()))
    overlap = (fixed_onehot * warped_onehot).sum(dims)
    total = fixed_onehot.sum(dims) + warped_onehot.sum(dims)
    return 1.0 - ((2.0 * overlap + eps) / (total + eps)).mean()


def keypoint_loss(
    fixed_points: Tensor, moving_points: Tensor, field: Tensor, spacing: Sequence[float] | Tensor | None = None
) -> Tensor:
    """Mean distance between ``moving_points`` and the fixed points mapped by ``field`` (a TRE loss).

    Points are ``(N, 3)`` (or ``(B, N, 3)``) voxel coordinates of the field's grid, paired by row; the
    field is sampled trilinearly at the fixed points. With ``spacing`` (3 voxel sizes in mm) the
    distance is in millimetres, otherwise in voxels.
    """
    fixed_points, moving_points = fixed_points.to(field), moving_points.to(field)  # field's device and dtype
    points = fixed_points if fixed_points.dim() == 3 else fixed_points[None]
    coords = points.transpose(1, 2)[..., None, None]  # (B, 3, N, 1, 1)
    displacement = spatial.sample(field, coords)[..., 0, 0].transpose(1, 2)  # (B, N, 3)
    residual = moving_points - (fixed_points + displacement)
    if spacing is not None:
        residual = residual * torch.as_tensor(spacing, device=field.device, dtype=field.dtype)
    return torch.linalg.vector_norm(residual, dim=-1).mean()


def diffusion_loss(field: Tensor) -> Tensor:
    """Diffusion regulariser: the mean over the three axes of the mean squared forward difference.

    ``(mean(dx u)^2 + mean(dy u)^2 + mean(dz u)^2) / 3`` over batch, channels and voxels, so a linear
    field ``u(x) = A x`` scores ``sum(A**2) / 9`` and a constant field 0.
    """
    return sum((field.diff(dim=axis) ** 2).mean() for axis in (2, 3, 4)) / 3.0

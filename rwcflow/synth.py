"""Synthetic deformations and synthetic training pairs.

:func:`random_smooth_field` draws a random smooth (diffeomorphic) displacement field of known amplitude.
:func:`synthesize_pair` makes a training pair from one label map (and, optionally, a real image on its
grid), SynthMorph-style: the anatomy is deformed once for the moving image and once more, by a known
field ``u``, for the fixed image, so that ``warp(moving, u)`` matches the fixed image and
``warp_labels(moving_labels, u)`` the fixed labels. Each image is then rendered with random per-label
intensities (or the real image), a random gamma, a smooth multiplicative bias field, blur and noise,
which is what makes a model trained on such pairs robust to contrast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rwcflow import spatial

Tensor = torch.Tensor


def random_smooth_field(
    shape: Sequence[int],
    max_displacement: float,
    *,
    control_points: int = 5,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """A random smooth diffeomorphic displacement field ``(1, 3, X, Y, Z)`` in voxels of ``shape``.

    A random velocity on a ``control_points``³ grid is upsampled and integrated by scaling and squaring;
    the largest displacement length is ``max_displacement`` voxels.
    """
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, 3, control_points, control_points, control_points), generator=generator)
    velocity = spatial.resize_field(coarse, shape).to(device)
    velocity = velocity * (max_displacement / velocity.norm(dim=1).amax().clamp_min(1e-6))
    field = spatial.integrate_velocity(velocity)
    # Integration changes the amplitude a little: rescale to the exact maximum asked for.
    return field * (max_displacement / field.norm(dim=1).amax().clamp_min(1e-6))


@dataclass(frozen=True)
class SynthOptions:
    """How :func:`synthesize_pair` draws a pair; lengths are in voxels of the label map's grid.

    * ``max_displacement``: the fixed→moving field's largest displacement is drawn uniformly in
      ``[max_displacement / 4, max_displacement]``; ``control_points``: its smoothness, a control grid
      drawn uniformly in this range (more points, more local deformation).
    * ``anatomy_displacement``: largest displacement of the deformation shared by both images (new
      anatomy from the same label map), 0 for none.
    * ``real_intensity``: probability of rendering from the real image, when one is given; otherwise
      every label gets a random intensity in ``[0, 1]`` (background stays 0). ``independent_contrast``:
      draw the label intensities separately for the two images (multi-contrast training, for NCC or
      supervised losses; MSE needs shared contrasts).
    * ``gamma``: std of the log of a random gamma; ``bias``: largest log-amplitude of a smooth
      multiplicative bias field; ``blur``: largest Gaussian sigma; ``noise``: largest Gaussian noise std
      (on intensities in ``[0, 1]``). Each image draws its own.
    """

    max_displacement: float = 4.0
    control_points: tuple[int, int] = (4, 8)
    anatomy_displacement: float = 2.0
    real_intensity: float = 0.5
    independent_contrast: bool = False
    gamma: float = 0.25
    bias: float = 0.3
    blur: float = 1.0
    noise: float = 0.03

    def __post_init__(self) -> None:
        object.__setattr__(self, "control_points", tuple(self.control_points))
        low, high = self.control_points
        if not 2 <= low <= high:
            raise ValueError(f"control_points must be a range (low, high) with 2 <= low <= high, got {self.control_points}")
        if not 0.0 <= self.real_intensity <= 1.0:
            raise ValueError(f"real_intensity is a probability, got {self.real_intensity}")
        for name in ("max_displacement", "anatomy_displacement", "gamma", "bias", "blur", "noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class SyntheticPair:
    """Images ``(1, 1, X, Y, Z)`` in ``[0, 1]``, integer label maps of the same shape, and the true field
    ``(1, 3, X, Y, Z)`` (voxels): ``warp(moving, true_field)`` is the fixed image before its corruption."""

    fixed: Tensor
    moving: Tensor
    fixed_labels: Tensor
    moving_labels: Tensor
    true_field: Tensor


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (), generator=generator))


def _random_field(shape: Sequence[int], amplitude: float, options: SynthOptions, generator: torch.Generator,
                  device: torch.device) -> Tensor:
    """A random smooth field of largest displacement about ``amplitude`` and random smoothness (zero if 0).

    Drawn and integrated on a grid of half the resolution (the field is smooth at that scale, and this
    is 8 times cheaper), then resized to ``shape``.
    """
    if amplitude <= 0:
        return torch.zeros((1, 3, *shape), device=device)
    low, high = options.control_points
    points = int(torch.randint(low, high + 1, (), generator=generator))
    coarse = [max(2 * high, (n + 1) // 2) for n in shape]
    ratio = max((n - 1) / (m - 1) for n, m in zip(shape, coarse))
    field = random_smooth_field(coarse, amplitude / ratio, control_points=points, seed=_seed(generator), device=device)
    return spatial.resize_field(field, shape)


def gaussian_blur(volume: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian smoothing of ``(B, C, X, Y, Z)`` with ``sigma`` voxels (replicated borders)."""
    if sigma <= 0:
        return volume
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, device=volume.device, dtype=volume.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = volume.shape[1]
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = kernel.numel()
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        weight = kernel.view(1, 1, *shape).expand(channels, 1, *shape)
        volume = F.conv3d(F.pad(volume, pad, mode="replicate"), weight, groups=channels)
    return volume


def label_intensities(labels: Tensor, generator: torch.Generator) -> Tensor:
    """An image ``(1, 1, X, Y, Z)`` giving every positive label of ``labels`` a random intensity in [0, 1]."""
    table = torch.rand(int(labels.max()) + 1, generator=generator).to(labels.device)
    table[0] = 0.0
    return table[labels.long()].float()


def corrupt(image: Tensor, options: SynthOptions, generator: torch.Generator) -> Tensor:
    """Random gamma, bias field, blur and noise on an image in [0, 1]; the result is rescaled to [0, 1]."""
    image = image.clamp_min(0.0) ** math.exp(options.gamma * float(torch.randn((), generator=generator)))
    if options.bias > 0:
        coarse = torch.randn((1, 1, 4, 4, 4), generator=generator).to(image.device)
        log_bias = F.interpolate(coarse, size=image.shape[2:], mode="trilinear", align_corners=True)
        image = image * torch.exp(_uniform(generator, 0.0, options.bias) * log_bias / log_bias.abs().amax())
    image = gaussian_blur(image, _uniform(generator, 0.0, options.blur))
    noise = torch.randn(image.shape, generator=generator).to(image.device)
    image = (image + _uniform(generator, 0.0, options.noise) * noise).clamp_min(0.0)
    return image / image.amax().clamp_min(1e-6)


def synthesize_pair(
    labels: Tensor,
    image: Tensor | None = None,
    options: SynthOptions | None = None,
    *,
    generator: torch.Generator | None = None,
) -> SyntheticPair:
    """A random training pair from one integer label map ``(1, 1, X, Y, Z)`` and, optionally, a real image
    on its grid with intensities in about [0, 1] (see the module docstring and :class:`SynthOptions`)."""
    options = options or SynthOptions()
    generator = generator or torch.Generator().manual_seed(0)
    shape, device = labels.shape[2:], labels.device
    anatomy = _random_field(shape, options.anatomy_displacement, options, generator, device)
    amplitude = _uniform(generator, options.max_displacement / 4, options.max_displacement)
    true_field = _random_field(shape, amplitude, options, generator, device)
    # moving = source(x + a(x)); fixed = source(x + u(x) + a(x + u(x))) = moving(x + u(x))
    fixed_map = spatial.compose(true_field, anatomy)

    if image is not None and _uniform(generator) < options.real_intensity:
        fixed_source = moving_source = image.float()
    else:
        fixed_source = moving_source = label_intensities(labels, generator)
        if options.independent_contrast:
            moving_source = label_intensities(labels, generator)
    return SyntheticPair(
        fixed=corrupt(spatial.warp(fixed_source, fixed_map), options, generator),
        moving=corrupt(spatial.warp(moving_source, anatomy), options, generator),
        fixed_labels=spatial.warp_labels(labels, fixed_map),
        moving_labels=spatial.warp_labels(labels, anatomy),
        true_field=true_field,
    )

"""Synthetic deformations: random smooth (diffeomorphic) displacement fields of known amplitude."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rwcflow import spatial


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

"""Groupwise refinement: the sessions' template→session maps refined together against their own mean.

Registering each session to a template that is itself an average of resampled sessions is biased for
sub-voxel changes: trilinear resampling blurs an image by an amount that depends on the fractional
part of the displacement (none at whole voxels, most half-way between), so the sharp session and the
blurred template differ in texture as well as in shape, and a local volume change of a few percent
(a tenth of a voxel at a 12 mm structure's border) is under-estimated by half. As in symmetric
longitudinal registration (Yushkevich et al., NeuroImage 2010; Reuter et al., NeuroImage 2010), every
session is therefore resampled alike and compared with the others, not with a fixed reference: a
correction ``c_i`` (template voxels) per session, of zero mean over the sessions so that the template
stays where it is (no session privileged), minimises

    ``mean_i (1 - CC²(w_i, mean_{j≠i} w_j)) + regularization · mean_i diffusion(c_i)``,

``w_i(x) = S_i(φ_i(x + c_i(x)))`` the session ``S_i`` sampled once through its current map ``φ_i``
composed with the correction, and ``CC²`` the squared local correlation over small windows averaged
over the template's foreground (ANTs' ``CC`` metric). Squared intensity differences also count the
resampling blur itself, which is least at whole voxels, and so pull the maps towards the grid; a
window's correlation is normalised by its own contrast and is less sensitive to it. Even resampled
alike, two sessions whose maps differ by a fraction of a voxel are blurred differently by trilinear
interpolation, so they are sampled through the cubic B-spline kernel, whose blur is the same at every
sub-voxel position (``interpolation``). The template is then the mean of the ``w_i``. The corrections
are small (the within-subject change, after the sessions' rigid midspace, :mod:`rwcflow.midspace`): they
live on a control grid of ``control_spacing_mm``, smoothed there and interpolated
trilinearly to the template grid, and are optimised without a pyramid by L-BFGS with a strong-Wolfe line
search, which converges the corrections' fine detail in tens of iterations where Adam's equal steps per
parameter need hundreds (the defaults' validation: ``benchmarks/results/example_cpu.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rwcflow import maps, spatial, transforms
from rwcflow.io import Grid, Image
from rwcflow.losses import diffusion_loss, ncc_loss
from rwcflow.optimize import INTERPOLATIONS

Tensor = torch.Tensor


@dataclass
class GroupwiseRefinement:
    """Options of :func:`refine_groupwise`.

    * ``iterations``: L-BFGS iterations at most (each evaluates the loss once or more in its line
      search; 0: the maps are returned unchanged, the template re-averaged).
    * ``history``: L-BFGS's memory (the last updates it keeps).
    * ``regularization``: weight of the diffusion term of each correction (in template voxels).
    * ``control_spacing_mm``: distance between the corrections' control points, in mm (rounded to whole
      template voxels, at least one).
    * ``smoothing_mm``: standard deviation, in mm, of the Gaussian the corrections are smoothed with on
      the control grid (as passes of a 3-point box filter, each of variance 2/3 control spacing²). Both
      are physical so that a 1 mm and a 3 mm image of one brain get the same corrections. The corrections
      are kept smooth by this parameterisation rather than by the diffusion term, as ANTs' SyN smooths
      its updates: a diffusion weight large enough to smooth them also shrinks the change they measure.
    * ``window``: side in voxels of the cubic windows of the local correlation (odd).
    * ``interpolation``: how the sessions are sampled while they are compared, ``"linear"`` (trilinear)
      or ``"bspline"`` (:func:`rwcflow.spatial.bspline_sample`, a blur that does not depend on the
      sub-voxel position). The outputs are resampled trilinearly either way.
    """

    iterations: int = 50
    history: int = 20
    regularization: float = 1.0
    control_spacing_mm: float = 6.0
    smoothing_mm: float = 10.0
    window: int = 7
    interpolation: str = "bspline"

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.smoothing_mm < 0:
            raise ValueError("iterations and smoothing_mm must be >= 0")
        if self.control_spacing_mm <= 0:
            raise ValueError(f"control_spacing_mm must be positive, got {self.control_spacing_mm}")
        if self.history < 1 or self.regularization < 0:
            raise ValueError("history must be >= 1 and regularization >= 0")
        if self.window < 1 or self.window % 2 == 0:
            raise ValueError(f"window must be a positive odd number of voxels, got {self.window}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")

    def control_grid(self, grid: Grid) -> tuple[int, int]:
        """On ``grid``: template voxels between control points, and box-filter passes over the control grid."""
        voxel = float(np.mean(grid.spacing))
        spacing = max(1, round(self.control_spacing_mm / voxel))
        return spacing, round(1.5 * (self.smoothing_mm / (spacing * voxel)) ** 2)


class _SessionMap:
    """A template→session map on the template grid in session voxels: the voxel-to-voxel affine between
    the two grids plus a residual field, so that the map can be evaluated at displaced template points
    (:meth:`at`) with the residual, not the whole map, held constant beyond the grid's edges."""

    def __init__(self, session: Image, displacement: np.ndarray, grid: Grid, device: torch.device):
        self.grid, self.session_grid = grid, session.grid
        self.identity = spatial.identity_grid(grid.shape, device=device)
        coords = session.grid.world_to_voxel(grid.world_points() + displacement)
        coords = torch.from_numpy(np.moveaxis(coords, -1, 0)[None].astype(np.float32)).to(device)
        self.residual = coords - self._affine(self.identity)

    def _affine(self, points: Tensor) -> Tensor:
        """Session voxel coordinates of template voxel ``points`` by the grids alone (world point kept)."""
        return transforms.mapped_coordinates(self.grid, self.session_grid, np.eye(4), points - self.identity)

    def at(self, points: Tensor) -> Tensor:
        """Session voxel coordinates of the map at template voxel ``points`` ``(1, 3, X, Y, Z)``."""
        return self._affine(points) + spatial.sample(self.residual, points)


def _scaled_alike(sessions: Sequence[Image], coords: Sequence[Tensor],
                  device: torch.device) -> tuple[list[Tensor], Tensor]:
    """The sessions' intensities, each divided by its 99th percentile over the template voxels that every
    session covers with tissue through its map ``coords`` (so about ``[0, 1]``): one gain per session
    (MRI magnitudes have no offset), measured on the same anatomy, so that resampling halos, a different
    field of view or a change in one region do not scale one session differently from the others, as
    percentiles of each session's own foreground would. Also returns those voxels (``(1, 1, X, Y, Z)``, bool)."""
    warped = [spatial.sample(torch.from_numpy(s.data.astype(np.float32))[None, None].to(device), c,
                             padding_mode="zeros")[0, 0].cpu().numpy() for s, c in zip(sessions, coords)]
    common = np.logical_and.reduce([w > 1e-3 * np.abs(w).max(initial=0) for w in warped])
    if not common.any():
        raise ValueError("the sessions, mapped onto the template grid, share no foreground voxel")
    scaled = [torch.from_numpy(s.data.astype(np.float32) / float(np.percentile(w[common], 99)))[None, None].to(device)
              for s, w in zip(sessions, warped)]
    return scaled, torch.from_numpy(common)[None, None].to(device)


def _compared_voxels(tissue: Tensor, sessions: Sequence[Image], coords: Sequence[Tensor], window: int,
                     reach: int) -> Tensor:
    """The ``tissue`` voxels whose whole correlation window maps inside every session's field of view
    through ``coords``, ``reach`` voxels (the interpolation kernel's, beyond the nearest voxels) in from
    its edges: a window reaching past an edge would compare a session with its padding, and pull the maps
    there."""
    inside = torch.ones_like(tissue, dtype=torch.float32)
    for session, c in zip(sessions, coords):
        limits = torch.tensor(session.grid.shape, dtype=c.dtype, device=c.device).view(1, 3, 1, 1, 1) - 1
        inside = inside * ((c >= reach) & (c <= limits - reach)).all(dim=1, keepdim=True)
    eroded = -F.max_pool3d(-inside, window, stride=1, padding=window // 2)
    return tissue & (eroded > 0)


def refine_groupwise(
    sessions: Sequence[Image],
    displacements: Sequence[np.ndarray],
    grid: Grid,
    options: GroupwiseRefinement | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[list[np.ndarray], list[Image], Image]:
    """Refine the template→session maps of two or more ``sessions`` jointly (see the module docstring).

    ``displacements[i]`` is session ``i``'s current map as RAS-mm displacements ``(X, Y, Z, 3)`` on the
    template ``grid`` (``q = p + d(p)``, as :func:`rwcflow.transforms.read_displacement_field` returns
    an ITK field). Returns the refined displacements (same convention), the sessions resampled onto
    ``grid`` through them (trilinear, 0 outside) and the template, their voxel-wise mean.
    ``progress(done, total, loss)`` is called after every evaluation of the loss (``total``: the most
    evaluations the iterations may take).
    """
    options = options or GroupwiseRefinement()
    if len(sessions) < 2 or len(sessions) != len(displacements):
        raise ValueError(f"groupwise refinement needs two or more sessions, each with a map; got "
                         f"{len(sessions)} sessions and {len(displacements)} maps")
    device = torch.device(device)
    session_maps = [_SessionMap(s, np.asarray(d, dtype=np.float64), grid, device)
                    for s, d in zip(sessions, displacements)]
    identity = spatial.identity_grid(grid.shape, device=device)
    initial = [session_map.at(identity) for session_map in session_maps]
    values, tissue = _scaled_alike(sessions, initial, device)
    bspline = options.interpolation == "bspline"
    compared = _compared_voxels(tissue, sessions, initial, options.window, reach=1 if bspline else 0)

    spacing, passes = options.control_grid(grid)
    control_shape = [-(-(n - 1) // spacing) + 1 for n in grid.shape]  # the last control point at or past the edge

    def corrections(parameter: Tensor) -> Tensor:
        smoothed = spatial.box_smooth(parameter, passes)
        if spacing > 1:
            fine = [(n - 1) * spacing + 1 for n in control_shape]
            smoothed = F.interpolate(smoothed, size=fine, mode="trilinear", align_corners=True)
            smoothed = smoothed[:, :, : grid.shape[0], : grid.shape[1], : grid.shape[2]]
        return smoothed - smoothed.mean(0, keepdim=True)

    def composed(i: int, correction: Tensor) -> Tensor:
        return session_maps[i].at(identity + correction[i : i + 1])

    sample = spatial.bspline_sample if bspline else spatial.sample
    stacked = torch.cat(values) if len({v.shape for v in values}) == 1 else None
    parameter = torch.zeros((len(sessions), 3, *control_shape), device=device, requires_grad=True)
    voxels = float(np.prod(grid.shape))
    # the optimiser's defaults but no tolerances: it stops after the iterations asked for, or on a
    # line search that finds no decrease
    evaluations = options.iterations * 5 // 4
    optimizer = torch.optim.LBFGS([parameter], lr=1.0, max_iter=options.iterations, max_eval=evaluations,
                                  history_size=options.history, tolerance_grad=0.0, tolerance_change=0.0,
                                  line_search_fn="strong_wolfe")
    done = 0

    def loss_and_gradient() -> Tensor:
        nonlocal done
        correction = corrections(parameter)
        coords = [composed(i, correction) for i in range(len(values))]
        if stacked is not None:  # one call over the sessions: its work is split among the threads by session
            warped = sample(stacked, torch.cat(coords))
        else:
            warped = torch.cat([sample(v, c) for v, c in zip(values, coords)])
        others = (warped.sum(0, keepdim=True) - warped) / (len(values) - 1)
        loss = ncc_loss(others, warped, options.window, compared, squared=True)
        # summed over the voxels rather than averaged, so that the loss and its gradient stay well above
        # floating-point rounding on large grids
        loss = voxels * (loss + options.regularization * diffusion_loss(correction))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        done += 1
        if progress is not None:
            progress(done, evaluations, float(loss.detach()))
        return loss

    if options.iterations > 0:
        optimizer.step(loss_and_gradient)

    with torch.no_grad():
        correction = corrections(parameter)
        refined, resampled = [], []
        for i, session in enumerate(sessions):
            mapped = composed(i, correction)
            refined.append(transforms.world_displacement(mapped, grid, session.grid))
            resampled.append(transforms.sample_image(session, mapped, grid))
    return refined, resampled, maps.average_images(resampled)

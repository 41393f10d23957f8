"""RWCNet (Sivan et al. 2022): recurrence with correlation, coarse to fine, in 3-D.

Each stage works on the input grid resized by its scale. It warps the moving image by the field of
the stage before (upsampled, with its voxel units rescaled), encodes the fixed and the warped moving
image, starts its GRU from a context encoding of (field, warped moving image) plus the previous stage's
final hidden state, and refines a residual field for a few iterations: warp the moving features by
the residual, build the local cost volume, update the GRU, add the flow head's output. The stage's
field is the residual composed with the field it started from. Large grids run in overlapping
patches (:mod:`rwcflow.models.patches`).

Displacements follow :mod:`rwcflow.spatial`: ``(B, 3, X, Y, Z)`` in voxels of the grid they live on,
``warped = spatial.warp(moving, field)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rwcflow import spatial
from rwcflow.models.config import RWCNetConfig, StageConfig
from rwcflow.models.extractor import ContextEncoder, FeatureEncoder
from rwcflow.models.patches import run_patched
from rwcflow.models.update import UpdateBlock

Tensor = torch.Tensor


@dataclass
class StageOutput:
    """One stage's result on its grid: the total displacement after each GRU iteration, and the final GRU
    state (``None`` if not kept)."""

    fields: list[Tensor]
    hidden: Tensor | None

    @property
    def field(self) -> Tensor:
        """The stage's final displacement field."""
        return self.fields[-1]


@dataclass
class RWCNetOutput:
    """The final displacement ``field`` on the input grid (voxels) and every stage's :class:`StageOutput`."""

    field: Tensor
    stages: list[StageOutput]

    @property
    def hidden(self) -> Tensor | None:
        """The last stage's final hidden state on its grid (``None`` if not kept)."""
        return self.stages[-1].hidden


def stage_shape(shape: Sequence[int], scale: float) -> tuple[int, ...]:
    """The grid of a stage at ``scale`` of an input grid of ``shape`` (as :meth:`rwcflow.io.Grid.scaled`)."""
    return tuple(max(2, int(round(n * scale))) for n in shape)


def resize(volume: Tensor, shape: Sequence[int]) -> Tensor:
    """Trilinear resampling of an image or feature map onto the grid of ``shape`` spanning the same extent."""
    if tuple(volume.shape[2:]) == tuple(shape):
        return volume
    return F.interpolate(volume, size=tuple(shape), mode="trilinear", align_corners=True)


def resize_region(volume: Tensor, shape: Sequence[int], index: tuple[slice, ...]) -> Tensor:
    """``resize(volume, shape)[index]`` (``index`` ending in three slices of unit step) without resizing
    all of ``volume``; in ``volume``'s dtype."""
    axes = [
        torch.arange(*s.indices(n)[:2], device=volume.device, dtype=torch.float32) * ((m - 1) / max(n - 1, 1))
        for s, m, n in zip(index[-3:], volume.shape[2:], shape)
    ]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]
    return spatial.sample(volume, coords).to(volume.dtype)


class Stage(nn.Module):
    """One resolution level: feature and context encoders, cost volume and recurrent update block."""

    def __init__(self, config: RWCNetConfig, stage: StageConfig):
        super().__init__()
        self.iterations = stage.iterations
        self.diffeomorphic = config.diffeomorphic
        self.integration_steps = config.integration_steps
        self.features = FeatureEncoder(config)
        self.context = ContextEncoder(config)
        self.update = UpdateBlock(config, stage.radius if config.use_correlation else None)

    @property
    def frozen(self) -> bool:
        """Whether no parameter of this stage is being trained."""
        return not any(p.requires_grad for p in self.parameters())

    def displacement(self, flow: Tensor) -> Tensor:
        """The displacement that an accumulated flow stands for: itself, or its exponential if diffeomorphic."""
        if self.diffeomorphic:
            return spatial.integrate_velocity(flow, self.integration_steps)
        return flow

    def initial_hidden(self, field: Tensor, warped_moving: Tensor, previous_hidden: Tensor | None = None) -> Tensor:
        """The GRU's starting state: the context encoding plus the previous stage's hidden state, if any."""
        hidden = self.context(field, warped_moving)
        return hidden if previous_hidden is None else hidden + previous_hidden

    def forward(
        self, fixed: Tensor, warped_moving: Tensor, field: Tensor, previous_hidden: Tensor | None = None
    ) -> tuple[list[Tensor], Tensor]:
        """Refine on one grid (a whole stage grid or a patch of it).

        ``warped_moving`` is the moving image already warped by ``field``, the stage's starting field.
        Returns the accumulated residual flow after each iteration (a displacement, or a stationary
        velocity if diffeomorphic) and the final hidden state.
        """
        hidden = self.initial_hidden(field, warped_moving, previous_hidden)
        fixed_features, moving_features = self.features(fixed, warped_moving)
        flow = torch.zeros_like(field)
        flows = []
        for _ in range(self.iterations):
            moved = spatial.warp(moving_features, self.displacement(flow))
            hidden, delta = self.update(hidden, fixed_features, moved, flow)
            flow = flow + delta
            flows.append(flow)
        return flows, hidden


class RWCNet(nn.Module):
    """The multi-stage network of ``config`` (paper defaults if ``None``)."""

    def __init__(self, config: RWCNetConfig | None = None):
        super().__init__()
        self.config = config or RWCNetConfig()
        self.stages = nn.ModuleList(Stage(self.config, stage) for stage in self.config.stages)

    def forward(
        self, fixed: Tensor, moving: Tensor, *, stages: Iterable[int] | None = None, return_hidden: bool = True
    ) -> RWCNetOutput:
        """Register ``moving`` to ``fixed``, both ``(B, 1, X, Y, Z)`` on one grid with intensities about [0, 1].

        ``stages`` (indices, default all) runs only those, in order: ``range(k + 1)`` to train stage ``k``.
        ``return_hidden=False`` drops the last stage's hidden state (``None`` in the output), which at
        full resolution is the largest tensor of a run.
        """
        if fixed.dim() != 5 or fixed.shape[1] != 1 or fixed.shape != moving.shape:
            raise ValueError(
                f"fixed and moving must both be (B, 1, X, Y, Z) of one shape, got {tuple(fixed.shape)} "
                f"and {tuple(moving.shape)}"
            )
        indices = list(range(len(self.stages)) if stages is None else stages)
        if not indices:
            raise ValueError("no stage to run")
        field = hidden = None
        outputs = []
        for position, k in enumerate(indices):
            keep_hidden = return_hidden or position < len(indices) - 1
            output = self.run_stage(k, fixed, moving, field, hidden, keep_hidden=keep_hidden)
            field, hidden = output.field, output.hidden
            outputs.append(output)
        if field.shape[2:] != fixed.shape[2:]:
            field = spatial.resize_field(field, fixed.shape[2:])
        return RWCNetOutput(field, outputs)

    def run_stage(
        self,
        k: int,
        fixed: Tensor,
        moving: Tensor,
        init_field: Tensor | None = None,
        init_hidden: Tensor | None = None,
        *,
        keep_hidden: bool = True,
    ) -> StageOutput:
        """Run stage ``k`` on images ``(B, 1, X, Y, Z)`` of the input grid.

        ``init_field`` and ``init_hidden`` (the previous stage's field and hidden state, on any grid of
        the same extent) are resampled onto this stage's grid, the hidden state patch by patch; ``None``
        starts from zero. ``keep_hidden=False`` skips blending the final hidden state (``None`` in the
        output). A frozen stage runs without autograd.
        """
        stage, config = self.stages[k], self.config.stages[k]
        shape = stage_shape(fixed.shape[2:], config.scale)
        fixed, moving = resize(fixed, shape), resize(moving, shape)
        with torch.no_grad() if stage.frozen else contextlib.nullcontext():
            if init_field is None:
                field, warped = fixed.new_zeros((fixed.shape[0], 3, *shape)), moving
            else:
                field = spatial.resize_field(init_field, shape)
                warped = spatial.warp(moving, field)

            def run_patch(index: tuple[slice, ...]) -> list[Tensor]:
                previous = None if init_hidden is None else resize_region(init_hidden, shape, index)
                flows, hidden = stage(fixed[index], warped[index], field[index], previous)
                return [*flows, hidden] if keep_hidden else flows

            outputs = run_patched(run_patch, field, count=config.patches, overlap=self.config.patch_overlap)
            flows, hidden = (outputs[:-1], outputs[-1]) if keep_hidden else (outputs, None)
            fields = [spatial.compose(stage.displacement(flow), field) for flow in flows]
        return StageOutput(fields, hidden)

    def freeze_stages(self, indices: Iterable[int], frozen: bool = True) -> RWCNet:
        """Stop (or, with ``frozen=False``, resume) training stages: no gradients, eval mode, no autograd."""
        for k in indices:
            self.stages[k].requires_grad_(not frozen)
        return self.train(self.training)

    def train(self, mode: bool = True) -> RWCNet:
        """Set training mode; frozen stages stay in eval mode (no dropout)."""
        super().train(mode)
        for stage in self.stages:
            if stage.frozen:
                stage.eval()
        return self

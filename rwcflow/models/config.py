"""Configuration of the RWCNet network, stored as JSON in model files (:mod:`rwcflow.checkpoint`).

A network is a sequence of stages; each stage works on the input grid resized by ``scale`` (about
``round(n * scale)`` voxels per axis, as :meth:`rwcflow.io.Grid.scaled`), refines the field of the
stage before it for ``iterations`` GRU steps with a correlation search radius of ``radius`` voxels,
and processes its grid in ``patches`` overlapping patches per axis (``patches**3`` in all).

Ablations are configurations: ``use_correlation=False`` feeds the update block the fixed and warped
moving features instead of a cost volume; a single resolution is ``stages=(StageConfig(1.0, ...),)``;
iterations are per stage; ``diffeomorphic=True`` makes every stage's update a stationary velocity field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class StageConfig:
    """One stage: grid ``scale`` (0 < scale <= 1), GRU ``iterations``, correlation ``radius``, ``patches`` per axis."""

    scale: float
    iterations: int
    radius: int
    patches: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.scale <= 1.0:
            raise ValueError(f"stage scale must be in (0, 1], got {self.scale}")
        if self.iterations < 1:
            raise ValueError(f"stage iterations must be at least 1, got {self.iterations}")
        if self.radius < 0:
            raise ValueError(f"stage radius must be non-negative, got {self.radius}")
        if self.patches < 1:
            raise ValueError(f"stage patches per axis must be at least 1, got {self.patches}")


# The published network (Sivan et al. 2022): 1/4, 1/2 and full resolution; the whole image at 1/4,
# 2x2x2 patches of half the grid per axis (plus the overlap) at 1/2 and at full resolution.
PAPER_STAGES = (
    StageConfig(scale=0.25, iterations=12, radius=3, patches=1),
    StageConfig(scale=0.5, iterations=12, radius=3, patches=2),
    StageConfig(scale=1.0, iterations=4, radius=2, patches=2),
)


@dataclass(frozen=True)
class RWCNetConfig:
    """Every hyper-parameter of :class:`~rwcflow.models.RWCNet`; the defaults are the paper's network.

    ``encoder_*`` set MONAI ``SegResNet``'s width (``init_filters``, a multiple of 8 for its group norm)
    and depth (residual blocks per level going down and up; ``len(up) == len(down) - 1``).
    ``dropout`` applies in the feature encoder. ``standardize_costs`` standardises each voxel's costs over
    the search offsets before the motion encoder reads them (``False``: the reference's raw costs, which
    a network learns to read far more slowly). ``patch_overlap`` is the fraction of a patch shared with
    each neighbour. ``integration_steps`` is the number of squarings when ``diffeomorphic``.
    ``input_spacing_mm``: the voxel size (mm) of the images the network was trained on;
    :func:`rwcflow.register.register` runs it on a grid of that voxel size (``None``: on the fixed
    image's own grid), since its stage scales, correlation radii and learned displacements are in voxels.
    """

    stages: tuple[StageConfig, ...] = PAPER_STAGES
    feature_channels: int = 16
    hidden_channels: int = 64
    motion_channels: int = 16
    flow_head_channels: int = 128
    dropout: float = 0.5
    encoder_filters: int = 8
    encoder_blocks_down: tuple[int, ...] = (1, 2, 2, 4)
    encoder_blocks_up: tuple[int, ...] = (1, 1, 1)
    patch_overlap: float = 0.25
    use_correlation: bool = True
    standardize_costs: bool = True
    diffeomorphic: bool = False
    integration_steps: int = 7
    input_spacing_mm: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "encoder_blocks_down", tuple(self.encoder_blocks_down))
        object.__setattr__(self, "encoder_blocks_up", tuple(self.encoder_blocks_up))
        if not self.stages or not all(isinstance(s, StageConfig) for s in self.stages):
            raise ValueError("stages must be a non-empty sequence of StageConfig")
        for name in ("feature_channels", "hidden_channels", "flow_head_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.motion_channels < 8 or self.motion_channels % 4:
            raise ValueError(f"motion_channels must be a multiple of 4 and at least 8, got {self.motion_channels}")
        if self.encoder_filters < 8 or self.encoder_filters % 8:
            raise ValueError(f"encoder_filters must be a positive multiple of 8, got {self.encoder_filters}")
        if not self.encoder_blocks_down or len(self.encoder_blocks_up) != len(self.encoder_blocks_down) - 1:
            raise ValueError("encoder_blocks_up must have one entry fewer than encoder_blocks_down")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.patch_overlap < 1.0:
            raise ValueError(f"patch_overlap must be in [0, 1), got {self.patch_overlap}")
        if self.integration_steps < 0:
            raise ValueError(f"integration_steps must be non-negative, got {self.integration_steps}")
        if self.input_spacing_mm is not None and not self.input_spacing_mm > 0:
            raise ValueError(f"input_spacing_mm must be positive, got {self.input_spacing_mm}")

    def to_dict(self) -> dict:
        """Plain JSON types only (lists, numbers, booleans)."""
        data = asdict(self)
        data["stages"] = [asdict(stage) for stage in self.stages]
        data["encoder_blocks_down"] = list(self.encoder_blocks_down)
        data["encoder_blocks_up"] = list(self.encoder_blocks_up)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> RWCNetConfig:
        """The inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown RWCNet config keys: {', '.join(unknown)}")
        values = dict(data)
        if "stages" in values:
            values["stages"] = tuple(StageConfig(**stage) for stage in values["stages"])
        return cls(**values)

    @classmethod
    def tiny(cls, **changes) -> RWCNetConfig:
        """A network small enough for tests and quick CPU runs (three stages, few channels, no dropout)."""
        small = cls(
            stages=(
                StageConfig(scale=0.25, iterations=3, radius=2, patches=1),
                StageConfig(scale=0.5, iterations=3, radius=1, patches=2),
                StageConfig(scale=1.0, iterations=2, radius=1, patches=2),
            ),
            feature_channels=8,
            hidden_channels=16,
            motion_channels=8,
            flow_head_channels=16,
            dropout=0.0,
            encoder_filters=8,
            encoder_blocks_down=(1, 1),
            encoder_blocks_up=(1,),
        )
        return replace(small, **changes)

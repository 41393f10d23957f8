"""The recurrent update: motion encoder, convolutional GRU and flow head (as RAFT's update block, in 3-D)."""

from __future__ import annotations

import torch
from torch import nn

from rwcflow.models.config import RWCNetConfig
from rwcflow.models.corr import correlation, standardize_costs

Tensor = torch.Tensor


def _conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv3d:
    return nn.Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


class MotionEncoder(nn.Module):
    """Compares fixed and warped moving features and encodes the comparison together with the current flow.

    The comparison is the cost volume of search ``radius`` (per voxel standardised over the offsets if
    ``standardize``) or, with ``radius=None`` (the no-correlation ablation), the two feature maps side by
    side. It is built and reduced here, so the large cost volume is freed before the GRU runs. Returns
    ``out_channels`` channels, the last three the flow.
    """

    def __init__(self, feature_channels: int, out_channels: int, radius: int | None, standardize: bool = True):
        super().__init__()
        self.radius = radius
        self.standardize = standardize
        match_channels = 2 * feature_channels if radius is None else (2 * radius + 1) ** 3
        half = out_channels // 2
        self.match = nn.Sequential(_conv(match_channels, half, 1), nn.ReLU(), _conv(half, half, 3), nn.ReLU())
        self.flow = nn.Sequential(_conv(3, half // 2, 7), nn.ReLU(), _conv(half // 2, half, 3), nn.ReLU())
        self.merge = nn.Sequential(_conv(2 * half, out_channels - 3, 3), nn.ReLU())

    def compare(self, fixed_features: Tensor, moving_features: Tensor) -> Tensor:
        """The matching signal: cost volume, or the concatenated features."""
        if self.radius is None:
            return torch.cat([fixed_features, moving_features], dim=1)
        cost = correlation(fixed_features, moving_features, self.radius)
        return standardize_costs(cost) if self.standardize else cost

    def forward(self, fixed_features: Tensor, moving_features: Tensor, flow: Tensor) -> Tensor:
        match = self.match(self.compare(fixed_features, moving_features))
        merged = self.merge(torch.cat([match, self.flow(flow)], dim=1))
        return torch.cat([merged, flow], dim=1)


class ConvGRU(nn.Module):
    """Convolutional GRU with separate convolutions for the update gate ``z``, reset gate ``r`` and candidate ``q``."""

    def __init__(self, hidden_channels: int, input_channels: int):
        super().__init__()
        self.convz = _conv(hidden_channels + input_channels, hidden_channels, 3)
        self.convr = _conv(hidden_channels + input_channels, hidden_channels, 3)
        self.convq = _conv(hidden_channels + input_channels, hidden_channels, 3)

    def forward(self, hidden: Tensor, x: Tensor) -> Tensor:
        hx = torch.cat([hidden, x], dim=1)
        z = self.convz(hx).sigmoid_()
        r = self.convr(hx).sigmoid_()
        q = self.convq(torch.cat([r * hidden, x], dim=1)).tanh_()
        return (1 - z) * hidden + z * q


class FlowHead(nn.Module):
    """Hidden state to a flow update ``(B, 3, X, Y, Z)`` in voxels.

    Both convolutions keep PyTorch's default initialisation, as RAFT's: started near zero (the reference
    RWCNet), the output scales every upstream gradient down to nothing, and a new stage sat at a zero
    field for hundreds of steps before its encoders began to learn.
    """

    def __init__(self, hidden_channels: int, channels: int):
        super().__init__()
        self.conv1 = _conv(hidden_channels, channels, 3)
        self.act = nn.LeakyReLU(inplace=True)
        self.conv2 = _conv(channels, 3, 3)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.conv2(self.act(self.conv1(hidden)))


class UpdateBlock(nn.Module):
    """One refinement step: ``(hidden, fixed features, warped moving features, flow) -> (new hidden, flow update)``.

    The GRU's input is the motion features and the warped moving features. ``radius`` is the cost
    volume's search radius, or ``None`` to compare by concatenation.
    """

    def __init__(self, config: RWCNetConfig, radius: int | None):
        super().__init__()
        self.encoder = MotionEncoder(config.feature_channels, config.motion_channels, radius, config.standardize_costs)
        self.gru = ConvGRU(config.hidden_channels, config.motion_channels + config.feature_channels)
        self.flow_head = FlowHead(config.hidden_channels, config.flow_head_channels)

    def forward(
        self, hidden: Tensor, fixed_features: Tensor, moving_features: Tensor, flow: Tensor
    ) -> tuple[Tensor, Tensor]:
        motion = self.encoder(fixed_features, moving_features, flow)
        hidden = self.gru(hidden, torch.cat([motion, moving_features], dim=1))
        return hidden, self.flow_head(hidden)

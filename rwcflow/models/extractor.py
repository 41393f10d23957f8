"""Feature and context encoders: MONAI ``SegResNet`` encoder-decoders at the resolution of their input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rwcflow.models.config import RWCNetConfig

Tensor = torch.Tensor


class Encoder(nn.Module):
    """A ``SegResNet`` mapping ``(B, in, X, Y, Z)`` to ``(B, out, X, Y, Z)`` for any ``X, Y, Z``.

    Inputs are padded (edge values repeated) at the far end of each axis to the multiple of
    ``2 ** (levels - 1)`` that the network's downsamplings need, and the output is cropped back.
    """

    def __init__(self, in_channels: int, out_channels: int, config: RWCNetConfig, *, dropout: float = 0.0):
        # imported here: importing monai takes seconds (it loads its data and transform modules too), which
        # every command line paid at start, networks or not
        from monai.networks.nets import SegResNet

        super().__init__()
        self.net = SegResNet(
            spatial_dims=3,
            init_filters=config.encoder_filters,
            in_channels=in_channels,
            out_channels=out_channels,
            dropout_prob=dropout or None,
            blocks_down=config.encoder_blocks_down,
            blocks_up=config.encoder_blocks_up,
        )
        self.multiple = 2 ** (len(config.encoder_blocks_down) - 1)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape[2:]
        pad = [-n % self.multiple for n in shape]
        if any(pad):
            x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")
        return self.net(x)[..., : shape[0], : shape[1], : shape[2]]


class PairedChannelDropout(nn.Module):
    """Channel dropout for a batch ``cat([fixed, moving])``: both images of a pair lose the same channels.

    Independent masks (as ``nn.Dropout3d`` in the reference) would make the fixed and moving features
    two different random functions while training, and their cost volume a comparison of unlike things.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty((x.shape[0] // 2, x.shape[1], *[1] * (x.dim() - 2))).bernoulli_(1 - self.p) / (1 - self.p)
        return x * torch.cat([keep, keep])


class FeatureEncoder(Encoder):
    """Features ``(B, feature_channels, X, Y, Z)`` of a fixed and a moving image ``(B, 1, X, Y, Z)``,
    encoded as one batch, with the config's dropout shared by the two."""

    def __init__(self, config: RWCNetConfig):
        super().__init__(1, config.feature_channels, config, dropout=config.dropout)
        if config.dropout:
            self.net.dropout = PairedChannelDropout(config.dropout)

    def forward(self, fixed: Tensor, moving: Tensor) -> tuple[Tensor, Tensor]:
        return super().forward(torch.cat([fixed, moving])).chunk(2)


class ContextEncoder(Encoder):
    """The GRU's initial hidden state from the initial field and the moving image warped by it, in ``(-1, 1)``."""

    def __init__(self, config: RWCNetConfig):
        super().__init__(4, config.hidden_channels, config)

    def forward(self, field: Tensor, warped_moving: Tensor) -> Tensor:
        return torch.tanh(super().forward(torch.cat([field, warped_moving], dim=1)))

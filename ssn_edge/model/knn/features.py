"""PatchCore's locally aware patch features (paper 3.1) from the project's frozen trunk."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssn_edge.config import ModelConfig
from ssn_edge.model.backbones import BACKBONES
from ssn_edge.model.ssn import FeatureExtractor


def channel_pool_matrix(channels: int, out: int) -> Tensor:
    """(out, channels): row i averages the channels adaptive_avg_pool1d puts in bin i. As a fixed 1x1 conv it is
    one MatMul in the exported graph instead of a pooling op over the channel axis."""
    if not 1 <= out <= channels:
        raise ValueError(f"knn.channels must be between 1 and the backbone's {channels} feature channels, got {out}")
    eye = torch.eye(channels)[None]  # (1, C, C): column j is channel j's indicator
    return F.adaptive_avg_pool1d(eye, out)[0].T.contiguous()


class PatchFeatures(nn.Module):
    """layer2 and layer3, each averaged over its 3x3 neighbourhood (a patch's local context), layer3 upsampled to
    layer2's size, concatenated: (B, C, H/8, W/8). PatchCore then averages the channels down to a fixed size
    (`channels`; None keeps all, e.g. 128 + 256 for ResNet18)."""

    stride = 8  # the map's resolution relative to the input: layer2's

    def __init__(self, cfg: ModelConfig, channels: int | None = None):
        super().__init__()
        # The trunk is SuperSimpleNet's: same weights file, same fixed-seed random init when pretrained is false.
        self.trunk = FeatureExtractor(cfg).trunk
        full = sum(BACKBONES[cfg.backbone].feature_channels)
        self.pool = nn.AvgPool2d(kernel_size=3, stride=1, padding=1)
        reduce = None if channels is None or channels == full else channel_pool_matrix(full, channels)
        self.register_buffer("reduce", reduce[:, :, None, None] if reduce is not None else None, persistent=False)
        self.channels = full if reduce is None else channels

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            l2, l3 = self.trunk(x)
        l2, l3 = self.pool(l2), self.pool(l3)
        l3 = F.interpolate(l3, size=l2.shape[-2:], mode="bilinear", align_corners=False)
        f = torch.cat([l2, l3], dim=1)
        return F.conv2d(f, self.reduce) if self.reduce is not None else f

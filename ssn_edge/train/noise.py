"""Feature-space anomalies: Gaussian noise added to the adapted features inside a Perlin mask (spec 2).

P = A + eps * M_a. "fixed" is the paper's eps ~ N(0, sigma^2); "adaptive" scales sigma by each channel's
spread in the current batch, so a backbone with larger features (ResNet18 vs WRN50) gets noise of the same
relative size without hand-tuning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssn_edge.config import NoiseConfig


def smooth_unit_noise(eps: Tensor, sigma: float) -> Tensor:
    """Blur unit Gaussian noise spatially (per channel) and rescale so each element keeps unit variance.

    Real anomalies reach the heads through the 3x3 local-context pooling, so they are spatially coherent
    at feature resolution; i.i.d. per-pixel noise is not, and the classification head's 5x5 convolution
    can learn to spot that texture instead of "unlike normal features". Blurring removes the shortcut.
    """
    radius = max(1, int(round(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    # A separable blur of i.i.d. unit noise has variance (sum k^2)^2: divide by its square root.
    gain = float((k**2).sum())
    c = eps.shape[1]
    kh = (k / gain**0.5).view(1, 1, -1, 1).repeat(c, 1, 1, 1)
    kw = (k / gain**0.5).view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    eps = F.conv2d(F.pad(eps, (0, 0, radius, radius), mode="reflect" if eps.shape[-2] > radius else "replicate"), kh, groups=c)
    return F.conv2d(F.pad(eps, (radius, radius, 0, 0), mode="reflect" if eps.shape[-1] > radius else "replicate"), kw, groups=c)


def unit_noise(like: Tensor, smooth: float | None) -> Tensor:
    """Unit Gaussian noise (float32) with the shape of `like`, blurred by `smooth` (feature pixels) when set:
    what the fixed and adaptive noise scale, and what the learned generator starts from."""
    eps = torch.randn_like(like, dtype=torch.float32)
    return smooth_unit_noise(eps, smooth) if smooth else eps


def sample_noise(features: Tensor, cfg: NoiseConfig) -> Tensor:
    """eps with the shape of `features` (B, C, h, w)."""
    eps = unit_noise(features, cfg.smooth)
    if cfg.kind == "fixed":
        return eps * cfg.sigma
    if cfg.kind == "adaptive":
        std = features.detach().float().std(dim=(0, 2, 3), keepdim=True)
        return eps * (cfg.sigma * std)
    if cfg.kind == "learned":
        raise ValueError("noise kind 'learned' is drawn by ssn_edge.train.generator.NoiseGenerator, not sample_noise")
    raise ValueError(f"unknown noise kind {cfg.kind!r}")


def apply_noise(features: Tensor, eps: Tensor, mask: Tensor) -> Tensor:
    """P = A + eps * M_a, with M_a (B, 1, h, w) broadcast over channels."""
    return features + (eps * mask).to(features.dtype)

"""Feature-space anomalies: Gaussian noise added to the adapted features inside a Perlin mask (spec 2).

P = A + eps * M_a. "fixed" is the paper's eps ~ N(0, sigma^2); "adaptive" scales sigma by each channel's
spread in the current batch, so a backbone with larger features (ResNet18 vs WRN50) gets noise of the same
relative size without hand-tuning.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssn_edge.config import NoiseConfig


def sample_noise(features: Tensor, cfg: NoiseConfig) -> Tensor:
    """eps with the shape of `features` (B, C, h, w)."""
    eps = torch.randn_like(features, dtype=torch.float32)
    if cfg.kind == "fixed":
        return eps * cfg.sigma
    if cfg.kind == "adaptive":
        std = features.detach().float().std(dim=(0, 2, 3), keepdim=True)
        return eps * (cfg.sigma * std)
    if cfg.kind == "learned":
        raise ValueError("noise kind 'learned' is drawn by ssn_edge.model.generator.NoiseGenerator, not sample_noise")
    raise ValueError(f"unknown noise kind {cfg.kind!r}")


def noise_sigma(cfg: NoiseConfig, epoch: int, epochs: int) -> float:
    """sigma for a (0-based) epoch: constant, or annealed linearly from sigma to sigma_end.

    Large noise makes the task easy to learn early; smaller noise later puts the heads' decision boundary
    closer to normal features, where real defects (weaker than a large synthetic anomaly) must land.
    """
    if cfg.sigma_end is None or epochs <= 1:
        return cfg.sigma
    return cfg.sigma + (cfg.sigma_end - cfg.sigma) * epoch / (epochs - 1)


def apply_noise(features: Tensor, eps: Tensor, mask: Tensor) -> Tensor:
    """P = A + eps * M_a, with M_a (B, 1, h, w) broadcast over channels."""
    return features + (eps * mask).to(features.dtype)

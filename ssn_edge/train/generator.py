"""A learned noise generator for SSN's synthetic feature-space anomalies (spec 4; noise.kind: learned).

    eps = tanh(n + G(A, n, z)) * beta * std(A)

n is unit Gaussian noise over the map, blurred like the adaptive noise (noise.smooth), and G is two 1x1 convs
over concat(A, n, z): the adapted features A (detached: G never trains the adaptor), n, and a random vector z
broadcast over the map. G's last layer starts at zero, so training starts from bounded adaptive noise and G
learns an adversarial *departure* from it. Why: in the first design (G over concat(A, z), z a vector, no n)
the perturbation's pattern over the map came from A alone, z being constant over it, and training on it went
badly: on bottle, pixel AUROC 38 after 3 epochs (fixed noise: 71) and, at beta 1.0 over 12 epochs, AUPRO 14.

std(A) is each channel's standard deviation over the batch and the map, detached. Because of that factor,
beta is *relative to the feature scale*: |eps| <= beta * std per channel, so the same beta means the same
thing for ResNet18, WRN50 or any other backbone, where the paper's fixed sigma = 0.015 is tuned to WRN50's
feature scale only. For the same reason G sees A standardised per channel, which makes eps exactly
proportional to the feature scale (G(k * A) = k * G(A)). tanh of unit noise has an RMS of about 0.63, so
beta 1.5 starts at about the adaptive noise's sigma 1.0.

The generator is used in training only (ssn_edge.train.learned); it is not part of SuperSimpleNet, so the
inference graph and its cost are unchanged. It is trained adversarially: it maximises the heads' SSN loss
on the features it perturbs, with an L2 magnitude penalty (see `magnitude_penalty`); tanh bounds eps, which
the spec reports is what keeps this game from diverging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssn_edge.train.noise import unit_noise

SATURATED = 0.95  # |tanh| above this counts as saturated in the logged statistics


@dataclass
class GeneratedNoise:
    eps: Tensor  # (B, C, h, w) float32; |eps| <= scale
    unit: Tensor  # tanh(G(A, z)) in [-1, 1], same shape
    scale: Tensor  # (1, C, 1, 1) beta * per-channel std(A), detached
    beta: float

    def magnitude_penalty(self) -> Tensor:
        """L_mag = mean(eps^2 / (beta * std)^2) = mean(tanh^2): in [0, 1] whatever beta and the backbone."""
        return self.unit.float().pow(2).mean()

    def stats(self) -> dict[str, float]:
        """eps_rel_mean: mean |eps| / std(A) (= beta * mean |tanh|, at most beta); eps_saturated: the
        fraction of elements with |tanh| > 0.95 (G pressing against its bound)."""
        unit = self.unit.detach().float().abs()
        return {"eps_rel_mean": self.beta * float(unit.mean()), "eps_saturated": float((unit > SATURATED).float().mean())}


class NoiseGenerator(nn.Module):
    """G: concat(standardised A.detach(), n, z) -> Conv1x1 -> LeakyReLU(0.2) -> Conv1x1 (zero init) -> C channels,
    added to n before the tanh."""

    def __init__(self, channels: int, z_dim: int = 16, hidden: int = 128, beta: float = 0.1,
                 smooth: float | None = None):
        super().__init__()
        if beta <= 0:
            raise ValueError(f"noise.beta must be > 0, got {beta}")
        self.channels = channels
        self.z_dim = z_dim
        self.beta = float(beta)
        self.smooth = smooth
        self.net = nn.Sequential(
            nn.Conv2d(2 * channels + z_dim, hidden, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(hidden, channels, 1),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-normal weights and zero biases (as SSN's heads), except the last layer, all zero: G starts as
        the identity on n, so the first epochs train on the adaptive noise's shape (bounded by the tanh)."""
        for m in self.net:
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.net[-1].weight)

    def perturb(self, features: Tensor, z: Tensor | None = None, noise: Tensor | None = None) -> GeneratedNoise:
        """eps for `features` (B, C, h, w); z (B, z_dim) and the unit noise n (B, C, h, w) are drawn from
        torch's generator when not given (n blurred by `smooth`)."""
        a = features.detach().float()
        if a.shape[1] != self.channels:
            raise ValueError(f"generator built for {self.channels} channels, got features with {a.shape[1]}")
        mean = a.mean(dim=(0, 2, 3), keepdim=True)
        std = a.std(dim=(0, 2, 3), keepdim=True, correction=0)
        x = (a - mean) / (std + 1e-6)
        if z is None:
            z = torch.randn(a.shape[0], self.z_dim)
        if noise is None:
            noise = unit_noise(x, self.smooth)
        zmap = z.to(x.dtype)[:, :, None, None].expand(-1, -1, *a.shape[-2:])
        n = noise.to(x.dtype)
        unit = torch.tanh(n + self.net(torch.cat([x, n, zmap], dim=1)))
        scale = self.beta * std
        return GeneratedNoise(eps=unit.float() * scale, unit=unit, scale=scale, beta=self.beta)

    def forward(self, features: Tensor, z: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
        return self.perturb(features, z, noise).eps

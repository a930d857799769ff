"""A learned noise generator for SSN's synthetic feature-space anomalies (spec 4; noise.kind: learned).

    eps = tanh(G(A, z)) * beta * std(A)

G is two 1x1 convs over concat(A, z): the adapted features A (detached: G never trains the adaptor) and a
random vector z broadcast over the map (stochasticity, so G cannot memorise one perturbation per image).
std(A) is each channel's standard deviation over the batch and the map, detached. Because of that factor,
beta is *relative to the feature scale*: |eps| <= beta * std per channel, so the same beta (0.05 to 0.1)
means the same thing for ResNet18, WRN50 or any other backbone, where the paper's fixed sigma = 0.015 is
tuned to WRN50's feature scale only. For the same reason G sees A standardised per channel, which makes
eps exactly proportional to the feature scale (G(k * A) = k * G(A)).

The generator is used in training only (ssn_edge.train); it is not part of SuperSimpleNet, so the
inference graph and its cost are unchanged. It is trained adversarially: it maximises the heads' SSN loss
on the features it perturbs, with an L2 magnitude penalty (see `magnitude_penalty`); tanh bounds eps, which
the spec reports is what keeps this game from diverging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

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
    """G: concat(standardised A.detach(), z) -> Conv1x1 -> LeakyReLU(0.2) -> Conv1x1 -> C channels."""

    def __init__(self, channels: int, z_dim: int = 16, hidden: int = 128, beta: float = 0.1):
        super().__init__()
        if beta <= 0:
            raise ValueError(f"noise.beta must be > 0, got {beta}")
        self.channels = channels
        self.z_dim = z_dim
        self.beta = float(beta)
        self.net = nn.Sequential(
            nn.Conv2d(channels + z_dim, hidden, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(hidden, channels, 1),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-normal weights, zero biases (as SSN's heads): at the start tanh's output has a spread of
        about 0.5, so eps is neither negligible nor saturated before G has learnt anything."""
        for m in self.net:
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def perturb(self, features: Tensor, z: Tensor | None = None) -> GeneratedNoise:
        """eps for `features` (B, C, h, w); z (B, z_dim) is drawn from torch's generator when not given."""
        a = features.detach().float()
        if a.shape[1] != self.channels:
            raise ValueError(f"generator built for {self.channels} channels, got features with {a.shape[1]}")
        mean = a.mean(dim=(0, 2, 3), keepdim=True)
        std = a.std(dim=(0, 2, 3), keepdim=True, correction=0)
        x = (a - mean) / (std + 1e-6)
        if z is None:
            z = torch.randn(a.shape[0], self.z_dim)
        zmap = z.to(x.dtype)[:, :, None, None].expand(-1, -1, *a.shape[-2:])
        unit = torch.tanh(self.net(torch.cat([x, zmap], dim=1)))
        scale = self.beta * std
        return GeneratedNoise(eps=unit.float() * scale, unit=unit, scale=scale, beta=self.beta)

    def forward(self, features: Tensor, z: Tensor | None = None) -> Tensor:
        return self.perturb(features, z).eps

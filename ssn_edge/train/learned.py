"""The learned-noise game (noise.kind learned, spec 4): the generator's adversarial step and its training state.

The heads train on the generator's noise as on any other; every noise.heads_per_gen heads steps the generator
takes one step that maximises the heads' loss under its magnitude penalty. The generator exists in training
only (ssn_edge.train.generator); the exported model never sees it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ssn_edge.config import Recipe
from ssn_edge.model.ssn import SuperSimpleNet
from ssn_edge.train.generator import NoiseGenerator
from ssn_edge.train.schedule import autocast
from ssn_edge.train.step import check_finite, train_step

Z_DIM = 16  # random vector fed to G (stochasticity, spec 4)
HIDDEN = 128  # G's hidden width (1x1 convs)


def build_generator(model: SuperSimpleNet, recipe: Recipe) -> tuple[NoiseGenerator, torch.optim.Optimizer]:
    """The learned-noise generator for model's adapted features and its own AdamW."""
    n = recipe.noise
    if model.heads.cls_input != "adapted":
        raise ValueError("noise.kind 'learned' needs model.cls_input 'adapted' (the generator perturbs A)")
    if n.heads_per_gen < 1:
        raise ValueError(f"noise.heads_per_gen must be >= 1, got {n.heads_per_gen}")
    if n.mag_weight < 0:
        raise ValueError(f"noise.mag_weight must be >= 0, got {n.mag_weight}")
    generator = NoiseGenerator(model.heads.adaptor.out_channels, Z_DIM, HIDDEN, n.beta, n.smooth)
    return generator, torch.optim.AdamW(generator.parameters(), lr=n.gen_lr)


def generator_update(
    model: SuperSimpleNet,
    recipe: Recipe,
    generator: NoiseGenerator,
    optimizer: torch.optim.Optimizer,
    l2: Tensor,
    l3: Tensor,
    gt: Tensor,
    mask_valid: Tensor,
    rng: np.random.Generator,
    crop: int | None = None,
    where: tuple[int, int, int] = (0, 0, 1),
) -> tuple[float, dict[str, float]]:
    """One adversarial step of the generator on freshly noised features (new Perlin masks, new z).

    Only the generator moves: gradients are taken for its parameters alone, and the heads' BatchNorm running
    statistics, which the forward pass in train mode updates, are put back. where = (epoch, step, steps)
    names the place in a divergence error. Returns the objective's value and its parts.
    """
    saved = {name: buf.clone() for name, buf in model.heads.named_buffers()}
    try:
        with autocast(recipe.train):
            objective, parts = train_step(
                model, recipe, l2, l3, gt, mask_valid, rng, crop, generator=generator, generator_step=True
            )
        check_finite(objective, "generator", *where)
        params = [p for p in generator.parameters() if p.requires_grad]
        grads = torch.autograd.grad(objective, params)
    finally:
        with torch.no_grad():
            for name, buf in model.heads.named_buffers():
                buf.copy_(saved[name])
    optimizer.zero_grad(set_to_none=True)
    for param, grad in zip(params, grads):
        param.grad = grad
    optimizer.step()
    return float(objective.detach()), parts


@dataclass
class LearnedNoise:
    """The generator's side of a run: G, its optimiser and the heads steps taken (G steps every heads_per_gen)."""

    generator: NoiseGenerator
    optimizer: torch.optim.Optimizer
    heads_steps: int = 0

    @classmethod
    def build(cls, model: SuperSimpleNet, recipe: Recipe) -> LearnedNoise:
        return cls(*build_generator(model, recipe))

    def state(self) -> dict:
        """What a checkpoint keeps to resume the game exactly."""
        return {"state": self.generator.state_dict(), "optimizer": self.optimizer.state_dict(),
                "heads_steps": self.heads_steps}

    def restore(self, saved: dict) -> None:
        self.generator.load_state_dict(saved["state"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.heads_steps = int(saved["heads_steps"])

    def after_heads_step(self, model: SuperSimpleNet, recipe: Recipe, batch: tuple[Tensor, Tensor, Tensor, Tensor],
                         rng: np.random.Generator, crop: int | None, where: tuple[int, int, int]) -> float | None:
        """Count a heads step; when the generator's turn has come, take its step on the same batch (l2, l3, gt,
        mask_valid) and return its objective."""
        self.heads_steps += 1
        if self.heads_steps % recipe.noise.heads_per_gen:
            return None
        value, _ = generator_update(model, recipe, self.generator, self.optimizer, *batch, rng, crop, where)
        return value

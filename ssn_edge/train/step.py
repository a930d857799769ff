"""One training step of SSN (spec 2): feature duplication, Perlin-masked noise, targets, losses.

The adapted features of a batch are duplicated and each copy gets its own Perlin mask and noise; noise goes
only outside real defects; the map learns from synthetic and real defect pixels, the score from each image's
label. Unsupervised, the map is detached where it enters the classification head (stop-grad).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ssn_edge.config import Recipe
from ssn_edge.model.ssn import SuperSimpleNet, Window
from ssn_edge.train.generator import GeneratedNoise, NoiseGenerator
from ssn_edge.train.losses import focal_loss, ssn_loss
from ssn_edge.train.noise import apply_noise, sample_noise
from ssn_edge.train.perlin import perlin_masks


class NonFiniteLossError(FloatingPointError):
    """Training diverged: a loss became NaN or infinite. The message names the epoch and step."""


def check_finite(loss: Tensor, what: str, epoch: int, step: int, steps: int) -> None:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"{what} loss is {value} at epoch {epoch + 1}, step {step + 1}/{steps}: training diverged "
            "(try a smaller noise.beta, noise.gen_lr or a larger noise.mag_weight)"
        )


def random_window(size: tuple[int, int], crop: int | None, rng: np.random.Generator) -> Window | None:
    """A random crop window (y, x, h, w), at most crop x crop, of a map of this size; None: the whole map."""
    if not crop:
        return None
    h, w = size
    ch, cw = min(crop, h), min(crop, w)
    y = int(rng.integers(0, h - ch + 1))
    x = int(rng.integers(0, w - cw + 1))
    return y, x, ch, cw


def cropped_features(model: SuperSimpleNet, l2: Tensor, l3: Tensor, gt: Tensor, crop: int | None,
                     rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """The merged features and the pixel truth of the same random crop (None: the whole map). The crop is merged
    alone (FeatureExtractor.merge's window), not cut from the whole merged map."""
    window = random_window(tuple(gt.shape[-2:]), crop, rng)
    if window is None:
        return model.features.merge(l2, l3), gt
    y, x, h, w = window
    return model.features.merge(l2, l3, window), gt[..., y : y + h, x : x + w]


@dataclass
class StepTargets:
    """A duplicated batch's targets: where synthetic noise goes and what each pixel and image should be."""

    synthetic: Tensor  # (2B, 1, h, w) 1 where noise is put: a Perlin mask outside real defects
    target: Tensor  # (2B, 1, h, w) defect pixels, synthetic or real
    pixel_valid: Tensor  # (2B, 1, h, w) bool: pixels whose truth is known
    label: Tensor  # (2B,) image targets
    mask_valid: Tensor  # (2B,) bool: the defect's mask (or absence of defect) is known


def duplicated_targets(gt: Tensor, mask_valid: Tensor, perlin_threshold: float, rng: np.random.Generator) -> StepTargets:
    """Targets of the duplicated batch (spec 2): both copies get independent Perlin masks, and noise only outside
    real defects. gt (B, 1, h, w): 1 defect, 0 normal, < 0 unknown (a pseudo-mask's rest)."""
    gt = torch.cat([gt, gt])
    mask_valid = torch.cat([mask_valid, mask_valid])
    perlin = torch.from_numpy(perlin_masks(len(gt), tuple(gt.shape[-2:]), rng, perlin_threshold))[:, None]
    known = gt >= 0
    gt = gt.clamp(min=0)
    synthetic = perlin.float() * (1 - gt)
    target = torch.clamp(synthetic + gt, max=1.0)
    # A defective image with no usable mask: its pixels are unknown except where we put noise ourselves.
    pixel_valid = (mask_valid[:, None, None, None] & known) | (synthetic > 0)
    # ~mask_valid: defective, mask unknown; unknown pixels in view: may hold the defect, so not called normal
    label = ((target.flatten(1).amax(1) > 0) | ~mask_valid | ~known.flatten(1).all(1)).float()
    return StepTargets(synthetic, target, pixel_valid, label, mask_valid)


def score_reaches_map(recipe: Recipe) -> bool:
    """weak.label_only_score_to_map as it applies to this recipe's (resolved) setting."""
    chosen = recipe.weak.label_only_score_to_map
    return chosen if chosen is not None else recipe.train.setting != "weak"


def _detach_map(recipe: Recipe, mask_valid: Tensor) -> bool | Tensor:
    """Where the classification loss may not bend the map: everywhere unsupervised (the paper's stop-grad), and on
    label-only defects when their score loss is kept off the map."""
    if recipe.train.setting == "unsupervised":
        return True
    return False if score_reaches_map(recipe) else ~mask_valid


def train_step(
    model: SuperSimpleNet,
    recipe: Recipe,
    l2: Tensor,
    l3: Tensor,
    gt: Tensor,
    mask_valid: Tensor,
    rng: np.random.Generator,
    crop: int | None = None,
    generator: NoiseGenerator | None = None,
    generator_step: bool = False,
) -> tuple[Tensor, dict[str, float]]:
    """One forward pass with synthetic anomalies on (a crop of) the feature map; returns the loss and its parts.

    generator (noise.kind: learned): eps comes from it instead of sample_noise. For the heads' step its output
    is detached and the loss is the heads' SSN loss (parts gain eps_rel_mean, eps_saturated). With
    generator_step the returned loss is the generator's objective, -SSN loss + mag_weight * L_mag: minimising
    it maximises the heads' loss under the magnitude penalty (parts gain ssn and mag).
    """
    n = recipe.noise
    feats, gt = cropped_features(model, l2, l3, gt, crop, rng)
    adapted = model.heads.adaptor(feats)
    adapted = torch.cat([adapted, adapted])  # feature duplication (spec 2)
    targets = duplicated_targets(gt, mask_valid, n.perlin_threshold, rng)
    generated = None
    if generator is None:
        eps = sample_noise(adapted, n)
    else:
        with contextlib.nullcontext() if generator_step else torch.no_grad():
            generated = generator.perturb(adapted)
        eps = generated.eps
    noised = apply_noise(adapted, eps, targets.synthetic)
    cls_features = noised
    if model.heads.cls_input == "backbone":  # the journal variant: the score's conv sees noised backbone features
        feats2 = torch.cat([feats, feats])
        cls_features = apply_noise(feats2, sample_noise(feats2, n), targets.synthetic)
    map_logits, score = model.heads.decide(noised, cls_features, detach_map=_detach_map(recipe, targets.mask_valid))
    return _loss(model, recipe, map_logits, score, targets, generated, generator_step)


def _loss(model: SuperSimpleNet, recipe: Recipe, map_logits: Tensor, score: Tensor, targets: StepTargets,
          generated: GeneratedNoise | None, generator_step: bool) -> tuple[Tensor, dict[str, float]]:
    gamma = recipe.train.cls_focal_gamma
    if model.heads.cam:
        # The CAM baseline learns from image labels alone (real and synthetic): its map gets no pixel loss.
        cls = focal_loss(score, targets.label, gamma=gamma)
        return cls, {"cls_focal": float(cls.detach())}
    loss, parts = ssn_loss(map_logits, score, targets.target, targets.label, targets.pixel_valid, cls_gamma=gamma)
    if generated is None:
        return loss, parts
    parts.update(generated.stats())
    if not generator_step:
        return loss, parts
    penalty = generated.magnitude_penalty()
    parts.update(ssn=float(loss.detach()), mag=float(penalty.detach()))
    return -loss + recipe.noise.mag_weight * penalty, parts

"""SSN training (spec 2): feature duplication, Perlin-masked noise, truncated L1 + focal losses, AdamW groups,
MultiStep schedule; unsupervised, supervised, weak and mixed (spec 5, `ssn_edge.data.supervision`). The frozen backbone's features are cached when no
augmentation changes them, so an epoch costs only the adaptor and heads."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from ssn_edge.model.checkpoint import load_checkpoint, save_checkpoint
from ssn_edge.config import Recipe, recipe_from_dict, with_map_gate
from ssn_edge.data import ArraySet
from ssn_edge.evaluation.evaluate import evaluate_model
from ssn_edge.model.backbones import weights_fingerprint
from ssn_edge.model.load import model_from_checkpoint
from ssn_edge.train.generator import NoiseGenerator
from ssn_edge.train.losses import focal_loss, ssn_loss, top_k_mil_loss
from ssn_edge.train.noise import apply_noise, noise_sigma, sample_noise
from ssn_edge.train.perlin import perlin_masks
from ssn_edge.model.ssn import SuperSimpleNet
from ssn_edge.model.tiled import crop_features
from ssn_edge.train.paste import PasteConfig, with_pasted_defects
from ssn_edge.train.pseudo import KnnPseudoConfig, PseudoMaskConfig, knn_pseudo_masks, with_pseudo_masks
from ssn_edge.data.supervision import apply_setting

log = logging.getLogger("ssn_edge")

# Flip views used to augment defective images in supervised training: (flip height, flip width).
VIEWS: tuple[tuple[bool, bool], ...] = ((False, False), (False, True), (True, False), (True, True))


def seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def _flip(x: Tensor, view: tuple[bool, bool]) -> Tensor:
    dims = [d for d, on in zip((-2, -1), view) if on]
    return torch.flip(x, dims) if dims else x


@dataclass
class TrainItems:
    """What an epoch iterates over: (image index, flip view) pairs, split into normal and defective."""

    normal: np.ndarray  # (n, 2) int
    defective: np.ndarray  # (m, 2) int

    @property
    def all(self) -> np.ndarray:
        return np.concatenate([self.normal, self.defective]) if len(self.defective) else self.normal


def draw_defective(defective: np.ndarray, mask_valid: np.ndarray, n: int, share: float | None,
                   rng: np.random.Generator) -> np.ndarray:
    """n (image, view) pairs for a batch's defective half, with replacement. share (train.masked_share): that
    fraction from defects with a mask and the rest from label-only ones, so a few masks are not drowned out by
    many labels (mixed); None, or only one kind present: uniform over all."""
    has_mask = mask_valid[defective[:, 0]]
    if share is None or has_mask.all() or not has_mask.any():
        return defective[rng.integers(0, len(defective), n)]
    k = int(round(n * share))
    masked, label_only = defective[has_mask], defective[~has_mask]
    return np.concatenate([masked[rng.integers(0, len(masked), k)], label_only[rng.integers(0, len(label_only), n - k)]])


def make_items(arrays: ArraySet, recipe: Recipe) -> TrainItems:
    good = np.flatnonzero(arrays.labels == 0)
    bad = np.flatnonzero(arrays.labels == 1)
    if recipe.train.setting == "unsupervised":
        if len(bad):
            log.warning("unsupervised setting: %d defective training images are ignored", len(bad))
        bad = bad[:0]
    elif not len(bad):
        raise ValueError(f"{recipe.train.setting} setting needs defective images in the training split; none found")
    views = range(len(VIEWS)) if recipe.train.flip_augment else [0]
    normal = np.stack([good, np.zeros_like(good)], axis=1)
    defective = np.array([(i, v) for i in bad for v in views], dtype=np.int64).reshape(-1, 2)
    return TrainItems(normal, defective)


@dataclass
class SharedFeatures:
    """Tiled training with a shared backbone: item r's maps are cut from its whole image's maps (image r // T,
    tile box boxes[r % T], T = len(boxes)), so the heads learn on exactly what the shared-backbone graph gives
    them at inference, context beyond the tile edge included, instead of a lone tile's zero padding."""

    images: np.ndarray  # (N, 3, H', W') normalised, zero-padded to the tile grid as the "image" graph pads
    boxes: list[tuple[int, int, int, int]]  # (y0, x0, y1, x1) in image pixels


def _flipped_box(box: tuple[int, int, int, int], view: tuple[bool, bool], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where a tile box lies in the flipped image: the flipped tile with its flipped context."""
    y0, x0, y1, x1 = box
    h, w = size
    if view[0]:
        y0, y1 = h - y1, h - y0
    if view[1]:
        x0, x1 = w - x1, w - x0
    return y0, x0, y1, x1


class FeatureSource:
    """Backbone (layer2, layer3) maps for training items: computed once and cached, or on every step."""

    def __init__(
        self,
        model: SuperSimpleNet,
        arrays: ArraySet,
        items: np.ndarray,
        cache: bool,
        batch: int = 16,
        shared: SharedFeatures | None = None,
    ):
        self.model = model
        self.arrays = arrays
        self.shared = shared
        self.cache: dict[tuple[int, int], tuple[Tensor, Tensor]] | None = None
        if cache:
            self.cache = {}
            for start in tqdm(range(0, len(items), batch), desc="caching backbone features", leave=False):
                chunk = items[start : start + batch]
                l2, l3 = self._compute(chunk)
                for k, (i, v) in enumerate(chunk):
                    self.cache[(int(i), int(v))] = (l2[k].clone(), l3[k].clone())

    def _compute(self, chunk: np.ndarray) -> tuple[Tensor, Tensor]:
        if self.shared is not None:
            return self._compute_shared(chunk)
        x = torch.stack([_flip(torch.from_numpy(self.arrays.images[i]), VIEWS[v]) for i, v in chunk])
        return self.model.features.raw(x)

    def _compute_shared(self, chunk: np.ndarray) -> tuple[Tensor, Tensor]:
        t = len(self.shared.boxes)
        x = torch.stack([_flip(torch.from_numpy(self.shared.images[i // t]), VIEWS[v]) for i, v in chunk])
        l2, l3 = self.model.features.raw(x)
        crops = [
            crop_features(l2[k], l3[k], _flipped_box(self.shared.boxes[int(i) % t], VIEWS[v], tuple(x.shape[-2:])))
            for k, (i, v) in enumerate(chunk)
        ]
        return torch.stack([c[0] for c in crops]), torch.stack([c[1] for c in crops])

    def get(self, chunk: np.ndarray) -> tuple[Tensor, Tensor]:
        if self.cache is None:
            return self._compute(chunk)
        pairs = [self.cache[(int(i), int(v))] for i, v in chunk]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


UNKNOWN = -1.0  # a ground-truth pixel whose truth is unknown (a pseudo-mask's margin): no pixel loss there


def feature_masks(arrays: ArraySet, chunk: np.ndarray, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Ground-truth masks at feature size (bilinear, then > 0.5, as in the paper; UNKNOWN where arrays.ignore
    touches a feature pixel that is not a defect) and per-sample validity."""
    def small(planes: np.ndarray) -> Tensor:
        big = torch.stack([_flip(torch.from_numpy(planes[i]).float()[None], VIEWS[v]) for i, v in chunk])
        return F.interpolate(big, size=size, mode="bilinear", align_corners=False)

    defect = small(arrays.masks) > 0.5
    gt = defect.float()
    if arrays.ignore is not None:
        gt[(small(arrays.ignore) > 0.25) & ~defect] = UNKNOWN
    valid = torch.from_numpy(arrays.mask_valid[chunk[:, 0]].copy())
    return gt, valid


def build_optimizer(model: SuperSimpleNet, recipe: Recipe) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    t = recipe.train
    heads = model.heads
    head_params = [p for n, p in heads.named_parameters() if not n.startswith("adaptor.")]
    optimizer = torch.optim.AdamW(
        [
            {"params": heads.adaptor.parameters(), "lr": t.lr_adaptor},
            {"params": head_params, "lr": t.lr_heads, "weight_decay": t.weight_decay},
        ]
    )
    milestones = sorted({max(1, int(round(f * t.epochs))) for f in t.lr_milestones})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=t.lr_gamma)
    return optimizer, scheduler


def _restart_schedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.MultiStepLR, epoch: int) -> None:
    """Put the schedule of *this* recipe at `epoch`: a resumed run may have been given more epochs, which
    moves the milestones, so the saved scheduler state is not reused."""
    passed = sum(count for m, count in scheduler.milestones.items() if m <= epoch)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * scheduler.gamma**passed
    scheduler.last_epoch = epoch
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _random_crop(tensors: list[Tensor], crop: int | None, rng: np.random.Generator) -> list[Tensor]:
    if not crop:
        return tensors
    h, w = tensors[0].shape[-2:]
    ch, cw = min(crop, h), min(crop, w)
    y = int(rng.integers(0, h - ch + 1))
    x = int(rng.integers(0, w - cw + 1))
    return [t[..., y : y + ch, x : x + cw] for t in tensors]


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
    t, n = recipe.train, recipe.noise
    supervised = t.setting != "unsupervised"  # real defects in the batch: the score may shape the map
    feats = model.features.merge(l2, l3)
    mil = None
    if t.mil_top is not None and supervised and not model.heads.cam and not generator_step:
        label_only = torch.nonzero(~mask_valid).flatten()[: t.mil_items]
        if len(label_only):  # before the crop: the whole map, clean, as at inference
            mil = top_k_mil_loss(model.heads.segmentation(model.heads.adaptor(feats[label_only])), t.mil_top)
    feats, gt = _random_crop([feats, gt], crop, rng)
    if t.channels_last:
        feats = feats.contiguous(memory_format=torch.channels_last)
    adapted = model.heads.adaptor(feats)

    # Feature duplication: both copies get independent Perlin masks and noise (spec 2).
    adapted = torch.cat([adapted, adapted])
    feats2 = torch.cat([feats, feats])
    gt = torch.cat([gt, gt])
    mask_valid = torch.cat([mask_valid, mask_valid])
    size = tuple(adapted.shape[-2:])
    perlin = torch.from_numpy(perlin_masks(len(adapted), size, rng, n.perlin_threshold, n.empty_prob))[:, None]
    known = gt >= 0
    gt = gt.clamp(min=0)
    synthetic = perlin.float() * (1 - gt)  # noise only outside real defects
    if generator is None:
        eps = sample_noise(adapted, n)
    else:
        with contextlib.nullcontext() if generator_step else torch.no_grad():
            generated = generator.perturb(adapted)
        eps = generated.eps
    noised = apply_noise(adapted, eps, synthetic)
    if model.heads.cls_input == "backbone":
        if generator is not None:
            raise ValueError("noise.kind 'learned' needs model.cls_input 'adapted' (the generator perturbs A)")
        cls_features = apply_noise(feats2, sample_noise(feats2, n), synthetic)
    else:
        cls_features = noised

    target = torch.clamp(synthetic + gt, max=1.0)
    # A defective image with no usable mask: its pixels are unknown except where we put noise ourselves.
    pixel_valid = (mask_valid[:, None, None, None] & known) | (synthetic > 0)
    # ~mask_valid: defective, mask unknown; unknown pixels in view: may hold the defect, so not called normal
    label = ((target.flatten(1).amax(1) > 0) | ~mask_valid | ~known.flatten(1).all(1)).float()

    detach: bool | Tensor = not supervised
    if supervised and not t.label_only_score_to_map:
        detach = ~mask_valid  # label-only defects: their score loss stays off the map
    map_logits, score = model.heads.decide(noised, cls_features, detach_map=detach)
    if model.heads.cam:
        # The CAM baseline learns from image labels alone (real and synthetic): its map gets no pixel loss.
        cls = focal_loss(score, label, gamma=t.cls_focal_gamma)
        return cls, {"cls_focal": float(cls.detach())}
    loss, parts = ssn_loss(map_logits, score, target, label, pixel_valid, cls_gamma=t.cls_focal_gamma,
                           real=gt > 0.5, real_weight=t.real_pixel_weight)
    if mil is not None:
        loss = loss + mil
        parts["mil"] = float(mil.detach())
    if generator is None:
        return loss, parts
    parts.update(generated.stats())
    if not generator_step:
        return loss, parts
    penalty = generated.magnitude_penalty()
    parts.update(ssn=float(loss.detach()), mag=float(penalty.detach()))
    return -loss + n.mag_weight * penalty, parts


@torch.no_grad()
def _merged(model: SuperSimpleNet, source: FeatureSource, indices: np.ndarray) -> Tensor:
    """The merged backbone features of images `indices` as training sees them unflipped (from the cache)."""
    return model.features.merge(*source.get(np.stack([indices, np.zeros_like(indices)], axis=1)))


class NonFiniteLossError(FloatingPointError):
    """Training diverged: a loss became NaN or infinite. The message names the epoch and step."""


def _check_finite(loss: Tensor, what: str, epoch: int, step: int, steps: int) -> None:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"{what} loss is {value} at epoch {epoch + 1}, step {step + 1}/{steps}: training diverged "
            "(try a smaller noise.beta, noise.gen_lr or a larger noise.mag_weight)"
        )


def build_generator(model: SuperSimpleNet, recipe: Recipe) -> tuple[NoiseGenerator, torch.optim.Optimizer]:
    """The learned-noise generator for model's adapted features (training only) and its own AdamW."""
    n = recipe.noise
    if model.heads.cls_input != "adapted":
        raise ValueError("noise.kind 'learned' needs model.cls_input 'adapted' (the generator perturbs A)")
    if n.heads_per_gen < 1:
        raise ValueError(f"noise.heads_per_gen must be >= 1, got {n.heads_per_gen}")
    if n.mag_weight < 0:
        raise ValueError(f"noise.mag_weight must be >= 0, got {n.mag_weight}")
    generator = NoiseGenerator(model.heads.adaptor.out_channels, n.z_dim, n.gen_hidden, n.beta, n.smooth)
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
        with _autocast(recipe):
            objective, parts = train_step(
                model, recipe, l2, l3, gt, mask_valid, rng, crop, generator=generator, generator_step=True
            )
        _check_finite(objective, "generator", *where)
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
class TrainResult:
    checkpoint: Path
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def _autocast(recipe: Recipe):
    if recipe.train.precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(
    recipe: Recipe,
    train_arrays: ArraySet,
    out_dir: Path,
    test_arrays: ArraySet | None = None,
    resume: Path | None = None,
    progress: bool = True,
    epoch_callback: Callable[[int, dict[str, float]], None] | None = None,
    shared: SharedFeatures | None = None,
) -> TrainResult:
    # Resolve the supervision first: "auto" becomes what the data allows, weak drops every mask, and the
    # checkpoint (and so the bundle) records the setting that actually trained the model.
    train_arrays, supervision = apply_setting(train_arrays, recipe.train.setting, recipe.data.mask_fraction)
    if recipe.train.paste_copies and shared is not None:
        # a tile's features are cut from its whole image's maps (SharedFeatures): a pasted tile has no whole image
        raise ValueError("train.paste_copies does not combine with tiled training on shared backbone features; set "
                         "tiling.shared_backbone: false (tiles pasted as images of their own) or train.paste_copies: 0")
    if recipe.train.paste_copies and supervision.setting != "unsupervised":
        # a generator of its own, so the pasted set depends on the seed only, not on anything drawn before it
        paste_rng = np.random.default_rng([recipe.train.seed, 0x9A57E])
        train_arrays, pasted = with_pasted_defects(train_arrays, PasteConfig(copies=recipe.train.paste_copies), paste_rng)
        if not pasted["pasted"]:
            missing = "normal image to paste onto" if pasted["paste_sources"] else "defective training image with a usable mask"
            log.warning("train.paste_copies: no %s; nothing pasted", missing)
        supervision = dataclasses.replace(supervision, pasted=pasted["pasted"])
    # Pseudo-masks are always made from the data as given (a refresh replaces the last ones), and the batch balance
    # counts annotated masks only (as_given.mask_valid), so pseudo-masks never pass for annotation (a pasted defect's
    # mask is annotation, moved).
    as_given = train_arrays
    log.info("training data: %s", supervision.describe())
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, setting=supervision.setting))
    t = recipe.train
    rng = seed_everything(t.seed)
    model = SuperSimpleNet(recipe.model)
    optimizer, scheduler = build_optimizer(model, recipe)
    # noise.kind "learned": a generator trained against the heads (spec 4); it exists in training only.
    learned = recipe.noise.kind == "learned"
    generator, gen_optimizer, heads_steps = None, None, 0
    if learned:
        generator, gen_optimizer = build_generator(model, recipe)
    start_epoch, history = 0, []
    if resume is not None:
        state = load_checkpoint(resume)
        model.heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        if learned and "generator" in state:
            generator.load_state_dict(state["generator"]["state"])
            gen_optimizer.load_state_dict(state["generator"]["optimizer"])
            heads_steps = int(state["generator"]["heads_steps"])
        elif learned:
            log.warning("%s has no noise generator (not a learned-noise run): starting a fresh one", resume)
        start_epoch = int(state["epoch"])
        _restart_schedule(optimizer, scheduler, start_epoch)
        history = list(state.get("history", []))
        torch.set_rng_state(state["rng"]["torch"])
        rng.bit_generator.state = state["rng"]["numpy"]
        log.info("resumed from %s at epoch %d", resume, start_epoch)
    if t.channels_last:
        model.heads.to(memory_format=torch.channels_last)

    items = make_items(train_arrays, recipe)
    source = FeatureSource(model, train_arrays, items.all, cache=t.cache_features, shared=shared)
    supervised = t.setting != "unsupervised"
    clip = t.clip_grad_norm if t.clip_grad_norm is not None else (1.0 if supervised else None)
    half = max(1, t.batch_size // 2)
    backbone = {
        "name": recipe.model.backbone,
        "weights_source": getattr(model.features.trunk, "weights_source", "unknown"),
        "fingerprint": weights_fingerprint(model.features.trunk),
    }
    out_dir = Path(out_dir)
    ckpt_path = out_dir / "checkpoint.pt"

    model.heads.train()
    pseudo_from = None if t.pseudo_mask_epoch is None else max(t.pseudo_mask_epoch, start_epoch)
    # the knn teacher and a finished checkpoint's map do not change with the model
    refresh = t.pseudo_refresh and t.pseudo_source == "map" and t.pseudo_teacher is None
    teacher = None
    if supervised and pseudo_from is not None and t.pseudo_teacher is not None:
        teacher = _pseudo_teacher(Path(t.pseudo_teacher), recipe)
    bar = tqdm(range(start_epoch, t.epochs), desc="train", disable=not progress, initial=start_epoch, total=t.epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        pseudo: dict[str, float] = {}
        make_pseudo = pseudo_from is not None and (epoch == pseudo_from or (refresh and epoch > pseudo_from))
        if supervised and make_pseudo and t.pseudo_source == "knn":
            config = KnnPseudoConfig(top=t.pseudo_top, border=t.pseudo_border)
            train_arrays, pseudo = knn_pseudo_masks(lambda idx: _merged(model, source, idx), as_given, config, seed=t.seed)
        elif supervised and make_pseudo:
            # Weak defects get pseudo-masks from the map the model has learned so far (ssn_edge.train.pseudo); a
            # resumed run makes them again from the resumed model.
            config = PseudoMaskConfig(top=t.pseudo_top, rest=t.pseudo_rest, grow_quantile=t.pseudo_grow)
            train_arrays, pseudo = with_pseudo_masks(teacher or model, as_given, config, seed=t.seed)
        if pseudo:
            log.info("pseudo-masks (%s): %d of %d label-only defective images (%.2f %% of their pixels marked defect)",
                     t.pseudo_source, pseudo["pseudo_masked"], pseudo["pseudo_candidates"],
                     100 * pseudo.get("pseudo_defect_fraction", 0))
        if supervised:
            order = rng.permutation(len(items.normal))
            batches = [
                np.concatenate([items.normal[order[s : s + half]],
                                draw_defective(items.defective, as_given.mask_valid, half, t.masked_share, rng)])
                for s in range(0, len(order), half)
            ]
        else:
            order = rng.permutation(len(items.normal))
            batches = [items.normal[order[s : s + t.batch_size]] for s in range(0, len(order), t.batch_size)]
        # Crops make early epochs 4x cheaper; the last ones see whole maps, so the classification head's global
        # max/avg pooling is tuned on the statistics it meets at inference.
        crop = t.feature_crop if (t.crop_epochs is None or epoch < t.crop_epochs) else None
        step_recipe = recipe
        if recipe.noise.sigma_end is not None:
            sigma = noise_sigma(recipe.noise, epoch, t.epochs)
            step_recipe = dataclasses.replace(recipe, noise=dataclasses.replace(recipe.noise, sigma=sigma))
        losses = []
        noise_kw = {"generator": generator} if learned else {}
        eps_parts, gen_losses = [], []
        for step, chunk in enumerate(batches):
            l2, l3 = source.get(chunk)
            gt, valid = feature_masks(train_arrays, chunk, (l2.shape[-2] * 2, l2.shape[-1] * 2))
            with _autocast(recipe):
                loss, parts = train_step(model, step_recipe, l2, l3, gt, valid, rng, crop, **noise_kw)
            if learned:
                _check_finite(loss, "heads", epoch, step, len(batches))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.heads.parameters(), clip)
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if learned:
                eps_parts.append(parts)
                heads_steps += 1
                if heads_steps % recipe.noise.heads_per_gen == 0:
                    where = (epoch, step, len(batches))
                    value, _ = generator_update(model, recipe, generator, gen_optimizer, l2, l3, gt, valid, rng, crop, where)
                    gen_losses.append(value)
        scheduler.step()
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "epoch_s": time.perf_counter() - t0}
        record.update(pseudo)
        if learned:
            # What the heads were trained on this epoch: mean |eps| / feature std (<= beta), fraction saturated.
            record["eps_rel_mean"] = float(np.mean([p["eps_rel_mean"] for p in eps_parts]))
            record["eps_saturated"] = float(np.mean([p["eps_saturated"] for p in eps_parts]))
            record["gen_steps"] = len(gen_losses)
            if gen_losses:
                record["gen_loss"] = float(np.mean(gen_losses))
        if test_arrays is not None and t.eval_every and (epoch + 1) % t.eval_every == 0 and epoch + 1 < t.epochs:
            record.update(evaluate_model(model, test_arrays))
            model.heads.train()
            log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.2f}" for k, v in record.items() if k != "epoch"))
        history.append(record)
        if epoch_callback:
            epoch_callback(epoch + 1, record)
        payload = {
            "recipe": recipe.to_dict(),
            "heads": model.heads.state_dict(),
            "backbone": backbone,
            "supervision": supervision.to_dict(),
            "epoch": epoch + 1,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": rng.bit_generator.state},
            "history": history,
        }
        if learned:
            payload["generator"] = {
                "state": generator.state_dict(),
                "optimizer": gen_optimizer.state_dict(),
                "heads_steps": heads_steps,
            }
        save_checkpoint(ckpt_path, payload)
    metrics: dict[str, float] = {}
    if test_arrays is not None:
        metrics = evaluate_model(model, test_arrays)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out_dir / "history.json").write_text(json.dumps(history, indent=2))
    return TrainResult(ckpt_path, history, metrics)


def _pseudo_teacher(path: Path, recipe: Recipe) -> SuperSimpleNet:
    """train.pseudo_teacher: the finished model whose map makes this run's pseudo-masks; it must see the images
    through the same backbone, or its map would be read off different features."""
    # checked on the recorded recipe first: building another backbone with this run's weights would fail deep
    # inside load_state_dict
    taught = recipe_from_dict(load_checkpoint(path)["recipe"])
    if (taught.model.backbone, tuple(taught.data.image_size)) != (recipe.model.backbone, tuple(recipe.data.image_size)):
        raise ValueError(f"{path}: train.pseudo_teacher was trained with {taught.model.backbone} at "
                         f"{list(taught.data.image_size)}; this run uses {recipe.model.backbone} at {list(recipe.data.image_size)}")
    log.info("pseudo-masks from the map of %s", path)
    return model_from_checkpoint(path, recipe.model.weights)[0]



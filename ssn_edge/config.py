"""Recipes: typed configuration for training and export, loaded from YAML and validated key by key."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml


class RecipeError(ValueError):
    """A recipe with an unknown key or a value of the wrong type; the message names the key."""


@dataclass
class DataConfig:
    path: str = ""
    image_size: tuple[int, int] = (256, 256)
    # Use the masks of only this fraction of the defective training images (per defect type, chosen with
    # mask_seed); the others train with their image label only. 1.0: every mask the data has.
    mask_fraction: float = 1.0
    mask_seed: int = 0
    # Normal training images held out of training, to set the decision thresholds on (ssn_edge.data.samples.
    # split_validation): this fraction of them, at least val_min, at most half, chosen with val_seed; 0: none.
    val_fraction: float = 0.1
    val_min: int = 10
    val_seed: int = 0


@dataclass
class ModelConfig:
    kind: str = "ssn"  # the model family: "ssn" (SuperSimpleNet) or "knn" (nearest-neighbour memory bank, knn section)
    backbone: str = "resnet18"
    weights: str | None = None  # a checkpoint file; None: torch hub cache, then download
    pretrained: bool = True  # false must be said explicitly to train on random features
    cls_input: str = "adapted"  # "adapted" (paper) or "backbone" (journal: cls conv sees non-adapted features)
    adaptor_channels: int | None = None  # None: same as the backbone's feature channels
    seg_hidden: int = 1024
    cls_hidden: int = 128
    cls_kernel: int = 5
    # "full": Conv kxk over C+1 channels at feature resolution (paper; ~55 % of ResNet18-SSN compute);
    # "light": Conv1x1 C+1 -> cls_hidden, then depthwise kxk stride 2 (LightClassificationHead);
    # "light_separable": the same with BN+ReLU between and stride 1 (SeparableClassificationHead);
    # "light_bottleneck": Conv1x1 C+1 -> cls_hidden/4, BN, ReLU, dense kxk stride 2 (BottleneckClassificationHead);
    # "cam": the weak-supervision baseline, GAP classifier whose class-activation map is the map (CamHead).
    cls_head: str = "full"
    # "none": the score is the classification head's logit (paper). "map_max": the head's logit is added to the
    # map's max logit (SimpleNet's score) and its fc starts at zero, so the head learns a correction to the map
    # instead of a score from scratch; for light heads, whose pooled features alone score worse than the map.
    # "map_top": the same with the mean of the map's top anchor_top cells in place of its maximum.
    # "auto": trained as "none", then the score is whichever of the head's logit, the map's maximum and (anchor_top
    # > 0) the top cells' mean ranks the held-out check set best (ssn_edge.data.heldout: held-out normals, their
    # painted copies and, unsupervised, the training split's defective images); ties keep the earlier of the three.
    # The checkpoint records the choice.
    score_anchor: str = "none"
    # The anchored score's map maximum is taken after a Gaussian blur of this sigma, in map pixels (1.0: the map as
    # post-processed; 0: the raw maximum logit, what recipes recorded before this option). Chosen on held-out data.
    anchor_blur: float = 1.0
    # The fraction of the (blurred) map's cells that map_top averages; 0: map_top is not offered to auto.
    anchor_top: float = 0.0
    # "none": the map output is the segmentation head's logits (paper). "score": the inference graph outputs
    # log P(pixel defective) = log sigmoid(map) + log sigmoid(score), the pixel's probability given a defect times
    # the image's: one image-wide shift, so each map's ranking is unchanged while the maps of images the classifier
    # calls normal sink below those of defective ones. Training and pseudo-masks use the ungated logits.
    map_gate: str = "none"
    # A memory bank beside the heads (ssn_edge/model/memory_bank.py): after training, a coreset of the normal
    # training images' features (the knn section's settings) is fitted, and the map becomes SSN's map plus each
    # patch's distance to its nearest bank patch, each standardised on the held-out normals. Fitted, not trained;
    # the score is decided after it (score_anchor auto). Supervised Magnetic tile, test AUPRO: benchmarks/README.md.
    memory_bank: bool = False
    # The weight of SSN's standardised map in that sum (1: equal terms; 0: the bank's distances alone). Applied after
    # fitting, so it changes no trained weight. Chosen on held-out data per recipe: benchmarks/README.md.
    memory_bank_ssn_weight: float = 1.0


@dataclass
class NoiseConfig:
    # The defaults are the CPU schedule's (as TrainConfig's). "adaptive": eps ~ N(0, (sigma * std)^2), std each
    # adapted channel's spread in the batch, so it fits any backbone. "fixed": N(0, sigma^2), the paper's, whose
    # sigma 0.015 is tuned to WRN50 features: ResNet18 scores near chance with it (bottle image AUROC 50.21, 3 seeds;
    # benchmarks/results/frontier.md). "learned": a generator trained against the heads (spec 4; beta and below).
    kind: str = "adaptive"
    sigma: float = 1.0
    # Blur the unit noise spatially with this sigma (feature pixels), same variance: real anomalies reach the heads
    # through the 3x3 local-context pooling, spatially coherent, and i.i.d. noise is a texture the 5x5 head could
    # key on. None: i.i.d. (the paper).
    smooth: float | None = 1.0
    perlin_threshold: float = 0.2  # 0.2 MVTec AD; 0.6 for thin, small defects (VisA, KSDD2, Magnetic tile)
    # kind "learned" only (spec 4): eps = tanh(n + G(A, n, z)) * beta * per-channel std(A), n unit noise blurred by
    # smooth, G trained adversarially (ssn_edge.train.generator). beta 1.5 starts at about adaptive sigma 1.0
    # (bottle 99.92 / AUPRO 91.88, Magnetic tile 70.52 / 54.84, 3 seeds, none diverged).
    beta: float = 1.5  # bound on |eps| relative to each channel's feature std
    gen_lr: float = 1e-4  # G's AdamW learning rate
    mag_weight: float = 1.0  # weight of G's L2 magnitude penalty mean(eps^2) / (beta * std)^2
    heads_per_gen: int = 3  # heads updates per generator update (spec 4)


@dataclass
class TrainConfig:
    # unsupervised: normal images only; supervised: defective images with masks; weak: defective images with
    # image labels only (masks ignored); mixed: masks where present, image labels elsewhere; auto: from the data.
    setting: str = "unsupervised"
    # The defaults train ResNet18 SSN on a 2-core CPU in minutes (MVTec bottle, 12 epochs, 806 s: image AUROC
    # 99.84, AUPRO 91.73; benchmarks/results/training.json, variant cpu_schedule). The paper's schedule (300 epochs,
    # batch 32, lr 1e-4 / 2e-4, fp32, whole maps, gamma 4, fixed noise) is recipes/mvtec_wrn50.yaml.
    epochs: int = 12
    batch_size: int = 16
    lr_adaptor: float = 5e-4  # 5x the paper's: ~200 steps instead of its ~2100
    lr_heads: float = 1e-3
    weight_decay: float = 1e-5  # the heads' (spec 2)
    lr_milestones: tuple[float, ...] = (0.8, 0.9)  # fractions of the epochs
    lr_gamma: float = 0.4
    seed: int = 0
    precision: str = "bf16"  # autocast for the heads: ~2x fp32 on AVX512-BF16 (the backbone and eval stay fp32);
    # fp32 where the CPU has no native bf16 (train.schedule.resolve_precision: emulated, it ran >30x slower)
    cache_features: bool = True  # backbone features computed once (false: every step, for sets that do not fit)
    feature_crop: int | None = 32  # train the heads on random crops of the feature map (4x cheaper; None: full map)
    # Crops only in the first N epochs, whole maps after (None: crops throughout), so the classification head's
    # global pooling is tuned on what it meets at inference.
    crop_epochs: int | None = 10
    # The image score's focal-loss gamma (the map's stays 4). The paper's 4 leaves an image scored 0.2 on the right
    # side 0.16 % of its gradient: in ~200 steps bottle's scores stayed bunched (image AUROC 96.6-97.9 while the
    # map's max separated it); at 0 (plain cross-entropy) 99.8.
    cls_focal_gamma: float = 0.0
    # A budget of optimiser steps instead of epochs: epochs = round(steps / batches per epoch) on this data set,
    # crop_epochs scaled with them (ssn_edge.train.schedule.epochs_for_steps); the resolved epochs are recorded.
    # None: train.epochs as given, so training time grows with the number of images.
    steps: int | None = None
    # At most this many optimiser steps in each whole-map epoch (the first ones of its shuffled batches; None: all).
    # A whole-map step costs about 4 crop steps, so on a large data set the last epoch is most of the time.
    whole_map_steps: int | None = None
    # What training does when the collapse check (ssn_edge.train.collapse; whole-image SSN with held-out normals)
    # finds the image score or the map collapsed on the held-out images and their painted copies: "warn" logs one
    # line and keeps the model, "anchor" makes the score the map's maximum logit (when only the score collapsed),
    # "error" stops with a one-line error (the checkpoint kept). warn by default: the check's defects are painted
    # and faint and its held-out set small (10+ images), a proxy that should not on its own stop a run or change
    # what is exported; the line, the checkpoint, the bundle and the report all show it.
    on_collapse: str = "warn"


@dataclass
class WeakConfig:
    """Training on defects that have an image label and no mask (train.setting weak and mixed, spec 5). The defaults
    are the best measured on Magnetic tile (ResNet18, 4 epochs, seeds 0-2, FP32; benchmarks/weak_bench.py): mixed
    with masks on 10 % (variant mixed_10_balanced_pseudo_grow) image AUROC / AUPRO / pixel AP 87.39 / 74.94 / 44.78
    (supervised 82.27 / 74.17 / 55.29); weak (ssn_weak_detached_pseudo_grow) 86.65 / 72.16 / 14.43 (CAM 8.39 AP)."""

    # mixed: the share of each batch's defective half drawn from defects with a mask, the rest from label-only ones;
    # None: uniform, so with masks on 10 % a batch of 8 defects holds 0.8 masks. With the grown pseudo-masks 0.5 did
    # best (AP 45.10, seed 0; 0.25: 37.21, 0.75: 40.44); alone it did little (seed 0: 28.08 vs 27.53 uniform).
    # No effect where every defect or none has a mask.
    masked_share: float | None = 0.5
    # Whether a label-only defect's score loss reaches the map (through the classification head's map input).
    # True (paper): the score bends the map on every defective image. False: only where the pixels' truth is known.
    # None: false for weak, which the best weak row uses (alone, without pseudo-masks, it gave AUPRO 50.52 over
    # seeds 0-2 against the paper's 65.42 on seed 0), true otherwise (mixed: false left AP where it was, 28.37 vs
    # 28.08 on seed 0, at 4.4 points less image AUROC).
    label_only_score_to_map: bool | None = None
    # From this epoch (0-based) on, each label-only defect gets a pseudo-mask from the model's own map
    # (ssn_edge.train.pseudo): its pixels above 99.9 % of normal images' map (within its top pseudo_top fraction)
    # are defect, every other pixel unknown (no pixel is taught normal). A resumed run makes them again from the
    # resumed model. None: off (mixed 10 % AP 36.76 without, 42.50 with, ungrown). The CAM head makes none.
    pseudo_mask_epoch: int | None = 2
    pseudo_top: float = 0.25
    # Grow each pseudo-defect into the connected pixels above this (lower) quantile of normal images' map
    # (hysteresis: a confident core brings its fainter rest along). None: off. Mixed 10 % AP 44.78 at 0.99 vs 42.50
    # without; 0.95: 43.80 (seed 0).
    pseudo_grow: float | None = 0.99


@dataclass
class TilingRecipe:
    """Tiled training and inference (spec 6): tiles cut from images at data.image_size.

    mode "single": one model trained on every tile; "ensemble": one model (adaptor + heads) per tile location,
    trained only on that location's tiles. shared_backbone: at inference the frozen backbone runs once on the
    whole image and each location's heads get their crop of its features (faster); false runs every tile
    through the backbone on its own (the paper's way, and what a single model does on images of any size).
    """

    tile: tuple[int, int] = (256, 256)
    stride: tuple[int, int] = (256, 256)
    mode: str = "single"
    score: str = "mean"  # image score from tiles: mean (spec default) or max of tile scores, or map_max
    seam_halfwidth: float = 0.1  # fraction of the tile, each side of a seam
    seam_sigma: float = 2.0
    shared_backbone: bool = True
    # Single model only: false tiles every image at its own resolution at inference (any size, e.g. a
    # 20-megapixel frame; train on images at that scale), true resizes it to data.image_size first.
    resize: bool = True


@dataclass
class KnnConfig:
    """model.kind knn (ssn_edge/model/knn, fitted by ssn_edge/train/knn.py): PatchCore's memory bank of normal
    training patches; the map is each patch's mean distance to its `neighbours` nearest bank patches, the score the
    image's largest nearest distance. train.seed seeds the fit."""

    # The defaults were chosen on Magnetic tile's TRAINING split (a fifth of its normal images and its 196 defective
    # ones held out of the fit; benchmarks/knn_bench.py tune, records split train_heldout in results/knn.json), image
    # AUROC / pixel AUPRO: greedy 10k of 400k candidates 95.95 / 74.35; all 509k candidates 95.46 / 74.46, 200k
    # 94.91 / 74.11, 100k 92.44, 50k 90.91; a random bank of 10 % (51k) 90.42 / 74.21, random 10k 85.12; greedy 5k
    # 94.32, 20k (200k pool) 95.15; projection 64 dims 93.72; channels averaged to 192 93.82.
    # The bank: a fraction (<= 1) of all normal training patches, or a count (> 1) of them.
    coreset: float = 0.02
    sampler: str = "greedy"  # "greedy": k-center coreset (paper); "random": a uniform draw from the candidates
    # At most this many candidate patches are kept (drawn evenly over the images as they are extracted): the bound
    # on the fit's memory (pool x channels x 4 bytes: 614 MB for ResNet18, + 2 x pool x projection x 4 = 410 MB for
    # the projection) and on the greedy coreset's time, O(pool x bank x projection): 17 ms a step at 400k here.
    pool: int = 400_000
    projection: int | None = 128  # greedy distances on a random projection to this many dims (None: the features)
    channels: int | None = None  # average the concatenated layer2+layer3 channels down to this many (None: keep all)
    # The map averages each patch's distances to this many nearest bank patches (1: PatchCore's nearest distance
    # alone); the score is the nearest distance either way. On the held-out part of both training splits
    # (knn_bench.py tune --grid map; bottle's: held-out normals and painted copies) pixel AUPRO at k 1 / 3 / 5 / 9:
    # bottle 91.25 / 93.32 / 94.83 / 94.83, Magnetic tile (a 10k bank) 74.11 / 74.40 / 74.50 / 74.54; but 5 lost on
    # bottle's test split, 93.63 -> 92.92 on the same bank (knn_bench.py neighbours): the painted defects (thin
    # scratches, spots, cracks) are not bottle's, so the default stays PatchCore's. The blur stays SSN's (sigma 4):
    # sigma 2 / 6 moved the held-out AUPRO at k 1 by -0.04 / +0.00 on bottle, -0.45 / +0.36 on Magnetic tile.
    neighbours: int = 1
    held_out: int = 16  # normal training images kept out of the bank, whose distances set the outputs' scale
    batch: int = 16  # images per feature-extraction batch


@dataclass
class Recipe:
    name: str = "recipe"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    weak: WeakConfig = field(default_factory=WeakConfig)  # train.setting weak and mixed: the label-only defects
    tiling: TilingRecipe | None = None  # None: the model sees the whole image at data.image_size
    knn: KnnConfig = field(default_factory=KnnConfig)  # model.kind knn only

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


CLS_HEADS = ("full", "light", "light_separable", "light_bottleneck", "cam")  # model.cls_head (ssn_edge/model/ssn.py)
MAP_GATES = ("none", "score")  # model.map_gate (ssn_edge/model/ssn.py, score_gated_map)

_CHOICES = {
    "model.cls_input": ("adapted", "backbone"),
    "model.cls_head": CLS_HEADS,
    "model.score_anchor": ("none", "map_max", "map_top", "auto"),
    "model.map_gate": MAP_GATES,
    "model.kind": ("ssn", "knn"),
    "knn.sampler": ("greedy", "random"),
    "noise.kind": ("fixed", "adaptive", "learned"),
    "train.setting": ("unsupervised", "supervised", "weak", "mixed", "auto"),
    "train.precision": ("fp32", "bf16"),
    "train.on_collapse": ("warn", "anchor", "error"),  # ssn_edge.train.collapse.POLICIES
    "tiling.mode": ("single", "ensemble"),
    "tiling.score": ("mean", "max", "map_max"),
}


# Keys of the earlier recipe layout (checkpoint format 1): where each one went, or why it went (the measurements
# are in README.md, "Supervision"; Magnetic tile, ResNet18, seed 0 unless said).
MOVED = {f"train.{k}": f"weak.{k}" for k in ("masked_share", "label_only_score_to_map", "pseudo_mask_epoch",
                                             "pseudo_top", "pseudo_grow")}
_KNN_TEACHER = "the knn pseudo-mask teacher taught SSN's map nothing (weak pixel AP 12.05 vs 15.54 without)"
REMOVED = {
    "train.mil_top": "the multiple-instance loss broke the weak model (image AUROC 57.58, pixel AP 6.94 vs 89.67 / 15.54)",
    "train.mil_items": "it belonged to train.mil_top (removed: it broke the weak model)",
    "train.pseudo_source": _KNN_TEACHER + "; pseudo-masks come from the model's own map",
    "train.pseudo_border": _KNN_TEACHER + " (and a 16 px border did not help: 12.87)",
    "train.real_pixel_weight": "no gain (weak pixel AP 10.46 vs 12.05, mixed 10 % 27.09 vs 28.00)",
    "train.pseudo_refresh": "no gain (remaking pseudo-masks every epoch: mixed 10 % AP 40.23 vs 42.50, seeds 0-2)",
    "train.pseudo_teacher": "no gain (a second run taught by the first's map: AP 39.25, below its teacher's 45.10)",
    "train.pseudo_rest": "pseudo-masks teach their defect pixels only; also teaching the rest as normal was worse "
                         "(weak pixel AP 8.03 vs 12.35)",
    "train.paste_copies": "copy-paste hurt with the grown pseudo-masks (mixed 10 % AP 39.13 vs 44.78, seeds 0-2)",
    "train.channels_last": "no recipe or benchmark used it",
    "train.clip_grad_norm": "gradients are clipped as in the paper: norm 1 when defects train, not otherwise",
    "train.flip_augment": "defective images are always seen flipped (x4), as in the paper",
    "train.eval_every": "evaluate a checkpoint with ssn-edge eval (training evaluates once, at the end)",
    "noise.sigma_end": "no recipe or benchmark annealed sigma",
    "noise.empty_prob": "half the samples get no synthetic anomaly, as in the paper",
    "noise.z_dim": "the generator's shape is fixed (ssn_edge.train.generator)",
    "noise.gen_hidden": "the generator's shape is fixed (ssn_edge.train.generator)",
    "noise.sigma_min": "a mixture of noise scales lost 15 AUPRO points on Magnetic tile's real held-out defects "
                       "(34.85 vs 49.77)",
}
# Removed keys whose recorded value trained exactly as the code does now (the option was off): a checkpoint that
# records them loads, the key dropped. Any other value is refused, as REMOVED says.
_REMOVED_OFF = {"noise.sigma_min": None}
# What a recorded recipe of the earlier layout meant where it says nothing: the defaults of that layout, for every
# key whose default has changed since (a record predating a key trained without it).
_EARLIER_DEFAULTS = {
    "noise": {"kind": "fixed", "sigma": 0.015, "smooth": None, "beta": 0.1},
    "train": {"epochs": 300, "batch_size": 32, "lr_adaptor": 1e-4, "lr_heads": 2e-4, "precision": "fp32",
              "feature_crop": None, "crop_epochs": None, "cls_focal_gamma": 4.0},
    "weak": {"masked_share": None, "label_only_score_to_map": True, "pseudo_mask_epoch": None, "pseudo_top": 0.01,
             "pseudo_grow": None},
}


def recorded_val_split(values: dict[str, Any]) -> dict[str, Any]:
    """A recorded recipe silent on data.val_fraction was trained before the held-out split existed: on every
    normal training image, so none is held out (not the default's tenth, which it did train on)."""
    data = values.get("data")
    if not isinstance(data, dict) or "val_fraction" in data:
        return values
    return {**values, "data": {**data, "val_fraction": 0.0}}


def recorded_anchor_blur(values: dict[str, Any]) -> dict[str, Any]:
    """A recorded recipe silent on model.anchor_blur anchored its score to the raw maximum logit (0), not the
    blurred one the default now takes."""
    model = values.get("model")
    if not isinstance(model, dict) or "anchor_blur" in model:
        return values
    return {**values, "model": {**model, "anchor_blur": 0.0}}


def recorded_off_options(values: dict[str, Any]) -> dict[str, Any]:
    """A recorded recipe without the removed keys it holds at their off value (_REMOVED_OFF)."""
    out = dict(values)
    for dotted, off in _REMOVED_OFF.items():
        section, key = dotted.split(".")
        part = out.get(section)
        if isinstance(part, dict) and key in part and part[key] == off:
            out[section] = {k: v for k, v in part.items() if k != key}
    return out


def upgrade_recipe_dict(values: dict[str, Any]) -> dict[str, Any]:
    """A recorded recipe (checkpoint, recipe.json) in the current layout. One of the earlier layout (no 'weak'
    section) gets its moved keys moved, its removed ones dropped and that layout's defaults where it is silent;
    one in the current layout is returned as it is, less the removed options it records as off."""
    values = recorded_off_options(recorded_anchor_blur(recorded_val_split(values)))
    if "weak" in values:
        return values
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    weak = dict(_EARLIER_DEFAULTS["weak"])
    for section in ("noise", "train"):
        part = out.setdefault(section, {})
        for key, default in _EARLIER_DEFAULTS[section].items():
            part.setdefault(key, default)
        for key in list(part):
            dotted = f"{section}.{key}"
            if dotted in MOVED:
                weak[key] = part.pop(key)
            elif dotted in REMOVED:
                part.pop(key)
    out["weak"] = weak
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = get_origin(hint)
    args = get_args(hint)
    if origin is not None and type(None) in args:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise RecipeError(f"recipe key '{key}': expected a mapping, got {value!r}")
        return _build(hint, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"recipe key '{key}': expected a list, got {value!r}")
        elem = args[0]
        items = tuple(_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
        if args[-1] is not Ellipsis and len(items) != len(args):
            raise RecipeError(f"recipe key '{key}': expected {len(args)} values, got {len(items)}")
        return items
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"recipe key '{key}': expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"recipe key '{key}': expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string: accept what a person means
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"recipe key '{key}': expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"recipe key '{key}': expected a string, got {value!r}")
        allowed = _CHOICES.get(key)
        if allowed and value not in allowed:
            raise RecipeError(f"recipe key '{key}': {value!r} is not one of {', '.join(allowed)}")
        return value
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            full = f"{prefix}.{key}" if prefix else key
            if full in MOVED:
                raise RecipeError(f"recipe key '{full}' is now '{MOVED[full]}'")
            if full in REMOVED:
                raise RecipeError(f"recipe key '{full}' was removed: {REMOVED[full]}")
            raise RecipeError(f"unknown recipe key '{full}' (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in values.items():
        full = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], full)
    return cls(**kwargs)


def recipe_from_dict(values: dict[str, Any]) -> Recipe:
    if not isinstance(values, dict):
        raise RecipeError("a recipe must be a YAML mapping at the top level")
    recipe = _build(Recipe, values, "")
    if recipe.model.score_anchor != "none" and recipe.model.cls_head == "cam":
        raise RecipeError("model.score_anchor: the CAM head has no segmentation map to anchor its score to; use none")
    _check_train(recipe.train)
    _check_collapse(recipe)
    _check_data(recipe.data)
    _check_ranges(recipe)
    _check_weak(recipe.weak)
    _check_memory_bank(recipe)
    _check_knn(recipe)
    _check_tiling(recipe)
    return recipe


def _refuse(key: str, value: Any, ok: bool, want: str) -> None:
    if not ok:
        raise RecipeError(f"{key} must be {want}, got {value}")


def _check_ranges(r: Recipe) -> None:
    """The numbers a recipe holds, each in the range it means (NaN is in none): refused here, by key, not later
    as a crash deep in training ('float division by zero', a negative tensor dimension)."""
    d, m, n, t = r.data, r.model, r.noise, r.train
    _refuse("data.image_size", list(d.image_size), all(v >= 32 for v in d.image_size), "two sizes >= 32 (pixels)")
    _refuse("data.mask_fraction", d.mask_fraction, 0.0 <= d.mask_fraction <= 1.0, "between 0 and 1")
    _refuse("data.mask_seed", d.mask_seed, d.mask_seed >= 0, ">= 0")
    for key in ("seg_hidden", "cls_hidden", "cls_kernel"):
        _refuse(f"model.{key}", getattr(m, key), getattr(m, key) >= 1, ">= 1")
    _refuse("model.adaptor_channels", m.adaptor_channels, m.adaptor_channels is None or m.adaptor_channels >= 1,
            ">= 1 (or null: the backbone's channels)")
    _refuse("noise.sigma", n.sigma, n.sigma >= 0.0, ">= 0")
    _refuse("noise.smooth", n.smooth, n.smooth is None or n.smooth > 0.0, "> 0 (or null: i.i.d. noise)")
    _refuse("noise.perlin_threshold", n.perlin_threshold, 0.0 <= n.perlin_threshold < 1.0, "in [0, 1)")
    _refuse("noise.gen_lr", n.gen_lr, n.gen_lr > 0.0, "> 0")
    _refuse("noise.mag_weight", n.mag_weight, n.mag_weight >= 0.0, ">= 0")
    for key in ("lr_adaptor", "lr_heads"):
        _refuse(f"train.{key}", getattr(t, key), getattr(t, key) > 0.0, "> 0")
    _refuse("train.weight_decay", t.weight_decay, t.weight_decay >= 0.0, ">= 0")
    _refuse("train.lr_gamma", t.lr_gamma, 0.0 < t.lr_gamma <= 1.0, "in (0, 1]")
    _refuse("train.lr_milestones", list(t.lr_milestones), all(0.0 <= v <= 1.0 for v in t.lr_milestones),
            "fractions of the epochs, each in [0, 1]")
    _refuse("train.seed", t.seed, t.seed >= 0, ">= 0")
    _refuse("train.crop_epochs", t.crop_epochs, t.crop_epochs is None or t.crop_epochs >= 0, ">= 0 (or null)")
    _refuse("train.cls_focal_gamma", t.cls_focal_gamma, t.cls_focal_gamma >= 0.0, ">= 0")


def _check_tiling(r: Recipe) -> None:
    """The tiling section as the runtime will read it (tile, stride, seams), checked against data.image_size."""
    if r.tiling is None:
        return
    from ssn_edge.runtime.tiling import TileGrid, TilingConfig

    t = r.tiling
    try:
        locations = TileGrid(tuple(r.data.image_size), t.tile, t.stride).count if t.mode == "ensemble" else 1
        TilingConfig(tile=t.tile, stride=t.stride, score=t.score, seam_halfwidth=t.seam_halfwidth,
                     seam_sigma=t.seam_sigma, mode=t.mode, image_size=tuple(r.data.image_size), locations=locations,
                     graph="image" if t.shared_backbone else ("tiles" if t.mode == "ensemble" else "tile"))
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"recipe section 'tiling': {exc}") from None


def _check_data(d: DataConfig) -> None:
    if not 0.0 <= d.val_fraction <= 0.5:
        raise RecipeError(f"data.val_fraction must be between 0 and 0.5 (at most half the normal images), got {d.val_fraction}")
    if d.val_min < 0:
        raise RecipeError(f"data.val_min must be >= 0, got {d.val_min}")


def _check_train(t: TrainConfig) -> None:
    if t.epochs < 1:
        raise RecipeError(f"train.epochs must be >= 1, got {t.epochs}")
    if t.batch_size < 1:
        raise RecipeError(f"train.batch_size must be >= 1, got {t.batch_size}")
    if t.steps is not None and t.steps < 1:
        raise RecipeError(f"train.steps must be >= 1 (or null: train.epochs as given), got {t.steps}")
    if t.whole_map_steps is not None and t.whole_map_steps < 1:
        raise RecipeError(f"train.whole_map_steps must be >= 1 (or null: every batch), got {t.whole_map_steps}")
    if t.feature_crop is not None and t.feature_crop < 1:
        raise RecipeError(f"train.feature_crop must be >= 1 (or null: whole maps), got {t.feature_crop}")


def _check_collapse(r: Recipe) -> None:
    """train.on_collapse other than warn only where the check runs and can act (knn recipes: _check_knn)."""
    if r.model.anchor_blur < 0:
        raise RecipeError(f"model.anchor_blur must be >= 0 (0: the raw maximum logit), got {r.model.anchor_blur}")
    if not 0 <= r.model.anchor_top < 1:
        raise RecipeError(f"model.anchor_top must be a fraction in [0, 1) of the map's cells (0: off), "
                          f"got {r.model.anchor_top}")
    if r.model.score_anchor == "map_top" and r.model.anchor_top == 0:
        raise RecipeError("model.score_anchor map_top averages the map's top model.anchor_top cells; set anchor_top "
                          "(e.g. 0.04) or use map_max")
    if r.model.score_anchor == "auto" and r.tiling is not None:
        raise RecipeError("model.score_anchor auto: chosen on the held-out check set of whole-image models only, not "
                          "tiled ones; use none or map_max")
    if r.train.on_collapse == "warn":
        return
    if r.tiling is not None:
        raise RecipeError("train.on_collapse: the collapse check runs on whole-image models only, not tiled ones; "
                          "remove it")
    if r.train.on_collapse == "anchor" and r.model.cls_head == "cam":
        raise RecipeError("train.on_collapse anchor: the CAM head has no segmentation map to anchor its score to; "
                          "use warn or error")


def _check_weak(w: WeakConfig) -> None:
    if w.masked_share is not None and not 0.0 <= w.masked_share <= 1.0:
        raise RecipeError(f"weak.masked_share must be between 0 and 1 (or null), got {w.masked_share}")
    if w.pseudo_mask_epoch is not None and w.pseudo_mask_epoch < 0:
        raise RecipeError(f"weak.pseudo_mask_epoch must be >= 0 (or null: no pseudo-masks), got {w.pseudo_mask_epoch}")
    if not 0.0 < w.pseudo_top <= 1.0:
        raise RecipeError(f"weak.pseudo_top must be in (0, 1], got {w.pseudo_top}")
    if w.pseudo_grow is not None and not 0.0 < w.pseudo_grow < 0.999:
        raise RecipeError(f"weak.pseudo_grow must be in (0, 0.999) (below the 0.999 core level), or null; got {w.pseudo_grow}")


# What a knn recipe may set outside its knn section: the rest is SuperSimpleNet's (noise, the training loop, the heads).
_KNN_USES = {"model": ("kind", "backbone", "weights", "pretrained"), "train": ("setting", "seed")}


def _check_memory_bank(recipe: Recipe) -> None:
    """model.memory_bank: on a whole-image SSN with a segmentation map, standardised on held-out normals."""
    m = recipe.model
    if not m.memory_bank:
        if m.memory_bank_ssn_weight != 1.0:
            raise RecipeError("model.memory_bank_ssn_weight weighs SSN's map against the memory bank's distances: it "
                              "needs model.memory_bank true")
        return
    if not (math.isfinite(m.memory_bank_ssn_weight) and m.memory_bank_ssn_weight >= 0):
        raise RecipeError(f"model.memory_bank_ssn_weight must be a number >= 0, got {m.memory_bank_ssn_weight}")
    for refused, why in ((m.kind != "ssn", "model.kind ssn"), (recipe.tiling is not None, "whole-image (untiled) models"),
                         (m.cls_head == "cam", "a segmentation head (not cam)"), (m.map_gate != "none", "map_gate none"),
                         (recipe.data.val_fraction <= 0, "held-out normal images (data.val_fraction > 0)")):
        if refused:
            raise RecipeError(f"model.memory_bank needs {why}")


def _check_knn_section(k: KnnConfig) -> None:
    if not k.coreset > 0 or (k.coreset > 1 and k.coreset != int(k.coreset)):
        raise RecipeError(f"knn.coreset must be a fraction in (0, 1] or a whole count of patches > 1, got {k.coreset}")
    for name in ("pool", "batch", "projection", "channels", "neighbours"):
        if getattr(k, name) is not None and getattr(k, name) < 1:
            raise RecipeError(f"knn.{name} must be >= 1, got {getattr(k, name)}")
    if k.held_out < 1:
        raise RecipeError(f"knn.held_out must be >= 1 (the normal images that set the outputs' scale), got {k.held_out}")


def _check_knn(recipe: Recipe) -> None:
    """A knn recipe must not carry SSN settings it would silently ignore, nor an SSN recipe knn ones (but the bank's
    settings where model.memory_bank is on)."""
    if recipe.model.kind != "knn":
        if recipe.knn != KnnConfig() and not recipe.model.memory_bank:
            raise RecipeError("recipe section 'knn' applies to model.kind knn, or ssn with model.memory_bank, only")
        _check_knn_section(recipe.knn)
        return
    for section, cls, used in (("model", ModelConfig, _KNN_USES["model"]), ("noise", NoiseConfig, ()),
                               ("train", TrainConfig, _KNN_USES["train"]), ("weak", WeakConfig, ())):
        value, default = getattr(recipe, section), cls()
        for f in dataclasses.fields(cls):
            if f.name not in used and getattr(value, f.name) != getattr(default, f.name):
                raise RecipeError(f"recipe key '{section}.{f.name}' is not used by model.kind knn (a nearest-neighbour "
                                  f"model has no {'training loop' if section != 'model' else 'SSN heads'}); remove it")
    if recipe.tiling is not None:
        raise RecipeError("recipe section 'tiling': model.kind knn runs on whole images only; remove it")
    if recipe.train.setting not in ("unsupervised", "auto"):
        raise RecipeError(f"train.setting {recipe.train.setting!r}: model.kind knn learns from normal images only "
                          "(use unsupervised)")
    _check_knn_section(recipe.knn)


def read_yaml(path: Path, what: str, error: type[Exception]) -> Any:
    """A YAML file's content ({} when empty). A missing file, invalid YAML or text that is not UTF-8 raise
    ``error`` with one line naming the file; ``what`` names the file's kind ("recipe file")."""
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    path = Path(path)
    values = read_yaml(path, "recipe file", RecipeError)
    try:
        recipe = recipe_from_dict(values)
        return apply_overrides(recipe, overrides or {})
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None


def apply_overrides(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    """Overrides as {'train.epochs': 10, ...}; values are validated like recipe values."""
    values = recipe.to_dict()
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = values
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], dict):
                raise RecipeError(f"unknown recipe key '{dotted}'")
            node = node[part]
        if parts[-1] not in node:
            raise RecipeError(f"unknown recipe key '{dotted}'")
        node[parts[-1]] = value
    return recipe_from_dict(values)


def with_map_gate(recipe: Recipe, map_gate: str | None, where: str | Path) -> Recipe:
    """recipe with model.map_gate chosen after training (None: as trained). The gate has no parameters, so one
    checkpoint serves either; where names the checkpoint in the error."""
    if map_gate is None:
        return recipe
    try:
        return apply_overrides(recipe, {"model.map_gate": map_gate})
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """'train.epochs=10' -> ('train.epochs', 10); the value is parsed as YAML (numbers, true, null, lists)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected KEY=VALUE, e.g. train.epochs=10")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)

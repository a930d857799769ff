"""Recipes: typed configuration for training and export, loaded from YAML and validated key by key."""

from __future__ import annotations

import dataclasses
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


@dataclass
class ModelConfig:
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
    score_anchor: str = "none"
    # "none": the map output is the segmentation head's logits (paper). "score": the inference graph outputs
    # log P(pixel defective) = log sigmoid(map) + log sigmoid(score), the pixel's probability given a defect times
    # the image's: one image-wide shift, so each map's ranking is unchanged while the maps of images the classifier
    # calls normal sink below those of defective ones. Training and pseudo-masks use the ungated logits.
    map_gate: str = "none"


@dataclass
class NoiseConfig:
    kind: str = "fixed"  # "fixed": N(0, sigma^2) as in the paper; "adaptive": sigma * per-channel feature std;
    # "learned": a noise generator trained against the heads (training only; the fields below)
    sigma: float = 0.015
    sigma_end: float | None = None  # anneal sigma linearly to this by the last epoch (None: constant)
    smooth: float | None = None  # blur the Gaussian noise spatially with this sigma (feature pixels), same variance
    perlin_threshold: float = 0.2  # 0.2 MVTec AD; 0.6 for thin, small defects (VisA, KSDD2)
    empty_prob: float = 0.5  # probability that a sample gets no synthetic anomaly
    # kind "learned" only (spec 4): eps = tanh(n + G(A, n, z)) * beta * per-channel std(A), n unit noise blurred by
    # smooth, G trained adversarially (ssn_edge.train.generator).
    beta: float = 0.1  # bound on |eps| relative to each channel's feature std (1.5: about adaptive sigma 1.0 at start)
    z_dim: int = 16  # random vector fed to G (stochasticity)
    gen_hidden: int = 128  # G's hidden width (1x1 convs)
    gen_lr: float = 1e-4  # G's AdamW learning rate
    mag_weight: float = 1.0  # weight of G's L2 magnitude penalty mean(eps^2) / (beta * std)^2
    heads_per_gen: int = 3  # heads updates per generator update


@dataclass
class TrainConfig:
    # unsupervised: normal images only; supervised: defective images with masks; weak: defective images with
    # image labels only (masks ignored); mixed: masks where present, image labels elsewhere; auto: from the data.
    setting: str = "unsupervised"
    epochs: int = 300
    batch_size: int = 32
    lr_adaptor: float = 1e-4
    lr_heads: float = 2e-4
    weight_decay: float = 1e-5
    lr_milestones: tuple[float, ...] = (0.8, 0.9)  # fractions of the epochs
    lr_gamma: float = 0.4
    seed: int = 0
    precision: str = "fp32"  # "fp32" or "bf16" (autocast; the backbone and eval stay fp32)
    channels_last: bool = False
    cache_features: bool = True
    feature_crop: int | None = None  # train the heads on random crops of the feature map (None: full map)
    crop_epochs: int | None = None  # crops only in the first N epochs, full maps after (None: crops throughout)
    clip_grad_norm: float | None = None  # None: 1.0 when supervised (paper), off when unsupervised
    flip_augment: bool = True  # with defective images (not unsupervised): they are also seen flipped (x4)
    eval_every: int = 0  # epochs between evaluations on the test split (0: only at the end)
    cls_focal_gamma: float = 4.0  # the image score's focal-loss gamma (paper: 4; the map's stays 4)
    # weak/mixed: from this epoch (0-based) on, label-only defects train with pseudo-masks from the model's own
    # map (ssn_edge.train.pseudo): its top pseudo_top fraction of pixels, a margin around them unknown. None: off.
    pseudo_mask_epoch: int | None = None
    pseudo_top: float = 0.01
    pseudo_rest: str = "normal"  # the pixels outside a pseudo-mask's defect and margin: "normal" or "unknown"
    pseudo_refresh: bool = False  # make them again at every later epoch, from the model as it is then
    # map: grow each pseudo-defect into the connected pixels above this (lower) quantile of normal images' map
    # (hysteresis: confident cores bring their fainter rest along). None: off (only pixels above the 99.9 %).
    # Measured on Magnetic tile, mixed 10 %, seeds 0-2: pixel AP 44.78 at 0.99 vs 42.50 without (ssn_edge/pseudo.py).
    pseudo_grow: float | None = None
    # map: a finished checkpoint (same backbone and size) whose map makes the pseudo-masks, once, at
    # pseudo_mask_epoch, instead of this run's own half-trained map: self-training in two runs. None: this run's
    # map. Measured (Magnetic tile, mixed 10 %, seed 0): pixel AP 39.25, below its teacher's 45.10.
    pseudo_teacher: str | None = None
    # "map": pseudo-masks from the model's own map (above). "knn": from a nearest-neighbour teacher on the frozen
    # backbone (a patch far from every normal training patch; ssn_edge.train.pseudo.knn_pseudo_masks), positives
    # only, made once: it owes nothing to the heads, so it can start at epoch 0.
    pseudo_source: str = "map"
    pseudo_border: int = 0  # knn: pixels along the image border never marked defect (the teacher errs there)
    # mixed: the share of each batch's defective half drawn from defects with a mask, the rest from label-only
    # ones; None: uniform over all defects, so with masks on 10 % of them a batch of 8 defects holds 0.8 masks.
    masked_share: float | None = None
    # weak/mixed: whether a label-only defect's score loss reaches the map (through the classification head's
    # map input). True (paper): the score bends the map on every defective image. False: only where the pixels'
    # truth is known, so 90 % mask-less defects cannot push their whole map up with no pixel loss to hold it.
    label_only_score_to_map: bool = True
    # weak/mixed: a multiple-instance loss on label-only defects. Each step, up to mil_items of the batch's
    # defects without a mask get their *whole* map (no crop, no noise) and the mean of its top mil_top fraction
    # of logits is pushed towards defect: some pixels of the image must be defective, which ones is unknown.
    # The whole map, because a training crop may miss a small defect. None: off. Measured on Magnetic tile (weak,
    # seed 0, mil_top 0.01, variant ssn_weak_mil): image AUROC fell to 57.58 and pixel AP to 6.94 (ssn_weak_detached:
    # 89.67 / 15.54), so it stays off: pushing up what the map already ranks highest taught it the wrong pixels.
    mil_top: float | None = None
    mil_items: int = 4
    # supervised/weak/mixed: the pixel losses once more over the real (or pseudo-mask) defect pixels alone, times
    # this weight. Without it a real defect's pixels are a few among the many synthetic anomalous ones that
    # each loss averages over (a pseudo-mask marks ~1 % of an image). 0: off (paper). Measured with the knn
    # pseudo-masks on Magnetic tile (seed 0): no help (weak pixel AP 10.46 vs 12.05, mixed 10 % 27.09 vs 28.00).
    real_pixel_weight: float = 0.0
    # supervised/mixed: this many extra training images per defect with a mask, each the defect pasted onto a
    # normal training image (ssn_edge.train.paste): a few annotated defects seen in many contexts. 0: off. Measured on
    # Magnetic tile, mixed 10 %, seeds 0-2: pixel AP 40.85 vs 36.76 alone, 39.13 vs 44.78 with pseudo_grow.
    paste_copies: int = 0


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
class Recipe:
    name: str = "recipe"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tiling: TilingRecipe | None = None  # None: the model sees the whole image at data.image_size

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


CLS_HEADS = ("full", "light", "light_separable", "light_bottleneck", "cam")  # model.cls_head (ssn_edge/model/ssn.py)
MAP_GATES = ("none", "score")  # model.map_gate (ssn_edge/model/ssn.py, score_gated_map)

_CHOICES = {
    "model.cls_input": ("adapted", "backbone"),
    "model.cls_head": CLS_HEADS,
    "model.score_anchor": ("none", "map_max"),
    "model.map_gate": MAP_GATES,
    "noise.kind": ("fixed", "adaptive", "learned"),
    "train.setting": ("unsupervised", "supervised", "weak", "mixed", "auto"),
    "train.precision": ("fp32", "bf16"),
    "train.pseudo_rest": ("normal", "unknown"),
    "train.pseudo_source": ("map", "knn"),
    "tiling.mode": ("single", "ensemble"),
    "tiling.score": ("mean", "max", "map_max"),
}


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
    mil = recipe.train.mil_top
    if mil is not None and not 0.0 < mil <= 1.0:
        raise RecipeError(f"train.mil_top must be in (0, 1] (or null), got {mil}")
    if recipe.train.mil_items < 1:
        raise RecipeError(f"train.mil_items must be >= 1, got {recipe.train.mil_items}")
    share = recipe.train.masked_share
    if share is not None and not 0.0 <= share <= 1.0:
        raise RecipeError(f"train.masked_share must be between 0 and 1 (or null), got {share}")
    grow = recipe.train.pseudo_grow
    if grow is not None and not 0.0 < grow < 0.999:
        raise RecipeError(f"train.pseudo_grow must be in (0, 0.999) (below the 0.999 core level), or null; got {grow}")
    if recipe.train.pseudo_teacher is not None and recipe.train.pseudo_source != "map":
        raise RecipeError("train.pseudo_teacher makes pseudo-masks from a checkpoint's map (train.pseudo_source map), not the knn teacher")
    if grow is not None and recipe.train.pseudo_source != "map":
        raise RecipeError("train.pseudo_grow grows the map's pseudo-masks (train.pseudo_source map); the knn teacher's are not grown")
    if recipe.train.pseudo_border < 0:
        raise RecipeError(f"train.pseudo_border must be >= 0, got {recipe.train.pseudo_border}")
    if not recipe.train.real_pixel_weight >= 0.0:
        raise RecipeError(f"train.real_pixel_weight must be >= 0, got {recipe.train.real_pixel_weight}")
    if recipe.train.paste_copies < 0:
        raise RecipeError(f"train.paste_copies must be >= 0, got {recipe.train.paste_copies}")
    if recipe.train.paste_copies and recipe.train.setting in ("weak", "unsupervised"):
        raise RecipeError(f"train.paste_copies pastes defects that have a mask; the {recipe.train.setting} setting "
                          "trains with none (use mixed, supervised or auto)")
    if recipe.train.pseudo_source == "knn" and recipe.model.cls_head == "cam":
        raise RecipeError("train.pseudo_source knn: the CAM head has no segmentation map to teach; use map or no pseudo-masks")
    return recipe


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc})") from None
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

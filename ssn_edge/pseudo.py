"""Pseudo-masks for weakly labelled defects (spec 5): the map's top region, with a conservative margin.

A weak model's segmentation head learns pixels only from synthetic anomalies. Part-way through training, each
defective image without a mask gets a pseudo-mask from the model's own map: its top region (the highest `top`
fraction of its pixels, and only where the map exceeds what normal training images reach) is a defect, a
margin around it and the next-highest pixels are unknown (excluded from the pixel losses), the rest is normal.
An image whose map stays within the normal range keeps its image label only.

Measured on Magnetic tile (seed 0, pseudo-masks from epoch 2 of 4, 152 of 196 defects got one): worse than
without (pixel AP 8.03 vs 12.35, image AUROC 84.59 vs 90.03; benchmarks/results/weak.json), so it is off by
default (train.pseudo_mask_epoch: None). The early map localises real defects too poorly to teach from.

With a few real masks (mixed) the map is good enough to teach from, if only its confident pixels are taught:
rest="unknown" marks the pixels above 99.9 % of normal images' map as defect and calls no pixel normal. On
Magnetic tile, masks on 10 % of the defects (variant mixed_10_balanced_pseudo, seeds 0-2, pseudo-masks from epoch
2 of 4) pixel AP rose to 42.50 ± 3.60 from 36.76 ± 7.59 (higher on each seed), AUPRO 73.30 vs 75.59; supervised
56.40 / 76.11. Remaking them every epoch from epoch 1 (train.pseudo_refresh) did not add to that (seeds 0-2: AP
40.23, AUPRO 76.30). In the weak setting (ssn_weak_detached_pseudo, seed 0) AUPRO rose to 72.64 from 61.03 but
pixel AP fell to 13.31 from 15.54. Against the hidden masks the final model's pseudo-masks were 84 % precise
at 9 % recall (seed 0).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ssn_edge.data import ArraySet


@dataclass(frozen=True)
class PseudoMaskConfig:
    top: float = 0.01  # fraction of an image's pixels that may become defect
    # "normal": a pixel outside the defect, its margin and the unsure band is taught as normal. "unknown":
    # only the defect is taught, every other pixel stays unknown (positives only: a defect the map half-finds
    # is not taught as half normal; Magnetic tile's uneven and fray defects cover a quarter of the image).
    rest: str = "normal"
    unsure: float = 0.05  # the next-highest fraction up to this one is left unknown
    margin: int = 8  # pixels (image resolution) around the defect region left unknown
    normal_quantile: float = 0.999  # a defect pixel must exceed this quantile of normal training images' maps


def pseudo_masks(maps: np.ndarray, normal_level: float, cfg: PseudoMaskConfig) -> tuple[np.ndarray, np.ndarray]:
    """maps (N, H, W) map logits of weakly labelled defective images -> (defect (N,H,W) bool, unknown (N,H,W) bool)."""
    defect = np.zeros(maps.shape, dtype=bool)
    unknown = np.zeros(maps.shape, dtype=bool)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * cfg.margin + 1, 2 * cfg.margin + 1))
    for i, m in enumerate(maps):
        hi = np.quantile(m, 1.0 - cfg.top)
        lo = np.quantile(m, 1.0 - cfg.unsure)
        d = (m >= hi) & (m > normal_level)
        if not d.any():
            unknown[i] = True  # nothing stands out: no pixel target at all, as before
            continue
        defect[i] = d
        if cfg.rest == "unknown":
            unknown[i] = ~d
            continue
        ring = cv2.dilate(d.astype(np.uint8), kernel).astype(bool)
        unknown[i] = (ring | (m >= lo)) & ~d
    return defect, unknown


@torch.no_grad()
def model_maps(model, arrays: ArraySet, indices: np.ndarray, batch: int = 16) -> np.ndarray:
    """Map logits at image resolution (bilinear) for arrays.images[indices]: the whole map, no crop."""
    was_training = model.heads.training
    model.heads.eval()
    out = []
    size = tuple(arrays.images.shape[-2:])
    for s in range(0, len(indices), batch):
        x = torch.from_numpy(arrays.images[indices[s : s + batch]])
        feats = model.features(x)
        m, _ = model.heads(feats)
        out.append(F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False)[:, 0].numpy())
    model.heads.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, *size), dtype=np.float32)


def with_pseudo_masks(model, arrays: ArraySet, cfg: PseudoMaskConfig, normals: int = 128,
                      seed: int = 0) -> tuple[ArraySet, dict[str, float]]:
    """arrays with pseudo-masks on the defective images that have no mask; the stats say how many got one."""
    weak = np.flatnonzero((arrays.labels == 1) & ~arrays.mask_valid)
    good = np.flatnonzero(arrays.labels == 0)
    if not len(weak):
        return arrays, {"pseudo_masked": 0, "pseudo_candidates": 0}
    pick = np.random.default_rng(seed).permutation(good)[:normals]
    normal_level = float(np.quantile(model_maps(model, arrays, pick), cfg.normal_quantile)) if len(pick) else -np.inf
    defect, unknown = pseudo_masks(model_maps(model, arrays, weak), normal_level, cfg)
    got = defect.reshape(len(weak), -1).any(1)
    masks = arrays.masks.copy()
    ignore = np.zeros(arrays.masks.shape, dtype=bool) if arrays.ignore is None else arrays.ignore.copy()
    valid = arrays.mask_valid.copy()
    masks[weak[got]] = defect[got]
    ignore[weak[got]] = unknown[got]
    valid[weak[got]] = True
    out = dataclasses.replace(arrays, masks=masks, mask_valid=valid, ignore=ignore)
    stats = {"pseudo_masked": int(got.sum()), "pseudo_candidates": int(len(weak)),
             "pseudo_defect_fraction": float(defect[got].mean()) if got.any() else 0.0,
             "pseudo_normal_level": normal_level}
    return out, stats

"""Pseudo-masks for weakly labelled defects (spec 5): the map's top region, with a conservative margin; or the
verdict of a nearest-neighbour teacher on the frozen backbone (knn_pseudo_masks, below).

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
55.29 / 74.17. Remaking them every epoch from epoch 1 (train.pseudo_refresh) did not add to that (seeds 0-2: AP
40.23, AUPRO 76.30). In the weak setting (ssn_weak_detached_pseudo, seed 0) AUPRO rose to 72.64 from 61.03 but
pixel AP fell to 13.31 from 15.54. Against the hidden masks the final model's pseudo-masks were 84 % precise
at 9 % recall (seed 0).

Those masks are a defect's confident core only. Growing each core by hysteresis (train.pseudo_grow 0.99: the
connected region above 99 % of normal images' map around every pixel above 99.9 %) brings in the defect's fainter
rest: mixed 10 % (variant mixed_10_balanced_pseudo_grow, seeds 0-2) pixel AP 44.78 ± 3.62 (45.10 / 41.01 / 48.22;
without growth 38.52 / 43.46 / 45.52), AUPRO 74.94. Against the hidden masks, the finished seed-0 model's grown
masks were 65 % precise at 35 % recall, ungrown 76 % at 18 % (a diagnostic, not a results record). Growing further
(0.95, seed 0) did not help: AP 43.80. Nor did teaching a fresh run from epoch 0 with the finished model's grown
masks (train.pseudo_teacher, self-training in two runs; mixed_10_selftrain, seed 0): AP 39.25, below its teacher.
With masks on 50 % and no batch balance (mixed_50_pseudo_grow, seed 0): 43.32 vs 44.72 without pseudo-masks (42.99
in a rerun of mixed_50).
In the weak setting (ssn_weak_detached_pseudo_grow, seeds 0-2): pixel AP 14.43 ± 1.32 vs 12.20 ± 4.54 and AUPRO
72.16 ± 3.40 vs 50.52 ± 17.47 without pseudo-masks (ssn_weak_detached), image AUROC 86.65 vs 91.22; still 1.72x
CAM's AP.
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
    # Hysteresis (as Canny's edges): a region above this lower quantile of normal maps that touches a pixel above
    # normal_quantile is defect too, so a defect's confident core brings its fainter rest along. None: off.
    grow_quantile: float | None = None


def grown(core: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """The connected regions (8-connected) of candidates (H, W) bool that hold a pixel of core; core itself too."""
    n, labels = cv2.connectedComponents((candidates | core).astype(np.uint8), connectivity=8)
    keep = np.zeros(n, dtype=bool)
    keep[np.unique(labels[core])] = True
    keep[0] = False
    return keep[labels]


def pseudo_masks(maps: np.ndarray, normal_level: float, cfg: PseudoMaskConfig,
                 grow_level: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """maps (N, H, W) map logits of weakly labelled defective images -> (defect (N,H,W) bool, unknown (N,H,W) bool).
    grow_level: with it, a region above it that touches a defect pixel is defect too (within the top fraction)."""
    defect = np.zeros(maps.shape, dtype=bool)
    unknown = np.zeros(maps.shape, dtype=bool)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * cfg.margin + 1, 2 * cfg.margin + 1))
    for i, m in enumerate(maps):
        hi = np.quantile(m, 1.0 - cfg.top)
        lo = np.quantile(m, 1.0 - cfg.unsure)
        d = (m >= hi) & (m > normal_level)
        if grow_level is not None and d.any():
            d = grown(d, (m >= hi) & (m > grow_level))
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


def _apply(arrays: ArraySet, weak: np.ndarray, defect: np.ndarray, unknown: np.ndarray,
           normal_level: float) -> tuple[ArraySet, dict[str, float]]:
    """arrays with defect/unknown (N, H, W) as the masks of images weak (N,) where defect marks any pixel; those
    images then count as masked. The stats say how many of them got one."""
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
        m, _ = model.heads(feats, gated=False)  # pseudo-masks threshold the segmentation logits themselves
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
    normal_maps = model_maps(model, arrays, pick)
    level = lambda q: float(np.quantile(normal_maps, q)) if len(pick) else -np.inf  # noqa: E731
    normal_level = level(cfg.normal_quantile)
    grow_level = None if cfg.grow_quantile is None else level(cfg.grow_quantile)
    defect, unknown = pseudo_masks(model_maps(model, arrays, weak), normal_level, cfg, grow_level)
    return _apply(arrays, weak, defect, unknown, normal_level)


# ---------------------------------------------------------------------------------------------------------------
# Pseudo-masks from a nearest-neighbour teacher (train.pseudo_source: knn)
#
# The model's own map is a poor teacher in the weak setting: it learned pixels from synthetic anomalies only and
# barely ranks real defects (pixel AUROC 55-67 on Magnetic tile). A teacher that owes nothing to the heads is the
# frozen backbone itself: a patch far from every patch of the normal training images is anomalous (PatchCore's
# map). It also flags what is merely unusual, so only images whose label says "defective" get its verdict, and
# only where it exceeds what held-out normal images reach.
#
# Measured on Magnetic tile (benchmarks/results/weak.json). The teacher's own map, no label used, on the test split
# (variant knn_teacher): pixel AUPRO 77.97 / AP 19.36 / AUROC 81.25, image AUROC (its max) 85.40; CAM 59.36 / 8.39,
# the supervised SSN 74.17 / 55.29. Its training pseudo-masks (138 of 196 defects got one) were 51 % precise at
# 10 % recall against the hidden masks (a diagnostic, not a results record). SSN's map did not learn what the
# teacher knows (seed 0): weak pixel AP 12.05 (ssn_weak_knn; ssn_weak_detached 15.54), pixel AUROC 67.5; mixed
# 10 % AP 28.00 (mixed_10_knn; mixed_10_balanced 28.07) though AUPRO rose to 80.42 from 75.06. No pseudo-defect
# within 16 px of the border (border 16; variants *_knn_border): 12.87 and 26.96. So train.pseudo_source stays
# "map" by default.


@dataclass(frozen=True)
class KnnPseudoConfig:
    top: float = 0.25  # at most this fraction of an image's pixels may become defect
    normal_quantile: float = 0.999  # a defect pixel's distance exceeds this quantile of held-out normal images'
    bank_size: int = 30000  # normal patches in the memory bank (a random draw)
    held_out: int = 128  # normal training images kept out of the bank to set the normal level
    pool: int = 2  # feature maps average-pooled by this factor first (4x fewer queries at 2)
    # pixels (image resolution) along the image border where the teacher is not trusted: on Magnetic tile half of its
    # false positives lie within 16 px of the border (23 % of the image at 256; a diagnostic). Measured: no help.
    border: int = 0


@torch.no_grad()
def knn_distance(bank: torch.Tensor, queries: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Euclidean distance from each row of queries (Q, C) to its nearest row of bank (B, C): (Q,)."""
    bank = bank.float()
    bank_sq = (bank * bank).sum(1)
    out = []
    for s in range(0, len(queries), chunk):
        q = queries[s : s + chunk].float()
        d = (q * q).sum(1, keepdim=True) - 2.0 * (q @ bank.T) + bank_sq
        out.append(d.amin(1).clamp(min=0).sqrt())
    return torch.cat(out) if out else queries.new_zeros(0)


def _distance_maps(bank: torch.Tensor, pool: int, features, indices: np.ndarray, batch: int = 16) -> np.ndarray:
    """(n, h / pool, w / pool) distance of each patch of images `indices` to its nearest row of bank."""
    out = []
    for s in range(0, len(indices), batch):
        f = _pooled(features(indices[s : s + batch]), pool)
        n, c, h, w = f.shape
        out.append(knn_distance(bank, f.permute(0, 2, 3, 1).reshape(-1, c)).reshape(n, h, w).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0, 0), dtype=np.float32)


def _pooled(f: torch.Tensor, pool: int) -> torch.Tensor:
    return F.avg_pool2d(f.float(), pool) if pool > 1 else f.float()


@dataclass(frozen=True)
class KnnTeacher:
    """The nearest-neighbour teacher: a bank of normal patches and the distance held-out normal images reach."""

    bank: torch.Tensor  # (B, C)
    normal_level: float  # the normal_quantile of held-out normal images' distances
    pool: int

    def distance_maps(self, features, indices: np.ndarray) -> np.ndarray:
        """(n, h / pool, w / pool) distance of each patch of images `indices` to its nearest normal patch."""
        return _distance_maps(self.bank, self.pool, features, indices)


def fit_knn_teacher(features, arrays: ArraySet, cfg: KnnPseudoConfig, seed: int = 0) -> KnnTeacher:
    """features(indices) -> (n, C, h, w): the frozen backbone's merged maps of arrays.images[indices]. Normal
    images are split at random: `held_out` of them set the normal level, a random draw of the rest's patches is
    the bank. Only normal images are looked at."""
    good = np.random.default_rng(seed).permutation(np.flatnonzero(arrays.labels == 0))
    held = good[: min(cfg.held_out, len(good) // 2)]
    banked = good[len(held):]
    if not len(held) or not len(banked):
        raise ValueError("train.pseudo_source knn needs at least 2 normal training images (a bank and a held-out set)")
    patches = torch.cat([_pooled(features(banked[s : s + 16]), cfg.pool) for s in range(0, len(banked), 16)])
    patches = patches.permute(0, 2, 3, 1).reshape(-1, patches.shape[1])
    bank = patches[torch.randperm(len(patches), generator=torch.Generator().manual_seed(seed))[: cfg.bank_size]]
    level = float(np.quantile(_distance_maps(bank, cfg.pool, features, held), cfg.normal_quantile))
    return KnnTeacher(bank, level, cfg.pool)


def knn_pseudo_masks(features, arrays: ArraySet, cfg: KnnPseudoConfig,
                     seed: int = 0) -> tuple[ArraySet, dict[str, float]]:
    """arrays with pseudo-masks on the defective images that have no mask, from the nearest-neighbour teacher
    (fit_knn_teacher; training passes its feature cache as `features`). A label-only defect's pixels above the
    normal level (and within its top `top` fraction) become defect; every other pixel stays unknown (positives
    only). The stats say how many got one."""
    weak = np.flatnonzero((arrays.labels == 1) & ~arrays.mask_valid)
    if not len(weak):
        return arrays, {"pseudo_masked": 0, "pseudo_candidates": 0}
    teacher = fit_knn_teacher(features, arrays, cfg, seed)
    size = tuple(arrays.images.shape[-2:])
    dist = np.stack([cv2.resize(m, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
                     for m in teacher.distance_maps(features, weak)])
    if cfg.border > 0:  # below any distance: neither defect nor counted in the image's top fraction
        b = cfg.border
        dist[:, :b], dist[:, -b:], dist[:, :, :b], dist[:, :, -b:] = -np.inf, -np.inf, -np.inf, -np.inf
    defect, unknown = pseudo_masks(dist, teacher.normal_level, PseudoMaskConfig(top=cfg.top, rest="unknown"))
    return _apply(arrays, weak, defect, unknown, teacher.normal_level)

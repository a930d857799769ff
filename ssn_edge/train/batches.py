"""What an epoch iterates over: training items (image, flip view), their batches, and their pixel truth.

Unsupervised batches are normal images only. With defects (spec 2, supervised) each batch is half normal, half
defective, every defective image seen in four flip views; in mixed training `masked_share` of the defective half
comes from the defects with a mask, so a few masks are not drowned out by many image labels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ssn_edge.data import ArraySet
from ssn_edge.train.features import VIEWS, flip

log = logging.getLogger("ssn_edge")

UNKNOWN = -1.0  # a ground-truth pixel whose truth is unknown (a pseudo-mask's rest): no pixel loss there


@dataclass
class TrainItems:
    """(image index, flip view) pairs, split into normal and defective."""

    normal: np.ndarray  # (n, 2) int
    defective: np.ndarray  # (m, 2) int

    @property
    def all(self) -> np.ndarray:
        return np.concatenate([self.normal, self.defective]) if len(self.defective) else self.normal


def make_items(arrays: ArraySet, setting: str) -> TrainItems:
    """Normal images unflipped; defective ones (every setting but unsupervised) in all four flip views."""
    good = np.flatnonzero(arrays.labels == 0)
    bad = np.flatnonzero(arrays.labels == 1)
    if setting == "unsupervised":
        if len(bad):
            log.warning("unsupervised setting: %d defective training images are ignored", len(bad))
        bad = bad[:0]
    elif not len(bad):
        raise ValueError(f"{setting} setting needs defective images in the training split; none found")
    normal = np.stack([good, np.zeros_like(good)], axis=1)
    defective = np.array([(i, v) for i in bad for v in range(len(VIEWS))], dtype=np.int64).reshape(-1, 2)
    return TrainItems(normal, defective)


def draw_defective(defective: np.ndarray, mask_valid: np.ndarray, n: int, share: float | None,
                   rng: np.random.Generator) -> np.ndarray:
    """n (image, view) pairs for a batch's defective half, with replacement. share (weak.masked_share): that
    fraction from defects with a mask and the rest from label-only ones; None, or only one kind present: uniform."""
    has_mask = mask_valid[defective[:, 0]]
    if share is None or has_mask.all() or not has_mask.any():
        return defective[rng.integers(0, len(defective), n)]
    k = int(round(n * share))
    masked, label_only = defective[has_mask], defective[~has_mask]
    return np.concatenate([masked[rng.integers(0, len(masked), k)], label_only[rng.integers(0, len(label_only), n - k)]])


def epoch_batches(items: TrainItems, annotated: np.ndarray, batch_size: int, share: float | None,
                  rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's batches: every normal image once, in a new order. With defects each batch is half normal and
    half defective (drawn by draw_defective); annotated: which images have a mask of their own (pseudo-masks do
    not count, so they never pass for annotation in the balance)."""
    order = rng.permutation(len(items.normal))
    if not len(items.defective):
        return [items.normal[order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
    half = max(1, batch_size // 2)
    return [np.concatenate([items.normal[order[s : s + half]], draw_defective(items.defective, annotated, half, share, rng)])
            for s in range(0, len(order), half)]


def feature_masks(arrays: ArraySet, chunk: np.ndarray, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Ground-truth masks at feature size (bilinear, then > 0.5, as in the paper; UNKNOWN where arrays.ignore
    touches a feature pixel that is not a defect) and per-sample validity."""
    def small(planes: np.ndarray) -> Tensor:
        big = torch.stack([flip(torch.from_numpy(planes[i]).float()[None], VIEWS[v]) for i, v in chunk])
        return F.interpolate(big, size=size, mode="bilinear", align_corners=False)

    defect = small(arrays.masks) > 0.5
    gt = defect.float()
    if arrays.ignore is not None:
        gt[(small(arrays.ignore) > 0.25) & ~defect] = UNKNOWN
    valid = torch.from_numpy(arrays.mask_valid[chunk[:, 0]].copy())
    return gt, valid

"""Defect copy-paste for mixed supervision: each annotated defect, transplanted onto normal training images.

With masks on a few defects, the segmentation head sees each annotated defect in one context only. Pasting
the defect (its mask, a small feathered margin) onto other normal images of the training split gives new
images whose mask is known exactly, and new backbone features for the same defect: the frozen backbone's
receptive field mixes the defect with the new surroundings. The defect keeps its place in the image, flipped
with its image at random, so a defect that lives on a part's edge (Magnetic tile's breaks) stays on an edge.
The defect's brightness is shifted to the new background's level, measured on a ring just outside the margin,
so the seam is the defect's own edge and not a step in the background. Pure NumPy/OpenCV, torch-free.

Measured on Magnetic tile with masks on 10 % of the defects (20 images), 8 copies each, batches half masked
(benchmarks/results/weak.json, seeds 0-2, FP32): alone (variant mixed_10_balanced_paste) pixel AP 40.85 vs 36.76
without (38.47 / 42.39 / 41.68 vs 28.08 / 42.13 / 40.09: mostly the seed that failed without it), AUPRO 71.06 vs
75.59. With the grown pseudo-masks on the label-only defects (mixed_10_balanced_pseudo_grow_paste) it hurt: AP
39.13 vs 44.78, lower on every seed. So it is off by default (train.paste_copies: 0).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import cv2
import numpy as np

from ssn_edge.data import ArraySet


@dataclass(frozen=True)
class PasteConfig:
    copies: int  # pasted images made per annotated defective image
    margin: int = 2  # pixels around the mask pasted along with it (a defect's dark rim is often unmarked)
    feather: float = 1.5  # sigma (pixels) of the blend's soft edge outside the mask
    ring: int = 8  # the backgrounds' levels are compared on a band margin + ring pixels wide around the pasted region
    min_ring: int = 16  # fewer ring pixels than this (a mask covering the image): no level matching


def _disc(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def paste_defect(source: np.ndarray, mask: np.ndarray, target: np.ndarray, config: PasteConfig) -> np.ndarray:
    """source, target (C, H, W) float images of one size, mask (H, W) bool: target with source's masked defect.

    Inside the mask the result is the source (shifted to the target's level), in the margin a feathered blend,
    beyond it the target unchanged.
    """
    if source.shape != target.shape or mask.shape != source.shape[1:]:
        raise ValueError(f"paste_defect: source {source.shape}, target {target.shape} and mask {mask.shape} differ in size")
    m = mask.astype(np.uint8)
    grown = cv2.dilate(m, _disc(config.margin)) if config.margin else m
    alpha = grown.astype(np.float32)
    if config.feather > 0:
        alpha = cv2.GaussianBlur(alpha, (0, 0), config.feather)
    alpha = np.maximum(alpha, m)  # the defect itself is pasted whole
    ring = (cv2.dilate(grown, _disc(config.margin + config.ring)) > 0) & (grown == 0)
    shift = np.zeros((source.shape[0], 1, 1), np.float32)
    if int(ring.sum()) >= config.min_ring:
        shift[:, 0, 0] = target[:, ring].mean(axis=1) - source[:, ring].mean(axis=1)
    return (alpha * (source + shift) + (1 - alpha) * target).astype(target.dtype)


def _flip(plane: np.ndarray, view: int) -> np.ndarray:
    """view 0-3: none, width, height, both (the training views' order)."""
    if view & 1:
        plane = plane[..., ::-1]
    if view & 2:
        plane = plane[..., ::-1, :]
    return plane


def with_pasted_defects(arrays: ArraySet, config: PasteConfig, rng: np.random.Generator) -> tuple[ArraySet, dict[str, int]]:
    """arrays plus config.copies pasted images per defective image with a usable mask, each onto a normal image
    drawn at random (label 1, mask valid, path "<defect> on <normal>"). Returns them and a count for the log."""
    if config.copies < 0:
        raise ValueError(f"train.paste_copies must be >= 0, got {config.copies}")
    sources = np.flatnonzero((arrays.labels == 1) & arrays.mask_valid & arrays.masks.any(axis=(1, 2)))
    targets = np.flatnonzero(arrays.labels == 0)
    n = len(sources) * config.copies
    if n == 0 or not len(targets):
        return arrays, {"pasted": 0, "paste_sources": int(len(sources))}
    images = np.empty((n, *arrays.images.shape[1:]), arrays.images.dtype)
    masks = np.empty((n, *arrays.masks.shape[1:]), bool)
    paths = []
    k = 0
    for i in sources:
        for _ in range(config.copies):
            j, view = int(rng.choice(targets)), int(rng.integers(0, 4))
            mask = np.ascontiguousarray(_flip(arrays.masks[i], view))
            images[k] = paste_defect(np.ascontiguousarray(_flip(arrays.images[i], view)), mask, arrays.images[j], config)
            masks[k] = mask
            paths.append(f"{arrays.paths[i]} on {arrays.paths[j]}")
            k += 1
    ignore = None
    if arrays.ignore is not None:
        ignore = np.concatenate([arrays.ignore, np.zeros_like(masks)])
    out = dataclasses.replace(
        arrays,
        images=np.concatenate([arrays.images, images]),
        masks=np.concatenate([arrays.masks, masks]),
        labels=np.concatenate([arrays.labels, np.ones(n, arrays.labels.dtype)]),
        mask_valid=np.concatenate([arrays.mask_valid, np.ones(n, bool)]),
        paths=[*arrays.paths, *paths],
        ignore=ignore,
    )
    return out, {"pasted": n, "paste_sources": int(len(sources))}

"""Decode samples into the arrays that training and evaluation consume. Torch-free."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ssn_edge.runtime.preprocess import prepare, read_image, read_mask, resize_mask

from .samples import Sample

log = logging.getLogger("ssn_edge")


@dataclass
class ArraySet:
    """images (N,3,H,W) float32 normalised; masks (N,H,W) bool; labels (N,) int64;
    mask_valid (N,) bool: False where the pixel truth is unknown (defective without a mask, or whose
    mask is empty); paths: the image paths, as str."""

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    mask_valid: np.ndarray
    paths: list[str]
    # (N,H,W) bool or None: pixels whose truth is unknown inside an otherwise valid mask (pseudo-mask margins)
    ignore: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(v) != v or v <= 0 for v in size):
        raise ValueError(f"size must be (height, width) with positive integers, got {size!r}")
    return int(size[0]), int(size[1])


def load_arrays(samples: Sequence[Sample], size: tuple[int, int], progress: bool = False) -> ArraySet:
    """Read every sample's image (and mask, for defective samples) at ``size=(H, W)``.

    A mask whose size differs from its image is first resized to the image (nearest). A defective
    sample whose mask is all zero, or has none, keeps its image label but gets ``mask_valid=False``
    (no pixel target, excluded from pixel metrics). Errors from reading a file name that file.
    """
    h, w = _check_size(size)
    samples = list(samples)
    n = len(samples)
    images = np.empty((n, 3, h, w), dtype=np.float32)
    masks = np.zeros((n, h, w), dtype=bool)
    labels = np.empty(n, dtype=np.int64)
    mask_valid = np.ones(n, dtype=bool)

    resized: list[str] = []
    empty: list[str] = []
    vanished: list[str] = []
    unmasked = 0

    iterator = samples
    if progress:
        from tqdm import tqdm

        iterator = tqdm(samples, desc="loading images", unit="img")
    for i, s in enumerate(iterator):
        image = read_image(s.image)
        images[i] = prepare(image, (h, w))
        labels[i] = s.label
        if s.label == 0:
            continue
        if s.mask is None:
            mask_valid[i] = False
            unmasked += 1
            continue
        mask = read_mask(s.mask)
        if mask.shape != image.shape[:2]:
            resized.append(str(s.mask))
            mask = resize_mask(mask, image.shape[:2])
        if not mask.any():
            empty.append(str(s.mask))
            mask_valid[i] = False
            continue
        mask = resize_mask(mask, (h, w))
        if not mask.any():
            # The defect is smaller than one pixel at the working size: an all-background target on
            # a defective image would be wrong truth, so keep the image label only.
            vanished.append(str(s.mask))
            mask_valid[i] = False
            continue
        masks[i] = mask

    if resized:
        log.warning(
            "%d masks differ in size from their image; resized (nearest). First: %s", len(resized), resized[0]
        )
    if empty:
        log.warning(
            "%d defective images have an all-zero mask; used as image-label-only "
            "(no pixel target, excluded from pixel metrics): %s",
            len(empty),
            ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else ""),
        )
    if vanished:
        log.warning(
            "%d defective masks lose every defect pixel when resized to %dx%d; used as image-label-only "
            "(no pixel target, excluded from pixel metrics): %s",
            len(vanished),
            h,
            w,
            ", ".join(vanished[:5]) + (", ..." if len(vanished) > 5 else ""),
        )
    if unmasked:
        log.info("%d defective images have no mask; used as image-label-only", unmasked)
    return ArraySet(images=images, masks=masks, labels=labels, mask_valid=mask_valid, paths=[str(s.image) for s in samples])


def concat_arrays(*parts: ArraySet) -> ArraySet:
    """The parts one after another (their ignore masks too, where any has one)."""
    ignore = None
    if any(p.ignore is not None for p in parts):
        ignore = np.concatenate([p.ignore if p.ignore is not None else np.zeros_like(p.masks) for p in parts])
    return ArraySet(images=np.concatenate([p.images for p in parts]), masks=np.concatenate([p.masks for p in parts]),
                    labels=np.concatenate([p.labels for p in parts]),
                    mask_valid=np.concatenate([p.mask_valid for p in parts]),
                    paths=[path for p in parts for path in p.paths], ignore=ignore)


def has_pixel_truth(arrays: ArraySet) -> bool:
    """True when pixel metrics are defined: some defective image has a usable, non-empty mask."""
    return bool(arrays.labels.any()) and bool((arrays.masks.any(axis=(1, 2)) & arrays.mask_valid).any())

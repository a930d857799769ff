"""The held-out check set: what training may judge itself by without a test split. Torch-free.

A user who trains on their own parts has normal images and, at most, a few defects. The normal training images
held out of training (data.val_fraction, `samples.split_validation`) are scored twice: as they are, and each with
one synthetic defect painted in (`synthetic.paint_defect`: scratch, spot, crack, in turn). A model whose score
cannot tell those apart has collapsed, and recipe levers are compared on it (benchmarks/recipe_bench.py) instead of
on a test split. Defective training images, where a data set has them, can be added as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from ssn_edge.runtime.preprocess import normalize, read_image, resize_image

from .arrays import ArraySet, load_arrays
from .samples import Sample
from .synthetic import DEFECTS, paint_defect


@dataclass(frozen=True)
class CheckSetSpec:
    seed: int = 0
    # How much of the painter's contrast each defect gets (1: the painter's +-60..80 grey levels of 255): real
    # surface defects are often fainter than a drawn scratch, and a check that only sees loud ones passes anything.
    contrast: float = 0.5


def painted_copy(image: np.ndarray, kind: str, rng: np.random.Generator, contrast: float) -> tuple[np.ndarray, np.ndarray]:
    """image (H, W, 3) float RGB in [0, 1] with one defect of `kind` painted into its grey level (the same shift
    on every channel); returns (image, mask (H, W) bool). Painted on a square canvas of the longer side, cropped."""
    h, w = image.shape[:2]
    side = max(h, w)
    grey = cv2.cvtColor((image * 255).astype(np.float32), cv2.COLOR_RGB2GRAY)
    canvas = np.zeros((side, side), np.uint8)
    canvas[:h, :w] = np.clip(grey, 0, 255).astype(np.uint8)
    before = canvas.astype(np.float32)
    mask = paint_defect(canvas, kind, rng)[:h, :w] > 0
    # Retry a defect drawn wholly into the padding (a non-square image): at most a few times.
    for _ in range(4):
        if mask.any():
            break
        canvas[:h, :w] = before[:h, :w].astype(np.uint8)
        mask = paint_defect(canvas, kind, rng)[:h, :w] > 0
    shift = (canvas.astype(np.float32) - before)[:h, :w] * (contrast / 255.0)
    return np.clip(image + shift[..., None], 0.0, 1.0).astype(np.float32), mask


def check_set(held_out: Sequence[Sample], size: tuple[int, int], spec: CheckSetSpec = CheckSetSpec(),
              defective: Sequence[Sample] = ()) -> ArraySet:
    """The held-out normals at size=(H, W), each again with a painted defect (label 1, its mask), then any real
    defective samples given (read as load_arrays reads them). Paths of painted copies end in '#<kind>'."""
    rng = np.random.default_rng(spec.seed)
    h, w = size
    n = len(held_out)
    images = np.empty((2 * n, 3, h, w), np.float32)
    masks = np.zeros((2 * n, h, w), bool)
    paths: list[str] = []
    for i, sample in enumerate(held_out):
        image = resize_image(read_image(sample.image), size)
        kind = DEFECTS[i % len(DEFECTS)]
        painted, mask = painted_copy(image, kind, rng, spec.contrast)
        images[i], images[n + i], masks[n + i] = normalize(image), normalize(painted), mask
        paths.append(str(sample.image))
    paths += [f"{p}#{DEFECTS[i % len(DEFECTS)]}" for i, p in enumerate(paths)]
    labels = np.r_[np.zeros(n, np.int64), np.ones(n, np.int64)]
    painted_set = ArraySet(images=images, masks=masks, labels=labels, mask_valid=np.ones(2 * n, bool), paths=paths)
    if not defective:
        return painted_set
    real = load_arrays(list(defective), size)
    return ArraySet(images=np.concatenate([painted_set.images, real.images]),
                    masks=np.concatenate([painted_set.masks, real.masks]),
                    labels=np.concatenate([painted_set.labels, real.labels]),
                    mask_valid=np.concatenate([painted_set.mask_valid, real.mask_valid]),
                    paths=painted_set.paths + real.paths)

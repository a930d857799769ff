"""The held-out check set: what training may judge itself by without a test split. Torch-free.

A user who trains on their own parts has normal images and, at most, a few defects. The normal training images
held out of training (data.val_fraction, `samples.split_validation`) are scored twice: as they are, and each with
one synthetic defect painted in (`synthetic.paint_defect`: scratch, spot, crack, in turn). A model whose score
cannot tell those apart has collapsed, and recipe levers are compared on it (benchmarks/recipe_bench.py) instead of
on a test split. Defective training images, where a data set has them and the setting does not train on them
(unsupervised), are added as they are: real defects of this data (`ssn_edge.train.job.collapse_check_set`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from ssn_edge.runtime.preprocess import normalize, read_image, resize_image

from .arrays import ArraySet, concat_arrays, load_arrays
from .samples import Sample
from .synthetic import DEFECTS, paint_defect


@dataclass(frozen=True)
class CheckSetSpec:
    seed: int = 0
    # How much of the painter's contrast each defect gets (1: the painter's +-60..80 grey levels of 255): real
    # surface defects are often fainter than a drawn scratch, and a check that only sees loud ones passes anything.
    contrast: float = 0.5
    # Painted copies per held-out normal (each a different defect in turn). One suffices to see a collapse; the
    # INT8 check at export compares two nearly equal models, and with ~20 held-out images one swapped pair moves
    # image AUROC by 0.2 points, so it paints more.
    copies: int = 1


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


def painted_copies(held_out: Sequence[Sample], size: tuple[int, int], spec: CheckSetSpec = CheckSetSpec()) -> ArraySet:
    """Each held-out normal at size=(H, W) with spec.copies painted copies, one defect each (label 1, its mask), the
    kinds in turn. Paths end in '#<kind>'."""
    rng = np.random.default_rng(spec.seed)
    h, w = size
    n = len(held_out) * spec.copies
    images = np.empty((n, 3, h, w), np.float32)
    masks = np.zeros((n, h, w), bool)
    paths = []
    for i, sample in enumerate(held_out):
        image = resize_image(read_image(sample.image), size)
        for j in range(i * spec.copies, (i + 1) * spec.copies):
            kind = DEFECTS[j % len(DEFECTS)]
            painted, masks[j] = painted_copy(image, kind, rng, spec.contrast)
            images[j] = normalize(painted)
            paths.append(f"{sample.image}#{kind}")
    return ArraySet(images=images, masks=masks, labels=np.ones(n, np.int64), mask_valid=np.ones(n, bool), paths=paths)


def unseen_defects(samples: Sequence[Sample], setting: str) -> list[Sample]:
    """The training split's defective images where training does not use them (setting unsupervised): real defects
    of this data for the check set, which painted ones only stand in for."""
    if setting != "unsupervised":
        return []
    return [s for s in samples if s.split == "train" and s.label == 1]


def check_set(held_out: Sequence[Sample], size: tuple[int, int], spec: CheckSetSpec = CheckSetSpec(),
              defective: Sequence[Sample] = ()) -> ArraySet:
    """The held-out normals at size=(H, W) (read as load_arrays reads them), their painted copies, then any real
    defective samples given."""
    parts = [load_arrays(list(held_out), size), painted_copies(held_out, size, spec)]
    return concat_arrays(*parts, *([load_arrays(list(defective), size)] if defective else []))

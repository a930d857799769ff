"""Which supervision a training run gets (spec 5): unsupervised, supervised, weak, mixed, inferred from the data.

Pixel masks are the expensive part of a factory's data. A defective training image either has a mask (pixel
and image targets) or only its image label (image target; pixel targets only where training puts synthetic
noise itself). `hide_masks` makes the weak and mixed cases out of a fully annotated set, the way a study of
annotation cost needs them. Torch-free.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ssn_edge.data import ArraySet, Sample

log = logging.getLogger("ssn_edge")

SETTINGS = ("unsupervised", "supervised", "weak", "mixed", "auto")


def hide_masks(samples: Sequence[Sample], fraction: float, seed: int = 0) -> list[Sample]:
    """Drop the masks of all but `fraction` of the defective training samples that have one.

    Chosen per defect type (so a rare type keeps its share, at least one mask when the fraction is above 0 and
    the type has any), with a generator of its own seed: every training seed sees the same annotated subset.
    Other splits are untouched: evaluation keeps its truth.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"recipe key 'data.mask_fraction': {fraction} is not between 0 and 1")
    samples = list(samples)
    if fraction >= 1.0:
        return samples
    rng = np.random.default_rng(seed)
    by_type: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        if s.split == "train" and s.label == 1 and s.has_mask:
            by_type.setdefault(s.defect, []).append(i)
    hidden: set[int] = set()
    for defect in sorted(by_type):
        idx = by_type[defect]
        keep = int(round(fraction * len(idx)))
        if fraction > 0 and keep == 0:
            keep = 1
        order = rng.permutation(len(idx))
        hidden.update(idx[k] for k in order[keep:])
    return [dataclasses.replace(s, mask=None) if i in hidden else s for i, s in enumerate(samples)]


@dataclass(frozen=True)
class Supervision:
    """What a training run uses: the setting and how many images of each kind."""

    setting: str  # unsupervised | supervised | weak | mixed (resolved: never auto)
    source: str  # "recipe" (said by train.setting) or "data" (train.setting auto)
    normal: int
    with_mask: int  # defective images trained with pixel + image targets
    label_only: int  # defective images trained with their image label only
    ignored: int  # defective images not used (unsupervised)
    mask_fraction: float = 1.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        origin = "inferred from the data" if self.source == "data" else "from the recipe"
        parts = [f"setting {self.setting} ({origin}): {self.normal} normal images (synthetic anomalies on them)"]
        if self.with_mask:
            parts.append(f"{self.with_mask} defective with mask (pixel + image targets)")
        if self.label_only:
            parts.append(f"{self.label_only} defective with image label only (image target; pixel targets only "
                         "where synthetic noise is put)")
        if self.ignored:
            parts.append(f"{self.ignored} defective ignored")
        if self.mask_fraction < 1.0:
            parts.append(f"masks kept on data.mask_fraction {self.mask_fraction:g} of the annotated ones")
        return "; ".join(parts)


def infer_setting(arrays: ArraySet) -> str:
    """unsupervised without defective images; supervised when every one has a usable mask; weak when none has;
    mixed otherwise."""
    defective = arrays.labels == 1
    masked = int((defective & arrays.mask_valid).sum())
    if not defective.any():
        return "unsupervised"
    if masked == int(defective.sum()):
        return "supervised"
    return "weak" if masked == 0 else "mixed"


def apply_setting(arrays: ArraySet, requested: str, mask_fraction: float = 1.0) -> tuple[ArraySet, Supervision]:
    """Resolve `requested` (a SETTINGS name) against the training arrays and return the arrays training uses.

    weak ignores every mask (mask_valid False on defective images); supervised and mixed train identically (masks
    where present, image labels elsewhere) and differ only in what they promise, so a supervised recipe on data
    with unannotated defects says so in a warning; weak, mixed and supervised need defective images.
    """
    if requested not in SETTINGS:
        raise ValueError(f"recipe key 'train.setting': {requested!r} is not one of {', '.join(SETTINGS)}")
    source = "recipe"
    setting = requested
    if requested == "auto":
        setting, source = infer_setting(arrays), "data"
    defective = arrays.labels == 1
    n_def = int(defective.sum())
    if setting != "unsupervised" and n_def == 0:
        raise ValueError(f"setting {setting!r} needs defective images in the training split; none found")
    mask_valid = arrays.mask_valid
    if setting == "weak":
        mask_valid = np.where(defective, False, arrays.mask_valid)
        arrays = dataclasses.replace(arrays, mask_valid=mask_valid, masks=np.zeros_like(arrays.masks))
    masked = int((defective & mask_valid).sum())
    if setting == "supervised" and masked < n_def:
        log.warning("supervised setting: %d of %d defective training images have no usable mask; they train with "
                    "their image label only (as in the mixed setting)", n_def - masked, n_def)
    if setting == "mixed" and masked == 0:
        log.warning("mixed setting but no defective training image has a mask: this is the weak setting")
    unsup = setting == "unsupervised"
    info = Supervision(
        setting=setting,
        source=source,
        normal=int((~defective).sum()),
        with_mask=0 if unsup else masked,
        label_only=0 if unsup else n_def - masked,
        ignored=n_def if unsup else 0,
        mask_fraction=float(mask_fraction),
    )
    return arrays, info

"""The frozen backbone's (layer2, layer3) maps of training items: computed once and cached, or on every step.

The backbone is frozen and the only augmentation (flips of defective images) is a fixed set of views, so every
item's maps can be computed once: an epoch then costs only the adaptor and heads (spec 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ssn_edge.data import ArraySet
from ssn_edge.model.ssn import SuperSimpleNet
from ssn_edge.model.tiled import crop_features

# Flip views used to augment defective images in supervised training: (flip height, flip width).
VIEWS: tuple[tuple[bool, bool], ...] = ((False, False), (False, True), (True, False), (True, True))


def flip(x: Tensor, view: tuple[bool, bool]) -> Tensor:
    dims = [d for d, on in zip((-2, -1), view) if on]
    return torch.flip(x, dims) if dims else x


@dataclass
class SharedFeatures:
    """Tiled training with a shared backbone: item r's maps are cut from its whole image's maps (image r // T,
    tile box boxes[r % T], T = len(boxes)), so the heads learn on exactly what the shared-backbone graph gives
    them at inference, context beyond the tile edge included, instead of a lone tile's zero padding."""

    images: np.ndarray  # (N, 3, H', W') normalised, zero-padded to the tile grid as the "image" graph pads
    boxes: list[tuple[int, int, int, int]]  # (y0, x0, y1, x1) in image pixels


def flipped_box(box: tuple[int, int, int, int], view: tuple[bool, bool], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where a tile box lies in the flipped image: the flipped tile with its flipped context."""
    y0, x0, y1, x1 = box
    h, w = size
    if view[0]:
        y0, y1 = h - y1, h - y0
    if view[1]:
        x0, x1 = w - x1, w - x0
    return y0, x0, y1, x1


class FeatureSource:
    """Backbone (layer2, layer3) maps for training items (image index, flip view): cached, or computed per call."""

    def __init__(self, model: SuperSimpleNet, arrays: ArraySet, items: np.ndarray, cache: bool, batch: int = 16,
                 shared: SharedFeatures | None = None):
        self.model = model
        self.arrays = arrays
        self.shared = shared
        self.cache: dict[tuple[int, int], tuple[Tensor, Tensor]] | None = None
        if cache:
            self.cache = {}
            for start in tqdm(range(0, len(items), batch), desc="caching backbone features", leave=False):
                chunk = items[start : start + batch]
                l2, l3 = self._compute(chunk)
                for k, (i, v) in enumerate(chunk):
                    self.cache[(int(i), int(v))] = (l2[k].clone(), l3[k].clone())

    def _compute(self, chunk: np.ndarray) -> tuple[Tensor, Tensor]:
        if self.shared is not None:
            return self._compute_shared(chunk)
        x = torch.stack([flip(torch.from_numpy(self.arrays.images[i]), VIEWS[v]) for i, v in chunk])
        return self.model.features.raw(x)

    def _compute_shared(self, chunk: np.ndarray) -> tuple[Tensor, Tensor]:
        t = len(self.shared.boxes)
        x = torch.stack([flip(torch.from_numpy(self.shared.images[i // t]), VIEWS[v]) for i, v in chunk])
        l2, l3 = self.model.features.raw(x)
        crops = [
            crop_features(l2[k], l3[k], flipped_box(self.shared.boxes[int(i) % t], VIEWS[v], tuple(x.shape[-2:])))
            for k, (i, v) in enumerate(chunk)
        ]
        return torch.stack([c[0] for c in crops]), torch.stack([c[1] for c in crops])

    def get(self, chunk: np.ndarray) -> tuple[Tensor, Tensor]:
        if self.cache is None:
            return self._compute(chunk)
        pairs = [self.cache[(int(i), int(v))] for i, v in chunk]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

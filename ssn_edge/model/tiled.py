"""Tiled SSN (spec 6): one frozen backbone, the trained part (adaptor + heads) per tile location or shared.

Two ways to feed the heads, same weights:
* shared backbone ("image" graph): the backbone runs once on the whole image; each location's heads get the
  crop of its layer2/layer3 maps that covers their tile. A tile then costs only adaptor + heads.
* independent tiles ("tiles" graph, the paper's): every tile goes through the backbone on its own.
The two differ only near tile borders, where the shared backbone sees the neighbouring image and an
independent tile sees zero padding (measured: `benchmarks/tiling_bench.py edge-profile`). The heads are trained
on the features of the graph they will run in (`ssn_edge.train.tiled`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ssn_edge.config import ModelConfig, Recipe
from ssn_edge.model.ssn import FeatureExtractor, SSNHeads
from ssn_edge.runtime.tiling import TileGrid, TilingConfig

LAYER2_STRIDE, LAYER3_STRIDE = 8, 16


def crop_features(l2: Tensor, l3: Tensor, box: tuple[int, int, int, int]) -> tuple[Tensor, Tensor]:
    """The layer2/layer3 maps over one tile box (y0, x0, y1, x1 in image pixels) of a whole image's maps: what
    a location's heads see with a shared backbone, in training and at inference alike."""
    y0, x0, y1, x1 = box
    if any(v % LAYER3_STRIDE for v in box):
        raise ValueError(f"tile box {box} is not on the backbone's {LAYER3_STRIDE}-pixel grid")
    s2, s3 = LAYER2_STRIDE, LAYER3_STRIDE
    return l2[..., y0 // s2 : y1 // s2, x0 // s2 : x1 // s2], l3[..., y0 // s3 : y1 // s3, x0 // s3 : x1 // s3]


class TiledSSN(nn.Module):
    """(B, 3, H', W') image or (B, T, 3, th, tw) tiles -> map logits (B, T, h, w), score logits (B, T)."""

    def __init__(self, cfg: ModelConfig, tiling: TilingConfig):
        super().__init__()
        if tiling.image_size is None:
            raise ValueError("TiledSSN runs on a fixed image size (tiling.image_size)")
        self.config, self.tiling = cfg, tiling
        self.features = FeatureExtractor(cfg)
        self.heads = nn.ModuleList([SSNHeads(self.features.channels, cfg) for _ in range(tiling.locations)])
        self.boxes = tiling.grid(tiling.image_size).boxes

    def heads_for(self, location: int) -> SSNHeads:
        return self.heads[location if len(self.heads) > 1 else 0]

    def forward_image(self, image: Tensor) -> tuple[Tensor, Tensor]:
        l2, l3 = self.features.raw(image)
        maps, scores = [], []
        for k, box in enumerate(self.boxes):
            m, s = self.heads_for(k)(self.features.merge(*crop_features(l2, l3, box)))
            maps.append(m[:, 0])
            scores.append(s)
        return torch.stack(maps, 1), torch.stack(scores, 1)

    def forward_tiles(self, tiles: Tensor) -> tuple[Tensor, Tensor]:
        b, t = tiles.shape[:2]
        feats = self.features(tiles.flatten(0, 1))
        feats = feats.reshape(b, t, *feats.shape[1:])
        maps, scores = [], []
        for k in range(t):
            m, s = self.heads_for(k)(feats[:, k])
            maps.append(m[:, 0])
            scores.append(s)
        return torch.stack(maps, 1), torch.stack(scores, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward_tiles(x) if x.dim() == 5 else self.forward_image(x)


def runtime_tiling(recipe: Recipe, graph: str | None = None) -> TilingConfig:
    """The runtime's TilingConfig for a tiled recipe. graph: override the recipe's choice (see tiling.GRAPHS)."""
    t = recipe.tiling
    if t is None:
        raise ValueError(f"recipe {recipe.name!r} has no tiling section")
    size = tuple(recipe.data.image_size)
    if graph is None:
        graph = "image" if t.shared_backbone else ("tiles" if t.mode == "ensemble" else "tile")
    locations = TileGrid(size, t.tile, t.stride).count if t.mode == "ensemble" else 1
    return TilingConfig(
        tile=t.tile,
        stride=t.stride,
        score=t.score,
        seam_halfwidth=t.seam_halfwidth,
        seam_sigma=t.seam_sigma,
        mode=t.mode,
        image_size=size,
        locations=locations,
        graph=graph,
    )


def padded_images(images: np.ndarray, grid: TileGrid) -> np.ndarray:
    """Whole images (N, 3, H, W) zero-padded to the tile grid, as the shared-backbone ("image") graph pads them."""
    ph, pw = grid.padded_size
    out = np.zeros((len(images), 3, ph, pw), dtype=np.float32)
    out[:, :, : images.shape[2], : images.shape[3]] = images
    return out


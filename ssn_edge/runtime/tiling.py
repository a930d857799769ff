"""Tiled inference core (spec 6, "Divide and Conquer"): NumPy only, no torch.

A TileGrid places tiles of (th, tw) every (sh, sw) pixels; tile (i, j) covers rows [sh*i, sh*i + th) and
columns [sw*j, sw*j + tw) of the image padded bottom/right to the smallest size the grid covers exactly: with zeros
(ensembles: each location's heads were trained on what its padding holds), or a single model's tiles with a mirror
of their own part of the image (`mirrored`), since a flat grey band reads as an anomaly to a model that saw none.
`tile` cuts an image into a (count, th, tw[, C]) batch, `untile` merges per-tile maps back with a pixel-wise
average over overlaps and crops to the image, and `merge_scores` / `image_score` turn tile scores into one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

SCORE_METHODS = ("mean", "max")
IMAGE_SCORE_METHODS = ("mean", "max", "map_max")
MODES = ("single", "ensemble")
# What fills a tile where it leaves the image: "zero" (0 after normalisation: the ImageNet mean colour) or "mirror"
# (the tile's own part of the image reflected). Bottle at 512, tiles of 256 every 192 (the last row and column
# padded by 128), single model, INT8: pixel AUPRO 58.9 with zeros, 86.6 mirrored (86.7 at stride 256, no padding);
# benchmarks/tiling_bench.py layouts.
FILLS = ("zero", "mirror")
# What the exported graph of a tiled bundle takes:
#   "tile":  one tile (N, 3, th, tw) -> (N, 1, h, w), (N,): a single model, images of any size tiled at run time;
#   "image": the whole image (N, 3, H', W') -> (N, T, h, w), (N, T): backbone once, each location's heads on
#            their crop of its features (shared backbone);
#   "tiles": the image's tiles (N, T, 3, th, tw) -> (N, T, h, w), (N, T): every tile through the backbone on
#            its own (the paper's way).
GRAPHS = ("tile", "image", "tiles")
FEATURE_STRIDE = 16  # layer3's stride: shared-backbone crops must fall on its grid


def _pair(name: str, value: Any) -> tuple[int, int]:
    try:
        a, b = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of positive ints, got {value!r}") from None
    out = []
    for v in (a, b):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a pair of positive ints, got {value!r}")
        out.append(int(v))
    return out[0], out[1]


def _tiles_per_axis(size: int, tile: int, stride: int) -> int:
    return max(1, math.ceil((size - tile) / stride) + 1)


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one image size go. All coordinates are in the padded image (pad is bottom/right)."""

    image_size: tuple[int, int]  # (H, W)
    tile: tuple[int, int]  # (th, tw)
    stride: tuple[int, int]  # (sh, sw)

    def __post_init__(self) -> None:
        image_size = _pair("image_size", self.image_size)
        tile = _pair("tile", self.tile)
        stride = _pair("stride", self.stride)
        if stride[0] > tile[0] or stride[1] > tile[1]:
            raise ValueError(
                f"stride {stride} must be <= tile {tile} on both axes (a larger stride leaves gaps between tiles)"
            )
        object.__setattr__(self, "image_size", image_size)
        object.__setattr__(self, "tile", tile)
        object.__setattr__(self, "stride", stride)

    @property
    def rows(self) -> int:
        return _tiles_per_axis(self.image_size[0], self.tile[0], self.stride[0])

    @property
    def cols(self) -> int:
        return _tiles_per_axis(self.image_size[1], self.tile[1], self.stride[1])

    @property
    def count(self) -> int:
        return self.rows * self.cols

    @property
    def padded_size(self) -> tuple[int, int]:
        """Smallest (H', W') >= image_size that the grid covers exactly (at least one tile)."""
        return (
            (self.rows - 1) * self.stride[0] + self.tile[0],
            (self.cols - 1) * self.stride[1] + self.tile[1],
        )

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        """(y0, x0, y1, x1) per tile, row-major, in padded coordinates (y1/x1 exclusive)."""
        (th, tw), (sh, sw) = self.tile, self.stride
        return [
            (sh * i, sw * j, sh * i + th, sw * j + tw) for i in range(self.rows) for j in range(self.cols)
        ]

    def interior_seams(self) -> tuple[list[int], list[int]]:
        """(ys, xs): sorted, deduplicated tile-edge coordinates strictly inside the padded image.

        A seam at y lies between pixel rows y - 1 and y (a tile starts at y or ends just before it).
        """
        (th, tw), (sh, sw) = self.tile, self.stride
        ph, pw = self.padded_size
        ys = {sh * i for i in range(self.rows)} | {sh * i + th for i in range(self.rows)}
        xs = {sw * j for j in range(self.cols)} | {sw * j + tw for j in range(self.cols)}
        return sorted(y for y in ys if 0 < y < ph), sorted(x for x in xs if 0 < x < pw)


def _as_hwc(array: np.ndarray, what: str) -> tuple[np.ndarray, bool]:
    if array.ndim == 2:
        return array[:, :, None], True
    if array.ndim == 3:
        return array, False
    raise ValueError(f"{what} must be (H, W) or (H, W, C), got shape {array.shape}")


def _windows(canvas: np.ndarray, grid: TileGrid, writeable: bool = False) -> np.ndarray:
    """Strided views of every tile of a padded (H', W', C) canvas: (rows, cols, C, th, tw), no copy."""
    view = sliding_window_view(canvas, grid.tile, axis=(0, 1), writeable=writeable)
    return view[:: grid.stride[0], :: grid.stride[1]]


def mirrored(part: np.ndarray, size: tuple[int, int], axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """part grown at the end of `axes` to `size` by reflecting it (numpy's "reflect", repeated where the part is
    less than half the size; a part one pixel wide is repeated)."""
    pad = [(0, 0)] * part.ndim
    for axis, n in zip(axes, size):
        pad[axis] = (0, n - part.shape[axis])
    return np.pad(part, pad, mode="reflect") if any(p[1] for p in pad) else part


def tile(image: np.ndarray, grid: TileGrid, fill: str = "zero") -> np.ndarray:
    """(H, W) or (H, W, C) image -> (count, th, tw) or (count, th, tw, C) tiles, row-major; where a tile leaves the
    image it holds zeros or (fill "mirror") its own part of the image reflected."""
    image = np.asarray(image)
    hwc, flat = _as_hwc(image, "image")
    if hwc.shape[:2] != grid.image_size:
        raise ValueError(f"image is {hwc.shape[:2]} but the grid is for {grid.image_size}")
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    ph, pw = grid.padded_size
    h, w = grid.image_size
    padded = hwc
    if (ph, pw) != (h, w):
        padded = np.zeros((ph, pw, hwc.shape[2]), dtype=hwc.dtype)
        padded[:h, :w] = hwc
    win = _windows(padded, grid)  # (rows, cols, C, th, tw)
    out = np.ascontiguousarray(np.moveaxis(win, 2, -1)).reshape(grid.count, *grid.tile, hwc.shape[2])
    if fill == "mirror" and (ph, pw) != (h, w):
        for k, (y0, x0, y1, x1) in enumerate(grid.boxes):
            if y1 > h or x1 > w:
                out[k] = mirrored(hwc[y0:y1, x0:x1], grid.tile)
    return out[..., 0] if flat else out


def untile(tiles: np.ndarray, grid: TileGrid) -> np.ndarray:
    """(count, th, tw[, C]) tiles -> (H, W[, C]) image: pixel-wise average over overlaps, cropped to image_size.

    The average is a running mean in float64 (mean += (x - mean) / n), so pixels whose tiles agree come back
    bit-exact for every dtype. Float inputs keep their dtype; integer/bool inputs come back as float64.
    """
    tiles = np.asarray(tiles)
    if tiles.ndim not in (3, 4) or tiles.shape[0] != grid.count or tiles.shape[1:3] != grid.tile:
        raise ValueError(
            f"tiles must be ({grid.count}, {grid.tile[0]}, {grid.tile[1]}[, C]) for this grid, got {tiles.shape}"
        )
    flat = tiles.ndim == 3
    channels = 1 if flat else tiles.shape[3]
    out_dtype = tiles.dtype if np.issubdtype(tiles.dtype, np.floating) else np.dtype(np.float64)
    (th, tw), (sh, sw) = grid.tile, grid.stride
    rows, cols = grid.rows, grid.cols
    ph, pw = grid.padded_size
    grid_tiles = tiles.reshape(rows, cols, th, tw, channels)

    mean = np.zeros((ph, pw, channels), dtype=np.float64)
    seen = np.zeros((ph, pw, 1), dtype=np.float64)
    mean_win = _windows(mean, grid, writeable=True)  # (rows, cols, C, th, tw)
    seen_win = _windows(seen, grid, writeable=True)
    # Tiles a = ceil(th / sh) rows apart (b columns apart) never overlap, so each residue class
    # (i % a, j % b) is updated in one vectorised step: min(a, rows) * min(b, cols) <= count steps in all.
    a, b = math.ceil(th / sh), math.ceil(tw / sw)
    for r in range(min(a, rows)):
        for c in range(min(b, cols)):
            part = np.moveaxis(grid_tiles[r::a, c::b], -1, 2).astype(np.float64)
            n = seen_win[r::a, c::b]
            n += 1.0
            m = mean_win[r::a, c::b]
            m += (part - m) / n
    h, w = grid.image_size
    out = mean[:h, :w].astype(out_dtype)
    return out[..., 0] if flat else out


def coverage(grid: TileGrid) -> tuple[np.ndarray, np.ndarray]:
    """(rows (H',), cols (W',)) float32: how many rows / columns of tiles cover each padded row / column. The
    tiles covering pixel (y, x) number rows[y] * cols[x]: the count `untile` divides by, without counting."""
    (th, tw), (sh, sw) = grid.tile, grid.stride
    ph, pw = grid.padded_size
    rows, cols = np.zeros(ph, dtype=np.float32), np.zeros(pw, dtype=np.float32)
    for i in range(grid.rows):
        rows[sh * i : sh * i + th] += 1.0
    for j in range(grid.cols):
        cols[sw * j : sw * j + tw] += 1.0
    return rows, cols


def tile_box(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The (y0, x0, y1, x1) box of an (H, W[, C]) image, zero-filled where the box leaves the image."""
    y0, x0, y1, x1 = box
    h, w = image.shape[:2]
    part = image[y0:min(y1, h), x0:min(x1, w)]
    if part.shape[:2] == (y1 - y0, x1 - x0):
        return part
    out = np.zeros((y1 - y0, x1 - x0, *image.shape[2:]), dtype=image.dtype)
    out[: part.shape[0], : part.shape[1]] = part
    return out


def merge_scores(scores: np.ndarray, method: str = "mean") -> float:
    """Tile scores (count,) -> one image score: "mean" (spec default) or "max" (anomalous if any tile is)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        raise ValueError("merge_scores needs at least one tile score")
    if method == "mean":
        return float(scores.mean())
    if method == "max":
        return float(scores.max())
    raise ValueError(f"unknown score method {method!r}; expected one of {SCORE_METHODS}")


def image_score(tile_scores: np.ndarray | None, merged_map: np.ndarray | None, method: str = "mean") -> float:
    """Image score from tile scores ("mean" / "max") or from the merged anomaly map ("map_max")."""
    if method == "map_max":
        if merged_map is None or np.asarray(merged_map).size == 0:
            raise ValueError("image_score(method='map_max') needs a non-empty merged map")
        return float(np.max(merged_map))
    if method in SCORE_METHODS:
        if tile_scores is None:
            raise ValueError(f"image_score(method={method!r}) needs tile scores")
        return merge_scores(tile_scores, method)
    raise ValueError(f"unknown image score method {method!r}; expected one of {IMAGE_SCORE_METHODS}")


@dataclass(frozen=True)
class TilingConfig:
    """How a bundle tiles its inputs; stored as the bundle metadata's `tiling` key via to_dict/from_dict."""

    tile: tuple[int, int]
    stride: tuple[int, int]
    score: str = "mean"  # one of IMAGE_SCORE_METHODS
    seam_halfwidth: float = 0.1  # fraction of the tile size, on each side of a seam
    seam_sigma: float = 2.0
    mode: str = "single"  # "single": one model for all tiles; "ensemble": one model per tile location
    image_size: tuple[int, int] | None = None  # resize images to this before tiling (None: native size)
    locations: int = 1  # models in the bundle's graph: 1 (single) or one per tile location (ensemble)
    graph: str = "tile"  # see GRAPHS

    def __post_init__(self) -> None:
        tile = _pair("tile", self.tile)
        stride = _pair("stride", self.stride)
        if self.graph not in GRAPHS:
            raise ValueError(f"graph must be one of {GRAPHS}, got {self.graph!r}")
        if self.image_size is not None:
            object.__setattr__(self, "image_size", _pair("image_size", self.image_size))
        if self.graph != "tile" and self.image_size is None:
            raise ValueError(f"graph {self.graph!r} runs on a fixed image size: image_size is required")
        if self.mode == "ensemble" and self.graph == "tile":
            raise ValueError("an ensemble (one model per location) needs graph 'image' or 'tiles', not 'tile'")
        if isinstance(self.locations, bool) or not isinstance(self.locations, (int, np.integer)) or self.locations < 1:
            raise ValueError(f"locations must be a positive int, got {self.locations!r}")
        object.__setattr__(self, "locations", int(self.locations))
        if self.graph == "image":
            bad = [v for v in (*tile, *stride) if v % FEATURE_STRIDE]
            if bad:
                raise ValueError(f"shared-backbone tiling needs tile and stride multiples of {FEATURE_STRIDE}, got {tile} / {stride}")
        if stride[0] > tile[0] or stride[1] > tile[1]:
            raise ValueError(f"stride {stride} must be <= tile {tile} on both axes")
        if self.score not in IMAGE_SCORE_METHODS:
            raise ValueError(f"score must be one of {IMAGE_SCORE_METHODS}, got {self.score!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("seam_halfwidth", "seam_sigma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not 0.0 <= self.seam_halfwidth <= 0.5:
            raise ValueError(f"seam_halfwidth must be in [0, 0.5] (a fraction of the tile), got {self.seam_halfwidth}")
        if not self.seam_sigma >= 0.0:
            raise ValueError(f"seam_sigma must be >= 0, got {self.seam_sigma}")
        object.__setattr__(self, "tile", tile)
        object.__setattr__(self, "stride", stride)
        if self.mode == "ensemble" and self.image_size is not None:
            count = self.grid(self.image_size).count
            if self.locations != count:
                raise ValueError(f"an ensemble on {self.image_size} with these tiles has {count} locations, not {self.locations}")
        if self.mode == "single" and self.locations != 1:
            raise ValueError(f"a single-model tiling has 1 location, not {self.locations}")

    def grid(self, image_size: tuple[int, int]) -> TileGrid:
        return TileGrid(image_size=tuple(image_size), tile=self.tile, stride=self.stride)

    @property
    def fill(self) -> str:
        """What fills a tile beyond the image (FILLS): a mirror for a single model's tiles (every tile is cut on its
        own, in training and at run time), zeros for an ensemble's (and for a whole-image graph's padded canvas)."""
        return "mirror" if self.mode == "single" and self.graph != "image" else "zero"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tile"], d["stride"] = list(self.tile), list(self.stride)
        d["image_size"] = list(self.image_size) if self.image_size is not None else None
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TilingConfig":
        if not isinstance(data, dict):
            raise ValueError(f"tiling config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown tiling config key(s) {unknown}; expected {sorted(known)}")
        missing = [k for k in ("tile", "stride") if k not in data]
        if missing:
            raise ValueError(f"tiling config is missing required key(s) {missing}")
        return cls(**data)

"""Tiled inference (spec 6): cut an image into tiles, run them, merge the maps, smooth the seams. Torch-free.

One merge, two ways to feed it:
* `merge_outputs` takes every tile's raw outputs at once (training-time evaluation, export thresholds, fixed-size
  ensembles) and hands them to a `BandMerger` row by row;
* `TiledRunner` streams rows of tiles through OpenVINO and the same `BandMerger`, which hands out finished rows
  of the map, so a 20-megapixel image never needs its whole float map in memory. Each tile is post-processed
  with the shared `anomaly_map`, overlaps averaged and only the seam bands blurred; tests check the result
  against the whole-image `untile` + `smooth_seams` and a plain per-tile reference.

Memory (issue 32): what grows with the frame is what spans its width. Those buffers are allocated once per image
and are a band of rows high (the tile height, plus the seam blur's context), never a row of tiles' worth of float
maps: the band of input rows is kept as read (uint8), each request's columns are normalised when it is cut, each
request's maps are post-processed and merged as it comes back, and rows are read and handed out READ_ROWS /
EMIT_ROWS at a time. Above FULL_MAP_PIXELS only a preview of at most PREVIEW_SIDE a side is kept.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from ssn_edge.runtime.postprocess import BLUR_KERNEL, BLUR_SIGMA, anomaly_map, sigmoid
from ssn_edge.runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize, prepare, resize_image
from ssn_edge.runtime.seams import blur_radius, seam_band_axes
from ssn_edge.runtime.tiling import TileGrid, TilingConfig, coverage, merge_scores, mirrored, tile

# Fixed-size graphs shrink frames of at least this many pixels a strip at a time (area_shrink), smaller ones whole.
STRIP_SHRINK_PIXELS = 4 * 2**20
# Images up to this many pixels keep their full-resolution map in memory; larger ones get a block-averaged
# preview (and the full map only when it is streamed to a file), so memory does not grow with image size.
FULL_MAP_PIXELS = 4096 * 4096
PREVIEW_SIDE = 2048
# Image rows read from the source, and map rows blurred and handed to the sink, at a time: the transient buffers
# of these steps are this many rows of the frame's width, not a tile's height (8192 wide: 0.8 and 2 MB, not 3 and
# 5). EMIT_ROWS also sets the blur's overhead: each piece blurs 2 x blur_radius rows of context besides its own.
READ_ROWS = 32
EMIT_ROWS = 64


def tiled_image_score(tile_logits: np.ndarray, map_max: float, method: str) -> float:
    """Image score in [0, 1]: mean or max of the tiles' sigmoid scores, or the sigmoid of the merged map's max."""
    if method == "map_max":
        return float(sigmoid(map_max))
    return merge_scores(sigmoid(np.asarray(tile_logits, dtype=np.float32)), method)


def merge_outputs(
    raw_maps: np.ndarray,
    tile_logits: np.ndarray,
    grid: TileGrid,
    cfg: TilingConfig,
    blur_sigma: float = BLUR_SIGMA,
    blur_kernel: int = BLUR_KERNEL,
) -> tuple[np.ndarray, float]:
    """One image's tiles: raw map logits (T, h, w) and score logits (T,) -> (merged map (H, W) float32, score)."""
    maps = anomaly_map(raw_maps, grid.tile, blur_sigma, blur_kernel)  # each tile as in untiled SSN
    sink = MapSink(grid.image_size, full=True)
    merger = BandMerger(grid, cfg, sink)  # the streaming merge, so both ways give the same floats
    per_row = maps.reshape(grid.rows, grid.cols, *grid.tile)
    for i in range(grid.rows):
        merger.add_row(i, per_row[i])
    return sink.full, tiled_image_score(tile_logits, sink.max, cfg.score)


class MapSink:
    """Receives finished map rows in order: keeps the max, and the full map, a block-averaged preview, or both.

    full: keep the (H, W) map. preview_factor f > 1: keep the mean of every f x f block (rows arrive in any
    band heights; leftovers wait for the next band). stream: an open binary file to which float16 rows are
    appended (the caller wrote an .npy header for (H, W) float16 first).
    """

    def __init__(self, size: tuple[int, int], full: bool = True, preview_factor: int = 1, stream=None):
        h, w = size
        self.size = size
        self.max = -np.inf
        self.full = np.empty((h, w), dtype=np.float32) if full else None
        self.factor = int(preview_factor)
        self.preview = None
        if self.factor > 1:
            self.preview = np.zeros((-(-h // self.factor), -(-w // self.factor)), dtype=np.float32)
            self._carry = np.zeros((0, w), dtype=np.float32)
            self._carry_y = 0
        self.stream = stream

    def __call__(self, y0: int, rows: np.ndarray) -> None:
        self.max = max(self.max, float(rows.max()))
        if self.full is not None:
            self.full[y0 : y0 + len(rows)] = rows
        if self.stream is not None:
            self.stream.write(np.ascontiguousarray(rows, dtype=np.float16).data)  # no bytes copy
        if self.preview is not None:
            self._carry = np.concatenate([self._carry, rows]) if len(self._carry) else rows.copy()
            self._flush(final=y0 + len(rows) >= self.size[0])

    def _flush(self, final: bool) -> None:
        f, w = self.factor, self.size[1]
        usable = len(self._carry) if final else (len(self._carry) // f) * f
        if not usable:
            return
        block = self._carry[:usable]
        nb = -(-usable // f)
        pad_h, pad_w = nb * f - usable, -(-w // f) * f - w
        padded = np.pad(block, ((0, pad_h), (0, pad_w)), mode="edge")
        means = padded.reshape(nb, f, -1, f).mean(axis=(1, 3))
        r0 = self._carry_y // f
        self.preview[r0 : r0 + nb] = means
        self._carry_y += usable
        self._carry = self._carry[usable:]

    @property
    def map(self) -> np.ndarray:
        return self.full if self.full is not None else self.preview

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


def frame_sink(size: tuple[int, int], keep_full: bool | None, stream_to: Path | None) -> MapSink:
    """The sink a frame's map rows go to, either graph: the full map (keep_full; None: when the frame has at most
    FULL_MAP_PIXELS), else a block-mean preview at most PREVIEW_SIDE a side (a frame no larger than that is its own
    preview); with stream_to, the full map also written there as float16 .npy, band by band (MapSink.close)."""
    h, w = size
    if keep_full is None:
        keep_full = h * w <= FULL_MAP_PIXELS
    factor = 1 if keep_full else max(1, -(-max(h, w) // PREVIEW_SIDE))
    stream = None
    if stream_to is not None:
        stream = open(stream_to, "wb")
        np.lib.format.write_array_header_2_0(stream, {"descr": "<f2", "fortran_order": False, "shape": (h, w)})
    return MapSink((h, w), full=factor == 1, preview_factor=factor, stream=stream)


class BandMerger:
    """Merge post-processed tile maps in tile order (row by row, left to right); emit finished, seam-smoothed rows.

    Holds one row of tiles' accumulators plus the rows awaiting the blur's context, in two buffers allocated once:
    memory is set by the tile height and the image width, not the image height, and does not change from row to
    row. Rows go to `sink(y0, rows)` in order, cropped to the image, EMIT_ROWS at most per call; `rows` is a view
    of a buffer that is reused, valid during the call only (the sink copies what it keeps).
    """

    def __init__(self, grid: TileGrid, cfg: TilingConfig, sink: Callable[[int, np.ndarray], None]):
        self.grid, self.sink = grid, sink
        self.halfwidth, self.sigma = cfg.seam_halfwidth, cfg.seam_sigma
        self.radius = blur_radius(self.sigma) if self.sigma > 0 else 0
        self.band_rows, self.band_cols = seam_band_axes(grid, self.halfwidth)
        self.keep_cols = ~self.band_cols  # columns where a row outside the row bands keeps its merged value
        th, (_, pw), w = grid.tile[0], grid.padded_size, grid.image_size[1]
        # float32: for a 8192-wide frame a float64 accumulator alone would hold 17 MB
        self.sum = np.zeros((th, pw), dtype=np.float32)  # padded rows [acc_y, acc_y + th)
        # How many tiles cover a pixel is rows-covering x columns-covering: two 1-D counts instead of a second
        # accumulator (small integers, so the product and the division are exactly what counting gave)
        self.cover_y, self.cover_x = coverage(grid)
        self._count_rows: dict[float, np.ndarray] = {}
        self.acc_y = 0
        # merged rows [done_y, done_y + held) awaiting their blur context: at most 2 x radius are left after an
        # emit, and a row of tiles finishes at most th more
        self.done = np.empty((th + 2 * self.radius, w), dtype=np.float32)
        self.held = 0
        self.done_y = 0
        self.emit_y = 0
        self.next_row = 0
        self.next_col = 0

    def add_row(self, i: int, maps: np.ndarray) -> None:
        """maps: (cols, th, tw) post-processed maps of grid row i (rows must come in order 0, 1, ...)."""
        g = self.grid
        if maps.shape != (g.cols, *g.tile):
            raise ValueError(f"row {i}: expected maps of shape {(g.cols, *g.tile)}, got {maps.shape}")
        self._add(i, 0, maps)

    def add_tiles(self, i: int, j0: int, maps: np.ndarray) -> None:
        """maps: (n, th, tw) post-processed maps of tiles j0 .. j0 + n - 1 of grid row i. Tiles must come in the
        order the whole-image merge adds them (rows 0, 1, ..., each left to right), so the sums are its floats."""
        g = self.grid
        if maps.ndim != 3 or maps.shape[1:] != g.tile or not 1 <= len(maps) <= g.cols - j0:
            raise ValueError(f"row {i}: expected maps of shape (n <= {g.cols - j0}, {g.tile[0]}, {g.tile[1]}), got {maps.shape}")
        self._add(i, j0, maps)

    def _add(self, i: int, j0: int, maps: np.ndarray) -> None:
        if i != self.next_row:
            raise ValueError(f"tile row {i} arrived before row {self.next_row}")
        if j0 != self.next_col:
            raise ValueError(f"row {i}: tile {j0} arrived before tile {self.next_col}")
        tw, sw = self.grid.tile[1], self.grid.stride[1]
        for k, m in enumerate(maps):
            x0 = sw * (j0 + k)
            self.sum[:, x0 : x0 + tw] += m
        self.next_col += len(maps)
        if self.next_col == self.grid.cols:
            self.next_row, self.next_col = i + 1, 0
            self._finish()

    def _finish(self) -> None:
        """Row next_row - 1 is in: its rows no later row of tiles reaches are final (all of them after the last)."""
        g = self.grid
        th, sh, h = g.tile[0], g.stride[0], g.image_size[0]
        final_to = sh * self.next_row if self.next_row < g.rows else g.padded_size[0]
        n = final_to - self.acc_y
        keep = max(0, min(n, h - self.acc_y))
        if keep:  # only the rows and columns inside the image are divided
            self._divide(keep)
        _shift_up(self.sum, n, th - n)
        self.sum[th - n :] = 0.0
        self.acc_y = final_to
        self._emit(complete=self.next_row == g.rows)

    def _divide(self, keep: int) -> None:
        """The first `keep` rows of sum / their cover counts -> the end of done, without a count array."""
        w = self.grid.image_size[1]
        out = self.done[self.held : self.held + keep]
        for a, b, cy in _runs(self.cover_y[self.acc_y : self.acc_y + keep]):
            np.divide(self.sum[a:b, :w], self._count_row(cy), out=out[a:b])
        self.held += keep

    def _count_row(self, cy: np.float32) -> np.ndarray:
        """cover_y x cover_x for one cover_y value: float32, as the (rows, W) product gave."""
        key = float(cy)
        if key not in self._count_rows:
            self._count_rows[key] = cy * self.cover_x[: self.grid.image_size[1]]
        return self._count_rows[key]

    def _emit(self, complete: bool) -> None:
        h = self.grid.image_size[0]
        available = self.done_y + self.held
        end = h if complete else available - self.radius
        if end <= self.emit_y:
            return
        for y0 in range(self.emit_y, end, EMIT_ROWS):
            self._emit_piece(y0, min(end, y0 + EMIT_ROWS), available)
        self.emit_y = end
        drop = max(0, end - self.radius - self.done_y)
        _shift_up(self.done, drop, self.held - drop)
        self.held -= drop
        self.done_y += drop

    def _emit_piece(self, y0: int, y1: int, available: int) -> None:
        """Rows [y0, y1) with the seam bands blurred: the window has `radius` rows of context on each side (or
        the image's edge), so the blur gives what blurring the whole map gives."""
        lo, hi = max(0, y0 - self.radius), min(available, y1 + self.radius)
        window = self.done[lo - self.done_y : hi - self.done_y]
        rows_mask = self.band_rows[lo:hi]
        if self.sigma > 0 and (rows_mask.any() or self.band_cols.any()):
            out = cv2.GaussianBlur(window, (0, 0), sigmaX=self.sigma, sigmaY=self.sigma, borderType=cv2.BORDER_REFLECT)
            # outside the band (rows outside the row bands, in columns outside the column bands) keep the merge
            np.copyto(out, window, where=~rows_mask[:, None] & self.keep_cols[None, :])
        else:
            out = window
        a = y0 - lo
        self.sink(y0, out[a : a + y1 - y0])


def _shift_up(buf: np.ndarray, by: int, n: int) -> None:
    """Move rows [by, by + n) of buf to [0, n), in blocks of at most `by` rows: no block overlaps its source, so
    numpy copies it directly (an overlapping assignment goes through a temporary as large as the move)."""
    if by <= 0 or n <= 0:
        return
    for a in range(0, n, by):
        b = min(n, a + by)
        buf[a:b] = buf[a + by : b + by]


def _runs(values: np.ndarray) -> list[tuple[int, int, np.float32]]:
    """(start, end, value) of each run of equal values of a 1-D array."""
    cuts = (np.flatnonzero(values[1:] != values[:-1]) + 1).tolist()
    starts, ends = [0, *cuts], [*cuts, len(values)]
    return [(a, b, values[a]) for a, b in zip(starts, ends)]


def resized_bands(m: np.ndarray, size: tuple[int, int], band: int = 128):
    """(y0, rows) bands of cv2.resize(m, size, INTER_LINEAR) (half-pixel centres), top to bottom, the resized map
    never held at once: each band blends its two source rows (at the source's width), then is resized across."""
    h, w = size
    if m.shape == (h, w):
        yield 0, m
        return
    src = (np.arange(h, dtype=np.float64) + 0.5) * (m.shape[0] / h) - 0.5
    src = np.clip(src, 0, m.shape[0] - 1)
    top = np.floor(src).astype(np.int64)
    bottom = np.minimum(top + 1, m.shape[0] - 1)
    frac = (src - top).astype(np.float32)[:, None]
    for y0 in range(0, h, band):
        y1 = min(h, y0 + band)
        f = frac[y0:y1]
        rows = m[top[y0:y1]] * (1 - f) + m[bottom[y0:y1]] * f
        yield y0, cv2.resize(rows, (w, y1 - y0), interpolation=cv2.INTER_LINEAR)


def prepare_tile(image: np.ndarray, box: tuple[int, int, int, int], fill: str = "zero") -> np.ndarray:
    """(3, th, tw) model input for the box of an (H, W, 3) RGB image (uint8, uint16 or float in [0, 1]).

    Where the box leaves the image the input is 0 *after* normalisation (the ImageNet mean colour) or (fill
    "mirror") the box's part of the image reflected: exactly what `tile` gives on a normalised image, which is how
    training and evaluation cut their tiles.
    """
    y0, x0, y1, x1 = box
    h, w = image.shape[:2]
    part = image[y0 : min(y1, h), x0 : min(x1, w)]
    if part.dtype == np.uint8:
        part = part.astype(np.float32) / 255.0
    elif part.dtype == np.uint16:
        part = part.astype(np.float32) / 65535.0
    part = ((part.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    if fill == "mirror":
        return np.ascontiguousarray(mirrored(part, (y1 - y0, x1 - x0), axes=(1, 2)), dtype=np.float32)
    out = np.zeros((3, y1 - y0, x1 - x0), dtype=np.float32)
    out[:, : part.shape[1], : part.shape[2]] = part
    return out


def to_unit(image: np.ndarray) -> np.ndarray:
    """uint8 / uint16 / float image -> float32 in [0, 1]."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    return image.astype(np.float32, copy=False)


def normalized_graph_input(x: np.ndarray, cfg: TilingConfig) -> np.ndarray:
    """Normalised (3, H, W) image at cfg.image_size -> batch-of-one input of an "image" graph (1, 3, H', W',
    zero-padded to the grid) or a "tiles" graph (1, T, 3, th, tw)."""
    grid = cfg.grid(cfg.image_size)
    if tuple(x.shape[1:]) != cfg.image_size:
        raise ValueError(f"normalised input is {tuple(x.shape[1:])}, the tiling expects {cfg.image_size}")
    if cfg.graph == "image":
        ph, pw = grid.padded_size
        out = np.zeros((1, 3, ph, pw), dtype=np.float32)
        out[0, :, : x.shape[1], : x.shape[2]] = x
        return out
    tiles = tile(np.ascontiguousarray(x.transpose(1, 2, 0)), grid, cfg.fill)
    return np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))[None]


def graph_input(image, cfg: TilingConfig) -> np.ndarray:
    """(H, W, 3) RGB image (or a strip reader) -> batch-of-one input of an "image" or "tiles" graph (resized to
    cfg.image_size)."""
    h, w = cfg.image_size
    big = image.shape[0] * image.shape[1] >= STRIP_SHRINK_PIXELS or not isinstance(image, np.ndarray)
    if big and image.shape[0] >= h and image.shape[1] >= w:
        rows_of = image.rows if not isinstance(image, np.ndarray) else (lambda y0, y1: image[y0:y1])
        return normalized_graph_input(normalize(area_shrink(rows_of, image.shape[:2], cfg.image_size)), cfg)
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{getattr(image, 'path', 'image')}: strip reading needs an image at least {w}x{h}")
    return normalized_graph_input(prepare(to_unit(image), cfg.image_size), cfg)


def area_shrink(rows_of: Callable[[int, int], np.ndarray], shape: tuple[int, ...], size: tuple[int, int],
                strip: int = 64) -> np.ndarray:
    """An (H, W, 3) image read as rows_of(y0, y1) -> float32 (h, w, 3) in [0, 1], h <= H, w <= W: what
    resize_image(to_unit(image), size) gives (OpenCV's pixel-area filter), a strip of rows at a time. Each strip
    is shrunk across by OpenCV and its rows added into the output rows they overlap, weighted by the overlap,
    so neither the frame's float copy (805 MB at 8192^2) nor, from a strip reader, the frame is held at once."""
    (src_h, src_w), (h, w) = shape[:2], size
    scale = src_h / h
    out = np.zeros((h, w * 3), dtype=np.float64)
    for y0 in range(0, src_h, strip):
        y1 = min(src_h, y0 + strip)
        across = cv2.resize(to_unit(rows_of(y0, y1)), (w, y1 - y0), interpolation=cv2.INTER_AREA)
        i0, i1 = int(y0 // scale), min(h, int(np.ceil(y1 / scale)))
        i, k = np.arange(i0, i1)[:, None], np.arange(y0, y1)[None, :]
        weights = np.clip(np.minimum((i + 1) * scale, k + 1) - np.maximum(i * scale, k), 0.0, None) / scale
        out[i0:i1] += weights @ across.reshape(y1 - y0, w * 3)
    return out.reshape(h, w, 3).astype(np.float32)


_LUTS: dict[str, np.ndarray] = {}


def _lut(dtype: np.dtype) -> np.ndarray | None:
    """(3, levels) float32: every uint8 / uint16 level normalised per channel by prepare_tile's own arithmetic,
    so looking a pixel up gives the very float that converting it would (None for float images)."""
    kind = np.dtype(dtype).name
    if kind not in ("uint8", "uint16"):
        return None
    if kind not in _LUTS:
        top = 255.0 if kind == "uint8" else 65535.0
        levels = np.arange(int(top) + 1, dtype=np.float32)[:, None] / top
        _LUTS[kind] = np.ascontiguousarray(((levels - IMAGENET_MEAN) / IMAGENET_STD).T)
    return _LUTS[kind]


def normalize_rows(rows: np.ndarray, out: np.ndarray) -> None:
    """(n, W, 3) RGB rows (uint8, uint16 or float in [0, 1]) -> out (3, n, W) float32, normalised exactly as
    prepare_tile does: by table lookup for integer pixels (one pass per channel), else arithmetic."""
    lut = _lut(rows.dtype)
    if lut is None:
        out[...] = ((rows.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
        return
    for c in range(3):
        np.take(lut[c], rows[..., c], out=out[c], mode="clip")


class TileRows:
    """The model input of one row of tiles at a time, from a source of image rows. Rows come in order; the rows a
    row of tiles shares with the one before (th - sh of them) are kept, so each image row is read once.

    The band keeps the rows as read, (th, W, 3) in the source's dtype: 0.75 KB per image column for a uint8 frame
    at th 256, where the band normalised to float32 held 3 KB (25 MB at 8192 wide). Each request's columns are
    normalised when its batch is cut, into a buffer as wide as the request: each pixel is normalised about twice
    (once per row of tiles covering it), by the same arithmetic, so the inputs are the same floats.

    rows_of(y0, y1): the image's rows [y0, y1) (y1 <= image height), (n, W, 3) RGB, or (3, n, W) already
    normalised when `normalized`.
    """

    def __init__(self, rows_of: Callable[[int, int], np.ndarray], grid: TileGrid, normalized: bool = False,
                 fill: str = "zero"):
        self.rows_of, self.grid, self.normalized, self.fill = rows_of, grid, normalized, fill
        self.band: np.ndarray | None = None  # allocated at the first read: its dtype is the source's
        self.valid = 0  # rows of the band inside the image
        self.y0: int | None = None  # image row of band[0]
        self._span: np.ndarray | None = None

    def row(self, i: int) -> None:
        """Make row i of tiles the current one."""
        th, sh, h = self.grid.tile[0], self.grid.stride[0], self.grid.image_size[0]
        y0 = sh * i
        keep = 0
        if self.y0 is not None and 0 <= y0 - self.y0 < th:
            by = y0 - self.y0
            keep = max(0, self.valid - by)
            _shift_up(self.band, by, keep)
        self.y0, self.valid = y0, min(th, h - y0)
        for a in range(keep, self.valid, READ_ROWS):
            self._store(a, self.rows_of(y0 + a, y0 + min(self.valid, a + READ_ROWS)))

    def _store(self, a: int, rows: np.ndarray) -> None:
        if self.normalized:
            rows = rows.transpose(1, 2, 0)
        if self.band is None:
            self.band = np.empty((self.grid.tile[0], self.grid.image_size[1], 3), dtype=rows.dtype)
        self.band[a : a + len(rows)] = rows

    def batch(self, first: int, n: int, size: int) -> np.ndarray:
        """(size, 3, th, tw) input of tiles first .. first + n - 1 of the current row; the rest repeats the last."""
        (th, tw), sw = self.grid.tile, self.grid.stride[1]
        span = self._normalized_span(sw * first, sw * (first + n - 1) + tw)
        out = np.empty((size, 3, th, tw), dtype=np.float32)
        w, v = self.grid.image_size[1], self.valid
        for k in range(n):
            out[k] = span[:, :, sw * k : sw * k + tw]
            inside = min(tw, w - sw * (first + k))  # the tile's columns within the image
            if self.fill == "mirror" and (v < th or inside < tw):  # as `tile` fills it
                out[k] = mirrored(out[k][:, :v, :inside], (th, tw), axes=(1, 2))
        out[n:] = out[n - 1]
        return out

    def _normalized_span(self, x0: int, x1: int) -> np.ndarray:
        """(3, th, x1 - x0) float32: padded columns [x0, x1) of the band, normalised; 0 outside the image (after
        normalisation, as `tile` pads)."""
        th, w, v = self.grid.tile[0], self.grid.image_size[1], self.valid
        if self._span is None or self._span.shape[2] < x1 - x0:
            self._span = np.empty((3, th, x1 - x0), dtype=np.float32)
        span = self._span[:, :, : x1 - x0]
        real = min(x1, w) - x0  # > 0: every tile starts inside the image
        span[:, v:] = 0.0
        span[:, :v, real:] = 0.0
        rows = self.band[:v, x0 : x0 + real]
        if self.normalized:
            span[:, :v, :real] = rows.transpose(2, 0, 1)
        else:
            normalize_rows(rows, span[:, :v, :real])
        return span


def _row_source(image, cfg: TilingConfig) -> tuple[Callable[[int, int], np.ndarray], tuple[int, int]]:
    """(rows_of, the size the image is tiled at): a strip reader (BmpStrips) is read a band at a time; an array
    is resized to cfg.image_size first when the tiling has one."""
    if not isinstance(image, np.ndarray):
        if cfg.image_size is not None and tuple(image.shape[:2]) != cfg.image_size:
            raise ValueError(f"{getattr(image, 'path', 'image')}: strip reading needs tiling at the image's own size")
        return image.rows, tuple(image.shape[:2])
    if cfg.image_size is not None and tuple(image.shape[:2]) != cfg.image_size:
        image = resize_image(to_unit(image), cfg.image_size)
    return (lambda y0, y1: image[y0:y1]), tuple(image.shape[:2])


@dataclass
class TiledResult:
    score: float
    anomaly_map: np.ndarray  # full-resolution map, or a block-averaged preview (map_scale > 1)
    map_max: float
    map_scale: int  # 1: full resolution; f: each map pixel is the mean of f x f image pixels
    tiles: int
    infer_ms: float


def balanced_chunks(cols: int, tile_batch: int) -> tuple[int, list[tuple[int, int]]]:
    """Split a row of `cols` tiles into requests of one batch size: (batch, [(first column, real tiles), ...]).

    Every request of an image has the same shape (a short last chunk is padded up to `batch`): OpenVINO 2026.4's
    CPU plugin aborted or corrupted memory when requests in flight on a dynamic-batch graph had different batch
    sizes. Chunks are balanced (10 tiles at tile_batch 8: 5 + 5, not 8 + 2) so padding costs at most one tile
    per chunk.
    """
    if cols < 1 or tile_batch < 1:
        raise ValueError(f"cols and tile_batch must be >= 1, got {cols}, {tile_batch}")
    n_chunks = -(-cols // tile_batch)
    batch = -(-cols // n_chunks)
    return batch, [(c, min(batch, cols - c)) for c in range(0, cols, batch)]


class TiledRunner:
    """Runs a compiled tiled graph (an OpenVINO CompiledModel) on one image at a time."""

    def __init__(
        self,
        compiled: Any,
        cfg: TilingConfig,
        map_name: str = "map",
        score_name: str = "score",
        blur_sigma: float = BLUR_SIGMA,
        blur_kernel: int = BLUR_KERNEL,
        tile_batch: int = 8,
        requests: int = 2,
    ) -> None:
        if tile_batch < 1:
            raise ValueError(f"tile_batch must be >= 1, got {tile_batch}")
        self.compiled, self.cfg = compiled, cfg
        self.map_name, self.score_name = map_name, score_name
        self.blur_sigma, self.blur_kernel = blur_sigma, blur_kernel
        # at least two in flight, so this thread cuts and merges while a request infers, even at a LATENCY hint
        self.tile_batch, self.requests = tile_batch, max(2, requests)
        self._request = None
        # One AsyncInferQueue per runner, reused image after image: creating and destroying a queue (and its
        # infer requests) per image made OpenVINO 2026.4's CPU plugin abort from a worker thread now and then.
        self._queue = None
        self._on_done: Callable | None = None

    def close(self) -> None:
        """Finish and drop this runner's infer requests (a later run makes new ones): an AsyncInferQueue left to
        interpreter shutdown made OpenVINO 2026.4 abort ('terminate called') now and then."""
        if self._queue is not None:
            self._queue.wait_all()
        self._queue, self._request = None, None

    def _outputs(self, request) -> tuple[np.ndarray, np.ndarray]:
        raw = np.array(request.get_tensor(self.map_name).data, dtype=np.float32, copy=True)
        score = np.array(request.get_tensor(self.score_name).data, dtype=np.float32, copy=True)
        return raw, score

    def run(self, image: np.ndarray, keep_full: bool | None = None, stream_to: Path | None = None) -> TiledResult:
        """image: (H, W, 3) RGB, uint8/uint16 or float in [0, 1], or a strip reader (BmpStrips: read a band at a
        time; for a fixed-size graph, an image at least its size). keep_full: keep the full-resolution map
        (default: when the image has at most FULL_MAP_PIXELS). stream_to: also write the full map there as
        float16 .npy, row band by row band."""
        if self.cfg.graph == "tile":
            rows_of, size = _row_source(image, self.cfg)
            return self._run_streaming(TileRows(rows_of, self.cfg.grid(size), fill=self.cfg.fill), image.shape[:2],
                                       keep_full, stream_to)
        return self._run_fixed(image, graph_input(image, self.cfg), image.shape[:2], keep_full, stream_to)

    def run_normalized(self, x: np.ndarray) -> TiledResult:
        """The same for an already normalised (3, H, W) image at the tiling's image size (evaluation arrays)."""
        if self.cfg.graph == "tile":
            rows = TileRows(lambda y0, y1: x[:, y0:y1], self.cfg.grid(x.shape[1:]), normalized=True, fill=self.cfg.fill)
            return self._run_streaming(rows, x.shape[1:], True, None)
        return self._run_fixed(x, normalized_graph_input(x, self.cfg), x.shape[1:])

    def _run_fixed(self, image: np.ndarray, inputs: np.ndarray, size: tuple[int, int], keep_full: bool | None = True,
                   stream_to: Path | None = None) -> TiledResult:
        """A whole-image graph ("image", "tiles"): one inference at cfg.image_size, the merged map brought to the
        frame's size band by band, so a large frame gets the same preview and stream as the tile graph without its
        full-resolution map being held (an 8192^2 float map is 268 MB)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        if self._request is None:  # one request per runner, reused: requests are not free to create
            self._request = self.compiled.create_infer_request()
        request = self._request
        request.infer({0: inputs}, share_inputs=True)
        raw, logits = self._outputs(request)
        infer_ms = (time.perf_counter() - t0) * 1e3
        grid = cfg.grid(cfg.image_size)
        merged, score = merge_outputs(raw.reshape(grid.count, *raw.shape[-2:]), logits.reshape(-1), grid, cfg, self.blur_sigma, self.blur_kernel)
        sink = frame_sink(size, keep_full, stream_to)
        try:
            for y0, rows in resized_bands(merged, size):
                sink(y0, rows)
        finally:
            sink.close()
        return TiledResult(score, sink.map, float(sink.max), sink.factor, grid.count, infer_ms)

    def _queue_for_image(self, on_done: Callable) -> Any:
        import openvino as ov

        if self._queue is None:
            self._queue = ov.AsyncInferQueue(self.compiled, self.requests)
            self._queue.set_callback(lambda request, key: self._on_done(request, key))
        self._on_done = on_done
        return self._queue

    def _run_streaming(
        self, rows: TileRows, original: tuple[int, int], keep_full: bool | None, stream_to: Path | None
    ) -> TiledResult:
        """Rows of tiles in order through the queue: while the cores infer row i, this thread cuts row i + 1
        and merges the rows already back, so merging hides behind inference instead of following it."""
        cfg, grid = self.cfg, rows.grid
        h, w = grid.image_size
        sink = frame_sink((h, w), keep_full, stream_to)
        batch, row_chunks = balanced_chunks(grid.cols, self.tile_batch)
        collector = _RowCollector(grid, self, BandMerger(grid, cfg, sink), row_chunks)
        t0 = time.perf_counter()
        queue = self._queue_for_image(collector.done)
        try:
            for i in range(grid.rows):
                rows.row(i)
                for c, n in row_chunks:
                    # copied into the request's tensor: sharing the array (share_inputs) gave wrong maps on
                    # OpenVINO 2026.4 when requests were reused (tests/test_tiled_speed.py, tile_batch 1)
                    queue.start_async({0: rows.batch(c, n, batch)}, userdata=(i, c, n))
                    collector.drain()
                if collector.errors:
                    break
            queue.wait_all()
            collector.drain()
            if collector.errors:
                raise collector.errors[0]
        finally:
            queue.wait_all()  # nothing of this image may still be in flight when the next one starts
            # the queue's callback held this image's collector, its merger's buffers with it, into the next image,
            # whose own buffers are made before the callback is replaced: the two would add up
            self._on_done = None
            sink.close()
        infer_ms = (time.perf_counter() - t0) * 1e3
        score = tiled_image_score(collector.logits, sink.max, cfg.score)
        m = sink.map
        if sink.full is not None and tuple(original) != (h, w):
            m = cv2.resize(m, (original[1], original[0]), interpolation=cv2.INTER_LINEAR)
        return TiledResult(score, m, float(sink.max), sink.factor, grid.count, infer_ms)


class _RowCollector:
    """Gathers the requests as they finish (any order, on OpenVINO's threads) and, on the calling thread,
    post-processes and merges each one in tile order (rows in order, each row's requests left to right) as soon
    as the ones before it are in: a request's maps are post-processed at a time (2 MB at batch 8), never a whole
    row of tiles' (17 MB at 8192 wide)."""

    def __init__(self, grid: TileGrid, runner: TiledRunner, merger: BandMerger, chunks: list[tuple[int, int]]):
        self.grid, self.runner, self.merger, self.chunks = grid, runner, merger, chunks
        self.results: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self.lock = threading.Lock()
        self.errors: list[BaseException] = []
        self.logits = np.zeros(grid.count, dtype=np.float32)
        self.next = 0  # requests merged so far, in tile order

    def done(self, request, key: tuple[int, int, int]) -> None:
        try:
            raw, score = self.runner._outputs(request)
            i, c, n = key  # n real tiles; the rest of the batch is padding
            with self.lock:
                self.results[(i, c)] = (raw.reshape(-1, *raw.shape[-2:])[:n], score.reshape(-1)[:n])
        except BaseException as exc:  # surfaced in the main thread; an exception here would be lost
            self.errors.append(exc)

    def drain(self) -> None:
        g, r = self.grid, self.runner
        while self.next < g.rows * len(self.chunks):
            i, k = divmod(self.next, len(self.chunks))
            c = self.chunks[k][0]
            with self.lock:
                got = self.results.pop((i, c), None)
            if got is None:
                return
            raw, score = got
            first = i * g.cols + c
            self.logits[first : first + len(score)] = score
            self.merger.add_tiles(i, c, anomaly_map(raw, g.tile, r.blur_sigma, r.blur_kernel))
            self.next += 1

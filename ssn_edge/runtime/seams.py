"""Seam smoothing for merged tile maps (spec 6): a Gaussian filter applied only in a band around each seam.

The band reaches `round(halfwidth_frac * tile size)` pixels to each side of every interior seam (tile height
for horizontal seams, tile width for vertical ones); pixels outside it are left bit-identical.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .tiling import TileGrid

DEFAULT_HALFWIDTH = 0.1
DEFAULT_SIGMA = 2.0


def _halfwidth(frac: float, size: int) -> int:
    return int(math.floor(frac * size + 0.5))  # round half up (Python's round() is banker's)


def seam_band_axes(grid: TileGrid, halfwidth_frac: float = DEFAULT_HALFWIDTH) -> tuple[np.ndarray, np.ndarray]:
    """(rows (H,), cols (W,)) bool: the band is rows[:, None] | cols[None, :] (kept 1-D for large images)."""
    if not halfwidth_frac >= 0:
        raise ValueError(f"halfwidth_frac must be >= 0, got {halfwidth_frac}")
    ph, pw = grid.padded_size
    hy, hx = _halfwidth(halfwidth_frac, grid.tile[0]), _halfwidth(halfwidth_frac, grid.tile[1])
    rows = np.zeros(ph, dtype=bool)
    cols = np.zeros(pw, dtype=bool)
    ys, xs = grid.interior_seams()
    if hy > 0:
        for y in ys:  # a seam at y lies between rows y - 1 and y
            rows[max(0, y - hy) : y + hy] = True
    if hx > 0:
        for x in xs:
            cols[max(0, x - hx) : x + hx] = True
    h, w = grid.image_size
    return rows[:h], cols[:w]


def seam_band_mask(grid: TileGrid, halfwidth_frac: float = DEFAULT_HALFWIDTH) -> np.ndarray:
    """bool (H, W): True within the band around every interior seam, cropped to the image."""
    rows, cols = seam_band_axes(grid, halfwidth_frac)
    return rows[:, None] | cols[None, :]


def blur_radius(sigma: float) -> int:
    """Rows of context OpenCV's GaussianBlur(ksize=(0, 0), sigma) reads on each side (float images: 4 sigma)."""
    return int(round(sigma * 4 * 2 + 1)) // 2 + 1


def smooth_seams(
    anomaly_map: np.ndarray,
    grid: TileGrid,
    halfwidth_frac: float = DEFAULT_HALFWIDTH,
    sigma: float = DEFAULT_SIGMA,
) -> np.ndarray:
    """Gaussian-blur the map (reflect border) and take the blurred values only inside the seam band.

    Returns a new array of the input's shape and dtype; outside the band it equals the input exactly.
    """
    anomaly_map = np.asarray(anomaly_map)
    if anomaly_map.shape[:2] != grid.image_size or anomaly_map.ndim not in (2, 3):
        raise ValueError(f"map must be {grid.image_size}[+ (C,)] for this grid, got {anomaly_map.shape}")
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    out = anomaly_map.copy()
    mask = seam_band_mask(grid, halfwidth_frac)
    if sigma == 0 or not mask.any():
        return out
    native = anomaly_map.dtype in (np.float32, np.float64)
    work = anomaly_map if native else anomaly_map.astype(np.float32)
    blurred = cv2.GaussianBlur(work, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    blurred = blurred.reshape(anomaly_map.shape)
    values = blurred[mask]
    if np.issubdtype(anomaly_map.dtype, np.integer):
        info = np.iinfo(anomaly_map.dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    out[mask] = values.astype(anomaly_map.dtype)
    return out

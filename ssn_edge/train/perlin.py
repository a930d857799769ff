"""Perlin masks: where SSN places its synthetic feature-space anomalies (spec 2, "Perlin mask").

Made directly at feature resolution, so no image-space anomaly is ever rendered.
"""

from __future__ import annotations

import math

import cv2
import numpy as np


def _fade(t: np.ndarray) -> np.ndarray:
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def perlin_2d(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Gradient (Perlin) noise of `shape`, with res[0] x res[1] lattice cells; shape must be a multiple of res."""
    h, w = shape
    ry, rx = res
    if h % ry or w % rx:
        raise ValueError(f"perlin shape {shape} is not a multiple of the lattice {res}")
    angles = 2 * math.pi * rng.random((ry + 1, rx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    # Position of every pixel inside its lattice cell, in [0, 1).
    ys = (np.arange(h) * ry / h) % 1.0
    xs = (np.arange(w) * rx / w) % 1.0
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    cy = np.repeat(np.arange(ry), h // ry)
    cx = np.repeat(np.arange(rx), w // rx)

    def corner(dy: int, dx: int) -> np.ndarray:
        g = grads[cy[:, None] + dy, cx[None, :] + dx]
        return g[..., 0] * (gy - dy) + g[..., 1] * (gx - dx)

    ty, tx = _fade(gy), _fade(gx)
    top = corner(0, 0) * (1 - tx) + corner(0, 1) * tx
    bottom = corner(1, 0) * (1 - tx) + corner(1, 1) * tx
    return math.sqrt(2) * (top * (1 - ty) + bottom * ty)


def perlin_mask(
    size: tuple[int, int],
    rng: np.random.Generator,
    threshold: float = 0.2,
    max_scale_exp: int = 6,
) -> np.ndarray:
    """One binary Perlin mask at size=(h, w): noise on a 2^a x 2^b lattice (a, b in [0, max_scale_exp)),
    generated at a power-of-two size and resized bilinearly, then thresholded."""
    h, w = size
    gen = 2 ** max(max_scale_exp - 1, math.ceil(math.log2(max(h, w))))
    sy = 2 ** int(rng.integers(0, max_scale_exp))
    sx = 2 ** int(rng.integers(0, max_scale_exp))
    noise = perlin_2d((gen, gen), (sy, sx), rng).astype(np.float32)
    if (gen, gen) != (h, w):
        noise = cv2.resize(noise, (w, h), interpolation=cv2.INTER_LINEAR)
    return noise > threshold


def perlin_masks(
    n: int,
    size: tuple[int, int],
    rng: np.random.Generator,
    threshold: float = 0.2,
    empty_prob: float = 0.5,
) -> np.ndarray:
    """n masks (n, h, w) bool; each is emptied with probability empty_prob so that the heads also see
    noise-free samples and learn that "normal" is the default."""
    out = np.zeros((n, *size), dtype=bool)
    for i in range(n):
        if rng.random() >= empty_prob:
            out[i] = perlin_mask(size, rng, threshold)
    return out

"""A procedural surface-defect dataset in MVTec layout: textured surfaces with scratches, spots and cracks.

The built-in default for `ssn-edge demo` and for tests: no download, nothing of the user's, deterministic
from a seed. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

DEFECTS = ("scratch", "spot", "crack")


@dataclass(frozen=True)
class SyntheticSpec:
    size: int = 128
    n_train: int = 40
    n_test_good: int = 12
    n_test_defect_per_type: int = 6
    seed: int = 0


def surface(size: int, rng: np.random.Generator) -> np.ndarray:
    """A brushed-metal-like texture: smoothed noise with a dominant direction plus fine grain, uint8 gray."""
    base = rng.normal(0, 1, (size, size)).astype(np.float32)
    streaks = cv2.GaussianBlur(base, (0, 0), sigmaX=6.0, sigmaY=0.6)
    grain = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 0.8)
    img = 128 + 18 * streaks / (streaks.std() + 1e-6) + 6 * grain / (grain.std() + 1e-6)
    return np.clip(img, 0, 255).astype(np.uint8)


def _scratch(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    s = img.shape[0]
    mask = np.zeros_like(img)
    p0 = rng.integers(s // 8, 7 * s // 8, 2)
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(0.25, 0.5) * s
    p1 = (p0 + length * np.array([np.cos(angle), np.sin(angle)])).astype(int).clip(0, s - 1)
    cv2.line(mask, tuple(int(v) for v in p0), tuple(int(v) for v in p1), 255, thickness=max(1, s // 64))
    img[mask > 0] = np.clip(img[mask > 0].astype(int) + 70, 0, 255)
    return mask


def _spot(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    s = img.shape[0]
    mask = np.zeros_like(img)
    c = tuple(int(v) for v in rng.integers(s // 6, 5 * s // 6, 2))
    axes = tuple(int(v) for v in rng.integers(max(2, s // 32), max(3, s // 10), 2))
    cv2.ellipse(mask, c, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    img[mask > 0] = np.clip(img[mask > 0].astype(int) - 60, 0, 255)
    return mask


def _crack(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    s = img.shape[0]
    mask = np.zeros_like(img)
    p = rng.integers(s // 4, 3 * s // 4, 2).astype(float)
    heading = rng.uniform(0, 2 * np.pi)
    for _ in range(int(s * 0.4)):
        heading += rng.normal(0, 0.35)
        q = p + 1.5 * np.array([np.cos(heading), np.sin(heading)])
        cv2.line(mask, tuple(int(v) for v in p), tuple(int(v) for v in q.clip(0, s - 1)), 255, 1)
        p = q.clip(0, s - 1)
    img[mask > 0] = np.clip(img[mask > 0].astype(int) - 80, 0, 255)
    return mask


_MAKERS = {"scratch": _scratch, "spot": _spot, "crack": _crack}


def paint_defect(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Paint one defect of `kind` (DEFECTS) into a square uint8 gray image in place; returns its mask."""
    if kind not in _MAKERS:
        raise ValueError(f"unknown defect kind {kind!r} (one of {', '.join(DEFECTS)})")
    return _MAKERS[kind](img, rng)


def make_dataset(root: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write an MVTec-layout dataset under root (train/good, test/<type>, ground_truth/<type>); returns root."""
    root = Path(root)
    rng = np.random.default_rng(spec.seed)

    def save(path: Path, img: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), img):
            raise OSError(f"{path}: could not write image")

    for i in range(spec.n_train):
        save(root / "train" / "good" / f"{i:03d}.png", surface(spec.size, rng))
    for i in range(spec.n_test_good):
        save(root / "test" / "good" / f"{i:03d}.png", surface(spec.size, rng))
    for defect in DEFECTS:
        for i in range(spec.n_test_defect_per_type):
            img = surface(spec.size, rng)
            mask = _MAKERS[defect](img, rng)
            save(root / "test" / defect / f"{i:03d}.png", img)
            save(root / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
    return root

"""Image reading and input preparation, shared by training, evaluation and the edge runtime.

One implementation on purpose: the exported graph starts at the normalised tensor, so the pixels a
deployed model sees are made by exactly the code that made them during training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

_JPEG_SUFFIXES = {".jpg", ".jpeg"}


class ImageError(ValueError):
    """An image or mask file that cannot be used; the message names the file and the problem."""


def _check_file(path: Path) -> None:
    """Exists, is a non-empty file, and (JPEG/PNG) is not truncated: only the file's tail is read."""
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    size = path.stat().st_size
    if not size:
        raise ImageError(f"{path}: file is empty")
    with open(path, "rb") as fh:
        fh.seek(max(0, size - 64))
        tail = fh.read()
    suffix = path.suffix.lower()
    # OpenCV decodes a truncated JPEG/PNG into a partly grey image and only warns on stderr; a defect
    # detector trained or calibrated on that would learn the grey block as "normal", so refuse it.
    if suffix in _JPEG_SUFFIXES and b"\xff\xd9" not in tail:
        raise ImageError(f"{path}: truncated JPEG (no end-of-image marker)")
    if suffix == ".png" and b"IEND" not in tail[-32:]:
        raise ImageError(f"{path}: truncated PNG (no IEND chunk)")


def _decode(path: Path) -> np.ndarray:
    """Decode straight from the file (cv2.imread streams it): holding a large frame's compressed bytes while
    decoding it would add their size to peak memory. imdecode is the fallback for paths imread cannot open."""
    _check_file(path)
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        img = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageError(f"{path}: not a readable image (unknown format or corrupt data)")
    return img


def _to_unit_float(img: np.ndarray, path: Path) -> np.ndarray:
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if img.dtype == np.uint16:
        return img.astype(np.float32) / 65535.0
    if img.dtype in (np.float32, np.float64):
        return np.clip(img.astype(np.float32), 0.0, 1.0)
    raise ImageError(f"{path}: unsupported pixel type {img.dtype}")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as float32 RGB in [0, 1], shape (H, W, 3).

    8- and 16-bit, grayscale (replicated to 3 channels, as the backbone expects) and RGBA (alpha
    dropped) are accepted; any other channel count is refused.
    """
    path = Path(path)
    return _to_unit_float(read_image_raw(path), path)


def read_image_raw(path: str | Path) -> np.ndarray:
    """read_image without the conversion to float: RGB (H, W, 3) in the file's own pixel type (uint8, uint16,
    float). A large image stays 4x smaller this way; tiled inference converts one tile at a time."""
    path = Path(path)
    img = _decode(path)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB, dst=img)  # in place: a 20-megapixel frame is not copied
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    else:
        channels = img.shape[2] if img.ndim == 3 else img.ndim
        raise ImageError(
            f"{path}: image has {channels} channels; expected 1 (grayscale), 3 (colour) or 4 (colour + alpha)"
        )
    if img.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        raise ImageError(f"{path}: unsupported pixel type {img.dtype}")
    return img


def read_mask(path: str | Path) -> np.ndarray:
    """Read a defect mask as bool (H, W): any non-zero pixel in any channel is defect."""
    path = Path(path)
    mask = _decode(path)
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    return mask > 0


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a bool mask to (H, W) with nearest neighbour so it stays binary."""
    h, w = size
    if mask.shape == (h, w):
        return mask
    return cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W, 3) float image to size=(H, W). Area filter when shrinking (no aliasing)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    shrinking = h < image.shape[0] or w < image.shape[1]
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (w, h), interpolation=interp)


def normalize(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float RGB in [0, 1] -> (3, H, W) float32, ImageNet mean/std."""
    return np.ascontiguousarray(((image - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1), dtype=np.float32)


def prepare(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Model input for one image: resize to size=(H, W), normalise, channels first."""
    return normalize(resize_image(image, size))


def prepare_batch(images: Sequence[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    return np.stack([prepare(img, size) for img in images])


class BmpStrips:
    """An uncompressed 24-bit BMP read a band of rows at a time: tiled inference on a frame far larger than
    memory should hold (factory cameras write BMP) never decodes the whole image. rows(y0, y1) -> RGB uint8."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        _check_file(self.path)
        with open(self.path, "rb") as fh:
            head = fh.read(54)
        if len(head) < 54 or head[:2] != b"BM":
            raise ImageError(f"{self.path}: not a BMP file")
        offset = int.from_bytes(head[10:14], "little")
        width = int.from_bytes(head[18:22], "little", signed=True)
        height = int.from_bytes(head[22:26], "little", signed=True)
        bpp = int.from_bytes(head[28:30], "little")
        compression = int.from_bytes(head[30:34], "little")
        if bpp != 24 or compression != 0 or width <= 0 or height == 0:
            raise ImageError(f"{self.path}: only uncompressed 24-bit BMPs are read in strips (bpp {bpp}, compression {compression})")
        self.offset, self.width, self.height = offset, width, abs(height)
        self.bottom_up = height > 0
        self.stride = ((24 * width + 31) // 32) * 4
        expected = offset + self.stride * self.height
        if self.path.stat().st_size < expected:
            raise ImageError(f"{self.path}: truncated BMP ({self.path.stat().st_size} bytes, expected {expected})")
        self.shape = (self.height, self.width, 3)
        self.dtype = np.dtype(np.uint8)

    def rows(self, y0: int, y1: int) -> np.ndarray:
        y0, y1 = max(0, y0), min(self.height, y1)
        n = y1 - y0
        first = (self.height - y1) if self.bottom_up else y0  # file row of the block's first stored row
        with open(self.path, "rb") as fh:
            fh.seek(self.offset + first * self.stride)
            block = np.frombuffer(fh.read(n * self.stride), dtype=np.uint8).reshape(n, self.stride)
        block = block[:, : self.width * 3].reshape(n, self.width, 3)
        if self.bottom_up:
            block = block[::-1]
        return np.ascontiguousarray(block[..., ::-1])  # BGR -> RGB


def open_strips(path: str | Path) -> BmpStrips | None:
    """A strip reader for files that allow one (uncompressed 24-bit BMP), else None (decode it whole)."""
    path = Path(path)
    if path.suffix.lower() != ".bmp":
        return None
    try:
        return BmpStrips(path)
    except ImageError:
        return None

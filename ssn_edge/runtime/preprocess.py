"""Image reading and input preparation, shared by training, evaluation and the edge runtime.

One implementation on purpose: the exported graph starts at the normalised tensor, so the pixels a
deployed model sees are made by exactly the code that made them during training.

Files are decoded by their content (`decode`); then these pixel rules hold for training and runtime alike:

* Pixel types: uint8 (8-bit), uint16 (see bit depth), float32/float64 (see float ranges). Signed or 32-bit
  integer images are refused: there is no single right way to map them to [0, 1].
* Channels: 1 (grayscale, replicated to 3, as the backbone expects), 3 (colour), 4 (colour + alpha: alpha
  dropped). Any other count is refused.
* Bit depth of 16-bit files (`significant_bits`): a 16-bit PNG or TIFF often holds 10-, 12- or 14-bit camera
  data; divided by 65535 such an image is nearly black and a model scores it as a defect. The depth is
  - the caller's `bit_depth` when given (``--bit-depth`` on predict): the camera's depth is a property of
    the line, so pinning it is the rule for production; a value that does not fit it is refused;
  - else a PNG's sBIT chunk, the format's own statement of its significant bits, when present;
  - else detected from the image's maximum: the smallest of 8, 10, 12, 14, 16 bits that holds it. This
    reads a 12-bit frame right whenever it uses more than a quarter of its range (a lit part does); a frame
    darker than that is read as 10-bit, 4x too bright. Each prediction records the depth used and predict
    warns when one run mixed depths, so pin ``--bit-depth`` when a camera's frames can be that dark.
  The image is then scaled to the full 16-bit range in place (v * 65535 / (2^d - 1), rounded), so every
  consumer divides by 65535 as before: a 16-bit image (d = 16) is bit-identical to earlier releases.
* Float images, by their range: NaN or Inf anywhere is refused; values within [0, 1] are used as they are;
  a maximum from 2 to 255 means a 0..255 image, divided by 255; anything else (negative values, a maximum
  between 1 and 2, which could be either, or above 255) is refused rather than guessed. A tolerance of
  1e-3 absorbs rounding (clipped away).
* Size (`check_geometry`, runtime only; training reads any size): every side at least MIN_SIDE pixels (an
  image smaller than that resized to the model's input is a blur of a few pixels, scored as if it were a
  part); for a model that resizes the whole image to its input, the image's aspect ratio at most
  MAX_DISTORTION times that of the input (a 3:1 sliver squeezed square stretches every defect threefold,
  past anything the model saw). A tiled model at native resolution tiles any shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from ssn_edge.runtime.decode import Decoded, ImageError, decode_bytes, decode_file, display_path, file_problem

__all__ = ["ImageError", "IMAGENET_MEAN", "IMAGENET_STD", "read_image", "read_image_raw", "read_mask", "load_image"]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

BIT_DEPTHS = (8, 10, 12, 14, 16)
MIN_SIDE = 32
MAX_DISTORTION = 4.0
FLOAT_TOLERANCE = 1e-3
_BAND = 512  # rows converted at a time: a 20-megapixel frame never gets a second full-size float copy


@dataclass(frozen=True)
class ImageInfo:
    """How a file was read: its format and the bit depth its integer samples were taken at (None: float)."""

    format: str
    bit_depth: int | None


def _integer_depth(img: np.ndarray, path: Path, bit_depth: int | None, significant: int | None) -> int:
    """The bit depth a uint16 image's values are taken at (rules in the module docstring)."""
    top = int(img.max())
    if bit_depth is not None:
        if top >= 1 << bit_depth:
            raise ImageError(
                f"{display_path(path)}: pixel value {top} does not fit the {bit_depth}-bit depth given (max {(1 << bit_depth) - 1})",
                "bit_depth",
            )
        return bit_depth
    if significant is not None and top < 1 << significant:
        return max(8, significant)
    return next(d for d in BIT_DEPTHS if top < 1 << d)


def _scale_to_16_bits(img: np.ndarray, depth: int) -> None:
    """In place, a band of rows at a time: v -> round(v * 65535 / (2^depth - 1))."""
    if depth == 16:
        return
    factor = np.float32(65535.0 / ((1 << depth) - 1))
    for y in range(0, img.shape[0], _BAND):
        band = img[y : y + _BAND]
        band[...] = np.minimum(np.rint(band * factor), 65535)


def _float_to_unit(img: np.ndarray, path: Path) -> np.ndarray:
    """float32 (H, W[, C]) -> the same array in [0, 1] by the float-range rule; refused otherwise."""
    name = display_path(path)
    lo, hi = float(img.min()), float(img.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        nan, inf = int(np.isnan(img).sum()), int(np.isinf(img).sum())
        what = ", ".join(p for p in (f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else "") if p)
        raise ImageError(f"{name}: float image holds {what} pixel values", "non_finite")
    if lo < -FLOAT_TOLERANCE:
        raise ImageError(f"{name}: float image has negative values (min {lo:g}); expected 0..1 or 0..255", "value_range")
    if hi <= 1.0 + FLOAT_TOLERANCE:
        scale = None
    elif 2.0 <= hi <= 255.0 + FLOAT_TOLERANCE:
        scale = np.float32(255.0)  # divided, as uint8 is: a 0..255 float image reads exactly as its uint8 twin
    else:
        why = "ambiguous: neither 0..1 nor 0..255" if hi < 2.0 else "only 0..1 and 0..255 float images are read"
        raise ImageError(f"{name}: float image spans {lo:g}..{hi:g} ({why})", "value_range")
    for y in range(0, img.shape[0], _BAND):
        band = img[y : y + _BAND]
        if scale is not None:
            np.divide(band, scale, out=band)
        np.clip(band, 0.0, 1.0, out=band)
    return img


def _colour(img: np.ndarray, path: Path) -> np.ndarray:
    """Decoded BGR / BGRA / gray -> RGB (H, W, 3) or gray (H, W); any other channel count refused."""
    if img.ndim == 2:
        return img
    channels = img.shape[2] if img.ndim == 3 else img.ndim
    if img.ndim == 3 and channels == 1:
        return img[:, :, 0]
    if img.ndim == 3 and channels == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB, dst=img)  # in place: a 20-megapixel frame is not copied
    if img.ndim == 3 and channels == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    raise ImageError(
        f"{display_path(path)}: image has {channels} channels; expected 1 (grayscale), 3 (colour) or 4 (colour + alpha)",
        "channels",
    )


def load_image(path: str | Path, bit_depth: int | None = None) -> tuple[np.ndarray, ImageInfo]:
    """Decode by content and apply the pixel rules: RGB (H, W, 3) as uint8, uint16 (scaled to 16 bits) or
    float32 in [0, 1], and how it was read. bit_depth: the depth of 16-bit files' samples (8..16), or None
    for the sBIT chunk / detection rule."""
    path = Path(path)
    if bit_depth is not None and bit_depth not in BIT_DEPTHS:
        raise ValueError(f"bit depth must be one of {', '.join(map(str, BIT_DEPTHS))}, got {bit_depth!r}")
    return _pixel_rules(decode_file(path), path, bit_depth)


def load_image_bytes(data: bytes, name: str, bit_depth: int | None = None) -> tuple[np.ndarray, ImageInfo]:
    """load_image for an encoded image already in memory (an inference server's request body); name stands
    for the file in error messages."""
    if bit_depth is not None and bit_depth not in BIT_DEPTHS:
        raise ValueError(f"bit depth must be one of {', '.join(map(str, BIT_DEPTHS))}, got {bit_depth!r}")
    if not data:
        raise ImageError(f"{name}: empty (0 bytes)", "empty")
    return _pixel_rules(decode_bytes(Path(name), data), Path(name), bit_depth)


def _pixel_rules(decoded: Decoded, path: Path, bit_depth: int | None) -> tuple[np.ndarray, ImageInfo]:
    img = decoded.pixels
    if img.dtype == np.float64:
        img = img.astype(np.float32)
    if img.dtype not in (np.uint8, np.uint16, np.float32):
        raise ImageError(
            f"{display_path(path)}: unsupported pixel type {img.dtype} ({decoded.format}); expected 8- or 16-bit unsigned or float",
            "pixel_type",
        )
    img = _colour(img, path)
    depth: int | None = 8
    if img.dtype == np.uint16:
        depth = _integer_depth(img, path, bit_depth, decoded.significant_bits)
        _scale_to_16_bits(img, depth)
    elif img.dtype == np.float32:
        img, depth = _float_to_unit(img, path), None
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return img, ImageInfo(decoded.format, depth)


def to_unit_float(img: np.ndarray) -> np.ndarray:
    """uint8 / uint16 / float32 RGB -> float32 in [0, 1]. Divided in place in the new array: the same values
    as ``img.astype(np.float32) / 255`` without a second full-size float array."""
    if img.dtype not in (np.uint8, np.uint16):
        return img.astype(np.float32, copy=False)
    out = img.astype(np.float32)
    np.divide(out, np.float32(255.0 if img.dtype == np.uint8 else 65535.0), out=out)
    return out


def read_image(path: str | Path, bit_depth: int | None = None) -> np.ndarray:
    """Read an image as float32 RGB in [0, 1], shape (H, W, 3), by the rules in the module docstring."""
    return to_unit_float(load_image(path, bit_depth)[0])


def read_image_raw(path: str | Path, bit_depth: int | None = None) -> np.ndarray:
    """read_image without the conversion to float: RGB (H, W, 3) uint8, uint16 or float32 in [0, 1]. A large
    image stays 4x smaller this way; tiled inference converts one tile at a time."""
    return load_image(path, bit_depth)[0]


def read_mask(path: str | Path) -> np.ndarray:
    """Read a defect mask as bool (H, W): any non-zero pixel in any channel is defect."""
    mask = decode_file(path).pixels
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    return mask > 0


def check_geometry(shape: Sequence[int], name: str, input_size: tuple[int, int] | None) -> None:
    """Refuse an image the model cannot use (rules in the module docstring). input_size: the (H, W) the whole
    image is resized to, or None for a model that tiles the image at its own resolution."""
    h, w = int(shape[0]), int(shape[1])
    if min(h, w) < MIN_SIDE:
        raise ImageError(f"{name}: image is {w}x{h} pixels; too small for the model (each side must be >= {MIN_SIDE})", "too_small")
    if input_size is not None:
        ih, iw = input_size
        distortion = max((w / h) / (iw / ih), (h / w) / (ih / iw))
        if distortion > MAX_DISTORTION:
            raise ImageError(
                f"{name}: image is {w}x{h} pixels; resizing it to the model's {iw}x{ih} input would stretch it "
                f"{distortion:.1f}x (at most {MAX_DISTORTION:g}x)",
                "aspect",
            )


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
        problem = file_problem(self.path)
        if problem is not None:
            raise problem
        name = display_path(self.path)
        with open(self.path, "rb") as fh:
            head = fh.read(54)
        if len(head) < 54 or head[:2] != b"BM":
            raise ImageError(f"{name}: not a BMP file", "unknown_format")
        offset = int.from_bytes(head[10:14], "little")
        width = int.from_bytes(head[18:22], "little", signed=True)
        height = int.from_bytes(head[22:26], "little", signed=True)
        bpp = int.from_bytes(head[28:30], "little")
        compression = int.from_bytes(head[30:34], "little")
        if bpp != 24 or compression != 0 or width <= 0 or height == 0:
            raise ImageError(f"{name}: only uncompressed 24-bit BMPs are read in strips (bpp {bpp}, compression {compression})", "unsupported")
        self.offset, self.width, self.height = offset, width, abs(height)
        self.bottom_up = height > 0
        self.stride = ((24 * width + 31) // 32) * 4
        expected = offset + self.stride * self.height
        size = self.path.stat().st_size
        if size < expected:
            raise ImageError(f"{name}: truncated BMP ({size} bytes, its header needs {expected})", "truncated")
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
    """A strip reader for files that allow one (uncompressed 24-bit BMP, by content), else None (decode it
    whole, which reports whatever is wrong with it)."""
    path = Path(path)
    try:
        return BmpStrips(path)
    except ImageError:
        return None

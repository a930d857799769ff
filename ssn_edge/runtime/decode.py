"""Decode an image file by its content, never by its name, and say precisely why one cannot be used.

Rules (what `decode_file` does, in order):

* The file is opened by Python (any bytes in its name: a Latin-1 name from a Windows share is fine) and its
  compressed bytes are handed to ``cv2.imdecode``. ``cv2.imread`` is never given a path: OpenCV segfaulted
  on names that are not valid UTF-8.
* What the file is comes from its first bytes (magic numbers): JPEG, PNG, BMP, TIFF, WebP, GIF, PNM/PFM,
  JPEG 2000, Radiance HDR, AVIF. A PNG named ``.jpg`` is decoded as the PNG it is. Text (HTML, JSON, a log)
  saved under an image name is reported as text, an empty file as empty, anything else as an unknown format.
* JPEG, PNG, BMP and TIFF are checked structurally before decoding, which tells *truncated* (the file ends
  before its data does) from *corrupt* (bad structure or checksum). Bytes after a JPEG's end-of-image marker
  or after a PNG's IEND chunk are allowed (cameras and some editors append metadata there).
* OpenCV decodes a JPEG whose entropy-coded data is damaged mid-file and only has libjpeg warn on stderr
  ("Corrupt JPEG data: premature end of data segment"): the decoder's stderr is captured around each decode
  and such a warning refuses the image as corrupt. Damage that leaves the entropy coding decodable (a few
  overwritten bytes often do: libjpeg noticed 59 of 200 random 1-64 byte overwrites) cannot be seen by any
  decoder and is scored; a truncated or structurally broken JPEG is always refused.
* Images above MAX_PIXELS (from the header, where the format gives it cheaply) are refused before any pixel
  is allocated: a small file can claim a gigapixel (a decompression bomb).

Pixel rules (bit depth, float ranges, channels, size) live in `preprocess`, which calls this module.
Torch-free.
"""

from __future__ import annotations

import os
import re
import stat
import struct
import sys
import tempfile
import threading
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

# Larger than any inspection camera frame (151 MP sensors exist); a 268-megapixel RGB image is 805 MB decoded.
MAX_PIXELS = 1 << 28

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# libjpeg's warnings that mean pixels were lost or invented (its JWRN_* messages). "N extraneous bytes before
# marker 0xd9" is one of them: an encoder leaves none, and damage that desynchronises the entropy decoder ends
# the scan early with exactly that warning.
_JPEG_DAMAGE = ("corrupt jpeg data", "premature end of jpeg file", "invalid sos parameters", "inconsistent progression",
                "huffman", "application transferred too few scanlines")
# Words in a decoder's refusal that mean it ran out of data.
_OUT_OF_DATA = ("end of input", "unexpected end", "premature end", "incomplete", "inconsistent with stream length",
                "truncated", "end of file", "eof")


class ImageError(ValueError):
    """An image or mask file that cannot be used; the message names the file and the problem.

    kind: a short machine-readable reason: missing, not_file, dangling_symlink, unreadable, empty, not_image,
    unknown_format, unsupported, truncated, corrupt, too_large, pixel_type, channels, bit_depth, value_range,
    non_finite, too_small, aspect."""

    def __init__(self, message: str, kind: str = "unusable"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Decoded:
    """A decoded file: pixels as OpenCV gives them (BGR / BGRA / gray, the file's own pixel type), its format
    and, for a PNG with an sBIT chunk, the significant bits it declares per sample."""

    pixels: np.ndarray
    format: str
    significant_bits: int | None = None


def display_path(path: str | os.PathLike) -> str:
    """The path as text that can always be printed or written to JSON/CSV: bytes of a name that are not valid
    UTF-8 are shown as \\xNN escapes (Python keeps them as lone surrogates, which cannot be encoded)."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", errors="backslashreplace")


def _error(path: Path, problem: str, kind: str) -> ImageError:
    return ImageError(f"{display_path(path)}: {problem}", kind)


# -- reading the bytes --------------------------------------------------------------------------------------


def file_problem(path: Path) -> ImageError | None:
    """Why path is not a readable regular file (missing, dangling or looping symlink, folder, FIFO, device), or
    None. Checked with stat before opening: opening a FIFO would block the run until someone writes to it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        try:
            target = os.readlink(path)
        except OSError:
            return _error(path, "file not found", "missing")
        return _error(path, f"dangling symlink (its target {display_path(target)} does not exist)", "dangling_symlink")
    except OSError as exc:
        if exc.errno == 40:  # ELOOP
            return _error(path, "symlink loop (the link points back at itself)", "dangling_symlink")
        return _error(path, f"cannot read: {exc.strerror}", "unreadable")
    if stat.S_ISDIR(st.st_mode):
        return _error(path, "is a folder, not an image file", "not_file")
    if not stat.S_ISREG(st.st_mode):
        what = "FIFO" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "device"
        return _error(path, f"not a regular file (a {what})", "not_file")
    if st.st_size == 0:
        return _error(path, "file is empty (0 bytes)", "empty")
    return None


def read_file(path: Path) -> bytes:
    problem = file_problem(path)
    if problem is not None:
        raise problem
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise _error(path, f"cannot read: {exc.strerror}", "unreadable") from None
    if not data:
        raise _error(path, "file is empty (0 bytes)", "empty")
    return data


# -- what the bytes are -------------------------------------------------------------------------------------


def sniff(head: bytes) -> str | None:
    """Format name from a file's first bytes, or None when no known image format starts this way."""
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if head[:8] == PNG_SIGNATURE:
        return "PNG"
    if head[:2] == b"BM":
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"123456" and head[2:3] in b" \t\r\n":
        return "PNM"
    if head[:3] in (b"PF\n", b"Pf\n"):
        return "PFM"
    if head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or head[:4] == b"\xff\x4f\xff\x51":
        return "JPEG 2000"
    if head[:10] == b"#?RADIANCE" or head[:6] == b"#?RGBE":
        return "HDR"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "AVIF"
    return None


# Formats recognised but not decodable by this OpenCV build, or not images at all.
_KNOWN_OTHER = {
    b"\x76\x2f\x31\x01": "OpenEXR (this OpenCV build has no EXR decoder)",
    b"8BPS": "Photoshop PSD",
    b"%PDF": "PDF document",
    b"PK\x03\x04": "ZIP archive",
    b"\x1f\x8b\x08": "gzip archive",
    b"\x00\x00\x01\x00": "Windows icon",
}


def _not_an_image(path: Path, head: bytes) -> ImageError:
    for magic, what in _KNOWN_OTHER.items():
        if head.startswith(magic):
            return _error(path, f"not a supported image: {what}", "unsupported")
    sample = head[:512]
    if b"\x00" not in sample:
        try:
            text = sample.decode("utf-8")
        except UnicodeDecodeError as exc:  # cut inside a character at the end of the sample is still text
            text = sample[: exc.start].decode("utf-8") if exc.start > len(sample) - 4 else None
        if text is not None and text.strip() and sum(c.isprintable() or c in "\r\n\t" for c in text) >= 0.95 * len(text):
            kind = "HTML" if text.lstrip().lower().startswith(("<!doctype html", "<html")) else "text"
            first = " ".join(text.strip().split())[:40]
            return _error(path, f"not an image: the file holds {kind} ({first!r}...)", "not_image")
    return _error(path, f"not an image: unknown format (first bytes {head[:8].hex(' ')})", "unknown_format")


# -- structure checks (truncated vs corrupt) ----------------------------------------------------------------


def _check_pixels(path: Path, fmt: str, width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise _error(path, f"corrupt {fmt} header (image size {width}x{height})", "corrupt")
    if width * height > MAX_PIXELS:
        raise _error(path, f"{fmt} header claims {width}x{height} pixels, above the {MAX_PIXELS >> 20} megapixel limit", "too_large")


def check_jpeg(path: Path, data: bytes) -> None:
    """Walk the JPEG's markers to its end-of-image marker: segments by their lengths (an EXIF thumbnail's own
    markers are skipped with its segment), entropy-coded scans to the next marker. Where the walk breaks, an
    end-of-image marker further on means damage mid-file (corrupt); none means the file was cut (truncated)."""
    try:
        _walk_jpeg(path, data)
    except _JpegBreak as brk:
        if data.find(b"\xff\xd9", brk.at) >= 0:
            raise _error(path, f"corrupt JPEG data ({brk.what} at byte {brk.at})", "corrupt") from None
        raise _error(path, f"truncated JPEG (ends at byte {len(data)} without an end-of-image marker)", "truncated") from None


class _JpegBreak(Exception):
    def __init__(self, what: str, at: int):
        self.what, self.at = what, at


def _walk_jpeg(path: Path, data: bytes) -> None:
    n, pos = len(data), 2
    while True:
        if pos >= n:
            raise _JpegBreak("end of file", n)
        if data[pos] != 0xFF:  # junk before a marker: skipped, as libjpeg does (and warns: see decode_bytes)
            pos = data.find(b"\xff", pos)
            if pos < 0:
                raise _JpegBreak("end of file", n)
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            raise _JpegBreak("end of file", n)
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            return
        if 0xD0 <= marker <= 0xD7 or marker in (0x01, 0xD8):
            continue
        if pos + 2 > n:
            raise _JpegBreak("end of file", n)
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2 or pos + length > n:
            raise _JpegBreak(f"a marker segment of length {length}", pos)
        if marker in _SOF_MARKERS and length >= 7:
            height, width = struct.unpack(">HH", data[pos + 3 : pos + 7])
            _check_pixels(path, "JPEG", width, height or 1)  # height 0: defined later by DNL
        pos += length
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next real marker
            while True:
                i = data.find(b"\xff", pos)
                if i < 0 or i + 1 >= n:
                    raise _JpegBreak("end of file", n)
                nxt = data[i + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7:  # stuffed byte, restart marker
                    pos = i + 2
                elif nxt == 0xFF:
                    pos = i + 1
                else:
                    pos = i
                    break


def check_png(path: Path, data: bytes) -> int | None:
    """Walk the PNG's chunks to IEND, checking each CRC; returns the sBIT chunk's significant bits (the most of
    the colour samples), or None."""
    n, pos, first, sbit, color_type, depth = len(data), 8, True, None, None, None
    view = memoryview(data)
    while True:
        if pos + 8 > n:
            raise _error(path, f"truncated PNG (ends at byte {n} before its IEND chunk)", "truncated")
        length = int.from_bytes(data[pos : pos + 4], "big")
        ctype = data[pos + 4 : pos + 8]
        if length > 0x7FFFFFFF or not ctype.isalpha():
            raise _error(path, f"corrupt PNG data (bad chunk header at byte {pos})", "corrupt")
        name = ctype.decode("ascii")
        end = pos + 12 + length
        if end > n:
            raise _error(path, f"truncated PNG (its {name} chunk runs to byte {end}, the file ends at {n})", "truncated")
        crc = int.from_bytes(data[end - 4 : end], "big")
        if zlib.crc32(view[pos + 4 : end - 4]) != crc:
            raise _error(path, f"corrupt PNG data (checksum mismatch in the {name} chunk at byte {pos})", "corrupt")
        body = data[pos + 8 : pos + 8 + length] if length <= 64 else b""
        if first:
            if name != "IHDR" or length != 13:
                raise _error(path, "corrupt PNG data (does not start with an IHDR chunk)", "corrupt")
            width, height = struct.unpack(">II", body[:8])
            depth, color_type = body[8], body[9]
            _check_pixels(path, "PNG", width, height)
            first = False
        elif name == "sBIT" and body:
            colour = body[:1] if color_type in (0, 4) else body[:3]
            bits = max(colour)
            if depth and 1 <= bits <= depth:
                sbit = bits
        elif name == "IEND":
            return sbit
        pos = end


def check_bmp(path: Path, data: bytes) -> None:
    """Header sizes against the file: an uncompressed BMP must hold offset + stride x height bytes."""
    if len(data) < 26:
        raise _error(path, f"truncated BMP (only {len(data)} bytes, shorter than its header)", "truncated")
    offset = int.from_bytes(data[10:14], "little")
    header = int.from_bytes(data[14:18], "little")
    if header == 12:  # OS/2 BITMAPCOREHEADER
        width, height = struct.unpack("<Hh", data[18:22])
        bpp, compression = int.from_bytes(data[24:26], "little"), 0
    else:
        if len(data) < 34:
            raise _error(path, f"truncated BMP (only {len(data)} bytes, shorter than its header)", "truncated")
        width, height = struct.unpack("<ii", data[18:26])
        bpp, compression = int.from_bytes(data[28:30], "little"), int.from_bytes(data[30:34], "little")
    _check_pixels(path, "BMP", width, abs(height))
    if offset > len(data):
        raise _error(path, f"truncated BMP (pixel data starts at byte {offset}, the file ends at {len(data)})", "truncated")
    if compression in (0, 3) and bpp in (1, 4, 8, 16, 24, 32):
        expected = offset + ((bpp * width + 31) // 32) * 4 * abs(height)
        if len(data) < expected:
            raise _error(path, f"truncated BMP ({len(data)} bytes, its header needs {expected})", "truncated")


def check_tiff(path: Path, data: bytes) -> None:
    """The first IFD must lie inside the file, and so must every strip or tile of the first image."""
    if data[2:4] in (b"+\x00", b"\x00+"):
        return  # BigTIFF: left to libtiff
    order = "<" if data[:2] == b"II" else ">"
    n = len(data)
    if n < 8:
        raise _error(path, f"truncated TIFF (only {n} bytes)", "truncated")
    ifd = struct.unpack(order + "I", data[4:8])[0]
    if ifd + 2 > n:
        raise _error(path, f"truncated TIFF (its directory is at byte {ifd}, the file ends at {n})", "truncated")
    count = struct.unpack(order + "H", data[ifd : ifd + 2])[0]
    if ifd + 2 + 12 * count > n:
        raise _error(path, f"truncated TIFF (cut inside its directory at byte {ifd})", "truncated")
    sizes = {1: 1, 3: 2, 4: 4, 16: 8}
    codes = {1: "B", 3: "H", 4: "I", 16: "Q"}
    tags: dict[int, list[int]] = {}
    for k in range(count):
        tag, typ, cnt = struct.unpack(order + "HHI", data[ifd + 2 + 12 * k : ifd + 10 + 12 * k])
        if tag not in (256, 257, 273, 279, 324, 325) or typ not in sizes:
            continue
        nbytes = sizes[typ] * cnt
        where = ifd + 10 + 12 * k if nbytes <= 4 else struct.unpack(order + "I", data[ifd + 10 + 12 * k : ifd + 14 + 12 * k])[0]
        if where + nbytes > n:
            raise _error(path, f"truncated TIFF (tag {tag}'s values run past the end of the file)", "truncated")
        tags[tag] = list(struct.unpack(order + codes[typ] * cnt, data[where : where + nbytes]))
    if 256 in tags and 257 in tags:
        _check_pixels(path, "TIFF", tags[256][0], tags[257][0])
    for offsets, counts in ((273, 279), (324, 325)):
        if offsets in tags and counts in tags:
            end = max((o + c for o, c in zip(tags[offsets], tags[counts])), default=0)
            if end > n:
                raise _error(path, f"truncated TIFF (its image data runs to byte {end}, the file ends at {n})", "truncated")


def check_gif(path: Path, data: bytes) -> None:
    """Walk the GIF's blocks to its trailer: OpenCV decodes a GIF cut short without a word."""
    n = len(data)
    if n < 13:
        raise _error(path, f"truncated GIF (only {n} bytes)", "truncated")
    width, height = struct.unpack("<HH", data[6:10])
    _check_pixels(path, "GIF", width, height)
    pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    while pos < n:
        block = data[pos]
        if block == 0x3B:
            return
        if block == 0x21:
            pos += 2
        elif block == 0x2C:
            flags = data[pos + 9] if pos + 9 < n else 0
            pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1  # descriptor, colour table, LZW size
        else:
            raise _error(path, f"corrupt GIF data (unknown block 0x{block:02x} at byte {pos})", "corrupt")
        while pos < n and data[pos]:  # data sub-blocks up to the empty one
            pos += 1 + data[pos]
        pos += 1
    raise _error(path, f"truncated GIF (ends at byte {n} before its trailer)", "truncated")


def check_riff(path: Path, data: bytes) -> None:
    """A WebP's RIFF header states the file's length."""
    declared = 8 + int.from_bytes(data[4:8], "little")
    if declared > len(data):
        raise _error(path, f"truncated WebP ({len(data)} bytes, its header says {declared})", "truncated")


_CHECKS = {"JPEG": check_jpeg, "PNG": check_png, "BMP": check_bmp, "TIFF": check_tiff, "WebP": check_riff, "GIF": check_gif}


# -- decoding, with the decoder's own messages captured -----------------------------------------------------

_capture_lock = threading.Lock()
_capture_file = None


@contextmanager
def decoder_messages() -> Iterator[list[str]]:
    """Capture what native decoders write to the process's stderr (fd 2) while the block runs: libjpeg's
    corrupt-data warnings, libpng/libtiff errors, OpenCV's log. They become the reasons given for refusing a
    file instead of noise on the console. Serialised: fd 2 is process-wide (decoding runs while no inference
    is in flight, so nothing else writes there meanwhile)."""
    lines: list[str] = []
    with _capture_lock:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):  # no stderr to capture: decode without
            yield lines
            return
        global _capture_file
        if _capture_file is None:  # one unlinked file, reused: a new one per image cost more than the decode
            _capture_file = tempfile.TemporaryFile()
        tmp = _capture_file
        tmp.seek(0)
        tmp.truncate()
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read(1 << 16).decode("utf-8", errors="replace")
        lines.extend(line.strip() for line in text.splitlines() if line.strip())


def _reason(messages: list[str]) -> str:
    """The decoder's own words without OpenCV's decoration ('[ERROR:0@0.1] global loadsave.cpp:79 imdecode_
    imdecode_(''): can't read header: OpenCV(5.0.0) /io/.../bitstrm.cpp:59: error: (-2:Unspecified error) ...').
    An error is preferred to a warning; OpenCV's multi-line assertion details ('> ...') to its summary."""
    if not messages:
        return ""
    detail = [m[1:].strip() for m in messages if m.startswith(">")]
    if detail:
        return " ".join(" ".join(detail).split())[:160]
    errors = [m for m in messages if "error" in m.lower()]
    text = (errors or messages)[0]
    text = re.sub(r"^\[[^\]]*\]\s*(global\s+\S+:\d+\s+)?", "", text)
    text = re.sub(r"imdecode_\S*\s+imdecode_\(''\):\s*", "", text)
    text = re.sub(r"OpenCV\([^)]*\)\s+\S+:\d+: error: \(-?\d+:[^)]*\)\s*", "", text)
    text = re.sub(r"\s+in function '[^']*'$", "", text)
    return " ".join(text.split())[:160]


def decode_bytes(path: Path, data: bytes) -> Decoded:
    """Decode a file's bytes by their content (see the module docstring); ImageError naming path otherwise."""
    fmt = sniff(data[:16])
    if fmt is None:
        raise _not_an_image(path, data[:512])
    significant = None
    check = _CHECKS.get(fmt)
    if check is not None:
        significant = check(path, data)
    try:
        with decoder_messages() as messages:
            pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else "decoder error"
        if "CV_IO_MAX_IMAGE_PIXELS" in detail:
            raise _error(path, f"{fmt} image is above OpenCV's pixel limit", "too_large") from None
        raise _error(path, f"corrupt {fmt} data (decoder: {detail[:160]})", "corrupt") from None
    if pixels is None:
        why = _reason(messages)
        channels = re.search(r"'channels' is (\d+)", why)
        if channels:
            raise _error(path, f"image has {channels.group(1)} channels; expected 1 (grayscale), 3 (colour) or 4 (colour + alpha)", "channels")
        if any(w in why.lower() for w in _OUT_OF_DATA):
            raise _error(path, f"truncated {fmt} (the decoder ran out of data: {why})", "truncated")
        raise _error(path, f"corrupt {fmt} data (the decoder refused it{': ' + why if why else ''})", "corrupt")
    if fmt == "JPEG":
        damage = [m for m in messages if any(d in m.lower() for d in _JPEG_DAMAGE)]
        if damage:
            raise _error(path, f"corrupt JPEG data (libjpeg: {damage[0][:160]})", "corrupt")
    if pixels.size == 0:
        raise _error(path, f"{fmt} image has no pixels", "corrupt")
    return Decoded(pixels, fmt, significant)


def decode_file(path: str | os.PathLike) -> Decoded:
    """Read and decode one image file (any name, any extension)."""
    path = Path(path)
    return decode_bytes(path, read_file(path))

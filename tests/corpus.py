"""The bad-input corpus: unusual and broken inputs, each with the command to run and the outcome it must have.

A case is files built into its own empty folder, the arguments of one `ssn-edge` command, and what must
happen: either a clear error (an ``error:`` / ``Error:`` line matching a pattern and naming the file, and the
expected exit status) or the right result (the exit status, and a `check` on the outputs, usually that the
odd file scores exactly as a plain reference copy of the same pixels). `run_case` runs it (in-process with
click's CliRunner, or in a subprocess for inputs that once crashed the interpreter) and `verdict` sorts the
outcome: clear_error | correct | traceback | segfault | silent_wrong (exit 0 where an error was due, or a
result that is not the right one) | unclear_error (it failed, but not with the promised message).

Adding cases: decorate a builder ``build(folder, fixtures) -> argv`` with ``@case(command, name, ...)``, or use
the helpers below (`bad_file`, `same_pixels`, `bench_refused`). `Fixtures` carries what the commands need
(a bundle now; a checkpoint, a dataset, ... when other commands' cases are added).
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import sys
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VERDICTS = ("clear_error", "correct", "traceback", "segfault", "silent_wrong", "unclear_error")


# -- image builders -----------------------------------------------------------------------------------------


def texture(h: int = 64, w: int = 80, seed: int = 0) -> np.ndarray:
    """An (h, w, 3) uint8 RGB test image: smooth noise plus a bright block (values well inside 8..247)."""
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.random((h, w, 3)).astype(np.float32), (0, 0), 2.0)
    img = (img - img.min()) / max(1e-6, float(img.max() - img.min()))
    img = (8 + img * 200).astype(np.uint8)
    img[h // 3 : h // 2, w // 3 : w // 2] = 240
    return img


def encode(img: np.ndarray, ext: str, *params: int) -> bytes:
    """RGB (or gray) array -> file bytes in the format of ext, via OpenCV (which stores BGR)."""
    if img.ndim == 3 and img.shape[2] in (3, 4):
        img = np.ascontiguousarray(img[:, :, [2, 1, 0, 3][: img.shape[2]]])
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok, ext
    return buf.tobytes()


def png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def with_png_chunk(png: bytes, ctype: bytes, body: bytes) -> bytes:
    """Insert a chunk right after IHDR (where sBIT belongs)."""
    ihdr_end = 8 + 12 + 13
    return png[:ihdr_end] + png_chunk(ctype, body) + png[ihdr_end:]


def fake_png(width: int, height: int) -> bytes:
    """A structurally valid PNG whose header claims width x height (its data is tiny)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b"")


def raw_tiff(array: np.ndarray, sample_format: int | None = None) -> bytes:
    """An uncompressed little-endian TIFF, directory first (so cutting the file cuts the pixel data).
    sample_format: 1 unsigned, 2 signed, 3 float (default: from the dtype)."""
    a = array if array.ndim == 3 else array[:, :, None]
    h, w, c = a.shape
    fmt = sample_format or (3 if a.dtype.kind == "f" else 2 if a.dtype.kind == "i" else 1)
    bits = a.dtype.itemsize * 8
    data = np.ascontiguousarray(a).tobytes()
    n_tags = 11
    ifd_off = 8
    extra_off = ifd_off + 2 + 12 * n_tags + 4
    bps = struct.pack("<" + "H" * c, *([bits] * c))
    fmts = struct.pack("<" + "H" * c, *([fmt] * c))
    bps_off, fmt_off = extra_off, extra_off + len(bps)
    data_off = fmt_off + len(fmts)

    def tag(t: int, typ: int, cnt: int, val: int) -> bytes:
        return struct.pack("<HHII", t, typ, cnt, val) if typ == 4 or cnt * 2 > 4 else struct.pack("<HHIHH", t, typ, cnt, val, 0)

    tags = [tag(256, 4, 1, w), tag(257, 4, 1, h),
            tag(258, 3, c, bps_off) if c > 2 else struct.pack("<HHI", 258, 3, c) + (bps + b"\0\0")[:4],
            tag(259, 3, 1, 1), tag(262, 3, 1, 2 if c >= 3 else 1), tag(273, 4, 1, data_off), tag(277, 3, 1, c),
            tag(278, 4, 1, h), tag(279, 4, 1, len(data)), tag(284, 3, 1, 1),
            tag(339, 3, c, fmt_off) if c > 2 else struct.pack("<HHI", 339, 3, c) + (fmts + b"\0\0")[:4]]
    ifd = struct.pack("<H", n_tags) + b"".join(tags) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", ifd_off) + ifd + bps + fmts + data


def jpeg_with_thumbnail(img: np.ndarray) -> bytes:
    """A JPEG with an APP1 segment holding a small JPEG (its own end-of-image marker inside the segment)."""
    main = encode(img, ".jpg")
    thumb = encode(cv2.resize(img, (16, 16)), ".jpg")
    app1 = b"\xff\xe1" + struct.pack(">H", len(thumb) + 2 + 6) + b"Exif\0\0" + thumb
    return main[:2] + app1 + main[2:]


# -- the case machinery -------------------------------------------------------------------------------------


@dataclass
class Fixtures:
    """What the commands run on. bundle: a small bundle with fp32, fp16 and int8 models. more: room for the
    fixtures of other commands' cases (a checkpoint, a dataset...)."""

    bundle: Path
    more: dict[str, Path] = field(default_factory=dict)


@dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str
    folder: Path
    exception: str | None = None  # an uncaught exception (in-process runs), formatted
    signal: int | None = None  # the signal that killed a subprocess

    @property
    def out(self) -> Path:
        return self.folder / "out"

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in (self.stderr + "\n" + self.stdout).splitlines() if ln.startswith(("error:", "Error:"))]

    def records(self) -> list[dict[str, Any]]:
        """predictions.jsonl of the run, in input order."""
        path = self.out / "predictions.jsonl"
        return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []

    def summary(self) -> dict[str, Any]:
        return json.loads((self.out / "predictions.json").read_text())

    def by_name(self) -> dict[str, dict[str, Any]]:
        return {Path(r["path"]).name: r for r in self.records()}


@dataclass
class Case:
    command: str
    name: str
    build: Callable[[Path, Fixtures], list[str]]  # writes the case's files into the folder; returns argv
    exit_code: int = 0
    error: str | None = None  # a clear error is due: a regex one error line must match
    names: tuple[str, ...] = ()  # what that line must also contain (the file's name)
    check: Callable[[Outcome], None] | None = None  # more to hold (results right, nothing stale...)
    in_subprocess: bool = False

    @property
    def id(self) -> str:
        return f"{self.command}:{self.name}"


CASES: list[Case] = []


def case(command: str, name: str, *, exit_code: int = 0, error: str | None = None, names: tuple[str, ...] = (),
         check: Callable[[Outcome], None] | None = None, in_subprocess: bool = False):
    def register(build: Callable[[Path, Fixtures], list[str]]):
        if any(c.id == f"{command}:{name}" for c in CASES):
            raise ValueError(f"duplicate corpus case {command}:{name}")
        CASES.append(Case(command, name, build, exit_code, error, names, check, in_subprocess))
        return build

    return register


def run_case(c: Case, folder: Path, fixtures: Fixtures, timeout: float = 180) -> Outcome:
    folder.mkdir(parents=True, exist_ok=True)
    argv = [c.command, *c.build(folder, fixtures)]
    if c.in_subprocess:
        env = {**os.environ, "SSN_EDGE_DEBUG": ""}
        proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *argv], cwd=folder, capture_output=True, timeout=timeout, env=env)
        sig = -proc.returncode if proc.returncode < 0 else None
        return Outcome(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"), folder, signal=sig)
    from click.testing import CliRunner

    from cli import main

    cwd = os.getcwd()
    os.chdir(folder)
    try:
        result = CliRunner().invoke(main, argv, catch_exceptions=True)
    finally:
        os.chdir(cwd)
    exc = None
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        exc = "".join(traceback.format_exception(*result.exc_info))
    return Outcome(result.exit_code, result.stdout, result.stderr, folder, exception=exc)


def verdict(c: Case, o: Outcome) -> tuple[str, str]:
    """(verdict, why) for a case's outcome."""
    if o.signal is not None or o.exit_code in (134, 139):
        return "segfault", f"killed by signal {o.signal or o.exit_code - 128}"
    if o.exception is not None or "Traceback (most recent call last)" in o.stdout + o.stderr:
        return "traceback", (o.exception or o.stderr)[-1500:]
    problems = []
    if o.exit_code != c.exit_code:
        problems.append(f"exit status {o.exit_code}, expected {c.exit_code}")
    if c.error is not None:
        lines = [ln for ln in o.error_lines if re.search(c.error, ln) and all(n in ln for n in c.names)]
        if not lines:
            problems.append(f"no error line matching {c.error!r} naming {c.names}: {o.error_lines}")
    if c.check is not None:
        try:
            c.check(o)
        except AssertionError as exc:
            problems.append(f"check failed: {exc}")
        except Exception as exc:  # a check that cannot even read the outputs: the outputs are wrong
            problems.append(f"check failed: {type(exc).__name__}: {exc}")
    if not problems:
        return ("clear_error" if c.error is not None else "correct"), ""
    why = "; ".join(problems)
    if o.exit_code == 0 and (c.error is not None or c.exit_code != 0):
        return "silent_wrong", why
    if c.error is None and o.exit_code == c.exit_code:
        return "silent_wrong", why
    return "unclear_error", why + f"\nstdout: {o.stdout[-800:]}\nstderr: {o.stderr[-800:]}"


# -- helpers that define families of cases -------------------------------------------------------------------

GOOD = ("good0.png", "good1.png")


def _predict_argv(folder: Path, fixtures: Fixtures, *inputs: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [str(fixtures.bundle), *inputs, "--out", str(folder / "out"), "--precision", "fp32", *extra]


def _write_good(folder: Path) -> Path:
    images = folder / "images"
    images.mkdir(exist_ok=True)
    for i, name in enumerate(GOOD):
        (images / name).write_bytes(encode(texture(seed=i), ".png"))
    return images


def bad_file(name: str, filename: str, content: bytes | Callable[[], bytes], error: str, kind: str,
             extra: tuple[str, ...] = ()) -> None:
    """A folder of two good images and one bad file: the good ones are scored, the bad one is listed with its
    reason (matching error, of that kind), the run exits 3."""

    def check(o: Outcome) -> None:
        recs = o.by_name()
        assert all(recs[g]["status"] == "ok" and 0.0 <= recs[g]["score"] <= 1.0 for g in GOOD), recs
        assert recs[filename]["status"] == "error" and recs[filename]["kind"] == kind, recs[filename]
        s = o.summary()
        assert s["complete"] and s["count"] == 2 and s["failed"] == 1, s
        assert [Path(f["path"]).name for f in s["failures"]] == [filename]

    @case("predict", name, exit_code=3, error=error, names=(filename,), check=check)
    def build(folder: Path, fixtures: Fixtures) -> list[str]:
        images = _write_good(folder)
        (images / filename).write_bytes(content() if callable(content) else content)
        return _predict_argv(folder, fixtures, str(images), extra=extra)


def same_pixels(name: str, filename: str, content: Callable[[], bytes], reference: Callable[[], np.ndarray],
                tol: float = 0.0, extra: tuple[str, ...] = (), bit_depth: int | None | str = "any") -> None:
    """The odd file must score as a plain 8-bit PNG of the pixels it holds (reference()) does: exactly
    (tol 0) or within tol; bit_depth: the depth its record must state."""

    def check(o: Outcome) -> None:
        recs = o.by_name()
        ref, odd = recs["reference.png"], recs[filename]
        assert ref["status"] == odd["status"] == "ok", (ref, odd)
        assert abs(ref["score"] - odd["score"]) <= tol, f"score {odd['score']} vs reference {ref['score']}"
        assert abs(ref["map_max"] - odd["map_max"]) <= max(tol * 20, 1e-6), (odd["map_max"], ref["map_max"])
        assert ref["decision"] == odd["decision"]
        if bit_depth != "any":
            assert odd["bit_depth"] == bit_depth, odd

    @case("predict", name, check=check)
    def build(folder: Path, fixtures: Fixtures) -> list[str]:
        images = folder / "images"
        images.mkdir()
        (images / "reference.png").write_bytes(encode(reference(), ".png"))
        (images / filename).write_bytes(content())
        return _predict_argv(folder, fixtures, str(images / "reference.png"), str(images / filename), extra=extra)


def predict_refused(name: str, argv_tail: tuple[str, ...], error: str, exit_code: int = 2) -> None:
    """predict with a bad option: refused with one clear line, and no results written."""

    def check(o: Outcome) -> None:
        assert not (o.out / "predictions.json").exists() and not (o.out / "predictions.jsonl").exists()

    @case("predict", name, exit_code=exit_code, error=error, check=check)
    def build(folder: Path, fixtures: Fixtures) -> list[str]:
        images = _write_good(folder)
        return [str(fixtures.bundle), str(images / GOOD[0]), "--out", str(folder / "out"), *argv_tail]


BENCH_FAST = ("--runs", "1", "--warmup", "0", "--seconds", "0", "--precision", "fp32")


def bench_refused(name: str, argv_tail: tuple[str, ...], error: str, exit_code: int = 2, fast: bool = True) -> None:
    @case("bench", name, exit_code=exit_code, error=error)
    def build(folder: Path, fixtures: Fixtures) -> list[str]:
        return [str(fixtures.bundle), *(BENCH_FAST if fast else ()), *argv_tail]



# =========================================================================================================
# predict: files that are not images, or not whole
# =========================================================================================================

IMG = texture()
JPG = encode(IMG, ".jpg")
PNG = encode(IMG, ".png")
HALF = len(JPG) // 2

bad_file("empty_png", "empty.png", b"", r"file is empty", "empty")
bad_file("empty_jpg", "empty.jpg", b"", r"file is empty", "empty")
bad_file("zeros_png", "zeros.png", bytes(1000), r"not an image: unknown format", "unknown_format")
bad_file("random_bytes_png", "noise.png", lambda: np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes(),
         r"not an image: unknown format", "unknown_format")
bad_file("html_as_jpg", "page.jpg", b"<!DOCTYPE html>\n<html><body>502 Bad Gateway</body></html>\n", r"not an image: the file holds HTML", "not_image")
bad_file("html_as_png", "page.png", b"<html><head><title>login</title></head></html>", r"not an image: the file holds HTML", "not_image")
bad_file("text_as_png", "readme.png", b"This file was replaced by the sync tool.\n", r"not an image: the file holds text", "not_image")
bad_file("json_as_bmp", "meta.bmp", b'{"camera": 3, "exposure": 120}\n', r"not an image: the file holds text", "not_image")
bad_file("csv_as_tif", "table.tif", b"part,score\n1,0.5\n", r"not an image: the file holds text", "not_image")
bad_file("utf8_text_as_jpg", "note.jpg", "Prüfteil Nr. 7 — Ausschuss\n".encode(), r"not an image: the file holds text", "not_image")
bad_file("pdf_as_png", "report.png", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", r"not a supported image: PDF", "unsupported")
bad_file("zip_as_jpg", "archive.jpg", b"PK\x03\x04" + bytes(100), r"not a supported image: ZIP", "unsupported")
bad_file("exr_as_tif", "hdr.tif", b"\x76\x2f\x31\x01" + bytes(200), r"OpenEXR", "unsupported")

bad_file("jpeg_half", "half.jpg", JPG[:HALF], r"truncated JPEG", "truncated")
bad_file("jpeg_header_only", "head.jpg", JPG[:300], r"truncated JPEG", "truncated")
bad_file("jpeg_soi_only", "soi.jpg", b"\xff\xd8\xff", r"truncated JPEG", "truncated")
bad_file("jpeg_no_eoi", "noeoi.jpg", JPG[:-2], r"truncated JPEG", "truncated")
bad_file("jpeg_thumbnail_then_cut", "thumbcut.jpg", lambda: (lambda b: b[: len(b) * 3 // 4])(jpeg_with_thumbnail(IMG)),
         r"truncated JPEG", "truncated")
bad_file("jpeg_block_deleted", "gap.jpg", JPG[:HALF] + JPG[HALF + 200 :], r"corrupt JPEG data", "corrupt")
bad_file("jpeg_tail_zeroed", "zeroed.jpg", JPG[:HALF] + bytes(len(JPG) - HALF - 2) + b"\xff\xd9", r"corrupt JPEG data", "corrupt")
bad_file("jpeg_bogus_marker", "rst.jpg", JPG[:HALF] + b"\xff\xd3" + JPG[HALF:], r"corrupt JPEG data", "corrupt")
bad_file("jpeg_bad_segment_length", "seglen.jpg", JPG[:4] + b"\xff\xff" + JPG[6:], r"corrupt JPEG data", "corrupt")
bad_file("jpeg_zero_width", "nowidth.jpg", lambda: (lambda b, i: b[: i + 7] + b"\x00\x00" + b[i + 9 :])(JPG, JPG.index(b"\xff\xc0")),
         r"corrupt JPEG header \(image size 0x", "corrupt")

bad_file("png_half", "half.png", PNG[: len(PNG) // 2], r"truncated PNG", "truncated")
bad_file("png_signature_only", "sig.png", PNG[:8], r"truncated PNG", "truncated")
bad_file("png_cut_in_ihdr", "ihdr.png", PNG[:20], r"truncated PNG", "truncated")
bad_file("png_no_iend", "noiend.png", PNG[:-12], r"truncated PNG \(ends at byte \d+ before its IEND", "truncated")
bad_file("png_idat_bit_flip", "flip.png", lambda: (lambda b: b[:60] + bytes([b[60] ^ 0x10]) + b[61:])(PNG),
         r"corrupt PNG data \(checksum mismatch in the IDAT chunk", "corrupt")
bad_file("png_ihdr_crc", "ihdrcrc.png", lambda: PNG[:29] + bytes([PNG[29] ^ 1]) + PNG[30:], r"checksum mismatch in the IHDR chunk", "corrupt")
bad_file("png_bad_zlib_good_crc", "zlib.png",
         lambda: b"\x89PNG\r\n\x1a\n" + PNG[8:33] + png_chunk(b"IDAT", b"\x78\x9c" + bytes(range(200))) + png_chunk(b"IEND", b""),
         r"corrupt PNG data \(the decoder refused it", "corrupt")
bad_file("png_garbage_chunk_type", "ctype.png", lambda: PNG[:33] + b"\x00\x00\x00\x04\x01\x02\x03\x04abcdxxxx" + PNG[33:],
         r"corrupt PNG data \(bad chunk header", "corrupt")
bad_file("png_zero_size", "zerosize.png", lambda: fake_png(0, 10), r"corrupt PNG header \(image size 0x10", "corrupt")

BMP = encode(IMG, ".bmp")
TIF = encode(IMG, ".tif")
bad_file("bmp_half", "half.bmp", BMP[: len(BMP) // 2], r"truncated BMP", "truncated")
bad_file("bmp_header_only", "head.bmp", BMP[:54], r"truncated BMP", "truncated")
bad_file("bmp_stub", "stub.bmp", BMP[:20], r"truncated BMP", "truncated")
bad_file("tiff_half_directory_at_end", "half.tif", TIF[: len(TIF) // 2], r"truncated TIFF", "truncated")
bad_file("tiff_pixel_data_cut", "cut.tif", lambda: raw_tiff(IMG)[:-500], r"truncated TIFF \(its image data runs to byte", "truncated")
bad_file("tiff_header_only", "head.tif", TIF[:8], r"truncated TIFF", "truncated")
bad_file("webp_truncated", "cut.webp", lambda: encode(IMG, ".webp")[:-40], r"truncated WebP", "truncated")
bad_file("gif_truncated", "cut.gif", lambda: (lambda b: b[: len(b) // 2])(_pillow_bytes(IMG, "GIF")), r"truncated GIF", "truncated")
bad_file("pnm_truncated", "cut.ppm", lambda: encode(IMG, ".ppm")[:-100], r"truncated PNM", "truncated")


def _pillow_bytes(img: np.ndarray, fmt: str, **kw: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt, **kw)
    return buf.getvalue()


# =========================================================================================================
# predict: pixels the model cannot be given as they are
# =========================================================================================================

FLOAT = IMG.astype(np.float32)


def _with(array: np.ndarray, value: float) -> np.ndarray:
    a = array.copy()
    a[5, 7, 1] = value
    return a


bad_file("float_nan", "nan.tif", lambda: encode(_with(FLOAT / 255, np.nan), ".tif"), r"float image holds 1 NaN", "non_finite")
bad_file("float_inf", "inf.tif", lambda: encode(_with(FLOAT / 255, np.inf), ".tif"), r"float image holds 1 infinite", "non_finite")
bad_file("float_negative", "neg.tif", lambda: encode(FLOAT / 255 - 0.5, ".tif"), r"float image has negative values", "value_range")
bad_file("float_0_4095", "wide.tif", lambda: encode(FLOAT * 16, ".tif"), r"only 0\.\.1 and 0\.\.255 float images", "value_range")
bad_file("float_ambiguous", "amb.tif", lambda: encode(FLOAT / 170, ".tif"), r"ambiguous: neither 0\.\.1 nor 0\.\.255", "value_range")
bad_file("int16_tiff", "signed.tif", lambda: encode(IMG.astype(np.int16), ".tif"), r"unsupported pixel type int16", "pixel_type")
bad_file("int32_tiff", "int32.tif", lambda: encode(IMG.astype(np.int32), ".tif"), r"unsupported pixel type int32", "pixel_type")
bad_file("int8_tiff", "int8.tif", lambda: encode((IMG // 2).astype(np.int8), ".tif"), r"unsupported pixel type int8", "pixel_type")
bad_file("uint32_tiff", "uint32.tif", lambda: encode(IMG.astype(np.uint32), ".tif"), r"unsupported pixel type uint32", "pixel_type")
bad_file("five_channel_tiff", "five.tif", lambda: raw_tiff(np.concatenate([IMG, IMG[:, :, :2]], axis=2)), r"image has 5 channels", "channels")
bad_file("depth_over_given", "full16.png", lambda: encode(IMG.astype(np.uint16) * 257, ".png"),
         r"pixel value \d+ does not fit the 12-bit depth given", "bit_depth", extra=("--bit-depth", "12"))

bad_file("one_pixel", "dot.png", lambda: encode(IMG[:1, :1], ".png"), r"image is 1x1 pixels; too small", "too_small")
bad_file("one_pixel_jpeg", "dot.jpg", lambda: encode(IMG[:1, :1], ".jpg"), r"too small", "too_small")
bad_file("sliver_3x2000", "sliver.png", lambda: encode(cv2.resize(IMG, (2000, 3)), ".png"), r"image is 2000x3 pixels; too small", "too_small")
bad_file("sliver_2000x3", "tall.png", lambda: encode(cv2.resize(IMG, (3, 2000)), ".png"), r"image is 3x2000 pixels; too small", "too_small")
bad_file("side_31", "s31.png", lambda: encode(cv2.resize(IMG, (31, 31)), ".png"), r"each side must be >= 32", "too_small")
bad_file("aspect_10", "strip.png", lambda: encode(cv2.resize(IMG, (400, 40)), ".png"), r"would stretch it 10\.0x", "aspect")
bad_file("aspect_5", "wide.png", lambda: encode(cv2.resize(IMG, (160, 32)), ".png"), r"would stretch it 5\.0x", "aspect")
bad_file("bomb_png", "bomb.png", lambda: fake_png(60000, 60000), r"claims 60000x60000 pixels, above the 256 megapixel limit", "too_large")
bad_file("bomb_jpeg", "bomb.jpg", lambda: (lambda i: JPG[: i + 5] + b"\xfd\xe8\xfd\xe8" + JPG[i + 9 :])(JPG.index(b"\xff\xc0")),
         r"claims 65000x65000 pixels", "too_large")
bad_file("bomb_bmp", "bomb.bmp", lambda: BMP[:18] + struct.pack("<ii", 50000, 50000) + BMP[26:], r"claims 50000x50000 pixels", "too_large")


# =========================================================================================================
# predict: the same pixels in another wrapping must score exactly the same
# =========================================================================================================


def _decoded(data: bytes) -> np.ndarray:
    """What OpenCV decodes from data, as RGB: the reference for lossy formats."""
    a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if a.ndim == 2:
        return np.repeat(a[:, :, None], 3, axis=2)
    return cv2.cvtColor(a, cv2.COLOR_BGR2RGB if a.shape[2] == 3 else cv2.COLOR_BGRA2RGB)


same_pixels("png_named_jpg", "photo.jpg", lambda: PNG, lambda: IMG)
same_pixels("png_named_upper_JPG", "PHOTO.JPG", lambda: PNG, lambda: IMG)
same_pixels("jpeg_named_png", "scan.png", lambda: JPG, lambda: _decoded(JPG))
same_pixels("bmp_named_png", "frame.png", lambda: BMP, lambda: IMG)
same_pixels("tiff_named_jpg", "frame.jpg", lambda: TIF, lambda: IMG)
same_pixels("png_without_extension", "frame", lambda: PNG, lambda: IMG)
same_pixels("png_odd_extension", "frame.dat", lambda: PNG, lambda: IMG)
same_pixels("jpeg_trailing_bytes", "trail.jpg", lambda: JPG + b"camera-metadata:" + bytes(range(256)) * 4, lambda: _decoded(JPG))
same_pixels("jpeg_trailing_64k_zeros", "pad.jpg", lambda: JPG + bytes(65536), lambda: _decoded(JPG))
same_pixels("jpeg_with_thumbnail", "exif.jpg", lambda: jpeg_with_thumbnail(IMG), lambda: _decoded(jpeg_with_thumbnail(IMG)))
same_pixels("png_trailing_bytes", "trail.png", lambda: PNG + b"\x00" * 100 + b"extra", lambda: IMG)
same_pixels("progressive_jpeg", "prog.jpg", lambda: _pillow_bytes(IMG, "JPEG", progressive=True),
            lambda: _decoded(_pillow_bytes(IMG, "JPEG", progressive=True)))
same_pixels("grayscale_jpeg", "gray.jpg", lambda: encode(IMG[:, :, 1], ".jpg"), lambda: _decoded(encode(IMG[:, :, 1], ".jpg")))
same_pixels("cmyk_jpeg", "cmyk.jpg", lambda: _cmyk_jpeg(IMG), lambda: _decoded(_cmyk_jpeg(IMG)))
same_pixels("gray_png", "gray.png", lambda: encode(IMG[:, :, 0], ".png"), lambda: np.repeat(IMG[:, :, :1], 3, axis=2))
same_pixels("rgba_png", "rgba.png", lambda: encode(np.dstack([IMG, np.full(IMG.shape[:2], 77, np.uint8)]), ".png"), lambda: IMG)
same_pixels("gray_alpha_png", "la.png", lambda: _pillow_bytes(np.dstack([IMG[:, :, 0], IMG[:, :, 1]]), "PNG"),
            lambda: np.repeat(IMG[:, :, :1], 3, axis=2))
same_pixels("palette_png", "pal.png", lambda: _palette_png(IMG), lambda: _decoded(_palette_png(IMG)))
same_pixels("bilevel_png", "bw.png", lambda: _pillow_bytes(IMG[:, :, 0] > 100, "PNG"),
            lambda: np.repeat(((IMG[:, :, :1] > 100) * 255).astype(np.uint8), 3, axis=2))
same_pixels("webp_lossless", "frame.webp", lambda: encode(IMG, ".webp", cv2.IMWRITE_WEBP_QUALITY, 101), lambda: IMG)
same_pixels("ppm", "frame.ppm", lambda: encode(IMG, ".ppm"), lambda: IMG)
same_pixels("pgm", "frame.pgm", lambda: encode(IMG[:, :, 2], ".pgm"), lambda: np.repeat(IMG[:, :, 2:], 3, axis=2))
same_pixels("gif", "frame.gif", lambda: _pillow_bytes(IMG, "GIF"), lambda: _decoded(_pillow_bytes(IMG, "GIF")))
same_pixels("jpeg2000", "frame.jp2", lambda: encode(IMG, ".jp2"), lambda: _decoded(encode(IMG, ".jp2")))
same_pixels("uncompressed_tiff", "raw.tif", lambda: raw_tiff(IMG), lambda: IMG)
# gray + an extra sample: libtiff takes the second one for alpha, as a gray + alpha PNG has
same_pixels("two_sample_tiff", "two.tif", lambda: raw_tiff(IMG[:, :, :2].copy()), lambda: np.repeat(IMG[:, :, :1], 3, axis=2))
same_pixels("float_tiff_0_1", "unit.tif", lambda: encode(FLOAT / 255, ".tif"), lambda: IMG, bit_depth=None)
same_pixels("float_tiff_0_255", "byte.tif", lambda: encode(FLOAT, ".tif"), lambda: IMG, bit_depth=None)
same_pixels("float64_tiff_0_1", "unit64.tif", lambda: encode(IMG.astype(np.float64) / 255, ".tif"), lambda: IMG, tol=1e-6, bit_depth=None)
same_pixels("float_gray_tiff", "grayf.tif", lambda: encode(FLOAT[:, :, 0] / 255, ".tif"), lambda: np.repeat(IMG[:, :, :1], 3, axis=2), bit_depth=None)
same_pixels("min_side_32", "s32.png", lambda: encode(cv2.resize(IMG, (32, 32)), ".png"), lambda: cv2.resize(IMG, (32, 32)))
same_pixels("aspect_4_allowed", "wide4.png", lambda: encode(cv2.resize(IMG, (256, 64)), ".png"), lambda: cv2.resize(IMG, (256, 64)))


def _cmyk_jpeg(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).convert("CMYK").save(buf, "JPEG")
    return buf.getvalue()


def _palette_png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).convert("P").save(buf, "PNG")
    return buf.getvalue()


# 16-bit containers holding fewer bits: read at their depth, they score as the 8-bit image does (within the
# rounding of v * (2^d - 1) / 255). Read as 16-bit they are nearly black and score differently: silent wrong.
def _deep(img: np.ndarray, bits: int) -> np.ndarray:
    return np.rint(img.astype(np.float64) * ((1 << bits) - 1) / 255).astype(np.uint16)


for _bits in (10, 12, 14, 16):
    same_pixels(f"png16_holding_{_bits}_bits", f"deep{_bits}.png", lambda b=_bits: encode(_deep(IMG, b), ".png"), lambda: IMG,
                tol=2e-3, bit_depth=_bits)
same_pixels("png16_gray_12_bits", "gray12.png", lambda: encode(_deep(IMG[:, :, 0], 12), ".png"),
            lambda: np.repeat(IMG[:, :, :1], 3, axis=2), tol=2e-3, bit_depth=12)
same_pixels("tiff16_holding_12_bits", "deep12.tif", lambda: encode(_deep(IMG, 12), ".tif"), lambda: IMG, tol=2e-3, bit_depth=12)
same_pixels("png16_12_bits_given", "given12.png", lambda: encode(_deep(IMG, 12), ".png"), lambda: IMG, tol=2e-3,
            extra=("--bit-depth", "12"), bit_depth=12)
_DARK = (IMG // 5).astype(np.uint8)  # max 48: as 12-bit data, below a quarter of the range
same_pixels("png16_dark_12_bits_with_sbit", "dark12.png", lambda: with_png_chunk(encode(_deep(_DARK, 12), ".png"), b"sBIT", b"\x0c\x0c\x0c"),
            lambda: _DARK, tol=2e-3, bit_depth=12)
same_pixels("png16_dark_12_bits_given", "dark12g.png", lambda: encode(_deep(_DARK, 12), ".png"), lambda: _DARK, tol=2e-3,
            extra=("--bit-depth", "12"), bit_depth=12)
same_pixels("png16_holding_8_bits", "deep8.png", lambda: encode(IMG.astype(np.uint16), ".png"), lambda: IMG, tol=2e-3, bit_depth=8)


# =========================================================================================================
# predict: names, links and folders
# =========================================================================================================

LATIN1 = os.fsdecode(b"pi\xe8ce_\xe9t\xe9.png")  # Latin-1 bytes from a Windows share: not valid UTF-8


def _scores_equal(o: Outcome, names: list[str]) -> None:
    recs = o.records()
    assert len(recs) == len(names), recs
    assert all(r["status"] == "ok" for r in recs), recs
    assert len({r["score"] for r in recs}) == 1, [r["score"] for r in recs]
    assert [Path(r["path"]).name for r in recs] == names, [r["path"] for r in recs]


def _named(name: str, filename: str, in_subprocess: bool = False) -> None:
    """A file with an unusual name scores exactly as the same bytes under a plain name."""

    @case("predict", name, check=lambda o: _scores_equal(o, ["plain.png", Path(os.fsencode(filename).decode("utf-8", "backslashreplace")).name]),
          in_subprocess=in_subprocess)
    def build(folder: Path, fixtures: Fixtures) -> list[str]:
        images = folder / "images"
        images.mkdir()
        (images / "plain.png").write_bytes(PNG)
        (images / filename).parent.mkdir(exist_ok=True)
        (images / filename).write_bytes(PNG)
        return _predict_argv(folder, fixtures, str(images / "plain.png"), str(images / filename))


# In a subprocess: cv2.imread given such a name segfaulted, which would take the test run down with it.
_named("latin1_name", LATIN1, in_subprocess=True)
_named("latin1_folder_name", os.fsdecode(b"caf\xe9") + "/part.png", in_subprocess=True)
_named("utf8_name", "pièce_été_检查.png")
_named("name_with_spaces_and_quotes", "part 7 'left' \"A\".png")
_named("name_with_newline", "two\nlines.png")
_named("name_with_comma_and_semicolon", "a,b;c.png")
_named("name_starting_with_dash", "-x.png")


@case("predict", "latin1_folder_with_a_bad_file_subprocess", exit_code=3, error=r"truncated JPEG", names=("\\xe9",),
      check=lambda o: (lambda s: (_ for _ in ()).throw(AssertionError(s)) if s["count"] != 2 or s["failed"] != 1 else None)(o.summary()),
      in_subprocess=True)
def _latin1_folder(folder: Path, fixtures: Fixtures) -> list[str]:
    images = _write_good(folder)
    (images / os.fsdecode(b"cass\xe9.jpg")).write_bytes(JPG[:HALF])
    return _predict_argv(folder, fixtures, str(images))


@case("predict", "dangling_symlink_in_folder", exit_code=3, error=r"dangling symlink", names=("gone.png",),
      check=lambda o: _expect_kinds(o, {"gone.png": "dangling_symlink", "good0.png": "ok", "good1.png": "ok"}))
def _dangling(folder: Path, fixtures: Fixtures) -> list[str]:
    images = _write_good(folder)
    os.symlink(folder / "nowhere.png", images / "gone.png")
    return _predict_argv(folder, fixtures, str(images))


@case("predict", "dangling_symlink_given", exit_code=3, error=r"dangling symlink", names=("gone.png",))
def _dangling_given(folder: Path, fixtures: Fixtures) -> list[str]:
    os.symlink(folder / "nowhere.png", folder / "gone.png")
    return _predict_argv(folder, fixtures, str(folder / "gone.png"))


@case("predict", "symlink_loop", exit_code=3, error=r"symlink loop", names=("loop.png",))
def _loop(folder: Path, fixtures: Fixtures) -> list[str]:
    images = _write_good(folder)
    os.symlink(images / "loop.png", images / "loop.png")
    return _predict_argv(folder, fixtures, str(images))


@case("predict", "fifo_named_png", exit_code=3, error=r"not a regular file \(a FIFO\)", names=("pipe.png",))
def _fifo(folder: Path, fixtures: Fixtures) -> list[str]:
    images = _write_good(folder)
    os.mkfifo(images / "pipe.png")  # opening it would block the run forever
    return _predict_argv(folder, fixtures, str(images))


def _expect_kinds(o: Outcome, kinds: dict[str, str]) -> None:
    recs = o.by_name()
    got = {n: (r["status"] if r["status"] == "ok" else r["kind"]) for n, r in recs.items()}
    assert got == kinds, got


@case("predict", "symlink_and_its_target", check=lambda o: (_scores_equal(o, ["a.png", "b_link.png"]),
                                                              _same_as(o, "b_link.png", "a.png")))
def _symlink_target(folder: Path, fixtures: Fixtures) -> list[str]:
    images = folder / "images"
    images.mkdir()
    (images / "a.png").write_bytes(PNG)
    os.symlink("a.png", images / "b_link.png")
    return _predict_argv(folder, fixtures, str(images))


def _same_as(o: Outcome, name: str, first: str) -> None:
    rec = o.by_name()[name]
    assert rec.get("same_file_as") and Path(rec["same_file_as"]).name == first, rec
    assert o.summary()["same_file"] >= 1


@case("predict", "two_symlinks_to_one_file", check=lambda o: _scores_equal(o, ["l1.png", "l2.png", "target.png"]))
def _two_links(folder: Path, fixtures: Fixtures) -> list[str]:
    images = folder / "images"
    images.mkdir()
    (images / "target.png").write_bytes(PNG)
    os.symlink("target.png", images / "l1.png")
    os.symlink(images / "target.png", images / "l2.png")
    return _predict_argv(folder, fixtures, str(images))


@case("predict", "hard_link", check=lambda o: (_scores_equal(o, ["a.png", "b.png"]), _same_as(o, "b.png", "a.png")))
def _hard_link(folder: Path, fixtures: Fixtures) -> list[str]:
    images = folder / "images"
    images.mkdir()
    (images / "a.png").write_bytes(PNG)
    os.link(images / "a.png", images / "b.png")
    return _predict_argv(folder, fixtures, str(images))


@case("predict", "same_file_twice", check=lambda o: _scores_equal(o, ["a.png", "a.png"]))
def _twice(folder: Path, fixtures: Fixtures) -> list[str]:
    (folder / "a.png").write_bytes(PNG)
    return _predict_argv(folder, fixtures, str(folder / "a.png"), str(folder / "a.png"))


@case("predict", "file_and_its_folder", check=lambda o: _scores_equal(o, ["a.png", "a.png"]))
def _file_and_folder(folder: Path, fixtures: Fixtures) -> list[str]:
    images = folder / "images"
    images.mkdir()
    (images / "a.png").write_bytes(PNG)
    return _predict_argv(folder, fixtures, str(images / "a.png"), str(images))


def _nested(folder: Path) -> Path:
    images = _write_good(folder)
    (images / "sub").mkdir()
    (images / "sub" / "deep.png").write_bytes(PNG)
    os.symlink(images, images / "sub" / "back")  # a link back up: followed once, not forever
    return images


@case("predict", "recursive_scan", check=lambda o: _expect_kinds(o, {"good0.png": "ok", "good1.png": "ok", "deep.png": "ok"}))
def _recursive(folder: Path, fixtures: Fixtures) -> list[str]:
    return _predict_argv(folder, fixtures, str(_nested(folder)), extra=("--recursive",))


@case("predict", "flat_scan_leaves_subfolders", check=lambda o: _expect_kinds(o, {"good0.png": "ok", "good1.png": "ok"}))
def _flat(folder: Path, fixtures: Fixtures) -> list[str]:
    return _predict_argv(folder, fixtures, str(_nested(folder)))


@case("predict", "other_files_skipped_and_counted",
      check=lambda o: (_expect_kinds(o, {"good0.png": "ok", "good1.png": "ok"}), _assert(o.summary()["skipped"] == 2, "skipped"),
                       _assert("2 file(s)" in o.stderr, o.stderr)))
def _skipped(folder: Path, fixtures: Fixtures) -> list[str]:
    images = _write_good(folder)
    (images / "notes.txt").write_text("shift 2")
    (images / "Thumbs.db").write_bytes(b"\0" * 10)
    return _predict_argv(folder, fixtures, str(images))


def _assert(condition: bool, what: Any) -> None:
    assert condition, what


@case("predict", "missing_file_among_good", exit_code=3, error=r"file or folder not found", names=("missing.png",),
      check=lambda o: _expect_kinds(o, {"good0.png": "ok", "missing.png": "missing"}))
def _missing(folder: Path, fixtures: Fixtures) -> list[str]:
    images = _write_good(folder)
    return _predict_argv(folder, fixtures, str(images / GOOD[0]), str(folder / "missing.png"))


@case("predict", "empty_folder", exit_code=3, error=r"folder holds no image files", names=("empty",))
def _empty_folder(folder: Path, fixtures: Fixtures) -> list[str]:
    (folder / "empty").mkdir()
    return _predict_argv(folder, fixtures, str(folder / "empty"))


@case("predict", "folder_of_text_files", exit_code=3, error=r"folder holds no image files", names=("docs",))
def _text_folder(folder: Path, fixtures: Fixtures) -> list[str]:
    (folder / "docs").mkdir()
    (folder / "docs" / "a.txt").write_text("x")
    return _predict_argv(folder, fixtures, str(folder / "docs"))


@case("predict", "directory_named_like_an_image", check=lambda o: _expect_kinds(o, {"good0.png": "ok", "good1.png": "ok"}))
def _dir_named_png(folder: Path, fixtures: Fixtures) -> list[str]:
    images = _write_good(folder)
    (images / "looks.png").mkdir()
    return _predict_argv(folder, fixtures, str(images))


# =========================================================================================================
# predict: folder runs
# =========================================================================================================


@case("predict", "many_good_one_half_written", exit_code=3, error=r"truncated JPEG", names=("img019z.jpg",),
      check=lambda o: (_assert(o.summary()["count"] == 40 and o.summary()["failed"] == 1, o.summary()["count"]),
                       _assert([Path(r["path"]).name for r in o.records()][20] == "img019z.jpg", "order")))
def _many_and_one(folder: Path, fixtures: Fixtures) -> list[str]:
    images = folder / "images"
    images.mkdir()
    for i in range(40):
        (images / f"img{i:03d}{'_' if i >= 20 else ''}.jpg").write_bytes(encode(texture(seed=i), ".jpg"))
    (images / "img019z.jpg").write_bytes(JPG[:HALF])  # sorts between img019.jpg and img020_.jpg
    return _predict_argv(folder, fixtures, str(images))


@case("predict", "every_bad_file_listed", exit_code=3, error=r"3 of 5 inputs could not be scored|truncated",
      check=lambda o: _expect_kinds(o, {"a.png": "truncated", "b.jpg": "not_image", "c.png": "empty", "good0.png": "ok", "good1.png": "ok"}))
def _every_bad(folder: Path, fixtures: Fixtures) -> list[str]:
    images = _write_good(folder)
    (images / "a.png").write_bytes(PNG[:100])
    (images / "b.jpg").write_bytes(b"<html></html>")
    (images / "c.png").write_bytes(b"")
    return _predict_argv(folder, fixtures, str(images))


@case("predict", "all_inputs_bad", exit_code=3, error=r"truncated",
      check=lambda o: _assert(o.summary()["count"] == 0 and o.summary()["failed"] == 2 and o.summary()["complete"], o.summary()))
def _all_bad(folder: Path, fixtures: Fixtures) -> list[str]:
    (folder / "a.png").write_bytes(PNG[:100])
    (folder / "b.png").write_bytes(PNG[:200])
    return _predict_argv(folder, fixtures, str(folder / "a.png"), str(folder / "b.png"))


def _stale(folder: Path) -> None:
    out = folder / "out"
    (out / "overlays").mkdir(parents=True)
    (out / "maps").mkdir()
    for name in ("predictions.json", "predictions.csv", "predictions.jsonl", "predictions.jsonl.partial"):
        (out / name).write_text("STALE")
    (out / "overlays" / "old.png").write_bytes(PNG)
    (out / "maps" / "old.npy").write_bytes(b"x")
    (out / "keep_me.txt").write_text("the user's")


def _nothing_stale(o: Outcome) -> None:
    for name in ("predictions.json", "predictions.csv", "predictions.jsonl", "predictions.jsonl.partial"):
        p = o.out / name
        assert not p.exists() or "STALE" not in p.read_text(), name
    assert not (o.out / "overlays" / "old.png").exists() and not (o.out / "maps" / "old.npy").exists()
    assert (o.out / "keep_me.txt").read_text() == "the user's"


@case("predict", "stale_results_removed_when_bundle_is_missing", exit_code=2, error=r"no_such_bundle", check=_nothing_stale)
def _stale_bundle(folder: Path, fixtures: Fixtures) -> list[str]:
    _stale(folder)
    (folder / "a.png").write_bytes(PNG)
    return [str(folder / "no_such_bundle"), str(folder / "a.png"), "--out", str(folder / "out")]


@case("predict", "stale_results_replaced_by_a_failed_run", exit_code=3, error=r"truncated PNG",
      check=lambda o: (_nothing_stale(o), _assert(o.summary()["failed"] == 1, "failed")))
def _stale_failed(folder: Path, fixtures: Fixtures) -> list[str]:
    _stale(folder)
    (folder / "a.png").write_bytes(PNG[:100])
    return _predict_argv(folder, fixtures, str(folder / "a.png"))


@case("predict", "overlays_and_maps_only_for_scored", exit_code=3, error=r"truncated PNG", names=("bad.png",),
      check=lambda o: (_assert(sorted(p.name for p in (o.out / "overlays").iterdir()) == ["good0.png", "good1.png"], "overlays"),
                       _assert(sorted(p.name for p in (o.out / "maps").iterdir()) == ["good0.npy", "good1.npy"], "maps"),
                       _assert(np.load(o.out / "maps" / "good0.npy").shape == (64, 80), "map shape")))
def _overlays(folder: Path, fixtures: Fixtures) -> list[str]:
    images = _write_good(folder)
    (images / "bad.png").write_bytes(PNG[:100])
    return _predict_argv(folder, fixtures, str(images), extra=("--overlays", "--maps"))


def _chunking_independent(o: Outcome) -> None:
    """40 images in one run score as each does alone (engine.predict_images on one image) : bit-identical."""
    from ssn_edge.runtime.engine import Engine
    from ssn_edge.runtime.preprocess import read_image

    engine = Engine(json.loads((o.out / "predictions.json").read_text())["bundle"], precision="fp32")
    for r in o.records()[::7]:
        assert engine.predict_image(read_image(r["path"])).score == r["score"], r["path"]


@case("predict", "folder_scores_match_single_images", check=_chunking_independent)
def _chunks(folder: Path, fixtures: Fixtures) -> list[str]:
    images = folder / "images"
    images.mkdir()
    for i in range(40):
        (images / f"i{i:02d}.png").write_bytes(encode(texture(40 + i % 50, 50 + i, seed=i), ".png"))
    return _predict_argv(folder, fixtures, str(images))


@case("predict", "mixed_bit_depths_noted",
      check=lambda o: _assert("different bit depths" in o.stderr and "--bit-depth" in o.stderr, o.stderr))
def _mixed_depths(folder: Path, fixtures: Fixtures) -> list[str]:
    (folder / "a12.png").write_bytes(encode(_deep(IMG, 12), ".png"))
    (folder / "b10.png").write_bytes(encode(_deep(_DARK, 12), ".png"))  # a dark 12-bit frame: detected as 10-bit
    return _predict_argv(folder, fixtures, str(folder / "a12.png"), str(folder / "b10.png"))


# =========================================================================================================
# predict: options and bundles
# =========================================================================================================

predict_refused("bit_depth_7", ("--bit-depth", "7"), r"Invalid value for '--bit-depth': '7' is not one of")
predict_refused("bit_depth_word", ("--bit-depth", "high"), r"Invalid value for '--bit-depth': 'high'")
predict_refused("precision_unknown", ("--precision", "int4"), r"unknown precision 'int4'; choose one of")
predict_refused("precision_absent", ("--precision", "int8_acc"), r"no int8_acc model in this bundle")
predict_refused("device_gpu_absent", ("--device", "GPU"), r"device 'GPU' is not available on this machine .*OpenVINO sees: CPU")
predict_refused("device_lowercase", ("--device", "cpu"), r"device 'cpu' is not available .*did you mean 'CPU'")
predict_refused("device_empty", ("--device", ""), r"--device is empty")
predict_refused("device_index_on_cpu", ("--device", "CPU.1"), r"device 'CPU\.1' is not available")
predict_refused("device_auto_gpu", ("--device", "AUTO:GPU"), r"device 'GPU' is not available")
predict_refused("bf16_without_native", ("--precision", "bf16", "--device", "NPU"), r"device 'NPU' is not available")


@case("predict", "out_is_a_file", exit_code=2, error=r"Invalid value for '--out'.*is a file")
def _out_file(folder: Path, fixtures: Fixtures) -> list[str]:
    (folder / "a.png").write_bytes(PNG)
    (folder / "out").write_text("x")
    return [str(fixtures.bundle), str(folder / "a.png"), "--out", str(folder / "out")]


@case("predict", "out_parent_created", check=lambda o: _assert((o.folder / "deep" / "er" / "predictions.json").is_file(), "out"))
def _out_parents(folder: Path, fixtures: Fixtures) -> list[str]:
    (folder / "a.png").write_bytes(PNG)
    return [str(fixtures.bundle), str(folder / "a.png"), "--out", str(folder / "deep" / "er"), "--precision", "fp32"]


@case("predict", "bundle_missing", exit_code=2, error=r"nobundle")
def _no_bundle(folder: Path, fixtures: Fixtures) -> list[str]:
    (folder / "a.png").write_bytes(PNG)
    return [str(folder / "nobundle"), str(folder / "a.png"), "--out", str(folder / "out")]


@case("predict", "bundle_is_an_image", exit_code=2, error=r"a\.png")
def _bundle_image(folder: Path, fixtures: Fixtures) -> list[str]:
    (folder / "a.png").write_bytes(PNG)
    return [str(folder / "a.png"), str(folder / "a.png"), "--out", str(folder / "out")]


@case("predict", "bundle_folder_without_metadata", exit_code=2, error=r"notabundle")
def _bundle_empty(folder: Path, fixtures: Fixtures) -> list[str]:
    (folder / "notabundle").mkdir()
    (folder / "a.png").write_bytes(PNG)
    return [str(folder / "notabundle"), str(folder / "a.png"), "--out", str(folder / "out")]


@case("predict", "no_images_given", exit_code=2, error=r"Missing argument 'IMAGES\.\.\.'")
def _no_images(folder: Path, fixtures: Fixtures) -> list[str]:
    return [str(fixtures.bundle)]


@case("predict", "runs_are_bit_identical",
      check=lambda o: _assert(len({r["score"] for r in o.records()}) == 1 and len(o.records()) == 3, o.records()))
def _repeat(folder: Path, fixtures: Fixtures) -> list[str]:
    for n in ("a.png", "b.png", "c.png"):
        (folder / n).write_bytes(PNG)
    return _predict_argv(folder, fixtures, str(folder / "a.png"), str(folder / "b.png"), str(folder / "c.png"))


# =========================================================================================================
# bench
# =========================================================================================================


def _bench_json(o: Outcome) -> None:
    data = json.loads((o.folder / "bench.json").read_text())
    assert [r["precision"] for r in data["results"]] == ["fp32"], data
    r = data["results"][0]
    assert r["latency_ms"] > 0 and r["macs"] > 0 and r["inference_precision"] == "f32", r


@case("bench", "minimal_run", check=_bench_json)
def _bench_ok(folder: Path, fixtures: Fixtures) -> list[str]:
    return [str(fixtures.bundle), *BENCH_FAST, "--json", str(folder / "bench.json")]


@case("bench", "precision_given_twice", check=_bench_json)
def _bench_twice(folder: Path, fixtures: Fixtures) -> list[str]:
    return [str(fixtures.bundle), *BENCH_FAST, "--precision", "fp32", "--json", str(folder / "bench.json")]


@case("bench", "json_parent_created", check=lambda o: _assert((o.folder / "a" / "b.json").is_file(), "json"))
def _bench_parent(folder: Path, fixtures: Fixtures) -> list[str]:
    return [str(fixtures.bundle), *BENCH_FAST, "--json", str(folder / "a" / "b.json")]


bench_refused("runs_zero", ("--runs", "0"), r"Invalid value for '--runs': 0 is not in the range x>=1")
bench_refused("runs_word", ("--runs", "many"), r"Invalid value for '--runs': 'many' is not a valid integer")
bench_refused("warmup_negative", ("--warmup", "-1"), r"Invalid value for '--warmup'")
bench_refused("seconds_negative", ("--seconds", "-1"), r"Invalid value for '--seconds': -1\.0 .*0 skips")
bench_refused("seconds_nan", ("--seconds", "nan"), r"Invalid value for '--seconds': nan")
bench_refused("seconds_inf", ("--seconds", "inf"), r"Invalid value for '--seconds': inf")
bench_refused("seconds_word", ("--seconds", "high"), r"Invalid value for '--seconds': 'high' is not a valid float")
bench_refused("precision_unknown", ("--precision", "int4"), r"unknown precision 'int4'")
bench_refused("precision_absent", ("--precision", "int8_acc"), r"no int8_acc model in this bundle")
bench_refused("device_gpu_absent", ("--device", "GPU"), r"device 'GPU' is not available on this machine")
bench_refused("device_lowercase", ("--device", "cpu"), r"did you mean 'CPU'")
bench_refused("device_empty", ("--device", ""), r"--device is empty")


@case("bench", "json_is_a_folder", exit_code=2, error=r"Invalid value for '--json'.*is a directory")
def _bench_json_dir(folder: Path, fixtures: Fixtures) -> list[str]:
    (folder / "out.json").mkdir()
    return [str(fixtures.bundle), *BENCH_FAST, "--json", str(folder / "out.json")]


@case("bench", "json_parent_is_a_file", exit_code=2, error=r"cannot write .*notdir")
def _bench_json_parent(folder: Path, fixtures: Fixtures) -> list[str]:
    (folder / "notdir").write_text("x")
    return [str(fixtures.bundle), *BENCH_FAST, "--json", str(folder / "notdir" / "b.json")]


@case("bench", "bundle_missing", exit_code=2, error=r"nobundle")
def _bench_no_bundle(folder: Path, fixtures: Fixtures) -> list[str]:
    return [str(folder / "nobundle"), *BENCH_FAST]


@case("bench", "bundle_is_a_file", exit_code=2, error=r"afile")
def _bench_bundle_file(folder: Path, fixtures: Fixtures) -> list[str]:
    (folder / "afile").write_text("x")
    return [str(folder / "afile"), *BENCH_FAST]


@case("bench", "bundle_model_file_missing", exit_code=2, error=r"model_fp32")
def _bench_bundle_broken(folder: Path, fixtures: Fixtures) -> list[str]:
    import shutil

    copy = folder / "bundle"
    shutil.copytree(fixtures.bundle, copy)
    (copy / "model_fp32.bin").unlink()
    return [str(copy), *BENCH_FAST]


# =========================================================================================================
# train: bad recipes, options and data (each refused in validation, before any training: nothing written)
# =========================================================================================================
# Fixtures.more: "recipe" (the tiny recipe YAML), "dataset" (the tiny MVTec-layout set), "checkpoint" (a tiny
# trained checkpoint), "exported" (a bundle exported from it).


def _recipe_copy(folder: Path, fixtures: Fixtures, edit: Callable[[dict], None] | None = None, text: str | bytes | None = None) -> Path:
    import yaml

    path = folder / "recipe.yaml"
    if text is not None:
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path
    values = yaml.safe_load(fixtures.more["recipe"].read_text())
    if edit is not None:
        edit(values)
    path.write_text(yaml.safe_dump(values))
    return path


def _nothing_trained(o: Outcome) -> None:
    assert not (o.out / "checkpoint.pt").exists() and not (o.out / "metrics.json").exists(), list(o.out.glob("*")) if o.out.exists() else []


def train_refused(name: str, argv_tail: tuple[str, ...], error: str, exit_code: int = 2,
                  edit: Callable[[dict], None] | None = None, text: str | bytes | None = None,
                  names: tuple[str, ...] = ()) -> None:
    @case("train", name, exit_code=exit_code, error=error, names=names, check=_nothing_trained)
    def build(folder: Path, fixtures: Fixtures) -> list[str]:
        recipe = _recipe_copy(folder, fixtures, edit, text)
        return ["--recipe", str(recipe), "--out", str(folder / "out"), *argv_tail]


train_refused("epochs_zero", ("--epochs", "0"), r"recipe\.yaml: train\.epochs must be >= 1, got 0")
train_refused("epochs_negative", ("--epochs", "-1"), r"train\.epochs must be >= 1, got -1")
train_refused("epochs_word", ("--epochs", "many"), r"Invalid value for '--epochs': 'many' is not a valid integer")
train_refused("epochs_fraction_set", ("--set", "train.epochs=1.5"), r"recipe key 'train\.epochs': expected an integer, got 1\.5")
train_refused("seed_negative", ("--seed", "-1"), r"recipe\.yaml: train\.seed must be >= 0, got -1")
train_refused("batch_size_zero", ("--set", "train.batch_size=0"), r"train\.batch_size must be >= 1, got 0")
train_refused("lr_word", ("--set", "train.lr_heads=high"), r"recipe key 'train\.lr_heads': expected a number, got 'high'")
train_refused("lr_negative", ("--set", "train.lr_adaptor=-1"), r"train\.lr_adaptor must be > 0, got -1")
train_refused("lr_gamma_zero", ("--set", "train.lr_gamma=0"), r"train\.lr_gamma must be in \(0, 1\], got 0")
train_refused("milestone_word", ("--set", "train.lr_milestones=[high]"), r"recipe key 'train\.lr_milestones\[0\]': expected a number")
train_refused("milestone_above_one", ("--set", "train.lr_milestones=[2]"), r"train\.lr_milestones must be fractions of the epochs")
train_refused("crop_epochs_negative", ("--set", "train.crop_epochs=-1"), r"train\.crop_epochs must be >= 0")
train_refused("feature_crop_zero", ("--set", "train.feature_crop=0"), r"train\.feature_crop must be >= 1")
train_refused("whole_map_steps_zero", ("--set", "train.whole_map_steps=0"), r"recipe\.yaml: train\.whole_map_steps must be >= 1 \(or null: every batch\), got 0")
train_refused("whole_map_steps_word", ("--set", "train.whole_map_steps=few"), r"recipe key 'train\.whole_map_steps': expected an integer, got 'few'")
train_refused("focal_gamma_negative", ("--set", "train.cls_focal_gamma=-1"), r"train\.cls_focal_gamma must be >= 0")
train_refused("precision_unknown", ("--set", "train.precision=fp8"), r"recipe key 'train\.precision': 'fp8' is not one of fp32, bf16")
train_refused("image_size_zero", ("--set", "data.image_size=[0,0]"), r"data\.image_size must be two sizes >= 32")
train_refused("image_size_one_value", ("--set", "data.image_size=[64]"), r"recipe key 'data\.image_size': expected 2 values, got 1")
train_refused("image_size_word", ("--set", "data.image_size=big"), r"recipe key 'data\.image_size': expected a list")
train_refused("seg_hidden_zero", ("--set", "model.seg_hidden=0"), r"model\.seg_hidden must be >= 1, got 0")
train_refused("cls_kernel_zero", ("--set", "model.cls_kernel=0"), r"model\.cls_kernel must be >= 1, got 0")
train_refused("cls_hidden_negative", ("--set", "model.cls_hidden=-3"), r"model\.cls_hidden must be >= 1, got -3")
train_refused("adaptor_channels_zero", ("--set", "model.adaptor_channels=0"), r"model\.adaptor_channels must be >= 1")
train_refused("cls_head_unknown", ("--set", "model.cls_head=huge"), r"recipe key 'model\.cls_head': 'huge' is not one of")
train_refused("map_gate_unknown", ("--set", "model.map_gate=maybe"), r"recipe key 'model\.map_gate': 'maybe' is not one of")
train_refused("pretrained_word", ("--set", "model.pretrained=perhaps"), r"recipe key 'model\.pretrained': expected true/false")
train_refused("noise_sigma_negative", ("--set", "noise.sigma=-1"), r"noise\.sigma must be >= 0, got -1")
train_refused("noise_smooth_zero", ("--set", "noise.smooth=0"), r"noise\.smooth must be > 0")
train_refused("perlin_threshold_two", ("--set", "noise.perlin_threshold=2"), r"noise\.perlin_threshold must be in \[0, 1\)")
train_refused("noise_kind_unknown", ("--set", "noise.kind=pink"), r"recipe key 'noise\.kind': 'pink' is not one of")
train_refused("mask_fraction_two", ("--mask-fraction", "2"), r"data\.mask_fraction must be between 0 and 1, got 2")
train_refused("mask_fraction_nan", ("--mask-fraction", "nan"), r"data\.mask_fraction must be between 0 and 1, got nan")
train_refused("mask_fraction_word", ("--set", "data.mask_fraction=high"), r"recipe key 'data\.mask_fraction': expected a number, got 'high'")
train_refused("setting_unknown", ("--setting", "semi"), r"Invalid value for '--setting'")
train_refused("tiling_stride_zero", ("--set", "tiling={tile: [32, 32], stride: [0, 0]}"), r"recipe section 'tiling': stride must be a pair of positive")
train_refused("tiling_not_multiple_of_16", ("--set", "tiling={tile: [40, 40], stride: [40, 40]}"), r"recipe section 'tiling': .*multiples of 16")
train_refused("tiling_stride_above_tile", ("--set", "tiling={tile: [32, 32], stride: [64, 64]}"), r"recipe section 'tiling': stride .* must be <= tile")
train_refused("tiling_unknown_key", ("--set", "tiling={tile: [32, 32], stride: [32, 32], overlap: 2}"), r"unknown recipe key 'tiling\.overlap'")
train_refused("knn_section_on_ssn", ("--set", "knn.pool=10"),
              r"recipe section 'knn' applies to model\.kind knn, or ssn with model\.memory_bank, only")
train_refused("override_without_value", ("--set", "train.epochs"), r"override 'train\.epochs': expected KEY=VALUE")
train_refused("override_unknown_key", ("--set", "train.speed=2"), r"unknown recipe key 'train\.speed'")
train_refused("override_unknown_section", ("--set", "optimizer.lr=2"), r"unknown recipe key 'optimizer\.lr'")
train_refused("recipe_key_moved", (), r"recipe key 'train\.masked_share' is now 'weak\.masked_share'",
              edit=lambda r: r["train"].__setitem__("masked_share", 0.5))
train_refused("recipe_key_removed", (), r"recipe key 'train\.mil_top' was removed",
              edit=lambda r: r["train"].__setitem__("mil_top", 3))
train_refused("recipe_unknown_top_key", (), r"unknown recipe key 'optimiser'", edit=lambda r: r.__setitem__("optimiser", {}))
train_refused("recipe_section_not_mapping", (), r"recipe key 'train': expected a mapping", edit=lambda r: r.__setitem__("train", 5))
train_refused("recipe_invalid_yaml", (), r"recipe\.yaml: not valid YAML", text="data: {path: [unclosed\n")
train_refused("recipe_top_level_list", (), r"a recipe must be a YAML mapping", text="- 1\n- 2\n")
train_refused("recipe_not_utf8", (), r"recipe\.yaml: ", text=b"name: \xff\xfe\x00bad\n")
train_refused("backbone_unknown", ("--set", "model.backbone=vgg11"), r"unknown backbone 'vgg11'")
train_refused("resume_missing", ("--resume", "nowhere.pt"), r"nowhere\.pt: checkpoint not found")
train_refused("weights_missing", ("--weights", "nowhere.pth", "--set", "model.pretrained=true"), r"nowhere\.pth")
train_refused("data_missing", ("--data", "no_such_data"), r"no_such_data: dataset not found")


@case("train", "recipe_missing", exit_code=2, error=r"nothere\.yaml: recipe file not found", check=_nothing_trained)
def _train_no_recipe(folder: Path, fixtures: Fixtures) -> list[str]:
    return ["--recipe", str(folder / "nothere.yaml"), "--out", str(folder / "out")]


@case("train", "recipe_is_a_folder", exit_code=2, error=r"Invalid value for '--recipe'.*is a directory", check=_nothing_trained)
def _train_recipe_dir(folder: Path, fixtures: Fixtures) -> list[str]:
    (folder / "r").mkdir()
    return ["--recipe", str(folder / "r"), "--out", str(folder / "out")]


@case("train", "out_is_a_file", exit_code=2, error=r"Invalid value for '--out'.*is a file")
def _train_out_file(folder: Path, fixtures: Fixtures) -> list[str]:
    (folder / "out").write_text("x")
    return ["--recipe", str(_recipe_copy(folder, fixtures)), "--out", str(folder / "out")]


def _train_with_data(name: str, make: Callable[[Path, Fixtures], Path], error: str) -> None:
    @case("train", name, exit_code=2, error=error, check=_nothing_trained)
    def build(folder: Path, fixtures: Fixtures) -> list[str]:
        return ["--recipe", str(_recipe_copy(folder, fixtures)), "--data", str(make(folder, fixtures)), "--out", str(folder / "out")]


def _manifest(folder: Path, text: str) -> Path:
    (folder / "a.png").write_bytes(PNG)
    (folder / "m.csv").write_text(text)
    return folder / "m.csv"


_train_with_data("data_is_a_text_file", lambda f, _x: (f / "notes.txt", (f / "notes.txt").write_text("x"))[0],
                 r"notes\.txt: unrecognised dataset layout")
_train_with_data("data_empty_folder", lambda f, _x: (f / "empty", (f / "empty").mkdir())[0], r"empty: unrecognised dataset layout")
_train_with_data("manifest_label_word", lambda f, _x: _manifest(f, "image,label,split\na.png,high,train\n"), r"m\.csv.*label")
_train_with_data("manifest_missing_column", lambda f, _x: _manifest(f, "image,label\na.png,0\n"), r"m\.csv.*split")
_train_with_data("manifest_image_missing", lambda f, _x: _manifest(f, "image,label,split\ngone.png,0,train\n"), r"gone\.png")
_train_with_data("manifest_empty", lambda f, _x: _manifest(f, ""), r"m\.csv: manifest is empty")
_train_with_data("manifest_header_only", lambda f, _x: _manifest(f, "image,label,split\n"), r"m\.csv: manifest has a header but no rows")
_train_with_data("manifest_no_train_rows", lambda f, _x: _manifest(f, "image,label,split\na.png,0,test\n"), r"split 'train' is empty in .*m\.csv")


# =========================================================================================================
# eval: bad checkpoints (unreadable, or heads that do not fit the recipe), bad data and options
# =========================================================================================================


def _bad_checkpoint(folder: Path, fixtures: Fixtures, kind: str) -> Path:
    """A checkpoint that is not one: empty, text, cut in half, or whose weights do not fit its recipe."""
    path = folder / "checkpoint.pt"
    good = fixtures.more["checkpoint"].read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "half":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "zip_bit_flip":
        path.write_bytes(good[:-100] + bytes([good[-100] ^ 0xFF]) + good[-99:])
    else:
        import dataclasses

        from ssn_edge.model.checkpoint import load_checkpoint, save_checkpoint

        record = load_checkpoint(fixtures.more["checkpoint"])
        recipe = json.loads(json.dumps(record.recipe))
        if kind == "heads_wider":  # seg_hidden 32 trained; the recipe now says 64
            recipe["model"]["seg_hidden"] = 64
        elif kind == "heads_other_kind":
            recipe["model"]["cls_head"] = "light"
        elif kind == "backbone_other":
            recipe["model"]["backbone"] = "wide_resnet50_2"
        save_checkpoint(path, dataclasses.replace(record, recipe=recipe))
    return path


BAD_CHECKPOINTS = {
    "empty": r"checkpoint\.pt: (not a readable checkpoint|checkpoint is empty)",
    "text": r"checkpoint\.pt: not a readable checkpoint",
    "half": r"checkpoint\.pt: not a readable checkpoint",
    "zip_bit_flip": r"checkpoint\.pt: ",
    "heads_wider": r"checkpoint\.pt: .*(seg_hidden|do not fit|does not fit|shape)",
    "heads_other_kind": r"checkpoint\.pt: .*(cls_head|do not fit|does not fit|missing|unexpected)",
    "backbone_other": r"checkpoint\.pt: .*(backbone|do not fit|does not fit|shape|missing)",
}

for _kind, _error in BAD_CHECKPOINTS.items():
    @case("eval", f"checkpoint_{_kind}", exit_code=2, error=_error,
          check=lambda o: _assert(not (o.folder / "metrics.json").exists(), "metrics.json written"))
    def _eval_bad_ckpt(folder: Path, fixtures: Fixtures, kind: str = _kind) -> list[str]:
        return ["--checkpoint", str(_bad_checkpoint(folder, fixtures, kind)), "--data", str(fixtures.more["dataset"])]

    @case("export", f"checkpoint_{_kind}", exit_code=2, error=_error,
          check=lambda o: _assert(not (o.folder / "bundle").exists() and not list(o.folder.glob(".bundle.*")), "bundle written"))
    def _export_bad_ckpt(folder: Path, fixtures: Fixtures, kind: str = _kind) -> list[str]:
        return ["--checkpoint", str(_bad_checkpoint(folder, fixtures, kind)), "--out", str(folder / "bundle"),
                "--data", str(fixtures.more["dataset"])]


def eval_refused(name: str, argv_tail: tuple[str, ...], error: str, exit_code: int = 2,
                 data: bool = True) -> None:
    @case("eval", name, exit_code=exit_code, error=error)
    def build(folder: Path, fixtures: Fixtures) -> list[str]:
        tail = [a.replace("{folder}", str(folder)) for a in argv_tail]
        return ["--checkpoint", str(fixtures.more["checkpoint"]), *(["--data", str(fixtures.more["dataset"])] if data else []), *tail]


eval_refused("split_unknown", ("--split", "nope"), r"unknown split 'nope'; expected one of train, val, test")
eval_refused("split_one_class", ("--split", "train"), r"only one class")
eval_refused("data_missing", ("--data", "{folder}/nothing"), r"nothing: dataset not found", data=False)
eval_refused("map_gate_unknown", ("--map-gate", "half"), r"Invalid value for '--map-gate'")
eval_refused("out_is_a_folder", ("--out", "{folder}"), r"Invalid value for '--out'.*is a directory")


@case("eval", "checkpoint_missing", exit_code=2, error=r"gone\.pt: checkpoint not found")
def _eval_missing(folder: Path, fixtures: Fixtures) -> list[str]:
    return ["--checkpoint", str(folder / "gone.pt")]


@case("eval", "data_is_a_text_file", exit_code=2, error=r"notes\.txt: unrecognised dataset layout")
def _eval_text_data(folder: Path, fixtures: Fixtures) -> list[str]:
    (folder / "notes.txt").write_text("x")
    return ["--checkpoint", str(fixtures.more["checkpoint"]), "--data", str(folder / "notes.txt")]


@case("eval", "data_with_a_corrupt_image", exit_code=2, error=r"good_0\.png|000\.png|\.png: ")
def _eval_corrupt_image(folder: Path, fixtures: Fixtures) -> list[str]:
    import shutil

    data = folder / "data"
    shutil.copytree(fixtures.more["dataset"], data)
    victim = sorted((data / "test" / "good").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:60])
    return ["--checkpoint", str(fixtures.more["checkpoint"]), "--data", str(data)]


def _eval_metrics(o: Outcome) -> None:
    metrics = json.loads((o.folder / "m.json").read_text())
    for key in ("image_auroc", "pixel_aupro"):
        assert 0.0 <= metrics[key] <= 100.0, metrics
    assert "image_auroc" in o.stdout


@case("eval", "checkpoint_evaluated", check=_eval_metrics)
def _eval_ok(folder: Path, fixtures: Fixtures) -> list[str]:
    return ["--checkpoint", str(fixtures.more["checkpoint"]), "--data", str(fixtures.more["dataset"]), "--out", str(folder / "m.json")]


# =========================================================================================================
# export: bad options (refused before any work: no bundle, no staging folder), and one that works
# =========================================================================================================


def _no_bundle(o: Outcome) -> None:
    assert not (o.folder / "bundle").exists() or (o.folder / "bundle" / "keep.txt").exists(), "bundle written"
    assert not list(o.folder.glob(".bundle.*")), "staging folder left"


def export_refused(name: str, argv_tail: tuple[str, ...], error: str, exit_code: int = 2,
                   prepare: Callable[[Path], None] | None = None) -> None:
    @case("export", name, exit_code=exit_code, error=error, check=_no_bundle)
    def build(folder: Path, fixtures: Fixtures) -> list[str]:
        if prepare is not None:
            prepare(folder)
        tail = [a.replace("{folder}", str(folder)) for a in argv_tail]
        return ["--checkpoint", str(fixtures.more["checkpoint"]), "--out", str(folder / "bundle"),
                "--data", str(fixtures.more["dataset"]), *tail]


def _existing_bundle(folder: Path) -> None:
    (folder / "bundle").mkdir()
    (folder / "bundle" / "keep.txt").write_text("x")


export_refused("out_exists", (), r"bundle: already exists .*--overwrite", prepare=_existing_bundle)
export_refused("max_drop_negative", ("--int8-acc", "--max-drop", "-1"), r"max_drop is an absolute drop in percentage points")
export_refused("max_drop_nan", ("--int8-acc", "--max-drop", "nan"), r"max_drop is an absolute drop .*nan")
export_refused("max_drop_word", ("--max-drop", "high"), r"Invalid value for '--max-drop': 'high' is not a valid float")
export_refused("acc_metric_unknown", ("--int8-acc", "--acc-metric", "f1"), r"Invalid value for '--acc-metric'")
export_refused("calibration_size_zero", ("--int8", "--calibration-size", "0"), r"calibration size must be an integer in 1\.\.1000, got 0")
export_refused("calibration_size_huge", ("--int8", "--calibration-size", "5000"), r"calibration size must be an integer in 1\.\.1000")
export_refused("calibration_size_word", ("--int8", "--calibration-size", "lots"), r"Invalid value for '--calibration-size'")
export_refused("calibration_defects_two", ("--int8", "--calibration-defects", "2"), r"calibration defects must be a fraction in \[0, 1\]")
export_refused("calibration_without_int8", ("--calibration-size", "8"), r"calibration options only apply with --int8")
export_refused("two_calibration_sources", ("--int8", "--calibration-folder", "{folder}", "--calibration-manifest", "{folder}/m.csv"),
               r"--calibration-folder and --calibration-manifest: give one calibration source")
export_refused("calibration_yaml_missing", ("--int8", "--calibration", "{folder}/cal.yaml"), r"cal\.yaml: calibration definition not found")
export_refused("calibration_yaml_unknown_key", ("--int8", "--calibration", "{folder}/cal.yaml"), r"cal\.yaml: unknown calibration key 'count'",
               prepare=lambda f: (f / "cal.yaml").write_text("count: 3\n"))
export_refused("calibration_yaml_source_unknown", ("--int8", "--calibration", "{folder}/cal.yaml"), r"cal\.yaml: calibration source 'camera'",
               prepare=lambda f: (f / "cal.yaml").write_text("source: camera\n"))
export_refused("calibration_folder_missing", ("--int8", "--calibration-folder", "{folder}/nocal"), r"nocal: calibration folder not found")
export_refused("calibration_folder_empty", ("--int8", "--calibration-folder", "{folder}/cal"), r"cal: calibration folder has no readable image",
               prepare=lambda f: (f / "cal").mkdir())
export_refused("data_missing", ("--data", "{folder}/nodata"), r"nodata: dataset not found")
export_refused("map_gate_unknown", ("--map-gate", "half"), r"Invalid value for '--map-gate'")


@case("export", "checkpoint_missing", exit_code=2, error=r"gone\.pt: checkpoint not found", check=_no_bundle)
def _export_missing(folder: Path, fixtures: Fixtures) -> list[str]:
    return ["--checkpoint", str(folder / "gone.pt"), "--out", str(folder / "bundle")]


@case("export", "out_is_a_file", exit_code=2, error=r"Invalid value for '--out'.*is a file")
def _export_out_file(folder: Path, fixtures: Fixtures) -> list[str]:
    (folder / "bundle").write_text("x")
    return ["--checkpoint", str(fixtures.more["checkpoint"]), "--out", str(folder / "bundle")]


def _exported(o: Outcome) -> None:
    import stat

    from ssn_edge.runtime.bundle import load_bundle

    bundle = load_bundle(o.folder / "bundle")
    assert bundle.sealed and bundle.precisions == ["fp32"], bundle.precisions
    for p in [bundle.path, *bundle.path.iterdir()]:
        assert stat.S_IMODE(p.stat().st_mode) in (0o755, 0o644), (p, oct(p.stat().st_mode))
    assert not list(o.folder.glob(".bundle.*")) and f"bundle: {o.folder / 'bundle'}" in o.stdout


@case("export", "fp32_export_sealed_and_readable", check=_exported)
def _export_ok(folder: Path, fixtures: Fixtures) -> list[str]:
    return ["--checkpoint", str(fixtures.more["checkpoint"]), "--out", str(folder / "bundle"), "--data", str(fixtures.more["dataset"])]


# =========================================================================================================
# report: bad bundles (hand-edited, truncated, not bundles), bad data and options
# =========================================================================================================


def _edited_bundle(folder: Path, fixtures: Fixtures, edit: Callable[[dict], None] | None, reseal: bool = True) -> Path:
    import shutil

    from ssn_edge.runtime.bundle import METADATA_DIGEST, metadata_digest

    copy = folder / "bundle"
    shutil.copytree(fixtures.more["exported"], copy)
    if edit is not None:
        meta = json.loads((copy / "metadata.json").read_text())
        edit(meta)
        if reseal and isinstance(meta, dict):
            meta[METADATA_DIGEST] = metadata_digest(meta)
        (copy / "metadata.json").write_text(json.dumps(meta))
    return copy


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        *parents, last = path.split(".")
        node = meta
        for p in parents:
            node = node[p]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return edit


_DELETE = object()


def report_refused(name: str, edit: Callable[[dict], None] | None, error: str, reseal: bool = True,
                   argv_tail: tuple[str, ...] = (), exit_code: int = 2) -> None:
    def check(o: Outcome) -> None:
        assert not (o.folder / "report" / "report.html").exists(), "report written"

    @case("report", name, exit_code=exit_code, error=error, check=check)
    def build(folder: Path, fixtures: Fixtures) -> list[str]:
        bundle = _edited_bundle(folder, fixtures, edit, reseal)
        tail = [a.replace("{folder}", str(folder)) for a in argv_tail]
        return [str(bundle), "--out", str(folder / "report"), "--runs", "1", "--seconds", "0",
                "--data", str(fixtures.more["dataset"]), *tail]


def _one_digit(meta: dict) -> None:
    meta["thresholds"]["image"] = round(meta["thresholds"]["image"] + 0.4, 6) if meta["thresholds"]["image"] < 0.6 else round(meta["thresholds"]["image"] - 0.4, 6)


report_refused("threshold_one_digit_edit", _one_digit, r"metadata\.json: the metadata was edited after export", reseal=False)
report_refused("threshold_null", _set("thresholds.image", None), r"field 'thresholds\.image' is null, expected a number")
report_refused("threshold_string", _set("thresholds.pixel", "high"), r"field 'thresholds\.pixel' is 'high' \(a str\)")
report_refused("threshold_nan", _set("thresholds.image", float("nan")), r"field 'thresholds\.image' is nan, expected a finite number")
report_refused("input_size_missing", _set("input.height", _DELETE), r"field 'input\.height' is missing")
report_refused("input_size_zero", _set("input.width", 0), r"field 'input\.width' is 0, expected at least 1")
report_refused("model_file_unlisted", _set("models.fp32.bin", "other.bin"), r"names 'other\.bin', which has no checksum")
report_refused("unknown_precision", lambda m: m["models"].__setitem__("int4", m["models"]["fp32"]), r"models\.int4.*not a precision")
report_refused("unknown_field", _set("camera", 3), r"field 'camera' is not a field of this schema version")
report_refused("schema_other", _set("schema", "other"), r"not an ssn-edge bundle")
report_refused("schema_newer", _set("schema_version", 99), r"schema version 99 was written by a newer ssn-edge")
report_refused("seconds_negative", None, r"Invalid value for '--seconds': -1\.0 is not a time window", argv_tail=("--seconds", "-1"))
report_refused("seconds_nan", None, r"Invalid value for '--seconds': nan is not a time window", argv_tail=("--seconds", "nan"))
report_refused("checkpoint_missing", None, r"gone\.pt: checkpoint not found", argv_tail=("--checkpoint", "{folder}/gone.pt"))
report_refused("runs_zero", None, r"Invalid value for '--runs': 0 is not in the range", argv_tail=("--runs", "0"))
report_refused("split_unknown", None, r"split 'nope'", argv_tail=("--split", "nope"))
report_refused("data_missing", None, r"nodata: dataset not found", argv_tail=("--data", "{folder}/nodata"))


def _report_file_broken(name: str, damage: Callable[[Path], None], error: str) -> None:
    @case("report", name, exit_code=2, error=error)
    def build(folder: Path, fixtures: Fixtures) -> list[str]:
        bundle = _edited_bundle(folder, fixtures, None)
        damage(bundle)
        return [str(bundle), "--out", str(folder / "report"), "--runs", "1", "--seconds", "0", "--data", str(fixtures.more["dataset"])]


_report_file_broken("model_bin_truncated", lambda b: (b / "model_fp32.bin").write_bytes((b / "model_fp32.bin").read_bytes()[:1000]),
                    r"model_fp32\.bin: checksum mismatch")
_report_file_broken("model_xml_missing", lambda b: (b / "model_fp32.xml").unlink(), r"model_fp32\.xml: listed in the bundle but missing")
_report_file_broken("metadata_not_json", lambda b: (b / "metadata.json").write_text("{not json"), r"metadata\.json: unreadable metadata")
_report_file_broken("metadata_a_list", lambda b: (b / "metadata.json").write_text("[1, 2]"), r"metadata\.json: not an ssn-edge bundle")
_report_file_broken("metadata_missing", lambda b: (b / "metadata.json").unlink(), r"bundle: no metadata\.json")
_report_file_broken("metadata_empty", lambda b: (b / "metadata.json").write_text(""), r"metadata\.json: unreadable metadata")
_report_file_broken("metadata_not_utf8", lambda b: (b / "metadata.json").write_bytes(b"\xff\xfe{}"), r"metadata\.json: unreadable metadata")


@case("report", "bundle_missing", exit_code=2, error=r"nobundle: bundle directory not found")
def _report_missing(folder: Path, fixtures: Fixtures) -> list[str]:
    return [str(folder / "nobundle"), "--runs", "1", "--seconds", "0"]


@case("report", "bundle_is_a_file", exit_code=2, error=r"afile: bundle directory not found")
def _report_file(folder: Path, fixtures: Fixtures) -> list[str]:
    (folder / "afile").write_text("x")
    return [str(folder / "afile"), "--runs", "1", "--seconds", "0"]


def _reported(o: Outcome) -> None:
    rows = json.loads((o.folder / "report" / "report.json").read_text())
    assert (o.folder / "report" / "report.html").stat().st_size > 1000
    fp32 = [r for r in rows if r.get("precision") == "fp32" and r.get("runtime") == "openvino"]
    assert fp32 and 0.0 <= fp32[0]["image_auroc"] <= 100.0, rows


@case("report", "exported_bundle_reported", check=_reported)
def _report_ok(folder: Path, fixtures: Fixtures) -> list[str]:
    return [str(fixtures.more["exported"]), "--out", str(folder / "report"), "--runs", "1", "--seconds", "0",
            "--data", str(fixtures.more["dataset"])]


def _trained(o: Outcome) -> None:
    assert (o.out / "checkpoint.pt").is_file() and f"checkpoint: {o.out / 'checkpoint.pt'}" in o.stdout, o.stdout[-500:]
    from ssn_edge.model.checkpoint import load_checkpoint

    record = load_checkpoint(o.out / "checkpoint.pt")
    assert record.recipe["train"]["epochs"] == 1 and record.recipe["name"] == "tiny", record.recipe


@case("train", "windows_recipe_with_bom_and_crlf_trains", check=_trained)
def _train_windows_recipe(folder: Path, fixtures: Fixtures) -> list[str]:
    """A recipe saved by Notepad (UTF-8 BOM, CRLF line ends) is the recipe it says; one epoch on the tiny set."""
    text = fixtures.more["recipe"].read_text().replace("\n", "\r\n")
    recipe = _recipe_copy(folder, fixtures, text=b"\xef\xbb\xbf" + text.encode())
    return ["--recipe", str(recipe), "--out", str(folder / "out"), "--epochs", "1"]

"""Decoding by content and the pixel rules (ssn_edge.runtime.decode, .preprocess): unit level. The same inputs
through the CLI are in the corpus (tests/corpus.py, tests/test_corpus.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import IMG, JPG, PNG, encode, fake_png, raw_tiff, texture, with_png_chunk  # noqa: E402
from conftest import shared_path  # noqa: E402

from ssn_edge.runtime.decode import ImageError, decode_file, decoder_messages, display_path, sniff  # noqa: E402
from ssn_edge.runtime import preprocess  # noqa: E402
from ssn_edge.runtime.preprocess import (  # noqa: E402
    check_geometry,
    load_image,
    open_strips,
    read_image,
    read_image_raw,
    read_mask,
    to_unit_float,
)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("fmt,ext", [("JPEG", ".jpg"), ("PNG", ".png"), ("BMP", ".bmp"), ("TIFF", ".tif"), ("WebP", ".webp"),
                                     ("PNM", ".ppm"), ("JPEG 2000", ".jp2"), ("HDR", ".hdr"), ("PFM", ".pfm")])
def test_sniff_knows_each_format_by_its_bytes(fmt, ext):
    img = IMG.astype(np.float32) / 255 if ext in (".hdr", ".pfm") else IMG
    assert sniff(encode(img, ext)[:16]) == fmt


def test_sniff_refuses_what_is_not_an_image():
    for head in (b"", b"<html>", b"\x00" * 16, b"P7 not pnm", b"BN..."):
        assert sniff(head) is None, head


def test_content_decides_not_the_name(tmp_path):
    for name in ("a.jpg", "a.bmp", "a", "a.PNG.txt"):
        pixels, info = load_image(write(tmp_path, name, PNG))
        assert info.format == "PNG" and np.array_equal(pixels, IMG), name


def test_any_bytes_in_a_file_name(tmp_path):
    name = os.fsdecode(b"caf\xe9 \xff.png")
    path = write(tmp_path, name, PNG)
    assert np.array_equal(read_image_raw(path), IMG)
    assert display_path(path).endswith("caf\\xe9 \\xff.png")
    display_path(path).encode("utf-8")  # printable and writable as it is


def test_file_problems_are_named_before_opening(tmp_path):
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling.png")
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "dir.png").mkdir()
    cases = {"dangling.png": "dangling_symlink", "pipe.png": "not_file", "dir.png": "not_file", "missing.png": "missing"}
    for name, kind in cases.items():
        with pytest.raises(ImageError) as exc:
            decode_file(tmp_path / name)
        assert exc.value.kind == kind and str(exc.value).startswith(str(tmp_path / name)), str(exc.value)


def test_trailing_bytes_are_allowed_and_change_nothing(tmp_path):
    plain = read_image_raw(write(tmp_path, "a.jpg", JPG))
    assert np.array_equal(read_image_raw(write(tmp_path, "b.jpg", JPG + b"\0" * 5000 + b"tail")), plain)
    assert np.array_equal(read_image_raw(write(tmp_path, "c.png", PNG + b"tail")), IMG)


def test_truncated_against_corrupt(tmp_path):
    half = len(JPG) // 2
    kinds = {
        "cut.jpg": (JPG[:half], "truncated"),
        "gap.jpg": (JPG[:half] + JPG[half + 200 :], "corrupt"),
        "cut.png": (PNG[:-30], "truncated"),
        "crc.png": (PNG[:50] + bytes([PNG[50] ^ 4]) + PNG[51:], "corrupt"),
        "cut.tif": (raw_tiff(IMG)[:-10], "truncated"),
    }
    for name, (data, kind) in kinds.items():
        with pytest.raises(ImageError) as exc:
            decode_file(write(tmp_path, name, data))
        assert exc.value.kind == kind, (name, str(exc.value))
        assert "\n" not in str(exc.value)


def test_decoder_warnings_become_reasons_not_console_noise(tmp_path, capfd):
    half = len(JPG) // 2
    with pytest.raises(ImageError, match=r"libjpeg: Corrupt JPEG data"):
        decode_file(write(tmp_path, "gap.jpg", JPG[:half] + bytes(len(JPG) - half - 2) + b"\xff\xd9"))
    with pytest.raises(ImageError, match="corrupt TIFF|truncated TIFF"):
        decode_file(write(tmp_path, "bad.tif", encode(IMG, ".tif")[:200]))
    assert capfd.readouterr().err == ""
    with decoder_messages() as lines:
        os.write(2, b"Corrupt JPEG data: test\n")
    assert lines == ["Corrupt JPEG data: test"]
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"  # fd 2 is back


def test_header_size_limit_allocates_nothing(tmp_path):
    with pytest.raises(ImageError, match="megapixel limit") as exc:
        decode_file(write(tmp_path, "bomb.png", fake_png(100_000, 100_000)))
    assert exc.value.kind == "too_large"


# -- bit depth ----------------------------------------------------------------------------------------------


def deep(img: np.ndarray, bits: int) -> np.ndarray:
    return np.rint(img.astype(np.float64) * ((1 << bits) - 1) / 255).astype(np.uint16)


@pytest.mark.parametrize("bits", [10, 12, 14])
def test_low_bit_content_is_detected_by_its_maximum(tmp_path, bits):
    pixels, info = load_image(write(tmp_path, "d.png", encode(deep(IMG, bits), ".png")))
    assert info.bit_depth == bits and pixels.dtype == np.uint16
    assert np.abs(to_unit_float(pixels) - IMG / 255.0).max() < 0.5 / 255  # as the 8-bit image, not black


def test_full_16_bit_reads_as_before(tmp_path):
    img16 = (np.arange(64 * 80 * 3, dtype=np.uint32).reshape(64, 80, 3) * 13 % 65536).astype(np.uint16)
    img16[0, 0, 0] = 65535
    got = read_image(write(tmp_path, "f.png", encode(img16, ".png")))
    assert np.array_equal(got, img16.astype(np.float32) / 65535.0)  # bit-identical to the old rule


def test_sbit_chunk_and_given_depth_win_over_detection(tmp_path):
    dark = deep(IMG // 5, 12)  # max 48/255 of 12 bits: the maximum alone says 10 bits
    assert load_image(write(tmp_path, "auto.png", encode(dark, ".png")))[1].bit_depth == 10
    sbit = with_png_chunk(encode(dark, ".png"), b"sBIT", b"\x0c\x0c\x0c")
    assert load_image(write(tmp_path, "sbit.png", sbit))[1].bit_depth == 12
    pixels, info = load_image(tmp_path / "auto.png", bit_depth=12)
    assert info.bit_depth == 12 and np.abs(to_unit_float(pixels) - (IMG // 5) / 255.0).max() < 0.5 / 255
    with pytest.raises(ImageError, match="does not fit the 10-bit depth given") as exc:
        load_image(write(tmp_path, "full.png", encode(deep(IMG, 16), ".png")), bit_depth=10)
    assert exc.value.kind == "bit_depth"
    with pytest.raises(ValueError, match="bit depth must be one of"):
        load_image(tmp_path / "auto.png", bit_depth=11)


def test_16_bit_scaling_is_in_place(monkeypatch, tmp_path):
    path = write(tmp_path, "d.png", encode(deep(IMG, 12), ".png"))
    decoded = []
    real = preprocess.decode_file
    monkeypatch.setattr(preprocess, "decode_file", lambda p: decoded.append(real(p)) or decoded[-1])
    pixels, _ = load_image(path)
    assert np.shares_memory(pixels, decoded[0].pixels)  # no second full-size copy of a frame


def test_eight_bit_images_ignore_the_bit_depth_option(tmp_path):
    assert load_image(write(tmp_path, "a.png", PNG), bit_depth=12)[1].bit_depth == 8


# -- floats -------------------------------------------------------------------------------------------------


def test_float_ranges(tmp_path):
    f = IMG.astype(np.float32)
    assert np.array_equal(read_image(write(tmp_path, "unit.tif", encode(f / 255, ".tif"))), (f / 255))
    assert np.array_equal(read_image(write(tmp_path, "byte.tif", encode(f, ".tif"))), IMG.astype(np.float32) / 255.0)
    assert load_image(tmp_path / "unit.tif")[1].bit_depth is None
    refused = {"neg.tif": (f / 255 - 0.5, "value_range"), "amb.tif": (f / 170, "value_range"),
               "wide.tif": (f * 16, "value_range")}
    nan = f / 255
    nan[1, 2, 0] = np.nan
    nan[3, 4, 1] = np.inf
    refused["nan.tif"] = (nan, "non_finite")
    for name, (array, kind) in refused.items():
        with pytest.raises(ImageError) as exc:
            load_image(write(tmp_path, name, encode(array, ".tif")))
        assert exc.value.kind == kind, (name, str(exc.value))
    assert "1 NaN, 1 infinite" in str(pytest.raises(ImageError, load_image, tmp_path / "nan.tif").value)


def test_rounding_overshoot_is_clipped_not_rescaled(tmp_path):
    f = IMG.astype(np.float32) / 255
    f[0, 0] = 1.0005
    got = read_image(write(tmp_path, "o.tif", encode(f, ".tif")))
    assert got.max() == 1.0 and got[1, 1, 0] == f[1, 1, 0]


def test_to_unit_float_matches_the_plain_division():
    for a, d in ((np.arange(256, dtype=np.uint8), 255.0), (np.arange(65536, dtype=np.uint16), 65535.0)):
        assert np.array_equal(to_unit_float(a), a.astype(np.float32) / d)


# -- channels, masks, sizes ---------------------------------------------------------------------------------


def test_channels(tmp_path):
    gray = read_image_raw(write(tmp_path, "g.png", encode(IMG[:, :, 0], ".png")))
    assert gray.shape == IMG.shape and (gray == IMG[:, :, :1]).all()
    rgba = np.dstack([IMG, np.zeros(IMG.shape[:2], np.uint8)])
    assert np.array_equal(read_image_raw(write(tmp_path, "a.png", encode(rgba, ".png"))), IMG)
    with pytest.raises(ImageError, match="image has 5 channels") as exc:
        read_image_raw(write(tmp_path, "five.tif", raw_tiff(np.dstack([IMG, IMG[:, :, :2]]))))
    assert exc.value.kind == "channels"
    with pytest.raises(ImageError, match="unsupported pixel type int16"):
        read_image_raw(write(tmp_path, "s.tif", encode(IMG[:, :, 0].astype(np.int16), ".tif")))


def test_masks_are_read_by_content(tmp_path):
    mask = np.zeros((20, 30), np.uint8)
    mask[5:9, 3:7] = 255
    got = read_mask(write(tmp_path, "mask.jpg", encode(mask, ".png")))
    assert got.dtype == bool and got.sum() == 16
    with pytest.raises(ImageError, match="truncated PNG"):
        read_mask(write(tmp_path, "cut.png", encode(mask, ".png")[:40]))


def test_geometry_rule():
    check_geometry((32, 32), "a", (256, 256))
    check_geometry((64, 256), "a", (256, 256))  # 4x: the limit
    check_geometry((256, 1024), "a", (256, 1024))  # the model's own aspect is no stretch
    check_geometry((32, 3000), "a", None)  # a tiled model tiles any shape
    for shape, kind in (((31, 64), "too_small"), ((1, 1), "too_small"), ((64, 257), "aspect"), ((1024, 250), "aspect")):
        with pytest.raises(ImageError) as exc:
            check_geometry(shape, "img.png", (256, 256))
        assert exc.value.kind == kind and str(exc.value).startswith("img.png: "), shape


def test_strips_by_content(tmp_path):
    frame = texture(40, 50)
    strips = open_strips(write(tmp_path, "frame.png", encode(frame, ".bmp")))
    assert strips is not None and np.array_equal(strips.rows(0, 40), frame)
    assert open_strips(write(tmp_path, "frame.bmp", PNG)) is None  # a PNG named .bmp is decoded whole


def test_real_files_decode_as_opencv_reads_them():
    """No false refusal on real camera data, and the same pixels as cv2.imread (what earlier releases used)."""
    files = sorted(shared_path("data", "magnetic_tile").rglob("*.jpg"))[:12] + sorted(shared_path("data", "mvtec_ad_512").rglob("*.png"))[:12]
    assert files
    for f in files:
        ref = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        ref = np.repeat(ref[:, :, None], 3, axis=2) if ref.ndim == 2 else cv2.cvtColor(ref, cv2.COLOR_BGR2RGB)
        assert np.array_equal(read_image_raw(f), ref), f

"""Dataset discovery and array loading (ssn_edge.data), on tiny synthetic files."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from ssn_edge.data import (
    ArraySet,
    DatasetError,
    Sample,
    load_arrays,
    load_dataset,
    load_manifest,
    load_mvtec,
    require_nonempty,
    select,
    summary,
)
from ssn_edge.runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD, ImageError

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"


def _img(path: Path, value: int = 128, shape=(8, 8, 3), dtype=np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full(shape, value, dtype=dtype))
    return path


def _mask(path: Path, shape=(8, 8), box=(2, 5, 2, 5)) -> Path:
    m = np.zeros(shape, dtype=np.uint8)
    if box is not None:
        y0, y1, x0, x1 = box
        m[y0:y1, x0:x1] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), m)
    return path


def _mvtec(root: Path) -> Path:
    for i in range(3):
        _img(root / "train" / "good" / f"{i:03d}.png")
    for i in range(2):
        _img(root / "test" / "good" / f"{i:03d}.png")
    for kind, n in (("scratch", 2), ("crack", 1)):
        for i in range(n):
            _img(root / "test" / kind / f"{i:03d}.png")
            _mask(root / "ground_truth" / kind / f"{i:03d}_mask.png")
    (root / "readme.txt").write_text("not an image")
    (root / "train" / "good" / "notes.txt").write_text("not an image either")
    return root


def _write_csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------ MVTec


def test_mvtec_layout(tmp_path):
    root = _mvtec(tmp_path / "cat")
    samples = load_mvtec(root)
    train = select(samples, "train")
    test = select(samples, "test")
    assert len(train) == 3 and all(s.label == 0 and s.mask is None for s in train)
    assert [s.image.name for s in train] == ["000.png", "001.png", "002.png"]
    assert len(test) == 5
    assert sum(s.label == 0 for s in test) == 2
    defective = [s for s in test if s.label == 1]
    assert {s.defect for s in defective} == {"scratch", "crack"}
    for s in defective:
        assert s.has_mask
        assert s.mask == root / "ground_truth" / s.defect / f"{s.image.stem}_mask.png"
    assert not any(s.has_mask for s in test if s.label == 0)
    assert select(samples, "val") == []
    assert load_mvtec(root) == samples  # deterministic


def test_mvtec_validation_split(tmp_path):
    root = _mvtec(tmp_path / "cat")
    _img(root / "validation" / "good" / "v0.png")
    _img(root / "validation" / "scratch" / "v1.png")
    _mask(root / "ground_truth" / "scratch" / "v1_mask.png")
    val = select(load_mvtec(root), "val")
    assert [(s.image.name, s.label) for s in val] == [("v0.png", 0), ("v1.png", 1)]


def test_mvtec_missing_mask_names_image(tmp_path):
    root = _mvtec(tmp_path / "cat")
    (root / "ground_truth" / "crack" / "000_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"crack[/\\]000\.png.*no mask"):
        load_mvtec(root)


# ------------------------------------------------------------------------------------------------ manifest


def test_manifest_parsing(tmp_path):
    _img(tmp_path / "imgs" / "a.png")
    _img(tmp_path / "imgs" / "b.jpg")
    _mask(tmp_path / "masks" / "b.png")
    _img(tmp_path / "imgs" / "c.png")
    csv = _write_csv(
        tmp_path / "m.csv",
        "split,extra,label,image,mask,defect\n"
        "train,x,0,imgs/a.png,,good\n"
        "test,y,1,imgs/b.jpg,masks/b.png,scratch\n"
        "val,z,1,imgs/c.png,,dent\n",
    )
    samples = load_manifest(csv)
    assert samples == [
        Sample(tmp_path / "imgs" / "a.png", None, 0, "train", "good"),
        Sample(tmp_path / "imgs" / "b.jpg", tmp_path / "masks" / "b.png", 1, "test", "scratch"),
        Sample(tmp_path / "imgs" / "c.png", None, 1, "val", "dent"),
    ]
    assert not samples[2].has_mask  # defective, image-level label only


def test_manifest_without_optional_columns(tmp_path):
    _img(tmp_path / "a.png")
    samples = load_manifest(_write_csv(tmp_path / "m.csv", "image,label,split\na.png,0,train\n"))
    assert samples == [Sample(tmp_path / "a.png", None, 0, "train", "")]


def test_manifest_bad_label_names_row(tmp_path):
    _img(tmp_path / "a.png")
    csv = _write_csv(tmp_path / "m.csv", "image,label,split\na.png,0,train\na.png,2,test\n")
    with pytest.raises(DatasetError, match=r"row 2.*label '2'"):
        load_manifest(csv)


def test_manifest_missing_column(tmp_path):
    _img(tmp_path / "a.png")
    csv = _write_csv(tmp_path / "m.csv", "image,label\na.png,0\n")
    with pytest.raises(DatasetError, match="'split' column"):
        load_manifest(csv)


def test_manifest_bad_split(tmp_path):
    _img(tmp_path / "a.png")
    csv = _write_csv(tmp_path / "m.csv", "image,label,split\na.png,0,training\n")
    with pytest.raises(DatasetError, match=r"row 1.*split 'training'"):
        load_manifest(csv)


def test_manifest_missing_image_names_row_and_path(tmp_path):
    _img(tmp_path / "a.png")
    csv = _write_csv(tmp_path / "m.csv", "image,label,split\na.png,0,train\nmissing.png,0,train\n")
    with pytest.raises(DatasetError, match=r"row 2.*missing\.png"):
        load_manifest(csv)


# ------------------------------------------------------------------------------------------------ dispatch


def test_load_dataset_dispatch(tmp_path):
    root = _mvtec(tmp_path / "cat")
    assert load_dataset(root) == load_mvtec(root)

    folder = tmp_path / "man"
    _img(folder / "a.png")
    csv = _write_csv(folder / "manifest.csv", "image,label,split\na.png,0,train\n")
    assert load_dataset(folder) == load_dataset(csv) == [Sample(folder / "a.png", None, 0, "train")]

    with pytest.raises(DatasetError, match="manifest.csv.*MVTec"):
        load_dataset(tmp_path / "man" / "a.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="unrecognised dataset layout"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "nope")


def test_empty_split_error(tmp_path):
    root = _mvtec(tmp_path / "cat")
    samples = load_dataset(root)
    assert len(require_nonempty(samples, "train", root)) == 3
    with pytest.raises(DatasetError, match=r"split 'val' is empty in .*cat"):
        require_nonempty(samples, "val", root)
    with pytest.raises(DatasetError, match="unknown split"):
        select(samples, "validation")


def test_summary_counts(tmp_path):
    p = tmp_path / "x.png"
    samples = [
        Sample(p, None, 0, "train"),
        Sample(p, None, 0, "test"),
        Sample(p, p, 1, "test"),
        Sample(p, p, 1, "test"),
        Sample(p, None, 1, "test"),
    ]
    lines = summary(samples).splitlines()
    assert lines == [
        "train: 1 images: 1 good, 0 defective with mask, 0 defective without mask",
        "test: 4 images: 1 good, 2 defective with mask, 1 defective without mask",
    ]


# ------------------------------------------------------------------------------------------------ arrays


def test_load_arrays_gray_16bit_and_masks(tmp_path, caplog):
    gray = _img(tmp_path / "gray.png", value=255, shape=(8, 8))
    deep = _img(tmp_path / "deep.png", value=65535, shape=(8, 8, 3), dtype=np.uint16)
    big = _img(tmp_path / "big.png", shape=(8, 8, 3))
    big_mask = _mask(tmp_path / "big_mask.png", shape=(16, 16), box=(0, 8, 0, 16))  # top half, 2x size
    other = _img(tmp_path / "other.png", shape=(8, 8, 3))
    other_mask = _mask(tmp_path / "other_mask.png", shape=(4, 4), box=(0, 4, 0, 2))  # left half, half size
    samples = [
        Sample(gray, None, 0, "test"),
        Sample(deep, None, 0, "test"),
        Sample(big, big_mask, 1, "test"),
        Sample(other, other_mask, 1, "test"),
        Sample(other, None, 1, "test"),
    ]
    with caplog.at_level(logging.WARNING, logger="ssn_edge"):
        arr = load_arrays(samples, (4, 4))
    assert isinstance(arr, ArraySet)
    assert arr.images.shape == (5, 3, 4, 4) and arr.images.dtype == np.float32
    assert arr.masks.shape == (5, 4, 4) and arr.masks.dtype == bool
    assert arr.labels.dtype == np.int64 and arr.labels.tolist() == [0, 0, 1, 1, 1]
    white = (1.0 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(arr.images[0], np.broadcast_to(white[:, None, None], (3, 4, 4)), rtol=1e-5)
    np.testing.assert_allclose(arr.images[1], np.broadcast_to(white[:, None, None], (3, 4, 4)), rtol=1e-5)
    expected_top = np.zeros((4, 4), bool)
    expected_top[:2] = True
    expected_left = np.zeros((4, 4), bool)
    expected_left[:, :2] = True
    np.testing.assert_array_equal(arr.masks[2], expected_top)
    np.testing.assert_array_equal(arr.masks[3], expected_left)
    assert not arr.masks[[0, 1, 4]].any()
    assert arr.mask_valid.tolist() == [True, True, True, True, False]
    assert arr.paths == [str(s.image) for s in samples]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "2 masks differ in size from their image; resized (nearest)" in warnings[0]


def test_load_arrays_all_zero_mask_is_image_label_only(tmp_path, caplog):
    a = _img(tmp_path / "a.png")
    b = _img(tmp_path / "b.png")
    za = _mask(tmp_path / "za.png", box=None)
    zb = _mask(tmp_path / "zb.png", box=None)
    good = _mask(tmp_path / "ok.png")
    samples = [Sample(a, za, 1, "test"), Sample(b, zb, 1, "test"), Sample(a, good, 1, "test")]
    with caplog.at_level(logging.WARNING, logger="ssn_edge"):
        arr = load_arrays(samples, (8, 8), progress=True)
    assert arr.mask_valid.tolist() == [False, False, True]
    assert arr.labels.tolist() == [1, 1, 1]
    assert not arr.masks[:2].any() and arr.masks[2].any()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "2 defective images have an all-zero mask" in warnings[0]
    assert "image-label-only" in warnings[0]


def test_load_arrays_defect_lost_by_resize_is_not_valid_truth(tmp_path, caplog):
    img = _img(tmp_path / "a.png", shape=(64, 64, 3))
    tiny = _mask(tmp_path / "m.png", shape=(64, 64), box=(1, 2, 1, 2))  # one pixel, off the nearest grid
    with caplog.at_level(logging.WARNING, logger="ssn_edge"):
        arr = load_arrays([Sample(img, tiny, 1, "test")], (4, 4))
    assert arr.mask_valid.tolist() == [False]
    assert any("lose every defect pixel" in r.getMessage() for r in caplog.records)


def test_truncated_jpeg_names_file(tmp_path):
    path = _img(tmp_path / "cut.jpg", shape=(32, 32, 3))
    rng = np.random.default_rng(0)
    assert cv2.imwrite(str(path), rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.jpg.*truncated"):
        load_arrays([Sample(path, None, 0, "train")], (8, 8))


def test_data_package_is_torch_free():
    code = "import sys, ssn_edge.data; sys.exit(1 if 'torch' in sys.modules else 0)"
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


# ------------------------------------------------------------------------------------------------ real data


def test_real_datasets():
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder {SHARED} is absent (real-dataset check only runs where it is mounted)")
    bottle = SHARED / "data" / "mvtec_ad_512" / "bottle"
    tile = SHARED / "data" / "magnetic_tile" / "manifest.csv"
    if not bottle.is_dir() or not tile.is_file():
        pytest.skip(f"{bottle} or {tile} is absent")

    b = load_dataset(bottle)
    assert len(select(b, "train")) == 209 and all(s.label == 0 for s in select(b, "train"))
    test = select(b, "test")
    assert sum(s.label == 0 for s in test) == 20
    assert sum(s.label == 1 and s.has_mask for s in test) == 63

    t = load_dataset(tile)
    assert len(t) == 1344
    assert all(s.has_mask == (s.label == 1) for s in t)
    uneven = sorted((s for s in t if s.defect == "uneven"), key=lambda s: s.image.name)
    assert len(uneven) == 103
    # the four uneven images whose mask is all zero: image label only, no pixel target
    zero = {"exp3_num_45042.jpg", "exp4_num_124690.jpg", "exp4_num_352527.jpg", "exp4_num_45057.jpg"}
    picked = [s for s in uneven if s.image.name in zero] + [s for s in uneven if s.image.name not in zero][:2]
    arr = load_arrays(picked, (32, 32))
    assert arr.mask_valid.tolist() == [False] * 4 + [True] * 2

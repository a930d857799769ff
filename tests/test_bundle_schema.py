"""The typed bundle metadata (ssn_edge.runtime.schema): v2 round trip, field-by-field validation, v1 migration.
No model needed: the v1 metadata files in tests/fixtures were written by ssn-edge before the typed schema."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ssn_edge.runtime.schema import (
    SCHEMA_VERSION,
    BundleError,
    BundleMetadata,
    ModelCalibration,
    Quantization,
    ValueRange,
    read_metadata,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ROOT = Path(__file__).resolve().parents[1]


def _v1(name: str) -> dict:
    return json.loads((FIXTURES / f"v1_{name}_metadata.json").read_text())


def _v2(name: str) -> dict:
    return json.loads(json.dumps(read_metadata(_v1(name), "v1").to_dict()))


def test_a_v1_plain_bundle_reads_as_v2():
    meta = read_metadata(_v1("plain"), "bundle/metadata.json")
    assert isinstance(meta, BundleMetadata) and meta.precisions == ["fp32", "int8"]
    assert meta.input.size == (64, 64) and meta.input.mean == (0.485, 0.456, 0.406)
    assert meta.input.std == (0.229, 0.224, 0.225) and meta.input.layout == "NCHW"
    assert meta.thresholds.image == pytest.approx(0.3399277627468109) and meta.thresholds.count == 10
    assert meta.thresholds.source == "test" and meta.thresholds.pixel_method == "f1_max"
    # v1's "normalization" block was the FP32 outputs' min/max: a display range, now named so
    assert meta.score_range == ValueRange(0.3399277627468109, 0.5311205983161926)
    assert meta.map_range == ValueRange(-0.4193849563598633, 0.751157820224762)
    int8 = meta.models["int8"]
    assert int8.calibration == ModelCalibration("calibration.json", 8)
    assert int8.quantization == Quantization("minmax", True, 0.04140469408594072)
    assert int8.metrics["image_auroc"] == pytest.approx(33.333333) and int8.metrics_hint == "f32"
    assert meta.calibration.spec.defects == 1.0 and meta.calibration.count == 8
    assert meta.tiling is None and meta.supervision.normal == 8
    prov = meta.provenance
    assert prov.model_kind == "ssn" and prov.backbone.name == "resnet18" and prov.backbone.random
    assert prov.setting == "unsupervised" and prov.training_data == "/work/v1ref/data" and prov.training_size == (64, 64)
    assert prov.source_checkpoint.epoch == 1 and prov.created == "2026-12-01T21:09:30+00:00"
    assert set(meta.files) == {"model_fp32.xml", "model_fp32.bin", "model_int8.xml", "model_int8.bin", "calibration.json"}


def test_a_v1_tiled_bundle_reads_as_v2():
    meta = read_metadata(_v1("tiled"), "bundle/metadata.json")
    t = meta.tiling
    assert t.config.graph == "image" and t.config.locations == 4 and t.config.image_size == (64, 64)
    assert t.heads_trained_on == "shared_backbone"
    assert meta.outputs.map.per == "tile" and meta.postprocess.per == "tile, before merging"
    assert meta.supervision is None  # the old tiled export dropped it
    assert meta.models["int8"].quantization is None  # and ignored the quantize options


def test_v2_round_trip_is_exact():
    for name in ("plain", "tiled"):
        meta = read_metadata(_v1(name), "v1")
        data = json.loads(json.dumps(meta.to_dict()))
        assert data["schema_version"] == SCHEMA_VERSION == 2
        assert read_metadata(data, "v2") == meta


def test_v1_accuracy_control_entry_is_migrated():
    v1 = _v1("plain")
    v1["models"]["int8_acc"] = {
        **copy.deepcopy(v1["models"]["int8"]), "xml": "model_int8.xml", "bin": "model_int8.bin",
        "max_drop": 0.5, "drop_type": "absolute", "metric": "image_auroc",
        "report": {"metric": "image_auroc", "data": "val", "fp32": 90.0, "int8_acc": 89.8, "drop": 0.2, "met": True,
                   "fake_quantize_ops": 12},
    }
    acc = read_metadata(v1, "v1").models["int8_acc"].accuracy_control
    assert (acc.metric, acc.max_drop, acc.data, acc.drop, acc.met, acc.fake_quantize_ops) == (
        "image_auroc", 0.5, "val", 0.2, True, 12)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize(
    "edit, field, problem",
    [
        (lambda m: m["thresholds"].__setitem__("image", None), "thresholds.image", "is null, expected a number"),
        (lambda m: m["thresholds"].__setitem__("pixel", "0.4"), "thresholds.pixel", "is '0.4' (a str), expected a number"),
        (lambda m: m["models"]["fp32"].pop("xml"), "models.fp32.xml", "is missing"),
        (lambda m: m["input"].__setitem__("height", 64.5), "input.height", "expected an integer"),
        (lambda m: m["postprocess"].__setitem__("blur_kernel", True), "postprocess.blur_kernel", "expected an integer"),
    ],
)
def test_a_bad_field_is_named_in_one_line(version, edit, field, problem):
    data = _v1("plain") if version == "v1" else _v2("plain")
    edit(data)
    with pytest.raises(BundleError) as exc:
        read_metadata(data, "line/bundle/metadata.json")
    msg = str(exc.value)
    assert msg.startswith("line/bundle/metadata.json") and f"field '{field}' " in msg and problem in msg
    assert "\n" not in msg


def test_v2_refuses_unknown_fields_and_newer_or_foreign_metadata():
    data = _v2("plain")
    data["thresholds"]["imgae"] = 0.5
    with pytest.raises(BundleError, match=r"field 'thresholds.imgae' is not a field of this schema version"):
        read_metadata(data, "m.json")
    data = _v2("plain")
    data["provenance"]["source_checkpoint"]["epoch"] = "1"
    with pytest.raises(BundleError, match=r"field 'provenance.source_checkpoint.epoch' is '1' \(a str\)"):
        read_metadata(data, "m.json")
    data = _v2("plain")
    data["models"]["int4"] = data["models"]["fp32"]
    with pytest.raises(BundleError, match=r"field 'models.int4' is not a precision"):
        read_metadata(data, "m.json")
    data = _v2("plain")
    data["files"].pop("model_int8.bin")
    with pytest.raises(BundleError, match=r"'model_int8.bin', which has no checksum"):
        read_metadata(data, "m.json")
    data["schema_version"] = 3
    with pytest.raises(BundleError, match="written by a newer ssn-edge"):
        read_metadata(data, "m.json")
    with pytest.raises(BundleError, match="not an ssn-edge bundle"):
        read_metadata({"schema": "other"}, "m.json")


CHECK = {"data": "the 4 held-out normal images and their painted copies", "images": 8, "defective": 4,
         "fp32_image_auroc": 98.0, "int8_image_auroc": 97.1, "image_auroc_diff": -0.9, "fp32_pixel_aupro": 61.0,
         "int8_pixel_aupro": 60.8, "pixel_aupro_diff": -0.2, "flips": 2, "max_score_diff": 0.03, "threshold": 0.6,
         "bound": 0.5, "within_bound": False, "message": "INT8 differs from FP32 ..."}


def test_an_int8_check_round_trips_and_a_bundle_without_one_still_loads():
    data = _v2("plain")
    assert "check" not in data["models"]["int8"]  # written only when there is one
    assert read_metadata(data, "m.json").models["int8"].check is None
    data["models"]["int8"]["check"] = dict(CHECK)
    meta = read_metadata(data, "m.json")
    check = meta.models["int8"].check
    assert (check.images, check.flips, check.within_bound, check.image_auroc_diff) == (8, 2, False, -0.9)
    assert read_metadata(json.loads(json.dumps(meta.to_dict())), "m.json") == meta
    assert "check" not in meta.to_dict()["models"]["fp32"]
    data["models"]["int8"]["check"].update(fp32_pixel_aupro=None, int8_pixel_aupro=None, pixel_aupro_diff=None)
    assert read_metadata(data, "m.json").models["int8"].check.pixel_aupro_diff is None  # no defect pixels


@pytest.mark.parametrize(
    "precision, edit, field, problem",
    [
        ("int8", lambda c: c.__setitem__("within_bound", "yes"), "within_bound", "expected true or false"),
        ("int8", lambda c: c.pop("flips"), "flips", "is missing"),
        ("int8", lambda c: c.__setitem__("int8_image_auroc", 971.0), "int8_image_auroc", "expected a percentage"),
        ("int8", lambda c: c.__setitem__("flips", 9), "images", "fewer than its defective images or flips"),
        ("fp32", lambda c: None, "check", "is an INT8 check on a fp32 model"),
    ],
)
def test_a_bad_int8_check_field_is_named(precision, edit, field, problem):
    data = _v2("plain")
    check = dict(CHECK)
    edit(check)
    data["models"][precision]["check"] = check
    with pytest.raises(BundleError) as exc:
        read_metadata(data, "m.json")
    name = f"models.{precision}" + (f".check.{field}" if field != "check" else ".check")
    assert f"field '{name}' " in str(exc.value) and problem in str(exc.value)


def test_a_tiles_graph_input_needs_its_tile_count():
    data = _v2("plain")
    data["input"]["layout"] = "NTCHW"
    with pytest.raises(BundleError, match=r"field 'input.tiles' is missing"):
        read_metadata(data, "m.json")
    data["input"]["tiles"] = 4
    assert read_metadata(data, "m.json").input.tiles == 4


def test_schema_and_report_import_without_torch():
    code = (
        "import importlib.abc, sys\n"
        "class NoTorch(importlib.abc.MetaPathFinder):  # as if torch were not installed\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "import ssn_edge.runtime.schema, ssn_edge.runtime.bundle, ssn_edge.report, ssn_edge.report.build\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]

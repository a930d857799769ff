"""One export path for plain and tiled models, the typed bundle it writes, and the runtime reading it: regression
tests for what the two old export copies got wrong, and v1 bundles (written before the typed schema) still
loading, predicting and being reported. Tiny models (64x64), seconds each."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import tiny_recipe_dict
from ssn_edge.export.calibration import CalibrationSpec
from ssn_edge.export.exporter import ExportOptions, export_bundle
from ssn_edge.export.quantize import QuantizeOptions
from ssn_edge.runtime.bundle import BundleError, load_bundle, sha256_file
from ssn_edge.runtime.preprocess import read_image

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).resolve().parent / "fixtures"
NOT_RECORDED = "not recorded (checkpoint from before ssn-edge recorded it)"


@pytest.fixture(scope="module")
def tiled_checkpoint(tiny_dataset, tmp_path_factory) -> Path:
    """A 4-location tiled ensemble with a shared backbone: the tiling of tests/fixtures/v1_tiled_metadata.json."""
    from ssn_edge.config import recipe_from_dict
    from ssn_edge.train.job import train_job

    d = tiny_recipe_dict(tiny_dataset)
    d["tiling"] = {"tile": [32, 32], "stride": [32, 32], "mode": "ensemble", "shared_backbone": True}
    return train_job(recipe_from_dict(d), tmp_path_factory.mktemp("tiled_run"), progress=False).checkpoint


@pytest.fixture(scope="module")
def tiled_bundle(tiled_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiled_export") / "bundle"
    return export_bundle(tiled_checkpoint, out, ExportOptions(int8=True, calibration=CalibrationSpec(size=4)))


@pytest.fixture(scope="module")
def plain_bundle(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain_export") / "bundle"
    return export_bundle(tiny_checkpoint, out, ExportOptions(int8=True, calibration=CalibrationSpec(size=4)))


def _test_images(data: Path) -> list[Path]:
    return sorted((data / "test").rglob("*.png"))


def _edited_copy(bundle, tmp_path: Path, edit) -> Path:
    """A copy of the bundle with metadata.json edited and resealed (its metadata_sha256 recomputed), as if an
    exporter had written those values: what the runtime's own field checks must catch."""
    from ssn_edge.runtime.bundle import METADATA_DIGEST, metadata_digest

    copy = tmp_path / f"edited_{len(list(tmp_path.iterdir()))}"
    shutil.copytree(bundle.path, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    edit(meta)
    meta[METADATA_DIGEST] = metadata_digest(meta)
    (copy / "metadata.json").write_text(json.dumps(meta))
    return copy


# --------------------------------------------------------------------------------------------------------------
# Tiled INT8 is quantized as plain INT8 is
# --------------------------------------------------------------------------------------------------------------


def _spy_quantize(monkeypatch) -> list[QuantizeOptions]:
    import ssn_edge.export.quantize as q

    seen, real = [], q.quantize
    monkeypatch.setattr(q, "quantize", lambda model, inputs, options, kind="ssn": seen.append(options) or real(model, inputs, options, kind))
    return seen


def test_tiled_int8_uses_and_records_the_quantize_options(tiled_checkpoint, tiled_bundle, tmp_path, monkeypatch):
    from ssn_edge.export.inference import compile_f32, score_logits
    from ssn_edge.runtime.tiled import graph_input

    meta = tiled_bundle.metadata
    q = meta.models["int8"].quantization
    assert q is not None and q.activation_range == "minmax" and q.score_offset and np.isfinite(q.score_offset_value)
    assert meta.calibration.spec.defects == 1.0  # as asked: not silently set to 0 for tiled models
    # the offset was taken out: INT8 tile scores centre on FP32's over the (unpainted) calibration images
    record = json.loads((tiled_bundle.path / "calibration.json").read_text())
    inputs = [graph_input(read_image(Path(record["root"]) / i["path"]), tiled_bundle.tiling) for i in record["images"]]
    fp32 = score_logits(compile_f32(tiled_bundle.model_path("fp32")), inputs)
    int8 = score_logits(compile_f32(tiled_bundle.model_path("int8")), inputs)
    assert len(fp32) == 4 * len(inputs) and abs(float(np.mean(int8.astype(np.float64) - fp32))) < 1e-4

    seen = _spy_quantize(monkeypatch)
    other = export_bundle(tiled_checkpoint, tmp_path / "nncf", ExportOptions(
        int8=True, calibration=CalibrationSpec(size=4, defects=0.0),
        quantize=QuantizeOptions(activation_range="nncf_default", score_offset=False)))
    assert [o.activation_range for o in seen] == ["nncf_default"]  # reached NNCF
    q = other.metadata.models["int8"].quantization
    assert (q.activation_range, q.score_offset, q.score_offset_value) == ("nncf_default", False, None)
    assert other.metadata.calibration.spec.defects == 0.0


def test_a_tiled_int8_bundle_is_checked_against_fp32_as_a_plain_one_is(tiled_bundle):
    """The INT8 check runs through the tiled runtime's merge: same images, same record as for a plain graph."""
    check = tiled_bundle.metadata.models["int8"].check
    assert check is not None and (check.images, check.defective) == (16, 12)  # 4 normals, 3 painted copies each
    assert 0.0 <= check.fp32_image_auroc <= 100.0 and check.pixel_aupro_diff is not None
    assert check.threshold == pytest.approx(tiled_bundle.image_threshold) and 0 <= check.flips <= 16
    assert check.image_auroc_diff == pytest.approx(check.int8_image_auroc - check.fp32_image_auroc)


def test_a_fresh_tiled_bundle_carries_its_supervision_into_the_report(tiled_checkpoint, tiled_bundle, tiny_dataset,
                                                                      tmp_path):
    from ssn_edge.model.load import load_model
    from ssn_edge.report.build import build_report
    from ssn_edge.runtime.schema import Supervision

    recorded = load_model(tiled_checkpoint).supervision
    assert recorded is not None, "the tiled checkpoint records no supervision (training side)"
    recorded = recorded if isinstance(recorded, dict) else dataclasses.asdict(recorded)
    assert tiled_bundle.metadata.supervision == Supervision(**recorded)
    report = build_report(tiled_bundle.path, data_path=str(tiny_dataset), out_dir=tmp_path / "r", runs=1,
                          throughput_seconds=0, examples=1)
    html = report.report_html.read_text()
    assert NOT_RECORDED not in html and f"{recorded['normal']} normal" in html


# --------------------------------------------------------------------------------------------------------------
# The runtime reads the fields export writes
# --------------------------------------------------------------------------------------------------------------


def test_the_normalisation_check_fires_on_a_bundle_whose_input_mean_is_wrong(plain_bundle, tiny_dataset, tmp_path):
    from cli import main
    from ssn_edge.runtime.engine import Engine

    Engine(plain_bundle, precision="fp32")  # as exported: accepted
    edited = _edited_copy(plain_bundle, tmp_path, lambda m: m["input"].__setitem__("mean", [0.5, 0.5, 0.5]))
    load_bundle(edited)  # checksums still hold: the metadata is what is wrong
    with pytest.raises(BundleError, match=r"input mean \[0.5, 0.5, 0.5\] is not the ImageNet mean") as exc:
        Engine(edited, precision="fp32")
    assert "\n" not in str(exc.value)
    result = CliRunner().invoke(main, ["predict", str(edited), str(_test_images(tiny_dataset)[0]), "--out",
                                       str(tmp_path / "p")])
    assert result.exit_code == 2 and "is not the ImageNet mean" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda m: m["thresholds"].__setitem__("image", None), "field 'thresholds.image' is null, expected a number"),
        (lambda m: m["thresholds"].__setitem__("pixel", "high"), "field 'thresholds.pixel' is 'high' (a str)"),
        (lambda m: m["models"]["int8"].pop("bin"), "field 'models.int8.bin' is missing"),
        (lambda m: m["provenance"].pop("backbone"), "field 'provenance.backbone' is missing"),
    ],
)
def test_a_bad_metadata_field_is_a_one_line_error_naming_bundle_and_field(plain_bundle, tiny_dataset, tmp_path, edit,
                                                                          expected):
    from cli import main

    edited = _edited_copy(plain_bundle, tmp_path, edit)
    with pytest.raises(BundleError) as exc:
        load_bundle(edited)
    assert str(exc.value).startswith(str(edited / "metadata.json")) and expected in str(exc.value)
    for args in (["predict", str(edited), str(_test_images(tiny_dataset)[0]), "--out", str(tmp_path / "p")],
                 ["bench", str(edited), "--runs", "1"], ["report", str(edited), "--runs", "1"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and expected in result.output, (args[0], result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert "Traceback" not in result.output and len(errors) == 1 and expected in errors[0]


# --------------------------------------------------------------------------------------------------------------
# Checks, once
# --------------------------------------------------------------------------------------------------------------


def test_export_checks_the_output_once_and_its_options_before_any_work(tiny_checkpoint, tiled_checkpoint, tmp_path,
                                                                       monkeypatch):
    import ssn_edge.export.exporter as exporter

    calls, real = [], exporter._refuse_existing
    monkeypatch.setattr(exporter, "_refuse_existing", lambda *a: calls.append(a) or real(*a))
    for name, ckpt in (("plain", tiny_checkpoint), ("tiled", tiled_checkpoint)):
        calls.clear()
        export_bundle(ckpt, tmp_path / name)
        assert len(calls) == 1, name
    with pytest.raises(ValueError, match="only applies to an INT8 export"):
        ExportOptions(calibration=CalibrationSpec())
    with pytest.raises(ValueError, match="max_drop"):
        ExportOptions(int8_acc=True, max_drop=150)
    monkeypatch.setattr(exporter, "convert", lambda *a: pytest.fail("converted before refusing"))
    with pytest.raises(ValueError, match="accuracy-controlled INT8 is not offered for tiled models"):
        export_bundle(tiled_checkpoint, tmp_path / "acc", ExportOptions(int8_acc=True))
    with pytest.raises(ValueError, match="applies to tiled checkpoints only"):
        export_bundle(tiny_checkpoint, tmp_path / "graph", ExportOptions(graph="tiles"))
    assert not (tmp_path / "acc").exists() and not (tmp_path / "graph").exists()


# --------------------------------------------------------------------------------------------------------------
# v1 bundles
# --------------------------------------------------------------------------------------------------------------


def _as_v1(bundle, fixture: str, out: Path) -> Path:
    """The bundle's files under the v1 metadata ssn-edge wrote before the typed schema, checksums recomputed."""
    import openvino as ov

    from ssn_edge.export.graph import without_postprocess

    meta = json.loads((FIXTURES / fixture).read_text())
    out.mkdir()
    for name in meta["files"]:
        shutil.copyfile(bundle.path / name, out / name)
    for name in meta["files"]:
        if name.endswith(".xml") and bundle.metadata.postprocess.in_graph:  # v1 graphs stopped at raw outputs
            raw = without_postprocess(ov.Core().read_model(bundle.path / name))
            ov.save_model(raw, out / name, compress_to_fp16=False)
    for name in meta["files"]:
        meta["files"][name] = sha256_file(out / name)
    (out / "metadata.json").write_text(json.dumps(meta, indent=2))
    return out


@pytest.mark.parametrize("kind", ["plain", "tiled"])
def test_a_v1_bundle_loads_predicts_as_v2_and_is_reported(kind, plain_bundle, tiled_bundle, tiny_dataset, tmp_path):
    from ssn_edge.report.build import build_report
    from ssn_edge.runtime.engine import Engine

    v2 = plain_bundle if kind == "plain" else tiled_bundle
    v1 = load_bundle(_as_v1(v2, f"v1_{kind}_metadata.json", tmp_path / "v1"))
    assert v1.schema_version == 1 and v1.precisions == v2.precisions == ["fp32", "int8"]
    assert v1.tiling == v2.tiling and v1.input_size == v2.input_size
    images = [read_image(p) for p in _test_images(tiny_dataset)]
    for precision in v1.precisions:
        old, new = Engine(v1, precision=precision), Engine(v2, precision=precision)
        for image in images:  # plain: the runtime's post-processing (v1) vs the graph's (v2), equal to float error
            a, b = old.predict_image(image), new.predict_image(image)
            assert a.score == pytest.approx(b.score, abs=1e-6 if kind == "plain" else 0)
            np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-5 if kind == "plain" else 0, rtol=0)
    report = build_report(v1.path, data_path=str(tiny_dataset), out_dir=tmp_path / "r", runs=1, throughput_seconds=0,
                          examples=1)
    assert [(r["runtime"], r["precision"]) for r in report.records][0] == ("openvino", "fp32")
    html = report.report_html.read_text()
    assert "ssn-edge-bundle v1 (read as v2)" in html
    assert (NOT_RECORDED in html) == (kind == "tiled")  # the old tiled export dropped it


def test_float_map_is_refused_for_a_tiled_checkpoint_before_any_output(tiled_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="--float-map keeps a plain SSN model's segmentation head in float; this is a "
                                         "tiled model"):
        export_bundle(tiled_checkpoint, tmp_path / "b", ExportOptions(int8=True, quantize=QuantizeOptions(float_map=True)))
    assert not (tmp_path / "b").exists()

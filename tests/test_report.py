"""The precision report (build_report) and the demo's weight fallback, on a tiny bundle (seconds on 2 cores)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ssn_edge.report.build import RANDOM_BACKBONE_WARNING, RECORD_KEYS, compare_scores

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, tiny_checkpoint):
    from ssn_edge.export.calibration import CalibrationSpec
    from ssn_edge.export.exporter import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("report_bundle") / "bundle"
    return export_bundle(tiny_checkpoint, out, ExportOptions(int8=True, calibration=CalibrationSpec(size=8)))


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory, tiny_bundle, tiny_checkpoint):
    from ssn_edge.report.build import build_report

    out = tmp_path_factory.mktemp("report_out") / "report"
    return build_report(tiny_bundle.path, checkpoint=tiny_checkpoint, out_dir=out, runs=2, throughput_seconds=0.05, examples=2)


def _expected_variants() -> list[tuple[str, str]]:
    from ssn_edge.runtime.engine import device_supports_bf16

    return (
        [("torch", "fp32"), ("openvino", "fp32")]
        + ([("openvino", "bf16")] if device_supports_bf16() else [])
        + [("openvino", "int8")]
    )


def test_report_json_has_one_record_per_variant(tiny_report):
    path = Path(tiny_report.report_json)
    records = json.loads(path.read_text())
    assert isinstance(records, list)
    assert [(r["runtime"], r["precision"]) for r in records] == _expected_variants()
    for r in records:
        missing = [k for k in RECORD_KEYS if k not in r]
        assert not missing, f"{r['runtime']}/{r['precision']} lacks {missing}"
        assert r["dataset"] and r["backbone"] == "resnet18" and r["setting"] == "unsupervised"
        assert r["images"] == 10
        assert 0 <= r["flips"] <= r["images"]
        assert r["flip_fraction"] == pytest.approx(r["flips"] / r["images"])
        assert 0.0 <= r["score_mean_abs_diff"] <= r["score_max_abs_diff"]
        for key in ("image_auroc", "image_ap", "pixel_aupro", "pixel_ap"):
            assert 0.0 <= r[key] <= 100.0
        assert r["latency_ms"] > 0 and r["throughput_ips"] > 0 and r["file_mb"] > 0
    hints = {r["precision"]: r["inference_precision_hint"] for r in records if r["runtime"] == "openvino"}
    assert hints["fp32"] == "f32" and hints.get("bf16", "bf16") == "bf16"
    by = {(r["runtime"], r["precision"]): r for r in records}
    # INT8 weights are ~4x smaller than FP32 ones.
    assert by[("openvino", "int8")]["file_mb"] < 0.5 * by[("openvino", "fp32")]["file_mb"]


def test_reference_is_pytorch_and_matches_itself(tiny_report):
    records = tiny_report.records
    refs = [r for r in records if r["is_reference"]]
    assert len(refs) == 1 and refs[0]["runtime"] == "torch" and refs[0]["precision"] == "fp32"
    ref = refs[0]
    assert ref["flips"] == 0 and ref["flip_fraction"] == 0.0
    assert ref["score_max_abs_diff"] == 0.0 and ref["score_mean_abs_diff"] == 0.0
    # OpenVINO FP32 at an f32 hint reproduces PyTorch FP32: same metrics, scores equal to float round-off.
    ov = next(r for r in records if (r["runtime"], r["precision"]) == ("openvino", "fp32"))
    assert ov["score_max_abs_diff"] < 1e-4 and ov["flips"] == 0
    assert ov["image_auroc"] == pytest.approx(ref["image_auroc"])
    assert ov["pixel_aupro"] == pytest.approx(ref["pixel_aupro"], abs=1e-3)


def test_report_html_is_one_self_contained_page(tiny_report):
    html_path = Path(tiny_report.report_html)
    out_dir = html_path.parent
    assert sorted(p.name for p in out_dir.iterdir()) == ["report.html", "report.json"]  # no temp files, no assets
    text = html_path.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    images = re.findall(r"<img\b[^>]*>", text)
    assert len(images) >= 4  # ROC, PR, scatter, heatmaps
    for tag in images:
        assert 'src="data:image/png;base64,' in tag, tag[:80]
    assert text.count('<img alt="ROC curves" src="data:image/png;base64,') == 1
    # nothing fetched from anywhere: no links to assets, no scripts, no stylesheets, no CSS urls
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", text, re.I)
    assert not re.search(r"<script|<link\b|<iframe|url\(|@import", text, re.I)
    assert "http" not in re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text).split("<h2>Metadata</h2>")[0]
    # summary table, every variant, metadata, the random-backbone warning (the tiny model has no pretrained weights)
    assert "<table>" in text and "OpenVINO INT8" in text
    assert RANDOM_BACKBONE_WARNING in text
    for item in ("bundle schema", "thresholds", "threshold source", "calibration set", "backbone weights", "setting",
                 "collapse check"):
        assert f"<dt>{item}</dt>" in text
    assert "8 images" in text  # calibration set size


def test_the_bundle_and_report_carry_trainings_collapse_check(tiny_bundle, tiny_report):
    """The tiny run held out 4 normal images, so training checked for a collapse: export copies the check into the
    bundle's metadata, and the report shows it (records and page) whatever it found."""
    import html

    from ssn_edge.runtime.bundle import load_bundle

    check = load_bundle(tiny_bundle.path).metadata.collapse_check
    assert check is not None and check.normal == 4 and check.message.startswith("collapse check on 4 ")
    records = json.loads(Path(tiny_report.report_json).read_text())
    assert {r["training_collapsed"] for r in records} == {check.collapsed}
    page = Path(tiny_report.report_html).read_text()
    assert html.escape(check.message) in page
    assert (f"Training&#x27;s {html.escape(check.message)}" in page) == check.collapsed  # the warning


def test_the_report_carries_exports_int8_check(tiny_bundle, tiny_report):
    """The INT8 record holds the bundle's INT8 check; the page shows it in its metadata, warning only outside the
    bound."""
    import html

    check = tiny_bundle.metadata.models["int8"].check
    assert check is not None
    for r in json.loads(Path(tiny_report.report_json).read_text()):
        if (r["runtime"], r["precision"]) == ("openvino", "int8"):
            assert (r["int8_check_images"], r["int8_check_flips"]) == (check.images, check.flips)
            assert r["int8_check_image_auroc_diff"] == pytest.approx(check.image_auroc_diff)
            assert r["int8_check_pixel_aupro_diff"] == pytest.approx(check.pixel_aupro_diff)
            assert r["int8_check_within_bound"] is check.within_bound and r["int8_check_bound"] == 0.5
        else:
            assert r["int8_check_within_bound"] is None and r["int8_check_image_auroc_diff"] is None
    page = Path(tiny_report.report_html).read_text()
    assert f"<dt>INT8 check</dt><dd>int8: {html.escape(check.message)}</dd>" in page
    assert ("Export&#x27;s INT8 check" in page) == (not check.within_bound)
    q = tiny_bundle.metadata.models["int8"].quantization
    assert (f"<dt>INT8 quantization</dt><dd>int8: {q.activation_range} activation ranges, {q.bias_correction} bias "
            f"correction, score offset {q.score_offset_value:+.4f} logits, segmentation head INT8</dd>") in page


def test_an_int8_check_outside_the_bound_is_a_page_warning(tiny_bundle, tmp_path):
    """A bundle whose export found INT8 outside the bound (edited and resealed, as such an export writes it): the
    report's page and warnings say so, with export's line."""
    import html
    import shutil

    from ssn_edge.report.build import build_report
    from ssn_edge.runtime.bundle import METADATA_DIGEST, metadata_digest

    line = "INT8 differs from FP32 on the 4 held-out normal images and their painted copies: (numbers)."
    copy = tmp_path / "outside"
    shutil.copytree(tiny_bundle.path, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    meta["models"]["int8"]["check"].update(within_bound=False, message=line)
    meta[METADATA_DIGEST] = metadata_digest(meta)
    (copy / "metadata.json").write_text(json.dumps(meta))
    report = build_report(copy, out_dir=tmp_path / "r", runs=1, throughput_seconds=0, examples=0)
    assert f"Export's INT8 check: {line}" in report.warnings
    page = Path(report.report_html).read_text()
    assert f'<p class="warning">Export&#x27;s INT8 check: {html.escape(line)}</p>' in page
    int8 = next(r for r in report.records if r["precision"] == "int8")
    assert int8["int8_check_within_bound"] is False


def test_reference_knn_adds_the_baseline_row(tiny_bundle, tmp_path):
    """--reference knn: the memory-bank model fitted on the bundle's training images, exported and scored like
    the bundle's OpenVINO FP32 row, in report.json (after the variants) and in the page; its bundle kept."""
    from ssn_edge.report.build import build_report
    from ssn_edge.runtime.bundle import load_bundle

    report = build_report(tiny_bundle.path, out_dir=tmp_path / "r", runs=2, throughput_seconds=0, examples=0,
                          reference_model="knn")
    records = json.loads(Path(report.report_json).read_text())
    assert [r.get("is_baseline", False) for r in records] == [False] * (len(records) - 1) + [True]
    base = records[-1]
    assert base["model"] == "knn" and base["precision"] == "fp32" and base["images"] == records[0]["images"]
    assert base["bank"] >= 1 and base["fit_s"] >= 0 and base["latency_ms"] > 0
    assert 0 <= base["image_auroc"] <= 100
    assert load_bundle(base["bundle"]).metadata.provenance.model_kind == "knn"
    page = Path(report.report_html).read_text()
    assert "Memory-bank baseline" in page and "knn baseline (OpenVINO fp32)" in page


def test_below_reference_names_the_metrics_more_than_half_a_point_below():
    from ssn_edge.report.reference import below_reference

    records = [{"runtime": "torch", "precision": "fp32", "image_auroc": 99.0, "pixel_aupro": 99.0},
               {"runtime": "openvino", "precision": "fp32", "image_auroc": 90.0, "pixel_aupro": 80.2}]
    assert below_reference(records, {"image_auroc": 96.0, "pixel_aupro": 80.6}) == ["image auroc 90.00 vs 96.00"]
    assert below_reference(records, {"image_auroc": 90.4, "pixel_aupro": None}) == []


def test_compare_scores_counts_decision_flips_at_the_threshold():
    ref = np.array([0.1, 0.5, 0.7, 0.49, 0.5], dtype=np.float32)
    other = np.array([0.1, 0.49, 0.7, 0.5, 0.6], dtype=np.float32)
    out = compare_scores(other, ref, threshold=0.5)  # defective: score >= 0.5
    assert out["flips"] == 2 and out["flip_fraction"] == pytest.approx(0.4)
    assert out["flipped"].tolist() == [False, True, False, True, False]
    assert out["score_max_abs_diff"] == pytest.approx(0.1, abs=1e-6)
    same = compare_scores(ref, ref, threshold=0.5)
    assert same["flips"] == 0 and same["score_max_abs_diff"] == 0.0


def test_report_refuses_a_checkpoint_the_bundle_did_not_come_from(tiny_bundle, tmp_path):
    from ssn_edge.report.build import build_report

    other = tmp_path / "other.pt"
    other.write_bytes(b"not the exported checkpoint")
    with pytest.raises(ValueError, match="not the checkpoint this bundle was exported from"):
        build_report(tiny_bundle.path, checkpoint=other, out_dir=tmp_path / "r", runs=1, throughput_seconds=0)
    assert not (tmp_path / "r").exists()


def test_report_runs_without_torch(tiny_bundle, tmp_path):
    """A factory PC has no PyTorch: the report then uses OpenVINO FP32 as the reference."""
    out = tmp_path / "r"
    code = f"""
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):  # as if torch were not installed
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"No module named {{name!r}} (blocked by the test)")
        return None

sys.meta_path.insert(0, NoTorch())
from ssn_edge.report.build import build_report
r = build_report({str(tiny_bundle.path)!r}, out_dir={str(out)!r}, runs=1, throughput_seconds=0, examples=1)
assert "torch" not in sys.modules, "torch was imported"
print(r.reference)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OpenVINO FP32" in proc.stdout
    records = json.loads((out / "report.json").read_text())
    assert {r["runtime"] for r in records} == {"openvino"}
    ref = records[0]
    assert ref["is_reference"] and ref["precision"] == "fp32"
    assert ref["flips"] == 0 and ref["score_max_abs_diff"] == 0.0
    assert records[-1]["precision"] == "int8" and records[-1]["throughput_ips"] is None


# ------------------------------------------------------------------------------------------------------------------
# demo: the weight fallback
# ------------------------------------------------------------------------------------------------------------------


def _offline_loader(monkeypatch):
    """load_backbone_weights as on an offline machine with an empty hub cache (random init still works)."""
    import ssn_edge.model.backbones as backbones

    original = backbones.load_backbone_weights
    calls = []

    def offline(name, weights=None, pretrained=True):
        calls.append((name, weights, pretrained))
        if pretrained and weights is None:
            raise backbones.WeightsNotFoundError(f"no pretrained ImageNet weights for backbone {name!r} (test: offline)")
        return original(name, weights=weights, pretrained=pretrained)

    monkeypatch.setattr(backbones, "load_backbone_weights", offline)
    return calls


def test_demo_weight_resolution(monkeypatch):
    from ssn_edge.demo.run import resolve_weights

    calls = _offline_loader(monkeypatch)
    backbone, note = resolve_weights(None)
    assert backbone == {"weights": None, "pretrained": False}
    assert note.startswith("NOTE: no pretrained ResNet18 weights found (")
    assert "RANDOM backbone" in note and "--weights FILE" in note and "test: offline" in note
    assert calls == [("resnet18", None, True)]
    # An explicit file is used as given, never replaced by a random backbone.
    backbone, note = resolve_weights("/some/resnet18.pth")
    assert backbone == {"weights": "/some/resnet18.pth", "pretrained": True} and note is None


def test_demo_falls_back_to_a_random_backbone_and_says_so(monkeypatch, tmp_path):
    from ssn_edge.demo.run import run_demo
    from ssn_edge.data.synthetic import SyntheticSpec

    _offline_loader(monkeypatch)
    lines: list[str] = []
    result = run_demo(
        tmp_path / "demo",
        epochs=1,
        spec=SyntheticSpec(size=64, n_train=8, n_test_good=4, n_test_defect_per_type=2),
        model_overrides={"seg_hidden": 32, "cls_hidden": 8},
        train_overrides={"batch_size": 4},
        runs=1,
        throughput_seconds=0,
        echo=lines.append,
        progress=False,
    )
    notes = [line for line in lines if line.startswith("NOTE: no pretrained ResNet18 weights found")]
    assert len(notes) == 2  # at the start and again in the summary
    assert result["random_backbone"] is True
    recipe = json.loads((Path(result["checkpoint"]).parent / "recipe.json").read_text())
    assert recipe["model"]["pretrained"] is False and recipe["model"]["weights"] is None
    bundle_meta = json.loads((Path(result["bundle"]) / "metadata.json").read_text())
    assert bundle_meta["provenance"]["backbone"]["weights_source"].startswith("random")
    # thresholds from normal images training never saw: its held-out ones and the validation split's
    assert bundle_meta["thresholds"]["source"] == "held_out_normal" and "'val' images" in bundle_meta["thresholds"]["data"]
    assert sorted(bundle_meta["models"]) == ["fp32", "int8"]
    assert RANDOM_BACKBONE_WARNING in Path(result["report_html"]).read_text()
    assert any(line.startswith("report:") and line.endswith("report.html") for line in lines)


def test_cli_has_report_and_demo():
    from click.testing import CliRunner

    from cli import main

    runner = CliRunner()
    for command, option in (("report", "--checkpoint"), ("demo", "--weights")):
        result = runner.invoke(main, [command, "--help"])
        assert result.exit_code == 0 and option in result.output

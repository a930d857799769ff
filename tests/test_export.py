"""Export to an OpenVINO bundle: FP32 parity with PyTorch, FP16/INT8/accuracy-controlled INT8, metadata,
calibration selection, atomicity. One shared export (fp32+fp16+int8) serves most tests; 64x64 tiny model."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from ssn_edge.export.calibration import (
    CALIBRATION_FILE,
    CalibrationError,
    CalibrationSpec,
    load_calibration_spec,
    select_calibration,
)
from ssn_edge.model.checkpoint import CheckpointError
from ssn_edge.export.exporter import ExportOptions, export_bundle
from ssn_edge.export.inference import compile_f32, infer
from ssn_edge.export.quantize import QuantizeOptions
from ssn_edge.export.thresholds import ThresholdChoice
from ssn_edge.runtime.bundle import BundleError, load_bundle, sha256_file
from ssn_edge.runtime.preprocess import prepare, read_image

REPO = Path(__file__).resolve().parents[1]
CALIB_SIZE = 4  # of the 8 tiny training images: leaves room for different seeds to differ
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def _no_leftovers(parent: Path, name: str) -> None:
    if parent.exists():
        left = [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]
        assert left == [], f"partial export left behind: {left}"


@pytest.fixture(scope="module")
def recipe(tiny_checkpoint):
    from ssn_edge.model.load import load_model

    return load_model(tiny_checkpoint).recipe


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "bundle"
    return export_bundle(
        tiny_checkpoint, out, ExportOptions(fp16=True, int8=True, calibration=CalibrationSpec(size=CALIB_SIZE, seed=0))
    )


@pytest.fixture(scope="module")
def test_arrays(tiny_dataset):
    from ssn_edge.evaluation.job import split_arrays

    return split_arrays(tiny_dataset, "test", (64, 64), progress=False)


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fp32_matches_pytorch(bundle, tiny_checkpoint, test_arrays):
    import openvino as ov

    from ssn_edge.evaluation.evaluate import predict_raw
    from ssn_edge.model.load import model_from_checkpoint

    from ssn_edge.runtime.postprocess import anomaly_map, sigmoid

    model, _, _ = model_from_checkpoint(tiny_checkpoint)
    ref_maps, ref_scores = predict_raw(model, test_arrays.images[:3])
    ref_maps, ref_scores = anomaly_map(ref_maps, (64, 64)), sigmoid(ref_scores)  # the graph post-processes itself
    compiled = ov.Core().compile_model(bundle.model_path("fp32"), "CPU", F32)
    names = [o.get_any_name() for o in compiled.outputs]
    assert names == ["anomaly_map", "pred_score", "pred_label", "pred_mask"]  # anomalib's, which model_api reads
    assert compiled.input(0).get_partial_shape().to_string() == "[1,3,64,64]"  # static by default
    for i in range(3):
        out = compiled(test_arrays.images[i : i + 1])
        m, s = out[compiled.output("anomaly_map")], out[compiled.output("pred_score")]
        assert m.shape == (1, 1, 64, 64) and s.shape == (1,)
        assert np.abs(m[0, 0] - ref_maps[i]).max() < 1e-3
        assert np.abs(s[0] - ref_scores[i]) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("anchor", ["map_max", "map_top"])
def test_anchored_light_head_exports_its_score(tiny_dataset, tmp_path, anchor):
    """model.score_anchor adds the map's max (or its top cells' mean) to the score inside the graph: the IR must
    compute the same score."""
    import openvino as ov

    from conftest import tiny_recipe_dict
    from ssn_edge.config import recipe_from_dict
    from ssn_edge.evaluation.evaluate import predict_raw
    from ssn_edge.evaluation.job import split_arrays
    from ssn_edge.train.job import train_job
    from ssn_edge.model.load import model_from_checkpoint

    d = tiny_recipe_dict(tiny_dataset)
    d["model"].update(cls_head="light", score_anchor=anchor, anchor_top=0.05)
    ckpt = train_job(recipe_from_dict(d), tmp_path / "run", progress=False).checkpoint
    b = export_bundle(ckpt, tmp_path / "bundle")
    model, _, _ = model_from_checkpoint(ckpt)
    x = split_arrays(tiny_dataset, "test", (64, 64), progress=False).images[:4]
    ref_maps, ref_scores = predict_raw(model, x)
    assert not np.allclose(ref_scores, ref_maps.reshape(len(x), -1).max(1), atol=1e-4)  # trained: fc is not zero
    from ssn_edge.runtime.postprocess import sigmoid

    compiled = ov.Core().compile_model(b.model_path("fp32"), "CPU", F32)
    scores = np.array([compiled(x[i : i + 1])["pred_score"][0] for i in range(len(x))])
    assert np.abs(scores - sigmoid(ref_scores)).max() < 1e-3
    assert b.metadata.provenance.recipe["model"]["score_anchor"] == anchor


@pytest.mark.slow
def test_fp16_present_and_smaller(bundle):
    assert bundle.precisions == ["fp32", "fp16", "int8"]
    assert bundle.metadata.models["fp16"].weights_precision == "fp16"
    fp32_bin = bundle.weights_path("fp32").stat().st_size
    fp16_bin = bundle.weights_path("fp16").stat().st_size
    assert fp16_bin < 0.6 * fp32_bin


@pytest.mark.slow
def test_int8_is_quantized(bundle, test_arrays):
    import openvino as ov

    from ssn_edge.export.inference import count_quantized_ops
    from ssn_edge.runtime.schema import ModelCalibration

    assert count_quantized_ops(bundle.model_path("fp32")) == 0
    assert count_quantized_ops(bundle.model_path("int8")) > 0
    entry = bundle.metadata.models["int8"]
    assert entry.weights_precision == "int8"
    assert entry.calibration == ModelCalibration(CALIBRATION_FILE, CALIB_SIZE)
    assert bundle.weights_path("int8").stat().st_size < 0.4 * bundle.weights_path("fp32").stat().st_size
    maps, scores = infer(ov.Core().compile_model(bundle.model_path("int8"), "CPU"), test_arrays.images)
    assert maps.shape == (len(test_arrays), 64, 64) and np.isfinite(maps).all() and np.isfinite(scores).all()


def _bias_bug_model():
    """SSN's score path in miniature: a bias-free last conv feeding the map output and a global max."""
    import torch

    class Heads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.segmentation = torch.nn.Module()
            self.segmentation.net = torch.nn.Sequential(
                torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 4, stride=4, bias=False)
            )

    class Mini(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = Heads()

        def forward(self, x):
            m = self.heads.segmentation.net(x)
            return m, m.amax(dim=(1, 2, 3))

    return Mini().eval()


def _int8_score_shift(monkeypatch, workaround: float) -> float:
    import nncf
    import openvino as ov

    import ssn_edge.export.graph as graph
    from ssn_edge.export.inference import F32_CONFIG

    monkeypatch.setattr(graph, "SEG_BIAS_WORKAROUND", workaround)
    rng = np.random.default_rng(3)
    images = rng.standard_normal((8, 3, 64, 64)).astype(np.float32)
    fp32 = graph.convert_module(_bias_bug_model(), (-1, 3, 64, 64))
    int8 = nncf.quantize(fp32, nncf.Dataset([images[i : i + 1] for i in range(8)]), subset_size=8)
    core = ov.Core()
    _, ref = infer(core.compile_model(fp32, "CPU", F32_CONFIG), images)
    _, got = infer(core.compile_model(int8, "CPU", F32_CONFIG), images)
    return float(np.abs(got - ref).mean() / (np.abs(ref).mean() + 1e-9))


@pytest.mark.slow
def test_int8_score_tracks_fp32_with_the_seg_bias_workaround(monkeypatch):
    """The exported graph gives the bias-free last segmentation conv a 1e-6 bias; INT8 scores then track FP32."""
    assert _int8_score_shift(monkeypatch, 1e-6) < 0.1


@pytest.mark.slow
def test_openvino_bias_free_conv_issue_still_present(monkeypatch):
    """Canary: OpenVINO CPU miscomputes this INT8 graph without the bias. When this fails, OpenVINO has fixed
    it and SEG_BIAS_WORKAROUND in ssn_edge/export/graph.py can go."""
    assert _int8_score_shift(monkeypatch, 0.0) > 0.3


# --------------------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_metadata_schema(bundle, tiny_checkpoint, test_arrays, tiny_dataset, recipe):
    meta = json.loads((bundle.path / "metadata.json").read_text())
    assert meta["schema"] == "ssn-edge-bundle" and meta["schema_version"] == 2
    assert meta["input"] == {
        "height": 64,
        "width": 64,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "name": "image",
        "channels": 3,
        "layout": "NCHW",
        "tiles": None,
        "color": "rgb",
        "grayscale": "replicate",
        "scale": "uint8/255, uint16/65535",
        "resize": "area when shrinking, bilinear when enlarging",
    }
    assert meta["outputs"] == {  # the graph ends in the final map (input size) and score
        "map": {"name": "anomaly_map", "stride": 1, "kind": "logits", "gate": "none", "per": None},
        "score": {"name": "pred_score", "kind": "probability", "per": None},
    }
    assert meta["postprocess"] == {"map_upsample": "bilinear", "blur_sigma": 4.0, "blur_kernel": 25, "score": "sigmoid",
                                   "per": None, "in_graph": True}
    th = meta["thresholds"]
    # Default: a 1 % false-alarm rate on the normal training images training held out (4 of the 8 tiny ones:
    # at most half), with 4 x 1 % < 1 alarm allowed: just above the highest held-out score.
    assert th["source"] == "held_out_normal" and th["method"] == "false_alarm" and th["count"] == 4
    assert th["held_out"] == 4 and th["false_alarm"] == 0.0 and th["max_false_alarm"] == 0.01
    fp32 = compile_f32(bundle.model_path("fp32"))
    _, scores = infer(fp32, test_arrays.images)
    assert isinstance(th["pixel"], float) and th["pixel_method"] == "false_alarm"
    assert meta["score_range"] == {"min": pytest.approx(float(scores.min())), "max": pytest.approx(float(scores.max()))}
    check = _check_arrays(tiny_dataset, recipe)
    _, normal = infer(fp32, check.images[check.labels == 0])
    assert len(normal) == 4 and th["image"] == pytest.approx(float(normal.max()), abs=1e-5)  # just above the highest
    assert meta["map_range"]["min"] < meta["map_range"]["max"]
    for precision, entry in meta["models"].items():
        assert {"xml", "bin", "weights_precision", "metrics", "metrics_hint"} <= set(entry)
        assert "image_auroc" in entry["metrics"] and entry["metrics_hint"] == "f32"
    assert meta["tiling"] is None
    prov = meta["provenance"]
    assert prov["model_kind"] == "ssn" and prov["created"]
    assert prov["backbone"]["name"] == "resnet18"
    assert prov["recipe"]["data"]["image_size"] == [64, 64] and prov["training_size"] == [64, 64]
    assert prov["setting"] == "unsupervised"
    assert prov["ssn_edge_version"]
    assert prov["source_checkpoint"] == {
        "name": "checkpoint.pt",
        "sha256": sha256_file(tiny_checkpoint),
        "epoch": 1,
    }
    assert meta["supervision"]["setting"] == "unsupervised" and meta["supervision"]["normal"] == 4  # 4 held out
    assert meta["calibration"]["count"] == CALIB_SIZE
    # every file is checksummed, and the checksums are right
    listed = set(meta["files"])
    on_disk = {p.name for p in bundle.path.iterdir() if p.name != "metadata.json"}
    assert listed == on_disk
    for name, digest in meta["files"].items():
        assert sha256_file(bundle.path / name) == digest


@pytest.mark.slow
def test_tampered_bundle_is_refused(bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle.path, copy)
    load_bundle(copy)
    with open(copy / "model_int8.bin", "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(copy)


@pytest.mark.slow
def test_calibration_record(bundle, tiny_dataset, recipe):
    record = json.loads((bundle.path / CALIBRATION_FILE).read_text())
    assert record["spec"] == {"source": "recipe", "path": None, "size": CALIB_SIZE, "seed": 0, "defects": 1.0}
    assert record["count"] == CALIB_SIZE == len(record["images"])
    expected = select_calibration(CalibrationSpec(size=CALIB_SIZE, seed=0), recipe)
    assert [i["path"] for i in record["images"]] == [p.relative_to(tiny_dataset).as_posix() for p in expected]
    for item in record["images"]:
        assert not Path(item["path"]).is_absolute()
        assert item["sha256"] == sha256_file(tiny_dataset / item["path"])


# --------------------------------------------------------------------------------------------------------------
# Calibration selection
# --------------------------------------------------------------------------------------------------------------


def test_calibration_is_deterministic(recipe, tiny_dataset):
    a = select_calibration(CalibrationSpec(size=CALIB_SIZE, seed=0), recipe)
    b = select_calibration(CalibrationSpec(size=CALIB_SIZE, seed=0), recipe)
    c = select_calibration(CalibrationSpec(size=CALIB_SIZE, seed=1), recipe)
    assert a == b and len(a) == CALIB_SIZE and a == sorted(a)
    assert a != c
    train_good = tiny_dataset / "train" / "good"
    assert all(p.parent == train_good for p in a + c)


def test_calibration_warnings(recipe, caplog):
    with caplog.at_level(logging.WARNING, logger="ssn_edge"):
        chosen = select_calibration(CalibrationSpec(size=500), recipe)
    assert len(chosen) == 8
    text = caplog.text
    assert "500 images asked for, only 8" in text
    assert "fewer than 32" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ssn_edge"):
        select_calibration(CalibrationSpec(size=2), recipe)
    assert "asked for" not in caplog.text and "fewer than 32" in caplog.text


def test_calibration_folder_recursive(tiny_dataset, tmp_path):
    folder = tmp_path / "parts"
    (folder / "day1").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    sources = sorted((tiny_dataset / "train" / "good").glob("*.png"))[:3]
    shutil.copy(sources[0], folder / "a.png")
    shutil.copy(sources[1], folder / "day1" / "b.png")
    shutil.copy(sources[2], folder / ".hidden" / "c.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "day1" / "broken.png").write_bytes(b"\x89PNG garbage")
    chosen = select_calibration(CalibrationSpec(source="folder", path=str(folder), size=10))
    assert chosen == [folder / "a.png", folder / "day1" / "b.png"]


def test_calibration_folder_without_images(tmp_path):
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(CalibrationError) as info:
        select_calibration(CalibrationSpec(source="folder", path=str(empty)))
    assert str(empty) in str(info.value) and "\n" not in str(info.value)
    (empty / "x.png").write_bytes(b"corrupt")
    with pytest.raises(CalibrationError, match="no readable image") as info:
        select_calibration(CalibrationSpec(source="folder", path=str(empty)))
    assert str(empty) in str(info.value) and "\n" not in str(info.value)


def test_calibration_manifest(tiny_dataset, tmp_path):
    good = sorted((tiny_dataset / "train" / "good").glob("*.png"))
    bad = sorted((tiny_dataset / "test").glob("[!g]*/*.png"))[0]
    manifest = tmp_path / "m.csv"
    rows = ["image,label,split"] + [f"{p},0,train" for p in good[:3]] + [f"{bad},1,train", f"{good[3]},0,test"]
    manifest.write_text("\n".join(rows) + "\n")
    chosen = select_calibration(CalibrationSpec(source="manifest", path=str(manifest), size=10))
    assert chosen == good[:3]


def test_calibration_spec_files(tmp_path):
    bottle = load_calibration_spec(REPO / "calibration" / "mvtec_bottle.yaml")
    assert bottle == CalibrationSpec(source="recipe", path=None, size=128, seed=0)
    folder = load_calibration_spec(REPO / "calibration" / "folder_example.yaml")
    assert folder.source == "folder" and folder.path
    assert (REPO / "calibration" / "README.md").is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: recipe\nsize: 128\nseeds: 1\n")
    with pytest.raises(CalibrationError, match="unknown calibration key 'seeds'"):
        load_calibration_spec(bad)
    for size in (0, 1001, "many"):
        with pytest.raises(CalibrationError, match="1..1000"):
            CalibrationSpec(size=size)
    with pytest.raises(CalibrationError, match="needs a path"):
        CalibrationSpec(source="folder")


# --------------------------------------------------------------------------------------------------------------
# Errors and atomicity
# --------------------------------------------------------------------------------------------------------------


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    out = tmp_path / "out" / "bundle"
    with pytest.raises(CheckpointError, match=str(bad)) as info:
        export_bundle(bad, out, ExportOptions(fp16=True, int8=True))
    assert "\n" not in str(info.value)
    assert not out.exists() and not out.parent.exists()


def test_checkpoint_from_another_version(tmp_path, tiny_checkpoint):
    import torch

    state = torch.load(tiny_checkpoint, weights_only=False)
    state["version"] = 99
    old = tmp_path / "future.pt"
    torch.save(state, old)
    with pytest.raises(CheckpointError, match="version 99"):
        export_bundle(old, tmp_path / "bundle")
    _no_leftovers(tmp_path, "bundle")


def test_existing_output_refused_early(tmp_path, monkeypatch):
    import ssn_edge.model.load

    out = tmp_path / "bundle"
    out.mkdir()
    monkeypatch.setattr(ssn_edge.model.load, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(BundleError, match="already exists"):
        export_bundle(tmp_path / "any.pt", out)
    with pytest.raises(ValueError, match="accuracy metric"):
        ExportOptions(acc_metric="f1")


@pytest.mark.slow
def test_failure_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    import ssn_edge.export.exporter as export

    def boom(*args, **kwargs):
        raise RuntimeError("quantizer crashed")

    monkeypatch.setattr(export, "quantize_int8", boom)
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError, match="quantizer crashed"):
        export.export_bundle(tiny_checkpoint, out, ExportOptions(fp16=True, int8=True, calibration=CalibrationSpec(size=2)))
    _no_leftovers(tmp_path, "bundle")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------------------
# Accuracy-controlled INT8 and the CLI
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_int8_accuracy_control(tiny_checkpoint, tmp_path):
    b = export_bundle(tiny_checkpoint, tmp_path / "acc", ExportOptions(
        int8_acc=True, calibration=CalibrationSpec(size=CALIB_SIZE), max_drop=0.5, acc_metric="image_auroc"))
    assert b.precisions == ["fp32", "int8_acc"]
    report = b.metadata.models["int8_acc"].accuracy_control
    assert report.max_drop == 0.5 and report.metric == "image_auroc" and report.drop_type == "absolute"
    # no 'val' split: the metric is held on the held-out normals and their painted copies, never on the test split
    assert report.data == "heldout_check"
    check = b.metadata.models["int8_acc"].check  # the INT8 check scores that same set
    assert check is not None and check.images == 16 and check.message.startswith("Accuracy-controlled INT8 ")
    assert report.fp32 == pytest.approx(check.fp32_image_auroc, abs=1e-3)
    assert report.fp32 != pytest.approx(b.metadata.models["fp32"].metrics["image_auroc"], abs=1e-3)  # not the test's
    assert report.drop == pytest.approx(report.fp32 - report.int8_acc)
    assert report.met == (report.drop <= 0.5)
    assert report.fake_quantize_ops >= 0
    assert (b.path / CALIBRATION_FILE).is_file()


@pytest.mark.slow
def test_the_int8_check_adds_the_defective_training_images_an_unsupervised_model_never_saw(tiny_checkpoint,
                                                                                          tiny_dataset, tmp_path):
    from ssn_edge.data import load_dataset

    samples = load_dataset(tiny_dataset)
    moved = [s for s in samples if s.split == "test" and s.label == 1][:3]  # listed as training images
    rows = ["image,label,split,mask,defect"] + [
        f"{s.image},{s.label},{'train' if s in moved else s.split},{s.mask or ''},{s.defect}" for s in samples]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    b = export_bundle(tiny_checkpoint, tmp_path / "b", ExportOptions(
        int8=True, calibration=CalibrationSpec(size=CALIB_SIZE), threshold_data=str(manifest)))
    check = b.metadata.models["int8"].check  # trained unsupervised: those 3 defects were never seen
    assert (check.images, check.defective) == (4 + 12 + 3, 12 + 3)
    assert check.data == "the 4 held-out normal images, 12 painted copies and 3 defective training images the model " \
                         "never saw"
    assert check.fp32_pixel_aupro is not None


@pytest.mark.slow
def test_int8_accuracy_control_holds_the_metric_on_a_val_split_when_there_is_one(tiny_checkpoint, tiny_dataset,
                                                                                 tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    (data / "test").rename(data / "validation")  # its masks stay in ground_truth, as MVTec AD's layout has them
    b = export_bundle(tiny_checkpoint, tmp_path / "acc", ExportOptions(
        int8_acc=True, calibration=CalibrationSpec(size=CALIB_SIZE), threshold_data=str(data)))
    report = b.metadata.models["int8_acc"].accuracy_control
    assert report.data == "val"
    assert report.fp32 == pytest.approx(b.metadata.models["fp32"].metrics["image_auroc"], abs=1e-3)  # val's metrics


def test_int8_accuracy_control_without_val_or_held_out_images_is_refused_before_any_work(tiny_dataset, tmp_path):
    from conftest import tiny_recipe_dict

    from ssn_edge.config import recipe_from_dict
    from ssn_edge.data import DatasetError
    from ssn_edge.train.job import train_job

    d = tiny_recipe_dict(tiny_dataset)
    d["data"].update(val_fraction=0.0, val_min=0)  # trained on every normal image: none left to paint
    checkpoint = train_job(recipe_from_dict(d), tmp_path / "run", progress=False, evaluate=False).checkpoint
    options = ExportOptions(int8_acc=True, calibration=CalibrationSpec(size=4),
                            thresholds=ThresholdChoice(source="test-f1"))  # thresholds need no held-out images
    with pytest.raises(DatasetError, match="never tunes on a test split"):
        export_bundle(checkpoint, tmp_path / "acc", options)
    assert not (tmp_path / "acc").exists()


@pytest.mark.slow
def test_cli_export_fp32_only(tiny_checkpoint, tmp_path):
    from click.testing import CliRunner

    from cli import main

    out = tmp_path / "cli_bundle"
    result = CliRunner().invoke(main, ["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"bundle: {out}" in result.output
    assert "fp32" in result.output and "fp16" not in result.output
    b = load_bundle(out)
    assert b.precisions == ["fp32"]
    assert not (out / CALIBRATION_FILE).exists() and b.metadata.calibration is None

    again = CliRunner().invoke(main, ["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_cli_export_passes_the_quantization_choices_through(tiny_checkpoint, tmp_path):
    from click.testing import CliRunner

    from cli import main

    out = tmp_path / "q"
    args = ["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--int8", "--calibration-size", "4"]
    result = CliRunner().invoke(main, [*args, "--bias-correction", "fast", "--float-map"])
    assert result.exit_code == 0, result.output
    q = load_bundle(out).metadata.models["int8"].quantization
    assert (q.bias_correction, q.float_map) == ("fast", True)
    bad = CliRunner().invoke(main, [*args, "--bias-correction", "none", "--overwrite"])
    assert bad.exit_code == 2 and "'none' is not one of 'full', 'fast'" in bad.output


def test_cli_calibration_options_need_int8(tiny_checkpoint, tmp_path):
    from click.testing import CliRunner

    from cli import main

    base = ["export", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "b")]
    result = CliRunner().invoke(main, base + ["--calibration-size", "10"])
    assert result.exit_code != 0 and "only apply with --int8" in result.output
    result = CliRunner().invoke(
        main, base + ["--int8", "--calibration-folder", str(tmp_path), "--calibration-manifest", "m.csv"]
    )
    assert result.exit_code != 0 and "give one calibration source" in result.output
    assert not (tmp_path / "b").exists()


# --------------------------------------------------------------------------------------------------------------
# Threshold data and thresholds (no model needed)
# --------------------------------------------------------------------------------------------------------------


def test_evaluation_split_prefers_val(tiny_dataset, tmp_path, caplog):
    from ssn_edge.data import DatasetError
    from ssn_edge.export.thresholds import evaluation_split, labelled_split

    good = sorted((tiny_dataset / "test" / "good").glob("*.png"))
    bad = sorted((tiny_dataset / "test").glob("[!g]*/*.png"))
    manifest = tmp_path / "m.csv"
    rows = ["image,label,split", f"{good[0]},0,val", f"{bad[0]},1,val", f"{good[1]},0,test", f"{bad[1]},1,test"]
    manifest.write_text("\n".join(rows) + "\n")
    split, samples = evaluation_split(manifest)
    assert split == "val" and [s.image for s in samples] == [good[0], bad[0]]
    manifest.write_text("\n".join(rows[:2] + rows[3:]) + "\n")  # val: one normal image only
    assert evaluation_split(manifest)[0] == "test"
    with pytest.raises(DatasetError, match="'val' split has no defective images"):
        labelled_split(manifest, "val")  # what --threshold-from f1 needs
    manifest.write_text("\n".join([rows[0], rows[1], rows[3]]) + "\n")  # no split with both labels
    with caplog.at_level(logging.WARNING, logger="ssn_edge"):
        assert evaluation_split(manifest) is None
    assert "no accuracy metrics" in caplog.text


def _toy_arrays(with_masks: bool):
    from ssn_edge.data import ArraySet

    n, h, w = 6, 32, 32
    labels = np.array([0, 0, 0, 1, 1, 1])
    masks = np.zeros((n, h, w), dtype=bool)
    if with_masks:
        masks[3:, 10:20, 10:20] = True
    valid = np.ones(n, dtype=bool) if with_masks else labels == 0
    arrays = ArraySet(np.zeros((n, 3, h, w), np.float32), masks, labels, valid, [str(i) for i in range(n)])
    raw = np.random.default_rng(0).normal(0, 0.1, (n, h // 4, w // 4)).astype(np.float32)
    raw[3:, 2:5, 2:5] += 3.0  # defect region at 1/4 resolution
    logits = np.array([-2.0, -1.0, 0.5, 0.2, 1.0, 2.0], dtype=np.float32)
    return arrays, raw, logits


def test_thresholds_f1_max_and_subsampling(monkeypatch):
    import ssn_edge.export.thresholds as th
    from ssn_edge.runtime.postprocess import sigmoid

    arrays, raw, logits = _toy_arrays(with_masks=True)
    pred = th.from_raw(arrays, raw, logits)
    thresholds = th.thresholds_from_predictions(arrays, pred, "val", "toy")
    score_range, map_range = th.value_ranges(pred)
    # F1 = 6/7 at the 4th score (logit 0.2); the threshold goes to the middle of the gap below it (logit -1)
    assert thresholds.image == pytest.approx((float(sigmoid(np.float32(0.2))) + float(sigmoid(np.float32(-1.0)))) / 2)
    assert thresholds.pixel_method == "f1_max"
    assert (thresholds.source, thresholds.data, thresholds.count) == ("val", "toy", 6)
    assert (score_range.min, score_range.max) == (pytest.approx(float(sigmoid(-2.0))), pytest.approx(float(sigmoid(2.0))))
    assert map_range.min < thresholds.pixel < map_range.max
    monkeypatch.setattr(th, "MAX_THRESHOLD_PIXELS", 1000)  # 6*32*32 = 6144 pixels: subsampled
    again = th.thresholds_from_predictions(arrays, pred)
    assert again == th.thresholds_from_predictions(arrays, pred)  # deterministic
    assert again.pixel == pytest.approx(thresholds.pixel, abs=0.5)


def test_a_threshold_on_the_lowest_score_moves_below_it():
    from ssn_edge.evaluation.metrics import gap_threshold

    scores = np.array([0.3, 0.5, 0.4], dtype=np.float32)
    t = gap_threshold(scores, float(scores.min()))
    assert t == pytest.approx(float(scores[0]) - 0.05, abs=1e-6)  # half the gap above it
    assert ((scores >= t) == (scores >= scores.min())).all() and (scores + 1e-6 >= t).all()
    assert gap_threshold(np.array([0.3]), 0.3) < 0.3


def test_pixel_threshold_without_masks(caplog):
    from ssn_edge.export.thresholds import from_raw, thresholds_from_predictions
    from ssn_edge.runtime.postprocess import anomaly_map

    arrays, raw, logits = _toy_arrays(with_masks=False)
    with caplog.at_level(logging.WARNING, logger="ssn_edge"):
        thresholds = thresholds_from_predictions(arrays, from_raw(arrays, raw, logits))
    assert thresholds.pixel_method == "normal_max" and "no defect masks" in caplog.text
    normal_max = anomaly_map(raw[:3], (32, 32)).max()
    assert normal_max < thresholds.pixel < normal_max + 1e-5


def test_decision_agreement_metric_counts_flips_at_the_threshold():
    from ssn_edge.export.accuracy import metric_value

    arrays, raw, logits = _toy_arrays(with_masks=True)
    threshold = 0.5
    reference = 1 / (1 + np.exp(-logits)) >= threshold  # FP32 decisions
    idx = np.arange(len(arrays))
    assert metric_value("decision_agreement", arrays, idx, raw, logits, (reference, threshold)) == 100.0
    moved = logits.copy()
    moved[3] = -0.2  # one image crosses the threshold
    assert metric_value("decision_agreement", arrays, idx, raw, moved, (reference, threshold)) == pytest.approx(100 * 5 / 6)
    with pytest.raises(ValueError, match="FP32 decisions"):
        metric_value("decision_agreement", arrays, idx, raw, logits)



def test_calibration_inputs_paint_defects_deterministically(tmp_path, tiny_dataset):
    from ssn_edge.export.calibration import CalibrationSpec, CalibrationError, select_calibration
    from ssn_edge.export.quantize import calibration_inputs

    images = select_calibration(CalibrationSpec(source="folder", path=str(tiny_dataset / "train" / "good"), size=6))
    to_input = lambda image: prepare(image, (64, 64))[None]  # noqa: E731
    plain = calibration_inputs(images, to_input, defects=0.0)
    painted = calibration_inputs(images, to_input, defects=1.0, seed=3)
    again = calibration_inputs(images, to_input, defects=1.0, seed=3)
    assert all(p.shape == (1, 3, 64, 64) for p in painted)
    assert all(np.array_equal(a, b) for a, b in zip(painted, again))
    changed = [float(np.abs(a - b).max()) for a, b in zip(plain, painted)]
    assert min(changed) > 0.5  # every image got a visible defect (normalised units)
    for p, img in zip(plain, images):
        assert np.array_equal(p[0], prepare(read_image(img), (64, 64)))
    with pytest.raises(CalibrationError, match="defects"):
        CalibrationSpec(defects=1.5)


def test_score_offset_is_subtracted_inside_the_graph_and_keeps_output_names():
    import openvino as ov
    import openvino.opset13 as ops

    from ssn_edge.export.quantize import subtract_from_score

    x = ops.parameter([1, 3, 4, 4], np.float32, name="image")
    m = ops.reduce_mean(x, [1], keep_dims=True)
    s = ops.reduce_mean(x, [1, 2, 3], keep_dims=False)
    m.output(0).get_tensor().set_names({"map"})
    s.output(0).get_tensor().set_names({"score"})
    model = ov.Model([ops.result(m), ops.result(s)], [x])
    shifted = subtract_from_score(model, 0.25)
    c = ov.Core().compile_model(shifted, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    data = np.random.default_rng(0).normal(size=(1, 3, 4, 4)).astype(np.float32)
    out = c({0: data})
    assert np.allclose(out[c.output("score")], data.mean() - 0.25, atol=1e-6)
    assert np.allclose(out[c.output("map")], data.mean(axis=1, keepdims=True), atol=1e-6)


def test_int8_export_records_quantization_and_centres_its_score_on_the_calibration_images(tmp_path, tiny_checkpoint):
    from ssn_edge.export.calibration import CalibrationSpec, select_calibration
    from ssn_edge.export.quantize import calibration_inputs
    from ssn_edge.model.load import load_model

    spec = CalibrationSpec(source="recipe", size=8)
    # fast bias correction leaves the larger shift to take out (full correction already removes most of it)
    bundle = export_bundle(tiny_checkpoint, tmp_path / "b", ExportOptions(
        int8=True, calibration=spec, quantize=QuantizeOptions(bias_correction="fast")))
    q = bundle.metadata.models["int8"].quantization
    assert q.activation_range == "minmax" and q.score_offset and np.isfinite(q.score_offset_value)
    assert bundle.metadata.calibration.spec.defects == 1.0
    recipe = load_model(tiny_checkpoint).recipe
    batch = np.concatenate(calibration_inputs(select_calibration(spec, recipe), lambda im: prepare(im, (64, 64))[None]))
    fp32 = infer(compile_f32(tmp_path / "b" / "model_fp32.xml"), batch)[1]
    int8 = infer(compile_f32(tmp_path / "b" / "model_int8.xml"), batch)[1]
    # the mean shift was taken out: at least 98 % of it (OpenVINO 2026.4 leaves 1.3e-4 of 0.031 logits, from the
    # precision the fused subtraction runs in) and well below the INT8 score noise
    residual = abs(float(np.mean(int8.astype(np.float64) - fp32)))
    assert residual < 0.02 * abs(q.score_offset_value) and residual < 1e-3
    plain = export_bundle(tiny_checkpoint, tmp_path / "p", ExportOptions(
        int8=True, calibration=spec, quantize=QuantizeOptions(activation_range="nncf_default", score_offset=False)))
    assert plain.metadata.models["int8"].quantization.score_offset_value is None


def test_bias_correction_reaches_nncf_and_the_bundle_records_it(tmp_path, tiny_checkpoint, monkeypatch):
    import nncf

    from ssn_edge.export.calibration import CalibrationSpec

    seen, real = [], nncf.quantize
    monkeypatch.setattr(nncf, "quantize", lambda *a, **kw: seen.append(kw["fast_bias_correction"]) or real(*a, **kw))
    spec = CalibrationSpec(source="recipe", size=4)
    full = export_bundle(tiny_checkpoint, tmp_path / "full", ExportOptions(int8=True, calibration=spec))
    fast = export_bundle(tiny_checkpoint, tmp_path / "fast", ExportOptions(
        int8=True, calibration=spec, quantize=QuantizeOptions(bias_correction="fast")))
    assert seen == [False, True]  # the default is NNCF's full bias correction
    assert full.metadata.models["int8"].quantization.bias_correction == "full"
    assert fast.metadata.models["int8"].quantization.bias_correction == "fast"
    with pytest.raises(ValueError, match="bias correction 'none'"):
        QuantizeOptions(bias_correction="none")


# --------------------------------------------------------------------------------------------------------------
# The INT8 check (export/int8_check.py)
# --------------------------------------------------------------------------------------------------------------


def _check_arrays(tiny_dataset, recipe):
    """The held-out normals of the tiny run (4 of 8) and three painted copies of each, as the export builds them."""
    from ssn_edge.data import load_dataset, split_validation
    from ssn_edge.data.heldout import CheckSetSpec, check_set
    from ssn_edge.export.exporter import INT8_CHECK_COPIES

    d = recipe.data
    return check_set(split_validation(load_dataset(tiny_dataset), d.val_fraction, d.val_min, d.val_seed).held_out,
                     (64, 64), CheckSetSpec(copies=INT8_CHECK_COPIES))


@pytest.mark.slow
def test_int8_check_is_recorded_and_is_what_the_shipped_models_give(bundle, tiny_dataset, recipe):
    """The check in the INT8 entry is what evaluation's metrics give for the bundle's own FP32 and INT8 models on
    the held-out normals and their painted copies; FP32 and FP16 carry none."""
    from ssn_edge.evaluation.metrics import evaluate_arrays

    models = bundle.metadata.models
    check = models["int8"].check
    assert models["fp32"].check is None and models["fp16"].check is None and check is not None
    assert (check.images, check.defective, check.bound) == (16, 12, 0.5)
    assert check.threshold == pytest.approx(bundle.image_threshold)
    arrays = _check_arrays(tiny_dataset, recipe)
    scores, metrics = {}, {}
    for precision in ("fp32", "int8"):
        maps, scores[precision] = infer(compile_f32(bundle.model_path(precision)), arrays.images)
        metrics[precision] = evaluate_arrays(arrays, scores[precision], maps)
    assert check.fp32_image_auroc == pytest.approx(metrics["fp32"]["image_auroc"])
    assert check.int8_image_auroc == pytest.approx(metrics["int8"]["image_auroc"])
    assert check.fp32_pixel_aupro == pytest.approx(metrics["fp32"]["pixel_aupro"], abs=1e-3)
    assert check.int8_pixel_aupro == pytest.approx(metrics["int8"]["pixel_aupro"], abs=1e-3)
    assert check.image_auroc_diff == pytest.approx(check.int8_image_auroc - check.fp32_image_auroc)
    assert check.pixel_aupro_diff == pytest.approx(check.int8_pixel_aupro - check.fp32_pixel_aupro)
    t = np.float32(bundle.image_threshold)
    assert check.flips == int(np.sum((scores["fp32"] >= t) != (scores["int8"] >= t)))
    assert check.max_score_diff == pytest.approx(float(np.max(np.abs(scores["int8"] - scores["fp32"]))), abs=1e-6)
    assert check.within_bound == (abs(check.image_auroc_diff) <= 0.5 and abs(check.pixel_aupro_diff) <= 0.5)
    assert check.message.startswith("INT8 ") and "4 held-out normal images" in check.message


@pytest.mark.slow
def test_int8_outside_the_bound_is_said_in_one_warning_line(tiny_checkpoint, tmp_path, monkeypatch, caplog):
    """An INT8 model that ranks every painted copy below every normal image (and maps everything but the defects):
    within_bound False in the bundle, and one warning line that names the numbers and --int8-acc."""
    import ssn_edge.export.exporter as exporter
    from ssn_edge.export.inference import Predictions

    real = exporter.compare

    def inverted(arrays, fp32, int8, *args):
        bad = Predictions(1.0 - arrays.labels.astype(np.float32), (~arrays.masks).astype(np.float32))
        return real(arrays, fp32, bad, *args)

    monkeypatch.setattr(exporter, "compare", inverted)
    with caplog.at_level(logging.INFO, logger="ssn_edge"):
        b = export_bundle(tiny_checkpoint, tmp_path / "b", ExportOptions(int8=True, calibration=CalibrationSpec(size=2)))
    check = load_bundle(b.path).metadata.models["int8"].check
    assert check.within_bound is False and check.int8_image_auroc == 0.0 and check.image_auroc_diff < -0.5
    assert check.flips >= 4  # every held-out normal now scores 1.0, above the threshold set just above them
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "FP32" in r.getMessage()]
    assert warned == [check.message]
    assert check.message.startswith("INT8 differs from FP32 on the 4 held-out normal images and 12 painted copies")
    assert f"image AUROC INT8 0.0 vs FP32 {check.fp32_image_auroc:.1f} ({check.image_auroc_diff:+.2f})" in check.message
    assert f": {check.flips} of 16 flip" in check.message
    # the map moved too, and the export quantized the segmentation head: --float-map is named first
    assert check.message.endswith("Try --float-map (the segmentation head in float), --int8-acc (accuracy control) or "
                                  "keep FP32.")


@pytest.mark.slow
def test_without_held_out_images_the_int8_check_is_skipped_in_one_line(tiny_checkpoint, tmp_path, monkeypatch, caplog):
    import ssn_edge.export.exporter as exporter

    monkeypatch.setattr(exporter, "_held_out", lambda *args: ([], None))
    options = ExportOptions(int8=True, calibration=CalibrationSpec(size=2), thresholds=ThresholdChoice("test-f1"))
    with caplog.at_level(logging.INFO, logger="ssn_edge"):
        b = export_bundle(tiny_checkpoint, tmp_path / "b", options)
    assert b.metadata.models["int8"].check is None
    assert "INT8 check: not run, no held-out normal images" in caplog.text


def _activation_quantized(xml: Path) -> dict[str, bool]:
    """For the segmentation head's two convolutions and the backbone's first: is the activation they read an INT8
    FakeQuantize's output?"""
    import openvino as ov

    from ssn_edge.export.quantize import segmentation_subgraph

    model = ov.Core().read_model(xml)
    ops = {n.get_friendly_name(): n for n in model.get_ordered_ops()}
    head = segmentation_subgraph(model)
    stem = next(n for n in model.get_ordered_ops() if n.get_type_name() == "Convolution")
    names = {"head_first": head.inputs[0], "head_last": head.outputs[0], "backbone": stem.get_friendly_name()}
    return {k: ops[n].input_value(0).get_node().get_type_name() == "FakeQuantize" for k, n in names.items()}


@pytest.mark.slow
def test_float_map_keeps_the_segmentation_head_in_float_and_says_so(bundle, tiny_checkpoint, tmp_path):
    default = _activation_quantized(bundle.model_path("int8"))
    assert default == {"head_first": True, "head_last": True, "backbone": True}
    kept = export_bundle(tiny_checkpoint, tmp_path / "b", ExportOptions(
        int8=True, calibration=CalibrationSpec(size=2), quantize=QuantizeOptions(float_map=True)))
    assert _activation_quantized(kept.model_path("int8")) == {"head_first": False, "head_last": False, "backbone": True}
    assert kept.metadata.models["int8"].quantization.float_map is True
    assert bundle.metadata.models["int8"].quantization.float_map is False


def test_float_map_is_refused_without_int8():
    with pytest.raises(ValueError, match="--float-map only applies to an INT8 export"):
        ExportOptions(fp16=True, quantize=QuantizeOptions(float_map=True))


@pytest.mark.parametrize("auroc_diff,aupro_diff,map_quantized,hint", [
    (-2.0, -0.1, True, "Try --int8-acc (accuracy control) or keep FP32."),  # the score moved, not the map
    (-0.1, -2.0, True, "Try --float-map (the segmentation head in float), --int8-acc (accuracy control) or keep FP32."),
    (-0.1, -2.0, False, "Try --int8-acc (accuracy control) or keep FP32."),  # the head was in float already
    (-0.1, 0.2, True, None),  # within the bound: no hint
])
def test_the_int8_check_names_float_map_only_when_the_quantized_map_moved(auroc_diff, aupro_diff, map_quantized, hint):
    from ssn_edge.export.int8_check import message
    from ssn_edge.runtime.schema import Int8Check

    check = Int8Check(data="d", images=8, defective=4, fp32_image_auroc=90.0, int8_image_auroc=90.0 + auroc_diff,
                      image_auroc_diff=auroc_diff, fp32_pixel_aupro=80.0, int8_pixel_aupro=80.0 + aupro_diff,
                      pixel_aupro_diff=aupro_diff, flips=0, max_score_diff=0.1, threshold=0.5, bound=0.5,
                      within_bound=abs(auroc_diff) <= 0.5 and abs(aupro_diff) <= 0.5)
    line = message(check, "int8", map_quantized)
    assert line.endswith(hint) if hint else line.endswith("flip.")

"""The torch-free edge runtime: engine, predict, bench, on a tiny hand-built bundle (no exporter needed)."""

from __future__ import annotations

import csv
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ov = pytest.importorskip("openvino")
import openvino.opset13 as ops  # noqa: E402

from ssn_edge.runtime.bundle import BundleError, write_bundle  # noqa: E402
from ssn_edge.runtime.preprocess import ImageError, prepare, read_image  # noqa: E402
from ssn_edge.runtime.schema import (  # noqa: E402
    Backbone,
    BundleMetadata,
    InputSpec,
    ModelEntry,
    Provenance,
    Thresholds,
)

SIZE = 64
ROOT = Path(__file__).resolve().parents[1]


def tiny_model(seed: int = 0) -> ov.Model:
    """Input [-1, 3, 64, 64] -> conv 3x3 (8 ch) -> relu -> conv 4x4 stride 4 -> "map" (B, 1, 16, 16);
    "score" = max of the map over C, H, W (B,). SSN's interface at 1/1000 of the cost."""
    rng = np.random.default_rng(seed)
    x = ops.parameter([-1, 3, SIZE, SIZE], np.float32, name="input")
    w1 = ops.constant((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32))
    h = ops.relu(ops.convolution(x, w1, [1, 1], [1, 1], [1, 1], [1, 1]))
    w2 = ops.constant((rng.standard_normal((1, 8, 4, 4)) * 0.1).astype(np.float32))
    # the bias Add matters: OpenVINO 2026.4's CPU plugin returns a wrong ReduceMax/ReduceMean in the nncf int8
    # model when a bias-free conv output feeds both a Result and the reduction (fp32 is right).
    m = ops.add(ops.convolution(h, w2, [4, 4], [0, 0], [0, 0], [1, 1]), ops.constant(np.full((1, 1, 1, 1), 0.25, np.float32)))
    s = ops.reduce_max(m, ops.constant(np.array([1, 2, 3], dtype=np.int64)), keep_dims=False)
    m.output(0).get_tensor().set_names({"map"})
    s.output(0).get_tensor().set_names({"score"})
    return ov.Model([m, s], [x], "tiny_ssn")


TINY_MACS = 8 * SIZE * SIZE * 3 * 9 + 1 * 16 * 16 * 8 * 16


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    import nncf

    work = tmp_path_factory.mktemp("irs")
    model = tiny_model()
    files = {}
    ov.save_model(model, work / "model_fp32.xml", compress_to_fp16=False)
    ov.save_model(tiny_model(), work / "model_fp16.xml", compress_to_fp16=True)
    rng = np.random.default_rng(3)
    calib = [rng.standard_normal((1, 3, SIZE, SIZE)).astype(np.float32) for _ in range(4)]
    q = nncf.quantize(tiny_model(), nncf.Dataset(calib), subset_size=4)
    ov.save_model(q, work / "model_int8.xml", compress_to_fp16=False)
    models = {}
    for p in ("fp32", "fp16", "int8"):
        models[p] = ModelEntry(xml=f"model_{p}.xml", bin=f"model_{p}.bin", weights_precision=p)
        files[f"model_{p}.xml"] = work / f"model_{p}.xml"
        files[f"model_{p}.bin"] = work / f"model_{p}.bin"
    meta = BundleMetadata(
        input=InputSpec(SIZE, SIZE),
        thresholds=Thresholds(image=0.6, pixel=0.5),
        models=models,
        provenance=Provenance(backbone=Backbone("tiny"), recipe={"name": "tiny"}, setting="unsupervised"),
    )
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    write_bundle(out, meta, files)
    return out


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    """Five colour images of different sizes (one not square), plus one grayscale and a non-image file."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    for i, (h, w) in enumerate([(64, 64), (80, 120), (64, 64), (100, 100), (50, 70)]):
        img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        img[h // 3 : h // 2, w // 3 : w // 2] = 255  # a bright "defect"
        cv2.imwrite(str(d / f"img{i}.png"), img)
    cv2.imwrite(str(d / "gray.jpg"), (rng.random((64, 64)) * 255).astype(np.uint8))
    (d / "notes.txt").write_text("not an image")
    return d


def five_channel_tiff(path: Path) -> Path:
    """A valid uncompressed TIFF with 5 samples per pixel (OpenCV refuses it; the error must name it)."""
    h, w, c = 8, 8, 5
    data = (np.arange(h * w * c) % 251).astype(np.uint8).tobytes()
    ifd_off = 8 + len(data)
    n_tags = 10
    bps_off = ifd_off + 2 + n_tags * 12 + 4

    def tag(t, typ, cnt, val):
        return struct.pack("<HHII", t, typ, cnt, val)

    tags = [tag(256, 4, 1, w), tag(257, 4, 1, h), tag(258, 3, c, bps_off), tag(259, 3, 1, 1), tag(262, 3, 1, 2),
            tag(273, 4, 1, 8), tag(277, 3, 1, c), tag(278, 4, 1, h), tag(279, 4, 1, len(data)), tag(284, 3, 1, 1)]
    ifd = struct.pack("<H", len(tags)) + b"".join(tags) + struct.pack("<I", 0)
    path.write_bytes(b"II*\x00" + struct.pack("<I", ifd_off) + data + ifd + struct.pack("<" + "H" * c, *([8] * c)))
    return path


# -- torch-free -----------------------------------------------------------------------------------------


def test_runtime_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import ssn_edge.runtime.engine, ssn_edge.runtime.predict, ssn_edge.runtime.bench, ssn_edge.runtime.schema\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
        "bad = [m for m in sys.modules if m.startswith(('torchvision', 'nncf'))]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "ok"


# -- engine ---------------------------------------------------------------------------------------------


def test_engine_sets_and_reports_f32_hint(tiny_bundle):
    from ssn_edge.runtime.engine import PRECISION_HINTS, Engine

    for precision in ("fp32", "fp16", "int8"):
        eng = Engine(tiny_bundle, precision=precision)
        assert eng.precision == precision
        assert eng.config["INFERENCE_PRECISION_HINT"] == PRECISION_HINTS[precision] == "f32"
        assert eng.inference_precision == "f32", precision  # read back from the compiled model
    assert Engine(tiny_bundle, precision="fp32", mode="throughput").config["PERFORMANCE_HINT"] == "THROUGHPUT"


def test_engine_bf16_variant(tiny_bundle):
    from ssn_edge.runtime.engine import Engine, device_supports_bf16

    if not device_supports_bf16():
        with pytest.raises(ValueError, match="BF16"):
            Engine(tiny_bundle, precision="bf16")
        pytest.skip("this CPU has no native BF16: the bf16 variant is refused (checked), not run")
    eng = Engine(tiny_bundle, precision="bf16")
    assert eng.model_path.name == "model_fp32.xml"
    assert eng.inference_precision == "bf16"
    # fp32 on the same machine stays f32 (not OpenVINO's silent bf16 default)
    assert Engine(tiny_bundle, precision="fp32").inference_precision == "f32"


def test_engine_rejects_unknown_and_absent_precision(tiny_bundle):
    from ssn_edge.runtime.engine import Engine

    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        Engine(tiny_bundle, precision="int4")
    with pytest.raises(BundleError, match="no int8_acc model") as exc:
        Engine(tiny_bundle, precision="int8_acc")
    assert "\n" not in str(exc.value)


def test_engine_matches_direct_openvino(tiny_bundle):
    """infer_raw is the model: same numbers as a plain OpenVINO f32 run of the fp32 IR."""
    from ssn_edge.runtime.engine import Engine

    eng = Engine(tiny_bundle, precision="fp32")
    x = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    raw, score = eng.infer_raw(x)
    assert raw.shape == (2, 16, 16) and score.shape == (2,)
    ref = ov.Core().compile_model(tiny_model(), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)
    np.testing.assert_allclose(raw, ref["map"][:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(score, ref["score"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(score, raw.reshape(2, -1).max(axis=1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(N, 3, 64, 64\)"):
        eng.infer_raw(x[:, :, :32])


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_batch_and_single_identical(tiny_bundle, image_dir, precision):
    from ssn_edge.runtime.engine import Engine
    from ssn_edge.runtime.postprocess import anomaly_map, sigmoid

    eng = Engine(tiny_bundle, precision=precision, mode="throughput")
    paths = sorted(image_dir.glob("img*.png"))
    images = [read_image(p) for p in paths]
    x = np.stack([prepare(im, (SIZE, SIZE)) for im in images])
    raw_b, score_b = eng.infer_raw(x)
    for i in range(len(images)):
        raw_1, score_1 = eng.infer_raw(x[i : i + 1])
        np.testing.assert_allclose(raw_1[0], raw_b[i], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(score_1[0], score_b[i], rtol=1e-5, atol=1e-5)
    many = eng.predict_images(images, paths)
    singles = [eng.predict_images([im], [p])[0] for im, p in zip(images, paths)]
    for i, (a, b) in enumerate(zip(many, singles)):
        assert a.path == b.path == str(paths[i])
        assert a.score == b.score
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
        assert a.anomaly_map.shape == images[i].shape[:2]  # the original size
        assert a.score == pytest.approx(float(sigmoid(score_b[i])), abs=1e-5)
        assert a.decision == (a.score >= 0.6)
        assert a.latency_ms > 0
        if images[i].shape[:2] == (SIZE, SIZE):
            np.testing.assert_allclose(a.anomaly_map, anomaly_map(raw_b[i], (SIZE, SIZE)), rtol=1e-4, atol=1e-5)


def test_int8_and_fp16_agree_with_fp32(tiny_bundle, image_dir):
    from ssn_edge.runtime.engine import Engine

    images = [read_image(p) for p in sorted(image_dir.glob("*.*")) if p.suffix in (".png", ".jpg")]
    ref = Engine(tiny_bundle, precision="fp32").predict_images(images)
    for precision, tol in (("fp16", 1e-2), ("int8", 5e-2)):
        got = Engine(tiny_bundle, precision=precision).predict_images(images)
        for a, b in zip(ref, got):
            assert abs(a.score - b.score) < tol, (precision, a.score, b.score)
            assert np.abs(a.anomaly_map - b.anomaly_map).max() < 4 * tol, precision


def test_predict_images_rejects_wrong_channels(tiny_bundle):
    from ssn_edge.runtime.engine import Engine

    eng = Engine(tiny_bundle, precision="fp32")
    with pytest.raises(ImageError, match=r"^cam/part7\.tif: image has 2 channels") as exc:
        eng.predict_images([np.zeros((SIZE, SIZE, 3), np.float32), np.zeros((32, 32, 2), np.float32)], [None, "cam/part7.tif"])
    assert "\n" not in str(exc.value)
    with pytest.raises(ImageError, match=r"image #0: image has 1 channels"):
        eng.predict_images([np.zeros((SIZE, SIZE, 1), np.float32)])


# -- predict --------------------------------------------------------------------------------------------


def test_predict_folder_writes_json_csv(tiny_bundle, image_dir, tmp_path):
    from ssn_edge.runtime.predict import predict_paths

    out = tmp_path / "out"
    preds = predict_paths(tiny_bundle, [image_dir], out, precision="int8")
    expected = sorted(p for p in image_dir.iterdir() if p.suffix in (".png", ".jpg"))
    assert [p.path for p in preds] == [str(p) for p in expected]
    assert not (out / "overlays").exists()
    data = json.loads((out / "predictions.json").read_text())
    assert data["precision"] == "int8" and data["inference_precision"] == "f32"
    assert data["count"] == len(expected) == 6
    assert data["defective"] == sum(p.decision for p in preds)
    for rec, p in zip(data["predictions"], preds):
        assert rec["path"] == p.path
        assert rec["score"] == pytest.approx(p.score)
        assert rec["decision"] == p.decision == (p.score >= 0.6)
        assert rec["map_max"] == pytest.approx(float(p.anomaly_map.max()))
        assert rec["latency_ms"] > 0
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "score", "decision", "result", "latency_ms", "map_max", "status", "error"]
    assert all(r["status"] == "ok" and r["error"] == "" for r in rows)
    assert [r["path"] for r in rows] == [p.path for p in preds]
    for r, p in zip(rows, preds):
        assert float(r["score"]) == pytest.approx(p.score, abs=1e-6)
        assert int(r["decision"]) == int(p.decision)
        assert r["result"] == ("defect" if p.decision else "ok")  # no review band in this bundle
        assert float(r["map_max"]) == pytest.approx(p.map_max, abs=1e-5)
    assert not list(out.glob(".*tmp"))  # temporaries renamed away


def test_predict_overlays(tiny_bundle, image_dir, tmp_path):
    from ssn_edge.runtime.predict import predict_paths, render_overlay

    files = [image_dir / "img1.png", image_dir / "gray.jpg"]
    preds = predict_paths(tiny_bundle, files, tmp_path, precision="fp32", overlays=True)
    data = json.loads((tmp_path / "predictions.json").read_text())
    assert [r["overlay"] for r in data["predictions"]] == ["overlays/img1.png", "overlays/gray.png"]
    for f, p in zip(files, preds):
        ov_img = cv2.imread(str(tmp_path / "overlays" / f"{f.stem}.png"), cv2.IMREAD_UNCHANGED)
        image = read_image(f)
        assert ov_img.shape == image.shape[:2] + (3,)
        plain = cv2.cvtColor((image * 255 + 0.5).astype(np.uint8), cv2.COLOR_RGB2BGR)
        assert np.abs(ov_img.astype(int) - plain).mean() > 5  # a heatmap was blended in
    # the threshold contour: white pixels appear exactly when some of the map is over the pixel threshold
    m = np.zeros((40, 40), np.float32)
    img = np.zeros((40, 40, 3), np.float32)
    assert not (render_overlay(img, m, 0.5) == 255).all(axis=2).any()
    m[10:20, 10:20] = 1.0
    assert (render_overlay(img, m, 0.5) == 255).all(axis=2).any()


def test_predict_bad_image_is_listed_and_the_rest_scored(tiny_bundle, image_dir, tmp_path):
    from ssn_edge.runtime.predict import predict_paths

    bad = five_channel_tiff(tmp_path / "five.tif")
    out = tmp_path / "out"
    with pytest.raises(ImageError) as exc:
        predict_paths(tiny_bundle, [image_dir / "img0.png", bad], out, precision="fp32", overlays=True)
    msg = str(exc.value)
    assert str(bad) in msg and "5 channels" in msg and "\n" not in msg
    data = json.loads((out / "predictions.json").read_text())
    assert data["complete"] and data["count"] == 1 and data["failed"] == 1
    assert [r["path"] for r in data["predictions"]] == [str(image_dir / "img0.png")]
    assert data["failures"] == [{"path": str(bad), "status": "error", "kind": "channels",
                                 "error": "image has 5 channels; expected 1 (grayscale), 3 (colour) or 4 (colour + alpha)"}]
    assert [p.name for p in (out / "overlays").iterdir()] == ["img0.png"]
    assert not list(out.glob("*.partial"))
    with pytest.raises(ImageError, match="missing.png: file or folder not found"):
        predict_paths(tiny_bundle, [tmp_path / "missing.png"], out)
    assert not (out / "overlays").exists()  # the earlier run's overlays went with its results


def test_tampered_bundle_refused(tiny_bundle, image_dir, tmp_path):
    import shutil

    from ssn_edge.runtime.engine import Engine
    from ssn_edge.runtime.predict import predict_paths

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    b = copy / "model_int8.bin"
    data = bytearray(b.read_bytes())
    data[len(data) // 2] ^= 0x01
    b.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model_int8\.bin: checksum mismatch") as exc:
        Engine(copy, precision="fp32")
    assert "\n" not in str(exc.value)
    with pytest.raises(BundleError, match=r"model_int8\.bin"):
        predict_paths(copy, [image_dir], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- bench ----------------------------------------------------------------------------------------------


def test_count_macs_hand_built():
    from ssn_edge.runtime.bench import count_macs

    x = ops.parameter([-1, 4, 10, 12], np.float32, name="x")
    conv = ops.convolution(x, ops.constant(np.ones((6, 4, 3, 3), np.float32)), [2, 2], [1, 1], [1, 1], [1, 1])
    # -> (1, 6, 5, 6): 180 outputs x 4*9 = 6480
    gconv = ops.group_convolution(conv, ops.constant(np.ones((3, 4, 2, 1, 1), np.float32)), [1, 1], [0, 0], [0, 0], [1, 1])
    # 3 groups, 2 in / 4 out each -> (1, 12, 5, 6): 360 outputs x 2 = 720
    flat = ops.reshape(gconv, ops.constant(np.array([1, 360], np.int64)), special_zero=False)
    mm = ops.matmul(flat, ops.constant(np.ones((10, 360), np.float32)), transpose_a=False, transpose_b=True)
    # (1, 360) x (360, 10): 10 outputs x 360 = 3600
    model = ov.Model([mm], [x])
    assert count_macs(model) == 6480 + 720 + 3600
    assert model.input(0).get_partial_shape().is_dynamic  # counted on a copy
    assert count_macs(tiny_model()) == TINY_MACS


def test_count_macs_quantized_same(tiny_bundle):
    from ssn_edge.runtime.bench import count_macs

    core = ov.Core()
    for p in ("fp32", "fp16", "int8"):
        assert count_macs(core.read_model(str(tiny_bundle / f"model_{p}.xml"))) == TINY_MACS, p


def test_bench_records(tiny_bundle):
    from ssn_edge.runtime.bench import RESULT_KEYS, bench_bundle
    from ssn_edge.runtime.engine import device_supports_bf16

    records = bench_bundle(tiny_bundle, warmup=1, runs=5, throughput_seconds=0.2)
    names = [r["precision"] for r in records]
    assert names == (["fp32", "bf16", "fp16", "int8"] if device_supports_bf16() else ["fp32", "fp16", "int8"])
    for r in records:
        assert set(RESULT_KEYS) <= set(r)
        assert r["runtime"] == "openvino"
        assert 0 < r["latency_p10_ms"] <= r["latency_ms"] <= r["latency_p90_ms"]
        assert r["latency_std_ms"] >= 0
        assert r["throughput_ips"] > 0
        assert r["macs"] == TINY_MACS
        assert r["gops"] == pytest.approx(2 * TINY_MACS / (r["latency_ms"] * 1e-3) / 1e9)
        assert r["inference_precision_hint"] == ("bf16" if r["precision"] == "bf16" else "f32")
        assert r["inference_precision"] == r["inference_precision_hint"]
        assert r["file_mb"] > 0
    json.dumps(records)  # serialisable as they are
    one = bench_bundle(tiny_bundle, precisions=["fp16"], warmup=0, runs=2, throughput_seconds=0)
    assert [r["precision"] for r in one] == ["fp16"] and one[0]["throughput_ips"] is None
    with pytest.raises(BundleError, match="int8_acc"):
        bench_bundle(tiny_bundle, precisions=["int8_acc"], runs=1)


@pytest.mark.parametrize("precision", ["f32", "int8"])
def test_conv_peak(precision):
    from ssn_edge.runtime.bench import RESULT_KEYS, conv_peak

    r = conv_peak(precision, channels=16, size=16, warmup=1, runs=3)
    assert set(RESULT_KEYS) <= set(r)
    assert r["macs"] == 16 * 16 * 16 * 16 * 9
    assert r["latency_ms"] > 0 and r["gops"] > 0
    assert r["precision"] == precision and r["inference_precision_hint"] == "f32"
    assert math.isfinite(r["gops"])


# -- CLI ------------------------------------------------------------------------------------------------


def test_cli_predict_and_bench(tiny_bundle, image_dir, tmp_path):
    from click.testing import CliRunner

    from cli import main

    runner = CliRunner()
    res = runner.invoke(main, ["predict", str(tiny_bundle), str(image_dir / "img0.png"), "--precision", "fp32", "--out", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    assert "img0.png" in res.output and (tmp_path / "p" / "predictions.json").is_file()
    bad = five_channel_tiff(tmp_path / "bad.tif")
    res = runner.invoke(main, ["predict", str(tiny_bundle), str(bad), "--out", str(tmp_path / "q")])
    assert res.exit_code == 3 and "bad.tif" in res.output  # 3: some inputs could not be scored
    js = tmp_path / "bench.json"
    res = runner.invoke(main, ["bench", str(tiny_bundle), "--precision", "int8", "--runs", "3", "--warmup", "1", "--seconds", "0.2", "--no-peak", "--json", str(js)])
    assert res.exit_code == 0, res.output
    assert "int8" in res.output
    assert [r["precision"] for r in json.loads(js.read_text())["results"]] == ["int8"]


def test_conv_peak_sweep_keeps_the_best_shape():
    from ssn_edge.runtime.bench import conv_peak_sweep

    r = conv_peak_sweep("f32", shapes=((8, 16), (16, 16)), warmup=1, runs=3)
    assert set(r["sweep"]) == {"conv3x3 8->8 16x16 batch 1", "conv3x3 16->16 16x16 batch 1"}
    assert r["gops"] == pytest.approx(max(r["sweep"].values()), abs=0.06)
    assert r["model"] in r["sweep"]

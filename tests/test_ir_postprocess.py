"""Post-processing inside the exported graph: the README's IR-only script (plain OpenVINO, no ssn_edge) gives
`ssn-edge predict`'s score and map; the graph's ops equal runtime.postprocess; static batch 1 by default, a
dynamic batch on request; the thresholds and pre-processing in rt_info; old (raw-output) bundles still run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from ssn_edge.export.calibration import CalibrationSpec
from ssn_edge.export.exporter import ExportOptions, export_bundle

REPO = Path(__file__).resolve().parents[1]
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def readme_script() -> str:
    """The README's IR-only script, as the user copies it."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"```python\n(# ir_only\.py:.*?)```", text, re.S)
    assert match, "README.md lost its IR-only script (the block starting '# ir_only.py:')"
    return match.group(1)


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("ir") / "bundle"
    return export_bundle(tiny_checkpoint, out, ExportOptions(int8=True, calibration=CalibrationSpec(size=4, seed=0)))


@pytest.fixture(scope="module")
def images(tiny_dataset, tmp_path_factory) -> list[Path]:
    """Test images at the model's size, and one enlarged and one shrunk (RGB) to take both resize paths."""
    paths = sorted((tiny_dataset / "test").glob("*/*.png"))[:3]
    folder = tmp_path_factory.mktemp("sized")
    src = cv2.imread(str(paths[-1]), cv2.IMREAD_COLOR)
    for name, size in (("big.png", (96, 80)), ("small.png", (48, 56))):
        tinted = src.copy()
        tinted[..., 0] //= 2  # a colour image: channel order matters
        cv2.imwrite(str(folder / name), cv2.resize(tinted, size, interpolation=cv2.INTER_LINEAR))
        paths.append(folder / name)
    return paths


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_readme_ir_only_script_equals_predict(bundle, images, precision, tmp_path):
    from ssn_edge.runtime.engine import Engine
    from ssn_edge.runtime.preprocess import read_image

    script = tmp_path / "ir_only.py"
    script.write_text(readme_script())
    # beside the script, so first on its sys.path: any import of ssn_edge fails the run
    (tmp_path / "ssn_edge.py").write_text("raise ImportError('the IR-only script imported ssn_edge')\n")
    engine = Engine(bundle, precision=precision)
    for i, path in enumerate(images):
        maps = tmp_path / f"map{i}.npy"
        done = subprocess.run([sys.executable, str(script), str(bundle.model_path(precision)), str(path), str(maps)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        got = json.loads(done.stdout)
        want = engine.predict_image(read_image(path), path)
        assert abs(got["score"] - want.score) < 1e-5, path
        assert got["defect"] == want.decision
        amap = np.load(maps)
        assert amap.shape == want.anomaly_map.shape
        assert np.abs(amap - want.anomaly_map).max() < 1e-5, path


@pytest.mark.parametrize("size,sigma", [((64, 64), 4.0), ((40, 56), 4.0), ((32, 32), 0.0)])
def test_graph_postprocess_equals_runtime(size, sigma):
    """add_postprocess's OpenVINO ops against runtime.postprocess (cv2): upsample, blur, sigmoid."""
    import openvino as ov
    import openvino.opset13 as ops

    from ssn_edge.export.graph import add_postprocess
    from ssn_edge.runtime.postprocess import anomaly_map, sigmoid

    h, w = size[0] // 4, size[1] // 4
    x, s = ops.parameter([1, 1, h, w], np.float32), ops.parameter([1], np.float32)
    model = ov.Model([ops.relu(x), ops.negative(s)], [x, s])  # stand-ins for the network
    model.outputs[0].get_tensor().set_names({"map"})
    model.outputs[1].get_tensor().set_names({"score"})
    add_postprocess(model, size, sigma, 25)
    compiled = ov.Core().compile_model(model, "CPU", F32)
    raw = (np.random.default_rng(1).normal(size=(1, 1, h, w)) * 6).astype(np.float32)
    logit = np.array([2.5], dtype=np.float32)
    out = compiled([raw, logit])
    want = anomaly_map(np.maximum(raw, 0), size, sigma, 25)[0]
    assert out["anomaly_map"].shape == (1, 1, *size)
    assert np.abs(out["anomaly_map"][0, 0] - want).max() < 1e-5
    assert abs(out["pred_score"][0] - sigmoid(-logit)[0]) < 1e-6


def test_graph_outputs_decisions_and_rt_info(bundle):
    import openvino as ov

    meta = bundle.metadata
    model = ov.Core().read_model(bundle.model_path("fp32"))
    rt = lambda *key: model.get_rt_info(list(key)).astype(str)  # noqa: E731
    assert float(rt("ssn_edge", "image_threshold")) == meta.thresholds.image
    assert float(rt("ssn_edge", "pixel_threshold")) == meta.thresholds.pixel
    assert rt("ssn_edge", "threshold_source") == "held_out_normal"
    assert [float(v) for v in rt("ssn_edge", "mean").split()] == list(meta.input.mean)
    assert rt("model_info", "model_type") == "AnomalyDetection" and rt("model_info", "labels") == "Normal Anomaly"
    assert rt("model_info", "reverse_input_channels") == "True"
    assert [float(v) for v in rt("model_info", "mean_values").split()] == pytest.approx([123.675, 116.28, 103.53])
    compiled = ov.Core().compile_model(model, "CPU", F32)
    x = np.random.default_rng(0).normal(size=(1, 3, 64, 64)).astype(np.float32)
    out = compiled(x)
    assert bool(out["pred_label"][0]) == bool(out["pred_score"][0] >= meta.thresholds.image)
    assert np.array_equal(out["pred_mask"], out["anomaly_map"] >= np.float32(meta.thresholds.pixel))


def test_static_by_default_dynamic_on_request(bundle, tiny_checkpoint, tmp_path):
    """Batch 1 by default; the engine runs a batch of 3 through it one at a time, as a dynamic-batch export does
    in one request."""
    import openvino as ov

    from ssn_edge.runtime.engine import Engine

    static = ov.Core().read_model(bundle.model_path("fp32")).input(0).get_partial_shape().to_string()
    assert static == "[1,3,64,64]"
    dynamic = export_bundle(tiny_checkpoint, tmp_path / "dyn", ExportOptions(dynamic_batch=True))
    assert ov.Core().read_model(dynamic.model_path("fp32")).input(0).get_partial_shape().to_string() == "[?,3,64,64]"
    x = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    one, many = Engine(bundle, "fp32"), Engine(dynamic, "fp32")
    assert one.batch_size == 1 and many.batch_size is None
    (m1, s1), (m3, s3) = one.infer_final(x), many.infer_final(x)
    assert m1.shape == (3, 64, 64) and s1.shape == (3,)
    assert np.abs(m1 - m3).max() < 1e-4 and np.abs(s1 - s3).max() < 1e-5


def test_raw_output_bundle_still_postprocessed_by_runtime(bundle, tiny_checkpoint, tmp_path):
    """A bundle as written before post-processing moved into the graph (raw outputs, postprocess.in_graph false)
    goes through runtime.postprocess: the same map and score as the in-graph bundle of the same model."""
    import dataclasses

    import openvino as ov

    from ssn_edge.export.graph import convert, plan_graph
    from ssn_edge.model.load import load_model
    from ssn_edge.runtime.bundle import write_bundle
    from ssn_edge.runtime.engine import Engine
    from ssn_edge.runtime.schema import Outputs, PostProcess

    loaded = load_model(tiny_checkpoint)
    xml = tmp_path / "model_fp32.xml"
    ov.save_model(convert(loaded, plan_graph(loaded)), xml, compress_to_fp16=False)
    meta = bundle.metadata
    old_meta = dataclasses.replace(meta, outputs=Outputs(), postprocess=PostProcess(),
                                   models={"fp32": meta.models["fp32"]})
    assert not old_meta.postprocess.in_graph  # what a bundle without the field reads as
    old = write_bundle(tmp_path / "old", old_meta, {"model_fp32.xml": xml, "model_fp32.bin": xml.with_suffix(".bin")})
    x = np.random.default_rng(2).normal(size=(2, 3, 64, 64)).astype(np.float32)
    (m_old, s_old), (m_new, s_new) = Engine(old, "fp32").infer_final(x), Engine(bundle, "fp32").infer_final(x)
    assert np.abs(m_old - m_new).max() < 1e-5 and np.abs(s_old - s_new).max() < 1e-6

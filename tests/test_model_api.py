"""OpenVINO model_api (openvino-model-api, its AnomalyDetection wrapper) loads a bundle's IR as it is, from the
keys in rt_info["model_info"], and decides as `ssn-edge predict` does.

model_api 0.4.7 pins opencv-python-headless~=4.0 while this project runs OpenCV 5, so it lives in its own
environment, .venv-modelapi (made by .ci/run): `pip install openvino-model-api==0.4.7 --no-deps` plus openvino,
numpy and opencv-python-headless (what it imports; its other pins are not needed to run the wrapper)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ssn_edge.export.exporter import ExportOptions, export_bundle
from ssn_edge.export.thresholds import ThresholdChoice

REPO = Path(__file__).resolve().parents[1]
MODELAPI_PYTHON = REPO / ".venv-modelapi" / "bin" / "python"

RUN_MODEL_API = """
import json, sys
import cv2
from model_api.adapters import OpenvinoAdapter, create_core
from model_api.models import AnomalyDetection

# f32 said explicitly, else bf16 on a CPU that has it, as for any IR (create_model(core=...) fails in 0.4.7)
adapter = OpenvinoAdapter(create_core(), sys.argv[1], device="CPU", plugin_config={"INFERENCE_PRECISION_HINT": "f32"})
model = AnomalyDetection.create_model(adapter)
out = []
for path in json.loads(sys.argv[2]):
    r = model(cv2.imread(path, cv2.IMREAD_COLOR))  # model_api takes BGR, as OpenCV reads it
    out.append({"path": path, "label": r.pred_label, "score": float(r.pred_score), "mask": int(r.pred_mask.sum())})
hint = str(model.inference_adapter.compiled_model.get_property("INFERENCE_PRECISION_HINT"))
print(json.dumps({"image_threshold": model.params.image_threshold, "hint": hint, "results": out}))
"""


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory):
    # A 50 % false-alarm rate on the 4 held-out normals puts the threshold midway between two of their scores, so
    # both decisions occur whatever the tiny model scores (at the default 1 % it sits a float step above them all)
    out = tmp_path_factory.mktemp("model_api") / "bundle"
    return export_bundle(tiny_checkpoint, out, ExportOptions(thresholds=ThresholdChoice(max_false_alarm=0.5)))


def test_model_api_decides_as_predict(bundle, tiny_dataset):
    if not MODELAPI_PYTHON.exists():
        pytest.skip(f"{MODELAPI_PYTHON} is absent: make it as .ci/run does (python -m venv .venv-modelapi; "
                    ".venv-modelapi/bin/pip install openvino-model-api==0.4.7 --no-deps openvino numpy "
                    "opencv-python-headless)")
    from ssn_edge.runtime.engine import Engine
    from ssn_edge.runtime.preprocess import read_image

    # the training images too: the threshold splits the held-out normal ones, so both decisions are compared
    images = [str(p) for p in sorted((tiny_dataset / "test").glob("*/*.png")) + sorted(tiny_dataset.glob("train/*/*.png"))]
    done = subprocess.run([str(MODELAPI_PYTHON), "-c", RUN_MODEL_API, str(bundle.model_path("fp32")),
                           json.dumps(images)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["image_threshold"] == pytest.approx(bundle.metadata.thresholds.image)
    assert got["hint"] == "<Type: 'float32'>"
    engine = Engine(bundle, "fp32")
    threshold = got["image_threshold"]
    decisions = []
    for r in got["results"]:
        want = engine.predict_image(read_image(r["path"]), r["path"])
        assert r["score"] == pytest.approx(want.score, abs=1e-5)  # model_api puts mean/scale into the graph
        # the graph's own pred_label output (anomalib's four outputs: model_api reads them as they are) is its score
        # against the threshold, and the decision predict makes; an image within float noise of the threshold could
        # go either way between the two preprocessing paths, so none may lie there
        assert r["label"] == str(r["score"] >= threshold), r["path"]
        assert abs(want.score - threshold) > 1e-5, r["path"]
        assert r["label"] == str(want.decision), r["path"]
        decisions.append(want.decision)
    assert True in decisions and False in decisions  # both kinds compared

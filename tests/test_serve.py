"""The KServe v2 server on a free localhost port, driven by tritonclient.http (binary and JSON tensors) and by
plain HTTP: health, metadata, scores bit-identical to `ssn-edge predict`, bad requests, a full queue, timeouts,
metrics and the access log."""

from __future__ import annotations

import base64
import json
import logging
import math
import struct
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("fastapi", reason="the serving extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serving extra is not installed: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="tests need httpx: pip install -e '.[serve,dev]'")
th = pytest.importorskip("tritonclient.http", reason="tests need tritonclient[http]: pip install -e '.[serve,dev]'")

from serve_support import SIZE, png_bytes, tiny_bundle  # noqa: E402

import ssn_edge.serve.app as app_module  # noqa: E402
from ssn_edge.runtime.predict import run_predict  # noqa: E402
from ssn_edge.runtime.preprocess import prepare, read_image  # noqa: E402
from ssn_edge.serve.registry import ServeOptions, build_registry  # noqa: E402
from ssn_edge.serve.server import start_in_thread  # noqa: E402

MAX_BODY_MB = 1.0


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve_bundles")
    return {"tiny": tiny_bundle(root / "tiny", seed=0), "other": tiny_bundle(root / "other", seed=1, image_threshold=0.7)}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("serve_images")
    paths = []
    for i, (h, w) in enumerate([(80, 96), (64, 64), (120, 100), (64, 64)]):
        p = d / f"img{i}.png"
        p.write_bytes(png_bytes(i, h, w))
        paths.append(p)
    return paths


def _start(bundles: dict[str, Path], **kw):
    options = ServeOptions(max_body_mb=MAX_BODY_MB, **kw)
    registry = build_registry([f"{n}={p}" for n, p in bundles.items()], None, options)
    return start_in_thread(registry, options), registry


@pytest.fixture(scope="module")
def server(bundles):
    running, registry = _start(bundles, queue_size=8)
    yield running
    running.stop()
    registry.close()


@pytest.fixture(scope="module")
def client(server):
    return th.InferenceServerClient(server.url.removeprefix("http://"))


@pytest.fixture(scope="module")
def predicted(bundles, images, tmp_path_factory) -> dict[str, dict[str, object]]:
    """`ssn-edge predict`'s records (the CLI's run_predict path, fp32) of every image, per model."""
    out = {}
    for name, bundle in bundles.items():
        records = {}
        def keep(record, pred, rec=records) -> None:
            rec[Path(record.path).name] = SimpleNamespace(score=record.score, decision=record.decision,
                                                          map_max=record.map_max, result=pred.result)

        run_predict(bundle, [str(p) for p in images], tmp_path_factory.mktemp(f"pred_{name}"), precision="fp32",
                    on_result=keep)
        out[name] = records
    return out


def _bytes_input(data: list[bytes], binary: bool = True):
    """Encoded images as the BYTES input: raw in a binary tensor, base64 text in JSON (the server's rule)."""
    x = th.InferInput("image_bytes", [len(data)], "BYTES")
    items = data if binary else [base64.b64encode(d).decode() for d in data]
    x.set_data_from_numpy(np.array(items, dtype=np.object_), binary_data=binary)
    return x


# -- health and metadata ----------------------------------------------------------------------------------


def test_health_and_server_metadata(server, client):
    assert client.is_server_live() and client.is_server_ready()
    assert httpx.get(server.url + "/v2/health/live").json() == {"live": True}
    meta = client.get_server_metadata()
    assert meta["name"] == "ssn-edge" and "binary_tensor_data" in meta["extensions"]
    assert client.is_model_ready("tiny") and client.is_model_ready("other", "1")
    assert not client.is_model_ready("nope")


def test_model_metadata_carries_the_bundle(server, client):
    meta = client.get_model_metadata("tiny")
    assert meta["name"] == "tiny" and meta["versions"] == ["1"]
    assert {"name": "input", "datatype": "FP32", "shape": [-1, 3, SIZE, SIZE]} in meta["inputs"]
    assert {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]} in meta["inputs"]
    assert {o["name"] for o in meta["outputs"]} == {"score", "decision", "result", "map_max", "map"}
    params = meta["parameters"]
    assert params["precision"] == "fp32" and params["inference_precision"] == "f32"
    assert params["bundle_metadata"]["thresholds"]["image"] == pytest.approx(0.6)
    assert params["bundle_metadata"]["input"]["height"] == SIZE
    other = httpx.get(server.url + "/v2/models/other/versions/1").json()
    assert other["parameters"]["image_threshold"] == pytest.approx(0.7)


# -- scores equal to ssn-edge predict --------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_encoded_images_score_as_predict(client, images, predicted, binary):
    for name in ("tiny", "other"):
        for path in images:
            outputs = [th.InferRequestedOutput(n, binary_data=binary) for n in ("score", "decision", "result", "map_max")]
            r = client.infer(name, [_bytes_input([path.read_bytes()], binary)], outputs=outputs)
            rec = predicted[name][path.name]
            assert float(r.as_numpy("score")[0]) == rec.score  # bit-identical
            assert bool(r.as_numpy("decision")[0]) == rec.decision
            result = r.as_numpy("result")[0]
            assert (result.decode() if isinstance(result, bytes) else result) == rec.result
            assert float(r.as_numpy("map_max")[0]) == rec.map_max


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_ir_tensor_scores_as_predict(client, images, predicted, binary):
    """A 64x64 image is not resized, so its prepared tensor sent as the IR's input scores as predict scores it."""
    square = [p for p in images if read_image(p).shape[:2] == (SIZE, SIZE)]
    batch = np.stack([prepare(read_image(p), (SIZE, SIZE)) for p in square])
    x = th.InferInput("input", list(batch.shape), "FP32")
    x.set_data_from_numpy(batch, binary_data=binary)
    r = client.infer("tiny", [x], outputs=[th.InferRequestedOutput("score", binary_data=binary),
                                           th.InferRequestedOutput("map", binary_data=binary)])
    scores, maps = r.as_numpy("score"), r.as_numpy("map")
    assert maps.shape == (len(square), SIZE, SIZE)
    for i, p in enumerate(square):
        assert float(scores[i]) == predicted["tiny"][p.name].score
        assert float(maps[i].max()) == predicted["tiny"][p.name].map_max


def test_plain_http_json_with_base64_image_and_map(server, images, predicted):
    path = images[2]  # 120x100
    body = {"id": "r1", "inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES",
                                    "data": [base64.b64encode(path.read_bytes()).decode()]}],
            "outputs": [{"name": "score"}, {"name": "map"}]}
    r = httpx.post(server.url + "/v2/models/tiny/infer", json=body)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["id"] == "r1" and doc["model_name"] == "tiny" and doc["model_version"] == "1"
    out = {o["name"]: o for o in doc["outputs"]}
    assert out["map"]["shape"] == [1, 120, 100]
    assert out["score"]["data"][0] == predicted["tiny"][path.name].score
    assert max(out["map"]["data"]) == pytest.approx(predicted["tiny"][path.name].map_max, abs=0, rel=0)


def test_requests_to_two_models_run_concurrently_and_stay_right(client, images, predicted, server):
    errors: list[str] = []

    def hammer(name: str) -> None:
        c = th.InferenceServerClient(server.url.removeprefix("http://"))
        for k in range(6):
            path = images[k % len(images)]
            r = c.infer(name, [_bytes_input([path.read_bytes()])])
            if float(r.as_numpy("score")[0]) != predicted[name][path.name].score:
                errors.append(f"{name} {path.name}")

    threads = [threading.Thread(target=hammer, args=(n,)) for n in ("tiny", "other", "tiny", "other")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# -- bad requests ----------------------------------------------------------------------------------------


def _tensor_entry(shape, datatype="FP32", data=None, name="input"):
    if data is None:
        data = [0.0] * math.prod(shape)
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


def _truncated_png() -> bytes:
    data = png_bytes(5)
    return data[: len(data) // 2]


def _binary_body(header: dict, blob: bytes, header_length: int | None = None) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + blob, {"Inference-Header-Content-Length": str(header_length if header_length is not None else len(head))}


def _bytes_blob(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD = {
    "not JSON": ("POST", "/v2/models/tiny/infer", b"{not json", {}, 400),
    "JSON not an object": ("POST", "/v2/models/tiny/infer", b"[1, 2]", {}, 400),
    "empty body": ("POST", "/v2/models/tiny/infer", b"", {}, 400),
    "no inputs": ("POST", "/v2/models/tiny/infer", {"inputs": []}, {}, 400),
    "unknown model": ("POST", "/v2/models/nope/infer", {"inputs": [_tensor_entry([1, 3, 64, 64])]}, {}, 404),
    "unknown version": ("POST", "/v2/models/tiny/versions/7/infer", {"inputs": [_tensor_entry([1, 3, 64, 64])]}, {}, 404),
    "version not a number": ("GET", "/v2/models/tiny/versions/latest", None, {}, 404),
    "unknown input name": ("POST", "/v2/models/tiny/infer", {"inputs": [_tensor_entry([1, 3, 64, 64], name="x")]}, {}, 400),
    "wrong datatype": ("POST", "/v2/models/tiny/infer", {"inputs": [_tensor_entry([1, 3, 64, 64], "INT32")]}, {}, 400),
    "not a datatype": ("POST", "/v2/models/tiny/infer", {"inputs": [_tensor_entry([1, 3, 64, 64], "FLOAT")]}, {}, 400),
    "wrong shape": ("POST", "/v2/models/tiny/infer", {"inputs": [_tensor_entry([1, 3, 32, 32])]}, {}, 400),
    "batch too large": ("POST", "/v2/models/tiny/infer", {"inputs": [_tensor_entry([17, 3, 64, 64])]}, {}, 400),
    "negative shape": ("POST", "/v2/models/tiny/infer", {"inputs": [_tensor_entry([-1, 3, 64, 64], data=[0.0])]}, {}, 400),
    "data length != shape": ("POST", "/v2/models/tiny/infer", {"inputs": [_tensor_entry([1, 3, 64, 64], data=[0.0] * 10)]}, {}, 400),
    "data not numbers": ("POST", "/v2/models/tiny/infer", {"inputs": [_tensor_entry([1, 1, 1, 2], data=["a", "b"])]}, {}, 400),
    "NaN in tensor": ("POST", "/v2/models/tiny/infer", {"inputs": [_tensor_entry([1, 3, 64, 64], data=[float("nan")] * 12288)]}, {}, 400),
    "missing data": ("POST", "/v2/models/tiny/infer", {"inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32"}]}, {}, 400),
    "two inputs": ("POST", "/v2/models/tiny/infer", {"inputs": [_tensor_entry([1, 3, 64, 64]),
                                                                _tensor_entry([1], "BYTES", [_b64(b"x")], "image_bytes")]}, {}, 400),
    "unknown output": ("POST", "/v2/models/tiny/infer", {"inputs": [_tensor_entry([1, 3, 64, 64])], "outputs": [{"name": "heatmap"}]}, {}, 400),
    "undecodable image": ("POST", "/v2/models/tiny/infer", {"inputs": [_tensor_entry([1], "BYTES", [_b64(b"hello, not an image")], "image_bytes")]}, {}, 400),
    "truncated PNG": ("POST", "/v2/models/tiny/infer", {"inputs": [_tensor_entry([1], "BYTES", [_b64(_truncated_png())], "image_bytes")]}, {}, 400),
    "image too small": ("POST", "/v2/models/tiny/infer", {"inputs": [_tensor_entry([1], "BYTES", [_b64(png_bytes(1, 10, 10))], "image_bytes")]}, {}, 400),
    "image too stretched": ("POST", "/v2/models/tiny/infer", {"inputs": [_tensor_entry([1], "BYTES", [_b64(png_bytes(1, 40, 400))], "image_bytes")]}, {}, 400),
    "empty image": ("POST", "/v2/models/tiny/infer", {"inputs": [_tensor_entry([1], "BYTES", [""], "image_bytes")]}, {}, 400),
    "image not base64": ("POST", "/v2/models/tiny/infer", {"inputs": [_tensor_entry([1], "BYTES", ["%%%"], "image_bytes")]}, {}, 400),
    "map of differently sized images": ("POST", "/v2/models/tiny/infer", {
        "inputs": [_tensor_entry([2], "BYTES", [_b64(png_bytes(1, 64, 64)), _b64(png_bytes(2, 80, 80))], "image_bytes")],
        "outputs": [{"name": "map"}]}, {}, 400),
    "binary size past the body": ("POST", "/v2/models/tiny/infer", _binary_body(
        {"inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32", "parameters": {"binary_data_size": 49152}}]},
        b"\0" * 100), None, 400),
    "binary size != shape": ("POST", "/v2/models/tiny/infer", _binary_body(
        {"inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32", "parameters": {"binary_data_size": 100}}]},
        b"\0" * 100), None, 400),
    "header length past the body": ("POST", "/v2/models/tiny/infer", _binary_body({"inputs": []}, b"", header_length=10_000), None, 400),
    "header length not a number": ("POST", "/v2/models/tiny/infer", b"{}", {"Inference-Header-Content-Length": "ten"}, 400),
    "BYTES element past its data": ("POST", "/v2/models/tiny/infer", _binary_body(
        {"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 8}}]},
        struct.pack("<I", 1000) + b"abcd"), None, 400),
    "trailing binary bytes": ("POST", "/v2/models/tiny/infer", _binary_body(
        {"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 8}}]},
        _bytes_blob(b"abcd") + b"extra"), None, 400),
    "more BYTES elements than the shape": ("POST", "/v2/models/tiny/infer", _binary_body(
        {"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 16}}]},
        _bytes_blob(b"abcd", b"efgh")), None, 400),
    "oversized body": ("POST", "/v2/models/tiny/infer", b"{" + b" " * int(MAX_BODY_MB * 1024 * 1024 + 10) + b"}", {}, 413),
    "unknown route": ("GET", "/v2/nothing/here", None, {}, 404),
    "GET on infer": ("GET", "/v2/models/tiny/infer", None, {}, 405),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_request_gets_a_4xx_json_error(server, case):
    method, path, body, headers, status = BAD[case]
    if isinstance(body, tuple):
        body, headers = body
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    r = httpx.request(method, server.url + path, content=content, headers=headers or {}, timeout=30)
    assert r.status_code == status, r.text
    doc = r.json()
    assert set(doc) == {"error"} and isinstance(doc["error"], str) and doc["error"]
    assert "Traceback" not in doc["error"]
    assert httpx.get(server.url + "/v2/health/live").status_code == 200  # still up


def test_bad_requests_cover_ten_kinds():
    assert len(BAD) >= 10


def test_undecodable_image_says_why(server):
    r = httpx.post(server.url + "/v2/models/tiny/infer",
                   json={"inputs": [_tensor_entry([1], "BYTES", [_b64(_truncated_png())], "image_bytes")]})
    assert r.status_code == 400 and "image_bytes[0]" in r.json()["error"] and "truncated" in r.json()["error"].lower()


# -- limits ----------------------------------------------------------------------------------------------


def _slowed(monkeypatch, seconds: float) -> None:
    original = app_module.run_job

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    monkeypatch.setattr(app_module, "run_job", slow)


def test_full_queue_gets_503_and_the_server_recovers(bundles, images, monkeypatch):
    running, registry = _start({"tiny": bundles["tiny"]}, queue_size=1)
    try:
        _slowed(monkeypatch, 0.5)
        capacity = registry.get("tiny").worker.capacity
        body = {"inputs": [_tensor_entry([1], "BYTES", [_b64(images[0].read_bytes())], "image_bytes")]}
        codes: list[int] = []

        def post() -> None:
            codes.append(httpx.post(running.url + "/v2/models/tiny/infer", json=body, timeout=30).status_code)

        threads = [threading.Thread(target=post) for _ in range(capacity + 4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert codes.count(200) >= 1 and codes.count(503) >= 4 and set(codes) <= {200, 503}, codes
        assert codes.count(200) <= capacity
        monkeypatch.undo()
        assert httpx.post(running.url + "/v2/models/tiny/infer", json=body).status_code == 200
        r = httpx.post(running.url + "/v2/models/tiny/infer", json=body)
        assert r.status_code == 200
    finally:
        running.stop()
        registry.close()


def test_request_timeout_gets_504(bundles, images, monkeypatch):
    running, registry = _start({"tiny": bundles["tiny"]}, timeout_s=0.2)
    try:
        _slowed(monkeypatch, 1.0)
        body = {"inputs": [_tensor_entry([1], "BYTES", [_b64(images[0].read_bytes())], "image_bytes")]}
        r = httpx.post(running.url + "/v2/models/tiny/infer", json=body, timeout=30)
        assert r.status_code == 504 and "timeout" in r.json()["error"]
    finally:
        running.stop()
        registry.close()


# -- observability ---------------------------------------------------------------------------------------


def test_metrics_count_requests_latency_and_decisions(server, client, images):
    client.infer("other", [_bytes_input([images[1].read_bytes()])])
    httpx.post(server.url + "/v2/models/other/infer", content=b"{bad")
    text = httpx.get(server.url + "/metrics").text
    assert 'ssn_edge_requests_total{code="200",model="other",route="infer"}' in text
    assert 'ssn_edge_requests_total{code="400",model="other",route="infer"}' in text
    assert 'ssn_edge_inference_seconds_bucket{le="0.002",model="other",version="1"}' in text
    assert 'ssn_edge_inference_seconds_count{model="other",version="1"}' in text
    assert "ssn_edge_decisions_total{" in text and 'model="other"' in text
    assert 'ssn_edge_in_flight{model="other",version="1"} 0.0' in text


def test_access_log_is_one_json_line_per_request(server, caplog):
    with caplog.at_level(logging.INFO, logger="ssn_edge.serve.access"):
        httpx.get(server.url + "/v2/models/tiny/ready")
        time.sleep(0.05)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "ssn_edge.serve.access"]
    assert any(d["path"] == "/v2/models/tiny/ready" and d["status"] == 200 and d["model"] == "tiny"
               and d["version"] == "1" and d["ms"] >= 0 for d in lines), lines


# -- the command ------------------------------------------------------------------------------------------


def test_serve_command_refuses_a_bad_bundle_in_one_line(tmp_path):
    from click.testing import CliRunner

    from cli import main

    result = CliRunner().invoke(main, ["serve", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error:") and "bundle directory not found" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["serve"])
    assert result.exit_code == 2 and "nothing to serve" in result.output


def test_serve_command_serves_until_terminated(bundles, images, predicted):
    """The real command in a subprocess: it listens on 127.0.0.1, answers, writes one JSON access line per
    request on stderr, and stops cleanly on SIGTERM."""
    import signal
    import subprocess
    import sys

    from ssn_edge.serve.server import free_port

    port = free_port()
    exe = Path(sys.executable).with_name("ssn-edge")
    proc = subprocess.Popen([str(exe), "serve", f"tiny={bundles['tiny']}", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        c = th.InferenceServerClient(f"127.0.0.1:{port}")
        r = c.infer("tiny", [_bytes_input([images[0].read_bytes()])])
        assert float(r.as_numpy("score")[0]) == predicted["tiny"][images[0].name].score
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal so a supervisor sees why the process ended
    assert proc.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in err, err
    assert f"listening on http://127.0.0.1:{port}" in out
    access = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(a["path"] == "/v2/models/tiny/infer" and a["status"] == 200 for a in access), err


def test_serve_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; import ssn_edge.serve.app, ssn_edge.serve.server, ssn_edge.serve.repository; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])

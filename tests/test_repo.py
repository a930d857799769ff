"""The model repository: OVMS layout and config.json (checked against OVMS's own config schema), versions, the
`repo add` command, and `serve --repo` serving every version of it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")

from serve_support import png_bytes, tiny_bundle  # noqa: E402

from ssn_edge.runtime.bundle import BundleError, load_bundle  # noqa: E402
from ssn_edge.serve import repository  # noqa: E402

# The part of OpenVINO Model Server's config schema that model_config_list entries must meet: MODELS_CONFIG_SCHEMA
# in openvinotoolkit/model_server src/schema.cpp (pipelines and custom loaders, which this repository never
# writes, left out; additionalProperties false as there, so a key OVMS does not know fails here as it would there).
OVMS_SCHEMA = {
    "definitions": {
        "model_config": {
            "type": "object",
            "required": ["config"],
            "properties": {
                "config": {
                    "type": "object",
                    "required": ["name", "base_path"],
                    "properties": {
                        "name": {"type": "string"},
                        "base_path": {"type": "string"},
                        "batch_size": {"type": ["integer", "string"], "minimum": 0},
                        "model_version_policy": {"type": "object"},
                        "shape": {"type": ["object", "string"]},
                        "nireq": {"type": "integer", "minimum": 0},
                        "target_device": {"type": "string"},
                        "plugin_config": {"type": "object"},
                        "stateful": {"type": "boolean"},
                        "idle_sequence_cleanup": {"type": "boolean"},
                        "low_latency_transformation": {"type": "boolean"},
                        "max_sequence_number": {"type": "integer", "minimum": 0},
                    },
                    "additionalProperties": False,
                },
            },
            "additionalProperties": False,
        },
    },
    "type": "object",
    "required": ["model_config_list"],
    "properties": {
        "model_config_list": {"type": "array", "items": {"$ref": "#/definitions/model_config"}},
        "pipeline_config_list": {"type": "array"},
        "custom_loader_config_list": {"type": "array"},
        "custom_node_library_config_list": {"type": "array"},
    },
    "additionalProperties": False,
}
# OVMS's model_version_policy forms (docs/model_version_policy.md): exactly one of these.
VERSION_POLICIES = ({"all": {}}, "latest", "specific")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("repo_bundles")
    return [tiny_bundle(root / f"b{i}", seed=i, image_threshold=0.5 + 0.1 * i) for i in range(3)]


@pytest.fixture
def repo(tmp_path, bundles) -> Path:
    r = tmp_path / "models"
    repository.add_bundle(r, bundles[0], "bottle")
    repository.add_bundle(r, bundles[1], "bottle")
    repository.add_bundle(r, bundles[2], "tile")
    return r


def test_layout_is_ovms_and_each_version_a_bundle(repo, bundles):
    assert sorted(p.name for p in (repo / "bottle").iterdir()) == ["1", "2"]
    for name, version, source in (("bottle", 1, bundles[0]), ("bottle", 2, bundles[1]), ("tile", 1, bundles[2])):
        folder = repo / name / str(version)
        # OVMS: one IR (any .xml + .bin) per numbered folder; the metadata beside it
        assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "model.bin", "model.xml"]
        opened = load_bundle(folder)  # checksums verified
        assert opened.precisions == ["fp32"] and opened.metadata.models["fp32"].xml == "model.xml"
        src = load_bundle(source).metadata
        assert opened.metadata.thresholds == src.thresholds and opened.metadata.input == src.input
        assert (folder / "model.bin").read_bytes() == (source / "model_fp32.bin").read_bytes()


def test_config_json_meets_the_ovms_schema(repo):
    jsonschema = pytest.importorskip("jsonschema")
    config = json.loads((repo / "config.json").read_text())
    jsonschema.validate(config, OVMS_SCHEMA)
    entries = {e["config"]["name"]: e["config"] for e in config["model_config_list"]}
    assert set(entries) == {"bottle", "tile"}
    for name, cfg in entries.items():
        assert (repo / cfg["base_path"]).resolve() == (repo / name).resolve()  # relative to config.json
        assert cfg["model_version_policy"] in VERSION_POLICIES[:1]
        assert cfg["plugin_config"] == {"INFERENCE_PRECISION_HINT": "f32"}  # never silently bf16


def test_schema_check_is_real(repo):
    jsonschema = pytest.importorskip("jsonschema")
    config = json.loads((repo / "config.json").read_text())
    config["model_config_list"][0]["config"]["metadata"] = "x"  # a key OVMS does not know
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, OVMS_SCHEMA)
    del config["model_config_list"][0]["config"]["metadata"]
    del config["model_config_list"][0]["config"]["base_path"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, OVMS_SCHEMA)


def test_partial_folders_are_not_versions_and_a_broken_one_is_never_overwritten(repo, bundles):
    (repo / "bottle" / ".3.abc.partial").mkdir()  # what an interrupted add leaves
    assert [v.version for v in repository.versions(repo, "bottle")] == [1, 2]
    (repo / "bottle" / "3").mkdir()  # a numbered folder without metadata (another tool's half copy)
    with pytest.raises(BundleError, match="not a finished version"):
        repository.add_bundle(repo, bundles[0], "bottle")


def test_add_refuses_bad_names_and_absent_precisions(tmp_path, bundles):
    with pytest.raises(ValueError, match="model name"):
        repository.add_bundle(tmp_path / "r", bundles[0], "../escape")
    with pytest.raises(BundleError, match="no int8 model"):
        repository.add_bundle(tmp_path / "r", bundles[0], "ok", precision="int8")
    assert not (tmp_path / "r" / "ok").exists()


def test_repo_add_command(tmp_path, bundles):
    from click.testing import CliRunner

    from cli import main

    r = tmp_path / "models"
    first = CliRunner().invoke(main, ["repo", "add", str(r), str(bundles[0]), "--name", "bottle"])
    second = CliRunner().invoke(main, ["repo", "add", str(r), str(bundles[1]), "--name", "bottle"])
    assert first.exit_code == 0 and "bottle version 1" in first.output
    assert second.exit_code == 0 and "bottle version 2" in second.output
    bad = CliRunner().invoke(main, ["repo", "add", str(r), str(tmp_path / "nope"), "--name", "bottle"])
    assert bad.exit_code == 2 and bad.output.startswith("error:") and "Traceback" not in bad.output


def test_serve_repo_serves_every_version(repo, bundles):
    pytest.importorskip("fastapi", reason="the serving extra is not installed: pip install -e '.[serve]'")
    httpx = pytest.importorskip("httpx")
    import base64

    from ssn_edge.runtime.engine import Engine
    from ssn_edge.runtime.preprocess import load_image_bytes, to_unit_float
    from ssn_edge.serve.registry import ServeOptions, build_registry
    from ssn_edge.serve.server import start_in_thread

    options = ServeOptions()
    registry = build_registry([], repo, options)
    running = start_in_thread(registry, options)
    try:
        image = png_bytes(3, 90, 90)
        body = {"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image).decode()]}]}
        scores = {}
        for path in ("bottle/versions/1", "bottle/versions/2", "bottle", "tile/versions/1"):
            r = httpx.post(f"{running.url}/v2/models/{path}/infer", json=body)
            assert r.status_code == 200, r.text
            scores[path] = r.json()["outputs"][0]["data"][0]
        pixels = to_unit_float(load_image_bytes(image, "x")[0])
        for path, source in (("bottle/versions/1", bundles[0]), ("bottle/versions/2", bundles[1]), ("tile/versions/1", bundles[2])):
            assert scores[path] == Engine(source, precision="fp32", mode="throughput").predict_image(pixels).score
        assert scores["bottle"] == scores["bottle/versions/2"] != scores["bottle/versions/1"]  # latest by default
        meta = httpx.get(f"{running.url}/v2/models/bottle").json()
        assert meta["versions"] == ["1", "2"] and meta["parameters"]["image_threshold"] == pytest.approx(0.6)
        assert httpx.get(f"{running.url}/v2/models/bottle/versions/3").status_code == 404
    finally:
        running.stop()
        registry.close()
    assert np.isfinite(list(scores.values())).all()

"""train-many on local Ray (2 CPUs): three tiny synthetic products trained, exported and added to the model
repository; a second run with a fourth product added trains only that one. One Ray session for the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray", reason="the fleet extra is not installed: pip install -e '.[fleet]'")
pytest.importorskip("torch")

from conftest import tiny_recipe_dict  # noqa: E402

from ssn_edge.fleet.plan import PlanError, load_plan  # noqa: E402
from ssn_edge.fleet.run import summary_table, train_many  # noqa: E402
from ssn_edge.runtime.bundle import load_bundle  # noqa: E402
from ssn_edge.serve import repository  # noqa: E402


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=80 * 1024 * 1024)
    yield
    ray.shutdown()


def _ensemble_recipe(data: Path) -> dict:
    """A tiled ensemble of 4 locations (32 px tiles of the 64 px images): each location a Ray task."""
    return {**tiny_recipe_dict(data), "tiling": {"tile": [32, 32], "stride": [32, 32], "mode": "ensemble"}}


def _plan(folder: Path, data: Path, names: list[str], ensemble: str | None = None) -> Path:
    recipe = tiny_recipe_dict(data)
    jobs = [{"name": n, "set": {"train.seed": i}} for i, n in enumerate(names)]
    if ensemble:
        jobs.append({"name": ensemble, "recipe": _ensemble_recipe(data)})
    plan = {
        "repo": "models",
        "work": "work",
        "defaults": {"recipe": recipe, "cpus": 1, "export": {"threshold_data": str(data)}},
        "jobs": jobs,
    }
    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


@pytest.mark.slow
def test_train_many_trains_publishes_and_resumes(ray_session, tmp_path, tiny_dataset):
    products = ["bottle", "tile", "screw"]
    plan = load_plan(_plan(tmp_path, tiny_dataset, products))
    first = train_many(plan)
    assert [(o.name, o.status, o.version) for o in first] == [(n, "trained", 1) for n in products], summary_table(first)
    assert set(repository.models(plan.repo)) == set(products)
    for name in products:
        bundle = load_bundle(plan.repo / name / "1")  # checksums verified
        assert bundle.precisions == ["fp32"]
        marker = json.loads((plan.work / name / "done.json").read_text())
        assert marker["version"] == 1 and marker["digest"] == next(j.digest for j in plan.jobs if j.name == name)
    config = json.loads((plan.repo / "config.json").read_text())
    assert sorted(e["config"]["name"] for e in config["model_config_list"]) == sorted(products)

    # a fourth product, a tiled ensemble: its 4 locations train as tasks of their own, then it is assembled
    plan2 = load_plan(_plan(tmp_path, tiny_dataset, products, ensemble="gear"))
    second = train_many(plan2)
    assert [(o.name, o.status) for o in second] == [(n, "kept") for n in products] + [("gear", "trained")]
    assert all(len(repository.versions(plan2.repo, n)) == 1 for n in products + ["gear"])  # nothing retrained
    table = summary_table(second)
    assert "gear" in table and table.count("kept") == 3
    gear = plan2.jobs[-1]
    train_dir = plan2.work / "gear" / gear.digest[:12] / "train"
    assert sorted(p.parent.name for p in train_dir.glob("loc_*/checkpoint.pt")) == [f"loc_0{k}" for k in range(4)]
    # each location came back from a task of its own before the job's task assembled and exported the model
    assert json.loads((plan2.work / "gear" / "done.json").read_text())["locations"] == [f"loc_0{k}" for k in range(4)]
    tiled = load_bundle(plan2.repo / "gear" / "1")
    assert tiled.tiling is not None and tiled.tiling.mode == "ensemble"
    _serve_tiled(plan2.repo)

    from click.testing import CliRunner

    from cli import main

    again = CliRunner().invoke(main, ["train-many", str(plan2.path)])  # everything finished: nothing runs
    assert again.exit_code == 0, again.output
    assert again.output.count(": kept (version 1)") == 4 and "img AUROC" in again.output


def _serve_tiled(repo: Path) -> None:
    """The embedded server takes the ensemble's encoded images, and refuses its IR tensor with a 400."""
    pytest.importorskip("fastapi", reason="the serving extra is not installed")
    httpx = pytest.importorskip("httpx")
    import base64

    from serve_support import png_bytes

    from ssn_edge.serve.registry import ServeOptions, build_registry
    from ssn_edge.serve.server import start_in_thread

    registry = build_registry([], repo, ServeOptions())
    running = start_in_thread(registry, ServeOptions())
    try:
        image = base64.b64encode(png_bytes(0, 64, 64)).decode()
        r = httpx.post(f"{running.url}/v2/models/gear/infer",
                       json={"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [image]}]})
        assert r.status_code == 200, r.text
        name = registry.get("gear").input_name
        r = httpx.post(f"{running.url}/v2/models/gear/infer",
                       json={"inputs": [{"name": name, "shape": [1, 3, 64, 64], "datatype": "FP32", "data": [0.0] * 12288}]})
        assert r.status_code == 400 and "tiled" in r.json()["error"]
    finally:
        running.stop()
        registry.close()


def test_a_changed_entry_is_not_kept(tmp_path, tiny_dataset):
    a = load_plan(_plan(tmp_path, tiny_dataset, ["bottle"]))
    path = _plan(tmp_path, tiny_dataset, ["bottle"])
    doc = yaml.safe_load(path.read_text())
    doc["jobs"][0]["set"]["train.epochs"] = 2
    path.write_text(yaml.safe_dump(doc))
    b = load_plan(path)
    assert a.jobs[0].digest != b.jobs[0].digest
    assert load_plan(_plan(tmp_path, tiny_dataset, ["bottle"])).jobs[0].digest == a.jobs[0].digest  # stable


@pytest.mark.parametrize("change, message", [
    ({"jobs": [{"name": "a", "set": {"train.nope": 1}}]}, "unknown recipe key 'train.nope'"),
    ({"jobs": [{"name": "a", "export": {"int9": True}}]}, "unknown export option"),
    ({"jobs": [{"name": "a"}, {"name": "a"}]}, "given twice"),
    ({"jobs": [{"name": "a", "cpus": 0}]}, "cpus must be"),
    ({"jobs": [{"name": "../x"}]}, "model name"),
    ({"jobs": []}, "non-empty 'jobs'"),
    ({"jobs": [{"name": "a", "colour": 1}]}, "unknown key"),
])
def test_bad_plans_fail_before_anything_runs(tmp_path, tiny_dataset, change, message):
    doc = {"defaults": {"recipe": tiny_recipe_dict(tiny_dataset)}, **change}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_plan(path)


def test_train_many_command_without_a_plan_is_one_line(tmp_path):
    from click.testing import CliRunner

    from cli import main

    result = CliRunner().invoke(main, ["train-many", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "plan file not found" in result.output and "Traceback" not in result.output

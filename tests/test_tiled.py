"""Tiled training, export and runtime end to end on tiny synthetic data (spec 6)."""

from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest
import torch

from conftest import tiny_recipe_dict
from ssn_edge.config import recipe_from_dict
from ssn_edge.evaluation.job import split_arrays
from ssn_edge.train.job import train_job


def _tiled_recipe(data, mode: str, **tiling):
    d = tiny_recipe_dict(data)
    d["tiling"] = {"tile": [32, 32], "stride": [16, 16], "mode": mode, **tiling}
    return recipe_from_dict(d)


@pytest.fixture(scope="module")
def ensemble_run(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ensemble")
    result = train_job(_tiled_recipe(tiny_dataset, "ensemble"), out, progress=False)
    return out, result


@pytest.fixture(scope="module")
def single_run(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    recipe = _tiled_recipe(tiny_dataset, "single", shared_backbone=False, resize=False)
    return out, train_job(recipe, out, progress=False)


def test_ensemble_has_one_trained_model_per_location(ensemble_run):
    from ssn_edge.model.checkpoint import load_checkpoint

    out, result = ensemble_run
    record = load_checkpoint(result.checkpoint)
    assert record.kind == "tiled" and len(record.tiled.heads) == 9 and record.heads is None
    assert sorted(p.name for p in out.glob("loc_*")) == [f"loc_{k:02d}" for k in range(9)]
    w0 = record.tiled.heads[0]["adaptor.weight"]
    assert not torch.equal(w0, record.tiled.heads[4]["adaptor.weight"])  # each location trained on its own tiles
    assert {"image_auroc", "pixel_aupro"} <= set(result.metrics)


def test_tiled_training_resumes_by_keeping_finished_locations(ensemble_run, tiny_dataset):
    out, result = ensemble_run
    kept = out / "loc_00" / "checkpoint.pt"
    before = kept.stat().st_mtime_ns
    (out / "loc_08" / "checkpoint.pt").unlink()
    again = train_job(_tiled_recipe(tiny_dataset, "ensemble"), out, progress=False)
    assert kept.stat().st_mtime_ns == before
    assert (out / "loc_08" / "checkpoint.pt").is_file() and again.checkpoint.is_file()


def test_shared_backbone_differs_from_independent_tiles_only_through_context(ensemble_run, tiny_dataset):
    """Same weights both ways; with a backbone that sees no context (1x1 'image') they would be equal, so
    check the plumbing instead: a tile whose crop is the whole image gives identical outputs."""
    from ssn_edge.evaluation.evaluate import predict_tiled_raw
    from ssn_edge.model.load import tiled_from_checkpoint

    _, result = ensemble_run
    model, recipe, _ = tiled_from_checkpoint(result.checkpoint)
    arrays = split_arrays(tiny_dataset, "test", (64, 64), progress=False)
    shared, s_logits = predict_tiled_raw(model, arrays.images[:2], "image")
    independent, i_logits = predict_tiled_raw(model, arrays.images[:2], "tiles")
    assert shared.shape == independent.shape == (2, 9, 8, 8)
    assert np.isfinite(shared).all() and not np.allclose(shared, independent)  # borders see different context
    one = dataclasses.replace(model.tiling, tile=(64, 64), stride=(64, 64), locations=1, mode="single")
    model.tiling, model.boxes, model.heads = one, one.grid((64, 64)).boxes, model.heads[:1]
    a, _ = predict_tiled_raw(model, arrays.images[:2], "image")
    b, _ = predict_tiled_raw(model, arrays.images[:2], "tiles")
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_tiled_model_gates_each_tiles_map_by_that_tiles_score(ensemble_run, tiny_dataset):
    """model.map_gate chosen at load time reaches every location's heads, in both graphs."""
    import torch

    from ssn_edge.evaluation.evaluate import predict_tiled_raw

    from ssn_edge.model.load import tiled_from_checkpoint

    _, result = ensemble_run
    plain, _, _ = tiled_from_checkpoint(result.checkpoint)
    gated, _, _ = tiled_from_checkpoint(result.checkpoint, map_gate="score")
    x = split_arrays(tiny_dataset, "test", (64, 64), progress=False).images[:2]
    for graph in ("image", "tiles"):
        m, s = predict_tiled_raw(plain, x, graph)
        g, s_gated = predict_tiled_raw(gated, x, graph)
        np.testing.assert_array_equal(s, s_gated)
        logsig = lambda v: torch.nn.functional.logsigmoid(torch.from_numpy(v)).numpy()  # noqa: E731
        np.testing.assert_allclose(g, logsig(m) + logsig(s)[..., None, None], atol=1e-5)


def test_ensemble_export_and_runtime_match_torch(ensemble_run, tiny_dataset, tmp_path):
    from ssn_edge.export.exporter import ExportOptions, export_bundle
    from ssn_edge.runtime.engine import Engine
    from ssn_edge.runtime.preprocess import read_image
    from ssn_edge.evaluation.evaluate import merged_predictions, predict_tiled_raw
    from ssn_edge.model.load import tiled_from_checkpoint

    _, result = ensemble_run
    bundle = export_bundle(result.checkpoint, tmp_path / "bundle", ExportOptions(int8=True))
    assert bundle.tiling.graph == "image" and bundle.tiling.locations == 9
    assert bundle.metadata.tiling.heads_trained_on == "shared_backbone"
    assert set(bundle.precisions) == {"fp32", "int8"}
    model, _, _ = tiled_from_checkpoint(result.checkpoint)
    arrays = split_arrays(tiny_dataset, "test", (64, 64), progress=False)
    raw, logits = predict_tiled_raw(model, arrays.images, "image")
    scores, maps = merged_predictions(model.tiling, raw, logits)
    engine = Engine(bundle, precision="fp32")
    for i in (0, len(arrays) - 1):
        pred = engine.predict_image(read_image(arrays.paths[i]), arrays.paths[i])
        assert pred.score == pytest.approx(float(scores[i]), abs=1e-4)
        np.testing.assert_allclose(pred.anomaly_map, maps[i], atol=1e-3)
    int8 = Engine(bundle, precision="int8").predict_image(read_image(arrays.paths[0]))
    assert np.isfinite(int8.score) and int8.anomaly_map.shape == (64, 64)


def test_single_model_tiles_any_image_size_and_streams_its_map(single_run, tmp_path, monkeypatch):
    from ssn_edge.export.exporter import export_bundle
    from ssn_edge.runtime import tiled
    from ssn_edge.runtime.predict import predict_paths

    _, result = single_run
    bundle = export_bundle(result.checkpoint, tmp_path / "bundle")
    assert bundle.tiling.graph == "tile" and bundle.tiling.image_size is None
    rng = np.random.default_rng(0)
    big = tmp_path / "big.png"
    cv2.imwrite(str(big), rng.integers(0, 256, size=(150, 130, 3), dtype=np.uint8))  # not a multiple of the tile
    (pred,) = predict_paths(bundle.path, [big], tmp_path / "out", precision="fp32", save_maps=True, overlays=True)
    assert pred.anomaly_map.shape == (150, 130) and pred.map_scale == 1
    streamed = np.load(tmp_path / "out" / "maps" / "big.npy")
    np.testing.assert_allclose(streamed.astype(np.float32), pred.anomaly_map, atol=2e-2, rtol=1e-3)
    assert (tmp_path / "out" / "overlays" / "big.png").is_file()
    # Above the full-map limit only a preview is kept: the block means of the same map, and the same max.
    monkeypatch.setattr(tiled, "FULL_MAP_PIXELS", 100)
    monkeypatch.setattr(tiled, "PREVIEW_SIDE", 40)
    (small,) = predict_paths(bundle.path, [big], tmp_path / "out2", precision="fp32")
    f = small.map_scale
    assert f == 4 and small.anomaly_map.shape == (38, 33)
    padded = np.pad(pred.anomaly_map, ((0, -150 % f), (0, -130 % f)), mode="edge")
    np.testing.assert_allclose(small.anomaly_map, padded.reshape(38, f, 33, f).mean(axis=(1, 3)), atol=1e-5)
    assert small.map_max == pytest.approx(pred.map_max, abs=1e-5) and small.score == pytest.approx(pred.score, abs=1e-6)


def test_shared_backbone_tiles_must_fit_the_feature_grid(tiny_dataset, tmp_path):
    from ssn_edge.model.tiled import runtime_tiling

    recipe = _tiled_recipe(tiny_dataset, "ensemble")
    recipe.tiling = dataclasses.replace(recipe.tiling, tile=(24, 24), stride=(20, 20))
    with pytest.raises(ValueError, match="multiples of 16"):
        runtime_tiling(recipe)


def test_report_on_a_tiled_bundle(ensemble_run, tiny_dataset, tmp_path):
    from ssn_edge.export.exporter import export_bundle
    from ssn_edge.report.build import build_report

    _, result = ensemble_run
    bundle = export_bundle(result.checkpoint, tmp_path / "bundle")
    report = build_report(bundle.path, data_path=str(tiny_dataset), checkpoint=result.checkpoint, runs=1, throughput_seconds=0)
    records = {(r["runtime"], r["precision"]): r for r in report.records}
    assert ("torch", "fp32") in records and ("openvino", "fp32") in records
    torch_rec, ov_rec = records[("torch", "fp32")], records[("openvino", "fp32")]
    assert ov_rec["image_auroc"] == pytest.approx(torch_rec["image_auroc"], abs=1e-6)
    assert ov_rec["score_max_abs_diff"] < 1e-4  # (a flip is possible here: the threshold is one of these scores)
    html = report.report_html.read_text()
    assert "ensemble (9 model(s))" in html


def test_bmp_frames_are_read_in_strips_with_the_same_result(single_run, tmp_path, monkeypatch):
    from ssn_edge.export.exporter import export_bundle
    from ssn_edge.runtime import preprocess
    from ssn_edge.runtime.predict import predict_paths

    _, result = single_run
    bundle = export_bundle(result.checkpoint, tmp_path / "bundle")
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, size=(150, 130, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "frame.bmp"), frame)
    cv2.imwrite(str(tmp_path / "frame.png"), frame)
    calls = []
    real_rows = preprocess.BmpStrips.rows
    monkeypatch.setattr(preprocess.BmpStrips, "rows", lambda self, y0, y1: calls.append(y1 - y0) or real_rows(self, y0, y1))
    (from_bmp,) = predict_paths(bundle.path, [tmp_path / "frame.bmp"], tmp_path / "a", precision="fp32")
    (from_png,) = predict_paths(bundle.path, [tmp_path / "frame.png"], tmp_path / "b", precision="fp32")
    assert calls and max(calls) <= 32  # one row of 32-pixel tiles at a time, never the whole frame
    assert from_bmp.score == pytest.approx(from_png.score, abs=1e-6)
    np.testing.assert_allclose(from_bmp.anomaly_map, from_png.anomaly_map, atol=1e-5)
    (tmp_path / "cut.bmp").write_bytes((tmp_path / "frame.bmp").read_bytes()[:-500])
    with pytest.raises(preprocess.ImageError, match="cut.bmp"):
        predict_paths(bundle.path, [tmp_path / "cut.bmp"], tmp_path / "c", precision="fp32")


def test_shared_backbone_training_features_are_the_shared_graphs_crops(tiny_dataset):
    """Item r of a shared-backbone training set gets the crop of its whole image's maps that the "image" graph
    gives location boxes[r % T] at inference: not the maps of the tile run alone."""
    from ssn_edge.model.ssn import SuperSimpleNet
    from ssn_edge.model.tiled import crop_features
    from ssn_edge.train.features import FeatureSource, SharedFeatures

    recipe = _tiled_recipe(tiny_dataset, "ensemble")
    model = SuperSimpleNet(recipe.model).eval()
    arrays = split_arrays(tiny_dataset, "test", (64, 64), progress=False)
    images = arrays.images[:2]
    boxes = [(0, 0, 32, 32), (16, 32, 48, 64)]
    items = np.array([[r, 0] for r in range(4)])  # image 0 box 0, image 0 box 1, image 1 box 0, image 1 box 1
    with torch.no_grad():
        source = FeatureSource(model, arrays, items, cache=True, shared=SharedFeatures(images, boxes))
        l2, l3 = source.get(items[::-1].copy())
        w2, w3 = model.features.raw(torch.from_numpy(images))
        alone2, _ = model.features.raw(torch.from_numpy(np.ascontiguousarray(images[1:, :, 16:48, 32:64])))
    for k, r in enumerate(items[::-1, 0]):
        c2, c3 = crop_features(w2[r // 2], w3[r // 2], boxes[r % 2])
        assert torch.equal(l2[k], c2) and torch.equal(l3[k], c3)
    assert not torch.allclose(l2[0], alone2[0], atol=1e-3)  # a lone tile would have given other maps


def test_flipped_box_mirrors_the_tile_with_its_context():
    from ssn_edge.train.features import flipped_box

    assert flipped_box((0, 16, 32, 48), (False, False), (64, 80)) == (0, 16, 32, 48)
    assert flipped_box((0, 16, 32, 48), (True, False), (64, 80)) == (32, 16, 64, 48)
    assert flipped_box((0, 16, 32, 48), (False, True), (64, 80)) == (0, 32, 32, 64)


def test_tiled_run_records_which_features_its_heads_learned_on(ensemble_run, tiny_dataset, tmp_path):
    from ssn_edge.model.checkpoint import load_checkpoint

    out, result = ensemble_run
    assert load_checkpoint(result.checkpoint).tiled.trained_on == "shared_backbone"
    with pytest.raises(ValueError, match="trained on shared_backbone features"):
        train_job(_tiled_recipe(tiny_dataset, "ensemble", shared_backbone=False), out, progress=False)


def test_a_tiled_checkpoint_records_its_supervision_as_a_plain_one_does(ensemble_run, tiny_dataset, tmp_path):
    """Regression: tiled checkpoints dropped the supervision record, so the bundle and report had none, and kept
    the recipe's setting unresolved ("auto")."""
    from ssn_edge.model.load import load_model

    _, result = ensemble_run
    sup = load_model(result.checkpoint).supervision
    assert sup is not None and (sup["setting"], sup["normal"], sup["source"]) == ("unsupervised", 4, "recipe")  # 4 held out
    d = tiny_recipe_dict(tiny_dataset)
    d["train"]["setting"] = "auto"
    d["tiling"] = {"tile": [32, 32], "stride": [32, 32], "shared_backbone": False}
    auto = load_model(train_job(recipe_from_dict(d), tmp_path / "auto", progress=False, evaluate=False).checkpoint)
    assert auto.tiled and auto.recipe.train.setting == "unsupervised"
    assert auto.supervision["setting"] == "unsupervised" and auto.supervision["source"] == "data"


def test_a_tiled_checkpoint_records_the_precision_that_trained_and_says_it_once(tiny_dataset, tmp_path, monkeypatch,
                                                                                  caplog):
    from ssn_edge.model.checkpoint import load_checkpoint
    from ssn_edge.train import schedule

    monkeypatch.setattr(schedule, "native_bf16", lambda: False)
    d = tiny_recipe_dict(tiny_dataset)
    d["tiling"] = {"tile": [32, 32], "stride": [32, 32], "shared_backbone": False}
    with caplog.at_level("WARNING", logger="ssn_edge"):
        result = train_job(recipe_from_dict(d), tmp_path / "run", progress=False, evaluate=False)
    assert load_checkpoint(result.checkpoint).recipe["train"]["precision"] == "fp32"
    locations = sorted((tmp_path / "run").glob("*/checkpoint.pt"))
    assert locations and {load_checkpoint(c).recipe["train"]["precision"] for c in locations} == {"fp32"}
    assert caplog.text.count("no native bf16") == 1


def test_bench_frame_times_a_tiled_bundle_beside_its_tile_model(single_run, tmp_path):
    """`ssn-edge bench BUNDLE --frame WxH`: frame latency, MP/s, the tile model's images/s and the overhead
    ratio (tiles / images/s / latency) in one run; refused for a plain bundle or a malformed size."""
    from click.testing import CliRunner

    import cli
    from ssn_edge.export.exporter import export_bundle
    from ssn_edge.runtime.bench import bench_frames, parse_frame_size

    assert parse_frame_size("5472x3648") == (3648, 5472) and parse_frame_size("2048") == (2048, 2048)
    for bad in ("12xa", "0x5", ""):
        with pytest.raises(ValueError, match="frame"):
            parse_frame_size(bad)
    _, result = single_run
    bundle = export_bundle(result.checkpoint, tmp_path / "bundle")
    (rec,) = bench_frames(bundle.path, [(70, 100)], ["fp32"], runs=2, throughput_seconds=0.3)
    assert rec["tiles"] == bundle.tiling.grid((70, 100)).count and rec["frame"] == [100, 70]
    assert rec["megapixels_per_s"] == pytest.approx(70 * 100 / 1e6 / (rec["latency_ms"] / 1e3))
    assert rec["ratio"] == pytest.approx(rec["tiles"] / rec["model_throughput_ips"] / (rec["latency_ms"] / 1e3))
    assert rec["ratio_of"] == "tiled_vs_model_throughput"
    out = CliRunner().invoke(cli.main, ["bench", str(bundle.path), "--frame", "100x70", "--precision", "fp32",
                                        "--seconds", "0.2", "--json", str(tmp_path / "b.json")])
    assert out.exit_code == 0, out.output
    assert "100x70" in out.output and "ratio" in out.output
    assert json.loads((tmp_path / "b.json").read_text())["results"][0]["tiles"] == rec["tiles"]


def test_a_whole_image_graph_reads_large_bmp_frames_in_strips_with_the_same_result(ensemble_run, tmp_path, monkeypatch):
    """A shared-backbone bundle shrinks a BMP frame to its input a strip at a time (no whole-frame decode); a frame
    smaller than its input is decoded whole (it is enlarged, not shrunk)."""
    from ssn_edge.export.exporter import export_bundle
    from ssn_edge.runtime import preprocess
    from ssn_edge.runtime.predict import predict_paths

    _, result = ensemble_run
    bundle = export_bundle(result.checkpoint, tmp_path / "bundle")
    assert bundle.tiling.graph == "image" and bundle.tiling.image_size == (64, 64)
    rng = np.random.default_rng(2)
    calls = []
    real_rows = preprocess.BmpStrips.rows
    monkeypatch.setattr(preprocess.BmpStrips, "rows", lambda self, y0, y1: calls.append(y1 - y0) or real_rows(self, y0, y1))
    for name, shape in (("large", (300, 260, 3)), ("small", (50, 60, 3))):
        frame = rng.integers(0, 256, size=shape, dtype=np.uint8)
        cv2.imwrite(str(tmp_path / f"{name}.bmp"), frame)
        cv2.imwrite(str(tmp_path / f"{name}.png"), frame)
        calls.clear()
        (from_bmp,) = predict_paths(bundle.path, [tmp_path / f"{name}.bmp"], tmp_path / f"{name}_a", precision="fp32")
        (from_png,) = predict_paths(bundle.path, [tmp_path / f"{name}.png"], tmp_path / f"{name}_b", precision="fp32")
        assert (max(calls) <= 64) if name == "large" else not calls
        assert from_bmp.score == pytest.approx(from_png.score, abs=1e-5)
        assert from_bmp.anomaly_map.shape == shape[:2]
        np.testing.assert_allclose(from_bmp.anomaly_map, from_png.anomaly_map, atol=1e-4)

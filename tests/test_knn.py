"""The nearest-neighbour model family (model.kind knn): coreset, distances, fit, checkpoint, export, CLI.

Tiny synthetic data and a random-weight ResNet18 at 64x64 (tests/conftest.py): seconds, not minutes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import tiny_recipe_dict


def knn_recipe_dict(data: Path, **knn) -> dict:
    base = tiny_recipe_dict(data)
    return {"name": "tiny_knn", "data": base["data"], "model": {"kind": "knn", "pretrained": False},
            "knn": {"coreset": 0.5, **knn}, "train": {"seed": 0}}


def knn_recipe(data: Path, **knn):
    from ssn_edge.config import recipe_from_dict

    return recipe_from_dict(knn_recipe_dict(data, **knn))


@pytest.fixture(scope="module")
def train_arrays(tiny_dataset):
    from ssn_edge.evaluation.job import split_arrays

    return split_arrays(tiny_dataset, "train", (64, 64), progress=False)


@pytest.fixture(scope="module")
def test_arrays(tiny_dataset):
    from ssn_edge.evaluation.job import split_arrays

    return split_arrays(tiny_dataset, "test", (64, 64), progress=False)


@pytest.fixture(scope="module")
def knn_run(tmp_path_factory, tiny_dataset):
    from ssn_edge.train.job import train_job

    out = tmp_path_factory.mktemp("knn_run")
    return train_job(knn_recipe(tiny_dataset), out, progress=False)


# --- coreset and distances ------------------------------------------------------------------------------------


def test_greedy_coreset_takes_the_farthest_point_each_step():
    from ssn_edge.model.knn.bank import greedy_coreset

    points = torch.from_numpy(np.random.default_rng(0).standard_normal((300, 5)).astype(np.float32))
    chosen = greedy_coreset(points, 12, seed=3).numpy()
    assert len(set(chosen.tolist())) == 12
    p = points.double().numpy()
    for i in range(1, len(chosen)):  # k-center greedy: each pick maximises the distance to the picks before it
        nearest = np.min(((p[:, None, :] - p[None, chosen[:i], :]) ** 2).sum(-1), axis=1)
        assert nearest[chosen[i]] == pytest.approx(nearest.max(), rel=1e-5)
    assert np.array_equal(chosen, greedy_coreset(points, 12, seed=3).numpy())  # deterministic for a seed


def test_greedy_coreset_covers_every_cluster():
    from ssn_edge.model.knn.bank import greedy_coreset, random_subset

    rng = np.random.default_rng(1)
    centres = np.array([[0, 0], [100, 0], [0, 100], [100, 100]], dtype=np.float32)
    sizes = [500, 20, 20, 20]  # a random draw of 4 mostly misses the small clusters; k-center never does
    points = np.concatenate([c + rng.standard_normal((n, 2)).astype(np.float32) for c, n in zip(centres, sizes)])
    cluster = np.repeat(np.arange(4), sizes)
    assert sorted(cluster[greedy_coreset(torch.from_numpy(points), 4, seed=0).numpy()]) == [0, 1, 2, 3]
    assert len(set(cluster[random_subset(len(points), 4, seed=0).numpy()])) < 4


def test_greedy_coreset_refuses_an_impossible_size():
    from ssn_edge.model.knn.bank import greedy_coreset

    with pytest.raises(ValueError, match="needs 1 <= k <= 10"):
        greedy_coreset(torch.zeros(10, 2), 11, seed=0)


def test_graph_distances_equal_brute_force_numpy(monkeypatch):
    import ssn_edge.model.knn.bank as bank_mod
    from ssn_edge.model.knn import KnnHead, Standardizer

    rng = np.random.default_rng(2)
    bank = rng.standard_normal((50, 16)).astype(np.float32)
    feats = rng.standard_normal((3, 16, 4, 5)).astype(np.float32)
    q = feats.transpose(0, 2, 3, 1).reshape(-1, 16).astype(np.float64)
    truth = np.sqrt(((q[:, None, :] - bank[None].astype(np.float64)) ** 2).sum(-1).min(1)).reshape(3, 1, 4, 5)
    head = KnnHead(torch.from_numpy(bank), Standardizer(1.5, 2.0), Standardizer(-1.0, 0.5))
    d = head.distances(torch.from_numpy(feats)).numpy()
    np.testing.assert_allclose(d, truth, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(bank_mod, "BLOCK_FLOATS", 120)  # 2 query rows per block: the blocked path, same numbers
    np.testing.assert_allclose(head.distances(torch.from_numpy(feats)).numpy(), d, rtol=1e-6, atol=1e-6)
    map_z, score_z = head(torch.from_numpy(feats))
    np.testing.assert_allclose(map_z.numpy(), (truth - 1.5) / 2.0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(score_z.numpy(), (truth.reshape(3, -1).max(1) + 1.0) / 0.5, rtol=1e-5, atol=1e-5)


def test_map_averages_the_k_nearest_distances_and_the_score_takes_the_nearest(monkeypatch):
    """knn.neighbours: the map is the mean distance to the k nearest bank rows, the score the largest nearest one;
    eager (blocked or not) and traced alike, against brute force."""
    import ssn_edge.model.knn.bank as bank_mod
    from ssn_edge.model.knn import KnnHead, Standardizer

    rng = np.random.default_rng(3)
    bank = rng.standard_normal((40, 8)).astype(np.float32)
    feats = rng.standard_normal((2, 8, 3, 4)).astype(np.float32)
    q = feats.transpose(0, 2, 3, 1).reshape(-1, 8).astype(np.float64)
    d = np.sort(np.sqrt(((q[:, None, :] - bank[None].astype(np.float64)) ** 2).sum(-1)), axis=1)
    truth_map, truth_score = d[:, :3].mean(1).reshape(2, 1, 3, 4), d[:, 0].reshape(2, -1).max(1)
    head = KnnHead(torch.from_numpy(bank), Standardizer(0.0, 1.0), Standardizer(0.0, 1.0), neighbours=3)
    x = torch.from_numpy(feats)
    traced = torch.jit.trace(head, x)  # the graph's path (one MatMul, TopK)
    monkeypatch.setattr(bank_mod, "BLOCK_FLOATS", 80)  # 2 query rows per block
    for m, s in (head(x), traced(x)):
        np.testing.assert_allclose(m.numpy(), truth_map, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s.numpy(), truth_score, rtol=1e-5, atol=1e-5)
    assert KnnHead(torch.from_numpy(bank[:2]), Standardizer(0, 1), Standardizer(0, 1), neighbours=5).neighbours == 2


def test_benchmarked_reweighted_score_is_patchcore_eq7():
    """knn_bench's re-weighted score (a measured lever, not the graph's): the largest nearest distance s* times
    1 - softmax(distances of its patch to the b bank rows nearest its nearest bank row m*, m* first)[0]."""
    from benchmarks.knn_bench import reweighted_scores
    from ssn_edge.model.knn import KnnHead, Standardizer

    rng = np.random.default_rng(5)
    bank = rng.standard_normal((30, 6)).astype(np.float32)
    feats = rng.standard_normal((3, 6, 2, 5)).astype(np.float32)
    head = KnnHead(torch.from_numpy(bank), Standardizer(0.0, 1.0), Standardizer(0.0, 1.0))
    b64 = bank.astype(np.float64)
    for support in (3, 9):
        expected = []
        for f in feats:
            q = f.reshape(6, -1).T.astype(np.float64)
            d = np.sqrt(((q[:, None] - b64[None]) ** 2).sum(-1))
            p = d.min(1).argmax()
            m = d[p].argmin()
            rows = np.argsort(((b64 - b64[m]) ** 2).sum(1))[:support]
            e = np.exp(d[p, rows] - d[p, rows].max())
            expected.append((1 - e[0] / e.sum()) * d[p].min())
        np.testing.assert_allclose(reweighted_scores(head, torch.from_numpy(feats), support), expected, rtol=1e-4)
    # a lone nearest bank row (its neighbours far from the patch) keeps nearly all of s*, a crowded one loses 1/b
    lone = np.array([[0.0, 0.0], [30.0, 0.0], [0.0, 30.0]], np.float32)
    crowd = np.array([[0.0, 0.0], [0.0, 0.01], [0.01, 0.0]], np.float32)
    x = torch.tensor([[[[3.0]], [[4.0]]]])  # one patch at (3, 4): s* = 5 from the origin row, in both banks
    unit = Standardizer(0.0, 1.0)
    w_lone, w_crowd = (reweighted_scores(KnnHead(torch.from_numpy(b), unit, unit), x, 3)[0] / 5 for b in (lone, crowd))
    assert w_lone > 0.99 and abs(w_crowd - 2 / 3) < 0.01


def test_channel_pool_matrix_is_adaptive_average_pooling():
    from ssn_edge.model.knn.features import channel_pool_matrix

    x = torch.randn(7, 10)
    expected = torch.nn.functional.adaptive_avg_pool1d(x[:, None, :], 4)[:, 0]
    torch.testing.assert_close(x @ channel_pool_matrix(10, 4).T, expected)
    with pytest.raises(ValueError, match="knn.channels"):
        channel_pool_matrix(10, 11)


# --- fitting ---------------------------------------------------------------------------------------------------


def test_fit_is_deterministic_for_a_seed(tiny_dataset, train_arrays):
    from ssn_edge.config import apply_overrides
    from ssn_edge.train.knn import fit_knn

    recipe = knn_recipe(tiny_dataset)
    a, fit = fit_knn(recipe, train_arrays, progress=False)
    b, _ = fit_knn(recipe, train_arrays, progress=False)
    c, _ = fit_knn(apply_overrides(recipe, {"train.seed": 1}), train_arrays, progress=False)
    assert torch.equal(a.head.bank, b.head.bank) and torch.equal(a.head.map_std, b.head.map_std)
    assert not torch.equal(a.head.bank, c.head.bank)
    # 8 normal images: 2 held out (a quarter), 6 x 8 x 8 patches banked, half of them kept (coreset 0.5)
    assert (fit.normal_images, fit.held_out_images, fit.patches, fit.bank) == (8, 2, 384, 192)


def test_fit_memory_is_bounded_by_the_pool(tiny_dataset, train_arrays):
    from ssn_edge.train.knn import candidate_patches

    cfg = knn_recipe(tiny_dataset, pool=60, batch=4).knn
    seen = []

    def features(idx):
        seen.append(len(idx))
        return torch.randn(len(idx), 5, 8, 8)

    candidates, total = candidate_patches(features, np.arange(6), cfg, seed=0)
    assert total == 6 * 64
    assert candidates.shape == (60, 5)  # 10 random patches of each image, never more than the pool
    assert max(seen) <= 4  # features come a batch at a time, never the whole set


def test_bank_size_is_a_fraction_or_a_count_capped_by_the_pool(tiny_dataset):
    from ssn_edge.train.knn import bank_size

    assert bank_size(knn_recipe(tiny_dataset, coreset=0.1).knn, patches=1000, candidates=500) == 100
    assert bank_size(knn_recipe(tiny_dataset, coreset=300).knn, patches=1000, candidates=500) == 300
    assert bank_size(knn_recipe(tiny_dataset, coreset=900).knn, patches=1000, candidates=500) == 500


def test_fit_ignores_defective_training_images(tiny_dataset, train_arrays):
    from ssn_edge.train.knn import fit_knn

    labels = train_arrays.labels.copy()
    labels[:4] = 1  # as if half the training images were defective: only the other 4 may reach the bank
    arrays = dataclasses.replace(train_arrays, labels=labels)
    model, fit = fit_knn(knn_recipe(tiny_dataset, coreset=1.0), arrays, progress=False)
    assert fit.normal_images == 4 and fit.held_out_images == 1
    with torch.no_grad():
        normal_patches = model.features(torch.from_numpy(train_arrays.images[4:]))
    banked = normal_patches.flatten(2).transpose(1, 2).reshape(-1, normal_patches.shape[1])
    dist = torch.cdist(model.head.bank, banked, compute_mode="donot_use_mm_for_euclid_dist").amin(1)
    assert float(dist.max()) < 1e-4  # every bank row is a patch of a normal image


# --- checkpoint, evaluation, export ---------------------------------------------------------------------------


def test_checkpoint_round_trip(knn_run, test_arrays):
    from ssn_edge.evaluation.evaluate import evaluate_model, predict_raw
    from ssn_edge.model.load import load_model

    loaded = load_model(knn_run.checkpoint)
    assert (loaded.kind, loaded.tiled, loaded.trained_on, loaded.epoch) == ("knn", False, None, 0)
    # 4 of the 8 normal training images are held out for thresholds (data.val_fraction; at most half)
    assert loaded.supervision["setting"] == "unsupervised" and loaded.supervision["normal"] == 4
    assert loaded.recipe.model.kind == "knn" and loaded.backbone["name"] == "resnet18"
    maps, scores = predict_raw(loaded.model, test_arrays.images)
    assert maps.shape == (len(test_arrays), 8, 8) and scores.shape == (len(test_arrays),)
    metrics = evaluate_model(loaded.model, test_arrays)
    assert metrics["image_auroc"] == pytest.approx(knn_run.metrics["image_auroc"])
    assert (knn_run.checkpoint.parent / "metrics.json").is_file()
    assert knn_run.history[0]["bank"] == len(loaded.model.head.bank)


def test_checkpoint_refuses_other_backbone_weights(knn_run, tmp_path):
    from ssn_edge.model.checkpoint import load_checkpoint, save_checkpoint
    from ssn_edge.model.load import load_model

    record = load_checkpoint(knn_run.checkpoint)
    record = dataclasses.replace(record, backbone=dataclasses.replace(record.backbone, fingerprint="0" * 16))
    save_checkpoint(tmp_path / "c.pt", record)
    with pytest.raises(ValueError, match="backbone weights differ"):
        load_model(tmp_path / "c.pt")


@pytest.mark.slow
def test_fp32_export_equals_torch(knn_run, test_arrays, tmp_path):
    from click.testing import CliRunner

    import openvino as ov
    from cli import main
    from ssn_edge.evaluation.evaluate import predict_raw
    from ssn_edge.model.load import load_model

    result = CliRunner().invoke(main, ["export", "--checkpoint", str(knn_run.checkpoint), "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    compiled = ov.Core().compile_model(str(tmp_path / "b" / "model_fp32.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    ops = {op.get_type_name() for op in ov.Core().read_model(tmp_path / "b" / "model_fp32.xml").get_ops()}
    assert {"MatMul", "TopK", "Gather"} <= ops  # the nearest-neighbour search is in the graph
    from ssn_edge.runtime.postprocess import anomaly_map, sigmoid

    maps, scores = predict_raw(load_model(knn_run.checkpoint).model, test_arrays.images)
    maps, scores = anomaly_map(maps, (64, 64)), sigmoid(scores)  # the graph post-processes itself (batch 1)
    for i, x in enumerate(test_arrays.images):
        out = compiled(x[None])
        np.testing.assert_allclose(out["anomaly_map"][0, 0], maps[i], atol=1e-4, rtol=0)
        np.testing.assert_allclose(out["pred_score"], scores[i : i + 1], atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("neighbours", [1, 3])
def test_runtime_metrics_equal_training_evaluation(knn_run, tiny_dataset, test_arrays, tmp_path, neighbours):
    """The numbers a bundle's runtime path gives (report / knn_bench int8: the IR's own post-processing) are the
    training-time evaluation's (PyTorch + runtime.postprocess) for the same checkpoint: two implementations of
    the map that drifted apart would show here first. knn.neighbours 3: the graph's TopK of 3, averaged."""
    from ssn_edge.evaluation.evaluate import evaluate_model
    from ssn_edge.export.exporter import export_bundle
    from ssn_edge.model.load import load_model
    from ssn_edge.report.build import variant_metrics
    from ssn_edge.report.variants import openvino_variant
    from ssn_edge.train.job import train_job

    run = knn_run if neighbours == 1 else train_job(knn_recipe(tiny_dataset, neighbours=neighbours), tmp_path / "run",
                                                    progress=False)
    bundle = export_bundle(run.checkpoint, tmp_path / "b")
    assert bundle.metadata.postprocess.in_graph
    runtime = openvino_variant(bundle, "fp32", test_arrays)
    model = load_model(run.checkpoint).model
    assert model.head.neighbours == neighbours
    torch_metrics = evaluate_model(model, test_arrays)
    for key, value in variant_metrics(test_arrays, runtime.scores, runtime.maps).items():
        assert value == pytest.approx(torch_metrics[key], abs=1e-3), key


@pytest.mark.slow
def test_int8_export_keeps_the_distances_float(knn_run, tmp_path):
    """The backbone is quantized, the nearest-neighbour head (MatMul against the bank and the sums after it) is
    not: no FakeQuantize feeds a node of the head, and the bank stays a float constant (export/quantize.py)."""
    import openvino as ov
    from ssn_edge.export.calibration import CalibrationSpec
    from ssn_edge.export.exporter import ExportOptions, export_bundle

    bundle = export_bundle(knn_run.checkpoint, tmp_path / "b", ExportOptions(int8=True, calibration=CalibrationSpec(size=4)))
    model = ov.Core().read_model(bundle.path / "model_int8.xml")
    fed = [t.get_node() for op in model.get_ops() if op.get_type_name() == "FakeQuantize"
           for t in op.output(0).get_target_inputs()]
    assert any(n.get_type_name() == "Convolution" for n in fed)  # the backbone is INT8
    assert not [n.get_friendly_name() for n in fed if ".head/" in n.get_friendly_name()]
    matmul = next(op for op in model.get_ops() if op.get_type_name() == "MatMul")
    assert all(i.get_element_type() == ov.Type.f32 for i in matmul.inputs())


@pytest.mark.slow
def test_wide_resnet_knn_builds_with_reduced_channels(tiny_dataset, train_arrays):
    from ssn_edge.config import recipe_from_dict
    from ssn_edge.train.knn import fit_knn

    values = knn_recipe_dict(tiny_dataset, channels=64, coreset=50)
    values["model"]["backbone"] = "wide_resnet50_2"
    model, fit = fit_knn(recipe_from_dict(values), train_arrays, progress=False)
    assert model.head.bank.shape == (50, 64)  # 512 + 1024 channels averaged down to 64
    m, s = model(torch.from_numpy(train_arrays.images[:2]))
    assert m.shape == (2, 1, 8, 8) and s.shape == (2,)


# --- recipes and the CLI ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_train_fits_a_knn_recipe(tiny_dataset, tmp_path):
    from click.testing import CliRunner

    from cli import main

    recipe = tmp_path / "knn.yaml"
    recipe.write_text(yaml.safe_dump(knn_recipe_dict(tiny_dataset)))
    result = CliRunner().invoke(main, ["train", "--recipe", str(recipe), "--out", str(tmp_path / "run"), "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and "image_auroc" in result.output


@pytest.mark.parametrize("change, message", [
    ({"knn": {"coreset": -1}}, "knn.coreset must be"),
    ({"knn": {"coreset": 2.5}}, "knn.coreset must be"),
    ({"knn": {"pool": 0}}, "knn.pool must be >= 1"),
    ({"knn": {"neighbours": 0}}, "knn.neighbours must be >= 1"),
    ({"knn": {"sampler": "best"}}, "'knn.sampler': 'best' is not one of greedy, random"),
    ({"train": {"epochs": 5}}, "'train.epochs' is not used by model.kind knn"),
    ({"noise": {"sigma": 0.1}}, "'noise.sigma' is not used by model.kind knn"),
    ({"model": {"cls_head": "light"}}, "'model.cls_head' is not used by model.kind knn"),
    ({"train": {"setting": "supervised"}}, "knn learns from normal images only"),
])
def test_bad_knn_recipe_is_a_one_line_error(tiny_dataset, tmp_path, change, message):
    from click.testing import CliRunner

    from cli import main

    values = knn_recipe_dict(tiny_dataset)
    for section, keys in change.items():
        values.setdefault(section, {}).update(keys)
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(values))
    result = CliRunner().invoke(main, ["train", "--recipe", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert str(recipe) in result.output and message in result.output
    assert not (tmp_path / "run").exists()


def test_ssn_recipe_refuses_a_knn_section(tiny_dataset):
    from ssn_edge.config import RecipeError, recipe_from_dict

    values = tiny_recipe_dict(tiny_dataset)
    values["knn"] = {"coreset": 100}
    with pytest.raises(RecipeError, match="applies to model.kind knn, or ssn with model.memory_bank, only"):
        recipe_from_dict(values)
    values["model"] = {**values.get("model", {}), "memory_bank": True}
    assert recipe_from_dict(values).knn.coreset == 100  # the bank's settings


def test_shipped_knn_recipes_load():
    from ssn_edge.config import load_recipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    for name in ("knn_resnet18", "knn_magnetic_tile", "knn_wrn50"):
        recipe = load_recipe(root / f"{name}.yaml")
        assert recipe.model.kind == "knn"

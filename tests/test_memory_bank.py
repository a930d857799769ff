"""model.memory_bank: SSN's map plus the standardised nearest-bank distance, fitted after training; its checkpoint,
export (distances kept float in INT8) and the recipes it is refused for. Tiny synthetic data (tests/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_recipe_dict


def bank_recipe(data, **model):
    from ssn_edge.config import recipe_from_dict

    values = tiny_recipe_dict(data)
    values["model"] = {**values["model"], "memory_bank": True, **model}
    values["knn"] = {"coreset": 0.5}
    return recipe_from_dict(values)


@pytest.fixture(scope="module")
def bank_run(tmp_path_factory, tiny_dataset):
    from ssn_edge.train.job import train_job

    return train_job(bank_recipe(tiny_dataset), tmp_path_factory.mktemp("bank_run"), progress=False)


@pytest.fixture(scope="module")
def test_arrays(tiny_dataset):
    from ssn_edge.evaluation.job import split_arrays

    return split_arrays(tiny_dataset, "test", (64, 64), progress=False)


def test_map_is_ssn_map_plus_nearest_distance_each_standardised():
    from ssn_edge.model.knn.graph import Standardizer
    from ssn_edge.model.memory_bank import MemoryBank

    g = torch.Generator().manual_seed(0)
    bank, features = torch.randn(50, 6, generator=g), torch.randn(2, 6, 8, 10, generator=g)
    map_logits = torch.randn(2, 1, 8, 10, generator=g)
    module = MemoryBank(bank, Standardizer(0.5, 2.0), Standardizer(1.5, 0.25))
    # independently: 2x2 average, brute-force nearest distance, bilinear back to the map's size
    pooled = F.avg_pool2d(features, 2).flatten(2).transpose(1, 2)  # (2, 20, 6)
    nearest = torch.cdist(pooled, bank[None].expand(2, -1, -1)).amin(-1).reshape(2, 1, 4, 5)
    up = F.interpolate(nearest, size=(8, 10), mode="bilinear", align_corners=False)
    want = (map_logits - 0.5) / 2.0 + (up - 1.5) / 0.25
    torch.testing.assert_close(module(features, map_logits), want, atol=1e-4, rtol=0)
    weighted = MemoryBank(bank, Standardizer(0.5, 2.0), Standardizer(1.5, 0.25), ssn_weight=0.25)
    torch.testing.assert_close(weighted(features, map_logits), 0.25 * (map_logits - 0.5) / 2.0 + (up - 1.5) / 0.25,
                               atol=1e-4, rtol=0)


def test_training_fits_the_bank_and_scales_it_on_held_out_normals(bank_run, tiny_dataset):
    from ssn_edge.data import load_arrays, load_dataset, split_validation
    from ssn_edge.model.load import load_model

    loaded = load_model(bank_run.checkpoint)
    bank = loaded.model.heads.memory_bank
    assert bank is not None and loaded.recipe.model.memory_bank
    # coreset 0.5 of the 4 banked images' 8x8 patches at 64 px (SSN's 16x16 features averaged 2x2: layer2's grid)
    assert bank.head.bank.shape == (128, loaded.model.features.channels)
    d = loaded.recipe.data
    held = load_arrays(split_validation(load_dataset(tiny_dataset), d.val_fraction, d.val_min, d.val_seed).held_out,
                       (64, 64), progress=False)
    with torch.no_grad():
        distances = bank.distances(loaded.model.features(torch.from_numpy(held.images)))
    # Standardizer: centre = mean + 3 sd of the held-out normals' distances, scale = their sd
    z = (distances - bank.bank_std[0]) / bank.bank_std[1]
    assert float(z.mean()) == pytest.approx(-3.0, abs=1e-3) and float(z.std(unbiased=False)) == pytest.approx(1.0, abs=1e-2)


def test_checkpoint_round_trip_gives_the_same_outputs(bank_run, test_arrays):
    from ssn_edge.evaluation.evaluate import evaluate_model
    from ssn_edge.model.load import load_model

    metrics = evaluate_model(load_model(bank_run.checkpoint).model, test_arrays)
    assert metrics["pixel_aupro"] == pytest.approx(bank_run.metrics["pixel_aupro"])
    assert metrics["image_auroc"] == pytest.approx(bank_run.metrics["image_auroc"])


def test_the_classification_head_sees_ssn_map_and_the_output_map_is_fused(bank_run, test_arrays):
    from ssn_edge.model.load import load_model

    model = load_model(bank_run.checkpoint).model
    x = torch.from_numpy(test_arrays.images[:3])
    with torch.no_grad():
        fused, score = model(x)
        bank, model.heads.memory_bank = model.heads.memory_bank, None
        plain, plain_score = model(x)
        model.heads.memory_bank = bank
        features = model.features(x)
        torch.testing.assert_close(fused, bank(features, plain))
    assert not torch.allclose(fused, plain)
    if model.heads.score_anchor == "none":  # the head's own score: unchanged by the bank
        torch.testing.assert_close(score, plain_score)


def test_the_recipe_weight_of_ssn_map_applies_to_a_fitted_checkpoint(bank_run, test_arrays, tmp_path):
    import dataclasses

    from ssn_edge.model.checkpoint import load_checkpoint, save_checkpoint
    from ssn_edge.model.load import load_model

    record = load_checkpoint(bank_run.checkpoint)
    values = dict(record.recipe)
    values["model"] = {**values["model"], "memory_bank_ssn_weight": 0.0}
    save_checkpoint(tmp_path / "c.pt", dataclasses.replace(record, recipe=values))
    model = load_model(tmp_path / "c.pt").model
    x = torch.from_numpy(test_arrays.images[:3])
    with torch.no_grad():
        fused = model(x)[0]
        bank = model.heads.memory_bank
        distances = (bank.distances(model.features(x)) - bank.bank_std[0]) / bank.bank_std[1]
    assert bank.ssn_weight == 0.0 and load_model(bank_run.checkpoint).model.heads.memory_bank.ssn_weight == 1.0
    torch.testing.assert_close(fused, distances)  # weight 0: the map is the bank's distances alone


def test_int8_keeps_the_segmentation_head_float_by_default_only_where_ssn_map_is_summed(bank_run, tmp_path):
    import dataclasses

    from ssn_edge.export.exporter import resolve_float_map
    from ssn_edge.export.quantize import QuantizeOptions
    from ssn_edge.model.checkpoint import load_checkpoint, save_checkpoint
    from ssn_edge.model.load import load_model

    record = load_checkpoint(bank_run.checkpoint)
    values = dict(record.recipe)
    values["model"] = {**values["model"], "memory_bank_ssn_weight": 0.0}
    save_checkpoint(tmp_path / "w0.pt", dataclasses.replace(record, recipe=values))
    summed, bank_only = load_model(bank_run.checkpoint), load_model(tmp_path / "w0.pt")
    assert resolve_float_map(QuantizeOptions(), summed).float_map is True
    assert resolve_float_map(QuantizeOptions(), bank_only).float_map is False  # SSN's head does not reach the map
    assert resolve_float_map(QuantizeOptions(float_map=False), summed).float_map is False  # asked for: kept


def test_unfinished_training_checkpoint_is_refused(bank_run, tmp_path):
    from ssn_edge.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from ssn_edge.model.load import load_model

    record = load_checkpoint(bank_run.checkpoint)
    record.heads = {k: v for k, v in record.heads.items() if not k.startswith("memory_bank.")}
    save_checkpoint(tmp_path / "c.pt", record)
    with pytest.raises(CheckpointError, match="holds no bank"):
        load_model(tmp_path / "c.pt")


@pytest.mark.parametrize("values, message", [
    ({"model": {"kind": "knn"}}, "model.kind ssn"),
    ({"model": {"cls_head": "cam"}}, "not cam"),
    ({"model": {"map_gate": "score"}}, "map_gate none"),
    ({"data": {"val_fraction": 0.0}}, "held-out normal images"),
    ({"tiling": {"tile": [32, 32], "stride": [32, 32]}}, "untiled"),
    ({"model": {"memory_bank_ssn_weight": -0.5}}, "a number >= 0"),
    ({"model": {"memory_bank_ssn_weight": float("nan")}}, "a number >= 0"),
    ({"model": {"memory_bank": False, "memory_bank_ssn_weight": 0.25}}, "needs model.memory_bank true"),
])
def test_refused_where_it_cannot_work(tiny_dataset, values, message):
    from ssn_edge.config import RecipeError, recipe_from_dict

    base = tiny_recipe_dict(tiny_dataset)
    base["model"] = {**base["model"], "memory_bank": True, **values.get("model", {})}
    base["data"] = {**base["data"], **values.get("data", {})}
    if "tiling" in values:
        base["tiling"] = values["tiling"]
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(base)


@pytest.mark.slow
def test_export_equals_torch_and_int8_keeps_the_distances_float(bank_run, test_arrays, tmp_path):
    import openvino as ov
    from ssn_edge.evaluation.evaluate import predict_raw
    from ssn_edge.export.calibration import CalibrationSpec
    from ssn_edge.export.exporter import ExportOptions, export_bundle
    from ssn_edge.model.load import load_model
    from ssn_edge.runtime.postprocess import anomaly_map, sigmoid

    bundle = export_bundle(bank_run.checkpoint, tmp_path / "b", ExportOptions(int8=True, calibration=CalibrationSpec(size=4)))
    core = ov.Core()
    compiled = core.compile_model(str(bundle.path / "model_fp32.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    maps, scores = predict_raw(load_model(bank_run.checkpoint).model, test_arrays.images)
    maps, scores = anomaly_map(maps, (64, 64)), sigmoid(scores)
    for i, x in enumerate(test_arrays.images[:4]):
        out = compiled(x[None])
        np.testing.assert_allclose(out["anomaly_map"][0, 0], maps[i], atol=1e-3, rtol=0)
        np.testing.assert_allclose(out["pred_score"], scores[i : i + 1], atol=1e-4, rtol=0)
    int8 = core.read_model(bundle.path / "model_int8.xml")
    fed = [t.get_node() for op in int8.get_ops() if op.get_type_name() == "FakeQuantize"
           for t in op.output(0).get_target_inputs()]
    assert any(n.get_type_name() == "Convolution" for n in fed)  # the backbone and heads are INT8
    assert not [n.get_friendly_name() for n in fed if ".memory_bank" in n.get_friendly_name()]
    matmul = [op for op in int8.get_ops() if op.get_type_name() == "MatMul" and ".memory_bank" in op.get_friendly_name()]
    assert matmul and all(i.get_element_type() == ov.Type.f32 for op in matmul for i in op.inputs())
    # SSN's map weighs 1 beside the bank: the export kept its segmentation head float by default, and says so
    assert bundle.metadata.models["int8"].quantization.float_map is True


def bank_alone_checkpoint(bank_run, path, head_weight: float):
    """bank_run's checkpoint with SSN's map weighing 0 and the score anchored to the map's top cells, its
    classification head's fc set to head_weight everywhere (0: as score_anchor auto leaves it when it anchors)."""
    import dataclasses

    from ssn_edge.model.checkpoint import load_checkpoint, save_checkpoint

    record = load_checkpoint(bank_run.checkpoint)
    values = dict(record.recipe)
    values["model"] = {**values["model"], "memory_bank_ssn_weight": 0.0, "score_anchor": "map_top", "anchor_top": 0.1}
    heads = {k: torch.full_like(v, head_weight) if k.startswith("classification.fc.") else v
             for k, v in record.heads.items()}
    save_checkpoint(path, dataclasses.replace(record, recipe=values, heads=heads))
    return path


@pytest.mark.parametrize("head_weight", [0.0, 0.01])
def test_a_bank_alone_model_skips_ssn_heads_and_gives_the_same_outputs(bank_run, test_arrays, tmp_path, monkeypatch,
                                                                       head_weight):
    from ssn_edge.model.load import load_model
    from ssn_edge.model.ssn import SSNHeads

    model = load_model(bank_alone_checkpoint(bank_run, tmp_path / "c.pt", head_weight)).model
    assert model.heads.bank_alone() is (head_weight == 0.0)  # a head with a learned logit is still needed
    adaptor_runs = []
    model.heads.adaptor.register_forward_hook(lambda *_: adaptor_runs.append(1))
    x = torch.from_numpy(test_arrays.images[:3])
    with torch.no_grad():
        skipped = model(x)
        monkeypatch.setattr(SSNHeads, "bank_alone", lambda self: False)
        full = model(x)
    assert len(adaptor_runs) == (1 if head_weight == 0.0 else 2)
    torch.testing.assert_close(skipped[0], full[0], atol=0, rtol=0)
    torch.testing.assert_close(skipped[1], full[1], atol=0, rtol=0)


@pytest.mark.slow
def test_a_bank_alone_export_holds_no_ssn_heads_and_equals_torch(bank_run, test_arrays, tmp_path):
    import openvino as ov

    from ssn_edge.evaluation.evaluate import predict_raw
    from ssn_edge.export.calibration import CalibrationSpec
    from ssn_edge.export.exporter import ExportOptions, export_bundle
    from ssn_edge.export.quantize import QuantizeOptions
    from ssn_edge.model.load import load_model
    from ssn_edge.runtime.postprocess import anomaly_map, sigmoid

    ckpt = bank_alone_checkpoint(bank_run, tmp_path / "c.pt", 0.0)
    bundle = export_bundle(ckpt, tmp_path / "b", ExportOptions(int8=True, calibration=CalibrationSpec(size=4)))
    core = ov.Core()
    for precision in ("fp32", "int8"):
        names = [op.get_friendly_name() for op in core.read_model(bundle.path / f"model_{precision}.xml").get_ops()]
        assert any(".memory_bank" in n for n in names)
        assert not [n for n in names if any(f"heads.{m}" in n for m in ("adaptor", "segmentation", "classification"))]
    compiled = core.compile_model(str(bundle.path / "model_fp32.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    maps, scores = predict_raw(load_model(ckpt).model, test_arrays.images[:4])
    maps, scores = anomaly_map(maps, (64, 64)), sigmoid(scores)
    for i, x in enumerate(test_arrays.images[:4]):
        out = compiled(x[None])
        np.testing.assert_allclose(out["anomaly_map"][0, 0], maps[i], atol=1e-3, rtol=0)
        np.testing.assert_allclose(out["pred_score"], scores[i : i + 1], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="outputs are its memory bank's alone"):
        export_bundle(ckpt, tmp_path / "f", ExportOptions(int8=True, quantize=QuantizeOptions(float_map=True)))
    assert not (tmp_path / "f").exists()

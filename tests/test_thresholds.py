"""Thresholds from normal data: the held-out split (one implementation, used by train and export), the
false-alarm quantile, the review band, the explicit F1 sources, the schema fields and the migration of
checkpoints and bundles from before the split."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from ssn_edge.data import Sample, split_validation
from ssn_edge.data.samples import held_out_count
from ssn_edge.export.exporter import ExportOptions, export_bundle
from ssn_edge.export.inference import Predictions
from ssn_edge.export.thresholds import (
    ThresholdChoice,
    false_alarm_rate,
    false_alarm_threshold,
    set_thresholds,
)
from ssn_edge.runtime.schema import Thresholds


def _samples(normal: int, defective: int = 0) -> list[Sample]:
    from pathlib import Path

    train = [Sample(Path(f"n{i:03d}.png"), None, 0, "train") for i in range(normal)]
    train += [Sample(Path(f"d{i:03d}.png"), Path(f"m{i:03d}.png"), 1, "train", "scratch") for i in range(defective)]
    return train + [Sample(Path("t.png"), None, 0, "test")]


# --------------------------------------------------------------------------------------------------------------
# The split
# --------------------------------------------------------------------------------------------------------------


def test_held_out_count_fraction_minimum_and_half():
    assert held_out_count(209, 0.1, 10) == 21  # MVTec bottle: a tenth
    assert held_out_count(50, 0.1, 10) == 10  # the minimum
    assert held_out_count(8, 0.1, 10) == 4  # never more than half: training keeps the larger part
    assert held_out_count(1, 0.1, 10) == 0 and held_out_count(100, 0.0, 10) == 0


def test_split_is_seeded_disjoint_and_keeps_defects_for_training():
    samples = _samples(40, defective=5)
    a = split_validation(samples, 0.25, 2, seed=0)
    assert len(a.held_out) == 10 and all(s.label == 0 and s.split == "train" for s in a.held_out)
    assert len(a.train) == 35 and not set(a.train) & set(a.held_out)
    assert sum(s.label == 1 for s in a.train) == 5  # only normal images are held out
    assert split_validation(samples, 0.25, 2, seed=0) == a  # the same images every time: train and export agree
    assert split_validation(samples, 0.25, 2, seed=1).held_out != a.held_out
    assert [s for s in a.train] == [s for s in samples if s.split == "train" and s not in a.held_out]  # order kept


def test_train_never_sees_the_held_out_images(tiny_checkpoint, tiny_dataset):
    from ssn_edge.data import load_dataset
    from ssn_edge.model.load import load_model

    loaded = load_model(tiny_checkpoint)
    d = loaded.recipe.data
    assert (d.val_fraction, d.val_min, d.val_seed) == (0.1, 10, 0)  # recorded in the checkpoint's recipe
    held = split_validation(load_dataset(tiny_dataset), d.val_fraction, d.val_min, d.val_seed).held_out
    assert len(held) == 4
    assert loaded.supervision["normal"] == 8 - len(held)  # what training counted: the other 4


def test_recorded_recipe_from_before_the_split_held_none_out():
    from ssn_edge.config import recipe_from_dict, upgrade_recipe_dict

    old = {"name": "x", "data": {"path": "d", "image_size": [64, 64]}, "weak": {}}
    assert recipe_from_dict(upgrade_recipe_dict(old)).data.val_fraction == 0.0
    assert recipe_from_dict(old).data.val_fraction == 0.1  # a new recipe gets the default
    with pytest.raises(ValueError, match="val_fraction"):
        recipe_from_dict({"name": "x", "data": {"val_fraction": 0.7}})


# --------------------------------------------------------------------------------------------------------------
# The false-alarm threshold
# --------------------------------------------------------------------------------------------------------------


def test_false_alarm_threshold_allows_floor_n_rate_alarms():
    values = np.arange(1, 201, dtype=np.float32)  # 200 normal scores 1..200
    t = false_alarm_threshold(values, 0.01)  # 2 may alarm: between the 2nd (199) and 3rd (198) highest
    assert t == 198.5 and false_alarm_rate(values, t) == 0.01
    assert false_alarm_threshold(values, 0.05) == 190.5
    few = np.array([0.2, 0.9, 0.4], dtype=np.float32)  # n x rate < 1: none may alarm, just above the max
    t = false_alarm_threshold(few, 0.01)
    assert np.float32(0.9) < t < 0.9 + 1e-6 and false_alarm_rate(few, t) == 0.0


def test_false_alarm_threshold_with_ties_stays_within_the_rate():
    values = np.array([5.0] * 10 + [1.0] * 90, dtype=np.float32)
    t = false_alarm_threshold(values, 0.05)  # the 5th and 6th highest tie: above them, fewer alarms
    assert false_alarm_rate(values, t) <= 0.05 and t > 5.0


def test_threshold_choice_is_checked():
    with pytest.raises(ValueError, match="threshold source"):
        ThresholdChoice("test")
    with pytest.raises(ValueError, match="max-false-alarm"):
        ThresholdChoice(max_false_alarm=1.5)
    with pytest.raises(ValueError, match="review-false-alarm"):
        ThresholdChoice(max_false_alarm=0.05, review_false_alarm=0.01)


def test_set_thresholds_from_normals_with_review_band():
    rng = np.random.default_rng(0)
    normal = Predictions(rng.uniform(0, 0.5, 100).astype(np.float32), rng.normal(size=(100, 8, 8)).astype(np.float32))
    t = set_thresholds(ThresholdChoice(review_false_alarm=0.1), normal, "100 held-out", None)
    assert t.source == "held_out_normal" and t.method == "false_alarm" and t.pixel_method == "false_alarm"
    assert t.false_alarm == false_alarm_rate(normal.scores, t.image) <= 0.01
    assert t.pixel_false_alarm <= 0.001 and t.held_out == 100
    assert t.review < t.image and false_alarm_rate(normal.scores, t.review) <= 0.1
    with pytest.raises(ValueError, match="no held-out normal"):
        set_thresholds(ThresholdChoice(), None, None, None)


def test_old_thresholds_read_and_new_fields_checked():
    from ssn_edge.runtime.schema import _Fields, _read_thresholds
    from ssn_edge.runtime.schema import BundleError

    old = _read_thresholds(_Fields({"image": 0.5, "pixel": 1.0, "source": "test"}, "thresholds", "b"))
    assert old.method == "f1_max" and old.review is None and old.false_alarm is None
    with pytest.raises(BundleError, match="thresholds.false_alarm"):
        _read_thresholds(_Fields({"image": 0.5, "pixel": 1.0, "false_alarm": 2.0}, "thresholds", "b"))
    with pytest.raises(BundleError, match="thresholds.review"):
        _read_thresholds(_Fields({"image": 0.5, "pixel": 1.0, "review": 0.7}, "thresholds", "b"))


# --------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reviewed(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("thr") / "bundle"
    return export_bundle(tiny_checkpoint, out, ExportOptions(thresholds=ThresholdChoice(review_false_alarm=0.5)))


def test_export_sets_thresholds_on_the_held_out_normals(reviewed, tiny_dataset):
    from ssn_edge.runtime.engine import Engine
    from ssn_edge.runtime.preprocess import read_image

    t = reviewed.metadata.thresholds
    assert t.source == "held_out_normal" and t.held_out == 4 and t.false_alarm == 0.0
    assert "4 held-out normal training images" in t.data
    assert t.review is not None and t.review <= t.image
    engine = Engine(reviewed, "fp32")
    held = [p for p in sorted(tiny_dataset.glob("train/good/*.png"))]
    preds = engine.predict_images([read_image(p) for p in held], held)
    assert sum(p.result == "defect" for p in preds) == 0  # every held-out image is below the threshold
    assert {p.result for p in preds} <= {"ok", "review"} and "review" in {p.result for p in preds}  # 2 of 4: review
    assert all(p.record()["result"] == p.result for p in preds)
    assert all((p.result == "review") == (p.score >= t.review) for p in preds)
    engine.image_threshold = 0.0  # everything at or above it: defect, whatever the band
    assert {engine.result(p.score) for p in preds} == {"defect"}


def test_f1_needs_a_val_split_and_test_f1_is_said(tiny_checkpoint, tmp_path, caplog):
    from ssn_edge.data import DatasetError

    with pytest.raises(DatasetError, match="'val' split has no images"):
        export_bundle(tiny_checkpoint, tmp_path / "f1", ExportOptions(thresholds=ThresholdChoice("f1")))
    assert not (tmp_path / "f1").exists()
    with caplog.at_level(logging.WARNING, logger="ssn_edge"):
        b = export_bundle(tiny_checkpoint, tmp_path / "t", ExportOptions(thresholds=ThresholdChoice("test-f1")))
    t = b.metadata.thresholds
    assert t.source == "test" and t.method == "f1_max" and "optimistic" in caplog.text
    assert t.held_out == 4 and t.false_alarm is not None  # the false-alarm rate on held-out normals, beside it


def test_checkpoint_trained_on_every_normal_image_is_refused_with_the_way_out(tiny_dataset, tmp_path):
    from conftest import tiny_recipe_dict
    from ssn_edge.config import recipe_from_dict
    from ssn_edge.data import DatasetError
    from ssn_edge.train.job import train_job

    d = tiny_recipe_dict(tiny_dataset)
    d["data"]["val_fraction"] = 0.0
    ckpt = train_job(recipe_from_dict(d), tmp_path / "run", progress=False, evaluate=False).checkpoint
    with pytest.raises(DatasetError, match="no normal images that training did not see.*--threshold-from"):
        export_bundle(ckpt, tmp_path / "b")
    b = export_bundle(ckpt, tmp_path / "b", ExportOptions(thresholds=ThresholdChoice("test-f1")))
    assert b.metadata.thresholds.held_out is None and b.metadata.thresholds.source == "test"


def test_bundle_without_the_new_fields_still_loads(reviewed, tmp_path):
    """A bundle written before thresholds from normal data and in-graph post-processing (no such fields)."""
    from ssn_edge.runtime.schema import read_metadata

    data = json.loads((reviewed.path / "metadata.json").read_text())
    for key in ("max_false_alarm", "max_false_alarm_pixel", "held_out", "false_alarm", "pixel_false_alarm",
                "review", "review_false_alarm"):
        data["thresholds"].pop(key)
    data["postprocess"].pop("in_graph")
    data = {k: v for k, v in data.items() if not k.startswith("metadata_")}  # the digest seals the file, not this
    meta = read_metadata(data, "old bundle")
    assert meta.thresholds.review is None and meta.postprocess.in_graph is False
    assert isinstance(meta.thresholds, Thresholds)

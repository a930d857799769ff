"""The collapse check (issue 28): judged on held-out normals and their painted copies, wired into training
(train.on_collapse warn / anchor / error), recorded in the checkpoint and the bundle, and the report's flag for
scores bunched near the image threshold. Tiny synthetic images: seconds on 2 cores."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import tiny_recipe_dict
from ssn_edge.config import RecipeError, recipe_from_dict
from ssn_edge.train.collapse import CollapseCheck, CollapseError, check_model, decide, judge

LABELS = np.r_[np.zeros(10, np.int64), np.ones(10, np.int64)]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def blurred_max(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Each raw map's maximum after OpenCV's Gaussian blur (reflected edges): what an anchored score adds."""
    import cv2

    k = 2 * int(np.ceil(3 * sigma)) + 1
    return np.array([cv2.GaussianBlur(m, (k, k), sigma, borderType=cv2.BORDER_REFLECT_101).max() for m in maps])


def _separated(rng: np.random.Generator, gap: float = 4.0) -> np.ndarray:
    """Normals around 0, painted copies around gap: what a working score or map max looks like."""
    return np.r_[rng.normal(0.0, 0.5, 10), rng.normal(gap, 0.5, 10)]


# ---------------------------------------------------------------------------------------------------------------
# The judgement, on outputs made to order
# ---------------------------------------------------------------------------------------------------------------


def test_a_healthy_score_and_map_are_not_flagged():
    rng = np.random.default_rng(0)
    check = judge(_separated(rng) - 3.0, _separated(rng), LABELS)
    assert not check.collapsed_score and not check.collapsed_map and not check.collapsed
    assert check.score_auroc == 1.0 and check.map_max_auroc == 1.0 and check.score_spread > 1.0
    assert (check.normal, check.defective) == (10, 10)
    assert "no collapse" in check.message and decide(check, "error", True, Path("c.pt")).action == "none"


def test_a_near_constant_score_is_flagged_whatever_it_ranks():
    rng = np.random.default_rng(0)
    # ranks perfectly, but over 1e-4 logits: no threshold or INT8 export keeps that order
    score = np.r_[np.full(10, -5.5), np.full(10, -5.5 + 1e-4)]
    check = judge(score, _separated(rng), LABELS)
    assert check.collapsed_score and not check.collapsed_map and check.score_auroc == 1.0
    assert check.message.startswith("collapse check on 10 held-out normal images and 10 defective ones: "
                                    "the image score is near-constant")
    assert "map max" in check.message and "\n" not in check.message


def test_a_score_at_chance_is_flagged_only_when_the_map_does_better():
    rng = np.random.default_rng(1)
    chance = np.tile(np.linspace(-2.0, 2.0, 10), 2)  # spread, but the painted copies score as their normals
    check = judge(chance, _separated(rng), LABELS)
    assert check.score_auroc == 0.5 and check.score_spread > 1.0
    assert check.collapsed_score and "no better than chance" in check.message
    # neither sees the painted defects: no collapse of the score (the painted defects may be unlike this data's)
    check = judge(chance, np.tile(np.linspace(0.0, 3.0, 10), 2), LABELS)
    assert not check.collapsed


def test_a_near_constant_map_max_is_flagged():
    rng = np.random.default_rng(2)
    check = judge(_separated(rng), np.full(20, 1.5) + rng.normal(0, 1e-4, 20), LABELS)
    assert check.collapsed_map and not check.collapsed_score
    assert "the map's maximum is near-constant" in check.message


def test_nan_outputs_read_as_collapsed():
    check = judge(np.full(20, np.nan), np.full(20, np.nan), LABELS)
    assert check.collapsed_score and check.collapsed_map and np.isfinite(check.score_spread)


def test_decide_says_what_each_policy_does():
    rng = np.random.default_rng(0)
    score_only = judge(np.full(20, -5.5), _separated(rng), LABELS)
    both = judge(np.full(20, -5.5), np.full(20, 1.0), LABELS)
    ckpt = Path("runs/x/checkpoint.pt")
    assert decide(score_only, "warn", True, ckpt).action == "kept"
    assert decide(score_only, "anchor", True, ckpt).action == "anchored"
    assert decide(score_only, "anchor", False, ckpt).action == "kept"  # no map to anchor to (CAM)
    kept = decide(both, "anchor", True, ckpt)
    assert kept.action == "kept" and "anchoring cannot help" in kept.message
    stopped = decide(score_only, "error", True, ckpt)
    assert stopped.action == "stopped" and str(ckpt) in stopped.message and "train.on_collapse error" in stopped.message
    with pytest.raises(ValueError, match="train.on_collapse 'retry'"):
        decide(score_only, "retry", True, ckpt)


# ---------------------------------------------------------------------------------------------------------------
# A model: scored on the check set
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def check_arrays(tiny_dataset):
    from ssn_edge.data import load_dataset, split_validation
    from ssn_edge.data.heldout import check_set

    split = split_validation(load_dataset(tiny_dataset), 0.1, 10, 0)
    assert split.held_out
    return check_set(split.held_out, (64, 64))


def test_painted_copies_paint_each_normal_spec_copies_times_with_the_kinds_in_turn(tiny_dataset, check_arrays):
    from ssn_edge.data import load_dataset, split_validation
    from ssn_edge.data.heldout import CheckSetSpec, painted_copies
    from ssn_edge.data.synthetic import DEFECTS

    held = split_validation(load_dataset(tiny_dataset), 0.1, 10, 0).held_out
    one = painted_copies(held, (64, 64))
    three = painted_copies(held, (64, 64), CheckSetSpec(copies=3))
    assert len(one) == len(held) and len(three) == 3 * len(held) and three.labels.all() and three.masks.any((1, 2)).all()
    assert [p.split("#")[1] for p in three.paths[:3]] == list(DEFECTS[:3])
    assert [p.split("#")[0] for p in three.paths[:3]] == [str(held[0].image)] * 3
    # the one-copy set is the check set's painted half, unchanged by the option
    np.testing.assert_array_equal(one.images, check_arrays.images[len(held):])
    assert not np.array_equal(three.images[0], three.images[1])  # different defects on the same normal


def _tiny_model():
    from ssn_edge.model.ssn import SuperSimpleNet

    torch.manual_seed(0)
    return SuperSimpleNet(recipe_from_dict(tiny_recipe_dict(Path("unused"))).model)


def test_a_model_whose_score_head_is_zeroed_is_caught(check_arrays):
    model = _tiny_model()
    with torch.no_grad():
        model.heads.classification.fc.weight.zero_()
        model.heads.classification.fc.bias.zero_()
    check = check_model(model, check_arrays)
    assert check.collapsed_score and check.score_spread == 0.0
    assert check.normal == check.defective == len(check_arrays) // 2
    assert "the image score is near-constant" in check.message and "\n" not in check.message


def test_check_model_scores_the_check_set_and_passes_a_healthy_model(check_arrays, monkeypatch):
    """The model's outputs replaced by ones that separate the painted copies: check_model must read the score and
    the map's maximum of each image in check-set order (a shuffled or mixed-up reading would flag it)."""
    import ssn_edge.train.collapse as collapse

    n = len(check_arrays)
    rng = np.random.default_rng(0)
    painted = check_arrays.labels.astype(np.float32)
    maps = rng.normal(0, 0.1, (n, 16, 16)).astype(np.float32)
    maps[:, 3, 5] += 2.0 + 3.0 * painted + rng.normal(0, 0.3, n)
    logits = (-4.0 + 5.0 * painted + rng.normal(0, 0.3, n)).astype(np.float32)
    seen = {}

    def fake_predict(model, images, batch_size=16):
        seen["images"] = images
        return maps, logits

    monkeypatch.setattr(collapse, "predict_raw", fake_predict)
    check = check_model(_tiny_model(), check_arrays)
    assert seen["images"] is check_arrays.images
    assert not check.collapsed and check.score_auroc == 1.0 and check.map_max_auroc == 1.0
    constant = np.full(n, -4.0, np.float32)
    monkeypatch.setattr(collapse, "predict_raw", lambda model, images, batch_size=16: (maps, constant))
    assert check_model(_tiny_model(), check_arrays).collapsed_score


# ---------------------------------------------------------------------------------------------------------------
# Training: a run made to collapse
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def constant_score(monkeypatch):
    """Every classification head's score is its fc bias alone: the same value for every image (a collapsed head
    that still trains: the bias gets gradients), whatever the map shows."""
    import ssn_edge.model.ssn as ssn

    monkeypatch.setattr(ssn, "pooled_score", lambda x, map_logits, fc: fc.bias.expand(x.shape[0]).float())
    return monkeypatch


def _train(dataset: Path, out: Path, on_collapse: str):
    from ssn_edge.train.job import train_job

    d = tiny_recipe_dict(dataset)
    d["train"]["on_collapse"] = on_collapse
    return train_job(recipe_from_dict(d), out, progress=False, evaluate=False)


def test_a_run_made_to_collapse_is_caught_in_one_warning_line_and_recorded(tiny_dataset, tmp_path, constant_score,
                                                                           caplog):
    from ssn_edge.model.checkpoint import load_checkpoint
    from ssn_edge.model.load import load_model

    with caplog.at_level(logging.INFO, logger="ssn_edge"):
        result = _train(tiny_dataset, tmp_path / "run", "warn")
    lines = [r for r in caplog.records if "collapse check" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    line = lines[0].getMessage()
    assert "the image score is near-constant" in line and "kept as trained (train.on_collapse warn" in line
    assert "\n" not in line
    check = result.collapse
    assert check is not None and check.collapsed_score and check.action == "kept" and check.message == line
    assert load_checkpoint(result.checkpoint).collapse == check
    assert load_model(result.checkpoint).collapse_check == check.to_dict()


def test_on_collapse_anchor_makes_the_score_the_maps_maximum(tiny_dataset, tmp_path, constant_score):
    from ssn_edge.evaluation.evaluate import predict_raw
    from ssn_edge.model.load import load_model

    result = _train(tiny_dataset, tmp_path / "run", "anchor")
    assert result.collapse.collapsed_score and not result.collapse.collapsed_map
    assert result.collapse.action == "anchored" and "the score is now the map's maximum" in result.collapse.message
    constant_score.undo()  # the real head from here: the anchor must hold in the model export rebuilds
    loaded = load_model(result.checkpoint)
    assert loaded.recipe.model.score_anchor == "map_max" and loaded.recipe.train.on_collapse == "anchor"
    images = np.random.default_rng(0).normal(0, 1, (4, 3, 64, 64)).astype(np.float32)
    maps, scores = predict_raw(loaded.model, images)
    np.testing.assert_allclose(scores, blurred_max(maps, loaded.recipe.model.anchor_blur), rtol=0, atol=1e-5)
    assert np.ptp(scores) > 0


def test_on_collapse_error_stops_in_one_line_and_keeps_the_checkpoint(tiny_dataset, tmp_path, constant_score):
    from click.testing import CliRunner

    from cli import main
    from ssn_edge.model.checkpoint import load_checkpoint

    out = tmp_path / "run"
    with pytest.raises(CollapseError) as exc:
        _train(tiny_dataset, out, "error")
    msg = str(exc.value)
    assert msg.startswith("collapse check on ") and "\n" not in msg
    assert "stopped (train.on_collapse error)" in msg and str(out / "checkpoint.pt") in msg
    assert load_checkpoint(out / "checkpoint.pt").collapse.action == "stopped"
    assert not (out / "metrics.json").exists()  # stopped before the test evaluation

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_dataset)))
    res = CliRunner().invoke(main, ["train", "--recipe", str(recipe), "--out", str(tmp_path / "cli"),
                                    "--set", "train.on_collapse=error"])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: collapse check on ") and "Traceback" not in res.output


def test_on_collapse_is_a_checked_recipe_key():
    base = tiny_recipe_dict(Path("unused"))
    assert recipe_from_dict(base).train.on_collapse == "warn"
    with pytest.raises(RecipeError, match="'train.on_collapse': 'retrain' is not one of warn, anchor, error"):
        recipe_from_dict({**base, "train": {**base["train"], "on_collapse": "retrain"}})
    with pytest.raises(RecipeError, match="CAM head"):
        recipe_from_dict({**base, "model": {**base["model"], "cls_head": "cam"},
                          "train": {**base["train"], "on_collapse": "anchor"}})
    with pytest.raises(RecipeError, match="not tiled ones"):
        recipe_from_dict({**base, "tiling": {"tile": [32, 32], "stride": [32, 32]},
                          "train": {**base["train"], "on_collapse": "error"}})
    with pytest.raises(RecipeError, match="'train.on_collapse' is not used by model.kind knn"):
        recipe_from_dict({"model": {"kind": "knn"}, "train": {"on_collapse": "error"}})


def test_a_checkpoint_from_before_the_check_loads_without_one(tmp_path):
    from ssn_edge.model.checkpoint import KIND_SSN, BackboneIdentity, CheckpointRecord, load_checkpoint

    record = CheckpointRecord(kind=KIND_SSN, recipe=recipe_from_dict(tiny_recipe_dict(Path("d"))).to_dict(),
                              backbone=BackboneIdentity("resnet18"), heads={})
    payload = record.to_payload()
    del payload["collapse"]
    torch.save(payload, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").collapse is None


# ---------------------------------------------------------------------------------------------------------------
# The bundle and the report
# ---------------------------------------------------------------------------------------------------------------


def _collapsed_record() -> dict:
    rng = np.random.default_rng(0)
    check = decide(judge(np.full(20, -5.5), _separated(rng), LABELS), "warn", True, Path("c.pt"))
    return check.to_dict()


def test_the_bundle_schema_carries_the_check_and_reads_bundles_without_it():
    from ssn_edge.runtime.schema import BundleError, read_metadata

    v1 = json.loads((FIXTURES / "v1_plain_metadata.json").read_text())
    meta = read_metadata(v1, "v1")
    assert meta.collapse_check is None and "collapse_check" not in meta.to_dict()  # old readers can read it
    data = {**json.loads(json.dumps(meta.to_dict())), "collapse_check": _collapsed_record()}
    with_check = read_metadata(data, "v2")
    assert with_check.collapse_check.collapsed_score and with_check.collapse_check.action == "kept"
    assert read_metadata(json.loads(json.dumps(with_check.to_dict())), "again") == with_check
    data["collapse_check"]["score_auroc"] = 2.0
    with pytest.raises(BundleError, match=r"field 'collapse_check.score_auroc' is 2.0, expected a fraction"):
        read_metadata(data, "m.json")


def test_export_copies_the_checkpoints_check_into_the_metadata(tiny_checkpoint, tmp_path):
    from ssn_edge.export.exporter import ExportOptions, export_bundle
    from ssn_edge.model.checkpoint import load_checkpoint

    record = _collapsed_record()
    assert dataclasses.asdict(CollapseCheck.from_dict(record)) == record  # the checkpoint's record is the bundle's
    check = load_checkpoint(tiny_checkpoint).collapse
    assert check is not None
    assert export_bundle(tiny_checkpoint, tmp_path / "b", ExportOptions()).metadata.collapse_check == check


def test_bunched_scores_are_flagged_and_spread_ones_not():
    from ssn_edge.report.bunching import bunching_warning, score_bunching

    threshold = 0.0041
    bunched = score_bunching(np.full(20, 0.0041) + np.arange(20) * 1e-7, threshold)
    spread = score_bunching(np.r_[np.linspace(0.001, 0.02, 10), np.linspace(0.3, 0.99, 10)], 0.1)
    assert bunched["scores_bunched"] and bunched["near_threshold_fraction"] == 1.0
    assert not spread["scores_bunched"] and spread["near_threshold_fraction"] <= 0.25
    # far from the threshold but one value: bunched by its spread alone
    constant = score_bunching(np.full(20, 0.9), 0.1)
    assert constant["scores_bunched"] and constant["near_threshold_fraction"] == 0.0
    records = [{"runtime": "torch", "precision": "fp32", **bunched},
               {"runtime": "openvino", "precision": "int8", **spread}]
    line = bunching_warning(records, threshold)
    assert line.startswith("Image scores are bunched (torch fp32): 100 % of the images") and "openvino" not in line
    assert bunching_warning(records[1:], 0.1) is None


def test_the_report_warns_about_trainings_collapse_check():
    from types import SimpleNamespace

    from ssn_edge.report.build import collapse_warning
    from ssn_edge.runtime.schema import CollapseCheck as MetaCheck

    record = _collapsed_record()
    bundle = SimpleNamespace(metadata=SimpleNamespace(collapse_check=MetaCheck(**record)))
    assert collapse_warning(bundle) == f"Training's {record['message']}."
    healthy = MetaCheck(**{**record, "collapsed_score": False, "action": "none"})
    assert collapse_warning(SimpleNamespace(metadata=SimpleNamespace(collapse_check=healthy))) is None
    assert collapse_warning(SimpleNamespace(metadata=SimpleNamespace(collapse_check=None))) is None


def test_the_record_round_trips():
    record = _collapsed_record()
    assert CollapseCheck.from_dict({**record, "later_field": 1}).to_dict() == record


def test_score_candidates_rank_the_heads_score_the_maps_maximum_and_its_top_cells_mean():
    from ssn_edge.train.collapse import score_candidates

    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(6, np.int64), np.ones(6, np.int64)]
    maps = rng.normal(0, 0.1, (12, 20, 20)).astype(np.float32)
    # the defective half: a wide faint patch (its top cells' mean lifts it); every image: one bright stray cell, its
    # height unrelated to the label, so the maximum ranks the halves poorly
    maps[6:, 5:15, 5:15] += 1.0
    maps[np.arange(12), 2, 2] += np.r_[9.0, 3.0, 8.0, 2.5, 7.0, 3.5, 2.0, 8.5, 3.0, 9.5, 2.5, 7.5] + 20.0
    logits = np.r_[np.linspace(0, 1, 6), np.linspace(0.5, 1.5, 6)]
    got = score_candidates(maps, logits, labels, sigma=0.0, top=0.1)
    assert list(got) == ["none", "map_max", "map_top"]
    assert got["map_top"] == 1.0 and got["map_max"] < 0.7
    assert got["none"] == pytest.approx(_auroc_of(labels, logits))
    assert list(score_candidates(maps, logits, labels, sigma=1.0, top=0.0)) == ["none", "map_max"]  # top 0: not offered
    nan = score_candidates(np.full_like(maps, np.nan), np.full(12, np.nan), labels, sigma=1.0, top=0.1)
    assert set(nan.values()) == {0.5}  # NaN outputs read as the constant 0, as judge() reads them


def _auroc_of(labels, values) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, values))


@pytest.mark.parametrize("best", ["none", "map_max", "map_top", "tie"])
def test_score_anchor_auto_takes_whichever_ranks_the_check_set_best_and_records_it(tiny_dataset, tmp_path,
                                                                                   monkeypatch, best):
    import ssn_edge.train.loop as loop
    from ssn_edge.evaluation.evaluate import predict_raw
    from ssn_edge.model.load import load_model
    from ssn_edge.model.ssn import anchor_max, anchor_top
    from ssn_edge.train.job import train_job

    rigged = {"none": {"none": 0.9, "map_max": 0.6, "map_top": 0.7}, "map_max": {"none": 0.6, "map_max": 0.9,
              "map_top": 0.7}, "map_top": {"none": 0.6, "map_max": 0.7, "map_top": 0.9},
              "tie": {"none": 0.6, "map_max": 0.9, "map_top": 0.9}}[best]
    seen = {}

    def candidates(raw_maps, logits, labels, sigma, top):
        seen.update(n=len(labels), sigma=sigma, top=top)
        return dict(rigged)

    monkeypatch.setattr(loop, "score_candidates", candidates)
    d = tiny_recipe_dict(tiny_dataset)
    d["model"].update(score_anchor="auto", anchor_top=0.05)
    result = train_job(recipe_from_dict(d), tmp_path / "run", progress=False, evaluate=False)
    assert seen == {"n": result.collapse.normal + result.collapse.defective, "sigma": 1.0, "top": 0.05}
    chosen = "map_max" if best == "tie" else best  # a tie keeps the earlier, simpler score
    loaded = load_model(result.checkpoint)
    assert loaded.recipe.model.score_anchor == chosen
    images = np.random.default_rng(0).normal(0, 1, (4, 3, 64, 64)).astype(np.float32)
    maps, scores = predict_raw(loaded.model, images)
    maps_t = torch.from_numpy(maps)[:, None]
    as_max = np.allclose(scores, anchor_max(maps_t, 1.0).numpy(), rtol=0, atol=1e-5)
    as_top = np.allclose(scores, anchor_top(maps_t, 1.0, 0.05).numpy(), rtol=0, atol=1e-5)
    assert (as_max, as_top) == (chosen == "map_max", chosen == "map_top")
    # the record judges the score chosen, as the saved model gives it (anchored, read off the maps already scored)
    from ssn_edge.data import load_dataset, split_validation
    from ssn_edge.train.collapse import check_model
    from ssn_edge.train.job import collapse_check_set

    r = loaded.recipe
    split = split_validation(load_dataset(tiny_dataset), r.data.val_fraction, r.data.val_min, r.data.val_seed)
    again = check_model(loaded.model, collapse_check_set(split, (64, 64), r.train.setting))
    for field in ("score_auroc", "score_spread", "map_max_auroc", "map_spread"):
        assert getattr(result.collapse, field) == pytest.approx(getattr(again, field), abs=1e-4), field


def test_the_unsupervised_check_set_adds_the_defective_training_images_it_does_not_train_on(tiny_dataset):
    import dataclasses as dc

    from ssn_edge.data import ValidationSplit, load_dataset, select, split_validation
    from ssn_edge.train.job import collapse_check_set

    samples = load_dataset(tiny_dataset)
    split = split_validation(samples, 0.1, 10, 0)
    defects = [dc.replace(s, split="train") for s in select(samples, "test") if s.label == 1][:3]
    with_defects = ValidationSplit(split.train + defects, split.held_out)
    n = len(split.held_out)
    unsup = collapse_check_set(with_defects, (64, 64), "unsupervised")
    assert len(unsup) == 2 * n + 3 and unsup.labels.tolist() == [0] * n + [1] * (n + 3)
    assert unsup.paths[-3:] == [str(s.image) for s in defects] and unsup.masks[-3:].any((1, 2)).all()
    # settings that train on the defective images leave them out: a check on what was trained on says nothing
    for setting in ("supervised", "weak", "mixed", "auto"):
        assert len(collapse_check_set(with_defects, (64, 64), setting)) == 2 * n
    assert collapse_check_set(ValidationSplit(split.train, []), (64, 64), "unsupervised") is None


def test_score_anchor_auto_without_held_out_images_keeps_the_heads_score(tiny_dataset, tmp_path):
    from ssn_edge.model.load import load_model
    from ssn_edge.train.job import train_job

    d = tiny_recipe_dict(tiny_dataset)
    d["model"]["score_anchor"] = "auto"
    d["data"]["val_fraction"] = 0.0
    d["data"]["val_min"] = 0
    result = train_job(recipe_from_dict(d), tmp_path / "run", progress=False, evaluate=False)
    assert load_model(result.checkpoint).recipe.model.score_anchor == "none"
    with pytest.raises(RecipeError, match="score_anchor auto"):
        recipe_from_dict({**d, "tiling": {"tile": [32, 32], "stride": [32, 32]}})

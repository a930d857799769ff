"""Weak and mixed supervision: hiding masks, resolving the setting, the CAM baseline, and what the bundle records."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import loss_inputs, tiny_recipe_dict
from ssn_edge.config import RecipeError, recipe_from_dict
from ssn_edge.data import ArraySet, Sample
from ssn_edge.data.supervision import apply_setting, hide_masks, infer_setting


def _samples(per_type: dict[str, int]) -> list[Sample]:
    out = [Sample(Path(f"good{i}.png"), None, 0, "train", "good") for i in range(5)]
    for defect, n in per_type.items():
        for i in range(n):
            out.append(Sample(Path(f"{defect}{i}.png"), Path(f"{defect}{i}_mask.png"), 1, "train", defect))
            out.append(Sample(Path(f"t_{defect}{i}.png"), Path(f"t_{defect}{i}_mask.png"), 1, "test", defect))
    return out


def _kept(samples: list[Sample]) -> dict[str, int]:
    kept: dict[str, int] = {}
    for s in samples:
        if s.split == "train" and s.label == 1 and s.has_mask:
            kept[s.defect] = kept.get(s.defect, 0) + 1
    return kept


def test_hide_masks_keeps_the_fraction_per_defect_type_and_spares_the_test_split():
    samples = _samples({"crack": 20, "blowhole": 30, "fray": 3})
    out = hide_masks(samples, 0.1, seed=0)
    assert _kept(out) == {"crack": 2, "blowhole": 3, "fray": 1}  # a rare type keeps at least one
    assert all(s.has_mask for s in out if s.split == "test" and s.label == 1)
    assert [s.image for s in out] == [s.image for s in samples]  # nothing dropped or reordered
    again, other = hide_masks(samples, 0.1, seed=0), hide_masks(samples, 0.1, seed=1)
    chosen = lambda ss: {s.image for s in ss if s.split == "train" and s.has_mask}  # noqa: E731
    assert chosen(again) == chosen(out) and chosen(other) != chosen(out)
    assert _kept(hide_masks(samples, 0.0)) == {} and _kept(hide_masks(samples, 1.0)) == {"crack": 20, "blowhole": 30, "fray": 3}


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_hide_masks_rejects_a_fraction_outside_0_1(fraction):
    with pytest.raises(ValueError, match="data.mask_fraction"):
        hide_masks(_samples({"crack": 2}), fraction)


def _arrays(n_good: int, masked: int, unmasked: int, size: int = 32, seed: int = 0) -> ArraySet:
    n = n_good + masked + unmasked
    rng = np.random.default_rng(seed)
    labels = np.array([0] * n_good + [1] * (masked + unmasked), dtype=np.int64)
    masks = np.zeros((n, size, size), dtype=bool)
    masks[n_good : n_good + masked, 4:12, 4:12] = True
    valid = np.ones(n, dtype=bool)
    valid[n_good + masked :] = False
    images = rng.normal(0, 1, (n, 3, size, size)).astype(np.float32)
    return ArraySet(images, masks, labels, valid, [f"{i}.png" for i in range(n)])


@pytest.mark.parametrize(
    "masked, unmasked, expected",
    [(0, 0, "unsupervised"), (3, 0, "supervised"), (0, 3, "weak"), (1, 2, "mixed")],
)
def test_setting_is_inferred_from_the_data(masked, unmasked, expected):
    arrays = _arrays(4, masked, unmasked)
    assert infer_setting(arrays) == expected
    _, info = apply_setting(arrays, "auto")
    assert info.setting == expected and info.source == "data"


def test_weak_ignores_every_mask_and_counts_say_so():
    arrays = _arrays(4, masked=2, unmasked=1)
    used, info = apply_setting(arrays, "weak")
    assert not used.masks.any() and not used.mask_valid[4:].any() and used.mask_valid[:4].all()
    assert arrays.masks.any()  # the caller's arrays are not modified
    assert (info.normal, info.with_mask, info.label_only, info.ignored) == (4, 0, 3, 0)
    _, mixed = apply_setting(arrays, "mixed")
    assert (mixed.with_mask, mixed.label_only) == (2, 1)
    _, unsup = apply_setting(arrays, "unsupervised")
    assert (unsup.with_mask, unsup.label_only, unsup.ignored) == (0, 0, 3)
    assert "1 defective with image label only" in mixed.describe()


@pytest.mark.parametrize("setting", ["supervised", "weak", "mixed"])
def test_settings_with_defects_need_defective_images(setting):
    with pytest.raises(ValueError, match="needs defective images"):
        apply_setting(_arrays(4, 0, 0), setting)


def test_recipe_rejects_an_unknown_setting():
    d = tiny_recipe_dict(Path("unused"))
    d["train"]["setting"] = "semi"
    with pytest.raises(RecipeError, match="train.setting"):
        recipe_from_dict(d)


def _cam_recipe():
    d = tiny_recipe_dict(Path("unused"))
    d["model"]["cls_head"] = "cam"
    d["train"]["setting"] = "weak"
    return recipe_from_dict(d)


def test_cam_map_is_the_gap_classifier_applied_per_position():
    from ssn_edge.model.ssn import SuperSimpleNet

    model = SuperSimpleNet(_cam_recipe().model).eval()
    assert model.heads.segmentation is None
    with torch.no_grad():
        cam, score = model(torch.randn(2, 3, 64, 64))
        head = model.heads.classification
        a = head.conv(model.heads.adaptor(model.features(torch.randn(1, 3, 64, 64))))
    assert cam.shape == (2, 1, 16, 16) and score.shape == (2,)
    assert torch.allclose(cam.mean(dim=(1, 2, 3)), score, atol=1e-5)
    # score = Linear(GAP(A)): the class-activation identity
    gap = head.fc.weight.flatten() @ a.mean(dim=(2, 3))[0] + head.fc.bias
    assert torch.allclose(head.fc(a).mean(), gap[0], atol=1e-5)


def test_cam_trains_on_image_labels_only():
    from ssn_edge.model.ssn import SuperSimpleNet
    from ssn_edge.train.batches import feature_masks

    recipe = _cam_recipe()
    arrays, _ = apply_setting(_arrays(2, 0, 2, size=64), "weak")
    model = SuperSimpleNet(recipe.model)
    chunk = np.array([[0, 0], [1, 0], [2, 0], [3, 0]])
    l2, l3 = model.features.raw(torch.from_numpy(arrays.images))
    gt, valid = feature_masks(arrays, chunk, (16, 16))
    loss, parts, called = loss_inputs(model, recipe, l2, l3, gt, valid)
    assert not called and set(parts) == {"cls_focal"}  # no pixel loss reaches the CAM
    loss.backward()
    assert model.heads.classification.fc.weight.grad.abs().sum() > 0


def test_cam_complexity_counts_no_segmentation_head():
    from ssn_edge.model.complexity import head_macs

    d = tiny_recipe_dict(Path("unused"))["model"]
    cam = head_macs(384, 64, 64, recipe_from_dict({"model": {**d, "cls_head": "cam", "cls_hidden": 128}}).model)
    assert cam["segmentation"] == 0
    assert cam["classification"] == 384 * 128 * 25 * 64 * 64 + 128 * 64 * 64


@pytest.fixture(scope="module")
def manifest_dataset(tmp_path_factory) -> Path:
    """The synthetic set as a manifest whose train split also holds defective images with masks."""
    from ssn_edge.data.synthetic import SyntheticSpec, make_dataset

    root = make_dataset(tmp_path_factory.mktemp("weak"), SyntheticSpec(size=64, n_train=8, n_test_good=4, n_test_defect_per_type=4))
    rows = [(f"train/good/{p.name}", "", 0, "good", "train") for p in sorted((root / "train" / "good").iterdir())]
    rows += [(f"test/good/{p.name}", "", 0, "good", "test") for p in sorted((root / "test" / "good").iterdir())]
    for defect in ("scratch", "spot", "crack"):
        for i in range(4):
            rows.append((f"test/{defect}/{i:03d}.png", f"ground_truth/{defect}/{i:03d}_mask.png", 1, defect,
                         "train" if i < 3 else "test"))
    with open(root / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "mask", "label", "defect", "split"])
        w.writerows(rows)
    return root / "manifest.csv"


def test_mixed_training_run_records_its_supervision_through_to_the_bundle_and_report(tmp_path, manifest_dataset):
    from ssn_edge.model.checkpoint import load_checkpoint
    from ssn_edge.export.exporter import export_bundle
    from ssn_edge.train.job import train_job

    d = tiny_recipe_dict(manifest_dataset)
    d["data"]["mask_fraction"] = 0.34  # of 3 annotated defects per type: 1 keeps its mask
    d["train"]["setting"] = "auto"
    result = train_job(recipe_from_dict(d), tmp_path / "run", progress=False)
    record = load_checkpoint(result.checkpoint)
    assert record.recipe["train"]["setting"] == "mixed"
    sup = record.supervision
    # 4 of the 8 normal training images held out for thresholds (data.val_fraction; at most half)
    assert (sup.normal, sup.with_mask, sup.label_only, sup.source) == (4, 3, 6, "data")
    bundle = export_bundle(result.checkpoint, tmp_path / "bundle")
    meta = json.loads((tmp_path / "bundle" / "metadata.json").read_text())
    assert meta["provenance"]["setting"] == "mixed" and meta["supervision"]["label_only"] == 6
    from ssn_edge.report.html import supervision_text

    text = supervision_text(bundle.metadata.supervision)
    assert "3 defective with mask, 6 defective with image label only" in text and "inferred from the data" in text


def test_cam_baseline_exports_and_runs_in_the_runtime(tmp_path, manifest_dataset):
    from ssn_edge.export.exporter import ExportOptions, export_bundle
    from ssn_edge.train.job import train_job
    from ssn_edge.runtime.engine import Engine

    d = tiny_recipe_dict(manifest_dataset)
    d["model"]["cls_head"] = "cam"
    d["train"]["setting"] = "weak"
    result = train_job(recipe_from_dict(d), tmp_path / "run", progress=False)
    export_bundle(result.checkpoint, tmp_path / "bundle", ExportOptions(int8=True))
    engine = Engine(tmp_path / "bundle", precision="int8")
    pred = engine.predict_images([np.full((64, 64, 3), 0.5, np.float32)])[0]
    assert pred.anomaly_map.shape == (64, 64) and np.isfinite(pred.score)
    assert engine.bundle.metadata.provenance.setting == "weak"


def test_weak_run_switches_to_pseudo_masks_at_the_recipes_epoch(tmp_path, manifest_dataset):
    from ssn_edge.model.checkpoint import load_checkpoint
    from ssn_edge.train.job import train_job

    d = tiny_recipe_dict(manifest_dataset)
    d["train"].update(setting="weak", epochs=3)
    d["weak"] = {"pseudo_mask_epoch": 1}
    result = train_job(recipe_from_dict(d), tmp_path / "run", progress=False, evaluate=False)
    history = load_checkpoint(result.checkpoint).history
    assert "pseudo_masked" not in history[0] and history[1]["pseudo_candidates"] == 9
    assert "pseudo_candidates" not in history[2]  # made once
    assert all(np.isfinite(r["loss"]) for r in history)


@pytest.mark.parametrize("setting, model, makes", [("weak", {}, True), ("supervised", {}, False),
                                                   ("weak", {"cls_head": "cam"}, False)])
def test_pseudo_masks_are_made_only_where_a_map_can_teach_label_only_defects(tmp_path, manifest_dataset, monkeypatch,
                                                                             setting, model, makes):
    """At the default epoch 2: not in a supervised run (every defect has its mask), nor for the CAM head (no
    segmentation map to teach)."""
    import ssn_edge.train.loop as tr
    from ssn_edge.train.job import train_job

    asked = []
    monkeypatch.setattr(tr, "with_pseudo_masks", lambda model, arrays, cfg, seed: asked.append(cfg) or (arrays, {
        "pseudo_masked": 0, "pseudo_candidates": 0}))
    d = tiny_recipe_dict(manifest_dataset)
    d["model"].update(model)
    d["train"].update(setting=setting, epochs=3)
    train_job(recipe_from_dict(d), tmp_path / "run", progress=False, evaluate=False)
    assert len(asked) == int(makes)
    if makes:  # the weak section's defaults: the grown pseudo-masks of the best measured rows
        assert (asked[0].top, asked[0].grow_quantile) == (0.25, 0.99)


def test_masked_share_draws_that_share_of_a_batchs_defects_from_masked_images():
    from ssn_edge.train.batches import draw_defective

    defective = np.array([[i, v] for i in range(10) for v in range(2)])  # 10 images x 2 flip views
    mask_valid = np.zeros(12, dtype=bool)
    mask_valid[3] = True  # masks on 1 image of 10 (2 items of 20)
    drawn = draw_defective(defective, mask_valid, 8, 0.5, np.random.default_rng(0))
    assert drawn.shape == (8, 2) and mask_valid[drawn[:, 0]].sum() == 4
    assert set(map(tuple, drawn[:4])) <= {(3, 0), (3, 1)}
    # None: uniform, the masked image about 10 % of draws
    uniform = draw_defective(defective, mask_valid, 4000, None, np.random.default_rng(0))
    assert 0.07 < mask_valid[uniform[:, 0]].mean() < 0.13
    # share 0 draws no mask; with only one kind present the share cannot apply: uniform over what there is
    assert not mask_valid[draw_defective(defective, mask_valid, 8, 0.0, np.random.default_rng(1))[:, 0]].any()
    all_masked = np.ones(12, dtype=bool)
    assert len(draw_defective(defective, all_masked, 8, 0.5, np.random.default_rng(1))) == 8


def test_the_weak_section_is_validated():
    with pytest.raises(RecipeError, match="weak.masked_share"):
        recipe_from_dict({"weak": {"masked_share": 1.5}})
    assert recipe_from_dict({"weak": {"masked_share": None}}).weak.masked_share is None
    for bad in (0.0, 0.999, 1.5):
        with pytest.raises(RecipeError, match="weak.pseudo_grow"):
            recipe_from_dict({"weak": {"pseudo_grow": bad}})
    with pytest.raises(RecipeError, match="weak.pseudo_top"):
        recipe_from_dict({"weak": {"pseudo_top": 0.0}})
    with pytest.raises(RecipeError, match="weak.pseudo_mask_epoch"):
        recipe_from_dict({"weak": {"pseudo_mask_epoch": -1}})
    with pytest.raises(RecipeError, match="label_only_score_to_map"):
        recipe_from_dict({"weak": {"label_only_score_to_map": "no"}})


@pytest.mark.parametrize("setting, to_map, rows, reaches", [
    ("mixed", True, [2], True), ("mixed", False, [2], False), ("mixed", False, [1], True),
    ("mixed", None, [2], True), ("weak", None, [2], False)])  # None: true for mixed, false for weak (as measured)
def test_label_only_score_to_map_decides_whether_a_mask_less_defects_score_bends_the_map(monkeypatch, setting, to_map,
                                                                                       rows, reaches):
    """Only the score's loss is kept, so any gradient in the segmentation head came through the map input of the
    classification head: row 1 is a defect with a mask, row 2 one with its label only."""
    import ssn_edge.train.batches as batches
    import ssn_edge.train.step as tr
    from ssn_edge.train.losses import focal_loss
    from ssn_edge.model.ssn import SuperSimpleNet

    d = tiny_recipe_dict(Path("unused"))
    d["train"]["setting"] = setting
    d["weak"] = {"label_only_score_to_map": to_map}
    recipe = recipe_from_dict(d)
    arrays = _arrays(1, masked=1, unmasked=1, size=64)
    torch.manual_seed(0)
    model = SuperSimpleNet(recipe.model)
    chunk = np.array([[r, 0] for r in rows])
    l2, l3 = model.features.raw(torch.from_numpy(arrays.images[rows]))
    gt, valid = batches.feature_masks(arrays, chunk, (16, 16))
    monkeypatch.setattr(tr, "ssn_loss", lambda m, score, target, label, pv, **kw: (focal_loss(score, label, gamma=0.0), {}))
    loss, _ = tr.train_step(model, recipe, l2, l3, gt, valid, np.random.default_rng(0))
    loss.backward()
    seg = sum(float(p.grad.abs().sum()) for p in model.heads.segmentation.parameters() if p.grad is not None)
    assert (seg > 0) == reaches
    assert model.heads.classification.fc.weight.grad.abs().sum() > 0  # the score itself always learns


def _every_map_a_defect(monkeypatch) -> None:
    """A tiny model's map after an epoch stands out nowhere: pseudo-masks with the normal level at its lowest, so
    every label-only defect gets one."""
    import ssn_edge.train.loop as tr

    make = tr.with_pseudo_masks
    monkeypatch.setattr(tr, "with_pseudo_masks",
                        lambda model, arrays, cfg, seed: make(model, arrays, dataclasses.replace(cfg, normal_quantile=0.0), seed=seed))


def test_pseudo_masks_do_not_count_as_annotated_when_batches_are_balanced(tmp_path, manifest_dataset, monkeypatch):
    import ssn_edge.train.batches as tr
    from ssn_edge.model.checkpoint import load_checkpoint
    from ssn_edge.train.job import train_job

    seen = []
    original = tr.draw_defective

    def spy(defective, mask_valid, n, share, rng):
        seen.append(int(mask_valid[defective[:, 0]].sum()))
        return original(defective, mask_valid, n, share, rng)

    monkeypatch.setattr(tr, "draw_defective", spy)
    _every_map_a_defect(monkeypatch)
    d = tiny_recipe_dict(manifest_dataset)
    d["data"]["mask_fraction"] = 0.5
    d["train"].update(setting="mixed", epochs=2)
    d["weak"] = {"pseudo_mask_epoch": 1, "pseudo_top": 0.5, "masked_share": 0.5}
    result = train_job(recipe_from_dict(d), tmp_path / "run", progress=False, evaluate=False)
    history = load_checkpoint(result.checkpoint).history
    assert history[1]["pseudo_masked"] > 0  # some label-only defects got a pseudo-mask ...
    assert len(set(seen)) == 1 and seen[0] > 0  # ... yet the pool of annotated defects never grew

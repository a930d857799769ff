"""Training loop: determinism, feature cache exactness, resume, supervised targets, checkpoints, recipes."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import loss_inputs, tiny_recipe_dict
from ssn_edge.model.checkpoint import (FORMAT, KIND_SSN, BackboneIdentity, CheckpointError, CheckpointRecord,
                                       load_checkpoint, save_checkpoint)
from ssn_edge.config import Recipe, RecipeError, TilingRecipe, load_recipe, recipe_from_dict
from ssn_edge.data import ArraySet
from ssn_edge.train.batches import make_items
from ssn_edge.train.loop import train
from ssn_edge.train.step import train_step

ROOT = Path(__file__).resolve().parents[1]


def _arrays(n: int = 6, size: int = 64, defective: int = 0, seed: int = 0) -> ArraySet:
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 1, (n, 3, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    labels = np.zeros(n, dtype=np.int64)
    for i in range(n - defective, n):
        labels[i] = 1
        masks[i, 8:40, 8:40] = True
    return ArraySet(images, masks, labels, np.ones(n, dtype=bool), [f"img{i}.png" for i in range(n)])


def _recipe(**train_kw):
    d = tiny_recipe_dict(Path("unused"))
    d["train"].update(train_kw)
    return recipe_from_dict(d)


def _heads_state(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(ckpt).heads


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_training_is_deterministic_with_a_seed(tmp_path):
    arrays = _arrays()
    r1 = train(_recipe(epochs=2), arrays, tmp_path / "a", progress=False)
    r2 = train(_recipe(epochs=2), arrays, tmp_path / "b", progress=False)
    r3 = train(_recipe(epochs=2, seed=1), arrays, tmp_path / "c", progress=False)
    assert _same(_heads_state(r1.checkpoint), _heads_state(r2.checkpoint))
    assert not _same(_heads_state(r1.checkpoint), _heads_state(r3.checkpoint))
    assert r1.history[0]["loss"] == r2.history[0]["loss"]


def test_feature_cache_is_exact(tmp_path):
    """Caching must change speed only: same seed, same weights with and without it."""
    arrays = _arrays()
    cached = train(_recipe(cache_features=True), arrays, tmp_path / "c", progress=False)
    uncached = train(_recipe(cache_features=False), arrays, tmp_path / "u", progress=False)
    a, b = _heads_state(cached.checkpoint), _heads_state(uncached.checkpoint)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_resume_continues_exactly(tmp_path):
    arrays = _arrays()
    full = train(_recipe(epochs=2), arrays, tmp_path / "full", progress=False)
    first = train(_recipe(epochs=1), arrays, tmp_path / "half", progress=False)
    resumed = train(_recipe(epochs=2), arrays, tmp_path / "half", resume=first.checkpoint, progress=False)
    assert len(resumed.history) == 2
    assert _same(_heads_state(full.checkpoint), _heads_state(resumed.checkpoint))


def test_supervised_noise_stays_outside_real_defects_and_labels_follow():
    recipe = _recipe(setting="supervised")
    arrays = _arrays(n=4, defective=2)
    from ssn_edge.model.ssn import SuperSimpleNet
    from ssn_edge.train.batches import feature_masks

    model = SuperSimpleNet(recipe.model)
    chunk = np.array([[0, 0], [1, 0], [2, 0], [3, 0]])
    l2, l3 = model.features.raw(torch.from_numpy(arrays.images))
    gt, valid = feature_masks(arrays, chunk, (16, 16))
    _, _, captured = loss_inputs(model, recipe, l2, l3, gt, valid)
    target, label = captured["target"], captured["label"]
    gt2 = torch.cat([gt, gt])
    assert torch.equal(target * gt2, gt2)  # real defects are targets
    assert label[[2, 3, 6, 7]].eq(1).all()  # images with real defects are positive, both copies
    assert torch.equal(label, (target.flatten(1).amax(1) > 0).float())


def test_defective_without_mask_is_positive_and_its_pixels_unknown():
    recipe = _recipe(setting="supervised")
    arrays = _arrays(n=2, defective=1)
    arrays.mask_valid[1] = False
    arrays.masks[1] = False
    from ssn_edge.model.ssn import SuperSimpleNet
    from ssn_edge.train.batches import feature_masks
    import ssn_edge.train.step as tr

    model = SuperSimpleNet(recipe.model)
    chunk = np.array([[0, 0], [1, 0]])
    l2, l3 = model.features.raw(torch.from_numpy(arrays.images))
    gt, valid = feature_masks(arrays, chunk, (16, 16))
    captured = {}
    original = tr.ssn_loss
    tr.ssn_loss = lambda *a, **k: captured.update(args=a) or original(*a, **k)
    try:
        train_step(model, recipe, l2, l3, gt, valid, np.random.default_rng(0))
    finally:
        tr.ssn_loss = original
    _, _, target, label, pixel_valid = captured["args"]
    assert label[1] == 1 and label[3] == 1
    synthetic = target[1] > 0
    assert torch.equal(pixel_valid[1], synthetic)  # only our own synthetic pixels are known


def test_supervised_flip_items_and_unsupervised_ignores_defects():
    arrays = _arrays(n=5, defective=2)
    items = make_items(arrays, "supervised")
    assert len(items.normal) == 3 and len(items.defective) == 8  # 2 defective x 4 flip views
    assert len(make_items(arrays, "unsupervised").defective) == 0
    with pytest.raises(ValueError, match="defective"):
        make_items(_arrays(n=3), "supervised")


def _record(recipe: dict) -> CheckpointRecord:
    return CheckpointRecord(kind=KIND_SSN, recipe=recipe, backbone=BackboneIdentity("resnet18"), heads={})


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.pt"
    save_checkpoint(target, _record({}))

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        save_checkpoint(target, _record({"new": 1}))
    assert load_checkpoint(target).recipe == {}  # the old one is intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left
    with pytest.raises(TypeError, match="CheckpointRecord"):
        save_checkpoint(target, {"recipe": {}, "heads": {}, "backbone": {}})


def test_checkpoint_rejects_corrupt_and_foreign_files(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"format": "ssn-edge-checkpoint", "version": 99, "recipe": {}, "heads": {}, "backbone": {}}, other)
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(other)
    torch.save({"format": FORMAT, "version": 2, "kind": "ssn", "recipe": {}, "backbone": {"nom": "x"}, "heads": {}}, other)
    with pytest.raises(CheckpointError, match="other.pt: checkpoint record is malformed"):
        load_checkpoint(other)


def _as_version_1(record: CheckpointRecord) -> dict:
    """The flat dict ssn-edge wrote before checkpoint format 2, recipe in the earlier layout, for this record."""
    recipe = copy.deepcopy(record.recipe)
    recipe["train"].update(recipe.pop("weak"), pseudo_rest="normal", pseudo_refresh=False, pseudo_teacher=None,
                           pseudo_source="map", pseudo_border=0, mil_top=None, mil_items=4, real_pixel_weight=0.0,
                           paste_copies=0, channels_last=False, clip_grad_norm=None, flip_augment=True, eval_every=0)
    recipe["noise"].update(sigma_end=None, empty_prob=0.5, z_dim=16, gen_hidden=128)
    del recipe["knn"], recipe["model"]["kind"]
    return {"format": FORMAT, "version": 1, "recipe": recipe, "heads": record.heads, "backbone": record.backbone.to_dict(),
            "supervision": {**dataclasses.asdict(record.supervision), "pasted": 0}, "epoch": record.epoch,
            "optimizer": record.resume.optimizer, "scheduler": record.resume.scheduler, "rng": record.resume.rng,
            "history": record.history}


def test_a_version_1_checkpoint_is_read_in_the_current_layout_and_resumes_exactly(tmp_path):
    from ssn_edge.model.load import load_model

    arrays = _arrays()
    first = train(_recipe(epochs=1), arrays, tmp_path / "v2", progress=False)
    v2 = load_checkpoint(first.checkpoint)
    old = tmp_path / "v1.pt"
    torch.save(_as_version_1(v2), old)
    v1 = load_checkpoint(old)
    assert v1.recipe == v2.recipe and v1.supervision == v2.supervision and v1.epoch == 1 and v1.kind == KIND_SSN
    loaded = load_model(old)
    assert loaded.kind == "ssn" and loaded.supervision["setting"] == "unsupervised" and loaded.trained_on is None
    a = train(_recipe(epochs=2), arrays, tmp_path / "from_v1", resume=old, progress=False)
    b = train(_recipe(epochs=2), arrays, tmp_path / "from_v2", resume=first.checkpoint, progress=False)
    assert _same(_heads_state(a.checkpoint), _heads_state(b.checkpoint)) and a.history == b.history[:1] + a.history[1:]
    with pytest.raises(ValueError, match="already trained 2 epochs; train.epochs 2 leaves none to run"):
        train(_recipe(epochs=2), arrays, tmp_path / "again", resume=a.checkpoint, progress=False)


def test_recipe_validation_names_the_bad_key(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    with pytest.raises(RecipeError, match="train.epoch"):
        load_recipe(bad)
    bad.write_text("train:\n  batch_size: many\n")
    with pytest.raises(RecipeError, match="train.batch_size"):
        load_recipe(bad)
    bad.write_text("noise:\n  kind: pink\n")
    with pytest.raises(RecipeError, match="noise.kind"):
        load_recipe(bad)


def test_keys_of_the_earlier_layout_say_where_they_went(tmp_path):
    bad = tmp_path / "old.yaml"
    bad.write_text("train:\n  pseudo_grow: 0.99\n")
    with pytest.raises(RecipeError, match="old.yaml: recipe key 'train.pseudo_grow' is now 'weak.pseudo_grow'"):
        load_recipe(bad)
    bad.write_text("train:\n  mil_top: 0.01\n")
    with pytest.raises(RecipeError, match="'train.mil_top' was removed: .*broke the weak model"):
        load_recipe(bad)


def test_a_recorded_removed_option_loads_when_it_was_off_and_is_refused_when_on():
    from ssn_edge.config import upgrade_recipe_dict

    off = Recipe().to_dict()
    off["noise"]["sigma_min"] = None  # what checkpoints of the commits that had noise.sigma_min recorded by default
    assert recipe_from_dict(upgrade_recipe_dict(off)) == Recipe()
    on = Recipe().to_dict()
    on["noise"]["sigma_min"] = 0.25
    with pytest.raises(RecipeError, match="'noise.sigma_min' was removed: .*mixture of noise scales"):
        recipe_from_dict(upgrade_recipe_dict(on))


@pytest.mark.parametrize("epochs", [0, -1])
def test_epochs_below_one_are_refused_in_one_line_and_nothing_is_written(epochs, tiny_dataset, tmp_path):
    from click.testing import CliRunner

    import yaml
    from cli import main

    with pytest.raises(RecipeError, match=f"train.epochs must be >= 1, got {epochs}"):
        recipe_from_dict({"train": {"epochs": epochs}})
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_dataset)))
    res = CliRunner().invoke(main, ["train", "--recipe", str(recipe), "--out", str(tmp_path / "run"), "--epochs", str(epochs)])
    assert res.exit_code == 2 and res.output.strip() == f"error: {recipe}: train.epochs must be >= 1, got {epochs}"
    assert not (tmp_path / "run").exists()


def test_a_recipe_naming_only_its_data_gets_the_cpu_schedule():
    r = recipe_from_dict({"data": {"path": "parts/"}})
    assert (r.noise.kind, r.noise.sigma, r.noise.smooth) == ("adaptive", 1.0, 1.0)
    t = r.train
    assert (t.epochs, t.batch_size, t.lr_adaptor, t.lr_heads, t.precision) == (12, 16, 5e-4, 1e-3, "bf16")
    assert (t.feature_crop, t.crop_epochs, t.cls_focal_gamma, t.cache_features) == (32, 10, 0.0, True)
    w = r.weak  # the best measured weak / mixed setting (mixed_10_balanced_pseudo_grow)
    assert (w.masked_share, w.pseudo_mask_epoch, w.pseudo_top, w.pseudo_grow) == (0.5, 2, 0.25, 0.99)
    # the CPU recipe is the defaults on its data and weights
    cpu = load_recipe(ROOT / "recipes" / "mvtec_resnet18_cpu.yaml")
    same = recipe_from_dict({"name": cpu.name, "data": {"path": cpu.data.path}, "model": {"weights": cpu.model.weights}})
    assert cpu == same
    # the paper's protocol is one recipe away
    paper = load_recipe(ROOT / "recipes" / "mvtec_wrn50.yaml")
    assert (paper.noise.kind, paper.noise.sigma, paper.noise.smooth, paper.train.epochs, paper.train.batch_size) == (
        "fixed", 0.015, None, 300, 32)
    assert (paper.train.lr_adaptor, paper.train.lr_heads, paper.train.precision, paper.train.feature_crop,
            paper.train.cls_focal_gamma) == (1e-4, 2e-4, "fp32", None, 4.0)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_shipped_recipes_are_valid_and_set_only_what_differs_from_the_defaults(name):
    import yaml

    load_recipe(ROOT / "recipes" / name)
    written = yaml.safe_load((ROOT / "recipes" / name).read_text())
    defaults = {**Recipe().to_dict(), "tiling": dataclasses.asdict(TilingRecipe())}
    for section, values in written.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            default = defaults[section][key]
            default = list(default) if isinstance(default, tuple) else default
            assert value != default, f"{name}: {section}.{key} is the default ({value!r}); leave it out"


def test_cli_train_and_eval_on_synthetic_data(tiny_dataset, tmp_path):
    from click.testing import CliRunner

    from cli import main

    recipe = tmp_path / "tiny.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_dataset)))
    runner = CliRunner()
    res = runner.invoke(main, ["train", "--recipe", str(recipe), "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    res = runner.invoke(main, ["eval", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt")])
    assert res.exit_code == 0, res.output
    assert "pixel_aupro" in res.output
    res = runner.invoke(main, ["train", "--recipe", str(recipe), "--set", "train.epochz=2"])
    assert res.exit_code == 2 and "train.epochz" in res.output


def test_a_step_budget_sets_the_epochs_by_the_data_size_and_is_recorded(tmp_path):
    from ssn_edge.config import TrainConfig
    from ssn_edge.train.schedule import epochs_for_steps

    t = TrainConfig(steps=150)  # defaults: 12 epochs, 10 on crops
    assert (epochs_for_steps(t, 12).epochs, epochs_for_steps(t, 12).crop_epochs) == (12, 10)  # ~200 images
    assert (epochs_for_steps(t, 38).epochs, epochs_for_steps(t, 38).crop_epochs) == (4, 3)  # ~600 images
    assert epochs_for_steps(TrainConfig(), 38) == TrainConfig()  # no budget: epochs as given
    # 6 images in batches of 2: 3 batches an epoch, so 9 steps are 3 epochs, and the checkpoint says so
    result = train(_recipe(steps=9, batch_size=2, epochs=5, crop_epochs=4), _arrays(), tmp_path / "run", progress=False)
    assert len(result.history) == 3
    recorded = load_checkpoint(result.checkpoint).recipe["train"]
    assert (recorded["epochs"], recorded["crop_epochs"], recorded["steps"]) == (3, 2, 9)


def test_bf16_resolves_to_fp32_without_native_bf16(monkeypatch, caplog):
    from ssn_edge.config import TrainConfig
    from ssn_edge.train import schedule

    t = TrainConfig(precision="bf16")
    monkeypatch.setattr(schedule, "native_bf16", lambda: True)
    assert schedule.resolve_precision(t) is t
    monkeypatch.setattr(schedule, "native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="ssn_edge"):
        resolved = schedule.resolve_precision(t)
    assert resolved.precision == "fp32" and "no native bf16" in caplog.text
    assert schedule.resolve_precision(TrainConfig(precision="fp32")).precision == "fp32"


def test_the_checkpoint_records_the_precision_that_trained(monkeypatch, tmp_path):
    from ssn_edge.train import schedule

    monkeypatch.setattr(schedule, "native_bf16", lambda: False)
    seen = []
    original = schedule.autocast
    monkeypatch.setattr("ssn_edge.train.loop.autocast", lambda t: seen.append(t.precision) or original(t))
    result = train(_recipe(precision="bf16"), _arrays(), tmp_path / "run", progress=False)
    assert load_checkpoint(result.checkpoint).recipe["train"]["precision"] == "fp32"
    assert seen and set(seen) == {"fp32"}  # and every step ran without autocast


@pytest.mark.parametrize("cap, whole_steps", [(None, 4), (1, 1), (9, 4)])
def test_whole_map_steps_caps_only_the_whole_map_epochs(monkeypatch, tmp_path, cap, whole_steps):
    from ssn_edge.train import loop

    calls = []
    original = loop.heads_step
    monkeypatch.setattr(loop, "heads_step", lambda run, recipe, batch, crop, where: calls.append((where[0], crop))
                        or original(run, recipe, batch, crop, where))
    # 8 images, batches of 2: 4 batches an epoch; the first epoch on crops, the second on whole maps
    train(_recipe(epochs=2, crop_epochs=1, batch_size=2, whole_map_steps=cap), _arrays(n=8), tmp_path / "run",
          progress=False)
    assert [c for e, c in calls if e == 0] == [32] * 4  # crop epochs keep every batch
    assert [c for e, c in calls if e == 1] == [None] * whole_steps


def test_whole_map_steps_must_be_positive():
    with pytest.raises(RecipeError, match="train.whole_map_steps must be >= 1"):
        _recipe(whole_map_steps=0)

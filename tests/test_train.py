"""Training loop: determinism, feature cache exactness, resume, supervised targets, checkpoints, recipes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import loss_inputs, tiny_recipe_dict
from ssn_edge.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ssn_edge.config import RecipeError, load_recipe, recipe_from_dict
from ssn_edge.data import ArraySet
from ssn_edge.train.loop import make_items, train, train_step

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
    return load_checkpoint(ckpt)["heads"]


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
    from ssn_edge.train.loop import feature_masks

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
    from ssn_edge.train.loop import feature_masks
    import ssn_edge.train.loop as tr

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
    items = make_items(arrays, _recipe(setting="supervised"))
    assert len(items.normal) == 3 and len(items.defective) == 8  # 2 defective x 4 flip views
    assert len(make_items(arrays, _recipe(setting="unsupervised")).defective) == 0
    with pytest.raises(ValueError, match="defective"):
        make_items(_arrays(n=3), _recipe(setting="supervised"))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.pt"
    save_checkpoint(target, {"recipe": {}, "heads": {}, "backbone": {}})

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        save_checkpoint(target, {"recipe": {"new": 1}, "heads": {}, "backbone": {}})
    assert load_checkpoint(target)["recipe"] == {}  # the old one is intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left


def test_checkpoint_rejects_corrupt_and_foreign_files(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"format": "ssn-edge-checkpoint", "version": 99, "recipe": {}, "heads": {}, "backbone": {}}, other)
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(other)


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


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_shipped_recipes_are_valid(name):
    recipe = load_recipe(ROOT / "recipes" / name)
    assert recipe.train.epochs > 0


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

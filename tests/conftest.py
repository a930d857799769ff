"""Shared fixtures: a tiny synthetic dataset and a tiny trained checkpoint (seconds on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test saying what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data/weights folder is not beside this checkout)")
    return path


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    from ssn_edge.data.synthetic import SyntheticSpec, make_dataset

    root = tmp_path_factory.mktemp("synthetic")
    return make_dataset(root, SyntheticSpec(size=64, n_train=8, n_test_good=4, n_test_defect_per_type=2))


def tiny_recipe_dict(data: Path) -> dict:
    """A random-weight ResNet18 SSN at 64x64 with slim heads: the same graph shape as production, 1000x cheaper."""
    return {
        "name": "tiny",
        "data": {"path": str(data), "image_size": [64, 64]},
        "model": {"backbone": "resnet18", "pretrained": False, "seg_hidden": 32, "cls_hidden": 8},
        "train": {"epochs": 1, "batch_size": 4, "seed": 0},
    }


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_dataset) -> Path:
    from ssn_edge.config import recipe_from_dict
    from ssn_edge.train.job import train_job

    out = tmp_path_factory.mktemp("tiny_run")
    result = train_job(recipe_from_dict(tiny_recipe_dict(tiny_dataset)), out, progress=False)
    return result.checkpoint


def loss_inputs(model, recipe, l2, l3, gt, valid, seed: int = 0):
    """Run train_step once and catch what it handed ssn_loss: (loss, parts, {target, label, pixel_valid}); the
    dict stays empty when ssn_loss was not called."""
    import numpy as np

    import ssn_edge.train.step as tr

    seen: dict = {}
    original = tr.ssn_loss

    def spy(map_logits, score, target, label, pixel_valid, **kwargs):
        seen.update(target=target, label=label, pixel_valid=pixel_valid)
        return original(map_logits, score, target, label, pixel_valid, **kwargs)

    tr.ssn_loss = spy
    try:
        loss, parts = tr.train_step(model, recipe, l2, l3, gt, valid, np.random.default_rng(seed))
    finally:
        tr.ssn_loss = original
    return loss, parts, seen

"""Edge variants: the light classification head, analytic MAC counts, the learned noise generator and its
adversarial training (noise.kind: learned), and the default paths they must leave untouched."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_recipe_dict
from ssn_edge.model.checkpoint import load_checkpoint
from ssn_edge.config import ModelConfig, RecipeError, recipe_from_dict
from ssn_edge.data import ArraySet
from ssn_edge.model.complexity import head_macs
from ssn_edge.train.generator import NoiseGenerator
from ssn_edge.train.noise import apply_noise
from ssn_edge.train.perlin import perlin_masks
from ssn_edge.model.ssn import (ClassificationHead, LightClassificationHead, SSNHeads, SuperSimpleNet, anchor_max,
                                anchor_top)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: one thread avoids contention on a busy machine (50x faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(backbone="resnet18", pretrained=False, seg_hidden=16, cls_hidden=8, **kw)


def _arrays(n: int = 6, size: int = 64, seed: int = 0) -> ArraySet:
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 1, (n, 3, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    return ArraySet(images, masks, np.zeros(n, dtype=np.int64), np.ones(n, dtype=bool), [f"i{i}.png" for i in range(n)])


def _recipe(model: dict | None = None, noise: dict | None = None, **train_kw):
    d = tiny_recipe_dict(Path("unused"))
    d["model"].update(model or {})
    d["noise"] = dict(noise or {})
    d["train"].update(train_kw)
    return recipe_from_dict(d)


# ---------------------------------------------------------------- light classification head


@pytest.mark.parametrize(
    "cls_input,adaptor_channels,in_channels",
    [("adapted", None, 385), ("adapted", 32, 33), ("backbone", 32, 385)],
)
def test_light_head_is_selected_and_routes_channels(cls_input, adaptor_channels, in_channels):
    heads = SSNHeads(384, _cfg(cls_head="light", cls_input=cls_input, adaptor_channels=adaptor_channels))
    head = heads.classification
    assert isinstance(head, LightClassificationHead)
    assert head.reduce.in_channels == in_channels and head.reduce.out_channels == 8
    dw = head.conv[0]
    assert dw.groups == dw.in_channels == dw.out_channels == 8 and dw.stride == (2, 2) and dw.kernel_size == (5, 5)
    feats = torch.randn(3, 384, 16, 12)
    m, s = heads(feats)
    assert m.shape == (3, 1, 16, 12) and s.shape == (3,)
    s.sum().backward()
    assert head.reduce.weight.grad is not None and head.reduce.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["light", "light_separable", "light_bottleneck"])
@pytest.mark.parametrize("size", [(64, 64), (64, 40), (72, 56)])  # 40 -> 10 -> 5 and 72 -> 18 -> 9: odd halves
def test_light_model_keeps_the_inference_graph(size, kind):
    full = SuperSimpleNet(_cfg()).eval()
    light = SuperSimpleNet(_cfg(cls_head=kind, adaptor_channels=32)).eval()
    assert inspect.signature(light.forward) == inspect.signature(full.forward)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        (mf, sf), (ml, sl) = full(x), light(x)
    assert ml.shape == mf.shape == (2, 1, size[0] // 4, size[1] // 4)
    assert sl.shape == sf.shape == (2,) and sl.dtype == sf.dtype == torch.float32
    assert torch.isfinite(ml).all() and torch.isfinite(sl).all()
    # Only the classification head's own weights differ; backbone, adaptor, segmentation keys stay.
    outside = lambda sd: {k for k in sd if not k.startswith("heads.classification.")}  # noqa: E731
    light_full_width = SuperSimpleNet(_cfg(cls_head=kind))
    assert outside(light_full_width.state_dict()) == outside(full.state_dict())


def test_default_head_is_the_full_one_with_its_old_weights():
    heads = SSNHeads(384, _cfg())
    assert type(heads.classification) is ClassificationHead
    assert sorted(k for k in heads.state_dict() if k.startswith("classification.")) == [
        "classification.conv.0.bias",
        "classification.conv.0.weight",
        "classification.conv.1.bias",
        "classification.conv.1.num_batches_tracked",
        "classification.conv.1.running_mean",
        "classification.conv.1.running_var",
        "classification.conv.1.weight",
        "classification.fc.bias",
        "classification.fc.weight",
    ]


def test_cls_head_choice_is_validated():
    assert _recipe(model={"cls_head": "light"}).model.cls_head == "light"
    with pytest.raises(RecipeError, match="model.cls_head"):
        _recipe(model={"cls_head": "tiny"})


@pytest.mark.parametrize("kind", ["full", "light"])
def test_map_max_anchor_starts_at_the_map_max_and_learns_a_correction(kind):
    heads = SSNHeads(384, _cfg(cls_head=kind, score_anchor="map_max")).eval()
    plain = SSNHeads(384, _cfg(cls_head=kind)).eval()
    plain.load_state_dict(heads.state_dict())  # same weights, same keys: only the score's formula differs
    feats = torch.randn(3, 384, 10, 8)
    with torch.no_grad():
        m, s = heads(feats)
        _, s_plain = plain(feats)
    # The fc starts at zero: the score is exactly the map's (blurred) max logit, per image.
    assert torch.allclose(s, anchor_max(m, 1.0), atol=1e-6) and torch.all(s_plain == 0)
    with torch.no_grad():
        heads.classification.fc.bias.fill_(0.5)
        plain.classification.fc.bias.fill_(0.5)
        m, s = heads(feats)
        _, s_plain = plain(feats)
    assert torch.allclose(s, s_plain + anchor_max(m, 1.0), atol=1e-6)
    # Unsupervised training detaches the map from the score: the anchor must not open a path into it.
    heads.train()
    adapted = heads.adaptor(feats)
    _, score = heads.decide(adapted, adapted, detach_map=True)
    score.sum().backward()
    assert all(p.grad is None for p in heads.segmentation.parameters())


@pytest.mark.parametrize("sigma", [0.0, 1.0, 1.5])
def test_anchor_max_is_the_maximum_of_the_map_blurred_as_opencv_blurs_it(sigma):
    import cv2

    maps = torch.randn(3, 1, 12, 9)
    k = 2 * int(np.ceil(3 * sigma)) + 1
    want = [cv2.GaussianBlur(m[0].numpy(), (k, k), sigma, borderType=cv2.BORDER_REFLECT_101).max() if sigma else
            m.max().item() for m in maps]
    np.testing.assert_allclose(anchor_max(maps, sigma).numpy(), want, rtol=0, atol=1e-5)
    # a lone spike weighs less than a patch of the same height once blurred
    spike, patch = torch.zeros(1, 1, 12, 12), torch.zeros(1, 1, 12, 12)
    spike[..., 6, 6] = 3.0
    patch[..., 5:8, 5:8] = 3.0
    assert sigma == 0 or anchor_max(spike, sigma) < anchor_max(patch, sigma)


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_anchor_top_is_the_mean_of_the_blurred_maps_largest_cells(sigma):
    import cv2

    maps = torch.randn(2, 1, 10, 10)
    k = 2 * int(np.ceil(3 * sigma)) + 1
    blurred = [cv2.GaussianBlur(m[0].numpy(), (k, k), sigma, borderType=cv2.BORDER_REFLECT_101) if sigma else
               m[0].numpy() for m in maps]
    want = [np.sort(b.ravel())[-5:].mean() for b in blurred]  # 5 % of 100 cells
    np.testing.assert_allclose(anchor_top(maps, sigma, 0.05).numpy(), want, rtol=0, atol=1e-5)
    # a defect's extent counts: one spike scores below a patch of the same height, even unblurred
    spike, patch = torch.zeros(1, 1, 10, 10), torch.zeros(1, 1, 10, 10)
    spike[..., 5, 5] = 3.0
    patch[..., 4:7, 4:7] = 3.0
    assert anchor_top(spike, sigma, 0.05) < anchor_top(patch, sigma, 0.05)
    assert anchor_top(maps, sigma, 0.001).tolist() == pytest.approx(anchor_max(maps, sigma).tolist())  # 1 cell: max


def test_map_top_anchor_scores_with_the_top_cells_mean_and_is_validated():
    heads = SSNHeads(384, _cfg(score_anchor="map_top", anchor_top=0.05)).eval()
    with torch.no_grad():
        m, s = heads(torch.randn(2, 384, 10, 10))
    assert torch.allclose(s, anchor_top(m, 1.0, 0.05), atol=1e-6)  # the fc starts at zero, as map_max's
    heads = SSNHeads(384, _cfg(score_anchor="none", anchor_top=0.05)).eval()
    heads.anchor_to_map("map_top")
    with torch.no_grad():
        m, s = heads(torch.randn(2, 384, 10, 10))
    assert heads.score_anchor == "map_top" and torch.allclose(s, anchor_top(m, 1.0, 0.05), atol=1e-6)
    with pytest.raises(ValueError, match="anchor 'mean'"):
        heads.anchor_to_map("mean")
    for bad in (-0.1, 1.0):
        with pytest.raises(RecipeError, match="model.anchor_top"):
            _recipe(model={"anchor_top": bad})
    with pytest.raises(RecipeError, match="map_top averages"):
        _recipe(model={"score_anchor": "map_top"})


def test_recorded_recipes_without_anchor_blur_keep_the_raw_maximum():
    from ssn_edge.config import recipe_from_dict, upgrade_recipe_dict

    old = _recipe(model={"score_anchor": "map_max"}).to_dict()
    del old["model"]["anchor_blur"]
    assert recipe_from_dict(upgrade_recipe_dict(old)).model.anchor_blur == 0.0
    assert _recipe(model={"score_anchor": "map_max"}).model.anchor_blur == 1.0
    with pytest.raises(RecipeError, match="model.anchor_blur"):
        _recipe(model={"anchor_blur": -1})


def test_score_anchor_is_validated():
    assert _recipe(model={"score_anchor": "map_max", "cls_head": "light"}).model.score_anchor == "map_max"
    with pytest.raises(RecipeError, match="model.score_anchor"):
        _recipe(model={"score_anchor": "mean"})
    with pytest.raises(RecipeError, match="CAM head"):
        _recipe(model={"score_anchor": "map_max", "cls_head": "cam"})


# ---------------------------------------------------------------- MAC counts


def test_head_macs_match_the_spec_numbers():
    """Spec 1, 256x256 input (64x64 features): ResNet18 cls conv 5.0, seg 1.6, adaptor 0.6 GMAC;
    WRN50 cls conv 20.1, adaptor 9.7, seg 6.4."""
    r18 = head_macs(384, 64, 64, ModelConfig())
    for key, spec in [("cls_full", 5.0e9), ("segmentation", 1.6e9), ("adaptor", 0.6e9)]:
        assert r18[key] == pytest.approx(spec, rel=0.05), key
    assert r18["classification"] == r18["cls_full"]
    assert r18["total"] == r18["adaptor"] + r18["segmentation"] + r18["cls_full"]
    wrn = head_macs(1536, 64, 64, ModelConfig(backbone="wide_resnet50_2"))
    for key, spec in [("cls_full", 20.1e9), ("segmentation", 6.4e9), ("adaptor", 9.7e9)]:
        assert wrn[key] == pytest.approx(spec, rel=0.05), key


@pytest.mark.parametrize("kind", ["light_separable", "light_bottleneck"])
def test_other_light_heads_are_as_light(kind):
    full = head_macs(384, 64, 64, ModelConfig())
    other = head_macs(384, 64, 64, ModelConfig(cls_head=kind))
    assert other["classification"] / full["cls_full"] < 0.05  # the light head's order, not the full one's
    assert other["total"] < 0.5 * full["total"]


def test_light_head_needs_far_fewer_macs():
    full = head_macs(384, 64, 64, ModelConfig())
    light = head_macs(384, 64, 64, ModelConfig(cls_head="light"))
    assert light["classification"] == light["cls_light"] == full["cls_light"]
    assert light["cls_light"] / light["cls_full"] < 0.4
    assert light["total"] < 0.5 * full["total"]
    slim = head_macs(384, 64, 64, ModelConfig(cls_head="light", adaptor_channels=128))
    assert slim["cls_light"] < light["cls_light"] and slim["adaptor"] == 384 * 128 * 64 * 64


def _measured_macs(heads: SSNHeads, channels: int, h: int, w: int) -> dict[str, int]:
    """MACs counted from the real modules with forward hooks: conv weights per output position + linear."""
    counts: dict[str, int] = {}

    def hook(name):
        def count(module, inputs, output):
            if isinstance(module, nn.Conv2d):
                k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
                macs = k * output[0].numel()
            else:
                macs = module.in_features * module.out_features
            counts[name] = counts.get(name, 0) + macs

        return count

    for name, part in [("adaptor", heads.adaptor), ("segmentation", heads.segmentation), ("classification", heads.classification)]:
        for m in part.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.register_forward_hook(hook(name))
    with torch.no_grad():
        heads.eval()(torch.randn(1, channels, h, w))
    return counts


@pytest.mark.parametrize("cls_head", ["full", "light", "light_separable", "light_bottleneck"])
@pytest.mark.parametrize("cls_input,adaptor_channels", [("adapted", None), ("adapted", 24), ("backbone", 24)])
def test_head_macs_count_what_the_modules_compute(cls_head, cls_input, adaptor_channels):
    cfg = _cfg(cls_head=cls_head, cls_input=cls_input, adaptor_channels=adaptor_channels)
    measured = _measured_macs(SSNHeads(40, cfg), 40, 18, 14)
    counted = head_macs(40, 18, 14, cfg)
    assert {k: counted[k] for k in measured} == measured


# ---------------------------------------------------------------- learned noise generator


def test_generator_is_bounded_by_beta_std_relative_and_masked():
    torch.manual_seed(0)
    scales = torch.logspace(-2, 1, 12)[None, :, None, None]  # channels 0.01 .. 10
    feats = (torch.randn(4, 12, 8, 8) * scales + 3.0).requires_grad_()
    gen = NoiseGenerator(12, z_dim=4, hidden=16, beta=0.05)
    z, n = torch.randn(4, 4), torch.randn(4, 12, 8, 8)
    out = gen.perturb(feats, z, n)
    std = feats.detach().std(dim=(0, 2, 3), keepdim=True, correction=0)
    assert out.eps.shape == feats.shape
    assert (out.eps.abs() <= 0.05 * std + 1e-6).all()
    assert out.eps.abs().amax(dim=(0, 2, 3)).min() > 0  # every channel perturbed, small ones too
    # beta is relative to the feature scale: 100x the features, 100x the noise (same z).
    with torch.no_grad():
        gen.net[-1].weight.normal_()  # a trained G, not the zero-init one: its input features matter too
    out = gen.perturb(feats, z, n)
    err = (gen(feats.detach() * 100, z, n) - out.eps * 100).abs() / (100 * out.scale)
    assert err.max() < 1e-3  # relative to the bound: float32 rounding of small channels around a large mean
    # G never trains the adaptor: its input is detached.
    out.eps.sum().backward()
    assert feats.grad is None
    # Placed by the Perlin mask: zero change outside it, a change inside.
    masks = perlin_masks(4, (8, 8), np.random.default_rng(1), threshold=0.2, empty_prob=0.0)
    mask = torch.from_numpy(masks)[:, None].float()
    assert mask.any() and not mask.all()
    noised = apply_noise(feats.detach(), out.eps.detach(), mask)
    delta = (noised - feats.detach()).abs()
    assert torch.equal(delta * (1 - mask), torch.zeros_like(delta))
    assert (delta.amax(dim=1, keepdim=True)[mask.bool()] > 0).all()
    stats = out.stats()
    assert 0 < stats["eps_rel_mean"] <= 0.05 and 0 <= stats["eps_saturated"] <= 1


def test_generator_starts_as_bounded_smooth_noise_and_varies_over_the_map():
    torch.manual_seed(0)
    feats = torch.randn(2, 12, 16, 16) * 3.0
    gen = NoiseGenerator(12, z_dim=4, hidden=16, beta=1.5, smooth=1.0)
    n = torch.randn(2, 12, 16, 16)
    out = gen.perturb(feats, torch.randn(2, 4), n)
    std = feats.std(dim=(0, 2, 3), keepdim=True, correction=0)
    # Zero-init last layer: G starts as tanh(n) scaled, whatever the features, so no learnt shape yet.
    assert torch.allclose(out.eps, torch.tanh(n) * 1.5 * std, atol=1e-6)
    # Drawn without n: blurred unit noise, so neighbouring pixels correlate and the map is not constant.
    drawn = gen.perturb(feats).unit
    assert drawn.std(dim=(2, 3)).min() > 0.1
    right = torch.corrcoef(torch.stack([drawn[..., :-1].flatten(), drawn[..., 1:].flatten()]))[0, 1]
    assert right > 0.5
    iid = NoiseGenerator(12, z_dim=4, hidden=16, beta=1.5).perturb(feats).unit  # smooth None: i.i.d. pixels
    assert abs(torch.corrcoef(torch.stack([iid[..., :-1].flatten(), iid[..., 1:].flatten()]))[0, 1]) < 0.1


def _gen_setup(**noise):
    from ssn_edge.train.batches import feature_masks
    from ssn_edge.train.learned import build_generator

    recipe = _recipe(model={"adaptor_channels": 32}, noise={"kind": "learned", **noise})
    torch.manual_seed(0)
    model = SuperSimpleNet(recipe.model)
    model.heads.train()
    gen, gen_opt = build_generator(model, recipe)
    arrays = _arrays(n=4)
    chunk = np.array([[i, 0] for i in range(4)])
    l2, l3 = model.features.raw(torch.from_numpy(arrays.images))
    gt, valid = feature_masks(arrays, chunk, (16, 16))
    return recipe, model, gen, gen_opt, (l2, l3, gt, valid)


def _objective(model, recipe, gen, batch, seed=3):
    from ssn_edge.train.step import train_step

    torch.manual_seed(seed)
    with torch.no_grad():
        return train_step(model, recipe, *batch, np.random.default_rng(seed), generator=gen, generator_step=True)


def test_generator_step_maximises_the_heads_loss_and_moves_only_the_generator():
    from ssn_edge.train.learned import generator_update

    recipe, model, gen, gen_opt, batch = _gen_setup(mag_weight=0.0, gen_lr=1e-3)
    _, before = _objective(model, recipe, gen, batch)
    heads_before = {k: v.clone() for k, v in model.heads.state_dict().items()}  # includes BN running stats
    gen_before = {k: v.clone() for k, v in gen.state_dict().items()}
    value, parts = generator_update(model, recipe, gen, gen_opt, *batch, np.random.default_rng(3))
    assert np.isfinite(value) and value == pytest.approx(-parts["ssn"])  # mag_weight 0: objective is -loss
    assert all(torch.equal(v, model.heads.state_dict()[k]) for k, v in heads_before.items())
    assert all(p.grad is None for p in model.heads.parameters())
    assert any(not torch.equal(v, gen.state_dict()[k]) for k, v in gen_before.items())
    _, after = _objective(model, recipe, gen, batch)
    assert after["ssn"] > before["ssn"]  # gradient ascent on the heads' loss


def test_generator_magnitude_penalty_shrinks_eps():
    from ssn_edge.train.learned import generator_update

    recipe, model, gen, gen_opt, batch = _gen_setup(mag_weight=1000.0, gen_lr=1e-3)
    _, before = _objective(model, recipe, gen, batch)
    generator_update(model, recipe, gen, gen_opt, *batch, np.random.default_rng(3))
    _, after = _objective(model, recipe, gen, batch)
    assert after["mag"] < before["mag"] and after["eps_rel_mean"] < before["eps_rel_mean"]


def test_learned_noise_is_validated():
    from ssn_edge.train.loop import train

    with pytest.raises(RecipeError, match="noise.kind"):
        _recipe(noise={"kind": "learnt"})
    with pytest.raises(ValueError, match="cls_input"):
        train(_recipe(model={"cls_input": "backbone"}, noise={"kind": "learned"}), _arrays(), Path("unused"), progress=False)
    with pytest.raises(ValueError, match="heads_per_gen"):
        train(_recipe(noise={"kind": "learned", "heads_per_gen": 0}), _arrays(), Path("unused"), progress=False)


def test_learned_noise_training_logs_learns_and_resumes(tmp_path):
    from ssn_edge.model.load import model_from_checkpoint
    from ssn_edge.train.loop import train

    arrays = _arrays()  # 6 images, batch 4: 2 heads steps per epoch, a generator step every 3rd
    model_kw = {"cls_head": "light", "adaptor_channels": 32}
    noise = {"kind": "learned", "beta": 0.1}
    full = train(_recipe(model_kw, noise, epochs=2), arrays, tmp_path / "full", progress=False)
    assert len(full.history) == 2
    for rec in full.history:
        assert np.isfinite(rec["loss"])
        assert 0 < rec["eps_rel_mean"] <= 0.1 and 0 <= rec["eps_saturated"] <= 1
    assert [r["gen_steps"] for r in full.history] == [0, 1] and np.isfinite(full.history[1]["gen_loss"])
    state = load_checkpoint(full.checkpoint)
    assert state.resume.generator["heads_steps"] == 4

    # The generator's weights change: a run that never reaches a generator step keeps its initial ones.
    frozen = train(_recipe(model_kw, {**noise, "heads_per_gen": 10**6}, epochs=2), arrays, tmp_path / "frozen", progress=False)
    g_full, g_init = state.resume.generator["state"], load_checkpoint(frozen.checkpoint).resume.generator["state"]
    assert g_full.keys() == g_init.keys()
    # The output layer starts at zero (G starts as plain noise), so one step moves it; the first layer's bias
    # gets its first gradient only once the output layer is non-zero.
    assert not torch.equal(g_full["net.2.weight"], g_init["net.2.weight"])
    assert not torch.equal(g_full["net.0.weight"], g_init["net.0.weight"])

    # --resume restores heads, generator, both optimisers and the step counter: the same weights as one run.
    half = train(_recipe(model_kw, noise, epochs=1), arrays, tmp_path / "half", progress=False)
    assert load_checkpoint(half.checkpoint).resume.generator["heads_steps"] == 2
    resumed = train(_recipe(model_kw, noise, epochs=2), arrays, tmp_path / "half", resume=half.checkpoint, progress=False)
    assert len(resumed.history) == 2 and resumed.history[1]["gen_steps"] == 1
    back = load_checkpoint(resumed.checkpoint)
    assert all(torch.equal(state.heads[k], back.heads[k]) for k in state.heads)
    assert all(torch.equal(g_full[k], back.resume.generator["state"][k]) for k in g_full)
    assert back.resume.generator["optimizer"]["state"].keys() == state.resume.generator["optimizer"]["state"].keys()

    # The generator is training-only: the checkpoint rebuilds the plain inference model.
    model, _, _ = model_from_checkpoint(resumed.checkpoint)
    assert not any("generator" in k for k in model.state_dict())
    m, s = model(torch.from_numpy(arrays.images[:2]))
    assert m.shape == (2, 1, 16, 16) and s.shape == (2,)


def test_non_finite_loss_stops_training_naming_epoch_and_step(tmp_path, monkeypatch):
    import ssn_edge.train.loop as loop
    import ssn_edge.train.step as tr

    original = tr.ssn_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, parts = original(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 2 else loss), parts

    monkeypatch.setattr(tr, "ssn_loss", poisoned)
    with pytest.raises(tr.NonFiniteLossError, match=r"heads loss is nan at epoch 1, step 2/2"):
        loop.train(_recipe(noise={"kind": "learned"}), _arrays(), tmp_path, progress=False)


# ---------------------------------------------------------------- default paths unchanged


# A 1-epoch tiny run of the paper's schedule with each plain noise kind, recorded with the code before the edge
# variants existed (commit ce0824a): mean loss and the sum of |heads weights|. A change in the default path (an
# extra random draw, a reordered step) moves these by far more than the tolerance; float noise across thread
# counts does not.
BEFORE = {"fixed": (1.2827450037002563, 7677.898506327096), "adaptive": (1.2908376455307007, 7677.903080675867)}
PAPER_SCHEDULE = {"precision": "fp32", "lr_adaptor": 1e-4, "lr_heads": 2e-4, "feature_crop": None, "cls_focal_gamma": 4.0}


@pytest.mark.parametrize("kind,sigma", [("fixed", 0.015), ("adaptive", 0.1)])
def test_default_noise_paths_train_as_before(kind, sigma, tmp_path):
    from ssn_edge.train.loop import train

    recipe = _recipe(noise={"kind": kind, "sigma": sigma, "smooth": None}, **PAPER_SCHEDULE)
    result = train(recipe, _arrays(), tmp_path, progress=False)
    state = load_checkpoint(result.checkpoint)
    loss, weight_sum = BEFORE[kind]
    assert result.history[0]["loss"] == pytest.approx(loss, rel=1e-5)
    assert sum(float(v.float().abs().sum()) for v in state.heads.values()) == pytest.approx(weight_sum, rel=1e-6)
    assert set(result.history[0]) == {"epoch", "loss", "epoch_s"} and state.resume.generator is None

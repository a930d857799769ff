"""SSN model pieces: Perlin masks, losses, heads, noise placement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssn_edge.config import ModelConfig, NoiseConfig
from ssn_edge.train.losses import focal_loss, truncated_l1
from ssn_edge.train.noise import apply_noise, sample_noise
from ssn_edge.train.perlin import perlin_2d, perlin_mask, perlin_masks
from ssn_edge.model.ssn import SSNHeads, SuperSimpleNet


def test_perlin_noise_is_smooth_bounded_and_seeded():
    a = perlin_2d((64, 64), (4, 4), np.random.default_rng(1))
    b = perlin_2d((64, 64), (4, 4), np.random.default_rng(1))
    c = perlin_2d((64, 64), (4, 4), np.random.default_rng(2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.abs(a).max() <= np.sqrt(2) + 1e-6
    # Lattice corners are zeros of gradient noise; neighbours differ little (smooth at 16 px per cell).
    assert np.allclose(a[::16, ::16], 0, atol=1e-9)
    assert np.abs(np.diff(a, axis=1)).max() < 0.2


def test_perlin_rejects_lattice_not_dividing_shape():
    with pytest.raises(ValueError, match="multiple"):
        perlin_2d((64, 64), (3, 4), np.random.default_rng(0))


def test_perlin_mask_at_feature_size_and_empty_probability():
    rng = np.random.default_rng(0)
    m = perlin_mask((40, 24), rng, threshold=0.2)
    assert m.shape == (40, 24) and m.dtype == bool
    masks = perlin_masks(400, (16, 16), np.random.default_rng(3), threshold=0.2, empty_prob=0.5)
    empty = (~masks.any(axis=(1, 2))).mean()
    assert 0.4 < empty < 0.65  # ~0.5 emptied on purpose, plus a few that the threshold left empty
    thin = perlin_masks(200, (32, 32), np.random.default_rng(3), threshold=0.6, empty_prob=0.0).mean()
    thick = perlin_masks(200, (32, 32), np.random.default_rng(3), threshold=0.2, empty_prob=0.0).mean()
    assert thin < thick


def test_truncated_l1_values():
    logits = torch.tensor([[-1.0, 0.2], [0.8, 0.1]])
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # normal: max(0, 0.5 + l) -> [0, 0.7] mean 0.35; anomalous: max(0, 0.5 - l) -> [0, 0.4] mean 0.2
    assert truncated_l1(logits, target).item() == pytest.approx(0.55)
    valid = torch.tensor([[True, False], [True, False]])
    assert truncated_l1(logits, target, valid).item() == pytest.approx(0.0)


def test_focal_loss_matches_formula_and_downweights_easy_examples():
    logits = torch.tensor([2.0, -1.0, 0.5])
    target = torch.tensor([1.0, 0.0, 0.0])
    p = torch.sigmoid(logits)
    pt = torch.where(target > 0, p, 1 - p)
    expected = (-torch.log(pt) * (1 - pt) ** 4).mean()
    assert focal_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)
    easy = focal_loss(torch.tensor([5.0]), torch.tensor([1.0])).item()
    hard = focal_loss(torch.tensor([-5.0]), torch.tensor([1.0])).item()
    assert easy < 1e-6 < hard


def test_noise_only_inside_mask_and_adaptive_scale():
    feats = torch.randn(4, 8, 6, 6) * torch.linspace(0.1, 10, 8)[None, :, None, None]
    mask = torch.zeros(4, 1, 6, 6)
    mask[:, :, 2:4, 2:4] = 1
    eps = sample_noise(feats, NoiseConfig(kind="adaptive", sigma=0.5, smooth=None))
    noised = apply_noise(feats, eps, mask)
    assert torch.equal(noised[:, :, :2], feats[:, :, :2])
    assert not torch.equal(noised[:, :, 2:4, 2:4], feats[:, :, 2:4, 2:4])
    ratio = eps.std(dim=(0, 2, 3)) / feats.std(dim=(0, 2, 3))
    assert torch.allclose(ratio, torch.full_like(ratio, 0.5), rtol=0.35)
    fixed = sample_noise(feats, NoiseConfig(kind="fixed", sigma=0.015, smooth=None))
    assert fixed.std().item() == pytest.approx(0.015, rel=0.2)


def _tiny_cfg(**kw) -> ModelConfig:
    return ModelConfig(backbone="resnet18", pretrained=False, seg_hidden=16, cls_hidden=8, **kw)


def test_ssn_output_shapes_and_channels():
    model = SuperSimpleNet(_tiny_cfg()).eval()
    m, s = model(torch.randn(2, 3, 64, 48))
    assert m.shape == (2, 1, 16, 12) and s.shape == (2,)
    assert model.features.channels == 384
    assert model.heads.adaptor.in_channels == 384


@pytest.mark.parametrize("cls_input,expected", [("adapted", 32 + 1), ("backbone", 384 + 1)])
def test_classification_routing_paper_and_journal(cls_input, expected):
    heads = SSNHeads(384, _tiny_cfg(cls_input=cls_input, adaptor_channels=32))
    assert heads.classification.conv[0].in_channels == expected


def test_stop_gradient_keeps_classification_loss_out_of_the_map():
    heads = SSNHeads(16, _tiny_cfg())
    feats = torch.randn(2, 16, 8, 8)
    adapted = heads.adaptor(feats)
    _, score = heads.decide(adapted, adapted, detach_map=True)
    score.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in heads.segmentation.parameters())
    heads.zero_grad()
    _, score = heads.decide(heads.adaptor(feats), heads.adaptor(feats), detach_map=False)
    score.sum().backward()
    assert any(p.grad is not None and p.grad.any() for p in heads.segmentation.parameters())


def test_xavier_init_and_batchnorm_ones():
    heads = SSNHeads(16, _tiny_cfg())
    bn = heads.segmentation.net[1]
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    w = heads.adaptor.weight
    assert w.std().item() == pytest.approx((2 / (16 + 16)) ** 0.5, rel=0.3)


def test_smoothed_noise_keeps_its_variance_and_is_spatially_coherent():
    torch.manual_seed(0)
    feats = torch.zeros(16, 32, 48, 48)
    plain = sample_noise(feats, NoiseConfig(kind="fixed", sigma=0.5, smooth=None))
    smooth = sample_noise(feats, NoiseConfig(kind="fixed", sigma=0.5, smooth=1.5))
    inner = smooth[..., 8:-8, 8:-8]  # away from the reflected border
    assert inner.std().item() == pytest.approx(0.5, rel=0.05)
    def lag1(e):
        return float((e[..., 1:] * e[..., :-1]).mean() / e.pow(2).mean())
    assert abs(lag1(plain)) < 0.02
    # a Gaussian blur of white noise: correlation exp(-d^2 / (4 sigma^2)) at lag d = 1
    assert lag1(inner) == pytest.approx(np.exp(-1 / (4 * 1.5**2)), abs=0.05)


def test_score_focal_gamma_reaches_the_classification_loss():
    from ssn_edge.train.losses import ssn_loss

    maps = torch.zeros(4, 1, 8, 8)
    mask = torch.zeros(4, 1, 8, 8)
    score = torch.tensor([-1.0, -1.0, 1.0, 1.0])  # right side of 0.5, but far from confident
    label = torch.tensor([0.0, 0.0, 1.0, 1.0])
    _, g4 = ssn_loss(maps, score, mask, label)
    _, g0 = ssn_loss(maps, score, mask, label, cls_gamma=0.0)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(score, label).item()
    assert g0["cls_focal"] == pytest.approx(bce, rel=1e-5)
    assert g4["cls_focal"] == pytest.approx(bce * (1 - torch.sigmoid(torch.tensor(1.0)).item()) ** 4, rel=1e-4)


@pytest.mark.parametrize("size", [(8, 8), (6, 10)])
def test_merged_window_is_the_crop_of_the_whole_merge(size):
    # Training merges only its random crop (merge's window); a crop at an edge or a corner must see the 3x3 average's
    # zero padding, and one inside the map its neighbours' rows, exactly as cutting the whole merged map does.
    torch.manual_seed(0)
    extractor = SuperSimpleNet(ModelConfig(pretrained=False)).features
    h, w = size
    l2, l3 = torch.randn(2, 128, h, w), torch.randn(2, 256, h // 2, w // 2)
    whole = extractor.merge(l2, l3)
    for y, x, ch, cw in [(0, 0, 4, 4), (2 * h - 5, 2 * w - 3, 5, 3), (3, 5, 6, 7), (0, 0, 2 * h, 2 * w)]:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as in a training step: the merge stays fp32
            part = extractor.merge(l2, l3, (y, x, ch, cw))
        assert part.dtype == torch.float32 and part.shape == (2, 384, ch, cw)
        torch.testing.assert_close(part, whole[..., y : y + ch, x : x + cw], rtol=1e-5, atol=1e-5)

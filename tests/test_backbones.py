"""Tests for ssn_edge.model.backbones (torchvision-free ResNet trunks + weight loading)."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch

from ssn_edge.model import backbones as bb
from ssn_edge.model.backbones import (
    BACKBONES,
    BackboneSpec,
    BackboneTrunk,
    Bottleneck,
    WeightsError,
    WeightsNotFoundError,
    backbone_names,
    build_backbone,
    get_backbone_spec,
    load_backbone_weights,
    register_backbone,
    weights_fingerprint,
)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
R18_FILE = SHARED / "weights" / "resnet18-imagenet1k-v1-to-layer3.pth"


@pytest.fixture(scope="module")
def r18_state() -> dict[str, torch.Tensor]:
    if not R18_FILE.is_file():
        pytest.skip(f"shared ResNet18 weights not found at {R18_FILE.resolve()}")
    return torch.load(R18_FILE, map_location="cpu", weights_only=True)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub dir and a download that always fails (no network in tests)."""
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network unreachable (test)")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    return hub


def _fixed_input() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, 64, 64, generator=g)


def _save(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


# --- structure -----------------------------------------------------------------------


def test_resnet18_keys_match_shared_file(r18_state):
    trunk = BackboneTrunk(get_backbone_spec("resnet18"))
    keys = list(trunk.state_dict())
    non_counter = [k for k in keys if not k.endswith("num_batches_tracked")]
    assert set(non_counter) == set(r18_state)
    assert len(non_counter) == len(r18_state) == 75
    counters = {k for k in keys if k.endswith("num_batches_tracked")}
    bn_prefixes = {k.rsplit(".", 1)[0] for k in r18_state if k.endswith("running_mean")}
    assert counters == {f"{p}.num_batches_tracked" for p in bn_prefixes}
    for k, v in trunk.state_dict().items():
        if k in r18_state:
            assert tuple(v.shape) == tuple(r18_state[k].shape), k


def test_wrn50_key_names_follow_torchvision():
    keys = set(BackboneTrunk(get_backbone_spec("wide_resnet50_2")).state_dict())
    for k in (
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.conv3.weight",
        "layer1.0.bn3.weight",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.running_mean",
        "layer3.5.conv2.weight",
    ):
        assert k in keys, k
    assert not any(k.startswith(("layer4", "fc")) for k in keys)
    assert "layer3.6.conv1.weight" not in keys


# --- loading real weights ------------------------------------------------------------


def test_load_shared_resnet18_deterministic_and_finite(r18_state, empty_hub):
    trunk = build_backbone("resnet18", weights=R18_FILE)
    assert str(R18_FILE) in trunk.weights_source
    for k, v in r18_state.items():
        assert torch.equal(trunk.state_dict()[k], v), k
    x = _fixed_input()
    with torch.no_grad():
        f2, f3 = trunk(x)
        g2, g3 = build_backbone("resnet18", weights=R18_FILE)(x.clone())
    assert f2.shape == (1, 128, 8, 8) and f3.shape == (1, 256, 4, 4)
    assert torch.isfinite(f2).all() and torch.isfinite(f3).all()
    assert torch.equal(f2, g2) and torch.equal(f3, g3)
    assert f3.abs().sum() > 0
    fp = weights_fingerprint(trunk)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp == weights_fingerprint(build_backbone("resnet18", weights=R18_FILE))
    assert fp != weights_fingerprint(build_backbone("resnet18", pretrained=False))


def test_missing_tensor_is_named(r18_state, tmp_path, empty_hub):
    state = dict(r18_state)
    del state["layer2.1.bn1.running_var"]
    path = _save(state, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match=r"layer2\.1\.bn1\.running_var") as info:
        build_backbone("resnet18", weights=path)
    assert str(path) in str(info.value)


def test_wrong_shape_is_named(r18_state, tmp_path, empty_hub):
    state = dict(r18_state)
    state["layer3.0.conv1.weight"] = torch.zeros(256, 128, 1, 1)
    path = _save(state, tmp_path / "bad_shape.pth")
    with pytest.raises(WeightsError, match=r"layer3\.0\.conv1\.weight") as info:
        build_backbone("resnet18", weights=path)
    msg = str(info.value)
    assert "(256, 128, 3, 3)" in msg and "(256, 128, 1, 1)" in msg


def test_extra_keys_ignored_and_wrappers_accepted(r18_state, tmp_path, empty_hub):
    state = dict(r18_state)
    state["layer4.0.conv1.weight"] = torch.zeros(512, 256, 3, 3)
    state["fc.weight"] = torch.zeros(1000, 512)
    state["fc.bias"] = torch.zeros(1000)
    ref = weights_fingerprint(build_backbone("resnet18", weights=R18_FILE))
    for i, wrapped in enumerate((state, {"state_dict": state}, {"model": state, "epoch": 3})):
        trunk = build_backbone("resnet18", weights=_save(wrapped, tmp_path / f"full{i}.pth"))
        assert weights_fingerprint(trunk) == ref


def test_bad_explicit_paths_are_named(tmp_path, empty_hub):
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsNotFoundError, match="nope.pth"):
        load_backbone_weights("resnet18", weights=missing)
    junk = tmp_path / "junk.pth"
    junk.write_text("this is not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pth"):
        load_backbone_weights("resnet18", weights=junk)
    no_tensors = _save({"epoch": 1}, tmp_path / "no_tensors.pth")
    with pytest.raises(WeightsError, match="no_tensors.pth"):
        load_backbone_weights("resnet18", weights=no_tensors)


# --- weight resolution precedence ----------------------------------------------------


def test_hub_cache_is_used(r18_state, empty_hub):
    cached = empty_hub / "checkpoints" / get_backbone_spec("resnet18").hub_filename
    cached.parent.mkdir()
    _save(r18_state, cached)
    state, source = load_backbone_weights("resnet18")
    assert state is not None and "hub cache" in source and str(cached) in source
    trunk = build_backbone("resnet18")
    assert trunk.weights_source == source
    assert weights_fingerprint(trunk) == weights_fingerprint(build_backbone("resnet18", weights=R18_FILE))


def test_explicit_weights_beat_hub_cache(r18_state, tmp_path, empty_hub):
    cached = empty_hub / "checkpoints" / get_backbone_spec("resnet18").hub_filename
    cached.parent.mkdir()
    cached.write_text("corrupt cache file")  # would fail if it were read
    state, source = load_backbone_weights("resnet18", weights=R18_FILE)
    assert state is not None and source == f"file {R18_FILE}"


def test_download_used_when_cache_empty(r18_state, empty_hub, monkeypatch):
    calls = []

    def fake_download(url, *args, **kwargs):
        calls.append((url, kwargs.get("file_name")))
        return dict(r18_state)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    trunk = build_backbone("resnet18")
    spec = get_backbone_spec("resnet18")
    assert calls == [(spec.url, spec.hub_filename)]
    assert "downloaded" in trunk.weights_source


def test_no_weights_anywhere_raises_helpful_error(empty_hub):
    for name in backbone_names():
        spec = get_backbone_spec(name)
        with pytest.raises(WeightsNotFoundError) as info:
            load_backbone_weights(name)
        msg = str(info.value)
        assert str(empty_hub / "checkpoints" / spec.hub_filename) in msg
        assert spec.url in msg
        assert "pretrained: false" in msg
        assert "--weights" in msg and "backbone.weights" in msg
        assert "network unreachable" in msg
    with pytest.raises(WeightsNotFoundError):
        build_backbone("resnet18")


def test_pretrained_false_gives_random_weights(empty_hub):
    assert load_backbone_weights("resnet18", pretrained=False) == (None, "random (pretrained: false)")
    torch.manual_seed(0)
    a = build_backbone("resnet18", pretrained=False)
    torch.manual_seed(1)
    b = build_backbone("resnet18", pretrained=False)
    assert a.weights_source == "random (pretrained: false)"
    assert weights_fingerprint(a) != weights_fingerprint(b)
    assert a.conv1.weight.std() > 0
    with pytest.raises(ValueError, match="pretrained: false"):
        load_backbone_weights("resnet18", weights=R18_FILE, pretrained=False)


# --- frozen trunk --------------------------------------------------------------------


def test_trunk_is_frozen_and_stays_in_eval(empty_hub):
    trunk = build_backbone("resnet18", pretrained=False)
    assert not any(p.requires_grad for p in trunk.parameters())
    assert not trunk.training
    parent = torch.nn.Sequential(trunk)
    parent.train()
    trunk.train(True)
    assert not any(m.training for m in trunk.modules())
    x = _fixed_input()
    before = trunk.bn1.running_mean.clone()
    trunk(x)
    assert torch.equal(trunk.bn1.running_mean, before)  # eval BN: no stat updates


# --- WideResNet50-2 ------------------------------------------------------------------


def test_wrn50_shapes_and_state_dict_roundtrip(tmp_path, empty_hub):
    torch.manual_seed(0)
    trunk = build_backbone("wide_resnet50_2", pretrained=False)
    assert trunk.feature_channels == (512, 1024)
    assert trunk.layer1[0].conv1.out_channels == 128  # width_per_group 128 -> wide
    with torch.no_grad():
        f2, f3 = trunk(_fixed_input())
    assert f2.shape == (1, 512, 8, 8) and f3.shape == (1, 1024, 4, 4)
    path = _save(trunk.state_dict(), tmp_path / "wrn50.pth")
    again = build_backbone("wide_resnet50_2", weights=path)
    assert weights_fingerprint(again) == weights_fingerprint(trunk)
    with torch.no_grad():
        g2, g3 = again(_fixed_input())
    assert torch.equal(f2, g2) and torch.equal(f3, g3)


# --- registry ------------------------------------------------------------------------


def test_registry_contents_and_unknown_name():
    assert {"resnet18", "wide_resnet50_2"} <= set(backbone_names())
    assert get_backbone_spec("resnet18").hub_filename == "resnet18-f37072fd.pth"
    assert get_backbone_spec("wide_resnet50_2").hub_filename == "wide_resnet50_2-95faca4d.pth"
    assert get_backbone_spec("Wide-ResNet50_2").name == "wide_resnet50_2"
    for call in (lambda: get_backbone_spec("resnet999"), lambda: build_backbone("resnet999", pretrained=False)):
        with pytest.raises(ValueError, match="resnet999") as info:
            call()
        assert "resnet18" in str(info.value) and "wide_resnet50_2" in str(info.value)


def test_register_third_backbone(monkeypatch):
    monkeypatch.setattr(bb, "BACKBONES", dict(BACKBONES))
    spec = register_backbone(
        BackboneSpec(
            name="resnet50",
            block=Bottleneck,
            layers=(3, 4, 6),
            feature_channels=(512, 1024),
            hub_filename="resnet50-0676ba61.pth",
            url="https://download.pytorch.org/models/resnet50-0676ba61.pth",
        )
    )
    assert "resnet50" in bb.backbone_names()
    trunk = bb.build_backbone("resnet50", pretrained=False)
    assert trunk.spec is spec and trunk.layer1[0].conv1.out_channels == 64
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(spec)
    with pytest.raises(ValueError, match="feature_channels"):
        register_backbone(
            BackboneSpec("broken", Bottleneck, (1, 1, 1), (128, 256), "x.pth", "https://example.invalid/x.pth")
        )

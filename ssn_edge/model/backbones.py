"""Frozen ImageNet ResNet trunks for SuperSimpleNet, defined without torchvision.

SuperSimpleNet only ever reads the ``layer2`` and ``layer3`` feature maps of an
ImageNet-pretrained ResNet, so the trunks here stop after ``layer3`` (no ``layer4``,
no ``avgpool``/``fc``). Module and ``state_dict`` key names are exactly torchvision's
(``conv1``, ``bn1``, ``layer1.0.conv1.weight``, ``layer2.0.downsample.0.weight``, ...), so
an unmodified torchvision checkpoint loads directly; its ``layer4.*``/``fc.*`` tensors are
ignored.

Public API
----------
* :class:`BackboneSpec`, :data:`BACKBONES`, :func:`register_backbone`,
  :func:`backbone_names`, :func:`get_backbone_spec` -- the registry.
* :func:`load_backbone_weights` -- find a state_dict (explicit file -> torch hub cache ->
  download -> :class:`WeightsNotFoundError` telling the user what to do).
* :func:`build_backbone` -- a frozen, eval-locked :class:`BackboneTrunk` with weights loaded
  and validated tensor by tensor.
* :func:`weights_fingerprint` -- a short sha256 of the trunk's weights, for recording
  backbone identity in checkpoints.

Adding a backbone is one :func:`register_backbone` call with a :class:`BackboneSpec`
(e.g. ``resnet50``: ``Bottleneck``, ``(3, 4, 6)``, width 64, channels ``(512, 1024)``).
"""

from __future__ import annotations

import hashlib
import http.client
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "BACKBONES",
    "FEATURE_STRIDES",
    "BackboneSpec",
    "BackboneTrunk",
    "BasicBlock",
    "Bottleneck",
    "WeightsError",
    "WeightsNotFoundError",
    "backbone_names",
    "build_backbone",
    "get_backbone_spec",
    "load_backbone_weights",
    "register_backbone",
    "weights_fingerprint",
]

#: Output strides of the (layer2, layer3) feature maps relative to the input image.
FEATURE_STRIDES: tuple[int, int] = (8, 16)

RANDOM_SOURCE = "random (pretrained: false)"


class WeightsError(RuntimeError):
    """A backbone checkpoint is unreadable, incomplete or has wrong tensor shapes."""


class WeightsNotFoundError(WeightsError):
    """No pretrained backbone weights could be found or downloaded."""


# --------------------------------------------------------------------------------------
# Blocks: identical structure and attribute names to torchvision.models.resnet
# --------------------------------------------------------------------------------------


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding (as torchvision)."""
    return nn.Conv2d(
        in_planes,
        out_planes,
        kernel_size=3,
        stride=stride,
        padding=dilation,
        groups=groups,
        bias=False,
        dilation=dilation,
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution (as torchvision)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to build a trunk and find its torchvision ImageNet weights."""

    name: str
    block: type[BasicBlock] | type[Bottleneck]
    layers: tuple[int, int, int]  # blocks in layer1..layer3
    feature_channels: tuple[int, int]  # (layer2, layer3) output channels
    hub_filename: str  # torchvision's file name in <torch hub dir>/checkpoints/
    url: str  # torchvision's IMAGENET1K_V1 download URL
    width_per_group: int = 64
    groups: int = 1

    @property
    def out_channels(self) -> int:
        """Channels of the concatenated (layer2 + upsampled layer3) feature map."""
        return sum(self.feature_channels)


BACKBONES: dict[str, BackboneSpec] = {}


def _normalise_name(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def register_backbone(spec: BackboneSpec, *, overwrite: bool = False) -> BackboneSpec:
    """Add ``spec`` to :data:`BACKBONES` (checks its channel numbers against its blocks)."""
    key = _normalise_name(spec.name)
    if key != spec.name:
        raise ValueError(f"backbone name must be lower case with underscores, got {spec.name!r} (use {key!r})")
    if key in BACKBONES and not overwrite:
        raise ValueError(f"backbone {key!r} is already registered")
    if len(spec.layers) != 3:
        raise ValueError(f"backbone {key!r}: layers must give the block counts of layer1..layer3, got {spec.layers}")
    expected = (128 * spec.block.expansion, 256 * spec.block.expansion)
    if tuple(spec.feature_channels) != expected:
        raise ValueError(
            f"backbone {key!r}: feature_channels {tuple(spec.feature_channels)} do not match "
            f"{spec.block.__name__} (expected {expected})"
        )
    BACKBONES[key] = spec
    return spec


def backbone_names() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(BACKBONES)


def get_backbone_spec(name: str) -> BackboneSpec:
    """The spec for ``name``; ``ValueError`` listing the known names otherwise."""
    key = _normalise_name(name)
    try:
        return BACKBONES[key]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(backbone_names())}") from None


register_backbone(
    BackboneSpec(
        name="resnet18",
        block=BasicBlock,
        layers=(2, 2, 2),
        feature_channels=(128, 256),
        hub_filename="resnet18-f37072fd.pth",
        url="https://download.pytorch.org/models/resnet18-f37072fd.pth",
    )
)
register_backbone(
    BackboneSpec(
        name="wide_resnet50_2",
        block=Bottleneck,
        layers=(3, 4, 6),
        width_per_group=128,
        feature_channels=(512, 1024),
        hub_filename="wide_resnet50_2-95faca4d.pth",
        url="https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
    )
)


# --------------------------------------------------------------------------------------
# Trunk
# --------------------------------------------------------------------------------------


class BackboneTrunk(nn.Module):
    """torchvision ResNet up to ``layer3``; ``forward`` returns ``(layer2, layer3)``.

    The trunk is always in eval mode: :meth:`train` is overridden so that a parent
    model's ``.train()`` cannot switch its BatchNorm layers to batch statistics.
    """

    weights_source: str

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        self.spec = spec
        self.weights_source = "uninitialised"
        self.inplanes = 64
        self.dilation = 1
        self.groups = spec.groups
        self.base_width = spec.width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(spec.block, 64, spec.layers[0])
        self.layer2 = self._make_layer(spec.block, 128, spec.layers[1], stride=2)
        self.layer3 = self._make_layer(spec.block, 256, spec.layers[2], stride=2)

        # torchvision's initialisation (used as-is for pretrained: false).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        super().train(False)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: list[nn.Module] = [
            block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, self.dilation)
        ]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width, dilation=self.dilation))
        return nn.Sequential(*layers)

    @property
    def feature_channels(self) -> tuple[int, int]:
        return self.spec.feature_channels

    def train(self, mode: bool = True) -> BackboneTrunk:  # noqa: ARG002 - frozen on purpose
        return super().train(False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        f2 = self.layer2(x)
        f3 = self.layer3(f2)
        return f2, f3


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------


def _hub_checkpoint_path(spec: BackboneSpec) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / spec.hub_filename


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(
            f"{path} does not hold a backbone state_dict (expected a mapping of tensor names to tensors, "
            f"optionally under a 'state_dict' or 'model' key; found {type(obj).__name__})"
        )
    return {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}


def _read_checkpoint(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise WeightsNotFoundError(f"backbone weights file {path} does not exist (or is not a file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types on junk input (even KeyError)
        raise WeightsError(f"{path} is not a readable torch checkpoint: {type(exc).__name__}: {exc}") from exc
    return _unwrap_state_dict(obj, path)


def _not_found_message(spec: BackboneSpec, hub_path: Path, download_error: BaseException | None) -> str:
    why = f" (download failed: {type(download_error).__name__}: {download_error})" if download_error else ""
    return (
        f"no pretrained ImageNet weights for backbone {spec.name!r}{why}.\n"
        f"Do one of the following:\n"
        f"  1. place torchvision's checkpoint file {spec.hub_filename!r} at {hub_path}\n"
        f"     (download it on an online machine from {spec.url});\n"
        f"  2. pass an explicit file: --weights PATH on the command line, or the recipe key "
        f"backbone.weights: PATH (a torchvision checkpoint, or one holding conv1..layer3);\n"
        f"  3. or train from random backbone weights with the recipe key backbone.pretrained: false "
        f"(much worse results; for tests and smoke runs only)."
    )


def load_backbone_weights(
    name: str, weights: str | Path | None = None, pretrained: bool = True
) -> tuple[dict[str, Tensor] | None, str]:
    """Find the state_dict for backbone ``name``; returns ``(state_dict, source description)``.

    Precedence: explicit ``weights`` file -> torch hub cache
    (``<torch.hub.get_dir()>/checkpoints/<hub_filename>``) -> download from torchvision's URL ->
    :class:`WeightsNotFoundError`. ``pretrained=False`` returns ``(None, "random (pretrained: false)")``.
    The state_dict is returned as read (it may hold ``layer4``/``fc`` tensors); validation against
    the trunk happens in :func:`build_backbone`.
    """
    spec = get_backbone_spec(name)
    if not pretrained:
        if weights is not None:
            raise ValueError(
                f"backbone {spec.name!r}: both a weights file ({weights}) and pretrained: false were given; "
                "drop one of them"
            )
        return None, RANDOM_SOURCE

    if weights is not None:
        path = Path(weights).expanduser()
        return _read_checkpoint(path), f"file {path}"

    hub_path = _hub_checkpoint_path(spec)
    if hub_path.is_file():
        return _read_checkpoint(hub_path), f"torch hub cache {hub_path}"

    download_error: BaseException | None = None
    try:
        state = torch.hub.load_state_dict_from_url(
            spec.url, map_location="cpu", progress=False, file_name=spec.hub_filename
        )
    except (OSError, http.client.HTTPException, RuntimeError, ValueError) as exc:  # URLError is an OSError
        download_error = exc
    else:
        return _unwrap_state_dict(state, hub_path), f"downloaded {spec.url} -> {hub_path}"

    raise WeightsNotFoundError(_not_found_message(spec, hub_path, download_error)) from download_error


def _load_into_trunk(trunk: BackboneTrunk, state: Mapping[str, Tensor], source: str) -> None:
    own = trunk.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise WeightsError(
            f"backbone {trunk.spec.name!r}: weights from {source} lack tensor(s) the trunk needs: {shown}"
        )
    bad = [
        f"{k}: expected shape {tuple(v.shape)}, found {tuple(state[k].shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise WeightsError(
            f"backbone {trunk.spec.name!r}: weights from {source} have wrong tensor shape(s): " + "; ".join(bad[:5])
        )
    merged = {k: (state[k] if k in state else v) for k, v in own.items()}
    trunk.load_state_dict(merged, strict=True)


def build_backbone(name: str, weights: str | Path | None = None, pretrained: bool = True) -> BackboneTrunk:
    """A frozen (``requires_grad=False``, eval-locked) trunk with weights loaded and checked.

    Every tensor of the trunk (``num_batches_tracked`` excepted) must be in the checkpoint;
    extra tensors (``layer4.*``, ``fc.*``) are ignored. ``trunk.weights_source`` records where
    the weights came from.
    """
    spec = get_backbone_spec(name)
    state, source = load_backbone_weights(spec.name, weights=weights, pretrained=pretrained)
    trunk = BackboneTrunk(spec)
    if state is not None:
        _load_into_trunk(trunk, state, source)
    trunk.weights_source = source
    trunk.requires_grad_(False)
    trunk.eval()
    return trunk


def weights_fingerprint(trunk: nn.Module) -> str:
    """First 16 hex chars of a sha256 over the trunk's state_dict tensors, in key order.

    Each tensor contributes its key, dtype, shape and raw bytes. ``num_batches_tracked``
    counters are skipped: they do not affect an eval-mode trunk and differ between otherwise
    identical checkpoints (some files omit them).
    """
    h = hashlib.sha256()
    for key, tensor in trunk.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]

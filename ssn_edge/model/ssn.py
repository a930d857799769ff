"""SuperSimpleNet (spec 1): frozen backbone -> upscale + local context -> adaptor -> segmentation and
classification heads. The inference graph is exactly this module; noise and losses live in training."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssn_edge.config import ModelConfig
from ssn_edge.model.backbones import BACKBONES, build_backbone

if TYPE_CHECKING:
    from ssn_edge.model.memory_bank import MemoryBank


def gaussian_blur(map_logits: Tensor, sigma: float) -> Tensor:
    """Maps (B, 1, h, w) blurred by a Gaussian of sigma map pixels, edges reflected (0: as they are)."""
    if sigma <= 0:
        return map_logits
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=map_logits.dtype, device=map_logits.device)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    map_logits = F.pad(map_logits, (r, r, r, r), mode="reflect")
    return F.conv2d(F.conv2d(map_logits, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))


def anchor_max(map_logits: Tensor, sigma: float) -> Tensor:
    """Each map's maximum logit (B, 1, h, w) -> (B,), taken after a Gaussian blur of sigma map pixels (edges
    reflected; 0: the raw maximum). sigma 1 is the post-processing's blur (sigma 4 at the input size) at the map's
    stride of 4: the anchored score is then the maximum of the map the user sees, where one stray logit weighs less
    than a defect's patch of them (held out on Magnetic tile, benchmarks/results/recipe.md)."""
    return gaussian_blur(map_logits, sigma).amax(dim=(1, 2, 3))


def anchor_top(map_logits: Tensor, sigma: float, fraction: float) -> Tensor:
    """Each map's mean over its largest `fraction` of cells (B, 1, h, w) -> (B,), blurred as anchor_max: a defect's
    extent counts, not only its peak (Magnetic tile's real defects, which are wide and faint, rank better by it;
    bottle's painted copies worse, so score_anchor auto chooses, benchmarks/README.md)."""
    with warnings.catch_warnings():
        # The export traces at a fixed input size, so the map's cell count, and k, are constants of the graph.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        k = max(1, round(fraction * int(map_logits.shape[-2]) * int(map_logits.shape[-1])))
    return gaussian_blur(map_logits, sigma).flatten(1).topk(k, dim=1).values.mean(dim=1)


def anchor_score(map_logits: Tensor, anchor: str, sigma: float, fraction: float) -> Tensor:
    """What model.score_anchor `anchor` ("map_max" or "map_top") adds to the head's logit."""
    if anchor == "map_top":
        return anchor_top(map_logits, sigma, fraction)
    return anchor_max(map_logits, sigma)


Window = tuple[int, int, int, int]  # (y, x, h, w) on the merged grid


def upsample_rows(n_in: int, n_out: int, first: int, count: int) -> Tensor:
    """Rows first .. first + count - 1 of the (n_out, n_in) matrix of align_corners bilinear resizing; a row outside
    0 .. n_out - 1 is zero, as the 3x3 average's zero padding sees it."""
    out = torch.zeros(count, n_in)
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    for r in range(count):
        i = first + r
        if not 0 <= i < n_out:
            continue
        src = i * scale
        lo = min(int(math.floor(src)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        out[r, lo] += 1 - (src - lo)
        out[r, hi] += src - lo
    return out


def merged_window(l2: Tensor, l3: Tensor, size: tuple[int, int], window: Window) -> Tensor:
    """FeatureExtractor.merge on the window alone: both maps resized to the window and its one-pixel rim only (by
    the resizing matrices' rows), then the 3x3 average without padding. In fp32 whatever the autocast, as merge."""
    y, x, h, w = window
    parts = []
    with torch.autocast("cpu", enabled=False):
        for m in (l2, l3):
            rows = upsample_rows(m.shape[-2], size[0], y - 1, h + 2)
            cols = upsample_rows(m.shape[-1], size[1], x - 1, w + 2)
            parts.append(rows @ m.float() @ cols.T)
        return F.avg_pool2d(torch.cat(parts, dim=1), kernel_size=3, stride=1)


class FeatureExtractor(nn.Module):
    """Backbone layer2 + layer3, both resized to 2x layer2's size, concatenated, 3x3 average (local context)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # A random backbone (pretrained: false) must be the same one when eval or export rebuild the model,
        # so its initialisation draws from a fixed seed, not from the training seed's stream.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.trunk = build_backbone(cfg.backbone, weights=cfg.weights, pretrained=cfg.pretrained)
        self.channels = sum(BACKBONES[cfg.backbone].feature_channels)
        self.pool = nn.AvgPool2d(kernel_size=3, stride=1, padding=1)

    def raw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The backbone's layer2 and layer3 maps: what the training cache stores (8x smaller than merged)."""
        with torch.no_grad():
            return self.trunk(x)

    def merge(self, l2: Tensor, l3: Tensor, window: Window | None = None) -> Tensor:
        """The merged map, or only its window (y, x, h, w): training's crops, where merging the whole map and
        cutting the crop out made a step 1.29x slower (benchmarks/README.md). The same values up to float rounding
        (tests/test_model.py); a window as large as the map is the whole map, merged as inference merges it."""
        size = (l2.shape[-2] * 2, l2.shape[-1] * 2)
        if window is not None and tuple(window[2:]) != size:
            return merged_window(l2, l3, size, window)
        # align_corners=True as in the official code.
        up2 = F.interpolate(l2, size=size, mode="bilinear", align_corners=True)
        up3 = F.interpolate(l3, size=size, mode="bilinear", align_corners=True)
        return self.pool(torch.cat([up2, up3], dim=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.merge(*self.raw(x))


class SegmentationHead(nn.Module):
    """Conv1x1(C -> 1024) -> BN -> LeakyReLU(0.2) -> Conv1x1(1024 -> 1): per-location anomaly logits M_o."""

    def __init__(self, channels: int, hidden: int = 1024):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.LeakyReLU(0.2),
            nn.Conv2d(hidden, 1, 1, bias=False),
        )

    def forward(self, adapted: Tensor) -> Tensor:
        return self.net(adapted)


def score_gated_map(map_logits: Tensor, score: Tensor) -> Tensor:
    """model.map_gate "score": log P(pixel defective) = log sigmoid(map) + log sigmoid(score).

    The map alone says where an image would be defective; the score, whether it is. Their product ranks a pixel of
    an image the classifier is sure is normal below a weaker pixel of one it flags, which pixel AP and any single
    pixel threshold compare across images. The score's term is one shift per image: each map's own ranking of its
    pixels stays as it was.
    """
    return F.logsigmoid(map_logits.float()) + F.logsigmoid(score.float())[:, None, None, None]


def pooled_score(x: Tensor, map_logits: Tensor, fc: nn.Linear) -> Tensor:
    """Global max + avg of the head's features and of M_o -> Linear -> score logit (B,)."""
    pooled = torch.cat(
        [x.amax(dim=(2, 3)), x.mean(dim=(2, 3)), map_logits.amax(dim=(2, 3)), map_logits.mean(dim=(2, 3))],
        dim=1,
    )
    return fc(pooled.float()).squeeze(1)


class _ConvPoolHead(nn.Module):
    """A classification head: self.conv (set by the subclass, ending in `hidden` channels) over concat(features,
    M_o), then pooled_score with Linear(2 * hidden + 2 -> 1)."""

    def __init__(self, conv: nn.Module, hidden: int):
        super().__init__()
        self.conv = conv
        self.fc = nn.Linear(2 * hidden + 2, 1)

    def forward(self, features: Tensor, map_logits: Tensor) -> Tensor:
        return pooled_score(self.conv(torch.cat([features, map_logits], dim=1)), map_logits, self.fc)


class ClassificationHead(_ConvPoolHead):
    """concat(features, M_o) -> Conv kxk -> BN -> ReLU; global max + avg of that and of M_o -> Linear -> score logit."""

    def __init__(self, channels: int, hidden: int = 128, kernel: int = 5):
        super().__init__(nn.Sequential(
            nn.Conv2d(channels + 1, hidden, kernel, padding=kernel // 2),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
        ), hidden)


class LightClassificationHead(nn.Module):
    """The edge variant of ClassificationHead, same inputs and output, ~25x fewer MACs (model.cls_head: light).

    The full head's kxk conv over C+1 channels at feature resolution is ~55 % of ResNet18-SSN's compute.
    Here it is factorised depthwise-separably, channels reduced first: Conv1x1(C+1 -> hidden) (the
    pointwise part, no activation, as in Xception's separable conv) -> depthwise Conv kxk stride 2 (halves
    the resolution) -> BN -> ReLU. Pooling is the full head's: global max + avg of that output and of the
    full-resolution M_o -> Linear(2 * hidden + 2 -> 1).
    """

    def __init__(self, channels: int, hidden: int = 128, kernel: int = 5):
        super().__init__()
        self.reduce = nn.Conv2d(channels + 1, hidden, 1, bias=False)  # the depthwise conv's BN makes a bias moot
        self.conv = nn.Sequential(
            nn.Conv2d(hidden, hidden, kernel, stride=2, padding=kernel // 2, groups=hidden),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
        )
        self.fc = nn.Linear(2 * hidden + 2, 1)

    def forward(self, features: Tensor, map_logits: Tensor) -> Tensor:
        x = self.conv(self.reduce(torch.cat([features, map_logits], dim=1)))
        return pooled_score(x, map_logits, self.fc)


class SeparableClassificationHead(_ConvPoolHead):
    """A light head with a nonlinear bottleneck (model.cls_head: light_separable): MobileNet's separable conv.

    Conv1x1(C+1 -> hidden) -> BN -> ReLU -> depthwise Conv kxk (stride 1: the full head's resolution) -> BN ->
    ReLU; pooling as the full head. Versus `light`: the ReLU between the two convs (so the pair is not one
    rank-limited linear kxk filter) and no stride; the depthwise part is ~6 % of the head's MACs either way.
    """

    def __init__(self, channels: int, hidden: int = 128, kernel: int = 5):
        super().__init__(nn.Sequential(
            nn.Conv2d(channels + 1, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, kernel, padding=kernel // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
        ), hidden)


class BottleneckClassificationHead(_ConvPoolHead):
    """The full head in miniature (model.cls_head: light_bottleneck): a dense kxk conv, on few channels, strided.

    Conv1x1(C+1 -> hidden / 4) -> BN -> ReLU -> Conv kxk stride 2 (hidden / 4 -> hidden) -> BN -> ReLU; pooling as
    the full head. Each output still mixes every (reduced) channel over the whole kxk window, as the full
    head's does.
    """

    def __init__(self, channels: int, hidden: int = 128, kernel: int = 5):
        narrow = max(hidden // 4, 1)
        super().__init__(nn.Sequential(
            nn.Conv2d(channels + 1, narrow, 1, bias=False),
            nn.BatchNorm2d(narrow),
            nn.ReLU(),
            nn.Conv2d(narrow, hidden, kernel, stride=2, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
        ), hidden)


class CamHead(nn.Module):
    """The weak-supervision baseline (spec 5, model.cls_head: cam): a class-activation map instead of SSN's map.

    Conv kxk(C -> hidden) -> BN -> ReLU gives A; the score is a Linear over GAP(A), and the map is that same
    Linear applied at every position, M_cam(i,j) = sum_k w_k A_k(i,j) + b, so mean(M_cam) is the score logit.
    Only image labels train it: localisation comes for free, coarse (published: strong detection, blob-like maps).
    """

    def __init__(self, channels: int, hidden: int = 128, kernel: int = 5):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel, padding=kernel // 2),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
        )
        self.fc = nn.Conv2d(hidden, 1, 1)  # the GAP classifier's weights w_k, applied per position

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        cam = self.fc(self.conv(features))
        return cam, cam.float().mean(dim=(1, 2, 3))


# The anchored scores: the map's blurred maximum, or the mean of its top model.anchor_top cells.
ANCHORS = ("map_max", "map_top")

CLASSIFICATION_HEADS = {"full": ClassificationHead, "light": LightClassificationHead,
                        "light_separable": SeparableClassificationHead, "light_bottleneck": BottleneckClassificationHead,
                        "cam": CamHead}


class SSNHeads(nn.Module):
    """Everything SSN trains: adaptor, segmentation head, classification head."""

    def __init__(self, channels: int, cfg: ModelConfig):
        super().__init__()
        width = cfg.adaptor_channels or channels
        self.cls_input = cfg.cls_input
        self.score_anchor = getattr(cfg, "score_anchor", "none")  # getattr: configs from before the option
        self.anchor_blur = getattr(cfg, "anchor_blur", 0.0)  # getattr: configs from before the option
        self.anchor_top = getattr(cfg, "anchor_top", 0.0)  # getattr: configs from before the option
        self.map_gate = getattr(cfg, "map_gate", "none")  # getattr: configs from before the option
        self.adaptor = nn.Conv2d(channels, width, 1)
        kind = getattr(cfg, "cls_head", "full")  # getattr: a config object from before cls_head existed
        self.cam = kind == "cam"
        # The CAM baseline has no segmentation head: its map is the classifier's activation map.
        self.segmentation = None if self.cam else SegmentationHead(width, cfg.seg_hidden)
        cls_channels = channels if cfg.cls_input == "backbone" else width
        if kind not in CLASSIFICATION_HEADS:
            raise ValueError(f"model.cls_head {kind!r} is not one of {', '.join(CLASSIFICATION_HEADS)}")
        head = CLASSIFICATION_HEADS[kind]
        self.classification = head(cls_channels, cfg.cls_hidden, cfg.cls_kernel)
        # model.memory_bank: fitted after training (ssn_edge/train/memory_bank.py), None until then
        self.memory_bank: MemoryBank | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.score_anchor in ANCHORS:
            # Start at the map's max: the head then only learns what improves on it.
            nn.init.zeros_(self.classification.fc.weight)
            nn.init.zeros_(self.classification.fc.bias)

    def anchor_to_map(self, anchor: str = "map_max") -> None:
        """Make the score the map's maximum logit, or the mean of its top cells (anchor map_top, model.anchor_top),
        blurred by anchor_blur, without training: an anchored score adds the head's logit to it, and a zero fc makes
        the head's logit 0 (train.on_collapse anchor, score_anchor auto). The CAM head has no map and is refused."""
        if self.cam:
            raise ValueError("the CAM head has no segmentation map to anchor its score to")
        if anchor not in ANCHORS:
            raise ValueError(f"anchor {anchor!r} is not one of {', '.join(ANCHORS)}")
        with torch.no_grad():
            self.classification.fc.weight.zero_()
            self.classification.fc.bias.zero_()
        self.score_anchor = anchor

    def decide(self, adapted: Tensor, cls_features: Tensor, detach_map: bool | Tensor = False,
               features: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Map logits (B, 1, h, w) and score logits (B,) from (possibly noised) adapted features.

        detach_map: the unsupervised stop-grad, so the classification loss cannot bend the map; a (B,) bool
        tensor stops it for those images only. features: the adaptor's input, which a fitted memory bank compares
        with its normal patches; the classification head is given SSN's own map all the same, and an anchored score
        takes the map that comes out.
        """
        if self.cam:
            return self.classification(cls_features)
        map_logits = self.segmentation(adapted)
        if isinstance(detach_map, Tensor):
            cls_map = torch.where(detach_map[:, None, None, None], map_logits.detach(), map_logits)
        else:
            cls_map = map_logits.detach() if detach_map else map_logits
        score = self.classification(cls_features, cls_map)
        if self.memory_bank is not None and features is not None:
            map_logits = cls_map = self.memory_bank(features, map_logits)
        if self.score_anchor in ANCHORS:
            score = score + anchor_score(cls_map, self.score_anchor, self.anchor_blur, self.anchor_top).to(score.dtype)
        return map_logits, score

    def bank_alone(self) -> bool:
        """Whether the outputs are the memory bank's alone: SSN's map weighs 0 in the map and the score is the map's
        anchor with the head's logit zeroed (what score_anchor auto leaves when it chooses the map's score). The
        adaptor and both heads would then only add zeros, at over half the graph's work outside the bank (5 GMAC of
        classification head at 256 px), so they are not run, and the exported graph does not hold them."""
        bank = self.memory_bank
        if bank is None or bank.ssn_weight != 0 or self.score_anchor not in ANCHORS:
            return False
        fc = self.classification.fc
        with warnings.catch_warnings():
            # The export traces a trained model: its weights, and so this answer, are constants of the graph.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return not (bool(fc.weight.detach().any()) or (fc.bias is not None and bool(fc.bias.detach().any())))

    def forward(self, features: Tensor, gated: bool = True) -> tuple[Tensor, Tensor]:
        """The inference outputs; gated=False: the segmentation logits whatever model.map_gate says."""
        if self.bank_alone():
            map_logits = self.memory_bank.bank_term(features)
            score = anchor_score(map_logits, self.score_anchor, self.anchor_blur, self.anchor_top)
        else:
            adapted = self.adaptor(features)
            cls_features = features if self.cls_input == "backbone" else adapted
            map_logits, score = self.decide(adapted, cls_features, features=features)
        if gated and self.map_gate == "score":
            map_logits = score_gated_map(map_logits, score)
        return map_logits, score


class SuperSimpleNet(nn.Module):
    """Inference graph: image (B, 3, H, W) normalised -> (map logits (B, 1, H/4, W/4), score logits (B,))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.features = FeatureExtractor(cfg)
        self.heads = SSNHeads(self.features.channels, cfg)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.heads(self.features(x))

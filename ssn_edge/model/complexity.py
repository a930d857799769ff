"""Analytic multiply-accumulate counts of SSN's trainable part (adaptor + heads), for choosing a head.

Counted: convolution and linear weights (one MAC per weight per output position). Not counted: biases,
BatchNorm (folded into the preceding conv at export), activations, pooling, the 3x3 local-context average.
Spec 1 (ResNet18, 256x256 input, i.e. 384 channels on a 64x64 feature map): classification 5x5 conv 5.0
GMAC, segmentation head 1.6, adaptor 0.6.
"""

from __future__ import annotations

from ssn_edge.config import CLS_HEADS, ModelConfig


def _halved(n: int, kernel: int) -> int:
    """Output size of a stride-2 conv with padding kernel // 2 (odd kernel): ceil(n / 2)."""
    pad = kernel // 2
    return (n + 2 * pad - kernel) // 2 + 1


def classification_macs(in_channels: int, h: int, w: int, hidden: int, kernel: int, kind: str) -> int:
    """MACs of one classification head whose input has `in_channels` feature channels (+1 for M_o)."""
    c = in_channels + 1
    fc = 2 * hidden + 2
    if kind == "full":
        return c * hidden * kernel * kernel * h * w + fc
    if kind == "light":
        pointwise = c * hidden * h * w
        depthwise = hidden * kernel * kernel * _halved(h, kernel) * _halved(w, kernel)
        return pointwise + depthwise + fc
    if kind == "light_separable":
        return c * hidden * h * w + hidden * kernel * kernel * h * w + fc
    if kind == "light_bottleneck":
        narrow = max(hidden // 4, 1)
        return c * narrow * h * w + narrow * hidden * kernel * kernel * _halved(h, kernel) * _halved(w, kernel) + fc
    if kind == "cam":  # no M_o input; the GAP classifier runs per position to give the map
        return (c - 1) * hidden * kernel * kernel * h * w + hidden * h * w
    raise ValueError(f"unknown classification head {kind!r} ({', '.join(CLS_HEADS)})")


def head_macs(channels: int, h: int, w: int, cfg: ModelConfig) -> dict[str, int]:
    """MACs per image of the adaptor and heads.

    channels: the backbone's merged feature channels (ResNet18 384, WRN50-2 1536); h, w: the *feature map*
    size the heads run at (input / 4: 64x64 for a 256x256 image). Returns adaptor, segmentation,
    classification (the head cfg.cls_head selects), cls_full and cls_light (both, for comparison) and
    total (adaptor + segmentation + classification).
    """
    width = cfg.adaptor_channels or channels
    cls_in = channels if cfg.cls_input == "backbone" else width
    hw = h * w
    adaptor = channels * width * hw
    segmentation = 0 if cfg.cls_head == "cam" else (width * cfg.seg_hidden + cfg.seg_hidden) * hw
    full = classification_macs(cls_in, h, w, cfg.cls_hidden, cfg.cls_kernel, "full")
    light = classification_macs(cls_in, h, w, cfg.cls_hidden, cfg.cls_kernel, "light")
    if cfg.cls_head not in CLS_HEADS:
        raise ValueError(f"model.cls_head {cfg.cls_head!r} is not one of {', '.join(CLS_HEADS)}")
    chosen = classification_macs(cls_in, h, w, cfg.cls_hidden, cfg.cls_kernel, cfg.cls_head)
    return {
        "adaptor": adaptor,
        "segmentation": segmentation,
        "classification": chosen,
        "cls_full": full,
        "cls_light": light,
        "total": adaptor + segmentation + chosen,
    }

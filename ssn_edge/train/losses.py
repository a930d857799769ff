"""SSN's losses (spec 2): truncated L1 + focal on the map, focal on the score; all weights 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def truncated_l1(logits: Tensor, target: Tensor, valid: Tensor | None = None, th: float = 0.5) -> Tensor:
    """mean(max(0, th - M_o)) over anomalous pixels + mean(max(0, th + M_o)) over normal pixels, on logits.

    Truncation stops pushing a pixel once its logit is beyond +-th, so easy pixels stop dominating.
    `valid` (same shape, bool) excludes pixels whose truth is unknown.
    """
    keep = torch.ones_like(target, dtype=torch.bool) if valid is None else valid.bool()
    anomalous = logits[(target > 0.5) & keep]
    normal = logits[(target <= 0.5) & keep]
    loss = logits.new_zeros(())
    if anomalous.numel():
        loss = loss + torch.clamp(th - anomalous, min=0).mean()
    if normal.numel():
        loss = loss + torch.clamp(th + normal, min=0).mean()
    return loss


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 4.0, valid: Tensor | None = None) -> Tensor:
    """Binary focal loss on sigmoid(logits), alpha off (spec: gamma 4)."""
    logits = logits.float()
    target = target.float()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if valid is not None:
        keep = valid.bool()
        return loss[keep].mean() if keep.any() else logits.new_zeros(())
    return loss.mean()


def ssn_loss(
    map_logits: Tensor,
    score_logits: Tensor,
    mask: Tensor,
    label: Tensor,
    pixel_valid: Tensor | None = None,
    cls_gamma: float = 4.0,
) -> tuple[Tensor, dict[str, float]]:
    """Total = truncated L1(map) + focal(map) + focal(score).

    cls_gamma: the score's focal gamma (paper 4). At gamma 4 an image scored 0.2 on the right side has
    0.2^4 = 0.16 % of its cross-entropy gradient: over 300 epochs the head still gets there, over a CPU
    schedule of ~200 steps it stops with normal and defective scores bunched together.
    """
    map_logits = map_logits.float()
    l1 = truncated_l1(map_logits, mask, pixel_valid)
    seg = focal_loss(map_logits, mask, valid=pixel_valid)
    cls = focal_loss(score_logits, label, gamma=cls_gamma)
    parts = {"l1": float(l1.detach()), "seg_focal": float(seg.detach()), "cls_focal": float(cls.detach())}
    return l1 + seg + cls, parts

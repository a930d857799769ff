"""The optimisation schedule (spec 2): AdamW over the adaptor and the heads, MultiStep decay, bf16 autocast."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random

import numpy as np
import torch

from ssn_edge.config import TrainConfig
from ssn_edge.model.ssn import SuperSimpleNet

log = logging.getLogger("ssn_edge")

Optimizer = torch.optim.Optimizer
Scheduler = torch.optim.lr_scheduler.MultiStepLR


def seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def batches_per_epoch(t: TrainConfig, normal: int, with_defects: bool) -> int:
    """An epoch's batches (train.batches.epoch_batches): every normal image once, batch_size of them a batch, or
    half that when the other half of each batch is defects."""
    per_batch = max(1, t.batch_size // 2) if with_defects else t.batch_size
    return math.ceil(normal / per_batch)


def epochs_for_steps(t: TrainConfig, batches_per_epoch: int) -> TrainConfig:
    """t with train.steps turned into this data set's epochs (the nearest whole number, at least 2), so a run costs
    about the same whatever the number of images, and crop_epochs scaled to keep its share of whole-map epochs (at
    least one). Unchanged when steps is None (epochs as the recipe says: time grows with the data)."""
    if t.steps is None:
        return t
    epochs = max(2, round(t.steps / max(1, batches_per_epoch)))
    crop = t.crop_epochs
    if crop is not None:
        whole = max(1, math.ceil(epochs * (t.epochs - min(crop, t.epochs)) / t.epochs))
        crop = max(0, epochs - whole)
    return dataclasses.replace(t, epochs=epochs, crop_epochs=crop)


def build_optimizer(model: SuperSimpleNet, t: TrainConfig) -> tuple[Optimizer, Scheduler]:
    """AdamW: the adaptor at lr_adaptor, both heads at lr_heads with weight decay; x lr_gamma at each milestone."""
    heads = model.heads
    head_params = [p for n, p in heads.named_parameters() if not n.startswith("adaptor.")]
    optimizer = torch.optim.AdamW(
        [
            {"params": heads.adaptor.parameters(), "lr": t.lr_adaptor},
            {"params": head_params, "lr": t.lr_heads, "weight_decay": t.weight_decay},
        ]
    )
    milestones = sorted({max(1, int(round(f * t.epochs))) for f in t.lr_milestones})
    return optimizer, Scheduler(optimizer, milestones=milestones, gamma=t.lr_gamma)


def restart_schedule(optimizer: Optimizer, scheduler: Scheduler, epoch: int) -> None:
    """Put the schedule of *this* recipe at `epoch`: a resumed run may have been given more epochs, which
    moves the milestones, so the saved scheduler state is not reused."""
    passed = sum(count for m, count in scheduler.milestones.items() if m <= epoch)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * scheduler.gamma**passed
    scheduler.last_epoch = epoch
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (AVX512-BF16 or AMX). Elsewhere oneDNN emulates it, and
    the heads' bf16 convolutions ran more than 30x slower than fp32 (an AVX2 EPYC, spec 2's head)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_precision(t: TrainConfig) -> TrainConfig:
    """t with precision bf16 turned into fp32, said in one line, where the CPU has no native bf16: the
    checkpoint then records the precision that actually trained."""
    if t.precision != "bf16" or native_bf16():
        return t
    log.warning("train.precision bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), so the heads train in fp32")
    return dataclasses.replace(t, precision="fp32")


def autocast(t: TrainConfig):
    """The context the heads' forward passes run in: bf16 autocast, or nothing (fp32)."""
    if t.precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()

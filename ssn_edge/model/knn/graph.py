"""The knn inference graph: image -> (standardised nearest-distance map (B, 1, H/8, W/8), score (B,)).

Outputs are in the units SuperSimpleNet's are, so the pipeline after the model is shared unchanged: the runtime
takes a sigmoid of the score and upsamples and blurs the map (ssn_edge/runtime/postprocess.py). A distance d
leaves the graph as z = (d - center) / scale, center and scale fitted on normal training images held out of the
bank: z is monotone in d (rankings, so AUROC, are the distance's own) and sigmoid(z) neither saturates nor
crowds at 0.5, so thresholds on it keep their resolution. The exported graph computes the distances itself
(one MatMul against the bank constant and an ArgMin find the nearest row, whose distance is then computed
directly, ssn_edge/model/knn/bank.py): the runtime stays torch-free and knows nothing of banks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssn_edge.config import KnnConfig, ModelConfig
from ssn_edge.model.knn.bank import centred_constants, nearest_sq_distance, nearest_sq_distance_blocked
from ssn_edge.model.knn.features import PatchFeatures


@dataclass(frozen=True)
class Standardizer:
    """z = (d - center) / scale, from the distances of normal images the bank never saw: center their mean plus
    three standard deviations (sigmoid 0.5 lies above nearly every normal value), scale their standard deviation."""

    center: float
    scale: float

    @classmethod
    def fit(cls, distances: Tensor) -> Standardizer:
        d = distances.double().reshape(-1)
        std = float(d.std()) if d.numel() > 1 else 0.0
        scale = max(std, 1e-3 * max(float(d.abs().mean()), 1e-6))  # identical held-out values: no zero division
        return cls(float(d.mean()) + 3.0 * std, scale)


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


class KnnHead(nn.Module):
    """Everything fitted: the bank (N, C) of normal patch features and the map's and score's standardisation."""

    def __init__(self, bank: Tensor, map_std: Standardizer, score_std: Standardizer):
        super().__init__()
        bank = bank.float().contiguous()
        self.register_buffer("bank", bank)
        self.register_buffer("map_std", torch.tensor([map_std.center, map_std.scale], dtype=torch.float32))
        self.register_buffer("score_std", torch.tensor([score_std.center, score_std.scale], dtype=torch.float32))
        # Derived, so not saved: -2 * bank.T and |b|^2 find the nearest row with one MatMul plus adds
        mean, bank_t_neg2, bank_sq = centred_constants(bank)
        self.register_buffer("bank_mean", mean, persistent=False)
        self.register_buffer("bank_t_neg2", bank_t_neg2, persistent=False)
        self.register_buffer("bank_sq", bank_sq, persistent=False)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> KnnHead:
        m, s = state["map_std"].tolist(), state["score_std"].tolist()
        return cls(state["bank"], Standardizer(*m), Standardizer(*s))

    def distances(self, features: Tensor) -> Tensor:
        """Each patch's Euclidean distance to its nearest bank row: (B, C, h, w) -> (B, 1, h, w)."""
        q = features.flatten(2).transpose(1, 2) - self.bank_mean  # (B, hw, C)
        if _tracing():  # the exported graph: one MatMul (B, hw, C) x (C, N)
            d2 = nearest_sq_distance(q, self.bank_t_neg2, self.bank_sq)
        else:  # eager: in blocks of rows, memory bounded whatever the batch
            d2 = nearest_sq_distance_blocked(q.reshape(-1, q.shape[-1]), self.bank_t_neg2, self.bank_sq)
        return d2.sqrt().reshape(features.shape[0], 1, features.shape[2], features.shape[3])

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        d = self.distances(features)
        score = d.amax(dim=(1, 2, 3))  # the image is as anomalous as its most anomalous patch
        return (d - self.map_std[0]) / self.map_std[1], (score - self.score_std[0]) / self.score_std[1]


class KnnDetector(nn.Module):
    """Inference graph: image (B, 3, H, W) ImageNet-normalised -> (map (B, 1, H/8, W/8), score (B,)), both
    standardised distances (module docstring)."""

    def __init__(self, cfg: ModelConfig, knn: KnnConfig, head: KnnHead, features: PatchFeatures | None = None):
        super().__init__()
        self.config = cfg
        self.knn = knn
        self.features = features if features is not None else PatchFeatures(cfg, knn.channels)
        if head.bank.shape[1] != self.features.channels:
            raise ValueError(f"bank has {head.bank.shape[1]} channels, the features {self.features.channels}")
        self.head = head
        self.map_stride = PatchFeatures.stride

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.features(x))

"""The knn inference graph: image -> (standardised distance map (B, 1, H/8, W/8), score (B,)).

The map is each patch's mean distance to its knn.neighbours nearest bank patches (default 1: PatchCore's nearest
distance), the score the image's largest nearest distance. A mean over a few neighbours discounts a greedy
coreset's lone members (rare normal patches a defect patch may land near): it lifted held-out pixel AUPRO (k 5:
bottle's painted check set 91.25 -> 94.83, Magnetic tile 74.11 -> 74.50) but not bottle's test split (93.63 ->
92.92), so it is an option, not the default (ssn_edge/config.py KnnConfig). The score stays the nearest distance:
scoring the mean over five lowered Magnetic tile's held-out image AUROC, 94.91 -> 93.76 (a check outside the records),
and PatchCore's re-weighted score (paper eq. 7: the maximum scaled by how lone the nearest bank patch is among its b
bank neighbours; knn_bench.py tune --grid map, variants k1_reweight<b>) split the held-out signals: bottle's painted
copies 98.70 -> 99.23 / 98.84 at b 3 / 9, Magnetic tile's real defects 94.91 -> 92.87 / 94.53.

Outputs are in the units SuperSimpleNet's are, so the pipeline after the model is shared unchanged: the runtime
takes a sigmoid of the score and upsamples and blurs the map (ssn_edge/runtime/postprocess.py). A distance d
leaves the graph as z = (d - center) / scale, center and scale fitted on normal training images held out of the
bank: z is monotone in d (rankings, so AUROC, are the distance's own) and sigmoid(z) neither saturates nor
crowds at 0.5, so thresholds on it keep their resolution. The exported graph computes the distances itself
(one MatMul against the bank constant and a TopK find the nearest rows, whose distances are then computed
directly, ssn_edge/model/knn/bank.py): the runtime stays torch-free and knows nothing of banks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssn_edge.config import KnnConfig, ModelConfig
from ssn_edge.model.knn.bank import centred_constants, nearest_sq_distances, nearest_sq_distances_blocked
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
    """Everything fitted: the bank (N, C) of normal patch features and the map's and score's standardisation;
    neighbours: how many nearest bank patches the map averages (knn.neighbours, at most the bank's size)."""

    def __init__(self, bank: Tensor, map_std: Standardizer, score_std: Standardizer, neighbours: int = 1):
        super().__init__()
        if neighbours < 1:
            raise ValueError(f"knn.neighbours must be >= 1, got {neighbours}")
        bank = bank.float().contiguous()
        self.neighbours = max(1, min(int(neighbours), len(bank)))
        self.register_buffer("bank", bank)
        self.register_buffer("map_std", torch.tensor([map_std.center, map_std.scale], dtype=torch.float32))
        self.register_buffer("score_std", torch.tensor([score_std.center, score_std.scale], dtype=torch.float32))
        # Derived, so not saved: -2 * bank.T and |b|^2 find the nearest row with one MatMul plus adds
        mean, bank_t_neg2, bank_sq = centred_constants(bank)
        self.register_buffer("bank_mean", mean, persistent=False)
        self.register_buffer("bank_t_neg2", bank_t_neg2, persistent=False)
        self.register_buffer("bank_sq", bank_sq, persistent=False)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], neighbours: int = 1) -> KnnHead:
        m, s = state["map_std"].tolist(), state["score_std"].tolist()
        return cls(state["bank"], Standardizer(*m), Standardizer(*s), neighbours)

    def distances(self, features: Tensor) -> Tensor:
        """Each patch's Euclidean distances to its `neighbours` nearest bank rows, nearest first:
        (B, C, h, w) -> (B, neighbours, h, w)."""
        q = features.flatten(2).transpose(1, 2) - self.bank_mean  # (B, hw, C)
        k = self.neighbours
        if _tracing():  # the exported graph: one MatMul (B, hw, C) x (C, N)
            d2 = nearest_sq_distances(q, self.bank_t_neg2, self.bank_sq, k)
        else:  # eager: in blocks of rows, memory bounded whatever the batch
            d2 = nearest_sq_distances_blocked(q.reshape(-1, q.shape[-1]), self.bank_t_neg2, self.bank_sq, k)
        b, _, h, w = features.shape
        return d2.sqrt().reshape(b, h, w, k).permute(0, 3, 1, 2)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        d = self.distances(features)
        amap = d.mean(dim=1, keepdim=True)  # module docstring: the mean over the neighbours
        score = d[:, 0].amax(dim=(1, 2))  # the image is as anomalous as its most anomalous patch's nearest distance
        return (amap - self.map_std[0]) / self.map_std[1], (score - self.score_std[0]) / self.score_std[1]


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

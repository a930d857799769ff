"""A memory bank beside SSN's heads (model.memory_bank): the map becomes SSN's map (weighted by
model.memory_bank_ssn_weight) plus each patch's distance to its nearest normal training patch, each standardised on
held-out normal images.

SSN learns "unlike normal" from synthetic feature noise; a nearest-neighbour distance (PatchCore) measures it
directly on the normal patches themselves. On supervised Magnetic tile the sum mapped real defects better than
either alone (benchmarks/README.md, issue 28). The bank is fitted after training (ssn_edge/train/memory_bank.py);
the classification head still sees SSN's own map, the one it was trained on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssn_edge.model.knn.graph import KnnHead, Standardizer

UNIT = Standardizer(0.0, 1.0)


class MemoryBank(nn.Module):
    """bank (N, C): normal patches of SSN's features (the adaptor's input) averaged over 2x2, layer2's resolution
    as in PatchCore; map_std / bank_std: SSN's map and the nearest distances on held-out normals; ssn_weight: SSN's
    term's weight in the sum (the recipe's, not the state's: it is chosen after fitting)."""

    stride = 2  # the bank's patches are SSN's feature map averaged over stride x stride

    def __init__(self, bank: Tensor, map_std: Standardizer, bank_std: Standardizer, neighbours: int = 1,
                 ssn_weight: float = 1.0):
        super().__init__()
        self.ssn_weight = float(ssn_weight)
        self.head = KnnHead(bank, UNIT, UNIT, neighbours)  # unit standardisers: its map is the raw distances
        self.register_buffer("map_std", torch.tensor([map_std.center, map_std.scale], dtype=torch.float32))
        self.register_buffer("bank_std", torch.tensor([bank_std.center, bank_std.scale], dtype=torch.float32))

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], neighbours: int = 1, ssn_weight: float = 1.0) -> MemoryBank:
        """The module a state_dict (keys 'head.bank', 'map_std', 'bank_std', ...) was saved from."""
        return cls(state["head.bank"], Standardizer(*state["map_std"].tolist()),
                   Standardizer(*state["bank_std"].tolist()), neighbours, ssn_weight)

    @staticmethod
    def patches(features: Tensor) -> Tensor:
        """SSN's features (B, C, H, W) -> the bank's patches (B, C, H/2, W/2)."""
        return F.avg_pool2d(features, MemoryBank.stride)

    def distances(self, features: Tensor) -> Tensor:
        """Each location's (mean over knn.neighbours) nearest-bank distance, at the features' size (B, 1, H, W)."""
        d, _ = self.head(self.patches(features))
        return F.interpolate(d, size=features.shape[-2:], mode="bilinear", align_corners=False)

    def bank_term(self, features: Tensor) -> Tensor:
        """The nearest-bank distances standardised on the held-out normals: the sum's own term, and the whole map
        where SSN's weighs 0."""
        return (self.distances(features.float()) - self.bank_std[0]) / self.bank_std[1]

    def terms(self, features: Tensor, map_logits: Tensor) -> tuple[Tensor, Tensor]:
        """SSN's map and the nearest-bank distances, each standardised on the held-out normals: the sum's two terms."""
        return (map_logits.float() - self.map_std[0]) / self.map_std[1], self.bank_term(features)

    def forward(self, features: Tensor, map_logits: Tensor) -> Tensor:
        ssn, bank = self.terms(features, map_logits)
        return self.ssn_weight * ssn + bank

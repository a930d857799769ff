"""A second model family: PatchCore-style nearest-neighbour detection on the frozen backbone (model.kind knn).

features: locally aware patch features; bank: the coreset of normal training patches and nearest distances;
graph: the inference module, image -> (standardised distance map, score), the same outputs as SuperSimpleNet's.
"""

from ssn_edge.model.knn.graph import KnnDetector, KnnHead, Standardizer

__all__ = ["KnnDetector", "KnnHead", "Standardizer"]

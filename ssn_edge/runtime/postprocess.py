"""From raw model outputs to an anomaly map and a score; shared by training-time evaluation and the runtime.

Training-time evaluation, tiled bundles (per tile, before merging) and bundles exported before post-processing
moved into the graph use these functions. A plain bundle's graph now ends in the same operations, built by
ssn_edge.export.graph.add_postprocess from these constants and tested equal to these functions
(tests/test_ir_postprocess.py), so the runtime does not apply them a second time (bundle postprocess.in_graph).
"""

from __future__ import annotations

import cv2
import numpy as np

# SSN's post-processing (spec 1.7): bilinear upsample to the input size, Gaussian blur sigma 4, kernel 25.
BLUR_SIGMA = 4.0
BLUR_KERNEL = 25


def sigmoid(x: np.ndarray | float) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))).astype(np.float32)


def anomaly_map(
    raw: np.ndarray,
    size: tuple[int, int],
    sigma: float = BLUR_SIGMA,
    kernel: int = BLUR_KERNEL,
) -> np.ndarray:
    """Raw segmentation logits (h, w) or (N, h, w) or (N, 1, h, w) -> smoothed maps at size=(H, W), float32.

    Values stay logits (monotone in the anomaly probability): ranking metrics and thresholds are
    unaffected, and the map keeps resolution where a sigmoid would saturate. A graph exported with
    model.map_gate "score" gives log-probabilities instead (bundle outputs.map.kind); they are treated alike.
    """
    raw = np.asarray(raw, dtype=np.float32)
    if raw.ndim == 4:
        raw = raw[:, 0]
    single = raw.ndim == 2
    maps = raw[None] if single else raw
    h, w = size
    out = np.empty((maps.shape[0], h, w), dtype=np.float32)
    for i, m in enumerate(maps):
        up = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
        if sigma > 0:
            up = cv2.GaussianBlur(up, (kernel, kernel), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
        out[i] = up
    return out[0] if single else out

"""Scores bunched near a bundle's image threshold (issue 28): the report's flag for a score that has collapsed, or
nearly, even where training's collapse check did not run. Torch-free."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

# A bundle's scores are "bunched" when more than BUNCHED_SHARE of the images score within NEAR_THRESHOLD_LOGITS of
# the image threshold (in logits), or their interquartile range is below MIN_SCORE_SPREAD logits. INT8 moves score
# logits by tenths (this report's |Δscore|), so an image that close to the threshold changes decision with the
# precision or a slight change of light; in a healthy bundle only the few borderline images lie there, not a
# quarter of them. MIN_SCORE_SPREAD is training's collapse check's (ssn_edge.train.collapse.MIN_SPREAD; not
# imported: the report is torch-free).
NEAR_THRESHOLD_LOGITS = 0.25
BUNCHED_SHARE = 0.25
MIN_SCORE_SPREAD = 0.05


def _logits(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1.0 - 1e-7)  # float32 sigmoids saturate at 0 and 1
    return np.log(p / (1.0 - p))


def score_bunching(scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """How bunched sigmoid scores are near the image threshold: the fraction within NEAR_THRESHOLD_LOGITS of it,
    their interquartile range in logits, and whether that makes them bunched (see BUNCHED_SHARE)."""
    if not len(scores):
        return {"near_threshold_fraction": None, "score_logit_spread": None, "scores_bunched": False}
    z = _logits(scores)
    near = float(np.mean(np.abs(z - _logits(threshold)) <= NEAR_THRESHOLD_LOGITS))
    q1, q3 = np.percentile(z, [25, 75])
    spread = float(q3 - q1)
    return {"near_threshold_fraction": near, "score_logit_spread": spread,
            "scores_bunched": near > BUNCHED_SHARE or spread < MIN_SCORE_SPREAD}


def bunching_warning(records: Sequence[dict[str, Any]], threshold: float) -> str | None:
    """One line naming the variants whose scores are bunched (their records' scores_bunched); None: none are."""
    bunched = [r for r in records if r.get("scores_bunched")]
    if not bunched:
        return None
    first, names = bunched[0], ", ".join(f"{r['runtime']} {r['precision']}" for r in bunched)
    return (f"Image scores are bunched ({names}): {100 * first['near_threshold_fraction']:.0f} % of the images "
            f"score within {NEAR_THRESHOLD_LOGITS:g} logits of the image threshold {threshold:.4g} and the middle half "
            f"of the scores spans {first['score_logit_spread']:.2g} logits ({first['runtime']} {first['precision']}). "
            "Decisions near the threshold change with the precision or a slight change of the images; the image score "
            "may have collapsed (compare its AUROC with the map's).")

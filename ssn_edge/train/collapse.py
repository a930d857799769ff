"""The collapse check (issue 28, no silent collapse): does a trained SSN's image score, and its map, still tell
the held-out check set's defective images from the normals?

The check set is `ssn_edge.data.heldout.check_set`: the normal training images held out of training, each again
with one faint painted defect, and in the unsupervised setting the training split's defective images (which it
does not train on). On some data the classification head collapses (every image scored ~0.004), so the
image AUROC is poor although the map's maximum separates the images; nothing said so before. Training runs this
check once at the end (`ssn_edge.train.loop.train`), logs one line and does what `train.on_collapse` says; the
record goes into the checkpoint, the bundle's metadata and the report.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from ssn_edge.data import ArraySet
from ssn_edge.evaluation.evaluate import predict_raw
from ssn_edge.model.ssn import anchor_max, anchor_top
from ssn_edge.runtime.postprocess import sigmoid
from ssn_edge.runtime.schema import CollapseCheck

# Spread = interquartile range over the check set, in logits (robust to one odd image, and half the set is painted,
# so a score that separates the halves has its gap inside the range). Below 0.05 logits the score is one value:
# INT8 moves score logits by more than that (the report's |Δscore|), so a threshold inside that band decides by
# quantization noise, and fp16 resolves ~0.004 logits at |logit| 4..8.
MIN_SPREAD = 0.05
# AUROC (0..1) of the painted copies against the normals. With 10..20 held-out images an AUROC of 0.55 is one or two
# pairs from chance: a score at or below it has learned nothing the painted defects show. It counts as collapsed
# only when the map's maximum clearly does better (0.65), i.e. the model sees the defects and the score ignores them;
# when neither does, the painted defects may simply be unlike this data's, which is no collapse.
CHANCE_AUROC = 0.55
MAP_WORKS_AUROC = 0.65
# train.on_collapse: "warn" logs and keeps the model; "anchor" makes the score the map's max logit when only the
# score collapsed (SSNHeads.anchor_to_map); "error" stops with a one-line error, the checkpoint kept.
POLICIES = ("warn", "anchor", "error")


class CollapseError(ValueError):
    """train.on_collapse error: the check found a collapse; one line naming the check (the CLI prints it)."""


def _spread(values: np.ndarray) -> float:
    q1, q3 = np.percentile(values, [25, 75])
    return float(q3 - q1)


def _auroc(labels: np.ndarray, values: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, values))


def judge(score_logits: np.ndarray, map_max: np.ndarray, labels: np.ndarray) -> CollapseCheck:
    """The check on raw outputs: score logits (N,), each image's maximum map logit (N,), labels (N,) 0/1 with both
    present. A NaN or infinite output is no signal: it counts as the value 0 (so a NaN model reads as collapsed)."""
    if len(set(labels.tolist())) < 2:
        raise ValueError("the collapse check needs normal and defective images")
    s = np.nan_to_num(np.asarray(score_logits, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    m = np.nan_to_num(np.asarray(map_max, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    score_spread, map_spread = _spread(s), _spread(m)
    score_auroc, map_auroc = _auroc(labels, s), _auroc(labels, m)
    collapsed_score = score_spread < MIN_SPREAD or (score_auroc <= CHANCE_AUROC and map_auroc >= MAP_WORKS_AUROC)
    check = CollapseCheck(normal=int((labels == 0).sum()), defective=int((labels == 1).sum()),
                          score_spread=score_spread, score_auroc=score_auroc, map_max_auroc=map_auroc,
                          map_spread=map_spread, collapsed_score=bool(collapsed_score),
                          collapsed_map=bool(map_spread < MIN_SPREAD))
    return dataclasses.replace(check, message=_finding(check, sigmoid(s)))


def check_model(model: torch.nn.Module, arrays: ArraySet) -> CollapseCheck:
    """Score the check set with the model as exported (FP32, eval mode) and judge it. The map's maximum is taken
    as model.score_anchor map_max adds it to the score (model.anchor_blur)."""
    return judge_outputs(model, *predict_raw(model, arrays.images), arrays.labels)


def judge_outputs(model: torch.nn.Module, raw_maps: np.ndarray, logits: np.ndarray,
                  labels: np.ndarray) -> CollapseCheck:
    """judge() on the model's raw outputs: maps (N, h, w) and score logits (N,)."""
    sigma = getattr(getattr(model, "heads", None), "anchor_blur", 0.0)
    return judge(logits, anchor_max(torch.from_numpy(raw_maps)[:, None], sigma).numpy(), labels)


def score_candidates(raw_maps: np.ndarray, logits: np.ndarray, labels: np.ndarray, sigma: float,
                     top: float) -> dict[str, float]:
    """AUROC (0..1) of each score model.score_anchor auto chooses from, on the check set's raw outputs: the head's
    logit ("none"), the blurred map's maximum ("map_max") and, with top > 0, its top cells' mean ("map_top"). In
    that order, so a tie keeps the earlier. A NaN output counts as 0, as judge() reads it."""
    maps = torch.from_numpy(np.nan_to_num(raw_maps, nan=0.0, posinf=0.0, neginf=0.0))[:, None]
    values = {"none": np.nan_to_num(np.asarray(logits, np.float64), nan=0.0, posinf=0.0, neginf=0.0),
              "map_max": anchor_max(maps, sigma).numpy()}
    if top > 0:
        values["map_top"] = anchor_top(maps, sigma, top).numpy()
    return {name: _auroc(labels, v) for name, v in values.items()}


def _finding(c: CollapseCheck, scores: np.ndarray) -> str:
    """'collapse check on ...: <verdict> (<numbers>)', without what training did about it (decide adds that)."""
    what = []
    if c.collapsed_score and c.score_spread < MIN_SPREAD:
        what.append("the image score is near-constant")
    elif c.collapsed_score:
        what.append("the image score ranks the defective images no better than chance while the map's maximum does")
    if c.collapsed_map:
        what.append("the map's maximum is near-constant")
    verdict = " and ".join(what) or "no collapse"
    return (f"collapse check on {c.normal} held-out normal images and {c.defective} defective ones: {verdict} "
            f"(scores {scores.min():.4g}..{scores.max():.4g}, spread {c.score_spread:.2g} logits, "
            f"AUROC {c.score_auroc:.2f}; map max spread {c.map_spread:.2g} logits, AUROC {c.map_max_auroc:.2f})")


def decide(check: CollapseCheck, policy: str, anchorable: bool, checkpoint: Path) -> CollapseCheck:
    """The record with what training does (action) and the full line to log. anchorable: the model has a map to
    anchor its score to (not the CAM head). Anchoring cannot help when the map itself is near-constant, nor when
    only the map collapsed: those are kept as trained, and the line says why."""
    if policy not in POLICIES:
        raise ValueError(f"train.on_collapse {policy!r} is not one of {', '.join(POLICIES)}")
    if not check.collapsed:
        return dataclasses.replace(check, action="none")
    if policy == "error":
        action, then = "stopped", (f"stopped (train.on_collapse error); the checkpoint is kept at {checkpoint} "
                                   "for inspection")
    elif policy == "anchor" and check.collapsed_score and not check.collapsed_map and anchorable:
        action, then = "anchored", "the score is now the map's maximum logit (train.on_collapse anchor)"
    elif policy == "anchor":
        why = "the map's maximum is near-constant" if check.collapsed_map else "this head has no map to anchor to"
        action, then = "kept", f"kept as trained: anchoring cannot help, {why} (train.on_collapse anchor)"
    else:
        action, then = "kept", ("kept as trained (train.on_collapse warn; 'anchor' would score by the map's "
                                "maximum, 'error' would stop)" if check.collapsed_score else
                                "kept as trained (train.on_collapse warn)")
    return dataclasses.replace(check, action=action, message=f"{check.message}: {then}")

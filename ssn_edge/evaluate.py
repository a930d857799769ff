"""Evaluation of a PyTorch SSN: raw outputs -> (shared) post-processing -> metrics."""

from __future__ import annotations

import time

import numpy as np
import torch

from ssn_edge.data import ArraySet
from ssn_edge.metrics import evaluate_arrays
from ssn_edge.runtime.postprocess import anomaly_map, sigmoid


@torch.no_grad()
def predict_raw(model: torch.nn.Module, images: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Raw map logits (N, h, w) and score logits (N,) in FP32, exactly what the exported graph returns."""
    was_training = model.training
    model.eval()
    maps, scores = [], []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size])
        m, s = model(x)
        maps.append(m[:, 0].float().numpy())
        scores.append(s.float().numpy())
    model.train(was_training)
    return np.concatenate(maps), np.concatenate(scores)


@torch.no_grad()
def torch_latency_ms(model: torch.nn.Module, x: torch.Tensor, warmup: int = 10, runs: int = 50) -> float:
    """Median wall time (ms) of model(x) after warm-up: the PyTorch eager baseline that speed ratios divide."""
    model.eval()
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def outputs_to_predictions(
    raw_maps: np.ndarray, score_logits: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Image scores in [0, 1] and anomaly maps at size=(H, W), via the runtime's post-processing."""
    return sigmoid(score_logits), anomaly_map(raw_maps, size)


def metrics_from_predictions(arrays: ArraySet, scores: np.ndarray, maps: np.ndarray) -> dict[str, float]:
    result = evaluate_arrays(arrays, scores, maps)
    # The map's maximum as a second image score: useful when the classification head is under-trained.
    from sklearn.metrics import roc_auc_score

    result["image_auroc_map_max"] = 100.0 * float(roc_auc_score(arrays.labels, maps.reshape(len(maps), -1).max(1)))
    return result


def evaluate_model(model: torch.nn.Module, arrays: ArraySet, batch_size: int = 16) -> dict[str, float]:
    raw_maps, logits = predict_raw(model, arrays.images, batch_size)
    scores, maps = outputs_to_predictions(raw_maps, logits, arrays.images.shape[-2:])
    return metrics_from_predictions(arrays, scores, maps)

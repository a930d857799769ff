"""Evaluation of a PyTorch model, plain or tiled: raw outputs -> (shared) post-processing -> metrics."""

from __future__ import annotations

import time

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch

from ssn_edge.data import ArraySet
from ssn_edge.model.tiled import TiledSSN, padded_images
from ssn_edge.evaluation.metrics import evaluate_arrays
from ssn_edge.runtime.postprocess import anomaly_map, sigmoid
from ssn_edge.runtime.tiled import merge_outputs
from ssn_edge.runtime.tiling import TilingConfig, tile

if TYPE_CHECKING:
    from ssn_edge.model.load import LoadedModel


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


@torch.no_grad()
def predict_tiled_raw(model: TiledSSN, images: np.ndarray, graph: str, batch_size: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Normalised images (N, 3, H, W) at the tiling's image size -> raw maps (N, T, h, w), logits (N, T)."""
    cfg = dataclasses.replace(model.tiling, graph=graph)
    grid = cfg.grid(cfg.image_size)
    maps, logits = [], []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        if graph == "image":
            inp = torch.from_numpy(padded_images(x, grid))
        else:
            tiles = np.stack([tile(img.transpose(1, 2, 0), grid, cfg.fill).transpose(0, 3, 1, 2) for img in x])
            inp = torch.from_numpy(np.ascontiguousarray(tiles))
        m, s = model(inp)
        maps.append(m.float().numpy())
        logits.append(s.float().numpy())
    return np.concatenate(maps), np.concatenate(logits)


def merged_predictions(cfg: TilingConfig, raw: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image merge of tiled raw outputs with the runtime's merge: scores (N,), maps (N, H, W)."""
    grid = cfg.grid(cfg.image_size)
    scores, maps = np.empty(len(raw), dtype=np.float32), []
    for i in range(len(raw)):
        merged, scores[i] = merge_outputs(raw[i], logits[i], grid, cfg)
        maps.append(merged)
    return scores, np.stack(maps)


def evaluate_tiled(model: TiledSSN, arrays: ArraySet, graph: str | None = None) -> dict[str, float]:
    """Metrics at the tiling's image size, run in the tiling's graph ("tile" runs as "tiles") unless told otherwise."""
    graph = graph or ("tiles" if model.tiling.graph == "tile" else model.tiling.graph)
    raw, logits = predict_tiled_raw(model, arrays.images, graph)
    scores, maps = merged_predictions(model.tiling, raw, logits)
    return metrics_from_predictions(arrays, scores, maps)



def evaluate_loaded(loaded: "LoadedModel", arrays: ArraySet) -> dict[str, float]:
    """Metrics of any loaded model on arrays at its recipe's image size."""
    if loaded.tiled:
        return evaluate_tiled(loaded.model, arrays)
    return evaluate_model(loaded.model, arrays)

"""Issue 28 lever: SSN's map fused with the memory-bank (knn) map, measured before building it into a model.

  python benchmarks/fusion_bench.py --dataset magnetic_tile --seeds 0 1 2
  python benchmarks/fusion_bench.py --dataset magnetic_tile --setting supervised --seeds 0 1 2

Takes the finished default runs of recipe_bench (runs/recipe/<dataset>_<setting>_default_s<seed>) and the knn
default fit on the same training images (runs/bench/knn_<dataset>_default_s0: `ssn-edge train --recipe
recipes/knn_resnet18.yaml`, whose data split holds out the same normals as SSN's). Each model's raw map is
standardised on the held-out normals (mean and sd of their map values, what a fused model would fix at export),
then the two are summed (or the larger taken); the image score is the post-processed map's maximum, or SSN's own
score (knn_fusion_sum_head: the head's, or its map anchor where training chose that). Scored on
recipe_bench's held-out check sets (choosing) and the test split (reporting), with each model alone beside it.
Records go to benchmarks/results/recipe.json as variants knn_fusion_sum / knn_fusion_max / knn_fusion_sum_head (the
single models: map_max_ssn / map_max_knn).

  python benchmarks/fusion_bench.py --dataset magnetic_tile --seeds 0 1 2 --bank-weights 0 0.25 0.5 1 2

--bank-weights: the weight of SSN's term in a finished memory_bank run's map (runs/recipe/<dataset>_<setting>_
memory_bank_s<seed>), map = w * SSN's standardised map + the bank's standardised distances (w 1: the model as
trained), the score as the model makes it (the head's logit plus the fused map's blurred maximum where the run
anchored; variants bank_weight_<w>), and for a run that kept the head's score the fused map's blurred maximum alone
(bank_weight_<w>_map; an anchored run's head adds a constant, its fc zeroed, so that would repeat the first).
(Variants bank_k4_weight_<w>: the bank refitted on patches averaged 4x4, about PatchCore's 3x3 of layer2's grid,
`--bank-kernel 4` at commit 28fd0fd; held-out real defects fell, so it was removed. Variants bank_weight_<w>_top_<f>:
the image score as the mean of the blurred map's top fraction f of cells instead of its maximum, `--score-tops` with
model.anchor_top at commit a9b9c91; Magnetic tile's held-out real defects rose and bottle's painted copies fell, so
it was removed.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.recipe_bench import DATA, FUSIONS, METRICS, _check_sets  # noqa: E402
from benchmarks.results import command_line, record_results  # noqa: E402


def _standardise(maps: np.ndarray, normals: np.ndarray) -> np.ndarray:
    return (maps - float(normals.mean())) / max(float(normals.std()), 1e-6)


def _resized(maps: np.ndarray, like: np.ndarray) -> np.ndarray:
    """maps (N, h, w) bilinearly at like's (h', w'): knn's map is at layer2's stride, SSN's finer."""
    import cv2

    h, w = like.shape[-2:]
    return np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR) for m in maps])


def _fused(name: str, ssn: np.ndarray, knn: np.ndarray) -> np.ndarray:
    """The variant's map from the two standardised maps (knn's already at SSN's size)."""
    if name == "map_max_ssn":
        return ssn
    if name == "map_max_knn":
        return knn
    return np.maximum(ssn, knn) if name == "knn_fusion_max" else ssn + knn


def _metrics(arrays, raw: np.ndarray, scores: np.ndarray | None = None) -> dict:
    """Metrics of raw maps post-processed as the runtime does; the image score is the map's maximum unless given."""
    from ssn_edge.evaluation.evaluate import metrics_from_predictions
    from ssn_edge.runtime.postprocess import anomaly_map

    maps = anomaly_map(raw, arrays.images.shape[-2:])
    scores = maps.reshape(len(maps), -1).max(1) if scores is None else scores
    return {k: round(float(v), 2) for k, v in metrics_from_predictions(arrays, scores, maps).items() if k in METRICS}


def run(dataset: str, setting: str, seed: int) -> list[dict]:
    from ssn_edge.data import load_arrays, load_dataset, split_validation
    from ssn_edge.evaluation.evaluate import predict_raw
    from ssn_edge.evaluation.job import split_arrays
    from ssn_edge.model.load import load_model

    ssn = load_model(ROOT / "runs" / "recipe" / f"{dataset}_{setting}_default_s{seed}" / "checkpoint.pt")
    knn = load_model(ROOT / "runs" / "bench" / f"knn_{dataset}_default_s0" / "checkpoint.pt")
    recipe = ssn.recipe
    d = recipe.data
    kd = knn.recipe.data
    if (kd.val_fraction, kd.val_min, kd.val_seed, kd.image_size) != (d.val_fraction, d.val_min, d.val_seed, d.image_size):
        raise SystemExit("the knn fit held out other normals than the SSN run: fit it with the same data.val_* keys")
    split = split_validation(load_dataset(d.path), d.val_fraction, d.val_min, d.val_seed)
    size = tuple(d.image_size)
    normals = load_arrays(split.held_out, size, progress=False).images
    ref = {"ssn": predict_raw(ssn.model, normals)[0], "knn": predict_raw(knn.model, normals)[0]}
    sets = {**_check_sets(recipe), "test": split_arrays(d.path, "test", size, progress=False)}
    base = {"model": "ssn", "dataset": dataset, "backbone": recipe.model.backbone, "setting": setting,
            "runtime": "torch", "precision": "fp32", "seed": seed, "command": command_line()}
    records = []
    for split_name, arrays in sets.items():
        ssn_maps, ssn_scores = predict_raw(ssn.model, arrays.images)
        ssn_z = _standardise(ssn_maps, ref["ssn"])
        # standardising is affine and resizing linear: the knn map is brought to SSN's size once, after
        knn_z = _resized(_standardise(predict_raw(knn.model, arrays.images)[0], ref["knn"]), ssn_z)
        for name in FUSIONS:
            m = _metrics(arrays, _fused(name, ssn_z, knn_z), ssn_scores if name == "knn_fusion_sum_head" else None)
            records.append({**base, "variant": name, "lever": FUSIONS[name], "split": split_name,
                            "images": len(arrays), **m})
            print(dataset, seed, split_name, name, {x: m.get(x) for x in ("image_auroc", "pixel_aupro", "pixel_ap")},
                  flush=True)
    return records


@torch.no_grad()
def _bank_terms(model, images: np.ndarray, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A memory_bank model's two standardised map terms (N, 1, h, w) and its head's score logits before any anchor."""
    heads, bank = model.heads, model.heads.memory_bank
    ssn, dist, head = [], [], []
    for start in range(0, len(images), batch):
        features = model.features(torch.from_numpy(images[start : start + batch]))
        adapted = heads.adaptor(features)
        cls_features = features if heads.cls_input == "backbone" else adapted
        map_logits = heads.segmentation(adapted)
        head.append(heads.classification(cls_features, map_logits).float())
        ssn_z, bank_z = bank.terms(features, map_logits)
        ssn.append(ssn_z)
        dist.append(bank_z)
    return torch.cat(ssn), torch.cat(dist), torch.cat(head)


SCORES = {"": "the model's (the head's logit, plus the map's blurred maximum where the run anchored)",
          "_map": "the map's blurred maximum alone"}


def run_weights(dataset: str, setting: str, seed: int, weights: list[float]) -> list[dict]:
    from ssn_edge.evaluation.job import split_arrays
    from ssn_edge.model.load import load_model
    from ssn_edge.model.ssn import anchor_max

    loaded = load_model(ROOT / "runs" / "recipe" / f"{dataset}_{setting}_memory_bank_s{seed}" / "checkpoint.pt")
    model, recipe = loaded.model.eval(), loaded.recipe
    heads = model.heads
    cached = f"{dataset}_{setting}_memory_bank_s{seed}"
    sets = {**_check_sets(recipe), "test": split_arrays(recipe.data.path, "test", tuple(recipe.data.image_size),
                                                        progress=False)}
    base = {"model": "ssn", "dataset": dataset, "backbone": recipe.model.backbone, "setting": setting,
            "runtime": "torch", "precision": "fp32", "seed": seed, "command": command_line()}
    records = []
    for split_name, arrays in sets.items():
        cache = ROOT / "runs" / "fusion" / f"{cached}_{split_name}.pt"
        if not cache.is_file():  # the terms take minutes on Magnetic tile; the weights are free once they are kept
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(_bank_terms(model, arrays.images), cache)
        ssn_z, bank_z, head = torch.load(cache)
        for w in weights:
            fused = w * ssn_z + bank_z
            blurred_max = anchor_max(fused, heads.anchor_blur)
            scores = {"": head + blurred_max} if heads.score_anchor == "map_max" else {"": head, "_map": blurred_max}
            for suffix, score in scores.items():
                m = _metrics(arrays, fused[:, 0].numpy(), score.numpy())
                records.append({**base, "variant": f"bank_weight_{w:g}{suffix}", "split": split_name,
                                "images": len(arrays), "lever": f"memory_bank map = {w:g} x SSN's standardised map + "
                                f"the bank's distances; score = {SCORES[suffix]}", **m})
                print(dataset, setting, seed, split_name, w, suffix, {x: m.get(x) for x in (
                    "image_auroc", "pixel_aupro", "pixel_ap")}, flush=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATA), required=True)
    parser.add_argument("--setting", choices=("unsupervised", "supervised"), default="unsupervised")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--bank-weights", type=float, nargs="+",
                        help="weigh SSN's term in the memory_bank runs' map instead of fusing with the knn default")
    args = parser.parse_args()
    for seed in args.seeds:
        if args.bank_weights:
            record_results("recipe", run_weights(args.dataset, args.setting, seed, args.bank_weights))
        else:
            record_results("recipe", run(args.dataset, args.setting, seed))


if __name__ == "__main__":
    main()

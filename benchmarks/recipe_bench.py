"""Choosing SSN's default CPU recipe without a test split (issue 28): levers compared on held-out training data.

  python benchmarks/recipe_bench.py screen --dataset magnetic_tile --variant sigma_0.25 --seed 0
  python benchmarks/recipe_bench.py screen --dataset magnetic_tile --setting supervised --variant memory_bank \
      --seed 0 --adopt-from default
  python benchmarks/recipe_bench.py screen --dataset magnetic_tile --variant bank_ssn_0 --seed 0 \
      --adopt-from memory_bank
  python benchmarks/recipe_bench.py int8 --dataset magnetic_tile --variant bank_ssn_0 --seed 0
  python benchmarks/recipe_bench.py bank_latency --dataset magnetic_tile --setting supervised --seed 0
  python benchmarks/recipe_bench.py heads_latency --dataset magnetic_tile --variant bank_ssn_0_steps_50_whole_12_top_0.04 \
      --seed 0
  python benchmarks/recipe_bench.py table

Every variant trains from recipes/ssn_cpu_unsupervised.yaml (or ssn_cpu_supervised.yaml) with only the data path
set per data set, plus the variant's overrides. The run holds out a tenth of the normal training images
(data.val_fraction); each finished run is scored on
  - split `heldout_synthetic`: those held-out normals and the same images with a faint painted defect
    (ssn_edge.data.heldout.check_set): what any user has, and what the choice is made on;
  - split `heldout_real` (data sets with defective training images, e.g. Magnetic tile): the held-out normals and
    the training split's defective images, which unsupervised training never sees (its end-of-training score choice
    scores the normals, the painted copies and these images together: ssn_edge.train.job.collapse_check_set);
  - split `test`: the test split, recorded for the final table only, never used to choose.
Records go to benchmarks/results/recipe.json; checkpoints to runs/recipe/<dataset>_<setting>_<variant>_s<seed>/.
--adopt-from takes over a finished run whose training was the same (it differs only in what is decided after the
epochs): a memory bank is fitted onto its heads, or a source's fitted bank is reweighed (bank_ssn_<w>).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import command_line, mean_sd, peak_rss_mb, record_results  # noqa: E402
from benchmarks.runs import bench_recipe, bundle_rows, train_once  # noqa: E402

DATA = {"mvtec_bottle": "../shared/data/mvtec_ad_512/bottle", "magnetic_tile": "../shared/data/magnetic_tile/manifest.csv"}
BASE = {"unsupervised": "recipes/ssn_cpu_unsupervised.yaml", "supervised": "recipes/ssn_cpu_supervised.yaml"}
METRICS = ("image_auroc", "image_ap", "pixel_aupro", "pixel_ap", "image_auroc_map_max")

# Levers, as overrides of the base recipe (the base itself is "default", without its memory bank: BANK_OFF).
VARIANTS: dict[str, dict] = {
    "default": {},
    "sigma_1.0": {"noise.sigma": 1.0},
    "sigma_2.0": {"noise.sigma": 2.0},
    "sigma_0.5": {"noise.sigma": 0.5},
    "sigma_0.25": {"noise.sigma": 0.25},
    "sigma_0.1": {"noise.sigma": 0.1},
    "anchor": {"model.score_anchor": "map_max"},
    "anchor_none": {"model.score_anchor": "none"},
    "raw_anchor": {"model.anchor_blur": 0.0},
    "perlin_0.6": {"noise.perlin_threshold": 0.6},
    "memory_bank": {"model.memory_bank": True, "model.memory_bank_ssn_weight": 1.0},
    "bank_ssn_0": {"model.memory_bank": True, "model.memory_bank_ssn_weight": 0.0},
    # the supervised recipe (bank, SSN's map weighing 1) on the unsupervised recipe's budget: 300 steps took 1335 s
    # on a quiet machine at the time (train_bench.py timing), over the 15-minute budget; 150 lost on the held-out
    # painted copies
    "memory_bank_steps_150": {"model.memory_bank": True, "model.memory_bank_ssn_weight": 1.0, "train.steps": 150},
    # the supervised recipe with crops in every epoch: its last, whole-map epoch took 529 of the 1021 s of steps
    "memory_bank_all_crops": {"model.memory_bank": True, "model.memory_bank_ssn_weight": 1.0, "train.crop_epochs": None},
    # the unsupervised recipe on a third of its steps: where the end-of-training choice falls on the map's maximum,
    # the heads' steps change nothing the model outputs (SSN's map weighs 0), so they are only the head's chance
    "bank_ssn_0_steps_50": {"model.memory_bank": True, "model.memory_bank_ssn_weight": 0.0, "train.steps": 50},
    # ... and at most 12 steps in its whole-map epoch (a whole-map step costs about 4 crop steps): Magnetic tile's
    # 37-batch whole-map epoch was 625 of its 778 s of steps at 50 steps on an AVX2 CPU; bottle's has 12 batches,
    # so there the cap changes nothing and the bank_ssn_0_steps_50 runs are this variant's
    "bank_ssn_0_steps_50_whole_12": {"model.memory_bank": True, "model.memory_bank_ssn_weight": 0.0, "train.steps": 50,
                                     "train.whole_map_steps": 12},
    # the unsupervised recipe whose score auto may also take the mean of the blurred map's top 4 % of cells
    # (model.anchor_top): on Magnetic tile's held-out real defects that fraction ranked best among 1-16 % (fusion_bench
    # --score-tops), on bottle's painted copies every fraction ranked below the maximum, so auto chooses per data set
    "bank_ssn_0_steps_50_whole_12_top_0.04": {"model.memory_bank": True, "model.memory_bank_ssn_weight": 0.0,
                                              "train.steps": 50, "train.whole_map_steps": 12, "model.anchor_top": 0.04},
    # the supervised recipe cheaper per step, for a 2-core AVX2-only CPU (no native bf16; there its whole job took
    # 2630 s on Magnetic tile, the whole-map epoch 1290 s of it): the separable classification head, a 256-wide
    # segmentation head (a whole-map step 15.4 -> 5.7 s, a crop step 3.9 -> 1.2 s there) and 24 whole-map steps
    "memory_bank_light_whole_24": {"model.memory_bank": True, "model.memory_bank_ssn_weight": 1.0,
                                   "model.cls_head": "light_separable", "model.seg_hidden": 256,
                                   "train.whole_map_steps": 24},
}
# Levers that are not recipe overrides: SSN's map fused with the memory-bank map (fusion_bench.py), no retraining.
FUSIONS = {
    "map_max_ssn": "fusion baseline: the default run alone, score = its map's max",
    "map_max_knn": "fusion baseline: the knn default alone (at SSN's map size), score = its map's max",
    "knn_fusion_sum": "SSN map + knn map, each standardised on the held-out normals; score = the sum's max",
    "knn_fusion_max": "max(SSN map, knn map), each standardised on the held-out normals; score = its max",
    "knn_fusion_sum_head": "SSN map + knn map as knn_fusion_sum; score = SSN's own (the head's or its anchor)",
}


def _overrides(args) -> dict:
    """The variant's overrides and any --set ones (which win): what the record says was changed."""
    from ssn_edge.config import parse_override

    return {**VARIANTS[args.variant], **dict(parse_override(text) for text in args.set)}


# Every lever but memory_bank was measured on the base recipes before model.memory_bank joined them: those variants
# turn it off again, so a re-run measures what their records say ("default": the base recipes without the bank).
BANK_OFF = {"model.memory_bank": False, "model.memory_bank_ssn_weight": 1.0}


# Likewise every unsupervised lever before bank_ssn_0_steps_50 was measured on the earlier budget of 150 steps with
# whole-map epochs uncapped: they keep it (the variants that change it say so).
STEPS_150 = {"train.steps": 150, "train.whole_map_steps": None}
# ... and every supervised lever before memory_bank_light_whole_24 on the full-width heads, whole-map epochs uncapped.
FULL_HEADS = {"model.cls_head": "full", "model.seg_hidden": 1024, "train.whole_map_steps": None}
# ... and every lever before bank_ssn_0_steps_50_whole_12_top_0.04 chose its score from the head's and the map's
# maximum only.
TOP_OFF = {"model.anchor_top": 0.0}


def _recipe(args):
    bank = {} if VARIANTS[args.variant].get("model.memory_bank") else BANK_OFF
    before = STEPS_150 if args.setting == "unsupervised" else FULL_HEADS
    return bench_recipe(BASE[args.setting], {"data.path": DATA[args.dataset], "train.seed": args.seed, **bank,
                                             **before, **TOP_OFF, **_overrides(args)})


def _scores(loaded, arrays) -> dict:
    from ssn_edge.evaluation.evaluate import evaluate_model

    return {k: round(float(v), 2) for k, v in evaluate_model(loaded.model, arrays).items() if k in METRICS}


def _check_sets(recipe) -> dict:
    """The held-out check sets of this run's recipe: synthetic defects, and real training defects where any."""
    from ssn_edge.data import load_arrays, load_dataset, split_validation
    from ssn_edge.data.heldout import check_set, unseen_defects

    d = recipe.data
    samples = load_dataset(d.path)
    split = split_validation(samples, d.val_fraction, d.val_min, d.val_seed)
    size = tuple(d.image_size)
    sets = {"heldout_synthetic": check_set(split.held_out, size)}
    defective = unseen_defects(samples, recipe.train.setting)
    if defective:
        sets["heldout_real"] = load_arrays(split.held_out + defective, size)
    return sets


# What the end of training decides or fits (the score, the collapse check, the memory bank) and how long it trains (a
# step budget resolves to epochs): a run that differs from another only in these trained exactly the same heads.
_DECIDED_AFTER = ("model.score_anchor", "model.anchor_blur", "model.anchor_top", "train.steps", "train.on_collapse",
                  "model.memory_bank", "model.memory_bank_ssn_weight")


def _resolved(recipe, split):
    """The recipe with train.steps resolved to this data's epochs, as ssn_edge.train.loop.resolve_epochs does
    (batches half defects when the setting trains on the training split's defective images)."""
    import dataclasses

    from ssn_edge.train.schedule import batches_per_epoch, epochs_for_steps

    t = recipe.train
    defects = t.setting != "unsupervised" and any(x.label == 1 for x in split.train)
    batches = batches_per_epoch(t, sum(1 for x in split.train if x.label == 0), with_defects=defects)
    if t.whole_map_steps is not None and t.whole_map_steps >= batches:
        t = dataclasses.replace(t, whole_map_steps=None)  # a cap no epoch reaches trains the same heads as none
    return dataclasses.replace(recipe, train=epochs_for_steps(t, batches))


def _without(values: dict, keys: tuple[str, ...]) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for dotted in keys:
        section, key = dotted.split(".")
        out[section].pop(key, None)
    return out


def adopt(src: Path, out: Path, recipe) -> None:
    """Take over a run whose training was this recipe's (same seed and resolved epochs; it differs at
    most in _DECIDED_AFTER) and do what train() does after the epochs (fit model.memory_bank, score_anchor auto,
    the collapse check), instead of training the same heads again."""
    import dataclasses

    from ssn_edge.data import load_dataset, split_validation
    from ssn_edge.evaluation.evaluate import evaluate_model
    from ssn_edge.evaluation.job import split_arrays
    from ssn_edge.model.checkpoint import load_checkpoint, save_checkpoint
    from ssn_edge.model.load import load_model
    from ssn_edge.train.collapse import decide
    from ssn_edge.train.job import collapse_check_set
    from ssn_edge.train.loop import choose_score

    d = recipe.data
    samples = load_dataset(d.path)
    split = split_validation(samples, d.val_fraction, d.val_min, d.val_seed)
    ours = _resolved(recipe, split)
    loaded = load_model(src / "checkpoint.pt")
    if _without(loaded.recipe.to_dict(), _DECIDED_AFTER) != _without(ours.to_dict(), _DECIDED_AFTER):
        raise SystemExit(f"--adopt-from {src}: its training differs from this variant's")
    heads = loaded.model.heads
    if loaded.recipe.model.score_anchor == "map_max" and ours.model.score_anchor == "auto":
        # The source's auto already replaced the head's score by the map's maximum (its fc zeroed): the head's own
        # score is gone, so auto chooses between a constant and this variant's map maximum.
        heads.score_anchor = "none"
    heads.anchor_blur, heads.anchor_top = ours.model.anchor_blur, ours.model.anchor_top
    checks = collapse_check_set(split, tuple(d.image_size), ours.train.setting)
    t0 = time.perf_counter()
    bank = heads.memory_bank
    if ours.model.memory_bank and bank is not None and loaded.recipe.knn == ours.knn:
        bank.ssn_weight = ours.model.memory_bank_ssn_weight  # the same fit (deterministic from the seed), reweighed
    elif ours.model.memory_bank:  # fitted after training, as train() fits it
        from ssn_edge.data import load_arrays
        from ssn_edge.train.memory_bank import fit_memory_bank, held_out_normals

        fit_memory_bank(loaded.model, ours, load_arrays(split.train, tuple(d.image_size), progress=False),
                        held_out_normals(checks), progress=False)
    fit_s = time.perf_counter() - t0
    chosen, check = choose_score(loaded.model, ours, checks)
    check = decide(check, chosen.train.on_collapse, True, out / "checkpoint.pt")
    record = dataclasses.replace(load_checkpoint(src / "checkpoint.pt"), recipe=chosen.to_dict(),
                                 heads=loaded.model.heads.state_dict(), collapse=check)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "checkpoint.pt", record)
    (out / "recipe.json").write_text(json.dumps(chosen.to_dict(), indent=2))
    metrics = evaluate_model(loaded.model, split_arrays(d.path, "test", tuple(d.image_size), progress=False))
    source = json.loads((src / "trained.json").read_text())
    (out / "trained.json").write_text(json.dumps({"train_s": round(source["train_s"] + fit_s, 1),
                                                  "reused_from": str(src.relative_to(ROOT)),
                                                  "history": source["history"], "metrics": metrics}, indent=2))


def screen(args) -> None:
    from ssn_edge.model.load import load_model

    recipe = _recipe(args)
    out = ROOT / "runs" / "recipe" / f"{args.dataset}_{recipe.train.setting}_{args.variant}_s{args.seed}"
    t0 = time.perf_counter()
    if args.adopt_from and not (out / "trained.json").exists():
        adopt(ROOT / "runs" / "recipe" / f"{args.dataset}_{recipe.train.setting}_{args.adopt_from}_s{args.seed}", out,
              recipe)
    trained = train_once(recipe, out, None, args.quiet, evaluate=True)
    loaded = load_model(out / "checkpoint.pt")
    base = {"model": "ssn", "dataset": args.dataset, "backbone": recipe.model.backbone, "setting": recipe.train.setting,
            "variant": args.variant, "runtime": "torch", "precision": "fp32", "seed": args.seed,
            "epochs": loaded.recipe.train.epochs, "steps": recipe.train.steps,
            "train_s": trained["train_s"], "overrides": _overrides(args), "command": command_line(),
            **({"reused_from": trained["reused_from"]} if "reused_from" in trained else {})}
    records = []
    for split, arrays in _check_sets(recipe).items():
        records.append({**base, "split": split, "images": len(arrays), **_scores(loaded, arrays)})
    test = {k: round(float(v), 2) for k, v in trained["metrics"].items() if k in METRICS}
    records.append({**base, "split": "test", **test, "peak_rss_mb": round(peak_rss_mb(), 1)})
    record_results("recipe", records)
    for r in records:
        print(r["split"], {k: r.get(k) for k in METRICS}, f"train {r['train_s']} s")
    print(f"done in {time.perf_counter() - t0:.0f} s")


# INT8 variants, as QuantizeOptions overrides of the export defaults ("default": none). full_bias is the default
# since NNCF's full bias correction became it; it is named so its records sit beside the earlier default's (fast).
QUANT = {"default": {}, "float_map": {"float_map": True}, "nncf_default": {"activation_range": "nncf_default"},
         "full_bias": {"bias_correction": "full"}, "fast_bias": {"bias_correction": "fast"},
         "full_bias_float_map": {"bias_correction": "full", "float_map": True}}


def _int8_variant(args) -> str:
    """The INT8 variant's name in records: the --quant variant, prefixed acc_ for accuracy-controlled INT8."""
    if not args.acc:
        return args.quant
    return "acc" if args.quant == "default" else f"acc_{args.quant}"


def int8(args) -> None:
    """Export a finished screen run with the export defaults (or the --quant variant; thresholds from the held-out
    normals) and score its FP32 (f32 hint) and INT8 models on the test split through the runtime: the drop and the
    decision flips. The export's own INT8 check (held-out normals and their painted copies, what the choice is made
    on) goes into the INT8 record as check_*."""
    from ssn_edge.evaluation.job import split_arrays
    from ssn_edge.export.exporter import ExportOptions, export_bundle
    from ssn_edge.export.quantize import QuantizeOptions
    from ssn_edge.runtime.bundle import load_bundle

    recipe = _recipe(args)
    run = ROOT / "runs" / "recipe" / f"{args.dataset}_{recipe.train.setting}_{args.variant}_s{args.seed}"
    int8 = "int8_acc" if args.acc else "int8"
    out = run / (f"bundle_{int8}" if args.quant == "default" else f"bundle_{int8}_{args.quant}")
    if not (args.reuse_bundle and (out / "metadata.json").is_file()):
        export_bundle(run / "checkpoint.pt", out, ExportOptions(
            int8=not args.acc, int8_acc=args.acc, acc_metric=args.acc_metric, overwrite=True,
            quantize=QuantizeOptions(**QUANT[args.quant])))
    entry = load_bundle(out).metadata.models[int8]
    check, control = entry.check, entry.accuracy_control
    rows = bundle_rows(out, split_arrays(recipe.data.path, "test", tuple(recipe.data.image_size), progress=False),
                       METRICS)
    base = {"model": "ssn", "dataset": args.dataset, "backbone": recipe.model.backbone, "setting": recipe.train.setting,
            "variant": args.variant, "seed": args.seed, "split": "test", "overrides": _overrides(args),
            **({"int8_variant": variant} if (variant := _int8_variant(args)) != "default" else {}),
            "command": command_line()}
    held = {"check_image_auroc_diff": round(check.image_auroc_diff, 3), "check_flips": check.flips,
            "check_pixel_aupro_diff": None if check.pixel_aupro_diff is None else round(check.pixel_aupro_diff, 3),
            **({"acc_data": control.data, "acc_metric": control.metric, "acc_drop": round(control.drop, 3),
                "acc_max_drop": control.max_drop, "fake_quantize_ops": control.fake_quantize_ops} if control else {})}
    records = []
    for precision, row in rows.items():
        drops = {f"drop_{k}": round(rows["fp32"][k] - row[k], 3) for k in METRICS if k in row and k in rows["fp32"]}
        records.append({**base, **row, **({**drops, **held} if precision != "fp32" else {})})
        print({k: records[-1].get(k) for k in ("precision", *METRICS, *drops, "flips", "latency_ms")})
    record_results("recipe", records)


def _alternating(bundles: dict[str, tuple[Path, str]], rounds: int) -> dict[str, float]:
    """Median batch-1 latency (ms) of each (bundle, precision), the rounds alternating between them so a busy machine
    slows each alike."""
    import numpy as np

    from ssn_edge.runtime.bench import bench_bundle

    times: dict[str, list[float]] = {k: [] for k in bundles}
    for _ in range(rounds):
        for name, (path, precision) in bundles.items():
            times[name].append(bench_bundle(path, [precision], warmup=5, runs=20, throughput_seconds=0)[0]["latency_ms"])
    return {k: float(np.median(v)) for k, v in times.items()}


def _latency_base(args, recipe, variant: str, ms: dict[str, float]) -> dict:
    """The fields every latency-ratio record of one run shares; details: each model's median ms."""
    return {"model": "ssn", "dataset": args.dataset, "backbone": recipe.model.backbone, "setting": recipe.train.setting,
            "variant": variant, "seed": args.seed, "runtime": "openvino", "command": command_line(),
            "details": {k: round(v, 2) for k, v in ms.items()}}


def bank_latency(args) -> None:
    """Batch-1 latency of a memory_bank run's bundle (INT8 and FP32) against the same seed's run without the bank
    (variant default), in one run: what the bank's distances cost."""
    recipe = _recipe(args)
    runs = ROOT / "runs" / "recipe"
    bank = runs / f"{args.dataset}_{recipe.train.setting}_memory_bank_s{args.seed}" / "bundle_int8"
    plain = runs / f"{args.dataset}_{recipe.train.setting}_default_s{args.seed}" / "bundle_int8"
    ms = _alternating({"int8_bank": (bank, "int8"), "int8": (plain, "int8"), "fp32_bank": (bank, "fp32"),
                       "fp32": (plain, "fp32")}, args.rounds)
    base = _latency_base(args, recipe, "memory_bank", ms)
    records = [{**base, "precision": p, "ratio_of": f"memory_bank_vs_default_{p}_latency",
                "ratio": round(ms[f"{p}_bank"] / ms[p], 3)} for p in ("int8", "fp32")]
    record_results("recipe", records)
    print(records)


def latency(args) -> None:
    """INT8 batch-1 latency of a run's float_map bundle against its INT8 bundle without it (and FP32), in one run:
    the rounds alternate between the models so a busy machine slows each alike. The architecture sets the latency,
    not the data or the seed, so one run answers for all. --base: the INT8 variant both share (full_bias: the
    bundles bundle_int8_full_bias and bundle_int8_full_bias_float_map)."""
    recipe = _recipe(args)
    run = ROOT / "runs" / "recipe" / f"{args.dataset}_{recipe.train.setting}_{args.variant}_s{args.seed}"
    tag = "" if args.base == "default" else f"_{args.base}"  # the bundles' names: bundle_int8<tag>[_float_map]
    plain, floated = run / f"bundle_int8{tag}", run / f"bundle_int8{tag}_float_map"
    ms = _alternating({"int8": (plain, "int8"), "int8_float_map": (floated, "int8"), "fp32": (plain, "fp32")},
                      args.rounds)
    variant = f"{tag[1:]}_float_map" if tag else "float_map"
    base = {**_latency_base(args, recipe, args.variant, ms), "precision": "int8", "int8_variant": variant}
    records = [{**base, "ratio_of": "float_map_vs_default_int8_latency", "ratio": round(ms["int8_float_map"] / ms["int8"], 3)},
               {**base, "ratio_of": "float_map_int8_vs_fp32_latency", "ratio": round(ms["int8_float_map"] / ms["fp32"], 3)}]
    record_results("recipe", records)
    print(records)


def heads_latency(args) -> None:
    """Batch-1 latency of a run's INT8 bundle (from `int8`) against the same checkpoint exported with SSN's adaptor
    and heads in the graph although its outputs are the memory bank's alone (SSNHeads.bank_alone forced off: the
    graph every export made before it skipped them), INT8 and FP32, in one run. The outputs are the same."""
    from ssn_edge.export.exporter import ExportOptions, export_bundle
    from ssn_edge.model.ssn import SSNHeads

    recipe = _recipe(args)
    run = ROOT / "runs" / "recipe" / f"{args.dataset}_{recipe.train.setting}_{args.variant}_s{args.seed}"
    skipped, kept = run / "bundle_int8", run / "bundle_int8_all_heads"
    if not (args.reuse_bundle and (kept / "metadata.json").is_file()):
        bank_alone = SSNHeads.bank_alone
        SSNHeads.bank_alone = lambda self: False  # type: ignore[method-assign]
        try:
            export_bundle(run / "checkpoint.pt", kept, ExportOptions(int8=True, overwrite=True))
        finally:
            SSNHeads.bank_alone = bank_alone  # type: ignore[method-assign]
    ms = _alternating({f"{p}{tag}": (path, p) for p in ("int8", "fp32")
                       for tag, path in (("", skipped), ("_all_heads", kept))}, args.rounds)
    base = _latency_base(args, recipe, args.variant, ms)
    records = [{**base, "precision": p, "ratio_of": f"bank_alone_vs_all_heads_{p}_latency",
                "ratio": round(ms[p] / ms[f"{p}_all_heads"], 3)} for p in ("int8", "fp32")]
    record_results("recipe", records)
    print(records)


def _rows(records: list[dict], splits: tuple[str, ...]) -> list[str]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("split") in splits and r.get("runtime") == "torch":
            groups.setdefault((r["setting"], r["dataset"], r["split"], r["variant"]), []).append(r)
    lines = []
    for (setting, dataset, split, variant), rs in sorted(groups.items()):
        cells = [mean_sd([r.get(k) for r in rs]) for k in ("image_auroc", "pixel_aupro", "pixel_ap", "image_auroc_map_max")]
        lever = (FUSIONS.get(variant) or rs[0].get("lever")
                 or ", ".join(f"{k}={v}" for k, v in rs[0].get("overrides", {}).items())
                 or "the base recipe without its memory bank")
        lines.append(f"| {setting} | {dataset} | {split} | {variant} | {lever} | {len(rs)} | " + " | ".join(cells)
                     + f" | {mean_sd([r.get('train_s') for r in rs])} |")
    return lines


def _reference_rows() -> list[str]:
    """The memory-bank reference (knn_bench.py, its defaults) on the same test splits, beside SSN's rows: the mean ±
    sd over its fit seeds."""
    knn = [r for r in json.loads((ROOT / "benchmarks/results/knn.json").read_text())
           if r.get("variant") == "default" and r.get("runtime") == "torch" and not r.get("split")]
    parts = []
    for dataset in sorted({r["dataset"] for r in knn}):
        rs = [r for r in knn if r["dataset"] == dataset]
        seeds = f"{len(rs)} seed" + ("s" if len(rs) > 1 else "")
        parts.append(f"{dataset} ({seeds}) image AUROC {mean_sd([r['image_auroc'] for r in rs])}, AUPRO "
                     f"{mean_sd([r['pixel_aupro'] for r in rs])}, pixel AP {mean_sd([r['pixel_ap'] for r in rs])}, fit "
                     f"{mean_sd([r['train_s'] for r in rs])} s")
    return ["Memory-bank reference on the same test split (`knn_bench.py accuracy`, results/knn.json, FP32): "
            + "; ".join(parts)]


def _int8_rows(records: list[dict]) -> list[str]:
    def key(r: dict) -> tuple:
        return r["setting"], r["dataset"], r["variant"], r.get("int8_variant") or "default", r["seed"]

    fp32 = {key(r): r for r in records if r.get("runtime") == "openvino" and r.get("precision") == "fp32"
            and not r.get("ratio_of")}  # a latency ratio's record names a precision too, not a measurement of it
    lines = []
    for r in sorted((r for r in records if r.get("runtime") == "openvino" and r.get("precision") in ("int8", "int8_acc")
                     and not r.get("ratio_of")), key=key):
        f = fp32.get(key(r), {})
        held = (f"{r['check_image_auroc_diff']} / {r['check_pixel_aupro_diff']} / {r['check_flips']}"
                if "check_flips" in r else "-")
        lines.append(f"| {' | '.join(str(k) for k in key(r))} | {f.get('image_auroc')} / {f.get('pixel_aupro')} | "
                     f"{r['image_auroc']} / {r['pixel_aupro']} | {r['drop_image_auroc']} / {r['drop_pixel_aupro']} | "
                     f"{r['flips']} | {held} | {r['latency_ms']} | {f.get('latency_ms')} |")
    return lines


def _ratio_lines(records: list[dict]) -> list[str]:
    return [f"- {r['ratio_of']} ({r['dataset']} seed {r['seed']}, `{r['command']}`): {r['ratio']} (median ms: "
            + ", ".join(f"{k} {v}" for k, v in r["details"].items()) + ")" for r in records if r.get("ratio_of")]


def table(args) -> None:  # noqa: ARG001
    """benchmarks/results/recipe.md: every lever tried, on the held-out check sets (what was chosen on) and on the
    test split (recorded, never chosen on)."""
    records = json.loads((ROOT / "benchmarks/results/recipe.json").read_text())
    head = ("| setting | data set | split | variant | lever (overrides of the base recipe) | seeds | image AUROC | AUPRO "
            "| pixel AP | map-max AUROC | train s |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    text = ["# SSN CPU recipe levers (written by `python benchmarks/recipe_bench.py table`)", "",
            "FP32, PyTorch, mean ± sd over seeds. Base recipes: recipes/ssn_cpu_unsupervised.yaml and "
            "ssn_cpu_supervised.yaml, data path set per data set; every variant but `memory_bank` (the bank, SSN's map "
            "weighing 1: the supervised recipe on its earlier full heads; `memory_bank_light_whole_24`: the shipped "
            "one) and `bank_ssn_<w>*` (SSN's map weighing w; `bank_ssn_0`: the "
            "unsupervised recipe at its earlier 150 steps; `bank_ssn_0_steps_50_whole_12`: at 50, whose cap does not "
            "bind on bottle, so there `bank_ssn_0_steps_50` is it; `bank_ssn_0_steps_50_whole_12_top_0.04`: the "
            "shipped one, its score also chosen from the map's top 4 %) without their memory bank (`default`: the "
            "base recipes so; every unsupervised variant at 150 steps, every supervised one on the full heads, every "
            "one choosing its score from the head's and the map's maximum only, unless it says otherwise); "
            "`bank_weight_<w>`: "
            "the memory_bank runs' maps reweighed offline (fusion_bench.py). `heldout_synthetic`: the normal training images "
            "held out of training and their painted copies; `heldout_real`: the held-out normals and the training "
            "split's defective images (Magnetic tile; unsupervised training never sees them). Choices were made on "
            "these two; `test` is reported, never chosen on. train s: wall time on this 2-core machine, with other "
            "jobs running beside it (an upper bound).", "", "## Chosen on: held-out training data", "", head,
            *_rows(records, ("heldout_synthetic", "heldout_real")), "", "## Reported: test split", "", head,
            *_rows(records, ("test",)), "", *_reference_rows(), "", "## INT8 against FP32: test split, OpenVINO (f32 hint for FP32)",
            "", "INT8 variant `default`: the export defaults; `float_map`: the segmentation head kept in float "
            "(`ssn-edge export --int8 --float-map`); `acc`, `acc_float_map`: accuracy-controlled INT8 "
            "(`--int8-acc`, image AUROC held within 0.5 points on the export's check set, below); `nncf_default`: NNCF's "
            "own activation-range estimators; `float_features`: the backbone's last layer2 and layer3 blocks kept in "
            "float (`--quant float_features` at commit 28fd0fd, removed: no change); `full_bias`: NNCF's full bias "
            "correction (`--bias-correction full`), now the export default; `full_bias_float_map`: both, now the "
            "export default for a model whose map sums SSN's head with a memory bank (supervised `memory_bank`). The "
            "rows `default`, `float_map`, `nncf_default` and `acc*` were exported with NNCF's fast correction and "
            "no automatic float map, the defaults before; "
            "`float_adaptor_map`, `full_bias_float_adaptor`, `full_bias_float_adaptor_map`: SSN's adaptor kept in "
            "float too (at commit a9b9c91, removed: beside full bias correction it added nothing, alone or with the "
            "head in float). "
            "held-out check: what the export's INT8 check saw on the held-out "
            "normals and their painted copies (INT8 minus FP32, image AUROC / AUPRO, and flips), the only signal a "
            "user has; the `acc_float_map` rows' check set also holds Magnetic tile's defective training images, "
            "which unsupervised training never saw (the other rows were exported before the check took them); drop: FP32 minus INT8 on the test split. Latencies: batch 1, loaded machine, compare within a row.",
            "", "| setting | data set | variant | INT8 variant | seed | FP32 image AUROC / AUPRO | INT8 image AUROC / AUPRO "
            "| drop (points) | decision flips | held-out check | INT8 ms | FP32 ms |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *_int8_rows(records), "", *_ratio_lines(records), ""]
    out = ROOT / "benchmarks/results/recipe.md"
    out.write_text("\n".join(text))
    print(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("screen", help="train one variant and score it on the held-out check sets and the test split")
    p.add_argument("--dataset", choices=sorted(DATA), required=True)
    p.add_argument("--setting", choices=sorted(BASE), default="unsupervised")
    p.add_argument("--variant", choices=sorted(VARIANTS), default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="extra recipe override KEY=VALUE")
    p.add_argument("--adopt-from", metavar="VARIANT", help="take over this variant's finished run of the same seed "
                   "when its training was the same (it differs only in what is decided after training)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=screen)
    q = sub.add_parser("int8", help="export a finished screen run (defaults) and score FP32 / INT8 on the test split")
    for a in ("--dataset", "--setting", "--variant", "--seed", "--set"):
        q._add_action(next(x for x in p._actions if a in x.option_strings))
    q.add_argument("--quant", choices=sorted(QUANT), default="default", help="INT8 variant (export option overrides)")
    q.add_argument("--acc", action="store_true", help="accuracy-controlled INT8 (export --int8-acc: held on the "
                   "export's check set) instead of plain INT8")
    q.add_argument("--acc-metric", default="image_auroc", help="--acc: the metric accuracy control holds")
    q.add_argument("--reuse-bundle", action="store_true", help="score the bundle an earlier run exported")
    q.set_defaults(func=int8)
    la = sub.add_parser("latency", help="INT8 latency with the segmentation head in float against the defaults, one run")
    for a in ("--dataset", "--setting", "--variant", "--seed", "--set"):
        la._add_action(next(x for x in p._actions if a in x.option_strings))
    la.add_argument("--rounds", type=int, default=5)
    la.add_argument("--base", choices=["default", "full_bias"], default="default",
                    help="the INT8 variant the float_map bundle is compared within")
    la.set_defaults(func=latency)
    bl = sub.add_parser("bank_latency", help="latency of a memory_bank run's bundle against the run without the bank")
    for a in ("--dataset", "--setting", "--seed"):
        bl._add_action(next(x for x in p._actions if a in x.option_strings))
    bl.add_argument("--rounds", type=int, default=5)
    bl.set_defaults(func=bank_latency, variant="memory_bank", set=[])
    hl = sub.add_parser("heads_latency", help="latency of a bank-alone run's bundle against its graph with SSN's heads")
    for a in ("--dataset", "--setting", "--variant", "--seed", "--set"):
        hl._add_action(next(x for x in p._actions if a in x.option_strings))
    hl.add_argument("--rounds", type=int, default=5)
    hl.add_argument("--reuse-bundle", action="store_true", help="time the all-heads bundle an earlier run exported")
    hl.set_defaults(func=heads_latency)
    t = sub.add_parser("table", help="write benchmarks/results/recipe.md from the records")
    t.set_defaults(func=table)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO, format="%(message)s")
    args.func(args)


if __name__ == "__main__":
    main()

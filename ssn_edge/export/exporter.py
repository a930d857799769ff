"""Export a trained checkpoint, plain or tiled, to a deployment bundle: OpenVINO IR in FP32 (always), FP16, INT8
and accuracy-controlled INT8, with the thresholds, value ranges and pre/post-processing the runtime needs.

One path for every graph (``ssn_edge.export.graph``): load the model, convert it, save each precision,
quantize, check INT8 against FP32 on the held-out normals and painted copies (``ssn_edge.export.int8_check``), set
thresholds and metrics on the FP32 model's predictions through the runtime's own path, write the typed metadata
(``ssn_edge.runtime.schema``). Input height and width are fixed (those the model was trained
at: SSN's feature resize is tied to them); a plain graph is batch 1 (dynamic on request) and ends in its
post-processing and decisions (appended after quantization, so they stay float), a single-tile graph has a
dynamic batch and raw outputs. Thresholds come from held-out normal images by default (export/thresholds.py).

Everything is built in a temporary directory and handed to :func:`ssn_edge.runtime.bundle.write_bundle`,
which renames it into place: an export that fails leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ssn_edge import __version__
from ssn_edge.data import (ArraySet, DatasetError, Sample, concat_arrays, load_arrays, load_dataset, select,
                           split_validation)
from ssn_edge.export.accuracy import ACC_METRICS, accuracy_record, quantize_int8_acc
from ssn_edge.export.calibration import CALIBRATION_FILE, CalibrationSpec, calibration_record, select_calibration
from ssn_edge.export.graph import (FINAL_NAMES, MAP_STRIDE, GraphPlan, add_decisions, add_postprocess, convert,
                                   plan_graph, set_rt_info)
from ssn_edge.export.inference import Predictions, compile_f32, infer, predict_arrays
from ssn_edge.export.int8_check import compare, joined
from ssn_edge.export.quantize import (Calibration, QuantizeOptions, check_float_map, prepare_calibration,
                                      quantize_int8)
from ssn_edge.export.thresholds import (
    SPLIT_OF,
    ThresholdChoice,
    evaluation_split,
    labelled_split,
    metrics_from_predictions,
    pixel_truth,
    set_thresholds,
    value_ranges,
)
from ssn_edge.runtime.atomic import os_error_message, signals_raise, sweep_stale
from ssn_edge.runtime.bundle import Bundle, BundleError, sha256_file, sweep_partials, write_bundle
from ssn_edge.runtime.postprocess import BLUR_KERNEL, BLUR_SIGMA, sigmoid
from ssn_edge.runtime.schema import (
    Backbone,
    BundleMetadata,
    CalibrationInfo,
    CalibrationSpecRecord,
    InputSpec,
    MapOutput,
    ModelCalibration,
    ModelEntry,
    Outputs,
    PostProcess,
    Provenance,
    Quantization,
    ScoreOutput,
    SourceCheckpoint,
    Supervision,
    Thresholds,
    Tiling,
)
from ssn_edge.runtime.tiling import GRAPHS

if TYPE_CHECKING:  # pragma: no cover
    from ssn_edge.model.load import LoadedModel

log = logging.getLogger("ssn_edge")

WEIGHTS_PRECISION = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "int8_acc": "int8"}
TEMP_PREFIX = "ssn-edge-export-"  # + <pid>-: the temporary folder an export stages its models in
MODEL_FAMILY = {"ssn": "ssn", "tiled": "ssn"}  # LoadedModel.kind -> the bundle's model_kind (tiling says "tiled")


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how; checked here, once, before any work.

    calibration: the INT8 calibration set (None: 128 normal training images of the recipe's data).
    max_drop: accuracy control's limit, absolute percentage points of acc_metric. threshold_data: dataset for
    metrics, accuracy control and held-out normals (None: the recipe's data.path; metrics on its 'val' split,
    else 'test'). thresholds: where the thresholds come from (ssn_edge.export.thresholds; default: a 1 %
    false-alarm rate on the normal training images training held out). map_gate: model.map_gate of the exported
    graph (None: as trained). graph: a tiled checkpoint's graph ("tile", "image", "tiles"; None: as recorded).
    dynamic_batch: plain graphs with a dynamic batch (default: batch 1, fully static)."""

    fp16: bool = False
    int8: bool = False
    int8_acc: bool = False
    calibration: CalibrationSpec | None = None
    quantize: QuantizeOptions = QuantizeOptions()
    max_drop: float = 0.5
    acc_metric: str = "image_auroc"
    threshold_data: str | None = None
    weights: str | None = None
    map_gate: str | None = None
    graph: str | None = None
    overwrite: bool = False
    thresholds: ThresholdChoice = ThresholdChoice()
    dynamic_batch: bool = False

    def __post_init__(self) -> None:
        if self.acc_metric not in ACC_METRICS:
            raise ValueError(f"accuracy metric {self.acc_metric!r} is not one of {', '.join(ACC_METRICS)}")
        if not (0.0 <= self.max_drop <= 100.0):
            raise ValueError(f"max_drop is an absolute drop in percentage points, 0..100; got {self.max_drop}")
        if self.calibration is not None and not self.quantizing:
            raise ValueError("a calibration set only applies to an INT8 export (--int8 or --int8-acc)")
        if self.quantize.float_map and not self.quantizing:
            raise ValueError("--float-map only applies to an INT8 export (--int8 or --int8-acc)")
        if self.graph is not None and self.graph not in GRAPHS:
            raise ValueError(f"graph {self.graph!r} is not one of {', '.join(GRAPHS)}")

    @property
    def quantizing(self) -> bool:
        return self.int8 or self.int8_acc

    @property
    def calibration_spec(self) -> CalibrationSpec:
        return self.calibration if self.calibration is not None else CalibrationSpec()


@dataclass
class ThresholdData:
    """The images an export scores with the FP32 model: ``arrays``, the evaluation split (metrics, accuracy
    control; None when the data has no split with both labels), ``held_out``, normal images never trained on
    (false-alarm thresholds and rates; None when there are none), and, for an F1-max source on another split
    than the evaluation one, ``labelled``."""

    split: str | None
    path: str
    arrays: ArraySet | None
    held_out: ArraySet | None = None
    held_out_from: str | None = None
    labelled: tuple[str, ArraySet] | None = None
    held_out_samples: list[Sample] = field(default_factory=list)  # held_out's samples: the INT8 check paints them
    # defective training images an unsupervised model never saw: real defects for the check set
    unseen_defects: list[Sample] = field(default_factory=list)
    added: ArraySet | None = None  # the painted copies and the unseen defects, once read (check_arrays)

    def check_arrays(self) -> tuple[ArraySet, ArraySet]:
        """(the check set, the part of it beyond the held-out normals): the held-out normals, INT8_CHECK_COPIES
        painted copies of each and the unseen defective training images (data.heldout.check_set), read once; the
        normals are those already read."""
        from ssn_edge.data.heldout import CheckSetSpec, painted_copies

        if self.added is None:
            size = tuple(self.held_out.images.shape[-2:])
            painted = painted_copies(self.held_out_samples, size, CheckSetSpec(copies=INT8_CHECK_COPIES))
            self.added = concat_arrays(painted, *([load_arrays(self.unseen_defects, size)] if self.unseen_defects else []))
        return concat_arrays(self.held_out, self.added), self.added

    def check_words(self) -> str:
        """The check set, in words."""
        painted = len(self.held_out) * INT8_CHECK_COPIES
        real = f" and {len(self.unseen_defects)} defective training images the model never saw" if self.unseen_defects else ""
        return f"the {len(self.held_out)} held-out normal images{',' if real else ' and'} {painted} painted copies{real}"

    def acc_data(self) -> tuple[str, ArraySet]:
        """What accuracy control holds the metric on: the 'val' split, else the check set, never a test split."""
        if self.split == "val":
            return "val", self.arrays
        return ACC_CHECK_SPLIT, self.check_arrays()[0]


@dataclass
class Stage:
    """The bundle being built in a temporary directory: its files, its models (raw graphs: what quantization
    works on) and their FP32-hint predictions on the evaluation arrays and the held-out normals."""

    dir: Path
    plan: GraphPlan
    arrays: ArraySet | None
    held_out: ArraySet | None = None
    files: dict[str, Path] = field(default_factory=dict)
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)  # ModelEntry fields but the metrics
    predictions: dict[str, Predictions] = field(default_factory=dict)
    held_out_predictions: dict[str, Predictions] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)  # precision -> the raw ov.Model (before post-processing)
    compressed: dict[str, bool] = field(default_factory=dict)
    thresholds: Thresholds | None = None  # set on the FP32 predictions, before quantization

    def xml(self, precision: str) -> Path:
        return self.dir / f"model_{precision}.xml"

    def final(self, raw_model, thresholds: Thresholds | None = None, rt_info: dict | None = None):
        """The shipped graph of a raw one: post-processing appended (plain graphs), then, once the thresholds
        are set, the decisions and the rt_info."""
        model = raw_model.clone()
        if self.plan.postprocess_in_graph:
            add_postprocess(model, self.plan.input_size, BLUR_SIGMA, BLUR_KERNEL)
            if thresholds is not None:
                add_decisions(model, thresholds.image, thresholds.pixel)
        if rt_info is not None:
            set_rt_info(model, rt_info)
        return model

    def save(self, precision: str, ov_model, compress: bool = False, **entry: Any) -> None:
        """Save one precision's IR (ov_model: its raw graph) and predict the evaluation arrays and the held-out
        normals with it."""
        import openvino as ov

        xml = self.xml(precision)
        self.raw[precision], self.compressed[precision] = ov_model, compress
        ov.save_model(self.final(ov_model), xml, compress_to_fp16=compress)
        self.files[xml.name], self.files[xml.with_suffix(".bin").name] = xml, xml.with_suffix(".bin")
        self.entries[precision] = {"xml": xml.name, "bin": xml.with_suffix(".bin").name,
                                   "weights_precision": WEIGHTS_PRECISION[precision], **entry}
        if self.arrays is not None:
            self.predictions[precision] = predict_arrays(xml, self.plan, self.arrays)
        if self.held_out is not None:
            self.held_out_predictions[precision] = predict_arrays(xml, self.plan, self.held_out)

    def finish(self, thresholds: Thresholds, rt_info: dict) -> None:
        """Write every precision's IR again with its decisions and rt_info (the thresholds are set on the FP32
        predictions, after the graphs that made them; the map and score do not change)."""
        import openvino as ov

        for precision, raw in self.raw.items():
            ov.save_model(self.final(raw, thresholds, rt_info), self.xml(precision),
                          compress_to_fp16=self.compressed[precision])

    def read(self, precision: str):
        """A copy of one precision's raw graph (what NNCF quantizes)."""
        return self.raw[precision].clone()

    def raw_outputs(self, precision: str, arrays: ArraySet) -> tuple[np.ndarray, np.ndarray]:
        """The raw graph's (map logits, score logits) on arrays: what accuracy control scores."""
        return infer(compile_f32(self.raw[precision]), arrays.images)

    def add_json(self, name: str, record: dict[str, Any]) -> None:
        (self.dir / name).write_text(json.dumps(record, indent=2))
        self.files[name] = self.dir / name


# --------------------------------------------------------------------------------------------------------------
# Checks and inputs
# --------------------------------------------------------------------------------------------------------------


def _refuse_existing(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite:
        raise BundleError(f"{out_dir}: already exists (choose another --out or pass --overwrite)")


def _load(checkpoint: Path, options: ExportOptions) -> LoadedModel:
    """The model, with the options' weights, map gate and graph; what this export cannot do is refused here."""
    from ssn_edge.model.load import load_model

    try:
        loaded = load_model(checkpoint, options.weights, options.map_gate, options.graph)
    except ValueError as exc:
        if options.graph is None or str(checkpoint) in str(exc):
            raise
        raise ValueError(f"{checkpoint}: {exc}") from None
    if options.graph is not None and not loaded.tiled:
        raise ValueError(f"{checkpoint}: graph {options.graph!r} applies to tiled checkpoints only")
    if options.int8_acc and loaded.tiled:
        raise ValueError(f"{checkpoint}: accuracy-controlled INT8 is not offered for tiled models "
                         "(NNCF's accuracy control needs whole-image outputs); use --int8")
    if options.quantize.float_map:
        try:
            check_float_map(loaded.kind)
        except ValueError as exc:
            raise ValueError(f"{checkpoint}: {exc}") from None
        if loaded.model.heads.bank_alone():
            raise ValueError(f"{checkpoint}: --float-map keeps SSN's segmentation head in float, but this model's "
                             "outputs are its memory bank's alone (SSN's map weighs 0, the score is the map's), so "
                             "its graph has no segmentation head; export without --float-map")
    return loaded


def resolve_float_map(options: QuantizeOptions, loaded: LoadedModel) -> QuantizeOptions:
    """float_map None (automatic) becomes True for an SSN model whose map adds its segmentation head's to a memory
    bank's distances (model.memory_bank, SSN's map weighing > 0): those distances are float already, and the INT8
    drift of that map came from the head (supervised Magnetic tile, benchmarks/README.md); False otherwise."""
    if options.float_map is not None:
        return options
    model = loaded.recipe.model
    mixed = loaded.kind == "ssn" and model.memory_bank and model.memory_bank_ssn_weight > 0
    return dataclasses.replace(options, float_map=bool(mixed))


def _threshold_data(checkpoint: Path, loaded: LoadedModel, options: ExportOptions) -> ThresholdData:
    path = options.threshold_data or loaded.recipe.data.path
    if not path:
        raise ValueError(f"{checkpoint}: the recipe has no data.path; pass the threshold/validation data with --data")
    size = tuple(int(v) for v in loaded.recipe.data.image_size)
    # what is missing is refused before any image is read
    samples = load_dataset(path)
    held, held_from = _held_out(checkpoint, loaded, samples, path, options.thresholds.source == "normal")
    wanted = SPLIT_OF.get(options.thresholds.source)
    labelled = labelled_split(path, wanted) if wanted is not None else None
    evaluation = evaluation_split(path)
    split, arrays = (evaluation[0], load_arrays(evaluation[1], size)) if evaluation else (None, None)
    if options.int8_acc and split != "val" and not held:
        raise DatasetError(f"{path}: accuracy-controlled INT8 needs a 'val' split with normal and defective images, "
                           "or normal training images that training held out (data.val_fraction) to paint defects "
                           "into; it never tunes on a test split")
    if options.int8_acc and split == "val" and options.acc_metric.startswith("pixel_") and pixel_truth(arrays) is None:
        raise DatasetError(f"{path}: 'val' split has no defect masks; use an image_* accuracy metric")
    data = ThresholdData(split, str(path), arrays, load_arrays(held, size) if held else None, held_from,
                         held_out_samples=held,
                         unseen_defects=_unseen_defects(loaded, samples) if held and options.quantizing else [])
    if wanted is not None and wanted != split:
        data.labelled = (wanted, load_arrays(labelled, size))
    return data


def _unseen_defects(loaded: LoadedModel, samples: list[Sample]) -> list[Sample]:
    """data.heldout.unseen_defects of the model's training (a knn fit is unsupervised whatever its recipe says)."""
    from ssn_edge.data.heldout import unseen_defects

    return unseen_defects(samples, "unsupervised" if loaded.kind == "knn" else loaded.recipe.train.setting)


def _held_out(checkpoint: Path, loaded: LoadedModel, samples: list[Sample], path: str | Path,
              needed: bool) -> tuple[list, str | None]:
    """Normal images the model never trained on, among the samples of the dataset at path: the training split's
    held-out part (the recipe's data.val_fraction, val_min, val_seed: the one split training made) and the 'val'
    split's normal images."""
    d = loaded.recipe.data
    held = split_validation(samples, d.val_fraction, d.val_min, d.val_seed).held_out
    val = [s for s in select(samples, "val") if s.label == 0]
    parts = ([f"{len(held)} held-out normal training images (data.val_fraction {d.val_fraction:g}, "
              f"val_min {d.val_min}, val_seed {d.val_seed})"] if held else []) + (
             [f"{len(val)} normal 'val' images"] if val else [])
    if not held and not val and needed:
        raise DatasetError(
            f"{checkpoint}: no normal images that training did not see to set thresholds on (trained on every normal "
            f"training image of {path}: data.val_fraction {d.val_fraction:g}, or a checkpoint from before the held-out "
            "split); retrain (data.val_fraction holds some out), give --data a dataset whose 'val' split has normal "
            "images, or choose --threshold-from f1 (a 'val' split with defects) or test-f1 (optimistic)")
    return held + val, " and ".join(parts) if parts else None


# --------------------------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------------------------


def _quantization(options: QuantizeOptions, offset: float | None) -> Quantization:
    return Quantization(options.activation_range, options.score_offset, offset, options.float_map,
                        options.bias_correction)


def _int8_acc(stage: Stage, calib: Calibration, entry: dict[str, Any], options: ExportOptions,
              data: ThresholdData, model_kind: str) -> None:
    split, arrays = data.acc_data()
    log.info("quantizing to INT8 with accuracy control (%s, max drop %.2f points, %d validation images: %s)",
             options.acc_metric, options.max_drop, len(arrays),
             data.check_words() if split == ACC_CHECK_SPLIT else f"the '{split}' split")
    fp32_raw = stage.raw_outputs("fp32", arrays)  # accuracy control is refused for tiled graphs, so a plain one
    agreement = None
    if options.acc_metric == "decision_agreement":
        threshold = stage.thresholds.image  # the bundle's own image threshold
        agreement = (sigmoid(fp32_raw[1]) >= threshold, threshold)
    quantized, offset = quantize_int8_acc(stage.read("fp32"), calib, options.quantize, arrays, options.acc_metric,
                                          options.max_drop, agreement, model_kind)
    stage.save("int8_acc", quantized, **entry, quantization=_quantization(options.quantize, offset))
    record = accuracy_record(options.acc_metric, options.max_drop, split, arrays, fp32_raw,
                             stage.raw_outputs("int8_acc", arrays), stage.xml("int8_acc"), agreement)
    stage.entries["int8_acc"]["accuracy_control"] = record


def _quantize_all(stage: Stage, loaded: LoadedModel, options: ExportOptions, data: ThresholdData) -> CalibrationInfo:
    """INT8 and/or accuracy-controlled INT8 on one calibration set, the same for every graph kind. The default
    set (the normal training images of a dataset) comes from --data when given, not the recipe's data.path,
    which is relative to wherever training ran."""
    spec = options.calibration_spec
    if spec.source == "recipe" and spec.path is None and options.threshold_data:
        spec = dataclasses.replace(spec, path=str(options.threshold_data))
    images = select_calibration(spec, loaded.recipe)
    record = calibration_record(spec, images, loaded.recipe)
    stage.add_json(CALIBRATION_FILE, record)
    calib = prepare_calibration(stage.read("fp32"), images, stage.plan.input_for, spec.defects, spec.seed,
                                options.quantize)
    entry = {"calibration": ModelCalibration(CALIBRATION_FILE, len(images))}
    if options.int8:
        log.info("quantizing to INT8 on %d calibration images", len(images))
        quantized, offset = quantize_int8(stage.read("fp32"), calib, options.quantize, loaded.kind)
        stage.save("int8", quantized, **entry, quantization=_quantization(options.quantize, offset))
    if options.int8_acc:
        _int8_acc(stage, calib, entry, options, data, loaded.kind)
    # the map was quantized, so --float-map could keep it: a plain SSN graph exported without it
    _int8_checks(stage, data, map_quantized=loaded.kind == "ssn" and not options.quantize.float_map)
    return CalibrationInfo(CALIBRATION_FILE, record["count"], CalibrationSpecRecord(**spec.to_dict()))


INT8_CHECK_COPIES = 3  # painted copies per held-out normal in the INT8 check (CheckSetSpec.copies)
# accuracy_control.data when --int8-acc held its metric on the check set (no 'val' split)
ACC_CHECK_SPLIT = "heldout_check"


def _int8_checks(stage: Stage, data: ThresholdData, map_quantized: bool = False) -> None:
    """Each INT8 model against FP32 on the check set (ThresholdData.check_arrays, export/int8_check.py), into its
    model entry; outside the bound, one warning line. The normals' predictions are those saving each precision
    already made; only the rest of the check set (painted copies, unseen defects) is run."""
    if data.held_out is None:
        log.info("INT8 check: not run, no held-out normal images to check INT8 against FP32 on")
        return
    arrays, added = data.check_arrays()
    where = data.check_words()
    fp32 = joined(stage.held_out_predictions["fp32"], predict_arrays(stage.xml("fp32"), stage.plan, added))
    for precision in ("int8", "int8_acc"):
        if precision not in stage.entries:
            continue
        int8 = joined(stage.held_out_predictions[precision], predict_arrays(stage.xml(precision), stage.plan, added))
        check = compare(arrays, fp32, int8, stage.thresholds.image, where, precision, map_quantized)
        (log.info if check.within_bound else log.warning)(check.message)
        stage.entries[precision]["check"] = check


# --------------------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------------------


def _as_dict(record: Any) -> dict[str, Any] | None:
    """A checkpoint record (dict or dataclass) as a dict."""
    if record is None or isinstance(record, dict):
        return record
    return dataclasses.asdict(record)


def _supervision(record: Any) -> Supervision | None:
    values = _as_dict(record)
    if values is None:
        return None
    known = {f.name for f in dataclasses.fields(Supervision)}
    if set(values) - known:
        log.warning("supervision fields %s have no place in the bundle schema; left out", sorted(set(values) - known))
    return Supervision(**{k: v for k, v in values.items() if k in known})


def _provenance(loaded: LoadedModel, checkpoint: Path) -> Provenance:
    backbone = _as_dict(loaded.backbone)
    recipe = loaded.recipe
    return Provenance(
        backbone=Backbone(backbone["name"], backbone.get("weights_source"), backbone.get("fingerprint")),
        recipe=loaded.recipe_dict, model_kind=MODEL_FAMILY.get(loaded.kind, loaded.kind), setting=recipe.train.setting,
        training_data=str(recipe.data.path) if recipe.data.path else None,
        training_size=tuple(int(v) for v in recipe.data.image_size), ssn_edge_version=__version__,
        source_checkpoint=SourceCheckpoint(checkpoint.name, sha256_file(checkpoint), loaded.epoch),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def _metadata(loaded: LoadedModel, checkpoint: Path, stage: Stage, data: ThresholdData,
              calibration: CalibrationInfo | None) -> BundleMetadata:
    plan = stage.plan
    fp32 = stage.predictions.get("fp32") or stage.held_out_predictions["fp32"]
    score_range, map_range = value_ranges(fp32)
    gate = loaded.recipe.model.map_gate
    per = "tile" if plan.tiling is not None else None
    models = {p: ModelEntry(**entry, metrics=metrics_from_predictions(data.arrays, stage.predictions[p])
                            if data.arrays is not None else {})
              for p, entry in stage.entries.items()}
    kind = "logits" if gate == "none" else "log_probability"
    if plan.postprocess_in_graph:
        outputs = Outputs(MapOutput(FINAL_NAMES["map"], stride=1, kind=kind, gate=gate),
                          ScoreOutput(FINAL_NAMES["score"], kind="probability"))
    else:
        outputs = Outputs(MapOutput(stride=MAP_STRIDE, kind=kind, gate=gate, per=per), ScoreOutput(per=per))
    return BundleMetadata(
        input=InputSpec(*plan.input_size, layout=plan.layout, tiles=plan.tiles),
        outputs=outputs,
        postprocess=PostProcess(per="tile, before merging" if per else None, in_graph=plan.postprocess_in_graph),
        thresholds=stage.thresholds,
        score_range=score_range, map_range=map_range, models=models, calibration=calibration,
        tiling=Tiling(plan.tiling, loaded.trained_on) if plan.tiling is not None else None,
        supervision=_supervision(loaded.supervision), provenance=_provenance(loaded, checkpoint),
        collapse_check=loaded.state.collapse,
    )


def _thresholds(stage: Stage, data: ThresholdData, options: ExportOptions) -> Thresholds:
    """The bundle's thresholds, on the FP32 model's predictions (ssn_edge.export.thresholds)."""
    held = stage.held_out_predictions.get("fp32")
    labelled = None
    if options.thresholds.source != "normal":
        if data.labelled is not None:
            split, arrays = data.labelled
            labelled = (arrays, predict_arrays(stage.xml("fp32"), stage.plan, arrays), split, data.path)
        else:
            labelled = (data.arrays, stage.predictions["fp32"], data.split, data.path)
    return set_thresholds(options.thresholds, held, data.held_out_from, labelled)


def rt_info(meta: BundleMetadata) -> dict[str, dict[str, Any]]:
    """What the IR itself says (rt_info), so a runtime that has only the .xml/.bin needs nothing else:
    ``model_info``, the keys openvino-model-api's AnomalyDetection wrapper reads (it embeds the resize, BGR->RGB
    and mean/scale, in 0..255 units, into the graph itself), and ``ssn_edge``: the same pre-processing stated
    exactly, the outputs' meaning and the thresholds."""
    inp, t = meta.input, meta.thresholds
    info: dict[str, dict[str, Any]] = {"ssn_edge": {
        "schema_version": 2, "input": inp.name, "layout": inp.layout, "size_hw": [inp.height, inp.width],
        "color": inp.color, "scale": inp.scale, "resize": inp.resize, "mean": list(inp.mean), "std": list(inp.std),
        "normalize": "(pixel / scale - mean) / std, per RGB channel",
        "postprocess_in_graph": meta.postprocess.in_graph,
        "map_output": meta.outputs.map.name, "map_units": meta.outputs.map.kind,
        "score_output": meta.outputs.score.name, "score_units": meta.outputs.score.kind,
        "image_threshold": t.image, "pixel_threshold": t.pixel, "decision": "score >= image_threshold",
        "threshold_source": t.source or "unknown", "threshold_method": t.method,
    }}
    if t.review is not None:
        info["ssn_edge"]["review_threshold"] = t.review
    if meta.postprocess.in_graph:
        width = (meta.map_range.max - meta.map_range.min) if meta.map_range else 1.0
        info["model_info"] = {
            "model_type": "AnomalyDetection", "task": "segmentation", "labels": ["Normal", "Anomaly"],
            "image_threshold": t.image, "pixel_threshold": t.pixel, "normalization_scale": float(width or 1.0),
            "mean_values": [round(255.0 * v, 4) for v in inp.mean], "scale_values": [round(255.0 * v, 4) for v in inp.std],
            "reverse_input_channels": True, "resize_type": "standard",
        }
    return info


# --------------------------------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------------------------------


def export_bundle(checkpoint: str | Path, out_dir: str | Path, options: ExportOptions = ExportOptions()) -> Bundle:
    """Export ``checkpoint`` (plain or tiled) to a bundle at ``out_dir``: FP32 always, the rest as ``options``
    say. Nothing is written unless everything succeeds."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    sweep_leftovers(out_dir)  # what exports killed earlier left, now that their process is gone
    _refuse_existing(out_dir, options.overwrite)  # before minutes of work, and before reading the checkpoint
    with signals_raise(f"export to {out_dir}"):  # SIGTERM/SIGINT: the temporary folders go, then the CLI exits
        loaded = _load(checkpoint, options)
        options = dataclasses.replace(options, quantize=resolve_float_map(options.quantize, loaded))
        plan = plan_graph(loaded, options.dynamic_batch)
        data = _threshold_data(checkpoint, loaded, options)
        with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as tmp:
            try:
                metadata, files = _build(Stage(Path(tmp), plan, data.arrays, data.held_out), loaded, checkpoint, options, data)
            except OSError as exc:  # a full or read-only temporary folder; the bundle's own folder: write_bundle
                raise BundleError(f"{out_dir}: {os_error_message(exc, 'stage the export')} (temporary folder "
                                  f"{tmp}; set TMPDIR to a folder with room); nothing was written") from None
            return write_bundle(out_dir, metadata, files, overwrite=options.overwrite)


def _build(stage: Stage, loaded: LoadedModel, checkpoint: Path, options: ExportOptions,
           data: ThresholdData) -> tuple[BundleMetadata, dict[str, Path]]:
    """Every precision's model and its metadata, in the stage's temporary folder."""
    plan = stage.plan
    log.info("converting to OpenVINO (graph %s, input %s)", plan.kind, "x".join(map(str, plan.input_shape)))
    stage.save("fp32", convert(loaded, plan))
    stage.thresholds = _thresholds(stage, data, options)
    if options.fp16:
        stage.save("fp16", stage.read("fp32"), compress=True)
    calibration = _quantize_all(stage, loaded, options, data) if options.quantizing else None
    metadata = _metadata(loaded, checkpoint, stage, data, calibration)
    stage.finish(metadata.thresholds, rt_info(metadata))
    return metadata, stage.files


def sweep_leftovers(out_dir: Path) -> list[Path]:
    """Remove the temporary folders (TEMP_PREFIX<pid>-* in the system's temporary folder) and the staging
    folders beside out_dir that exports killed earlier (SIGKILL, power loss) left, once their process is gone."""
    legacy = re.compile(rf"{re.escape(TEMP_PREFIX)}[a-z0-9_]{{8}}")  # named before they carried their pid
    return sweep_stale(Path(tempfile.gettempdir()), re.compile(rf"{re.escape(TEMP_PREFIX)}(?P<pid>\d+)-[a-z0-9_]+"),
                       legacy) + sweep_partials(out_dir)

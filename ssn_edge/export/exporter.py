"""Export a trained checkpoint, plain or tiled, to a deployment bundle: OpenVINO IR in FP32 (always), FP16, INT8
and accuracy-controlled INT8, with the thresholds, value ranges and pre/post-processing the runtime needs.

One path for every graph (``ssn_edge.export.graph``): load the model, convert it, save each precision,
quantize, set thresholds and metrics on the FP32 model's predictions through the runtime's own path, write the
typed metadata (``ssn_edge.runtime.schema``). Input height and width are fixed (those the model was trained
at: SSN's feature resize is tied to them); a plain or single-tile graph has a dynamic batch.

Everything is built in a temporary directory and handed to :func:`ssn_edge.runtime.bundle.write_bundle`,
which renames it into place: an export that fails leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssn_edge import __version__
from ssn_edge.data import ArraySet, DatasetError, load_arrays
from ssn_edge.export.accuracy import ACC_METRICS, accuracy_record, quantize_int8_acc
from ssn_edge.export.calibration import CALIBRATION_FILE, CalibrationSpec, calibration_record, select_calibration
from ssn_edge.export.graph import MAP_STRIDE, GraphPlan, convert, plan_graph
from ssn_edge.export.inference import Predictions, predict_arrays
from ssn_edge.export.quantize import Calibration, QuantizeOptions, prepare_calibration, quantize_int8
from ssn_edge.export.thresholds import (
    metrics_from_predictions,
    pixel_truth,
    threshold_split,
    thresholds_from_predictions,
    value_ranges,
)
from ssn_edge.runtime.bundle import Bundle, BundleError, sha256_file, write_bundle
from ssn_edge.runtime.postprocess import sigmoid
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
    Tiling,
)
from ssn_edge.runtime.tiling import GRAPHS

if TYPE_CHECKING:  # pragma: no cover
    from ssn_edge.model.load import LoadedModel

log = logging.getLogger("ssn_edge")

WEIGHTS_PRECISION = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "int8_acc": "int8"}
MODEL_FAMILY = {"ssn": "ssn", "tiled": "ssn"}  # LoadedModel.kind -> the bundle's model_kind (tiling says "tiled")


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how; checked here, once, before any work.

    calibration: the INT8 calibration set (None: 128 normal training images of the recipe's data).
    max_drop: accuracy control's limit, absolute percentage points of acc_metric. threshold_data: dataset for
    thresholds and accuracy control (None: the recipe's data.path; its 'val' split, else 'test').
    map_gate: model.map_gate of the exported graph (None: as trained). graph: a tiled checkpoint's graph
    ("tile", "image", "tiles"; None: as recorded)."""

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

    def __post_init__(self) -> None:
        if self.acc_metric not in ACC_METRICS:
            raise ValueError(f"accuracy metric {self.acc_metric!r} is not one of {', '.join(ACC_METRICS)}")
        if not (0.0 <= self.max_drop <= 100.0):
            raise ValueError(f"max_drop is an absolute drop in percentage points, 0..100; got {self.max_drop}")
        if self.calibration is not None and not self.quantizing:
            raise ValueError("a calibration set only applies to an INT8 export (--int8 or --int8-acc)")
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
    split: str
    path: str
    arrays: ArraySet


@dataclass
class Stage:
    """The bundle being built in a temporary directory: its files, its models and their predictions."""

    dir: Path
    plan: GraphPlan
    arrays: ArraySet
    files: dict[str, Path] = field(default_factory=dict)
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)  # ModelEntry fields but the metrics
    predictions: dict[str, Predictions] = field(default_factory=dict)

    def xml(self, precision: str) -> Path:
        return self.dir / f"model_{precision}.xml"

    def save(self, precision: str, ov_model, compress: bool = False, **entry: Any) -> None:
        """Save one precision's IR and predict the threshold data with it."""
        import openvino as ov

        xml = self.xml(precision)
        ov.save_model(ov_model, xml, compress_to_fp16=compress)
        self.files[xml.name], self.files[xml.with_suffix(".bin").name] = xml, xml.with_suffix(".bin")
        self.entries[precision] = {"xml": xml.name, "bin": xml.with_suffix(".bin").name,
                                   "weights_precision": WEIGHTS_PRECISION[precision], **entry}
        self.predictions[precision] = predict_arrays(xml, self.plan, self.arrays)

    def read(self, precision: str):
        import openvino as ov

        return ov.Core().read_model(self.xml(precision))

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
    return loaded


def _threshold_data(checkpoint: Path, loaded: LoadedModel, options: ExportOptions) -> ThresholdData:
    path = options.threshold_data or loaded.recipe.data.path
    if not path:
        raise ValueError(f"{checkpoint}: the recipe has no data.path; pass the threshold/validation data with --data")
    split, samples = threshold_split(path)
    arrays = load_arrays(samples, tuple(int(v) for v in loaded.recipe.data.image_size))
    if options.int8_acc and options.acc_metric.startswith("pixel_") and pixel_truth(arrays) is None:
        raise DatasetError(f"{path}: '{split}' split has no defect masks; use an image_* accuracy metric")
    return ThresholdData(split, str(path), arrays)


# --------------------------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------------------------


def _quantization(options: QuantizeOptions, offset: float | None) -> Quantization:
    return Quantization(options.activation_range, options.score_offset, offset)


def _int8_acc(stage: Stage, calib: Calibration, entry: dict[str, Any], options: ExportOptions,
              data: ThresholdData) -> None:
    arrays = data.arrays
    log.info("quantizing to INT8 with accuracy control (%s, max drop %.2f points, %d validation images)",
             options.acc_metric, options.max_drop, len(arrays))
    fp32_raw = stage.predictions["fp32"].raw  # accuracy control is refused for tiled graphs, so a plain one
    agreement = None
    if options.acc_metric == "decision_agreement":
        threshold = thresholds_from_predictions(arrays, stage.predictions["fp32"]).image
        agreement = (sigmoid(fp32_raw[1]) >= threshold, threshold)
    quantized, offset = quantize_int8_acc(stage.read("fp32"), calib, options.quantize, arrays, options.acc_metric,
                                          options.max_drop, agreement)
    stage.save("int8_acc", quantized, **entry, quantization=_quantization(options.quantize, offset))
    record = accuracy_record(options.acc_metric, options.max_drop, data.split, arrays, fp32_raw,
                             stage.predictions["int8_acc"].raw, stage.xml("int8_acc"), agreement)
    stage.entries["int8_acc"]["accuracy_control"] = record


def _quantize_all(stage: Stage, loaded: LoadedModel, options: ExportOptions, data: ThresholdData) -> CalibrationInfo:
    """INT8 and/or accuracy-controlled INT8 on one calibration set, the same for every graph kind."""
    spec = options.calibration_spec
    images = select_calibration(spec, loaded.recipe)
    record = calibration_record(spec, images, loaded.recipe)
    stage.add_json(CALIBRATION_FILE, record)
    calib = prepare_calibration(stage.read("fp32"), images, stage.plan.input_for, spec.defects, spec.seed,
                                options.quantize)
    entry = {"calibration": ModelCalibration(CALIBRATION_FILE, len(images))}
    if options.int8:
        log.info("quantizing to INT8 on %d calibration images", len(images))
        quantized, offset = quantize_int8(stage.read("fp32"), calib, options.quantize)
        stage.save("int8", quantized, **entry, quantization=_quantization(options.quantize, offset))
    if options.int8_acc:
        _int8_acc(stage, calib, entry, options, data)
    return CalibrationInfo(CALIBRATION_FILE, record["count"], CalibrationSpecRecord(**spec.to_dict()))


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
    plan, fp32 = stage.plan, stage.predictions["fp32"]
    score_range, map_range = value_ranges(fp32)
    gate = loaded.recipe.model.map_gate
    per = "tile" if plan.tiling is not None else None
    models = {p: ModelEntry(**entry, metrics=metrics_from_predictions(data.arrays, stage.predictions[p]))
              for p, entry in stage.entries.items()}
    return BundleMetadata(
        input=InputSpec(*plan.input_size, layout=plan.layout, tiles=plan.tiles),
        outputs=Outputs(MapOutput(stride=MAP_STRIDE, kind="logits" if gate == "none" else "log_probability",
                                  gate=gate, per=per), ScoreOutput(per=per)),
        postprocess=PostProcess(per="tile, before merging" if per else None),
        thresholds=thresholds_from_predictions(data.arrays, fp32, data.split, data.path),
        score_range=score_range, map_range=map_range, models=models, calibration=calibration,
        tiling=Tiling(plan.tiling, loaded.trained_on) if plan.tiling is not None else None,
        supervision=_supervision(loaded.supervision), provenance=_provenance(loaded, checkpoint),
    )


# --------------------------------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------------------------------


def export_bundle(checkpoint: str | Path, out_dir: str | Path, options: ExportOptions = ExportOptions()) -> Bundle:
    """Export ``checkpoint`` (plain or tiled) to a bundle at ``out_dir``: FP32 always, the rest as ``options``
    say. Nothing is written unless everything succeeds."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    _refuse_existing(out_dir, options.overwrite)  # before minutes of work, and before reading the checkpoint
    loaded = _load(checkpoint, options)
    plan = plan_graph(loaded)
    data = _threshold_data(checkpoint, loaded, options)
    with tempfile.TemporaryDirectory(prefix="ssn-edge-export-") as tmp:
        stage = Stage(Path(tmp), plan, data.arrays)
        log.info("converting to OpenVINO (graph %s, input %s)", plan.kind, "x".join(map(str, plan.input_shape)))
        stage.save("fp32", convert(loaded, plan))
        if options.fp16:
            stage.save("fp16", stage.read("fp32"), compress=True)
        calibration = _quantize_all(stage, loaded, options, data) if options.quantizing else None
        metadata = _metadata(loaded, checkpoint, stage, data, calibration)
        return write_bundle(out_dir, metadata, stage.files, overwrite=options.overwrite)

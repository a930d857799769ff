"""The bundle's metadata.json, typed: every field a bundle carries, written and read here and nowhere else.

Torch-free. `read_metadata` checks every field as it reads it and names the one that is wrong (a null
threshold, a string where a number belongs, a missing key) in a one-line `BundleError`; a bundle written by an
older ssn-edge (schema v1) is migrated to the current layout first, so existing bundles keep working.
`BundleMetadata.to_dict` is what `runtime.bundle.write_bundle` writes.

Layout (schema v2): input (size, layout, colour, mean/std, scale, resize rule), outputs (map, score),
postprocess, thresholds, score_range / map_range (the FP32 outputs' min and max on the threshold data: a
display range, not an input normalisation), models per precision, calibration, tiling, supervision,
provenance (model kind, backbone, recipe, version, source checkpoint, creation time), files (sha256) and,
optionally, training's collapse check and each INT8 model's check against FP32 at export.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from ssn_edge.runtime.postprocess import BLUR_KERNEL, BLUR_SIGMA
from ssn_edge.runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD
from ssn_edge.runtime.tiling import TilingConfig

SCHEMA = "ssn-edge-bundle"
SCHEMA_VERSION = 2
PRECISIONS = ("fp32", "fp16", "int8", "int8_acc")
LAYOUTS = ("NCHW", "NTCHW")  # NTCHW: a "tiles" graph takes one image as its T tiles
MAP_KINDS = ("logits", "log_probability")
MAP_GATES = ("none", "score")
TRAINED_ON = ("shared_backbone", "independent_tiles")
PLACEMENT = "middle of the gap below the f1_max score"
# what training did after its collapse check (ssn_edge.train.collapse): "none" (nothing collapsed), "kept" (as
# trained), "anchored" (the score made the map's maximum), "stopped" (train.on_collapse error)
COLLAPSE_ACTIONS = ("none", "kept", "anchored", "stopped")
# models.<int8>.quantization.bias_correction: NNCF's BiasCorrection, or FastBiasCorrection (nncf.quantize's default)
BIAS_CORRECTIONS = ("full", "fast")
_MISSING = object()


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the bundle (or file) and the problem."""


def _rounded(values) -> tuple[float, ...]:
    return tuple(float(f"{v:.6g}") for v in values)


# --------------------------------------------------------------------------------------------------------------
# The records
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """What the graph takes and how an image becomes it (runtime.preprocess does exactly this)."""

    height: int
    width: int
    mean: tuple[float, ...] = _rounded(IMAGENET_MEAN)
    std: tuple[float, ...] = _rounded(IMAGENET_STD)
    name: str = "image"
    channels: int = 3
    layout: str = "NCHW"
    tiles: int | None = None  # NTCHW: tiles per image
    color: str = "rgb"
    grayscale: str = "replicate"
    scale: str = "uint8/255, uint16/65535"
    resize: str = "area when shrinking, bilinear when enlarging"

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width


@dataclass(frozen=True)
class MapOutput:
    name: str = "map"
    stride: int = 4
    kind: str = "logits"  # "log_probability" with gate "score": log sigmoid(map) + log sigmoid(score)
    gate: str = "none"  # model.map_gate of the exported graph
    per: str | None = None  # "tile": one map per tile, merged by the runtime


@dataclass(frozen=True)
class ScoreOutput:
    name: str = "score"
    kind: str = "logit"
    per: str | None = None


@dataclass(frozen=True)
class Outputs:
    map: MapOutput = MapOutput()
    score: ScoreOutput = ScoreOutput()


@dataclass(frozen=True)
class PostProcess:
    map_upsample: str = "bilinear"
    blur_sigma: float = BLUR_SIGMA
    blur_kernel: int = BLUR_KERNEL
    score: str = "sigmoid"
    per: str | None = None  # "tile, before merging"
    # True: the graph does all of the above itself (outputs: the final map at input size and the score in [0, 1]);
    # the runtime only resizes the map to the image's own size. False (tiled and pre-in-graph bundles): raw outputs.
    in_graph: bool = False


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds, set on the FP32 model's outputs: image on sigmoid scores, pixel on map values."""

    image: float
    pixel: float
    pixel_method: str = "f1_max"  # or "normal_max" (no defect masks in the threshold data), "false_alarm"
    method: str = "f1_max"  # or "false_alarm": a target false-alarm rate on held-out normal images
    placement: str = PLACEMENT
    source: str | None = None  # "held_out_normal", or the split they were set on ("val", "test")
    data: str | None = None
    count: int | None = None  # images
    max_false_alarm: float | None = None  # method false_alarm: the target rate (image; pixel below)
    max_false_alarm_pixel: float | None = None
    held_out: int | None = None  # normal images never trained on, that the rates below were measured on
    false_alarm: float | None = None  # fraction of them at or above the image threshold (FP32)
    pixel_false_alarm: float | None = None  # fraction of their pixels at or above the pixel threshold
    review: float | None = None  # lower image threshold: score in [review, image) -> "review"
    review_false_alarm: float | None = None  # the target rate the review threshold was set at


@dataclass(frozen=True)
class ValueRange:
    min: float
    max: float


@dataclass(frozen=True)
class ModelCalibration:
    file: str
    count: int


@dataclass(frozen=True)
class Quantization:
    activation_range: str
    score_offset: bool
    score_offset_value: float | None = None  # subtracted from the score inside the graph
    float_map: bool = False  # the segmentation head was kept in float
    bias_correction: str = "fast"  # NNCF's full or fast bias correction (bundles silent on it: fast)


@dataclass(frozen=True)
class AccuracyControl:
    """NNCF accuracy-controlled quantization: the metric held, its limit, and what was reached."""

    metric: str
    max_drop: float
    drop_type: str
    data: str  # the split it was measured on
    fp32: float
    int8_acc: float
    drop: float
    met: bool
    fake_quantize_ops: int


@dataclass(frozen=True)
class Int8Check:
    """An INT8 model against FP32 at export (ssn_edge.export.int8_check) on the held-out normal images, painted copies
    of each and any defective training images the model never saw: image AUROC and pixel AUPRO (percent; diff = INT8 - FP32), decisions that flip at the image
    threshold, the largest |score difference|, and whether both differences are within ``bound`` points."""

    data: str  # which images, in words
    images: int
    defective: int  # the painted copies and real defects among them
    fp32_image_auroc: float
    int8_image_auroc: float
    image_auroc_diff: float
    fp32_pixel_aupro: float | None  # None: no defect pixels to measure on
    int8_pixel_aupro: float | None
    pixel_aupro_diff: float | None
    flips: int
    max_score_diff: float
    threshold: float  # the image threshold the flips were counted at
    bound: float
    within_bound: bool
    message: str = ""


@dataclass(frozen=True)
class ModelEntry:
    xml: str
    bin: str
    weights_precision: str
    metrics: dict[str, float] = field(default_factory=dict)  # on the threshold data, through the runtime's path
    metrics_hint: str = "f32"  # INFERENCE_PRECISION_HINT the metrics were measured at
    calibration: ModelCalibration | None = None
    quantization: Quantization | None = None
    accuracy_control: AccuracyControl | None = None
    # INT8 models only; None: not checked (no held-out normal images) or exported before the check existed
    check: Int8Check | None = None


@dataclass(frozen=True)
class CalibrationSpecRecord:
    source: str
    path: str | None
    size: int
    seed: int
    defects: float


@dataclass(frozen=True)
class CalibrationInfo:
    file: str
    count: int
    spec: CalibrationSpecRecord


@dataclass(frozen=True)
class Tiling:
    config: TilingConfig
    heads_trained_on: str = "independent_tiles"  # the features the heads learned on; another graph shifts edges


@dataclass(frozen=True)
class Supervision:
    """The training data behind the setting (ssn_edge.data.supervision)."""

    setting: str
    source: str  # "recipe" or "data" (inferred)
    normal: int
    with_mask: int
    label_only: int
    ignored: int
    mask_fraction: float = 1.0
    pasted: int = 0


@dataclass(frozen=True)
class CollapseCheck:
    """Training's collapse check (ssn_edge.train.collapse) on the held-out check set (normal images, their painted
    copies and, unsupervised, the training split's defective images):
    whether the image score or the map's maximum collapsed, and what training did (COLLAPSE_ACTIONS). The one
    record for the checkpoint, the bundle and the report; defined here because the bundle reader is torch-free."""

    normal: int  # held-out normal images
    defective: int  # painted copies and defective training images
    score_spread: float  # interquartile range of the score logits (ssn_edge.train.collapse.MIN_SPREAD)
    score_auroc: float  # 0..1, defective vs normal, by the score
    map_max_auroc: float  # 0..1, by each image's maximum map logit (what an anchored score would be)
    map_spread: float  # interquartile range of those maxima, logits
    collapsed_score: bool
    collapsed_map: bool
    action: str = "none"  # COLLAPSE_ACTIONS
    message: str = ""  # the line training logged

    @property
    def collapsed(self) -> bool:
        return self.collapsed_score or self.collapsed_map

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CollapseCheck:
        """A checkpoint's record (the bundle's is read field by field, _read_collapse); a later writer's extra
        fields are not ours and are left out."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass(frozen=True)
class Backbone:
    name: str
    weights_source: str | None = None
    fingerprint: str | None = None

    @property
    def random(self) -> bool:
        return str(self.weights_source or "").startswith("random")


@dataclass(frozen=True)
class SourceCheckpoint:
    name: str
    sha256: str | None = None
    epoch: int | None = None


@dataclass(frozen=True)
class Provenance:
    backbone: Backbone
    recipe: dict[str, Any] = field(default_factory=dict)  # as the checkpoint recorded it
    model_kind: str = "ssn"  # the model family
    setting: str | None = None
    training_data: str | None = None  # the recipe's data.path
    training_size: tuple[int, int] | None = None  # the recipe's data.image_size
    ssn_edge_version: str | None = None
    source_checkpoint: SourceCheckpoint | None = None
    created: str | None = None


@dataclass(frozen=True)
class BundleMetadata:
    input: InputSpec
    thresholds: Thresholds
    models: dict[str, ModelEntry]
    provenance: Provenance
    outputs: Outputs = Outputs()
    postprocess: PostProcess = PostProcess()
    score_range: ValueRange | None = None
    map_range: ValueRange | None = None
    calibration: CalibrationInfo | None = None
    tiling: Tiling | None = None
    supervision: Supervision | None = None
    files: dict[str, str] = field(default_factory=dict)  # bundle-relative name -> sha256
    # Training's collapse check; None: not run (tiled, knn, no held-out images) or a checkpoint from before it.
    collapse_check: CollapseCheck | None = None

    @property
    def precisions(self) -> list[str]:
        return [p for p in PRECISIONS if p in self.models]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (schema first); read_metadata(to_dict()) gives this record back. collapse_check and a
        model's check are written only when there is one: a bundle without them stays readable by ssn-edge from
        before the fields."""
        data = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **dataclasses.asdict(self)}
        if data["collapse_check"] is None:
            del data["collapse_check"]
        for entry in data["models"].values():  # likewise a model entry's INT8 check
            if entry["check"] is None:
                del entry["check"]
        return data


# --------------------------------------------------------------------------------------------------------------
# Reading: one checked getter per kind of value, each naming the field it reads
# --------------------------------------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    return "null" if value is None else f"{value!r} (a {type(value).__name__})"


class _Fields:
    """One JSON object of the metadata, read field by field; every error names the field's dotted path.

    A getter's default is what an absent field means; only a field whose default is None may be null."""

    def __init__(self, data: Any, path: str, where: str):
        self.path, self.where = path, where
        if not isinstance(data, dict):
            raise self.error(None, f"is {_kind(data)}, expected an object")
        self.data, self.seen = data, set()

    def error(self, key: str | None, problem: str) -> BundleError:
        name = ".".join(p for p in (self.path, key) if p) or "metadata"
        return BundleError(f"{self.where}: field '{name}' {problem}")

    def _value(self, key: str, default: Any, expected: str, ok: Callable[[Any], bool]) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if default is _MISSING:
                raise self.error(key, "is missing")
            return default
        value = self.data[key]
        if value is None:
            if default is not None:
                raise self.error(key, f"is null, expected {expected}")
            return None
        if not ok(value):
            raise self.error(key, f"is {_kind(value)}, expected {expected}")
        return value

    def num(self, key: str, default: Any = _MISSING, finite: bool = True) -> float | None:
        value = self._value(key, default, "a number", _is_number)
        if value is not None and finite and not math.isfinite(value):
            raise self.error(key, f"is {value}, expected a finite number")
        return None if value is None else float(value)

    def int(self, key: str, default: Any = _MISSING, minimum: int | None = None) -> int | None:
        value = self._value(key, default, "an integer", _is_int)
        if value is not None and minimum is not None and value < minimum:
            raise self.error(key, f"is {value}, expected at least {minimum}")
        return value

    def str(self, key: str, default: Any = _MISSING, choices: tuple[str, ...] | None = None) -> str | None:
        value = self._value(key, default, "a string", lambda v: isinstance(v, str))
        if choices is not None and value is not None and value not in choices:
            raise self.error(key, f"is {value!r}, expected one of {', '.join(choices)}")
        return value

    def bool(self, key: str, default: Any = _MISSING) -> bool:
        return self._value(key, default, "true or false", lambda v: isinstance(v, bool))

    def numbers(self, key: str, count: int, default: Any = _MISSING, integer: bool = False) -> tuple | None:
        each = _is_int if integer else _is_number
        value = self._value(key, default, f"a list of {count} {'integers' if integer else 'numbers'}",
                            lambda v: isinstance(v, (list, tuple)) and len(v) == count and all(map(each, v)))
        if value is None:
            return None
        return tuple(int(v) for v in value) if integer else tuple(float(v) for v in value)

    def mapping(self, key: str, default: Any = _MISSING) -> dict | None:
        return self._value(key, default, "an object", lambda v: isinstance(v, dict))

    def sub(self, key: str, optional: bool = False) -> "_Fields | None":
        value = self.mapping(key, None if optional else _MISSING)
        return None if value is None else _Fields(value, self._child(key), self.where)

    def entries(self, key: str) -> dict[str, "_Fields"]:
        return {name: _Fields(item, self._child(f"{key}.{name}"), self.where)
                for name, item in self.mapping(key).items()}

    def _child(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def done(self) -> None:
        """Refuse fields this schema does not have (a typo, or a writer newer than this reader)."""
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise self.error(unknown[0], "is not a field of this schema version")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_input(f: _Fields) -> InputSpec:
    spec = InputSpec(
        height=f.int("height", minimum=1), width=f.int("width", minimum=1),
        mean=f.numbers("mean", 3), std=f.numbers("std", 3),
        name=f.str("name", "image"), channels=f.int("channels", 3, minimum=1),
        layout=f.str("layout", "NCHW", LAYOUTS), tiles=f.int("tiles", None, minimum=1),
        color=f.str("color", "rgb"), grayscale=f.str("grayscale", "replicate"),
        scale=f.str("scale", InputSpec.scale), resize=f.str("resize", InputSpec.resize),
    )
    if spec.layout == "NTCHW" and spec.tiles is None:
        raise f.error("tiles", "is missing (layout NTCHW needs the tile count)")
    if any(s <= 0 for s in spec.std):
        raise f.error("std", f"is {list(spec.std)}, expected positive numbers")
    f.done()
    return spec


def _read_outputs(f: _Fields) -> Outputs:
    m, s = f.sub("map"), f.sub("score")
    out = Outputs(
        map=MapOutput(name=m.str("name", "map"), stride=m.int("stride", 4, minimum=1),
                      kind=m.str("kind", "logits", MAP_KINDS), gate=m.str("gate", "none", MAP_GATES),
                      per=m.str("per", None)),
        score=ScoreOutput(name=s.str("name", "score"), kind=s.str("kind", "logit"), per=s.str("per", None)),
    )
    m.done(), s.done(), f.done()
    return out


def _read_postprocess(f: _Fields) -> PostProcess:
    post = PostProcess(map_upsample=f.str("map_upsample", "bilinear"), blur_sigma=f.num("blur_sigma", BLUR_SIGMA),
                       blur_kernel=f.int("blur_kernel", BLUR_KERNEL, minimum=1), score=f.str("score", "sigmoid"),
                       per=f.str("per", None), in_graph=f.bool("in_graph", False))
    if post.blur_sigma < 0:
        raise f.error("blur_sigma", f"is {post.blur_sigma}, expected >= 0")
    f.done()
    return post


def _read_thresholds(f: _Fields) -> Thresholds:
    t = Thresholds(image=f.num("image"), pixel=f.num("pixel"),
                   pixel_method=f.str("pixel_method", "f1_max", ("f1_max", "normal_max", "false_alarm")),
                   method=f.str("method", "f1_max"), placement=f.str("placement", PLACEMENT),
                   source=f.str("source", None), data=f.str("data", None), count=f.int("count", None, minimum=0),
                   max_false_alarm=_fraction(f, "max_false_alarm"), max_false_alarm_pixel=_fraction(f, "max_false_alarm_pixel"),
                   held_out=f.int("held_out", None, minimum=0), false_alarm=_fraction(f, "false_alarm"),
                   pixel_false_alarm=_fraction(f, "pixel_false_alarm"), review=f.num("review", None),
                   review_false_alarm=_fraction(f, "review_false_alarm"))
    if t.review is not None and t.review > t.image:
        raise f.error("review", f"is {t.review}, above the image threshold {t.image} (the review band lies below it)")
    f.done()
    return t


def _fraction(f: _Fields, key: str) -> float | None:
    value = f.num(key, None)
    if value is not None and not 0.0 <= value <= 1.0:
        raise f.error(key, f"is {value}, expected a fraction in [0, 1]")
    return value


def _read_range(f: _Fields | None) -> ValueRange | None:
    if f is None:
        return None
    r = ValueRange(min=f.num("min"), max=f.num("max"))
    f.done()
    return r


def _read_metrics(f: _Fields | None) -> dict[str, float]:
    return {} if f is None else {key: f.num(key, finite=False) for key in list(f.data)}


def _read_model(f: _Fields) -> ModelEntry:
    cal, q, acc = f.sub("calibration", optional=True), f.sub("quantization", optional=True), f.sub(
        "accuracy_control", optional=True)
    check = _read_int8_check(f.sub("check", optional=True))
    entry = ModelEntry(
        xml=f.str("xml"), bin=f.str("bin"), weights_precision=f.str("weights_precision", choices=("fp32", "fp16", "int8")),
        metrics=_read_metrics(f.sub("metrics", optional=True)),
        metrics_hint=f.str("metrics_hint", "f32"),
        calibration=ModelCalibration(cal.str("file"), cal.int("count", minimum=0)) if cal else None,
        quantization=Quantization(q.str("activation_range"), q.bool("score_offset"),
                                  q.num("score_offset_value", None), q.bool("float_map", False),
                                  q.str("bias_correction", "fast", choices=BIAS_CORRECTIONS)) if q else None,
        accuracy_control=AccuracyControl(
            metric=acc.str("metric"), max_drop=acc.num("max_drop"), drop_type=acc.str("drop_type"),
            data=acc.str("data"), fp32=acc.num("fp32", finite=False), int8_acc=acc.num("int8_acc", finite=False),
            drop=acc.num("drop", finite=False), met=acc.bool("met"), fake_quantize_ops=acc.int("fake_quantize_ops"),
        ) if acc else None,
        check=check,
    )
    if check is not None and entry.weights_precision != "int8":
        raise f.error("check", f"is an INT8 check on a {entry.weights_precision} model")
    for part in (cal, q, acc, f):
        if part is not None:
            part.done()
    return entry


def _read_int8_check(f: _Fields | None) -> Int8Check | None:
    if f is None:
        return None
    check = Int8Check(
        data=f.str("data"), images=f.int("images", minimum=0), defective=f.int("defective", minimum=0),
        fp32_image_auroc=_percent(f, "fp32_image_auroc", _MISSING), int8_image_auroc=_percent(f, "int8_image_auroc", _MISSING),
        image_auroc_diff=f.num("image_auroc_diff"), fp32_pixel_aupro=_percent(f, "fp32_pixel_aupro", None),
        int8_pixel_aupro=_percent(f, "int8_pixel_aupro", None), pixel_aupro_diff=f.num("pixel_aupro_diff", None),
        flips=f.int("flips", minimum=0), max_score_diff=f.num("max_score_diff"), threshold=f.num("threshold"),
        bound=f.num("bound"), within_bound=f.bool("within_bound"), message=f.str("message", ""),
    )
    if check.defective > check.images or check.flips > check.images:
        raise f.error("images", f"is {check.images}, fewer than its defective images or flips")
    f.done()
    return check


def _percent(f: _Fields, key: str, default: Any) -> float | None:
    value = f.num(key, default)
    if value is not None and not 0.0 <= value <= 100.0:
        raise f.error(key, f"is {value}, expected a percentage in [0, 100]")
    return value


def _read_models(f: _Fields) -> dict[str, ModelEntry]:
    entries = f.entries("models")
    for name in entries:
        if name not in PRECISIONS:
            raise f.error(f"models.{name}", f"is not a precision this runtime knows ({', '.join(PRECISIONS)})")
    if not entries:
        raise f.error("models", "is empty: the bundle holds no model")
    return {name: _read_model(entries[name]) for name in PRECISIONS if name in entries}


def _read_calibration(f: _Fields | None) -> CalibrationInfo | None:
    if f is None:
        return None
    s = f.sub("spec")
    info = CalibrationInfo(
        file=f.str("file"), count=f.int("count", minimum=0),
        spec=CalibrationSpecRecord(source=s.str("source"), path=s.str("path", None), size=s.int("size", minimum=1),
                                   seed=s.int("seed", minimum=0), defects=s.num("defects", 0.0)),
    )
    s.done(), f.done()
    return info


def _read_tiling(f: _Fields | None) -> Tiling | None:
    if f is None:
        return None
    raw = f.mapping("config")
    try:
        config = TilingConfig.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise f.error("config", f"is not a valid tiling ({exc})") from None
    tiling = Tiling(config, f.str("heads_trained_on", "independent_tiles", TRAINED_ON))
    f.done()
    return tiling


def _read_supervision(f: _Fields | None) -> Supervision | None:
    if f is None:
        return None
    sup = Supervision(
        setting=f.str("setting"), source=f.str("source"), normal=f.int("normal", minimum=0),
        with_mask=f.int("with_mask", minimum=0), label_only=f.int("label_only", minimum=0),
        ignored=f.int("ignored", minimum=0), mask_fraction=f.num("mask_fraction", 1.0),
        pasted=f.int("pasted", 0, minimum=0),
    )
    f.done()
    return sup


def _read_collapse(f: _Fields | None) -> CollapseCheck | None:
    if f is None:
        return None
    check = CollapseCheck(
        normal=f.int("normal", minimum=0), defective=f.int("defective", minimum=0),
        score_spread=f.num("score_spread"), score_auroc=_fraction(f, "score_auroc"),
        map_max_auroc=_fraction(f, "map_max_auroc"), map_spread=f.num("map_spread"),
        collapsed_score=f.bool("collapsed_score"), collapsed_map=f.bool("collapsed_map"),
        action=f.str("action", "none", COLLAPSE_ACTIONS), message=f.str("message", ""),
    )
    f.done()
    return check


def _read_provenance(f: _Fields) -> Provenance:
    b, src = f.sub("backbone"), f.sub("source_checkpoint", optional=True)
    prov = Provenance(
        backbone=Backbone(b.str("name"), b.str("weights_source", None), b.str("fingerprint", None)),
        recipe=f.mapping("recipe", {}) or {},
        model_kind=f.str("model_kind", "ssn"), setting=f.str("setting", None),
        training_data=f.str("training_data", None), training_size=f.numbers("training_size", 2, None, integer=True),
        ssn_edge_version=f.str("ssn_edge_version", None),
        source_checkpoint=SourceCheckpoint(src.str("name"), src.str("sha256", None),
                                           src.int("epoch", None)) if src else None,
        created=f.str("created", None),
    )
    for part in (b, src, f):
        if part is not None:
            part.done()
    return prov


def _read_files(f: _Fields) -> dict[str, str]:
    files = f.mapping("files")
    for name, digest in files.items():
        if not isinstance(digest, str) or len(digest) != 64:
            raise f.error(f"files.{name}", f"is {_kind(digest)}, expected a sha256 hex digest")
    return dict(files)


def _read_v2(f: _Fields) -> BundleMetadata:
    f.str("schema"), f.int("schema_version")
    meta = BundleMetadata(
        input=_read_input(f.sub("input")), thresholds=_read_thresholds(f.sub("thresholds")),
        models=_read_models(f), provenance=_read_provenance(f.sub("provenance")),
        outputs=_read_outputs(f.sub("outputs")), postprocess=_read_postprocess(f.sub("postprocess")),
        score_range=_read_range(f.sub("score_range", optional=True)),
        map_range=_read_range(f.sub("map_range", optional=True)),
        calibration=_read_calibration(f.sub("calibration", optional=True)),
        tiling=_read_tiling(f.sub("tiling", optional=True)),
        supervision=_read_supervision(f.sub("supervision", optional=True)),
        files=_read_files(f),
        collapse_check=_read_collapse(f.sub("collapse_check", optional=True)),
    )
    f.done()
    for precision, entry in meta.models.items():
        for name in (entry.xml, entry.bin):
            if name not in meta.files:
                raise f.error(f"models.{precision}", f"names {name!r}, which has no checksum in 'files'")
    return meta


def read_metadata(data: Any, where: str) -> BundleMetadata:
    """The typed metadata of a parsed metadata.json (v1 migrated); `where` names the file in errors."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise BundleError(f"{where}: not an ssn-edge bundle (metadata 'schema' is not '{SCHEMA}')")
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{where}: metadata has no integer 'schema_version'")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"{where}: bundle schema version {version} was written by a newer ssn-edge; "
            f"this version reads schema {SCHEMA_VERSION} or older: upgrade ssn-edge on this machine"
        )
    if version < 1:
        raise BundleError(f"{where}: bundle schema version {version} is not one ssn-edge ever wrote")
    if version == 1:
        where = f"{where} (schema v1)"
        data = migrate_v1(data, where)
    return _read_v2(_Fields(data, "", where))


# --------------------------------------------------------------------------------------------------------------
# Schema v1 (ssn-edge before the typed schema) -> v2
# --------------------------------------------------------------------------------------------------------------

_V1_INPUT = ("name", "height", "width", "channels", "layout", "tiles", "color", "grayscale", "scale", "resize")
_V1_THRESHOLDS = ("image", "pixel", "pixel_method", "method", "placement", "source", "data")
_V1_WEIGHTS = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "int8_acc": "int8"}


def _v1_object(parent: dict, key: str, path: str, where: str, required: bool = False) -> dict | None:
    value = parent.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, dict):
        problem = "is missing" if key not in parent else f"is {_kind(value)}, expected an object"
        raise BundleError(f"{where}: field '{path}' {problem}")
    return value


def _pick(d: dict, keys: tuple[str, ...]) -> dict:
    return {k: d[k] for k in keys if k in d}


def _v1_input(v1: dict, where: str) -> dict:
    """v1 kept mean/std under input.normalize (hand-made bundles: under normalization); v2 in input."""
    inp = _v1_object(v1, "input", "input", where, required=True)
    normalize = _v1_object(inp, "normalize", "input.normalize", where) or {}
    legacy = _v1_object(v1, "normalization", "normalization", where) or {}
    out = _pick(inp, _V1_INPUT)
    for key, default in (("mean", InputSpec.mean), ("std", InputSpec.std)):
        out[key] = normalize.get(key, legacy.get(key, list(default)))
    return out


def _v1_model(precision: str, entry: dict, where: str) -> dict:
    out = _pick(entry, ("xml", "bin", "metrics"))
    out["weights_precision"] = entry.get("weights_precision", _V1_WEIGHTS.get(precision, "fp32"))
    calibration = _v1_object(entry, "calibration", f"models.{precision}.calibration", where)
    if calibration is not None:
        out["calibration"] = {"file": calibration.get("file"), "count": calibration.get("size")}
    if entry.get("quantization") is not None:
        out["quantization"] = entry["quantization"]
    report = _v1_object(entry, "report", f"models.{precision}.report", where)
    if report is not None:
        out["accuracy_control"] = {
            "metric": entry.get("metric", report.get("metric")), "max_drop": entry.get("max_drop"),
            "drop_type": entry.get("drop_type", "absolute"),
            **_pick(report, ("data", "fp32", "int8_acc", "drop", "met", "fake_quantize_ops")),
        }
    return out


def _v1_ranges(v1: dict, where: str) -> dict:
    """v1's 'normalization' block held the FP32 outputs' min/max: v2's score_range and map_range."""
    legacy = _v1_object(v1, "normalization", "normalization", where) or {}
    return {new: legacy[old] for old, new in (("image", "score_range"), ("map", "map_range")) if old in legacy}


def _v1_provenance(v1: dict, where: str) -> dict:
    backbone = v1.get("backbone")
    if isinstance(backbone, str):  # hand-made v1 bundles named it only
        backbone = {"name": backbone}
    recipe = v1.get("recipe") if isinstance(v1.get("recipe"), dict) else {}
    data = recipe.get("data") if isinstance(recipe.get("data"), dict) else {}
    out = {"backbone": backbone if backbone is not None else {"name": "unknown"}, "recipe": recipe,
           "model_kind": "ssn", "training_data": data.get("path"), "training_size": data.get("image_size")}
    out.update(_pick(v1, ("setting", "ssn_edge_version", "source_checkpoint", "created")))
    return out


def migrate_v1(v1: dict, where: str) -> dict:
    """A v1 metadata.json in the v2 layout (read_metadata then checks every field of the result)."""
    for key in ("postprocess", "thresholds", "models", "files"):
        _v1_object(v1, key, key, where, required=True)
    thresholds = _pick(v1["thresholds"], _V1_THRESHOLDS)
    if "images" in v1["thresholds"]:
        thresholds["count"] = v1["thresholds"]["images"]
    models = {p: _v1_model(p, _v1_object(v1["models"], p, f"models.{p}", where, required=True), where)
              for p in v1["models"]}
    tiling = v1.get("tiling")
    out = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "input": _v1_input(v1, where), "thresholds": thresholds, "models": models,
        "provenance": _v1_provenance(v1, where),
        "outputs": v1.get("outputs") or {"map": {}, "score": {}}, "postprocess": v1["postprocess"],
        **_v1_ranges(v1, where),
        "calibration": v1.get("calibration"),
        "tiling": {"config": tiling, "heads_trained_on": v1.get("heads_trained_on", "independent_tiles")}
        if tiling is not None else None,
        "supervision": v1.get("supervision"), "files": v1["files"],
    }
    return out

"""An inference request for one model version: checked against the model, scored through the runtime, answered.

Inputs (one per request):
* the IR's own input (its name, FP32, [N, 3, H, W]): tensors prepared as `preprocess.prepare` makes them;
* ``image_bytes`` (BYTES, [N]): encoded images (PNG, JPEG, BMP, TIFF...), decoded and prepared exactly as
  `ssn-edge predict` reads files (`preprocess.load_image_bytes`, `check_geometry`), any size: a camera client
  need not resize. The only input a tiled bundle takes.
Outputs: score (FP32 [N], in [0, 1]), decision (BOOL [N], score >= the bundle's image threshold), result
(BYTES [N]: ok | review | defect, review when the bundle has a review band and the score is in it), map_max
(FP32 [N]); map (FP32 [N, H, W], only when asked for: at the image's size, or the model input's for a tensor). Scoring goes through `Engine.predict_one` / `predict_tensor`: the runtime's own
preparation and postprocessing, so the numbers are those of `ssn-edge predict`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import openvino as ov

from ssn_edge.runtime.engine import Prediction
from ssn_edge.runtime.preprocess import check_geometry, load_image_bytes, to_unit_float
from ssn_edge.serve.protocol import InferRequest, InputTensor, OutputTensor, ProtocolError, RequestedOutput
from ssn_edge.serve.registry import ModelVersion

IMAGE_BYTES = "image_bytes"
OUTPUTS = {"score": "FP32", "decision": "BOOL", "result": "BYTES", "map_max": "FP32", "map": "FP32"}
DEFAULT_OUTPUTS = ("score", "decision", "result", "map_max")
MAX_BATCH = 16


@dataclass(frozen=True)
class Job:
    """What one request asks of a model: tensors (each (1, 3, H, W) float32) or encoded images, and outputs."""

    tensors: tuple[np.ndarray, ...] = ()
    images: tuple[bytes, ...] = ()
    outputs: tuple[RequestedOutput, ...] = ()


def _check_tensor(model: ModelVersion, t: InputTensor) -> tuple[np.ndarray, ...]:
    h, w = model.engine.input_size
    if model.engine.tiling is not None:
        raise ProtocolError(f"model {model.name!r} is tiled: send encoded images as {IMAGE_BYTES!r} (BYTES)")
    if t.datatype != "FP32":
        raise ProtocolError(f"input {t.name!r}: datatype {t.datatype}; the model takes FP32")
    if len(t.shape) != 4 or t.shape[1:] != (3, h, w) or not 1 <= t.shape[0] <= MAX_BATCH:
        raise ProtocolError(f"input {t.name!r}: shape {list(t.shape)}; the model takes [N, 3, {h}, {w}] with N in 1..{MAX_BATCH}")
    if not np.isfinite(t.data).all():
        raise ProtocolError(f"input {t.name!r}: holds NaN or infinite values")
    return tuple(np.ascontiguousarray(t.data[i:i + 1], dtype=np.float32) for i in range(t.shape[0]))


def _check_images(t: InputTensor) -> tuple[bytes, ...]:
    if t.datatype != "BYTES":
        raise ProtocolError(f"input {t.name!r}: datatype {t.datatype}; encoded images are BYTES")
    if len(t.shape) not in (1, 2) or (len(t.shape) == 2 and t.shape[1] != 1) or not 1 <= t.count <= MAX_BATCH:
        raise ProtocolError(f"input {t.name!r}: shape {list(t.shape)}; expected [N] (or [N, 1]) with N in 1..{MAX_BATCH}")
    return tuple(t.data)


def _wanted(model: ModelVersion, req: InferRequest) -> tuple[RequestedOutput, ...]:
    if req.outputs is None:
        return tuple(RequestedOutput(n, req.binary_output) for n in DEFAULT_OUTPUTS)
    for o in req.outputs:
        if o.name not in OUTPUTS:
            raise ProtocolError(f"model {model.name!r} has no output {o.name!r} (has: {', '.join(OUTPUTS)})")
    if len({o.name for o in req.outputs}) != len(req.outputs):
        raise ProtocolError("outputs name the same output twice")
    return req.outputs


def plan_job(model: ModelVersion, req: InferRequest) -> Job:
    """Check a parsed request against the model (ProtocolError: what is wrong, for a 400)."""
    if len(req.inputs) != 1:
        raise ProtocolError(f"model {model.name!r} takes one input ({model.input_name!r} or {IMAGE_BYTES!r}), got {len(req.inputs)}")
    t = req.inputs[0]
    outputs = _wanted(model, req)
    if t.name == IMAGE_BYTES:
        return Job(images=_check_images(t), outputs=outputs)
    if t.name == model.input_name:
        return Job(tensors=_check_tensor(model, t), outputs=outputs)
    raise ProtocolError(f"model {model.name!r} has no input {t.name!r} (inputs: {model.input_name!r}, {IMAGE_BYTES!r})")


def run_job(model: ModelVersion, job: Job, request: ov.InferRequest | None) -> list[Prediction]:
    """Score a job in the calling (worker) thread on its infer request. An image that cannot be used raises
    ImageError, the message it has in `ssn-edge predict`'s results."""
    engine = model.engine
    if job.tensors:
        return [engine.predict_tensor(x, request) for x in job.tensors]
    geometry = engine.input_size if engine.tiling is None else engine.tiling.image_size
    preds = []
    for i, data in enumerate(job.images):
        name = f"{IMAGE_BYTES}[{i}]"
        image, _info = load_image_bytes(data, name)
        check_geometry(image.shape, name, geometry)
        if engine.tiling is None:
            preds.append(engine.predict_one(to_unit_float(image), request, name))
        else:
            preds.append(engine.predict_tiled(image, name))
    return preds


def outputs_for(job: Job, preds: list[Prediction]) -> list[OutputTensor]:
    values: dict[str, np.ndarray] = {}
    for o in job.outputs:
        if o.name == "score":
            values[o.name] = np.array([p.score for p in preds], dtype=np.float32)
        elif o.name == "decision":
            values[o.name] = np.array([p.decision for p in preds], dtype=np.bool_)
        elif o.name == "result":
            values[o.name] = np.array([p.result for p in preds], dtype=np.object_)
        elif o.name == "map_max":
            values[o.name] = np.array([p.map_max for p in preds], dtype=np.float32)
        else:
            shapes = {p.anomaly_map.shape for p in preds}
            if len(shapes) > 1:
                raise ProtocolError(f"map output for images of different sizes {sorted(shapes)}: send them one per request")
            values[o.name] = np.stack([p.anomaly_map.astype(np.float32, copy=False) for p in preds])
    return [OutputTensor(o.name, OUTPUTS[o.name], values[o.name], o.binary) for o in job.outputs]


def model_metadata(model: ModelVersion, versions: list[int]) -> dict:
    """The KServe v2 model metadata response, with the bundle's metadata (thresholds, input spec) in parameters."""
    h, w = model.engine.input_size
    inputs = [{"name": IMAGE_BYTES, "datatype": "BYTES", "shape": [-1]}]
    if model.engine.tiling is None:
        inputs.insert(0, {"name": model.input_name, "datatype": "FP32", "shape": [-1, 3, h, w]})
    outputs = [{"name": n, "datatype": d, "shape": [-1, -1, -1] if n == "map" else [-1]} for n, d in OUTPUTS.items()]
    meta = model.bundle.metadata.to_dict()
    return {
        "name": model.name,
        "versions": [str(v) for v in versions],
        "platform": "openvino_ir",
        "inputs": inputs,
        "outputs": outputs,
        "parameters": {
            "version": str(model.version),
            "precision": model.precision,
            "inference_precision": model.engine.inference_precision,
            "image_threshold": model.engine.image_threshold,
            "pixel_threshold": model.engine.pixel_threshold,
            "bundle_metadata": _finite(meta),
        },
    }


def _finite(value):
    """JSON has no NaN/Infinity: such metadata values (an absent metric) are sent as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value

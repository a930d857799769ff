"""The KServe v2 / Open Inference Protocol wire format: inference requests and responses, JSON and binary.

A request body is JSON, or (the binary_data extension, what `tritonclient.http` sends by default) a JSON header
of `Inference-Header-Content-Length` bytes followed by the raw tensors of the inputs whose parameters give a
`binary_data_size`, in input order. Raw tensors are little-endian, row-major; a BYTES tensor is each element's
4-byte little-endian length, then its bytes. In JSON a BYTES element is a string; here an encoded image, so
it is base64 (raw image bytes are not text). Every way a body can be malformed raises ProtocolError (a 4xx
with a one-line reason), never anything else.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"

# KServe v2 datatypes -> NumPy (BYTES has none: a list of bytes objects).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
DATATYPES = (*DTYPES, "BYTES")


class ProtocolError(ValueError):
    """A request the server cannot take; status is the HTTP status to answer with (400 unless said)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any  # np.ndarray shaped as `shape`, or for BYTES a list of bytes (one per element)

    @property
    def count(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: tuple[InputTensor, ...]
    outputs: tuple[RequestedOutput, ...] | None  # None: the model's default outputs
    binary_output: bool  # the request-level binary_data_output (for default outputs)


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    data: np.ndarray  # shaped; BYTES: an object array of str
    binary: bool = False


# -- requests ---------------------------------------------------------------------------------------------


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise ProtocolError(f"{HEADER_LENGTH} {header_length!r} is not a number") from None
    if not 0 < n <= len(body):
        raise ProtocolError(f"{HEADER_LENGTH} {n} is outside the body's {len(body)} bytes")
    return body[:n], body[n:]


def _json_object(text: bytes) -> dict:
    try:
        value = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"request body is not valid JSON ({exc})") from None
    except RecursionError:
        raise ProtocolError("request body is not valid JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"request body must be a JSON object, got a {type(value).__name__}")
    return value


def _parameters(where: str, entry: dict) -> dict:
    params = entry.get("parameters", {})
    if not isinstance(params, dict):
        raise ProtocolError(f"{where}: parameters must be an object")
    return params


def _shape(name: str, raw: Any) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw):
        raise ProtocolError(f"input {name!r}: shape must be a list of non-negative integers, got {raw!r}"[:200])
    return tuple(raw)


def _bytes_elements(name: str, blob: bytes, count: int) -> list[bytes]:
    """A raw BYTES tensor: (4-byte little-endian length, bytes) per element; count: how many the shape says."""
    out, pos = [], 0
    while pos < len(blob):
        if len(out) == count:  # stop here: a body of empty elements would otherwise be walked to its end
            raise ProtocolError(f"input {name!r}: more BYTES elements than its shape's {count}")
        if pos + 4 > len(blob):
            raise ProtocolError(f"input {name!r}: BYTES data ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        if pos + n > len(blob):
            raise ProtocolError(f"input {name!r}: BYTES element of {n} bytes runs past the end of its data")
        out.append(blob[pos:pos + n])
        pos += n
    return out


def _from_binary(name: str, datatype: str, shape: tuple[int, ...], blob: bytes) -> Any:
    count = math.prod(shape)
    if datatype == "BYTES":
        elements = _bytes_elements(name, blob, count)
        if len(elements) != count:
            raise ProtocolError(f"input {name!r}: {len(elements)} BYTES elements for shape {list(shape)} ({count})")
        return elements
    dtype = DTYPES[datatype]
    if len(blob) != count * dtype.itemsize:
        raise ProtocolError(f"input {name!r}: {len(blob)} bytes of binary data for shape {list(shape)} of {datatype} "
                            f"(expected {count * dtype.itemsize})")
    return np.frombuffer(blob, dtype=dtype).reshape(shape)


def _from_json(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> Any:
    count = math.prod(shape)
    if datatype == "BYTES":
        items = data if isinstance(data, list) else [data]
        if len(items) != count or not all(isinstance(s, str) for s in items):
            raise ProtocolError(f"input {name!r}: BYTES data must be a list of {count} base64 strings for shape {list(shape)}")
        try:
            return [base64.b64decode(s, validate=True) for s in items]
        except (binascii.Error, ValueError):
            raise ProtocolError(f"input {name!r}: BYTES data in JSON must be base64 (an encoded image is not text)") from None
    try:
        array = np.asarray(data, dtype=np.float64 if datatype.startswith("FP") else None)
    except (ValueError, TypeError):
        raise ProtocolError(f"input {name!r}: data is not a (nested) list of numbers") from None
    if array.dtype.kind not in "biuf":
        raise ProtocolError(f"input {name!r}: data is not a (nested) list of numbers")
    if array.size != count:
        raise ProtocolError(f"input {name!r}: {array.size} values for shape {list(shape)} ({count})")
    return array.reshape(shape).astype(DTYPES[datatype])


def _input(entry: Any, index: int, binary: memoryview, offset: int) -> tuple[InputTensor, int]:
    if not isinstance(entry, dict):
        raise ProtocolError(f"inputs[{index}] must be an object with name, shape, datatype and data")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"inputs[{index}]: name must be a non-empty string")
    datatype = entry.get("datatype")
    if datatype not in DATATYPES:
        raise ProtocolError(f"input {name!r}: datatype {datatype!r} is not a KServe v2 datatype ({', '.join(DATATYPES)})"[:240])
    shape = _shape(name, entry.get("shape"))
    size = _parameters(f"input {name!r}", entry).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ProtocolError(f"input {name!r}: binary_data_size must be a non-negative integer")
        if offset + size > len(binary):
            raise ProtocolError(f"input {name!r}: binary_data_size {size} runs past the {len(binary) - offset} bytes left in the body")
        return InputTensor(name, datatype, shape, _from_binary(name, datatype, shape, bytes(binary[offset:offset + size]))), offset + size
    if "data" not in entry:
        raise ProtocolError(f"input {name!r}: no data (neither 'data' nor parameters.binary_data_size)")
    return InputTensor(name, datatype, shape, _from_json(name, datatype, shape, entry["data"])), offset


def _outputs(raw: Any, default_binary: bool) -> tuple[RequestedOutput, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in raw):
        raise ProtocolError("outputs must be a list of objects with a name")
    out = []
    for o in raw:
        binary = _parameters(f"output {o['name']!r}", o).get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise ProtocolError(f"output {o['name']!r}: binary_data must be true or false")
        out.append(RequestedOutput(o["name"], binary))
    return tuple(out)


def parse_request(body: bytes, header_length: str | None = None) -> InferRequest:
    """An inference request body (and its Inference-Header-Content-Length header, if sent) -> InferRequest."""
    head, binary = _split_body(body, header_length)
    doc = _json_object(head)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError("request has no inputs (expected a non-empty 'inputs' list)")
    params = _parameters("request", doc)
    default_binary = params.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise ProtocolError("parameters.binary_data_output must be true or false")
    view, offset, tensors = memoryview(binary), 0, []
    for i, entry in enumerate(inputs):
        tensor, offset = _input(entry, i, view, offset)
        tensors.append(tensor)
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data after the inputs that declare binary_data_size")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ProtocolError(f"inputs name the same tensor twice ({', '.join(names)})")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("id must be a string")
    return InferRequest(request_id, tuple(tensors), _outputs(doc.get("outputs"), default_binary), default_binary)


# -- responses --------------------------------------------------------------------------------------------


def _bytes_blob(data: np.ndarray) -> bytes:
    """A BYTES output (an object array of str) in the raw form: 4-byte little-endian length, then the bytes."""
    items = [str(v).encode() for v in data.reshape(-1)]
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def encode_response(model_name: str, model_version: str, request_id: str | None,
                    outputs: list[OutputTensor]) -> tuple[bytes, int | None]:
    """The response body and, when any output goes binary, the length of its JSON header (the value of
    Inference-Header-Content-Length; None for a pure JSON body)."""
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    entries, blobs = [], []
    for out in outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.data.shape)}
        if out.binary:
            blob = _bytes_blob(out.data) if out.datatype == "BYTES" else \
                np.ascontiguousarray(out.data, dtype=DTYPES[out.datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = out.data.reshape(-1).tolist()
        entries.append(entry)
    doc["outputs"] = entries
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)

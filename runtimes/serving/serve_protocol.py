"""The Open Inference Protocol (KServe v2) REST messages for one classifier: parse requests, encode answers.

Inputs (exactly one per request):
    `input`  FP32 [N, 3, R, R], already preprocessed as the manifest says
    `image`  BYTES [N] (or [N, 1]): encoded image files, decoded and preprocessed like `Predictor.predict`
Output `logits` FP32 [N, classes]; requested with `"parameters": {"classification": K}` it becomes BYTES
[N, K] of "score:index:label" (score = the logit, as Triton reports it), best first.

Tensors travel as JSON `data` or with the binary-data extension: the JSON header is followed by the raw
tensors, its length in the `Inference-Header-Content-Length` header, each tensor's size in
`parameters.binary_data_size`; BYTES elements are a 4-byte little-endian length and the bytes.
Pure functions: no web framework here, so the same code serves any transport.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bitdeploy.core.errors import BitdeployError
from bitdeploy.runtimes.predictor import softmax

HEADER_LENGTH = "Inference-Header-Content-Length"
VERSION = "1"


class ProtocolError(BitdeployError):
    """A malformed inference request: the client's fault, answered with 400."""


@dataclass(frozen=True)
class ModelInfo:
    """What the server says about its one model."""

    name: str
    platform: str
    input_name: str
    input_shape: tuple[int, ...]  # C, H, W
    output_name: str
    labels: list[str]
    image_input: str = "image"

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [VERSION],
            "platform": self.platform,
            "inputs": [
                {"name": self.input_name, "datatype": "FP32", "shape": [-1, *self.input_shape]},
                {"name": self.image_input, "datatype": "BYTES", "shape": [-1]},
            ],
            "outputs": [{"name": self.output_name, "datatype": "FP32", "shape": [-1, len(self.labels)]}],
        }


@dataclass(frozen=True)
class Output:
    name: str
    binary: bool
    classification: int = 0  # top K as "score:index:label" strings; 0 = the raw tensor


@dataclass
class InferRequest:
    id: str | None
    tensor: np.ndarray | None = None  # FP32 NCHW, for `input`
    images: list[bytes] | None = None  # encoded files, for `image`
    outputs: list[Output] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.images) if self.images is not None else len(self.tensor) if self.tensor is not None else 0


# -- requests ---------------------------------------------------------------------------------------------
def parse_infer(body: bytes, header_length: str | None, model: ModelInfo) -> InferRequest:
    """Body (+ the Inference-Header-Content-Length header) -> an InferRequest, or a one-line ProtocolError."""
    head, binary = _split(body, header_length)
    try:
        msg = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"request is not valid JSON ({exc}); send an inference request object") from exc
    if not isinstance(msg, dict):
        raise ProtocolError("request must be a JSON object with an `inputs` list")
    params = _params(msg, "request")
    inputs = msg.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(
            f"send exactly one input: `{model.input_name}` (FP32 tensor) or `{model.image_input}` (BYTES image files)"
        )
    tensor = inputs[0]
    name = tensor.get("name")
    raw = _tensor_bytes(tensor, binary, name)
    req_id = msg.get("id")
    req = InferRequest(id=str(req_id) if req_id is not None else None)
    if name == model.input_name:
        req.tensor = fp32_input(tensor, raw, model)
    elif name == model.image_input:
        req.images = bytes_input(tensor, raw)
    else:
        raise ProtocolError(f"unknown input {name!r}; this model takes `{model.input_name}` or `{model.image_input}`")
    req.outputs = _outputs(msg.get("outputs"), bool(params.get("binary_data_output", False)), model)
    return req


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        n = -1
    if not 0 <= n <= len(body):
        raise ProtocolError(
            f"{HEADER_LENGTH} is {header_length!r} but the body has {len(body)} bytes; send the JSON header's length"
        )
    return body[:n], body[n:]


def _params(obj: dict[str, Any], what: str) -> dict[str, Any]:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise ProtocolError(f"{what} `parameters` must be a JSON object")
    return params


def _tensor_bytes(tensor: dict[str, Any], binary: bytes, name: Any) -> bytes | None:
    """The input's binary data (the whole binary section: only one input is allowed), or None for JSON data."""
    size = _params(tensor, f"input {name!r}").get("binary_data_size")
    if size is None:
        if binary:
            raise ProtocolError(
                f"{len(binary)} bytes follow the JSON header but input {name!r} has no binary_data_size"
            )
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size != len(binary):
        raise ProtocolError(
            f"input {name!r} says binary_data_size {size!r} but {len(binary)} bytes follow the JSON header"
        )
    return binary


def _shape(tensor: dict[str, Any]) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(
            f"input {tensor.get('name')!r} needs `shape`, a list of non-negative integers (got {shape!r})"
        )
    return shape


def fp32_input(tensor: dict[str, Any], raw: bytes | None, model: ModelInfo) -> np.ndarray:
    """The `input` tensor ({name, datatype, shape, data}) or its raw little-endian bytes, checked against the model."""
    name, shape = tensor.get("name"), _shape(tensor)
    want = "x".join(map(str, model.input_shape))
    if tensor.get("datatype") != "FP32":
        raise ProtocolError(f"input {name!r} must have datatype FP32 (got {tensor.get('datatype')!r})")
    if len(shape) != 4 or shape[0] < 1 or tuple(shape[1:]) != model.input_shape:
        raise ProtocolError(
            f"input {name!r} must have shape [N, {', '.join(map(str, model.input_shape))}] with N >= 1 (got {shape}); preprocess to Nx{want}"
        )
    count = int(np.prod(shape))
    if raw is not None:
        if len(raw) != count * 4:
            raise ProtocolError(
                f"input {name!r} of shape {shape} needs {count * 4} bytes of FP32 data (got {len(raw)})"
            )
        return np.frombuffer(raw, "<f4").astype(np.float32, copy=False).reshape(shape)
    data = tensor.get("data")
    if not isinstance(data, list):
        raise ProtocolError(f"input {name!r} needs `data` (a list of numbers) or binary data")
    try:
        arr = np.asarray(data, dtype=np.float32)
    except (ValueError, TypeError):
        raise ProtocolError(f"input {name!r}: `data` must be numbers only (nested or flat)") from None
    if arr.size != count:
        raise ProtocolError(f"input {name!r} of shape {shape} needs {count} numbers (got {arr.size})")
    return arr.reshape(shape)


def bytes_input(tensor: dict[str, Any], raw: bytes | None) -> list[bytes]:
    """The `image` tensor's elements, from length-prefixed raw bytes or a `data` list of str/bytes."""
    name, shape = tensor.get("name"), _shape(tensor)
    if tensor.get("datatype") != "BYTES":
        raise ProtocolError(
            f"input {name!r} must have datatype BYTES (got {tensor.get('datatype')!r}): the encoded image files"
        )
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
        raise ProtocolError(f"input {name!r} must have shape [N] or [N, 1] with N >= 1 (got {shape})")
    if raw is not None:
        items = deserialize_bytes(raw)
    else:
        data = tensor.get("data")
        if not isinstance(data, list) or not all(isinstance(s, (str, bytes)) for s in data):
            raise ProtocolError(f"input {name!r} needs `data` (a list of strings) or, for image files, binary data")
        items = [s.encode("utf-8") if isinstance(s, str) else s for s in data]
    if len(items) != shape[0]:
        raise ProtocolError(f"input {name!r} has shape {shape} but holds {len(items)} element(s)")
    return items


def _outputs(spec: Any, binary_default: bool, model: ModelInfo) -> list[Output]:
    if spec is None or spec == []:  # unspecified: every output
        return [Output(model.output_name, binary_default)]
    if not isinstance(spec, list) or not all(isinstance(o, dict) for o in spec):
        raise ProtocolError("`outputs` must be a list of objects")
    outs = []
    for o in spec:
        if o.get("name") != model.output_name:
            raise ProtocolError(f"unknown output {o.get('name')!r}; this model has `{model.output_name}`")
        p = _params(o, f"output {o.get('name')!r}")
        k = p.get("classification", 0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ProtocolError(f"classification must be a positive integer (got {k!r})")
        outs.append(Output(model.output_name, bool(p.get("binary_data", binary_default)), min(k, len(model.labels))))
    return outs


# -- answers ----------------------------------------------------------------------------------------------
def classify(logits: np.ndarray, k: int, labels: list[str]) -> np.ndarray:
    """Top-k per row as "score:index:label" bytes, in the order `Predictor.postprocess` ranks them."""
    top = np.argsort(-softmax(logits), axis=1, kind="stable")[:, :k]
    rows = [[f"{float(logits[i, j]):.6f}:{j}:{labels[j]}".encode() for j in idx] for i, idx in enumerate(top)]
    out = np.empty((len(rows), k), dtype=object)
    out[:] = rows
    return out


def output_value(out: Output, logits: np.ndarray, labels: list[str]) -> tuple[str, np.ndarray]:
    """(datatype, array) of one requested output: the logits, or their top-K "score:index:label" strings."""
    if out.classification:
        return "BYTES", classify(logits, out.classification, labels)
    return "FP32", logits


def raw_bytes(datatype: str, value: np.ndarray) -> bytes:
    return serialize_bytes(value.ravel()) if datatype == "BYTES" else np.ascontiguousarray(value, "<f4").tobytes()


def encode_answer(model: ModelInfo, req: InferRequest, logits: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (JSON, or JSON + binary tensors with Inference-Header-Content-Length)."""
    entries, blobs = [], []
    for out in req.outputs:
        datatype, value = output_value(out, logits, model.labels)
        entry: dict[str, Any] = {"name": out.name, "datatype": datatype, "shape": list(value.shape)}
        if out.binary:
            blob = raw_bytes(datatype, value)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = [b.decode() for b in value.ravel()] if datatype == "BYTES" else value.ravel().tolist()
        entries.append(entry)
    msg: dict[str, Any] = {"model_name": model.name, "model_version": VERSION, "outputs": entries}
    if req.id is not None:
        msg["id"] = req.id
    head = json.dumps(msg, separators=(",", ":")).encode()
    if not blobs:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(blobs), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


def serialize_bytes(items: Any) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def deserialize_bytes(raw: bytes) -> list[bytes]:
    items, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise ProtocolError("BYTES data ends inside an element's 4-byte length; send length-prefixed elements")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise ProtocolError(f"BYTES element of {n} bytes runs past the end of the data ({len(raw) - pos - 4} left)")
        items.append(raw[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return items


DEFAULT_TOP_K = 5


def top_k_param(values: list[str]) -> int:
    """/v1/predict's `top_k` query parameter (the last one given), default DEFAULT_TOP_K."""
    if not values:
        return DEFAULT_TOP_K
    try:
        k = int(values[-1])
    except ValueError:
        raise BitdeployError(f"top_k must be a positive integer (got {values[-1]!r})") from None
    if k < 1:
        raise BitdeployError(f"top_k must be a positive integer (got {k})")
    return k

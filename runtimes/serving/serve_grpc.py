"""The Open Inference Protocol (KServe v2) over gRPC, beside the REST server (`bitdeploy serve --grpc-port N`).

The service and messages are the protocol's public `grpc_service.proto`, as compiled in `tritonclient[grpc]`
(`service_pb2`, `service_pb2_grpc`); the same `Service` (model, batcher, metrics) answers both transports.
Implemented: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer (FP32 `input` or
BYTES `image`, as raw contents or typed contents; the classification parameter). Other RPCs answer UNIMPLEMENTED.
Each RPC runs on one of gRPC's threads, which also decodes its images; past `max_connections` RPCs in flight,
RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np

from bitdeploy import __version__
from bitdeploy.core.errors import BitdeployError, require
from bitdeploy.runtimes.serving.serve_protocol import (
    VERSION,
    InferRequest,
    Output,
    ProtocolError,
    bytes_input,
    fp32_input,
    output_value,
    raw_bytes,
)

grpc = require("grpc", "grpc", "gRPC for `bitdeploy serve --grpc-port` (grpcio)")
pb = require("tritonclient.grpc.service_pb2", "grpc", "the v2 gRPC messages (tritonclient[grpc])")
pb_grpc = require("tritonclient.grpc.service_pb2_grpc", "grpc", "the v2 gRPC service (tritonclient[grpc])")

from bitdeploy.runtimes.serving.serve import Service  # noqa: E402


class _Abort(Exception):
    def __init__(self, code: Any, message: str) -> None:
        super().__init__(message)
        self.code = code


def request_from_proto(req: Any, service: Service) -> InferRequest:
    """A ModelInferRequest -> the same InferRequest the REST route builds (images not decoded yet)."""
    model = service.model
    if len(req.inputs) != 1:
        raise ProtocolError(
            f"send exactly one input: `{model.input_name}` (FP32 tensor) or `{model.image_input}` (BYTES image files)"
        )
    if len(req.raw_input_contents) > 1:
        raise ProtocolError(f"{len(req.raw_input_contents)} raw_input_contents for one input")
    t = req.inputs[0]
    raw = req.raw_input_contents[0] if req.raw_input_contents else None
    tensor: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
    out = InferRequest(id=req.id or None)
    if t.name == model.input_name:
        tensor["data"] = list(t.contents.fp32_contents)
        out.tensor = fp32_input(tensor, raw, model)
    elif t.name == model.image_input:
        tensor["data"] = list(t.contents.bytes_contents)
        out.images = bytes_input(tensor, raw)
    else:
        raise ProtocolError(f"unknown input {t.name!r}; this model takes `{model.input_name}` or `{model.image_input}`")
    for o in req.outputs or [None]:
        if o is not None and o.name != model.output_name:
            raise ProtocolError(f"unknown output {o.name!r}; this model has `{model.output_name}`")
        k = o.parameters["classification"].int64_param if o is not None and "classification" in o.parameters else 0
        if k < 0:
            raise ProtocolError(f"classification must be a positive integer (got {k})")
        out.outputs.append(Output(model.output_name, binary=True, classification=min(int(k), len(model.labels))))
    return out


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc,name-defined]
    def __init__(self, service: Service) -> None:
        self.service = service

    def _call(self, method: str, context: Any, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        code = "OK"
        try:
            return fn()
        except _Abort as exc:
            code = exc.code.name
            context.abort(exc.code, str(exc))
        except BitdeployError as exc:
            code = "INVALID_ARGUMENT"
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:
            code = "INTERNAL"
            self.service.failures += 1
            sys.stderr.write(f"bitdeploy serve: gRPC {method} failed: {type(exc).__name__}: {exc}\n")
            context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log")
        finally:
            self.service.metrics.observe_request(f"grpc {method}", code, time.perf_counter() - t0, error=code != "OK")
            self.service.answered += 1

    def _check_model(self, name: str, version: str) -> None:
        model = self.service.model
        if name != model.name:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}; this server serves {model.name!r}")
        if version not in ("", VERSION):
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"model {name!r} has no version {version!r}; use version 1")

    def _ready(self) -> bool:
        return not self.service.draining and not self.service.predictor.closed

    def ServerLive(self, request: Any, context: Any) -> Any:
        return self._call("ServerLive", context, lambda: pb.ServerLiveResponse(live=True))

    def ServerReady(self, request: Any, context: Any) -> Any:
        return self._call("ServerReady", context, lambda: pb.ServerReadyResponse(ready=self._ready()))

    def ModelReady(self, request: Any, context: Any) -> Any:
        def answer() -> Any:
            self._check_model(request.name, request.version)
            return pb.ModelReadyResponse(ready=self._ready())

        return self._call("ModelReady", context, answer)

    def ServerMetadata(self, request: Any, context: Any) -> Any:
        return self._call(
            "ServerMetadata",
            context,
            lambda: pb.ServerMetadataResponse(
                name="bitdeploy", version=__version__, extensions=["binary_tensor_data", "classification"]
            ),
        )

    def ModelMetadata(self, request: Any, context: Any) -> Any:
        def answer() -> Any:
            self._check_model(request.name, request.version)
            meta = self.service.model.metadata()
            tensors = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta["name"],
                versions=meta["versions"],
                platform=meta["platform"],
                inputs=[tensors(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["inputs"]],
                outputs=[tensors(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["outputs"]],
            )

        return self._call("ModelMetadata", context, answer)

    def ModelInfer(self, request: Any, context: Any) -> Any:
        def answer() -> Any:
            service = self.service
            self._check_model(request.model_name, request.model_version)
            service.batcher.expect()
            try:
                req = request_from_proto(request, service)
                batch = service.images_to_batch(req.images) if req.images is not None else req.tensor
                if batch is None:
                    raise ProtocolError(f"send an input: `{service.model.input_name}` or `{service.model.image_input}`")
            except BaseException:
                service.batcher.forget()
                raise
            future = service.batcher.submit(batch, expected=True)
            try:
                logits = future.result(service.options.timeout)
            except FutureTimeout:
                raise _Abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"no engine answer within {service.options.timeout:g} s; the server is overloaded, retry later",
                ) from None
            response = pb.ModelInferResponse(model_name=service.model.name, model_version=VERSION, id=request.id)
            for out in req.outputs:
                datatype, value = output_value(out, logits, service.model.labels)
                response.outputs.add(name=out.name, datatype=datatype, shape=list(value.shape))
                response.raw_output_contents.append(raw_bytes(datatype, np.asarray(value)))
            return response

        return self._call("ModelInfer", context, answer)


class GrpcServer:
    """The gRPC transport for `service`, listening on host:port (0 picks a free port)."""

    def __init__(self, service: Service, host: str, port: int) -> None:
        opts = service.options
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=min(64, opts.max_connections), thread_name_prefix="bitdeploy-grpc"),
            maximum_concurrent_rpcs=opts.max_connections,
            options=[
                ("grpc.max_receive_message_length", opts.max_body),
                ("grpc.max_send_message_length", opts.max_body),
            ],
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(service), self.server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError as exc:
            raise BitdeployError(f"cannot listen for gRPC on {address} ({exc}); pick another --grpc-port") from exc
        if not self.port:
            raise BitdeployError(f"cannot listen for gRPC on {address}; pick another --grpc-port")
        self.host = host
        self.server.start()
        service.on_close.append(self.stop)
        self._grace = opts.drain_timeout

    def stop(self) -> None:
        """Refuse new RPCs, let those in flight finish (up to the drain limit)."""
        self.server.stop(self._grace).wait(self._grace + 1)

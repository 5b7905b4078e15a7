"""`bitdeploy serve`: the Open Inference Protocol (KServe v2) over REST, with dynamic batching and metrics.

An ASGI app (Starlette) on uvicorn; needs the `serve` extra. Routes:

    GET  /v2/health/live, /v2/health/ready, /v2 (server metadata)
    GET  /v2/models/{name}[/versions/1], .../ready           model metadata, readiness
    POST /v2/models/{name}[/versions/1]/infer                `input` FP32 or `image` BYTES -> `logits`
    POST /v1/predict[?top_k=K]  (raw image bytes)           GET /healthz        (the original JSON routes)
    GET  /metrics                                            Prometheus text format

Requests are read (bounded by --max-body-mb and --timeout), parsed and preprocessed on a pool of `workers`
threads, then queued for the one engine thread (`Batcher`), which runs them in batches of up to
`max_batch`. Every error is answered with JSON `{"error": ...}` and the server keeps running; uvicorn
answers 503 past `max_connections`, and SIGTERM drains the requests in flight before exiting.
There is no authentication: bind to loopback unless a proxy in front provides it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np

from bitdeploy import __version__
from bitdeploy.core.errors import BitdeployError, ImageError, require
from bitdeploy.runtimes.predictor import Predictor
from bitdeploy.runtimes.serving.batcher import Batcher
from bitdeploy.runtimes.serving.serve_options import ServeOptions
from bitdeploy.runtimes.serving.serve_protocol import (
    HEADER_LENGTH,
    InferRequest,
    ModelInfo,
    ProtocolError,
    encode_answer,
    parse_infer,
    top_k_param,
)

require("starlette", "serve", "the HTTP server for `bitdeploy serve` (starlette)")
require("uvicorn", "serve", "the HTTP server for `bitdeploy serve` (uvicorn)")
require("prometheus_client", "serve", "the metrics of `bitdeploy serve` (prometheus-client)")

import uvicorn  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402
from starlette.requests import ClientDisconnect, Request  # noqa: E402
from starlette.responses import JSONResponse, Response  # noqa: E402
from starlette.routing import Route  # noqa: E402

from bitdeploy.runtimes.serving.serve_metrics import ROUTE_KEY, MetricsMiddleware, ServeMetrics  # noqa: E402

CHEAP_HEADER = 4096  # JSON headers up to this size are parsed on the event loop


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Service:
    """The state behind the routes: the predictor, the batcher, the preprocessing pool and the metrics."""

    def __init__(self, predictor: Predictor, options: ServeOptions) -> None:
        options.validate()
        self.predictor = predictor
        self.options = options
        spec = predictor.input_spec
        self.model = ModelInfo(
            name=options.model_name or predictor.name,
            platform=f"bitdeploy_{predictor.backend_name}",
            input_name=spec.name,
            input_shape=tuple(int(d or -1) for d in (spec.shape or (None,) * 4)[1:]),
            output_name=predictor.manifest.output.name,
            labels=predictor.labels,
        )
        self.metrics = ServeMetrics(self.model.name)
        self.pool = ThreadPoolExecutor(options.workers, thread_name_prefix="bitdeploy-preprocess")
        self.batcher = Batcher(
            predictor.infer_padded,
            min(options.max_batch, predictor.max_batch),
            options.max_delay_ms / 1e3,
            on_batch=self.metrics.observe_batch,
            on_queue=self.metrics.set_queue_depth,
        )
        self.draining = False
        self.on_close: list[Callable[[], None]] = []  # other transports, drained before the batcher stops
        self.answered = 0
        self.failures = 0  # 5xx: engine failures and bugs

    def close(self) -> None:
        for stop in self.on_close:
            stop()
        self.batcher.close(self.options.drain_timeout)
        self.pool.shutdown(wait=True)

    # -- helpers ----------------------------------------------------------------------------------------
    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, partial(fn, *args))

    async def read_body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is None and "chunked" not in request.headers.get("transfer-encoding", "").lower():
            raise HTTPError(411, "missing Content-Length; send the body with a length")
        limit = self.options.max_body
        if length is not None and int(length) > limit:  # uvicorn has already refused a non-numeric length
            raise HTTPError(
                413, f"body of {length} bytes is over the {limit}-byte limit; send less or raise --max-body-mb"
            )
        chunks, size = [], 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HTTPError(413, f"body is over the {limit}-byte limit; send less or raise --max-body-mb")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.options.timeout)
        except asyncio.TimeoutError:
            raise HTTPError(
                408, f"body not received within {self.options.timeout:g} s; send it faster or raise --timeout"
            ) from None
        except ClientDisconnect:
            raise HTTPError(400, "the client closed the connection before sending the whole body") from None
        return b"".join(chunks)

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        future = self.batcher.submit(batch, expected=True)
        try:
            logits: np.ndarray = await asyncio.wait_for(asyncio.wrap_future(future), self.options.timeout)
        except asyncio.TimeoutError:
            raise HTTPError(
                503, f"no engine answer within {self.options.timeout:g} s; the server is overloaded, retry later"
            ) from None
        return logits

    async def preprocessed(
        self, request: Request, prepare: Callable[[bytes], Any], cheap: Callable[[bytes], bool] = lambda body: False
    ) -> Any:
        """Read the body and run `prepare` on it, announced to the batcher so a batch may wait for it.

        `prepare` runs in the pool unless `cheap(body)`: then on the event loop, as each thread hop costs a
        wake-up, which on a busy machine is more than parsing a small JSON header.
        """
        self.batcher.expect()
        try:
            body = await self.read_body(request)
            return prepare(body) if cheap(body) else await self.run(prepare, body)
        except BaseException:
            self.batcher.forget()
            raise

    def images_to_batch(self, images: list[bytes]) -> np.ndarray:
        arrays = []
        for i, data in enumerate(images):
            try:
                arrays.append(self.predictor.preprocess(data))
            except ImageError as exc:
                where = (
                    f"image {i + 1} of {len(images)} ({len(data)} bytes)"
                    if len(images) > 1
                    else f"image ({len(data)} bytes)"
                )
                raise ProtocolError(str(exc).replace(f"<{len(data)} bytes>", where, 1)) from exc
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

    def check_model(self, request: Request) -> None:
        name = request.path_params["name"]
        version = request.path_params.get("version")
        if name != self.model.name:
            raise HTTPError(404, f"unknown model {name!r}; this server serves {self.model.name!r}")
        if version is not None and version != "1":
            raise HTTPError(404, f"model {name!r} has no version {version!r}; use version 1")

    # -- v2 routes --------------------------------------------------------------------------------------
    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        ok = not self.draining and not self.predictor.closed
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse(
            {"name": "bitdeploy", "version": __version__, "extensions": ["binary_tensor_data", "classification"]}
        )

    async def model_metadata(self, request: Request) -> Response:
        self.check_model(request)
        return JSONResponse(self.model.metadata())

    async def model_ready(self, request: Request) -> Response:
        self.check_model(request)
        return await self.ready(request)

    async def v2_infer(self, request: Request) -> Response:
        self.check_model(request)
        header_length = request.headers.get(HEADER_LENGTH)

        def prepare(body: bytes) -> tuple[InferRequest, np.ndarray]:
            req = parse_infer(body, header_length, self.model)
            batch = self.images_to_batch(req.images) if req.images is not None else req.tensor
            assert batch is not None
            return req, batch

        def cheap(body: bytes) -> bool:  # a binary FP32 tensor behind a small JSON header
            head = body[: int(header_length)] if header_length and header_length.isdigit() else b""
            return 0 < len(head) <= CHEAP_HEADER and b'"BYTES"' not in head

        req, batch = await self.preprocessed(request, prepare, cheap)
        logits = await self.infer(batch)
        body, headers = encode_answer(self.model, req, logits)
        return Response(body, headers=headers)

    # -- the original routes ---------------------------------------------------------------------------
    async def healthz(self, request: Request) -> Response:
        p = self.predictor
        return JSONResponse(
            {
                "status": "ok",
                "model": self.model.name,
                "backend": p.backend_name,
                "labels": len(p.labels),
                "precision": p.manifest.target.precision,
                "workers": self.options.workers,
            }
        )

    async def v1_predict(self, request: Request) -> Response:
        top_k = top_k_param(request.query_params.getlist("top_k"))

        def prepare(body: bytes) -> tuple[np.ndarray, float]:
            if not body:
                raise ImageError("empty request body; POST the bytes of an image file")
            t0 = time.perf_counter()
            try:
                batch = self.predictor.preprocess(body)
            except ImageError as exc:
                raise ImageError(
                    str(exc).replace(f"<{len(body)} bytes>", f"request body ({len(body)} bytes)", 1)
                ) from exc
            return batch, time.perf_counter() - t0

        batch, pre_s = await self.preprocessed(request, prepare)
        t0 = time.perf_counter()
        logits = await self.infer(batch)
        infer_s = time.perf_counter() - t0
        predictions = self.predictor.postprocess(logits, top_k)[0]
        return JSONResponse(
            {
                "model": self.model.name,
                "predictions": [{"label": label, "probability": prob} for label, prob in predictions],
                "timing": {"preprocess_ms": round(pre_s * 1e3, 3), "infer_ms": round(infer_s * 1e3, 3)},
            }
        )

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)


def _answers_errors(
    service: Service, route: str, handler: Callable[[Request], Awaitable[Response]]
) -> Callable[[Request], Awaitable[Response]]:
    """Every failure becomes a JSON answer: 4xx for the client's mistakes, 500 (one log line) for ours."""

    async def endpoint(request: Request) -> Response:
        request.scope[ROUTE_KEY] = route  # the metrics label: the template, not the path
        try:
            response = await handler(request)
        except HTTPError as exc:
            response = _error(exc.status, str(exc))
        except BitdeployError as exc:  # a bad image, tensor or parameter
            response = _error(400, str(exc))
        except Exception as exc:
            service.failures += 1
            sys.stderr.write(
                f"bitdeploy serve: {request.method} {request.url.path} failed: {type(exc).__name__}: {exc}\n"
            )
            response = _error(500, f"internal error ({type(exc).__name__}); see the server log")
        service.answered += 1
        return response

    return endpoint


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(predictor: Predictor, options: ServeOptions | None = None) -> Starlette:
    """The ASGI app for `predictor`; `app.state.service` holds its state. Closing is the lifespan's job."""
    service = Service(predictor, options or ServeOptions())
    s = service
    table: list[tuple[str, Callable[[Request], Awaitable[Response]], list[str]]] = [
        ("/v2/health/live", s.live, ["GET"]),
        ("/v2/health/ready", s.ready, ["GET"]),
        ("/v2", s.server_metadata, ["GET"]),
        ("/v2/models/{name}", s.model_metadata, ["GET"]),
        ("/v2/models/{name}/versions/{version}", s.model_metadata, ["GET"]),
        ("/v2/models/{name}/ready", s.model_ready, ["GET"]),
        ("/v2/models/{name}/versions/{version}/ready", s.model_ready, ["GET"]),
        ("/v2/models/{name}/infer", s.v2_infer, ["POST"]),
        ("/v2/models/{name}/versions/{version}/infer", s.v2_infer, ["POST"]),
        ("/v1/predict", s.v1_predict, ["POST"]),
        ("/healthz", s.healthz, ["GET"]),
        ("/metrics", s.prometheus, ["GET"]),
    ]
    routes = [Route(path, _answers_errors(service, path, fn), methods=methods) for path, fn, methods in table]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            return _error(
                405,
                f"method {request.method} not allowed on {request.url.path}; use {exc.headers.get('Allow') if exc.headers else 'another method'}",
                exc.headers,
            )
        if exc.status_code == 404:
            return _error(
                404,
                f"no route {request.url.path}; see GET /v2 and POST /v2/models/{service.model.name}/infer, or POST /v1/predict",
            )
        return _error(exc.status_code, str(exc.detail))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await asyncio.get_running_loop().run_in_executor(None, service.close)

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.state.service = service
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)
    return app


class _Server(uvicorn.Server):
    """uvicorn's server, with SIGTERM/SIGINT marking the service as draining and not re-raised after the drain."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.service.draining = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # uvicorn's would re-raise the signal after the drain and die of it
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class HTTPServer:
    """A bound socket plus the app: `serve()` blocks until SIGTERM/SIGINT (or `stop()`) and a full drain."""

    def __init__(
        self, predictor: Predictor, host: str = "127.0.0.1", port: int = 8000, options: ServeOptions | None = None
    ) -> None:
        self.options = options or ServeOptions()
        self.app = create_app(predictor, self.options)
        self.service: Service = self.app.state.service
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(
            family, socket.SOCK_STREAM, socket.IPPROTO_TCP
        )  # asyncio sets TCP_NODELAY only on proto TCP
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((host, port))
            self.socket.listen(256)  # connections made before uvicorn starts wait in the backlog
        except OSError as exc:
            self.socket.close()
            self.service.close()
            raise BitdeployError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port or --host"
            ) from exc
        self.host, self.port = host, self.socket.getsockname()[1]
        opts = self.options  # uvicorn's limit counts the arriving connection too, hence the + 1
        config = uvicorn.Config(
            self.app,
            http="auto",
            lifespan="on",
            limit_concurrency=opts.max_connections + 1,
            backlog=256,
            timeout_keep_alive=int(max(1, opts.keep_alive)),
            timeout_graceful_shutdown=int(max(1, opts.drain_timeout)),
            access_log=opts.access_log,
            log_level="info" if opts.access_log else "warning",
            server_header=False,
        )
        self._server = _Server(config, self.service)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def started(self) -> bool:
        return bool(self._server.started)

    def serve(self) -> None:
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self.socket.close()

    def stop(self) -> None:
        """Ask the server to drain and exit (as SIGTERM does); `serve()` returns when it has."""
        self.service.draining = True
        self._server.should_exit = True

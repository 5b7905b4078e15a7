"""A small local HTTP service around a Predictor (standard library only).

    POST /v1/predict[?top_k=K]   body: the raw bytes of one image file
        200 {"model": ..., "predictions": [{"label": ..., "probability": ...}, ...], "timing": {...}}
        400 bad image / bad top_k / empty body, 411 no Content-Length, 413 body too large: {"error": ...}
    GET  /healthz                200 {"status": "ok", "model": ..., "backend": ..., ...}

Robustness: every error is answered with JSON and the server keeps running; at most `workers` inferences
run at once (the rest wait); connections beyond `max_connections` get 503; a stalled client is dropped
after `timeout` seconds. There is no authentication: bind to loopback unless a proxy in front provides it.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socket import SHUT_WR, socket
from typing import Any
from urllib.parse import parse_qs, urlsplit

from bitdeploy import __version__
from bitdeploy.errors import BitdeployError, ImageError
from bitdeploy.runtimes.predictor import Predictor

DEFAULT_MAX_BODY = 16 << 20
DEFAULT_TOP_K = 5


class PredictServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a bound on concurrent inferences and on open connections."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        predictor: Predictor,
        workers: int = 2,
        max_body: int = DEFAULT_MAX_BODY,
        max_connections: int = 64,
        timeout: float = 30.0,
        access_log: bool = False,
    ) -> None:
        if workers < 1 or max_body < 1 or max_connections < 1:
            raise BitdeployError("--workers, --max-body-mb and the connection limit must be positive")
        self.predictor = predictor
        self.workers = workers
        self.slots = threading.BoundedSemaphore(workers)
        self.connections = threading.BoundedSemaphore(max_connections)
        self.max_body = max_body
        self.request_timeout = timeout
        self.access_log = access_log
        self.requests_served = 0
        self.errors_logged = 0
        self._count_lock = threading.Lock()
        super().__init__(address, PredictHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.connections.acquire(blocking=False):
            body = b'{"error": "server busy: too many open connections; retry later"}'
            head = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
            try:
                request.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
                request.shutdown(SHUT_WR)
            except OSError:
                pass
            self.close_request(request)  # no draining here: this runs on the accept loop's thread
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def shutdown_request(self, request: Any) -> None:
        # Drain what the client is still sending before closing: closing a socket with unread input makes the
        # kernel send a reset, which can destroy the error answer (413, 411) before the client reads it.
        try:
            request.shutdown(SHUT_WR)
            request.settimeout(0.5)
            drained, deadline = 0, time.monotonic() + 2.0
            while drained < self.max_body and time.monotonic() < deadline:
                chunk = request.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass
        self.close_request(request)

    def handle_error(self, request: socket | tuple[bytes, socket], client_address: Any) -> None:
        # A dropped or broken connection must not spill a traceback per request onto the console.
        exc = sys.exc_info()[1]
        with self._count_lock:
            self.errors_logged += 1
        sys.stderr.write(f"bitdeploy serve: connection from {client_address[0]} failed: {type(exc).__name__}: {exc}\n")


class PredictHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # answer unparseable request lines with a status line, not HTTP/0.9 bare bodies
    disable_nagle_algorithm = True  # small JSON answers must not wait for the client's delayed ACK
    wbufsize = 1 << 16  # http.server flushes after each request
    server_version = f"bitdeploy/{__version__}"
    error_content_type = "application/json"
    error_message_format = '{"error": "%(message)s", "code": %(code)d}'
    server: PredictServer

    def setup(self) -> None:
        self.timeout = self.server.request_timeout
        super().setup()

    # -- routes -------------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = urlsplit(self.path).path
        if path == "/healthz":
            p = self.server.predictor
            self._json(200, {"status": "ok", "model": p.name, "backend": p.backend_name, "labels": len(p.labels),
                             "precision": (p.manifest.get("target") or {}).get("precision"), "workers": self.server.workers})
        elif path == "/v1/predict":
            self._json(405, {"error": "use POST with the image bytes as the body"}, extra={"Allow": "POST"})
        else:
            self._json(404, {"error": f"no route {path}; use POST /v1/predict or GET /healthz"})

    def do_POST(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        body = self._read_body()
        if body is None:
            return
        if url.path != "/v1/predict":
            self._json(404, {"error": f"no route {url.path}; use POST /v1/predict"})
            return
        try:
            top_k = self._top_k(url.query)
            if not body:
                raise ImageError("empty request body; POST the bytes of an image file")
            with self.server.slots:
                predictions, timing = self.server.predictor.predict(body, top_k=top_k, return_timing=True)
        except BitdeployError as exc:  # bad image or bad parameter: the client's fault
            self._json(400, {"error": str(exc).replace(f"<{len(body)} bytes>", f"request body ({len(body)} bytes)", 1)})
            return
        except Exception as exc:  # a bug or engine failure: answer 500, keep serving
            with self.server._count_lock:
                self.server.errors_logged += 1
            sys.stderr.write(f"bitdeploy serve: inference failed: {type(exc).__name__}: {exc}\n")
            self._json(500, {"error": f"internal error ({type(exc).__name__}); see the server log"})
            return
        with self.server._count_lock:
            self.server.requests_served += 1
        t = timing.as_dict()
        self._json(200, {
            "model": self.server.predictor.name,
            "predictions": [{"label": label, "probability": prob} for label, prob in predictions[0]],
            "timing": {"preprocess_ms": round(t["preprocess_ms"], 3), "infer_ms": round(t["infer_ms"], 3)},
        })

    def do_PUT(self) -> None:  # noqa: N802
        self._json(405, {"error": "method not allowed; use POST /v1/predict or GET /healthz"}, close=True)

    do_DELETE = do_PATCH = do_PUT  # noqa: N815

    # -- helpers ----------------------------------------------------------------------------------------------
    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._json(411, {"error": "chunked bodies are not accepted; send Content-Length"}, close=True)
            return None
        raw = self.headers.get("Content-Length")
        if raw is None:
            self._json(411, {"error": "missing Content-Length; POST the image bytes with a length"}, close=True)
            return None
        try:
            length = int(raw)
            if length < 0:
                raise ValueError
        except ValueError:
            self._json(400, {"error": f"bad Content-Length {raw!r}"}, close=True)
            return None
        if length > self.server.max_body:
            # The body is left unread, so the connection cannot be reused.
            self._json(413, {"error": f"body of {length} bytes is over the {self.server.max_body}-byte limit; send a smaller image or raise --max-body-mb"}, close=True)
            return None
        body = self.rfile.read(length)
        if len(body) < length:
            self._json(400, {"error": f"body ended after {len(body)} of {length} bytes"}, close=True)
            return None
        return body

    def _top_k(self, query: str) -> int:
        values = parse_qs(query).get("top_k")
        if not values:
            return DEFAULT_TOP_K
        try:
            k = int(values[-1])
        except ValueError:
            raise BitdeployError(f"top_k must be a positive integer (got {values[-1]!r})") from None
        if k < 1:
            raise BitdeployError(f"top_k must be a positive integer (got {k})")
        return k

    def _json(self, code: int, payload: dict[str, Any], close: bool = False, extra: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)  # buffered (wbufsize): headers and body leave in one send
        except OSError:  # the client went away; nothing to answer
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        if self.server.access_log:
            super().log_message(format, *args)


def make_server(predictor: Predictor, host: str = "127.0.0.1", port: int = 8000, workers: int = 2,
                max_body: int = DEFAULT_MAX_BODY, access_log: bool = False, **kwargs: Any) -> PredictServer:
    """Bind (port 0 picks a free port) and return the server; call `serve_forever()` and finally `server_close()`."""
    try:
        return PredictServer((host, port), predictor, workers=workers, max_body=max_body, access_log=access_log, **kwargs)
    except OSError as exc:
        raise BitdeployError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port or --host") from None

"""Helpers for the serve tests: run `HTTPServer` on a loopback port in a thread, talk to it with raw HTTP."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from bitdeploy.runtimes.serving.serve import HTTPServer, ServeOptions


@contextmanager
def running(predictor: Any, **options: Any) -> Iterator[HTTPServer]:
    """An HTTPServer for `predictor` on 127.0.0.1:<free port>, serving in a thread; drained and stopped after."""
    server = HTTPServer(predictor, "127.0.0.1", 0, ServeOptions(**options))
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield server
    finally:
        server.stop()
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"


def request(
    server: HTTPServer, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    status, data, _ = raw_request(server, method, path, body, headers)
    return status, json.loads(data)


def raw_request(
    server: HTTPServer, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


class SlowPredictor:
    """A predictor whose engine calls take `delay` seconds longer (or fail with `fail`), for drain and error tests."""

    def __init__(self, predictor: Any, delay: float = 0.0, fail: Exception | None = None) -> None:
        self._predictor = predictor
        self.delay = delay
        self.fail = fail
        self.calls: list[int] = []

    def infer_padded(self, batch: Any) -> Any:
        self.calls.append(len(batch))
        time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return self._predictor.infer_padded(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._predictor, name)

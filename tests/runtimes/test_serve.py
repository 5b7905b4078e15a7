"""`bitdeploy serve`: routes, limits, bad input, and the acceptance load (1,000 requests, 8 clients, 50 malformed)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bitdeploy.benchmarks import serve_load
from bitdeploy.runtimes import load
from bitdeploy.runtimes.serve import PredictServer, make_server


@pytest.fixture(scope="module")
def server(ort_bundle: Path) -> Iterator[PredictServer]:
    model = load(ort_bundle)
    srv = make_server(model, "127.0.0.1", 0, workers=2, max_body=64 * 1024)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(10)
    model.close()


def request(srv: PredictServer, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_healthz(server: PredictServer) -> None:
    status, body = request(server, "GET", "/healthz")
    assert status == 200 and body["status"] == "ok" and body["model"] == "tiny" and body["backend"] == "onnxruntime"


def test_predict_matches_library(server: PredictServer, image_dir: dict[str, Path]) -> None:
    data = image_dir["photo_cmyk"].read_bytes()
    status, body = request(server, "POST", "/v1/predict?top_k=3", data)
    assert status == 200 and body["model"] == "tiny" and len(body["predictions"]) == 3
    expect = server.predictor.predict(data, top_k=3)[0]
    assert [(p["label"], p["probability"]) for p in body["predictions"]] == [(label, pytest.approx(p, abs=1e-7)) for label, p in expect]
    assert body["timing"]["preprocess_ms"] > 0 and body["timing"]["infer_ms"] > 0
    status, body = request(server, "POST", "/v1/predict", data)
    assert status == 200 and len(body["predictions"]) == 5  # default top_k


@pytest.mark.parametrize(("name", "method", "path", "body", "status", "message"), [
    ("text", "POST", "/v1/predict", b"not an image", 400, "cannot decode image"),
    ("empty", "POST", "/v1/predict", b"", 400, "empty request body"),
    ("top_k", "POST", "/v1/predict?top_k=x", b"x", 400, "top_k must be a positive integer"),
    ("top_k0", "POST", "/v1/predict?top_k=0", b"x", 400, "top_k must be a positive integer"),
    ("too big", "POST", "/v1/predict", b"0" * (64 * 1024 + 1), 413, "over the 65536-byte limit"),
    ("route", "POST", "/v1/other", b"abc", 404, "no route /v1/other"),
    ("get", "GET", "/v1/predict", None, 405, "use POST"),
    ("unknown", "GET", "/", None, 404, "no route /"),
    ("put", "PUT", "/v1/predict", b"abc", 405, "method not allowed"),
])
def test_errors_are_json(server: PredictServer, name: str, method: str, path: str, body: bytes | None, status: int, message: str) -> None:
    got, payload = request(server, method, path, body)
    assert got == status and message in payload["error"], (name, payload)


def test_one_pixel_and_sixteen_bit_images_work(server: PredictServer, image_dir: dict[str, Path]) -> None:
    for key in ("one_pixel", "gray16", "photo_rgba"):
        status, body = request(server, "POST", "/v1/predict?top_k=1", image_dir[key].read_bytes())
        assert status == 200 and len(body["predictions"]) == 1, key


def test_malformed_then_still_serving(server: PredictServer, image_dir: dict[str, Path]) -> None:
    sent, errors = serve_load.run_malformed(f"http://127.0.0.1:{server.server_address[1]}", 34, server.max_body)
    assert sent == 34 and errors == []
    assert request(server, "GET", "/healthz")[0] == 200
    assert request(server, "POST", "/v1/predict", image_dir["digit0_L"].read_bytes())[0] == 200


def test_connection_limit_answers_503(ort_bundle: Path) -> None:
    with load(ort_bundle) as model:
        srv = make_server(model, "127.0.0.1", 0, max_connections=1, timeout=5)
        thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            idle = socket.create_connection(("127.0.0.1", srv.server_address[1]))  # holds the only slot
            idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            idle.recv(4096)  # served, and kept alive
            status, body = request(srv, "GET", "/healthz")
            assert status == 503 and "too many open connections" in body["error"]
            idle.close()
        finally:
            srv.shutdown()
            srv.server_close()


def test_bad_server_settings(ort_bundle: Path) -> None:
    from bitdeploy.errors import BitdeployError

    with load(ort_bundle) as model:
        with pytest.raises(BitdeployError, match="must be positive"):
            make_server(model, "127.0.0.1", 0, workers=0)
        busy = make_server(model, "127.0.0.1", 0)
        try:
            with pytest.raises(BitdeployError, match="cannot listen on 127.0.0.1"):
                make_server(model, "127.0.0.1", busy.server_address[1])
        finally:
            busy.server_close()


@pytest.mark.slow
def test_acceptance_load_through_the_cli(ort_bundle: Path) -> None:
    """`bitdeploy serve` in its own process: 1,000 requests from 8 clients with zero errors, 50 malformed, still up."""
    proc, url = serve_load.start_server(str(ort_bundle), workers=2, threads=1)
    try:
        images = serve_load.sample_images(8)
        result = serve_load.run_load(url, images, clients=8, requests=1000, top_k=3)
        assert result.errors == [] and len(result.latencies) == 1000
        assert result.percentile(50) <= result.percentile(99)
        sent, bad = serve_load.run_malformed(url, 50, 1 << 20)
        assert sent == 50 and bad == []
        after = serve_load.run_load(url, images, clients=8, requests=40)
        assert after.errors == [] and serve_load.healthz(url)["status"] == "ok"
        assert proc.poll() is None
    finally:
        code, stderr = serve_load.stop_server(proc)
    assert code == 0 and "Traceback" not in stderr, stderr[-2000:]

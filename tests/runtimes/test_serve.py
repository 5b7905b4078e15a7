"""`bitdeploy serve`: the original routes (/v1/predict, /healthz), HTTP limits, bad input, drain, and the CLI under load."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bitdeploy.core.errors import BitdeployError
from bitdeploy.runtimes import load
from bitdeploy.runtimes.serving.serve import HTTPServer, ServeOptions
from tests.experiments import load as load_script
from tests.runtimes.serving import SlowPredictor, raw_request, request, running

serve_load = load_script("serve_load")
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def server(ort_bundle: Path) -> Iterator[HTTPServer]:
    with load(ort_bundle) as model, running(model, workers=2, max_body=MAX_BODY) as srv:
        yield srv


def test_healthz(server: HTTPServer) -> None:
    status, body = request(server, "GET", "/healthz")
    assert status == 200 and body["status"] == "ok" and body["model"] == "tiny" and body["backend"] == "onnxruntime"


def test_predict_matches_library(server: HTTPServer, image_dir: dict[str, Path]) -> None:
    data = image_dir["photo_cmyk"].read_bytes()
    status, body = request(server, "POST", "/v1/predict?top_k=3", data)
    assert status == 200 and body["model"] == "tiny" and len(body["predictions"]) == 3
    expect = server.service.predictor.predict(data, top_k=3)[0]
    assert [(p["label"], p["probability"]) for p in body["predictions"]] == [
        (label, pytest.approx(p, abs=1e-7)) for label, p in expect
    ]
    assert body["timing"]["preprocess_ms"] > 0 and body["timing"]["infer_ms"] > 0
    status, body = request(server, "POST", "/v1/predict", data)
    assert status == 200 and len(body["predictions"]) == 5  # default top_k


@pytest.mark.parametrize(
    ("name", "method", "path", "body", "status", "message"),
    [
        ("text", "POST", "/v1/predict", b"not an image", 400, "cannot decode image"),
        ("empty", "POST", "/v1/predict", b"", 400, "empty request body"),
        ("top_k", "POST", "/v1/predict?top_k=x", b"x", 400, "top_k must be a positive integer"),
        ("top_k0", "POST", "/v1/predict?top_k=0", b"x", 400, "top_k must be a positive integer"),
        ("too big", "POST", "/v1/predict", b"0" * (MAX_BODY + 1), 413, f"over the {MAX_BODY}-byte limit"),
        ("route", "POST", "/v1/other", b"abc", 404, "no route /v1/other"),
        ("get", "GET", "/v1/predict", None, 405, "use POST"),
        ("unknown", "GET", "/", None, 404, "no route /"),
        ("put", "PUT", "/v1/predict", b"abc", 405, "method PUT not allowed"),
    ],
)
def test_errors_are_json(
    server: HTTPServer, name: str, method: str, path: str, body: bytes | None, status: int, message: str
) -> None:
    got, payload = request(server, method, path, body)
    assert got == status and message in payload["error"], (name, payload)


def test_error_names_the_request_body(server: HTTPServer) -> None:
    status, payload = request(server, "POST", "/v1/predict", b"x" * 10)
    assert status == 400 and payload["error"].startswith("request body (10 bytes): cannot decode image")


def test_one_pixel_and_sixteen_bit_images_work(server: HTTPServer, image_dir: dict[str, Path]) -> None:
    for key in ("one_pixel", "gray16", "photo_rgba"):
        status, body = request(server, "POST", "/v1/predict?top_k=1", image_dir[key].read_bytes())
        assert status == 200 and len(body["predictions"]) == 1, key


def test_malformed_then_still_serving(server: HTTPServer, image_dir: dict[str, Path]) -> None:
    cases = len(serve_load.malformed_cases(MAX_BODY))
    sent, errors = serve_load.run_malformed(server.url, cases, MAX_BODY)
    assert sent == cases and errors == []
    assert request(server, "GET", "/healthz")[0] == 200
    assert request(server, "POST", "/v1/predict", image_dir["digit0_L"].read_bytes())[0] == 200


def test_chunked_body_is_accepted_and_limited(server: HTTPServer, image_dir: dict[str, Path]) -> None:
    data = image_dir["digit0_L"].read_bytes()
    chunked = (
        b"".join(b"%x\r\n%s\r\n" % (len(data[i : i + 50]), data[i : i + 50]) for i in range(0, len(data), 50))
        + b"0\r\n\r\n"
    )
    head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    assert serve_load._raw(server.url, head + chunked, 30) == 200
    big = b"%x\r\n%s\r\n0\r\n\r\n" % (MAX_BODY + 1, b"0" * (MAX_BODY + 1))
    assert serve_load._raw(server.url, head + big, 30) == 413


def test_slow_body_times_out(ort_bundle: Path) -> None:
    with load(ort_bundle) as model, running(model, timeout=0.5) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
            t0 = time.monotonic()
            answer = b""
            while b"}" not in answer and (chunk := s.recv(4096)):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b"not received within 0.5 s" in answer
        assert time.monotonic() - t0 < 5


def test_connection_limit_answers_503(ort_bundle: Path) -> None:
    with load(ort_bundle) as model, running(model, max_connections=1) as srv:
        with socket.create_connection(("127.0.0.1", srv.port)) as idle:  # holds the only connection
            idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert idle.recv(4096).startswith(b"HTTP/1.1 200")  # served, and kept alive
            assert raw_request(srv, "GET", "/healthz")[0] == 503
        deadline = time.monotonic() + 10
        while raw_request(srv, "GET", "/healthz")[0] != 200:  # the slot is free again once uvicorn sees the close
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_engine_failure_is_500_and_server_survives(
    ort_bundle: Path, image_dir: dict[str, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    with load(ort_bundle) as model:
        broken = SlowPredictor(model, fail=RuntimeError("engine exploded"))
        with running(broken) as srv:
            status, body = request(srv, "POST", "/v1/predict", image_dir["digit0_L"].read_bytes())
            assert status == 500 and "internal error (RuntimeError)" in body["error"]
            broken.fail = None
            assert request(srv, "POST", "/v1/predict", image_dir["digit0_L"].read_bytes())[0] == 200
    err = capfd.readouterr().err
    assert "engine exploded" in err and "Traceback" not in err


def test_stop_drains_requests_in_flight(ort_bundle: Path, image_dir: dict[str, Path]) -> None:
    """stop() (what SIGTERM does) lets the request in the engine finish with 200, then the port closes."""
    with load(ort_bundle) as model:
        slow = SlowPredictor(model, delay=1.0)
        results: list[int] = []
        with running(slow) as srv:
            client = threading.Thread(
                target=lambda: results.append(
                    request(srv, "POST", "/v1/predict", image_dir["digit0_L"].read_bytes())[0]
                )
            )
            client.start()
            deadline = time.monotonic() + 10
            while not slow.calls and time.monotonic() < deadline:
                time.sleep(0.01)
            assert slow.calls, "the request never reached the engine"
            srv.stop()
            client.join(30)
            assert results == [200]
            assert srv.service.draining
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", srv.port), timeout=2)


def test_bad_server_settings(ort_bundle: Path) -> None:
    with load(ort_bundle) as model:
        with pytest.raises(BitdeployError, match="must be positive"):
            HTTPServer(model, "127.0.0.1", 0, ServeOptions(workers=0))
        with running(model) as busy, pytest.raises(BitdeployError, match=r"cannot listen on 127\.0\.0\.1"):
            HTTPServer(model, "127.0.0.1", busy.port)


@pytest.mark.slow
def test_acceptance_load_through_the_cli(ort_bundle: Path) -> None:
    """`bitdeploy serve` in its own process, driven by tritonclient: 8 clients x 1,000 requests with zero errors,
    50 malformed requests answered 4xx, /metrics counting them, still up, and SIGTERM exits 0."""
    pytest.importorskip("tritonclient.http")
    proc, url = serve_load.start_server(str(ort_bundle), "--max-body-mb", "1", threads=1)
    try:
        inputs = serve_load.Inputs(serve_load.model_metadata(url), "tensor")
        result = serve_load.run_load(url, inputs, clients=8, requests=1000)
        assert result.errors == [] and len(result.latencies) == 1000
        sent, bad = serve_load.run_malformed(url, 50, 1 << 20)
        assert sent == 50 and bad == []
        images = serve_load.Inputs(serve_load.model_metadata(url), "image")
        after = serve_load.run_load(url, images, clients=8, requests=40)
        assert after.errors == [] and serve_load.healthz(url)["status"] == "ok"
        samples = serve_load.metrics(url)
        infer = "/v2/models/{name}/infer"
        assert serve_load.counted(samples, "bitdeploy_requests_total", route=infer, code="200") == 1040
        cases = serve_load.malformed_cases(1 << 20)
        not_the_apps = {
            "garbage request line",
            "negative length",
            "hang up mid-body",
            "body shorter than length",
        }  # h11's or gone
        reached_app = sum(1 for i in range(50) if cases[i % len(cases)][0] not in not_the_apps)
        assert serve_load.counted(samples, "bitdeploy_request_errors_total") >= reached_app
        assert serve_load.counted(samples, "bitdeploy_batch_size_sum") == 1040
        assert proc.poll() is None
    finally:
        code, output = serve_load.stop_server(proc)
    assert code == 0 and "Traceback" not in output and "stopped after" in output, output[-2000:]


def test_serve_load_accounts_server_and_client_cpu(ort_bundle: Path) -> None:
    """serve_load's CPU accounting: /proc/PID/stat counts a child's busy seconds, and one measured load run splits
    the CPU between the server (pinned to the first core when there are two) and this process's client threads."""
    import subprocess
    import sys

    busy = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\ninput()",
        ],
        stdin=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while serve_load.process_cpu_s(busy.pid) < 0.5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 0.5 <= serve_load.process_cpu_s(busy.pid) < 20
    finally:
        busy.communicate("\n", timeout=20)
    pytest.importorskip("tritonclient.http")
    server_cpus, client_cpus = serve_load.split_cores(len(os.sched_getaffinity(0)) >= 2)
    proc, url = serve_load.start_server(str(ort_bundle), threads=1, cpus=server_cpus)
    try:
        if server_cpus is not None:
            assert os.sched_getaffinity(proc.pid) == server_cpus
        inputs = serve_load.Inputs(serve_load.model_metadata(url), "tensor")
        load, cpu = serve_load.measured_load(
            proc.pid, url, inputs, 4, 200, len(server_cpus or os.sched_getaffinity(0)), client_cpus is not None
        )
    finally:
        serve_load.stop_server(proc)
    assert load.errors == [] and cpu.requests == 200
    assert cpu.server_s > 0 and cpu.clients_s > 0 and 0 < cpu.server_share <= 1.05
    assert cpu.server_ms_per_request == pytest.approx(1e3 * cpu.server_s / 200)
    assert cpu.throughput_clients_excluded() >= load.throughput * 0.999

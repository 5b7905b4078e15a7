"""The Open Inference Protocol (KServe v2) routes of `bitdeploy serve`, driven by Triton's own client."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from bitdeploy.runtimes import load
from tests.runtimes.serving import raw_request, request, running

th = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from bitdeploy.runtimes.serving.serve import HTTPServer  # noqa: E402
from tests.experiments import load as load_script  # noqa: E402

serve_load = load_script("serve_load")


@pytest.fixture(scope="module")
def server(ort_bundle: Path) -> Iterator[HTTPServer]:
    with load(ort_bundle) as model, running(model) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: HTTPServer) -> Iterator[Any]:
    c = th.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield c
    c.close()


def fp32(x: np.ndarray, binary: bool) -> Any:
    inp = th.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def image_input(paths: list[Path]) -> Any:
    data = np.array([p.read_bytes() for p in paths], dtype=object)
    inp = th.InferInput("image", [len(paths)], "BYTES")
    inp.set_data_from_numpy(data, binary_data=True)
    return inp


def test_health_and_metadata(client: Any) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("other") and not client.is_model_ready("tiny", "2")
    meta = client.get_model_metadata("tiny")
    assert meta["name"] == "tiny" and meta["versions"] == ["1"] and meta["platform"] == "bitdeploy_onnxruntime"
    assert {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]} in meta["inputs"]
    assert {"name": "image", "datatype": "BYTES", "shape": [-1]} in meta["inputs"]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get_model_metadata("tiny", "1") == meta
    server_meta = client.get_server_metadata()
    assert server_meta["name"] == "bitdeploy" and "classification" in server_meta["extensions"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_fp32_inference_equals_infer(client: Any, ort_bundle: Path, tiny_model: dict[str, Any], binary: bool) -> None:
    x = tiny_model["x"]
    result = client.infer(
        "tiny", [fp32(x, binary)], outputs=[th.InferRequestedOutput("logits", binary_data=binary)], request_id="r-7"
    )
    got = result.as_numpy("logits")
    with load(ort_bundle) as model:
        np.testing.assert_allclose(got, model.infer(x), atol=1e-5, rtol=0)
    response = result.get_response()
    assert response["model_name"] == "tiny" and response["id"] == "r-7"
    assert ("binary_data_size" in (response["outputs"][0].get("parameters") or {})) == binary


def test_default_outputs_are_binary(client: Any, tiny_model: dict[str, Any]) -> None:
    result = client.infer(
        "tiny", [fp32(tiny_model["x"][:1], True)]
    )  # no outputs named: tritonclient asks for binary_data_output
    assert result.as_numpy("logits").shape == (1, 10)
    assert result.get_output("logits")["parameters"]["binary_data_size"] == 40


def test_image_classification_matches_predict(client: Any, ort_bundle: Path, image_dir: dict[str, Path]) -> None:
    from bitdeploy.cli import cli

    paths = [image_dir[k] for k in ("photo_rgb", "digit0_L", "photo_cmyk", "rotated")]
    result = client.infer("tiny", [image_input(paths)], outputs=[th.InferRequestedOutput("logits", class_count=3)])
    rows = result.as_numpy("logits")
    assert rows.shape == (4, 3)
    cli_out = CliRunner().invoke(cli, ["predict", str(ort_bundle), *map(str, paths), "--top-k", "3", "--json"])
    assert cli_out.exit_code == 0, cli_out.output
    expect = [[p["label"] for p in entry["predictions"]] for entry in json.loads(cli_out.output)]
    got = [[cell.decode().split(":")[2] for cell in row] for row in rows]
    assert got == expect
    with load(ort_bundle) as model:  # score:index are the logit and its class index
        logits = model.infer(model.preprocess([str(p) for p in paths]))
    for i, row in enumerate(rows):
        for cell in row:
            score, index, label = cell.decode().split(":")
            assert model.labels[int(index)] == label and float(score) == pytest.approx(
                float(logits[i, int(index)]), abs=1e-5
            )


def test_image_logits_equal_predict_path(client: Any, ort_bundle: Path, image_dir: dict[str, Path]) -> None:
    paths = [image_dir["photo_odd"], image_dir["gray16"]]
    got = client.infer("tiny", [image_input(paths)]).as_numpy("logits")
    with load(ort_bundle) as model:
        np.testing.assert_allclose(got, model.infer(model.preprocess([str(p) for p in paths])), atol=1e-5, rtol=0)


def test_errors_are_4xx_with_a_message(client: Any, tiny_model: dict[str, Any], image_dir: dict[str, Path]) -> None:
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as exc:
        client.infer("nope", [fp32(tiny_model["x"], True)])
    assert exc.value.status() == "404"
    bad = np.zeros((1, 3, 32, 31), np.float32)
    with pytest.raises(InferenceServerException, match=r"must have shape \[N, 3, 32, 32\]") as exc:
        client.infer("tiny", [fp32(bad, True)])
    assert exc.value.status() == "400"
    with pytest.raises(InferenceServerException, match=r"image 2 of 2 .*cannot decode image"):
        client.infer("tiny", [image_input([image_dir["digit0_L"], image_dir["text"]])])
    assert client.is_server_ready()


def test_raw_errors_are_json(server: HTTPServer) -> None:
    path = "/v2/models/tiny/infer"
    status, body = request(server, "POST", path, b"{broken")
    assert status == 400 and "not valid JSON" in body["error"]
    head = json.dumps(
        {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "parameters": {"binary_data_size": 4}}
            ]
        }
    ).encode()
    status, body = request(
        server, "POST", path, head + b"\0" * 4, headers={"Inference-Header-Content-Length": str(len(head))}
    )
    assert status == 400 and "needs 12288 bytes of FP32 data (got 4)" in body["error"]
    status, body = request(server, "GET", "/v2/models/tiny/versions/3")
    assert status == 404 and "no version '3'" in body["error"]
    status, body = request(server, "GET", "/v2/models/tiny/infer")
    assert status == 405 and "use POST" in body["error"]


def test_model_name_option(ort_bundle: Path, tiny_model: dict[str, Any]) -> None:
    with load(ort_bundle) as model, running(model, model_name="digits") as srv:
        c = th.InferenceServerClient(f"127.0.0.1:{srv.port}")
        try:
            out = c.infer("digits", [fp32(tiny_model["x"][:2], True)], model_version="1").as_numpy("logits")
            assert out.shape == (2, 10)
            assert c.get_model_metadata("digits")["name"] == "digits"
            with pytest.raises(InferenceServerException, match="serves 'digits'"):
                c.get_model_metadata("tiny")
        finally:
            c.close()


def test_concurrent_requests_are_batched_and_split_back(ort_bundle: Path) -> None:
    """8 clients send batches of 1-3 distinct images at once; each gets exactly its own rows, and engine calls hold several requests."""
    rng = np.random.default_rng(3)
    inputs = [rng.uniform(-1, 1, (1 + i % 3, 3, 32, 32)).astype(np.float32) for i in range(40)]
    results: dict[int, np.ndarray] = {}
    errors: list[str] = []
    with load(ort_bundle) as model, running(model, max_batch=8, max_delay_ms=50) as srv:
        start = threading.Barrier(8)

        def worker(c: int) -> None:
            cli = th.InferenceServerClient(f"127.0.0.1:{srv.port}")
            start.wait()
            for i in range(c, len(inputs), 8):
                try:
                    results[i] = cli.infer("tiny", [fp32(inputs[i], True)]).as_numpy("logits")
                except InferenceServerException as exc:
                    errors.append(str(exc))
            cli.close()

        threads = [threading.Thread(target=worker, args=(c,)) for c in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        samples = serve_load.metrics(srv.url)
        assert errors == [] and len(results) == len(inputs)
        for i, x in enumerate(inputs):
            np.testing.assert_allclose(results[i], model.infer(x), atol=1e-5, rtol=0)
    calls = serve_load.counted(samples, "bitdeploy_batch_size_count")
    images = serve_load.counted(samples, "bitdeploy_batch_size_sum")
    assert images == sum(len(x) for x in inputs)
    assert calls < len(inputs)  # at least one engine call served several requests
    assert (
        serve_load.counted(samples, "bitdeploy_batch_size_bucket", le="8.0") == calls
    )  # and none exceeded --max-batch


def test_metrics_count_requests_by_route_and_code(server: HTTPServer, client: Any, tiny_model: dict[str, Any]) -> None:
    before = serve_load.metrics(server.url)
    infer = "/v2/models/{name}/infer"
    for _ in range(3):
        client.infer("tiny", [fp32(tiny_model["x"][:1], True)])
    request(server, "POST", "/v2/models/tiny/infer", b"[]")
    request(server, "GET", "/no/such/route")
    after = serve_load.metrics(server.url)

    def delta(name: str, **labels: str) -> float:
        return serve_load.counted(after, name, **labels) - serve_load.counted(before, name, **labels)

    assert delta("bitdeploy_requests_total", route=infer, code="200") == 3
    assert delta("bitdeploy_request_errors_total", route=infer, code="400") == 1
    assert delta("bitdeploy_request_errors_total", route="other", code="404") == 1
    assert delta("bitdeploy_request_errors_total", route=infer, code="200") == 0
    assert delta("bitdeploy_request_duration_seconds_count", route=infer) == 4
    assert delta("bitdeploy_images_total") == 3
    assert "bitdeploy_queue_depth{}" in after and after["bitdeploy_model_info{model=tiny}"] == 1
    status, _, headers = raw_request(server, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")

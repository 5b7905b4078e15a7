"""The v2 gRPC service of `bitdeploy serve`, driven by `tritonclient.grpc`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitdeploy.runtimes import load
from tests.runtimes.serving import running

tg = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from bitdeploy.runtimes.serving.serve_grpc import GrpcServer  # noqa: E402
from tests.experiments import load as load_script  # noqa: E402

serve_load = load_script("serve_load")


@pytest.fixture(scope="module")
def servers(ort_bundle: Path) -> Iterator[tuple[Any, GrpcServer]]:
    with load(ort_bundle) as model, running(model) as http:
        yield http, GrpcServer(http.service, "127.0.0.1", 0)


@pytest.fixture(scope="module")
def client(servers: tuple[Any, GrpcServer]) -> Iterator[Any]:
    c = tg.InferenceServerClient(f"127.0.0.1:{servers[1].port}")
    yield c
    c.close()


def fp32(x: np.ndarray) -> Any:
    inp = tg.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def test_health_and_metadata(client: Any) -> None:
    assert (
        client.is_server_live()
        and client.is_server_ready()
        and client.is_model_ready("tiny")
        and client.is_model_ready("tiny", "1")
    )
    meta = client.get_model_metadata("tiny", as_json=True)
    assert meta["name"] == "tiny" and meta["versions"] == ["1"]
    assert {"name": "input", "datatype": "FP32", "shape": ["-1", "3", "32", "32"]} in meta["inputs"]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "10"]}]
    assert "classification" in client.get_server_metadata(as_json=True)["extensions"]
    with pytest.raises(InferenceServerException, match="unknown model 'other'"):
        client.get_model_metadata("other")


def test_fp32_inference_equals_infer(client: Any, ort_bundle: Path, tiny_model: dict[str, Any]) -> None:
    result = client.infer("tiny", [fp32(tiny_model["x"])], request_id="g-1")
    with load(ort_bundle) as model:
        np.testing.assert_allclose(result.as_numpy("logits"), model.infer(tiny_model["x"]), atol=1e-5, rtol=0)
    assert result.get_response().id == "g-1"


def test_image_classification_matches_predict(client: Any, ort_bundle: Path, image_dir: dict[str, Path]) -> None:
    paths = [image_dir["photo_rgb"], image_dir["digit1_L"]]
    images = tg.InferInput("image", [2], "BYTES")
    images.set_data_from_numpy(np.array([p.read_bytes() for p in paths], dtype=object))
    rows = client.infer("tiny", [images], outputs=[tg.InferRequestedOutput("logits", class_count=3)]).as_numpy("logits")
    with load(ort_bundle) as model:
        expect = [[label for label, _ in preds] for preds in model.predict([str(p) for p in paths], top_k=3)]
    assert [[cell.decode().split(":")[2] for cell in row] for row in rows] == expect


def test_errors_have_grpc_status(client: Any, image_dir: dict[str, Path]) -> None:
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as exc:
        client.infer("nope", [fp32(np.zeros((1, 3, 32, 32), np.float32))])
    assert "NOT_FOUND" in str(exc.value.status())
    with pytest.raises(InferenceServerException, match=r"shape \[N, 3, 32, 32\]") as exc:
        client.infer("tiny", [fp32(np.zeros((1, 3, 31, 32), np.float32))])
    assert "INVALID_ARGUMENT" in str(exc.value.status())
    bad = tg.InferInput("image", [1], "BYTES")
    bad.set_data_from_numpy(np.array([image_dir["text"].read_bytes()], dtype=object))
    with pytest.raises(InferenceServerException, match="cannot decode image"):
        client.infer("tiny", [bad])
    assert client.is_server_ready()


def test_metrics_count_grpc_calls(servers: tuple[Any, GrpcServer], client: Any) -> None:
    http, _ = servers
    before = serve_load.metrics(http.url)
    client.infer("tiny", [fp32(np.zeros((2, 3, 32, 32), np.float32))])
    with pytest.raises(InferenceServerException):
        client.infer("tiny", [fp32(np.zeros((1, 3, 3, 3), np.float32))])
    after = serve_load.metrics(http.url)

    def delta(name: str, **labels: str) -> float:
        return serve_load.counted(after, name, **labels) - serve_load.counted(before, name, **labels)

    assert delta("bitdeploy_requests_total", route="grpc ModelInfer", code="OK") == 1
    assert delta("bitdeploy_request_errors_total", route="grpc ModelInfer", code="INVALID_ARGUMENT") == 1
    assert delta("bitdeploy_images_total") == 2

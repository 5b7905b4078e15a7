"""Tiny bundles for the benchmark tests: BiT `tiny` at 32 px, 10 classes, as ONNX and as OpenVINO IR."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitdeploy.runtimes.bundle.manifest import ExportInfo, Manifest, ModelInfo, Provenance, TargetInfo, WeightsInfo

RESOLUTION = 32
LABELS = [str(i) for i in range(10)]


def _manifest(backend: str, precision: str, model_file: str, precision_used: str, device: str) -> Manifest:
    """A valid manifest of the tiny model, built with the typed record the build uses."""
    from bitdeploy.runtimes.preprocess import input_spec

    return Manifest(
        valid=True,
        model=ModelInfo(
            name="tiny",
            num_classes=10,
            params=0,
            resolution=RESOLUTION,
            weights=WeightsInfo("none"),
            ws_eps=1e-10,
        ),
        target=TargetInfo(backend, precision, precision_used, device),
        model_file=model_file,
        input=input_spec(RESOLUTION),
        labels=list(LABELS),
        export=ExportInfo(opset=17),
        provenance=Provenance("test", "2025-01-01T00:00:00+00:00"),
    )


@pytest.fixture(scope="session")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from bitdeploy.converters.onnx_export import torch_export
    from bitdeploy.core.catalog import get_variant
    from bitdeploy.training.bit import create_model, fold_weight_standardization

    torch.manual_seed(0)
    model = fold_weight_standardization(create_model(get_variant("tiny"), 10)).eval()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    torch_export(model, RESOLUTION, path)
    return path


@pytest.fixture(scope="session")
def onnx_bundle(onnx_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime")
    import shutil

    from bitdeploy.runtimes.bundle import bundle_writer, write_manifest

    out = tmp_path_factory.mktemp("bundles") / "tiny-onnx-fp32"
    with bundle_writer(out) as tmp:
        shutil.copy(onnx_model, tmp / "model.onnx")
        write_manifest(tmp, _manifest("onnxruntime", "fp32", "model.onnx", "f32", "cpu"), ["model.onnx"])
    return out


@pytest.fixture(scope="session")
def openvino_bundle(onnx_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ov = pytest.importorskip("openvino")
    from bitdeploy.runtimes.bundle import bundle_writer, write_manifest

    out = tmp_path_factory.mktemp("bundles") / "tiny-openvino-fp32"
    with bundle_writer(out) as tmp:
        ov.save_model(ov.convert_model(str(onnx_model)), str(tmp / "model.xml"), compress_to_fp16=False)
        write_manifest(tmp, _manifest("openvino", "fp32", "model.xml", "f32", "CPU"), ["model.xml", "model.bin"])
    return out

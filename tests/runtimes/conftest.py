"""Fixtures for the runtime tests: tiny BiT bundles (ONNX Runtime, OpenVINO, LiteRT) and images of every kind.

The bundles are built here from the `tiny` variant at 32 px (torch.onnx.export of the folded model, OpenVINO
`convert_model` of that ONNX, the LiteRT converter on that ONNX), once per session, so these tests do not depend
on `bitdeploy build`.
"""

from __future__ import annotations

import datetime as dt
import io
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bitdeploy import __version__
from bitdeploy.runtimes.bundle import bundle_writer, write_manifest
from bitdeploy.runtimes.bundle.manifest import ExportInfo, Manifest, ModelInfo, Provenance, TargetInfo, WeightsInfo
from bitdeploy.runtimes.preprocess import input_spec

RES = 32
LABELS = [str(i) for i in range(10)]


def make_manifest(
    backend: str, model_file: str, device: str, precision_used: str, params: int = 0, **changes: Any
) -> Manifest:
    """A valid FP32 manifest of the tiny model, built with the typed record the build uses (`changes`: fields to
    replace)."""
    manifest = Manifest(
        valid=True,
        model=ModelInfo(
            name="tiny",
            num_classes=10,
            params=params,
            resolution=RES,
            weights=WeightsInfo("none"),
            ws_eps=1e-10,
        ),
        target=TargetInfo(backend, "fp32", precision_used, device),
        model_file=model_file,
        input=input_spec(RES),
        labels=list(LABELS),
        export=ExportInfo(opset=17),
        provenance=Provenance(__version__, dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")),
    )
    return replace(manifest, **changes)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The folded tiny model exported to ONNX, plus torch logits for a fixed batch."""
    torch = pytest.importorskip("torch")
    from bitdeploy.converters.onnx_export import torch_export
    from bitdeploy.core.catalog import count_params, get_variant
    from bitdeploy.training.bit import create_model, fold_weight_standardization

    torch.manual_seed(0)
    variant = get_variant("tiny")
    model = create_model(variant, num_classes=10).eval()
    folded = fold_weight_standardization(model).eval()
    x = np.random.default_rng(0).uniform(-1, 1, (4, 3, RES, RES)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    torch_export(folded, RES, path)
    return {"onnx": path, "x": x, "ref": ref, "params": count_params(variant, 10)}


@pytest.fixture(scope="session")
def ort_bundle(tiny_model: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny-onnx"
    with bundle_writer(out) as tmp:
        shutil.copy(tiny_model["onnx"], tmp / "model.onnx")
        write_manifest(
            tmp, make_manifest("onnxruntime", "model.onnx", "cpu", "fp32", tiny_model["params"]), ["model.onnx"]
        )
    return out


@pytest.fixture(scope="session")
def ov_bundle(tiny_model: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    ov = pytest.importorskip("openvino")
    out = tmp_path_factory.mktemp("bundles") / "tiny-openvino"
    with bundle_writer(out) as tmp:
        ov.save_model(ov.convert_model(str(tiny_model["onnx"])), str(tmp / "model.xml"), compress_to_fp16=False)
        write_manifest(
            tmp, make_manifest("openvino", "model.xml", "CPU", "f32", tiny_model["params"]), ["model.xml", "model.bin"]
        )
    return out


@pytest.fixture(scope="session")
def litert_bundle(tiny_model: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's LiteRT FP32 bundle (the LiteRT converter, ~15 s): converted once for the LiteRT runtime
    tests (test_litert.py) and the backend contract (test_backend_contract.py)."""
    pytest.importorskip(
        "litert_torch", reason='building the test bundle needs litert-torch: pip install "bitdeploy[litert-convert]"'
    )
    from bitdeploy.converters.base import ConvertOptions, bind

    work = tmp_path_factory.mktemp("litert-work")
    artifact = bind("litert", "fp32", ConvertOptions()).convert(tiny_model["onnx"], work)
    out = tmp_path_factory.mktemp("bundles") / "tiny-litert"
    with bundle_writer(out) as tmp:
        (tmp / artifact.model_file).write_bytes((work / artifact.model_file).read_bytes())
        write_manifest(
            tmp,
            make_manifest("litert", artifact.model_file, "cpu", "fp32", tiny_model["params"]),
            [artifact.model_file],
        )
    return out


@pytest.fixture()
def bundle_copy(ort_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the ONNX Runtime bundle, for tests that tamper with it."""
    dst = tmp_path / "bundle"
    shutil.copytree(ort_bundle, dst)
    return dst


def synth_photo(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth, photo-like uint8 RGB image (gradients, a blob, noise), so bilinear resizing has work to do."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 127 + 100 * np.sin(xx / max(w, 1) * 6.0 + seed)
    g = 255 * yy / max(h - 1, 1)
    b = 255 * np.exp(-(((xx - w / 3) / (w / 4 + 1)) ** 2 + ((yy - h / 2) / (h / 4 + 1)) ** 2))
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def digit_images(n: int = 3) -> list[np.ndarray]:
    """Real 8x8 handwritten digits (sklearn), scaled 0..16 -> 0..255 uint8."""
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    return [np.clip(d.images[i] * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8) for i in range(n)]


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Valid images of many modes and sizes, and invalid ones, keyed by a short name."""
    d = tmp_path_factory.mktemp("images")
    files: dict[str, Path] = {}

    def save(name: str, img: Image.Image, **kw: Any) -> None:
        files[name.split(".")[0]] = d / name
        img.save(d / name, **kw)

    for i, digit in enumerate(digit_images(3)):
        save(f"digit{i}_L.png", Image.fromarray(digit, "L"))
    save("photo_rgb.jpg", Image.fromarray(synth_photo(480, 640, 1)), quality=92)
    save("photo_odd.png", Image.fromarray(synth_photo(17, 33, 2)))
    save("photo_small.bmp", Image.fromarray(synth_photo(20, 20, 3)))
    rgba = np.dstack([synth_photo(50, 70, 4), np.linspace(0, 255, 70, dtype=np.uint8)[None, :].repeat(50, 0)])
    save("photo_rgba.png", Image.fromarray(rgba, "RGBA"))
    save("photo_p.png", Image.fromarray(synth_photo(40, 60, 5)).quantize(64))
    save("photo_cmyk.jpg", Image.fromarray(synth_photo(64, 48, 6)).convert("CMYK"), quality=95)
    gray16 = (np.linspace(0, 65535, 45 * 30).reshape(45, 30)).astype(np.uint16)
    save("gray16.png", Image.fromarray(gray16))  # mode I;16
    save("one_pixel.png", Image.fromarray(np.array([[[200, 30, 90]]], np.uint8)))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 clockwise to display
    save("rotated.jpg", Image.fromarray(synth_photo(30, 50, 7)), exif=exif, quality=95)

    good = io.BytesIO()
    Image.fromarray(synth_photo(64, 64, 8)).save(good, "JPEG")
    (d / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 3])
    (d / "empty.png").write_bytes(b"")
    (d / "text.jpg").write_text("this is not an image\n")
    (d / "folder.jpg").mkdir()
    files.update(truncated=d / "truncated.jpg", empty=d / "empty.png", text=d / "text.jpg", folder=d / "folder.jpg")
    return files


VALID = [
    "digit0_L",
    "digit1_L",
    "photo_rgb",
    "photo_odd",
    "photo_small",
    "photo_rgba",
    "photo_p",
    "photo_cmyk",
    "gray16",
    "one_pixel",
    "rotated",
]
INVALID = ["truncated", "empty", "text", "folder"]

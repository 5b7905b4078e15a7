"""OpenVINO converter: FP32 / FP16 / INT8 IRs of a digits-trained tiny BiT, checked for numerics and accuracy."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from bitdeploy.converters import calibration as calib_mod
from bitdeploy.converters import openvino_convert
from bitdeploy.converters.base import ConvertOptions, bind
from bitdeploy.converters.openvino_convert import OpenVinoOptions
from bitdeploy.core.errors import ConversionError
from bitdeploy.runtimes.bundle.manifest import Manifest, TargetInfo
from bitdeploy.runtimes.engines.ov import OpenVinoBackend
from tests.converters.tiny_digits import TinyDigits

OPTS = ConvertOptions(threads=2)


def _ov(**extras: Any) -> ConvertOptions:
    """OPTS with the OpenVINO options given."""
    return ConvertOptions(threads=2, extras=OpenVinoOptions(**extras))


def _logits(work: Path, target: TargetInfo, x: np.ndarray) -> np.ndarray:
    backend = OpenVinoBackend(work / openvino_convert.MODEL_XML, Manifest(target=target), threads=2)
    try:
        return np.concatenate([backend.infer(x[i : i + 32]) for i in range(0, len(x), 32)])
    finally:
        backend.close()


def _top1(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


def test_fp32_ir_runs_f32_and_matches_pytorch(tiny: TinyDigits, tmp_path: Path) -> None:
    art = bind("openvino", "fp32", OPTS).convert(tiny.onnx, tmp_path)
    assert art.backend == "openvino" and art.model_file == "model.xml"
    assert set(art.files) == {"model.xml", "model.bin"} and all((tmp_path / f).is_file() for f in art.files)
    t = art.target.to_dict()
    assert (t["precision"], t["precision_used"], t["inference_precision"], t["device"]) == ("fp32", "f32", "f32", "CPU")
    assert t["openvino_version"]
    logits = _logits(tmp_path, t, tiny.val_x)
    scale = max(1.0, float(np.abs(tiny.reference_logits).max()))
    assert float(np.abs(logits - tiny.reference_logits).max()) / scale < 1e-4
    assert _top1(logits, tiny.val_y) == tiny.reference_top1


def test_fp16_halves_the_weights_and_keeps_top1(tiny: TinyDigits, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    bind("openvino", "fp32", OPTS).convert(tiny.onnx, tmp_path / "a")
    art = bind("openvino", "fp16", OPTS).convert(tiny.onnx, tmp_path / "b")
    size32, size16 = (tmp_path / "a/model.bin").stat().st_size, (tmp_path / "b/model.bin").stat().st_size
    assert size16 < 0.55 * size32
    assert 'element_type="f16"' in (tmp_path / "b/model.xml").read_text()
    # Pinned to f32 on every CPU class: f16 storage only, so the device computes what the build validated.
    assert (art.target.get("inference_precision"), art.target.precision_used) == ("f32", "f32")
    logits = _logits(tmp_path / "b", art.target, tiny.val_x)
    assert tiny.reference_top1 - _top1(logits, tiny.val_y) <= max(0.002, 1.0 / len(tiny.val_y) + 1e-9)


def test_bf16_is_opt_in_and_refused_where_the_cpu_has_none(tiny: TinyDigits, tmp_path: Path) -> None:
    from bitdeploy.runtimes.bundle.fingerprint import host_fingerprint

    with pytest.raises(ConversionError, match="fp32 computes in f32"):
        bind("openvino", "fp32", _ov(inference_precision="bf16")).convert(tiny.onnx, tmp_path)
    with pytest.raises(ConversionError, match="not an OpenVINO float precision"):
        bind("openvino", "fp16", _ov(inference_precision="fp8")).convert(tiny.onnx, tmp_path)
    has_bf16 = bool({"avx512_bf16", "amx_bf16"} & set(host_fingerprint()["cpu"]["features"]))
    if not has_bf16:
        with pytest.raises(ConversionError, match="computes in f32, not the requested bf16"):
            bind("openvino", "fp16", _ov(inference_precision="bf16")).convert(tiny.onnx, tmp_path)
        return
    art = bind("openvino", "fp16", _ov(inference_precision="bf16")).convert(tiny.onnx, tmp_path)
    assert (art.target.get("inference_precision"), art.target.precision_used) == ("bf16", "bf16")


def _reads_fq(op: Any) -> bool:
    return any(v.get_node().get_type_name() == "FakeQuantize" for v in op.input_values())


def _feeds_fq(op: Any) -> bool:
    return any(t.get_node().get_type_name() == "FakeQuantize" for out in op.outputs() for t in out.get_target_inputs())


def test_int8_quantizes_the_convs_keeps_norms_residuals_head_float_and_passes_the_gate(
    tiny: TinyDigits, calibration: calib_mod.CalibrationData, tmp_path: Path
) -> None:
    art = bind("openvino", "int8", OPTS).convert(tiny.onnx, tmp_path, calibration)
    t = art.target.to_dict()
    assert t["precision_used"].startswith("int8+")
    assert (
        t["quantization"]["samples"] == len(calibration) and t["quantization"]["float_scope"] == "norms-residual-head"
    )
    import openvino as ov

    model = ov.Core().read_model(str(tmp_path / "model.xml"))
    ops = model.get_ordered_ops()
    convs = [op for op in ops if op.get_type_name() == "Convolution"]
    assert sum(_reads_fq(c) for c in convs) == len(convs) - 1  # every conv input but the head's
    pool = [op for op in ops if op.get_type_name() == "ReduceMean"][-1]
    head = next(tgt.get_node() for tgt in pool.output(0).get_target_inputs())
    assert not _reads_fq(pool) and not _reads_fq(head)
    mvns = [op for op in ops if op.get_type_name() == "MVN"]
    # GroupNorm statistics see float input (Reshape -> MVN); NNCF still quantizes the normalised output.
    assert mvns and not any(_reads_fq(m) or _reads_fq(m.input_value(0).get_node()) for m in mvns)
    adds = [
        op
        for op in ops
        if op.get_type_name() == "Add" and all(v.get_node().get_type_name() != "Constant" for v in op.input_values())
    ]
    assert adds and not any(_reads_fq(a) or _feeds_fq(a) for a in adds)
    top1 = _top1(_logits(tmp_path, t, tiny.val_x), tiny.val_y)
    assert top1 >= tiny.reference_top1 - 0.01, (top1, tiny.reference_top1)


def test_int8_float_scope_none_is_nncf_default(
    tiny: TinyDigits, calibration: calib_mod.CalibrationData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The scope is a module constant (no build option); the measurement's alternatives stay reachable here.
    monkeypatch.setattr(openvino_convert, "DEFAULT_SCOPE", "none")
    art = bind("openvino", "int8", OPTS).convert(tiny.onnx, tmp_path, calibration)
    import openvino as ov

    model = ov.Core().read_model(str(tmp_path / "model.xml"))
    ops = model.get_ordered_ops()
    assert art.target.to_dict()["quantization"]["float_scope"] == "none"
    assert any(_feeds_fq(op) for op in ops if op.get_type_name() == "MVN")  # NNCF quantizes GroupNorm's output
    with pytest.raises(ConversionError, match=r"unknown OpenVINO INT8 float scope 'all'"):
        openvino_convert.ignored_scope(model, "all")


def test_int8_with_accuracy_control(tiny: TinyDigits, calibration: calib_mod.CalibrationData, tmp_path: Path) -> None:
    validation = calib_mod.ValidationData.from_arrays(tiny.val_x[:120], tiny.val_y[:120])
    work = tmp_path / "b"
    work.mkdir()
    opts = _ov(accuracy_control=True, validation=validation, max_accuracy_drop=1.0)
    art = bind("openvino", "int8", opts).convert(tiny.onnx, work, calibration)
    q = art.target.to_dict()["quantization"]
    assert q["accuracy_control"] is True and q["max_drop_pp"] == 1.0 and q["validation_samples"] == 120
    top1 = _top1(_logits(work, art.target, tiny.val_x), tiny.val_y)
    assert top1 >= tiny.reference_top1 - 0.01


@pytest.mark.parametrize(
    ("precision", "calibration", "options", "pattern"),
    [
        ("int8", None, ConvertOptions(), r"needs calibration images; pass --dataset"),
        (
            "fp32",
            None,
            ConvertOptions(extras=OpenVinoOptions(accuracy_control=True)),
            r"--accuracy-control applies to --precision int8",
        ),
        ("fp32", None, ConvertOptions(device="TPU"), r"unknown OpenVINO device 'TPU'"),
        ("bf16", None, ConvertOptions(), r"precision must be fp32, fp16 or int8"),
    ],
)
def test_bad_requests_are_one_line_errors(
    tiny: TinyDigits, tmp_path: Path, precision: str, calibration: Any, options: ConvertOptions, pattern: str
) -> None:
    with pytest.raises(ConversionError, match=pattern) as err:
        bind("openvino", precision, options).convert(tiny.onnx, tmp_path, calibration)
    assert "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_accuracy_control_without_validation_split(
    tiny: TinyDigits, calibration: calib_mod.CalibrationData, tmp_path: Path
) -> None:
    with pytest.raises(ConversionError, match=r"needs the validation split") as err:
        bind("openvino", "int8", _ov(accuracy_control=True)).convert(tiny.onnx, tmp_path, calibration)
    assert "\n" not in str(err.value)


def test_calib_method_must_be_an_nncf_one(
    tiny: TinyDigits, calibration: calib_mod.CalibrationData, tmp_path: Path
) -> None:
    with pytest.raises(
        ConversionError, match=r"--calib-method 'entropy' is not available for OpenVINO; choose one of: mean_minmax"
    ):
        bind("openvino", "int8", ConvertOptions(calib_method="entropy")).convert(tiny.onnx, tmp_path, calibration)


def test_devices() -> None:
    import openvino as ov

    assert openvino_convert.parse_device(None) == "CPU"
    assert openvino_convert.parse_device("cpu") == "CPU"
    assert openvino_convert.parse_device("GPU.1") == "GPU.1"
    assert openvino_convert.parse_device("auto:GPU,CPU") == "AUTO:GPU,CPU"
    core = ov.Core()
    openvino_convert.check_device(core, "CPU")
    openvino_convert.check_device(core, "AUTO")
    if "GPU" not in " ".join(core.available_devices):
        with pytest.raises(ConversionError, match=r"OpenVINO device GPU is not available here \(available: .*CPU"):
            openvino_convert.check_device(core, "GPU")


def test_compile_config_pins_precision_only_when_asked() -> None:
    assert openvino_convert.compile_config("f32", 2) == {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
        "INFERENCE_NUM_THREADS": 2,
    }
    assert "INFERENCE_PRECISION_HINT" not in openvino_convert.compile_config(None)
    assert re.fullmatch(r"[a-z_]+", openvino_convert.CALIB_METHODS[0])


def test_inference_precision_applies_to_fp16_and_int8_rows_only(tmp_path: Path) -> None:
    """`--precision fp32,fp16 --inference-precision bf16`: the fp32 row stays f32, the fp16 row records bf16."""
    from bitdeploy.cli import main
    from bitdeploy.runtimes.bundle.fingerprint import host_fingerprint

    if (
        "avx512_bf16" not in host_fingerprint()["cpu"]["features"]
        and "amx_bf16" not in host_fingerprint()["cpu"]["features"]
    ):
        pytest.skip("needs a CPU with bf16 units: elsewhere the fp16 row is refused (tested above)")
    out = tmp_path / "b"
    main(
        [
            "build",
            "--model",
            "tiny",
            "--weights",
            "none",
            "--target",
            "openvino",
            "--precision",
            "fp32,fp16",
            "--inference-precision",
            "bf16",
            "--out",
            str(out),
            "--no-report",
            "--no-cache",
        ]
    )  # exits only on failure
    pins = {
        p: json.loads((out / f"openvino-{p}" / "manifest.json").read_text())["target"]["inference_precision"]
        for p in ("fp32", "fp16")
    }
    assert pins == {"fp32": "f32", "fp16": "bf16"}

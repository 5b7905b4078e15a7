"""benchmarks/experiments/gn_tax.py: its profile parsing, op counts and tables. The script's runs (BiT against a
BatchNorm ResNet-50 on OpenVINO and ONNX Runtime) are recorded in docs/measurements.md."""

from __future__ import annotations

import pytest

from tests.experiments import load

gt = load("gn_tax")


def _node(name: str, op: str, ts: int, dur: int) -> dict[str, object]:
    return {"cat": "Node", "name": name, "ts": ts, "dur": dur, "args": {"op_name": op}}


def test_ort_profile_sums_kernel_times_by_op_after_the_warmup_runs() -> None:
    events = [
        {"cat": "Session", "name": "session_initialization", "ts": 0, "dur": 50},
        {"cat": "Session", "name": "model_run", "ts": 100, "dur": 100},  # warm-up
        _node("conv_kernel_time", "Conv", 110, 999),
        {"cat": "Session", "name": "model_run", "ts": 300, "dur": 100},
        _node("conv_fence_before", "Conv", 305, 7),  # fences are not kernel time
        _node("conv_kernel_time", "Conv", 310, 40),
        _node("gn_kernel_time", "InstanceNormalization", 350, 20),
        {"cat": "Session", "name": "model_run", "ts": 500, "dur": 100},
        _node("conv_kernel_time", "Conv", 510, 60),
        _node("gn_kernel_time", "InstanceNormalization", 560, 10),
    ]
    us, count, runs = gt.ort_op_times(events, skip_runs=1)
    assert runs == 2 and us == {"Conv": 100.0, "InstanceNormalization": 30.0}
    assert count == {"Conv": 2, "InstanceNormalization": 2}
    assert gt.per_call(us, runs) == {"Conv": 0.05, "InstanceNormalization": 0.015}
    assert gt.ort_op_times(events, skip_runs=3) == ({}, {}, 0)


def test_ov_profile_counts_only_executed_nodes() -> None:
    calls = [
        [("Convolution", "Status.EXECUTED", 30.0), ("Reshape", "Status.OPTIMIZED_OUT", 0.0)],
        [("Convolution", "Status.EXECUTED", 50.0), ("Reshape", "Status.NOT_RUN", 0.0)],
    ]
    us, count, n = gt.ov_op_times(calls)
    assert n == 2 and us == {"Convolution": 80.0, "Reshape": 0.0} and count == {"Convolution": 2}


def test_op_counts_map_openvino_and_litert_names_to_onnx_ones() -> None:
    c = gt.op_counts(["Conv", "Multiply", "Mul", "MVN", "Add", "ADD", "FakeQuantize", "DEQUANTIZE", "Relu"])
    assert c["Mul"] == 2 and c["Add"] == 2 and c["MVN"] == 1 and c["FakeQuantize"] == 1
    assert c["DequantizeLinear"] == 1 and c["Reshape"] == 0 and c["nodes"] == 9
    lines = gt.counts_table({"OpenVINO int8 BiT": c, "OpenVINO int8 ResNet-50": gt.op_counts(["Conv"])})
    assert lines[0] == "| graph | MVN | Mul | Add | FakeQuantize | DequantizeLinear | all ops |"
    assert lines[3] == "| OpenVINO int8 ResNet-50 | 0 | 0 | 0 | 0 | 0 | 1 |"


def test_activation_ops_leave_out_what_computes_from_weights_alone() -> None:
    nodes = [
        ("Constant", [], ["c"]),
        ("DequantizeLinear", ["w_q", "w_scale", ""], ["w"]),  # a weight: initializers only
        ("Multiply", ["c", "w"], ["w2"]),  # decompression of a weight
        ("QuantizeLinear", ["input", "s"], ["xq"]),
        ("DequantizeLinear", ["xq", "s"], ["x"]),
        ("Conv", ["x", "w2"], ["y"]),
        ("Parameter", [], ["p"]),  # no inputs but not a Constant: kept
    ]
    assert gt.activation_ops(nodes, ["w_q", "w_scale", "s"]) == [
        "QuantizeLinear",
        "DequantizeLinear",
        "Conv",
        "Parameter",
    ]


def test_profile_table_ranks_kinds_and_folds_the_rest() -> None:
    bit = gt.Profile({f"k{i}": float(i) for i in range(12)} | {"Idle": 0.0}, {"k11": 2.0, "k0": 1.5}, 5, 70.0)
    ref = gt.Profile({"k11": 4.0, "k1": 3.0}, {"k11": 1.0}, 5, 8.0)
    lines = gt.profile_table(bit, ref, top=3)
    assert len(lines) == 2 + 3 + 3  # header, 3 kinds, other, all nodes, wall
    assert lines[2] == "| k11 | 11.00 | 16.7 % | 4.00 | 57.1 % | 2 | 1 |"
    assert lines[3].startswith("| k10 | 10.00 |") and lines[4].startswith("| k9 |")
    # k0 (nodes only) to k8
    assert lines[5] == "| other (9 kinds) | 36.00 | 54.5 % | 3.00 | 42.9 % | 1.5 | 0 |"
    assert "Idle" not in "".join(lines)
    assert lines[6] == "| **all nodes** | **66.00** | 100 % | **7.00** | 100 % | 3.5 | 1 |"


def test_timing_table_gives_the_ratio_with_its_per_round_spread() -> None:
    assert gt.ratio_spread([2.0, 3.0, 4.0], [1.0, 2.0, 1.0]) == (1.5, 4.0)
    t = {"p50_ms": 10.0, "p50_spread": [9.0, 11.0]}
    row = {
        "engine": "openvino",
        "label": "INT8 (float layers f32)",
        gt.BIT: t,
        gt.REF: {"p50_ms": 5.0, "p50_spread": [4.5, 5.5]},
        "ratio": 2.0,
        "ratio_spread": [1.8, 2.2],
        "vs_fp32": [1.5, 3.0],
    }
    lines = gt.timing_table([row, {**row, "label": "FP32", "vs_fp32": None}])
    assert lines[2] == (
        "| OpenVINO | INT8 (float layers f32) | 10.00 [9.00–11.00] | 5.00 [4.50–5.50] | 2.00× [1.80–2.20] | 1.50× / 3.00× |"
    )
    assert lines[3].endswith("| 2.00× [1.80–2.20] | – |")


def test_engines_from_the_command_line() -> None:
    assert gt.parse_args([]).engines == ["openvino", "onnxruntime"]
    assert gt.parse_args(["--engines", "onnxruntime", "--litert"]).engines == ["onnxruntime", "litert"]
    with pytest.raises(SystemExit):
        gt.parse_args(["--engines", "tensorrt"])

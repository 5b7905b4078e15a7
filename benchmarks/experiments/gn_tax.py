"""BiT's GroupNorm tax: where BiT-M R50x1's CPU time goes, against a BatchNorm ResNet-50 of the same convolutions.

    python benchmarks/experiments/gn_tax.py [--resolution 128] [--rounds 15] [--calls 10] [--threads 2]
        [--engines openvino,onnxruntime] [--litert] [--calib-size 64] [--profile-calls 20] [--json PATH]
        [--no-profile]

The two models share every convolution (ResNet-50 v1.5 layout: a 7x7/2 stem and max-pool, 3-4-6-3 bottlenecks with
the stride on the 3x3) and differ in their normalisation: BiT is pre-activation with weight-standardised convs
and 49 GroupNorms (32 groups), whose statistics are computed on every call, so nothing folds them into the convs;
the reference normalises with BatchNorm, which the export folds into the convs, so it runs convs, ReLUs, adds,
two poolings and its classifier only.

- BiT: `m-r50x1` with 10 classes, random weights and randomised GroupNorm affines (`cpu_targets.randomise_norms`:
  at 1 and 0 the engines delete the per-channel Mul/Add, a cheaper graph than any real checkpoint has), made
  as `cpu_targets.py` makes it, exported by `bitdeploy.converters.onnx_export.export_onnx` (WS folded, opset 17,
  onnxslim) and converted by bitdeploy's own converters with their defaults: OpenVINO INT8 is NNCF with
  GroupNorm, the residual adds and the head kept float and float layers pinned to f32 (`--inference-precision
  f32`, the default); ONNX Runtime INT8 is Conv-only static Q/DQ, U8S8 with 7-bit weights on x86.
- ResNet-50: the torchvision architecture (written out here, torchvision is not a dependency) with 10 classes,
  random weights and randomised BatchNorm running statistics and affines, exported by torch.onnx (TorchScript
  exporter, opset 17, eval mode: BN folds into the convs; the script checks no BatchNormalization is left) and
  onnxslim, as BiT's export is; quantized the engines' default ways: `nncf.quantize` with its default preset
  (performance) and default placement for OpenVINO INT8 (float layers f32), and `onnxruntime.quantization.
  quantize_static` in QDQ format with every op type it quantizes by default, per-channel symmetric S8 weights and
  asymmetric U8 activations (MinMax; without the optional `quant_pre_process`) for ONNX Runtime INT8. FP32 rows
  are the export as is.
- Both INT8 models are calibrated on the same `--calib-size` digits training images (`converters.calibration`).
  `--litert` adds LiteRT (XNNPACK): BiT through bitdeploy's LiteRT converter, ResNet-50 (BN folded in PyTorch)
  through litert-torch, INT8 by PT2E with litert-torch's symmetric per-channel static config on every op it
  annotates. LiteRT is timed only: its Python interpreter has no per-operator profiler.

Timing: one process, batch 1, `--threads` threads, every model through bitdeploy's runtime backend (the sessions a
bundle gets). Each engine family is timed on its own (ONNX Runtime's spinning threads would tax the others): its
BiT and ResNet-50 models, INT8 and FP32, take turns in `--rounds` rounds of `--calls` calls (after `--warmup` calls
each, and 2 more per round; the order rotates each round: `bitdeploy.benchmarks.quick`). Timing rows: p50 = median of the per-round medians, with
their [min-max]; "BiT / ResNet-50" = ratio of the p50s with the [min-max] of the per-round ratios (these hold on a
busy machine where absolute times drift); "vs FP32" = the model's FP32 p50 over its INT8 p50.

Profiles (unless `--no-profile`), after the timing, with fresh sessions: OpenVINO's performance counters (compiled
with PERF_COUNT, `get_profiling_info()` after each of `--profile-calls` calls, real_time summed by node_type) and
ONNX Runtime's profiler (`enable_profiling`, "Node" kernel_time events summed by op_name, warm-up runs dropped).
Profile rows: per operator kind in the optimised graph the engine executes (after its fusions), ms per call and
share of the summed node time, top 10 kinds by combined time then the rest; "nodes" = executed nodes of that kind
per call. The last rows: the summed node time, and the mean wall time of a call with profiling on. Graph rows: op
counts in each model file as converted (ONNX, OpenVINO IR, .tflite: before the engine's own fusions), activation
path only (weights and their dequantization left out): the op types BiT's GroupNorm decomposes into (Reshape,
InstanceNormalization / MVN, Mul, Add, Transpose; Add counts the residual adds too) and the quantization ops
(FakeQuantize, QuantizeLinear / DequantizeLinear).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
BIT, REF = "BiT", "ResNet-50"
MODELS = (BIT, REF)
ENGINES = {"openvino": "OpenVINO", "onnxruntime": "ONNX Runtime", "litert": "LiteRT"}
PRECISIONS = ("int8", "fp32")
TARGET = {"openvino": "openvino", "onnxruntime": "onnx", "litert": "litert"}  # bitdeploy's target names
CLASSES = 10  # the digits classes, the head cpu_targets.py gives a random BiT
SEED = 0
TOP = 10
# Op types counted in the graphs: what BiT's GroupNorm decomposes into, and the quantization ops.
GN_OPS = ("Reshape", "InstanceNormalization", "MVN", "GroupNormalization", "Mul", "Add", "Transpose")
QUANT_OPS = ("FakeQuantize", "QuantizeLinear", "DequantizeLinear")
# OpenVINO IR and LiteRT op names -> the ONNX names the tables use
OP_NAMES = dict(Multiply="Mul", MUL="Mul", ADD="Add", RESHAPE="Reshape", TRANSPOSE="Transpose")
OP_NAMES.update(QUANTIZE="QuantizeLinear", DEQUANTIZE="DequantizeLinear")


def log(msg: str) -> None:
    print(f"... {msg}", file=sys.stderr, flush=True)


@dataclass
class Built:
    """One converted model: which, for which engine and precision, its file and the target record it runs with."""

    model: str  # BIT or REF
    engine: str  # a key of ENGINES
    precision: str  # int8 | fp32
    path: Path
    target: dict[str, Any]
    what: str = ""

    @property
    def key(self) -> str:
        return f"{self.engine}-{self.precision}-{self.model}"


@dataclass
class Profile:
    """One model's per-operator profile: ms per call and executed nodes per call, by operator kind."""

    ms: dict[str, float]
    nodes: dict[str, float]
    calls: int
    wall_ms: float  # mean wall time of a profiled call (the node times are means too)
    notes: list[str] = field(default_factory=list)

    @property
    def total_ms(self) -> float:
        return sum(self.ms.values())


# -- pure helpers (tested in tests/benchmarks/test_gn_tax.py) ---------------------------------------------------------
def ratio_spread(numerator: Sequence[float], denominator: Sequence[float]) -> tuple[float, float]:
    """[min, max] of the per-round ratios numerator[i] / denominator[i]."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True) if b > 0]
    if not ratios:
        return float("nan"), float("nan")
    return min(ratios), max(ratios)


def ort_op_times(
    events: Iterable[Mapping[str, Any]], skip_runs: int = 0
) -> tuple[dict[str, float], dict[str, int], int]:
    """ONNX Runtime profile events -> (µs by op_name, node events by op_name, runs kept), summed over the runs after
    the first `skip_runs` (`model_run` session events, in time order): only "Node" `*_kernel_time` events count."""
    evs = list(events)
    runs = sorted(
        (int(e["ts"]), int(e["ts"]) + int(e.get("dur", 0)))
        for e in evs
        if e.get("cat") == "Session" and e.get("name") == "model_run"
    )
    kept = runs[skip_runs:]
    us: dict[str, float] = {}
    count: dict[str, int] = {}
    if not kept:
        return us, count, 0
    for e in evs:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        ts = int(e["ts"])
        if not any(lo <= ts <= hi for lo, hi in kept):
            continue
        op = str((e.get("args") or {}).get("op_name") or "?")
        us[op] = us.get(op, 0.0) + float(e.get("dur", 0))
        count[op] = count.get(op, 0) + 1
    return us, count, len(kept)


def ov_op_times(calls: Iterable[Iterable[tuple[str, str, float]]]) -> tuple[dict[str, float], dict[str, int], int]:
    """OpenVINO profiling info of several calls, each a list of (node_type, status, real_time µs) ->
    (µs by node_type, executed nodes by node_type, calls), summed over the calls."""
    us: dict[str, float] = {}
    count: dict[str, int] = {}
    n = 0
    for call in calls:
        n += 1
        for node_type, status, real_us in call:
            us[node_type] = us.get(node_type, 0.0) + real_us
            if status.upper().endswith("EXECUTED"):
                count[node_type] = count.get(node_type, 0) + 1
    return us, count, n


def per_call(totals: Mapping[str, float], calls: int, scale: float = 1e-3) -> dict[str, float]:
    """Totals over `calls` calls -> per call, times `scale` (µs -> ms by default)."""
    return {k: v * scale / max(1, calls) for k, v in totals.items()}


def activation_ops(
    nodes: Iterable[tuple[str, Sequence[str], Sequence[str]]], constants: Iterable[str] = ()
) -> list[str]:
    """The op types of `nodes` ((op type, input names, output names), in topological order) that compute from the
    graph's input: a Constant, or a node whose every input is a constant or computed from constants alone (weight
    dequantization, decompression), is left out. `constants`: the initializers' names."""
    known = set(constants)
    out = []
    for op, ins, outs in nodes:
        if op == "Constant" or (ins and all(i in known for i in ins if i)):
            known.update(outs)
        else:
            out.append(op)
    return out


def op_counts(types: Iterable[str], kinds: Sequence[str] = GN_OPS + QUANT_OPS) -> dict[str, int]:
    """How many of `types` (op type names, OpenVINO's and LiteRT's mapped to ONNX's) are of each of `kinds`, plus the total."""
    out = dict.fromkeys(kinds, 0)
    total = 0
    for t in types:
        total += 1
        t = OP_NAMES.get(t, t)
        if t in out:
            out[t] += 1
    out["nodes"] = total
    return out


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f} %" if whole > 0 else "–"


def _nodes(x: float) -> str:
    return f"{x:.0f}" if abs(x - round(x)) < 0.05 else f"{x:.1f}"


def profile_table(bit: Profile, ref: Profile, top: int = TOP) -> list[str]:
    """Markdown rows: op kind | BiT ms | share | ResNet-50 ms | share | nodes BiT | nodes ResNet-50, the `top` kinds by
    combined time, the rest as one row, then the summed node time and the profiled wall time."""
    seen = {k for p in (bit, ref) for k in (*p.ms, *p.nodes) if p.ms.get(k, 0.0) > 0 or p.nodes.get(k, 0) > 0}
    kinds = sorted(seen, key=lambda k: (-(bit.ms.get(k, 0.0) + ref.ms.get(k, 0.0)), k))
    tb, tr = bit.total_ms, ref.total_ms
    lines = [
        f"| op kind | {BIT} ms | share | {REF} ms | share | {BIT} nodes | {REF} nodes |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k in kinds[:top]:
        b, r = bit.ms.get(k, 0.0), ref.ms.get(k, 0.0)
        lines.append(
            f"| {k} | {b:.2f} | {_pct(b, tb)} | {r:.2f} | {_pct(r, tr)} | "
            f"{_nodes(bit.nodes.get(k, 0))} | {_nodes(ref.nodes.get(k, 0))} |"
        )
    rest = kinds[top:]
    if rest:
        b = sum(bit.ms.get(k, 0.0) for k in rest)
        r = sum(ref.ms.get(k, 0.0) for k in rest)
        nb = sum(bit.nodes.get(k, 0) for k in rest)
        nr = sum(ref.nodes.get(k, 0) for k in rest)
        lines.append(
            f"| other ({len(rest)} kinds) | {b:.2f} | {_pct(b, tb)} | {r:.2f} | {_pct(r, tr)} | {_nodes(nb)} | {_nodes(nr)} |"
        )
    lines.append(
        f"| **all nodes** | **{tb:.2f}** | 100 % | **{tr:.2f}** | 100 % | "
        f"{_nodes(sum(bit.nodes.values()))} | {_nodes(sum(ref.nodes.values()))} |"
    )
    lines.append(f"| wall per call, mean (profiling on) | {bit.wall_ms:.2f} | | {ref.wall_ms:.2f} | | | |")
    return lines


def _ms(p50: float, spread: Sequence[float]) -> str:
    return f"{p50:.2f} [{spread[0]:.2f}–{spread[1]:.2f}]"


def timing_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown rows from `timing` results: engine | precision | BiT p50 | ResNet-50 p50 | BiT / ResNet-50 | vs FP32."""
    lines = [
        f"| engine | precision | {BIT} p50 ms [min–max] | {REF} p50 ms [min–max] | {BIT} / {REF} [min–max] | "
        f"vs FP32 ({BIT} / {REF}) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lo, hi = r["ratio_spread"]
        fp = r.get("vs_fp32")
        lines.append(
            f"| {ENGINES.get(r['engine'], r['engine'])} | {r['label']} | {_ms(r[BIT]['p50_ms'], r[BIT]['p50_spread'])} | "
            f"{_ms(r[REF]['p50_ms'], r[REF]['p50_spread'])} | {r['ratio']:.2f}× [{lo:.2f}–{hi:.2f}] | "
            + (f"{fp[0]:.2f}× / {fp[1]:.2f}× |" if fp else "– |")
        )
    return lines


def counts_table(counts: Mapping[str, Mapping[str, int]]) -> list[str]:
    """Markdown rows: one per model file (key "engine precision model"), one column per counted op type present."""
    present = [k for k in GN_OPS + QUANT_OPS if any(c.get(k) for c in counts.values())]
    lines = [
        "| graph | " + " | ".join(present) + " | all ops |",
        "|---|" + "---:|" * (len(present) + 1),
    ]
    for name, c in counts.items():
        lines.append(f"| {name} | " + " | ".join(str(c.get(k, 0)) for k in present) + f" | {c.get('nodes', 0)} |")
    return lines


# -- the models ---------------------------------------------------------------------------------------------------------
def bit_model(name: str, seed: int) -> Any:
    """BiT as cpu_targets.py makes it with `--weights none`: random weights, GroupNorm affines randomised."""
    import torch

    if str(HERE) not in sys.path:  # the scripts import one another by file name
        sys.path.insert(0, str(HERE))
    from cpu_targets import randomise_norms

    from bitdeploy.training.weights import load_model

    torch.manual_seed(seed)
    model = load_model(name, "none", num_classes=CLASSES).model.eval()
    randomise_norms(model, seed)
    return model


def resnet50(num_classes: int = CLASSES) -> Any:
    """torchvision's ResNet-50 (v1.5: the stride on the 3x3 conv), same module names, same initialisation."""
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + identity)

    class ResNet50(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inplanes = 64
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            self.layer1 = self._layer(64, 3, 1)
            self.layer2 = self._layer(128, 4, 2)
            self.layer3 = self._layer(256, 6, 2)
            self.layer4 = self._layer(512, 3, 2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(2048, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)

        def _layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
            down = None
            if stride != 1 or self.inplanes != planes * 4:
                down = nn.Sequential(
                    nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
                )
            layers = [Bottleneck(self.inplanes, planes, stride, down)]
            self.inplanes = planes * 4
            layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
            return nn.Sequential(*layers)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return ResNet50()


def reference_model(seed: int) -> Any:
    """ResNet-50 with random weights and randomised BatchNorm statistics and affines (none folds into an identity)."""
    import torch

    torch.manual_seed(seed)
    model = resnet50().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c, mean, var = m.num_features, m.running_mean, m.running_var
                assert mean is not None and var is not None  # track_running_stats, the default
                mean.copy_(torch.randn(c, generator=gen) * 0.1)
                var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
    return model


def export_reference(model: Any, resolution: int, path: Path) -> dict[str, Any]:
    """torch.onnx (opset 17, eval: BN folded) then onnxslim, as BiT's export; checked against PyTorch."""
    import onnx
    import onnxruntime as ort
    import onnxslim
    import torch

    from bitdeploy.converters.onnx_export import torch_export
    from bitdeploy.core.errors import ConversionError

    raw = path.with_name("raw.onnx")
    torch_export(model, resolution, raw, opset=17)
    slim = onnxslim.slim(onnx.load(str(raw)))
    onnx.save(slim, str(path))
    raw.unlink()
    ops = [n.op_type for n in slim.graph.node]
    if "BatchNormalization" in ops:
        raise ConversionError(f"{ops.count('BatchNormalization')} BatchNormalization nodes left in the export")
    x = np.random.default_rng(SEED).uniform(-1, 1, (2, 3, resolution, resolution)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    diff = float(np.abs(got - want).max())
    scale = max(1.0, float(np.abs(want).max()))
    if not np.isfinite(got).all() or diff > 1e-4 * scale:
        raise ConversionError(f"the ResNet-50 export differs from PyTorch by {diff:.3g}")
    return {"nodes": len(ops), "max_abs_diff": diff, "max_abs_logit": float(np.abs(want).max())}


def fold_bn(model: Any) -> Any:
    """A copy of the ResNet-50 with every BatchNorm folded into the conv before it (for litert-torch)."""
    import copy

    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    pairs = [(f"conv{i}", f"bn{i}") for i in (1, 2, 3)]  # the stem's and every bottleneck's
    for m in list(folded.modules()):
        for conv, bn in pairs:
            c, b = getattr(m, conv, None), getattr(m, bn, None)
            if isinstance(c, torch.nn.Conv2d) and isinstance(b, torch.nn.BatchNorm2d):
                setattr(m, conv, fuse_conv_bn_eval(c, b))
                setattr(m, bn, torch.nn.Identity())
        down = getattr(m, "downsample", None)
        if isinstance(down, torch.nn.Sequential):
            dc, db = down[0], down[1]
            assert isinstance(dc, torch.nn.Conv2d) and isinstance(db, torch.nn.BatchNorm2d)
            m.downsample = torch.nn.Sequential(fuse_conv_bn_eval(dc, db))
    return folded


# -- conversions --------------------------------------------------------------------------------------------------------
def _ref_target(engine: str, precision: str) -> dict[str, Any]:
    if engine == "openvino":
        used = "int8+f32" if precision == "int8" else "f32"
        return {
            "backend": "openvino",
            "precision": precision,
            "precision_used": used,
            "device": "CPU",
            "inference_precision": "f32",
            "performance_hint": "LATENCY",
        }
    return {"backend": engine, "precision": precision, "precision_used": precision}


def convert_bit(onnx_path: Path, engine: str, precision: str, work: Path, calibration: Any, threads: int) -> Built:
    from bitdeploy.converters.base import ConvertOptions, bind

    out = work / f"bit-{engine}-{precision}"
    out.mkdir()
    art = bind(TARGET[engine], precision, ConvertOptions(threads=threads)).convert(
        onnx_path, out, calibration if precision == "int8" else None
    )
    target = replace(art.target, precision=precision).to_dict()
    return Built(BIT, engine, precision, out / art.model_file, target, str(target.get("precision_used")))


def convert_reference(
    onnx_path: Path, model: Any, engine: str, precision: str, work: Path, calibration: Any, res: int
) -> Built:
    out = work / f"ref-{engine}-{precision}"
    out.mkdir()
    target = _ref_target(engine, precision)
    if engine == "onnxruntime":
        path = out / "model.onnx"
        if precision == "fp32":
            path.write_bytes(onnx_path.read_bytes())
            return Built(REF, engine, precision, path, target, "fp32")
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        from bitdeploy.converters.calibration import ort_reader

        quantize_static(
            str(onnx_path),
            str(path),
            ort_reader(calibration, "input"),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        return Built(REF, engine, precision, path, target, "quantize_static QDQ, U8 act / S8 per-channel weights")
    if engine == "openvino":
        import openvino as ov

        ov_model = ov.convert_model(str(onnx_path))
        what = "f32"
        if precision == "int8":
            import nncf

            from bitdeploy.converters.calibration import nncf_dataset
            from bitdeploy.core.stdio import stdout_to_stderr

            nncf.set_log_level(40)
            with stdout_to_stderr("nncf"):
                ov_model = nncf.quantize(ov_model, nncf_dataset(calibration), subset_size=len(calibration))
            what = "nncf.quantize defaults, int8+f32"
        path = out / "model.xml"
        ov.save_model(ov_model, str(path), compress_to_fp16=False)
        return Built(REF, engine, precision, path, target, what)
    return _litert_reference(model, precision, out, calibration, res)


@contextlib.contextmanager
def _stdout_fd_to_stderr() -> Iterator[None]:
    """litert-torch's progress lines and the converter's C++ logs go to stderr, so stdout keeps only the tables."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _litert_reference(model: Any, precision: str, out: Path, calibration: Any, res: int) -> Built:
    """ResNet-50 (BN folded) -> .tflite by litert-torch: FP32 as is, INT8 by PT2E with its default static config
    (which quantizes the stem conv too, so the graph's input is int8: `QuantizedInput` feeds it)."""
    import litert_torch
    import torch

    folded = fold_bn(model)
    sample = torch.zeros(1, 3, res, res)
    path = out / "model.tflite"
    if precision == "fp32":
        with _stdout_fd_to_stderr():
            litert_torch.convert(folded, (sample,)).export(str(path))
        return Built(REF, "litert", precision, path, {"backend": "litert", "precision": "fp32"}, "fp32")
    from litert_torch.quantize import pt2e_quantizer
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
    )
    with _stdout_fd_to_stderr():
        prepared = prepare_pt2e(torch.export.export(folded, (sample,)).module(), quantizer)
        with torch.no_grad():
            for batch in calibration.batches(1):
                prepared(torch.from_numpy(batch))
        quantized = convert_pt2e(prepared, fold_quantize=False)
        move_exported_model_to_eval(quantized)
        edge = litert_torch.convert(quantized, (sample,), quant_config=QuantConfig(pt2e_quantizer=quantizer))
        edge.export(str(path))
    target = {"backend": "litert", "precision": "int8"}
    return Built(REF, "litert", precision, path, target, "PT2E static, S8 per-channel weights / S8 activations")


class QuantizedInput:
    """A .tflite whose graph input is integer (PT2E quantized the first conv's input): the float batch is quantized
    in numpy with the input's scale and zero point, the output dequantized, as a caller of such a model must."""

    def __init__(self, path: Path, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.it = Interpreter(model_path=str(path), num_threads=threads)
        self.it.allocate_tensors()
        self.inp, self.out = self.it.get_input_details()[0], self.it.get_output_details()[0]

    def infer(self, batch: np.ndarray) -> np.ndarray:
        scale, zero = self.inp["quantization"]
        dtype = self.inp["dtype"]
        if scale:
            info = np.iinfo(dtype)
            batch = np.clip(np.round(batch / scale) + zero, info.min, info.max).astype(dtype)
        self.it.set_tensor(self.inp["index"], batch)
        self.it.invoke()
        y = np.asarray(self.it.get_tensor(self.out["index"]), dtype=np.float32).reshape(batch.shape[0], -1)
        scale, zero = self.out["quantization"]
        return (y - zero) * scale if scale else y

    def close(self) -> None:
        self.__dict__.pop("it", None)


def build_all(args: argparse.Namespace, work: Path) -> tuple[list[Built], dict[str, Any]]:
    """Make, export, calibrate and convert both models for every engine and precision."""
    import torch

    from bitdeploy.converters import calibration as calib_mod
    from bitdeploy.converters.onnx_export import export_onnx
    from bitdeploy.training.datasets import load_dataset

    torch.set_num_threads(args.threads)
    res = args.resolution
    log(f"making the models ({args.model} and ResNet-50 v1.5, random weights, randomised norms)")
    bit, ref = bit_model(args.model, args.seed), reference_model(args.seed)
    info: dict[str, Any] = {
        "params": {
            BIT: sum(p.numel() for p in bit.parameters()),
            REF: sum(p.numel() for p in ref.parameters()),
        }
    }
    bit_onnx, ref_onnx = work / "bit.onnx", work / "resnet50.onnx"
    log(f"exporting both at {res} px")
    info["export"] = {BIT: {k: v for k, v in export_onnx(bit, res, bit_onnx).items() if k in ("nodes", "max_abs_diff")}}
    info["export"][REF] = export_reference(ref, res, ref_onnx)
    log(f"calibration: {args.calib_size} digits training images")
    calibration = calib_mod.from_image_set(
        load_dataset("digits").train, res, size=args.calib_size, seed=args.seed, source="digits:train"
    )
    built: list[Built] = []
    for engine in args.engines:
        for precision in PRECISIONS:
            for model in MODELS:
                log(f"converting {model} for {ENGINES[engine]} {precision}")
                t = time.perf_counter()
                if model == BIT:
                    b = convert_bit(bit_onnx, engine, precision, work, calibration, args.threads)
                else:
                    b = convert_reference(ref_onnx, ref, engine, precision, work, calibration, res)
                built.append(b)
                info.setdefault("convert_s", {})[b.key] = round(time.perf_counter() - t, 1)
    return built, info


# -- timing -------------------------------------------------------------------------------------------------------------
def open_built(b: Built, threads: int) -> Any:
    if b.engine == "litert" and b.model == REF and b.precision == "int8":
        return QuantizedInput(b.path, threads)
    from bitdeploy.runtimes.bundle.manifest import Manifest, TargetInfo
    from bitdeploy.runtimes.engines.base import open_backend

    info = TargetInfo.from_dict(b.target)
    return open_backend(info.backend, b.path, Manifest(target=info), device=info.device, threads=threads)


def time_family(group: list[Built], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """One engine family's models timed in interleaved rounds; key -> QuickTimer result plus per-round p50s."""
    from bitdeploy.benchmarks.quick import QuickTimer, quick_interleaved

    backends = [open_built(b, args.threads) for b in group]
    try:
        x = np.random.default_rng(SEED).uniform(-1, 1, (1, 3, args.resolution, args.resolution)).astype(np.float32)
        for be in backends:  # first calls allocate and pick kernels
            for _ in range(args.warmup):
                be.infer(x)
        size = (3, args.resolution, args.resolution)
        timers = [
            QuickTimer(
                be, size, iterations=args.rounds * args.calls, warmup=2, throughput_batches=[], rounds=args.rounds
            )
            for be in backends
        ]
        results = quick_interleaved(timers)
    finally:
        for be in backends:
            be.close()
    out = {}
    for b, t, r in zip(group, timers, results, strict=True):
        out[b.key] = {
            "p50_ms": r["p50_ms"],
            "p50_spread": r["p50_spread"],
            "p90_ms": r["p90_ms"],
            "round_p50_ms": [x["p50_ms"] for x in t.ss_rounds],
            "disturbed": r["disturbed"],
            "interference": r["interference"]["reasons"],
        }
    return out


def timing_rows(built: list[Built], timed: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per engine and precision: both models' p50s, their ratio and its per-round spread, INT8 vs FP32."""
    rows = []
    for engine in dict.fromkeys(b.engine for b in built):
        for precision in PRECISIONS:
            pair = {b.model: timed.get(b.key) for b in built if b.engine == engine and b.precision == precision}
            if not all(pair.get(m) for m in MODELS):
                continue
            tb, tr = pair[BIT], pair[REF]
            assert tb is not None and tr is not None
            row: dict[str, Any] = {
                "engine": engine,
                "precision": precision,
                "label": "INT8 (float layers f32)"
                if precision == "int8" and engine == "openvino"
                else precision.upper(),
                BIT: dict(tb),
                REF: dict(tr),
                "ratio": tb["p50_ms"] / tr["p50_ms"],
                "ratio_spread": list(ratio_spread(tb["round_p50_ms"], tr["round_p50_ms"])),
            }
            fb, fr = timed.get(f"{engine}-fp32-{BIT}"), timed.get(f"{engine}-fp32-{REF}")
            if precision == "int8" and fb and fr:
                row["vs_fp32"] = [fb["p50_ms"] / tb["p50_ms"], fr["p50_ms"] / tr["p50_ms"]]
            rows.append(row)
    return rows


# -- profiles -----------------------------------------------------------------------------------------------------------
def ov_profile(b: Built, threads: int, calls: int, warmup: int, x: np.ndarray) -> Profile:
    import openvino as ov

    config = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": str(b.target.get("inference_precision") or "f32"),
        "INFERENCE_NUM_THREADS": threads,
        "PERF_COUNT": "YES",
    }
    compiled = ov.Core().compile_model(str(b.path), "CPU", config)
    request = compiled.create_infer_request()
    for _ in range(warmup):
        request.infer({0: x})
    infos, walls = [], []
    exec_types: dict[str, dict[str, int]] = {}
    for _ in range(calls):
        t = time.perf_counter()
        request.infer({0: x})
        walls.append((time.perf_counter() - t) * 1e3)
        call = []
        for p in request.get_profiling_info():
            call.append((p.node_type, str(p.status), p.real_time.total_seconds() * 1e6))
            if str(p.status).upper().endswith("EXECUTED") and p.node_type == "Convolution":
                e = exec_types.setdefault(p.node_type, {})
                e[p.exec_type] = e.get(p.exec_type, 0) + 1
        infos.append(call)
    us, count, n = ov_op_times(infos)
    notes = [
        f"Convolution kernels: {', '.join(f'{k} ×{v // max(1, n)}' for k, v in sorted(e.items(), key=lambda kv: -kv[1]))}"
        for e in exec_types.values()
    ]
    return Profile(per_call(us, n), per_call(count, n, 1.0), n, statistics.fmean(walls), notes)


def ort_profile(b: Built, threads: int, calls: int, warmup: int, x: np.ndarray, work: Path) -> Profile:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(work / f"ort-profile-{b.key}")
    sess = ort.InferenceSession(str(b.path), sess_options=opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for _ in range(warmup):
        sess.run(None, {name: x})
    walls = []
    for _ in range(calls):
        t = time.perf_counter()
        sess.run(None, {name: x})
        walls.append((time.perf_counter() - t) * 1e3)
    events = json.loads(Path(sess.end_profiling()).read_text())
    us, count, n = ort_op_times(events, skip_runs=warmup)
    return Profile(per_call(us, n), per_call(count, n, 1.0), n, statistics.fmean(walls))


def graph_counts(b: Built) -> dict[str, int]:
    """Activation-path op counts in the converted model file (ONNX, the OpenVINO IR as saved, or the .tflite)."""
    if b.path.suffix == ".onnx":
        import onnx

        graph = onnx.load(str(b.path), load_external_data=False).graph
        nodes = ((n.op_type, list(n.input), list(n.output)) for n in graph.node)
        return op_counts(activation_ops(nodes, (t.name for t in graph.initializer)))
    if b.path.suffix == ".xml":
        import openvino as ov

        def ref(v: Any) -> str:
            return f"{v.get_node().get_name()}:{v.get_index()}"

        ops = ov.Core().read_model(str(b.path)).get_ordered_ops()
        nodes = (
            (op.get_type_name(), [ref(v) for v in op.input_values()], [ref(v) for v in op.outputs()]) for op in ops
        )
        return op_counts(t for t in activation_ops(nodes) if t not in ("Parameter", "Result"))
    try:  # .tflite: the interpreter's op list (a private but long-standing method); weights are tensors, not ops
        from ai_edge_litert.interpreter import Interpreter

        return op_counts(str(op["op_name"]) for op in Interpreter(model_path=str(b.path))._get_ops_details())
    except Exception as exc:  # no interpreter, or the method is gone: the row is left out
        log(f"no op counts for {b.path.name}: {type(exc).__name__}")
        return {}


# -- the run ------------------------------------------------------------------------------------------------------------
def environment(args: argparse.Namespace) -> dict[str, Any]:
    from bitdeploy.runtimes.bundle.fingerprint import host_fingerprint

    fp = host_fingerprint()
    return {
        "cpu_class": fp["cpu"]["class"],
        "cpu_model": fp["cpu"]["model"],
        "cores": os.cpu_count(),
        "engines": fp["engines"],
        "threads": args.threads,
        "resolution": args.resolution,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/experiments/gn_tax.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="m-r50x1", help="the BiT variant (default m-r50x1, ResNet-50's convolutions)")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=10, help="timed batch-1 calls per model per round")
    p.add_argument("--warmup", type=int, default=10, help="calls per model before the first round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engines", default="openvino,onnxruntime", help="comma-separated: openvino, onnxruntime, litert")
    p.add_argument("--litert", action="store_true", help="add LiteRT (XNNPACK), timed only")
    p.add_argument("--calib-size", type=int, default=64)
    p.add_argument("--profile-calls", type=int, default=20, help="profiled calls per model (after the warm-up)")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()] + (["litert"] if args.litert else [])
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        p.error(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    args.engines = list(dict.fromkeys(engines))
    return args


def run(args: argparse.Namespace, work: Path, out: Callable[[str], None]) -> dict[str, Any]:
    started, load0 = time.perf_counter(), os.getloadavg()
    env = environment(args)
    built, info = build_all(args, work)
    timed: dict[str, dict[str, Any]] = {}
    for engine in args.engines:
        group = [b for b in built if b.engine == engine]
        log(f"timing {ENGINES[engine]}: {len(group)} models, {args.rounds} rounds x {args.calls} calls, interleaved")
        timed.update(time_family(group, args))
    rows = timing_rows(built, timed)
    load1 = os.getloadavg()
    out(
        f"\n{args.model} vs ResNet-50 v1.5, {args.resolution} px, batch 1, {args.threads} threads; "
        f"CPU: {env['cpu_class']} ({env['cpu_model']}, {env['cores']} cores); "
        f"load average {load0[0]:.2f} before, {load1[0]:.2f} after timing\n"
    )
    out(f"Timing: {args.rounds} rounds x {args.calls} calls per model, interleaved per engine family\n")
    for line in timing_table(rows):
        out(line)
    disturbed = [k for k, v in timed.items() if v["disturbed"]]
    if disturbed:
        out(f"\ndisturbed (bitdeploy.benchmarks.interference): {', '.join(disturbed)}")
    out("\nWhat runs:")
    for b in built:
        out(f"- {ENGINES[b.engine]} {b.precision} {b.model}: {b.what}")

    counts = {f"{ENGINES[b.engine]} {b.precision} {b.model}": graph_counts(b) for b in built}
    counts = {k: v for k, v in counts.items() if v}
    if counts:
        out("\nGraph op counts (model files as converted, before the engines' fusions; activation path only):\n")
        for line in counts_table(counts):
            out(line)

    profiles: dict[str, dict[str, Any]] = {}
    if not args.no_profile:
        x = np.random.default_rng(SEED).uniform(-1, 1, (1, 3, args.resolution, args.resolution)).astype(np.float32)
        for engine in args.engines:
            if engine == "litert":
                out("\nLiteRT: no profile (the Python interpreter has no per-operator profiler).")
                continue
            for precision in PRECISIONS:
                pair = {b.model: b for b in built if b.engine == engine and b.precision == precision}
                log(f"profiling {ENGINES[engine]} {precision}: {args.profile_calls} calls per model")
                got = {}
                for m, b in pair.items():
                    if engine == "openvino":
                        got[m] = ov_profile(b, args.threads, args.profile_calls, args.warmup, x)
                    else:
                        got[m] = ort_profile(b, args.threads, args.profile_calls, args.warmup, x, work)
                src = "performance counters, by node_type" if engine == "openvino" else "profiler, by op_name"
                out(
                    f"\n{ENGINES[engine]} {precision.upper()} profile ({src}; ms per call over {args.profile_calls} calls):\n"
                )
                for line in profile_table(got[BIT], got[REF]):
                    out(line)
                for m in MODELS:
                    for note in got[m].notes:
                        out(f"- {m}: {note}")
                profiles[f"{engine}-{precision}"] = {
                    m: {"ms": p.ms, "nodes": p.nodes, "calls": p.calls, "wall_ms": p.wall_ms, "notes": p.notes}
                    for m, p in got.items()
                }
    wall = time.perf_counter() - started
    out(f"\nwall time {wall:.0f} s; load average now {os.getloadavg()[0]:.2f}")
    return {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": env,
        "models": info,
        "runs": {b.key: b.what for b in built},
        "timing": rows,
        "graph_counts": counts,
        "profiles": profiles,
        "load_average": {"before": load0, "after_timing": load1},
        "wall_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bitdeploy.core.errors import BitdeployError

    try:
        with tempfile.TemporaryDirectory(prefix="bitdeploy-gn-tax-") as tmp:
            result = run(args, Path(tmp), lambda line: print(line, flush=True))
    except BitdeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

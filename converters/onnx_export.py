"""Folded ONNX export of a BiT model, checked against PyTorch before anything is written.

Weight standardisation is folded into plain conv weights first, so they are constants. The TorchScript exporter is
used on purpose: at opset 17 it writes GroupNorm as Reshape -> InstanceNormalization -> Reshape -> Mul -> Add,
the form every backend accepts, while torch 2.13's dynamo exporter writes opset 18 whatever
opset it is asked for. The graph is simplified with onnxslim, and the result must still hold the
root's zero Pad + MaxPool(pad 0) (MaxPool's own padding is -inf), conv weights as initializers, and match PyTorch.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from bitdeploy.core.errors import ConversionError, first_line, require
from bitdeploy.core.fsutil import temp_dir

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MIN_OPSET, MAX_OPSET = 13, 20  # the TorchScript exporter's range that has InstanceNormalization-based GroupNorm
EXTERNAL_DATA_THRESHOLD = 1_900_000_000  # weights bytes above which the file gets a `.data` sidecar
ROOT_PADS = [0, 0, 1, 1, 0, 0, 1, 1]


def _const_values(graph: Any, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
    return None


def _attr(node: Any, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def check_graph(model: Any, resolution: int, num_classes: int, opset: int) -> None:
    """Raise ConversionError unless the graph has the structure every bitdeploy consumer relies on."""
    graph = model.graph
    found = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if found != opset:
        raise ConversionError(f"the exported file declares opset {found}, not the requested {opset}; try --opset 17")
    ops = {n.op_type for n in graph.node}
    if "GroupNormalization" in ops:
        raise ConversionError(
            "the export contains GroupNormalization, which ONNX Runtime and TensorRT do not run; export with --opset 17"
        )
    inits = {i.name for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Conv":
            params = [n for n in node.input[1:] if n]
            computed = [n for n in params if n not in inits]
            if computed:
                raise ConversionError(
                    f"Conv {node.name!r} takes {computed[0]!r} from a computation, not an initializer: weight standardisation was not folded"
                )
    _check_root_pool(graph)
    _check_io(graph, resolution, num_classes)


def _check_root_pool(graph: Any) -> None:
    pools = [n for n in graph.node if n.op_type == "MaxPool"]
    if len(pools) != 1:
        raise ConversionError(f"expected the root's single MaxPool, found {len(pools)}")
    pool = pools[0]
    pads = list(_attr(pool, "pads", [0, 0, 0, 0]))
    auto_pad = _attr(pool, "auto_pad", b"NOTSET")
    if any(pads) or auto_pad not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise ConversionError(
            f"the root MaxPool pads implicitly (pads={pads}, auto_pad={auto_pad!r}); its zero padding was fused into it, which changes the outputs (BiT's root must zero-pad, then max-pool with pad 0)"
        )
    producer = next((n for n in graph.node if pool.input[0] in n.output), None)
    if producer is None or producer.op_type != "Pad":
        raise ConversionError(
            "the root MaxPool is not preceded by its zero Pad; the simplifier changed the root (BiT's root must zero-pad, then max-pool with pad 0)"
        )
    mode = _attr(producer, "mode", b"constant")
    pad_values = _const_values(graph, producer.input[1]) if len(producer.input) > 1 else None
    fill = _const_values(graph, producer.input[2]) if len(producer.input) > 2 and producer.input[2] else np.zeros(1)
    if (
        mode not in (b"constant", "constant")
        or pad_values is None
        or pad_values.tolist() != ROOT_PADS
        or fill is None
        or float(np.asarray(fill).ravel()[0]) != 0.0
    ):
        raise ConversionError(
            f"the root Pad is not a constant zero pad of 1 (mode={mode!r}, pads={None if pad_values is None else pad_values.tolist()}) (BiT's root must zero-pad, then max-pool with pad 0)"
        )


def _dims(value_info: Any) -> list[int | str]:
    return [d.dim_param if d.dim_param else d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _check_io(graph: Any, resolution: int, num_classes: int) -> None:
    import onnx

    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in graph.output] != [OUTPUT_NAME]:
        raise ConversionError(
            f"unexpected graph inputs/outputs {[i.name for i in inputs]} -> {[o.name for o in graph.output]}"
        )
    if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ConversionError("the exported input is not float32")
    din, dout = _dims(inputs[0]), _dims(graph.output[0])
    if not isinstance(din[0], str) or din[1:] != [3, resolution, resolution]:
        raise ConversionError(
            f"the exported input has shape {din}, expected [batch, 3, {resolution}, {resolution}] with a dynamic batch"
        )
    if not isinstance(dout[0], str) or dout[1:] != [num_classes]:
        raise ConversionError(f"the exported output has shape {dout}, expected [batch, {num_classes}]")


def _ort_runner(path: Path) -> Any:
    """A function running the model at `path` in ONNX Runtime on the CPU."""
    ort = require("onnxruntime", "onnxruntime")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for invalid graphs
        raise ConversionError(f"ONNX Runtime cannot load the exported model ({first_line(exc)})") from exc

    def run(x: np.ndarray) -> np.ndarray:
        try:
            return np.asarray(sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
        except Exception as exc:
            raise ConversionError(f"ONNX Runtime cannot run the exported model ({first_line(exc)})") from exc

    return run


def _save(model: Any, path: Path, external: bool) -> None:
    import onnx

    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))


def _weights_bytes(model: Any) -> int:
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)


def torch_export(model: Any, resolution: int, path: Path, opset: int = 17) -> None:
    """torch.onnx.export of `model` as it is (no folding, no checks): NCHW `input` -> `logits`, dynamic batch."""
    import torch

    dummy = torch.zeros(1, 3, resolution, resolution)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice and constant-folding chatter
        try:
            torch.onnx.export(
                model,
                (dummy,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        except Exception as exc:
            raise ConversionError(
                f"torch.onnx.export failed at opset {opset} ({first_line(exc)}); try --opset 17"
            ) from exc


def _reference(model: Any, x: np.ndarray) -> np.ndarray:
    import torch

    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad():
            return model(torch.from_numpy(x).to(device)).float().cpu().numpy()
    finally:
        model.train(was_training)


def _publish(tmp_model: Path, out: Path, external: bool) -> list[Path]:
    """Move the checked files into place: data first, so the model file never points at a missing sidecar."""
    data_name = out.name + ".data"
    written = []
    if external:
        os.replace(tmp_model.parent / data_name, out.parent / data_name)
        written.append(out.parent / data_name)
    os.replace(tmp_model, out)
    if not external:
        (out.parent / data_name).unlink(missing_ok=True)  # a stale sidecar from an earlier, larger export
    return [out, *written]


def export_onnx(
    model: Any,
    resolution: int,
    out_path: str | os.PathLike[str],
    opset: int = 17,
    *,
    tolerance: float = 1e-4,
    check_batch: int = 2,
    seed: int = 0,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> dict[str, Any]:
    """Export `model` (a ResNetV2, WS folded here) to `out_path` and return what was checked.

    The export is compared with `model` itself in PyTorch on `check_batch` inputs uniform in [-1, 1] (and on a
    batch of 1, for the dynamic batch). It fails with ConversionError when the max abs logit difference exceeds
    `tolerance` x max(1, max |logit|), and nothing is written then.
    """
    torch = require("torch", "train")
    onnx = require("onnx", "train")
    from bitdeploy.training.bit import fold_weight_standardization

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConversionError(
            f"opset {opset} is not supported; choose {MIN_OPSET}-{MAX_OPSET} (17 is the default and what every backend accepts)"
        )
    if resolution < 16:
        raise ConversionError(f"resolution {resolution} is too small; use at least 16 px (BiT uses 128 or 480)")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    num_classes = int(model.head_size) if hasattr(model, "head_size") else int(model.head.conv.out_channels)
    folded = fold_weight_standardization(model).cpu().float().eval()
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=(check_batch, 3, resolution, resolution)).astype(np.float32)
    reference = _reference(model, x)

    with temp_dir(out.parent, f".{out.name}.") as tmp_dir:
        raw_path = tmp_dir / "raw" / "model.onnx"
        raw_path.parent.mkdir()
        torch_export(folded, resolution, raw_path, opset)
        del folded  # R152x4 holds GBs of weights: keep at most two copies alive
        raw = onnx.load(str(raw_path))
        nodes_before = len(raw.graph.node)
        onnxslim = require("onnxslim", "train")
        try:
            final = onnxslim.slim(raw)
        except Exception as exc:
            raise ConversionError(
                f"onnxslim failed on the export ({first_line(exc)}); rerun with --debug and report it"
            ) from exc
        simplifier = f"onnxslim {onnxslim.__version__}"
        del raw
        external = _weights_bytes(final) > external_data_threshold
        tmp_model = tmp_dir / out.name
        _save(final, tmp_model, external)
        try:
            onnx.checker.check_model(str(tmp_model), full_check=True)
        except Exception as exc:
            raise ConversionError(f"onnx.checker rejected the export ({first_line(exc)})") from exc
        check_graph(onnx.load(str(tmp_model), load_external_data=False), resolution, num_classes, opset)

        raw_out = _ort_runner(raw_path)(x)
        run = _ort_runner(tmp_model)
        got, single = run(x), run(x[:1])
        scale = max(1.0, float(np.abs(reference).max()))
        max_diff = float(np.abs(got - reference).max())
        slim_diff = float(np.abs(got - raw_out).max())
        batch_diff = float(np.abs(single - got[:1]).max())
        if not np.isfinite(got).all() or max_diff > tolerance * scale:
            raise ConversionError(
                f"the ONNX model differs from PyTorch by {max_diff:.3g} (allowed {tolerance * scale:.3g}); rerun with --debug and report it"
            )
        if slim_diff > tolerance * scale or batch_diff > tolerance * scale:
            raise ConversionError(
                f"simplification or batching changed the result (by {max(slim_diff, batch_diff):.3g}); rerun with --debug and report it"
            )
        files = _publish(tmp_model, out, external)

    from bitdeploy.training.download import sha256_file

    return {
        "opset": opset,
        "exporter": f"torch.onnx TorchScript exporter (torch {torch.__version__.split('+')[0]})",
        "simplifier": simplifier,
        "nodes": len(final.graph.node),
        "nodes_before_simplify": nodes_before,
        "max_abs_diff": max_diff,
        "simplify_max_abs_diff": slim_diff,
        "batch1_max_abs_diff": batch_diff,
        "tolerance": tolerance * scale,
        "check_inputs": f"{check_batch} x uniform[-1, 1], seed {seed}",
        "resolution": resolution,
        "num_classes": num_classes,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, resolution, resolution], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", num_classes]},
        "weight_standardization": "folded",
        "external_data": files[1].name if len(files) > 1 else None,
        "files": [str(f) for f in files],
        "size_bytes": sum(f.stat().st_size for f in files),
        "sha256": sha256_file(out),
        "seconds": round(time.perf_counter() - started, 2),
    }

"""Bundles as a model repository for NVIDIA Triton or OpenVINO Model Server (`bitdeploy export-repo`).

Triton:  OUT/<name>/config.pbtxt, OUT/<name>/labels.txt, OUT/<name>/1/model.onnx | model.xml + model.bin | model.plan
OVMS:    OUT/config.json, OUT/<name>/1/model.xml + model.bin (or model.onnx)

The tensors keep the bundle's names (`input` FP32 [-1, 3, R, R] -> `logits` FP32 [-1, classes]) so a client
written for `bitdeploy serve`'s FP32 route works against either server. Those servers do no image decoding:
clients send preprocessed tensors there. Standard library only; the whole repository is written into a
temporary directory beside OUT and renamed into place.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitdeploy.core.errors import BitdeployError, BundleError
from bitdeploy.core.fsutil import replace_dir, temp_dir
from bitdeploy.core.targets import TARGETS, Target, find_backend
from bitdeploy.runtimes.bundle.manifest import Manifest
from bitdeploy.runtimes.bundle.pack import open_bundle

FORMATS = ("triton", "ovms")
LABELS = "labels.txt"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8"}


@dataclass(frozen=True)
class RepoModel:
    """One bundle as a repository entry."""

    name: str
    backend: str
    record: Target  # the target record: how Triton runs it, whether OVMS can
    model_files: list[str]  # names in the bundle: the model file first
    input_name: str
    input_dtype: str
    dims: list[int]  # C, H, W
    output_name: str
    labels: list[str]
    fixed_batch: int | None  # an engine built for one batch size (no dynamic batching then)
    profile_max: int | None  # TensorRT: the optimisation profile's largest batch


def describe_bundle(manifest: Manifest, source: Path, name: str | None) -> RepoModel:
    target = manifest.target
    backend = target.backend
    record = find_backend(backend)
    if record is None or (record.triton is None and not record.ovms):
        servable = [t.title for t in TARGETS.values() if t.triton is not None or t.ovms]
        raise BitdeployError(
            f"{source}: a {backend or 'backend-less'} bundle cannot go into a Triton or OVMS repository; "
            f"export a bundle of {', '.join(servable)}"
        )
    model_file = manifest.model_file
    listed = list(manifest.files)
    if model_file not in listed:
        raise BundleError(f"{source}: manifest's model_file {model_file!r} is not among its files; rebuild the bundle")
    companions = {str(Path(model_file).with_suffix(s)) for s in record.companions}
    # companions (OpenVINO's weights) and external data named after the model file (model.onnx.data)
    extra = [f for f in listed if f != model_file and (f in companions or f.startswith(model_file + "."))]
    shape = manifest.input.shape
    if shape is None or len(shape) != 4 or any(d is None or d <= 0 for d in shape[1:]):
        raise BundleError(f"{source}: manifest has no NCHW input shape; rebuild the bundle")
    model = manifest.model
    labels = list(manifest.labels) or [str(i) for i in range(model.num_classes)]
    if any("\n" in x or "\r" in x for x in labels):
        raise BundleError(f"{source}: a label contains a line break, which labels.txt cannot hold; rename the class")
    name = name or model.name or source.name
    if not NAME_RE.match(name):
        raise BitdeployError(
            f"model name {name!r} cannot be a repository directory; pass --name with letters, digits, '.', '_' or '-'"
        )
    profile = target.get("profile") or {}
    return RepoModel(
        name=name,
        backend=backend,
        record=record,
        model_files=[model_file, *extra],
        input_name=manifest.input.name,
        input_dtype=manifest.input.dtype,
        dims=[int(d or 0) for d in shape[1:]],
        output_name=manifest.output.name,
        labels=labels,
        fixed_batch=shape[0] if shape[0] is not None and shape[0] > 0 else None,
        profile_max=int(profile["max"]) if isinstance(profile.get("max"), int) else None,
    )


# -- Triton ------------------------------------------------------------------------------------------------
def triton_config(m: RepoModel, max_batch: int, max_delay_us: int, instances: int = 1) -> str:
    """config.pbtxt text (protobuf text format of Triton's ModelConfig)."""
    engine = m.record.triton
    if engine is None:
        raise BitdeployError(
            f"{m.name}: Triton cannot run a {m.record.title} model; export it with --format ovms, or another bundle"
        )
    key, value, default_file, kind = engine.key, engine.value, engine.default_file, engine.kind
    dtype = TRITON_DTYPES.get(m.input_dtype)
    if dtype is None:
        raise BundleError(f"input dtype {m.input_dtype!r} has no Triton type; rebuild the bundle as float32")
    batched = m.fixed_batch is None
    batch = min(max_batch, m.profile_max) if m.profile_max else max_batch
    dims = m.dims if batched else [m.fixed_batch, *m.dims]
    lines = [f"name: {_q(m.name)}", f"{key}: {_q(value)}", f"max_batch_size: {batch if batched else 0}"]
    if m.model_files[0] != default_file:
        lines.append(f"default_model_filename: {_q(m.model_files[0])}")
    lines += [
        "input [",
        "  {",
        f"    name: {_q(m.input_name)}",
        f"    data_type: {dtype}",
        f"    dims: [ {', '.join(map(str, dims))} ]",
        "  }",
        "]",
        "output [",
        "  {",
        f"    name: {_q(m.output_name)}",
        "    data_type: TYPE_FP32",
        f"    dims: [ {', '.join(map(str, [len(m.labels)] if batched else [m.fixed_batch, len(m.labels)]))} ]",
        f"    label_filename: {_q(LABELS)}",
        "  }",
        "]",
    ]
    if batched:
        lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {max_delay_us}", "}"]
    lines += ["instance_group [", "  {", f"    count: {instances}", f"    kind: {kind}", "  }", "]"]
    return "\n".join(lines) + "\n"


def _q(text: str) -> str:
    return json.dumps(text)  # a JSON string of printable ASCII is a valid protobuf text-format string


# -- OVMS ---------------------------------------------------------------------------------------------------
def ovms_entry(m: RepoModel) -> dict[str, Any]:
    if not m.record.ovms:
        raise BitdeployError(
            f"{m.name}: OpenVINO Model Server cannot run a {m.record.title} model; export an OpenVINO or ONNX Runtime bundle, or use --format triton"
        )
    return {"config": {"name": m.name, "base_path": m.name, "target_device": "CPU"}}


# -- writing ------------------------------------------------------------------------------------------------
def export_repo(
    bundles: list[Path],
    fmt: str,
    out: Path,
    names: list[str] | None = None,
    max_batch: int = 8,
    max_delay_us: int = 5000,
    force: bool = False,
) -> list[RepoModel]:
    """Write the repository for `bundles` (verified first) to `out`, atomically; return what was written."""
    if fmt not in FORMATS:
        raise BitdeployError(f"unknown repository format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if names and len(names) != len(bundles):
        raise BitdeployError(
            f"{len(names)} --name value(s) for {len(bundles)} bundle(s); pass one --name per bundle, in order"
        )
    if max_batch < 1 or max_delay_us < 0:
        raise BitdeployError("--max-batch must be at least 1 and --max-delay-ms at least 0")
    out = Path(out).resolve()
    _check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    written: list[RepoModel] = []
    with temp_dir(out.parent, f".{out.name}.tmp-") as tmp:
        for i, bundle in enumerate(bundles):
            opened = open_bundle(bundle, verify=True)
            try:
                m = describe_bundle(opened.manifest, Path(bundle), names[i] if names else None)
                if any(w.name == m.name for w in written):
                    raise BitdeployError(
                        f"two bundles would both be named {m.name!r}; pass --name once per bundle, e.g. --name {m.name}-a --name {m.name}-b"
                    )
                _write_model(tmp, m, opened.root, fmt, max_batch, max_delay_us)
            finally:
                opened.cleanup()
            written.append(m)
        if fmt == "ovms":
            config = {"model_config_list": [ovms_entry(m) for m in written]}
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, out)
    return written


def _write_model(root: Path, m: RepoModel, bundle_root: Path, fmt: str, max_batch: int, max_delay_us: int) -> None:
    if fmt == "ovms":
        ovms_entry(m)  # refuses a TensorRT plan before anything is copied
    version = root / m.name / "1"
    version.mkdir(parents=True)
    for name in m.model_files:
        shutil.copyfile(bundle_root / name, version / Path(name).name)
    if fmt == "triton":
        (root / m.name / LABELS).write_text("".join(f"{label}\n" for label in m.labels), encoding="utf-8")
        (root / m.name / "config.pbtxt").write_text(triton_config(m, max_batch, max_delay_us), encoding="utf-8")


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BitdeployError(f"{out}: exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise BitdeployError(
            f"{out}: directory exists and is not empty; choose a new --out or pass --force to replace it"
        )

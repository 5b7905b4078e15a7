"""The benchmark result format, version 1 (`"schema": "bitdeploy-bench", "schema_version": 1`).

One JSON document per `bitdeploy bench` run (one machine):

    {"schema": "bitdeploy-bench", "schema_version": 1, "created": ISO-8601, "bitdeploy": "0.1.0",
     "environment": env.collect(),                      # CPU model + flags, cores, GPUs, OS, library versions
     "settings": {"scenario", "iterations", "duration_s", "warmup", "threads", "batch_sizes", "seed", ...},
     "selected": null | {"name": str, "reason": str},
     "results": [ENTRY, ...]}

ENTRY (one bundle, or one PyTorch FP32 baseline):

    name            unique label in the document (bundle directory name; with `bench DIR --all` its path relative
                    to DIR, e.g. "m-r50x1-32/onnx-int8"; or "pytorch-fp32-<form>:<model>@<px>" with
                    form eager-ws | eager-folded | compiled-folded, see benchmarks/baseline.py; describe.label says it)
    kind            "bundle" | "pytorch"
    bundle          path of the bundle, or null
    model, resolution, num_classes
    target          "onnxruntime" | "openvino" | "tensorrt" | "pytorch"
    precision       requested precision: "fp32" | "fp16" | "int8"
    precision_used  what actually ran (manifest target.precision_used / backend.describe()), e.g. "f32", "bf16"
    backend_device  the runtime device ("cpu", "CPU", "GPU", "cuda:0")
    device          the report's device column (GPU name, or CPU model and threads)
    status          "valid" | "failed gate" | "failed: <reason>" | "skipped: <reason>" (`bench --all`: a bundle the
                    build marked invalid is "skipped: failed the accuracy gate at build (<reason>)", not benched)
    size_mb         model files in MB (10^6 bytes), files_sha256 {file: sha256}
    load_s          open + verify + session creation, seconds; first_infer_ms: the first call after it
    peak_rss_mb     peak resident memory of the process while this entry ran (see peak_rss_method); bench keeps
                    every bundle open for its rounds, so this is the process's, not the bundle's alone
    serving_memory  null | the bundle's own serving memory, measured in a fresh process after the timing rounds
                    (benchmarks.memory.serving_memory): {peak_rss_mb (VmHWM over import, load and `queries` batch-1
                    queries), idle_rss_mb (interpreter + numpy + runtime, before the engine SDK), load_s, queries,
                    backend, threads, method} | {error: one line} when it could not be measured
    single_stream   latency.single_stream(): n, p50_ms, p90_ms, p99_ms, mean_ms, std_ms, min_ms, max_ms,
                    tail_samples, warmup, images_per_s, latencies_ms (per query, in order)
    offline         latency.offline(): results [{batch_size, batches, images, seconds, images_per_s, batch_p50_ms}]
                    (a build's report: its quick sweep, results [{batch_size, images_per_s, batch_p50_ms, images}]),
                    best_images_per_s, best_batch_size
    end_to_end      latency.end_to_end(): same statistics for decode + preprocess + infer, plus preprocess_p50_ms,
                    preprocess_mean_ms, infer_mean_ms, images_source
    accuracy        null | {dataset, split, samples, top1, top5, label_mapping,
                            reference: null | {name, top1, agreement, max_abs_logit_diff, mean_abs_logit_diff}}
    build_accuracy  the bundle manifest's `accuracy` object (the build's gate), or null
    describe        backend.describe(); PyTorch baselines: {form, label, compile_s (torch.compile), threads, ...}
    error           null | one-line message when status is "failed: ..."
    interference    interference.judge() over the row's timing windows: {disturbed, reasons, overall, windows};
                    each window: wall_s, own_cpu_s, own_cores, others_cores, steal_share, involuntary_switches(_per_s),
                    source ("/proc/stat" or "loadavg")
    disturbed       true when a window crossed a limit of benchmarks.interference or single-stream and offline
                    batch 1 disagree (latency.CONSISTENCY_LIMIT); `flags` says which, one sentence each

Rounds: single_stream p50_ms/p90_ms/mean_ms and offline images_per_s are medians of `rounds` interleaved rounds,
with [min, max] in single_stream.spread and offline results[].images_per_s_spread; p99 pools all rounds' queries.

Percentiles are nearest-rank; all times are milliseconds unless the key ends in `_s`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bitdeploy.core.errors import BitdeployError

SCHEMA = "bitdeploy-bench"
SCHEMA_VERSION = 1
MERGED = "bitdeploy-bench-merged"  # report.py's results.json: {"schema": MERGED, "documents": [document, ...]}

ENTRY_KEYS = (
    "name",
    "kind",
    "bundle",
    "model",
    "resolution",
    "num_classes",
    "target",
    "precision",
    "precision_used",
    "backend_device",
    "device",
    "status",
    "size_mb",
    "files_sha256",
    "load_s",
    "first_infer_ms",
    "peak_rss_mb",
    "peak_rss_method",
    "serving_memory",
    "single_stream",
    "offline",
    "end_to_end",
    "accuracy",
    "build_accuracy",
    "describe",
    "error",
    "interference",
    "disturbed",
    "flags",
)


def new_entry(**fields: Any) -> dict[str, Any]:
    """An ENTRY with every key present (null where unknown); unknown keys are refused to keep the schema honest."""
    unknown = set(fields) - set(ENTRY_KEYS)
    if unknown:
        raise ValueError(f"unknown result fields: {sorted(unknown)}")
    entry: dict[str, Any] = {k: None for k in ENTRY_KEYS}
    entry.update(fields)
    entry["status"] = entry["status"] or "valid"
    return entry


def new_document(
    results: list[dict[str, Any]],
    environment: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    selected: dict[str, str] | None = None,
) -> dict[str, Any]:
    from bitdeploy import __version__
    from bitdeploy.benchmarks.env import collect

    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "bitdeploy": __version__,
        "environment": environment if environment is not None else collect(),
        "settings": settings or {},
        "selected": selected,
        "results": results,
    }


def check_document(doc: Any, source: str = "<results>") -> dict[str, Any]:
    """Refuse anything that is not a bench document this version can read."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise BitdeployError(
            f'{source}: not a bitdeploy bench result (no "schema": "{SCHEMA}"); pass files written by `bitdeploy bench --json`'
        )
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BitdeployError(
            f"{source}: bench schema version {version!r} is not supported (this bitdeploy reads {SCHEMA_VERSION}); upgrade bitdeploy or re-run the benchmark"
        )
    if not isinstance(doc.get("results"), list):
        raise BitdeployError(f'{source}: "results" must be a list; re-run `bitdeploy bench --json`')
    for entry in doc["results"]:
        if not isinstance(entry, dict) or not entry.get("name"):
            raise BitdeployError(f'{source}: a result without a "name"; re-run `bitdeploy bench --json`')
        for key in ENTRY_KEYS:
            entry.setdefault(key, None)
    return doc


def finite(obj: Any) -> Any:
    """NaN/inf -> null: strict JSON that every reader accepts."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def load_documents(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise BitdeployError(f"{path}: no such results file; pass JSON files written by `bitdeploy bench --json`")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BitdeployError(
                f"{path}: not valid JSON ({str(exc).splitlines()[0]}); pass files written by `bitdeploy bench --json`"
            ) from exc
        if isinstance(doc, dict) and doc.get("schema") == MERGED and isinstance(doc.get("documents"), list):
            docs.extend(check_document(d, str(path)) for d in doc["documents"])
        else:
            docs.append(check_document(doc, str(path)))
    return docs


def write_json(doc: dict[str, Any], out: str | Path) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves half a result."""
    import os

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(finite(doc), indent=1, allow_nan=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path

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
    build_accuracy  the bundle manifest's `accuracy` object (the build's gate, with its intervals), or null
    build_checks    what selection needs of the manifest (`runtimes.bundle.eligibility.Checks`): {float_precision,
                    checked_on: [{cpu ("build host" or a --verify-on CPU), arch, class, features, emulated, passed,
                    error}]}, or null (documents from before it: selection checks only the status)
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

In code an ENTRY is a `BenchEntry` (its `status` a `Status`, whose `text` is the string above), and a build's quick
figures are a `Timing`; `to_json`/`from_json` write and read exactly the documents above.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any

from bitdeploy.core.errors import BitdeployError

SCHEMA = "bitdeploy-bench"
SCHEMA_VERSION = 1
MERGED = "bitdeploy-bench-merged"  # report.py's results.json: {"schema": MERGED, "documents": [document, ...]}


class StatusKind(Enum):
    VALID = "valid"
    FAILED_GATE = "failed gate"  # built, but its accuracy gate refused it
    FAILED = "failed"  # "failed: <reason>": an error, the row has no figures
    SKIPPED = "skipped"  # "skipped: <reason>": not attempted here
    READY = "ready"  # "ready: <what is left>": gated here, finished on the device (a TensorRT engine)
    PENDING = "pending"  # a build row not run yet
    OTHER = "other"  # text this version does not know, kept as written


_WITH_REASON = (StatusKind.FAILED, StatusKind.SKIPPED, StatusKind.READY)


@dataclass(frozen=True)
class Status:
    """An entry's (or a build row's) status; `text` is the string the JSON documents hold."""

    kind: StatusKind
    reason: str = ""

    @classmethod
    def failed(cls, reason: str) -> Status:
        return cls(StatusKind.FAILED, reason)

    @classmethod
    def skipped(cls, reason: str) -> Status:
        return cls(StatusKind.SKIPPED, reason)

    @classmethod
    def ready(cls, reason: str) -> Status:
        return cls(StatusKind.READY, reason)

    @classmethod
    def parse(cls, text: Any) -> Status:
        """The status a document's text means; text it does not know stays OTHER, so `text` gives it back."""
        text = "" if text is None else str(text)
        for kind in StatusKind:
            if kind in _WITH_REASON and text.startswith(f"{kind.value}: "):
                return cls(kind, text[len(kind.value) + 2 :])
            if kind not in _WITH_REASON and kind is not StatusKind.OTHER and text == kind.value:
                return cls(kind)
        return cls(StatusKind.OTHER, text)

    @property
    def text(self) -> str:
        if self.kind in _WITH_REASON:
            return f"{self.kind.value}: {self.reason}"
        return self.reason if self.kind is StatusKind.OTHER else self.kind.value

    @property
    def is_valid(self) -> bool:
        return self.kind is StatusKind.VALID

    @property
    def is_failed(self) -> bool:
        """`failed: <reason>` (an error); a bundle refused by its gate is `is_failed_gate`."""
        return self.kind is StatusKind.FAILED

    @property
    def is_failed_gate(self) -> bool:
        return self.kind is StatusKind.FAILED_GATE

    @property
    def is_skipped(self) -> bool:
        return self.kind is StatusKind.SKIPPED

    @property
    def is_ready(self) -> bool:
        """Gated on this host; what is left runs on the device (`bitdeploy engine` builds a TensorRT engine)."""
        return self.kind is StatusKind.READY

    def __str__(self) -> str:
        return self.text


VALID = Status(StatusKind.VALID)
FAILED_GATE = Status(StatusKind.FAILED_GATE)
PENDING = Status(StatusKind.PENDING)


def status_of(entry: Mapping[str, Any]) -> Status:
    """The status of an entry read from a document (a missing one is OTHER "")."""
    return Status.parse(entry.get("status"))


@dataclass(frozen=True)
class BenchEntry:
    """ENTRY (see the module docstring), typed. `to_json` writes every key of ENTRY_KEYS in that order (null where
    unknown), then `extra`: keys this version does not know, from a document or a measurement, kept as they were."""

    name: str
    kind: str | None = None
    bundle: str | None = None
    model: str | None = None
    resolution: int | None = None
    num_classes: int | None = None
    target: str | None = None
    precision: str | None = None
    precision_used: str | None = None
    backend_device: str | None = None
    device: str | None = None
    status: Status | None = VALID
    size_mb: float | None = None
    files_sha256: dict[str, str] | None = None
    load_s: float | None = None
    first_infer_ms: float | None = None
    peak_rss_mb: float | None = None
    peak_rss_method: str | None = None
    serving_memory: dict[str, Any] | None = None
    single_stream: dict[str, Any] | None = None
    offline: dict[str, Any] | None = None
    end_to_end: dict[str, Any] | None = None
    accuracy: dict[str, Any] | None = None
    build_accuracy: dict[str, Any] | None = None
    build_checks: dict[str, Any] | None = None
    describe: dict[str, Any] | None = None
    error: str | None = None
    interference: dict[str, Any] | None = None
    disturbed: bool | None = None
    flags: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BenchEntry:
        known = {k: v for k, v in data.items() if k in ENTRY_KEYS}
        if known.get("status") is not None:
            known["status"] = Status.parse(known["status"])
        return cls(**{"name": "", "status": None, **known}, extra={k: v for k, v in data.items() if k not in known})

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ENTRY_KEYS}
        out["status"] = None if self.status is None else self.status.text
        return {**out, **self.extra}

    def merged(self, values: Mapping[str, Any]) -> BenchEntry:
        """This entry with `values` (JSON fields, e.g. a measurement's) set; keys outside ENTRY_KEYS go to extra."""
        known = {k: v for k, v in values.items() if k in ENTRY_KEYS and k != "status"}
        if "status" in values:
            known["status"] = (
                values["status"] if isinstance(values["status"], Status) else Status.parse(values["status"])
            )
        extra = {**self.extra, **{k: v for k, v in values.items() if k not in ENTRY_KEYS}}
        return replace(self, **known, extra=extra)

    @property
    def is_valid(self) -> bool:
        return self.status is not None and self.status.is_valid

    @property
    def is_failed(self) -> bool:
        return self.status is not None and self.status.is_failed


ENTRY_KEYS = tuple(f.name for f in fields(BenchEntry) if f.name != "extra")


def _pair(x: Any) -> tuple[float, float] | None:
    return (float(x[0]), float(x[1])) if x else None


@dataclass(frozen=True)
class Timing:
    """A build's quick figures of one target (`quick.QuickTimer.result`): batch-1 latency, medians of the rounds
    with their [min, max] spread, and the batch-size sweep; `disturbed` says why they are not quotable."""

    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    n: int | None = None
    p50_spread: tuple[float, float] | None = None
    images_per_s: float | None = None  # the sweep's best
    images_per_s_spread: tuple[float, float] | None = None
    throughput_batch: int | None = None  # the batch size of the best
    throughput: list[dict[str, Any]] | None = None  # [{batch_size, images_per_s, images_per_s_spread, ...}]
    disturbed: tuple[str, ...] = ()  # benchmarks.interference's reasons

    @classmethod
    def from_quick(cls, result: Mapping[str, Any]) -> Timing:
        return cls(
            p50_ms=result.get("p50_ms"),
            p90_ms=result.get("p90_ms"),
            p99_ms=result.get("p99_ms"),
            mean_ms=result.get("mean_ms"),
            n=result.get("n"),
            p50_spread=_pair(result.get("p50_spread")),
            images_per_s=result.get("images_per_s"),
            images_per_s_spread=_pair(result.get("images_per_s_spread")),
            throughput_batch=result.get("throughput_batch"),
            throughput=result.get("throughput"),
            disturbed=tuple((result.get("interference") or {}).get("reasons") or ()),
        )

    def flat(self) -> dict[str, Any]:
        """The figures as build.json lists them (spreads as [min, max])."""
        return {
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "mean_ms": self.mean_ms,
            "latency_n": self.n,
            "images_per_s": self.images_per_s,
            "throughput_batch": self.throughput_batch,
            "throughput": self.throughput,
            "p50_spread": list(self.p50_spread) if self.p50_spread else None,
            "images_per_s_spread": list(self.images_per_s_spread) if self.images_per_s_spread else None,
            "disturbed": list(self.disturbed),
        }

    def single_stream(self) -> dict[str, Any] | None:
        """ENTRY.single_stream of these figures (None without a batch-1 p50)."""
        if self.p50_ms is None:
            return None
        ss: dict[str, Any] = {
            "n": self.n,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "mean_ms": self.mean_ms,
        }
        if self.p50_spread:
            ss["spread"] = {"p50_ms": list(self.p50_spread)}
        ss["images_per_s"] = 1000.0 / self.mean_ms if self.mean_ms else None
        return ss

    def offline(self) -> dict[str, Any] | None:
        """ENTRY.offline of the sweep (None without a batch-1 p50 or a throughput)."""
        if self.p50_ms is None or not self.images_per_s:
            return None
        return {
            "results": self.throughput or [{"batch_size": self.throughput_batch, "images_per_s": self.images_per_s}],
            "best_images_per_s": self.images_per_s,
            "best_batch_size": self.throughput_batch,
            "best_images_per_s_spread": list(self.images_per_s_spread) if self.images_per_s_spread else None,
        }

    def entry_fields(self) -> dict[str, Any]:
        """The ENTRY fields these figures fill."""
        return {
            "single_stream": self.single_stream(),
            "offline": self.offline(),
            "disturbed": bool(self.disturbed),
            "flags": list(self.disturbed),
        }


def new_entry(**fields: Any) -> dict[str, Any]:
    """An ENTRY document with every key present (null where unknown, status "valid" when not given); unknown keys
    are refused to keep the schema honest."""
    unknown = set(fields) - set(ENTRY_KEYS)
    if unknown:
        raise ValueError(f"unknown result fields: {sorted(unknown)}")
    return BenchEntry.from_json({**fields, "status": fields.get("status") or VALID.text}).to_json()


def new_document(
    results: Sequence[dict[str, Any] | BenchEntry],
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
        "results": [r.to_json() if isinstance(r, BenchEntry) else r for r in results],
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

"""The PyTorch FP32 baselines: what a reader would run instead of a bundle, measured three ways, each labelled.

    eager-ws         eager, Google's reference weight standardisation (var_mean over every conv weight on
                     every call, as bit_pytorch and training.bit.StdConv2d run it)
    eager-folded     eager, the standardisation folded into the weights once (training.bit's
                     fold_weight_standardization, the fold the ONNX export uses)
    compiled-folded  torch.compile (inductor) of the folded model

The report's speed-up column divides by the fastest of them. Eager forms run in the calling process, which must
time them before any engine session has run: ONNX Runtime's spinning intra-op threads slow PyTorch's OpenMP
threads in the same process. torch.compile runs in a child process whose compile step is bounded
by `compile_timeout` seconds, so a compiler that is missing, fails or hangs becomes a labelled `skipped:` row,
never a crash. torch is optional: it is imported only when a baseline is built.

    python -m bitdeploy.benchmarks.baseline SPEC.json     # the child: prints one JSON line
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bitdeploy.benchmarks.measure import BenchOptions, measure_latency
from bitdeploy.benchmarks.schema import VALID, BenchEntry, Status, Timing
from bitdeploy.core.errors import require
from bitdeploy.core.options import COMPILE_TIMEOUT_S
from bitdeploy.runtimes.bundle.manifest import Manifest

FORMS = ("eager-ws", "eager-folded", "compiled-folded")
LABELS = {
    "eager-ws": "PyTorch eager FP32, Google's reference weight standardisation every call",
    "eager-folded": "PyTorch eager FP32, weight standardisation folded into the weights",
    "compiled-folded": "torch.compile (inductor, CPU) of the folded model",
}
EXIT_COMPILE_TIMEOUT = 3


def entry_name(form: str, model: str, resolution: int) -> str:
    return f"pytorch-fp32-{form}:{model}@{resolution}"


@dataclass(frozen=True)
class QuickBaseline:
    """One form as a build times it (`measure_forms` with a quick timing), for the report's speed-up column."""

    form: str
    label: str
    status: Status
    model: str  # the (model, resolution) it timed: a grid build's report has one set per cell
    resolution: int
    compile_s: float | None = None
    timing: Timing = field(default_factory=Timing)

    @classmethod
    def from_result(cls, result: Mapping[str, Any], model: str, resolution: int) -> QuickBaseline:
        """From one result of `measure_forms` on `model` at `resolution`."""
        return cls(
            result["form"],
            result["label"],
            Status.parse(result["status"]),
            model,
            resolution,
            result.get("compile_s"),
            Timing.from_quick(result.get("measured") or {}),
        )

    def as_dict(self) -> dict[str, Any]:
        """The row build.json lists under "baseline"."""
        t = self.timing.flat()
        order = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "latency_n", "p50_spread", "images_per_s_spread", "disturbed")
        return {
            "form": self.form,
            "label": self.label,
            "model": self.model,
            "resolution": self.resolution,
            "status": self.status.text,
            "compile_s": self.compile_s,
            **{k: t[k] for k in order},
            **{k: t[k] for k in ("images_per_s", "throughput_batch", "throughput")},
        }

    def entry(self, num_classes: int | None, device: str) -> BenchEntry:
        """The bench entry of this form (`device`: the report's device column)."""
        return BenchEntry(
            name=entry_name(self.form, self.model, self.resolution),
            kind="pytorch",
            model=self.model,
            resolution=self.resolution,
            num_classes=num_classes,
            target="pytorch",
            precision="fp32",
            precision_used="f32",
            backend_device="cpu",
            device=device,
            status=self.status,
            describe={"form": self.form, "label": self.label, "compile_s": self.compile_s},
            **self.timing.entry_fields(),
        )


def prepare(model: Any, form: str) -> Any:
    """The module that runs for `form`: the model itself, its folded copy, or torch.compile of the folded copy."""
    torch = require("torch", "train", "PyTorch (torch), needed for the PyTorch baseline")
    from bitdeploy.training.bit import fold_weight_standardization

    if form not in FORMS:
        raise ValueError(f"unknown baseline form {form!r}; one of {FORMS}")
    if form == "eager-ws":
        return model.eval()
    folded = fold_weight_standardization(model).eval()
    return torch.compile(folded) if form == "compiled-folded" else folded


class PytorchBaseline:
    """`infer(batch)` for one baseline form on the CPU (eager under inference_mode; compiled under no_grad,
    which inductor's graphs are faster in)."""

    name = "pytorch"

    def __init__(
        self, module: Any, form: str, weights_info: dict[str, Any] | None = None, labels: list[str] | None = None
    ) -> None:
        torch = require("torch", "train", "PyTorch (torch), needed for the PyTorch baseline")
        self._torch = torch
        self.module, self.form = module, form
        self.weights_info = dict(weights_info or {})
        self.labels = labels
        self.threads = torch.get_num_threads()
        self._grad_off = torch.no_grad if form == "compiled-folded" else torch.inference_mode

    @classmethod
    def load(
        cls,
        model_name: str,
        num_classes: int | None,
        weights: str = "none",
        threads: int | None = None,
        seed: int = 0,
        form: str = "eager-ws",
    ) -> PytorchBaseline:
        torch = require("torch", "train", "PyTorch (torch), needed for the PyTorch baseline")
        from bitdeploy.training.weights import load_model

        if threads:
            torch.set_num_threads(int(threads))
        torch.manual_seed(seed)
        loaded = load_model(model_name, weights=weights, num_classes=num_classes)
        return cls(prepare(loaded.model, form), form, loaded.weights_info, loaded.labels)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with self._grad_off():
            out: np.ndarray = self.module(self._torch.from_numpy(np.ascontiguousarray(batch))).numpy()
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "pytorch",
            "torch": self._torch.__version__,
            "device": "cpu",
            "threads": self.threads,
            "precision_used": "f32",
            "form": self.form,
            "label": LABELS[self.form],
            "weights": self.weights_info.get("kind"),
        }

    def close(self) -> None:
        self.__dict__.pop("module", None)


def baseline_weights(choice: str, manifest: Manifest) -> str:
    """Resolve --baseline-weights: "auto" uses the bundle's own weights when they are a local file
    (an .npz or a training checkpoint), else random weights ("none": latency only, accuracy is meaningless)."""
    if choice != "auto":
        return choice
    weights = manifest.model.weights
    source = weights.source if weights is not None else None
    if (
        weights is not None
        and weights.kind in ("npz", "checkpoint")
        and source
        and "://" not in str(source)
        and Path(os.fspath(source)).exists()
    ):
        return str(source)
    return "none"


def time_target(target: Any, shape: Sequence[int], timing: dict[str, Any]) -> dict[str, Any]:
    """Measure `target` as `timing` says: {"kind": "quick", "kwargs": {...}} (build's short figure) or
    {"kind": "bench", "options": {...}} (bench's measurement, no end-to-end). The same code in both processes."""
    if timing["kind"] == "quick":
        from bitdeploy.benchmarks.quick import quick

        return quick(target, shape, **timing.get("kwargs", {}))
    opts = BenchOptions(**{**timing.get("options", {}), "end_to_end": False, "progress": False})
    return measure_latency(target, (int(shape[0]), int(shape[1]), int(shape[2])), opts, None, None)


def timed_batch_sizes(timing: dict[str, Any]) -> list[int]:
    """The batch sizes `time_target(timing)` will run, batch 1 first."""
    if timing["kind"] == "quick":
        sizes = timing.get("kwargs", {}).get("throughput_batches", (8,))
    else:
        opts = timing.get("options", {})
        sizes = opts.get("batch_sizes", (1, 8, 32)) if opts.get("scenario", "both") in ("offline", "both") else ()
    return list(dict.fromkeys([1, *sizes]))


def measure_forms(  # noqa: PLR0913 - keyword knobs with defaults
    model: Any,
    shape: Sequence[int],
    timing: dict[str, Any],
    measure: Callable[[PytorchBaseline], dict[str, Any]] | None = None,
    forms: Sequence[str] = FORMS,
    compile_timeout: float = COMPILE_TIMEOUT_S,
    weights_info: dict[str, Any] | None = None,
    labels: list[str] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """Time each form of `model` at batch shape (1, *shape); one result per form, in order:
    {form, label, status ("valid" | "skipped: why", a Status's text), prepare_s, compile_s, first_infer_ms, measured,
    describe}.

    `measure(baseline)` times an eager form in this process (default: `time_target` with `timing`); the compiled
    form is timed by `time_target(timing)` in a child. Call it before any engine session has run here."""
    from bitdeploy.benchmarks.latency import make_inputs

    x = make_inputs((1, *shape), pool=1)[0]
    measure = measure or (lambda b: time_target(b, shape, timing))
    out = []
    for form in forms:
        log(f"timing the PyTorch baseline {form} ({LABELS[form]})")
        result: dict[str, Any] = {
            "form": form,
            "label": LABELS[form],
            "status": VALID.text,
            "compile_s": None,
            "measured": None,
        }
        if form == "compiled-folded":
            result.update(_compiled_in_child(model, shape, timing, compile_timeout))
            out.append(result)
            continue
        t0 = time.perf_counter()
        base = PytorchBaseline(prepare(model, form), form, weights_info, labels)
        result["prepare_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        base.infer(x)
        result["first_infer_ms"] = (time.perf_counter() - t1) * 1e3
        result["measured"] = measure(base)
        result["describe"] = base.describe()
        base.close()
        out.append(result)
    return out


def _compiled_in_child(
    model: Any, shape: Sequence[int], timing: dict[str, Any], compile_timeout: float
) -> dict[str, Any]:
    """Fold here, pickle the folded module, compile + time it in a child; a failure is a `skipped:` status."""
    torch = require("torch", "train", "PyTorch (torch), needed for the PyTorch baseline")
    from bitdeploy.training.bit import fold_weight_standardization

    with tempfile.TemporaryDirectory(prefix="bitdeploy-compile-") as tmp:
        module_path, spec_path = Path(tmp) / "folded.pt", Path(tmp) / "spec.json"
        torch.save(fold_weight_standardization(model).eval(), module_path)
        spec = {
            "module": str(module_path),
            "shape": list(shape),
            "threads": torch.get_num_threads(),
            "timing": timing,
            "compile_timeout": compile_timeout,
        }
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run(
            [sys.executable, "-m", "bitdeploy.benchmarks.baseline", str(spec_path)], capture_output=True, text=True
        )
    if proc.returncode == EXIT_COMPILE_TIMEOUT:
        bound = f"torch.compile did not finish within {compile_timeout:g} s (the compile-time bound)"
        return {"status": Status.skipped(bound).text}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        try:
            return dict(json.loads(lines[-1]))
        except ValueError:
            pass
    err = [ln.strip() for ln in proc.stderr.strip().splitlines() if ln.strip()]
    why = (err[-1] if err else f"exit {proc.returncode}")[:200]
    return {"status": Status.skipped(f"torch.compile does not work on this CPU here ({why})").text}


def _child(spec_path: str) -> int:
    """Compile under a watchdog (os._exit on overrun: inductor cannot be interrupted), then time."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(int(spec["threads"]))
    module = torch.load(spec["module"], weights_only=False)
    shape = spec["shape"]
    watchdog = threading.Timer(float(spec["compile_timeout"]), os._exit, [EXIT_COMPILE_TIMEOUT])
    watchdog.daemon = True
    t0 = time.perf_counter()
    watchdog.start()
    base = PytorchBaseline(torch.compile(module), "compiled-folded")
    from bitdeploy.benchmarks.latency import make_inputs

    x = make_inputs((1, *shape), pool=1)[0]
    for bs in timed_batch_sizes(spec["timing"]):  # every shape timed later compiles now, under the bound
        base.infer(np.zeros((bs, *shape), np.float32))
    base.infer(x)
    compile_s = time.perf_counter() - t0
    watchdog.cancel()
    t1 = time.perf_counter()
    base.infer(x)
    first_ms = (time.perf_counter() - t1) * 1e3
    measured = time_target(base, shape, spec["timing"])
    result = {
        "prepare_s": compile_s,
        "compile_s": compile_s,
        "first_infer_ms": first_ms,
        "measured": measured,
        "describe": {**base.describe(), "compile_s": compile_s},
    }
    print(json.dumps(result, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(_child(sys.argv[1]))

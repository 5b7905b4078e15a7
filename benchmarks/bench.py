"""`bitdeploy bench` as a library: measure bundles (and the PyTorch FP32 baselines) into a bench document.

Per bundle: load time, the first call, single-stream latency, offline throughput per batch size, end-to-end
latency on encoded images, accuracy on a dataset, peak RSS. One failing bundle does not stop the others: its
entry says `failed: <reason>`. The PyTorch baselines (`baseline.FORMS`: eager with Google's standardisation,
eager folded, torch.compile of the folded model) are timed first, before any engine session exists in this
process (ONNX Runtime's spinning threads would slow them); a form that cannot run here is a `skipped:` entry.

`bench DIR --all` benches every bundle under DIR (`find_bundles`), each named by its path relative to DIR; a bundle
the build marked invalid is a `skipped:` entry. After the timing rounds, each valid bundle's serving memory is
measured in a fresh process, one bundle at a time (`benchmarks.memory`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bitdeploy.benchmarks import interference, latency
from bitdeploy.benchmarks.accuracy import EvalSet, load_eval_set, measure
from bitdeploy.benchmarks.discovery import baseline_manifests, bundle_entry, skipped_invalid
from bitdeploy.benchmarks.env import collect, device_label
from bitdeploy.benchmarks.measure import (
    QUIET_CHECKS,
    BenchOptions,
    combine,
    end_to_end,
    measure_latency,
    time_round,
)
from bitdeploy.benchmarks.memory import input_chw, peak_rss_mb, reset_peak_rss, rss_mb, serving_memory
from bitdeploy.benchmarks.progress import Progress
from bitdeploy.benchmarks.schema import FAILED_GATE, VALID, BenchEntry, Status, new_document, status_of
from bitdeploy.core.errors import BitdeployError
from bitdeploy.core.options import SCENARIOS
from bitdeploy.runtimes.bundle.manifest import Manifest, TargetInfo

E2E_IMAGES = 32  # distinct encoded images cycled through the end-to-end loop


def _open(bundle: str, opts: BenchOptions) -> tuple[Any, Manifest, Any]:
    """(predictor, manifest, backend) through the runtime's public loader."""
    from bitdeploy import runtimes

    pred = runtimes.load(bundle, backend=opts.backend, device=opts.device, threads=opts.threads)
    return pred, pred.manifest, pred.backend


_shape_chw = input_chw  # one input's (C, H, W), shared with the serving-memory child


def _precision_used(target: TargetInfo, desc: dict[str, Any]) -> str | None:
    """What ran: the backend's own report of its float precision (e.g. OpenVINO's bf16 default), combined
    with int8 for quantized bundles; the manifest's record where the backend does not say."""
    ran = desc.get("precision_used")
    if ran is None:
        return target.precision_used
    if target.precision == "int8" and "int8" not in str(ran):
        return f"int8+{ran}"
    return str(ran)


def _describe(obj: Any) -> dict[str, Any]:
    try:
        return dict(obj.describe())
    except Exception:  # describe() is informative only; never fail a benchmark on it
        return {}


@dataclass
class Opened:
    """A bundle held open between its interleaved rounds."""

    entry: BenchEntry
    pred: Any
    manifest: Manifest
    shape: tuple[int, int, int]
    rounds: list[dict[str, Any]] = field(default_factory=list)


class Bench:
    """Holds what is shared between bundles: the environment, the eval set, encoded images, the reference."""

    def __init__(self, opts: BenchOptions) -> None:
        if opts.scenario not in SCENARIOS:
            raise BitdeployError(f"unknown --scenario {opts.scenario!r}; choose one of: {', '.join(SCENARIOS)}")
        if opts.quiet_check not in QUIET_CHECKS:
            raise BitdeployError(
                f"unknown --quiet-check {opts.quiet_check!r}; choose one of: {', '.join(QUIET_CHECKS)}"
            )
        if opts.reference and not opts.dataset:
            raise BitdeployError(
                "--reference needs --dataset (agreement is measured on its images); add --dataset SPEC"
            )
        self.opts = opts
        self.env = collect(opts.threads)
        self.eval_set: EvalSet | None = load_eval_set(opts.dataset, opts.seed) if opts.dataset else None
        self.images, self.images_source = self._images()
        self._ref_pred: Any = None
        self.waits: list[dict[str, Any]] = []
        self.progress: Progress | None = None

    def log(self, message: str) -> None:
        """A progress line on stderr, for a terminal only (like the bars): logs and pipes get just the results."""
        if self.opts.progress and sys.stderr.isatty():
            print(f"bench: {message}", file=sys.stderr, flush=True)

    @property
    def reference(self) -> tuple[str, Any] | None:
        """(name, infer) of --reference, opened on first use: after the PyTorch baselines were timed."""
        if not self.opts.reference:
            return None
        if self._ref_pred is None:
            self._ref_pred, _, _ = _open(self.opts.reference, self.opts)
        return Path(self.opts.reference).name, self._ref_pred.infer

    def _images(self) -> tuple[list[bytes], str | None]:
        if not self.opts.end_to_end:
            return [], None
        source = self.eval_set
        if source is None:
            try:
                source = load_eval_set("digits", self.opts.seed)
            except (ImportError, BitdeployError):
                return [], None
        images = source.encoded(E2E_IMAGES)
        arr, _ = source.images[0]
        return (
            images,
            f"{source.source} {source.split} split, {len(images)} images, first {arr.shape[1]}x{arr.shape[0]} px, encoded",
        )

    def close(self) -> None:
        if self._ref_pred is not None:
            getattr(self._ref_pred, "close", lambda: None)()

    def open(self, bundle: str, name: str | None = None) -> Opened | BenchEntry:
        """Load a bundle and make its first call; a failed entry when it cannot be opened."""
        opts, name = self.opts, name or Path(bundle).name or str(bundle)
        rss_before = rss_mb()
        rss_method = reset_peak_rss()
        pred = None
        try:
            t0 = time.perf_counter()
            pred, manifest, backend = _open(bundle, opts)
            load_s = time.perf_counter() - t0
            shape = _shape_chw(manifest)
            t1 = time.perf_counter()
            pred.infer(latency.make_inputs((1, *shape), pool=1)[0])
            first_ms = (time.perf_counter() - t1) * 1e3
            desc = _describe(backend)
            target = manifest.target
            device = str(desc.get("device") or target.device or opts.device or "cpu")
            entry = bundle_entry(
                name,
                bundle,
                manifest,
                VALID if manifest.valid else FAILED_GATE,
                target=target.backend or desc.get("backend"),
                precision_used=_precision_used(target, desc),
                backend_device=device,
                device=device_label(self.env, device),
                load_s=load_s,
                first_infer_ms=first_ms,
                describe=desc,
            )
        except BitdeployError as exc:
            if pred is not None:
                getattr(pred, "close", lambda: None)()
            return BenchEntry(
                name=name,
                kind="bundle",
                bundle=str(bundle),
                status=Status.failed(str(exc)),
                error=str(exc),
                peak_rss_mb=peak_rss_mb(),
                peak_rss_method=rss_method,
            )
        # Bundles stay open together for interleaved rounds: the ones opened before this are resident too.
        entry = entry.merged(
            {
                "peak_rss_mb": peak_rss_mb(),
                "peak_rss_method": f"{rss_method}, over load and first call",
                "rss_before_mb": rss_before,
            }
        )
        return Opened(entry, pred, manifest, shape)

    def time_round(self, o: Opened) -> None:
        o.rounds.append(time_round(o.pred, o.shape, self.opts))

    def finish(self, o: Opened) -> BenchEntry:
        """Combine the rounds, then end-to-end and accuracy (once each), and close the bundle."""
        opts, entry = self.opts, o.entry
        try:
            entry = entry.merged(combine(o.rounds, opts))
            if opts.end_to_end and self.images:
                e2e = end_to_end(o.pred, self.images, o.manifest.input, opts)
                entry = replace(entry, end_to_end={**e2e, "images_source": self.images_source})
            if self.eval_set is not None:
                accuracy = measure(
                    o.pred.infer,
                    o.manifest.input,
                    o.manifest.labels,
                    self.eval_set,
                    self.reference,
                    opts.samples,
                    progress=opts.progress,
                )
                entry = replace(entry, accuracy=accuracy)
        except BitdeployError as exc:
            entry = replace(entry, status=Status.failed(str(exc)), error=str(exc))
        finally:
            getattr(o.pred, "close", lambda: None)()
        return entry

    def bundles(
        self, bundles: list[str], names: Sequence[str] | None = None, skip_invalid: bool = False
    ) -> list[BenchEntry]:
        """Every bundle in `opts.rounds` interleaved rounds, each round starting one bundle later than the last,
        so slow drift of the machine hits every bundle alike; then end-to-end and accuracy per bundle, then (with
        `opts.memory`) each valid bundle's serving memory in a fresh process, one at a time. `skip_invalid`: a
        bundle the build marked invalid is a `skipped:` entry instead of a failure."""
        names = list(names) if names is not None else [Path(b).name or b for b in bundles]
        rounds = max(1, self.opts.rounds)
        finishing = int(bool(self.opts.end_to_end and self.images) or self.eval_set is not None)
        memory = int(self.opts.memory)
        per = rounds + finishing + memory  # steps after opening, per bundle
        skipped = {b: e for b, n in zip(bundles, names) if skip_invalid and (e := skipped_invalid(b, n)) is not None}
        progress = self.progress = Progress((len(bundles) - len(skipped)) * (1 + per), self.log)
        opened: list[Opened | BenchEntry] = []
        for b, n in zip(bundles, names):
            if b in skipped:
                opened.append(replace(skipped[b], device=device_label(self.env, skipped[b].backend_device)))
                continue
            progress.step(f"opening {n}")
            opened.append(self.open(b, n))
            if not isinstance(opened[-1], Opened):
                progress.total -= per
        live = [o for o in opened if isinstance(o, Opened)]
        try:
            for r in range(rounds):
                self.before_round(r)
                shift = r % len(live) if live else 0
                for o in live[shift:] + live[:shift]:
                    progress.step(f"round {r + 1}/{rounds} {o.entry.name}")
                    try:
                        self.time_round(o)
                    except BitdeployError as exc:
                        o.entry = replace(o.entry, status=Status.failed(str(exc)), error=str(exc))
                        progress.total -= rounds - r - 1 + finishing + memory
                live = [o for o in live if not o.entry.is_failed]
        finally:
            results: list[BenchEntry] = []
            for item in opened:
                if not isinstance(item, Opened):
                    results.append(item)
                elif item.rounds and not item.entry.is_failed:
                    if finishing:
                        progress.step(f"{self._finish_label()} {item.entry.name}")
                    results.append(self.finish(item))
                    if results[-1].is_failed:
                        progress.total -= memory
                else:
                    getattr(item.pred, "close", lambda: None)()
                    results.append(item.entry)
        return self.serving_memory(results) if self.opts.memory else results

    def _finish_label(self) -> str:
        return " and ".join(
            w
            for w, on in (("end-to-end", self.opts.end_to_end and self.images), ("accuracy", self.eval_set is not None))
            if on
        )

    def serving_memory(self, entries: list[BenchEntry]) -> list[BenchEntry]:
        """Each benched bundle's serving memory, in a fresh process, one at a time: after every timing round, and
        with this process's sessions closed, so it neither disturbs nor is disturbed by the timing. A failure is
        recorded as {"error": ...} in that entry; the bundle's other figures stand."""
        opts, out = self.opts, []
        for e in entries:
            if e.kind != "bundle" or not e.is_valid:
                out.append(e)
                continue
            if self.progress is not None:
                self.progress.step(f"serving memory {e.name}")
            try:
                mem = serving_memory(str(e.bundle), threads=opts.threads, backend=opts.backend, device=opts.device)
            except BitdeployError as exc:
                mem = {"error": str(exc)}
            out.append(replace(e, serving_memory=mem))
        return out

    def before_round(self, r: int) -> None:
        """`--quiet-check wait`: wait up to `quiet_wait` seconds for a quiet machine before each round."""
        if self.opts.quiet_check != "wait":
            return
        quiet, waited, rec = interference.wait_for_quiet(self.opts.quiet_wait, log=self.log)
        self.waits.append({"round": r + 1, "quiet": quiet, "waited_s": waited, "last_probe": rec})
        if not quiet:
            self.warn(
                f"machine still busy after {waited:.0f} s ({'; '.join(interference.reasons(rec))}); timing round {r + 1} anyway"
            )

    def warn(self, message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)

    def pytorch(self, manifest_like: Manifest) -> list[BenchEntry]:
        """The PyTorch FP32 baselines (every form of `baseline.FORMS`) for one (model, resolution, classes)."""
        from bitdeploy.benchmarks.baseline import FORMS, PytorchBaseline, baseline_weights, entry_name, measure_forms

        opts = self.opts
        model = manifest_like.model
        common: dict[str, Any] = {
            "kind": "pytorch",
            "model": model.name,
            "resolution": model.resolution,
            "num_classes": model.num_classes,
            "target": "pytorch",
            "precision": "fp32",
        }
        forms = FORMS if opts.compile_timeout > 0 else FORMS[:2]
        rss_method = reset_peak_rss()
        try:
            weights = baseline_weights(opts.pytorch_baseline or "auto", manifest_like)
            loaded = PytorchBaseline.load(model.name, model.num_classes, weights, opts.threads, opts.seed)
        except BitdeployError as exc:
            return [
                BenchEntry(
                    name=entry_name(f, model.name, model.resolution or 0),
                    status=Status.failed(str(exc)),
                    error=str(exc),
                    **common,
                )
                for f in forms
            ]
        shape = _shape_chw(manifest_like)
        # Random or re-headed weights would give a meaningless top-1: only the bundle's own checkpoint or a given file.
        with_accuracy = (
            self.eval_set is not None
            and weights != "none"
            and (opts.pytorch_baseline != "auto" or loaded.weights_info.get("kind") == "checkpoint")
        )

        def time_eager(base: PytorchBaseline) -> dict[str, Any]:
            out = measure_latency(base, shape, opts, self.images, manifest_like.input)
            if with_accuracy and base.form == "eager-ws" and self.eval_set is not None:
                out["accuracy"] = measure(
                    base.infer,
                    manifest_like.input,
                    base.labels or manifest_like.labels,
                    self.eval_set,
                    None,
                    opts.samples,
                    progress=opts.progress,
                )
            return out

        timing = {
            "kind": "bench",
            "options": {
                k: getattr(opts, k)
                for k in ("batch_sizes", "scenario", "iterations", "duration", "warmup", "keep_raw", "seed", "rounds")
            },
        }
        results = measure_forms(
            loaded.module,
            shape,
            timing,
            time_eager,
            forms,
            opts.compile_timeout,
            loaded.weights_info,
            loaded.labels,
            self.log,
        )
        loaded.close()
        entries = []
        for r in results:
            measured = dict(r.get("measured") or {})
            entry = BenchEntry(
                name=entry_name(r["form"], model.name, model.resolution or 0),
                precision_used="f32",
                backend_device="cpu",
                device=device_label(self.env, "cpu"),
                status=Status.parse(r["status"]),
                load_s=r.get("prepare_s"),
                first_infer_ms=r.get("first_infer_ms"),
                describe=r.get("describe") or {"form": r["form"], "label": r["label"]},
                accuracy=measured.pop("accuracy", None),
                **common,
            ).merged(measured)
            if entry.end_to_end:
                entry = replace(entry, end_to_end={**entry.end_to_end, "images_source": self.images_source})
            entries.append(replace(entry, peak_rss_mb=peak_rss_mb(), peak_rss_method=rss_method))
        return entries


def run(
    bundles: list[str], opts: BenchOptions, names: Sequence[str] | None = None, skip_invalid: bool = False
) -> dict[str, Any]:
    """Benchmark every bundle (and the baseline when asked) and return one bench document.

    `names`: each bundle's entry name (default: its last path part); `skip_invalid` (`--all`): a bundle the build
    marked invalid becomes a `skipped:` entry rather than a failure."""
    bench = Bench(opts)
    results: list[BenchEntry] = []
    try:
        if opts.pytorch_baseline is not None:
            for m in baseline_manifests(bundles):
                results.extend(bench.pytorch(m))
        results.extend(bench.bundles(bundles, names, skip_invalid))
    finally:
        bench.close()
    settings = opts.settings()
    settings["end_to_end_images"] = bench.images_source
    if bench.waits:
        settings["quiet_waits"] = bench.waits
    return new_document(results, bench.env, settings)


def disturbed(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Entries whose timing windows were disturbed or whose figures disagree with each other."""
    return [e for e in doc["results"] if e.get("disturbed") or (e.get("end_to_end") or {}).get("disturbed")]


def failed(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in doc["results"] if status_of(e).is_failed]

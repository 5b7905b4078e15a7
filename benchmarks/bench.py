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

import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitdeploy.benchmarks import interference, latency
from bitdeploy.benchmarks.accuracy import EvalSet, load_eval_set, measure
from bitdeploy.benchmarks.discovery import bundle_size, skipped_invalid
from bitdeploy.benchmarks.env import collect, device_label
from bitdeploy.benchmarks.measure import (
    QUIET_CHECKS,
    SCENARIOS,
    BenchOptions,
    combine,
    end_to_end,
    measure_latency,
    time_round,
)
from bitdeploy.benchmarks.memory import input_chw, serving_memory
from bitdeploy.benchmarks.progress import Progress
from bitdeploy.benchmarks.schema import new_document, new_entry
from bitdeploy.core.errors import BitdeployError
from bitdeploy.runtimes.manifest import Manifest, TargetInfo

E2E_IMAGES = 32  # distinct encoded images cycled through the end-to-end loop


def _reset_peak_rss() -> str:
    """Reset the kernel's peak-RSS counter (Linux clear_refs 5) so each entry gets its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM after clear_refs (per entry)"
    except OSError:
        return "ru_maxrss (process peak so far)"


def _rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


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

    entry: dict[str, Any]
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

    def open(self, bundle: str, name: str | None = None) -> Opened | dict[str, Any]:
        """Load a bundle and make its first call; a failed entry when it cannot be opened."""
        opts, name = self.opts, name or Path(bundle).name or str(bundle)
        rss_before = _rss_mb()
        rss_method = _reset_peak_rss()
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
            target, model = manifest.target, manifest.model
            size_mb, files = bundle_size(Path(bundle), manifest)
            entry = new_entry(
                name=name,
                kind="bundle",
                bundle=str(bundle),
                model=model.name,
                resolution=model.resolution,
                num_classes=model.num_classes,
                target=target.backend or desc.get("backend"),
                precision=target.precision,
                precision_used=_precision_used(target, desc),
                backend_device=str(desc.get("device") or target.device or opts.device or "cpu"),
                status="valid" if manifest.valid else "failed gate",
                size_mb=size_mb,
                files_sha256=files,
                load_s=load_s,
                first_infer_ms=first_ms,
                build_accuracy=manifest.accuracy.to_dict() if manifest.accuracy is not None else None,
                describe=desc,
            )
            entry["device"] = device_label(self.env, entry["backend_device"])
        except BitdeployError as exc:
            if pred is not None:
                getattr(pred, "close", lambda: None)()
            entry = new_entry(name=name, kind="bundle", bundle=str(bundle), status=f"failed: {exc}", error=str(exc))
            entry.update(peak_rss_mb=_peak_rss_mb(), peak_rss_method=rss_method)
            return entry
        # Bundles stay open together for interleaved rounds: the ones opened before this are resident too.
        entry.update(
            peak_rss_mb=_peak_rss_mb(),
            peak_rss_method=f"{rss_method}, over load and first call",
            rss_before_mb=rss_before,
        )
        return Opened(entry, pred, manifest, shape)

    def time_round(self, o: Opened) -> None:
        o.rounds.append(time_round(o.pred, o.shape, self.opts))

    def finish(self, o: Opened) -> dict[str, Any]:
        """Combine the rounds, then end-to-end and accuracy (once each), and close the bundle."""
        opts, entry = self.opts, o.entry
        try:
            entry.update(combine(o.rounds, opts))
            if opts.end_to_end and self.images:
                entry["end_to_end"] = end_to_end(o.pred, self.images, o.manifest.input, opts)
                entry["end_to_end"]["images_source"] = self.images_source
            if self.eval_set is not None:
                entry["accuracy"] = measure(
                    o.pred.infer,
                    o.manifest.input,
                    o.manifest.labels,
                    self.eval_set,
                    self.reference,
                    opts.samples,
                    progress=opts.progress,
                )
        except BitdeployError as exc:
            entry.update(status=f"failed: {exc}", error=str(exc))
        finally:
            getattr(o.pred, "close", lambda: None)()
        return entry

    def bundles(
        self, bundles: list[str], names: Sequence[str] | None = None, skip_invalid: bool = False
    ) -> list[dict[str, Any]]:
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
        opened: list[Opened | dict[str, Any]] = []
        for b, n in zip(bundles, names):
            if b in skipped:
                skipped[b]["device"] = device_label(self.env, skipped[b]["backend_device"])
                opened.append(skipped[b])
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
                    progress.step(f"round {r + 1}/{rounds} {o.entry['name']}")
                    try:
                        self.time_round(o)
                    except BitdeployError as exc:
                        o.entry.update(status=f"failed: {exc}", error=str(exc))
                        progress.total -= rounds - r - 1 + finishing + memory
                live = [o for o in live if not str(o.entry["status"]).startswith("failed:")]
        finally:
            results: list[dict[str, Any]] = []
            for item in opened:
                if not isinstance(item, Opened):
                    results.append(item)
                elif item.rounds and not str(item.entry["status"]).startswith("failed:"):
                    if finishing:
                        progress.step(f"{self._finish_label()} {item.entry['name']}")
                    results.append(self.finish(item))
                    if str(item.entry["status"]).startswith("failed:"):
                        progress.total -= memory
                else:
                    getattr(item.pred, "close", lambda: None)()
                    results.append(item.entry)
        if self.opts.memory:
            self.serving_memory(results)
        return results

    def _finish_label(self) -> str:
        return " and ".join(
            w
            for w, on in (("end-to-end", self.opts.end_to_end and self.images), ("accuracy", self.eval_set is not None))
            if on
        )

    def serving_memory(self, entries: list[dict[str, Any]]) -> None:
        """Each benched bundle's serving memory, in a fresh process, one at a time: after every timing round, and
        with this process's sessions closed, so it neither disturbs nor is disturbed by the timing. A failure is
        recorded as {"error": ...} in that entry; the bundle's other figures stand."""
        opts = self.opts
        for e in entries:
            if e.get("kind") != "bundle" or e.get("status") != "valid":
                continue
            if self.progress is not None:
                self.progress.step(f"serving memory {e['name']}")
            try:
                e["serving_memory"] = serving_memory(
                    e["bundle"], threads=opts.threads, backend=opts.backend, device=opts.device
                )
            except BitdeployError as exc:
                e["serving_memory"] = {"error": str(exc)}

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

    def pytorch(self, manifest_like: Manifest) -> list[dict[str, Any]]:
        """The PyTorch FP32 baselines (every form of `baseline.FORMS`) for one (model, resolution, classes)."""
        from bitdeploy.benchmarks.baseline import FORMS, PytorchBaseline, baseline_weights, entry_name, measure_forms

        opts = self.opts
        model = manifest_like.model
        common = {
            "kind": "pytorch",
            "model": model.name,
            "resolution": model.resolution,
            "num_classes": model.num_classes,
            "target": "pytorch",
            "precision": "fp32",
        }
        forms = FORMS if opts.compile_timeout > 0 else FORMS[:2]
        rss_method = _reset_peak_rss()
        try:
            weights = baseline_weights(opts.pytorch_baseline or "auto", manifest_like)
            loaded = PytorchBaseline.load(model.name, model.num_classes, weights, opts.threads, opts.seed)
        except BitdeployError as exc:
            return [
                new_entry(
                    name=entry_name(f, model.name, model.resolution or 0),
                    status=f"failed: {exc}",
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
            entry = new_entry(
                name=entry_name(r["form"], model.name, model.resolution or 0),
                precision_used="f32",
                backend_device="cpu",
                status=r["status"],
                load_s=r.get("prepare_s"),
                first_infer_ms=r.get("first_infer_ms"),
                describe=r.get("describe") or {"form": r["form"], "label": r["label"]},
                accuracy=measured.pop("accuracy", None),
                **common,
            )
            entry["device"] = device_label(self.env, "cpu")
            entry.update(measured)
            if entry.get("end_to_end"):
                entry["end_to_end"]["images_source"] = self.images_source
            entry.update(peak_rss_mb=_peak_rss_mb(), peak_rss_method=rss_method)
            entries.append(entry)
        return entries


def _baseline_keys(bundles: list[str]) -> list[Manifest]:
    """One manifest per distinct (model, resolution, classes) among the readable bundles (directories or packs)."""
    from bitdeploy.runtimes.pack import open_bundle

    seen, out = set(), []
    for b in bundles:
        try:
            opened = open_bundle(b, verify=False, require_valid=False)
        except BitdeployError:
            continue  # its own entry will say why
        opened.cleanup()
        model = opened.manifest.model
        key = (model.name or None, model.resolution, model.num_classes)
        if None not in key[:2] and key not in seen:
            seen.add(key)
            out.append(opened.manifest)
    return out


def run(
    bundles: list[str], opts: BenchOptions, names: Sequence[str] | None = None, skip_invalid: bool = False
) -> dict[str, Any]:
    """Benchmark every bundle (and the baseline when asked) and return one bench document.

    `names`: each bundle's entry name (default: its last path part); `skip_invalid` (`--all`): a bundle the build
    marked invalid becomes a `skipped:` entry rather than a failure."""
    bench = Bench(opts)
    results: list[dict[str, Any]] = []
    try:
        if opts.pytorch_baseline is not None:
            for m in _baseline_keys(bundles):
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
    return [e for e in doc["results"] if str(e.get("status", "")).startswith("failed:")]

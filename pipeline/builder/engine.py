"""`bitdeploy engine BUNDLE`: the last step of a TensorRT bundle, on the device.

A build on a host without TensorRT or an NVIDIA GPU writes a ready bundle: the TensorRT-ready ONNX
(`model.trt.onnx`: FP16 casts with FP32 norms, or explicit Q/DQ), the golden self-test, and the gate's result on
that ONNX through ONNX Runtime. On the device this builds the engine from it with the recorded batch profile and
workspace, reads back the precision TensorRT built, runs the golden self-test on the GPU against the build's FP32
logits, records the TensorRT version, GPU and compute capability, and reseals the bundle atomically, valid or not.
The same command rebuilds the engine of a bundle built for another GPU or TensorRT version.
"""

from __future__ import annotations

import datetime as _dt
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bitdeploy.core.errors import BitdeployError, first_line
from bitdeploy.core.targets import for_backend
from bitdeploy.runtimes.bundle import bundle_writer, write_manifest
from bitdeploy.runtimes.bundle.manifest import Manifest

PLAN = "model.plan"
ONNX_SUFFIX = ".trt.onnx"


@dataclass(frozen=True)
class EngineOutcome:
    bundle: Path  # where the resealed bundle is
    manifest: Manifest
    line: str  # the one line the command prints


def engine_source(manifest: Manifest, source: Path) -> str:
    """The bundle's TensorRT-ready ONNX, which its engine is built from (one line if it has none)."""
    record = for_backend(manifest.target.backend)
    if not record.ready_modules:
        raise BitdeployError(
            f"{source} is a {record.title} bundle; `bitdeploy engine` builds TensorRT engines (--target trt)"
        )
    onnx = next((f for f in manifest.files if f.endswith(ONNX_SUFFIX)), None)
    if onnx is None:
        raise BitdeployError(f"{source}: the bundle has no {ONNX_SUFFIX} to build an engine from; rebuild it")
    if manifest.gate is None or not manifest.gate.passed:
        why = manifest.invalid_reason or "no gate result"
        raise BitdeployError(
            f"{source}: it failed its accuracy gate at build ({why}); an engine would not make it valid, rebuild it"
        )
    return onnx


def destination(source: Path, out: Path | None) -> Path:
    """In place for a bundle directory; a pack is unpacked beside it (`model.bitpack` -> `model/`)."""
    if out is not None:
        return out
    return source if source.is_dir() else source.with_name(source.name.split(".")[0])


def build_engine(
    source: Path, out: Path | None, device: str | None, cache_dir: Path | None, log: Callable[[str], None]
) -> EngineOutcome:
    """Build, self-test and reseal (see the module's doc); one-line errors without TensorRT or a GPU."""
    from bitdeploy.converters.trt_engine import build_on_gpu, check_available, recorded_profile
    from bitdeploy.runtimes.bundle.pack import open_bundle

    opened = open_bundle(source, verify=True, require_valid=False)
    try:
        manifest = opened.manifest
        onnx = engine_source(manifest, source)
        check_available()  # without TensorRT or a GPU: one line, before anything is printed or written
        profile, workspace_gb = recorded_profile(manifest.target.details)
        log(f"building the TensorRT engine of {source} from {onnx} (batch {profile}, workspace {workspace_gb:g} GiB)")
        built = build_on_gpu(
            opened.root / onnx,
            manifest.target.precision,
            device or manifest.target.device,
            profile,
            workspace_gb,
            cache_dir,
            manifest.target.backend,
        )
        dest = destination(source, out)
        with bundle_writer(dest) as tmp:
            kept = [f for f in manifest.files if f != PLAN]
            for name in kept:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(opened.root / name, tmp / name)
            (tmp / PLAN).write_bytes(built.plan)
            sealed = _reseal(tmp, manifest, built, [*kept, PLAN])
    finally:
        opened.cleanup()
    return EngineOutcome(dest, sealed, _line(dest, sealed))


def _reseal(root: Path, manifest: Manifest, built: Any, files: list[str]) -> Manifest:
    """The self-test on this GPU decides the new manifest's verdict; written once, with every file's checksum."""
    from bitdeploy.runtimes.bundle import selftest
    from bitdeploy.runtimes.engines.base import open_backend

    details = {k: v for k, v in manifest.target.details.items() if k != "engine"}
    engine: dict[str, Any] = {
        "status": "built",
        "where": "on the device",
        "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "checks": {"gate": (manifest.gate.evaluated_with if manifest.gate else None), "self_test": "this GPU"},
    }
    target = replace(
        manifest.target,
        precision_used=built.precision_used,
        device=built.device,
        details={**details, **built.details, "engine": engine},
    )
    draft = replace(manifest, model_file=PLAN, target=target, notes=[*manifest.notes, *built.notes])
    try:
        backend = open_backend(target.backend, root / PLAN, draft, device=built.device)
        try:
            result = selftest.run(backend.infer, root, draft)
        finally:
            backend.close()
        engine["self_test"] = {
            "passed": result.passed,
            "agreement": result.agreement,
            "max_rel_error": result.max_rel_error,
            "images": result.images,
        }
        failures = "; ".join(result.failures)
    except BitdeployError as exc:  # the engine would not run the golden set: sealed invalid, saying why
        engine["self_test"] = {"passed": False, "error": first_line(exc)}
        failures = first_line(exc)
    why = f"self-test on {target.get('gpu_name')}: {failures}" if failures else None
    return write_manifest(root, replace(draft, valid=not failures, invalid_reason=why), files)


def _line(dest: Path, m: Manifest) -> str:
    t = m.target
    where = f"{t.get('gpu_name')} (sm {t.get('compute_capability')}, TensorRT {t.get('tensorrt_version')})"
    test = (t.get("engine") or {}).get("self_test") or {}
    figures = (
        f"agreement {(test.get('agreement') or 0) * 100:.1f}% with FP32 on {test.get('images')} golden images"
        if "agreement" in test
        else "the golden set did not run"
    )
    if m.valid:
        return (
            f"{dest}: engine built on {where}, {t.precision_used}; self-test passed ({figures}); bundle resealed valid"
        )
    return f"{dest}: engine built on {where} but {m.invalid_reason} ({figures}); bundle resealed invalid"

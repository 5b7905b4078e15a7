"""`bitdeploy predict | inspect | pack | serve`: the torch-free runtime commands.

Only click is imported at module level; numpy, Pillow and the backend SDK come in when a command runs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from bitdeploy.cli import groups, groups_run

if TYPE_CHECKING:
    from bitdeploy.core.options import RuntimeArgs
    from bitdeploy.runtimes.serving.serve_options import ServeOptions

if TYPE_CHECKING:
    from bitdeploy.runtimes.bundle.manifest import Manifest
BUNDLE_ARG = click.argument("bundle", type=click.Path(path_type=Path), metavar="BUNDLE")


# -- predict ----------------------------------------------------------------------------------------------------
@click.command("predict")
@BUNDLE_ARG
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="IMAGE...")
@click.option(
    "--top-k",
    "-k",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="How many labels to print per image.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print a JSON list: one object per image with `image` and `predictions` (or `error`).",
)
@groups.option(groups.NO_VERIFY)
@groups.takes(groups_run.RUNTIME)
def predict(
    bundle: Path,
    images: tuple[Path, ...],
    top_k: int,
    as_json: bool,
    no_verify: bool,
    runtime: RuntimeArgs,
) -> None:
    """Classify IMAGE files with BUNDLE (a bundle directory or a .bitpack file).

    Any image Pillow opens works (grayscale, RGBA, palette, CMYK, 16-bit are converted to RGB); it is
    resized and normalised exactly as the bundle's manifest says. An image that cannot be read is reported
    on stderr with its name and the others are still classified; the exit status is then 1.

    \b
    Example:
      bitdeploy predict runs/digits img.png img.jpg --top-k 3 --json
    """
    import numpy as np

    from bitdeploy.core.errors import ImageError
    from bitdeploy.runtimes import load

    entries: list[dict[str, Any]] = []
    failed = 0
    pre_s = infer_s = 0.0
    with load(
        bundle, backend=runtime.backend, device=runtime.device, threads=runtime.threads, verify=not no_verify
    ) as model:
        for start in range(0, len(images), model.max_batch):
            chunk: list[dict[str, Any]] = []
            tensors = []
            for image in images[start : start + model.max_batch]:
                t0 = time.perf_counter()
                entry: dict[str, Any] = {"image": str(image)}
                try:
                    tensors.append(model.preprocess(str(image)))
                    chunk.append(entry)
                except ImageError as exc:
                    failed += 1
                    click.echo(f"error: {exc}", err=True)
                    entry["error"] = str(exc)
                pre_s += time.perf_counter() - t0
                entries.append(entry)
            if not tensors:
                continue
            t0 = time.perf_counter()
            logits = model.infer_padded(np.concatenate(tensors))
            infer_s += time.perf_counter() - t0
            for entry, preds in zip(chunk, model.postprocess(logits, top_k)):
                entry["predictions"] = [{"label": label, "probability": round(p, 6)} for label, p in preds]
                if not as_json:
                    _print_predictions(entry)
        done = len(images) - failed
        if as_json:
            click.echo(json.dumps(entries, indent=2))
        elif done:
            info = model.describe()
            click.echo(
                f"{done} image(s) with {info.get('backend')} on {info.get('device')}: "
                f"preprocess {pre_s / len(images) * 1e3:.2f} ms/image, inference {infer_s / done * 1e3:.2f} ms/image "
                "(one cold run; `bitdeploy bench` measures latency)"
            )
    if failed:
        sys.exit(1)  # not click's Exit: bitdeploy.cli.main runs click with standalone_mode=False, which swallows it


def _print_predictions(entry: dict[str, Any]) -> None:
    click.echo(entry["image"])
    width = max(len(p["label"]) for p in entry["predictions"])
    for rank, p in enumerate(entry["predictions"], 1):
        click.echo(f"  {rank}. {p['label']:<{width}}  {p['probability']:.4f}")


# -- inspect ------------------------------------------------------------------------------------------------------
@click.command("inspect")
@BUNDLE_ARG
@click.option(
    "--json", "as_json", is_flag=True, help='Print {"bundle", "pack", "checksums", "runs_here", "manifest"} as JSON.'
)
@click.option("--no-verify", is_flag=True, help="Do not check the files' sha256 (just show the manifest).")
def inspect(bundle: Path, as_json: bool, no_verify: bool) -> None:
    """Show BUNDLE's manifest (a directory or a .bitpack file) and verify its files' checksums.

    Exits 1 with one line if a file is missing or was modified after the build, or the format version is
    unknown. A bundle that failed its accuracy gate is shown with its reason (exit 0).
    """
    from bitdeploy.core import targets
    from bitdeploy.runtimes.bundle.pack import open_bundle
    from bitdeploy.runtimes.engines.base import backend_available

    opened = open_bundle(bundle, verify=not no_verify, require_valid=False)
    try:
        m = opened.manifest
        backend = m.target.backend
        record = targets.find_backend(backend)
        runs_here = backend_available(backend)
        checksums = "skipped" if no_verify else "ok"
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "bundle": str(bundle),
                        "pack": opened.is_pack,
                        "checksums": checksums,
                        "runs_here": runs_here,
                        "manifest": m.to_dict(),
                    },
                    indent=2,
                )
            )
            return
        for key, value in summary_rows(m, opened.root, opened.is_pack, checksums):
            click.echo(f"{key:<12}{value}")
        if record is not None:
            click.echo(
                f"{'runs here':<12}"
                + ("yes" if runs_here else f'no: install it with pip install "bitdeploy[{record.runtime_extra}]"')
            )
    finally:
        opened.cleanup()


def engine_text(engine: dict[str, Any], details: Any) -> str:
    """A TensorRT bundle's engine: pending (built on the device by `bitdeploy engine`) or where it was built."""
    if engine.get("status") == "pending":
        return "pending: build it on the device with `bitdeploy engine BUNDLE` (TensorRT and an NVIDIA GPU)"
    test = engine.get("self_test") or {}
    checked = f"; self-test {'passed' if test.get('passed') else 'FAILED'} there" if test else ""
    return (
        f"built {engine.get('where') or ''} with TensorRT {details.get('tensorrt_version')} on "
        f"{details.get('gpu_name')} (sm {details.get('compute_capability')}){checked}"
    )


def summary_rows(m: Manifest, root: Path, is_pack: bool, checksums: str) -> list[tuple[str, str]]:
    """The human-readable manifest summary, as (field, text) rows."""
    from bitdeploy.runtimes.bundle.manifest import FORMAT, Provenance

    model, target, spec, labels = m.model, m.target, m.input, m.labels
    rows = [("format", f"{FORMAT} v{m.to_dict()['format_version']}" + (" (single-file pack)" if is_pack else ""))]
    status = "valid" if m.valid else f"INVALID: {m.invalid_reason or 'did not pass validation'}"
    if m.target.engine_pending and m.accuracy is not None and m.accuracy.passed:
        status = "ready for the device: engine pending (gated here; run `bitdeploy engine BUNDLE` on the device)"
    rows.append(("status", status))
    params = f", {model.params / 1e6:.2f}M params" if model.params is not None else ""
    rows.append(("model", f"{model.name}, {model.num_classes} classes{params}, {model.resolution} px"))
    weights = model.weights
    if weights:
        rows.append(
            (
                "weights",
                f"{weights.kind} {weights.source or ''} {(weights.sha256 or '')[:16]}".rstrip(),
            )
        )
    used = f" (runs {target.precision_used})" if target.precision_used else ""
    extras = {
        k: v for k, v in target.to_dict().items() if k not in ("backend", "precision", "device", "precision_used")
    }
    rows.append(
        (
            "target",
            f"{target.backend} {target.precision} on {target.device}{used}"
            + (f" {json.dumps(extras)}" if extras else ""),
        )
    )
    engine = target.get("engine")
    if isinstance(engine, dict):
        rows.append(("engine", engine_text(engine, target.details)))
    size = sum((root / n).stat().st_size for n in m.files if (root / n).is_file())
    rows.append(("model file", f"{m.model_file} ({size / 1e6:.2f} MB in {len(m.files)} file(s))"))
    shape = None if spec.shape is None else [-1 if d is None else d for d in spec.shape]
    resize = None if spec.resize is None else list(spec.resize)
    rows.append(
        (
            "input",
            f"{spec.name} {spec.dtype} {shape} {spec.layout} {spec.color}, "
            f"resize {resize} {spec.interpolation}, mean {list(spec.mean)} std {list(spec.std)}",
        )
    )
    rows.append(("output", f"{m.output.name} ({m.output.kind})"))
    shown = ", ".join(str(x) for x in labels[:10]) + (f", ... ({len(labels)} in all)" if len(labels) > 10 else "")
    rows.append(("labels", shown or "(none)"))
    acc = m.accuracy
    if acc:

        def pct(x: Any) -> str:
            return f"{x * 100:.2f}%" if isinstance(x, (int, float)) else "?"

        from bitdeploy.benchmarks.report import interval

        gate = "passed" if acc.passed else "FAILED"
        drop = f", drop {acc.top1_drop_pp:+.2f} pp" if acc.top1_drop_pp is not None else ""
        drop += interval(acc.top1_drop_ci_pp, signed=True) if drop else ""
        level = f" ({acc.confidence * 100:g}% intervals)" if acc.confidence is not None else ""
        rows.append(
            (
                "accuracy",
                f"top-1 {pct(acc.top1)}{interval(acc.top1_ci, 100)} vs reference {pct(acc.reference_top1)}"
                f"{interval(acc.reference_top1_ci, 100)}{drop}, agreement {pct(acc.agreement)}"
                f"{interval(acc.agreement_ci, 100)}{level}, {acc.samples} samples, max |dlogit| "
                f"{acc.max_abs_logit_diff}, gate {gate}",
            )
        )
        if acc.is_accuracy:
            pairs = (
                f"; discordant images: {acc.discordant[0]} right in FP32 only, {acc.discordant[1]} in this bundle only"
                if acc.discordant is not None
                else ""
            )
            rows.append(
                ("gate", f"{acc.spec().describe()} vs FP32: {gate}{pairs}" + (f"; {acc.noise}" if acc.noise else ""))
            )
    else:
        rows.append(("accuracy", "not measured"))
    if m.export is not None:
        rows.append(("export", ", ".join(f"{k} {v}" for k, v in m.export.to_dict().items())))
    if m.calibration is not None:
        cal = m.calibration.to_dict().items()
        rows.append(("calibration", ", ".join(f"{k} {v}" for k, v in cal if k != "sha256")))
    if m.int8_mix is not None:
        from bitdeploy.runtimes.bundle.mix_text import inspect_rows

        rows.extend(inspect_rows(m.int8_mix))
    prov = m.provenance or Provenance()
    versions = ", ".join(f"{k} {v}" for k, v in prov.versions.items())
    rows.append(
        (
            "provenance",
            f"bitdeploy {prov.bitdeploy or None}, created {prov.created or None}"
            + (f"; {versions}" if versions else ""),
        )
    )
    rows.extend(device_rows(m))
    rows.append(("checksums", checksums if checksums != "ok" else f"ok ({len(m.files)} file(s) verified)"))
    return rows


def device_rows(m: Manifest) -> list[tuple[str, str]]:
    """Where the bundle was validated, this machine's class, and the self-test it carries."""
    from bitdeploy.runtimes.bundle.fingerprint import device_class, host_fingerprint, summary

    validated_on, here = m.validated_on, host_fingerprint()
    same = (
        "same class"
        if validated_on and device_class(validated_on) == device_class(here)
        else "another class: run `bitdeploy verify` here"
    )
    rows = [
        ("validated on", summary(validated_on)),
        ("this device", f"{summary(here)} ({same})" if validated_on else summary(here)),
    ]
    st = m.self_test
    if st:
        rows.append(
            (
                "self-test",
                f"{st.images} golden inputs ({st.stored_as}); pass: agreement >= {st.min_agreement * 100:.1f}%, "
                f"relative logit error <= {st.max_rel_error:.3g}; run `bitdeploy verify`",
            )
        )
    else:
        rows.append(("self-test", "none (built before bitdeploy 0.2)"))
    return rows


# -- pack -------------------------------------------------------------------------------------------------------------
@click.command("pack")
@BUNDLE_ARG
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--gzip/--no-gzip", "compress", default=None, help="Compress the pack (default: only when OUT ends in .gz or .tgz)."
)
def pack(bundle: Path, out: Path, compress: bool | None) -> None:
    """Write BUNDLE as the single file OUT (a tar; `predict`, `inspect`, `serve` and `load()` accept it).

    The bundle is verified first; a modified or invalid bundle is refused. Loading a pack unpacks it into
    a private temporary directory (removed on close), refusing unsafe members and checking every checksum.

    \b
    Example:
      bitdeploy pack runs/digits digits.bitpack && bitdeploy predict digits.bitpack img.png
    """
    from bitdeploy.core.resources import guarded
    from bitdeploy.runtimes.bundle import sha256_file
    from bitdeploy.runtimes.bundle.pack import pack as write_pack

    with guarded(out.absolute().parent, "write OUT", "pack"):
        path = write_pack(bundle, out, compress=compress)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, sha256 {sha256_file(path)[:16]})")


# -- serve ------------------------------------------------------------------------------------------------------------
@click.command("serve")
@BUNDLE_ARG
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (no authentication: keep it on loopback or behind a proxy).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port (0 picks a free one and prints it).",
)
@click.option(
    "--grpc-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Also serve the v2 gRPC service on this port (0: a free one); needs the grpc extra.",
)
@click.option(
    "--self-test",
    is_flag=True,
    help="Run the bundle's golden-set self-test on this device before listening; exit 1 if it fails (see `bitdeploy verify`).",
)
@groups.option(groups.NO_VERIFY)
@groups.takes(groups_run.SERVING, groups_run.RUNTIME)
def serve(
    bundle: Path,
    host: str,
    port: int,
    grpc_port: int | None,
    self_test: bool,
    no_verify: bool,
    serving: ServeOptions,
    runtime: RuntimeArgs,
) -> None:
    """Serve BUNDLE with the Open Inference Protocol (KServe v2) over HTTP, plus POST /v1/predict and GET /healthz.

    Needs the serve extra: pip install "bitdeploy[serve]". Triton's client (tritonclient.http) works
    against it; docs/serving.md describes the routes, batching and GET /metrics. SIGTERM drains the requests in
    flight, then exits 0.

    \b
    Example:
      bitdeploy serve runs/digits --port 8000 &
      curl localhost:8000/v2/models/tiny
      curl --data-binary @img.png 'http://127.0.0.1:8000/v1/predict?top_k=3'
    """
    from bitdeploy.core.errors import require

    require("starlette", "serve", "the HTTP server for `bitdeploy serve` (starlette)")  # before the slow model load
    if grpc_port is not None:
        require("grpc", "grpc", "gRPC for `bitdeploy serve --grpc-port` (grpcio)")
    from bitdeploy.runtimes import load
    from bitdeploy.runtimes.serving.serve import HTTPServer

    with load(
        bundle,
        backend=runtime.backend,
        device=runtime.device,
        threads=runtime.threads,
        verify=not no_verify,
        self_test=self_test,
    ) as model:
        if model.last_self_test is not None:  # readiness waits for it: nothing listens until it has passed
            click.echo(f"self-test {model.last_self_test.line()}", err=True)
        server = HTTPServer(model, host, port, serving)
        grpc_note = ""
        if grpc_port is not None:
            from bitdeploy.runtimes.serving.serve_grpc import GrpcServer

            grpc_server = GrpcServer(server.service, host, grpc_port)
            grpc_note = f", gRPC on {host}:{grpc_server.port}"
        if host not in ("127.0.0.1", "localhost", "::1"):
            click.echo(
                f"warning: listening on {host} without authentication; anyone who can reach it can use the model",
                err=True,
            )
        info = model.describe()
        name = server.service.model.name
        click.echo(
            f"serving {name} ({info.get('backend')} on {info.get('device')}, batches of up to {server.service.batcher.max_batch}, "
            f"{serving.workers} preprocessing worker(s)) at {server.url}  POST /v2/models/{name}/infer, /v1/predict; GET /metrics{grpc_note}; Ctrl-C stops"
        )
        sys.stdout.flush()
        server.serve()
        click.echo(f"stopped after {server.service.answered} request(s)")

"""Serving memory of one bundle: the peak resident memory of a fresh runtime process that loads it and answers
batch-1 queries.

`bench` keeps every bundle open in one process for its interleaved rounds, so its in-process `peak_rss_mb` is the
process's, not the bundle's. What a device must hold for one bundle is measured here instead, in a child
interpreter that does nothing else:

    python -m bitdeploy.benchmarks.memory BUNDLE [--queries N] [--threads T] [--backend B] [--device D]

It imports numpy and the runtime, records VmRSS (`idle_rss_mb`), loads the bundle with `bitdeploy.runtimes.load`
(which imports the engine's SDK), serves N batch-1 queries of random inputs of the bundle's input shape, and prints
one JSON line whose `peak_rss_mb` is the kernel's high-water mark (VmHWM) over all of it. Without /proc (macOS,
Windows) it is `ru_maxrss`. The parent side is `serving_memory()`. Torch-free: this module imports only the
standard library at module level, and the child only numpy and `bitdeploy.runtimes`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitdeploy.core.errors import BitdeployError, first_line

if TYPE_CHECKING:
    from bitdeploy.runtimes.bundle.manifest import Manifest

DEFAULT_QUERIES = 20
METHOD = "fresh process: VmHWM over import, load and N batch-1 queries"
METHOD_RUSAGE = "fresh process: ru_maxrss over import, load and N batch-1 queries (no /proc)"


def _status_mb(key: str) -> float | None:
    """A `/proc/self/status` memory line (VmRSS, VmHWM) in MB (MiB, as the rest of bench), or None without /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def _maxrss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB elsewhere


def reset_peak_rss() -> str:
    """Reset this process's peak-RSS counter (Linux clear_refs 5) so each bench entry gets its own peak; says
    which figure `peak_rss_mb` will then be."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM after clear_refs (per entry)"
    except OSError:
        return "ru_maxrss (process peak so far)"


def rss_mb() -> float | None:
    """This process's resident memory now, in MB, or None without /proc."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MB: VmHWM (since `reset_peak_rss`), else ru_maxrss."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else _maxrss_mb()


def input_chw(manifest: Manifest) -> tuple[int, int, int]:
    """(channels, height, width) of one input: the manifest's fixed dimensions, else 3 and the model resolution."""
    res = manifest.model.resolution or 0
    shape = manifest.input.shape
    dims = list(shape[1:4]) if shape is not None and len(shape) == 4 else [3, res, res]
    c, h, w = (int(d) if d is not None and d > 0 else f for d, f in zip(dims, (3, res, res)))
    return c, h, w


def measure_here(
    bundle: str,
    queries: int = DEFAULT_QUERIES,
    threads: int | None = None,
    backend: str | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """The child's measurement, in this process: meaningful only in a fresh interpreter (the `__main__` below)."""
    import numpy as np

    import bitdeploy.runtimes
    import bitdeploy.runtimes.predictor  # the runtime's own code counts as idle; the engine's SDK (imported by load) not

    idle = _status_mb("VmRSS")
    if idle is None:
        idle = _maxrss_mb()
    t0 = time.perf_counter()
    pred = bitdeploy.runtimes.load(bundle, backend=backend, device=device, threads=threads)
    load_s = time.perf_counter() - t0
    with pred:
        c, h, w = input_chw(pred.manifest)
        if min(c, h, w) <= 0:
            raise BitdeployError(f"{bundle}: the manifest gives no input size; rebuild the bundle")
        dtype = np.dtype(pred.manifest.input.dtype or "float32")
        rng = np.random.default_rng(0)
        for _ in range(queries):  # a fresh input per query, as a server receives them (no pool held)
            x = rng.uniform(-1.0, 1.0, size=(1, c, h, w)).astype(dtype)
            pred.infer_padded(x)
        name = pred.backend_name
    peak = _status_mb("VmHWM")
    method = METHOD
    if peak is None:
        peak, method = _maxrss_mb(), METHOD_RUSAGE
    return {
        "peak_rss_mb": peak,
        "idle_rss_mb": idle,
        "load_s": load_s,
        "queries": queries,
        "backend": name,
        "threads": threads,
        "method": method,
    }


def _command(
    bundle: str | Path, queries: int, threads: int | None, backend: str | None, device: str | None
) -> list[str]:
    cmd = [sys.executable, "-m", "bitdeploy.benchmarks.memory", os.fspath(bundle), "--queries", str(queries)]
    for flag, value in (("--threads", threads), ("--backend", backend), ("--device", device)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def serving_memory(
    bundle: str | Path,
    *,
    threads: int | None = None,
    queries: int = DEFAULT_QUERIES,
    backend: str | None = None,
    device: str | None = None,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Peak resident memory of a fresh runtime process serving `bundle` at batch 1 (the child's JSON).

    Returns {"peak_rss_mb", "idle_rss_mb", "load_s", "queries", "backend", "threads", "method"}. Raises a one-line
    BitdeployError (the child's last stderr line) when the child fails, dies or runs past `timeout_s`.
    """
    if queries < 1:
        raise BitdeployError(f"serving memory needs at least one query (got {queries})")
    try:
        proc = subprocess.run(
            _command(bundle, queries, threads, backend, device), capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        raise BitdeployError(
            f"{bundle}: the serving-memory process did not finish within {timeout_s:g} s; pass a longer timeout"
        ) from None
    except OSError as exc:
        raise BitdeployError(f"{bundle}: cannot start the serving-memory process ({first_line(exc)})") from exc
    if proc.returncode == 0:
        lines = proc.stdout.strip().splitlines()
        try:
            result = json.loads(lines[-1]) if lines else None
        except ValueError:
            result = None
        if isinstance(result, dict) and isinstance(result.get("peak_rss_mb"), (int, float)):
            return result
        raise BitdeployError(f"{bundle}: the serving-memory process printed no result (stdout: {proc.stdout[-200:]!r})")
    err = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
    if err:
        raise BitdeployError(err[-1].removeprefix("error: ")[:500])
    if proc.returncode < 0:
        raise BitdeployError(
            f"{bundle}: the serving-memory process was killed by signal {-proc.returncode} (out of memory?)"
        )
    raise BitdeployError(f"{bundle}: the serving-memory process exited with status {proc.returncode}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m bitdeploy.benchmarks.memory",
        description="Peak RSS of this fresh process loading BUNDLE and serving batch-1 queries; one JSON line.",
    )
    parser.add_argument("bundle")
    parser.add_argument("--queries", type=int, default=DEFAULT_QUERIES)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--backend")
    parser.add_argument("--device")
    args = parser.parse_args(argv)
    try:
        result = measure_here(args.bundle, max(1, args.queries), args.threads, args.backend, args.device)
    except BitdeployError as exc:
        print(f"error: {first_line(exc, 500)}", file=sys.stderr)
        return 1
    except Exception as exc:  # an SDK's own error type: one line, the parent quotes it
        print(f"error: {args.bundle}: {type(exc).__name__}: {first_line(exc, 400)}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

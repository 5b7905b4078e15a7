"""Load test for `bitdeploy serve` through Triton's client on the v2 route, against `bitdeploy bench` of the same bundle.

    python benchmarks/experiments/serve_load.py BUNDLE [--clients 8] [--requests 1000] [--single 200] [--malformed 50]
                                              [--input tensor|image] [--threads N] [--max-batch 8] [--max-delay-ms 5]
                                              [--rounds 1] [--bench-iterations 400] [--no-bench]

Starts `bitdeploy serve BUNDLE --port 0` on 127.0.0.1 in a subprocess, then per round
  1. runs `bitdeploy bench BUNDLE --batch-sizes 8` (same --threads) for the offline batch-8 throughput and
     the single-stream p50 of the engine alone (the server is idle meanwhile);
  2. sends `--single` requests from one client, in blocks of 10 alternating with the same work done by the
     engine in this process (`infer`, or `predict` for image files): the lone client's p50 and its paired gap;
  3. sends `--requests` inferences from `--clients` threads, each with its own `tritonclient.http` client,
     to POST /v2/models/NAME/infer (FP32 `input` as binary data, or encoded images as BYTES `image`) and checks
     every answer's shape.
Then `--malformed` bad requests (garbage JSON, wrong shapes and types, bad binary sizes, oversized bodies,
unknown models and routes, broken request lines, hang-ups) must each get their 4xx (or a closed connection
for a hang-up); another round of valid requests and GET /metrics must show the server survived and counted.
Prints throughput / offline batch-8 throughput and single-client p50 - single-stream p50 per round (their
medians when --rounds > 1, as the rounds interleave with the bench runs); exits 1 on any error.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1e3 if self.latencies else float("nan")

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall_s if self.wall_s else 0.0


def sample_images(n: int = 16, seed: int = 0) -> list[bytes]:
    """Encoded images of several sizes, modes and formats."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(8, 400)), int(rng.integers(8, 400))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        if i % 4 == 1:
            img = img.convert("L")
        buf = io.BytesIO()
        img.save(buf, "JPEG" if i % 2 else "PNG")
        out.append(buf.getvalue())
    return out


def start_server(
    bundle: str, *args: str, threads: int | None = None, timeout: float = 120.0
) -> tuple[subprocess.Popen[str], str]:
    """Run `bitdeploy serve BUNDLE --port 0 ARGS...` on loopback; return the process and its base URL."""
    cmd = [sys.executable, "-m", "bitdeploy", "serve", bundle, "--host", "127.0.0.1", "--port", "0", *args]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    found: list[str] = []

    def read_banner() -> None:
        assert proc.stdout is not None
        found.append(proc.stdout.readline())

    reader = threading.Thread(target=read_banner, daemon=True)
    reader.start()
    reader.join(timeout)
    line = found[0] if found else ""
    if " at http://" not in line:
        proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
        raise RuntimeError(f"bitdeploy serve did not start: {line.strip() or err.strip()[-500:]}")
    return proc, line.split(" at ", 1)[1].split()[0]


def stop_server(proc: subprocess.Popen[str], timeout: float = 30.0) -> tuple[int, str]:
    """SIGTERM (the server drains and exits 0); return the exit status and stderr."""
    proc.terminate()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, err + out


def http_get(url: str, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port or 80, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def model_metadata(url: str) -> dict[str, Any]:
    status, body = http_get(url, "/healthz")
    if status != 200:
        raise RuntimeError(f"/healthz answered HTTP {status}")
    name = json.loads(body)["model"]
    status, body = http_get(url, f"/v2/models/{name}")
    meta: dict[str, Any] = json.loads(body)
    return meta


def metrics(url: str) -> dict[str, float]:
    """GET /metrics parsed with prometheus-client's parser: {"name{label=value,...}": value}."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = http_get(url, "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered HTTP {status}")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def counted(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = [f"{k}={v}" for k, v in labels.items()]
    return sum(v for k, v in samples.items() if k.split("{")[0] == name and all(w in k for w in want))


class Inputs:
    """What each request sends: one preprocessed FP32 image (binary data) or one encoded image (BYTES)."""

    def __init__(self, meta: dict[str, Any], kind: str, n: int = 16, seed: int = 0) -> None:
        self.kind = kind
        self.model = meta["name"]
        self.classes = meta["outputs"][0]["shape"][1]
        shape = meta["inputs"][0]["shape"][1:]
        rng = np.random.default_rng(seed)
        self.tensors = [rng.uniform(-1, 1, (1, *shape)).astype(np.float32) for _ in range(n)]
        self.images = sample_images(n, seed)

    def request(self, i: int) -> Any:
        import tritonclient.http as th

        if self.kind == "image":
            data = np.array([self.images[i % len(self.images)]], dtype=object)
            inp = th.InferInput("image", [1], "BYTES")
        else:
            data = self.tensors[i % len(self.tensors)]
            inp = th.InferInput("input", list(data.shape), "FP32")
        inp.set_data_from_numpy(data, binary_data=True)
        return inp


def run_load(url: str, inputs: Inputs, clients: int = 8, requests: int = 1000, timeout: float = 120.0) -> LoadResult:
    """`requests` v2 inferences from `clients` threads, each with its own tritonclient.http client (keep-alive)."""
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    result = LoadResult()
    lock = threading.Lock()
    share = [requests // clients + (1 if c < requests % clients else 0) for c in range(clients)]
    start = threading.Barrier(clients + 1)
    host = urlsplit(url).netloc

    def client(c: int) -> None:
        lat, errs = [], []
        cli = th.InferenceServerClient(host, connection_timeout=timeout, network_timeout=timeout)
        out = [th.InferRequestedOutput("logits", binary_data=True)]
        start.wait()
        for i in range(share[c]):
            t0 = time.perf_counter()
            try:
                res = cli.infer(inputs.model, [inputs.request(c * 7 + i)], outputs=out)
                logits = res.as_numpy("logits")
                dt = time.perf_counter() - t0
                if logits is None or logits.shape != (1, inputs.classes):
                    errs.append(f"client {c} request {i}: logits of shape {None if logits is None else logits.shape}")
                    continue
                lat.append(dt)
            except (InferenceServerException, OSError) as exc:
                errs.append(f"client {c} request {i}: {type(exc).__name__}: {exc}")
        cli.close()
        with lock:
            result.latencies.extend(lat)
            result.errors.extend(errs)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    result.wall_s = time.perf_counter() - t0
    return result


def paired_single(url: str, inputs: Inputs, model: Any, n: int, block: int = 10) -> tuple[LoadResult, list[float]]:
    """One client's requests, alternating in blocks with the same work done in this process by `model` alone
    (`infer` for tensors, `predict` for image files), so both see the same background load."""
    import tritonclient.http as th

    client_result, engine = LoadResult(), []
    cli = th.InferenceServerClient(urlsplit(url).netloc, connection_timeout=120, network_timeout=120)
    out = [th.InferRequestedOutput("logits", binary_data=True)]
    for start in range(0, n, block):
        for i in range(start, min(n, start + block)):
            t0 = time.perf_counter()
            if inputs.kind == "image":
                model.predict(inputs.images[i % len(inputs.images)])
            else:
                model.infer(inputs.tensors[i % len(inputs.tensors)])
            engine.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(start, min(n, start + block)):
            t1 = time.perf_counter()
            try:
                cli.infer(inputs.model, [inputs.request(i)], outputs=out).as_numpy("logits")
                client_result.latencies.append(time.perf_counter() - t1)
            except Exception as exc:
                client_result.errors.append(f"single client request {i}: {type(exc).__name__}: {exc}")
        client_result.wall_s += time.perf_counter() - t0
    cli.close()
    return client_result, engine


# -- malformed requests --------------------------------------------------------------------------------------
def _raw(url: str, payload: bytes, timeout: float, hang_up: bool = False, half_close: bool = False) -> int | None:
    """Send raw bytes; the HTTP status of the answer, -1 for a closed connection, None when we hang up first.

    `half_close` ends our side after sending (a client that stops mid-body); the server treats that as a
    disconnect, so there may be no answer. Otherwise the request says `Connection: close` and we read to the end.
    """
    u = urlsplit(url)
    data = b""
    with socket.create_connection((u.hostname, u.port or 80), timeout=timeout) as s:
        try:
            s.sendall(payload)
            if hang_up:
                return None
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:  # the server may answer and close before taking the whole request
            pass
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            if not data:
                raise
    parts = data.split(b" ", 2)
    return int(parts[1]) if data.startswith(b"HTTP/") and len(parts) > 1 else -1


def malformed_cases(max_body: int, model: str = "tiny", res: int = 32) -> list[tuple[str, bytes, set[int | None]]]:
    """(name, raw request bytes, accepted statuses; None = we hang up, -1 = the server closes without an answer)."""

    def post(body: bytes, path: str = f"/v2/models/{model}/infer", length: int | None = None, extra: str = "") -> bytes:
        n = len(body) if length is None else length
        return (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n{extra}Connection: close\r\n\r\n".encode()
            + body
        )

    def infer(msg: dict[str, Any], binary: bytes = b"", header: int | None = None) -> bytes:
        head = json.dumps(msg).encode()
        extra = (
            f"Inference-Header-Content-Length: {len(head) if header is None else header}\r\n"
            if binary or header is not None
            else ""
        )
        return post(head + binary, extra=extra)

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    good = {"name": "input", "datatype": "FP32", "shape": [1, 3, res, res]}
    blob = np.zeros((1, 3, res, res), "<f4").tobytes()
    return [
        ("garbage JSON", post(b"{not json"), {400}),
        ("JSON array", post(b"[1, 2]"), {400}),
        ("no inputs", infer({"outputs": []}), {400}),
        ("two inputs", infer({"inputs": [good, good]}), {400}),
        ("unknown input", infer({"inputs": [{**good, "name": "pixels", "data": [0]}]}), {400}),
        ("wrong datatype", infer({"inputs": [{**good, "datatype": "INT64", "data": [0]}]}), {400}),
        ("wrong shape", infer({"inputs": [{**good, "shape": [1, 3, res, res + 1], "data": [0]}]}), {400}),
        ("too few numbers", infer({"inputs": [{**good, "data": [0.5] * 7}]}), {400}),
        ("strings as numbers", infer({"inputs": [{**good, "data": ["a"] * (3 * res * res)}]}), {400}),
        (
            "binary size mismatch",
            infer({"inputs": [{**good, "parameters": {"binary_data_size": len(blob) + 4}}]}, blob),
            {400},
        ),
        ("short binary data", infer({"inputs": [{**good, "parameters": {"binary_data_size": 8}}]}, blob[:8]), {400}),
        ("header length past the body", infer({"inputs": [good]}, blob, header=10**6), {400}),
        (
            "undecodable image",
            infer({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not an image"]}]}),
            {400},
        ),
        (
            "truncated BYTES element",
            infer(
                {
                    "inputs": [
                        {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 9}}
                    ]
                },
                b"\xff\x00\x00\x00abcde",
            ),
            {400},
        ),
        (
            "unknown output",
            infer({"inputs": [{**good, "data": [0.0] * (3 * res * res)}], "outputs": [{"name": "probs"}]}),
            {400},
        ),
        (
            "bad classification",
            infer(
                {
                    "inputs": [{**good, "data": [0.0] * (3 * res * res)}],
                    "outputs": [{"name": "logits", "parameters": {"classification": "x"}}],
                }
            ),
            {400},
        ),
        ("unknown model", post(b"{}", "/v2/models/no-such-model/infer"), {404}),
        ("unknown version", post(b"{}", f"/v2/models/{model}/versions/7/infer"), {404}),
        ("oversized body", post(b"x" * 1024, length=max_body + 1), {413}),
        (
            "no Content-Length",
            f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
            {411},
        ),
        ("GET infer", f"GET /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(), {405}),
        ("wrong route", post(b"{}", "/v3/whatever"), {404}),
        ("v1 garbage image", post(os.urandom(3000), "/v1/predict"), {400}),
        ("v1 empty body", post(b"", "/v1/predict"), {400}),
        ("v1 top_k=abc", post(png, "/v1/predict?top_k=abc"), {400}),
        ("negative length", post(b"", length=-5), {400}),
        ("garbage request line", b"\x16\x03\x01 not http at all\r\n\r\n", {400}),
        ("body shorter than length", post(png[:100], "/v1/predict", length=len(png)), {400, -1}),
        ("hang up mid-body", post(png[:100], "/v1/predict", length=len(png)), {None}),
    ]


def run_malformed(
    url: str, count: int, max_body: int, model: str = "tiny", res: int = 32, timeout: float = 30.0
) -> tuple[int, list[str]]:
    cases = malformed_cases(max_body, model, res)
    errors = []
    for i in range(count):
        name, payload, expect = cases[i % len(cases)]
        try:
            status = _raw(url, payload, timeout, hang_up=None in expect, half_close=-1 in expect)
        except OSError as exc:
            if 413 in expect and isinstance(exc, (ConnectionResetError, BrokenPipeError)):
                continue  # the server may close before reading an oversized body: that is a refusal too
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        if status not in expect:
            errors.append(f"{name}: expected HTTP {'/'.join(map(str, sorted(expect, key=str)))}, got {status}")
    return count, errors


def healthz(url: str, timeout: float = 10.0) -> dict[str, Any]:
    status, body = http_get(url, "/healthz", timeout)
    if status != 200:
        raise RuntimeError(f"/healthz answered HTTP {status}")
    info: dict[str, Any] = json.loads(body)
    return info


# -- the engine alone ------------------------------------------------------------------------------------------
def bench_offline(bundle: str, threads: int | None, iterations: int) -> tuple[float, float]:
    """`bitdeploy bench BUNDLE --batch-sizes 8`: (offline batch-8 images/s, single-stream p50 ms)."""
    cmd = [
        sys.executable,
        "-m",
        "bitdeploy",
        "bench",
        bundle,
        "--batch-sizes",
        "8",
        "--iterations",
        str(iterations),
        "--no-e2e",
        "--no-raw",
        "--no-progress",
        "--json",
        "-",
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"bitdeploy bench failed: {proc.stderr.strip()[-500:]}")
    row = json.loads(proc.stdout)["results"][0]
    b8 = next(r for r in row["offline"]["results"] if r["batch_size"] == 8)
    return float(b8["images_per_s"]), float(row["single_stream"]["p50_ms"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python benchmarks/experiments/serve_load.py", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("bundle")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--single", type=int, default=200, help="requests from one client, for its p50")
    ap.add_argument("--malformed", type=int, default=50)
    ap.add_argument(
        "--input",
        choices=["tensor", "image"],
        default="tensor",
        help="FP32 `input` (binary) or encoded images as BYTES `image`",
    )
    ap.add_argument("--threads", type=int, default=None, help="engine threads, for the server and for bench")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-delay-ms", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=1, help="bench / load / single-client rounds, interleaved")
    ap.add_argument("--bench-iterations", type=int, default=400, help="images per `bitdeploy bench` measurement")
    ap.add_argument("--no-bench", action="store_true", help="skip the `bitdeploy bench` comparison")
    args = ap.parse_args(argv)
    max_body_mb = 1.0
    proc, url = start_server(
        args.bundle,
        "--workers",
        str(args.workers),
        "--max-batch",
        str(args.max_batch),
        "--max-delay-ms",
        str(args.max_delay_ms),
        "--max-body-mb",
        str(max_body_mb),
        threads=args.threads,
    )
    errors: list[str] = []
    ratios, gaps, paired, loads, singles = [], [], [], [], []
    bad: list[str] = []
    after = LoadResult()
    scraped: dict[str, float] = {}
    model = None
    try:
        meta = model_metadata(url)
        inputs = Inputs(meta, args.input)
        res = int(meta["inputs"][0]["shape"][-1])
        print(
            f"server: {url}  model {meta['name']} ({meta['platform']}), --max-batch {args.max_batch} --max-delay-ms {args.max_delay_ms:g} "
            f"--workers {args.workers} --threads {args.threads}; {args.clients} clients x {args.requests} {args.input} requests, "
            f"{args.single} single-client, {args.rounds} round(s); load average {os.getloadavg()[0]:.1f}"
        )
        run_load(url, inputs, args.clients, min(40, args.requests))  # warm-up
        from bitdeploy.runtimes import load as load_bundle

        model = load_bundle(
            args.bundle, threads=args.threads
        )  # the engine alone, for the paired single-client comparison
        for r in range(args.rounds):
            offline, stream_p50 = (
                bench_offline(args.bundle, args.threads, args.bench_iterations)
                if not args.no_bench
                else (float("nan"), float("nan"))
            )
            single, engine = paired_single(url, inputs, model, args.single) if args.single else (LoadResult(), [])
            paired.append(single.percentile(50) - float(np.percentile(engine, 50)) * 1e3 if engine else float("nan"))
            before = metrics(url)
            load = run_load(url, inputs, args.clients, args.requests)
            during = metrics(url)
            per_call = (
                counted(during, "bitdeploy_batch_size_sum") - counted(before, "bitdeploy_batch_size_sum")
            ) / max(1.0, counted(during, "bitdeploy_batch_size_count") - counted(before, "bitdeploy_batch_size_count"))
            errors += load.errors + single.errors
            loads.append(load)
            singles.append(single)
            ratios.append(load.throughput / offline)
            gaps.append(single.percentile(50) - stream_p50)
            print(
                f"round {r + 1}: {load.throughput:.1f} requests/s with {args.clients} clients vs {offline:.1f} images/s offline batch 8 "
                f"(ratio {ratios[-1]:.2f}, {per_call:.1f} images per engine call); single client p50 {single.percentile(50):.2f} ms vs "
                f"single-stream p50 {stream_p50:.2f} ms ({gaps[-1]:+.2f} ms), vs the engine in this process interleaved "
                f"({paired[-1]:+.2f} ms); load average {os.getloadavg()[0]:.1f}"
            )
        _, bad = run_malformed(url, args.malformed, int(max_body_mb * (1 << 20)), meta["name"], res)
        errors += [f"malformed: {e}" for e in bad]
        after = run_load(url, inputs, args.clients, max(args.clients, args.requests // 10))
        errors += [f"after malformed: {e}" for e in after.errors]
        healthz(url)
        scraped = metrics(url)
        alive = proc.poll() is None
    finally:
        code, stderr = stop_server(proc)
        if model is not None:
            model.close()
    load = loads[-1]
    sent = (
        args.requests
        + min(40, args.requests)
        + sum(len(s.latencies) for s in singles)
        + args.requests * (args.rounds - 1)
    )
    served = counted(scraped, "bitdeploy_requests_total", route="/v2/models/{name}/infer", code="200")
    batches = counted(scraped, "bitdeploy_batch_size_count")
    images = counted(scraped, "bitdeploy_batch_size_sum")
    if served < sent:
        errors.append(f"/metrics counts {served:.0f} answered inferences, fewer than the {sent} sent")
    print(f"valid requests:     {len(load.latencies)}/{args.requests} ok, {len(load.errors)} error(s)")
    print(
        f"latency (ms):       p50 {load.percentile(50):.2f}  p90 {load.percentile(90):.2f}  p99 {load.percentile(99):.2f}  max {load.percentile(100):.2f}"
    )
    print(
        f"throughput:         {load.throughput:.1f} requests/s over {load.wall_s:.2f} s; {images / max(batches, 1):.2f} images per engine call over the whole run"
    )
    if not args.no_bench:
        print(
            f"vs offline batch 8: median ratio {float(np.median(ratios)):.2f} over {args.rounds} round(s) (target >= 0.80)"
        )
        print(
            f"single client:      median p50 - single-stream p50 = {float(np.median(gaps)):+.2f} ms (target <= +2 ms)"
        )
    if args.single:
        print(
            f"single client:      median p50 - the engine's p50 in blocks interleaved with it = {float(np.median(paired)):+.2f} ms"
        )
    print(f"malformed requests: {args.malformed} sent, {len(bad)} unexpected answer(s)")
    print(
        f"after malformed:    {len(after.latencies)}/{max(args.clients, args.requests // 10)} ok; server {'up' if alive else 'DOWN'}; "
        f"/metrics counted {served:.0f} inference(s); exit status {code} after SIGTERM"
    )
    for e in errors[:20]:
        print(f"  error: {e}", file=sys.stderr)
    if not alive or code != 0 or "Traceback" in stderr:
        errors.append("server died or did not exit cleanly")
        print(stderr[-2000:], file=sys.stderr)
    print("PASS" if not errors else f"FAIL: {len(errors)} error(s)")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())

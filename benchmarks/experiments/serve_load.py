"""Load test for `bitdeploy serve` through Triton's client on the v2 route, against `bitdeploy bench` of the same bundle.

    python benchmarks/experiments/serve_load.py BUNDLE [--clients 2 x max-batch] [--requests 1000] [--single 200]
                                              [--malformed 50] [--input tensor|image] [--threads N] [--max-batch 8]
                                              [--max-delay-ms 5] [--rounds 1] [--bench-iterations 400] [--no-bench] [--pin]

Starts `bitdeploy serve BUNDLE --port 0` on 127.0.0.1 in a subprocess, then per round
  1. runs `bitdeploy bench BUNDLE --batch-sizes 8` (same --threads) for the offline batch-8 throughput and
     the single-stream p50 of the engine alone (the server is idle meanwhile), and times the same engine in this
     process at batch 8 for its CPU seconds per image (`os.times`);
  2. sends `--single` requests from one client, in blocks of 10 alternating with the same work done by the
     engine in this process (`infer`, or `predict` for image files): the lone client's p50 and its paired gap;
  3. sends `--requests` inferences from `--clients` threads, each with its own `tritonclient.http` client,
     to POST /v2/models/NAME/infer (FP32 `input` as binary data, or encoded images as BYTES `image`) and checks
     every answer's shape. Around it, the server's CPU seconds (/proc/PID/stat) and the clients' (this process).
The load generator shares the machine with the server, so three figures say what the server is responsible for:
its CPU per request against the engine's CPU per image at batch 8 (efficiency), its throughput on the CPU time
the clients left it, and with --pin (the server and the engine-alone runs on the first half of the CPUs, the
clients on the rest) the plain throughput against offline on the same cores. The clients default to twice
--max-batch: with exactly max-batch closed-loop clients the engine idles while each batch's answers travel back.
Then `--malformed` bad requests (garbage JSON, wrong shapes and types, bad binary sizes, oversized bodies,
unknown models and routes, broken request lines, hang-ups) must each get their 4xx (or a closed connection
for a hang-up); another round of valid requests and GET /metrics must show the server survived and counted.
Prints each round, then the medians over the rounds with their min-max; exits 1 on any error.
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
from collections.abc import Callable
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


def pinned_to(cpus: set[int] | None) -> Callable[[], None] | None:
    """A preexec_fn that confines the child to `cpus` (None: no pinning)."""
    return None if cpus is None else lambda: os.sched_setaffinity(0, cpus)


def start_server(
    bundle: str, *args: str, threads: int | None = None, timeout: float = 120.0, cpus: set[int] | None = None
) -> tuple[subprocess.Popen[str], str]:
    """Run `bitdeploy serve BUNDLE --port 0 ARGS...` on loopback (on `cpus` when given); return the process and
    its base URL."""
    cmd = [sys.executable, "-m", "bitdeploy", "serve", bundle, "--host", "127.0.0.1", "--port", "0", *args]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=pinned_to(cpus),
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


SETTLE_S = 0.05  # between blocks: engine threads spin-wait a while after their last call (ONNX Runtime, OpenMP)


def paired_single(url: str, inputs: Inputs, model: Any, n: int, block: int = 10) -> tuple[LoadResult, list[float]]:
    """One client's requests, alternating in blocks with the same work done in this process by `model` alone
    (`infer` for tensors, `predict` for image files), so both see the same background load. Each block starts
    after a short pause, so neither side's engine threads still spin-wait on the cores the other needs."""
    import tritonclient.http as th

    client_result, engine = LoadResult(), []
    cli = th.InferenceServerClient(urlsplit(url).netloc, connection_timeout=120, network_timeout=120)
    out = [th.InferRequestedOutput("logits", binary_data=True)]
    for start in range(0, n, block):
        time.sleep(SETTLE_S)
        for i in range(start, min(n, start + block)):
            t0 = time.perf_counter()
            if inputs.kind == "image":
                model.predict(inputs.images[i % len(inputs.images)])
            else:
                model.infer(inputs.tensors[i % len(inputs.tensors)])
            engine.append(time.perf_counter() - t0)
        time.sleep(SETTLE_S)
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


# -- CPU accounting --------------------------------------------------------------------------------------------
def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid`, all its threads together (/proc/PID/stat, Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        after_name = f.read().rsplit(")", 1)[1].split()  # the name may hold spaces and parentheses
    return (int(after_name[11]) + int(after_name[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15


def own_cpu_s() -> float:
    """User + system CPU seconds of this process (every thread: the clients, or the engine run here)."""
    t = os.times()
    return t.user + t.system


@dataclass
class CpuShare:
    """Where the CPU went during one load run: the server's process, the clients' (this process), the wall."""

    requests: int
    wall_s: float
    cores: int  # the cores the server may use
    server_s: float
    clients_s: float
    clients_apart: bool = False  # the clients ran on other cores (--pin)

    @property
    def server_ms_per_request(self) -> float:
        return 1e3 * self.server_s / max(1, self.requests)

    @property
    def server_share(self) -> float:
        return self.server_s / (self.cores * self.wall_s) if self.wall_s else float("nan")

    @property
    def clients_share(self) -> float:
        return self.clients_s / (self.cores * self.wall_s) if self.wall_s else float("nan")

    def efficiency(self, offline_cpu_ms_per_image: float) -> float:
        """Offline engine CPU per image / server CPU per request: 1.0 means serving costs nothing over the engine."""
        return offline_cpu_ms_per_image / self.server_ms_per_request if self.requests else float("nan")

    def throughput_clients_excluded(self) -> float:
        """Requests per second of the CPU time the clients left to the server (cores x wall - the clients' CPU)."""
        left = self.cores * self.wall_s - (0.0 if self.clients_apart else self.clients_s)
        return self.requests / left * self.cores if left > 0 else float("nan")


def measured_load(
    proc_pid: int, url: str, inputs: Inputs, clients: int, requests: int, cores: int, apart: bool = False
) -> tuple[LoadResult, CpuShare]:
    """run_load with the CPU seconds of the server and of this process's client threads around it."""
    server0, clients0 = process_cpu_s(proc_pid), own_cpu_s()
    load = run_load(url, inputs, clients, requests)
    share = CpuShare(
        len(load.latencies), load.wall_s, cores, process_cpu_s(proc_pid) - server0, own_cpu_s() - clients0, apart
    )
    return load, share


def offline_cpu(model: Any, tensors: list[np.ndarray], batch: int = 8, seconds: float = 3.0) -> tuple[float, float]:
    """(images/s, CPU ms per image) of `model.infer` on batch-`batch` inputs in this process, the server idle."""
    x = np.ascontiguousarray(np.concatenate([tensors[i % len(tensors)] for i in range(batch)]))
    for _ in range(3):
        model.infer(x)
    images, cpu0, t0 = 0, own_cpu_s(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model.infer(x)
        images += batch
    wall, cpu = time.perf_counter() - t0, own_cpu_s() - cpu0
    return images / wall, 1e3 * cpu / images


def split_cores(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(the server's cores, the clients' cores): the first half of this process's CPUs and the rest, or no pinning."""
    if not pin:
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("error: --pin needs at least 2 CPUs (one for the server, one for the clients)")
    half = len(cpus) // 2
    return set(cpus[:half]), set(cpus[half:])


# -- the engine alone ------------------------------------------------------------------------------------------
def bench_offline(
    bundle: str, threads: int | None, iterations: int, cpus: set[int] | None = None
) -> tuple[float, float]:
    """`bitdeploy bench BUNDLE --batch-sizes 8` (on `cpus` when given): (offline batch-8 images/s, single-stream
    p50 ms)."""
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
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, preexec_fn=pinned_to(cpus))
    if proc.returncode != 0:
        raise RuntimeError(f"bitdeploy bench failed: {proc.stderr.strip()[-500:]}")
    row = json.loads(proc.stdout)["results"][0]
    b8 = next(r for r in row["offline"]["results"] if r["batch_size"] == 8)
    return float(b8["images_per_s"]), float(row["single_stream"]["p50_ms"])


@dataclass
class Round:
    load: LoadResult
    cpu: CpuShare
    single: LoadResult
    offline: float  # bench's offline batch-8 images/s
    stream_p50: float  # bench's single-stream p50 ms
    offline_here: float  # images/s of the engine in this process, batch 8
    offline_cpu_ms: float  # its CPU ms per image
    paired_gap: float  # single client p50 - the engine's p50 in blocks interleaved with it, ms
    per_call: float  # images per engine call in the server

    @property
    def ratio(self) -> float:
        return self.load.throughput / self.offline

    @property
    def gap(self) -> float:
        return self.single.percentile(50) - self.stream_p50

    @property
    def efficiency(self) -> float:
        return self.cpu.efficiency(self.offline_cpu_ms)

    @property
    def ratio_clients_excluded(self) -> float:
        return self.cpu.throughput_clients_excluded() / self.offline_here

    def line(self, r: int, clients: int) -> str:
        c = self.cpu
        return (
            f"round {r}: {self.load.throughput:.1f} requests/s with {clients} clients vs {self.offline:.1f} images/s offline "
            f"batch 8 (ratio {self.ratio:.2f}, {self.per_call:.1f} images per engine call); single client p50 "
            f"{self.single.percentile(50):.2f} ms vs single-stream p50 {self.stream_p50:.2f} ms ({self.gap:+.2f} ms), vs the "
            f"engine in this process interleaved ({self.paired_gap:+.2f} ms)\n"
            f"  CPU: server {c.server_ms_per_request:.2f} ms per request ({c.server_share:.0%} of {c.cores} cores), clients "
            f"{1e3 * c.clients_s / max(1, c.requests):.2f} ms per request ({c.clients_share:.0%}); the engine alone "
            f"{self.offline_cpu_ms:.2f} ms CPU per image at batch 8 ({self.offline_here:.1f} images/s) -> server efficiency "
            f"{self.efficiency:.2f}; throughput on the CPU the clients left {c.throughput_clients_excluded():.1f} requests/s "
            f"= {self.ratio_clients_excluded:.2f}x the engine alone; load average {os.getloadavg()[0]:.1f}"
        )


def run_round(
    args: argparse.Namespace, pid: int, url: str, inputs: Inputs, model: Any, cores: tuple[Any, Any, int]
) -> Round:
    server_cpus, client_cpus, ncores = cores
    offline, stream_p50 = (
        bench_offline(args.bundle, args.threads, args.bench_iterations, server_cpus)
        if not args.no_bench
        else (float("nan"), float("nan"))
    )
    if server_cpus is not None:
        os.sched_setaffinity(0, server_cpus)  # this thread only: the engine here runs where the server does
    offline_here, offline_cpu_ms = offline_cpu(model, inputs.tensors, 8)
    single, engine = paired_single(url, inputs, model, args.single) if args.single else (LoadResult(), [])
    paired = single.percentile(50) - float(np.percentile(engine, 50)) * 1e3 if engine else float("nan")
    if client_cpus is not None:
        os.sched_setaffinity(0, client_cpus)  # the client threads start from here and inherit it
    before = metrics(url)
    load, cpu = measured_load(pid, url, inputs, args.clients, args.requests, ncores, client_cpus is not None)
    during = metrics(url)
    images = counted(during, "bitdeploy_batch_size_sum") - counted(before, "bitdeploy_batch_size_sum")
    calls = counted(during, "bitdeploy_batch_size_count") - counted(before, "bitdeploy_batch_size_count")
    return Round(load, cpu, single, offline, stream_p50, offline_here, offline_cpu_ms, paired, images / max(1.0, calls))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python benchmarks/experiments/serve_load.py", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("bundle")
    ap.add_argument(
        "--clients",
        type=int,
        default=None,
        help="concurrent clients [default: 2 x --max-batch, so a full batch waits while the engine runs the last one]",
    )
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
    ap.add_argument(
        "--pin",
        action="store_true",
        help="server and engine-alone runs on the first half of the CPUs, the clients on the rest (--threads defaults "
        "to the server's share)",
    )
    args = ap.parse_args(argv)
    if args.clients is None:
        args.clients = 2 * args.max_batch
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    return args


def summary(args: argparse.Namespace, rounds: list[Round]) -> list[str]:
    load = rounds[-1].load

    def med(values: list[float]) -> str:
        return (
            f"median {float(np.median(values)):.2f} [{min(values):.2f}-{max(values):.2f}] over {len(values)} round(s)"
        )

    out = [
        f"valid requests:     {len(load.latencies)}/{args.requests} ok, {len(load.errors)} error(s)",
        f"latency (ms):       p50 {load.percentile(50):.2f}  p90 {load.percentile(90):.2f}  p99 {load.percentile(99):.2f}  max {load.percentile(100):.2f}",
        f"server CPU:         {med([r.cpu.server_ms_per_request for r in rounds])} ms per request; clients' share of the "
        f"cores {med([r.cpu.clients_share for r in rounds])}",
        f"server efficiency:  {med([r.efficiency for r in rounds])} (the engine's CPU per image at batch 8 / the server's "
        "CPU per request; target >= 0.90)",
        f"clients excluded:   {med([r.ratio_clients_excluded for r in rounds])} x the engine alone at batch 8 (throughput "
        "on the CPU the clients left; target >= 0.90)",
    ]
    if not args.no_bench:
        out += [
            f"vs offline batch 8: {med([r.ratio for r in rounds])} (the clients {'pinned to other cores' if args.pin else 'on the same cores'}; target >= 0.90)",
            f"single client:      p50 - single-stream p50 {med([r.gap for r in rounds])} ms (target <= +2 ms)",
        ]
    if args.single:
        out.append(
            f"single client:      p50 - the engine's p50 in blocks interleaved with it {med([r.paired_gap for r in rounds])} ms"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server_cpus, client_cpus = split_cores(args.pin)
    if server_cpus is not None and args.threads is None:
        args.threads = len(server_cpus)
    ncores = len(server_cpus) if server_cpus is not None else len(os.sched_getaffinity(0))
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
        cpus=server_cpus,
    )
    errors: list[str] = []
    rounds: list[Round] = []
    bad: list[str] = []
    after = LoadResult()
    scraped: dict[str, float] = {}
    model = None
    try:
        meta = model_metadata(url)
        inputs = Inputs(meta, args.input)
        res = int(meta["inputs"][0]["shape"][-1])
        pinning = (
            f"server on CPUs {sorted(server_cpus)}, clients on {sorted(client_cpus or ())}"
            if server_cpus
            else "unpinned"
        )
        print(
            f"server: {url}  model {meta['name']} ({meta['platform']}), --max-batch {args.max_batch} --max-delay-ms {args.max_delay_ms:g} "
            f"--workers {args.workers} --threads {args.threads}; {args.clients} clients x {args.requests} {args.input} requests, "
            f"{args.single} single-client, {args.rounds} round(s), {pinning}; load average {os.getloadavg()[0]:.1f}"
        )
        main_cpus = os.sched_getaffinity(0)
        if server_cpus is not None:
            os.sched_setaffinity(0, server_cpus)  # the engine's threads here start where the server's run
        from bitdeploy.runtimes import load as load_bundle

        model = load_bundle(args.bundle, threads=args.threads)  # the engine alone, in this process
        model.infer(inputs.tensors[0])
        os.sched_setaffinity(0, client_cpus or main_cpus)
        run_load(url, inputs, args.clients, min(40, args.requests))  # warm-up
        for r in range(args.rounds):
            rounds.append(run_round(args, proc.pid, url, inputs, model, (server_cpus, client_cpus, ncores)))
            errors += rounds[-1].load.errors + rounds[-1].single.errors
            print(rounds[-1].line(r + 1, args.clients))
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
    sent = min(40, args.requests) + sum(len(r.single.latencies) + args.requests for r in rounds)
    served = counted(scraped, "bitdeploy_requests_total", route="/v2/models/{name}/infer", code="200")
    batches = counted(scraped, "bitdeploy_batch_size_count")
    images = counted(scraped, "bitdeploy_batch_size_sum")
    if served < sent:
        errors.append(f"/metrics counts {served:.0f} answered inferences, fewer than the {sent} sent")
    for text in summary(args, rounds):
        print(text)
    load = rounds[-1].load
    print(
        f"throughput:         {load.throughput:.1f} requests/s over {load.wall_s:.2f} s; {images / max(batches, 1):.2f} images per engine call over the whole run"
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

"""Load test for `bitdeploy serve`: concurrent clients, malformed requests, and the server still up after.

    python -m bitdeploy.benchmarks.serve_load BUNDLE [--clients 8] [--requests 1000] [--malformed 50] [--workers 2]

Starts `bitdeploy serve BUNDLE --port 0` on 127.0.0.1 in a subprocess, then
  1. sends `--requests` valid predictions (PNG/JPEG images of several sizes) from `--clients` threads, each on a
     keep-alive connection, and checks every answer (status 200, top-k predictions);
  2. sends `--malformed` bad requests (garbage bodies, empty and oversized bodies, bad top_k, wrong routes and
     methods, missing lengths, broken request lines, clients that hang up mid-body) and checks each status;
  3. checks /healthz and sends another round of valid requests, so the server has to have survived.
Prints errors, p50/p90/p99 request latency and throughput; exits 1 on any error.
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


def start_server(bundle: str, workers: int = 2, threads: int | None = None, max_body_mb: float = 1.0, timeout: float = 60.0) -> tuple[subprocess.Popen[str], str]:
    """Run `bitdeploy serve` on a free loopback port; return the process and its base URL."""
    cmd = [sys.executable, "-m", "bitdeploy", "serve", bundle, "--host", "127.0.0.1", "--port", "0",
           "--workers", str(workers), "--max-body-mb", str(max_body_mb)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    found: list[str] = []

    def read_banner() -> None:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found.append(line)

    reader = threading.Thread(target=read_banner, daemon=True)
    reader.start()
    reader.join(timeout)
    line = found[0] if found else ""
    if " at http://" not in line:
        proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
        raise RuntimeError(f"bitdeploy serve did not start: {line.strip() or err.strip()[-500:]}")
    url = line.split(" at ", 1)[1].split()[0]
    return proc, url


def stop_server(proc: subprocess.Popen[str], timeout: float = 15.0) -> tuple[int, str]:
    proc.terminate()  # SIGTERM: the server shuts down cleanly
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err


def _connect(url: str, timeout: float) -> http.client.HTTPConnection:
    u = urlsplit(url)
    return http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port or 80, timeout=timeout)


def run_load(url: str, images: list[bytes], clients: int = 8, requests: int = 1000, top_k: int = 3, timeout: float = 60.0) -> LoadResult:
    """`requests` valid predictions from `clients` threads, each on a keep-alive connection."""
    result = LoadResult()
    lock = threading.Lock()
    share = [requests // clients + (1 if c < requests % clients else 0) for c in range(clients)]

    def client(c: int) -> None:
        conn = _connect(url, timeout)
        lat, errs = [], []
        for i in range(share[c]):
            body = images[(c * 7 + i) % len(images)]
            t0 = time.perf_counter()
            try:
                conn.request("POST", f"/v1/predict?top_k={top_k}", body=body, headers={"Content-Type": "application/octet-stream"})
                resp = conn.getresponse()
                data = resp.read()
                dt = time.perf_counter() - t0
                if resp.status != 200:
                    errs.append(f"client {c} request {i}: HTTP {resp.status} {data[:200]!r}")
                    continue
                preds = json.loads(data)["predictions"]
                if not (1 <= len(preds) <= top_k) or not all({"label", "probability"} <= set(p) for p in preds):
                    errs.append(f"client {c} request {i}: malformed answer {data[:200]!r}")
                    continue
                lat.append(dt)
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                errs.append(f"client {c} request {i}: {type(exc).__name__}: {exc}")
                conn.close()
                conn = _connect(url, timeout)
        conn.close()
        with lock:
            result.latencies.extend(lat)
            result.errors.extend(errs)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.wall_s = time.perf_counter() - t0
    return result


def _raw(url: str, payload: bytes, timeout: float, hang_up: bool = False) -> int | None:
    """Send raw bytes; return the HTTP status of the answer (None when the client hangs up first)."""
    u = urlsplit(url)
    data = b""
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        try:
            s.sendall(payload)
            if hang_up:
                return None
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


def malformed_cases(max_body: int) -> list[tuple[str, bytes, int | None]]:
    """(name, raw request bytes, expected status; None = the client hangs up mid-request)."""
    def post(body: bytes, path: str = "/v1/predict", length: int | None = None, extra: str = "") -> bytes:
        n = len(body) if length is None else length
        return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n{extra}Connection: close\r\n\r\n".encode() + body

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    png = buf.getvalue()  # small, so that only the oversized case exceeds the body limit
    return [
        ("garbage body", post(os.urandom(3000)), 400),
        ("text body", post(b"hello, this is not an image"), 400),
        ("empty body", post(b""), 400),
        ("truncated PNG", post(png[: len(png) // 2]), 400),
        ("PNG header only", post(b"\x89PNG\r\n\x1a\n"), 400),
        ("top_k=abc", post(png, "/v1/predict?top_k=abc"), 400),
        ("top_k=0", post(png, "/v1/predict?top_k=0"), 400),
        ("oversized body", post(b"x" * 1024, length=max_body + 1), 413),
        ("negative length", post(b"", length=-5), 400),
        ("no Content-Length", b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" + png, 411),
        ("chunked body", b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411),
        ("wrong route", post(png, "/v2/whatever"), 404),
        ("GET predict", b"GET /v1/predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
        ("DELETE", b"DELETE /v1/predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
        ("garbage request line", b"\x16\x03\x01 not http at all\r\n\r\n", 400),
        ("body shorter than length", post(png[:100], length=len(png)), 400),
        ("hang up mid-body", post(png[:100], length=len(png)), None),
    ]


def run_malformed(url: str, count: int, max_body: int, timeout: float = 30.0) -> tuple[int, list[str]]:
    cases = malformed_cases(max_body)
    errors = []
    for i in range(count):
        name, payload, expect = cases[i % len(cases)]
        try:
            status = _raw(url, payload, timeout, hang_up=expect is None)
        except OSError as exc:
            if expect == 413 and isinstance(exc, (ConnectionResetError, BrokenPipeError)):
                continue  # the server may close before reading an oversized body: that is a refusal too
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        if status != expect:
            errors.append(f"{name}: expected HTTP {expect}, got {status}")
    return count, errors


def healthz(url: str, timeout: float = 10.0) -> dict[str, Any]:
    conn = _connect(url, timeout)
    try:
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"/healthz answered HTTP {resp.status}")
        info: dict[str, Any] = json.loads(body)
        return info
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bitdeploy.benchmarks.serve_load", description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--malformed", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="engine threads per inference")
    ap.add_argument("--top-k", type=int, default=3)
    args = ap.parse_args(argv)
    max_body_mb = 1.0
    proc, url = start_server(args.bundle, args.workers, args.threads, max_body_mb)
    errors: list[str] = []
    try:
        info = healthz(url)
        images = sample_images()
        print(f"server: {url}  model {info['model']} ({info['backend']}), {args.workers} worker(s); "
              f"{args.clients} clients x {args.requests} requests, then {args.malformed} malformed, then {args.requests // 10} more")
        run_load(url, images, args.clients, min(40, args.requests), args.top_k)  # warm-up
        load = run_load(url, images, args.clients, args.requests, args.top_k)
        errors += load.errors
        _, bad = run_malformed(url, args.malformed, int(max_body_mb * (1 << 20)))
        errors += [f"malformed: {e}" for e in bad]
        after = run_load(url, images, args.clients, max(args.clients, args.requests // 10), args.top_k)
        errors += [f"after malformed: {e}" for e in after.errors]
        healthz(url)
        alive = proc.poll() is None
    finally:
        code, stderr = stop_server(proc)
    ok = len(load.latencies)
    print(f"valid requests:     {ok}/{args.requests} ok, {len(load.errors)} error(s)")
    print(f"latency (ms):       p50 {load.percentile(50):.2f}  p90 {load.percentile(90):.2f}  p99 {load.percentile(99):.2f}  max {load.percentile(100):.2f}")
    print(f"throughput:         {ok / load.wall_s:.1f} requests/s over {load.wall_s:.2f} s")
    print(f"malformed requests: {args.malformed} sent, {len(bad)} unexpected answer(s)")
    print(f"after malformed:    {len(after.latencies)}/{max(args.clients, args.requests // 10)} ok; server {'up' if alive else 'DOWN'}; exit status {code}")
    for e in errors[:20]:
        print(f"  error: {e}", file=sys.stderr)
    if not alive:
        errors.append("server died")
        print(stderr[-2000:], file=sys.stderr)
    print("PASS" if not errors else f"FAIL: {len(errors)} error(s)")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())

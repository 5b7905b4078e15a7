"""`--weights auto`: download from a loopback server, cache, sha256 record, and the offline/corrupt errors."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bitdeploy.core import catalog
from bitdeploy.core.errors import WeightsError
from bitdeploy.training import download

R50 = catalog.get_variant("m-r50x1")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


class _ShortBody(_Quiet):
    """Announces more bytes than it sends: a connection dropped mid-download."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 10)


@contextmanager
def _serve(handler: type) -> Iterator[tuple[str, http.server.ThreadingHTTPServer]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A loopback server over tmp_path/www; an empty cache; BITDEPLOY_WEIGHTS_URL pointing at the server."""
    www = tmp_path / "www"
    www.mkdir()
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "cache"))
    with _serve(functools.partial(_Quiet, directory=str(www))) as (url, _server):
        monkeypatch.setenv(download.URL_ENV, url)
        yield www


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(download.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert download.cache_dir() == tmp_path / "xdg" / "bitdeploy"
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "mine"))
    assert download.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(download.URL_ENV, raising=False)
    assert download.weights_url(R50) == "https://storage.googleapis.com/bit_models/BiT-M-R50x1.npz"


def test_download_records_sha_and_reuses_cache(served: Path) -> None:
    payload = b"official weights stand-in" * 1000
    (served / R50.npz_name).write_bytes(payload)
    path, digest, url = download.fetch_official(R50)
    assert path.read_bytes() == payload and url.endswith("/BiT-M-R50x1.npz")
    assert download.sidecar(path).read_text().split()[0] == digest == download.sha256_file(path)
    assert sorted(p.name for p in path.parent.iterdir()) == [R50.npz_name, R50.npz_name + ".sha256"]
    (served / R50.npz_name).unlink()  # a second load must not touch the network
    assert download.fetch_official(R50)[:2] == (path, digest)


def test_corrupt_cache_is_refused(served: Path) -> None:
    (served / R50.npz_name).write_bytes(b"a" * 5000)
    path, _, _ = download.fetch_official(R50)
    path.write_bytes(b"a" * 4999 + b"b")
    with pytest.raises(WeightsError, match=r"corrupt.*delete") as err:
        download.fetch_official(R50)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_hand_copied_file_is_adopted_then_guarded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(download.URL_ENV, f"http://127.0.0.1:{_closed_port()}/")
    (tmp_path / R50.npz_name).write_bytes(b"copied by hand")
    path, digest, _ = download.fetch_official(R50)
    assert download.sidecar(path).read_text().split()[0] == digest


def test_published_checksum_mismatch(served: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (served / R50.npz_name).write_bytes(b"tampered")
    monkeypatch.setitem(download.KNOWN_SHA256, R50.npz_name, "0" * 64)
    with pytest.raises(WeightsError, match="published sha256"):
        download.fetch_official(R50)
    assert not any(download.cache_dir().iterdir())


def test_http_404_names_url_and_fix(served: Path) -> None:
    with pytest.raises(WeightsError) as err:
        download.fetch_official(R50)
    msg = str(err.value)
    assert (
        "HTTP 404" in msg and download.weights_url(R50) in msg and "--weights PATH" in msg and "--weights none" in msg
    )
    assert "\n" not in msg
    assert list(download.cache_dir().iterdir()) == []  # no partial file left behind


def test_connection_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(download.URL_ENV, f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(WeightsError, match=r"cannot download http://127\.0\.0\.1:\d+/BiT-M-R50x1\.npz.*--weights PATH"):
        download.fetch_official(R50)
    assert list((tmp_path / "cache").iterdir()) == []


def test_interrupted_download_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "cache"))
    with _serve(_ShortBody) as (url, _server):
        monkeypatch.setenv(download.URL_ENV, url)
        with pytest.raises(WeightsError, match="stopped after 10 of 1000 bytes"):
            download.fetch_official(R50)
    assert list((tmp_path / "cache").iterdir()) == []


def test_load_model_auto_end_to_end(served: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`load_model(..., "auto")` downloads an official-format file and loads it (tiny, made public for the test)."""
    torch = pytest.importorskip("torch")
    from bitdeploy.training.weights import load_model, save_npz

    public_tiny = dataclasses.replace(catalog.VARIANTS["tiny"], hidden=False)
    monkeypatch.setitem(catalog.VARIANTS, "tiny", public_tiny)
    torch.manual_seed(0)
    source = load_model("tiny", "none", num_classes=6).model
    save_npz(source, served / public_tiny.npz_name)
    loaded = load_model("tiny", "auto")
    assert loaded.num_classes == 6 and loaded.weights_info["kind"] == "npz"
    assert loaded.weights_info["source"] == download.weights_url(public_tiny)
    assert loaded.weights_info["sha256"] == download.sha256_file(download.cached_path(public_tiny))
    for key, value in source.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key


def test_auto_refuses_test_variant() -> None:
    pytest.importorskip("torch")
    from bitdeploy.training.weights import load_model

    with pytest.raises(WeightsError, match="--weights none"):
        load_model("tiny", "auto")


def _ranged(payload: bytes, etag: str, cut_after: int | None) -> type:
    """A server of `payload` with an ETag and Range/If-Range; its first response stops after `cut_after` bytes."""
    state: dict[str, Any] = {"payload": payload, "etag": etag, "cut": cut_after, "ranges": []}

    class Ranged(_Quiet):
        def do_GET(self) -> None:
            rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
            state["ranges"].append(rng or "")
            start = int(rng.split("=")[1].rstrip("-")) if rng and if_range == state["etag"] else 0
            body = state["payload"][start:]
            self.send_response(206 if start else 200)
            self.send_header("ETag", state["etag"])
            self.send_header("Content-Length", str(len(body)))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(state['payload']) - 1}/{len(state['payload'])}")
            self.end_headers()
            cut, state["cut"] = state["cut"], None
            self.wfile.write(body if cut is None else body[:cut])

    Ranged.state = state  # type: ignore[attr-defined]
    return Ranged


def test_interrupted_download_resumes_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = os.urandom(300_000)
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setitem(download.KNOWN_SHA256, R50.npz_name, hashlib.sha256(payload).hexdigest())
    handler = _ranged(payload, '"v1"', cut_after=100_000)
    with _serve(handler) as (url, _server):
        monkeypatch.setenv(download.URL_ENV, url)
        with pytest.raises(WeightsError, match="stopped after 100000 of 300000 bytes; run again to resume it"):
            download.fetch_official(R50)
        part = tmp_path / "cache" / f".{R50.npz_name}.part"
        assert part.stat().st_size == 100_000 and not download.cached_path(R50).exists()
        path, digest, _ = download.fetch_official(R50)
    assert handler.state["ranges"] == ["", "bytes=100000-"]  # type: ignore[attr-defined]
    assert path.read_bytes() == payload and digest == hashlib.sha256(payload).hexdigest()
    assert sorted(p.name for p in path.parent.iterdir()) == [R50.npz_name, R50.npz_name + ".sha256"]


def test_a_file_changed_on_the_server_starts_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "cache"))
    handler = _ranged(b"old" * 50_000, '"v1"', cut_after=1000)
    with _serve(handler) as (url, _server):
        monkeypatch.setenv(download.URL_ENV, url)
        with pytest.raises(WeightsError, match="run again to resume"):
            download.fetch_official(R50)
        handler.state.update(payload=b"new" * 60_000, etag='"v2"')  # type: ignore[attr-defined]
        path, _, _ = download.fetch_official(R50)
    assert path.read_bytes() == b"new" * 60_000


def test_a_resumed_download_that_fails_its_checksum_starts_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = os.urandom(50_000)
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setitem(download.KNOWN_SHA256, R50.npz_name, hashlib.sha256(payload).hexdigest())
    with _serve(_ranged(payload, '"v1"', cut_after=20_000)) as (url, _server):
        monkeypatch.setenv(download.URL_ENV, url)
        with pytest.raises(WeightsError, match="resume"):
            download.fetch_official(R50)
        part = tmp_path / "cache" / f".{R50.npz_name}.part"
        part.write_bytes(b"\0" * 20_000)  # the kept bytes went bad on disk
        with pytest.raises(WeightsError, match=r"does not match the published sha256 .*; run again"):
            download.fetch_official(R50)
        assert not part.exists()
        path, _, _ = download.fetch_official(R50)
    assert path.read_bytes() == payload

"""Official BiT weights: cache location, download, and the sha256 record beside each cached file.

Torch-free, so `bitdeploy models` can say what is cached on a machine without the training extra.
The cache dir is `$BITDEPLOY_CACHE`, else `$XDG_CACHE_HOME/bitdeploy`, else `~/.cache/bitdeploy`.
`$BITDEPLOY_WEIGHTS_URL` replaces Google's bucket as the base URL (mirrors, air-gapped servers, tests).
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from bitdeploy.core.catalog import WEIGHTS_BASE_URL, BitVariant
from bitdeploy.core.errors import WeightsError
from bitdeploy.core.fsutil import atomic_write, sha256_file

CACHE_ENV = "BITDEPLOY_CACHE"
URL_ENV = "BITDEPLOY_WEIGHTS_URL"
TIMEOUT_S = 30.0
CHUNK = 1 << 20

# Published sha256 of the official files, checked after a download when known. Google does not publish
# checksums and the files could not be fetched where this was written, so the table starts empty; the
# sha256 recorded at first download still guards the cache against later corruption.
KNOWN_SHA256: dict[str, str] = {}


def cache_dir() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "bitdeploy"


def weights_url(variant: BitVariant) -> str:
    base = os.environ.get(URL_ENV) or WEIGHTS_BASE_URL
    return base.rstrip("/") + "/" + variant.npz_name


def cached_path(variant: BitVariant) -> Path:
    return cache_dir() / variant.npz_name


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def verify_cached(path: Path) -> str:
    """Return the sha256 of a cached file, checking it against the one recorded at download time."""
    actual = sha256_file(path)
    known = KNOWN_SHA256.get(path.name)
    if known is not None and actual != known:
        raise WeightsError(
            f"{path}: cached weights do not match the published sha256 ({actual[:12]}... != {known[:12]}...); delete {path} and run again to re-download"
        )
    record = sidecar(path)
    if not record.is_file():
        # A file copied into the cache by hand (e.g. on an offline machine): adopt it, and guard it from now on.
        atomic_write(record, f"{actual}  {path.name}\n")
        return actual
    fields = record.read_text(encoding="utf-8", errors="replace").split()
    expected = fields[0] if fields else "<empty>"
    if actual != expected:
        raise WeightsError(
            f"{path}: cached weights are corrupt (sha256 {actual[:12]}... differs from the {expected[:12]}... recorded at download); delete {path} and {record.name} and run again to re-download"
        )
    return actual


def _progress(total: int | None, name: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"downloading {name}",
        file=sys.stderr,
        leave=False,
    )


def _stream(response: IO[bytes], out: IO[bytes], expected: int | None, name: str, done: int = 0) -> None:
    """Append the response to `out`; `expected`: the bytes this response should carry (its Content-Length)."""
    bar = _progress(None if expected is None else done + expected, name)
    if bar is not None:
        bar.update(done)
    received = 0
    try:
        while block := response.read(CHUNK):
            out.write(block)
            received += len(block)
            if bar is not None:
                bar.update(len(block))
    finally:
        if bar is not None:
            bar.close()
    if expected is not None and received != expected:
        raise WeightsError(
            f"download of {name} stopped after {done + received} of {done + expected} bytes; run again to resume it, or pass --weights PATH"
        )


def _offline_error(url: str, reason: object) -> WeightsError:
    return WeightsError(
        f"cannot download {url} ({reason}); connect to the network, or pass --weights PATH (an official .npz or a bitdeploy checkpoint) or --weights none"
    )


@contextmanager
def _download_lock(directory: Path) -> Iterator[None]:
    """One download at a time per cache directory (an flock on the directory itself: no lock file to leave)."""
    import fcntl

    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _part_paths(dest: Path) -> tuple[Path, Path]:
    """The partial download and its record (URL and the server's validator, which a resume must match)."""
    part = dest.with_name(f".{dest.name}.part")
    return part, part.with_name(part.name + ".json")


def _resume_from(part: Path, record: Path, url: str) -> tuple[int, str | None]:
    """(bytes already downloaded, the validator to send as If-Range); (0, None) starts over."""
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
        size = part.stat().st_size
    except (OSError, ValueError):
        return 0, None
    if not isinstance(saved, dict) or saved.get("url") != url or not saved.get("validator"):
        return 0, None
    return size, str(saved["validator"])


def download(variant: BitVariant, timeout: float = TIMEOUT_S) -> tuple[Path, str]:
    """Download the official npz of `variant` into the cache and record its sha256.

    The bytes go to `.<name>.part`, renamed into place when complete. An interrupted download keeps it when the
    server named a validator (ETag or Last-Modified): the next run asks for the rest with `Range` and `If-Range`,
    so a file changed on the server starts over. The complete file's sha256 is checked against the published
    one when known, then recorded beside the file."""
    url = weights_url(variant)
    dest = cached_path(variant)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(
            f"cannot create the weights cache {dest.parent} ({exc.strerror}); set {CACHE_ENV} to a writable directory"
        ) from exc
    part, record = _part_paths(dest)
    with _download_lock(dest.parent):
        if dest.is_file():  # another process finished it while this one waited
            return dest, verify_cached(dest)
        done, validator = _resume_from(part, record, url)
        headers = {"User-Agent": "bitdeploy"}
        if done:
            headers.update({"Range": f"bytes={done}-", "If-Range": validator or ""})
        keep = done > 0  # a network failure before any byte arrives keeps what an earlier run downloaded
        try:
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
                    resumed = done > 0 and response.status == 206
                    if not resumed:
                        done = 0
                    server_validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
                    atomic_write(record, json.dumps({"url": url, "validator": server_validator}))
                    keep = bool(server_validator)
                    length = response.headers.get("Content-Length")
                    with open(part, "ab" if resumed else "wb") as out:
                        _stream(response, out, int(length) if length and length.isdigit() else None, dest.name, done)
            except urllib.error.HTTPError as exc:
                if exc.code == 416:
                    keep = False  # the part is not a prefix of the file any more: start over next time
                    raise _offline_error(
                        url, "HTTP 416 for the rest of a partial download; run again to start over"
                    ) from exc
                raise _offline_error(url, f"HTTP {exc.code} {exc.reason}") from exc
            except urllib.error.URLError as exc:
                raise _offline_error(url, exc.reason) from exc
            except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:  # a dropped connection
                raise _offline_error(url, exc or type(exc).__name__) from exc
            digest = sha256_file(part)
            known = KNOWN_SHA256.get(variant.npz_name)
            if known is not None and known != digest:
                keep = False
                raise WeightsError(
                    f"{url}: downloaded file does not match the published sha256 ({digest[:12]}... != {known[:12]}...); run again, or download it yourself and pass --weights PATH"
                )
            # Record first, then publish the file: a crash in between leaves a record without a file, which re-downloads.
            atomic_write(sidecar(dest), f"{digest}  {dest.name}\n")
            os.replace(part, dest)
            record.unlink(missing_ok=True)
        except BaseException:
            if not keep:
                part.unlink(missing_ok=True)
                record.unlink(missing_ok=True)
            raise
    return dest, digest


def fetch_official(variant: BitVariant) -> tuple[Path, str, str]:
    """Path, sha256 and source URL of the official weights, downloading them on first use."""
    url = weights_url(variant)
    path = cached_path(variant)
    if path.is_file():
        return path, verify_cached(path), url
    path, digest = download(variant)
    return path, digest, url

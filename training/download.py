"""Official BiT weights: cache location, download, and the sha256 record beside each cached file.

Torch-free, so `bitdeploy models` can say what is cached on a machine without the training extra.
The cache dir is `$BITDEPLOY_CACHE`, else `$XDG_CACHE_HOME/bitdeploy`, else `~/.cache/bitdeploy`.
`$BITDEPLOY_WEIGHTS_URL` replaces Google's bucket as the base URL (mirrors, air-gapped servers, tests).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

from bitdeploy.catalog import WEIGHTS_BASE_URL, BitVariant
from bitdeploy.errors import WeightsError
from bitdeploy.fsutil import atomic_write, sha256_file

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


def _stream(response: IO[bytes], out: IO[bytes], total: int | None, name: str) -> str:
    h = hashlib.sha256()
    bar = _progress(total, name)
    done = 0
    try:
        while block := response.read(CHUNK):
            out.write(block)
            h.update(block)
            done += len(block)
            if bar is not None:
                bar.update(len(block))
    finally:
        if bar is not None:
            bar.close()
    if total is not None and done != total:
        raise WeightsError(
            f"download of {name} stopped after {done} of {total} bytes; run again, or pass --weights PATH"
        )
    return h.hexdigest()


def _offline_error(url: str, reason: object) -> WeightsError:
    return WeightsError(
        f"cannot download {url} ({reason}); connect to the network, or pass --weights PATH (an official .npz or a bitdeploy checkpoint) or --weights none"
    )


def download(variant: BitVariant, timeout: float = TIMEOUT_S) -> tuple[Path, str]:
    """Download the official npz of `variant` into the cache (temp name, then rename) and record its sha256."""
    url = weights_url(variant)
    dest = cached_path(variant)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(
            f"cannot create the weights cache {dest.parent} ({exc.strerror}); set {CACHE_ENV} to a writable directory"
        ) from exc
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "bitdeploy"})
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    length = response.headers.get("Content-Length")
                    digest = _stream(response, out, int(length) if length and length.isdigit() else None, dest.name)
            except urllib.error.HTTPError as exc:
                raise _offline_error(url, f"HTTP {exc.code} {exc.reason}") from exc
            except urllib.error.URLError as exc:
                raise _offline_error(url, exc.reason) from exc
            except (TimeoutError, ConnectionError) as exc:
                raise _offline_error(url, exc or type(exc).__name__) from exc
        known = KNOWN_SHA256.get(variant.npz_name)
        if known is not None and known != digest:
            raise WeightsError(
                f"{url}: downloaded file does not match the published sha256 ({digest[:12]}... != {known[:12]}...); run again, or download it yourself and pass --weights PATH"
            )
        # Record first, then publish the file: a crash in between leaves a record without a file, which re-downloads.
        atomic_write(sidecar(dest), f"{digest}  {dest.name}\n")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
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

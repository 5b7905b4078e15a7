"""Bundle v1: a directory holding the model file(s) and `manifest.json`, the single source of metadata.

Readers refuse unknown format versions and verify every file's sha256. Writers build the bundle in a
temporary sibling directory and rename it into place, so a crash never leaves a directory that loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from bitdeploy.core.errors import BundleError
from bitdeploy.core.fsutil import remove_stale_temps, replace_dir, sha256_file
from bitdeploy.runtimes.manifest import FORMAT_VERSION, Manifest, check_format

MANIFEST = "manifest.json"


def read_manifest(bundle: str | os.PathLike[str]) -> Manifest:
    """Read and check the manifest of a bundle directory (no checksum verification)."""
    root = Path(bundle)
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(
            f"{root}: not a bundle directory; pass a directory written by `bitdeploy build` or a .bitpack file"
        )
    if not path.is_file():
        raise BundleError(f"{root}: no {MANIFEST}; this is not a bitdeploy bundle (build one with `bitdeploy build`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc}); rebuild the bundle") from exc
    check_format(manifest, str(path))
    try:
        return Manifest.from_dict(manifest)
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from exc


def verify_files(bundle: str | os.PathLike[str], manifest: Manifest) -> None:
    """Check every listed file's sha256; raise BundleError naming the first mismatch."""
    root = Path(bundle)
    files = manifest.files
    if not files:
        raise BundleError(f"{root}: manifest lists no files; rebuild the bundle")
    for name, expected in files.items():
        p = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"{root}: manifest names an unsafe path {name!r}; rebuild the bundle")
        if not p.is_file():
            raise BundleError(f"{p}: missing from the bundle; rebuild it")
        if sha256_file(p) != expected:
            raise BundleError(
                f"{p}: checksum mismatch (the file was modified after the build); rebuild the bundle or pass --no-verify to skip the check"
            )


def load_manifest(bundle: str | os.PathLike[str], verify: bool = True) -> Manifest:
    manifest = read_manifest(bundle)
    if verify:
        verify_files(bundle, manifest)
    if not manifest.valid:
        reason = manifest.invalid_reason or "it did not pass validation"
        raise BundleError(f"{bundle}: bundle is marked invalid ({reason}); rebuild it")
    return manifest


@contextmanager
def bundle_writer(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it replaces `out` atomically.

    The caller writes model files into it and finally calls `write_manifest(tmp, manifest)`.
    On any exception the temporary directory is removed and `out` is left as it was.
    """
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out}: exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise BundleError(f"{out}: directory exists and is not a bundle; choose an empty or new --out")
    remove_stale_temps(out.parent, f".{out.name}.tmp-")  # a build killed (-9) while writing this bundle
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        if not (tmp / MANIFEST).is_file():
            raise BundleError(f"{out}: internal error, bundle written without a manifest")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(bundle_dir: str | os.PathLike[str], manifest: Manifest, files: list[str]) -> Manifest:
    """The one writer of manifest.json: fill in the format version and the checksums of `files` (relative names),
    check the JSON reads back as the same record, then write it atomically. Returns what was written."""
    root = Path(bundle_dir)
    typed = replace(
        manifest,
        version=(FORMAT_VERSION, 0),
        files={name: sha256_file(root / name) for name in sorted(files)},
    )
    data = typed.to_dict()
    Manifest.from_dict(data)  # a field of the wrong type fails the build, not the first load
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, root / MANIFEST)
    return typed

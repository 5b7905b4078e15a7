"""Bundle v1: a directory holding the model file(s) and `manifest.json`, the single source of metadata.

Readers refuse unknown format versions and verify every file's sha256. Writers build the bundle in a
temporary sibling directory and rename it into place, so a crash never leaves a directory that loads.

A bundle is sealed once, after its last file is written: `write_manifest` puts every file's sha256 in the
manifest. What can only be measured by running the sealed bundle (the build's timing, `--verify-on` results)
joins later through `amend_manifest`, which re-verifies every file against the seal before it writes the new
manifest (a temporary name, then a rename), so an amendment never blesses a file changed after the seal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from bitdeploy.core.errors import BundleError
from bitdeploy.core.fsutil import remove_stale_temps, replace_dir, sha256_file, temp_dir
from bitdeploy.runtimes.bundle.manifest import FORMAT_VERSION, Manifest, check_format

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
        raise refusal(bundle, manifest)
    return manifest


def refusal(bundle: str | os.PathLike[str], manifest: Manifest) -> BundleError:
    """The one-line error for loading a bundle that is not valid: a ready bundle whose engine is still to be built
    on the device says how to build it; any other says why it is invalid."""
    if manifest.target.engine_pending:
        return BundleError(
            f"{bundle}: its engine is not built yet (a ready bundle); run `bitdeploy engine {bundle}` on the device, "
            "a machine with TensorRT and an NVIDIA GPU"
        )
    reason = manifest.invalid_reason or "it did not pass validation"
    return BundleError(f"{bundle}: bundle is marked invalid ({reason}); rebuild it")


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
    with temp_dir(out.parent, f".{out.name}.tmp-{os.getpid()}-") as tmp:
        yield tmp
        if not (tmp / MANIFEST).is_file():
            raise BundleError(f"{out}: internal error, bundle written without a manifest")
        replace_dir(tmp, out)


def write_manifest(bundle_dir: str | os.PathLike[str], manifest: Manifest, files: list[str]) -> Manifest:
    """Seal a bundle: the one writer of its checksums. Fill in the format version and the sha256 of `files`
    (relative names), check the JSON reads back as the same record, then write it atomically. Returns what was
    written. Call it once per bundle, after its last file is written."""
    root = Path(bundle_dir)
    typed = replace(
        manifest,
        version=(FORMAT_VERSION, 0),
        files={name: sha256_file(root / name) for name in sorted(files)},
    )
    _write(root, typed)
    return typed


def amend_manifest(bundle: str | os.PathLike[str], **changes: Any) -> Manifest:
    """Add to a sealed bundle's manifest what only running it could measure (e.g. `build_latency=`,
    `verified_on=`): every file is re-verified against the seal first (BundleError names one that changed), and
    the new manifest, with the same checksums, replaces the old one atomically. Returns what was written."""
    if not changes.keys().isdisjoint({"files", "version"}):
        raise ValueError("amend_manifest keeps the seal: files and version change only through write_manifest")
    root = Path(bundle)
    manifest = read_manifest(root)
    verify_files(root, manifest)
    amended = replace(manifest, **changes)
    _write(root, amended)
    return amended


def _write(root: Path, manifest: Manifest) -> None:
    data = manifest.to_dict()
    Manifest.from_dict(data)  # a field of the wrong type fails the build, not the first load
    tmp = root / (MANIFEST + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2, sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the bytes do
        os.replace(tmp, root / MANIFEST)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

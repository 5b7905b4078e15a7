"""Single-file packs: a bundle as one tar file (optionally gzip-compressed), and safe unpacking.

A pack holds `manifest.json` and exactly the files its manifest lists, flat, with normalised owners and times.
Unpacking treats the file as hostile: it refuses absolute paths, `..`, links, devices, FIFOs, duplicates,
oversized members and unlisted files, and writes only inside a target directory it creates itself.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from bitdeploy.core.errors import BundleError, first_line
from bitdeploy.runtimes.bundle import MANIFEST, read_manifest, refusal, verify_files
from bitdeploy.runtimes.bundle.manifest import Manifest

PACK_SUFFIX = ".bitpack"
MAX_MEMBER_BYTES = 8 << 30  # larger than any BiT model file (R152x4 FP32 is ~3.7 GB)
MAX_TOTAL_BYTES = 16 << 30
MAX_MEMBERS = 64
_CHUNK = 1 << 20


def _compressed(out: Path, compress: bool | None) -> bool:
    if compress is not None:
        return compress
    return out.name.endswith((".gz", ".tgz"))


def pack(bundle: str | os.PathLike[str], out: str | os.PathLike[str], compress: bool | None = None) -> Path:
    """Write `bundle` (a verified bundle directory: valid, or ready for the device to build its engine) to the single
    file `out`, atomically.

    `compress=None` gzips when `out` ends in .gz or .tgz.
    """
    root = Path(bundle)
    if root.is_file():
        raise BundleError(f"{root}: is already a single-file pack; pass a bundle directory")
    opened = open_bundle(root, verify=True, require_valid=False)
    if not opened.manifest.valid and not opened.manifest.target.engine_pending:
        raise refusal(root, opened.manifest)
    out = Path(out)
    if out.is_dir():
        raise BundleError(f"{out}: is a directory; pass a file name such as model{PACK_SUFFIX}")
    if out.resolve().is_relative_to(root.resolve()):
        raise BundleError(f"{out}: is inside the bundle it packs; write the pack elsewhere")
    out.parent.mkdir(parents=True, exist_ok=True)
    names = [MANIFEST, *sorted(opened.manifest.files)]
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as raw:
            # gzip's header would record a time and a file name: zero them so identical bundles give identical packs.
            stream = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if _compressed(out, compress) else raw
            with stream, tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT) as tf:
                for name in names:
                    info = tf.gettarinfo(str(root / name), arcname=name)
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.mode = 0o644
                    info.mtime = 0
                    with open(root / name, "rb") as f:
                        tf.addfile(info, f)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _member_path(pack_path: Path, name: str) -> PurePosixPath:
    """A member name -> a safe relative path, or BundleError."""
    if not name or "\\" in name or "\x00" in name or PureWindowsPath(name).drive:
        raise BundleError(f"{pack_path}: member {name!r} has an unsafe name; refusing to unpack")
    path = PurePosixPath(name)
    if path.is_absolute():
        raise BundleError(f"{pack_path}: member {name!r} is an absolute path; refusing to unpack")
    parts = [p for p in path.parts if p != "."]
    if ".." in parts:
        raise BundleError(f"{pack_path}: member {name!r} points outside the pack (..); refusing to unpack")
    if not parts:
        raise BundleError(f"{pack_path}: member {name!r} has an empty name; refusing to unpack")
    return PurePosixPath(*parts)


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    if member.ischr() or member.isblk():
        return "device"
    if member.isfifo():
        return "FIFO"
    return "special file"


def unpack(
    pack_path: str | os.PathLike[str],
    target: str | os.PathLike[str],
    verify: bool = True,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_members: int = MAX_MEMBERS,
) -> Manifest:
    """Extract a pack into `target` (created here; it must not exist) and return its manifest.

    On any error `target` is removed again, so nothing is left behind.
    """
    pack_path, target = Path(pack_path), Path(target)
    if not pack_path.is_file():
        raise BundleError(f"{pack_path}: no such pack file; check the path")
    try:
        tf = tarfile.open(pack_path, "r:*")  # noqa: SIM115 - closed by the `with tf:` below, after the target checks
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(
            f"{pack_path}: not a bundle directory or a bitdeploy pack (not a tar file); pass a directory from `bitdeploy build` or a file from `bitdeploy pack`"
        ) from exc
    try:
        target.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        tf.close()
        raise BundleError(f"{target}: already exists; unpack into a new directory") from None
    root = target.resolve()
    try:
        with tf:
            _extract(tf, pack_path, root, max_member_bytes, max_total_bytes, max_members)
        if not (root / MANIFEST).is_file():
            raise BundleError(
                f"{pack_path}: no {MANIFEST} in the pack; this is not a bitdeploy pack (write one with `bitdeploy pack`)"
            )
        try:
            manifest = read_manifest(root)
            if verify:
                listed = {str(PurePosixPath(n)) for n in manifest.files}
                found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
                unlisted = [n for n in found if n != MANIFEST and n not in listed]
                if unlisted:
                    raise BundleError(
                        f"{pack_path}: member {unlisted[0]!r} is not listed in the manifest; refusing the pack (repack it with `bitdeploy pack`)"
                    )
                verify_files(root, manifest)
        except BundleError as exc:  # name the pack, not the temporary directory
            raise BundleError(str(exc).replace(str(root), str(pack_path)).replace(str(target), str(pack_path))) from exc
        return manifest
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def _extract(
    tf: tarfile.TarFile, pack_path: Path, root: Path, max_member: int, max_total: int, max_members: int
) -> None:
    seen: set[PurePosixPath] = set()
    total = count = 0
    try:
        for member in tf:
            count += 1
            if count > max_members:
                raise BundleError(f"{pack_path}: more than {max_members} members; refusing to unpack")
            rel = _member_path(pack_path, member.name)
            dest = root.joinpath(*rel.parts)
            if member.isdir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            if not member.isreg():
                raise BundleError(
                    f"{pack_path}: member {member.name!r} is a {_kind(member)}; packs hold regular files only"
                )
            if member.size > max_member:
                raise BundleError(
                    f"{pack_path}: member {member.name!r} is {member.size} bytes, over the {max_member}-byte limit; refusing to unpack"
                )
            total += member.size
            if total > max_total:
                raise BundleError(f"{pack_path}: members total over {max_total} bytes; refusing to unpack")
            if rel in seen:
                raise BundleError(f"{pack_path}: member {member.name!r} appears twice; refusing to unpack")
            seen.add(rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            # Only directories made above lie between root and dest, but check anyway: never write outside root.
            if not dest.parent.resolve().is_relative_to(root):
                raise BundleError(
                    f"{pack_path}: member {member.name!r} resolves outside the target; refusing to unpack"
                )
            src = tf.extractfile(member)
            if src is None:
                raise BundleError(f"{pack_path}: member {member.name!r} has no data; the pack is damaged")
            with src, open(dest, "xb") as f:
                shutil.copyfileobj(src, f, _CHUNK)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        if isinstance(exc, FileExistsError):
            raise BundleError(f"{pack_path}: member {exc.filename!r} appears twice; refusing to unpack") from exc
        reason = first_line(exc)
        raise BundleError(f"{pack_path}: damaged pack ({reason}); re-create it with `bitdeploy pack`") from exc


@dataclass
class OpenedBundle:
    """A bundle ready to load: its directory (a private temporary one for a pack) and its manifest."""

    source: Path
    root: Path
    manifest: Manifest
    is_pack: bool = False
    _tmp: Path | None = field(default=None, repr=False)

    def cleanup(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def open_bundle(path: str | os.PathLike[str], verify: bool = True, require_valid: bool = True) -> OpenedBundle:
    """A bundle directory or a pack -> OpenedBundle. Call `.cleanup()` when done (it removes a pack's temp dir)."""
    source = Path(path)
    if source.is_dir():
        manifest = read_manifest(source)
        if verify:
            verify_files(source, manifest)
        opened = OpenedBundle(source, source, manifest)
    elif source.is_file():
        tmp = Path(tempfile.mkdtemp(prefix="bitdeploy-pack-"))
        try:
            manifest = unpack(source, tmp / "bundle", verify=verify)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        opened = OpenedBundle(source, tmp / "bundle", manifest, is_pack=True, _tmp=tmp)
    else:
        raise BundleError(
            f"{source}: no such bundle; pass a directory from `bitdeploy build` or a file from `bitdeploy pack`"
        )
    if require_valid and not manifest.valid:
        opened.cleanup()
        raise refusal(source, manifest)
    return opened

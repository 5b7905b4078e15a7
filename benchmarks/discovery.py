"""Which bundles `bitdeploy bench` measures: the bundles under a run folder, the selected copy, and the entry for a
bundle the build's accuracy gate already refused."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bitdeploy.benchmarks.schema import BenchEntry, Status
from bitdeploy.core.errors import BitdeployError
from bitdeploy.runtimes.bundle import MANIFEST, read_manifest
from bitdeploy.runtimes.bundle.eligibility import Checks
from bitdeploy.runtimes.bundle.manifest import Manifest
from bitdeploy.runtimes.bundle.pack import PACK_SUFFIX

SELECTED = "selected"  # DIR/selected (or DIR/selected.bitpack): `bitdeploy select`'s copy of one bundle under DIR


GATE_SKIP_REASON = "failed the accuracy gate at build"
GATE_SKIP = Status.skipped(GATE_SKIP_REASON).text


def find_bundles(root: Path) -> list[Path]:
    """Every bundle under `root`, sorted by relative path: directories holding a manifest.json (not searched further)
    and `*.bitpack` files. Hidden and temporary names (".x", as a killed build leaves them) are skipped, and so is
    `root/selected` (`selected_copy`). `root` itself when it is a bundle or a pack; [] when it holds none."""
    root = Path(root)
    if root.is_file():
        return [root] if root.name.endswith(PACK_SUFFIX) else []
    if (root / MANIFEST).is_file():
        return [root]
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):  # symlinked folders: a bundle is taken, nothing is descended
        here = Path(dirpath)
        descend = []
        for d in dirnames:
            if d.startswith(".") or (here == root and d == SELECTED):
                continue
            if (here / d / MANIFEST).is_file():
                found.append(here / d)
            else:
                descend.append(d)
        dirnames[:] = descend
        found.extend(
            here / f
            for f in filenames
            if f.endswith(PACK_SUFFIX) and not f.startswith(".") and not (here == root and f == SELECTED + PACK_SUFFIX)
        )
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def selected_copy(root: Path) -> Path | None:
    """`root/selected` or `root/selected.bitpack` when present: a copy of another bundle under root, not benched."""
    for path in (Path(root) / SELECTED, Path(root) / (SELECTED + PACK_SUFFIX)):
        if (path / MANIFEST).is_file() or path.is_file():
            return path
    return None


def bundles_to_bench(args: Sequence[str], every: bool, note: Callable[[str], None]) -> list[tuple[str, str]]:
    """(path, entry name) per bundle to bench. Without `every` the arguments as given, named by their last part (a
    folder of bundles is refused); with it, every bundle under each argument, named by its path relative to it."""
    if not every:
        for a in args:
            p = Path(a)
            if p.is_dir() and not (p / MANIFEST).is_file():
                n = len(find_bundles(p))
                if n:
                    raise BitdeployError(
                        f"{a} is a folder of {n} bundle{'s' if n != 1 else ''}, not a bundle; pass --all to bench every bundle under it"
                    )
        return [(a, Path(a).name or a) for a in args]
    per_arg: list[tuple[str, list[tuple[Path, str]]]] = []
    for a in args:
        root = Path(a)
        if not root.exists():
            raise BitdeployError(f"{a}: no such folder; pass the folder of a build, e.g. runs/grid")
        found = find_bundles(root)
        if not found:
            raise BitdeployError(
                f"{a}: no bundle under this folder (no manifest.json, no {PACK_SUFFIX} file); pass the --out folder of a build, e.g. runs/grid"
            )
        sel = selected_copy(root) if root.is_dir() and not (root / MANIFEST).is_file() else None
        if sel is not None:
            note(f"skipping {sel}: `bitdeploy select`'s copy of one of the other bundles")
        per_arg.append((a, [(f, f.relative_to(root).as_posix() if f != root else root.resolve().name) for f in found]))
    names = [n for _, named in per_arg for _, n in named]
    clash = len(set(names)) < len(names)  # two folders hold the same relative path: name entries by folder too
    out: list[tuple[str, str]] = []
    seen: set[Path] = set()
    for a, named in per_arg:
        for path, name in named:
            if path.resolve() not in seen:
                seen.add(path.resolve())
                out.append((str(path), f"{Path(a).as_posix()}/{name}" if clash else name))
    return out


def skipped_invalid(bundle: str, name: str) -> BenchEntry | None:
    """The `skipped:` entry of a bundle directory the build marked invalid (`valid: false`), else None."""
    try:
        manifest = read_manifest(bundle) if Path(bundle).is_dir() else None
    except BitdeployError:
        return None  # unreadable: opening it will say why
    if manifest is None or manifest.valid:
        return None
    reason = manifest.invalid_reason
    if manifest.target.engine_pending:
        status = Status.ready("engine is built on the device (`bitdeploy engine BUNDLE`); not timed here")
    elif reason is None or reason.startswith(("accuracy gate", "validation")):
        status = Status.skipped(GATE_SKIP_REASON + (f" ({reason})" if reason else ""))
    else:
        status = Status.skipped(f"marked invalid at build ({reason})")
    return bundle_entry(name, bundle, manifest, status)


def bundle_entry(name: str, bundle: str, manifest: Manifest, status: Status, **figures: Any) -> BenchEntry:
    """The entry of a bundle from its manifest (what it is, its files, the build's gate); `figures` are the ENTRY
    fields measured here, and override the manifest's record (e.g. the backend's own `precision_used`)."""
    target, model = manifest.target, manifest.model
    size_mb, files = bundle_size(Path(bundle), manifest)
    recorded: dict[str, Any] = {
        "target": target.backend,
        "precision_used": target.precision_used,
        "backend_device": target.device,
        **figures,
    }
    return BenchEntry(
        name=name,
        kind="bundle",
        bundle=str(bundle),
        model=model.name,
        resolution=model.resolution,
        num_classes=model.num_classes,
        precision=target.precision,
        status=status,
        size_mb=size_mb,
        files_sha256=files,
        build_accuracy=manifest.accuracy.to_dict() if manifest.accuracy is not None else None,
        build_checks=Checks.of(manifest).to_dict(),
        **recorded,
    )


def bundle_size(path: Path, manifest: Manifest) -> tuple[float, dict[str, str]]:
    files = manifest.files
    if path.is_file():  # a single-file pack
        return path.stat().st_size / 1e6, dict(files)
    total = sum((path / name).stat().st_size for name in files if (path / name).is_file())
    return total / 1e6, dict(files)


def baseline_manifests(bundles: list[str]) -> list[Manifest]:
    """For the PyTorch baselines: one manifest per distinct (model, resolution, classes) among the readable
    bundles (directories or packs)."""
    from bitdeploy.runtimes.bundle.pack import open_bundle

    seen, out = set(), []
    for b in bundles:
        try:
            opened = open_bundle(b, verify=False, require_valid=False)
        except BitdeployError:
            continue  # its own entry will say why
        opened.cleanup()
        model = opened.manifest.model
        key = (model.name or None, model.resolution, model.num_classes)
        if None not in key[:2] and key not in seen:
            seen.add(key)
            out.append(opened.manifest)
    return out

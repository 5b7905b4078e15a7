"""Integrity: checksums at load, format versions, and packs that are hostile or damaged."""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest

from bitdeploy.core.errors import BundleError
from bitdeploy.runtimes import load
from bitdeploy.runtimes.bundle import MANIFEST, read_manifest
from bitdeploy.runtimes.bundle.pack import open_bundle, pack, unpack


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def edit_manifest(bundle: Path, **changes: object) -> None:
    m = json.loads((bundle / MANIFEST).read_text())
    m.update(changes)
    (bundle / MANIFEST).write_text(json.dumps(m))


def test_one_modified_byte_is_refused(bundle_copy: Path, image_dir: dict[str, Path]) -> None:
    flip_byte(bundle_copy / "model.onnx")
    with pytest.raises(BundleError) as err:
        load(bundle_copy)
    msg = str(err.value)
    assert "model.onnx: checksum mismatch" in msg and "--no-verify" in msg and "\n" not in msg
    # The documented opt-out loads it anyway (the flipped byte sits in a weight, so the model still runs).
    with load(bundle_copy, verify=False) as model:
        assert len(model.predict(image_dir["digit0_L"])[0]) == 5


def test_modified_manifest_label_or_missing_file(bundle_copy: Path) -> None:
    (bundle_copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match="missing from the bundle"):
        load(bundle_copy)


def test_unknown_format_version_is_refused(bundle_copy: Path) -> None:
    edit_manifest(bundle_copy, format_version=2)
    with pytest.raises(BundleError, match="unknown bundle format version 2"):
        load(bundle_copy)
    with pytest.raises(BundleError, match="unknown bundle format version 2"):
        load(bundle_copy, verify=False)  # the version check is not part of the opt-out


def test_invalid_bundle_is_refused(bundle_copy: Path) -> None:
    edit_manifest(bundle_copy, valid=False, invalid_reason="top-1 dropped 3.1 points (limit 1.0)")
    with pytest.raises(BundleError, match=r"marked invalid \(top-1 dropped 3.1 points"):
        load(bundle_copy)


def test_unsafe_model_file_in_manifest(bundle_copy: Path) -> None:
    edit_manifest(bundle_copy, model_file="../model.onnx")
    with pytest.raises(BundleError, match="no usable model_file"):
        load(bundle_copy, verify=False)


# -- packs ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny.bitpack", "tiny.bitpack.gz"])
def test_pack_round_trip(ort_bundle: Path, tmp_path: Path, name: str, tiny_model: dict) -> None:
    out = pack(ort_bundle, tmp_path / name)
    with tarfile.open(out) as tf:
        assert sorted(tf.getnames()) == ["manifest.json", "model.onnx"]
        assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o644 for m in tf.getmembers())
    assert (out.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    assert pack(ort_bundle, tmp_path / ("again-" + name)).read_bytes() == out.read_bytes()  # reproducible
    model = load(out)
    tmpdir = model.bundle.root
    assert tmpdir.is_dir() and model.bundle.is_pack
    np.testing.assert_allclose(model.infer(tiny_model["x"]), tiny_model["ref"], atol=1e-4)
    model.close()
    assert not tmpdir.exists() and not tmpdir.parent.exists()  # the private temp dir is gone


def test_pack_refuses_modified_bundle_and_bad_targets(bundle_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="is inside the bundle"):
        pack(bundle_copy, bundle_copy / "x.bitpack")
    with pytest.raises(BundleError, match="is a directory"):
        pack(bundle_copy, tmp_path)
    flip_byte(bundle_copy / "model.onnx")
    with pytest.raises(BundleError, match="checksum mismatch"):
        pack(bundle_copy, tmp_path / "x.bitpack")
    assert not (tmp_path / "x.bitpack").exists() and not list(tmp_path.glob(".x.bitpack*"))


def test_tampered_pack_is_refused_and_cleaned(ort_bundle: Path, tmp_path: Path) -> None:
    out = pack(ort_bundle, tmp_path / "t.bitpack")
    flip_byte(out)  # the middle of the tar is inside model.onnx's weights
    before = set(Path(tempfile.gettempdir()).glob("bitdeploy-pack-*"))
    with pytest.raises(BundleError) as err:
        load(out)
    assert str(err.value).startswith(f"{out}/model.onnx: checksum mismatch")
    assert set(Path(tempfile.gettempdir()).glob("bitdeploy-pack-*")) == before


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _special(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info, None


HOSTILE = {
    "dotdot": ([_file("../evil.txt")], "points outside the pack"),
    "nested-dotdot": ([_file("a/../../evil.txt")], "points outside the pack"),
    "absolute": ([_file("/tmp/bitdeploy-evil.txt")], "absolute path"),
    "backslash": ([_file("..\\evil.txt")], "unsafe name"),
    "symlink": ([_special("manifest.json", tarfile.SYMTYPE, "/etc/passwd")], "symbolic link"),
    "hardlink": ([_file("a.txt"), _special("manifest.json", tarfile.LNKTYPE, "a.txt")], "hard link"),
    "chardev": ([_special("dev", tarfile.CHRTYPE)], "device"),
    "blockdev": ([_special("dev", tarfile.BLKTYPE)], "device"),
    "fifo": ([_special("pipe", tarfile.FIFOTYPE)], "FIFO"),
    "duplicate": ([_file("a.txt"), _file("a.txt")], "appears twice"),
    "oversized": ([_file("big.bin", b"0" * 2048)], "over the 1024-byte limit"),
    "no-manifest": ([_file("model.onnx")], "no manifest.json in the pack"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_packs_are_refused_and_write_nothing_outside(tmp_path: Path, case: str) -> None:
    members, message = HOSTILE[case]
    work = tmp_path / "work"
    work.mkdir()
    evil = _tar(tmp_path / f"{case}.bitpack", members)
    target = work / "target"
    with pytest.raises(BundleError, match=message) as err:
        unpack(evil, target, max_member_bytes=1024)
    assert str(evil) in str(err.value) and "\n" not in str(err.value)
    assert list(work.iterdir()) == []  # the target itself is removed again
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([evil.name, "work"])
    assert not Path("/tmp/bitdeploy-evil.txt").exists()


def test_unlisted_member_and_total_limit(ort_bundle: Path, tmp_path: Path) -> None:
    root = ort_bundle
    members = [
        (tarfile.TarInfo("manifest.json"), (root / MANIFEST).read_bytes()),
        (tarfile.TarInfo("model.onnx"), (root / "model.onnx").read_bytes()),
        (tarfile.TarInfo("extra.py"), b"print('hi')\n"),
    ]
    evil = _tar(tmp_path / "extra.bitpack", members)
    with pytest.raises(BundleError, match=r"'extra\.py' is not listed in the manifest"):
        unpack(evil, tmp_path / "t1")
    with pytest.raises(BundleError, match="members total over"):
        unpack(evil, tmp_path / "t2", max_total_bytes=1000)
    with pytest.raises(BundleError, match="more than 2 members"):
        unpack(evil, tmp_path / "t3", max_members=2)
    assert read_manifest(_unpacked(evil, tmp_path / "t4")).version == (1, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extra.bitpack", "t4"]


def _unpacked(evil: Path, target: Path) -> Path:
    unpack(evil, target, verify=False)  # without verification the extra file is tolerated
    return target


def test_not_a_pack(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bitpack"
    junk.write_bytes(b"\x00" * 10 + b"definitely not a tar")
    with pytest.raises(BundleError, match="not a bundle directory or a bitdeploy pack"):
        load(junk)
    truncated = tmp_path / "cut.bitpack"
    _tar(truncated, [_file("manifest.json", b"{" * 5000)])
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(BundleError):
        open_bundle(truncated)
    with pytest.raises(BundleError, match="no such bundle"):
        load(tmp_path / "nowhere")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.bitpack", "junk.bitpack"]


def test_unpack_target_must_be_new(ort_bundle: Path, tmp_path: Path) -> None:
    out = pack(ort_bundle, tmp_path / "p.bitpack")
    (tmp_path / "exists").mkdir()
    with pytest.raises(BundleError, match="already exists"):
        unpack(out, tmp_path / "exists")
    assert (tmp_path / "exists").is_dir()  # an existing directory is never removed
    manifest = unpack(out, tmp_path / "fresh")
    assert manifest.model.name == "tiny" and (tmp_path / "fresh" / "model.onnx").is_file()


@pytest.mark.parametrize(
    "spec",
    [
        None,
        {"shape": [1, 3, 32]},
        {"shape": [-1, 3, 32, 32]},
        {"shape": [-1, 3, 32, 32], "resize": [32, 32], "dtype": "float99"},
    ],
)
def test_broken_input_spec_is_one_line(bundle_copy: Path, spec: object) -> None:
    edit_manifest(bundle_copy, input=spec)
    with pytest.raises(BundleError, match="rebuild the bundle") as err:
        load(bundle_copy)
    assert "\n" not in str(err.value)

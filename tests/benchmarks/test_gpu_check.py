"""benchmarks/experiments/gpu_check.py, everything it does before the GPU: arguments, the preflight's one line,
the source-tree bootstrap, the CPU reference fine-tune and its comparison, the skip reasons and the summary."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.experiments import load, script

gpu_check = load("gpu_check")
lib = load("gpu_check_lib")
ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script("gpu_check")), *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_list_and_bad_rows() -> None:
    listed = _run("--list")
    assert listed.returncode == 0 and listed.stdout.split() == list(gpu_check.ROWS)
    bad = _run("--rows", "finetune-cpu-fp32,warp-drive")
    assert bad.returncode == 2 and "unknown row 'warp-drive'" in bad.stderr


def test_no_gpu_is_one_line_and_exit_1(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: gpu_check would run its rows")
    done = _run("--out", str(tmp_path / "out"))
    assert done.returncode == 1, done.stderr
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1
    assert "no CUDA GPU" in done.stderr and torch.__version__ in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_missing_module_is_named_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['onnxruntime'] = None\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = _run(env=env)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "gpu_check: missing module(s) onnxruntime; this check installs nothing, run it where they are"
    )


def test_source_tree_bootstrap_reads_the_tree_not_the_install(tmp_path: Path) -> None:
    """A copy of the tree imports from the copy, though an editable bitdeploy is installed here."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    copy = tmp_path / "tree"
    for name in files:
        if name.endswith((".py", ".toml")) and (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    code = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1] + '/benchmarks/experiments');"
        "import source_tree; source_tree.install(Path(sys.argv[1]));"
        "import bitdeploy.core.targets, bitdeploy.runtimes.bundle.manifest, bitdeploy.training.bit as b;"
        "print(bitdeploy.core.targets.__file__); print(bitdeploy.runtimes.bundle.manifest.__file__); print(b.__file__)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(copy)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    paths = [Path(p) for p in done.stdout.split()]
    assert [p.relative_to(copy.resolve()).as_posix() for p in paths] == [
        "pipeline/core/targets.py",
        "runtimes/bundle/manifest.py",
        "training/bit.py",
    ]


def test_package_dir_parser_matches_tomllib() -> None:
    import tomllib

    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    table = tomllib.loads(text)["tool"]["setuptools"]["package-dir"]
    assert gpu_check.source_tree.parse_package_dir(text) == table


def test_cpu_finetune_is_repeatable_and_the_comparison_fails_on_a_real_difference(tmp_path: Path) -> None:
    data = lib.write_image_folder(tmp_path / "data", classes=3, train=8, val=4, size=32)

    def finetune(mode: str) -> tuple[list[float], np.ndarray]:
        losses, weights = gpu_check.finetune("tiny", 32, 3, 4, "cpu", mode, data)
        return losses, gpu_check.logits("tiny", weights, 32, "cpu", mode, data)

    losses, logits = finetune("fp32-ieee")
    again, logits2 = finetune("fp32-ieee")
    assert len(losses) == 3 and logits.shape == (12, 3)
    ok, figures, reason = lib.compare(losses, again, logits, logits2, lib.TOLERANCES["fp32-ieee"])
    assert ok and reason == "" and figures["top1_agreement"] == 1.0
    bf_losses, bf_logits = finetune("bf16")
    ok, figures, reason = lib.compare(losses, bf_losses, logits, bf_logits, lib.TOLERANCES["bf16"])
    assert ok, reason  # the bf16 bound holds for bf16 autocast on the CPU too
    assert figures["logits_max_abs_diff"] > 0  # and bf16 really ran
    wrong = np.array(logits2) * 1.5
    ok, _, reason = lib.compare(losses, again, logits, wrong, lib.TOLERANCES["bf16"])
    assert not ok and "logits differ" in reason
    ok, _, reason = lib.compare(losses, [v + 0.5 for v in again], logits, logits2, lib.TOLERANCES["bf16"])
    assert not ok and "loss curve differs" in reason
    ok, _, reason = lib.compare(losses, [float("nan")] * 3, logits, logits2, lib.TOLERANCES["bf16"])
    assert not ok and "non-finite" in reason


def test_skip_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert "onnxruntime-gpu is not installed" in (gpu_check.onnx_cuda_skip_reason() or "")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert gpu_check.onnx_cuda_skip_reason() is None
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert "TensorRT is not installed" in (gpu_check.trt_skip_reason() or "")


def test_rows_and_summary_without_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness on this machine: the CPU reference passes, a CUDA row fails with its reason (there is no
    CUDA here), the TensorRT rows skip with theirs, and the summary holds all three."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    args = argparse.Namespace(
        model="tiny",
        resolution=16,
        steps=2,
        batch=4,
        rows=["finetune-cpu-fp32", "finetune-cuda-bf16", "build-trt-fp16"],
    )
    rows = gpu_check.run_rows(args, tmp_path / "work")
    assert [(r.name, r.status) for r in rows] == [
        ("finetune-cpu-fp32", "passed"),
        ("finetune-cuda-bf16", "failed"),
        ("build-trt-fp16", "skipped"),
    ]
    assert len(rows[0].figures["losses"]) == 2
    assert rows[1].reason and "Traceback" not in rows[1].reason
    assert "TensorRT is not installed" in rows[2].reason
    js, md = lib.write_summary(tmp_path / "out", rows, {"gpu": None, "torch": "x"}, 1)
    doc = json.loads(js.read_text())
    assert [lib.Row.from_dict(r) for r in doc["rows"]] == rows and doc["exit_code"] == 1
    text = md.read_text()
    assert "1 passed, 1 failed, 1 skipped; exit 1" in text
    assert text.count("\n| ") == 4 and "| build-trt-fp16 | skipped |" in text


def test_bundle_figures_reasons(tmp_path: Path) -> None:
    assert lib.bundle_figures(tmp_path)[1].startswith("no ")
    manifest = {"valid": True, "target": {"device": "cpu"}, "validation": {"evaluated_with": "model.onnx on CPU"}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert "not on CUDA" in lib.bundle_figures(tmp_path)[1]
    manifest["target"] = {"device": "cuda"}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    figures, why = lib.bundle_figures(tmp_path)
    assert why == "" and figures["device"] == "cuda"
    (tmp_path / "manifest.json").write_text(json.dumps({"valid": False, "invalid_reason": "gate"}))
    assert lib.bundle_figures(tmp_path)[1] == "bundle invalid: gate"


def test_the_trt_ready_rows_skip_with_their_reasons_without_a_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a GPU without TensorRT can run of the TensorRT path (a ready bundle's ONNX on ONNX Runtime's CUDA
    provider) and the engine build each skip here with their reason: no CUDA provider, no TensorRT."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    args = argparse.Namespace(
        model="tiny", resolution=16, steps=2, batch=4, rows=["trt-ready-cuda-ep", "engine-trt-ready"]
    )
    rows = gpu_check.run_rows(args, tmp_path / "work")
    assert [(r.name, r.status) for r in rows] == [("trt-ready-cuda-ep", "skipped"), ("engine-trt-ready", "skipped")]
    assert "CUDAExecutionProvider" in rows[0].reason and "TensorRT is not installed" in rows[1].reason

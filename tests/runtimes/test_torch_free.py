"""bitdeploy.runtimes and the runtime CLI work where torch, onnx and nncf cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.experiments import FOLDER

BLOCKED = ("torch", "torchvision", "onnx", "onnxscript", "onnxslim", "nncf")

SCRIPT = """
import json, sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import torch` now raises ImportError
import bitdeploy.runtimes
light = sorted(m for m in ("onnxruntime", "openvino", "numpy.testing") if m in sys.modules)
assert not light, f"importing bitdeploy.runtimes pulled in {{light}}"
import bitdeploy.cli
from bitdeploy.runtimes import load, predictor
from bitdeploy.runtimes.serving import serve
from bitdeploy.runtimes.bundle import pack
from bitdeploy.runtimes.engines import ov
from bitdeploy.runtimes.engines import ort
sys.path.insert(0, {experiments!r})
import runtime_overhead, serve_load
with load({bundle!r}) as model:
    preds = model.predict([{image!r}], top_k=2)
from bitdeploy.cli import main
for args in (["predict", {bundle!r}, {image!r}, "--json"], ["inspect", {bundle!r}], ["pack", {bundle!r}, {pack!r}],
             ["predict", {pack!r}, {image!r}]):
    try:
        main(args)
    except SystemExit as exc:
        assert not exc.code, (args, exc.code)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {blocked!r} and sys.modules[m] is not None)
print(json.dumps({{"preds": preds, "heavy": heavy}}))
"""


def test_runtime_without_torch(ort_bundle: Path, image_dir: dict[str, Path], tmp_path: Path) -> None:
    code = SCRIPT.format(
        blocked=BLOCKED,
        experiments=str(FOLDER),
        bundle=str(ort_bundle),
        image=str(image_dir["photo_rgb"]),
        pack=str(tmp_path / "t.bitpack"),
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["heavy"] == []
    assert len(last["preds"]) == 1 and len(last["preds"][0]) == 2
    assert (tmp_path / "t.bitpack").is_file()
    assert '"predictions"' in proc.stdout and "checksums" in proc.stdout


def test_blocking_works() -> None:
    """The mechanism the test above relies on: a None entry in sys.modules makes the import fail."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['torch'] = None\ntry:\n import torch\nexcept ImportError:\n print('blocked')",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.strip() == "blocked"

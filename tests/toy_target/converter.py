"""The toy target's converter: the FP32 export, stored as `model.toy`, with the stamp its options carry."""

from __future__ import annotations

import shutil
from pathlib import Path

from bitdeploy.converters.base import Artifact, ConvertOptions, check_request
from bitdeploy.converters.calibration import CalibrationData
from bitdeploy.runtimes.manifest import TargetInfo

from .options import ToyOptions

MODEL_FILE = "model.toy"


def convert(
    onnx_fp32: Path, work_dir: Path, precision: str, calibration: CalibrationData | None, options: ConvertOptions
) -> Artifact:
    check_request("Toy", precision, calibration)
    shutil.copyfile(onnx_fp32, Path(work_dir) / MODEL_FILE)
    stamp = options.extras_for(ToyOptions).stamp
    target = TargetInfo("toy-engine", precision, "fp32", "cpu", details={"stamp": stamp})
    return Artifact(files=[MODEL_FILE], model_file=MODEL_FILE, target=target, notes=[f"toy stamp {stamp}"])

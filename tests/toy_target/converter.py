"""The toy target's converter: the FP32 export, stored as `model.toy`, with the stamp its options carry."""

from __future__ import annotations

import shutil
from pathlib import Path

from bitdeploy.converters.base import Artifact, Converter
from bitdeploy.converters.calibration import CalibrationData

from .options import ToyOptions

MODEL_FILE = "model.toy"


class ToyConverter(Converter):
    def run(
        self, onnx_fp32: Path, work_dir: Path, calibration: CalibrationData | None, float_layers: tuple[str, ...]
    ) -> Artifact:
        shutil.copyfile(onnx_fp32, work_dir / MODEL_FILE)
        stamp = self.options.extras_for(ToyOptions).stamp
        target = self.target_info("fp32", "cpu", details={"stamp": stamp})
        return Artifact(files=[MODEL_FILE], model_file=MODEL_FILE, target=target, notes=[f"toy stamp {stamp}"])

"""The converter contract's typed options: frozen, and each target reads only its own extras."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bitdeploy.converters.base import ConvertOptions, OpenVinoOptions, OrtOptions, TensorRTOptions


def test_convert_options_are_frozen() -> None:
    options = ConvertOptions(device="cpu", threads=2, extras=OrtOptions(int8_scheme="s8s8"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.device = "cuda"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.extras_for(OrtOptions).int8_scheme = "u8s8"  # type: ignore[misc]
    assert dataclasses.replace(options, device="cuda").device == "cuda" and options.device == "cpu"


def test_extras_for_returns_the_targets_own_or_its_defaults() -> None:
    trt = TensorRTOptions(batch="1,8,32", workspace_gb=2.0)
    options = ConvertOptions(cache_dir=Path("/tmp/c"), extras=trt)
    assert options.extras_for(TensorRTOptions) is trt
    # Another target's extras, or none at all: that target's defaults, never the foreign object.
    assert options.extras_for(OrtOptions) == OrtOptions() and OrtOptions().int8_scheme == "auto"
    assert options.extras_for(OpenVinoOptions) == OpenVinoOptions()
    assert OpenVinoOptions().validation is None and OpenVinoOptions().accuracy_control is False
    assert ConvertOptions().extras_for(TensorRTOptions) == TensorRTOptions(batch=None, workspace_gb=None)
    defaults = ConvertOptions()
    assert (
        defaults.device,
        defaults.threads,
        defaults.calib_method,
        defaults.cache,
        defaults.cache_dir,
        defaults.extras,
    ) == (None, None, None, True, None, None)

"""Fixtures shared by the converter tests: the tiny digits model and a calibration draw of its training images."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="module")
def tiny() -> Any:
    from tests.converters.tiny_digits import tiny_digits

    return tiny_digits()


@pytest.fixture(scope="module")
def calibration(tiny: Any) -> Any:
    from bitdeploy.converters import calibration as calib_mod
    from tests.converters.tiny_digits import RESOLUTION

    return calib_mod.from_image_set(tiny.train, RESOLUTION, size=128, seed=0, source="digits:train")

"""The toy target's own build options: one flag, validated before any work."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bitdeploy.converters.base import TargetOptions, option
from bitdeploy.core.errors import BitdeployError


@dataclass(frozen=True)
class ToyOptions(TargetOptions):
    stamp: str = option("--toy-stamp", "Toy: a word the converter records in the manifest's target details.", "none")

    def validate(self, precisions: Sequence[str], dataset: str | None) -> None:
        if not self.stamp.isalnum():
            raise BitdeployError(f"--toy-stamp {self.stamp!r} must be one word of letters and digits; pass e.g. v1")

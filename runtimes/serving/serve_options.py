"""What `bitdeploy serve` is asked for: one frozen record, light to import (the CLI builds it before the server's
own dependencies load)."""

from __future__ import annotations

from dataclasses import dataclass

from bitdeploy.core.errors import BitdeployError


@dataclass(frozen=True)
class ServeOptions:
    model_name: str | None = None  # default: the bundle's model name
    max_batch: int = 8
    max_delay_ms: float = 5.0
    workers: int = 2  # threads that parse and preprocess requests
    max_body: int = 16 << 20
    timeout: float = 30.0  # reading a body; waiting for the engine
    max_connections: int = 64
    keep_alive: float = 30.0
    drain_timeout: float = 30.0
    access_log: bool = False

    def validate(self) -> None:
        if self.workers < 1 or self.max_body < 1 or self.max_connections < 1 or self.timeout <= 0:
            raise BitdeployError("--workers, --max-body-mb, --timeout and --max-connections must be positive")

"""One error family. The CLI prints a BitdeployError as one line and exits 1 (no traceback unless --debug)."""


class BitdeployError(Exception):
    """A user-facing error: the message names the problem and the fix."""


class MissingDependencyError(BitdeployError):
    """An optional package is not installed; the message says which extra brings it."""

    def __init__(self, what: str, extra: str, reason: str = "") -> None:
        hint = f'pip install "bitdeploy[{extra}]"'
        msg = f"{what} is not installed{': ' + reason if reason else ''}; install it with: {hint}"
        super().__init__(msg)
        self.extra = extra


class WeightsError(BitdeployError):
    """Weights are missing, unreadable, or do not match the model."""


class DatasetError(BitdeployError):
    """A dataset spec or its contents are unusable."""


class BundleError(BitdeployError):
    """A bundle or pack is missing, corrupt, tampered with, or of an unknown format."""


class ImageError(BitdeployError):
    """An input image cannot be decoded."""


class ConversionError(BitdeployError):
    """A conversion step failed or its result does not match the reference."""


class AccuracyGateError(BitdeployError):
    """A built artifact lost more accuracy than --max-accuracy-drop allows."""


def require(module: str, extra: str, what: str | None = None):  # type: ignore[no-untyped-def]
    """Import an optional module or raise MissingDependencyError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(what or module, extra, str(exc).splitlines()[0] if str(exc) else "") from exc

"""The LiteRT INT8 conversion's calibrated ranges, kept so the INT8 search calibrates once.

PT2E's observers watch the float graph while calibrating (`prepare_pt2e` inserts them; nothing is quantized until
`convert_pt2e`), so the ranges of the layers a candidate keeps INT8 are the uniform conversion's own. The uniform
conversion saves every observer's state, by the name of the graph node it observes (the same in every export of the
model), beside its model (`RANGES_FILE`, not part of the bundle); a candidate loads them instead of calibrating.
Also the pieces every LiteRT INT8 route shares: the `Int8Step` it plugs in and the export's dynamic batch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bitdeploy.converters.calibration import CalibrationData
from bitdeploy.core.errors import ConversionError

# How an INT8 conversion quantizes the wrapped model (the calibrated route, or the fine-tune's, `litert_qat`): given
# (the model, the float module types, a sample, the output path) it writes the .tflite and returns (record, notes).
Int8Step = Callable[[Any, tuple[type, ...], Any, Path], tuple[dict[str, Any], list[str]]]

RANGES_FILE = "calibration_ranges.pt"  # the INT8 observers' states, beside the uniform model
OBSERVER = "activation_post_process"  # the prefix of PT2E's observer modules


def batch_dim(torch: Any) -> Any:
    """The dynamic batch every LiteRT export declares."""
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)


def observe(prepared: Any, calibration: CalibrationData | None, ranges: Path | None, batch_size: int) -> int:
    """Fill the observers, by the node each observes: from `ranges` if it exists (the uniform conversion's: they see
    the float graph, so a candidate's are the uniform's), else by calibrating, saved to `ranges` when given."""
    import torch

    nodes = [n for n in prepared.graph.nodes if n.op == "call_module" and str(n.target).startswith(OBSERVER)]
    observers = {n.args[0].name: getattr(prepared, n.target) for n in nodes}
    if ranges is not None and ranges.is_file():
        saved = torch.load(ranges, weights_only=True)
        if len(observers) == len(nodes) and set(observers) <= set(saved["states"]):
            for name, observer in observers.items():
                observer.load_state_dict(saved["states"][name])
            return int(saved["samples"])
    if calibration is None:
        raise ConversionError("the uniform INT8 conversion kept no calibration ranges and no calibration data came")
    with torch.no_grad():
        for x in calibration.batches(batch_size):
            prepared(torch.from_numpy(x))
    if ranges is not None and not ranges.exists() and len(observers) == len(nodes):
        states = {name: observer.state_dict() for name, observer in observers.items()}
        torch.save({"states": states, "samples": len(calibration)}, ranges)
    return len(calibration)

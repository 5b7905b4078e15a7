"""Weights for BiT models: Google's official `.npz` key scheme, bitdeploy checkpoints, and random init.

`load_model(name, weights)` is the one entry point: `weights` is "auto" (the official file, downloaded into
the cache), "none" (random initialisation), or a PATH (an official-format `.npz`, a bitdeploy `checkpoint.pt`,
or a training output directory holding one). Files are read without unpickling anything: `np.load` with
`allow_pickle=False` and `torch.load` with `weights_only=True`. Every problem is a one-line WeightsError.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bitdeploy.core.catalog import WS_EPS, BitVariant, get_variant
from bitdeploy.core.errors import BitdeployError, WeightsError, first_line
from bitdeploy.core.fsutil import temp_name
from bitdeploy.training import download
from bitdeploy.training.bit import ResNetV2, create_model

CHECKPOINT_FORMAT = "bitdeploy-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrap state_dict keys
_FIX = "pass an official BiT .npz, a bitdeploy checkpoint or training directory, auto, or none"


@dataclass
class LoadedModel:
    model: ResNetV2
    variant: BitVariant
    num_classes: int
    labels: list[str] | None
    resolution: int | None
    weights_info: dict[str, Any]


# --- Google's key scheme (as bit_pytorch/models.py loads it) ----------------------------------------------

_UNIT_RE = re.compile(r"body\.block(\d+)\.unit(\d+)\.(.+)")
_UNIT_PARTS = {
    "conv1.weight": "a/standardized_conv2d/kernel",
    "conv2.weight": "b/standardized_conv2d/kernel",
    "conv3.weight": "c/standardized_conv2d/kernel",
    "gn1.weight": "a/group_norm/gamma",
    "gn1.bias": "a/group_norm/beta",
    "gn2.weight": "b/group_norm/gamma",
    "gn2.bias": "b/group_norm/beta",
    "gn3.weight": "c/group_norm/gamma",
    "gn3.bias": "c/group_norm/beta",
    "downsample.weight": "a/proj/standardized_conv2d/kernel",
}
_TOP_PARTS = {
    "root.conv.weight": "resnet/root_block/standardized_conv2d/kernel",
    "head.gn.weight": "resnet/group_norm/gamma",
    "head.gn.bias": "resnet/group_norm/beta",
    "head.conv.weight": "resnet/head/conv2d/kernel",
    "head.conv.bias": "resnet/head/conv2d/bias",
}


def npz_key(state_key: str) -> str:
    """The npz key of one ResNetV2 state_dict key (module names follow the npz tree)."""
    if state_key in _TOP_PARTS:
        return _TOP_PARTS[state_key]
    m = _UNIT_RE.fullmatch(state_key)
    if m is None or m.group(3) not in _UNIT_PARTS:
        raise KeyError(state_key)
    return f"resnet/block{m.group(1)}/unit{m.group(2)}/{_UNIT_PARTS[m.group(3)]}"


def expected_shapes(variant: BitVariant, num_classes: int) -> dict[str, torch.Size]:
    """state_dict key -> shape, from a model built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = create_model(variant, num_classes)
    return {k: v.shape for k, v in model.state_dict().items()}


def _to_tf(t: torch.Tensor) -> np.ndarray:
    a = t.detach().cpu().float().numpy()
    return np.ascontiguousarray(a.transpose(2, 3, 1, 0)) if a.ndim == 4 else a  # OIHW -> HWIO


def _tf_shape(shape: torch.Size) -> tuple[int, ...]:
    return (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else tuple(shape)


def save_npz(model: torch.nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write a model's weights as an official-format BiT `.npz` (Google's keys, HWIO kernels), atomically."""
    arrays = {npz_key(k): _to_tf(v) for k, v in model.state_dict().items()}
    out = Path(path)
    tmp = temp_name(out)
    try:
        with open(tmp, "xb") as f:
            # mypy maps **arrays onto savez's allow_pickle too; the keys are npz names, never that one
            np.savez(f, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def read_npz(path: Path, fix: str = "download it again") -> dict[str, np.ndarray]:
    """All arrays of an npz, never unpickling; a truncated or foreign file is a one-line error."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic[:2] != b"PK" and magic != b"\x93NUMPY" and magic[:1] != b"\x80":  # zip, .npy, a pickle (refused below)
            raise WeightsError(
                f"{path}: not an .npz archive (no zip header); the file is corrupt or of another format, {fix}"
            )
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.ndarray):
            raise WeightsError(f"{path}: a single .npy array, not an .npz archive of named weights; {_FIX}")
        with data:
            return {k: data[k] for k in data.files}
    except WeightsError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, KeyError) as exc:
        reason = first_line(exc)
        if "allow_pickle" in reason:
            raise WeightsError(
                f"{path}: holds pickled Python objects, which are never loaded (allow_pickle=False); {_FIX}"
            ) from exc
        raise WeightsError(f"{path}: not a readable .npz ({reason}); the file is truncated or corrupt, {fix}") from exc


def _check_array(path: Path, key: str, a: np.ndarray, want: tuple[int, ...], variant: BitVariant) -> None:
    if tuple(a.shape) != want:
        raise WeightsError(
            f"{path}: key {key!r} has shape {tuple(a.shape)}, but {variant.name} needs {want}; is the file for another model?"
        )
    if not np.issubdtype(a.dtype, np.floating):
        raise WeightsError(f"{path}: key {key!r} holds {a.dtype} values, not floats; {_FIX}")
    if not np.isfinite(a).all():
        raise WeightsError(f"{path}: key {key!r} contains NaN or infinite values; the file is damaged, {_FIX}")


def state_dict_from_npz(
    arrays: Mapping[str, np.ndarray], variant: BitVariant, path: Path, num_classes: int | None = None
) -> tuple[dict[str, torch.Tensor], int, int]:
    """Map official npz arrays onto a ResNetV2 state_dict; returns (state_dict, num_classes, classes in file).

    The head size comes from the file. When `num_classes` differs, the body is loaded and the head starts
    at zero, as BiT fine-tuning does (zero_head).
    """
    bias_key = npz_key("head.conv.bias")
    if bias_key not in arrays:
        raise WeightsError(f"{path}: missing key {bias_key!r}; {_FIX}")
    if arrays[bias_key].ndim != 1:
        raise WeightsError(
            f"{path}: key {bias_key!r} has shape {tuple(arrays[bias_key].shape)}, expected (classes,); {_FIX}"
        )
    file_classes = int(arrays[bias_key].shape[0])
    nc = file_classes if num_classes is None else num_classes
    file_shapes = expected_shapes(variant, file_classes)
    wanted = {npz_key(k) for k in file_shapes}
    unexpected = sorted(set(arrays) - wanted)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise WeightsError(
            f"{path}: unexpected key {unexpected[0]!r}{more} for {variant.name}; is the file for another model? {_FIX}"
        )
    state: dict[str, torch.Tensor] = {}
    for skey, shape in file_shapes.items():
        key = npz_key(skey)
        if key not in arrays:
            raise WeightsError(
                f"{path}: missing key {key!r} for {variant.name}; the file is incomplete or for another model, {_FIX}"
            )
        a = arrays[key]
        _check_array(path, key, a, _tf_shape(shape), variant)
        a = a.astype(np.float32, copy=False)
        state[skey] = torch.from_numpy(
            np.ascontiguousarray(a.transpose(3, 2, 0, 1) if a.ndim == 4 else a)
        )  # HWIO -> OIHW
    if nc != file_classes:
        state["head.conv.weight"] = torch.zeros(nc, variant.width(2048), 1, 1)
        state["head.conv.bias"] = torch.zeros(nc)
    return state, nc, file_classes


def _build(variant: BitVariant, num_classes: int, state: dict[str, torch.Tensor], source: Path) -> ResNetV2:
    shapes = expected_shapes(variant, num_classes)
    for key in shapes:
        if key not in state:
            raise WeightsError(f"{source}: missing weights {key!r} for {variant.name}; {_FIX}")
        if state[key].shape != shapes[key]:
            raise WeightsError(
                f"{source}: weights {key!r} have shape {tuple(state[key].shape)}, but {variant.name} needs {tuple(shapes[key])}; is the file for another model?"
            )
    extra = sorted(set(state) - set(shapes))
    if extra:
        raise WeightsError(
            f"{source}: unexpected weights {extra[0]!r} for {variant.name}; is the file for another model?"
        )
    with torch.device("meta"):
        model = create_model(variant, num_classes)
    # assign=True adopts the loaded tensors instead of initialising and then overwriting large models.
    model.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


# --- bitdeploy checkpoints ------------------------------------------------------------------------------


def read_checkpoint(path: Path) -> tuple[Path, dict[str, Any]]:
    """The dict saved by `bitdeploy train`, read with weights_only=True (no arbitrary unpickling)."""
    file = path / CHECKPOINT_NAME if path.is_dir() else path
    if not file.is_file():
        raise WeightsError(f"{path}: no {CHECKPOINT_NAME} in this directory (is training finished?); {_FIX}")
    try:
        ck = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "forbidden object"
        raise WeightsError(
            f"{file}: refused: the file holds objects other than tensors and plain data ({first[:120]}); only bitdeploy checkpoints are loaded"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"{file}: not a readable checkpoint ({first[:120]}); the file is truncated or corrupt"
        ) from exc
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(f"{file}: not a bitdeploy checkpoint (no format {CHECKPOINT_FORMAT!r}); {_FIX}")
    if ck.get("version") != CHECKPOINT_VERSION:
        raise WeightsError(
            f"{file}: checkpoint version {ck.get('version')!r} is not supported (this bitdeploy reads {CHECKPOINT_VERSION}); upgrade bitdeploy"
        )
    if not isinstance(ck.get("model"), dict):
        raise WeightsError(f"{file}: checkpoint has no model state; {_FIX}")
    return file, ck


def _strip_wrappers(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _load_checkpoint(path: Path, variant: BitVariant, num_classes: int | None) -> LoadedModel:
    file, ck = read_checkpoint(path)
    name = ck.get("model_name")
    if name != variant.name:
        raise WeightsError(f"{file}: checkpoint is for model {name!r}, not {variant.name!r}; pass --model {name}")
    state = _strip_wrappers(ck["model"])
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise WeightsError(f"{file}: model state entry {bad!r} is not a tensor; the checkpoint is damaged")
    ck_classes = int(ck.get("num_classes") or state.get("head.conv.bias", torch.empty(0)).shape[0])
    nc = ck_classes if num_classes is None else num_classes
    labels = ck.get("labels")
    if nc != ck_classes:
        state["head.conv.weight"] = torch.zeros(nc, variant.width(2048), 1, 1)
        state["head.conv.bias"] = torch.zeros(nc)
        labels = None
    model = _build(variant, nc, state, file)
    resolution = ck.get("resolution")
    info = {
        "kind": "checkpoint",
        "source": str(file),
        "sha256": download.sha256_file(file),
        "step": ck.get("step"),
        "head": "loaded" if nc == ck_classes else f"zero-initialised (checkpoint has {ck_classes} classes)",
    }
    return LoadedModel(
        model,
        variant,
        nc,
        [str(x) for x in labels] if isinstance(labels, list) else None,
        int(resolution) if isinstance(resolution, int) else None,
        info,
    )


# --- entry point ----------------------------------------------------------------------------------------


def _kind_of(path: Path) -> str:
    if path.is_dir():
        return "checkpoint"
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return "npz"
    if suffix in (".pt", ".pth", ".ckpt"):
        return "checkpoint"
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        raise WeightsError(
            f"{path}: unrecognised weights file (neither an .npz nor a torch checkpoint); {_FIX}"
        ) from None
    if any(n.endswith("data.pkl") for n in names):
        return "checkpoint"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    raise WeightsError(
        f"{path}: unrecognised weights file (a zip archive, but neither an .npz nor a torch checkpoint); {_FIX}"
    )


def _load_npz(
    path: Path, variant: BitVariant, num_classes: int | None, source: str, sha256: str, fix: str
) -> LoadedModel:
    state, nc, file_classes = state_dict_from_npz(read_npz(path, fix), variant, path, num_classes)
    info = {
        "kind": "npz",
        "source": source,
        "sha256": sha256,
        "ws_eps": WS_EPS,
        "head": "loaded" if nc == file_classes else f"zero-initialised (file has {file_classes} classes)",
    }
    return LoadedModel(_build(variant, nc, state, path), variant, nc, None, None, info)


def load_model(
    model_name: str, weights: str | os.PathLike[str] = "auto", num_classes: int | None = None
) -> LoadedModel:
    """Build `model_name` with weights "auto" | "none" | PATH; the model is in eval mode on the CPU.

    `num_classes` None keeps the head of the weights (the upstream head for auto/none). A different size keeps
    the body and zero-initialises the head. "none" uses PyTorch's default initialisation (seed torch first).
    """
    variant = get_variant(model_name)
    if num_classes is not None and num_classes < 1:
        raise BitdeployError(f"--num-classes must be at least 1, got {num_classes}")
    spec = os.fspath(weights)
    if spec == "none":
        nc = variant.num_classes if num_classes is None else num_classes
        info: dict[str, Any] = {"kind": "none", "source": None, "sha256": None}
        return LoadedModel(create_model(variant, nc).eval(), variant, nc, None, None, info)
    if spec == "auto":
        if variant.hidden:
            raise WeightsError(
                f"model {variant.name!r} is a test configuration without official weights; pass --weights none or --weights PATH"
            )
        path, sha, url = download.fetch_official(variant)
        return _load_npz(path, variant, num_classes, url, sha, f"delete {path} and run again to re-download it")
    path = Path(spec).expanduser()
    if not path.exists():
        raise WeightsError(f"{spec}: no such file or directory; {_FIX}")
    if _kind_of(path) == "checkpoint":
        return _load_checkpoint(path, variant, num_classes)
    return _load_npz(
        path, variant, num_classes, str(path.resolve()), download.sha256_file(path), "download or copy it again"
    )

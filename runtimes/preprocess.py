"""Image decoding and preprocessing, exactly as the manifest says (and as training evaluates).

BiT's evaluation transform is a plain resize to the crop size (no centre crop), RGB, x/127.5 - 1
(mean = std = 0.5 after scaling to [0, 1]). Training uses `to_rgb` and `resize_to_array` from this
module for its evaluation split, so the runtime and the reference cannot drift apart.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from bitdeploy.core.errors import ImageError, first_line
from bitdeploy.runtimes.bundle.manifest import BIT_MEAN, BIT_STD, InputSpec

ImageInput = str | os.PathLike[str] | bytes | bytearray | Image.Image | np.ndarray

INTERPOLATION = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


def describe(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, (bytes, bytearray)):
        return f"<{len(image)} bytes>"
    return f"<{type(image).__name__}>"


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (16-bit and float modes are scaled, alpha is composited on black)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        maxval = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / maxval * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def decode(image: ImageInput) -> Image.Image:
    """Decode a path, bytes, PIL image or uint8 HWC/HW array into an RGB PIL image, or raise ImageError naming it."""
    name = describe(image)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ImageError(
                f"{name}: arrays must be uint8 HxW or HxWxC with C in 1, 3, 4 (got {image.dtype} {image.shape}); convert with .astype(np.uint8)"
            )
        arr = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
        return to_rgb(Image.fromarray(np.ascontiguousarray(arr)))
    try:
        if isinstance(image, (bytes, bytearray)):
            if not image:
                raise ImageError(f"{name}: empty image data; pass the bytes of an image file")
            src: Any = io.BytesIO(bytes(image))
        else:
            path = Path(image)
            if path.is_dir():
                raise ImageError(f"{path}: is a directory, not an image file; pass image files")
            if not path.is_file():
                raise ImageError(f"{path}: no such file; check the path")
            if path.stat().st_size == 0:
                raise ImageError(f"{path}: empty file (0 bytes); pass a valid image")
            src = path
        with Image.open(src) as img:
            img = ImageOps.exif_transpose(img) or img
            img.load()
            return to_rgb(img)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = first_line(exc)
        if isinstance(exc, UnidentifiedImageError):  # Pillow's text repeats the name, or a BytesIO repr for bytes
            reason = "not a recognised image format"
        raise ImageError(f"{name}: cannot decode image ({reason}); pass a valid JPEG/PNG/BMP/TIFF/WebP file") from exc


def resize_to_array(img: Image.Image, size: tuple[int, int], interpolation: str = "bilinear") -> np.ndarray:
    """Plain resize to (height, width) -> uint8 HWC array."""
    h, w = size
    if img.size != (w, h):
        img = img.resize((w, h), INTERPOLATION[interpolation])
    return np.asarray(img, dtype=np.uint8)


MEAN = BIT_MEAN
STD = BIT_STD


def mean_std(spec: InputSpec | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """An input spec's mean and std (BiT's when there is no spec)."""
    return (spec.mean, spec.std) if spec is not None else (MEAN, STD)


def normalize(hwc_uint8: np.ndarray, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) with (x/255 - mean)/std."""
    x = hwc_uint8.astype(np.float32) * np.float32(1.0 / 255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def preprocess(image: ImageInput, spec: InputSpec) -> np.ndarray:
    """One image -> float32 CHW tensor, following a manifest `input` spec."""
    if spec.resize is None:
        raise ImageError("the input spec has no resize; rebuild the bundle")
    arr = resize_to_array(decode(image), spec.resize, spec.interpolation)
    return normalize(arr, spec.mean, spec.std)


def input_spec(resolution: int) -> InputSpec:
    """The manifest `input` spec bitdeploy writes for a model evaluated at `resolution` pixels."""
    return InputSpec.square(resolution)

"""The runtime's preprocessing equals BiT's evaluation transform, on real images of several sizes and modes.

Reference: BiT's eval transform (google-research/big_transfer bit_pytorch/train.py: Resize((crop, crop)) with
PIL bilinear, ToTensor, Normalize(0.5, 0.5)), i.e. plain bilinear resize to the crop, RGB, x/127.5 - 1,
re-implemented here independently with Pillow + numpy in float64.

Tolerance: 1e-6 for every image whose mode Pillow converts to RGB directly (float32 rounding of x/127.5 - 1).
Two modes need a rule first, stated here and applied in the reference: alpha is composited on black, and
16-bit grayscale is scaled by 255/65535 (Pillow's own I;16 -> L conversion clips at 255 instead). Their
compositing/scaling is rounded to 8 bits in both implementations, so the same 1e-6 bound applies; one grey
level (1/127.5) would be the bound if the rounding differed, and the test reports the observed maximum.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from bitdeploy.runtimes.preprocess import decode, input_spec, normalize, preprocess, resize_to_array

from .conftest import VALID, digit_images, synth_photo

TOL = 1e-6


def reference_eval_transform(img: Image.Image, size: int) -> np.ndarray:
    img = ImageOps.exif_transpose(img)
    if img.mode == "I;16":
        a = np.asarray(img).astype(np.float64) * (255.0 / 65535.0)
        img = Image.fromarray(np.floor(a + 0.5).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        a = np.asarray(img.convert("RGBA")).astype(np.float64)
        rgb = a[..., :3] * a[..., 3:] / 255.0  # "over" an opaque black background
        img = Image.fromarray(np.floor(rgb + 0.5).astype(np.uint8), "RGB")
    img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    x = np.asarray(img).astype(np.float64) / 127.5 - 1.0
    return x.transpose(2, 0, 1)


@pytest.mark.parametrize("size", [32, 128])
@pytest.mark.parametrize("key", VALID)
def test_files_match_reference(image_dir: dict[str, Path], key: str, size: int) -> None:
    got = preprocess(image_dir[key], input_spec(size))
    with Image.open(image_dir[key]) as img:
        ref = reference_eval_transform(img, size)
    assert got.dtype == np.float32 and got.shape == (3, size, size)
    err = float(np.abs(got - ref).max())
    assert err <= TOL, f"{key}: max abs difference {err}"


def test_modes_are_what_the_test_claims(image_dir: dict[str, Path]) -> None:
    modes = {}
    for key in VALID:
        with Image.open(image_dir[key]) as img:
            modes[key] = img.mode
    assert modes["digit0_L"] == "L" and modes["photo_rgba"] == "RGBA" and modes["photo_p"] == "P"
    assert modes["photo_cmyk"] == "CMYK" and modes["gray16"] == "I;16" and modes["photo_rgb"] == "RGB"


def test_in_memory_inputs_match_reference() -> None:
    spec = input_spec(48)
    for arr in [*digit_images(5), synth_photo(300, 200, 11), synth_photo(7, 90, 12)]:
        ref = reference_eval_transform(Image.fromarray(arr), 48)
        for item in (arr, Image.fromarray(arr), arr[..., None] if arr.ndim == 2 else arr):
            assert float(np.abs(preprocess(item, spec) - ref).max()) <= TOL


def test_rgba_alpha_is_composited_not_dropped(image_dir: dict[str, Path]) -> None:
    got = preprocess(image_dir["photo_rgba"], input_spec(32))
    with Image.open(image_dir["photo_rgba"]) as img:
        dropped = (
            np.asarray(img.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)).astype(np.float64) / 127.5 - 1
        )
    assert np.abs(got - dropped.transpose(2, 0, 1)).max() > 0.5  # the transparent left edge is black, not the colour


def test_sixteen_bit_uses_full_range(image_dir: dict[str, Path]) -> None:
    x = preprocess(image_dir["gray16"], input_spec(32))
    assert x.min() < -0.95 and x.max() > 0.95  # Pillow's clipping conversion would saturate almost everything


def test_exif_orientation_is_applied(image_dir: dict[str, Path]) -> None:
    img = decode(image_dir["rotated"])
    assert img.size == (30, 50)  # stored 50 wide x 30 high, displayed rotated


def test_training_eval_batch_is_bitwise_identical(image_dir: dict[str, Path]) -> None:
    """Training evaluates through the same functions, so the arrays must be identical, not just close."""
    data = pytest.importorskip("bitdeploy.training.data")
    paths = [image_dir[k] for k in VALID]
    batch, labels = data.eval_batch(data.FileImageSet(paths, list(range(len(paths)))), 32)
    runtime = np.stack([preprocess(p, input_spec(32)) for p in paths])
    assert batch.dtype == np.float32 and np.array_equal(batch, runtime)
    assert labels.tolist() == list(range(len(paths)))


def test_building_blocks() -> None:
    arr = synth_photo(10, 20, 0)
    resized = resize_to_array(Image.fromarray(arr), (5, 7))
    assert resized.shape == (5, 7, 3) and resized.dtype == np.uint8
    assert np.array_equal(resize_to_array(Image.fromarray(arr), (10, 20)), arr)  # same size: untouched
    x = normalize(np.array([[[0, 255, 128]]], np.uint8))
    np.testing.assert_allclose(x[:, 0, 0], [-1.0, 1.0, 128 / 127.5 - 1], atol=1e-7)

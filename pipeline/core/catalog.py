"""The BiT model zoo as data: the 12 released variants (BIT bit_pytorch/models.py KNOWN_MODELS).

Pure data, no torch: `bitdeploy models` and option validation work on a device.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitdeploy.core.errors import BitdeployError

WEIGHTS_BASE_URL = "https://storage.googleapis.com/bit_models/"
UPSTREAM = {"s": "ILSVRC-2012 (1k)", "m": "ImageNet-21k"}
UPSTREAM_CLASSES = {"s": 1000, "m": 21843}
DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
WS_EPS = 1e-10  # StdConv eps of Google's bit_pytorch code (timm uses 1e-8)
DEFAULT_RESOLUTION = 128  # the BiT-HyperRule's crop for small images, used when nothing says otherwise


@dataclass(frozen=True)
class BitVariant:
    """One BiT architecture and its released weights."""

    name: str
    upstream: str  # "s" or "m"
    depth: int
    width_factor: float
    block_units: tuple[int, ...]
    hidden: bool = False  # test-only variants are not listed by `bitdeploy models`

    @property
    def num_classes(self) -> int:
        return UPSTREAM_CLASSES[self.upstream]

    @property
    def npz_name(self) -> str:
        wf = int(self.width_factor) if self.width_factor.is_integer() else self.width_factor
        return f"BiT-{self.upstream.upper()}-R{self.depth}x{wf}.npz"

    @property
    def url(self) -> str:
        return WEIGHTS_BASE_URL + self.npz_name

    def width(self, base: int) -> int:
        return int(base * self.width_factor)


def _official() -> dict[str, BitVariant]:
    out: dict[str, BitVariant] = {}
    for up in ("s", "m"):
        for depth, wf in ((50, 1), (50, 3), (101, 1), (101, 3), (152, 2), (152, 4)):
            name = f"{up}-r{depth}x{wf}"
            out[name] = BitVariant(name, up, depth, float(wf), DEPTHS[depth])
    return out


VARIANTS: dict[str, BitVariant] = _official()
# Tiny configurations for tests: same unit structure, one unit per block, half width (GN(32) still divides).
VARIANTS["tiny"] = BitVariant("tiny", "m", 14, 0.5, (1, 1, 1, 1), hidden=True)
VARIANTS["tiny-s"] = BitVariant("tiny-s", "s", 14, 0.5, (1, 1, 1, 1), hidden=True)

PUBLIC_NAMES = tuple(n for n, v in VARIANTS.items() if not v.hidden)


def get_variant(name: str) -> BitVariant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise BitdeployError(
            f"unknown model {name!r}; choose one of: {', '.join(PUBLIC_NAMES)} (see `bitdeploy models`)"
        ) from None


def count_params(variant: BitVariant, num_classes: int | None = None) -> int:
    """Parameters of the architecture, computed from the layer shapes (no torch)."""
    nc = variant.num_classes if num_classes is None else num_classes
    total = 3 * 7 * 7 * variant.width(64)
    cin = variant.width(64)
    for i, units in enumerate(variant.block_units):
        cout = variant.width(256 * 2**i)
        mid = cout // 4
        for u in range(units):
            c_in = cin if u == 0 else cout
            total += 2 * c_in + c_in * mid  # gn1 + conv1
            total += 2 * mid + 9 * mid * mid  # gn2 + conv2
            total += 2 * mid + mid * cout  # gn3 + conv3
            if u == 0:
                total += c_in * cout  # projection
        cin = cout
    total += 2 * cin + cin * nc + nc  # final GN + head
    return total


def count_macs(variant: BitVariant, resolution: int, num_classes: int | None = None) -> int:
    """Multiply-accumulates of the convolutions and the head for one image (no torch)."""
    nc = variant.num_classes if num_classes is None else num_classes
    s = (resolution + 2 * 3 - 7) // 2 + 1  # root conv, stride 2, pad 3
    macs = s * s * 3 * 49 * variant.width(64)
    s = (s + 2 - 3) // 2 + 1  # zero pad 1, max-pool 3 stride 2
    cin = variant.width(64)
    for i, units in enumerate(variant.block_units):
        cout = variant.width(256 * 2**i)
        mid = cout // 4
        for u in range(units):
            stride = 2 if (u == 0 and i > 0) else 1
            c_in = cin if u == 0 else cout
            s_out = (s + 2 - 3) // stride + 1
            macs += s * s * c_in * mid  # conv1 (1x1) at input size
            macs += s_out * s_out * 9 * mid * mid  # conv2 (3x3, carries the stride)
            macs += s_out * s_out * mid * cout  # conv3
            if u == 0:
                macs += s_out * s_out * c_in * cout  # projection (1x1, stride)
            s = s_out
        cin = cout
    return macs + cin * nc

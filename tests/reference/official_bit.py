"""Parity oracle: Google's BiT PyTorch model and its npz loader, transcribed from the description of
google-research/big_transfer `bit_pytorch/models.py`.

Used only by tests and by `benchmarks/experiments/parity_official.py`. It deliberately imports nothing from
bitdeploy, keeps the reference's structure (an optional `downsample` attribute, `load_from` that copies tensors
named by the npz tree through `tf2th`), and its only change is `int()` around the widths so fractional test widths
build.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class StdConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        v, m = torch.var_mean(w, dim=[1, 2, 3], keepdim=True, unbiased=False)
        w = (w - m) / torch.sqrt(v + 1e-10)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def conv3x3(cin: int, cout: int, stride: int = 1) -> StdConv2d:
    return StdConv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> StdConv2d:
    return StdConv2d(cin, cout, kernel_size=1, stride=stride, padding=0, bias=False)


def tf2th(conv_weights: np.ndarray) -> torch.Tensor:
    """HWIO kernels become OIHW; 1-D arrays are copied as they are."""
    if conv_weights.ndim == 4:
        conv_weights = conv_weights.transpose([3, 2, 0, 1])
    return torch.from_numpy(np.ascontiguousarray(conv_weights))


class PreActBottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, cmid: int, stride: int = 1) -> None:
        super().__init__()
        self.gn1 = nn.GroupNorm(32, cin)
        self.conv1 = conv1x1(cin, cmid)
        self.gn2 = nn.GroupNorm(32, cmid)
        self.conv2 = conv3x3(cmid, cmid, stride)
        self.gn3 = nn.GroupNorm(32, cmid)
        self.conv3 = conv1x1(cmid, cout)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or cin != cout:
            self.downsample = conv1x1(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.gn1(x))
        residual = x
        if hasattr(self, "downsample"):
            residual = self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.gn2(out)))
        out = self.conv3(self.relu(self.gn3(out)))
        return out + residual

    def load_from(self, weights: Mapping[str, np.ndarray], prefix: str = "") -> None:
        conv = "standardized_conv2d"
        with torch.no_grad():
            self.conv1.weight.copy_(tf2th(weights[f"{prefix}a/{conv}/kernel"]))
            self.conv2.weight.copy_(tf2th(weights[f"{prefix}b/{conv}/kernel"]))
            self.conv3.weight.copy_(tf2th(weights[f"{prefix}c/{conv}/kernel"]))
            self.gn1.weight.copy_(tf2th(weights[f"{prefix}a/group_norm/gamma"]))
            self.gn2.weight.copy_(tf2th(weights[f"{prefix}b/group_norm/gamma"]))
            self.gn3.weight.copy_(tf2th(weights[f"{prefix}c/group_norm/gamma"]))
            self.gn1.bias.copy_(tf2th(weights[f"{prefix}a/group_norm/beta"]))
            self.gn2.bias.copy_(tf2th(weights[f"{prefix}b/group_norm/beta"]))
            self.gn3.bias.copy_(tf2th(weights[f"{prefix}c/group_norm/beta"]))
            if hasattr(self, "downsample"):
                self.downsample.weight.copy_(tf2th(weights[f"{prefix}a/proj/{conv}/kernel"]))


def _block(units: int, cin: int, cout: int, cmid: int, stride: int) -> nn.Sequential:
    layers = [("unit01", PreActBottleneck(cin, cout, cmid, stride))]
    layers += [(f"unit{i:02d}", PreActBottleneck(cout, cout, cmid)) for i in range(2, units + 1)]
    return nn.Sequential(OrderedDict(layers))


class ResNetV2(nn.Module):
    def __init__(
        self, block_units: tuple[int, ...], width_factor: float, head_size: int = 21843, zero_head: bool = False
    ) -> None:
        super().__init__()
        wf = width_factor
        w = lambda c: int(c * wf)  # noqa: E731
        self.root = nn.Sequential(
            OrderedDict(
                [
                    ("conv", StdConv2d(3, w(64), kernel_size=7, stride=2, padding=3, bias=False)),
                    ("pad", nn.ConstantPad2d(1, 0)),
                    ("pool", nn.MaxPool2d(kernel_size=3, stride=2, padding=0)),
                ]
            )
        )
        self.body = nn.Sequential(
            OrderedDict(
                [
                    ("block1", _block(block_units[0], w(64), w(256), w(64), 1)),
                    ("block2", _block(block_units[1], w(256), w(512), w(128), 2)),
                    ("block3", _block(block_units[2], w(512), w(1024), w(256), 2)),
                    ("block4", _block(block_units[3], w(1024), w(2048), w(512), 2)),
                ]
            )
        )
        self.zero_head = zero_head
        self.head = nn.Sequential(
            OrderedDict(
                [
                    ("gn", nn.GroupNorm(32, w(2048))),
                    ("relu", nn.ReLU(inplace=True)),
                    ("avg", nn.AdaptiveAvgPool2d(output_size=1)),
                    ("conv", nn.Conv2d(w(2048), head_size, kernel_size=1, bias=True)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.body(self.root(x)))
        assert x.shape[-2:] == (1, 1)
        return x[..., 0, 0]

    def load_from(self, weights: Mapping[str, np.ndarray], prefix: str = "resnet/") -> None:
        with torch.no_grad():
            self.root.conv.weight.copy_(tf2th(weights[f"{prefix}root_block/standardized_conv2d/kernel"]))
            self.head.gn.weight.copy_(tf2th(weights[f"{prefix}group_norm/gamma"]))
            self.head.gn.bias.copy_(tf2th(weights[f"{prefix}group_norm/beta"]))
            if self.zero_head:
                nn.init.zeros_(self.head.conv.weight)
                nn.init.zeros_(self.head.conv.bias)
            else:
                self.head.conv.weight.copy_(tf2th(weights[f"{prefix}head/conv2d/kernel"]))
                self.head.conv.bias.copy_(tf2th(weights[f"{prefix}head/conv2d/bias"]))
            for bname, block in self.body.named_children():
                for uname, unit in block.named_children():
                    unit.load_from(weights, prefix=f"{prefix}{bname}/{uname}/")


KNOWN_UNITS = {"R50": (3, 4, 6, 3), "R101": (3, 4, 23, 3), "R152": (3, 8, 36, 3)}


def from_npz(path: str, block_units: tuple[int, ...], width_factor: float) -> ResNetV2:
    """Google's usage: build with the file's head size, then `load_from(np.load(path))`."""
    weights = np.load(path)
    head_size = weights["resnet/head/conv2d/bias"].shape[0]
    model = ResNetV2(block_units, width_factor, head_size=head_size)
    model.load_from(weights)
    return model.eval()


def random_npz(path: str, block_units: tuple[int, ...], width_factor: float, head_size: int, seed: int = 0) -> None:
    """Write an npz in Google's key scheme (HWIO kernels) with random weights, walking this module's own model.

    GroupNorm scales and shifts are random too, so a loader that swaps gamma and beta, or misses a transpose,
    changes the logits.
    """
    with torch.device("meta"):
        model = ResNetV2(block_units, width_factor, head_size=head_size)
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}

    def kernel(key: str, conv: nn.Conv2d) -> None:
        o, i, h, w = conv.weight.shape
        arrays[key] = rng.standard_normal((h, w, i, o), dtype=np.float32)

    def norm(prefix: str, gn: nn.GroupNorm) -> None:
        arrays[prefix + "gamma"] = rng.uniform(0.5, 1.5, gn.num_channels).astype(np.float32)
        arrays[prefix + "beta"] = (0.2 * rng.standard_normal(gn.num_channels)).astype(np.float32)

    kernel("resnet/root_block/standardized_conv2d/kernel", model.root.conv)
    for bname, block in model.body.named_children():
        for uname, unit in block.named_children():
            p = f"resnet/{bname}/{uname}/"
            for letter, conv, gn in (
                ("a", unit.conv1, unit.gn1),
                ("b", unit.conv2, unit.gn2),
                ("c", unit.conv3, unit.gn3),
            ):
                kernel(f"{p}{letter}/standardized_conv2d/kernel", conv)
                norm(f"{p}{letter}/group_norm/", gn)
            if hasattr(unit, "downsample"):
                kernel(f"{p}a/proj/standardized_conv2d/kernel", unit.downsample)
    norm("resnet/group_norm/", model.head.gn)
    c = model.head.conv.in_channels
    arrays["resnet/head/conv2d/kernel"] = (
        rng.standard_normal((1, 1, c, head_size), dtype=np.float32) / np.sqrt(c)
    ).astype(np.float32)
    arrays["resnet/head/conv2d/bias"] = (0.1 * rng.standard_normal(head_size)).astype(np.float32)
    with open(path, "wb") as f:
        np.savez(f, **arrays)

"""BiT ResNet-v2, exactly as Google's bit_pytorch/models.py (its npz key names, layers and epsilons).

Weight-standardised convolutions (biased variance, eps 1e-10), GroupNorm(32, eps 1e-5), pre-activation
bottlenecks with the stride on the 3x3, a root that zero-pads before a pad-0 max-pool, and a 1x1-conv head.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitdeploy.core.catalog import WS_EPS, BitVariant


class StdConv2d(nn.Conv2d):
    """Conv2d whose weight is standardised per output channel on every call."""

    eps: float = WS_EPS

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        v, m = torch.var_mean(w, dim=[1, 2, 3], keepdim=True, unbiased=False)
        return (w - m) / torch.sqrt(v + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


def conv3x3(cin: int, cout: int, stride: int = 1) -> StdConv2d:
    return StdConv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> StdConv2d:
    return StdConv2d(cin, cout, kernel_size=1, stride=stride, padding=0, bias=False)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck; the projection shares relu(gn1(x)) with conv1."""

    def __init__(self, cin: int, cout: int, cmid: int, stride: int = 1) -> None:
        super().__init__()
        self.gn1 = nn.GroupNorm(32, cin)
        self.conv1 = conv1x1(cin, cmid)
        self.gn2 = nn.GroupNorm(32, cmid)
        self.conv2 = conv3x3(cmid, cmid, stride)  # Original code has the stride on conv1; BiT puts it here.
        self.gn3 = nn.GroupNorm(32, cmid)
        self.conv3 = conv1x1(cmid, cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = conv1x1(cin, cout, stride) if (stride != 1 or cin != cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.gn1(x))
        residual = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.gn2(out)))
        out = self.conv3(self.relu(self.gn3(out)))
        return out + residual


class ResNetV2(nn.Module):
    """BiT ResNet-v2 for any head size. Input: NCHW float in [-1, 1]; output: logits (N, classes)."""

    def __init__(
        self, block_units: tuple[int, ...], width_factor: float, head_size: int, zero_head: bool = False
    ) -> None:
        super().__init__()
        wf = width_factor
        w = lambda c: int(c * wf)  # noqa: E731
        self.root = nn.Sequential(
            OrderedDict(
                [
                    ("conv", StdConv2d(3, w(64), kernel_size=7, stride=2, padding=3, bias=False)),
                    # Zero padding then a pad-0 pool: MaxPool2d(padding=1) pads with -inf, which is subtly not the same.
                    ("pad", nn.ConstantPad2d(1, 0.0)),
                    ("pool", nn.MaxPool2d(kernel_size=3, stride=2, padding=0)),
                ]
            )
        )
        blocks = []
        cin = w(64)
        for i, units in enumerate(block_units):
            cout, cmid = w(256 * 2**i), w(64 * 2**i)
            stride = 1 if i == 0 else 2
            unit_list = [
                (f"unit{j:02d}", PreActBottleneck(cin if j == 1 else cout, cout, cmid, stride if j == 1 else 1))
                for j in range(1, units + 1)
            ]
            blocks.append((f"block{i + 1}", nn.Sequential(OrderedDict(unit_list))))
            cin = cout
        self.body = nn.Sequential(OrderedDict(blocks))
        self.head = nn.Sequential(
            OrderedDict(
                [
                    ("gn", nn.GroupNorm(32, cin)),
                    ("relu", nn.ReLU(inplace=True)),
                    ("avg", nn.AdaptiveAvgPool2d(output_size=1)),
                    ("conv", nn.Conv2d(cin, head_size, kernel_size=1, bias=True)),
                ]
            )
        )
        self.num_features = cin
        self.head_size = head_size
        if zero_head:
            self.zero_head()

    def zero_head(self) -> None:
        """Zero the classifier's weight and bias (BiT-HyperRule fine-tunes from a zero head)."""
        conv = self.head.conv
        assert isinstance(conv, nn.Conv2d) and conv.bias is not None
        with torch.no_grad():
            conv.weight.zero_()
            conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.body(self.root(x)))
        return x.flatten(1)


def _pair(size: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d's stored (h, w) size, typed as its constructor takes it."""
    h, w = size
    return h, w


def create_model(variant: BitVariant, num_classes: int | None = None, zero_head: bool = False) -> ResNetV2:
    """Build a variant with `num_classes` outputs (default: its upstream head)."""
    nc = variant.num_classes if num_classes is None else num_classes
    return ResNetV2(variant.block_units, variant.width_factor, nc, zero_head=zero_head)


def fold_weight_standardization(model: ResNetV2) -> ResNetV2:
    """Return a copy whose StdConv2d layers are plain Conv2d holding the standardised weights.

    The computed weights are constants, so exporters see no per-inference weight statistics and quantizers
    see real weights.
    """
    import copy

    folded = copy.deepcopy(model).eval()

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, StdConv2d):
                padding = child.padding
                conv = nn.Conv2d(
                    child.in_channels,
                    child.out_channels,
                    _pair(child.kernel_size),
                    _pair(child.stride),
                    padding if isinstance(padding, str) else _pair(padding),
                    bias=child.bias is not None,
                )
                with torch.no_grad():
                    conv.weight.copy_(child.standardized_weight())
                    if child.bias is not None and conv.bias is not None:
                        conv.bias.copy_(child.bias)
                setattr(parent, name, conv)
            else:
                swap(child)

    swap(folded)
    return folded

"""Weight standardisation through one fused kernel while training.

`StdConv2d` computes (w - mean) / sqrt(var + eps) with `var_mean`, a subtraction and a division, and autograd
differentiates each of them: about a quarter of a CPU training step for R50x1 at small resolutions.
`batch_norm` over the weight viewed as (1, out_channels, fan_in) with `training=True` is the same formula
(biased variance, eps inside the square root, no affine) in one fused forward and backward kernel, about 3x
faster here; results agree to float rounding (~5e-7). The parameters and state_dict are untouched, so
checkpoints and exports see an ordinary ResNetV2.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitdeploy.training.bit import StdConv2d


def fused_standardized_weight(self: StdConv2d) -> torch.Tensor:
    w = self.weight
    return F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0, eps=self.eps).reshape_as(
        w
    )


def _forward(self: StdConv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(
        x, fused_standardized_weight(self), self.bias, self.stride, self.padding, self.dilation, self.groups
    )


def use_fused_standardization(model: nn.Module) -> int:
    """Route every StdConv2d of `model` through the fused form; returns how many layers were switched."""
    count = 0
    for module in model.modules():
        if isinstance(module, StdConv2d):
            module.forward = types.MethodType(_forward, module)  # type: ignore[method-assign]
            count += 1
    return count

"""Frozen batch norm that keeps its input's dtype.

torchvision's ``FrozenBatchNorm2d`` multiplies its input by a float32 scale, so under bf16 autocast
every convolution's output comes back as float32: the ResNet's elementwise work (the normalisation,
ReLU, the residual sums) then runs on float32 tensors twice the size, and each next convolution casts
its input back down, which at the paper's input sizes is much of the backbone's memory traffic. This
subclass computes the scale and shift in float32 from the frozen statistics, rounds them to the input's
dtype and applies both in one fused multiply-add, so a half-precision input gives a half-precision
output as autocast's own batch norm does. Float32 inputs get torchvision's computation, bit for bit.
The buffers, and so the state dict and checkpoints, are torchvision's.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import FrozenBatchNorm2d as _TorchvisionFrozenBatchNorm2d


class FrozenBatchNorm2d(_TorchvisionFrozenBatchNorm2d):
    """``torchvision.ops.FrozenBatchNorm2d`` whose output has its input's dtype (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.reshape(1, -1, 1, 1)
        bias = self.bias.reshape(1, -1, 1, 1)
        running_var = self.running_var.reshape(1, -1, 1, 1)
        running_mean = self.running_mean.reshape(1, -1, 1, 1)
        scale = weight * (running_var + self.eps).rsqrt()
        shift = bias - running_mean * scale
        if x.dtype == scale.dtype:
            return x * scale + shift  # torchvision's expression, so float32 results are unchanged
        return torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype))

"""oneDNN's fused convolutions on the CPU: conv+ReLU and conv+add+ReLU in one call each, for bf16 inference."""

from __future__ import annotations

import functools

import torch
from torch import nn


def fusable(x: torch.Tensor) -> bool:
    """Whether the fused calls apply to `x` (B, C, H, W): bf16 on the CPU, inference only (they have no autograd)."""
    # bf16: they skip two passes over memory per block (the tiny decoder 1.3x faster). Not fp32: there the gain is
    # ~10% and these ops cache per-shape oneDNN state that raised taef2's tiled decode peak from 923 to 1199 MB at
    # 2048x2048.
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and not torch.is_grad_enabled() and _bf16_kernels()


@functools.cache
def _bf16_kernels() -> bool:
    # oneDNN's bf16 kernels need AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT; elsewhere (an AVX2-only CPU) the fused ops
    # raise, while torch's own convolutions still run bf16.
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def conv_relu(c: nn.Conv2d, x: torch.Tensor, padding: list[int] | None = None) -> torch.Tensor:
    """relu(c(x)) in one call, with `c`'s padding or `padding`; (B, C, H, W) any range -> (B, C', H', W') >= 0."""
    return torch.ops.mkldnn._convolution_pointwise(x, c.weight, c.bias, padding or list(c.padding), list(c.stride),
                                                   list(c.dilation), c.groups, "relu", [], "")


def conv_add_relu(c: nn.Conv2d, x: torch.Tensor, other: torch.Tensor, into_other: bool = False,
                  padding: list[int] | None = None) -> torch.Tensor:
    """relu(c(x) + other) in one call, written over `other` if `into_other`, with `c`'s padding or `padding`;
    (B, C, H, W) -> (B, C', H', W')."""
    op = torch.ops.mkldnn._convolution_pointwise_ if into_other else torch.ops.mkldnn._convolution_pointwise
    args = (other, x) if into_other else (x, other)
    return op.binary(*args, c.weight, c.bias, padding or list(c.padding), list(c.stride), list(c.dilation), c.groups,
                     "add", 1.0, "relu", [], "")

"""oneDNN's convolutions on the CPU called directly, for inference: conv+ReLU and conv+add+ReLU in one call each, a
convolution written into a given tensor, and the plain convolution whatever the input's size."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


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


def onednn(x: torch.Tensor) -> bool:
    """Whether the calls here apply to `x` (B, C, H, W): fp32 (or bf16 where oneDNN has the kernels) on the CPU,
    inference only (they have no autograd), and not while traced, exported or compiled (they have no symbolic
    form: a traced or exported module keeps the plain layers)."""
    # The fused calls skip two passes over memory per block: the tiny decoder 1.3x faster in bf16, both halves ~1.1x
    # in fp32, with the module-by-module path's numbers.
    return x.device.type == "cpu" and not torch.is_grad_enabled() and torch.backends.mkldnn.is_available() and \
        (x.dtype == torch.float32 or x.dtype == torch.bfloat16 and _bf16_kernels()) and not _tracing()


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def conv_into(c: nn.Conv2d, x: torch.Tensor, out: torch.Tensor, relu: bool, padding: list[int] | None = None
              ) -> torch.Tensor:
    """out = c(x) + out, then ReLU if `relu`, written into `out` (a contiguous channels_last (B, C', H', W')), with
    `c`'s padding or `padding`; zero `out` first for the plain convolution (exactly its numbers in fp32)."""
    return torch.ops.mkldnn._convolution_pointwise_.binary(
        out, x, c.weight, c.bias, padding or list(c.padding), list(c.stride), list(c.dilation), c.groups, "add", 1.0,
        "relu" if relu else None, [], "" if relu else None)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int | tuple = 1,
           padding: int | tuple = 0) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, padding) (ungrouped, undilated), through oneDNN on the CPU whatever the size
    of `x` (B, C, H, W) in fp32 (or bf16 where oneDNN has the kernels), inference only; F.conv2d elsewhere."""
    # For one small image (under 20480 values) torch picks its own im2col convolution, whose sums round differently:
    # a band of a few rows would not give the numbers of the whole image.
    if onednn(x) and weight.dtype == x.dtype:
        s, p = _pair(stride), _pair(padding)
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, p, s, [1, 1], 1)
    return F.conv2d(x, weight, bias, stride, padding)


def _pair(v: int | tuple) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)

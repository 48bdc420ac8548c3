"""Backward ops rewritten as forward ops that standard ONNX and TFLite builtins have.

The core-aten decompositions leave ``convolution_backward``, ``avg_pool2d_backward`` and
``max_pool2d_with_indices_backward`` as single ops; the ONNX exporter cannot translate the first
two and litert-torch none of them. Both are
convolutions in disguise: the input gradient of a convolution is a transposed convolution with
the same weight, the weight gradient is a convolution of the input with the output gradient
(batch and channel axes swapped), and an average pool's input gradient is a transposed
convolution with a constant kernel; a max pool with non-overlapping windows routes each
window's gradient to the window's first maximum. Some gradients (BCE with logits) also allocate with
``empty_permuted``, which has no translation either. Cases outside these (grouped or
transposed convolutions, padded or ceil-mode pooling) return ``NotImplemented``, and the
exporter then reports the op.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch._decomp import core_aten_decompositions

__all__ = ["training_decompositions"]

aten = torch.ops.aten


def _output_padding(
    in_sizes: Sequence[int],
    out_sizes: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> list[int]:
    """What a transposed convolution must add to give back the forward input's size."""
    return [
        int(i) - ((int(o) - 1) * s - 2 * p + d * (k - 1) + 1)
        for i, o, k, s, p, d in zip(
            in_sizes, out_sizes, kernel, stride, padding, dilation, strict=True
        )
    ]


def _convolution_backward(
    grad_out: torch.Tensor,
    inp: torch.Tensor,
    weight: torch.Tensor,
    bias_sizes: Any,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
) -> Any:
    if transposed or groups != 1:
        return NotImplemented
    spatial = list(range(2, grad_out.ndim))
    kernel = [int(k) for k in weight.shape[2:]]
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        pad_out = _output_padding(
            inp.shape[2:], grad_out.shape[2:], kernel, stride, padding, dilation
        )
        grad_input = aten.convolution.default(
            grad_out, weight, None, stride, padding, dilation, True, pad_out, 1
        )
    if output_mask[1]:
        # Cross-correlate input and output gradient over the batch: batch becomes the
        # reduced channel axis, the forward stride becomes the dilation and vice versa.
        full = aten.convolution.default(
            inp.transpose(0, 1),
            grad_out.transpose(0, 1),
            None,
            dilation,
            padding,
            stride,
            False,
            [0] * len(kernel),
            1,
        ).transpose(0, 1)
        for axis, k in zip(spatial, kernel, strict=True):
            full = full.narrow(axis, 0, k)
        grad_weight = full
    if output_mask[2]:
        grad_bias = grad_out.sum(dim=[0, *spatial])
    return grad_input, grad_weight, grad_bias


def _avg_pool2d_backward(
    grad_out: torch.Tensor,
    inp: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: int | None,
) -> Any:
    kernel = list(kernel_size) * (2 if len(kernel_size) == 1 else 1)
    strides = list(stride or kernel) * (2 if len(stride or kernel) == 1 else 1)
    if any(padding) or ceil_mode or divisor_override is not None:
        return NotImplemented
    n, c, oh, ow = grad_out.shape
    ones = torch.full((1, 1, *kernel), 1.0 / (kernel[0] * kernel[1]), dtype=grad_out.dtype)
    pad_out = _output_padding(inp.shape[2:], (oh, ow), kernel, strides, [0, 0], [1, 1])
    per_channel = aten.convolution.default(
        grad_out.reshape(n * c, 1, oh, ow), ones, None, strides, [0, 0], [1, 1], True, pad_out, 1
    )
    return per_channel.reshape(inp.shape)


def _max_pool2d_with_indices_backward(
    grad_out: torch.Tensor,
    inp: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    ceil_mode: bool,
    indices: torch.Tensor,
) -> Any:
    kh, kw = (list(kernel_size) * 2)[:2] if len(kernel_size) == 1 else kernel_size
    strides = list(stride or (kh, kw))
    if strides != [kh, kw] or any(padding) or any(d != 1 for d in dilation) or ceil_mode:
        return NotImplemented
    # Non-overlapping windows: each window's gradient goes to its first maximum, found again
    # with argmax over the window (torch's pooling keeps the first maximum too). The forward's
    # ``indices`` are not used: litert-torch computes them differently (measured).
    n, c, h, w = inp.shape
    oh, ow = int(grad_out.shape[2]), int(grad_out.shape[3])
    windows = (
        inp[:, :, : oh * kh, : ow * kw]
        .reshape(n, c, oh, kh, ow, kw)
        .permute(0, 1, 2, 4, 3, 5)
        .reshape(n, c, oh, ow, kh * kw)
    )
    first_max = windows.argmax(dim=-1, keepdim=True) == torch.arange(kh * kw)
    grad = torch.where(first_max, grad_out.unsqueeze(-1), torch.zeros((), dtype=grad_out.dtype))
    grad = grad.reshape(n, c, oh, ow, kh, kw).permute(0, 1, 2, 4, 3, 5)
    grad = grad.reshape(n, c, oh * kh, ow * kw)
    return F.pad(grad, [0, int(w) - ow * kw, 0, int(h) - oh * kh])


def _empty_permuted(
    size: Sequence[int], physical_layout: Sequence[int], **kwargs: Any
) -> torch.Tensor:
    # Values of an empty tensor are unspecified and memory layout means nothing in a graph.
    return torch.zeros(size, dtype=kwargs.get("dtype"))


def training_decompositions() -> dict[Any, Callable[..., Any]]:
    """Core-aten decompositions plus the backward rewrites above."""
    table: dict[Any, Callable[..., Any]] = dict(core_aten_decompositions().items())
    table[aten.convolution_backward.default] = _convolution_backward
    table[aten.avg_pool2d_backward.default] = _avg_pool2d_backward
    table[aten.max_pool2d_with_indices_backward.default] = _max_pool2d_with_indices_backward
    table[aten.empty_permuted.default] = _empty_permuted
    return table

"""Backward ops rewritten as forward ops that standard ONNX and TFLite builtins have.

The core-aten decompositions leave ``convolution_backward``, the pooling backward ops and
``_adaptive_avg_pool2d_backward`` as single ops, which neither the ONNX exporter nor
litert-torch translates. They are convolutions and slices in disguise:

* convolution: the input gradient is a transposed convolution with the same weight (grouped
  too); the weight gradient is a convolution of the input with the output gradient (batch and
  channel axes swapped), or, for grouped and depthwise convolutions, one strided slice of the
  padded input per kernel tap multiplied with the output gradient and summed (a grouped
  convolution over the batch would need the batch size in a static attribute);
* average pooling: each window spreads its gradient divided by its divisor (computed from the
  static spatial sizes exactly as torch's kernel does, so padding, ``ceil_mode``,
  ``count_include_pad`` and ``divisor_override`` all hold) with a transposed convolution of a
  constant kernel;
* max pooling: each window's gradient goes to the window's first maximum, found with one
  strided slice of the ``-inf``-padded input per kernel tap, and is put back in place by a
  transposed convolution with one-hot kernels (overlapping, padded, dilated and ``ceil_mode``
  windows alike); the forward's ``indices`` are not used, litert-torch computes them
  differently (measured);
* adaptive average pooling: two constant averaging matrices, one per spatial axis.

Some gradients (BCE with logits) also allocate with ``empty_permuted``, which has no
translation either. Transposed convolutions return ``NotImplemented``, and the exporter then
reports the op.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
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
    if transposed:
        return NotImplemented
    spatial = list(range(2, grad_out.ndim))
    kernel = [int(k) for k in weight.shape[2:]]
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        pad_out = _output_padding(
            inp.shape[2:], grad_out.shape[2:], kernel, stride, padding, dilation
        )
        grad_input = aten.convolution.default(
            grad_out, weight, None, stride, padding, dilation, True, pad_out, groups
        )
    if output_mask[1] and groups != 1:
        grad_weight = _grouped_weight_grad(grad_out, inp, weight, stride, padding, dilation, groups)
    elif output_mask[1]:
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


def _strided_taps(
    padded: torch.Tensor,
    kernel: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    out_sizes: Sequence[int],
) -> list[torch.Tensor]:
    """For each kernel tap (row-major), the input elements it meets at every output position:
    a strided slice of the padded input, shaped like the output."""
    taps = []
    for offsets in _taps_of(kernel):
        index: list[slice] = [slice(None), slice(None)]
        for o, s, d, n in zip(offsets, stride, dilation, out_sizes, strict=True):
            index.append(slice(o * d, o * d + (n - 1) * s + 1, s))
        taps.append(padded[tuple(index)])
    return taps


def _grouped_weight_grad(
    grad_out: torch.Tensor,
    inp: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    kernel = [int(k) for k in weight.shape[2:]]
    out_sizes = [int(n) for n in grad_out.shape[2:]]
    c_out, c_in_g = int(weight.shape[0]), int(weight.shape[1])
    pads = [q for p in reversed(padding) for q in (int(p), int(p))]
    padded = F.pad(inp, pads) if any(pads) else inp
    g = grad_out.reshape(grad_out.shape[0], groups, c_out // groups, -1)
    # all taps at once: one product over batch and positions, within each group (one op for
    # the whole kernel instead of one per tap: a depthwise 3x3 kernel has nine)
    taps = torch.stack(_strided_taps(padded, kernel, stride, dilation, out_sizes), dim=-1)
    t = taps.reshape(taps.shape[0], groups, c_in_g, -1, len(_taps_of(kernel)))
    per_tap = torch.einsum("ngipk,ngop->goik", t, g)
    return per_tap.reshape(weight.shape)


def _taps_of(kernel: Sequence[int]) -> list[tuple[int, ...]]:
    return list(itertools.product(*(range(k) for k in kernel)))


def _place_windows(
    per_window: torch.Tensor,
    kernels: torch.Tensor,
    stride: Sequence[int],
    in_sizes: Sequence[int],
    padding: Sequence[int],
) -> torch.Tensor:
    """Scatter per-window values (``(N*C, taps, oh, ow)``) back onto the input grid with a
    transposed convolution whose kernel ``k`` places tap ``k``, then cut the padding off."""
    full = aten.convolution.default(
        per_window, kernels, None, list(stride), [0, 0], [1, 1], True, [0, 0], 1
    )
    for axis, (size, pad) in enumerate(zip(in_sizes, padding, strict=True), start=2):
        short = size + pad - int(full.shape[axis])
        if short > 0:
            widths = [0, 0] * (full.ndim - axis - 1) + [0, short]
            full = F.pad(full, widths)
        full = full.narrow(axis, pad, size)
    return full


def _pair(v: Sequence[int], default: Sequence[int] | None = None) -> list[int]:
    v = list(v) or list(default or [])
    return [int(e) for e in (v * 2 if len(v) == 1 else v)]


def _avg_divisors(
    in_sizes: Sequence[int],
    out_sizes: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    count_include_pad: bool,
    divisor_override: int | None,
) -> torch.Tensor:
    """Each output window's divisor, by torch's CPU kernel's rule (static sizes: a constant)."""
    axes = []
    for n_in, n_out, k, s, p in zip(in_sizes, out_sizes, kernel, stride, padding, strict=True):
        padded_len, valid_len = [], []
        for i in range(n_out):
            start, end = i * s - p, min(i * s - p + k, n_in + p)
            padded_len.append(end - start)
            valid_len.append(min(end, n_in) - max(start, 0))
        axes.append((padded_len, valid_len))
    if divisor_override:
        return torch.full(list(out_sizes), float(divisor_override))
    pick = 0 if count_include_pad else 1
    rows, cols = (torch.tensor(a[pick], dtype=torch.float32) for a in axes)
    return rows[:, None] * cols[None, :]


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
    kernel = _pair(kernel_size)
    strides = _pair(stride, kernel)
    pads = _pair(padding)
    n, c, oh, ow = grad_out.shape
    in_sizes = [int(d) for d in inp.shape[2:]]
    divisors = _avg_divisors(
        in_sizes, [int(oh), int(ow)], kernel, strides, pads, count_include_pad, divisor_override
    ).to(grad_out.dtype)
    ones = torch.ones((1, 1, *kernel), dtype=grad_out.dtype)
    per_window = (grad_out / divisors).reshape(n * c, 1, oh, ow)
    return _place_windows(per_window, ones, strides, in_sizes, pads).reshape(inp.shape)


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
    kernel = _pair(kernel_size)
    strides = _pair(stride, kernel)
    pads, dils = _pair(padding), _pair(dilation)
    n, c, h, w = inp.shape
    oh, ow = int(grad_out.shape[2]), int(grad_out.shape[3])
    in_sizes = [int(h), int(w)]
    # -inf padding never wins a window; extra padding at the end covers ceil_mode windows
    windows = zip((oh, ow), strides, kernel, dils, strict=True)
    reach = [(o - 1) * s + (k - 1) * d + 1 for o, s, k, d in windows]
    extra = [max(0, r - (size + 2 * p)) for r, size, p in zip(reach, in_sizes, pads, strict=True)]
    padded = F.pad(
        inp, [pads[1], pads[1] + extra[1], pads[0], pads[0] + extra[0]], value=float("-inf")
    )
    taps = torch.stack(_strided_taps(padded, kernel, strides, dils, (oh, ow)), dim=-1)
    count = kernel[0] * kernel[1]
    # torch's pooling keeps each window's first maximum, as argmax does
    first_max = taps.argmax(dim=-1, keepdim=True) == torch.arange(count)
    routed = torch.where(first_max, grad_out.unsqueeze(-1), torch.zeros((), dtype=grad_out.dtype))
    per_window = routed.permute(0, 1, 4, 2, 3).reshape(n * c, count, oh, ow)
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dils, strict=True)]
    # built in numpy: a constant of the graph (indexed assignment to a torch tensor would be
    # traced as scatter ops)
    one_hot = np.zeros((count, 1, *span), dtype=np.float32)
    for j, (ky, kx) in enumerate(itertools.product(range(kernel[0]), range(kernel[1]))):
        one_hot[j, 0, ky * dils[0], kx * dils[1]] = 1.0
    kernels = torch.from_numpy(one_hot).to(grad_out.dtype)
    return _place_windows(per_window, kernels, strides, in_sizes, pads).reshape(inp.shape)


def _adaptive_matrix(n_in: int, n_out: int, dtype: torch.dtype) -> torch.Tensor:
    """``(n_out, n_in)``: row i averages adaptive window i (torch's floor/ceil bounds)."""
    m = np.zeros((n_out, n_in), dtype=np.float64)  # a graph constant (see the max pool)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return torch.from_numpy(m).to(dtype)


def _adaptive_avg_pool2d_backward(grad_out: torch.Tensor, inp: torch.Tensor) -> Any:
    (oh, ow), (h, w) = (int(d) for d in grad_out.shape[2:]), (int(d) for d in inp.shape[2:])
    rows = _adaptive_matrix(h, oh, grad_out.dtype)
    cols = _adaptive_matrix(w, ow, grad_out.dtype)
    return torch.matmul(torch.matmul(rows.t(), grad_out), cols)


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
    table[aten._adaptive_avg_pool2d_backward.default] = _adaptive_avg_pool2d_backward
    table[aten.empty_permuted.default] = _empty_permuted
    return table

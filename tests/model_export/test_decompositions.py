"""The backward rewrites equal torch's own backward ops (autograd is the reference)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_export.decompositions import training_decompositions

aten = torch.ops.aten
TABLE = training_decompositions()


@pytest.mark.parametrize(
    ("shape", "kernel", "stride", "padding", "dilation"),
    [
        ((2, 3, 8, 8), 3, 1, 1, 1),
        ((1, 2, 9, 7), 3, 2, 0, 1),  # odd sizes: the transposed conv needs output padding
        ((3, 1, 10, 10), 2, 2, 1, 2),
        ((2, 4, 6, 6), 1, 1, 0, 1),
        ((2, 3, 11), 3, 2, 1, 1),  # 1-D
    ],
)
def test_convolution_backward_matches_autograd(shape, kernel, stride, padding, dilation) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    nd = len(shape) - 2
    w = torch.randn(5, shape[1], *([kernel] * nd), requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    conv = F.conv2d if nd == 2 else F.conv1d
    out = conv(x, w, b, stride=stride, padding=padding, dilation=dilation)
    g = torch.randn_like(out)
    want = torch.autograd.grad(out, (x, w, b), g)
    got = TABLE[aten.convolution_backward.default](
        g,
        x.detach(),
        w.detach(),
        [5],
        [stride] * nd,
        [padding] * nd,
        [dilation] * nd,
        False,
        [0] * nd,
        1,
        [True, True, True],
    )
    for name, a, e in zip(("input", "weight", "bias"), got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("shape", "c_out", "groups", "kernel", "stride", "padding", "dilation"),
    [
        ((2, 4, 7, 7), 8, 2, 3, 1, 1, 1),  # grouped
        ((3, 6, 8, 8), 6, 6, 3, 2, 1, 1),  # depthwise, strided
        ((2, 4, 9, 9), 8, 4, 3, 1, 2, 2),  # depthwise with a channel multiplier, dilated
        ((2, 6, 12), 6, 3, 5, 2, 2, 1),  # 1-D grouped
    ],
)
def test_grouped_convolution_backward_matches_autograd(
    shape, c_out, groups, kernel, stride, padding, dilation
) -> None:
    torch.manual_seed(1)
    nd = len(shape) - 2
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(
        c_out, shape[1] // groups, *([kernel] * nd), dtype=torch.float64, requires_grad=True
    )
    conv = F.conv2d if nd == 2 else F.conv1d
    out = conv(x, w, None, stride=stride, padding=padding, dilation=dilation, groups=groups)
    g = torch.randn_like(out)
    want = torch.autograd.grad(out, (x, w), g)
    got = TABLE[aten.convolution_backward.default](
        g,
        x.detach(),
        w.detach(),
        None,
        [stride] * nd,
        [padding] * nd,
        [dilation] * nd,
        False,
        [0] * nd,
        groups,
        [True, True, False],
    )
    for name, a, e in zip(("input", "weight"), got[:2], want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)


def test_transposed_convolution_is_left_to_the_exporter() -> None:
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 2, 3, 3)
    g = torch.randn(1, 2, 7, 7)
    got = TABLE[aten.convolution_backward.default](
        g, x, w, [2], [1, 1], [0, 0], [1, 1], True, [0, 0], 1, [True, True, True]
    )
    assert got is NotImplemented


@pytest.mark.parametrize(
    ("shape", "kernel", "stride", "padding", "ceil_mode", "include_pad", "divisor"),
    [
        ((2, 3, 8, 8), 2, 2, 0, False, True, None),
        ((1, 2, 9, 7), 3, 2, 0, False, True, None),
        ((2, 2, 7, 7), 3, 1, 1, False, True, None),  # padded, overlapping
        ((2, 2, 7, 7), 3, 1, 1, False, False, None),  # padding not counted
        ((1, 3, 8, 9), 3, 2, 1, True, True, None),  # ceil mode: a clipped last window
        ((1, 3, 8, 9), 3, 2, 1, True, False, None),
        ((1, 1, 6, 6), 2, 1, 0, False, True, 3),  # divisor override
    ],
)
def test_avg_pool2d_backward_matches_autograd(
    shape, kernel, stride, padding, ceil_mode, include_pad, divisor
) -> None:
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    out = F.avg_pool2d(x, kernel, stride, padding, ceil_mode, include_pad, divisor)
    g = torch.randn_like(out)
    (want,) = torch.autograd.grad(out, (x,), g)
    got = TABLE[aten.avg_pool2d_backward.default](
        g,
        x.detach(),
        [kernel, kernel],
        [stride, stride],
        [padding, padding],
        ceil_mode,
        include_pad,
        divisor,
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("shape", "kernel", "stride", "padding", "dilation", "ceil_mode"),
    [
        ((2, 3, 8, 8), 2, 2, 0, 1, False),
        ((1, 2, 9, 7), 2, 2, 0, 1, False),
        ((2, 1, 9, 9), 3, 3, 0, 1, False),
        ((2, 2, 9, 9), 3, 2, 1, 1, False),  # overlapping and padded (ResNet's stem pool)
        ((1, 2, 6, 6), 3, 1, 0, 1, False),  # overlapping, stride 1
        ((1, 2, 10, 10), 3, 1, 1, 2, False),  # dilated
        ((1, 2, 8, 7), 3, 2, 1, 1, True),  # ceil mode
    ],
)
def test_max_pool2d_backward_matches_autograd(
    shape, kernel, stride, padding, dilation, ceil_mode
) -> None:
    x = torch.randn(*shape)
    x[0, 0, :3, :3] = 0.0  # windows of ties: the gradient goes to torch's recorded index
    x.requires_grad_(True)
    out, indices = F.max_pool2d(
        x, kernel, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True
    )
    g = torch.randn_like(out)
    (want,) = torch.autograd.grad(out, (x,), g)
    got = TABLE[aten.max_pool2d_with_indices_backward.default](
        g,
        x.detach(),
        [kernel, kernel],
        [stride, stride],
        [padding, padding],
        [dilation, dilation],
        ceil_mode,
        indices,
    )
    # overlapping windows add gradients in another order than torch's kernel
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("shape", "out"), [((2, 3, 8, 8), (1, 1)), ((1, 2, 5, 7), (2, 3))])
def test_adaptive_avg_pool2d_backward_matches_autograd(shape, out) -> None:
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = F.adaptive_avg_pool2d(x, out)
    g = torch.randn_like(y)
    (want,) = torch.autograd.grad(y, (x,), g)
    got = TABLE[aten._adaptive_avg_pool2d_backward.default](g, x.detach())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

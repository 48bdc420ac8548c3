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


def test_grouped_convolution_is_left_to_the_exporter() -> None:
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3)
    g = torch.randn(1, 4, 3, 3)
    got = TABLE[aten.convolution_backward.default](
        g, x, w, [4], [1, 1], [0, 0], [1, 1], False, [0, 0], 4, [True, True, True]
    )
    assert got is NotImplemented


@pytest.mark.parametrize(
    ("shape", "kernel", "stride"), [((2, 3, 8, 8), 2, 2), ((1, 2, 9, 7), 3, 2)]
)
def test_avg_pool2d_backward_matches_autograd(shape, kernel, stride) -> None:
    x = torch.randn(*shape, requires_grad=True)
    out = F.avg_pool2d(x, kernel, stride)
    g = torch.randn_like(out)
    (want,) = torch.autograd.grad(out, (x,), g)
    got = TABLE[aten.avg_pool2d_backward.default](
        g, x.detach(), [kernel, kernel], [stride, stride], [0, 0], False, True, None
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "kernel"), [((2, 3, 8, 8), 2), ((1, 2, 9, 7), 2), ((2, 1, 9, 9), 3)]
)
def test_max_pool2d_backward_matches_autograd(shape, kernel) -> None:
    x = torch.randn(*shape)
    x[0, 0, :2, :2] = 0.0  # a window of ties: the gradient goes to torch's recorded index
    x.requires_grad_(True)
    out, indices = F.max_pool2d(x, kernel, return_indices=True)
    g = torch.randn_like(out)
    (want,) = torch.autograd.grad(out, (x,), g)
    got = TABLE[aten.max_pool2d_with_indices_backward.default](
        g, x.detach(), [kernel, kernel], [kernel, kernel], [0, 0], [1, 1], False, indices
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_overlapping_max_pool_is_left_to_the_exporter() -> None:
    x = torch.randn(1, 1, 6, 6)
    out, indices = F.max_pool2d(x, 3, stride=1, return_indices=True)
    got = TABLE[aten.max_pool2d_with_indices_backward.default](
        torch.ones_like(out), x, [3, 3], [1, 1], [0, 0], [1, 1], False, indices
    )
    assert got is NotImplemented

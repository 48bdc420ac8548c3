"""The traced-layer rewrites equal torch's own layers (autograd is the reference), and the
seeded dropout masks behave like dropout: the right rate, new masks for new seeds, the same
masks in torch and in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model_export.layers import LayerRewrites, dropout_mask
from model_export.tracing import export_onnx, trace


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.BatchNorm1d(5, momentum=0.3), (7, 5)),
        (nn.BatchNorm1d(4), (3, 4, 6)),
        (nn.BatchNorm2d(3, affine=False), (2, 3, 4, 5)),
    ],
)
def test_batch_norm_rewrite_matches_torch_in_training_mode(layer: nn.Module, shape) -> None:
    torch.manual_seed(0)
    layer = layer.double().train()
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(*shape, dtype=torch.float64)
    mean, var = layer.running_mean.clone(), layer.running_var.clone()
    start = mean.clone()
    names = {id(mean): "running_mean", id(var): "running_var"}
    params = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters()}
    with LayerRewrites(None, names) as rewrites:
        got = torch.func.functional_call(
            layer, {**params, "running_mean": mean, "running_var": var}, (x,)
        )
    got_grads = torch.autograd.grad(got, [x, *params.values()], g)
    want = layer(x)  # updates the layer's running statistics in place
    want_grads = torch.autograd.grad(want, [x, *layer.parameters()], g)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(rewrites.updated["running_mean"], layer.running_mean)
    torch.testing.assert_close(rewrites.updated["running_var"], layer.running_var)
    assert torch.equal(mean, start)  # returned, not mutated


@pytest.mark.parametrize(
    ("causal", "mask", "scale"), [(False, None, None), (True, None, 0.3), (False, "float", None)]
)
def test_attention_rewrite_matches_torch(causal: bool, mask: str | None, scale) -> None:
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    attn_mask = torch.randn(5, 5, dtype=torch.float64) if mask else None
    args = {"attn_mask": attn_mask, "is_causal": causal, "scale": scale}
    with LayerRewrites():
        got = F.scaled_dot_product_attention(q, k, v, **args)
    want = F.scaled_dot_product_attention(q, k, v, **args)
    g = torch.randn_like(want)
    torch.testing.assert_close(got, want)
    for a, b in zip(
        torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g), strict=True
    ):
        torch.testing.assert_close(a, b)


def test_rewrites_are_undone_on_exit() -> None:
    before = (F.batch_norm, F.dropout, F.scaled_dot_product_attention)
    with LayerRewrites(), LayerRewrites():
        assert F.dropout is not before[1]
    assert (F.batch_norm, F.dropout, F.scaled_dot_product_attention) == before


def test_training_dropout_without_a_seed_is_an_error() -> None:
    with LayerRewrites(), pytest.raises(RuntimeError, match="seed"):
        F.dropout(torch.ones(3), 0.5, training=True)
    with LayerRewrites():  # eval mode and p = 0 need none
        assert torch.equal(F.dropout(torch.ones(3), 0.5, training=False), torch.ones(3))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_mask_keeps_the_right_fraction(p: float) -> None:
    like = torch.zeros(200, 250)
    n = like.numel()
    masks = [dropout_mask(like, p, torch.tensor(s), layer=0) for s in range(4)]
    for m in masks:
        kept_values = m[m > 0]
        torch.testing.assert_close(kept_values, torch.full_like(kept_values, 1 / (1 - p)))
        kept = float((m > 0).float().mean())
        # binomial: 5 standard deviations around 1 - p
        assert abs(kept - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n)
    # new seeds give new masks whose overlap is what independence predicts
    a, b = (masks[0] > 0).float(), (masks[1] > 0).float()
    both = float((a * b).mean())
    assert abs(both - (1 - p) ** 2) < 5 * np.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / n)
    # neighbouring elements are not correlated (a lattice pattern would be)
    rows = (masks[2] > 0).float().reshape(-1)
    pair = float((rows[:-1] * rows[1:]).mean())
    assert abs(pair - (1 - p) ** 2) < 5 * np.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / n)


def test_dropout_masks_differ_by_layer_and_repeat_by_seed() -> None:
    like = torch.zeros(1000)
    first = dropout_mask(like, 0.5, torch.tensor(7), layer=0)
    assert torch.equal(first, dropout_mask(like, 0.5, torch.tensor(7), layer=0))
    assert not torch.equal(first, dropout_mask(like, 0.5, torch.tensor(7), layer=1))
    assert not torch.equal(first, dropout_mask(like, 0.5, torch.tensor(8), layer=0))


def test_dropout_mask_is_the_same_in_onnx_runtime(tmp_path: Path) -> None:
    """Integer ops only: ORT computes bit-for-bit the mask torch computes, for any batch."""
    ort = pytest.importorskip("onnxruntime")

    def masked(x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        return x * dropout_mask(x, 0.3, seed, layer=2)

    example = [torch.ones(11, 6), torch.tensor(5, dtype=torch.int64)]
    gm = trace(masked, example, "mask graph")
    path = tmp_path / "mask.onnx"
    export_onnx(
        gm,
        example,
        path,
        input_names=["x", "seed"],
        output_names=["out"],
        batch_inputs=("x",),
        what="mask graph",
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n, seed in ((11, 5), (40, 123456789), (1, 2**31 - 1)):
        x = np.ones((n, 6), np.float32)
        (got,) = session.run(None, {"x": x, "seed": np.asarray(seed, np.int64)})
        want = masked(torch.from_numpy(x), torch.tensor(seed)).numpy()
        np.testing.assert_array_equal(got, want)

"""Layers rewritten while a graph is traced, so that they become standard ONNX/TFLite ops.

Some layers reach kernels that no exporter translates, or do something a pure step graph
cannot hold; :class:`LayerRewrites` (active only while a graph is traced)
replaces them by their textbook formulas in plain tensor ops, which autograd then
differentiates like any other (each is checked against torch's own layer in
``tests/model_export/test_layers.py``):

* ``F.batch_norm`` in training mode: normalise with the batch statistics and *return* the new
  running statistics (torch updates them in place, a mutation no step graph can hold); the
  step graph hands them out as ``buffers_out.<name>``. torch's running variance uses the
  unbiased batch variance, the normalisation the biased one: the same here.
* ``F.scaled_dot_product_attention`` (what ``nn.MultiheadAttention`` and transformer layers
  call): the math path, ``softmax(q k^T * scale + mask) v``; torch's CPU kernel is a flash
  attention whose backward has no ONNX translation.
* ``F.linear`` on inputs of more than two dimensions: folded to 2-D explicitly, so that the
  batch axis stays symbolic (see ``_linear``).
* ``F.dropout`` (and ``dropout1d/2d/3d``, ``alpha_dropout`` refused) in training mode: a mask
  from a counter-based hash of the element index, the layer's position and the step's ``seed``
  input, computed with 64-bit integer ops that are exact in every runtime; the runtime's own
  random ops have no seed input, so masks could not change from step to step otherwise.

Two switches go with them (:func:`tracing_context`): oneDNN is off, so ``nn.LSTM``/``nn.GRU``
decompose into matrix products instead of ``aten.mkldnn_rnn_layer``, and the fused
multi-head-attention fast path of eval mode is off, so attention goes through the rewrite.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["LayerRewrites", "dropout_mask", "tracing_context"]

_MASK32 = (1 << 32) - 1
_MIX = 0x45D9F3B  # the multiplier of a well-mixing 32-bit integer hash (two rounds)


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of ``h`` (int64 holding values in [0, 2^32)); every product stays
    below 2^59, so int64 arithmetic is exact and no runtime's overflow behaviour matters."""
    h = torch.bitwise_and(
        torch.bitwise_xor(h, torch.div(h, 65536, rounding_mode="floor")) * _MIX, _MASK32
    )
    h = torch.bitwise_and(
        torch.bitwise_xor(h, torch.div(h, 65536, rounding_mode="floor")) * _MIX, _MASK32
    )
    return torch.bitwise_xor(h, torch.div(h, 65536, rounding_mode="floor"))


def dropout_mask(like: torch.Tensor, p: float, seed: torch.Tensor, layer: int) -> torch.Tensor:
    """The scaled keep-mask (0 or ``1/(1-p)``) of dropout layer number ``layer`` for ``seed``.

    Element ``i`` is kept when ``hash(i + hash(seed, layer)) >= p * 2^32``: independent of the
    runtime, a pure function of the element's index, the layer and the seed."""
    key = _mix32(torch.bitwise_and(seed.to(torch.int64) * 1024 + layer, _MASK32))
    index = torch.arange(like.numel(), dtype=torch.int64).reshape(like.shape)
    bits = _mix32(torch.bitwise_and(index + key, _MASK32))
    keep = bits >= int(p * 2**32)
    return keep.to(like.dtype) * (1.0 / (1.0 - p))


def _batch_norm_train(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    momentum: float,
    eps: float,
    running: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    dims = [0, *range(2, x.ndim)]
    mean = x.mean(dim=dims, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dim=dims, keepdim=True)
    shape = [1, -1] + [1] * (x.ndim - 2)
    out = centred * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    if running is None:
        return out, None
    # the count as a tensor: the batch axis is symbolic, and a batch of one example over
    # (N, C) features (which torch refuses to train) must give a variance of 0, not 0/0
    count = torch.ones_like(x.select(1, 0)).sum()
    with torch.no_grad():
        unbiased = var.reshape(-1).detach() * (count / torch.clamp(count - 1, min=1))
        new_mean = running[0] * (1 - momentum) + mean.reshape(-1).detach() * momentum
        new_var = running[1] * (1 - momentum) + unbiased * momentum
    return out, (new_mean, new_var)


def _sdpa_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout: Callable[[torch.Tensor, float], torch.Tensor],
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> torch.Tensor:
    if enable_gqa and q.shape[-3] != k.shape[-3]:
        repeat = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(repeat, dim=-3)
        v = v.repeat_interleave(repeat, dim=-3)
    factor = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * factor
    lq, lk = q.shape[-2], k.shape[-2]
    if is_causal:
        allowed = torch.ones(lq, lk, dtype=torch.bool).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        weights = dropout(weights, dropout_p)
    return torch.matmul(weights, v)


_REWRITTEN = (
    "linear",
    "batch_norm",
    "scaled_dot_product_attention",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "alpha_dropout",
    "feature_alpha_dropout",
)
# torch's own functions, for the cases the rewrites pass through
_ORIGINAL: dict[str, Callable[..., Any]] = {name: getattr(F, name) for name in _REWRITTEN}


class LayerRewrites:
    """The rewrites above, for one trace (a context manager). ``seed``: the step's seed input
    (None: a graph without one; a training-mode dropout then raises). ``buffers``: the
    running-statistics tensors the traced call was given, by identity; their new values are
    collected in ``updated`` (name -> tensor) as batch norm layers run.

    The rewrites replace the functions in ``torch.nn.functional`` while active (layers and
    ``F.multi_head_attention_forward`` look them up there at call time); a torch function
    mode would not see the calls nested inside other functional ones."""

    def __init__(
        self, seed: torch.Tensor | None = None, buffers: dict[int, str] | None = None
    ) -> None:
        self.seed = seed
        self.buffers = buffers or {}
        self.updated: dict[str, torch.Tensor] = {}
        self.dropout_layers = 0
        self._saved: list[dict[str, Any]] = []

    def __enter__(self) -> LayerRewrites:
        self._saved.append({name: getattr(F, name) for name in _REWRITTEN})
        F.linear = self._linear  # type: ignore[assignment]
        F.batch_norm = self._batch_norm  # type: ignore[assignment]
        F.scaled_dot_product_attention = self._attention  # type: ignore[assignment]
        F.dropout = self._dropout_call  # type: ignore[assignment]
        for name in ("dropout1d", "dropout2d", "dropout3d"):
            setattr(F, name, self._channel_dropout)
        for name in ("alpha_dropout", "feature_alpha_dropout"):
            setattr(F, name, self._refuse_alpha(name))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._saved.pop().items():
            setattr(F, name, fn)

    def _mask(self, like: torch.Tensor, p: float) -> torch.Tensor:
        if self.seed is None:
            raise RuntimeError("a training-mode dropout needs the step's seed input")
        layer = self.dropout_layers
        self.dropout_layers += 1
        return dropout_mask(like, p, self.seed, layer)

    def _dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        return x * self._mask(x, p)

    @staticmethod
    def _linear(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Batched inputs folded to 2-D first: under the gradient transform, torch's own
        folding reads the sizes as integers and fixes the batch axis (measured on a transformer
        feed-forward block: its step graph came out with batch 11 only)."""
        if x.dim() <= 2:
            return _ORIGINAL["linear"](x, weight, bias)
        out = _ORIGINAL["linear"](x.reshape(-1, x.shape[-1]), weight, bias)
        return out.reshape(*x.shape[:-1], weight.shape[0])

    def _batch_norm(
        self,
        x: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        training: bool = False,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> torch.Tensor:
        if not training:
            return _ORIGINAL["batch_norm"](
                x, running_mean, running_var, weight, bias, False, momentum, eps
            )
        running = None
        if running_mean is not None and running_var is not None:
            # a layer called twice in one pass updates its statistics twice, as torch does
            running = (
                self.updated.get(self.buffers.get(id(running_mean), ""), running_mean),
                self.updated.get(self.buffers.get(id(running_var), ""), running_var),
            )
        out, new = _batch_norm_train(x, weight, bias, momentum, eps, running)
        if new is not None and running_mean is not None and running_var is not None:
            for tensor, value in zip((running_mean, running_var), new, strict=True):
                name = self.buffers.get(id(tensor))
                if name is None:
                    raise RuntimeError("a batch norm layer's running statistics are not buffers")
                self.updated[name] = value
        return out

    def _attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        return _sdpa_math(
            q, k, v, attn_mask, self._dropout, dropout_p, is_causal, scale, enable_gqa
        )

    def _dropout_call(
        self, x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
    ) -> torch.Tensor:
        if not training or p == 0:
            return x
        return x * 0 if p == 1 else self._dropout(x, p)

    def _channel_dropout(
        self, x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
    ) -> torch.Tensor:
        """``dropout1d/2d/3d``: one mask entry per (example, channel), broadcast."""
        if not training or p == 0:
            return x
        keep = torch.zeros([*x.shape[:2], *([1] * (x.ndim - 2))], dtype=x.dtype)
        return x * 0 if p == 1 else x * self._mask(keep, p)

    @staticmethod
    def _refuse_alpha(name: str) -> Callable[..., torch.Tensor]:
        def call(
            x: torch.Tensor, p: float = 0.5, training: bool = False, inplace: bool = False
        ) -> torch.Tensor:
            if training and p > 0:
                raise NotImplementedError(
                    f"{name} in training mode has no seeded rewrite; use nn.Dropout"
                )
            return x

        return call


@contextlib.contextmanager
def tracing_context() -> Iterator[None]:
    """oneDNN off (recurrent layers as matrix products) and the fused attention fast path off."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.backends.mkldnn.flags(enabled=False):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)

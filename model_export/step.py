"""The portable train step as plain torch functions of tensors, ready to be traced.

Two forms of the step (the ONNX/TFLite input and output names are in ``edge_sdk.bundle``)::

    split step, ONNX:  step(params.<p>..., buffers.<b>..., state.<s>[.<p>]..., x, y, lr[, seed]
                            [, anchor.<p>..., mu])
                         -> (loss, params_out.<p>..., buffers_out.<b>..., state_out.<s>[.<p>]...)
    flat step, TFLite: step(params, *state, x, y, lr[, seed], anchor, mu, weight)
                         -> (loss, params_out, *state_out)
    eval(params, x, y) -> (loss, output)
    infer(params, x) -> output

The split step takes every trainable parameter (and its optimizer state) as its own tensor, so
the graph neither splits a flat vector nor concatenates gradients (the trainer binds views of
its flat vector instead), and comes in two variants, without the FedProx inputs (FedAvg) and
with them, so that FedAvg does not pay for the term. Each pass over all parameters is a large
part of a small model's step (measured in docs/benchmarks.md "## Train step"). The flat step
and eval and infer take ONE flat float32 vector in the manifest layout (``named_parameters()``
order, then the running statistics) and split it inside; frozen parameters and other buffers
are baked in as constants. ``buffers`` are batch norm running statistics, carried like
optimizer state; ``seed`` drives the dropout masks (:mod:`model_export.layers`, which also
rewrites the layers no exporter translates while the functions are traced).

``loss`` is the data loss of the batch before the update. The FedProx term
``mu/2 * ||params - anchor||^2`` is added to the gradient (``mu * (params - anchor)``) before the
optimizer, exactly as autograd on the penalised loss would, so it holds for every optimizer;
``mu = 0`` disables it. ``weight`` (TFLite graphs only, whose batch is fixed) is a per-example
0/1 mask: the loss is the weighted mean, so a short batch is padded without changing the step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value

from model_export.config import OptimizerConfig
from model_export.layers import LayerRewrites

__all__ = ["StepFunctions", "data_loss"]


def data_loss(
    loss: str, out: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean loss over the batch (weighted mean over examples when ``weight`` is given)."""
    if weight is None:
        if loss == "cross_entropy":
            # F.cross_entropy's ignore_index handling adds about ten ops to the graph (masks,
            # a count of valid labels) that the trainers' label check makes unnecessary; this
            # is the same mean of -log p[y] in fewer ops (measured: 48 -> 39 ops, -4% step time)
            picked = torch.gather(F.log_softmax(out, dim=1), 1, y.long().unsqueeze(1))
            return -picked.mean()
        if loss == "mse":
            return F.mse_loss(out, y)
        return F.binary_cross_entropy_with_logits(out, y)
    if loss == "cross_entropy":
        per_example = F.cross_entropy(out, y.long(), reduction="none")
    else:
        fn = F.mse_loss if loss == "mse" else F.binary_cross_entropy_with_logits
        per_example = fn(out, y, reduction="none").reshape(out.shape[0], -1).mean(dim=1)
    return (per_example * weight).sum() / weight.sum()


@dataclass
class StepFunctions:
    """Functional step/eval/infer for one model, loss and optimizer.

    ``buffers`` name the running statistics (batch norm) the step carries as state: the split
    step takes them after the parameters and returns their new values after the new
    parameters; eval and infer take them at the end of their flat ``params`` vector. With
    ``seeded``, the step graphs take a ``seed`` input after ``lr`` for their dropout masks
    (:mod:`model_export.layers`)."""

    model: nn.Module
    names: Sequence[str]
    shapes: Sequence[tuple[int, ...]]
    loss: str
    optimizer: OptimizerConfig
    buffers: Sequence[str] = ()
    buffer_shapes: Sequence[tuple[int, ...]] = ()
    seeded: bool = False

    @property
    def sizes(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in (*self.shapes, *self.buffer_shapes)]

    def _unflatten(self, params: torch.Tensor) -> list[torch.Tensor]:
        """Trainable parameters and buffers from a flat model vector."""
        shapes = [*self.shapes, *self.buffer_shapes]
        return [p.reshape(s) for p, s in zip(torch.split(params, self.sizes), shapes, strict=True)]

    def _forward(
        self,
        pieces: Sequence[torch.Tensor],
        x: torch.Tensor,
        buffers: Sequence[torch.Tensor] = (),
        seed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The model's output and its buffers' values after the call."""
        out, rewrites = self._run(pieces, x, buffers, seed)
        return out, [rewrites.updated.get(n, b) for n, b in zip(self.buffers, buffers, strict=True)]

    def _run(
        self,
        pieces: Sequence[torch.Tensor],
        x: torch.Tensor,
        buffers: Sequence[torch.Tensor],
        seed: torch.Tensor | None,
    ) -> tuple[torch.Tensor, LayerRewrites]:
        rewrites = LayerRewrites(
            seed, {id(b): n for n, b in zip(self.buffers, buffers, strict=True)}
        )
        tensors = {
            **dict(zip(self.names, pieces, strict=True)),
            **dict(zip(self.buffers, buffers, strict=True)),
        }
        with rewrites:
            out: torch.Tensor = functional_call(self.model, tensors, (x,))
        return out, rewrites

    def dropout_layers(self, x: torch.Tensor) -> int:
        """How many training-mode dropouts one forward pass of the model runs (the step graphs
        need a ``seed`` input when there are any)."""
        params, buffers = dict(self.model.named_parameters()), dict(self.model.named_buffers())
        with torch.no_grad():
            _, rewrites = self._run(
                [params[n] for n in self.names],
                x,
                [buffers[n].clone() for n in self.buffers],
                torch.zeros((), dtype=torch.int64),
            )
        return rewrites.dropout_layers

    def infer(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        pieces = self._unflatten(params)
        k = len(self.names)
        return self._forward(pieces[:k], x, pieces[k:])[0]

    def eval(
        self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.infer(params, x)
        return data_loss(self.loss, out, y), out

    def _grads(
        self,
        pieces: list[torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        weight: torch.Tensor | None,
        scale: torch.Tensor | None = None,
        buffers: Sequence[torch.Tensor] = (),
        seed: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """Gradients (of ``scale * loss`` when given), the loss and the new buffers."""

        def batch_loss(
            ps: list[torch.Tensor],
        ) -> tuple[torch.Tensor, tuple[torch.Tensor, list[torch.Tensor]]]:
            out, new_buffers = self._forward(ps, x, buffers, seed)
            loss = data_loss(self.loss, out, y, weight)
            return (loss if scale is None else scale * loss), (loss, new_buffers)

        grads, (_, (loss, new_buffers)) = grad_and_value(batch_loss, has_aux=True)(pieces)
        return list(grads), loss, list(new_buffers)

    def step(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The flat step ``step(params, *state, x, y, lr[, seed], anchor, mu[, weight])``
        (no buffers: the exporter refuses TFLite for models with running statistics)."""
        n_state = len(self.optimizer.state)
        params, state = args[0], list(args[1 : 1 + n_state])
        rest = list(args[1 + n_state :])
        x, y, lr = rest[:3]
        seed = rest[3] if self.seeded else None
        anchor, mu, *weight = rest[3 + self.seeded :]
        grads, loss, _ = self._grads(
            self._unflatten(params), x, y, weight[0] if weight else None, seed=seed
        )
        grad = torch.cat([g.reshape(-1) for g in grads]) + mu * (params - anchor)
        new_params, new_state = self._update(params, grad, state, lr)
        return (loss, new_params, *new_state)

    def split_step(self, *, proximal: bool) -> Callable[..., tuple[torch.Tensor, ...]]:
        """The split step (see the module docstring), with or without the FedProx inputs."""
        k, nb, specs = len(self.names), len(self.buffers), self.optimizer.state

        def step(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            params, i = list(args[:k]), k
            buffers = list(args[i : i + nb])
            i += nb
            state: list[list[torch.Tensor]] = []
            for s in specs:
                n = k if s.per_parameter else 1
                state.append(list(args[i : i + n]))
                i += n
            x, y, lr = args[i : i + 3]
            i += 3
            seed = args[i] if self.seeded else None
            i += self.seeded
            anchors, mu = args[i : i + k], (args[i + k] if proximal else None)
            if self._plain_sgd:
                # lr scales the loss's gradient seed, so it multiplies small batch-sized tensors
                # in the backward pass instead of every parameter once more: the update is then
                # one subtraction per parameter (equal to p - lr * g up to float rounding).
                steps, loss, new_buffers = self._grads(
                    params, x, y, None, scale=-lr, buffers=buffers, seed=seed
                )
                if mu is not None:
                    lr_mu = lr * mu
                    steps = [
                        s - lr_mu * (p - a) for s, p, a in zip(steps, params, anchors, strict=True)
                    ]
                return (loss, *(p + s for p, s in zip(params, steps, strict=True)), *new_buffers)
            grads, loss, new_buffers = self._grads(params, x, y, None, buffers=buffers, seed=seed)
            if mu is not None:
                grads = [g + mu * (p - a) for g, p, a in zip(grads, params, anchors, strict=True)]
            new_params: list[torch.Tensor] = []
            new_state: list[list[torch.Tensor]] = [[] for _ in specs]
            for j, (p, g) in enumerate(zip(params, grads, strict=True)):
                mine = [
                    st[j] if s.per_parameter else st[0] for st, s in zip(state, specs, strict=True)
                ]
                p, mine = self._update(p, g, mine, lr)
                new_params.append(p)
                for out, v in zip(new_state, mine, strict=True):
                    out.append(v)
            outs = [loss, *new_params, *new_buffers]
            for s, out in zip(specs, new_state, strict=True):
                # a scalar state (AdamW's step count) is updated identically for every tensor
                outs.extend(out if s.per_parameter else out[:1])
            return tuple(outs)

        return step

    @property
    def _plain_sgd(self) -> bool:
        opt = self.optimizer
        return opt.name == "sgd" and not opt.momentum and not opt.weight_decay

    def _update(
        self, p: torch.Tensor, g: torch.Tensor, state: list[torch.Tensor], lr: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """torch.optim's single-tensor update, written out in the same order of operations."""
        opt = self.optimizer
        if opt.name == "sgd":
            if opt.weight_decay:
                g = g + opt.weight_decay * p
            if opt.momentum:
                # torch starts the buffer at the first gradient; with dampening 0 that equals
                # momentum * 0 + g, so a zero initial buffer needs no first-step special case.
                buf = opt.momentum * state[0] + g
                return p - lr * buf, [buf]
            return p - lr * g, []
        exp_avg, exp_avg_sq, step = state
        beta1, beta2 = opt.betas
        step = step + 1
        p = p * (1 - lr * opt.weight_decay)
        exp_avg = exp_avg + (g - exp_avg) * (1 - beta1)
        exp_avg_sq = exp_avg_sq * beta2 + g * g * (1 - beta2)
        bias_correction1 = 1 - torch.pow(beta1, step)
        bias_correction2_sqrt = torch.sqrt(1 - torch.pow(beta2, step))
        denom = torch.sqrt(exp_avg_sq) / bias_correction2_sqrt + opt.eps
        p = p - (lr / bias_correction1) * (exp_avg / denom)
        return p, [exp_avg, exp_avg_sq, step]

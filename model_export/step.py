"""The portable train step as plain torch functions of tensors, ready to be traced.

Two forms of the step (the ONNX/TFLite input and output names are in ``edge_sdk.bundle``)::

    split step, ONNX:  step(params.<p>..., state.<s>[.<p>]..., x, y, lr[, anchor.<p>..., mu])
                         -> (loss, params_out.<p>..., state_out.<s>[.<p>]...)
    flat step, TFLite: step(params, *state, x, y, lr, anchor, mu, weight)
                         -> (loss, params_out, *state_out)
    eval(params, x, y) -> (loss, output)
    infer(params, x) -> output

The split step takes every trainable parameter (and its optimizer state) as its own tensor, so
the graph neither splits a flat vector nor concatenates gradients (the trainer binds views of
its flat vector instead), and comes in two variants, without the FedProx inputs (FedAvg) and
with them, so that FedAvg does not pay for the term. Each pass over all parameters is a large
part of a small model's step (measured in docs/benchmarks.md "## Train step"). The flat step
and eval and infer take ONE flat float32 vector in the manifest layout (``named_parameters()``
order) and split it inside; frozen parameters and buffers are baked in as constants.

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
    """Functional step/eval/infer for one model, loss and optimizer."""

    model: nn.Module
    names: Sequence[str]
    shapes: Sequence[tuple[int, ...]]
    loss: str
    optimizer: OptimizerConfig

    @property
    def sizes(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.shapes]

    def _unflatten(self, params: torch.Tensor) -> list[torch.Tensor]:
        return [
            p.reshape(s) for p, s in zip(torch.split(params, self.sizes), self.shapes, strict=True)
        ]

    def _forward(self, pieces: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = functional_call(
            self.model, dict(zip(self.names, pieces, strict=True)), (x,)
        )
        return out

    def infer(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._forward(self._unflatten(params), x)

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
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Gradients (of ``scale * loss`` when given) and the loss."""

        def batch_loss(ps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            loss = data_loss(self.loss, self._forward(ps, x), y, weight)
            return (loss if scale is None else scale * loss), loss

        grads, (_, loss) = grad_and_value(batch_loss, has_aux=True)(pieces)
        return list(grads), loss

    def step(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The flat step ``step(params, *state, x, y, lr, anchor, mu[, weight])``."""
        n_state = len(self.optimizer.state)
        params, state = args[0], list(args[1 : 1 + n_state])
        x, y, lr, anchor, mu, *rest = args[1 + n_state :]
        grads, loss = self._grads(self._unflatten(params), x, y, rest[0] if rest else None)
        grad = torch.cat([g.reshape(-1) for g in grads]) + mu * (params - anchor)
        new_params, new_state = self._update(params, grad, state, lr)
        return (loss, new_params, *new_state)

    def split_step(self, *, proximal: bool) -> Callable[..., tuple[torch.Tensor, ...]]:
        """The split step (see the module docstring), with or without the FedProx inputs."""
        k, specs = len(self.names), self.optimizer.state

        def step(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            params, i = list(args[:k]), k
            state: list[list[torch.Tensor]] = []
            for s in specs:
                n = k if s.per_parameter else 1
                state.append(list(args[i : i + n]))
                i += n
            x, y, lr = args[i : i + 3]
            anchors, mu = args[i + 3 : i + 3 + k], (args[i + 3 + k] if proximal else None)
            if self._plain_sgd:
                # lr scales the loss's gradient seed, so it multiplies small batch-sized tensors
                # in the backward pass instead of every parameter once more: the update is then
                # one subtraction per parameter (equal to p - lr * g up to float rounding).
                steps, loss = self._grads(params, x, y, None, scale=-lr)
                if mu is not None:
                    lr_mu = lr * mu
                    steps = [
                        s - lr_mu * (p - a) for s, p, a in zip(steps, params, anchors, strict=True)
                    ]
                outs = [loss, *(p + s for p, s in zip(params, steps, strict=True))]
                return tuple(outs)
            grads, loss = self._grads(params, x, y, None)
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
            outs = [loss, *new_params]
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

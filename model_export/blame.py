"""Which layer keeps the portable step from exporting: each layer tried on its own.

When a whole-model graph fails, the tracer's message names an aten op, not the layer a user
wrote. :func:`blame_layer` runs the model once with hooks that record every leaf module's
inputs, then traces and exports each distinct leaf alone (its forward and, for the step, its
gradient) in execution order; the first that fails is named in the error::

    UnsupportedOperator: layer 'head.act' (Mish): step graph: operator aten.mish ... cannot be
    exported to standard ops (...)

Only the failure path pays for this (a second or so per distinct layer). If every layer exports
alone, the failure comes from how they are combined and the original error is returned.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad

from model_export.errors import ExportError
from model_export.layers import LayerRewrites, tracing_context
from model_export.tracing import export_onnx, trace

__all__ = ["blame_layer"]


def _captured_inputs(
    model: nn.Module, x: torch.Tensor, training: bool
) -> list[tuple[str, nn.Module, tuple[Any, ...], dict[str, Any]]]:
    """Every leaf module called in one forward pass, with its inputs, in call order."""
    probe = copy.deepcopy(model).train(training)
    calls: list[tuple[str, nn.Module, tuple[Any, ...], dict[str, Any]]] = []
    seen: set[int] = set()
    handles = []
    for name, module in probe.named_modules():
        if next(module.children(), None) is not None and not isinstance(
            module, (nn.MultiheadAttention, nn.RNNBase)
        ):
            continue  # containers: their leaves are tried instead

        def hook(
            mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name
        ) -> None:
            if id(mod) not in seen:
                seen.add(id(mod))
                detach = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
                calls.append(
                    (name, mod, tuple(map(detach, args)), {k: detach(v) for k, v in kwargs.items()})
                )

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    buffers = {id(b): n for n, b in probe.named_buffers()}
    try:
        with (
            torch.no_grad(),
            tracing_context(),
            LayerRewrites(torch.zeros((), dtype=torch.int64), buffers),
        ):
            probe(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def _layer_step(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], training: bool
) -> tuple[Any, list[torch.Tensor]]:
    """A function of the layer's parameters and tensor inputs: its outputs' sum, and the
    gradient of that sum in training mode, like the step graph needs them."""
    names = [n for n, p in module.named_parameters() if p.is_floating_point()]
    buffer_names = [n for n, _ in module.named_buffers()]
    tensor_pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def total(
        params: list[torch.Tensor], buffers: list[torch.Tensor], inputs: list[torch.Tensor]
    ) -> torch.Tensor:
        call_args = list(args)
        for i, t in zip(tensor_pos, inputs, strict=True):
            call_args[i] = t
        rewrites = LayerRewrites(
            torch.zeros((), dtype=torch.int64),
            {id(b): n for n, b in zip(buffer_names, buffers, strict=True)},
        )
        state = {
            **dict(zip(names, params, strict=True)),
            **dict(zip(buffer_names, buffers, strict=True)),
        }
        with rewrites:
            out = functional_call(module, state, tuple(call_args), kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        flat = [o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()]
        return sum((o.sum() for o in flat), torch.zeros(()))

    def fn(*tensors: torch.Tensor) -> Any:
        k, b = len(names), len(buffer_names)
        params, buffers, inputs = (
            list(tensors[:k]),
            list(tensors[k : k + b]),
            list(tensors[k + b :]),
        )
        if training and params:
            return tuple(grad(lambda ps: total(ps, buffers, inputs))(params))
        return total(params, buffers, inputs)

    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    example = [
        *(params[n].detach() for n in names),
        *(buffers[n].clone() for n in buffer_names),
        *(args[i] for i in tensor_pos),
    ]
    return fn, example


def blame_layer(
    model: nn.Module, x: torch.Tensor, error: ExportError, *, training: bool
) -> ExportError:
    """``error`` with the first layer that fails on its own named (the same error class)."""
    try:
        calls = _captured_inputs(model, x, training)
    except Exception:
        return error
    tried: set[str] = set()
    for name, module, args, kwargs in calls:
        key = repr(module) + repr([getattr(a, "shape", a) for a in args])
        if key in tried:
            continue
        tried.add(key)
        what = f"layer {name!r} ({type(module).__name__})"
        try:
            fn, example = _layer_step(module, args, kwargs, training)
            with tempfile.TemporaryDirectory() as tmp:
                gm = trace(fn, example, what)
                names = [f"in{i}" for i in range(len(example))]
                outs = gm(*example)
                n_out = len(outs) if isinstance(outs, (tuple, list)) else 1
                export_onnx(
                    gm,
                    example,
                    Path(tmp) / "layer.onnx",
                    input_names=names,
                    output_names=[f"out{i}" for i in range(n_out)],
                    batch_inputs=(),
                    what=what,
                )
        except ExportError as e:
            return type(error)(f"{e} (the whole model failed with: {error})")
        except Exception:
            continue  # a layer that cannot run alone (e.g. unusual arguments) proves nothing
    return error

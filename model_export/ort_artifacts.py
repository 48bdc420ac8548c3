"""ORT training artifacts (training, eval and optimizer models, checkpoint) for
``onnxruntime-training`` 1.19.2, the last release of ORT's training packages.

What these artifacts cannot express is recorded, not approximated: ORT's SGD has neither
momentum nor weight decay, and no graph input for a FedProx anchor. AdamW is exact: the
optimizer node is switched to ``adam_mode=0`` (torch's AdamW: decay before the update, eps after
the bias correction) instead of the Hugging Face variant ``generate_artifacts`` picks.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from model_export.config import OptimizerConfig
from model_export.errors import ExportError
from model_export.tracing import OPSET, classify, quiet

__all__ = [
    "ORT_DIR",
    "ORT_FILES",
    "ort_model_support",
    "ort_training_support",
    "write_ort_artifacts",
]

# The opset of the second attempt (see write_ort_artifacts).
LEGACY_OPSET = 16
ORT_DIR = "ort"
ORT_FILES = {
    "training": f"{ORT_DIR}/training_model.onnx",
    "eval": f"{ORT_DIR}/eval_model.onnx",
    "optimizer": f"{ORT_DIR}/optimizer_model.onnx",
    "checkpoint": f"{ORT_DIR}/checkpoint",
}


def ort_training_support(optimizer: OptimizerConfig) -> str | None:
    """Why ORT's training artifacts cannot run this optimizer exactly, or None if they can."""
    if optimizer.name == "sgd" and optimizer.momentum:
        return "ORT training artifacts have no SGD momentum (use ort-step or litert-step)"
    if optimizer.name == "sgd" and optimizer.weight_decay:
        return "ORT training artifacts have no SGD weight decay (use ort-step or litert-step)"
    return None


def ort_model_support(model: nn.Module) -> str | None:
    """Why ORT's training artifacts cannot train this model exactly, or None if they can."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            return (
                "ORT training artifacts hold only trainable parameters in their contiguous "
                "buffer; the batch norm running statistics of the model vector would not be "
                "carried (use ort-step)"
            )
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            # measured: after an AdamW step on a batch holding token 0, the padding row of a
            # next-word LSTM had moved by lr in ORT, not at all in torch
            return (
                f"ORT training's embedding gradient ignores padding_idx (layer {name!r}): "
                "the padding row would be trained (use ort-step)"
            )
    return None


def write_ort_artifacts(
    model: nn.Module,
    sample_x: torch.Tensor,
    out_dir: Path,
    *,
    trainable: Sequence[str],
    frozen: Sequence[str],
    loss: str,
    optimizer: OptimizerConfig,
) -> dict[str, str]:
    """Write the artifacts under ``out_dir/ort``; returns the file map for the manifest.

    The forward graph is exported at the bundle's opset first; if ORT cannot build its
    gradient, at opset 16 once more, where the exporter writes ``LayerNormalization`` (opset
    17) as its primitive ops: ORT 1.19.2's gradient builder fails on the fused op (measured:
    "ArgDef" error for a conv + LayerNorm + GELU model) and handles the primitives."""
    art_dir = out_dir / ORT_DIR
    error: ExportError | None = None
    for opset in (OPSET, LEGACY_OPSET):
        shutil.rmtree(art_dir, ignore_errors=True)
        art_dir.mkdir(parents=True, exist_ok=True)
        try:
            _generate(model, sample_x, art_dir, trainable, frozen, loss, optimizer, opset)
            break
        except ExportError as e:
            error = error or e
    else:
        assert error is not None
        raise error
    if optimizer.name == "adamw":
        _use_torch_adamw(art_dir / "optimizer_model.onnx")
    return dict(ORT_FILES)


def _generate(
    model: nn.Module,
    sample_x: torch.Tensor,
    art_dir: Path,
    trainable: Sequence[str],
    frozen: Sequence[str],
    loss: str,
    optimizer: OptimizerConfig,
    opset: int,
) -> None:
    import onnx
    from onnxruntime.training import artifacts, onnxblock

    model = model.train()
    with tempfile.TemporaryDirectory() as tmp:
        fwd_path = Path(tmp) / "forward.onnx"
        try:
            # native: on failure the TorchScript exporter prints its whole IR graph to fd 1
            with quiet(native=True):
                torch.onnx.export(
                    model,
                    (sample_x,),
                    str(fwd_path),
                    dynamo=False,
                    training=torch.onnx.TrainingMode.TRAINING,
                    do_constant_folding=False,
                    export_params=True,
                    input_names=["x"],
                    output_names=["output"],
                    dynamic_axes={"x": {0: "batch"}, "output": {0: "batch"}},
                    opset_version=opset,
                )
        except Exception as e:
            raise classify(e, "ORT training artifacts") from e
        forward = onnx.load(str(fwd_path))
    loss_type = {
        "cross_entropy": artifacts.LossType.CrossEntropyLoss,
        "mse": artifacts.LossType.MSELoss,
        "bce": artifacts.LossType.BCEWithLogitsLoss,
    }[loss]
    optim_block: object
    if optimizer.name == "adamw":
        optim_block = onnxblock.optim.AdamW(
            betas=optimizer.betas, eps=optimizer.eps, weight_decay=optimizer.weight_decay
        )
    else:
        optim_block = artifacts.OptimType.SGD
    # onnxblock names the nodes it adds (loss, optimizer) from a process-wide counter, so a
    # second export in one process wrote other names, other hashes and another bundle id for
    # the same model; restarting it gives every export the names of a fresh process.
    from onnxruntime.training.onnxblock import _graph_utils

    _graph_utils._GRAPH_TOKEN = 0
    try:
        with quiet(native=True):
            artifacts.generate_artifacts(
                forward,
                requires_grad=list(trainable),
                frozen_params=list(frozen),
                loss=loss_type,
                optimizer=optim_block,
                artifact_directory=str(art_dir),
                # the model's output next to the loss: evaluate() needs it for accuracy
                additional_output_names=["output"],
            )
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(f"ORT training artifacts: {type(e).__name__}: {first}") from e


def _use_torch_adamw(path: Path) -> None:
    import onnx

    opt = onnx.load(str(path))
    for node in opt.graph.node:
        if node.op_type == "AdamWOptimizer":
            for attr in node.attribute:
                if attr.name == "adam_mode":
                    attr.i = 0
    onnx.save(opt, str(path))

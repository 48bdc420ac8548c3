"""``export_bundle``: a torch module in, a verified training bundle directory out.

The bundle layout and manifest are documented in :mod:`edge_sdk.bundle`. ``export_bundle``
checks the model against the loss on an example batch, traces the portable step/eval/infer
graphs (``step.onnx``...), adds ORT training artifacts and, when asked, TFLite files, then writes
``params.f32`` (and ``frozen.f32``) and the manifest whose id is the hash of all of it.

Only the portable step is required: if it cannot be built the export fails and names the
layer that fails on its own (:mod:`model_export.blame`). ORT artifacts and TFLite files are
each written on their own; a backend that cannot express the model (a converter error, batch
norm statistics it cannot carry, an optimizer it lacks) is recorded in the manifest's
``backends`` with the reason, and its trainer refuses the bundle with it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_sdk.bundle import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    bundle_id_of,
    sha256_file,
    step_signature,
    verify_bundle,
)
from model_export.blame import blame_layer
from model_export.config import INPUT_DTYPES, LOSSES, OptimizerConfig, StateSpec
from model_export.errors import ExportError, LossMismatch, UnsupportedModel
from model_export.loading import load_model, spec_label
from model_export.ort_artifacts import (
    ORT_DIR,
    ort_model_support,
    ort_training_support,
    write_ort_artifacts,
)
from model_export.step import StepFunctions, data_loss
from model_export.tracing import OPSET, classify, export_onnx, trace

__all__ = ["export_bundle", "io_names", "tflite_names"]

_DTYPES = dict(zip(INPUT_DTYPES, (torch.float32, torch.float64, torch.int64), strict=True))


def io_names(
    params: Sequence[str],
    state: Sequence[StateSpec],
    *,
    buffers: Sequence[str] = (),
    seed: bool = False,
) -> dict[str, dict[str, list[str]]]:
    """Input and output names of the ONNX graphs (the ``signatures`` manifest entry)."""
    layout = [(s.name, s.per_parameter) for s in state]
    extra: dict[str, Any] = {"buffers": buffers, "seed": seed}
    return {
        "step": step_signature(params, layout, proximal=False, **extra),
        "step_prox": step_signature(params, layout, proximal=True, **extra),
        "eval": {"inputs": ["params", "x", "y"], "outputs": ["loss", "output"]},
        "infer": {"inputs": ["params", "x"], "outputs": ["output"]},
    }


def tflite_names(
    state: Sequence[StateSpec], *, seed: bool = False
) -> dict[str, dict[str, list[str]]]:
    """Names, in positional order, of the TFLite graphs' tensors (flat step, see ``step``)."""
    names = [s.name for s in state]
    return {
        "step": {
            "inputs": [
                "params",
                *[f"state.{s}" for s in names],
                "x",
                "y",
                "lr",
                *(["seed"] if seed else []),
                "anchor",
                "mu",
                "weight",
            ],
            "outputs": ["loss", "params_out", *[f"state_out.{s}" for s in names]],
        },
        "infer": {"inputs": ["params", "x"], "outputs": ["output"]},
    }


def _trace_batch(input_shape: Sequence[int]) -> int:
    """A batch size for tracing that equals no other dimension (symbolic shapes would merge
    them) and is not 0 or 1 (which the tracer specialises)."""
    return next(n for n in (11, 13, 17, 19, 23, 29, 31, 37) if n not in input_shape[1:])


def _match_freeze(names: Sequence[str], freeze: Sequence[str]) -> set[str]:
    frozen: set[str] = set()
    for prefix in freeze:
        stem = prefix.rstrip(".")
        hits = {n for n in names if n == stem or n.startswith(stem + ".")}
        if not hits:
            raise UnsupportedModel(f"--freeze {prefix!r} matches no parameter of the model")
        frozen |= hits
    return frozen


def _target_for(loss: str, out: Any, n: int) -> tuple[torch.Tensor, dict[str, Any], int | None]:
    """An example target, its manifest spec and the number of classes; LossMismatch if the
    model's output cannot feed ``loss``."""
    if not isinstance(out, torch.Tensor):
        raise LossMismatch(
            f"the model returns a {type(out).__name__}; a single output tensor is needed for {loss}"
        )
    if not out.is_floating_point() or out.ndim < 1 or out.shape[0] != n:
        raise LossMismatch(
            f"the model output {tuple(out.shape)} {out.dtype} is not a float batch "
            f"with the batch axis first"
        )
    if loss == "cross_entropy":
        if out.ndim != 2 or out.shape[1] < 2:
            raise LossMismatch(
                f"cross_entropy needs logits of shape (batch, classes>=2); "
                f"the model outputs {tuple(out.shape[1:])} per example"
            )
        classes = int(out.shape[1])
        y = torch.randint(0, classes, (n,))
        return y, {"shape": [None], "dtype": "int64"}, classes
    y = torch.rand_like(out) if loss == "bce" else torch.randn_like(out)
    bce_classes = int(out.shape[1]) if loss == "bce" and out.ndim == 2 else None
    return y, {"shape": [None, *out.shape[1:]], "dtype": "float32"}, bce_classes


def _running_statistics(
    model: nn.Module,
) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """The batch norm layers' running statistics (step-graph state) and the layers' names.

    Their ``num_batches_tracked`` counter is dropped: with a momentum it is never read."""
    stats: list[tuple[str, torch.Tensor]] = []
    modules: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        modules.append(name)
        mean, var = module.running_mean, module.running_var
        if not module.track_running_stats or mean is None or var is None:
            continue
        if module.momentum is None:
            raise UnsupportedModel(
                f"layer {name!r} ({type(module).__name__}): momentum=None keeps a cumulative "
                "average over every batch ever seen, which a federated step cannot hold; "
                "give the layer a momentum (torch's default is 0.1)"
            )
        module.num_batches_tracked = None
        prefix = f"{name}." if name else ""
        stats += [(prefix + "running_mean", mean), (prefix + "running_var", var)]
    return stats, modules


def _check_buffers_stable(model: nn.Module, x: torch.Tensor, state: set[str]) -> None:
    """Buffers other than the running statistics (``state``) must stay constant."""
    before = {k: v.clone() for k, v in model.named_buffers()}
    probe = copy.deepcopy(model).train()
    with torch.no_grad():
        probe(x)
    for name, value in probe.named_buffers():
        if name not in state and not torch.equal(value, before[name]):
            raise UnsupportedModel(
                f"the model updates buffer {name!r} while training; only batch norm running "
                "statistics are step-graph state, other buffers must stay constant"
            )


def _flat(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    if not tensors:
        return np.zeros(0, dtype="<f4")
    return torch.cat([t.detach().reshape(-1) for t in tensors]).numpy().astype("<f4")


def _layout(named: Sequence[tuple[str, torch.Tensor]], start: int = 0) -> list[dict[str, Any]]:
    out, offset = [], start
    for name, t in named:
        out.append({"name": name, "shape": list(t.shape), "offset": offset})
        offset += t.numel()
    return out


def _source_of(spec: Any, model: nn.Module) -> str:
    if isinstance(spec, str):
        return spec_label(spec)
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def _check_target(out_dir: Path) -> None:
    """Overwrite ``out_dir`` only if it is absent, empty or a previous bundle."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise FileExistsError(
            f"{out_dir} is not empty and holds no bundle; refusing to write there"
        )


def _publish(staging: Path, out_dir: Path) -> None:
    _check_target(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)


def export_bundle(
    model_or_spec: nn.Module | str | Callable[[], nn.Module],
    out_dir: Path | str,
    *,
    input_shape: Sequence[int] | None = None,
    input_dtype: str = "float32",
    loss: str = "cross_entropy",
    optimizer: str = "sgd",
    lr: float | None = None,
    momentum: float | None = None,
    weight_decay: float | None = None,
    freeze: Sequence[str] = (),
    tflite: bool = False,
    tflite_batch: int | None = None,
    ort_training: bool = True,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Manifest:
    """Export a training bundle; returns its verified manifest.

    ``model_or_spec``: a module, a module class / zero-argument factory, or a spec string
    (``path/to/file.py:Name``, ``package.module:Name``), instantiated after
    ``torch.manual_seed(seed)``. ``input_shape`` is one example input, batch axis first (the
    ONNX graphs take any batch size); without it, a model whose first layer is ``nn.Linear``
    gets ``(1, in_features)``. ``freeze``: parameter-name prefixes kept constant (as are
    parameters whose ``requires_grad`` is False).
    ``tflite``: also write ``step.tflite``/``infer.tflite`` (needs litert-torch); their batch is
    fixed at ``tflite_batch`` (default: the example batch if > 1, else 32) and shorter batches
    are padded and masked by the trainer. Raises ``ExportError`` subclasses for models that
    cannot be exported, ``ValueError`` for bad options.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r} (choose from {', '.join(LOSSES)})")
    if input_dtype not in _DTYPES:
        raise ValueError(f"unsupported input dtype {input_dtype!r} (choose from {sorted(_DTYPES)})")
    if input_shape is not None:
        input_shape = [int(d) for d in input_shape]
        if len(input_shape) < 1 or any(d < 1 for d in input_shape):
            raise ValueError(f"input shape {tuple(input_shape)} must be positive, batch first")
    opt = OptimizerConfig.make(optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    # Absolute and without "." or "..": the staging directory goes next to the target, in its
    # parent, and replaces it by name; "." (run inside the previous bundle) has neither, and the
    # old bundle was deleted with the staging directory inside it.
    out_dir = Path(out_dir).resolve()

    prep = _prepare(model_or_spec, input_shape, input_dtype, loss, opt, freeze, seed)
    _check_target(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Built next to the target and renamed into place: a failed export leaves nothing behind.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be served
    try:
        _write(
            prep,
            staging,
            ort_training=ort_training,
            tflite=tflite,
            tflite_batch=tflite_batch,
            seed=seed,
            say=progress or (lambda _msg: None),
        )
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return verify_bundle(out_dir)


@dataclass
class _Prepared:
    """The model checked against the loss, split into trainable and frozen, with examples."""

    model: nn.Module
    source: str
    fns: StepFunctions
    trainable: list[tuple[str, torch.Tensor]]
    frozen: list[tuple[str, torch.Tensor]]
    buffers: list[tuple[str, torch.Tensor]]  # running statistics: step-graph state
    batchnorm_modules: list[str]
    shape: list[int]
    input_dtype: str
    x: torch.Tensor
    y: torch.Tensor
    out: torch.Tensor
    target_spec: dict[str, Any]
    num_classes: int | None

    @property
    def opt(self) -> OptimizerConfig:
        return self.fns.optimizer

    def model_vector(self) -> torch.Tensor:
        """The initial model vector: trainable parameters, then buffers."""
        return torch.from_numpy(_flat([t for _, t in (*self.trainable, *self.buffers)]).copy())

    def _seed(self) -> list[torch.Tensor]:
        return [torch.tensor(0, dtype=torch.int64)] if self.fns.seeded else []

    def step_args(self) -> list[torch.Tensor]:
        """Example arguments of the flat step (see :mod:`model_export.step`)."""
        params = torch.from_numpy(_flat([p for _, p in self.trainable]).copy())
        state = [torch.zeros(params.numel() if s.per_parameter else ()) for s in self.opt.state]
        lr = torch.tensor(self.opt.lr)
        return [
            params,
            *state,
            self.x,
            self.y,
            lr,
            *self._seed(),
            params.clone(),
            torch.tensor(0.0),
        ]

    def split_step_args(self, *, proximal: bool) -> list[torch.Tensor]:
        """Example arguments of the split step."""
        params = [p.detach().clone() for _, p in self.trainable]
        buffers = [b.detach().clone() for _, b in self.buffers]
        state: list[torch.Tensor] = []
        for s in self.opt.state:
            state += [torch.zeros_like(p) for p in params] if s.per_parameter else [torch.zeros(())]
        args = [*params, *buffers, *state, self.x, self.y, torch.tensor(self.opt.lr), *self._seed()]
        if proximal:
            args += [*(p.clone() for p in params), torch.tensor(0.0)]
        return args


def _default_shape(model: nn.Module) -> list[int]:
    first = next(
        (m for m in model.modules() if next(m.parameters(recurse=False), None) is not None), None
    )
    if isinstance(first, nn.Linear):
        return [1, first.in_features]
    raise ValueError(
        "cannot tell this model's input shape: give one example input shape, batch axis first "
        "(--input-shape 1,1,8,8)"
    )


def _without_gradient(
    model: nn.Module, names: Sequence[str], x: torch.Tensor, y: torch.Tensor, loss: str
) -> set[str]:
    """The parameters among ``names`` the loss does not depend on (autograd gives them no
    gradient at all). torch.optim skips such a parameter (no weight decay, no momentum, no
    AdamW step), so it never changes in training: it is frozen, which is exactly that. The
    step graph would otherwise see a zero gradient and decay it."""
    if not names:
        return set()
    probe = copy.deepcopy(model).train()  # a copy: batch norm would update its statistics
    params = dict(probe.named_parameters())
    for name in names:
        params[name].requires_grad_(True)
    value = data_loss(loss, probe(x), y)
    if not value.requires_grad:
        return set()  # no gradient at all (an op autograd cannot differentiate): the tracer
        # refuses that model with its own message
    grads = torch.autograd.grad(value, [params[nm] for nm in names], allow_unused=True)
    return {nm for nm, g in zip(names, grads, strict=True) if g is None}


def _prepare(
    model_or_spec: Any,
    input_shape: list[int] | None,
    input_dtype: str,
    loss: str,
    opt: OptimizerConfig,
    freeze: Sequence[str],
    seed: int,
) -> _Prepared:
    torch.manual_seed(seed)
    model = copy.deepcopy(load_model(model_or_spec)).float()
    shape = input_shape or _default_shape(model)
    named = list(model.named_parameters())
    # requires_grad=False is how torch code freezes a layer (torch.optim then skips it): those
    # parameters are frozen like the --freeze prefixes, before the loop below clears the flag
    frozen_names = _match_freeze([n for n, _ in named], freeze) | {
        n for n, p in named if not p.requires_grad
    }
    for _, p in named:
        p.requires_grad_(False)  # functional_call supplies the trainable ones

    n = _trace_batch(shape)
    dtype = _DTYPES[input_dtype]
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        x = torch.randn(n, *shape[1:], generator=gen).to(dtype)
    else:
        x = torch.randint(0, 2, (n, *shape[1:]), generator=gen)
    with torch.no_grad():
        try:
            out = copy.deepcopy(model).train()(x)  # a copy: batch norm would update its stats
        except Exception as e:
            raise LossMismatch(
                f"the model fails on an input of shape {tuple(x.shape)} {input_dtype}: "
                f"{type(e).__name__}: {e}"
            ) from e
    y, target_spec, num_classes = _target_for(loss, out, n)
    frozen_names |= _without_gradient(
        model, [nm for nm, _ in named if nm not in frozen_names], x, y, loss
    )
    trainable: list[tuple[str, torch.Tensor]] = [(n, p) for n, p in named if n not in frozen_names]
    frozen: list[tuple[str, torch.Tensor]] = [(n, p) for n, p in named if n in frozen_names]
    if not trainable:
        raise UnsupportedModel("the model has no trainable parameters")
    buffers, bn_modules = _running_statistics(model)
    _check_buffers_stable(model, x, {nm for nm, _ in buffers})
    fns = StepFunctions(
        model=model,
        names=[nm for nm, _ in trainable],
        shapes=[tuple(p.shape) for _, p in trainable],
        loss=loss,
        optimizer=opt,
        buffers=[nm for nm, _ in buffers],
        buffer_shapes=[tuple(b.shape) for _, b in buffers],
    )
    model.train()
    try:
        dropouts = fns.dropout_layers(x)
    except Exception as e:
        # the layer rewrites run here for the first time, untraced: a layer they refuse
        # (alpha dropout) is the same one-line ExportError the tracer would give
        raise classify(e, "step graph") from e
    if dropouts:
        fns = dataclasses.replace(fns, seeded=True)
    return _Prepared(
        model,
        _source_of(model_or_spec, model),
        fns,
        trainable,
        frozen,
        buffers,
        bn_modules,
        shape,
        input_dtype,
        x,
        y,
        out,
        target_spec,
        num_classes,
    )


def _attempt(
    out_dir: Path, files: Sequence[str], write: Callable[[], dict[str, str]]
) -> tuple[dict[str, str] | None, str | None]:
    """Write one optional backend's files: their names, or None and the reason it failed (its
    partial files removed). The portable step stands on its own, so no optional backend can
    fail the export."""
    try:
        return write(), None
    except Exception as e:  # any failure of an optional converter is that backend's refusal
        for name in files:
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
        return None, str(e) or type(e).__name__


def _write(
    prep: _Prepared,
    out_dir: Path,
    *,
    ort_training: bool,
    tflite: bool,
    tflite_batch: int | None,
    seed: int,
    say: Callable[[str], None],
) -> None:
    model, fns, opt, x, y = prep.model, prep.fns, prep.opt, prep.x, prep.y
    step_args = prep.step_args()
    vector = prep.model_vector()
    num = step_args[0].numel()
    names = io_names(fns.names, opt.state, buffers=fns.buffers, seed=fns.seeded)
    graphs: dict[str, tuple[Callable[..., object], list[torch.Tensor]]] = {
        "step": (fns.split_step(proximal=False), prep.split_step_args(proximal=False)),
        "step_prox": (fns.split_step(proximal=True), prep.split_step_args(proximal=True)),
        "eval": (fns.eval, [vector, x, y]),
        "infer": (fns.infer, [vector, x]),
    }
    for graph, (fn, args) in graphs.items():
        say(f"tracing {graph} graph")
        model.train(graph.startswith("step"))
        try:
            gm = trace(fn, args, f"{graph} graph")
            say(f"writing {graph}.onnx")
            export_onnx(
                gm,
                args,
                out_dir / f"{graph}.onnx",
                input_names=names[graph]["inputs"],
                output_names=names[graph]["outputs"],
                batch_inputs=("x", "y"),
                what=f"{graph} graph",
            )
        except ExportError as e:
            say("finding the layer that cannot be exported")
            raise blame_layer(model, x, e, training=graph.startswith("step")) from e

    backends: dict[str, dict[str, Any]] = {
        "ort-step": {"supported": True, "reason": None, "fedprox": True}
    }
    ort_files: dict[str, str] | None = None
    ort_reason = ort_model_support(model)
    if ort_reason is None and not ort_training:
        ort_reason = "exported without ORT training artifacts"
    elif ort_reason is None:
        say("writing ORT training artifacts")
        ort_files, ort_reason = _attempt(
            out_dir,
            [ORT_DIR],
            lambda: write_ort_artifacts(
                model,
                x,
                out_dir,
                trainable=fns.names,
                frozen=[nm for nm, _ in prep.frozen],
                loss=fns.loss,
                optimizer=opt,
            ),
        )
        ort_reason = ort_reason or ort_training_support(opt)
    backends["ort-training"] = {
        "supported": ort_reason is None,
        "reason": ort_reason,
        "fedprox": False,
    }

    tflite_files: dict[str, str] | None = None
    tfl_batch = tflite_batch or (prep.shape[0] if prep.shape[0] > 1 else 32)
    tfl_reason: str | None
    if not tflite:
        tfl_reason = "exported without TFLite files (--tflite)"
    elif prep.buffers:
        tfl_reason = (
            "the TFLite step has a fixed batch that shorter batches are padded to, and batch "
            "norm statistics would include the padding (use ort-step)"
        )
    else:
        from model_export.tflite import TFLITE_FILES, write_tflite

        say(f"converting to TFLite (batch {tfl_batch})")
        tflite_files, tfl_reason = _attempt(
            out_dir,
            list(TFLITE_FILES.values()),
            lambda: write_tflite(fns, step_args, out_dir, batch=tfl_batch),
        )
    backends["litert-step"] = {
        "supported": tfl_reason is None,
        "reason": tfl_reason,
        "fedprox": True,
    }

    (out_dir / "params.f32").write_bytes(vector.numpy().astype("<f4").tobytes())
    if prep.frozen:
        (out_dir / "frozen.f32").write_bytes(_flat([p for _, p in prep.frozen]).tobytes())

    files = {
        str(p.relative_to(out_dir).as_posix()): {
            "sha256": sha256_file(p),
            "bytes": p.stat().st_size,
        }
        for p in sorted(out_dir.rglob("*"))
        if p.is_file()
    }
    task = "regression" if fns.loss == "mse" else "classification"
    raw: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {"name": type(model).__name__, "source": prep.source},
        "task": task,
        "num_classes": prep.num_classes,
        "input": {"shape": [None, *prep.shape[1:]], "dtype": prep.input_dtype},
        "target": prep.target_spec,
        "output": {"shape": [None, *prep.out.shape[1:]], "dtype": "float32"},
        "loss": fns.loss,
        "optimizer": opt.to_manifest(),
        "optimizer_state": [
            {"name": s.name, "shape": [num] if s.per_parameter else []} for s in opt.state
        ],
        "parameters": _layout(prep.trainable),
        "buffers": _layout(prep.buffers, start=num),
        "num_trainable": num,
        "num_parameters": vector.numel(),
        "batchnorm_modules": prep.batchnorm_modules,
        "step_seed": fns.seeded,
        "frozen": _layout(prep.frozen),
        "initial_parameters": "params.f32",
        "frozen_parameters": "frozen.f32" if prep.frozen else None,
        "graphs": {
            "step_onnx": "step.onnx",
            "step_prox_onnx": "step_prox.onnx",
            "eval_onnx": "eval.onnx",
            "infer_onnx": "infer.onnx",
            "step_tflite": tflite_files["step"] if tflite_files else None,
            "infer_tflite": tflite_files["infer"] if tflite_files else None,
            "ort_training": ort_files,
        },
        "signatures": names,
        "tflite": (
            {"batch": tfl_batch, "signatures": tflite_names(opt.state, seed=fns.seeded)}
            if tflite_files
            else None
        ),
        "backends": backends,
        "exporter": {"torch": torch.__version__.split("+")[0], "onnx_opset": OPSET},
        "files": files,
    }
    raw["bundle_id"] = bundle_id_of(raw)
    (out_dir / MANIFEST_NAME).write_text(json.dumps(raw, indent=1, sort_keys=True) + "\n")

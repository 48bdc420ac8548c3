"""Training bundles as devices and the coordinator see them: ``manifest.json`` and its checks.

``model_export`` writes bundles; this module reads and verifies them. Manifest format 2 (format
1 bundles, which lack ``buffers``, ``num_trainable``, ``batchnorm_modules`` and ``step_seed``,
still load; any other version is refused with a message naming both)::

    {
      "format": "fedge-bundle", "format_version": 2,
      "bundle_id": "<sha256 of the canonical manifest without bundle_id>",
      "model": {"name": "DigitsMLP", "source": "model_export.models:DigitsMLP"},
      "task": "classification" | "regression", "num_classes": 10 | null,
      "input": {"shape": [null, 64], "dtype": "float32"},
      "target": {"shape": [null], "dtype": "int64"},     # float32, output-shaped for mse/bce
      "output": {"shape": [null, 10], "dtype": "float32"},
      "loss": "cross_entropy" | "mse" | "bce",
      "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.0, "dampening": 0.0,
                    "weight_decay": 0.0, "nesterov": false}
                 | {"name": "adamw", "lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-08,
                    "weight_decay": 0.01},
      "optimizer_state": [{"name": "exp_avg", "shape": [2410]}, {"name": "step", "shape": []}],
                                                # flat ones cover the trainable parameters
      "parameters": [{"name": "fc1.weight", "shape": [32, 64], "offset": 0}, ...],
      "buffers": [{"name": "bn.running_mean", "shape": [16], "offset": 2410}, ...],
      "num_trainable": 2410,                    # the trainable parameters' share of the vector
      "num_parameters": 2442,                   # length of the model vector: parameters+buffers
      "batchnorm_modules": ["bn"],              # what FedBN keeps on the device
      "step_seed": false,                       # true: the step graphs take a "seed" input
      "frozen": [{"name": "backbone.0.weight", "shape": [...], "offset": 0}, ...],
      "initial_parameters": "params.f32",      # raw little-endian float32, the model vector
      "frozen_parameters": "frozen.f32" | null,  # the frozen ones, same encoding
      "graphs": {"step_onnx": "step.onnx", "step_prox_onnx": "step_prox.onnx",
                 "eval_onnx": "eval.onnx", "infer_onnx": "infer.onnx",
                 "step_tflite": "step.tflite" | null, "infer_tflite": "infer.tflite" | null,
                 "ort_training": {"training": "ort/training_model.onnx",
                                  "eval": "ort/eval_model.onnx",
                                  "optimizer": "ort/optimizer_model.onnx",
                                  "checkpoint": "ort/checkpoint"} | null},
      "signatures": {"step": {"inputs": [...], "outputs": [...]}, "step_prox": ...,
                     "eval": ..., "infer": ...},
      "tflite": {"batch": 32, "signatures": {...}} | null,
      "backends": {"ort-training": {"supported": false, "fedprox": false,
                                    "reason": "ORT training artifacts: ... (why not)"},
                   "ort-step": {...}, "litert-step": {...}},  # each backend's files are
                                                # written, or refused with the reason, alone
      "exporter": {"torch": "2.13.0", "onnx_opset": 18},
      "files": {"step.onnx": {"sha256": "...", "bytes": 1234}, ...}
    }

The model vector is what moves between trainer, device and coordinator: the trainable
parameters (``parameters``), then the running statistics of batch norm layers (``buffers``,
float32, empty for most models), in ``named_parameters()``/``named_buffers()`` order.

Graph signatures. ONNX graphs take named inputs; ``<p>`` runs over the trainable parameters in
layout order, each its own tensor of its own shape (``step_signature`` spells the names), ``<b>``
over ``buffers`` likewise, and ``<s>`` over ``optimizer_state``: a flat state such as
``exp_avg`` is split per parameter like the parameters, a scalar one (``step``) is one input::

    step(params.<p>..., buffers.<b>..., state.<s>[.<p>]..., x, y, lr[, seed])
        -> (loss, params_out.<p>..., buffers_out.<b>..., state_out.<s>[.<p>]...)
    step_prox(... as step ..., anchor.<p>..., mu) -> (as step)
    eval(params, x, y) -> (loss, output)
    infer(params, x) -> (output)

``params`` (eval, infer) is the flat model vector (parameters, then buffers); frozen parameters
are constants inside the graphs. ``buffers_out`` are the running statistics after the step,
updated as torch's training mode does (momentum average, unbiased batch variance); eval and
infer normalise with the running statistics, as torch's eval mode does. ``seed`` (int64
scalar, only when ``step_seed``) selects the dropout masks of the step: the trainer passes a
new value every step (any int64; the masks are a pure function of it, so a step is
reproducible from its seed).

The step is split per parameter so that the graph neither splits a flat vector nor concatenates
gradients (a runtime binds views of its flat vector instead), and ``step`` lacks
the FedProx term so that FedAvg does not pay for it (see docs/benchmarks.md "## Train step").
TFLite tensors are positional ``args_<i>`` / ``output_<i>`` in the order of
``tflite.signatures``; its step keeps the flat vectors (the interpreter copies every tensor in
and out through ``set_tensor``/``get_tensor``, so views would save nothing there)::

    step(params, state.<s>..., x, y, lr[, seed], anchor, mu, weight)
        -> (loss, params_out, state_out.<s>...)
    infer(params, x) -> (output)

``loss`` is the batch's data loss before the update; ``anchor``/``mu`` add the FedProx term
``mu/2 ||params - anchor||^2`` (``mu = 0``: plain step); ``weight`` (TFLite only, whose batch is
fixed at ``tflite.batch``) is a per-example 0/1 mask for padded batches.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MANIFEST_NAME",
    "BundleError",
    "Manifest",
    "ParamSpec",
    "bundle_id_of",
    "load_manifest",
    "parse_manifest",
    "sha256_file",
    "step_signature",
    "verify_bundle",
]

MANIFEST_NAME = "manifest.json"
FORMAT = "fedge-bundle"
FORMAT_VERSION = 2
# Versions this SDK reads: format 1 is format 2 without buffers and seed.
READABLE_VERSIONS = (1, 2)


class BundleError(Exception):
    """A bundle that is missing, malformed or does not match its hashes."""


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class Manifest:
    raw: dict[str, Any]

    @property
    def bundle_id(self) -> str:
        return str(self.raw["bundle_id"])

    @property
    def parameters(self) -> list[ParamSpec]:
        return [
            ParamSpec(p["name"], tuple(int(d) for d in p["shape"]), int(p["offset"]))
            for p in self.raw["parameters"]
        ]

    @property
    def buffers(self) -> list[ParamSpec]:
        """The running statistics in the model vector, after the trainable parameters."""
        return [
            ParamSpec(p["name"], tuple(int(d) for d in p["shape"]), int(p["offset"]))
            for p in self.raw.get("buffers", [])
        ]

    @property
    def num_parameters(self) -> int:
        """The length of the model vector (trainable parameters and buffers)."""
        return int(self.raw["num_parameters"])

    @property
    def num_trainable(self) -> int:
        return int(self.raw.get("num_trainable", self.raw["num_parameters"]))

    @property
    def step_seed(self) -> bool:
        """Whether the step graphs take a ``seed`` input (the model has dropout)."""
        return bool(self.raw.get("step_seed", False))

    def batchnorm_indices(self) -> np.ndarray:
        """Positions in the model vector of the batch norm layers' parameters and running
        statistics: what FedBN keeps on the device."""
        modules = [str(m) for m in self.raw.get("batchnorm_modules", [])]
        picked = [
            np.arange(p.offset, p.offset + p.size)
            for p in (*self.parameters, *self.buffers)
            if p.name.rpartition(".")[0] in modules
        ]
        return np.concatenate(picked) if picked else np.zeros(0, np.int64)

    @property
    def task(self) -> str:
        return str(self.raw["task"])

    @property
    def loss(self) -> str:
        return str(self.raw["loss"])

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return dict(self.raw["files"])

    def graph(self, key: str) -> str:
        """The bundle-relative file of graph ``key`` (e.g. ``"step_onnx"``)."""
        name = self.raw.get("graphs", {}).get(key)
        if not isinstance(name, str):
            raise BundleError(
                f"bundle {self.bundle_id[:12]} has no {key} graph; re-export it with this fedge"
            )
        return name

    def backend_support(self, backend: str) -> tuple[bool, str | None]:
        entry = self.raw.get("backends", {}).get(backend)
        if entry is None:
            return False, f"bundle has no {backend} graphs"
        return bool(entry["supported"]), entry.get("reason")


def step_signature(
    params: Sequence[str],
    state: Sequence[tuple[str, bool]],
    *,
    proximal: bool,
    buffers: Sequence[str] = (),
    seed: bool = False,
) -> dict[str, list[str]]:
    """ONNX input and output names of the split step graph (``step`` or, with ``proximal``,
    ``step_prox``) for the trainable parameters ``params``, the running statistics ``buffers``,
    the optimizer state ``(name, per_parameter)`` and, with ``seed``, the dropout seed: the one
    place both the exporter and the trainers take them from."""
    inputs = [*(f"params.{p}" for p in params), *(f"buffers.{b}" for b in buffers)]
    outputs = ["loss", *(f"params_out.{p}" for p in params), *(f"buffers_out.{b}" for b in buffers)]
    for name, per_parameter in state:
        inputs += [f"state.{name}.{p}" for p in params] if per_parameter else [f"state.{name}"]
        outputs += (
            [f"state_out.{name}.{p}" for p in params] if per_parameter else [f"state_out.{name}"]
        )
    inputs += ["x", "y", "lr"]
    if seed:
        inputs.append("seed")
    if proximal:
        inputs += [*(f"anchor.{p}" for p in params), "mu"]
    return {"inputs": inputs, "outputs": outputs}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bundle_id_of(raw: dict[str, Any]) -> str:
    """Content hash: sha256 of the canonical JSON of the manifest without ``bundle_id``."""
    body = {k: v for k, v in raw.items() if k != "bundle_id"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _referenced_files(raw: dict[str, Any]) -> list[str]:
    """The files the manifest points to outside ``files``: parameters and graphs."""
    names = [raw.get("initial_parameters"), raw.get("frozen_parameters")]
    for value in (raw.get("graphs") or {}).values():
        names += list(value.values()) if isinstance(value, dict) else [value]
    return [n for n in names if n is not None]


def _check_structure(raw: Any) -> None:
    if not isinstance(raw, dict):
        raise BundleError("manifest must be a JSON object")
    if raw.get("format") != FORMAT or raw.get("format_version") not in READABLE_VERSIONS:
        raise BundleError(
            f"unsupported bundle format {raw.get('format')!r} "
            f"version {raw.get('format_version')!r} (this SDK reads {FORMAT} versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; re-export the model with a matching fedge)"
        )
    for key in ("bundle_id", "parameters", "num_parameters", "files", "loss", "task"):
        if key not in raw:
            raise BundleError(f"manifest lacks {key!r}")
    if not isinstance(raw["files"], dict):
        raise BundleError("manifest 'files' must be an object")
    for name, meta in raw["files"].items():
        if not isinstance(name, str) or name.startswith("/") or ".." in Path(name).parts:
            raise BundleError(f"manifest names an unsafe file path {name!r}")
        # verify_bundle and the device's cache read these two fields as they are
        size = meta.get("bytes") if isinstance(meta, dict) else None
        if (
            not isinstance(meta, dict)
            or not isinstance(meta.get("sha256"), str)
            or isinstance(size, bool)
            or not isinstance(size, int)
            or size < 0
        ):
            raise BundleError(
                f"manifest files[{name!r}] must be an object with a 'sha256' string and a "
                "'bytes' count"
            )
    listed = raw["files"]
    for name in _referenced_files(raw):
        # Only listed files are hashed (and path-checked above): a trainer opens no other.
        if name not in listed:
            raise BundleError(f"manifest refers to {name!r}, which its 'files' do not list")
    expected = 0
    for p in [*raw["parameters"], *raw.get("buffers", [])]:
        if any(int(d) < 0 for d in p["shape"]):
            raise BundleError(f"parameter {p.get('name')!r} has a negative dimension")
        if int(p["offset"]) != expected:
            raise BundleError(f"parameter {p.get('name')!r} offset {p['offset']} != {expected}")
        expected += int(np.prod(p["shape"], dtype=np.int64))
    if expected != int(raw["num_parameters"]):
        raise BundleError(
            f"parameter layout covers {expected}, manifest says {raw['num_parameters']}"
        )
    trainable = sum(int(np.prod(p["shape"], dtype=np.int64)) for p in raw["parameters"])
    if int(raw.get("num_trainable", trainable)) != trainable:
        raise BundleError(f"num_trainable {raw['num_trainable']} != {trainable}")
    if bundle_id_of(raw) != raw["bundle_id"]:
        raise BundleError("bundle_id does not match the manifest's content")


def load_manifest(bundle_dir: Path | str) -> Manifest:
    """Read and check the manifest's structure and id (not the files: see verify_bundle)."""
    path = Path(bundle_dir) / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise BundleError(f"no {MANIFEST_NAME} in {bundle_dir}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON: {e}") from e
    return parse_manifest(raw, where=str(path))


def parse_manifest(raw: Any, *, where: str = "manifest") -> Manifest:
    """Check a decoded manifest's structure and id (e.g. one just received over HTTP)."""
    try:
        _check_structure(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"malformed manifest {where}: {e!r}") from e
    return Manifest(raw)


def verify_bundle(bundle_dir: Path | str) -> Manifest:
    """Load the manifest and check every listed file's size and sha256."""
    manifest = load_manifest(bundle_dir)
    for name, meta in manifest.files.items():
        path = Path(bundle_dir) / name
        if not path.is_file():
            raise BundleError(f"bundle file {name} is missing")
        if path.stat().st_size != int(meta["bytes"]) or sha256_file(path) != meta["sha256"]:
            raise BundleError(f"bundle file {name} does not match its sha256 in the manifest")
    return manifest

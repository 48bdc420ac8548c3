"""The independent reference every backend is checked against: the bundle's model in torch,
trained with ``torch.optim`` and ``torch.nn.functional`` losses through autograd.

Only the manifest, ``params.f32`` and ``frozen.f32`` are read from the bundle; none of the
exporter's step code is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edge_sdk.bundle import load_manifest
from model_export.loading import load_model


class TorchReference:
    """``dtype=torch.float64`` runs the reference in double precision (for models where float32
    rounding differs between any two implementations more than the tolerance allows); its
    vectors are still returned as float32."""

    def __init__(self, bundle_dir: Path, dtype: torch.dtype = torch.float32) -> None:
        self.manifest = load_manifest(bundle_dir)
        raw = self.manifest.raw
        self.dtype = dtype
        self.model = load_model(raw["model"]["source"]).to(dtype)
        params = np.fromfile(bundle_dir / raw["initial_parameters"], dtype="<f4")
        frozen = (
            np.fromfile(bundle_dir / raw["frozen_parameters"], dtype="<f4")
            if raw["frozen_parameters"]
            else np.zeros(0, np.float32)
        )
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for vec, layout, trainable in (
                (params, raw["parameters"], True),
                (frozen, raw["frozen"], False),
            ):
                for p in layout:
                    n = int(np.prod(p["shape"]))
                    chunk = vec[p["offset"] : p["offset"] + n].reshape(p["shape"])
                    named[p["name"]].copy_(torch.from_numpy(chunk.copy()))
                    named[p["name"]].requires_grad_(trainable)
            buffers = dict(self.model.named_buffers())
            for p in raw.get("buffers", []):
                n = int(np.prod(p["shape"]))
                chunk = params[p["offset"] : p["offset"] + n].reshape(p["shape"])
                buffers[p["name"]].copy_(torch.from_numpy(chunk.copy()))
        self.trainable = [named[p["name"]] for p in raw["parameters"]]
        self.buffers = [buffers[p["name"]] for p in raw.get("buffers", [])]
        self.opt = self._optimizer(raw["optimizer"])
        self.anchor: list[torch.Tensor] | None = None
        self.mu = 0.0

    def _optimizer(self, o: dict[str, Any]) -> torch.optim.Optimizer:
        if o["name"] == "sgd":
            return torch.optim.SGD(
                self.trainable,
                lr=o["lr"],
                momentum=o["momentum"],
                weight_decay=o["weight_decay"],
                dampening=o["dampening"],
                nesterov=o["nesterov"],
            )
        return torch.optim.AdamW(
            self.trainable,
            lr=o["lr"],
            betas=tuple(o["betas"]),
            eps=o["eps"],
            weight_decay=o["weight_decay"],
        )

    def loss(self, out: torch.Tensor, y: np.ndarray) -> torch.Tensor:
        kind = self.manifest.loss
        if kind == "cross_entropy":
            return F.cross_entropy(out, torch.from_numpy(np.asarray(y, np.int64)))
        target = torch.from_numpy(np.asarray(y, np.float32)).to(self.dtype)
        if kind == "mse":
            return F.mse_loss(out, target)
        return F.binary_cross_entropy_with_logits(out, target)

    def set_proximal(self, anchor: np.ndarray, mu: float) -> None:
        sizes = [t.numel() for t in self.trainable]
        trainable = np.asarray(anchor, np.float32)[: sum(sizes)]  # not the running statistics
        pieces = np.split(trainable, np.cumsum(sizes)[:-1])
        self.anchor = [
            torch.from_numpy(a.reshape(t.shape).copy()).to(self.dtype)
            for a, t in zip(pieces, self.trainable, strict=True)
        ]
        self.mu = mu

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float | None = None) -> float:
        self.model.train()
        if lr is not None:
            for group in self.opt.param_groups:
                group["lr"] = lr
        self.opt.zero_grad()
        data_loss = self.loss(self.model(self._x(x)), y)
        total = data_loss
        if self.anchor is not None and self.mu:
            prox = sum(
                ((w - a) ** 2).sum() for w, a in zip(self.trainable, self.anchor, strict=True)
            )
            total = data_loss + self.mu / 2 * prox
        total.backward()
        self.opt.step()
        return float(data_loss.item())

    def _x(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.asarray(x))
        return t.to(self.dtype) if t.is_floating_point() else t

    def parameters(self) -> np.ndarray:
        """The model vector: trainable parameters, then running statistics (float32)."""
        tensors = [*self.trainable, *self.buffers]
        return torch.cat([t.detach().reshape(-1) for t in tensors]).float().numpy().copy()

    @torch.no_grad()
    def outputs(self, x: np.ndarray) -> np.ndarray:
        self.model.eval()
        return self.model(self._x(x)).float().numpy()

    @torch.no_grad()
    def eval_loss(self, x: np.ndarray, y: np.ndarray) -> float:
        self.model.eval()
        return float(self.loss(self.model(self._x(x)), y))

"""Optimizer defaults are torch's own, read from torch.optim rather than restated."""

from __future__ import annotations

import pytest
import torch

from model_export.config import OptimizerConfig


def test_sgd_defaults_are_torchs() -> None:
    torch_defaults = torch.optim.SGD([torch.zeros(1, requires_grad=True)]).defaults
    m = OptimizerConfig.make("sgd").to_manifest()
    for key in ("lr", "momentum", "dampening", "weight_decay", "nesterov"):
        assert m[key] == torch_defaults[key], key


def test_adamw_defaults_are_torchs() -> None:
    torch_defaults = torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults
    m = OptimizerConfig.make("adamw").to_manifest()
    assert m["lr"] == torch_defaults["lr"]
    assert tuple(m["betas"]) == torch_defaults["betas"]
    assert m["eps"] == torch_defaults["eps"]
    assert m["weight_decay"] == torch_defaults["weight_decay"]


def test_given_values_override_defaults_and_set_the_state() -> None:
    cfg = OptimizerConfig.make("sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert (cfg.lr, cfg.momentum, cfg.weight_decay) == (0.1, 0.9, 1e-4)
    assert [s.name for s in cfg.state] == ["momentum_buffer"]
    assert [s.name for s in OptimizerConfig.make("sgd").state] == []
    assert [s.name for s in OptimizerConfig.make("adamw").state] == [
        "exp_avg",
        "exp_avg_sq",
        "step",
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "rmsprop"}, "unknown optimizer"),
        ({"name": "sgd", "lr": 0.0}, "lr must be > 0"),
        ({"name": "sgd", "lr": -1.0}, "lr must be > 0"),
        ({"name": "sgd", "momentum": -0.5}, "momentum"),
        ({"name": "adamw", "momentum": 0.9}, "momentum is an SGD option"),
        ({"name": "adamw", "weight_decay": -1.0}, "weight decay"),
        # NaN fails every comparison and inf passes them: both would train to NaN, and the
        # manifest's JSON would hold NaN/Infinity, which strict JSON readers refuse
        ({"name": "sgd", "lr": float("inf")}, "finite"),
        ({"name": "sgd", "momentum": float("nan")}, "finite"),
        ({"name": "sgd", "weight_decay": float("inf")}, "finite"),
        ({"name": "adamw", "weight_decay": float("nan")}, "finite"),
    ],
)
def test_bad_hyper_parameters(kwargs: dict, match: str) -> None:
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        OptimizerConfig.make(name, **kwargs)

"""``fedge demo``: the federated demo on digits (see :mod:`fedge.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedge.cli import CommandError


def register(sub: Any) -> None:
    from fedge.demo import DemoConfig

    d = DemoConfig()
    p = sub.add_parser("demo", help="run the federated demo: export, coordinator, emulated fleet",
                       description="Export the demo model, start a temporary coordinator, run an "
                       "emulated fleet on digits with label skew, and compare the federated model "
                       "with local-only and centralized training. The last stdout line is JSON.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rounds", type=int, default=d.rounds, help="federated rounds")
    p.add_argument("--devices", type=int, default=d.devices, help="emulated devices")
    p.add_argument("--seed", type=int, default=d.seed, help="data split, profiles, training")
    p.add_argument("--out", type=Path, default=d.out, help="where the plot and result.json go")
    p.add_argument("--goal", type=int, default=d.goal, help="reports per round")
    p.add_argument("--steps", type=int, default=d.steps, help="local steps per round")
    p.add_argument("--lr", type=float, default=d.lr, help="client learning rate")
    p.add_argument("--alpha", type=float, default=d.alpha,
                   help="Dirichlet label-skew alpha (smaller: more skewed)")
    p.add_argument("--codec", default=d.codec, help="fp32, fp16, int8 or topk")
    p.add_argument("--dropout", type=float, default=d.dropout_prob,
                   help="probability a device vanishes mid-round")
    p.add_argument("--speedup", type=float, default=d.speedup,
                   help="emulated seconds per real second")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="exported bundle cache (None: ~/.cache/fedge)")
    p.add_argument("--model", default=d.model, choices=("mlp", "mobilenet"),
                   help="the MLP, or a MobileNet-style CNN with batch norm on the same digits")
    p.add_argument("--batchnorm", default=d.batchnorm, choices=("aggregate", "local"),
                   help="batch norm layers averaged with the model, or kept per device (FedBN)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from fedge.demo import DemoConfig, main_output, run_demo

    try:
        config = DemoConfig(
            devices=args.devices, rounds=args.rounds, goal=args.goal, steps=args.steps,
            lr=args.lr, alpha=args.alpha, codec=args.codec, dropout_prob=args.dropout,
            speedup=args.speedup, seed=args.seed, out=args.out, cache_dir=args.cache_dir,
            model=args.model, batchnorm=args.batchnorm,
        )
    except ValueError as e:
        raise CommandError(f"{e} (see --help)") from e
    result = run_demo(config, say=lambda msg: print(msg, flush=True))
    main_output(result, sys.stdout)
    return 0 if result.points else 1

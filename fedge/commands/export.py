"""``fedge export MODEL --out DIR``: a PyTorch model in, a training bundle out.

MODEL is ``path/to/file.py:Name`` or ``package.module:Name``, where Name is an ``nn.Module``
class or a zero-argument factory. Hyper-parameters not given take torch's defaults for the
optimizer (SGD: lr 1e-3; AdamW: lr 1e-3, weight decay 1e-2).
"""

from __future__ import annotations

import argparse
import sys
from math import prod
from pathlib import Path
from typing import Any

from fedge.cli import CommandError
from model_export.config import INPUT_DTYPES, LOSSES, OPTIMIZERS


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r} must list positive sizes, batch axis first")
    return dims


def register(sub: Any) -> None:
    p = sub.add_parser(
        "export", help="export a PyTorch model as a training bundle", description=__doc__
    )
    p.add_argument("model", metavar="MODEL", help="path/to/file.py:Name or package.module:Name")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="bundle directory")
    p.add_argument(
        "--input-shape",
        type=_shape,
        metavar="N,D,...",
        help="one example input, batch axis first, e.g. 1,64 (default: from a first Linear)",
    )
    p.add_argument("--input-dtype", default="float32", choices=INPUT_DTYPES)
    p.add_argument("--loss", default="cross_entropy", choices=LOSSES)
    p.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS)
    p.add_argument("--lr", type=float, help="learning rate (default: torch's)")
    p.add_argument("--momentum", type=float, help="SGD momentum (default 0)")
    p.add_argument("--weight-decay", type=float, help="default: torch's for the optimizer")
    p.add_argument(
        "--freeze",
        action="append",
        default=[],
        metavar="NAME",
        help="parameter-name prefix to keep fixed (repeatable), e.g. --freeze backbone; "
        "parameters with requires_grad=False are kept fixed without it",
    )
    p.add_argument("--tflite", action="store_true", help="add step.tflite and infer.tflite")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from model_export import ExportError, export_bundle

    def progress(msg: str) -> None:
        print(f"[fedge export] {msg}", file=sys.stderr, flush=True)

    try:
        manifest = export_bundle(
            args.model,
            args.out,
            input_shape=args.input_shape,
            input_dtype=args.input_dtype,
            loss=args.loss,
            optimizer=args.optimizer,
            lr=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            freeze=args.freeze,
            tflite=args.tflite,
            progress=progress,
        )
    except (ExportError, ValueError) as e:
        raise CommandError(str(e)) from e
    except OSError as e:  # the bundle directory cannot be made or written (the message names it)
        raise CommandError(f"cannot write the bundle to {args.out}: {e}") from e
    raw = manifest.raw
    opt = raw["optimizer"]
    hyper = ", ".join(f"{k}={v}" for k, v in opt.items() if k != "name")
    frozen = sum(int(prod(p["shape"])) for p in raw["frozen"])
    print(f"bundle {manifest.bundle_id} written to {args.out}")
    print(f"  model      {raw['model']['name']} ({raw['model']['source']})")
    buffers = manifest.num_parameters - manifest.num_trainable
    print(
        f"  parameters {manifest.num_trainable:,} trainable, {frozen:,} frozen"
        + (f", {buffers:,} batch norm statistics" if buffers else "")
        + (" (dropout: the step takes a seed)" if manifest.step_seed else "")
    )
    print(f"  training   {raw['loss']} loss, {opt['name']} ({hyper})")
    for name, entry in raw["backends"].items():
        state = "yes" if entry["supported"] else f"no: {entry['reason']}"
        print(f"  {name:<12} {state}")
    return 0

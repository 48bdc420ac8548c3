"""``fedge device run``: this machine as a federated device (a Raspberry Pi, a Linux box, Termux).

::

    fedge device run --coordinator https://10.0.0.2:8443 --state-dir ~/.fedge \\
        --enrollment-token T --ca-file fleet-ca.pem [--pin-sha256 PIN] \\
        --data local.npz [--conditions auto|linux|raspberry-pi|android|always] [--once]

The data file holds arrays ``x`` and ``y`` (``--x-key``/``--y-key`` to rename). Every pass prints
one line: what happened and when the device checks in next. Needs only the edge install
(``pip install fedge[edge]``): nothing here imports torch, aiohttp or the coordinator.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from fedge.cli import CommandError
from fedge.commands.connection import (
    add_enrollment_argument,
    add_tls_arguments,
    enrollment_token,
    tls_config,
)

CONDITIONS = ("auto", "linux", "raspberry-pi", "android", "always")


def register(sub: Any) -> None:
    parser = sub.add_parser("device", help="run this machine as a federated device")
    device_sub = parser.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    run = device_sub.add_parser("run", help="check in, train when eligible, upload; repeat")
    run.add_argument("--coordinator", required=True, help="coordinator URL, http(s)://host:port")
    add_enrollment_argument(run)
    add_tls_arguments(run)
    run.add_argument("--state-dir", required=True, type=Path,
                     help="where the device keeps its credential and residuals")
    run.add_argument("--data", required=True, type=Path, help="training data (.npz: x, y)")
    run.add_argument("--eval-data", type=Path, help="evaluation data (default: --data)")
    run.add_argument("--x-key", default="x")
    run.add_argument("--y-key", default="y")
    run.add_argument("--population", default="default")
    run.add_argument("--backend", help="ort-step, litert-step or ort-training (default: best)")
    run.add_argument("--conditions", choices=CONDITIONS, default="auto",
                     help="where device conditions come from ('always': skip the checks)")
    run.add_argument("--policy", type=json.loads, default=None,
                     help='eligibility policy as JSON, e.g. \'{"require_charging": false}\'')
    run.add_argument("--cache-dir", type=Path, help="bundle cache (default: STATE_DIR/bundles)")
    run.add_argument("--once", action="store_true", help="one pass, then exit")
    run.add_argument("--max-runs", type=int, help="stop after this many passes")
    run.add_argument("--seed", type=int, help="seed shuffling, rounding and jitter")
    run.add_argument("--json", action="store_true", help="print each outcome as a JSON line")
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=_run)


# What "--conditions always" claims: a device on power, idle, on an unmetered network.
_ALWAYS: dict[str, Any] = {"charging": True, "battery": 1.0, "idle": True, "unmetered": True}


def _conditions(name: str) -> Any:
    from edge_sdk import conditions as c

    if name == "always":
        return c.ScriptedConditions(c.DeviceConditions(**_ALWAYS))
    if name == "linux":
        return c.LinuxConditions()
    if name == "raspberry-pi":
        return c.RaspberryPiConditions()
    if name == "android":
        return c.AndroidConditions()
    return c.default_provider()


def _line(outcome: Any) -> str:
    parts = [time.strftime("%H:%M:%S"), f"{outcome.action:<10}",
             f"next in {outcome.next_run_in_s:7.1f}s"]
    if outcome.assignment_id:
        parts.append(f"{outcome.task_id} round {outcome.round}")
    if outcome.reasons:
        parts.append("(" + ", ".join(r for r in outcome.reasons if r) + ")")
    m = outcome.metrics
    if "loss" in m:
        parts.append(f"loss {m['loss']:.4f} on {m['num_examples']}")
    if "bytes_up" in m:
        parts.append(f"up {m['bytes_up']} B down {m['bytes_down']} B")
    if outcome.error:
        parts.append(f"error: {outcome.error}")
    return "  ".join(parts)


def _run(args: argparse.Namespace) -> int:
    from edge_sdk.cache import BundleCache
    from edge_sdk.client import Client, ClientConfig
    from edge_sdk.data import ArrayDataset, DatasetError

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        data = ArrayDataset.from_npz(args.data, x_key=args.x_key, y_key=args.y_key)
        eval_data = (ArrayDataset.from_npz(args.eval_data, x_key=args.x_key, y_key=args.y_key)
                     if args.eval_data else None)
    except (OSError, DatasetError, ValueError) as e:
        raise CommandError(f"cannot read data: {e}") from e
    from edge_sdk.conditions import EligibilityPolicy

    try:
        policy = EligibilityPolicy.from_json(args.policy) if args.policy is not None else None
        client = Client(
            args.coordinator,
            state_dir=args.state_dir,
            data=data,
            eval_data=eval_data,
            conditions=_conditions(args.conditions),
            policy=policy,
            config=ClientConfig(population=args.population, backend=args.backend,
                                seed=args.seed, enrollment_token=enrollment_token(args),
                                tls=tls_config(args)),
            cache=BundleCache(args.cache_dir) if args.cache_dir else None,
        )
    except ValueError as e:
        raise CommandError(str(e)) from e

    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        # systemd stops the service with SIGTERM: end a wait at once, let a training pass finish.
        signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def show(outcome: Any) -> None:
        if args.json:
            print(json.dumps({"action": outcome.action, "next_run_in_s": outcome.next_run_in_s,
                              "assignment_id": outcome.assignment_id,
                              "task_id": outcome.task_id, "round": outcome.round,
                              "reasons": list(outcome.reasons), "metrics": outcome.metrics,
                              "error": outcome.error}), flush=True)
        else:
            print(_line(outcome), flush=True)

    max_runs = 1 if args.once else args.max_runs
    try:
        client.run_forever(stop, max_runs=max_runs, on_outcome=show)
    finally:
        client.close()
    return 0

"""``fedge fleet``: run N emulated devices against a coordinator (see :mod:`fedge.fleet`).

Prints one updating progress line on stderr and, at the end, one JSON summary line on stdout
(devices, check-ins, tasks started, uploads acknowledged, aborts, dropouts, bytes). Runs until
``--duration`` emulated seconds pass, the coordinator's newest task has completed
``--until-rounds`` rounds or ended short of them (exit 1 if it failed), or Ctrl-C. Devices
register with ``--enrollment-token``; ``--until-rounds`` reads the coordinator's status, which
needs ``--admin-token``.

``--partitions DIR`` uses your own data: one ``.npz`` per device (arrays ``x`` and ``y``), devices
in file-name order, every file checked before any device starts. ``--processes K`` splits the
fleet over K processes (for fleets past a few thousand devices); ``--engine ray`` runs those
K parts as tasks on a Ray cluster instead (``--ray-address HEAD:6379``; without one a private
Ray on this machine; needs ``pip install 'fedge[cluster]'``, see docs/deployment.md). A plain
FedAvg task without over-selection, for comparisons with other frameworks, is created with
``fedge task create --plan '{"over_selection": 1.0, "robust": "none",
"server_optimizer": {"name": "fedavg"}, "goal": 10, "steps": 10}'``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from fedge.cli import CommandError
from fedge.commands.connection import (
    add_enrollment_argument,
    add_tls_arguments,
    admin_token,
    enrollment_token,
    tls_config,
)


def register(sub: Any) -> None:
    p = sub.add_parser("fleet", help="emulate a fleet of devices against a coordinator",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coordinator", required=True, help="URL, e.g. http://127.0.0.1:8080")
    add_enrollment_argument(p)
    p.add_argument("--admin-token", default=None,
                   help="for --until-rounds (default: $FEDGE_ADMIN_TOKEN)")
    add_tls_arguments(p)
    p.add_argument("--devices", type=int, default=None,
                   help="fleet size (required unless --partitions gives one file per device)")
    p.add_argument("--partitions", type=Path, default=None,
                   help="a directory with one .npz (x, y) per device: your own partitions")
    p.add_argument("--processes", type=int, default=1,
                   help="split the fleet over this many processes (default 1; at most one "
                   "per device)")
    p.add_argument("--engine", choices=("processes", "ray"), default="processes",
                   help="where the --processes parts run: spawned processes on this machine "
                   "(default) or Ray tasks (a cluster's machines)")
    p.add_argument("--ray-address", default=None,
                   help="a running Ray cluster (HEAD:6379, auto, ray://HEAD:10001; default: "
                   "start a private Ray here)")
    p.add_argument("--cpus-per-part", type=float, default=None,
                   help="logical CPUs each part holds on the Ray cluster (default 1)")
    p.add_argument("--data", default="digits",
                   help="digits (64 features) or synthetic:ALPHA,BETA (FedProx, 60 features)")
    p.add_argument("--partition", default="dirichlet:0.5",
                   help="how digits are split: iid, dirichlet:ALPHA, shards:K, quantity:SIGMA; "
                   "or windows:SIZE (SIZE consecutive digits per device: any number of devices)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speedup", type=float, default=1.0,
                   help="emulated seconds per real second (pace steering and schedules shrink)")
    p.add_argument("--profile", choices=("uniform", "realistic"), default="uniform",
                   help="uniform: always available, no failures; realistic: diurnal charging, "
                   "6%% dropouts, 3%% lapses, 5%% never charge (see fedge.fleet.heterogeneity)")
    p.add_argument("--start-hour", type=float, default=None, help="local time at start (0-24)")
    p.add_argument("--dropout", type=float, default=None, help="mid-job dropout probability")
    p.add_argument("--lapse", type=float, default=None, help="mid-job lapse probability")
    p.add_argument("--never-charging", type=float, default=None,
                   help="fraction of devices that never charge")
    p.add_argument("--compute-sigma", type=float, default=None,
                   help="lognormal sigma of the step-time multiplier")
    p.add_argument("--step-time", type=float, default=None,
                   help="modelled seconds per training step before the device multiplier "
                   "(default: the real step time)")
    p.add_argument("--duration", type=float, default=None, help="emulated seconds to run")
    p.add_argument("--until-rounds", type=int, default=None,
                   help="stop when the coordinator's newest task has completed this many rounds "
                   "(or has ended short of them)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="device state directories (default: a temporary directory)")
    p.add_argument("--population", default="default")
    p.add_argument("--backend", default="ort-step",
                   help="the devices' runtime: ort-step (default), litert-step or ort-training")
    p.add_argument("--workers", type=int, default=None, help="threads for device work")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=run)


def _source(args: argparse.Namespace) -> Any:
    """The device data as a :mod:`fedge.fleet.sources` recipe, checked here (a bad spec is a
    clear error before any process starts)."""
    from fedge.fleet.partition import PartitionError
    from fedge.fleet.sources import (
        DigitsPartitions,
        DigitsWindows,
        FedProxSynthetic,
        NpzPartitions,
        SourceError,
    )
    from fedge.fleet.synthetic import fedprox_synthetic

    if args.partitions is not None:
        try:
            source = NpzPartitions(args.partitions)
            if args.devices is not None and args.devices > source.devices:
                raise CommandError(f"--devices {args.devices}: {args.partitions} holds "
                                   f"{source.devices} device files")
            # Every file, before the fleet: not one device failing mid-run; with the classes
            # fixed, no process of the fleet reads every file's labels again.
            source = dataclasses.replace(source, num_classes=source.check())
        except SourceError as e:
            raise CommandError(str(e)) from e
        return source
    if args.devices is None:
        raise CommandError("--devices is required (or --partitions DIR)")
    if args.data == "digits":
        kind, _, size = args.partition.partition(":")
        if kind == "windows":
            if not size.isdigit() or int(size) < 1:
                raise CommandError(f"--partition windows:SIZE (SIZE >= 1), got {args.partition!r}")
            return DigitsWindows(size=int(size), seed=args.seed)
        digits = DigitsPartitions(args.devices, args.partition, args.seed)
        try:
            digits(0, 1)
        except PartitionError as e:
            raise CommandError(str(e)) from e
        return digits
    name, _, rest = args.data.partition(":")
    if name == "synthetic":
        try:
            alpha, beta = (float(v) for v in rest.split(","))
        except ValueError as e:
            raise CommandError(f"--data synthetic:ALPHA,BETA, got {args.data!r}") from e
        try:  # here, as digits are, not in each process of a fleet in parts; one device's
            # worth, as the whole generation would be the cost of the fleet's data again
            fedprox_synthetic(alpha, beta, 1, seed=args.seed)
        except ValueError as e:
            raise CommandError(f"--data {args.data}: {e}") from e
        return FedProxSynthetic(args.devices, alpha, beta, seed=args.seed)
    raise CommandError(f"unknown --data {args.data!r}: use digits or synthetic:ALPHA,BETA")


def _heterogeneity(args: argparse.Namespace) -> Any:
    import dataclasses

    from fedge.fleet import Heterogeneity

    model = Heterogeneity.realistic() if args.profile == "realistic" else Heterogeneity.uniform()
    changes = {
        "start_hour": args.start_hour,
        "dropout_prob": args.dropout,
        "lapse_prob": args.lapse,
        "never_charging_fraction": args.never_charging,
        "compute_sigma": args.compute_sigma,
    }
    try:
        return dataclasses.replace(model, **{k: v for k, v in changes.items() if v is not None})
    except ValueError as e:
        raise CommandError(str(e)) from e


def _reachable(url: str, tls: Any) -> bool:
    from edge_sdk.errors import ClientError
    from edge_sdk.protocol import Route
    from edge_sdk.transport import RetryPolicy, Transport

    try:
        with Transport(url, retry=RetryPolicy(max_attempts=1), tls=tls) as t:
            t.call("GET", Route.HEALTH)
    except (ClientError, OSError, ValueError):
        return False
    return True


_ENDED = ("completed", "failed")


def _newest_task(admin: Any) -> dict[str, Any] | None:
    """The coordinator's newest task as its status lists it ({} before the first), or None
    when the status cannot be read."""
    from edge_sdk.errors import ClientError

    try:
        tasks = admin.status()["tasks"]
        return {} if not tasks else {"task_id": str(tasks[-1]["task_id"]),
                                     "state": str(tasks[-1]["state"]),
                                     "rounds": int(tasks[-1]["rounds_completed"]),
                                     "failure": tasks[-1].get("failure")}
    except (ClientError, OSError, KeyError, TypeError, ValueError, IndexError):
        return None


def _engine(args: argparse.Namespace) -> Any:
    """The :class:`~fedge.fleet.ray_engine.RayEngine` asked for, else None (the parts run as
    processes here); Ray is imported now so that its absence is a clear error up front."""
    if args.engine != "ray":
        for option, value in (("--ray-address", args.ray_address),
                              ("--cpus-per-part", args.cpus_per_part)):
            if value is not None:
                raise CommandError(f"{option} needs --engine ray")
        return None
    from fedge.fleet.ray_engine import RayEngine, RayUnavailable, import_ray

    if args.cpus_per_part is not None and not args.cpus_per_part > 0:
        raise CommandError("--cpus-per-part must be > 0")
    try:
        import_ray()
    except RayUnavailable as e:
        raise CommandError(str(e)) from e
    return RayEngine(args.ray_address, cpus_per_part=args.cpus_per_part or 1.0)


def _check_numbers(args: argparse.Namespace) -> None:
    """Numbers in range before anything starts. Written as ``not x > 0`` so that NaN (which
    argparse's float takes) fails too: a NaN duration would never end a run."""
    for option, value in (("--devices", args.devices), ("--workers", args.workers),
                          ("--until-rounds", args.until_rounds)):
        if value is not None and value < 1:
            raise CommandError(f"{option} must be at least 1")
    if args.processes < 1:
        raise CommandError("--processes must be at least 1")
    if args.seed < 0:  # numpy seeds (the data split, every device's draws) are non-negative
        raise CommandError("--seed must be >= 0")
    # Infinity too: emulated time would be NaN, every device's wait none (a busy loop).
    if not (math.isfinite(args.speedup) and args.speedup > 0):
        raise CommandError("--speedup must be > 0 and finite")
    if args.duration is not None and not args.duration > 0:
        raise CommandError("--duration must be a number of seconds > 0")
    if args.step_time is not None and not (math.isfinite(args.step_time) and args.step_time >= 0):
        raise CommandError("--step-time must be a number of seconds >= 0")


def run(args: argparse.Namespace) -> int:
    from fedge.fleet import SimClock
    from fedge.fleet.emulator import Fleet, status_line
    from fedge.fleet.processes import PartsFailed, ProcessFleet
    from fedge.fleet.ray_engine import ClusterError
    from fedge.fleet.running import FleetRun

    _check_numbers(args)
    from edge_sdk.client import ClientConfig

    # The devices' own check, made once here before any part starts (a part would fail it
    # after its start-up).
    try:
        ClientConfig(backend=args.backend)
    except ValueError as e:
        raise CommandError(f"--{e}") from e
    engine = _engine(args)
    from coordinator.admin import AdminClient

    tls = tls_config(args)
    if not _reachable(args.coordinator, tls):
        raise CommandError(f"cannot reach a coordinator at {args.coordinator}")
    admin = None
    # A task that ended before the fleet started may be followed by one the user creates now;
    # one that ends during the run will complete no further round.
    ended_before: str | None = None
    if args.until_rounds is not None:
        admin = AdminClient(args.coordinator, str(admin_token(args)), tls=tls)
        newest = _newest_task(admin)
        if newest is None:
            raise CommandError(f"cannot read the status of {args.coordinator} (admin token?)")
        if newest.get("state") in _ENDED:
            ended_before = newest["task_id"]
    source = _source(args)
    devices = args.devices or source.devices
    common: dict[str, Any] = {
        "heterogeneity": _heterogeneity(args), "seed": args.seed,
        "clock": SimClock(args.speedup), "state_root": args.state_dir, "backend": args.backend,
        "step_time_s": args.step_time, "workers": args.workers,
        "enrollment_token": enrollment_token(args), "tls": tls,
    }
    fleet: FleetRun
    if engine is not None or args.processes > 1:
        fleet = ProcessFleet(args.coordinator, source, devices=devices,
                             processes=args.processes, engine=engine, **common)
    else:
        try:
            datasets = source(0, devices)
        except ValueError as e:  # SourceError, DatasetError: what the checks could not see
            raise CommandError(str(e)) from e
        try:
            fleet = Fleet(args.coordinator, datasets, progress=not args.quiet, **common)
        except OSError as e:  # its directories: as a part in a split fleet reports them
            raise CommandError(f"--state-dir: {e}") from e
    interrupted = threading.Event()
    # A Fleet writes its own progress line; a fleet in parts has it written here, from the
    # sum of the parts' reports, at each poll.
    show = None if args.quiet or isinstance(fleet, Fleet) else sys.stderr
    ended: dict[str, Any] = {}  # the newest task, once it has ended during the run

    def until() -> bool:
        if show is not None:
            show.write("\r" + status_line(fleet.summary()) + "\x1b[K")
            show.flush()
        if interrupted.is_set():
            return True
        newest = None if admin is None else _newest_task(admin)
        if not newest:
            return False
        if newest["state"] in _ENDED and newest["task_id"] != ended_before:
            ended.update(newest)
            return True
        return bool(newest["rounds"] >= args.until_rounds)

    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    try:
        summary = fleet.run(until=until, emulated_s=args.duration, poll_s=0.5)
    except (ClusterError, PartsFailed) as e:  # the parts say why: a data file, a directory
        raise CommandError(str(e)) from e
    finally:
        signal.signal(signal.SIGINT, previous)
        fleet.close()
        if admin is not None:
            admin.close()
    if show is not None:  # the final state, as a Fleet ends its own line
        show.write("\r" + status_line(summary) + "\n")
        show.flush()
    print(json.dumps(summary.as_dict()), file=sys.stdout, flush=True)
    if ended.get("state") == "failed":
        print(f"fedge fleet: task {ended['task_id']} failed after {ended['rounds']} rounds: "
              f"{ended['failure']}", file=sys.stderr)
        return 1
    if ended and ended["rounds"] < args.until_rounds:
        print(f"fedge fleet: task {ended['task_id']} completed after {ended['rounds']} rounds, "
              f"before --until-rounds {args.until_rounds}", file=sys.stderr)
    return 0

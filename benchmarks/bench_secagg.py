"""Privacy costs: SecAgg+ per device and per server round, and accuracy against epsilon.

**SecAgg+ over HTTP** (``http`` part). One real round per configuration: a coordinator in its
own process (``fedge serve`` on loopback, SQLite file, blob directory) runs a sync task with
plan ``secagg``; ``n`` devices, one thread each, check in, get their assignment and run the
SDK's loop (:class:`edge_sdk.secagg.loop.SecAggLoop`: polls, the four stages' messages over
real HTTP) on a random delta of ``params`` parameters. With 30 % dropouts that many devices
vanish silently after sharing their keys (the costly case: the mask stage waits for its
deadline, then the server rebuilds their mask keys). Per device: CPU milliseconds
(``time.thread_time`` of its thread around the loop: crypto, encoding, JSON, HTTP client),
bytes up and down (request and answer bodies). Per round: the coordinator process's CPU
seconds (``/proc/PID/stat``, from the first check-in to the commit, polls included) and the
wall time from the first advertise to the commit. Against a plain round on a fresh
coordinator: the same devices upload their delta as an fp32 frame (the SDK's encode and
POST). The committed version is checked against numpy's weighted mean of the survivors.

**SecAgg+ cost** (``secagg`` part). One round of the protocol per configuration, with the real
device client (:mod:`edge_sdk.secagg.client`: X25519 keys, Shamir shares in AES-GCM, AES-CTR
masks) and the real server state machine (:mod:`coordinator.secagg.session`); the transport
between them is a function call, so the figures are the protocol's computation and payload
bytes, not HTTP. Cohorts of 10, 50, 100 and 200 devices, a model of ``params`` parameters,
0 % or 30 % of the devices dropping after sharing their keys (the costly case: the server
rebuilds their mask keys and removes their pairwise masks). Per device: CPU milliseconds
(``time.process_time`` around that device's calls, mean over devices), bytes up and down (the
stage payloads: 32-byte keys, 160-byte share ciphertexts, the masked vector packed at
``ceil(bits / 8)`` bytes an element, 66-byte opened shares, 4 bytes per device index in the
lists the server sends). Against a plain round: the device uploads its delta as an fp32 frame
(``edge_sdk.codecs``) and the server decodes and folds each into a running sum
(:class:`coordinator.aggregation.RunningSum`), as the sync round does. Server time: all the
session's calls including the unmasking, in CPU seconds.

**Accuracy against epsilon** (``dp`` part). DP-FedAvg on FedProx Synthetic-IID with a
population of ``population`` devices (each device's data split 80/20 into training and
held-out data), softmax regression trained locally with numpy SGD. Each round draws a
cohort of ``cohort`` devices uniformly without replacement from the whole population; their
deltas are combined with the coordinator's own :func:`coordinator.privacy.noised_mean`
(clip, equal weights, fixed denominator, Gaussian noise from AES-CTR) and the noise
multiplier comes from :func:`coordinator.privacy.noise_for_budget` for each epsilon at delta
1e-5 over ``rounds`` rounds; "none" is plain example-weighted FedAvg. This part is a numpy
simulation of the rounds, not a fleet over HTTP (1,000 emulated SDK clients with ORT training
take far longer than this machine's shared cores allow); what it measures is the effect of
the clipping and noise the coordinator applies. Synthetic-IID, not Synthetic(1, 1): with a
thousand devices each drawing its own random true model, no global model exists to learn
(scikit-learn's logistic regression on the pooled data scores 0.12 held out, against 0.98 on
Synthetic-IID). The clip is ``clip_factor`` x the median update norm of the non-private
run's first seed. Accuracy: held-out, mean of the last 5 rounds, mean over ``seeds`` seeds.

Run: ``./dev bench bench_secagg`` (about 30 minutes on 2 shared cores; ``--quick`` for a
smoke run; ``--only http|secagg|dp`` reruns one part and keeps the others' figures;
``--clip-factor F``). Writes ``benchmarks/results/bench_secagg.json`` and ``bench_secagg.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.aggregation import RunningSum
from coordinator.embedded import EmbeddedCoordinator
from coordinator.privacy import DpSpec, noise_for_budget, noised_mean
from coordinator.secagg import SecAggSession
from coordinator.tensors import decode_delta
from edge_sdk.codecs import decode_update, encode_update
from edge_sdk.errors import ConditionsLapsed, Overloaded
from edge_sdk.protocol import (
    FRAME_CONTENT_TYPE,
    HEADER_ENROLLMENT,
    HEADER_IDEMPOTENCY_KEY,
    HEADER_REPORT,
    Route,
)
from edge_sdk.secagg import ring, shamir
from edge_sdk.secagg.client import CIPHERTEXT_BYTES, SecAggDevice
from edge_sdk.secagg.loop import SecAggLoop
from edge_sdk.transport import Transport
from fedge.fleet.synthetic import NUM_CLASSES, NUM_FEATURES, fedprox_synthetic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
INDEX_BYTES = 4
KEY_BYTES = 32


@dataclass(frozen=True)
class Setup:
    cohorts: tuple[int, ...] = (10, 50, 100, 200)
    dropouts: tuple[float, ...] = (0.0, 0.3)
    params: int = 100_000
    levels: int = 2**16
    max_weight: int = 100
    population: int = 1000
    cohort: int = 100
    rounds: int = 100
    epsilons: tuple[float | None, ...] = (1.0, 2.0, 4.0, 8.0, None)
    seeds: int = 2
    local_epochs: int = 2
    batch_size: int = 10
    lr: float = 0.05
    max_samples: int = 250
    clip_factor: float = 1.0
    # The HTTP rounds' stages after the first: at least this, and this much per device (a
    # cohort's masking and uploads share the cores; at 200 devices 30 s was too short here).
    stage_timeout_s: float = 30.0
    stage_s_per_device: float = 0.75


QUICK = Setup(cohorts=(10, 50), params=10_000, population=200, cohort=20, rounds=10,
              epsilons=(8.0, None), seeds=1, stage_timeout_s=10.0)  # fmt: skip


# -- SecAgg+ over HTTP ----------------------------------------------------------------------


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _HttpRound:
    """A coordinator process with one task, and ``n`` registered devices holding their
    assignment of its first round."""

    def __init__(self, n: int, plan: dict[str, Any], bundle: Path, root: Path) -> None:
        self.coord = EmbeddedCoordinator(root / "fedge.db", subprocess=True).start()
        assert self.coord.process is not None
        self.pid = self.coord.process.pid
        self.cpu0 = _process_cpu_s(self.pid)
        admin = self.coord.admin()
        bundle_id = admin.upload_bundle(bundle)["bundle_id"]
        self.task_id = admin.create_task(bundle_id, plan)["task_id"]
        self.admin = admin
        self.devices = [Transport(self.coord.url) for _ in range(n)]
        enroll = {HEADER_ENROLLMENT: self.coord.enrollment_token or ""}
        for t in self.devices:
            reg = t.call("POST", Route.REGISTER, {"runtimes": ["ort-step"]}, headers=enroll)
            t.credentials = (reg["device_id"], reg["secret"])
        self.assignments: list[dict[str, Any]] = []
        sys.path.insert(0, str(ROOT))  # the test fixtures' device conditions and bundle
        from tests.fixtures.coordinator import GOOD_CONDITIONS

        body = {"runtimes": ["ort-step"], "conditions": GOOD_CONDITIONS}
        for t in self.devices:  # candidates, then (after the window) assignments
            t.call("POST", Route.CHECKIN, body)
        time.sleep(plan["selection_window_s"] + 0.2)
        for t in self.devices:
            answer = t.call("POST", Route.CHECKIN, body)
            assert answer["action"] == "train", answer
            self.assignments.append(answer["assignment"])

    def server_cpu_s(self) -> float:
        return _process_cpu_s(self.pid) - self.cpu0

    def version(self, number: int, length: int) -> np.ndarray:
        frame = self.devices[0].request(
            "GET", Route.VERSION_PARAMS.format(task_id=self.task_id, version=number)
        ).body
        return decode_update(frame, expected_length=length).astype(np.float64)

    def close(self) -> None:
        for t in self.devices:
            t.close()
        self.admin.close()
        self.coord.stop()


def _threads(n: int, work: Any) -> dict[int, Any]:
    out: dict[int, Any] = {}

    def run(i: int) -> None:
        try:
            out[i] = work(i)
        except BaseException as e:  # recorded: a bench row must not hide a failure
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def http_round(n: int, dropout: float, setup: Setup, bundle: Path, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    deltas = [rng.normal(0, 0.002, setup.params) for _ in range(n)]
    weights = [int(rng.integers(1, setup.max_weight + 1)) for _ in range(n)]
    gone = set(rng.choice(n, size=round(dropout * n), replace=False).tolist())
    plan = {"goal": n, "over_selection": 1.0, "selection_window_s": 1.0, "rounds": 1,
            "round_deadline_s": 120.0, "min_reporting_fraction": 0.5,
            "secagg": {"stage_timeout_s": max(setup.stage_timeout_s, setup.stage_s_per_device * n),
                       "levels": setup.levels,
                       "max_weight": setup.max_weight, "dropout": 0.3}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-secagg-") as tmp:
        r = _HttpRound(n, plan, bundle, Path(tmp))
        try:
            base = r.version(0, setup.params)
            started = time.monotonic()

            def device(i: int) -> tuple[float, Any, int, int]:
                loop: SecAggLoop
                link = r.devices[i]
                up0, down0 = link.bytes_sent, link.bytes_received

                def recheck() -> tuple[str, ...]:
                    return ("vanished",) if i in gone and loop.answered == "share" else ()

                loop = SecAggLoop(r.devices[i], r.assignments[i], deltas[i], weights[i],
                                  rng=np.random.default_rng(i), recheck=recheck)  # fmt: skip
                t = time.thread_time()
                try:
                    result: Any = loop.run()
                except ConditionsLapsed:
                    result = None
                cpu = time.thread_time() - t
                return cpu, result, link.bytes_sent - up0, link.bytes_received - down0

            results = _threads(n, device)
            wall = time.monotonic() - started
            server = r.server_cpu_s()
            bad = [v for v in results.values() if isinstance(v, BaseException)]
            if bad:
                raise bad[0]
            kept = [i for i in range(n) if i not in gone]
            rnd = r.admin.rounds(r.task_id)[0]
            secagg = rnd["metrics"]["secagg"]
            if rnd["state"] == "committed":
                assert all(results[i][1].counted for i in kept), [results[i][1] for i in kept]
                clipped = [deltas[i] * min(1.0, 1.0 / np.linalg.norm(deltas[i])) for i in kept]
                want = np.average(clipped, axis=0, weights=[weights[i] for i in kept])
                error = float(np.abs(r.version(1, setup.params) - base - want).max())
            else:  # reported as such: a row must not hide that the round failed
                error = float("nan")
            row = {
                "devices": n, "dropout": dropout, "degree": secagg["degree"],
                "ring_bits": secagg["bits"],
                "device_cpu_ms": 1e3 * float(np.mean([results[i][0] for i in kept])),
                "device_cpu_ms_max": 1e3 * float(np.max([results[i][0] for i in kept])),
                "bytes_up": float(np.mean([results[i][2] for i in kept])),
                "bytes_down": float(np.mean([results[i][3] for i in kept])),
                "server_cpu_s": server, "wall_s": wall, "max_error": error,
                "outcome": rnd["state"], "reason": rnd["metrics"].get("reason"),
                "stage_timeout_s": plan["secagg"]["stage_timeout_s"],  # type: ignore[index]
                "uploaded": secagg["answered"]["mask"],
            }  # fmt: skip
        finally:
            r.close()
        # the plain round: the survivors' deltas as fp32 frames, uploaded as the SDK does
        kept = [i for i in range(n) if i not in gone]
        plain = {k: v for k, v in plan.items() if k != "secagg"}
        plain.update(goal=len(kept), robust="none")
        p = _HttpRound(len(kept), plain, bundle, Path(tmp) / "plain")
        try:
            started = time.monotonic()

            def upload(j: int) -> tuple[float, int, int]:
                i = kept[j]
                link = p.devices[j]
                up0, down0 = link.bytes_sent, link.bytes_received
                t = time.thread_time()
                frame, _ = encode_update(deltas[i].astype(np.float32), "fp32")
                a = p.assignments[j]
                while True:  # as the SDK's next pass would: resend the same upload when busy
                    try:
                        link.request(
                            "POST",
                            Route.ASSIGNMENT_UPDATE.format(assignment_id=a["assignment_id"]),
                            body=frame, headers={
                                "Content-Type": FRAME_CONTENT_TYPE,
                                HEADER_IDEMPOTENCY_KEY: f"k-{i}",
                                HEADER_REPORT: json.dumps({"num_examples": weights[i]})},
                        )  # fmt: skip
                        break
                    except Overloaded as e:
                        time.sleep(e.retry_after_s or 1.0)
                cpu = time.thread_time() - t
                return cpu, link.bytes_sent - up0, link.bytes_received - down0

            cpu = _threads(len(kept), upload)
            bad = [v for v in cpu.values() if isinstance(v, BaseException)]
            if bad:
                raise bad[0]
            deadline = time.monotonic() + 60
            while p.admin.task(p.task_id)["model_version"] < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            row.update(
                plain_device_cpu_ms=1e3 * float(np.mean([c[0] for c in cpu.values()])),
                plain_bytes_up=float(np.mean([c[1] for c in cpu.values()])),
                plain_bytes_down=float(np.mean([c[2] for c in cpu.values()])),
                plain_server_cpu_s=p.server_cpu_s(), plain_wall_s=time.monotonic() - started,
            )  # fmt: skip
        finally:
            p.close()
    row["up_ratio"] = row["bytes_up"] / row["plain_bytes_up"]
    return row


def run_http(setup: Setup, out: dict[str, Any], save: Any) -> None:
    """Rows for ``setup.cohorts``, replacing those of earlier runs for the same cohorts;
    ``save()`` after each row, so that a long run stopped midway keeps what it measured."""
    out["secagg_http"] = [r for r in out.get("secagg_http", [])
                          if r["devices"] not in setup.cohorts]  # fmt: skip
    print(f"{'devices':>7} {'drop':>5} {'deg':>4} {'bits':>4} {'dev ms':>7} {'plain ms':>8} "
          f"{'up B':>9} {'plain B':>9} {'ratio':>5} {'down B':>8} {'srv s':>6} {'plain s':>7} "
          f"{'wall s':>6} {'max err':>8}")  # fmt: skip
    sys.path.insert(0, str(ROOT))
    from tests.fixtures.coordinator import make_synthetic_bundle

    with tempfile.TemporaryDirectory(prefix="bench-secagg-bundle-") as tmp:
        bundle = make_synthetic_bundle(Path(tmp) / "bundle", num_parameters=setup.params)
        for n in setup.cohorts:
            for dropout in setup.dropouts:
                r = http_round(n, dropout, setup, bundle)
                out["secagg_http"].append(r)
                out["secagg_http"].sort(key=lambda row: (row["devices"], row["dropout"]))
                save()
                print(
                    f"{n:>7} {dropout:>5.0%} {r['degree']:>4} {r['ring_bits']:>4} "
                    f"{r['device_cpu_ms']:>7.1f} {r['plain_device_cpu_ms']:>8.1f} "
                    f"{r['bytes_up']:>9.0f} {r['plain_bytes_up']:>9.0f} {r['up_ratio']:>5.2f} "
                    f"{r['bytes_down']:>8.0f} {r['server_cpu_s']:>6.2f} "
                    f"{r['plain_server_cpu_s']:>7.2f} {r['wall_s']:>6.1f} {r['max_error']:>8.1e}"
                    f" {r['outcome']}",
                    flush=True,
                )


# -- SecAgg+ cost ---------------------------------------------------------------------------


def secagg_round(n: int, dropout: float, setup: Setup, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    names = [f"d-{i}" for i in range(n)]
    context = secrets.token_bytes(16)
    spec = ring.RingSpec.for_cohort(n, 1.0, setup.levels, setup.max_weight)
    devices = {d: SecAggDevice(i, context) for i, d in enumerate(names)}
    deltas = {d: rng.normal(0, 0.002, setup.params) for d in names}
    weights = {d: int(rng.integers(1, setup.max_weight + 1)) for d in names}
    cpu = dict.fromkeys(names, 0.0)
    up = dict.fromkeys(names, 0)
    down = dict.fromkeys(names, 0)
    server = 0.0

    def on_server(call: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal server
        t = time.process_time()
        out = call(*args, **kwargs)
        server += time.process_time() - t
        return out

    def on_device(name: str, call: Any, *args: Any) -> Any:
        t = time.process_time()
        out = call(*args)
        cpu[name] += time.process_time() - t
        return out

    s = on_server(SecAggSession.start, names, context=context, spec=spec,
                  length=setup.params, min_survivors=1, graph_seed=secrets.token_bytes(32),
                  now=0.0, stage_timeout_s=60.0, dropout=0.3)  # fmt: skip
    for d in names:
        keys = on_device(d, devices[d].advertise)
        up[d] += 2 * KEY_BYTES
        on_server(s.advertise, d, *keys)
    on_server(s.tick, 0.0)
    for d in names:
        neighbours = on_server(s.neighbour_keys, d)
        down[d] += len(neighbours) * (2 * KEY_BYTES + INDEX_BYTES)
        shares = on_device(d, devices[d].share, neighbours, s.threshold)
        up[d] += len(shares) * (CIPHERTEXT_BYTES + INDEX_BYTES)
        on_server(s.share, d, shares)
    on_server(s.tick, 0.0)
    gone = set(rng.choice(names, size=round(dropout * n), replace=False).tolist())
    inboxes = {}
    for d in names:
        inbox, sharers = on_server(s.inbox, d)
        inboxes[d] = inbox
        down[d] += len(inbox) * (CIPHERTEXT_BYTES + INDEX_BYTES) + len(sharers) * INDEX_BYTES
        if d in gone:
            continue
        y = on_device(d, devices[d].mask, deltas[d], weights[d], spec, sharers, rng)
        wire = on_device(d, ring.pack, y, spec.bits)
        up[d] += len(wire)
        on_server(s.mask, d, on_server(ring.unpack, wire, spec.bits, setup.params + 1))
    on_server(s.tick, 60.0)  # the dropouts' deadline
    for d in names:
        if d in gone:
            continue
        survivors, dropped = on_server(s.survivors, d)
        down[d] += (len(survivors) + len(dropped)) * INDEX_BYTES
        opened = on_device(d, devices[d].unmask, inboxes[d], survivors, dropped)
        up[d] += len(opened) * (shamir.SHARE_BYTES + INDEX_BYTES)
        on_server(s.unmask, d, opened)
    on_server(s.tick, 60.0)
    assert s.result is not None, s.reason
    kept = [d for d in names if d not in gone]
    clipped = [deltas[d] * min(1.0, 1.0 / np.linalg.norm(deltas[d])) for d in kept]
    want = np.average(clipped, axis=0, weights=[weights[d] for d in kept])
    error = float(np.abs(s.result.mean - want).max())

    # The plain round: fp32 frames, decoded and folded as the sync round does.
    plain_up, plain_cpu = 0, 0.0
    total, plain_server = RunningSum(setup.params), 0.0
    for d in kept:
        t = time.process_time()
        frame, _ = encode_update(deltas[d].astype(np.float32), "fp32")
        plain_cpu += time.process_time() - t
        plain_up += len(frame)
        t = time.process_time()
        total.fold(decode_delta(frame, setup.params), float(weights[d]))
        plain_server += time.process_time() - t
    total.mean()
    active = kept
    return {
        "devices": n,
        "dropout": dropout,
        "degree": len(s.links[0]),
        "threshold": s.threshold,
        "ring_bits": spec.bits,
        "device_cpu_ms": 1e3 * float(np.mean([cpu[d] for d in active])),
        "device_cpu_ms_max": 1e3 * float(np.max([cpu[d] for d in active])),
        "bytes_up": float(np.mean([up[d] for d in active])),
        "bytes_down_extra": float(np.mean([down[d] for d in active])),
        "plain_bytes_up": plain_up / len(kept),
        "plain_device_cpu_ms": 1e3 * plain_cpu / len(kept),
        "up_ratio": float(np.mean([up[d] for d in active])) / (plain_up / len(kept)),
        "server_s": server,
        "plain_server_s": plain_server,
        "mean_max_error": error,
    }


# -- accuracy against epsilon ---------------------------------------------------------------


def _softmax_sgd(w: np.ndarray, x: np.ndarray, y: np.ndarray, setup: Setup,
                 rng: np.random.Generator) -> np.ndarray:  # fmt: skip
    w = w.copy()
    for _ in range(setup.local_epochs):
        order = rng.permutation(len(y))
        for i in range(0, len(y), setup.batch_size):
            b = order[i : i + setup.batch_size]
            xb = np.hstack([x[b], np.ones((len(b), 1))])
            logits = xb @ w
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(len(b)), y[b]] -= 1.0
            w -= setup.lr * xb.T @ p / len(b)
    return w


def dp_run(epsilon: float | None, setup: Setup, seed: int, clip: float) -> dict[str, Any]:
    data = fedprox_synthetic(
        1.0, 1.0, setup.population, seed, iid=True, max_samples=setup.max_samples
    )
    train, test_x, test_y = [], [], []
    for d in data:
        cut = max(1, int(0.8 * len(d)))
        train.append((d.x[:cut].astype(np.float64), d.y[:cut]))
        test_x.append(d.x[cut:])
        test_y.append(d.y[cut:])
    tx, ty = np.vstack(test_x).astype(np.float64), np.concatenate(test_y)
    shape = (NUM_FEATURES + 1, NUM_CLASSES)
    w = np.zeros(shape)
    z = None
    if epsilon is not None:
        z = noise_for_budget(epsilon, setup.population, setup.cohort, setup.rounds, 1e-5)
    spec = DpSpec(clip=clip, noise_multiplier=z or 1.0)
    rng = np.random.default_rng(seed + 1000)
    accs, norms = [], []
    for _ in range(setup.rounds):
        cohort = rng.choice(setup.population, setup.cohort, replace=False)
        deltas = [(_softmax_sgd(w, *train[k], setup, rng) - w).ravel() for k in cohort]
        norms += [float(np.linalg.norm(d)) for d in deltas]
        if z is None:
            mean = np.average(deltas, axis=0, weights=[len(train[k][1]) for k in cohort])
        else:
            mean = noised_mean(iter(deltas), w.size, spec, setup.cohort).mean
        w = w + mean.reshape(shape)
        logits = np.hstack([tx, np.ones((len(tx), 1))]) @ w
        accs.append(float(np.mean(np.argmax(logits, axis=1) == ty)))
    return {"epsilon": epsilon, "seed": seed, "noise_multiplier": z, "clip": clip,
            "accuracy": float(np.mean(accs[-5:])), "curve": accs,
            "median_norm": float(np.median(norms))}  # fmt: skip


# -- report ---------------------------------------------------------------------------------


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    http = result.get("secagg_http", [])
    fig, axes = plt.subplots(1, 3 if http else 2, figsize=(16 if http else 11, 4))
    a, b = axes[0], axes[-1]
    if http:
        c = axes[1]
        for dropout in sorted({r["dropout"] for r in http}):
            rows = [r for r in http if r["dropout"] == dropout]
            n = [r["devices"] for r in rows]
            c.plot(n, [r["device_cpu_ms"] for r in rows], "o-",
                   label=f"device CPU ms, {dropout:.0%}")  # fmt: skip
            c.plot(n, [r["server_cpu_s"] for r in rows], "^-", label=f"server CPU s, {dropout:.0%}")
            c.plot(n, [r["up_ratio"] for r in rows], "s--", label=f"upload / plain, {dropout:.0%}")
        c.set_xlabel("devices in the round")
        c.set_title("SecAgg+ over HTTP, per round")
        c.set_yscale("log")
        c.legend(fontsize=7)
    for dropout in sorted({r["dropout"] for r in result["secagg"]}):
        rows = [r for r in result["secagg"] if r["dropout"] == dropout]
        n = [r["devices"] for r in rows]
        a.plot(n, [r["device_cpu_ms"] for r in rows], "o-", label=f"device CPU ms, {dropout:.0%}")
        a.plot(n, [r["up_ratio"] for r in rows], "s--", label=f"upload / plain, {dropout:.0%}")
    a.set_xlabel("devices in the round")
    a.set_title(f"SecAgg+ per device ({result['setup']['params']:,} parameters)")
    a.set_yscale("log")
    a.legend(fontsize=7)
    labels, accs = [], []
    for row in result["dp_summary"]:
        labels.append("none" if row["epsilon"] is None else f"eps {row['epsilon']:g}")
        accs.append(row["accuracy"])
    b.bar(labels, accs)
    b.set_ylim(0, 1)
    b.set_title("DP-FedAvg, FedProx Synthetic-IID: held-out accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_secagg(setup: Setup, out: dict[str, Any]) -> None:
    out["secagg"] = []
    print(f"{'devices':>7} {'drop':>5} {'deg':>4} {'bits':>4} {'dev ms':>8} {'up B':>10} "
          f"{'plain B':>10} {'ratio':>6} {'down+ B':>9} {'server s':>9} {'plain s':>8} "
          f"{'max err':>9}")  # fmt: skip
    for n in setup.cohorts:
        for dropout in setup.dropouts:
            r = secagg_round(n, dropout, setup)
            out["secagg"].append(r)
            print(
                f"{n:>7} {dropout:>5.0%} {r['degree']:>4} {r['ring_bits']:>4} "
                f"{r['device_cpu_ms']:>8.1f} {r['bytes_up']:>10.0f} "
                f"{r['plain_bytes_up']:>10.0f} {r['up_ratio']:>6.2f} "
                f"{r['bytes_down_extra']:>9.0f} {r['server_s']:>9.2f} "
                f"{r['plain_server_s']:>8.3f} {r['mean_max_error']:>9.2e}",
                flush=True,
            )


def run_dp(setup: Setup, out: dict[str, Any]) -> None:
    # The clip: the median norm of the non-private run's updates (McMahan et al.'s choice).
    out["dp"] = []
    clip = None
    summary = []
    for eps in [None, *[e for e in setup.epsilons if e is not None]]:
        runs = []
        for seed in range(setup.seeds):
            r = dp_run(eps, setup, seed, clip or 1.0)
            if eps is None and clip is None and seed == 0:
                clip = setup.clip_factor * r["median_norm"]
            runs.append(r)
            out["dp"].append(r)
        summary.append({"epsilon": eps, "accuracy": float(np.mean([r["accuracy"] for r in runs])),
                        "noise_multiplier": runs[0]["noise_multiplier"], "clip": clip})  # fmt: skip
        print(
            f"epsilon {eps!s:>5}: accuracy {summary[-1]['accuracy']:.3f} "
            f"(z {runs[0]['noise_multiplier']}, clip {clip:.3g})",
            flush=True,
        )
    out["dp_summary"] = sorted(summary, key=lambda r: (r["epsilon"] is None, r["epsilon"] or 0))


def run(setup: Setup, name: str, only: str | None = None) -> dict[str, Any]:
    """Both parts, or ``only`` one of them (the other's figures kept from the last results)."""
    path = RESULTS / f"{name}.json"
    out: dict[str, Any] = json.loads(path.read_text()) if only and path.exists() else {}
    out.update(setup=asdict(setup), machine=platform.platform())
    RESULTS.mkdir(exist_ok=True)

    def save() -> None:
        path.write_text(json.dumps(out, indent=1))

    if only in (None, "http"):
        run_http(setup, out, save)
    if only in (None, "secagg"):
        run_secagg(setup, out)
    if only in (None, "dp"):
        run_dp(setup, out)
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    if "secagg" in out and "dp_summary" in out:
        _plot(out, RESULTS / f"{name}.png")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run (bench_secagg_quick.*)")
    p.add_argument("--only", choices=("http", "secagg", "dp"),
                   help="run one part, keep the others'")  # fmt: skip
    p.add_argument("--clip-factor", type=float, default=1.0, help="DP clip / median norm")
    p.add_argument("--cohorts", help="comma-separated cohort sizes (default 10,50,100,200)")
    args = p.parse_args(argv)
    setup, name = (QUICK, "bench_secagg_quick") if args.quick else (Setup(), "bench_secagg")
    setup = replace(setup, clip_factor=args.clip_factor)
    if args.cohorts:
        setup = replace(setup, cohorts=tuple(int(c) for c in args.cohorts.split(",")))
    run(setup, name, args.only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

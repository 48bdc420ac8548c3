"""Overload: what a coordinator offered twice its capacity does with a bounded work queue
and without one.

A real coordinator (HTTP on loopback, SQLite) whose check-in is slowed to ``SERVICE_MS`` per
call (a slow disk or a small board: it puts capacity at a known ~1000/SERVICE_MS per second,
whatever else runs on this shared machine). Open-loop load: check-ins sent at ``OFFERED_PER_S``
for ``DURATION_S``, each on its own connection with a ``TIMEOUT_S`` client timeout, from
pre-registered devices. Two coordinators: the queue bounded at ``BOUND`` operations (the rest
answered ``503 overloaded`` + ``Retry-After`` at once) and effectively unbounded.

Reported per mode: answers by kind (200, 503, client timeout), latency of the served ones
(p50/p95/max), how fast a refusal comes, and the work the server did for clients that had
already given up (it cannot know: a timed-out request stays queued and is run later).

Run: ``./dev bench bench_overload`` (``--quick``: 3 s). Writes
``benchmarks/results/bench_overload.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import platform
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coordinator.embedded import EmbeddedCoordinator  # noqa: E402
from edge_sdk.protocol import Route, device_auth_header  # noqa: E402
from tests.fixtures.coordinator import GOOD_CONDITIONS, DeviceHTTP  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SERVICE_MS = 20.0
OFFERED_PER_S = 100.0
TIMEOUT_S = 3.0
BOUND = 16
UNBOUNDED = 1_000_000
DEVICES = 40


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def one_checkin(port: int, auth: str, body: bytes) -> tuple[str, float]:
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        conn.request("POST", Route.CHECKIN, body=body,
                     headers={"Authorization": auth, "Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        kind = str(resp.status)
    except (TimeoutError, OSError, http.client.HTTPException):
        kind = "timeout"
    finally:
        conn.close()
    return kind, time.monotonic() - t0


def run_mode(bound: int, duration_s: float, workdir: Path) -> dict[str, Any]:
    with EmbeddedCoordinator(workdir / f"bound{bound}.db", seed=0, max_queued_operations=bound,
                             overload_retry_after_s=1.0) as coord:
        devices = [DeviceHTTP(coord) for _ in range(DEVICES)]
        auths = [device_auth_header(d.device_id, d.secret) for d in devices]
        for d in devices:
            d.close()
        service = coord.service
        real_checkin = service.checkin
        executed = [0]

        def slow_checkin(*args: Any) -> Any:
            executed[0] += 1
            time.sleep(SERVICE_MS / 1000.0)
            return real_checkin(*args)

        service.checkin = slow_checkin
        body = json.dumps({"runtimes": ["ort-step"], "conditions": GOOD_CONDITIONS}).encode()
        n = int(duration_s * OFFERED_PER_S)
        results: list[tuple[float, str, float]] = []
        lock = threading.Lock()
        pool = ThreadPoolExecutor(max_workers=int(OFFERED_PER_S * TIMEOUT_S * 1.5) + 16)
        start = time.monotonic()

        def task(i: int, sent_at: float) -> None:
            kind, latency = one_checkin(coord.port, auths[i % DEVICES], body)
            with lock:
                results.append((sent_at, kind, latency))

        for i in range(n):
            due = start + i / OFFERED_PER_S
            time.sleep(max(0.0, due - time.monotonic()))
            pool.submit(task, i, time.monotonic() - start)
        pool.shutdown(wait=True)
        # what was still queued when its client had gone: run after the load, for nobody
        deadline = time.monotonic() + 60
        while coord.work_queue.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        wall = time.monotonic() - start
        service.checkin = real_checkin
    kinds = [k for _, k, _ in results]
    served = np.array([lat for _, k, lat in results if k == "200"])
    refused = np.array([lat for _, k, lat in results if k == "503"])
    delivered = kinds.count("200")
    return {
        "bound": bound, "offered": n, "offered_per_s": OFFERED_PER_S,
        "capacity_per_s": 1000.0 / SERVICE_MS, "duration_s": duration_s, "wall_s": wall,
        "ok": delivered, "refused": kinds.count("503"), "timeouts": kinds.count("timeout"),
        "other": len(kinds) - delivered - kinds.count("503") - kinds.count("timeout"),
        "served_p50_s": float(np.percentile(served, 50)) if served.size else None,
        "served_p95_s": float(np.percentile(served, 95)) if served.size else None,
        "served_max_s": float(served.max()) if served.size else None,
        "refused_p50_ms": float(np.percentile(refused, 50) * 1000) if refused.size else None,
        "refused_max_ms": float(refused.max() * 1000) if refused.size else None,
        "executed": executed[0], "wasted": executed[0] - delivered,
        # check-ins answered in time, per second of offered load
        "goodput_per_s": delivered / duration_s,
        "trace": [(round(t, 3), k, round(lat, 4)) for t, k, lat in sorted(results)],
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 4), dpi=110, sharey=True)
    colors = {"200": "tab:green", "503": "tab:orange", "timeout": "tab:red"}
    for ax, r in zip(axes, rows, strict=True):
        for kind, color in colors.items():
            pts = [(t, lat) for t, k, lat in r["trace"] if k == kind]
            if pts:
                ax.scatter(*zip(*pts, strict=True), s=4, color=color, label=kind)
        name = "unbounded queue" if r["bound"] == UNBOUNDED else f"queue bound {r['bound']}"
        ax.set_title(f"{name}: {r['ok']} served, {r['refused']} refused, "
                     f"{r['timeouts']} timed out", fontsize=9)
        ax.set_xlabel("request sent at, s")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(markerscale=3)
    axes[0].set_ylabel("answer after, s")
    fig.suptitle(f"check-ins offered at {OFFERED_PER_S:.0f}/s to a coordinator serving "
                 f"{1000 / SERVICE_MS:.0f}/s (client timeout {TIMEOUT_S:.0f} s)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 s of load per mode")
    args = parser.parse_args()
    # clients that timed out leave mid-request: aiohttp logs each as an error, expected here
    logging.getLogger("aiohttp").setLevel(logging.CRITICAL)
    RESULTS.mkdir(exist_ok=True)
    duration = 3.0 if args.quick else 10.0
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory(prefix="fedge-overload-") as tmp:
        for bound in (BOUND, UNBOUNDED):
            log(f"queue bound {bound}: {duration:.0f} s at {OFFERED_PER_S:.0f}/s ...")
            rows.append(run_mode(bound, duration, Path(tmp)))

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    print(f"\ncheck-ins offered at {OFFERED_PER_S:.0f}/s for {duration:.0f} s; capacity "
          f"{1000 / SERVICE_MS:.0f}/s; client timeout {TIMEOUT_S:.0f} s")
    print(f"{'queue':>10} {'200':>5} {'503':>5} {'timeout':>8} {'p50 s':>7} {'p95 s':>7} "
          f"{'max s':>7} {'503 p50 ms':>11} {'wasted':>7} {'goodput/s':>10}")
    for r in rows:
        name = "unbounded" if r["bound"] == UNBOUNDED else str(r["bound"])
        print(f"{name:>10} {r['ok']:>5} {r['refused']:>5} {r['timeouts']:>8} "
              f"{fmt(r['served_p50_s'], '.3f'):>7} {fmt(r['served_p95_s'], '.3f'):>7} "
              f"{fmt(r['served_max_s'], '.3f'):>7} {fmt(r['refused_p50_ms'], '.1f'):>11} "
              f"{r['wasted']:>7} {r['goodput_per_s']:>10.1f}")
    name = "bench_overload_quick" if args.quick else "bench_overload"
    plot(rows, RESULTS / f"{name}.png")
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps({
        "machine": {"python": platform.python_version(), "cpus": 2},
        "service_ms": SERVICE_MS, "timeout_s": TIMEOUT_S, "modes": rows,
    }, indent=1))
    print(f"\nwrote {out} and {name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

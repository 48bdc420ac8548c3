"""Model downloads on each event loop the service offers, over plain HTTP and over TLS: what
uvloop, which has no ``sendfile``, costs the calls that stream a file, and what it gives where
no loop can hand the file to the kernel (HTTPS: the bytes are encrypted in the process).

A coordinator process (``fedge serve`` through ``EmbeddedCoordinator``, one process) per
timed phase, on asyncio's loop and on uvloop (``event_loop`` = ``asyncio`` / ``uvloop``, the
loop checked in the server's log), plain
HTTP and HTTPS (a certificate from a CA made for the run, ``tests/fixtures/pki.py``),
alternating in each of ``REPEATS`` repeats so that the shared cores' load falls on all. Each
phase: ``DOWNLOADS`` GETs of a 100k-parameter task's version 0 frame (400 KB, the file a
device fetches before training) by one registered device, on ``CONNECTIONS`` keep-alive
connections (``loadgen``; over TLS each connection's handshake precedes its first download,
in the timed interval). Figures: downloads/s, the server's CPU ms per download (user +
system of its process tree), the client's, latency percentiles.

Writes ``results/bench_downloads.json`` and ``bench_downloads.png``; ``quick`` (or
``FEDGE_BENCH_QUICK=1``) runs a short version into the temporary directory.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import cli, loadgen  # noqa: E402
from coordinator.embedded import EmbeddedCoordinator  # noqa: E402
from edge_sdk.protocol import Route  # noqa: E402
from tests.fixtures.coordinator import DeviceHTTP, make_synthetic_bundle  # noqa: E402
from tests.fixtures.pki import Pki, make_pki  # noqa: E402

QUICK = "quick" in sys.argv[1:] or os.environ.get("FEDGE_BENCH_QUICK", "") not in ("", "0")
RESULTS = Path(tempfile.gettempdir()) if QUICK else Path(__file__).parent / "results"
NUM_PARAMETERS = 100_000
DOWNLOADS = 300 if QUICK else 3000
CONNECTIONS = 16
REPEATS = 1 if QUICK else 3
LOOPS = ("asyncio", "uvloop")  # CoordinatorConfig.event_loop, chosen outright
TRANSPORTS = ("http", "https")
PLAN = {"rounds": 1, "goal": 10, "over_selection": 1.0, "selection_window_s": 0.0,
        "round_deadline_s": 3600.0, "robust": "none"}  # fmt: skip


def phase(workdir: Path, bundle: Path, event_loop: str, pki: Pki | None) -> dict[str, Any]:
    """One coordinator on ``event_loop`` (HTTPS with ``pki``'s certificate), timed."""
    tls = {} if pki is None else pki.coordinator_tls()
    with EmbeddedCoordinator(workdir / "fedge.db", subprocess=True,
                             event_loop=event_loop, **tls) as coord:  # fmt: skip
        assert coord.process is not None and coord.port is not None
        loadgen.check_event_loop(workdir / "fedge.db", event_loop)
        client_tls = coord.client_tls.context() if pki is not None else None
        admin = coord.admin()
        task_id = admin.create_task(admin.upload_bundle(bundle)["bundle_id"], PLAN)["task_id"]
        device = DeviceHTTP(coord)
        size = len(device.params(task_id, 0))
        device.close()
        path = Route.VERSION_PARAMS.format(task_id=task_id, version=0)
        requests = [loadgen.download_request(coord.port, (device.device_id, device.secret),
                                             path, close=False)] * DOWNLOADS  # fmt: skip

        def whole(status: int, body: bytes) -> bool:
            return status == 200 and len(body) == size

        cpu0 = loadgen.tree_cpu_s(coord.process.pid)
        result = loadgen.run(coord.port, requests, CONNECTIONS, whole, tls=client_tls)
        cpu = loadgen.tree_cpu_s(coord.process.pid) - cpu0
    return {"bytes": size, "downloads_per_s": result.per_s,
            "server_cpu_ms": 1e3 * cpu / DOWNLOADS, "client_cpu_ms": result.client_cpu_ms,
            "latency_ms": result.latency_ms}  # fmt: skip


def _kinds() -> list[tuple[str, str]]:
    """(transport, loop label) of every phase of a repeat, in order."""
    return [(transport, label) for transport in TRANSPORTS for label in LOOPS]


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate, cpu) = plt.subplots(1, 2, figsize=(11, 4))
    kinds = _kinds()
    for i, (transport, label) in enumerate(kinds):
        mine = [r for r in runs if (r["transport"], r["loop"]) == (transport, label)]
        color = f"C{LOOPS.index(label)}"
        rate.scatter([i] * len(mine), [r["downloads_per_s"] for r in mine], color=color)
        cpu.scatter([i] * len(mine), [r["server_cpu_ms"] for r in mine], color=color)
    for ax, title in ((rate, "downloads/s (400 KB frame, keep-alive)"),
                      (cpu, "server CPU ms per download")):  # fmt: skip
        ax.set_xticks(range(len(kinds)), [f"{t}\n{label}" for t, label in kinds])
        ax.set_title(title)
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    cli.words(__doc__)
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = make_synthetic_bundle(work / "bundle", NUM_PARAMETERS)
        (work / "pki").mkdir()
        pki = make_pki(work / "pki")
        for repeat in range(REPEATS):
            for transport, label in _kinds():
                run = phase(work / f"{transport}-{label}-{repeat}", bundle, label,
                            pki if transport == "https" else None)  # fmt: skip
                runs.append({"transport": transport, "loop": label, "repeat": repeat, **run})
                print(f"[bench_downloads] repeat {repeat + 1}/{REPEATS}, {transport}, {label}: "
                      f"{run['downloads_per_s']:.0f}/s", file=sys.stderr, flush=True)  # fmt: skip
    summary: dict[str, dict[str, float]] = {}
    for transport, label in _kinds():
        mine = [r for r in runs if (r["transport"], r["loop"]) == (transport, label)]
        summary[f"{transport} {label}"] = {
            key: sum(r[key] for r in mine) / len(mine)
            for key in ("downloads_per_s", "server_cpu_ms", "client_cpu_ms")
        }
    ratios = {}
    for transport in TRANSPORTS:
        uv, aio = summary[f"{transport} uvloop"], summary[f"{transport} asyncio"]
        suffix = "" if transport == "http" else "_tls"
        for key, name in (("downloads_per_s", "downloads"), ("server_cpu_ms", "server_cpu")):
            ratios[f"{name}_uvloop_vs_asyncio{suffix}"] = uv[key] / aio[key]
    print(f"\n{DOWNLOADS} downloads of a {runs[0]['bytes']:,}-byte frame, {CONNECTIONS} "
          "keep-alive connections, one server process; each repeat")  # fmt: skip
    print("| transport | loop | downloads/s | server CPU ms / download | p50 / p99 ms |")
    print("|---|---|---:|---:|---|")
    for r in runs:
        lat = r["latency_ms"]
        print(f"| {r['transport']} | {r['loop']} | {r['downloads_per_s']:,.0f} | "
              f"{r['server_cpu_ms']:.2f} | {lat['p50']:.1f} / {lat['p99']:.1f} |")  # fmt: skip
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}x (means)")
    out = {"machine": platform.platform(), "quick": QUICK, "downloads": DOWNLOADS,
           "connections": CONNECTIONS, "num_parameters": NUM_PARAMETERS, "runs": runs,
           "summary": summary, "ratios": ratios, "load_average": os.getloadavg()[0]}  # fmt: skip
    (RESULTS / "bench_downloads.json").write_text(json.dumps(out, indent=1))
    plot(runs, RESULTS / "bench_downloads.png")
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"wrote {RESULTS / 'bench_downloads.json'} and bench_downloads.png")


if __name__ == "__main__":
    main()

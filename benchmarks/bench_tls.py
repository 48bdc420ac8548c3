"""Steered check-ins and uploads over HTTPS and plain HTTP, on each event loop the service
offers: what TLS costs them, and which loop carries it better (``bench_downloads`` measures
the downloads the same way).

Each phase is one round of ``bench_coordinator`` (one ``fedge serve`` process through
``EmbeddedCoordinator``, real SQLite file with fsync, real HTTP): ``UPDATES`` devices
registered and selected, then ``STEERED`` steered check-ins on 8 keep-alive connections and
the round's uploads (int8 frames of a 100k-parameter model) on 32, timed. Over HTTPS the
certificate comes from a CA made for the run (``tests/fixtures/pki.py``) and the load
generator verifies it; each connection's handshake falls inside the timed interval, once per
keep-alive connection. Configurations alternate in each of ``REPEATS`` repeats: asyncio's
loop and uvloop (``event_loop`` = ``asyncio`` / ``uvloop``), over HTTPS and over HTTP.

Writes ``results/bench_tls.json`` and ``bench_tls.png``; ``quick`` (or
``FEDGE_BENCH_QUICK=1``) runs a short version into the temporary directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import bench_coordinator as bc  # noqa: E402
from benchmarks import cli  # noqa: E402

QUICK = bc.QUICK
RESULTS = bc.RESULTS
UPDATES = 300 if QUICK else 2000
STEERED = 2000 if QUICK else 10_000
REPEATS = 1 if QUICK else 2
LOOPS = ("asyncio", "uvloop")
KINDS = [(tls, loop) for tls in (True, False) for loop in LOOPS]
MEASURES = (("checkins_steered_per_s", "checkin_steered_cpu_ms", "steered"),
            ("uploads_per_s", "upload_cpu_ms", "uploads"))  # fmt: skip


def config(tls: bool, loop: str) -> bc.Config:
    return bc.Config(keep_alive=True, updates=UPDATES, steered=STEERED, tls=tls, event_loop=loop)


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for tls, loop in KINDS:
        mine = [r for r in runs if r["tls"] == tls and r["event_loop"] == loop]
        entry = {}
        for rate, cpu, name in MEASURES:
            entry[f"{name}_per_s"] = float(np.mean([r[rate] for r in mine]))
            entry[f"{name}_server_cpu_ms"] = float(np.mean([r[cpu]["server"] for r in mine]))
        out[config(tls, loop).label] = entry
    return out


def ratios(summary: dict[str, dict[str, float]]) -> dict[str, float]:
    out = {}
    for name in ("steered", "uploads"):
        for key, what in ((f"{name}_per_s", name), (f"{name}_server_cpu_ms", f"{name}_cpu")):
            for tls, transport in ((True, "https"), (False, "http")):
                uv, aio = (summary[config(tls, loop).label][key] for loop in ("uvloop", "asyncio"))
                out[f"{what}_uvloop_vs_asyncio_{transport}"] = uv / aio
            for loop in LOOPS:
                https, http = (summary[config(tls, loop).label][key] for tls in (True, False))
                out[f"{what}_https_vs_http_{loop}"] = https / http
    return out


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    names = [f"{'https' if tls else 'http'}\n{loop}" for tls, loop in KINDS]
    for col, (rate, cpu, name) in enumerate(MEASURES):
        for k, (tls, loop) in enumerate(KINDS):
            mine = [r for r in runs if r["tls"] == tls and r["event_loop"] == loop]
            color = f"C{LOOPS.index(loop)}"
            axes[2 * col].scatter([k] * len(mine), [r[rate] for r in mine], color=color)
            axes[2 * col + 1].scatter([k] * len(mine), [r[cpu]["server"] for r in mine],
                                      color=color)  # fmt: skip
        axes[2 * col].set_title(f"{name}/s (dots: repeats)")
        axes[2 * col + 1].set_title(f"server CPU ms per {name.rstrip('s')}")
    for ax in axes:
        ax.set_xticks(range(len(KINDS)), names)
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    cli.words(__doc__)
    frames = bc.int8_frames(UPDATES)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        work = Path(tmp)
        bundle = bc.make_synthetic_bundle(work / "bundle", bc.NUM_PARAMETERS)
        for repeat in range(REPEATS):
            for tls, loop in KINDS:
                cfg = config(tls, loop)
                run = bc.run_round(bundle, cfg, frames, work)
                runs.append({"repeat": repeat, **run})
                print(f"[bench_tls] repeat {repeat + 1}/{REPEATS}, {cfg.label}: "
                      f"{run['checkins_steered_per_s']:.0f} steered/s, "
                      f"{run['uploads_per_s']:.0f} uploads/s",
                      file=sys.stderr, flush=True)  # fmt: skip
    summary = summarize(runs)
    ratio = ratios(summary)
    print(f"\none process, keep-alive; {STEERED:,} steered check-ins (8 connections), "
          f"{UPDATES:,} int8 uploads (32 in flight); each repeat; ms: server CPU per request")
    print("| configuration | steered/s | ms | uploads/s | ms | upload p50 / p99 ms |")
    print("|---|---:|---:|---:|---:|---|")
    for r in runs:
        lat = r["upload_latency_ms"]
        print(f"| {r['label']} | {r['checkins_steered_per_s']:,.0f} | "
              f"{r['checkin_steered_cpu_ms']['server']:.3f} | {r['uploads_per_s']:,.0f} | "
              f"{r['upload_cpu_ms']['server']:.2f} | {lat['p50']:.0f} / {lat['p99']:.0f} |")
    print("\nratios (means):")
    for name, value in ratio.items():
        print(f"  {name}: {value:.2f}x")
    out = {"machine": platform.platform(), "quick": QUICK, "updates": UPDATES,
           "steered": STEERED, "repeats": REPEATS,
           "configs": [dataclasses.asdict(config(t, loop)) for t, loop in KINDS],
           "runs": [{k: v for k, v in r.items() if k != "rss_samples_mib"} for r in runs],
           "summary": summary, "ratios": ratio, "load_average": os.getloadavg()[0]}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "bench_tls-quick" if QUICK else "bench_tls"
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(runs, RESULTS / f"{name}.png")
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"wrote {RESULTS / name}.json and .png")


if __name__ == "__main__":
    main()

"""The event counters of a node's serving processes, summed (coordinator/metrics_sharing.py).

The reference for a sum is one registry that saw every event of every process: the merged
snapshots must equal it. Then the service: two replicas on one SQLite file sharing a metrics
directory, each scraped over real HTTP, report the traffic both received; and ``fedge serve
--processes 2`` reports the node's traffic whichever child answers the scrape, through the
death of a child, and removes its directory at the end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from benchmarks.loadgen import tree_kib
from coordinator.config import ConfigError, CoordinatorConfig
from coordinator.embedded import EmbeddedCoordinator
from coordinator.metrics_sharing import INTERVAL_S, STALE_AFTER, SharedCounters, SharedRefusals
from edge_sdk.protocol import Route
from fedge.supervisor import _metrics_prefix, _pid_namespace, _remove_dead_metrics_dirs
from tests.coordinator.replicas.fleet import serving_children, wait_for
from tests.fixtures.coordinator import (
    GOOD_CONDITIONS,
    DeviceHTTP,
    Samples,
    admin_get,
    sample,
    scrape,
    select_devices,
)


class Instruments:
    """A counter and a histogram with labels, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("t_requests", "Requests", ["route", "status"],
                                registry=self.registry)  # fmt: skip
        self.seconds = Histogram("t_seconds", "Seconds", ["route"], buckets=(0.1, 1.0),
                                 registry=self.registry)  # fmt: skip

    def event(self, route: str, status: str, seconds: float) -> None:
        self.requests.labels(route, status).inc()
        self.seconds.labels(route).observe(seconds)


def samples(families: Any, created: bool = False) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in families
        for s in family.samples
        if created or not s.name.endswith("_created")
    }


def checkins(got: Samples) -> float:
    return sum(v for (name, _), v in got.items() if name == "fedge_checkins_total")


ROUND_SECONDS = "fedge_round_duration_seconds"


def round_durations(got: Samples) -> Samples:
    """The round-duration histogram's samples (not its creation time, which is a process's)."""
    return {
        (name, labels): v
        for (name, labels), v in got.items()
        if name.startswith(ROUND_SECONDS) and not name.endswith("_created")
    }


EVENTS = [("/a", "200", 0.05), ("/a", "200", 0.5), ("/a", "503", 2.0), ("/b", "200", 0.2)]


def test_the_merged_snapshots_equal_one_registry_that_saw_every_event(tmp_path: Path) -> None:
    one, two, union = Instruments(), Instruments(), Instruments()
    for k, event in enumerate(EVENTS * 3):
        (one if k % 3 else two).event(*event)  # a label set in one process only, too
        union.event(*event)
    mine = SharedCounters(tmp_path, one.registry)
    SharedCounters(tmp_path, two.registry).publish()
    merged = mine.families()
    assert samples(merged) == samples(union.registry.collect())
    assert {f.name: f.type for f in merged} == {"t_requests": "counter", "t_seconds": "histogram"}
    # a creation time is the earliest, not a sum
    created = samples(merged, created=True)
    for key, value in samples(two.registry.collect(), created=True).items():
        if key[0].endswith("_created"):
            assert created[key] == min(value, samples(one.registry.collect(), True)[key])


def test_the_sum_never_goes_down_whichever_process_is_scraped(tmp_path: Path) -> None:
    one, two = Instruments(), Instruments()
    shares = [SharedCounters(tmp_path, one.registry), SharedCounters(tmp_path, two.registry)]
    for share in shares:
        share.publish()  # as each does at its start
    sent, last = 0, 0.0
    for k in range(12):
        (one, two)[k % 2 == 0 and k % 3 != 0].event("/a", "200", 0.1)
        sent += 1
        got = sample(samples(shares[k % 2].families()), "t_requests_total", route="/a",
                     status="200")  # fmt: skip
        assert last <= got <= sent
        last = got
    # A process that died keeps its file; the one started in its place adds its own.
    counted = sample(samples(shares[0].families()), "t_requests_total", route="/a", status="200")
    assert counted == sent
    del shares[1], two
    again = Instruments()
    replacement = SharedCounters(tmp_path, again.registry)
    again.event("/a", "200", 0.1)
    merged = samples(replacement.families())
    assert sample(merged, "t_requests_total", route="/a", status="200") == sent + 1
    assert len(list(tmp_path.glob("*.json"))) == 3


class _Paused:
    """A collector whose first collection, on another thread, waits for ``go`` once it has
    read the counter: a snapshot taken, not yet written."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.read, self.go = threading.Event(), threading.Event()

    def collect(self) -> Iterator[Any]:
        yield from self.counter.collect()
        if not self.read.is_set():
            self.read.set()
            assert self.go.wait(10)


def test_a_snapshot_taken_earlier_never_overwrites_a_later_one(tmp_path: Path) -> None:
    """The event loop (the periodic publish, a scrape) and the worker thread (a dashboard
    view) both publish. Each took its snapshot outside the lock: a later one written first
    was then replaced by the earlier one, and a sibling's scrape summed less than this
    process had reported: the node's counter went down."""
    registry = CollectorRegistry()
    requests = Counter("t_requests", "Requests", registry=CollectorRegistry())
    paused = _Paused(requests)
    registry.register(paused)  # type: ignore[arg-type]
    share = SharedCounters(tmp_path, registry)
    requests.inc()
    slow = threading.Thread(target=share.publish)  # its snapshot: 1
    slow.start()
    assert paused.read.wait(10)
    requests.inc()
    fast = threading.Thread(target=share.publish)  # its snapshot: 2
    fast.start()
    fast.join(0.5)
    paused.go.set()
    slow.join(10)
    fast.join(10)
    sibling = SharedCounters(tmp_path, CollectorRegistry())
    assert sample(samples(sibling.families()), "t_requests_total") == 2


def gauges(registry: CollectorRegistry, values: dict[str, float]) -> None:
    for name, value in values.items():
        Gauge(name, name, registry=registry).set(value)


def test_gauges_are_summed_over_the_live_processes_only(tmp_path: Path) -> None:
    alive, dead, mine = Instruments(), Instruments(), Instruments()
    for who, rss, start, fds in [
        (alive, 100, 30.0, 1024), (dead, 200, 10.0, 512), (mine, 400, 20.0, 4096)
    ]:  # fmt: skip
        who.event("/a", "200", 0.1)
        gauges(who.registry, {"process_resident_memory_bytes": rss,
                              "process_start_time_seconds": start,
                              "process_max_fds": fds})  # fmt: skip
    shares = {who: SharedCounters(tmp_path, who.registry) for who in (alive, dead, mine)}
    for share in shares.values():
        share.publish()

    def node() -> Samples:
        return samples(shares[mine].families())

    assert sample(node(), "process_resident_memory_bytes") == 700
    assert sample(node(), "process_start_time_seconds") == 10.0  # the earliest
    assert sample(node(), "process_max_fds") == 512  # the tightest
    quiet = time.time() - STALE_AFTER * INTERVAL_S - 1
    os.utime(shares[dead].path, (quiet, quiet))  # its process stopped publishing
    os.utime(shares[alive].path, (quiet, quiet))
    shares[alive].publish()  # unchanged: not rewritten, touched
    assert shares[alive].path.stat().st_mtime > quiet + 1
    got = node()
    assert sample(got, "process_resident_memory_bytes") == 500  # the dead one's gone
    assert sample(got, "process_max_fds") == 1024
    assert sample(got, "process_start_time_seconds") == 10.0  # the node's start
    assert sample(got, "t_requests_total", route="/a", status="200") == 3  # counts stay


def test_foreign_or_broken_files_are_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mine = Instruments()
    mine.event("/a", "200", 0.1)
    (tmp_path / "broken.json").write_text('[["t_requests", "counter", "Requests", [')
    (tmp_path / "other.json").write_text('{"not": "a snapshot"}')
    (tmp_path / "left-over.tmp").write_text("[]")
    with caplog.at_level(logging.WARNING, logger="fedge.metrics"):
        got = samples(SharedCounters(tmp_path, mine.registry).families())
    assert got == samples(mine.registry.collect())
    assert [r.getMessage() for r in caplog.records if "broken.json" in r.getMessage()]


def test_an_unchanged_snapshot_is_not_written_again(tmp_path: Path) -> None:
    mine = Instruments()
    share = SharedCounters(tmp_path, mine.registry)
    share.publish()
    first = share.path.stat().st_ino
    share.publish()
    assert share.path.stat().st_ino == first  # not replaced
    mine.event("/a", "200", 0.1)
    share.publish()
    assert share.path.stat().st_ino != first
    assert samples(share.families()) == samples(mine.registry.collect())


def test_refusals_reach_the_other_processes_as_complete_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mine, theirs = SharedRefusals(tmp_path, 100), SharedRefusals(tmp_path, 100)
    odd = 'a-1\n"]\t'  # an id from a request's path: any character
    theirs.record("a-0", "malformed_frame")
    theirs.record(odd, "round_closed")
    assert mine.theirs() == {} and mine.count == 0  # buffered until published
    theirs.flush()
    assert mine.theirs() == {"a-0": "malformed_frame", odd: "round_closed"}
    assert mine.count == 2
    theirs.record("a-0", "duplicate_upload")  # the latest code of an assignment wins
    theirs.flush()
    with theirs.path.open("a") as f:
        f.write('["a-2", "round_')  # a line being written: read once it is complete
    assert mine.theirs() == {"a-0": "duplicate_upload", odd: "round_closed"}
    assert list(mine.theirs()) == [odd, "a-0"]  # the newest last
    with theirs.path.open("a") as f:
        f.write('closed"]\n{"not": "a line"}\n')
    with caplog.at_level(logging.WARNING, logger="fedge.metrics"):
        assert mine.theirs()["a-2"] == "round_closed"
    assert mine.count == 4
    assert any("malformed line" in r.getMessage() for r in caplog.records)
    assert theirs.theirs() == {}  # its own log is not its siblings'
    mine.close()
    theirs.close()
    theirs.record("a-3", "round_closed")  # answered during the shutdown: not an error
    assert "a-3" not in mine.theirs()


def test_a_refusal_log_stops_at_its_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mine, theirs = SharedRefusals(tmp_path, 3), SharedRefusals(tmp_path, 3)
    with caplog.at_level(logging.WARNING, logger="fedge.metrics"):
        for k in range(6):
            theirs.record(f"a-{k}", "malformed_frame")
    theirs.flush()
    assert list(mine.theirs()) == ["a-0", "a-1", "a-2"]
    assert len(theirs.path.read_text().splitlines()) == 3
    assert len([r for r in caplog.records if "is full" in r.getMessage()]) == 1
    mine.close()
    theirs.close()


def test_a_removed_refusal_log_is_started_again_with_the_processs_refusals(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    own = {"a-0": "malformed_frame", "a-1": "round_closed"}  # as the process keeps them
    theirs = SharedRefusals(directory, 100, own)
    for assignment_id, code in own.items():
        theirs.record(assignment_id, code)
    theirs.flush()
    first = theirs.path
    shutil.rmtree(directory)  # a temporary-directory cleaner under a long-running node
    own["a-2"] = "not_finite"
    theirs.record("a-2", "not_finite")  # into the removed file
    with caplog.at_level(logging.WARNING, logger="fedge.metrics"):
        theirs.flush()
    assert any("was removed" in r.getMessage() for r in caplog.records)
    assert theirs.path != first and theirs.path.is_file()
    mine = SharedRefusals(directory, 100)  # e.g. a process started after the removal
    assert mine.theirs() == own
    own["a-3"] = "round_closed"
    theirs.record("a-3", "round_closed")
    theirs.flush()
    assert mine.theirs() == own  # the new log goes on growing
    shutil.rmtree(directory)
    directory.write_text("in the way")  # cannot be made again: logged, tried next time
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedge.metrics"):
        theirs.flush()
    assert any("cannot be made again" in r.getMessage() for r in caplog.records)
    directory.unlink()
    theirs.flush()
    assert SharedRefusals(directory, 100).theirs() == own
    theirs.close()
    mine.close()


def test_a_scrape_answers_when_the_directory_is_gone_and_makes_it_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mine = Instruments()
    mine.event("/a", "200", 0.1)
    directory = tmp_path / "metrics"
    share = SharedCounters(directory, mine.registry)
    share.publish()
    shutil.rmtree(directory)  # a temporary-directory cleaner under a long-running node
    mine.event("/a", "200", 0.2)
    assert samples(share.families()) == samples(mine.registry.collect())
    assert json.loads(share.path.read_text())  # made again, with this process's snapshot
    shutil.rmtree(directory)
    directory.write_text("in the way")  # cannot be made again: logged, the scrape answers
    mine.event("/b", "503", 2.0)
    with caplog.at_level(logging.WARNING, logger="fedge.metrics"):
        assert samples(share.families()) == samples(mine.registry.collect())
    assert any("not written" in r.getMessage() for r in caplog.records)


def test_the_publishing_interval_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="interval_s"):
        SharedCounters(tmp_path, CollectorRegistry(), interval_s=0)


def test_a_supervised_node_makes_its_own_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="metrics_dir"):
        CoordinatorConfig(db_path=str(tmp_path / "f.db"), processes=2, metrics_dir="/tmp")


@pytest.mark.skipif(_pid_namespace() is None, reason="pids are told apart by namespace (Linux)")
def test_a_killed_supervisors_directory_is_removed_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = tmp_path / f"{_metrics_prefix(gone.pid)}x1"
    alive = tmp_path / f"{_metrics_prefix(os.getpid())}x2"
    other = tmp_path / f"fedge-metrics-{_pid_namespace()}.notapid-x3"
    # another PID namespace's (a container sharing the directory): its pids are not ours
    foreign = tmp_path / f"fedge-metrics-1.{gone.pid}-x4"
    plain = tmp_path / f"{_metrics_prefix(gone.pid)}x5"
    for d in (dead, alive, other, foreign):
        d.mkdir()
        (d / "1-ab.json").write_text("[]")
    plain.write_text("not a directory")
    _remove_dead_metrics_dirs()
    assert not dead.exists()
    assert alive.is_dir() and other.is_dir() and foreign.is_dir() and plain.is_file()


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[tuple[EmbeddedCoordinator, EmbeddedCoordinator]]:
    # not there yet: the first replica makes it
    shared: dict[str, Any] = dict(replica=True, metrics_dir=str(tmp_path / "node" / "metrics"))
    with EmbeddedCoordinator(tmp_path / "f.db", **shared) as a, EmbeddedCoordinator(
        tmp_path / "f.db", admin_token=a.admin_token, **shared
    ) as b:
        yield a, b


def test_replicas_sharing_a_directory_each_report_both_shares(
    replicas: tuple[EmbeddedCoordinator, EmbeddedCoordinator],
    tiny_bundle: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = replicas
    admin = a.admin()
    plan = {"goal": 2, "rounds": 1, "selection_window_s": 600.0, "round_deadline_s": 600.0}
    admin.create_task(admin.upload_bundle(tiny_bundle)["bundle_id"], plan)
    outcomes: Tally[str] = Tally()
    for coord, n, charging in ((a, 3, True), (b, 2, False), (b, 4, True)):
        dev = DeviceHTTP(coord)
        for _ in range(n):
            answer = dev.check_in({**GOOD_CONDITIONS, "charging": charging})
            outcomes[answer["action"] if answer["action"] != "wait" else answer["reason"]] += 1
    for coord in (a, b):
        # the other's share as it last published it: at most its interval (2 s) old
        wait_for(lambda: checkins(scrape(coord)) == outcomes.total(), what="both shares")  # noqa: B023
        got = scrape(coord)
        for outcome, n in outcomes.items():
            assert sample(got, "fedge_checkins_total", outcome=outcome) == n
        assert sample(got, "fedge_checkin_ineligible_total", reason="not charging") == 2
        assert sample(got, "fedge_http_requests_total", method="POST", route=Route.REGISTER,
                      status="201") == 3  # fmt: skip
        # read at scrape time from the store both share: not summed
        assert sample(got, "fedge_devices_registered") == 3
    readings = Tally[str]()  # a view reads (and so publishes) every process's file once
    read = SharedCounters.families

    def counted(self: SharedCounters) -> Any:
        readings[threading.current_thread().name] += 1
        return read(self)

    monkeypatch.setattr(SharedCounters, "families", counted)
    status, population = admin_get(b, Route.ADMIN_DASHBOARD_POPULATION, a.admin_token)
    assert status == 200
    assert population["checkins"]["total"] == sum(outcomes.values())
    assert population["checkins"]["ineligible_reasons"] == {"not charging": 2}
    status, service = admin_get(a, Route.ADMIN_DASHBOARD_SERVICE, a.admin_token)
    assert status == 200
    [register] = [r for r in service["requests"] if r["route"] == Route.REGISTER]
    assert register["requests"] == 3
    assert readings.total() == 2, readings


def test_the_dashboards_queue_depth_is_the_nodes(
    replicas: tuple[EmbeddedCoordinator, EmbeddedCoordinator],
) -> None:
    a, b = replicas

    def depth_on_a() -> float:
        status, service = admin_get(a, Route.ADMIN_DASHBOARD_SERVICE, a.admin_token)
        assert status == 200, service
        return float(service["queue_depth"])

    # b's start-up work may be in the share it published first
    wait_for(lambda: depth_on_a() == 0, what="an idle node")
    release = threading.Event()
    busy = threading.Thread(target=b.call, args=(release.wait,))
    waiting = threading.Thread(target=DeviceHTTP, args=(b,))  # a registration, queued on b
    try:
        busy.start()
        waiting.start()
        # the registration, and the deadline ticks due meanwhile, once b has published
        # them (within its interval): ten reads in a row, so that a's own work of a moment
        # (a deadline tick) does not pass for b's share before b wrote it
        wait_for(lambda: min(depth_on_a() for _ in range(10)) >= 1,
                 what="b's waiting registration on a's dashboard")  # fmt: skip
    finally:
        release.set()
        busy.join()
        waiting.join()
    wait_for(lambda: depth_on_a() == 0, what="b's queue empty again")


def test_a_dashboard_view_does_not_count_itself_in_the_share_it_publishes(
    replicas: tuple[EmbeddedCoordinator, EmbeddedCoordinator],
) -> None:
    # A view reads the counters on the worker thread, and so publishes its process's share
    # there, while it is itself the operation running: the others would report an idle
    # node's queue one deep until the next publish (every dashboard poll of the process).
    a, b = replicas

    def depth_on_b() -> float:
        return sample(scrape(b), "fedge_queue_depth")

    wait_for(lambda: depth_on_b() == 0, what="an idle node")
    for _ in range(5):
        status, _service = admin_get(a, Route.ADMIN_DASHBOARD_SERVICE, a.admin_token)
        assert status == 200
        assert depth_on_b() == 0


def test_a_refusal_by_one_replica_shows_on_the_others_round_page(
    replicas: tuple[EmbeddedCoordinator, EmbeddedCoordinator], tiny_bundle: Path
) -> None:
    a, b = replicas
    admin = a.admin()
    plan = {"goal": 2, "rounds": 1, "over_selection": 1.0, "selection_window_s": 1.0,
            "round_deadline_s": 600.0, "eligibility": {"require_charging": False}}  # fmt: skip
    task_id = admin.create_task(admin.upload_bundle(tiny_bundle)["bundle_id"], plan)["task_id"]
    chosen = select_devices([DeviceHTTP(b), DeviceHTTP(b)], lambda: time.sleep(1.5))
    assert len(chosen) == 2
    device, assignment_id = chosen[0]
    status, body = device.upload_raw(assignment_id, b"not a frame")
    assert status == 400 and body["error"]["code"] == "malformed_frame", body
    page = Route.ADMIN_DASHBOARD_ROUND.format(task_id=task_id, number=1)

    def refused_on_a() -> Any:
        status, detail = admin_get(a, page, a.admin_token)
        assert status == 200, detail
        return {r["device_id"]: r["upload_refused"] for r in detail["assignments"]}

    wait_for(lambda: refused_on_a()[device.device_id] == "malformed_frame",
             what="b's refusal on a's round page")  # fmt: skip
    assert refused_on_a()[chosen[1][0].device_id] is None


def test_a_process_started_after_retention_reports_the_nodes_updates_and_round_durations(
    replicas: tuple[EmbeddedCoordinator, EmbeddedCoordinator], tiny_bundle: Path
) -> None:
    # b stands for a child the supervisor started again, or a new replica: its first scrape
    # comes after retention deleted rounds a had counted. On one port (--processes) the two
    # answer scrapes of one series in turn: a counter or a histogram read from the store
    # must not depend on what its process happened to see.
    a, b = replicas
    admin = a.admin()
    plan = {"goal": 1, "over_selection": 1.0, "selection_window_s": 0.0, "rounds": 5}
    task_id = admin.create_task(admin.upload_bundle(tiny_bundle)["bundle_id"], plan)["task_id"]
    dev = DeviceHTTP(a)
    for _ in range(2):
        answer = dev.check_in()
        if answer["action"] == "wait":
            answer = dev.check_in()
        assert dev.upload(answer["assignment"]["assignment_id"], np.full(64, 0.01))[0] == 200
    before = scrape(a)
    assert sample(before, "fedge_updates_accepted_total") == 2
    store = a.service.store
    first = a.call(store.list_rounds, task_id)[0]
    a.call(store.delete_rounds, [first.round_id])  # what retention does
    durations = round_durations(before)
    assert sample(before, f"{ROUND_SECONDS}_count", mode="sync", outcome="committed") == 2
    for coord in (b, a):
        got = scrape(coord)
        for name in ("fedge_updates_accepted_total", "fedge_update_bytes_total"):
            assert sample(got, name) == sample(before, name), (coord.url, name)
        assert round_durations(got) == durations, coord.url


@pytest.mark.slow
def test_fedge_serve_processes_reports_the_node_whichever_child_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))  # where the supervisor makes its directory
    with EmbeddedCoordinator(tmp_path / "f.db", subprocess=True, processes=2) as node:
        assert node.process is not None
        supervisor = node.process.pid
        wait_for(lambda: len(serving_children(supervisor)) == 2, what="two serving processes")
        [directory] = temp.glob("fedge-metrics-*")
        sent = 0
        for _ in range(12):  # each device on its own connection: both children serve some
            dev = DeviceHTTP(node)
            for _ in range(3):
                dev.check_in()
                sent += 1
            dev.close()
        assert len(list(directory.glob("*.json"))) == 2

        def total() -> float:
            return checkins(scrape(node))  # a new connection each time: either child answers

        wait_for(lambda: total() == sent, what="the node's check-ins in one scrape")
        assert {total() for _ in range(10)} == {sent}
        # the node's CPU: a counter that never goes down, whichever child answers
        cpu = [sample(scrape(node), "process_cpu_seconds_total") for _ in range(10)]
        assert cpu == sorted(cpu)
        victim = min(serving_children(supervisor))
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: (len(now := serving_children(supervisor)) == 2 and victim not in now),
                 what="a new serving process")  # fmt: skip
        # what the dead child counted stays in the sum; its replacement publishes beside it
        assert {total() for _ in range(10)} == {sent}
        wait_for(lambda: len(list(directory.glob("*.json"))) == 3, what="the new child's file")
        assert sample(scrape(node), "process_cpu_seconds_total") >= cpu[-1]

        def memory_is_the_live_childrens() -> bool:
            live = 1024 * sum(tree_kib(pid, "VmRSS") for pid in serving_children(supervisor))
            return 0.8 * live <= sample(scrape(node), "process_resident_memory_bytes") <= 1.2 * live

        # the dead child's memory leaves the sum once its file is stale
        wait_for(memory_is_the_live_childrens, what="the live children's memory")
    assert not directory.exists()

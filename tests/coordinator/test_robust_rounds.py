"""Robust aggregation in real rounds: devices over HTTP, SQLite, blobs read back at commit.

Each test computes the next version independently in numpy from exactly what the devices
sent (deltas, declared examples) and the plan, and compares it with what the coordinator
serves; the clipping bound is followed across commits and across a restart.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.blobs import OWNER_FILE
from coordinator.clock import FakeClock
from coordinator.embedded import EmbeddedCoordinator
from coordinator.plan import TaskPlan
from coordinator.robust.commit import aggregate_updates
from edge_sdk.errors import ApiError
from edge_sdk.frame import decode_tensor
from tests.fixtures.coordinator import DeviceHTTP

N = 64
GOAL = 6


def _deltas(seed: int, count: int = GOAL) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Honest updates of different sizes, all pointing roughly the same way.
    common = rng.normal(0, 0.02, N)
    return [(common + rng.normal(0, 0.01, N)) * s for s in rng.uniform(0.5, 2.0, count)]


class Task:
    def __init__(self, coord: EmbeddedCoordinator, bundle: Path, mode: str, **plan: Any) -> None:
        self.coord = coord
        admin = coord.admin()
        bundle_id = admin.upload_bundle(bundle)["bundle_id"]
        full = {"rounds": 5, "goal": GOAL, "over_selection": 1.0, "selection_window_s": 0.0,
                "round_deadline_s": 600.0, "buffer_k": GOAL, "max_concurrency": 2 * GOAL,
                **plan}  # fmt: skip
        self.task_id = admin.create_task(bundle_id, full, mode=mode)["task_id"]

    def assigned(self, count: int) -> list[tuple[DeviceHTTP, str]]:
        """Fresh devices and their assignments (a sync window closed first)."""
        devices = [DeviceHTTP(self.coord) for _ in range(count)]
        answers = [d.check_in() for d in devices]
        if any(a["action"] == "wait" for a in answers):  # sync: the window closes first
            self.coord.clock.advance(1.0)  # type: ignore[union-attr]
            answers = [d.check_in() for d in devices]
        return [(d, a["assignment"]["assignment_id"])
                for d, a in zip(devices, answers, strict=True)]  # fmt: skip

    def round_trip(
        self, deltas: list[np.ndarray], examples: list[int], losses: list[float] | None = None
    ) -> None:
        """Fresh devices get assignments, upload, and the coordinator commits."""
        assigned = self.assigned(len(deltas))
        for (d, aid), delta, n, loss in zip(
            assigned, deltas, examples, losses or [0.5] * len(deltas), strict=True
        ):
            status, body = d.upload(aid, delta, num_examples=n, loss=loss)
            assert status == 200, body
        self.coord.call(self.coord.service.tick)
        for d, _ in assigned:
            d.close()

    def round(self, number: int) -> dict[str, Any]:
        (r,) = [r for r in self.coord.admin().rounds(self.task_id) if r["round"] == number]
        return dict(r)

    def params(self, version: int) -> np.ndarray:
        d = DeviceHTTP(self.coord)
        try:
            return decode_tensor(d.params(self.task_id, version)).astype(np.float64)
        finally:
            d.close()

    def robust_metrics(self, version: int) -> dict[str, Any]:
        rounds = self.coord.admin().rounds(self.task_id)
        (r,) = [r for r in rounds if r["metrics"].get("model_version") == version]
        assert r["state"] == "committed"
        return dict(r["metrics"]["robust"])


@pytest.fixture
def start(tmp_path: Path, fake_clock: FakeClock, tiny_bundle: Path):
    coords: list[EmbeddedCoordinator] = []

    def make(mode: str = "sync", **plan: Any) -> Task:
        coord = EmbeddedCoordinator(tmp_path / "fedge.db", clock=fake_clock, seed=7).start()
        coords.append(coord)
        return Task(coord, tiny_bundle, mode, **plan)

    yield make
    for c in coords:
        c.stop()


def _clip(deltas: list[np.ndarray], bound: float) -> np.ndarray:
    return np.stack([d * min(1.0, bound / np.linalg.norm(d)) for d in deltas])


def _agreeing(rows: np.ndarray) -> np.ndarray:
    """The rows whose cosine with the coordinate-wise median is positive, in plain numpy."""
    med = np.median(rows, axis=0)
    cos = [float(r @ med) / (np.linalg.norm(r) * np.linalg.norm(med)) for r in rows]
    return np.array([i for i, c in enumerate(cos) if c > 0])


def _f32(x: list[np.ndarray]) -> list[np.ndarray]:
    """What a device sends: float32 deltas (the coordinator sees these exactly)."""
    return [np.asarray(d, np.float32).astype(np.float64) for d in x]


def test_defaults_cap_the_inflated_weight_and_clip_to_an_adaptive_bound(start) -> None:
    t = start()
    base = t.params(0)
    deltas = _f32(_deltas(1))
    deltas[0] = deltas[0] * -200  # hostile: flipped, huge (still under max_update_norm)
    examples = [1_000_000, 40, 55, 60, 70, 90]
    t.round_trip(deltas, examples)
    # the reference: weight min(n, median n), clip at the median norm (first commit), drop
    # what points away from the median
    cap = np.median(examples)
    norms = np.linalg.norm(np.stack(deltas), axis=1)
    bound = float(np.median(norms))
    weights = np.minimum(examples, cap)
    rows = _clip(deltas, bound)
    keep = _agreeing(rows)
    assert list(keep) == [1, 2, 3, 4, 5]
    expected = base + np.average(rows[keep], axis=0, weights=weights[keep])
    np.testing.assert_allclose(t.params(1), expected, rtol=1e-5, atol=1e-7)
    m = t.robust_metrics(1)
    assert m["disagreeing"] == 1 and m["cosine_min"] < 0 < m["cosine_median"]
    unclipped = np.mean(norms <= bound)
    assert m["aggregator"] == "fedavg" and m["example_cap"] == cap
    assert m["capped"] == sum(n > cap for n in examples) == 3
    assert m["clip_bound"] == pytest.approx(bound, rel=1e-12)
    assert m["clip_bound_next"] == pytest.approx(bound * math.exp(-0.2 * (unclipped - 0.5)))
    assert m["clipped"] == int(np.sum(norms > bound)) == 3
    # Undefended FedAvg would have followed the hostile update: the defended step did not.
    assert np.dot(t.params(1) - base, deltas[1]) > 0


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("robust", [{}, "none"])
def test_the_published_loss_weighs_updates_as_the_commit_did(start, mode, robust) -> None:
    """One device declaring a million examples and a zero loss: a defended task publishes
    the loss weighted by the capped counts its commit used (so the liar moves it as little
    as the model), an undefended one by the counts as declared."""
    t = start(mode, robust=robust)
    examples = [1_000_000, 40, 55, 60, 70, 90]
    losses = [0.0, 2.0, 1.5, 1.8, 2.2, 1.6]
    t.round_trip(_f32(_deltas(3)), examples, losses)
    weights = examples if robust == "none" else np.minimum(examples, np.median(examples))
    m = t.round(1)["metrics"]
    assert m["model_version"] == 1 and m["num_examples"] == sum(examples)
    assert m["loss"] == pytest.approx(float(np.average(losses, weights=weights)), rel=1e-9)
    assert (m["loss"] > 1.0) == (robust != "none")


def test_evaluation_figures_weigh_reports_by_the_capped_counts(start) -> None:
    t = start(eval_goal=GOAL)
    t.round_trip(_f32(_deltas(4)), [50] * GOAL)
    t.coord.admin().evaluate(t.task_id)
    examples = [1_000_000, 40, 55, 60, 70, 90]
    losses, accuracy = [0.01, 2.0, 1.5, 1.8, 2.2, 1.6], [1.0, 0.3, 0.4, 0.35, 0.2, 0.5]
    for (d, aid), n, loss, acc in zip(t.assigned(GOAL), examples, losses, accuracy, strict=True):
        status, body = d.metrics(aid, n, loss, acc)
        assert status == 200, body
        d.close()
    t.coord.call(t.coord.service.tick)
    m = t.round(2)["metrics"]
    assert m["kind"] == "evaluate" and m["reported"] == GOAL
    weights = np.minimum(examples, np.median(examples))
    assert m["loss"] == pytest.approx(float(np.average(losses, weights=weights)), rel=1e-9)
    assert m["accuracy"] == pytest.approx(float(np.average(accuracy, weights=weights)), rel=1e-9)


def test_the_bound_is_task_state_that_survives_a_restart(start, tmp_path) -> None:
    t = start(robust={"clip": {"quantile": 0.5, "lr": 0.5}})
    bound = None
    for version in (1, 2, 3):
        deltas = _f32(_deltas(10 + version))
        before = t.params(version - 1)
        if version == 3:  # a new process: nothing of the bound in memory
            t.coord.stop()
            t.coord.start()
        t.round_trip(deltas, [50] * GOAL)
        norms = np.linalg.norm(np.stack(deltas), axis=1)
        if bound is None:
            bound = float(np.median(norms))
        np.testing.assert_allclose(
            t.params(version), before + _clip(deltas, bound).mean(axis=0), rtol=1e-5, atol=1e-7
        )
        m = t.robust_metrics(version)
        assert m["clip_bound"] == pytest.approx(bound, rel=1e-12)
        bound = bound * math.exp(-0.5 * (np.mean(norms <= bound) - 0.5))
        assert m["clip_bound_next"] == pytest.approx(bound, rel=1e-12)


def _trimmed(rows: np.ndarray, trim: float) -> np.ndarray:
    k = int(trim * len(rows))
    return np.sort(rows, axis=0)[k : len(rows) - k].mean(axis=0)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(
    ("robust", "reference"),
    [
        (
            {"aggregator": "median", "clip": None, "agreement": None},
            lambda r, w: np.median(r, axis=0),
        ),
        (
            {"aggregator": "trimmed_mean", "trim": 0.2, "agreement": None},
            lambda r, w: _trimmed(r, 0.2),
        ),
        ({"aggregator": "multi_krum", "byzantine": 0.34, "clip": None, "agreement": None}, None),
    ],
)
def test_robust_aggregators_in_both_modes_match_numpy(start, mode, robust, reference) -> None:
    t = start(mode, robust=robust)
    base = t.params(0)
    deltas = _f32(_deltas(5))
    deltas[1] = deltas[1] * -30
    deltas[4] = np.full(N, 0.5)
    examples = [10, 20, 30, 40, 50, 60]
    t.round_trip(deltas, examples)
    rows = np.stack(deltas)
    if robust.get("clip", {}) is not None:
        rows = _clip(deltas, float(np.median(np.linalg.norm(rows, axis=1))))
    weights = np.minimum(examples, np.median(examples)).astype(float)
    m = t.robust_metrics(1)
    if reference is None:  # multi-Krum: f = 2 of 6 left out, the two hostile ones
        assert m["selected"] == [0, 2, 3, 5]
        expected = np.average(rows[[0, 2, 3, 5]], axis=0, weights=weights[[0, 2, 3, 5]])
    else:
        expected = reference(rows, weights)
    assert m["aggregator"] == robust["aggregator"] and m["updates"] == GOAL
    np.testing.assert_allclose(t.params(1), base + expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("aggregator", ["fedavg", "median", "trimmed_mean", "multi_krum"])
def test_updates_opposing_the_median_are_dropped_before_any_aggregator(
    start, mode: str, aggregator: str
) -> None:
    t = start(mode, robust={"aggregator": aggregator, "trim": 0.2, "byzantine": 0.25})
    base = t.params(0)
    deltas = _f32(_deltas(6))
    deltas[2] = -deltas[2]  # a sign flip
    deltas[5] = -deltas[5] * 1e3  # an inflated one, flipped: clipped, then dropped
    examples = [10, 20, 1_000_000, 40, 50, 10**6]
    t.round_trip(deltas, examples)
    rows = _clip(deltas, float(np.median(np.linalg.norm(np.stack(deltas), axis=1))))
    weights = np.minimum(examples, np.median(examples)).astype(float)
    keep = _agreeing(rows)
    assert list(keep) == [0, 1, 3, 4]
    kept, w = rows[keep], weights[keep]
    m = t.robust_metrics(1)
    if aggregator == "fedavg":
        expected = np.average(kept, axis=0, weights=w)
    elif aggregator == "median":
        expected = np.median(kept, axis=0)
    elif aggregator == "trimmed_mean":
        expected = _trimmed(kept, 0.2)
    else:  # f = int(0.25 x 4) = 1 of the 4 kept left out: the farthest from the others
        dist = [[float(np.sum((a - b) ** 2)) for b in kept] for a in kept]
        scores = [sum(sorted(d[:i] + d[i + 1 :])[: len(kept) - 1 - 2]) for i, d in enumerate(dist)]
        chosen = sorted(np.argsort(scores, kind="stable")[:3])
        assert m["selected"] == [int(keep[i]) for i in chosen]
        expected = np.average(kept[chosen], axis=0, weights=w[chosen])
    assert m["disagreeing"] == 2
    np.testing.assert_allclose(t.params(1), base + expected, rtol=1e-5, atol=1e-7)


def test_async_fedavg_weighs_capped_examples_by_staleness(start) -> None:
    t = start("async", buffer_k=3, max_concurrency=6, robust={"clip": None, "agreement": None})
    devices = [DeviceHTTP(t.coord) for _ in range(6)]
    assignments = [d.check_in()["assignment"]["assignment_id"] for d in devices]
    deltas = _f32(_deltas(9))
    examples = [10, 1000, 30, 40, 50, 60]
    for i in range(3):  # version 1 from three fresh updates
        assert devices[i].upload(assignments[i], deltas[i], num_examples=examples[i])[0] == 200
    t.coord.call(t.coord.service.tick)
    v1 = t.params(1)
    cap = np.median(examples[:3])
    np.testing.assert_allclose(
        v1,
        t.params(0) + np.average(deltas[:3], axis=0, weights=np.minimum(examples[:3], cap)),
        rtol=1e-5,
        atol=1e-7,
    )
    for i in range(3, 6):  # version 2 from three updates one version stale: weight 1/sqrt(2)
        assert devices[i].upload(assignments[i], deltas[i], num_examples=examples[i])[0] == 200
    t.coord.call(t.coord.service.tick)
    w = np.minimum(examples[3:], np.median(examples[3:])) / math.sqrt(2)
    np.testing.assert_allclose(
        t.params(2), v1 + np.average(deltas[3:], axis=0, weights=w), rtol=1e-5, atol=1e-7
    )
    assert t.robust_metrics(2)["updates"] == 3


@pytest.mark.parametrize(
    "robust",
    [{"aggregator": "mean"}, {"clip": {"quantile": 1.5}}, {"example_cap": 0}, "off"],
)
def test_bad_robust_plans_are_refused_over_http_and_store_nothing(
    clocked_coordinator: EmbeddedCoordinator, tiny_bundle: Path, robust: Any
) -> None:
    admin = clocked_coordinator.admin()
    bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
    before = clocked_coordinator.call(clocked_coordinator.service.store.snapshot)
    with pytest.raises(ApiError) as e:
        admin.create_task(bundle_id, {"robust": robust})
    assert (e.value.status, e.value.code) == (400, "invalid_request")
    assert "plan.robust" in str(e.value)
    assert clocked_coordinator.call(clocked_coordinator.service.store.snapshot) == before
    # async: a robust aggregator over buffers of 2 updates is refused with its reason
    with pytest.raises(ApiError, match="buffer_k in async mode"):
        admin.create_task(
            bundle_id, {"buffer_k": 2, "robust": {"aggregator": "median"}}, mode="async"
        )


@pytest.mark.parametrize("aggregator", ["median", "trimmed_mean", "multi_krum", "fedavg"])
def test_the_commit_reads_updates_back_in_chunks_of_any_size(
    tmp_path: Path, fake_clock: FakeClock, tiny_bundle: Path, aggregator: str
) -> None:
    """Aggregating the committed round again from the store, in coordinate chunks of 1, 5
    and 64, gives the delta the commit applied; no scratch file is left beside the blobs."""
    with EmbeddedCoordinator(tmp_path / "fedge.db", clock=fake_clock, retain_updates=True) as c:
        t = Task(c, tiny_bundle, "sync", robust={"aggregator": aggregator, "clip": None})
        deltas = _f32(_deltas(21))
        deltas[2] = deltas[2] * 50
        t.round_trip(deltas, [30, 40, 50, 60, 70, 80])
        applied = t.params(1) - t.params(0)
        svc = c.service

        def again(chunk: int) -> np.ndarray:
            task = svc.store.get_task(t.task_id)
            (rnd,) = [r for r in svc.store.list_rounds(t.task_id) if r.state == "committed"]
            plan = TaskPlan.from_json(task.plan)
            return aggregate_updates(
                svc.store, svc.blobs, task, plan, rnd.round_id, N, streamed=_unused, chunk=chunk
            ).delta

        for chunk in (1, 5, 64):
            np.testing.assert_allclose(c.call(again, chunk), applied, rtol=1e-5, atol=1e-7)
        leftovers = [p.name for p in Path(svc.blobs.root).iterdir() if p.name != OWNER_FILE
                     and not (p.is_dir() and (len(p.name) == 2 or p.name == "tmp"))]  # fmt: skip
        assert leftovers == []


def _unused() -> np.ndarray:
    raise AssertionError("a defended commit reads the updates back, not the streamed sum")

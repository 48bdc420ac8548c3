"""The FedBuff buffer against a numpy reference: weighting, commits every K, bound, replay."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.async_buffer import AsyncBuffer, AsyncConfig, BufferedUpdate, TooStale
from coordinator.errors import InvalidRequest
from coordinator.staleness import StalenessPolicy

P = 257  # odd size: nothing lines up with a block by accident


def updates(n: int, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    return [(rng.normal(0, 0.1, P).astype(np.float32), int(rng.integers(1, 500))) for _ in range(n)]


def config(k: int, **plan: object) -> AsyncConfig:
    return AsyncConfig.from_plan({"buffer_k": k, "max_concurrency": 4 * k, **plan})


def reference(deltas: list[np.ndarray], n: list[int], s: list[int], w) -> np.ndarray:
    """sum n_i w(s_i) d_i / sum n_i w(s_i), in float64, written independently of the buffer."""
    d = np.stack([x.astype(np.float64) for x in deltas])
    coef = np.asarray(n, dtype=np.float64) * w(np.asarray(s, dtype=np.float64))
    return (coef[:, None] * d).sum(axis=0) / coef.sum()


def test_fresh_buffer_is_fedavg() -> None:
    ups = updates(5)
    buf = AsyncBuffer(P, config(5))
    folds = [buf.fold(d, n, 0) for d, n in ups]
    assert [f.commit is None for f in folds] == [True] * 4 + [False]
    commit = folds[-1].commit
    assert commit is not None
    fedavg = np.average(np.stack([d for d, _ in ups]), axis=0, weights=[n for _, n in ups])
    np.testing.assert_allclose(commit.delta, fedavg, rtol=1e-5, atol=1e-7)
    assert commit.delta.dtype == np.float64
    assert (commit.version, commit.num_updates, commit.mean_staleness) == (1, 5, 0.0)
    assert commit.num_examples == sum(n for _, n in ups)


@pytest.mark.parametrize(
    ("spec", "w"),
    [
        ("sqrt", lambda s: 1.0 / np.sqrt(1.0 + s)),
        ({"name": "polynomial", "a": 1.5}, lambda s: (1.0 + s) ** -1.5),
        ("constant", lambda s: np.ones_like(s)),
        ({"name": "hinge", "a": 2, "b": 1}, lambda s: np.where(s <= 1, 1, 1 / (2 * (s - 1) + 1))),
    ],
)
def test_stale_updates_weighted_like_numpy(spec: object, w) -> None:
    k = 6
    buf = AsyncBuffer(P, config(k, staleness=spec), version=9)
    ups = updates(k, seed=1)
    bases = [9, 8, 5, 9, 3, 7]
    folds = [buf.fold(d, n, b) for (d, n), b in zip(ups, bases, strict=True)]
    s = [9 - b for b in bases]
    assert [f.staleness for f in folds] == s
    np.testing.assert_allclose(
        [f.weight for f in folds], np.array([n for _, n in ups]) * w(np.array(s, float)), rtol=1e-12
    )
    commit = folds[-1].commit
    assert commit is not None and commit.version == 10 and buf.version == 10
    ref = reference([d for d, _ in ups], [n for _, n in ups], s, w)
    np.testing.assert_allclose(commit.delta, ref, rtol=1e-5, atol=1e-7)
    assert commit.mean_staleness == pytest.approx(np.mean(s)) and commit.max_staleness == 6


def test_commits_every_k_updates() -> None:
    k = 4
    buf = AsyncBuffer(P, config(k))
    ups = updates(3 * k + 2, seed=2)
    commits = []
    for i, (d, n) in enumerate(ups):
        # Devices train on whatever version was current when they checked in: lag by one.
        fold = buf.fold(d, n, max(buf.version - (i % 2), 0))
        assert fold.buffered == (i + 1) % k
        if fold.commit is not None:
            commits.append((i, fold.commit.version))
    assert commits == [(k - 1, 1), (2 * k - 1, 2), (3 * k - 1, 3)]
    assert buf.version == 3 and len(buf) == 2


def test_each_commit_aggregates_only_its_own_updates() -> None:
    k = 3
    buf = AsyncBuffer(P, config(k, staleness="constant"))
    ups = updates(2 * k, seed=3)
    commits = [c for d, n in ups if (c := buf.fold(d, n, buf.version).commit) is not None]
    for j, commit in enumerate(commits):
        part = ups[j * k : (j + 1) * k]
        ref = np.average(np.stack([d for d, _ in part]), axis=0, weights=[n for _, n in part])
        np.testing.assert_allclose(commit.delta, ref, rtol=1e-5, atol=1e-7)


def test_over_stale_update_refused_and_changes_nothing() -> None:
    buf = AsyncBuffer(P, config(5, max_staleness=2), version=10)
    d, n = updates(1)[0]
    buf.fold(d, n, 8)  # staleness 2: at the bound, accepted
    before = buf.state()
    with pytest.raises(TooStale) as e:
        buf.fold(d, n, 7)
    assert e.value.staleness == 3
    after = buf.state()
    np.testing.assert_array_equal(before.pop("sum"), after.pop("sum"))
    assert before == after and len(buf) == 1


@pytest.mark.parametrize(
    ("delta", "n", "base", "match"),
    [
        (np.full(P, np.nan, np.float32), 10, 0, "NaN"),
        (np.r_[np.zeros(P - 1), np.inf].astype(np.float32), 10, 0, "NaN or Inf"),
        (np.zeros(P + 1, np.float32), 10, 0, "shape"),
        (np.zeros((P, 1), np.float32), 10, 0, "shape"),
        (np.zeros(P, np.float32), 0, 0, "num_examples"),
        (np.zeros(P, np.float32), -3, 0, "num_examples"),
        (np.zeros(P, np.float32), True, 0, "num_examples"),
        (np.zeros(P, np.float32), 2.5, 0, "num_examples"),
        (np.zeros(P, np.float32), 10, 1, "version"),
    ],
)
def test_bad_updates_rejected_without_change(delta, n, base, match) -> None:
    buf = AsyncBuffer(P, config(3))
    good, m = updates(1)[0]
    buf.fold(good, m, 0)
    before = buf.state()
    with pytest.raises(ValueError, match=match):
        buf.fold(delta, n, base)
    after = buf.state()
    np.testing.assert_array_equal(before.pop("sum"), after.pop("sum"))
    assert before == after


def test_replay_rebuilds_the_lost_buffer_exactly() -> None:
    cfg = config(8)
    live = AsyncBuffer(P, cfg, version=4)
    ups = updates(5, seed=4)
    stored = [BufferedUpdate(d, n, 4 - i % 3) for i, (d, n) in enumerate(ups)]
    for u in stored:
        live.fold(u.delta, u.num_examples, u.base_version)
    rebuilt, pending = AsyncBuffer.replay(P, cfg, 4, stored)
    assert pending is None
    a, b = live.state(), rebuilt.state()
    np.testing.assert_array_equal(a.pop("sum"), b.pop("sum"))  # bit for bit
    assert a == b
    # Both complete the same commit.
    rest = updates(3, seed=5)
    ca = [live.fold(d, n, 4).commit for d, n in rest][-1]
    cb = [rebuilt.fold(d, n, 4).commit for d, n in rest][-1]
    assert ca is not None and cb is not None
    np.testing.assert_array_equal(ca.delta, cb.delta)


def test_replay_returns_the_commit_a_crash_interrupted() -> None:
    ups = updates(3, seed=7)
    live = AsyncBuffer(P, config(3))
    expected = [live.fold(d, n, 0).commit for d, n in ups][-1]
    stored = [BufferedUpdate(d, n, 0) for d, n in ups]
    buf, pending = AsyncBuffer.replay(P, config(3), 0, stored)
    assert pending is not None and expected is not None
    np.testing.assert_array_equal(pending.delta, expected.delta)
    assert pending.version == 1 and buf.version == 1 and len(buf) == 0


def test_replay_commits_an_overfull_buffer_whole() -> None:
    """A buffer an older coordinator kept filling after a failed commit: every stored update
    goes into the version (never a subset, never a refusal to start)."""
    ups = updates(5)
    stored = [BufferedUpdate(d, n, 0) for d, n in ups]
    buf, pending = AsyncBuffer.replay(P, config(3), 0, stored)
    assert pending is not None and pending.num_updates == 5 and len(buf) == 0
    ref = np.average(np.stack([d for d, _ in ups]), axis=0, weights=[n for _, n in ups])
    np.testing.assert_allclose(pending.delta, ref, rtol=1e-5, atol=1e-7)


def test_stage_changes_nothing_until_applied() -> None:
    buf = AsyncBuffer(P, config(2))
    (d0, n0), (d1, n1) = updates(2, seed=8)
    buf.fold(d0, n0, 0)
    before = buf.state()
    staged = buf.stage(d1, n1, 0)
    after = buf.state()
    np.testing.assert_array_equal(before.pop("sum"), after.pop("sum"))
    assert before == after and len(buf) == 1
    fold = buf.apply(staged)
    assert fold.commit is not None and buf.version == 1
    ref = np.average(np.stack([d0, d1]), axis=0, weights=[n0, n1])
    np.testing.assert_allclose(fold.commit.delta, ref, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="staged on another state"):
        buf.apply(staged)  # once only


def test_update_that_would_overflow_the_sum_is_refused_before_anything_moves() -> None:
    # float32 deltas and example counts <= 2**53 cannot reach this in float64: defence in depth
    buf = AsyncBuffer(P, config(3))
    huge = np.full(P, 1e300)
    buf.fold(huge, 1, 0)
    before = buf.state()
    with pytest.raises(ValueError, match="overflows"):
        buf.stage(huge, 10**9, 0)
    after = buf.state()
    np.testing.assert_array_equal(before.pop("sum"), after.pop("sum"))
    assert before == after


def test_weight_underflow_is_refused_as_too_stale_and_by_plan_validation() -> None:
    # w(s) = (1+s)^-400 is 0.0 in float64 from s = 6 on: such a bound is refused at plan time
    with pytest.raises(InvalidRequest, match="underflows"):
        config(3, staleness={"name": "polynomial", "a": 400}, max_staleness=6)
    steep = config(3, staleness={"name": "polynomial", "a": 400}, max_staleness=5)
    assert steep.staleness.weight(5) > 0
    buf = AsyncBuffer(P, steep, version=5)
    d, _ = updates(1)[0]
    assert buf.stage(d, 1, 0).weight > 0  # the smallest weight the bound admits still counts


def test_state_round_trip() -> None:
    cfg = config(4)
    buf = AsyncBuffer(P, cfg)
    ups = updates(8, seed=6)
    for d, n in ups[:5]:
        buf.fold(d, n, 0)
    copy = AsyncBuffer.from_state(cfg, buf.state())
    ca = [buf.fold(d, n, 1).commit for d, n in ups[5:]]
    cb = [copy.fold(d, n, 1).commit for d, n in ups[5:]]
    assert ca[:2] == [None, None] and cb[:2] == [None, None]
    assert ca[2] is not None and cb[2] is not None
    np.testing.assert_array_equal(ca[2].delta, cb[2].delta)


def test_config_defaults_and_admission() -> None:
    cfg = AsyncConfig.from_plan({})
    assert cfg.buffer_k == 10 and cfg.max_concurrency == 50
    assert cfg.staleness == StalenessPolicy()
    assert AsyncConfig.from_plan({"buffer_k": 3}).max_concurrency == 15
    cfg = AsyncConfig.from_plan({"buffer_k": 2, "max_concurrency": 3})
    assert [cfg.admits(i) for i in range(5)] == [True, True, True, False, False]
    assert AsyncConfig.from_plan(cfg.to_plan()) == cfg


@pytest.mark.parametrize(
    "plan",
    [
        {"buffer_k": 0},
        {"buffer_k": 2.0},
        {"buffer_k": True},
        {"max_concurrency": 0},
        {"buffer_k": 10, "max_concurrency": 9},
        {"staleness": "nope"},
        {"max_staleness": -2},
    ],
)
def test_bad_async_plans(plan: dict) -> None:
    with pytest.raises(InvalidRequest):
        AsyncConfig.from_plan(plan)

"""What happens after a batch of uploads is committed: the payloads of the uploads it refused
are deleted at once (never bytes a record still needs), and nothing that fails afterwards
(the commit the batch made due, pacing the answer) turns the answer of a durable upload into
an error.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.embedded import EmbeddedCoordinator
from coordinator.errors import ApiError
from coordinator.service import Coordinator, DeviceIdentity, StagedUpload
from edge_sdk.codecs import encode_update
from edge_sdk.frame import decode_tensor
from tests.fixtures.coordinator import DeviceHTTP, make_synthetic_bundle

N = 500


def _task(
    coord: EmbeddedCoordinator, bundle: Path, goal: int, target: int
) -> tuple[str, list[DeviceHTTP], list[str]]:
    plan = {"rounds": 2, "goal": goal, "over_selection": target / goal,
            "selection_window_s": 0.0, "round_deadline_s": 600.0, "robust": "none",
            "max_update_norm": None}  # fmt: skip
    admin = coord.admin()
    task_id = admin.create_task(admin.upload_bundle(bundle)["bundle_id"], plan)["task_id"]
    devices = [DeviceHTTP(coord) for _ in range(target)]
    for d in devices:
        d.check_in()
    return task_id, devices, [d.check_in()["assignment"]["assignment_id"] for d in devices]


def _delta(i: int) -> np.ndarray:
    return np.random.default_rng(i).normal(0, 0.01, N).astype(np.float32)


def _stage(
    service: Coordinator,
    device: DeviceHTTP,
    aid: str,
    delta: np.ndarray,
    examples: int,
    key: str = "key",
) -> StagedUpload:
    who = DeviceIdentity(device.device_id, device.population)
    header = json.dumps({"num_examples": examples, "loss": 0.5})
    admitted = service.admit_upload(who, aid, key, header)
    frame, _ = encode_update(delta, "fp32")
    return service.stage_upload(admitted, frame)


def _updates_on_disk(db: Path) -> int:
    """Counted from a second connection: what is durable, not what one transaction sees."""
    with sqlite3.connect(db) as conn:
        return int(conn.execute("select count(*) from updates").fetchone()[0])


def test_payloads_of_refused_uploads_are_deleted_once_the_batch_is_durable(
    tmp_path: Path,
) -> None:
    bundle = make_synthetic_bundle(tmp_path / "bundle", num_parameters=N, seed=1)
    goal, target = 3, 6
    # retain_updates: the committed round's payloads stay, so what is gone was deleted as a
    # refused upload's
    with EmbeddedCoordinator(tmp_path / "fedge.db", seed=3, retain_updates=True) as coord:
        service = coord.service
        task_id, devices, aids = _task(coord, bundle, goal, target)
        # 0-2 are taken (the goal), 3-5 refused (round closed); 4 sent the same bytes as 0
        # (content-addressed: one blob) and 5 the same bytes as 3 (both refused)
        deltas = [_delta(0), _delta(1), _delta(2), _delta(3), _delta(0), _delta(3)]

        def batch() -> list[Any]:
            staged = [_stage(service, devices[i], aids[i], deltas[i], 2 + i)
                      for i in range(target)]  # fmt: skip
            service.install_uploads(staged)
            return [s.blob.sha for s in staged], service.accept_uploads(staged)

        real_delete = service.blobs.delete
        deleted: list[tuple[str, int]] = []

        def delete(sha: str) -> None:
            deleted.append((sha, _updates_on_disk(coord.db_path)))
            real_delete(sha)

        service.blobs.delete = delete  # type: ignore[method-assign]
        shas, answers = coord.call(batch)
        refused = [i for i, a in enumerate(answers) if isinstance(a, ApiError)]
        assert refused == [3, 4, 5], answers
        assert {(answers[i].status, answers[i].code.value) for i in refused} == {
            (409, "round_closed")
        }
        # the refused payload nobody needs: deleted once, after the batch's rows were durable
        assert deleted == [(shas[3], goal)]
        assert not service.blobs.exists(shas[3])
        # the refused duplicate of an accepted upload's bytes: kept, that update needs it
        assert shas[4] == shas[0] and service.blobs.exists(shas[0])
        assert all(service.blobs.exists(shas[i]) for i in range(goal))
        assert coord.admin().task(task_id)["model_version"] == 1
        # and the version is made from exactly the accepted updates
        w = np.arange(goal) + 2.0
        mean = (w[:, None] * np.stack(deltas[:goal]).astype(np.float64)).sum(0) / w.sum()
        p0 = np.fromfile(bundle / "params.f32", dtype="<f4")
        got = decode_tensor(devices[0].params(task_id, 1))
        np.testing.assert_allclose(got, (p0 + mean).astype(np.float32), rtol=1e-6, atol=1e-7)


def test_a_refused_upload_never_deletes_a_blob_a_stored_record_needs(tmp_path: Path) -> None:
    bundle = make_synthetic_bundle(tmp_path / "bundle", num_parameters=N, seed=1)
    with EmbeddedCoordinator(tmp_path / "fedge.db", seed=3, retain_updates=True) as coord:
        service = coord.service
        _, devices, aids = _task(coord, bundle, 3, 3)

        def commit(staged: list[StagedUpload]) -> list[Any]:
            service.install_uploads(staged)
            return service.accept_uploads(staged)

        def run() -> tuple[str, Any]:
            # device 1's upload is admitted and staged with the bytes device 0 then sends...
            late = _stage(service, devices[1], aids[1], _delta(7), 5, key="an older attempt")
            assert not isinstance(commit([_stage(service, devices[0], aids[0], _delta(7), 5)])[0],
                                  ApiError)  # fmt: skip
            # ... and device 1 reports another update first (its retry with other bytes)
            assert not isinstance(commit([_stage(service, devices[1], aids[1], _delta(8), 5)])[0],
                                  ApiError)  # fmt: skip
            return late.blob.sha, commit([late])[0]

        sha, answer = coord.call(run)
        assert isinstance(answer, ApiError) and answer.status == 409, answer
        assert service.blobs.exists(sha), "the refused upload deleted device 0's payload"
        assert service.blobs.read(sha) == encode_update(_delta(7), "fp32")[0]


def _raising_in(function: str, error: Exception) -> Any:
    """A stand-in that raises ``error`` when called from ``function``, else does the real
    thing."""

    def wrap(real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if sys._getframe(1).f_code.co_name == function:
                raise error
            return real(*args, **kwargs)

        return call

    return wrap


@pytest.mark.parametrize("where", ["advance", "pacing"])
def test_an_error_after_the_commit_still_acknowledges_the_durable_uploads(
    tmp_path: Path, where: str
) -> None:
    bundle = make_synthetic_bundle(tmp_path / "bundle", num_parameters=N, seed=1)
    goal = 3
    with EmbeddedCoordinator(tmp_path / "fedge.db", seed=3) as coord:
        service = coord.service
        task_id, devices, aids = _task(coord, bundle, goal, goal)
        error = sqlite3.OperationalError("injected: database is locked")
        if where == "advance":  # reading the task to make the commit the batch made due
            store = service.store
            store.get_task = _raising_in("_advance", error)(store.get_task)  # type: ignore[method-assign]
        else:  # telling the device when to come back
            policy = service.policies["sync"]
            policy.steer = _raising_in("_paced", error)(policy.steer)  # type: ignore[method-assign]
        deltas = [_delta(10 + i) for i in range(goal)]
        answers = [devices[i].upload(aids[i], deltas[i], num_examples=2 + i, key=f"k{i}")
                   for i in range(goal)]  # fmt: skip
        assert [status for status, _ in answers] == [200] * goal, answers
        assert all(body["accepted"] and body["retry_after_s"] > 0 for _, body in answers)
        assert _updates_on_disk(coord.db_path) == goal
        # the commit is made (by the tick, if the batch could not), from exactly those updates
        deadline = 200
        while coord.admin().task(task_id)["model_version"] < 1 and deadline:
            deadline -= 1
            coord.call(service.tick)
        assert coord.admin().task(task_id)["model_version"] == 1
        assert coord.admin().task(task_id)["state"] == "running"
        w = np.arange(goal) + 2.0
        mean = (w[:, None] * np.stack(deltas).astype(np.float64)).sum(0) / w.sum()
        p0 = np.fromfile(bundle / "params.f32", dtype="<f4")
        got = decode_tensor(devices[0].params(task_id, 1))
        np.testing.assert_allclose(got, (p0 + mean).astype(np.float32), rtol=1e-6, atol=1e-7)


def test_one_tasks_files_failing_refuses_only_that_tasks_uploads_of_the_batch(
    tmp_path: Path,
) -> None:
    """Async task T's buffer is full and its commit cannot write the new version (a full
    disk); a batch holding an upload of T and one of U: T's is answered 503, U's is stored
    and acknowledged (before, U's was refused too, and stayed so while T's disk was full).
    Once T's files can be written, T's retry commits both of T's versions; nothing is
    counted twice."""
    bundle = make_synthetic_bundle(tmp_path / "bundle", num_parameters=N, seed=1)
    base = {"rounds": 5, "max_concurrency": 4, "round_deadline_s": 600.0, "robust": "none",
            "max_update_norm": None, "eligibility": {"require_charging": False}}  # fmt: skip
    with EmbeddedCoordinator(tmp_path / "fedge.db", seed=3) as coord:
        service, admin = coord.service, coord.admin()
        bundle_id = admin.upload_bundle(bundle)["bundle_id"]
        t = admin.create_task(bundle_id, {**base, "buffer_k": 1}, population="pt", mode="async")
        u = admin.create_task(bundle_id, {**base, "buffer_k": 2}, population="pu", mode="async")
        on_t = [DeviceHTTP(coord, population="pt") for _ in range(2)]
        on_u = DeviceHTTP(coord, population="pu")
        t_aids = [d.check_in()["assignment"]["assignment_id"] for d in on_t]
        u_aid = on_u.check_in()["assignment"]["assignment_id"]
        writes = service.blobs.put_with_derived

        def batch(*staged: StagedUpload) -> list[Any]:
            service.install_uploads(staged)
            return service.accept_uploads(staged)

        def no_space(*_: Any) -> str:
            raise OSError(28, "No space left on device")

        service.blobs.put_with_derived = no_space  # type: ignore[method-assign]
        # T's first upload fills its buffer; the commit it makes due fails after the answer
        [first] = coord.call(lambda: batch(_stage(service, on_t[0], t_aids[0], _delta(0), 3)))
        assert not isinstance(first, ApiError), first
        answers = coord.call(lambda: batch(
            _stage(service, on_t[1], t_aids[1], _delta(1), 4, key="t1"),
            _stage(service, on_u, u_aid, _delta(2), 5, key="u0"),
        ))  # fmt: skip
        assert isinstance(answers[0], ApiError) and answers[0].status == 503, answers
        assert not isinstance(answers[1], ApiError) and answers[1]["accepted"], answers
        assert _updates_on_disk(coord.db_path) == 2  # T's first and U's
        service.blobs.put_with_derived = writes  # type: ignore[method-assign]
        [again] = coord.call(lambda: batch(_stage(service, on_t[1], t_aids[1], _delta(1), 4,
                                                  key="t1")))  # fmt: skip
        assert not isinstance(again, ApiError) and again["accepted"], again
        assert _updates_on_disk(coord.db_path) == 3
        assert admin.task(t["task_id"])["model_version"] == 2
        assert admin.task(u["task_id"])["model_version"] == 0
        with sqlite3.connect(coord.db_path) as conn:
            per_task = dict(conn.execute("select task_id, count(*) from updates group by task_id"))
        assert per_task == {t["task_id"]: 2, u["task_id"]: 1}

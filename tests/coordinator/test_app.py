"""Every route refuses bad input with a 4xx JSON error and leaves the stored state as it was.

One coordinator (real HTTP, real SQLite) is shared by the module: a task with an open round,
devices holding assignments and one accepted upload. Each case snapshots every table and the
blob directory, sends one bad request, and checks the answer and that nothing changed.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.admin import tar_directory
from coordinator.app import OPENAPI_PATH
from coordinator.embedded import EmbeddedCoordinator
from edge_sdk.client import Client, ClientConfig
from edge_sdk.codecs import encode_update
from edge_sdk.conditions import DeviceConditions, ScriptedConditions
from edge_sdk.frame import encode_tensor
from edge_sdk.protocol import HEADER_ENROLLMENT, ErrorCode, Route, device_auth_header
from tests.fixtures.coordinator import GOOD_CONDITIONS, DeviceHTTP, HttpConnection, without_wait

N = 64
LIMIT = 16 * 1024  # update frames
JSON_LIMIT = 8 * 1024  # JSON control messages


@dataclass
class Ctx:
    coord: EmbeddedCoordinator
    http: HttpConnection
    admin_auth: dict[str, str]
    a: DeviceHTTP  # holds assignment aid_a (open)
    b: DeviceHTTP  # holds assignment aid_b (open)
    c: DeviceHTTP  # uploaded to aid_c with key "k-c"
    aid_a: str
    aid_b: str
    aid_c: str
    task_id: str
    bundle_id: str
    bundle_dir: Path
    c_answer: dict[str, Any]

    def blobs(self) -> list[str]:
        root = self.coord.db_path.with_name(self.coord.db_path.name + ".blobs")
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if "tmp" not in p.parts)

    def state(self) -> tuple[Any, list[str]]:
        return self.coord.call(self.coord.service.store.snapshot), self.blobs()


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Iterator[Ctx]:
    db = tmp_path_factory.mktemp("app") / "fedge.db"
    with EmbeddedCoordinator(db, seed=7, max_body_bytes=LIMIT, max_json_bytes=JSON_LIMIT) as coord:
        admin = coord.admin()
        bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
        plan = {
            "goal": 3,
            "selection_window_s": 0.0,
            "round_deadline_s": 3600.0,
            "rounds": 2,
            "max_update_norm": 10.0,
            "max_examples": 1000,
        }
        task_id = admin.create_task(bundle_id, plan)["task_id"]
        devs = [DeviceHTTP(coord) for _ in range(3)]
        answers = [d.check_in() for d in devs]
        answers[:2] = [d.check_in() for d in devs[:2]]  # the third closed the window
        assert [a["action"] for a in answers] == ["train"] * 3, answers
        aids = [a["assignment"]["assignment_id"] for a in answers]
        status, c_answer = without_wait(devs[2].upload(aids[2], np.full(N, 0.01), key="k-c"))
        assert status == 200
        yield Ctx(
            coord,
            HttpConnection(coord.url),
            {"Authorization": f"Bearer {coord.admin_token}"},
            devs[0],
            devs[1],
            devs[2],
            aids[0],
            aids[1],
            aids[2],
            task_id,
            bundle_id,
            tiny_bundle,
            c_answer,
        )


def upload(
    ctx: Ctx,
    dev: DeviceHTTP,
    aid: str,
    body: bytes,
    report: Any = None,
    key: str | None = "k-1",
    **hdr: str,
) -> tuple[int, dict[str, str], bytes]:
    headers = dict(hdr)
    if key is not None:
        headers["Idempotency-Key"] = key
    if report is not None:
        headers["X-Fedge-Report"] = report if isinstance(report, str) else json.dumps(report)
    return dev.raw("POST", Route.ASSIGNMENT_UPDATE.format(assignment_id=aid), body, headers)


def frame(vec: Any, codec: Any = "fp32") -> bytes:
    return encode_update(np.asarray(vec, dtype=np.float32), codec)[0]


GOOD = {"num_examples": 10, "loss": 0.3}
Request = Callable[[Ctx], tuple[int, dict[str, str], bytes]]


def admin_req(
    method: str, path: str, body: bytes | None = None, token: str | None = None
) -> Request:
    def send(ctx: Ctx) -> tuple[int, dict[str, str], bytes]:
        auth = {"Authorization": f"Bearer {token}"} if token else ctx.admin_auth
        return ctx.http.request(method, path.format(t=ctx.task_id), body, auth)

    return send


def device_json(path: str, payload: Any, raw: bytes | None = None, who: str = "a") -> Request:
    def send(ctx: Ctx) -> tuple[int, dict[str, str], bytes]:
        dev = getattr(ctx, who)
        body = raw if raw is not None else json.dumps(payload).encode()
        p = path.format(a=ctx.aid_a, b=ctx.aid_b, c=ctx.aid_c, t=ctx.task_id, bid=ctx.bundle_id)
        headers = {"Content-Type": "application/json"}
        if path == Route.REGISTER:  # registration is judged on its body only with the token
            headers[HEADER_ENROLLMENT] = str(ctx.coord.enrollment_token)
        return dev.raw("POST", p, body, headers)

    return send


def _tar(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


def tampered_bundle(ctx: Ctx) -> bytes:
    files = {p.name: p.read_bytes() for p in ctx.bundle_dir.iterdir()}
    files["params.f32"] = b"\x00" * len(files["params.f32"])
    return _tar(files)


def bundle_with(ctx: Ctx, extra: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    files = {p.name: p.read_bytes() for p in ctx.bundle_dir.iterdir()}
    return _tar({**files, **extra}, links)


CHECKIN = Route.CHECKIN
UPD = Route.ASSIGNMENT_UPDATE
MET = Route.ASSIGNMENT_METRICS.replace("{assignment_id}", "{a}")
ABT = Route.ASSIGNMENT_ABORT.replace("{assignment_id}", "{a}")
E = ErrorCode

CASES: dict[str, tuple[Request, int, ErrorCode]] = {
    # -- register
    "register malformed json": (
        device_json(Route.REGISTER, None, b"{not json"),
        400,
        E.MALFORMED_JSON,
    ),
    "register not utf-8": (device_json(Route.REGISTER, None, b"\xff\xfe{}"), 400, E.MALFORMED_JSON),
    "register no runtimes": (
        device_json(Route.REGISTER, {"platform": "x"}),
        400,
        E.INVALID_REQUEST,
    ),
    "register runtimes wrong type": (
        device_json(Route.REGISTER, {"runtimes": "ort"}),
        400,
        E.INVALID_REQUEST,
    ),
    "register unknown field": (
        device_json(Route.REGISTER, {"runtimes": [], "x": 1}),
        400,
        E.INVALID_REQUEST,
    ),
    "register body is a list": (device_json(Route.REGISTER, [1, 2]), 400, E.INVALID_REQUEST),
    "register oversized": (
        device_json(Route.REGISTER, None, b"{" + b" " * (LIMIT + 10) + b"}"),
        413,
        E.BODY_TOO_LARGE,
    ),
    "register without the enrollment token": (
        lambda c: c.http.request("POST", Route.REGISTER, b'{"runtimes": ["ort-step"]}'),
        401,
        E.UNAUTHORIZED,
    ),
    # -- check-in (the window is closed and full: a good check-in would write nothing either)
    "checkin no credentials": (
        lambda c: c.http.request("POST", CHECKIN, b"{}"),
        401,
        E.UNAUTHORIZED,
    ),
    "checkin wrong secret": (
        lambda c: c.http.request(
            "POST", CHECKIN, b"{}", {"Authorization": device_auth_header(c.a.device_id, "nope")}
        ),
        401,
        E.UNAUTHORIZED,
    ),
    "checkin unknown device": (
        lambda c: c.http.request(
            "POST", CHECKIN, b"{}", {"Authorization": device_auth_header("d-unknown", c.a.secret)}
        ),
        401,
        E.UNAUTHORIZED,
    ),
    "checkin another device's secret": (
        lambda c: c.http.request(
            "POST", CHECKIN, b"{}", {"Authorization": device_auth_header(c.a.device_id, c.b.secret)}
        ),
        401,
        E.UNAUTHORIZED,
    ),
    "checkin admin token": (
        lambda c: c.http.request("POST", CHECKIN, b"{}", c.admin_auth),
        401,
        E.UNAUTHORIZED,
    ),
    "checkin malformed header": (
        lambda c: c.http.request("POST", CHECKIN, b"{}", {"Authorization": "Device nocolon"}),
        401,
        E.UNAUTHORIZED,
    ),
    "checkin malformed json": (
        device_json(CHECKIN, None, b'{"runtimes": ['),
        400,
        E.MALFORMED_JSON,
    ),
    "checkin runtimes missing": (device_json(CHECKIN, {"conditions": {}}), 400, E.INVALID_REQUEST),
    "checkin runtimes not strings": (
        device_json(CHECKIN, {"runtimes": [1]}),
        400,
        E.INVALID_REQUEST,
    ),
    "checkin battery a string": (
        device_json(CHECKIN, {"runtimes": ["ort-step"], "conditions": {"battery": "full"}}),
        400,
        E.INVALID_REQUEST,
    ),
    "checkin battery a huge integer": (
        device_json(CHECKIN, {"runtimes": ["ort-step"], "conditions": {"battery": 10**400}}),
        400,
        E.INVALID_REQUEST,
    ),
    "checkin battery out of range": (
        device_json(CHECKIN, {"runtimes": ["ort-step"], "conditions": {"battery": 7}}),
        400,
        E.INVALID_REQUEST,
    ),
    "checkin charging a number": (
        device_json(CHECKIN, {"runtimes": ["ort-step"], "conditions": {"charging": 1}}),
        400,
        E.INVALID_REQUEST,
    ),
    "checkin unknown condition": (
        device_json(CHECKIN, {"runtimes": ["ort-step"], "conditions": {"mood": "ok"}}),
        400,
        E.INVALID_REQUEST,
    ),
    "checkin capabilities wrong type": (
        device_json(CHECKIN, {"runtimes": ["ort-step"], "capabilities": {"codecs": "int8"}}),
        400,
        E.INVALID_REQUEST,
    ),
    "checkin unknown capability": (
        device_json(
            CHECKIN, {"runtimes": ["ort-step"], "capabilities": {"codecs": ["fp32"], "gpu": 1}}
        ),
        400,
        E.INVALID_REQUEST,
    ),
    "checkin body a list": (device_json(CHECKIN, []), 400, E.INVALID_REQUEST),
    "checkin unknown field": (
        device_json(CHECKIN, {"runtimes": ["ort-step"], "hello": 1}),
        400,
        E.INVALID_REQUEST,
    ),
    "checkin oversized": (
        device_json(CHECKIN, {"runtimes": ["x" * 40] * 60, "pad": "y" * LIMIT}),
        413,
        E.BODY_TOO_LARGE,
    ),
    "checkin over the JSON limit, under the frame limit": (
        device_json(CHECKIN, {"runtimes": ["ort-step"], "pad": "y" * JSON_LIMIT}),
        413,
        E.BODY_TOO_LARGE,
    ),
    # -- bundles and parameters
    "manifest no credentials": (
        lambda c: c.http.request("GET", Route.BUNDLE_MANIFEST.format(bundle_id=c.bundle_id)),
        401,
        E.UNAUTHORIZED,
    ),
    "manifest unknown bundle": (
        lambda c: c.a.raw("GET", Route.BUNDLE_MANIFEST.format(bundle_id="f" * 64)),
        404,
        E.NOT_FOUND,
    ),
    "bundle file unknown name": (
        lambda c: c.a.raw("GET", f"/v1/bundles/{c.bundle_id}/files/nope.onnx"),
        404,
        E.NOT_FOUND,
    ),
    "bundle file traversal": (
        lambda c: c.a.raw("GET", f"/v1/bundles/{c.bundle_id}/files/..%2F..%2Ffedge.db"),
        404,
        E.NOT_FOUND,
    ),
    "bundle file no credentials": (
        lambda c: c.http.request("GET", f"/v1/bundles/{c.bundle_id}/files/params.f32"),
        401,
        E.UNAUTHORIZED,
    ),
    "params no credentials": (
        lambda c: c.http.request("GET", f"/v1/tasks/{c.task_id}/versions/0/params"),
        401,
        E.UNAUTHORIZED,
    ),
    "params unknown task": (
        lambda c: c.a.raw("GET", "/v1/tasks/t-nope/versions/0/params"),
        404,
        E.NOT_FOUND,
    ),
    "params unknown version": (
        lambda c: c.a.raw("GET", f"/v1/tasks/{c.task_id}/versions/9/params"),
        404,
        E.NOT_FOUND,
    ),
    "params version not a number": (
        lambda c: c.a.raw("GET", f"/v1/tasks/{c.task_id}/versions/latest/params"),
        400,
        E.INVALID_REQUEST,
    ),
    "params negative version": (
        lambda c: c.a.raw("GET", f"/v1/tasks/{c.task_id}/versions/-1/params"),
        400,
        E.INVALID_REQUEST,
    ),
    # -- uploads
    "upload no credentials": (
        lambda c: c.http.request("POST", UPD.format(assignment_id=c.aid_a), frame(np.zeros(N))),
        401,
        E.UNAUTHORIZED,
    ),
    "upload unknown assignment": (
        lambda c: upload(c, c.a, "a-nope", frame(np.zeros(N)), GOOD),
        404,
        E.NOT_FOUND,
    ),
    "upload impersonation": (
        lambda c: upload(c, c.b, c.aid_a, frame(np.zeros(N)), GOOD),
        403,
        E.FORBIDDEN,
    ),
    "upload replay of another's reported assignment": (
        lambda c: upload(c, c.a, c.aid_c, frame(np.full(N, 0.01)), GOOD, key="k-c"),
        403,
        E.FORBIDDEN,
    ),
    "upload no idempotency key": (
        lambda c: upload(c, c.a, c.aid_a, frame(np.zeros(N)), GOOD, key=None),
        400,
        E.INVALID_REQUEST,
    ),
    "upload key too long": (
        lambda c: upload(c, c.a, c.aid_a, frame(np.zeros(N)), GOOD, key="k" * 129),
        400,
        E.INVALID_REQUEST,
    ),
    "upload no report": (
        lambda c: upload(c, c.a, c.aid_a, frame(np.zeros(N))),
        400,
        E.INVALID_REQUEST,
    ),
    "upload report malformed": (
        lambda c: upload(c, c.a, c.aid_a, frame(np.zeros(N)), "{num_examples"),
        400,
        E.MALFORMED_JSON,
    ),
    "upload report wrong type": (
        lambda c: upload(c, c.a, c.aid_a, frame(np.zeros(N)), {"num_examples": "10"}),
        400,
        E.INVALID_REQUEST,
    ),
    "upload report zero examples": (
        lambda c: upload(c, c.a, c.aid_a, frame(np.zeros(N)), {"num_examples": 0}),
        400,
        E.INVALID_REQUEST,
    ),
    "upload report unknown key": (
        lambda c: upload(c, c.a, c.aid_a, frame(np.zeros(N)), {**GOOD, "evil": 1}),
        400,
        E.INVALID_REQUEST,
    ),
    "upload report huge loss": (
        lambda c: upload(c, c.a, c.aid_a, frame(np.zeros(N)), {**GOOD, "loss": 10**400}),
        400,
        E.INVALID_REQUEST,
    ),
    "upload report loss past the bound": (
        lambda c: upload(c, c.a, c.aid_a, frame(np.zeros(N)), {**GOOD, "loss": 1e308}),
        400,
        E.INVALID_REQUEST,
    ),
    "upload report nan loss": (
        lambda c: upload(c, c.a, c.aid_a, frame(np.zeros(N)), '{"num_examples": 5, "loss": NaN}'),
        400,
        E.INVALID_REQUEST,
    ),
    "upload report 3000-digit steps": (
        lambda c: upload(c, c.a, c.aid_a, frame(np.zeros(N)), '{"num_examples": 5, "steps": 1%s}'
                         % ("0" * 3000)),
        400,
        E.INVALID_REQUEST,
    ),
    "upload report bytes_down past 2**53": (
        lambda c: upload(c, c.a, c.aid_a, frame(np.zeros(N)), {**GOOD, "bytes_down": 2**53 + 1}),
        400,
        E.INVALID_REQUEST,
    ),
    "upload too many examples": (
        lambda c: upload(c, c.a, c.aid_a, frame(np.zeros(N)), {"num_examples": 1001}),
        422,
        E.BAD_UPDATE,
    ),
    "upload empty body": (lambda c: upload(c, c.a, c.aid_a, b"", GOOD), 400, E.MALFORMED_FRAME),
    "upload garbage": (
        lambda c: upload(c, c.a, c.aid_a, b"not a frame at all, just bytes", GOOD),
        400,
        E.MALFORMED_FRAME,
    ),
    "upload truncated frame": (
        lambda c: upload(c, c.a, c.aid_a, frame(np.zeros(N))[:-7], GOOD),
        400,
        E.MALFORMED_FRAME,
    ),
    "upload truncated int8 frame": (
        lambda c: upload(c, c.a, c.aid_a, frame(np.ones(N), "int8")[:40], GOOD),
        400,
        E.MALFORMED_FRAME,
    ),
    "upload corrupt checksum": (
        lambda c: upload(c, c.a, c.aid_a, frame(np.zeros(N))[:-1] + b"\x00", GOOD),
        400,
        E.MALFORMED_FRAME,
    ),
    "upload wrong length": (
        lambda c: upload(c, c.a, c.aid_a, frame(np.zeros(N + 1)), GOOD),
        422,
        E.BAD_UPDATE,
    ),
    "upload 2-d tensor": (
        lambda c: upload(c, c.a, c.aid_a, encode_tensor(np.zeros((8, 8), np.float32)), GOOD),
        422,
        E.BAD_UPDATE,
    ),
    "upload float64 tensor": (
        lambda c: upload(c, c.a, c.aid_a, encode_tensor(np.zeros(N)), GOOD),
        422,
        E.BAD_UPDATE,
    ),
    "upload nan": (
        lambda c: upload(c, c.a, c.aid_a, encode_tensor(np.full(N, np.nan, np.float32)), GOOD),
        422,
        E.BAD_UPDATE,
    ),
    "upload inf": (
        lambda c: upload(c, c.a, c.aid_a, encode_tensor(np.full(N, np.inf, np.float32)), GOOD),
        422,
        E.BAD_UPDATE,
    ),
    "upload int8 frame, the plan says fp32": (
        lambda c: upload(c, c.a, c.aid_a, frame(np.full(N, 0.01), "int8"), GOOD),
        422,
        E.BAD_UPDATE,
    ),
    "upload topk frame, the plan says fp32": (
        lambda c: upload(c, c.a, c.aid_a, frame(np.full(N, 0.01), {"name": "topk", "k": N}), GOOD),
        422,
        E.BAD_UPDATE,
    ),
    "upload norm beyond bound": (
        lambda c: upload(c, c.a, c.aid_a, frame(np.full(N, 2.0)), GOOD),
        422,
        E.BAD_UPDATE,
    ),
    "upload oversized": (
        lambda c: upload(c, c.a, c.aid_a, b"F" * (LIMIT + 1), GOOD),
        413,
        E.BODY_TOO_LARGE,
    ),
    "upload over the JSON limit is judged as a frame": (
        lambda c: upload(c, c.a, c.aid_a, b"F" * (JSON_LIMIT + 100), GOOD),
        400,
        E.MALFORMED_FRAME,
    ),
    "upload duplicate (other key)": (
        lambda c: upload(c, c.c, c.aid_c, frame(np.full(N, 0.01)), GOOD, key="k-other"),
        409,
        E.DUPLICATE_UPLOAD,
    ),
    # -- metrics and abort
    "metrics on a train assignment": (
        device_json(MET, {"num_examples": 3, "loss": 0.1}),
        409,
        E.CONFLICT,
    ),
    "metrics malformed json": (device_json(MET, None, b"[1,"), 400, E.MALFORMED_JSON),
    "metrics wrong types": (
        device_json(MET, {"num_examples": 3.5, "loss": 0.1}),
        400,
        E.INVALID_REQUEST,
    ),
    "metrics huge loss": (
        device_json(MET, {"num_examples": 3, "loss": 10**400}),
        400,
        E.INVALID_REQUEST,
    ),
    "metrics missing loss": (device_json(MET, {"num_examples": 3}), 400, E.INVALID_REQUEST),
    "metrics accuracy out of range": (
        device_json(MET, {"num_examples": 3, "loss": 0.1, "accuracy": 2}),
        400,
        E.INVALID_REQUEST,
    ),
    "metrics impersonation": (
        device_json(MET, {"num_examples": 3, "loss": 0.1}, who="b"),
        403,
        E.FORBIDDEN,
    ),
    "metrics unknown assignment": (
        device_json(MET.replace("{a}", "a-nope"), {"num_examples": 3, "loss": 0.1}),
        404,
        E.NOT_FOUND,
    ),
    "abort malformed json": (device_json(ABT, None, b"{"), 400, E.MALFORMED_JSON),
    "abort unknown reason": (device_json(ABT, {"reason": "bored"}), 400, E.INVALID_REQUEST),
    "abort impersonation": (device_json(ABT, {"reason": "user"}, who="b"), 403, E.FORBIDDEN),
    "abort unknown assignment": (
        device_json(ABT.replace("{a}", "a-nope"), {"reason": "user"}),
        404,
        E.NOT_FOUND,
    ),
    "abort after report": (
        device_json(ABT.replace("{a}", "{c}"), {"reason": "user"}, who="c"),
        409,
        E.CONFLICT,
    ),
    "abort body a list": (device_json(ABT, []), 400, E.INVALID_REQUEST),
    "abort body false": (device_json(ABT, False), 400, E.INVALID_REQUEST),
    "abort oversized": (device_json(ABT, None, b" " * (LIMIT + 1)), 413, E.BODY_TOO_LARGE),
    # -- operator
    "status without the admin token": (
        lambda c: c.http.request("GET", Route.STATUS),
        401,
        E.UNAUTHORIZED,
    ),
    "status with a device's credential": (
        lambda c: c.a.raw("GET", Route.STATUS),
        401,
        E.UNAUTHORIZED,
    ),
    "admin no token": (lambda c: c.http.request("GET", Route.ADMIN_TASKS), 401, E.UNAUTHORIZED),
    "admin wrong token": (admin_req("GET", Route.ADMIN_TASKS, token="wrong"), 401, E.UNAUTHORIZED),
    "admin device credentials": (lambda c: c.a.raw("GET", Route.ADMIN_TASKS), 401, E.UNAUTHORIZED),
    "bundle upload empty": (admin_req("POST", Route.ADMIN_BUNDLES, b""), 400, E.INVALID_REQUEST),
    "bundle upload not a tar": (
        admin_req("POST", Route.ADMIN_BUNDLES, b"hello" * 300),
        422,
        E.BUNDLE_INVALID,
    ),
    "bundle upload gzip tar": (
        lambda c: admin_req(
            "POST", Route.ADMIN_BUNDLES, __import__("gzip").compress(tar_directory(c.bundle_dir))
        )(c),
        422,
        E.BUNDLE_INVALID,
    ),
    "bundle upload tampered file": (
        lambda c: admin_req("POST", Route.ADMIN_BUNDLES, tampered_bundle(c))(c),
        422,
        E.BUNDLE_INVALID,
    ),
    "bundle upload traversal": (
        lambda c: admin_req("POST", Route.ADMIN_BUNDLES, bundle_with(c, {"../evil": b"x"}))(c),
        422,
        E.BUNDLE_INVALID,
    ),
    "bundle upload symlink": (
        lambda c: admin_req(
            "POST", Route.ADMIN_BUNDLES, bundle_with(c, {}, {"link": "/etc/passwd"})
        )(c),
        422,
        E.BUNDLE_INVALID,
    ),
    "bundle upload no manifest": (
        admin_req("POST", Route.ADMIN_BUNDLES, _tar({"params.f32": b"\0" * 16})),
        422,
        E.BUNDLE_INVALID,
    ),
    "task create malformed json": (
        admin_req("POST", Route.ADMIN_TASKS, b"{"),
        400,
        E.MALFORMED_JSON,
    ),
    "task create no bundle": (
        admin_req("POST", Route.ADMIN_TASKS, b'{"name": "x"}'),
        400,
        E.INVALID_REQUEST,
    ),
    "task create unknown bundle": (
        admin_req("POST", Route.ADMIN_TASKS, b'{"bundle_id": "ffff"}'),
        404,
        E.NOT_FOUND,
    ),
    "task create bad mode": (
        lambda c: admin_req(
            "POST",
            Route.ADMIN_TASKS,
            json.dumps({"bundle_id": c.bundle_id, "mode": "turbo"}).encode(),
        )(c),
        400,
        E.INVALID_REQUEST,
    ),
    "task create goal a string": (
        lambda c: admin_req(
            "POST",
            Route.ADMIN_TASKS,
            json.dumps({"bundle_id": c.bundle_id, "plan": {"goal": "10"}}).encode(),
        )(c),
        400,
        E.INVALID_REQUEST,
    ),
    "task create goal zero": (
        lambda c: admin_req(
            "POST",
            Route.ADMIN_TASKS,
            json.dumps({"bundle_id": c.bundle_id, "plan": {"goal": 0}}).encode(),
        )(c),
        400,
        E.INVALID_REQUEST,
    ),
    "task create unknown plan key": (
        lambda c: admin_req(
            "POST",
            Route.ADMIN_TASKS,
            json.dumps({"bundle_id": c.bundle_id, "plan": {"gaol": 10}}).encode(),
        )(c),
        400,
        E.INVALID_REQUEST,
    ),
    "task create bad codec": (
        lambda c: admin_req(
            "POST",
            Route.ADMIN_TASKS,
            json.dumps(
                {"bundle_id": c.bundle_id, "plan": {"codec": {"name": "int8", "bits": 3}}}
            ).encode(),
        )(c),
        400,
        E.INVALID_REQUEST,
    ),
    "task create bad optimizer": (
        lambda c: admin_req(
            "POST",
            Route.ADMIN_TASKS,
            json.dumps(
                {
                    "bundle_id": c.bundle_id,
                    "plan": {"server_optimizer": {"name": "fedadam", "beta1": 2}},
                }
            ).encode(),
        )(c),
        400,
        E.INVALID_REQUEST,
    ),
    "task create bad eligibility": (
        lambda c: admin_req(
            "POST",
            Route.ADMIN_TASKS,
            json.dumps(
                {"bundle_id": c.bundle_id, "plan": {"eligibility": {"require_idle": "yes"}}}
            ).encode(),
        )(c),
        400,
        E.INVALID_REQUEST,
    ),
    "task create unsupported runtime only": (
        lambda c: admin_req(
            "POST",
            Route.ADMIN_TASKS,
            json.dumps(
                {"bundle_id": c.bundle_id, "plan": {"eligibility": {"runtimes": ["litert-step"]}}}
            ).encode(),
        )(c),
        400,
        E.INVALID_REQUEST,
    ),
    "task create oversized": (
        admin_req("POST", Route.ADMIN_TASKS, b" " * (LIMIT + 1)),
        413,
        E.BODY_TOO_LARGE,
    ),
    "task show unknown": (admin_req("GET", "/v1/admin/tasks/t-nope"), 404, E.NOT_FOUND),
    "task pause unknown": (admin_req("POST", "/v1/admin/tasks/t-nope/pause"), 404, E.NOT_FOUND),
    "task resume a running task": (
        admin_req("POST", "/v1/admin/tasks/{t}/resume"),
        409,
        E.CONFLICT,
    ),
    "task rounds unknown": (admin_req("GET", "/v1/admin/tasks/t-nope/rounds"), 404, E.NOT_FOUND),
    "task evaluate unknown": (
        admin_req("POST", "/v1/admin/tasks/t-nope/evaluate", b"{}"),
        404,
        E.NOT_FOUND,
    ),
    "task evaluate unknown field": (
        admin_req("POST", "/v1/admin/tasks/{t}/evaluate", b'{"goal": 3}'),
        400,
        E.INVALID_REQUEST,
    ),
    "task bundle unknown": (admin_req("GET", "/v1/admin/tasks/t-nope/bundle"), 404, E.NOT_FOUND),
    # -- hostile encodings
    "deeply nested json": (
        device_json(Route.REGISTER, None, b"[" * 2000 + b"]" * 2000),  # within JSON_LIMIT
        400,
        E.MALFORMED_JSON,
    ),
    "a 5000-digit integer": (
        device_json(CHECKIN, None, b'{"runtimes": [], "x": ' + b"9" * 5000 + b"}"),
        400,
        E.MALFORMED_JSON,
    ),
    "lone surrogate in a stored string": (
        device_json(Route.REGISTER, None, b'{"runtimes": ["ort-step"], "platform": "\\ud800"}'),
        400,
        E.INVALID_REQUEST,
    ),
    "lone surrogate in a runtime": (
        device_json(Route.REGISTER, None, b'{"runtimes": ["\\udfff"]}'),
        400,
        E.INVALID_REQUEST,
    ),
    "lone surrogate in a task name": (
        lambda c: admin_req(
            "POST",
            Route.ADMIN_TASKS,
            b'{"bundle_id": "%s", "name": "\\ud800"}' % c.bundle_id.encode(),
        )(c),
        400,
        E.INVALID_REQUEST,
    ),
    "checkin secret not utf-8": (
        lambda c: c.http.request(
            "POST", CHECKIN, b"{}", {"Authorization": f"Device {c.a.device_id}:\xff\xfe"}
        ),
        401,
        E.UNAUTHORIZED,
    ),
    "admin token not utf-8": (
        admin_req("GET", Route.ADMIN_TASKS, token="\xff\xfe"),
        401,
        E.UNAUTHORIZED,
    ),
    "upload idempotency key not ascii": (
        lambda c: upload(c, c.a, c.aid_a, frame(np.zeros(N)), GOOD, key="\xc3\xa9t\xc3\xa9"),
        400,
        E.INVALID_REQUEST,
    ),
    "upload idempotency key not utf-8, to a reported assignment": (
        lambda c: upload(c, c.c, c.aid_c, frame(np.full(N, 0.01)), GOOD, key="k-\xff"),
        400,
        E.INVALID_REQUEST,
    ),
    "params non-ascii digit version": (
        lambda c: c.a.raw("GET", f"/v1/tasks/{c.task_id}/versions/%D9%A3/params"),
        400,
        E.INVALID_REQUEST,
    ),
    # -- routing
    "unknown route": (lambda c: c.http.request("GET", "/v1/nothing-here"), 404, E.NOT_FOUND),
    "wrong method": (lambda c: c.http.request("DELETE", Route.ADMIN_TASKS), 405, E.INVALID_REQUEST),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_and_changes_nothing(ctx: Ctx, case: str) -> None:
    send, status, code = CASES[case]
    before = ctx.state()
    got, headers, body = send(ctx)
    assert got == status, body[:300]
    assert headers["content-type"].startswith("application/json")
    err = json.loads(body)["error"]
    assert err["code"] == code.value and isinstance(err["message"], str) and err["message"]
    assert ctx.state() == before


def test_a_wrong_method_is_told_the_methods_the_route_takes(ctx: Ctx) -> None:
    """RFC 9110: a 405 answer carries Allow."""
    for method, path, allowed in (
        ("DELETE", Route.ADMIN_TASKS, {"GET", "HEAD", "POST"}),
        ("POST", Route.METRICS, {"GET", "HEAD"}),
        ("PUT", Route.CHECKIN, {"POST"}),
    ):
        got, headers, body = ctx.http.request(method, path)
        assert got == 405, body[:300]
        assert {m.strip() for m in headers["allow"].split(",")} == allowed


def test_an_enrollment_token_guards_registration(tmp_path: Path) -> None:
    """With ``enrollment_token`` set, registering needs it; nothing else changes."""
    with EmbeddedCoordinator(
        tmp_path / "e.db", enrollment_token="sesame", max_body_bytes=LIMIT
    ) as coord:
        http = HttpConnection(coord.url)
        good = json.dumps({"runtimes": ["ort-step"]}).encode()
        before = coord.call(coord.service.store.snapshot)
        refused = [
            ({}, good),
            ({HEADER_ENROLLMENT: "wrong"}, good),
            ({HEADER_ENROLLMENT: ""}, good),
            ({HEADER_ENROLLMENT: "sesame\xff"}, good),
            ({"Authorization": "Bearer sesame"}, good),  # the token, in the wrong place
            ({}, b"{" + b" " * (LIMIT + 10) + b"}"),  # refused before the body is read
        ]
        for headers, body in refused:
            status, got, data = http.request("POST", Route.REGISTER, body, headers)
            assert status == 401, (headers, data[:200])
            assert got["content-type"].startswith("application/json")
            assert json.loads(data)["error"]["code"] == E.UNAUTHORIZED.value
        assert coord.call(coord.service.store.snapshot) == before  # no device was created
        device = DeviceHTTP(coord, enrollment_token="sesame")
        assert device.check_in()["reason"] == "no_task"
        # the edge SDK's client sends the token it is configured with
        examples = (np.zeros((4, 4), np.float32), np.zeros(4, np.float32))
        outcomes = {}
        for token in (None, "sesame"):
            client = Client(
                coord.url,
                state_dir=tmp_path / f"device-{token}",
                data=examples,
                conditions=ScriptedConditions(DeviceConditions.from_json(GOOD_CONDITIONS)),
                config=ClientConfig(backend="ort-step", enrollment_token=token, seed=0),
                sleep=lambda s: None,
            )
            outcomes[token] = client.run_once()
            client.close()
        assert (outcomes[None].action, outcomes[None].error) == ("failed", "unauthorized")
        assert outcomes["sesame"].action == "wait"
        assert coord.call(coord.service.store.count_devices) == 2


INT8 = {"name": "int8", "bits": 8, "block": 256}


@pytest.mark.parametrize(
    ("planned", "sent"),
    [
        (INT8, "fp32"),
        (INT8, "fp16"),
        (INT8, {**INT8, "bits": 4}),
        (INT8, {**INT8, "block": 16}),
        ({"name": "topk", "k": 8}, {"name": "topk", "k": N}),
        ({"name": "topk", "k": 8}, {"name": "topk", "k": 8, "values": "fp32"}),
        ({"name": "topk", "fraction": 0.125}, {"name": "topk", "fraction": 1.0}),
        ({"name": "fp16"}, "fp32"),
    ],
)
def test_an_upload_is_held_to_the_plans_codec(
    tmp_path: Path, tiny_bundle: Path, planned: Any, sent: Any
) -> None:
    """A frame in another codec, or with other codec parameters, than the plan's ``codec`` is
    refused (422 bad_update) and changes nothing; the plan's own codec is then accepted."""
    with EmbeddedCoordinator(tmp_path / "codec.db", seed=3) as coord:
        admin = coord.admin()
        bundle_id = admin.upload_bundle(tiny_bundle)["bundle_id"]
        plan = {"goal": 1, "selection_window_s": 0.0, "rounds": 1, "codec": planned}
        admin.create_task(bundle_id, plan)
        device = DeviceHTTP(coord)
        aid = device.check_in()["assignment"]["assignment_id"]
        delta = np.linspace(-0.01, 0.01, N)
        before = coord.call(coord.service.store.snapshot)
        status, body = device.upload(aid, delta, codec=sent)
        assert (status, body["error"]["code"]) == (422, E.BAD_UPDATE.value), body
        assert coord.call(coord.service.store.snapshot) == before
        status, body = device.upload(aid, delta, codec=planned)
        assert status == 200 and body["accepted"] is True, body
        device.close()


def test_replayed_upload_gets_the_same_answer_and_changes_nothing(ctx: Ctx) -> None:
    before = ctx.state()
    status, body = without_wait(ctx.c.upload(ctx.aid_c, np.full(N, 0.01), key="k-c"))
    assert (status, body) == (200, ctx.c_answer)
    assert ctx.state() == before


def test_good_requests_still_work_afterwards(ctx: Ctx) -> None:
    """The refusals above did not break anything: the open assignment can still report."""
    status, body = ctx.a.upload(ctx.aid_a, np.full(N, 0.02), key="k-a")
    assert status == 200 and body["accepted"] is True
    status, _, data = ctx.a.raw(
        "GET", f"/v1/bundles/{ctx.bundle_id}/files/params.f32", headers={"Range": "bytes=16-"}
    )
    assert status == 206 and data == (ctx.bundle_dir / "params.f32").read_bytes()[16:]


def _openapi_path(route: str) -> str:
    return re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", route)


def test_every_route_is_documented_and_vice_versa(ctx: Ctx) -> None:
    status, _, body = ctx.http.request("GET", Route.OPENAPI)
    assert status == 200
    doc = json.loads(body)
    documented = {(p, m.upper()) for p, ops in doc["paths"].items() for m in ops}
    app = ctx.coord._runner.app
    registered = {
        (_openapi_path(r.resource.canonical), r.method)
        for r in app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    }
    assert registered == documented
    assert {p for p, _ in registered} == {
        _openapi_path(v) for k, v in vars(Route).items() if k.isupper()
    }
    assert doc == json.loads(OPENAPI_PATH.read_text())
    codes = set(
        doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
    )
    assert codes == {c.value for c in ErrorCode}

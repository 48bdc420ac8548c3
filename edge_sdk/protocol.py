"""The wire protocol between devices and the coordinator: routes, headers, error codes.

This module is the single source of truth for both sides: the coordinator imports it, the
edge SDK's transport imports it. The tensor frame lives in :mod:`edge_sdk.frame`, the delta
codecs in :mod:`edge_sdk.codecs`. ``docs/protocol.md`` describes all of it for other languages.

Conventions
-----------
* Everything is under ``/v1/``. Control messages are JSON (UTF-8, ``application/json``);
  tensors travel as frames (``application/x-fedge-frame``).
* Every error is ``{"error": {"code": <ErrorCode>, "message": <human text>}}`` with a 4xx or 5xx
  status; the code is stable, the message is not.
* Devices authenticate with ``Authorization: Device <device_id>:<secret>``; operators with
  ``Authorization: Bearer <admin token>``. Only a hash of the device secret is stored.
  Registering a device needs ``X-Fedge-Enrollment: <enrollment token>`` unless the operator
  opened registration on purpose.
* A coordinator whose work queue is full answers ``503 overloaded`` with ``Retry-After``
  (seconds) at once; clients wait that long, plus jitter, before trying again.
* Uploads carry ``Idempotency-Key``: the same device, assignment and key always get the same
  answer, and the update is counted once.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Final
from urllib.parse import quote

__all__ = [
    "API_PREFIX",
    "FRAME_CONTENT_TYPE",
    "HEADER_ENROLLMENT",
    "HEADER_IDEMPOTENCY_KEY",
    "HEADER_REPORT",
    "SAFE_ID",
    "DeviceErrorCode",
    "ErrorCode",
    "FailurePhase",
    "Route",
    "device_auth_header",
    "parse_device_auth",
]

API_PREFIX: Final = "/v1"
# The shape of an id a device sends back or keeps on disk (assignment, device and task ids):
# it goes into URL paths, the Authorization header and file names. The coordinator's are
# "a-"/"d-"/"t-" and hex; anything outside this could not be sent (http.client refuses
# spaces and control characters), would address another route or file, or (a ":") would
# split the header elsewhere.
SAFE_ID: Final = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
FRAME_CONTENT_TYPE: Final = "application/x-fedge-frame"
HEADER_IDEMPOTENCY_KEY: Final = "Idempotency-Key"
# JSON (ASCII) with the client's training report for an upload: see docs/protocol.md.
HEADER_REPORT: Final = "X-Fedge-Report"
# The shared enrollment token, on registration, when the coordinator is configured with one.
HEADER_ENROLLMENT: Final = "X-Fedge-Enrollment"


class Route:
    """Route templates; ``{name}`` parts are path parameters."""

    OPENAPI: Final = "/v1/openapi.json"
    HEALTH: Final = "/v1/health"  # the process answers
    READY: Final = "/v1/ready"  # and its store did at the last tick: 503 if not
    STATUS: Final = "/v1/status"
    # device side
    REGISTER: Final = "/v1/devices"
    CHECKIN: Final = "/v1/checkin"
    BUNDLE_MANIFEST: Final = "/v1/bundles/{bundle_id}"
    BUNDLE_FILE: Final = "/v1/bundles/{bundle_id}/files/{name:.+}"
    VERSION_PARAMS: Final = "/v1/tasks/{task_id}/versions/{version}/params"
    ASSIGNMENT_UPDATE: Final = "/v1/assignments/{assignment_id}/update"
    ASSIGNMENT_METRICS: Final = "/v1/assignments/{assignment_id}/metrics"
    ASSIGNMENT_ABORT: Final = "/v1/assignments/{assignment_id}/abort"
    # secure aggregation: the session's state for this device, and one message per stage
    SECAGG_STATE: Final = "/v1/assignments/{assignment_id}/secagg"
    SECAGG_MESSAGE: Final = "/v1/assignments/{assignment_id}/secagg/{stage}"
    # operator side
    ADMIN_BUNDLES: Final = "/v1/admin/bundles"
    ADMIN_TASKS: Final = "/v1/admin/tasks"
    ADMIN_TASK: Final = "/v1/admin/tasks/{task_id}"
    ADMIN_TASK_PAUSE: Final = "/v1/admin/tasks/{task_id}/pause"
    ADMIN_TASK_RESUME: Final = "/v1/admin/tasks/{task_id}/resume"
    ADMIN_TASK_ROUNDS: Final = "/v1/admin/tasks/{task_id}/rounds"
    ADMIN_TASK_EVALUATE: Final = "/v1/admin/tasks/{task_id}/evaluate"
    ADMIN_TASK_BUNDLE: Final = "/v1/admin/tasks/{task_id}/bundle"
    # operator dashboard (coordinator/dashboard): the page itself, its assets, its data
    DASHBOARD: Final = "/dashboard"
    DASHBOARD_STATIC: Final = "/dashboard/static/{name}"
    ADMIN_DASHBOARD_OVERVIEW: Final = "/v1/admin/dashboard/overview"
    ADMIN_DASHBOARD_TASK: Final = "/v1/admin/dashboard/tasks/{task_id}"
    ADMIN_DASHBOARD_ROUND: Final = "/v1/admin/dashboard/tasks/{task_id}/rounds/{number}"
    ADMIN_DASHBOARD_POPULATION: Final = "/v1/admin/dashboard/population"
    ADMIN_DASHBOARD_SERVICE: Final = "/v1/admin/dashboard/service"
    METRICS: Final = "/metrics"  # Prometheus text format, admin token

    @staticmethod
    def path(template: str, **params: str | int) -> str:
        """``template`` with its parameters percent-encoded: an id with "?", "/" or "#" would
        otherwise address another resource ("t?x=1" would ask for task "t")."""
        return template.format(**{k: quote(str(v), safe="") for k, v in params.items()})


class ErrorCode(str, Enum):
    """Stable machine codes of error bodies."""

    MALFORMED_JSON = "malformed_json"
    INVALID_REQUEST = "invalid_request"  # wrong types, missing or unknown fields
    BODY_TOO_LARGE = "body_too_large"  # 413
    UNAUTHORIZED = "unauthorized"  # 401: missing or bad credentials
    FORBIDDEN = "forbidden"  # 403: authenticated, but not yours
    NOT_FOUND = "not_found"  # 404: unknown id or route
    VERSION_PRUNED = "version_pruned"  # 410: an old model version deleted by retention
    MALFORMED_FRAME = "malformed_frame"  # truncated, bad magic, checksum, codec
    BAD_UPDATE = "bad_update"  # 422: NaN/Inf, wrong length, norm beyond bound
    ROUND_CLOSED = "round_closed"  # 409: late upload, round committed or abandoned
    DUPLICATE_UPLOAD = "duplicate_upload"  # 409: a different upload for a reported assignment
    TOO_STALE = "too_stale"  # 409: async update beyond the staleness bound
    CONFLICT = "conflict"  # 409: state does not allow the operation (e.g. pause twice)
    BUNDLE_INVALID = "bundle_invalid"  # 422: manifest or hashes do not check
    INTERNAL = "internal"  # 500: a bug; never caused by what a device sends
    OVERLOADED = "overloaded"  # 503: the work queue is full; come back after Retry-After
    # secure aggregation (docs/protocol.md, "Secure aggregation")
    SECAGG_INVALID = "secagg_invalid"  # 400: key, share, ciphertext or vector of wrong size/peers
    SECAGG_EXCLUDED = "secagg_excluded"  # 403: the device is not in this stage's cohort
    SECAGG_STAGE = "secagg_stage"  # 409: the round's secure aggregation is at another stage
    SECAGG_REPLAY = "secagg_replay"  # 409: the device already answered this stage


class FailurePhase(str, Enum):
    """Where an assignment failed on a device: the ``phase`` of an abort (the funnel's stages).

    Together with a :class:`DeviceErrorCode` it is all a device says about a failure: never
    data, never free text.
    """

    DOWNLOAD = "download"  # the bundle or the version's parameters could not be fetched
    RUNTIME_LOAD = "runtime_load"  # the runtime could not load the bundle's training graph
    TRAINING = "training"  # a training step failed
    CONDITIONS_LAPSED = "conditions_lapsed"  # charging, idle or network stopped during training
    UPLOAD = "upload"  # encoding the update failed or the coordinator refused it


class DeviceErrorCode(str, Enum):
    """Why a phase failed on a device (the ``code`` of an abort)."""

    NETWORK = "network"  # connection, timeout, HTTP error while fetching
    INTEGRITY = "integrity"  # a hash, size or frame check failed
    UNSUPPORTED = "unsupported"  # no installed runtime can run the bundle
    RUNTIME_ERROR = "runtime_error"  # the runtime raised
    OUT_OF_MEMORY = "out_of_memory"
    NON_FINITE = "non_finite"  # NaN or infinite loss or parameters
    INVALID_PLAN = "invalid_plan"  # the assignment's plan could not be used
    REFUSED = "refused"  # the coordinator refused the upload (bad update)
    CONDITIONS = "conditions"  # the device's eligibility conditions stopped holding
    OTHER = "other"


def device_auth_header(device_id: str, secret: str) -> str:
    return f"Device {device_id}:{secret}"


def parse_device_auth(value: str | None) -> tuple[str, str] | None:
    """``(device_id, secret)`` from an Authorization header value, or None if malformed.
    The scheme's name is case-insensitive (RFC 9110, 11.1)."""
    scheme, _, credentials = (value or "").partition(" ")
    if scheme.lower() != "device":
        return None
    device_id, sep, secret = credentials.partition(":")
    if not sep or not device_id or not secret:
        return None
    return device_id, secret

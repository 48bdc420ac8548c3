"""The coordinator's error hierarchy: every refusal the API can give, with its HTTP status.

::

    ApiError (status, ErrorCode, message)         -> {"error": {"code", "message"}}
     ├── InvalidRequest      400 invalid_request / malformed_json / malformed_frame
     ├── Unauthorized        401 unauthorized
     ├── Forbidden           403 forbidden
     ├── NotFound            404 not_found
     ├── Gone                410 version_pruned
     ├── Conflict            409 round_closed / duplicate_upload / too_stale / conflict
     ├── BodyTooLarge        413 body_too_large
     ├── Unprocessable       422 bad_update / bundle_invalid / invalid_request
     └── Overloaded          503 overloaded (with Retry-After; also a full or failing disk,
                                 or the store's transient error: a lost connection)

    TaskFailure                                   a task cannot proceed (not an API answer)

The service layer raises these; the HTTP layer turns them into the JSON error shape. A
store's transient error escaping a handler becomes ``503 overloaded``; anything else is a bug
and becomes ``500 internal``. :class:`TaskFailure` is raised inside a task's step (a commit,
a rebuild of its state); the service marks that task ``failed`` with the message and keeps
serving the others.
"""

from __future__ import annotations

from typing import Any

from edge_sdk.protocol import ErrorCode

__all__ = [
    "ApiError",
    "BodyTooLarge",
    "Conflict",
    "Forbidden",
    "Gone",
    "InvalidRequest",
    "NotFound",
    "Overloaded",
    "Unauthorized",
    "Unprocessable",
]


class ApiError(Exception):
    status = 500
    default_code = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code.value, "message": self.message}}


class InvalidRequest(ApiError):
    status = 400
    default_code = ErrorCode.INVALID_REQUEST


class Unauthorized(ApiError):
    status = 401
    default_code = ErrorCode.UNAUTHORIZED


class Forbidden(ApiError):
    status = 403
    default_code = ErrorCode.FORBIDDEN


class NotFound(ApiError):
    status = 404
    default_code = ErrorCode.NOT_FOUND


class Gone(ApiError):
    """It existed, and retention deleted it (an old model version)."""

    status = 410
    default_code = ErrorCode.VERSION_PRUNED


class Conflict(ApiError):
    status = 409
    default_code = ErrorCode.CONFLICT


class BodyTooLarge(ApiError):
    status = 413
    default_code = ErrorCode.BODY_TOO_LARGE


class Unprocessable(ApiError):
    status = 422
    default_code = ErrorCode.BAD_UPDATE


class Overloaded(ApiError):
    """The worker queue is full: nothing was done; the client should come back later."""

    status = 503
    default_code = ErrorCode.OVERLOADED

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TaskFailure(Exception):
    """A task's next step is impossible, however often it is retried (a server step that
    would make the model non-finite, stored history that does not add up)."""

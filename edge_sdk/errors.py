"""The client's exceptions, one class per thing an app may want to handle differently.

Hierarchy::

    ClientError                       anything the edge client raises on purpose
    ├── TransportError                the coordinator could not be reached (after retries)
    │   └── TlsError                  its certificate is not trusted or not the pinned key
    ├── ApiError                      the coordinator answered with a protocol error body
    │   ├── BadRequest                400: malformed_json, invalid_request, malformed_frame
    │   ├── BodyTooLarge              413: body_too_large
    │   ├── Unauthorized              401: missing or bad device credentials
    │   ├── Forbidden                 403: authenticated, but not this device's
    │   ├── NotFound                  404: unknown id or route
    │   ├── Gone                      410: version_pruned (an old version retention deleted)
    │   ├── Conflict                  409: conflict
    │   │   ├── RoundClosed           409: round_closed (late upload)
    │   │   ├── DuplicateUpload       409: duplicate_upload
    │   │   └── TooStale              409: too_stale (async beyond the staleness bound)
    │   ├── Unprocessable             422: bad_update, bundle_invalid
    │   └── ServerError               5xx (internal, or a proxy in between)
    │       └── Overloaded            503 overloaded: the queue is full (``retry_after_s``);
    │                                 also a rate-limiting proxy's 429
    ├── CacheError                    a bundle file stayed corrupt after re-fetching
    └── ConditionsLapsed              local training stopped: the device became ineligible

Only this module and :mod:`edge_sdk.transport` know the mapping from wire codes to classes;
everything else catches classes.
"""

from __future__ import annotations

from edge_sdk.protocol import ErrorCode

__all__ = [
    "ApiError",
    "BadRequest",
    "BodyTooLarge",
    "CacheError",
    "ClientError",
    "ConditionsLapsed",
    "Conflict",
    "DuplicateUpload",
    "Forbidden",
    "Gone",
    "NotFound",
    "Overloaded",
    "RoundClosed",
    "ServerError",
    "TlsError",
    "TooStale",
    "TransportError",
    "Unauthorized",
    "Unprocessable",
    "api_error",
]


class ClientError(Exception):
    """Base of everything the edge client raises on purpose."""


class TransportError(ClientError):
    """No usable answer from the coordinator: connection refused, reset or timed out."""

    def __init__(self, message: str, *, attempts: int = 1) -> None:
        super().__init__(message)
        self.attempts = attempts


class TlsError(TransportError):
    """The TLS handshake failed: an untrusted certificate, a wrong host name, a public key
    that is not the pinned one, or a peer that does not speak TLS. Never retried: the same
    server gives the same certificate next time."""


class ApiError(ClientError):
    """The coordinator answered ``{"error": {"code", "message"}}`` with a 4xx/5xx status.

    ``attempt`` is how many times the request was sent when this answer came (1: first try):
    an upload whose first try was cut off and whose retry gets ``duplicate_upload`` had been
    counted.
    """

    def __init__(
        self, status: int, code: str | None, message: str, *, method: str = "", path: str = ""
    ) -> None:
        super().__init__(f"{method} {path}: {status} {code or 'error'}: {message}".strip())
        self.status = status
        self.code = code
        self.message = message
        self.attempt = 1

    @property
    def transient(self) -> bool:
        """Whether the request was not acted on and may succeed when sent again: a 5xx, or a
        429 (RFC 6585: a rate limiter, such as a load balancer's in front of the coordinator,
        did nothing with it). Such an answer is retried, and refuses nothing: an upload it
        ends stays pending."""
        return self.status >= 500 or self.status == 429


class BadRequest(ApiError):
    pass


class BodyTooLarge(ApiError):
    pass


class Unauthorized(ApiError):
    pass


class Forbidden(ApiError):
    pass


class NotFound(ApiError):
    pass


class Gone(ApiError):
    pass


class Conflict(ApiError):
    pass


class RoundClosed(Conflict):
    pass


class DuplicateUpload(Conflict):
    pass


class TooStale(Conflict):
    pass


class Unprocessable(ApiError):
    pass


class ServerError(ApiError):
    pass


class Overloaded(ServerError):
    """503: the coordinator's work queue is full, or 429 from a rate limiter on the way;
    ``retry_after_s`` is the wait it asked for (its ``Retry-After``), None without a usable
    one."""

    retry_after_s: float | None = None


class CacheError(ClientError):
    """A downloaded bundle file did not match its manifest hash, even after re-fetching."""


class ConditionsLapsed(ClientError):
    """The device stopped being eligible during local training (``reasons`` say why)."""

    def __init__(self, reasons: tuple[str, ...], *, step: int) -> None:
        super().__init__(f"conditions lapsed at step {step}: {', '.join(reasons)}")
        self.reasons = reasons
        self.step = step


_BY_CODE: dict[str, type[ApiError]] = {
    ErrorCode.MALFORMED_JSON.value: BadRequest,
    ErrorCode.INVALID_REQUEST.value: BadRequest,
    ErrorCode.MALFORMED_FRAME.value: BadRequest,
    ErrorCode.BODY_TOO_LARGE.value: BodyTooLarge,
    ErrorCode.UNAUTHORIZED.value: Unauthorized,
    ErrorCode.FORBIDDEN.value: Forbidden,
    ErrorCode.NOT_FOUND.value: NotFound,
    ErrorCode.VERSION_PRUNED.value: Gone,
    ErrorCode.CONFLICT.value: Conflict,
    ErrorCode.ROUND_CLOSED.value: RoundClosed,
    ErrorCode.DUPLICATE_UPLOAD.value: DuplicateUpload,
    ErrorCode.TOO_STALE.value: TooStale,
    ErrorCode.BAD_UPDATE.value: Unprocessable,
    ErrorCode.BUNDLE_INVALID.value: Unprocessable,
    ErrorCode.SECAGG_INVALID.value: BadRequest,
    ErrorCode.SECAGG_EXCLUDED.value: Forbidden,
    ErrorCode.SECAGG_STAGE.value: Conflict,
    ErrorCode.SECAGG_REPLAY.value: Conflict,
    ErrorCode.INTERNAL.value: ServerError,
    ErrorCode.OVERLOADED.value: Overloaded,
}

# For answers without a known code (a proxy's HTML error page, a future code).
_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    410: Gone,
    409: Conflict,
    413: BodyTooLarge,
    422: Unprocessable,
}


def api_error(
    status: int, code: str | None, message: str, *, method: str = "", path: str = ""
) -> ApiError:
    """The most specific :class:`ApiError` for a status and wire code."""
    if status == 429:
        cls: type[ApiError] = Overloaded  # a proxy's (the coordinator sends 503 overloaded)
    elif status >= 500:
        cls = Overloaded if code == ErrorCode.OVERLOADED.value else ServerError
    else:
        cls = _BY_CODE.get(code or "") or _BY_STATUS.get(status, ApiError)
    return cls(status, code, message, method=method, path=path)

"""OpenAI's error shape, which every refusal of swarm-api takes, and the one place where the
swarm's own errors (libswarm.errors) become an HTTP status and an error code."""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse

from libswarm.errors import (
    CacheFullError,
    LimitError,
    NoRouteError,
    PeerUnavailableError,
    SessionError,
    SwarmError,
    TensorError,
)

log = logging.getLogger("swarm-api")


class ApiError(Exception):
    """A refusal in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


def swarm_error(e: BaseException) -> ApiError:
    """What the swarm said, as an HTTP answer: the gateway's reason, one line."""
    line = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, NoRouteError):
        return ApiError(503, line, "server_error", code="no_route")
    if isinstance(e, PeerUnavailableError):
        return ApiError(503, line, "server_error", code="swarmd_unavailable")
    if isinstance(e, CacheFullError):
        return ApiError(503, line, "server_error", code="cache_full")
    if isinstance(e, LimitError):
        if "max_length" in line:  # the servers' serve.max_length: this request's length, not load
            return ApiError(400, f"This request's prompt and max_tokens are longer than the swarm's servers take: "
                            f"{line}", param="max_tokens", code="context_length_exceeded")
        return ApiError(429, line, "rate_limit_error", code="limit")
    if isinstance(e, (TensorError, SessionError)):
        return ApiError(400, line)
    if isinstance(e, SwarmError):
        return ApiError(502, line, "server_error", code="swarm_error")
    log.exception("internal error", exc_info=e)
    return ApiError(500, f"internal error: {line}", "server_error")

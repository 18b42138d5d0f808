"""The picker's error tree; each becomes an OpenAI-shaped immediate response at the edge."""

from __future__ import annotations

from typing import Any, ClassVar

from gateway_state.protocol import openai_error


class GatewayError(Exception):
    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "InternalServerError"
    retry_after_s: ClassVar[int | None] = None  # a Retry-After header: the client may try again then

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param

    def body(self) -> dict[str, Any]:
        return openai_error(self.status, self.message, self.error_type, self.param)


class BadRequest(GatewayError):
    status, error_type = 400, "BadRequestError"


class NotFound(GatewayError):
    status, error_type = 404, "NotFoundError"


class MethodNotAllowed(GatewayError):
    status, error_type = 405, "MethodNotAllowedError"


class PayloadTooLarge(GatewayError):
    status, error_type = 413, "BadRequestError"


class Shed(GatewayError):
    """Sheddable traffic (a negative priority) while every endpoint is saturated."""

    status, error_type, retry_after_s = 429, "RateLimitError", 1


class QueueFull(GatewayError):
    """The pool is saturated and its queue holds as many requests as it may."""

    status, error_type, retry_after_s = 429, "RateLimitError", 1


class QueueTimeout(GatewayError):
    """The request waited its whole time-to-live for room in a saturated pool."""

    status, error_type, retry_after_s = 503, "ServiceUnavailableError", 1


class InternalError(GatewayError):
    """A fault of ours, caught at the edge: the client gets an OpenAI-shaped 500, the log a traceback."""

    status, error_type = 500, "InternalServerError"


class PickerUnavailable(Exception):
    """This replica cannot decide at all (no config yet): Envoy applies the pool's failure mode."""


class NoEndpoint(GatewayError):
    status, error_type = 503, "ServiceUnavailableError"

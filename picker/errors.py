"""The picker's error tree; each becomes an OpenAI-shaped immediate response at the edge."""

from __future__ import annotations

from typing import Any, ClassVar

from gateway_state.protocol import openai_error


class GatewayError(Exception):
    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "InternalServerError"

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
    """Sheddable traffic while every endpoint is saturated."""

    status, error_type = 429, "RateLimitError"


class InternalError(GatewayError):
    """A fault of ours, caught at the edge: the client gets an OpenAI-shaped 500, the log a traceback."""

    status, error_type = 500, "InternalServerError"


class PickerUnavailable(Exception):
    """This replica cannot decide at all (no config yet): Envoy applies the pool's failure mode."""


class NoEndpoint(GatewayError):
    status, error_type = 503, "ServiceUnavailableError"

"""The one error tree of mlc.

Every error a user can cause is an ``MLCError`` (a ``ValueError``) carrying a message that names
the problem and the fix, and, for request errors, the offending parameter, so the server can
answer OpenAI-shaped JSON: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations


class MLCError(ValueError):
    """Base of all user-facing mlc errors."""

    type: str = "invalid_request_error"
    status_code: int = 400

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_openai(self) -> dict:
        """The OpenAI error body for this error."""
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


class ConvertError(MLCError):
    """`mlc convert` could not read its source or write its output."""


class CompileError(MLCError):
    """`mlc compile` was given a target, model or option it cannot build."""


class ModelLoadError(MLCError):
    """A model directory or library cannot be loaded, or the two do not match."""


class BadRequestError(MLCError):
    """A request is malformed (OpenAI's 400 invalid_request_error)."""


class ContextWindowExceededError(BadRequestError):
    """The prompt plus requested tokens do not fit the context window."""

    def __init__(self, message: str, param: str | None = "messages"):
        super().__init__(message, param, code="context_length_exceeded")


class EngineTerminatedError(MLCError):
    """The engine was used after `terminate()`."""

    type = "engine_terminated"
    status_code = 500


class ServerOverloadedError(MLCError):
    """Too many requests are waiting (HTTP 429)."""

    type = "rate_limit_error"
    status_code = 429

"""The one exception tree of ttscale.

Library code raises these; the server maps each class to an HTTP status in one place
(``ttscale.server.errors``). Every error can name the request parameter it is about.
"""

from __future__ import annotations


class TTScaleError(Exception):
    """Base class of every error ttscale raises on purpose."""

    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequestError(TTScaleError):
    """The request is malformed or a parameter is out of range."""

    code = "invalid_request"


class UnknownStrategyError(InvalidRequestError):
    code = "unknown_strategy"


class BudgetError(TTScaleError):
    """The request is well formed but its budget cannot be honoured (e.g. too small for one sample)."""

    code = "budget_unsatisfiable"


class ModelNotFoundError(TTScaleError):
    """A model name or path that is neither served nor found on disk."""

    code = "model_not_found"


class ModelRoleError(InvalidRequestError):
    """A model exists but cannot play the role asked of it (e.g. generating with a verifier)."""

    code = "model_wrong_role"


class OverloadedError(TTScaleError):
    """Too many requests in flight; retry later."""

    code = "overloaded"


class EngineUnavailableError(TTScaleError):
    """The engine is starting, stopped or dead."""

    code = "engine_unavailable"


class ShuttingDownError(TTScaleError):
    """The server is shutting down: it admits no new request, and ends those its grace period did not see finish."""

    code = "shutting_down"


class ConfigError(TTScaleError):
    """The server's or an engine's configuration is unusable (bad option, models that do not fit)."""

    code = "config_error"


class UpstreamError(TTScaleError):
    """An OpenAI-compatible upstream answered with an error."""

    code = "upstream_error"

    def __init__(self, message: str, *, status: int = 502, param: str | None = None, code: str | None = None):
        super().__init__(message, param=param, code=code)
        self.status = status
        self.upstream_status: int | None = None  # what the upstream answered, where it answered

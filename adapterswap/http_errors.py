"""The one place exceptions become HTTP statuses and OpenAI-shaped error bodies.

``{"error": {"message", "type", "param", "code"}}``. An adapter or document the caller may
not see raises the same ``NotFound`` as one that does not exist, so both answer the same
404 with the same message shape. Anything unexpected is a 500 whose body says nothing about
internals (the detail goes to the log).
"""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from adapterswap.errors import (
    AdapterSwapError,
    Forbidden,
    IllegalTransition,
    InvalidArgument,
    InvalidDocument,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RevocationTimeout,
    Unauthorized,
)

_STATUS: list[tuple[type[Exception], int, str]] = [
    (Unauthorized, 401, "authentication_error"),
    (Forbidden, 403, "permission_error"),
    (NotFound, 404, "not_found_error"),
    (PayloadTooLarge, 413, "invalid_request_error"),
    (Overloaded, 503, "overloaded_error"),
    (RevocationTimeout, 503, "timeout_error"),
    (IllegalTransition, 409, "conflict_error"),
    (InvalidDocument, 400, "invalid_request_error"),
    (InvalidArgument, 400, "invalid_request_error"),
    (AdapterSwapError, 400, "invalid_request_error"),
]


def error_body(
    message: str, kind: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def from_validation_error(
    exc: ValidationError | RequestValidationError,
) -> tuple[int, dict[str, Any]]:
    """A 400 naming the bad field and what is wrong with it.

    For a union (``adapters`` is "auto", "none" or a list), the deepest error is the one
    that says what is wrong (``adapters.0.weight``), not that the value is not "auto".
    """
    deepest = max(exc.errors(), key=lambda e: len(e["loc"]))
    # Drop pydantic's union-branch tags (list[...], literal[...]) from the field path.
    path = [str(p) for p in deepest["loc"] if isinstance(p, int) or str(p).isidentifier()]
    param = ".".join(path) or None
    message = deepest["msg"].removeprefix("Value error, ")
    return 400, error_body(
        f"{param}: {message}" if param else message, "invalid_request_error", param=param
    )


def from_exception(exc: Exception) -> tuple[int, dict[str, Any]]:
    """Status and body for any exception raised while handling a request."""
    if isinstance(exc, ValidationError | RequestValidationError):
        return from_validation_error(exc)
    for kind, status, name in _STATUS:
        if isinstance(exc, kind):
            return status, error_body(str(exc), name)
    return 500, error_body("internal error; the server logged the details", "server_error")

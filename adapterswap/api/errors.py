"""The one place exceptions become HTTP statuses and OpenAI-shaped error bodies.

``{"error": {"message", "type", "param", "code"}}``. An adapter or document the caller may
not see raises the same ``NotFound`` as one that does not exist, so both answer the same
404 with the same message shape.

What a client never sees: a remote call's wrapper (``RayTaskError``, whose text holds a
traceback, paths, a process id, a node address, an actor id and the batch's parameters) is
unwrapped to the exception it carries first; anything unexpected is a 500 whose message is
only ``internal error (request id req-...)``, and that id is logged with the exception. A
stored adapter that fails to parse (``InvalidAdapter``) or compose (``InvalidMixture``,
``AdapterNotLoaded``), like any :class:`~adapterswap.errors.ServerFault`, is the server's
fault and may name another group's adapter: it is a 500 of the same kind. Capacity errors are 503 with ``Retry-After``.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from adapterswap.errors import (
    ERROR_CODES,
    HTTP_STATUS,
    SERVER_FAULTS,
    unwrap_remote,
)

logger = logging.getLogger("adapterswap.http")

# Seconds a client should wait before retrying a 503: long enough for a batch to finish and
# free its adapter slots, or a restarted store to come back, short enough not to idle.
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ErrorReply:
    """What an exception answers: status, OpenAI-shaped body and headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def error_body(
    message: str, kind: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_request_id() -> str:
    """An id for one failed request, shown to the client and logged with the exception."""
    return f"req-{secrets.token_hex(8)}"


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


def from_exception(exc: BaseException, request_id: str | None = None) -> tuple[int, dict[str, Any]]:
    """Status and body for any exception raised while handling a request.

    A 500's message carries ``request_id`` (a new one if none is given); log it with the
    exception, as :func:`error_reply` does.
    """
    exc = unwrap_remote(exc)
    if isinstance(exc, ValidationError | RequestValidationError):
        return from_validation_error(exc)
    if not isinstance(exc, SERVER_FAULTS):
        for kind, status, name in HTTP_STATUS:
            if isinstance(exc, kind):
                code = getattr(exc, "code", None) or ERROR_CODES.get(kind)
                return status, error_body(str(exc), name, code=code)
    request_id = request_id or new_request_id()
    message = f"internal error (request id {request_id})"
    return 500, error_body(message, "server_error", code="internal_error")


def error_reply(exc: BaseException) -> ErrorReply:
    """:func:`from_exception` with its headers; an unexpected failure is logged here, once,
    with its request id and traceback (the client gets only the id)."""
    request_id = new_request_id()
    status, body = from_exception(exc, request_id)
    headers: dict[str, str] = {}
    if status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    if status == 413:  # the body may be unread: close rather than drain it for keep-alive
        headers["Connection"] = "close"
    if status >= 500 and status != 503:
        headers["X-Request-Id"] = request_id
        logger.error("request %s failed", request_id, exc_info=exc)
    return ErrorReply(status, body, headers)

"""Every exception AdapterSwap raises on purpose, and (at the end) the HTTP status of each.

Each message names the field, the bad value and the fix.
"""

from __future__ import annotations


class AdapterSwapError(Exception):
    """Base class of every error AdapterSwap raises on purpose.

    ``code`` is the machine-readable ``error.code`` of the HTTP body (OpenAI's shape), for
    the errors a client branches on; None for most.
    """

    code: str | None = None


class ConfigError(AdapterSwapError):
    """The configuration (file, environment or flags) is invalid."""


class InvalidDocument(AdapterSwapError):
    """One or more input documents failed validation; nothing was written.

    ``problems`` lists every problem found, each prefixed with where it is
    (``file:line`` or ``file:record N``).
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        shown = self.problems[:20]
        more = len(self.problems) - len(shown)
        text = "\n".join(shown) + (f"\n... and {more} more" if more else "")
        super().__init__(f"{len(self.problems)} invalid input(s), nothing was ingested:\n{text}")


class ModelLoadError(AdapterSwapError):
    """The base or embedding model could not be found or loaded."""


class StoreError(AdapterSwapError):
    """Base class of AdapterStore errors."""


class NotFound(StoreError):
    """An id the store does not know. Also what a caller sees for an id it may not see."""


class StaleMixture(NotFound):
    """A job names an adapter version its replica no longer serves (revoked after routing).

    A stream cut by a revocation ends with this error's event, ``code: adapter_revoked``.
    """

    code = "adapter_revoked"


class IllegalTransition(StoreError):
    """An adapter version was asked to move to a status its current status does not allow."""


class InvalidArgument(AdapterSwapError):
    """A caller passed a value the store cannot accept (empty user, bad group name, ...)."""


class StoreNotRunning(StoreError):
    """The AdapterStore actor is not running in the namespace asked for."""


class Unauthorized(AdapterSwapError):
    """The API key is missing, unknown or revoked (HTTP 401)."""

    code = "invalid_api_key"


class Forbidden(AdapterSwapError):
    """The caller lacks the admin role an endpoint needs (HTTP 403)."""


class PayloadTooLarge(AdapterSwapError):
    """A body or prompt is over the configured limit (HTTP 413)."""


class RevocationTimeout(AdapterSwapError):
    """A live replica did not acknowledge a revocation in time (it stays revoked)."""


class Overloaded(AdapterSwapError):
    """No capacity or no model loaded yet (HTTP 503, with ``Retry-After``)."""

    code = "overloaded"


class StoreUnavailable(Overloaded):
    """The AdapterStore did not answer within its deadline (HTTP 503, with ``Retry-After``).

    A read was retried until the deadline; a write was sent once and may or may not have
    been applied, so the caller retries the whole operation, never the store call alone.
    """

    code = "store_unavailable"


class ServerFault(AdapterSwapError):
    """A failure that is the server's, not the caller's: a stored adapter that cannot be
    loaded, a batch that broke. HTTP 500 with a request id; the message is only logged,
    never shown (it may name an adapter of another group, a path, a device)."""


class BackupError(AdapterSwapError):
    """A backup or restore was refused or failed: a non-empty target, a damaged backup, ..."""


def unwrap_remote(exc: BaseException) -> BaseException:
    """The exception a remote call raised, out of Ray's ``RayTaskError`` wrappers.

    A wrapper's text holds the remote traceback, source paths, process id, node address,
    actor id and the call's arguments (another caller's parameters, for a batch); only its
    ``cause`` is ever shown. Matched by class name so that this module imports no Ray:
    ``RayTaskError`` and the ``RayTaskError(Cause)`` classes Ray derives from it.
    """
    while any(k.__name__ == "RayTaskError" for k in type(exc).__mro__):
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException) or cause is exc:
            break
        exc = cause
    return exc


class LeaseLost(AdapterSwapError):
    """A lock's lease expired while its holder worked (it could not reach the store)."""


class InvalidAdapter(AdapterSwapError, ValueError):
    """An adapter's files or tensors cannot be composed (bad shape, rank, key, NaN, format)."""


class InvalidMixture(AdapterSwapError, ValueError):
    """A mixture's weights are not finite and non-negative, or its rows are malformed."""


class AdapterNotLoaded(AdapterSwapError, LookupError):
    """A mixture names an adapter that is not in the bank and no loader was given."""


class SlotsExhausted(AdapterSwapError, RuntimeError):
    """Every slot is pinned by the in-flight batch, so nothing can be evicted to load another."""


class BaseModelMismatch(AdapterSwapError):
    """An adapter was trained on another base model than the one it is being used with."""


class AdapterLoadFailed(ServerFault):
    """A stored adapter version a job needs could not be loaded: damaged files, another base
    model, a storage error. The server's fault, not the caller's (HTTP 500); the message
    names nothing, the log has the details."""


class GenerationFailed(ServerFault):
    """A job failed while it ran, for a reason that is not the caller's (HTTP 500); the
    message says nothing of the server, the log has the details."""


class TrainingFailed(AdapterSwapError):
    """At least one shard failed to train; the others were published."""


class DeletionFailed(AdapterSwapError):
    """The documents stay revoked, but retraining or purging failed; rerun --finish."""


class ForgetCheckFailed(AdapterSwapError):
    """The deleted document is still more recallable than every control."""


class DemoFailed(AdapterSwapError):
    """A step of the demo did not do what it claims."""


class NoCluster(AdapterSwapError):
    """No running Ray cluster to report on."""


# What each error answers over HTTP; adapterswap.api.errors turns them into responses.
# Server-side failures, whatever their class: a 500 that shows only a request id.
SERVER_FAULTS: tuple[type[Exception], ...] = (
    ServerFault,  # the replica's AdapterLoadFailed and GenerationFailed among them
    InvalidAdapter,
    InvalidMixture,
    AdapterNotLoaded,
)

# The caller's errors: the first matching row wins, so subclasses come before their bases.
HTTP_STATUS: list[tuple[type[Exception], int, str]] = [
    (Unauthorized, 401, "authentication_error"),
    (Forbidden, 403, "permission_error"),
    (NotFound, 404, "not_found_error"),
    (PayloadTooLarge, 413, "invalid_request_error"),
    (Overloaded, 503, "overloaded_error"),
    (SlotsExhausted, 503, "overloaded_error"),
    (RevocationTimeout, 503, "timeout_error"),
    (IllegalTransition, 409, "conflict_error"),
    (InvalidDocument, 400, "invalid_request_error"),
    (InvalidArgument, 400, "invalid_request_error"),
    (AdapterSwapError, 400, "invalid_request_error"),
]
ERROR_CODES: dict[type[Exception], str] = {SlotsExhausted: "no_free_adapter_slot"}

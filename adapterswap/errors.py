"""The exceptions callers branch on. Each message names the field, the bad value and the fix."""

from __future__ import annotations


class AdapterSwapError(Exception):
    """Base class of every error AdapterSwap raises on purpose."""


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
    """A job names an adapter version its replica no longer serves (revoked after routing)."""


class IllegalTransition(StoreError):
    """An adapter version was asked to move to a status its current status does not allow."""


class InvalidArgument(AdapterSwapError):
    """A caller passed a value the store cannot accept (empty user, bad group name, ...)."""


class StoreNotRunning(StoreError):
    """The AdapterStore actor is not running in the namespace asked for."""


class Unauthorized(AdapterSwapError):
    """The API key is missing, unknown or revoked (HTTP 401)."""


class Forbidden(AdapterSwapError):
    """The caller lacks the admin role an endpoint needs (HTTP 403)."""


class PayloadTooLarge(AdapterSwapError):
    """A body or prompt is over the configured limit (HTTP 413)."""


class RevocationTimeout(AdapterSwapError):
    """A live replica did not acknowledge a revocation in time (it stays revoked)."""


class Overloaded(AdapterSwapError):
    """No capacity or no model loaded yet (HTTP 503)."""


class BackupError(AdapterSwapError):
    """A backup or restore was refused or failed: a non-empty target, a damaged backup, ..."""

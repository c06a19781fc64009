"""The one line an error prints: a user's mistake as what is wrong and how to fix it, a bug as
its type and message with the traceback kept in a file.

A user's mistake is an :class:`~adapterswap.errors.AdapterSwapError` (raised with its fix where
it is found), a server that does not answer, or an answer refusing the request (a wrong key,
say). Anything else is a bug: the user sees one line naming the file holding the traceback, to
attach to a report; ``adapterswap --debug`` raises it instead, traceback and all.
"""

from __future__ import annotations

import tempfile
import traceback

from adapterswap.errors import AdapterSwapError

_FIX_BY_STATUS = {
    401: "pass a key of this server with --key or ADAPTERSWAP_API_KEY "
    "(`adapterswap keys create` makes one)",
    403: "this needs an admin key (`adapterswap keys create --admin`)",
    404: "check the id, and that your key holds its group",
}


def user_error(exc: Exception) -> str | None:
    """The one line for a user's mistake; None when ``exc`` is a bug."""
    if isinstance(exc, AdapterSwapError):
        return str(exc)
    # Imported here: only commands that talk HTTP get these errors, and --help stays instant.
    import httpx2 as httpx

    from adapterswap.api.client import APIError

    if isinstance(exc, httpx.TransportError):
        return (
            f"no AdapterSwap server answers at {_origin(exc)} ({exc or type(exc).__name__}): "
            "start one with `adapterswap serve`, or point --url at the one that is running"
        )
    if isinstance(exc, APIError):
        fix = _FIX_BY_STATUS.get(exc.status)
        return f"{exc}; {fix}" if fix else str(exc)
    return None


def report_bug(exc: Exception) -> str:
    """Write ``exc``'s traceback to a new file; the one line that names it."""
    with tempfile.NamedTemporaryFile(
        "w", prefix="adapterswap-error-", suffix=".log", delete=False
    ) as log:
        log.write("".join(traceback.format_exception(exc)))
    first = str(exc).splitlines()[0] if str(exc) else ""
    return (
        f"unexpected {type(exc).__name__}: {first} (a bug: the traceback in {log.name} "
        "helps a report; --debug shows it)"
    )


def _origin(exc: Exception) -> str:
    """``scheme://host:port`` of the request that failed."""
    try:
        url = exc.request.url
    except RuntimeError:  # httpx's way of saying the error carries no request
        return "--url"
    return f"{url.scheme}://{url.netloc.decode()}"

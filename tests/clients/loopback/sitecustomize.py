"""Refuse every network connection that leaves this machine, and record it.

The client tests run third-party libraries that reach the internet when left alone (a
tokenizer from the hub, LiteLLM's price list, a dataset). Python imports this module at
start-up when its folder is on ``PYTHONPATH`` (the ``lm_eval`` command run by the tests);
tests/clients/conftest.py installs the same guards in the test process. A refused address
or host name is appended to the file named by ``$LOOPBACK_ONLY_LOG``, so the test fails
even when the library swallows the error and falls back quietly.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable
from typing import Any

Refused = Callable[[str], None]


def is_local(host: Any) -> bool:
    """Whether ``host`` (an address or a name) is this machine."""
    if host is None or host in ("localhost", socket.gethostname()):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:  # a host name: resolving it is already asking the network
        return False


def loopback_only_connect(connect: Callable[..., Any], refused: Refused) -> Callable[..., Any]:
    """``socket.connect`` that refuses (and reports to ``refused``) an address off this machine."""

    def guarded(sock: socket.socket, address: Any) -> Any:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not is_local(address[0]):
            refused(repr(address))
            raise ConnectionRefusedError(f"tests/clients: no network, refused {address!r}")
        return connect(sock, address)

    return guarded


def loopback_only_getaddrinfo(resolve: Callable[..., Any], refused: Refused) -> Callable[..., Any]:
    """``socket.getaddrinfo`` that refuses (and reports) a host off this machine."""

    def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not is_local(host.decode() if isinstance(host, bytes) else host):
            refused(repr(host))
            raise socket.gaierror(socket.EAI_NONAME, f"tests/clients: no network, refused {host!r}")
        return resolve(host, *args, **kwargs)

    return guarded


def _append_to_log(what: str) -> None:
    with open(os.environ["LOOPBACK_ONLY_LOG"], "a", encoding="utf-8") as log:
        log.write(what + "\n")


if __name__ == "sitecustomize" and os.environ.get("LOOPBACK_ONLY_LOG"):
    socket.socket.connect = loopback_only_connect(socket.socket.connect, _append_to_log)  # type: ignore[method-assign]
    socket.getaddrinfo = loopback_only_getaddrinfo(socket.getaddrinfo, _append_to_log)

"""Third-party clients against the real server: the whole FastAPI app of the HTTP tests
(``support.http_world_app``: real gateway and router, a tiny-model replica in float64, an
adapter for each of two groups) served by uvicorn on a loopback port, and no network
beyond this machine.

None of this needs Ray, so these tests run in ``make test-fast`` too.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

# Set before LiteLLM is imported anywhere: it otherwise fetches its price list from GitHub.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from loopback.sitecustomize import (  # noqa: E402 - after the variables above
    loopback_only_connect,
    loopback_only_getaddrinfo,
)


@dataclasses.dataclass(frozen=True)
class Served:
    """The running server: its base URL, the served model's name, the keys of
    ``support.http_world_app`` by name (``hr``, ``finance``, ``finance+hr``, ``legal`` with no
    adapter), the adapter id of each group and the base model's tokenizer."""

    url: str
    model: str
    keys: dict[str, str]
    adapters: dict[str, str]
    tokenizer: Any

    def post(self, key: str, path: str, body: dict[str, Any]) -> httpx.Response:
        """``POST path`` with ``body`` as the caller ``key`` (a name in :attr:`keys`)."""
        headers = {"Authorization": f"Bearer {self.keys[key]}"}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=60)


@pytest.fixture(scope="session")
def served(tiny_config) -> Iterator[Served]:
    """The real app over HTTP, built once for all client tests (they only read from it).

    In float64, a prompt scored in a batch of 8 and alone agree to ~1e-15 (support.LOGP):
    a difference is then a wrong mixture, never rounding.
    """
    from support import http_world_app, uvicorn_serving

    app, keys, refs, replica = http_world_app(tiny_config)
    adapters = {group: ref.id for group, ref in refs.items()}
    model = app.state.gateway.model_id
    with uvicorn_serving(app) as port:
        yield Served(f"http://127.0.0.1:{port}", model, keys, adapters, replica.tokenizer)


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail a client test whose libraries tried to reach beyond this machine, even where they
    caught the refusal and went on."""
    refused: list[str] = []
    connect = loopback_only_connect(socket.socket.connect, refused.append)
    resolve = loopback_only_getaddrinfo(socket.getaddrinfo, refused.append)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    yield
    assert not refused, f"a client tried to reach the network: {refused}"

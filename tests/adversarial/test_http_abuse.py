"""Attacks on the HTTP API (issue 12, points 3 and 5), each through the public API.

Point 3, a request that fails, fails alone and says nothing about the server:
- a weight of 1e300 used to pass validation and raise InvalidMixture for its whole batch;
- a lone surrogate ("hi \\ud800", a legal JSON escape) used to reach the tokenizer (a 500);
- a remote error used to be shown whole (RayTaskError: traceback, paths, pid, node address,
  another caller's parameters), in JSON and in a stream's error event;
- no free adapter slot used to be a 400; a corrupt stored adapter a 400 naming it;
- JSON nested 200,000 deep, or an integer of 6,000 digits, used to be a 500.

Point 5, bounded resources before authentication:
- a body was read whole before its size was checked (a 400 MiB body: +359 MiB RSS);
- every bad key, malformed or unknown, was a call to the one store actor.

Each test asserts something the code before the fix did not do (noted per test).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from ray.exceptions import RayTaskError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from support import (
    CHUNK,
    CHUNKED,
    in_process_app,
    post_head,
    publish_random_adapter,
    push,
    uvicorn_serving,
)

from adapterswap.api.auth import Authenticator
from adapterswap.errors import NotFound, Overloaded, SlotsExhausted, StaleMixture, StoreUnavailable
from adapterswap.models.embedder import load_embedder
from adapterswap.storage.artifacts import ADAPTER_WEIGHTS
from adapterswap.storage.layout import StorageLayout
from adapterswap.store.registry import AdapterRegistry
from adapterswap.types import AdapterRef

LIMIT = 1_000_000  # serve.max_body_bytes (the default)
REQUEST_ID = re.compile(r"^internal error \(request id (req-[0-9a-f]{16})\)$")
# What a remote error's text shows, and no client may see.
SECRETS = ("/srv/", "pid=4242", "10.1.2.3", "ab12cd34", "other-caller-secret", "Traceback")


@pytest.fixture(scope="module")
def world(tiny_config):
    config = tiny_config(serve={"max_body_bytes": LIMIT, "max_new_tokens": 16})
    registry = AdapterRegistry(config.db_path)
    embed = load_embedder(config.embedding).embed
    publish_random_adapter(config, registry, embed, "hr.b0001.000", "hr", ["Leave: 23 weeks."], 1)
    legal = publish_random_adapter(
        config, registry, embed, "legal.b0001.000", "legal", ["Contracts last 7 years."], 2
    )
    _corrupt(StorageLayout.from_config(config), legal)
    app, _ = in_process_app(config, registry)
    gateway = app.state.gateway
    # As the Serve ingress builds it (with the store's key ids), with a small negative cache
    # so that its bound shows in a few requests.
    gateway.auth = Authenticator(
        registry.lookup_key,
        config.serve.key_cache_ttl_s,
        negative_ttl_s=0.5,
        negative_cache_size=16,
        key_ids=lambda: [k.key_id for k in registry.list_keys() if not k.revoked],
    )
    keys = {
        "hr": registry.create_key("hana", ["hr"])[0],
        "legal": registry.create_key("lee", ["legal"])[0],
        "admin": registry.create_key("root", ["hr"], admin=True)[0],
    }
    return TestClient(app, raise_server_exceptions=False), keys, app


def _corrupt(layout: StorageLayout, ref: AdapterRef) -> None:
    """NaN in one LoRA matrix: a well-formed file whose tensors fail the bank's checks."""
    path = Path(layout.version(ref).child(ADAPTER_WEIGHTS).path)
    state = load_safetensors(path.read_bytes())
    name = next(iter(state))
    state[name] = torch.full_like(state[name], float("nan"))
    path.write_bytes(save_safetensors(state))


def call(client, key, path, body, **headers):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(
        path,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json", **headers},
        content=raw,
    )


def ray_wrapped(cause: Exception) -> Exception:
    """The exception Ray raises in the ingress for ``cause`` raised on a model replica."""
    header = "ray::ServeReplica:adapterswap:Model.generate_one() (pid=4242, ip=10.1.2.3, "
    header += "actor_id=ab12cd34)"
    trace = (
        f"{header}\nTraceback (most recent call last):\n"
        '  File "/srv/app/adapterswap/engine/replica.py", line 140, in generate\n'
        "    jobs=[InferenceJob(prompt='other-caller-secret')]\n"
        f"{type(cause).__name__}: {cause}"
    )
    error = RayTaskError(
        "Model.generate_one", trace, cause, proctitle="ray::ServeReplica", pid=4242, ip="10.1.2.3"
    )
    return error.as_instanceof_cause()


class FailingModel:
    """A model client whose every call fails with ``error`` (streams after one delta)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def generate(self, jobs):
        raise self.error

    async def score(self, jobs, top_logprobs):
        raise self.error

    async def stream(self, job):
        yield "Hello"
        raise self.error


def assert_says_nothing(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, secret


# -- point 3: validated before the batch --------------------------------------------------


@pytest.mark.parametrize("weight", [1e300, 100.5])
def test_an_unbounded_weight_is_a_400_naming_it(world, weight):
    """Before: no upper bound, so the mixture reached the replica (InvalidMixture for the batch)."""
    client, keys, _ = world
    body = {"prompt": "Leave?", "adapters": [{"id": "hr.b0001.000", "weight": weight}]}
    response = call(client, keys["hr"], "/v1/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "adapters.0.weight"
    assert "at most 100" in error["message"]
    ok = {"prompt": "Leave?", "adapters": [{"id": "hr.b0001.000", "weight": 100}]}
    assert call(client, keys["hr"], "/v1/completions", {**ok, "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize(
    ("path", "key", "body", "param"),
    [
        ("/v1/completions", "hr", {"prompt": "hi \ud800"}, "prompt"),
        ("/v1/completions", "hr", {"prompt": ["fine", "hi \udfff"]}, "prompt.1"),
        ("/v1/completions", "hr", {"prompt": "hi", "stop": "\ud800"}, "stop"),
        ("/v1/completions", "hr", {"prompt": "hi", "stop": ["x", "\ud800"]}, "stop.1"),
        ("/v1/completions", "hr", {"prompt": "hi", "user": "\ud800"}, "user"),
        (
            "/v1/chat/completions",
            "hr",
            {"messages": [{"role": "user", "content": "hi \ud800"}]},
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            "hr",
            {"messages": [{"role": "user", "content": "hi", "name": "\udc00"}]},
            "messages.0.name",
        ),
        (
            "/v1/documents",
            "admin",
            {"documents": [{"id": "d1", "group": "hr", "text": "x \ud800"}]},
            "documents.0.text",
        ),
        (
            "/v1/documents",
            "admin",
            {
                "documents": [
                    {"id": "d1", "group": "hr", "text": "x", "metadata": {"a": ["\ud800"]}}
                ]
            },
            "documents.0.metadata",
        ),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field(world, path, key, body, param):
    """Before: accepted, and the tokenizer (or Parquet) failed on it: a 500 or worse."""
    client, keys, _ = world
    raw = json.dumps(body).encode()  # ensure_ascii: "\ud800" travels as a legal JSON escape
    assert b"\\ud800" in raw or b"\\udfff" in raw or b"\\udc00" in raw
    response = call(client, keys[key], path, raw)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "lone surrogate" in error["message"]


# -- point 3: nothing about the server -----------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_remote_error_shows_only_its_own_message(world, monkeypatch, path):
    """Before: the body held the RayTaskError's whole text."""
    client, keys, app = world
    monkeypatch.setattr(app.state.gateway, "model", FailingModel(ray_wrapped(NotFound("gone"))))
    body = (
        {"prompt": "Leave?"}
        if "chat" not in path
        else {"messages": [{"role": "user", "content": "Leave?"}]}
    )
    response = call(client, keys["hr"], path, body)
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "gone"
    assert_says_nothing(response.text)


def test_an_unexpected_remote_failure_is_a_500_with_a_logged_request_id(world, monkeypatch, caplog):
    """Before: a fixed message with no id to find the failure in the log by."""
    client, keys, app = world
    failure = ray_wrapped(RuntimeError("CUDA error at /srv/kernels.cu, other-caller-secret"))
    monkeypatch.setattr(app.state.gateway, "model", FailingModel(failure))
    with caplog.at_level(logging.ERROR, logger="adapterswap.http"):
        response = call(client, keys["hr"], "/v1/completions", {"prompt": "Leave?"})
    assert response.status_code == 500
    error = response.json()["error"]
    request_id = REQUEST_ID.match(error["message"]).group(1)
    assert (error["type"], response.headers["x-request-id"]) == ("server_error", request_id)
    assert_says_nothing(response.text)
    (record,) = [r for r in caplog.records if request_id in r.getMessage()]
    assert record.exc_info is not None  # the server log holds the exception with the id


def test_a_stream_cut_by_an_error_ends_with_a_clean_error_event(world, monkeypatch):
    """Before: the event's message was the wrapper's text, and it had no code."""
    client, keys, app = world
    cut = ray_wrapped(StaleMixture("adapter 'hr.b0001.000' version 1 was revoked"))
    monkeypatch.setattr(app.state.gateway, "model", FailingModel(cut))
    body = {"messages": [{"role": "user", "content": "Leave?"}], "stream": True}
    response = call(client, keys["hr"], "/v1/chat/completions", body)
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "adapter_revoked" and "revoked" in error["message"]
    assert_says_nothing(response.text)
    monkeypatch.setattr(app.state.gateway, "model", FailingModel(ray_wrapped(KeyError("/srv/x"))))
    response = call(client, keys["hr"], "/v1/chat/completions", body)
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert REQUEST_ID.match(json.loads(events[-2])["error"]["message"])
    assert_says_nothing(response.text)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (
            SlotsExhausted("all 4 adapter slots are pinned by the in-flight batch"),
            "no_free_adapter_slot",
        ),
        (Overloaded("no model replica can take the request now"), "overloaded"),
        (StoreUnavailable("the adapter store did not answer in time"), "store_unavailable"),
    ],
)
def test_capacity_failures_are_503_with_retry_after(world, monkeypatch, error, code):
    """Before: no free slot was a 400; no 503 carried Retry-After."""
    client, keys, app = world
    monkeypatch.setattr(app.state.gateway, "model", FailingModel(ray_wrapped(error)))
    response = call(client, keys["hr"], "/v1/completions", {"prompt": "Leave?"})
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == code
    assert_says_nothing(response.text)


def test_a_corrupt_stored_adapter_is_a_500_that_names_nothing(world, caplog):
    """Before: a 400 whose message named the adapter (another group's, for a batch mate)."""
    client, keys, _ = world
    body = {"prompt": "Contracts?", "max_tokens": 2, "adapters": [{"id": "legal.b0001.000"}]}
    with caplog.at_level(logging.ERROR):
        response = call(client, keys["legal"], "/v1/completions", body)
    assert response.status_code == 500, response.text
    request_id = REQUEST_ID.match(response.json()["error"]["message"]).group(1)
    assert "legal" not in response.text and "adapters/" not in response.text
    logged = "\n".join(
        r.getMessage() + (str(r.exc_info[1]) if r.exc_info else "") for r in caplog.records
    )
    assert request_id in logged and "legal.b0001.000" in logged  # the details are logged
    ok = call(client, keys["hr"], "/v1/completions", {"prompt": "Leave?", "max_tokens": 1})
    assert ok.status_code == 200


# -- point 3: parser abuse -------------------------------------------------------------------

BODY_ENDPOINTS = [
    ("/v1/completions", "hr"),
    ("/v1/chat/completions", "hr"),
    ("/v1/documents", "admin"),
    ("/tokenize", "hr"),  # keyless: a key is sent and ignored
]


@pytest.mark.parametrize(("path", "key"), BODY_ENDPOINTS)
def test_json_nested_200000_deep_is_a_400(world, path, key):
    """Before: json.loads raised RecursionError, a 500."""
    client, keys, _ = world
    response = call(client, keys[key], path, b"[" * 200_000 + b"]" * 200_000)
    assert response.status_code == 400, response.text
    assert "nested deeper" in response.json()["error"]["message"]


@pytest.mark.parametrize(("path", "key"), BODY_ENDPOINTS)
def test_moderately_deep_json_is_refused_before_anything_recurses_on_it(world, path, key):
    """Under the interpreter's limit but far over any real body: refused, not half-processed."""
    client, keys, _ = world
    deep = {"x": 1}
    for _ in range(500):
        deep = {"x": deep}
    body = {"documents": [{"id": "d", "group": "hr", "text": "t", "metadata": deep}]}
    response = call(client, keys[key], path, body)
    assert response.status_code == 400 and "nested deeper" in response.text


@pytest.mark.parametrize(("path", "key"), BODY_ENDPOINTS)
def test_an_integer_of_6000_digits_is_a_400(world, path, key):
    """Before: the int-str conversion limit raised ValueError, a 500."""
    client, keys, _ = world
    response = call(client, keys[key], path, b'{"seed": ' + b"7" * 6000 + b"}")
    assert response.status_code == 400, response.text
    assert "too long" in response.json()["error"]["message"]


# -- point 5: the body limit, on a real HTTP server ------------------------------------------


class CountingApp:
    """ASGI wrapper counting the body bytes the app pulled from the server."""

    def __init__(self, app) -> None:
        self.app, self.read = app, 0

    async def __call__(self, scope, receive, send):
        async def counted():
            message = await receive()
            self.read += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


@pytest.fixture(scope="module")
def served(world):
    _, keys, app = world
    counting = CountingApp(app)
    with uvicorn_serving(counting) as port:
        yield port, keys, counting


def test_a_huge_content_length_is_413_before_a_byte_is_read(served):
    """Before: request.body() read all 400 MiB into memory, then answered 413."""
    port, keys, counting = served
    counting.read = 0
    head = post_head(keys["hr"], f"Content-Length: {400 * 2**20}")
    answer, sent = push(port, head, b" " * 65536, cap=64 * 2**20)
    assert answer.startswith(b"HTTP/1.1 413"), (answer[:200], sent)
    assert counting.read == 0  # the app never asked for the body
    assert sent < 16 * 2**20  # the answer came while the client had sent a sliver of it


def test_a_chunked_body_is_cut_off_at_the_limit(served):
    """Before: read to its end (here: never), then measured."""
    port, keys, counting = served
    counting.read = 0
    answer, sent = push(port, post_head(keys["hr"], CHUNKED), CHUNK, cap=64 * 2**20)
    assert answer.startswith(b"HTTP/1.1 413"), (answer[:200], sent)
    # The app stopped at the limit plus what uvicorn had buffered when it asked (uvicorn
    # pauses reading past 64 KiB; one socket read may bring more).
    assert LIMIT < counting.read <= LIMIT + 512 * 1024
    assert sent < 16 * 2**20


def test_an_unauthenticated_huge_body_is_never_read(served):
    """A guard rather than an attack that worked: the key is checked before the body is read."""
    port, _, counting = served
    counting.read = 0
    answer, _ = push(port, post_head(None, CHUNKED), CHUNK, cap=64 * 2**20)
    assert answer.startswith(b"HTTP/1.1 401") and counting.read == 0


# -- point 5: bad keys never cost a store call twice -----------------------------------------


def test_a_malformed_key_is_refused_without_calling_the_store(world):
    """Before: every key, whatever its shape, was looked up in the store."""
    client, _, app = world
    auth = app.state.gateway.auth
    before = auth.store_lookups
    for bad in ["as_bad_key", "x" * 5000, "as_0123_" + "0" * 64, "as_" + "g" * 16 + "_" + "0" * 64]:
        response = client.get("/v1/models", headers={"Authorization": f"Bearer {bad}"})
        assert response.status_code == 401 and "malformed" in response.json()["error"]["message"]
    assert auth.store_lookups == before


def test_unknown_keys_are_refused_from_a_short_bounded_cache(world):
    """Before: no negative cache: the same unknown key was a store call every time."""
    client, keys, app = world
    auth = app.state.gateway.auth
    known_id = keys["hr"].split("_")[1]
    forged = f"as_{known_id}_{'e' * 64}"  # a real key id, a wrong secret: a store lookup
    time.sleep(0.6)
    before = auth.store_lookups
    for _ in range(20):
        answer = client.get("/v1/models", headers={"Authorization": f"Bearer {forged}"})
        assert answer.status_code == 401
    assert auth.store_lookups == before + 1
    time.sleep(0.6)  # the negative TTL (0.5 s here) passes: the store is asked again
    client.get("/v1/models", headers={"Authorization": f"Bearer {forged}"})
    assert auth.store_lookups == before + 2
    for i in range(40):  # a flood of distinct keys: the cache stays within its bound
        client.get("/v1/models", headers={"Authorization": f"Bearer {known_id_key(known_id, i)}"})
    assert auth.refused_cached <= 16


def known_id_key(key_id: str, i: int) -> str:
    return f"as_{key_id}_{i:064x}"


def test_a_flood_of_random_well_formed_keys_costs_one_store_read_per_ttl(world):
    """Before: every one of them was a lookup in the store."""
    client, _, app = world
    auth = app.state.gateway.auth
    time.sleep(0.6)  # let the id list age past the negative TTL
    lookups, reads = auth.store_lookups, auth.id_list_reads
    started = time.monotonic()
    for _ in range(100):
        key = f"as_{secrets.token_hex(8)}_{secrets.token_hex(32)}"
        answer = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 401
    ttls = (time.monotonic() - started) / 0.5
    assert auth.store_lookups == lookups
    assert 1 <= auth.id_list_reads - reads <= 1 + ttls

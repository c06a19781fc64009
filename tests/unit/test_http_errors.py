from __future__ import annotations

import json
import logging
import re

import pytest
from pydantic import ValidationError
from ray.exceptions import RayTaskError

from adapterswap.api.errors import error_reply, from_exception
from adapterswap.api.schemas import CompletionRequest
from adapterswap.errors import (
    AdapterLoadFailed,
    Forbidden,
    GenerationFailed,
    InvalidAdapter,
    InvalidDocument,
    InvalidMixture,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ServerFault,
    SlotsExhausted,
    StaleMixture,
    StoreUnavailable,
    Unauthorized,
    unwrap_remote,
)


@pytest.mark.parametrize(
    ("exc", "status", "kind"),
    [
        (Unauthorized("x"), 401, "authentication_error"),
        (Forbidden("x"), 403, "permission_error"),
        (NotFound("adapter 'a' not found"), 404, "not_found_error"),
        (PayloadTooLarge("x"), 413, "invalid_request_error"),
        (Overloaded("x"), 503, "overloaded_error"),
        (InvalidDocument(["f:1: bad"]), 400, "invalid_request_error"),
        (RuntimeError("secret path /etc/x"), 500, "server_error"),
    ],
)
def test_statuses_and_openai_shape(exc, status, kind):
    got, body = from_exception(exc)
    assert got == status
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == kind
    assert "/etc/x" not in body["error"]["message"]  # internals never leak


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (
            {"prompt": "hi", "adapters": [{"id": "a", "weight": -1}]},
            "adapters",
            "finite and non-negative",
        ),
        (
            {"prompt": "hi", "adapters": [{"id": "a", "weight": float("nan")}]},
            "adapters",
            "finite and non-negative",
        ),
        ({"prompt": "hi", "max_tokens": -2}, "max_tokens", "greater than or equal to 0"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature", "valid number"),
        ({"prompt": "hi", "n": 2}, "n", "Input should be 1"),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"prompt": "hi", "groups": ["Bad Group"]}, "groups.0", "should match pattern"),
        ({"prompt": "hi", "colour": "red"}, "colour", "Extra inputs are not permitted"),
        ({}, "prompt", "Field required"),
        ({"prompt": ""}, "prompt", "prompt: must not be empty"),
        ({"prompt": ["a", ""]}, "prompt", "prompt: item 1: must not be empty"),
        ({"prompt": ["a"] * 33}, "prompt", "prompt: 33 prompts, over the limit of 32"),
        ({"prompt": [[1, 2], [3, "x"]]}, "prompt", "prompt: item 1, token 1: not a token id"),
        (
            {"prompt": "hi", "adapters": [{"id": "a", "weight": 1e300}]},
            "adapters.0.weight",
            "at most 100",
        ),
        ({"prompt": "hi \ud800"}, "prompt", "lone surrogate '\\ud800' at character 3"),
        ({"prompt": ["a", "\udfff"]}, "prompt.1", "lone surrogate"),
        ({"prompt": "hi", "stop": ["\ud800"]}, "stop.0", "lone surrogate"),
        (
            {"prompt": "hi", "stream": True, "stream_options": {"\ud800": 1}},
            "stream_options",
            "unable to parse raw data as a unicode string",
        ),
    ],
)
def test_validation_errors_name_the_field(body, param, fragment):
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate(body)
    status, payload = from_exception(info.value)
    assert status == 400
    assert fragment in payload["error"]["message"]
    if param:
        assert payload["error"]["param"].startswith(param)


def ray_wrapped(cause: Exception) -> Exception:
    """What the ingress gets from Ray for ``cause`` raised on a replica (no cluster needed)."""
    trace = (
        "ray::ServeReplica (pid=4242, ip=10.1.2.3, actor_id=ab12cd34)\n"
        'Traceback (most recent call last):\n  File "/srv/replica.py", line 1\n'
        f"{type(cause).__name__}: {cause} (prompt='other-caller-secret')"
    )
    error = RayTaskError("f", trace, cause, proctitle="ray::x", pid=4242, ip="10.1.2.3")
    return error.as_instanceof_cause()


@pytest.mark.parametrize(
    ("cause", "status", "message"),
    [
        (NotFound("adapter 'a' not found"), 404, "adapter 'a' not found"),
        (Unauthorized("invalid or revoked API key"), 401, "invalid or revoked API key"),
        (StaleMixture("adapter 'a' version 1 is not active"), 404, "is not active"),
    ],
)
def test_a_remote_error_is_its_cause_and_nothing_more(cause, status, message):
    wrapped = ray_wrapped(cause)
    assert unwrap_remote(wrapped) is cause
    got, body = from_exception(wrapped)
    assert (got, body["error"]["message"]) == (status, str(cause))
    for secret in ("Traceback", "/srv/", "4242", "10.1.2.3", "ab12cd34", "other-caller"):
        assert secret not in json.dumps(body)


def test_codes_say_what_a_client_branches_on():
    assert from_exception(StaleMixture("x"))[1]["error"]["code"] == "adapter_revoked"
    assert from_exception(ray_wrapped(StaleMixture("x")))[1]["error"]["code"] == "adapter_revoked"
    assert from_exception(Unauthorized("x"))[1]["error"]["code"] == "invalid_api_key"
    assert from_exception(SlotsExhausted("x"))[1]["error"]["code"] == "no_free_adapter_slot"


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("secret path /etc/x"),
        ray_wrapped(RuntimeError("CUDA error /srv/k.cu")),
        InvalidAdapter("legal.b0001.000 v1: /home/adapters/legal/v1 holds NaN"),
        InvalidMixture("mixture row 3: weight 1e300 for legal.b0001.000 v1"),
        ServerFault("adapter legal.b0001.000 could not be loaded"),
        AdapterLoadFailed("an adapter this request needs could not be loaded"),
        ray_wrapped(GenerationFailed("the batch failed")),
    ],
)
def test_server_faults_are_500s_with_only_a_request_id(exc, caplog):
    with caplog.at_level(logging.ERROR, logger="adapterswap.http"):
        reply = error_reply(exc)
    assert reply.status == 500
    message = reply.body["error"]["message"]
    request_id = re.fullmatch(r"internal error \(request id (req-[0-9a-f]{16})\)", message)[1]
    assert reply.headers["X-Request-Id"] == request_id
    (record,) = caplog.records
    assert request_id in record.getMessage() and record.exc_info[1] is exc


@pytest.mark.parametrize(
    "exc",
    [
        Overloaded("busy"),
        StoreUnavailable("the store did not answer"),
        SlotsExhausted("all 4 adapter slots are pinned"),
        ray_wrapped(SlotsExhausted("all 4 adapter slots are pinned")),
    ],
)
def test_capacity_errors_are_503_with_retry_after(exc):
    reply = error_reply(exc)
    assert reply.status == 503 and int(reply.headers["Retry-After"]) >= 1


def test_a_too_large_body_closes_the_connection():
    assert error_reply(PayloadTooLarge("x")).headers == {"Connection": "close"}

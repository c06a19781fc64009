from __future__ import annotations

import pytest
from pydantic import ValidationError

from adapterswap.errors import (
    Forbidden,
    InvalidDocument,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    Unauthorized,
)
from adapterswap.http_errors import from_exception
from adapterswap.schemas import CompletionRequest


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
        ({"prompt": ""}, None, "prompt must not be empty"),
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

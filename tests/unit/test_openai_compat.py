"""What OpenAI clients (the ``openai`` package, LangChain's ChatOpenAI) send and read, driven
with the real ``openai`` package against the in-process server: ``max_completion_tokens``,
content as a list of text parts, the ``developer`` role, ``stream_options.include_usage``,
the true ``finish_reason`` of a stream and ``delta.role`` in its first chunk."""

from __future__ import annotations

import json

import openai
import pytest
from fastapi.testclient import TestClient
from support import in_process_app

from adapterswap.store.registry import AdapterRegistry

QUESTION = "Tell me about parental leave."
GREEDY = {"model": "tiny-random", "temperature": 0, "max_tokens": 6}


@pytest.fixture(scope="module")
def http(tiny_config):
    config = tiny_config(serve={"max_new_tokens": 32})
    registry = AdapterRegistry(config.db_path)
    app, _ = in_process_app(config, registry)
    key = registry.create_key("olga", ["hr"])[0]
    return TestClient(app, headers={"Authorization": f"Bearer {key}"}), key


@pytest.fixture(scope="module")
def client(http):
    test_client, key = http
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=test_client)


def refused(call, **kwargs) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as info:
        call(**kwargs)
    return info.value


def logprobs_of(client, messages) -> list[float]:
    """The greedy answer's output log-probabilities: they change with any change of prompt."""
    answer = client.chat.completions.create(messages=messages, logprobs=True, **GREEDY)
    return [t.logprob for t in answer.choices[0].logprobs.content]


# -- max_completion_tokens -----------------------------------------------------------------


def test_max_completion_tokens_caps_the_answer(client):
    answer = client.chat.completions.create(
        model="tiny-random",
        messages=[{"role": "user", "content": QUESTION}],
        max_completion_tokens=5,
        extra_body={"ignore_eos": True},
    )
    assert answer.usage.completion_tokens == 5
    assert answer.choices[0].finish_reason == "length"


def test_chat_without_max_tokens_runs_to_the_servers_cap_not_16_tokens(client):
    """OpenAI's chat has no default cap (vLLM runs to the end of the context): a client that
    sets none (LangChain's default) must not get answers cut at completions' 16 tokens."""
    answer = client.chat.completions.create(
        model="tiny-random",
        messages=[{"role": "user", "content": QUESTION}],
        extra_body={"ignore_eos": True},
    )
    assert answer.usage.completion_tokens == 32  # serve.max_new_tokens
    assert answer.choices[0].finish_reason == "length"
    plain = client.completions.create(
        model="tiny-random", prompt=QUESTION, extra_body={"ignore_eos": True}
    )
    assert plain.usage.completion_tokens == 16  # completions keep OpenAI's legacy default


def test_max_tokens_and_max_completion_tokens_must_agree(client):
    messages = [{"role": "user", "content": QUESTION}]
    same = client.chat.completions.create(
        model="tiny-random",
        messages=messages,
        max_tokens=3,
        max_completion_tokens=3,
        extra_body={"ignore_eos": True},
    )
    assert same.usage.completion_tokens == 3
    error = refused(
        client.chat.completions.create,
        model="tiny-random",
        messages=messages,
        max_tokens=3,
        max_completion_tokens=4,
    )
    assert error.body["param"] == "max_completion_tokens"
    assert "max_tokens" in error.body["message"]


def test_max_completion_tokens_is_a_chat_field_only(client):
    error = refused(
        client.completions.create,
        model="tiny-random",
        prompt="Hello",
        extra_body={"max_completion_tokens": 3},
    )
    assert error.body["param"] == "max_completion_tokens"


def test_max_completion_tokens_over_the_limit_names_the_field(client):
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="tiny-random",
            messages=[{"role": "user", "content": QUESTION}],
            max_completion_tokens=33,
        )
    assert info.value.status_code == 413
    assert info.value.body["message"].startswith("max_completion_tokens: 33")


# -- messages --------------------------------------------------------------------------------


def test_text_parts_are_joined_with_newlines_as_vllm_does(client):
    parts = [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "about leave."}]
    joined = logprobs_of(client, [{"role": "user", "content": "Tell me\nabout leave."}])
    assert logprobs_of(client, [{"role": "user", "content": "Tell meabout leave."}]) != joined
    assert logprobs_of(client, [{"role": "user", "content": parts}]) == joined


def test_the_developer_role_is_the_system_role(client):
    user = {"role": "user", "content": QUESTION}
    as_system = logprobs_of(client, [{"role": "system", "content": "Answer briefly."}, user])
    assert logprobs_of(client, [user]) != as_system  # the instruction is not dropped
    developer = [{"role": "developer", "content": "Answer briefly."}, user]
    assert logprobs_of(client, developer) == as_system


def test_assistant_content_may_be_null(client):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": QUESTION},
    ]
    answer = client.chat.completions.create(messages=messages, **GREEDY)
    assert answer.choices[0].message.content


@pytest.mark.parametrize(
    ("message", "param", "fragment"),
    [
        (
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                ],
            },
            "messages.0.content.1.type",
            "'text'",
        ),
        (
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
            "messages.0.content.0.type",
            "'text'",
        ),
        ({"role": "user", "content": None}, "messages.0.content", "only an assistant"),
        ({"role": "system"}, "messages.0.content", "only an assistant"),
        ({"role": "tool", "content": "x"}, "messages.0.role", "developer"),
        ({"role": "user", "content": [{"type": "text"}]}, "messages.0.content.0.text", "required"),
    ],
)
def test_unsupported_messages_are_400s_naming_the_field(client, message, param, fragment):
    error = refused(client.chat.completions.create, messages=[message], **GREEDY)
    assert error.body["param"] == param
    assert error.body["message"].startswith(f"{param}: ")
    assert fragment in error.body["message"]


def test_text_parts_keep_the_unicode_check(http):
    test_client, _ = http
    raw = json.dumps(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi \\ud800"}]}]}
    ).replace("\\\\ud800", "\\ud800")  # a JSON escape that decodes to a lone surrogate
    answer = test_client.post(
        "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "messages.0.content.0.text"
    assert "lone surrogate" in answer.json()["error"]["message"]


# -- streams -----------------------------------------------------------------------------------


def chat_stream(client, **kwargs) -> list:
    return list(client.chat.completions.create(stream=True, **kwargs))


def test_the_first_chat_chunk_names_the_role(client):
    kwargs = {"messages": [{"role": "user", "content": QUESTION}], **GREEDY}
    chunks = chat_stream(client, **kwargs)
    first = chunks[0].choices[0].delta
    assert first.role == "assistant" and first.content == ""
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_include_usage_ends_the_stream_with_the_usage(client, chat):
    kwargs = {**GREEDY, "extra_body": {"ignore_eos": True}}
    if chat:
        create = client.chat.completions.create
        kwargs["messages"] = [{"role": "user", "content": QUESTION}]
    else:
        create = client.completions.create
        kwargs["prompt"] = QUESTION
    plain = create(**kwargs).usage
    chunks = list(create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[-1].choices == [] and chunks[-1].usage == plain
    assert plain.completion_tokens == 6
    for chunk in chunks[:-1]:
        assert "usage" in chunk.model_fields_set and chunk.usage is None
    without = list(create(stream=True, **kwargs))
    assert all(chunk.choices and "usage" not in chunk.model_fields_set for chunk in without)


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
@pytest.mark.parametrize("ends", ["length", "stop"])
def test_a_stream_reports_the_finish_reason_of_the_plain_answer(client, chat, ends):
    kwargs = {**GREEDY, "temperature": 1, "seed": 3}  # seeded: a varied text, the same twice
    if chat:
        create = client.chat.completions.create
        kwargs["messages"] = [{"role": "user", "content": QUESTION}]
        text = lambda choice: choice.message.content  # noqa: E731
        piece = lambda choice: choice.delta.content or ""  # noqa: E731
    else:
        create = client.completions.create
        kwargs["prompt"] = QUESTION
        text = piece = lambda choice: choice.text  # noqa: E731
    if ends == "stop":  # a piece of the answer's second half cuts it short
        full = text(create(**kwargs).choices[0])
        kwargs["stop"] = [full[len(full) // 2 :][:4]]
    plain = create(**kwargs).choices[0]
    assert plain.finish_reason == ends
    chunks = list(create(stream=True, **kwargs))
    assert chunks[-1].choices[0].finish_reason == ends
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert "".join(piece(c.choices[0]) for c in chunks) == text(plain)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"stream": True, "stream_options": {"include_usage": True, "colour": 1}}, "colour"),
        ({"stream": True, "stream_options": {"include_usage": "yes please"}}, "include_usage"),
        ({"stream_options": {"include_usage": True}}, None),
        ({"stream": False, "stream_options": {"include_usage": True}}, None),
    ],
)
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_bad_stream_options_are_400s_naming_the_field(http, chat, extra, param):
    test_client, _ = http
    body = {"messages": [{"role": "user", "content": "Hi"}]} if chat else {"prompt": "Hi"}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    answer = test_client.post(path, json={**body, **extra})
    assert answer.status_code == 400
    error = answer.json()["error"]
    expected = "stream_options" + (f".{param}" if param else "")
    assert error["param"] == expected
    if param is None:
        assert "stream: true" in error["message"]

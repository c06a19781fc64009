"""LangChain's ``ChatOpenAI``, LiteLLM and the ``openai`` package's chat against the server,
as their users call them: a token limit, streaming with usage, content as parts, the
``developer`` role, ``model`` naming an adapter. Each answer must equal the same chat asked
over plain HTTP.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import litellm
import openai
import pytest
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI

QUESTION = "How many weeks of paid parental leave do new parents get?"
INSTRUCTION = "Answer in one short sentence."
MAX_TOKENS = 6
# What the frameworks send, asked over plain HTTP: a system turn and a string.
PLAIN = [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": QUESTION}]
# What the tests below send: the developer role and content as a list of text parts.
PARTS = [
    {"role": "developer", "content": INSTRUCTION},
    {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
]


@pytest.fixture(scope="module")
def expected(served) -> dict[str, Any]:
    """The greedy answer to :data:`PLAIN` over plain HTTP."""
    body = {"model": served.model, "messages": PLAIN, "max_tokens": MAX_TOKENS, "temperature": 0}
    reply = served.post("finance+hr", "/v1/chat/completions", body)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["choices"][0]["message"]["content"], "an empty answer would compare nothing"
    # Cut by the token limit: a stream must then say "length", where it used to say "stop".
    assert answer["choices"][0]["finish_reason"] == "length"
    return answer


def chat_openai(served, key: str = "finance+hr", **options: Any) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=f"{served.url}/v1",
        api_key=served.keys[key],
        model=options.pop("model", served.model),
        max_tokens=MAX_TOKENS,
        temperature=0,
        max_retries=0,
        **options,
    )


def test_langchain_invoke_with_max_tokens(served, expected):
    reply = chat_openai(served).invoke(PARTS)
    choice = expected["choices"][0]
    assert reply.content == choice["message"]["content"]
    assert reply.response_metadata["finish_reason"] == choice["finish_reason"]
    assert reply.usage_metadata["output_tokens"] == expected["usage"]["completion_tokens"]
    assert reply.usage_metadata["input_tokens"] == expected["usage"]["prompt_tokens"]


def test_langchain_stream_ends_with_the_usage_and_the_true_finish_reason(served, expected):
    chunks = list(chat_openai(served, stream_usage=True).stream(PARTS))
    whole = functools.reduce(operator.add, chunks)
    assert whole.content == expected["choices"][0]["message"]["content"]
    assert whole.response_metadata["finish_reason"] == expected["choices"][0]["finish_reason"]
    usage = expected["usage"]
    assert (
        whole.usage_metadata["input_tokens"],
        whole.usage_metadata["output_tokens"],
        whole.usage_metadata["total_tokens"],
    ) == (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"])


def test_langchain_model_names_an_adapter_of_the_callers_groups_only(served):
    message = [HumanMessage(QUESTION)]
    own = chat_openai(served, "hr", model=served.adapters["hr"]).invoke(message)
    assert own.content
    with pytest.raises(openai.NotFoundError):
        chat_openai(served, "hr", model=served.adapters["finance"]).invoke(message)


def test_openai_stream_starts_with_the_role_and_ends_with_usage(served, expected):
    client = openai.OpenAI(
        base_url=f"{served.url}/v1", api_key=served.keys["finance+hr"], max_retries=0
    )
    chunks = list(
        client.chat.completions.create(
            model=served.model,
            messages=PARTS,
            max_completion_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *pieces, last = chunks
    assert pieces[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in pieces)
    assert text == expected["choices"][0]["message"]["content"]
    assert [c.choices[0].finish_reason for c in pieces if c.choices[0].finish_reason] == ["length"]
    usage = expected["usage"]
    assert last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
        usage["total_tokens"],
    )


def litellm_chat(served, key: str = "finance+hr", **options: Any) -> Any:
    return litellm.completion(
        model=f"openai/{options.pop('model', served.model)}",
        api_base=f"{served.url}/v1",
        api_key=served.keys[key],
        max_tokens=MAX_TOKENS,
        temperature=0,
        num_retries=0,
        **options,
    )


def test_litellm_completion(served, expected):
    reply = litellm_chat(served, messages=PARTS)
    assert reply.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert reply.choices[0].finish_reason == expected["choices"][0]["finish_reason"]
    assert reply.usage.completion_tokens == expected["usage"]["completion_tokens"]


def test_litellm_stream_with_usage(served, expected):
    chunks = list(
        litellm_chat(served, messages=PARTS, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["choices"][0]["message"]["content"]
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [expected["choices"][0]["finish_reason"]]
    assert chunks[-1].usage.completion_tokens == expected["usage"]["completion_tokens"]


def test_litellm_foreign_adapter_is_not_found(served):
    with pytest.raises(litellm.NotFoundError):
        litellm_chat(
            served,
            "hr",
            model=served.adapters["finance"],
            messages=[{"role": "user", "content": "hi"}],
        )

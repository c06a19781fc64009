"""What harnesses send: lists of prompts routed one by one, token-id prompts, ``model`` naming
an adapter (vLLM's convention), and the tokenizer's endpoints (/tokenize, /detokenize,
/tokenizer_info) they find the tokenizer through."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import FIN_TEXTS, HR_TEXTS

HR_ID, FIN_ID = "hr.b0001.000", "finance.b0001.000"
HR_Q, FIN_Q = "How long is paid parental leave?", "When are vendor invoices paid?"
SCORE = {"max_tokens": 0, "echo": True, "logprobs": 0}


def post(client, key, path, body):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.post(path, headers=headers, json=body)


def scored(client, key, prompt, **fields):
    reply = post(client, key, "/v1/completions", {"prompt": prompt, **SCORE, **fields})
    assert reply.status_code == 200, reply.text
    return reply.json()


def used(choice_or_body):
    return [a["id"] for a in choice_or_body["adapterswap"]["adapters"]]


def test_each_prompt_of_a_list_is_routed_on_its_own_and_answers_as_if_alone(http_world):
    client, keys, _, _ = http_world
    key = keys["finance+hr"]
    alone = {q: scored(client, key, q) for q in (HR_Q, FIN_Q)}
    assert used(alone[HR_Q]) == [HR_ID] and used(alone[FIN_Q]) == [FIN_ID]

    both = scored(client, key, [HR_Q, FIN_Q])
    assert "adapterswap" not in both  # several prompts: each choice says its own
    for choice, question in zip(both["choices"], (HR_Q, FIN_Q), strict=True):
        assert choice["adapterswap"] == alone[question]["adapterswap"]
        assert choice["adapterswap"] == alone[question]["choices"][0]["adapterswap"]
        assert choice["logprobs"] == alone[question]["choices"][0]["logprobs"]


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(order=st.lists(st.sampled_from([HR_Q, FIN_Q, "Good morning!"]), min_size=1, max_size=5))
def test_a_prompts_answer_never_depends_on_the_prompts_beside_it(http_world, order):
    client, keys, _, _ = http_world
    key = keys["finance+hr"]
    alone = {q: scored(client, key, q)["choices"][0] for q in set(order)}
    together = scored(client, key, order)["choices"]
    for choice, question in zip(together, order, strict=True):
        assert choice["logprobs"] == alone[question]["logprobs"]
        assert choice["adapterswap"] == alone[question]["adapterswap"]


def test_token_id_prompts_answer_exactly_like_their_text(http_world):
    client, keys, _, replica = http_world
    key = keys["finance+hr"]
    ids = {q: client.post("/tokenize", json={"prompt": q}).json()["tokens"] for q in (HR_Q, FIN_Q)}
    assert ids[HR_Q] == replica.tokenizer(HR_Q)["input_ids"]

    one = scored(client, key, ids[HR_Q])
    several = scored(client, key, [ids[HR_Q], ids[FIN_Q]])
    text = scored(client, key, [HR_Q, FIN_Q])
    assert one["choices"][0]["logprobs"] == text["choices"][0]["logprobs"]
    assert used(one) == [HR_ID]
    for by_ids, by_text in zip(several["choices"], text["choices"], strict=True):
        assert by_ids["logprobs"] == by_text["logprobs"]
        assert by_ids["adapterswap"] == by_text["adapterswap"]

    greedy = {"max_tokens": 4, "temperature": 0}
    generated = post(client, key, "/v1/completions", {"prompt": ids[FIN_Q], **greedy}).json()
    expected = post(client, key, "/v1/completions", {"prompt": FIN_Q, **greedy}).json()
    assert generated["choices"][0]["text"] == expected["choices"][0]["text"]
    assert generated["usage"] == expected["usage"]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([[5, 10**6]], "prompt: item 0, token 1: 1000000 is not a token id of the base model's"),
        ([5, -1], "prompt: token 1: not a token id (a non-negative integer): -1"),
        ([[5], "text"], "prompt: item 1 is str, item 0 list"),
        ([[]], "prompt: item 0, an empty list of token ids"),
        (["x"] * 33, "prompt: 33 prompts, over the limit of 32 per request"),
    ],
)
def test_bad_prompts_are_400s_that_say_what_is_wrong(http_world, prompt, message):
    client, keys, _, _ = http_world
    reply = post(client, keys["hr"], "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["message"].startswith(message)
    if "not a token id of the base model's" not in message:  # that one is the tokenizer's
        assert reply.json()["error"]["param"] == "prompt"


def test_models_lists_the_base_model_and_only_the_adapters_the_caller_may_see(http_world):
    client, keys, _, _ = http_world

    def listed(key):
        reply = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert reply.status_code == 200
        return reply.json()["data"]

    hr = listed(keys["hr"])
    assert [m["id"] for m in hr] == ["tiny-random", HR_ID]
    assert hr[1]["parent"] == "tiny-random" and hr[0]["parent"] is None
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in hr)
    assert [m["id"] for m in listed(keys["finance+hr"])] == ["tiny-random", FIN_ID, HR_ID]
    assert [m["id"] for m in listed(keys["legal"])] == ["tiny-random"]


def test_model_naming_an_adapter_composes_it_alone(http_world):
    client, keys, _, _ = http_world
    key = keys["finance+hr"]
    by_model = scored(client, key, HR_Q, model=FIN_ID)
    explicit = scored(client, key, HR_Q, adapters=[{"id": FIN_ID, "weight": 1.0}])
    assert used(by_model) == [FIN_ID]  # not the router's choice (hr) for this question
    assert by_model["adapterswap"]["adapters"][0]["weight"] == 1.0
    assert by_model["choices"][0]["logprobs"] == explicit["choices"][0]["logprobs"]

    chat = post(
        client,
        key,
        "/v1/chat/completions",
        {"model": FIN_ID, "messages": [{"role": "user", "content": HR_Q}], "max_tokens": 1},
    )
    assert used(chat.json()) == [FIN_ID]

    routed = scored(client, key, HR_Q)
    for name in ("tiny-random", "adapterswap"):  # the base model's names: the router decides
        named = scored(client, key, HR_Q, model=name)
        assert named["adapterswap"] == routed["adapterswap"]
        assert named["choices"] == routed["choices"]


def test_an_adapter_in_model_and_adapters_together_is_a_400(http_world):
    client, keys, _, _ = http_world
    body = {"prompt": HR_Q, "model": HR_ID, "adapters": "none", "max_tokens": 1}
    reply = post(client, keys["hr"], "/v1/completions", body)
    assert reply.status_code == 400
    assert reply.json()["error"]["message"].startswith("adapters: model already names adapter")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_foreign_adapter_in_model_answers_exactly_like_one_that_does_not_exist(http_world, path):
    client, keys, _, _ = http_world
    base = {"max_tokens": 1}
    base |= (
        {"prompt": FIN_Q}
        if "chat" not in path
        else {"messages": [{"role": "user", "content": FIN_Q}]}
    )
    foreign = post(client, keys["hr"], path, base | {"model": FIN_ID})
    missing = post(client, keys["hr"], path, base | {"model": "finance.b0009.000"})
    assert foreign.status_code == missing.status_code == 404
    assert foreign.json() == {
        "error": {
            **missing.json()["error"],
            "message": missing.json()["error"]["message"].replace("finance.b0009.000", FIN_ID),
        }
    }
    assert FIN_TEXTS[0] not in foreign.text and HR_TEXTS[0] not in foreign.text


def test_the_tokenizer_endpoints_answer_without_a_key_as_vllms_do(http_world):
    client, _, _, replica = http_world
    tokenizer = replica.tokenizer
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.eos_token and info["bos_token"] == tokenizer.bos_token
    assert info["chat_template"] == tokenizer.chat_template

    tokens = client.post("/tokenize", json={"prompt": HR_TEXTS[0], "add_special_tokens": False})
    assert tokens.status_code == 200
    assert tokens.json()["tokens"] == tokenizer(HR_TEXTS[0])["input_ids"]
    assert tokens.json()["count"] == len(tokens.json()["tokens"])
    back = client.post("/detokenize", json={"tokens": tokens.json()["tokens"]})
    assert back.json() == {"prompt": HR_TEXTS[0]}

    chat = [{"role": "user", "content": HR_Q}]
    templated = client.post("/tokenize", json={"messages": chat}).json()["tokens"]
    assert templated == tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=False
    )


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        (
            "/tokenize",
            {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
            "exactly one",
        ),
        ("/tokenize", {}, "exactly one"),
        ("/tokenize", {"prompt": "a", "bogus": 1}, "bogus"),
        ("/detokenize", {"tokens": [1, 10**6]}, "tokens.1: 1000000 is not a token id"),
        ("/detokenize", {"tokens": [-3]}, "tokens.0"),
    ],
)
def test_bad_tokenizer_requests_are_400s(http_world, path, body, message):
    client, _, _, _ = http_world
    reply = client.post(path, json=body)
    assert reply.status_code == 400
    assert message in reply.json()["error"]["message"]

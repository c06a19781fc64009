"""The ``openai`` package against the server: ``/v1/models``, ``model`` naming an adapter (as
in vLLM), a list of prompts routed prompt by prompt, token-id prompts, and isolation: a
caller never sees, nor is served by, another group's adapter, whose id answers exactly like
one that does not exist.
"""

from __future__ import annotations

import openai
import pytest
from support import LOGP

HR_QUESTION = "Question: How many weeks of paid parental leave do new parents get?\nAnswer:"
FINANCE_QUESTION = "Question: Within how many days are vendor invoices paid?\nAnswer:"
SCORE = {"max_tokens": 0, "echo": True, "logprobs": 0}


def client_of(served, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=served.keys[key], max_retries=0)


def adapters_of(choice) -> list[str]:
    return [a["id"] for a in choice.model_extra["adapterswap"]["adapters"]]


def assert_same_scores(choice, other) -> None:
    """Two choices' echoed log-probabilities agree (float64 on both sides)."""
    first, *rest = choice.logprobs.token_logprobs
    other_first, *other_rest = other.logprobs.token_logprobs
    assert first is other_first is None
    assert rest == pytest.approx(other_rest, rel=LOGP["rtol"], abs=LOGP["atol"])


@pytest.mark.parametrize(
    ("key", "adapters"),
    [("hr", ["hr"]), ("finance", ["finance"]), ("finance+hr", ["hr", "finance"])],
)
def test_models_lists_the_base_model_and_only_the_callers_adapters(served, key, adapters):
    listed = [m.id for m in client_of(served, key).models.list()]
    assert listed[0] == served.model
    assert sorted(listed[1:]) == sorted(served.adapters[a] for a in adapters)


def test_a_caller_without_adapters_lists_only_the_base_model(served):
    assert [m.id for m in client_of(served, "legal").models.list()] == [served.model]


def test_model_naming_an_adapter_composes_that_adapter_alone(served):
    client = client_of(served, "finance+hr")
    hr = served.adapters["hr"]
    # A finance question, which the router would send to the finance adapter.
    named = client.completions.create(model=hr, prompt=FINANCE_QUESTION, **SCORE)
    explicit = client.completions.create(
        model=served.model,
        prompt=FINANCE_QUESTION,
        extra_body={"adapters": [{"id": hr, "weight": 1.0}]},
        **SCORE,
    )
    routed = client.completions.create(model=served.model, prompt=FINANCE_QUESTION, **SCORE)
    (adapter,) = named.model_extra["adapterswap"]["adapters"]
    assert (adapter["id"], adapter["group"], adapter["weight"]) == (hr, "hr", 1.0)
    assert adapters_of(routed) == [served.adapters["finance"]]
    lp = named.choices[0].logprobs.token_logprobs
    assert lp == explicit.choices[0].logprobs.token_logprobs
    assert lp != routed.choices[0].logprobs.token_logprobs


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_another_groups_adapter_as_model_is_the_same_404_as_an_unknown_one(served, endpoint):
    client = client_of(served, "hr")

    def ask(model: str) -> openai.NotFoundError:
        with pytest.raises(openai.NotFoundError) as caught:
            if endpoint == "completions":
                client.completions.create(model=model, prompt=FINANCE_QUESTION, max_tokens=2)
            else:
                client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
                )
        return caught.value

    foreign, unknown = served.adapters["finance"], "finance.b0009.000"
    hidden, missing = ask(foreign), ask(unknown)
    assert hidden.status_code == missing.status_code == 404
    assert str(hidden.body).replace(foreign, "ID") == str(missing.body).replace(unknown, "ID")
    assert "finance" not in str(hidden.body).replace(foreign, "ID")


def test_each_prompt_of_a_list_gets_its_own_adapters(served):
    prompts = [HR_QUESTION, FINANCE_QUESTION, HR_QUESTION]
    both = client_of(served, "finance+hr").completions.create(
        model=served.model, prompt=prompts, **SCORE
    )
    hr, finance = served.adapters["hr"], served.adapters["finance"]
    assert [adapters_of(c) for c in both.choices] == [[hr], [finance], [hr]]
    for choice, prompt in zip(both.choices, prompts, strict=True):
        alone = client_of(served, "finance+hr").completions.create(
            model=served.model, prompt=prompt, **SCORE
        )
        assert_same_scores(choice, alone.choices[0])
    # A caller of one group is never served by the other's adapter, whatever the prompt.
    only_hr = client_of(served, "hr").completions.create(
        model=served.model, prompt=prompts, **SCORE
    )
    assert all(adapters_of(c) in ([], [hr]) for c in only_hr.choices)


def test_token_id_prompts_score_like_their_text(served):
    ids = [
        served.tokenizer(p, add_special_tokens=False)["input_ids"]
        for p in (HR_QUESTION, FINANCE_QUESTION)
    ]
    client = client_of(served, "finance+hr")
    as_ids = client.completions.create(model=served.model, prompt=ids, **SCORE)
    as_text = client.completions.create(
        model=served.model, prompt=[HR_QUESTION, FINANCE_QUESTION], **SCORE
    )
    for by_id, by_text in zip(as_ids.choices, as_text.choices, strict=True):
        assert adapters_of(by_id) == adapters_of(by_text)
        assert_same_scores(by_id, by_text)
    single = client.completions.create(model=served.model, prompt=ids[0], **SCORE)
    assert single.choices[0].text == HR_QUESTION


def test_too_many_prompts_is_a_400_naming_the_limit(served):
    with pytest.raises(openai.BadRequestError, match="32"):
        client_of(served, "finance+hr").completions.create(
            model=served.model, prompt=["a"] * 33, max_tokens=1
        )

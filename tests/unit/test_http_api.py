"""The HTTP API in one process: auth, isolation, routing, composition, scoring, bad input."""

from __future__ import annotations

import json
import time

import numpy as np
import openai
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.pagination import SyncCursorPage
from support import HR_TEXTS, LOGP, publish_random_adapter, uvicorn_serving

from adapterswap.api.client import Client
from adapterswap.catalog.dataset import Catalog
from adapterswap.delete.verify_forget import http_scorer
from adapterswap.engine.replica import InferenceJob
from adapterswap.engine.requests import GenerationResult, SamplingParams
from adapterswap.errors import InvalidArgument, StaleMixture
from adapterswap.types import AdapterRef


def post(client, key, path, body):
    return client.post(path, headers={"Authorization": f"Bearer {key}"}, json=body)


def test_health_needs_no_key_everything_else_does(http_world):
    client, keys, _, _ = http_world
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer as_0_0"}).status_code == 401
    models = client.get("/v1/models", headers={"Authorization": f"Bearer {keys['hr']}"}).json()
    assert models["data"][0]["id"] == "tiny-random"


def test_routing_uses_only_the_callers_adapters(http_world):
    client, keys, refs, _ = http_world
    body = {
        "prompt": "How many weeks of parental leave do new parents get?",
        "max_tokens": 4,
        "temperature": 0,
    }
    hr = post(client, keys["hr"], "/v1/completions", body).json()
    assert [a["id"] for a in hr["adapterswap"]["adapters"]] == ["hr.b0001.000"]
    assert (
        hr["choices"][0]["finish_reason"] in {"stop", "length"}
        and hr["usage"]["completion_tokens"] >= 1
    )
    fin = post(client, keys["finance"], "/v1/completions", body).json()
    assert all(a["group"] == "finance" for a in fin["adapterswap"]["adapters"])
    listing = client.get(
        "/v1/adapters", headers={"Authorization": f"Bearer {keys['finance']}"}
    ).json()
    assert [a["id"] for a in listing["data"]] == ["finance.b0001.000"]


def test_a_caller_without_adapters_gets_exactly_the_base_model(http_world):
    client, keys, _, _ = http_world
    body = {
        "prompt": "How many weeks of parental leave do new parents get?",
        "max_tokens": 0,
        "echo": True,
        "logprobs": 0,
    }
    legal = post(client, keys["legal"], "/v1/completions", body).json()
    base = post(client, keys["hr"], "/v1/completions", {**body, "adapters": "none"}).json()
    routed = post(client, keys["hr"], "/v1/completions", body).json()
    assert legal["adapterswap"]["adapters"] == []
    assert (
        legal["choices"][0]["logprobs"]["token_logprobs"]
        == base["choices"][0]["logprobs"]["token_logprobs"]
    )
    assert (
        routed["choices"][0]["logprobs"]["token_logprobs"]
        != base["choices"][0]["logprobs"]["token_logprobs"]
    )


def test_echo_logprobs_equal_a_direct_log_softmax_under_the_mixture(http_world):
    client, keys, refs, replica = http_world
    prompt = "Parental leave can be split"
    body = {
        "prompt": prompt,
        "max_tokens": 0,
        "echo": True,
        "logprobs": 0,
        "adapters": [{"id": "hr.b0001.000", "weight": 0.7}],
    }
    got = post(client, keys["hr"], "/v1/completions", body).json()["choices"][0]
    assert got["text"] == prompt
    ids = replica.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad(), replica.bank.mixture([[(refs["hr"], 0.7)]], replica.source.load):
        logits = replica.loaded.model(input_ids=torch.tensor([ids])).logits[0]
    expected = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    lp = got["logprobs"]["token_logprobs"]
    assert lp[0] is None
    torch.testing.assert_close(torch.tensor(lp[1:], dtype=torch.float64), expected, **LOGP)


def test_hidden_and_missing_adapters_answer_the_same_404(http_world):
    client, keys, _, _ = http_world
    hidden = post(
        client,
        keys["hr"],
        "/v1/completions",
        {"prompt": "hi", "adapters": [{"id": "finance.b0001.000"}]},
    )
    missing = post(
        client,
        keys["hr"],
        "/v1/completions",
        {"prompt": "hi", "adapters": [{"id": "nope.b0001.000"}]},
    )
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["error"]["message"].replace("finance.b0001.000", "X") == missing.json()[
        "error"
    ]["message"].replace("nope.b0001.000", "X")


@pytest.mark.parametrize(
    ("raw", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (json.dumps({"prompt": 5}).encode(), 400, "prompt"),
        (
            json.dumps(
                {"prompt": "hi", "adapters": [{"id": "hr.b0001.000", "weight": -1}]}
            ).encode(),
            400,
            "finite and non-negative",
        ),
        (
            b'{"prompt": "hi", "adapters": [{"id": "hr.b0001.000", "weight": NaN}]}',
            400,
            "finite and non-negative",
        ),
        (
            json.dumps({"prompt": "hi", "groups": ["finance"]}).encode(),
            400,
            "not one of your groups",
        ),
        (json.dumps({"prompt": "x" * 5000}).encode(), 413, "max_body_bytes"),
        (json.dumps({"prompt": "word " * 200}).encode(), 413, "max_prompt_tokens"),
        (json.dumps({"prompt": "hi", "max_tokens": 500}).encode(), 413, "max_new_tokens"),
    ],
)
def test_bad_requests_get_clear_errors_and_the_server_stays_up(http_world, raw, status, fragment):
    client, keys, _, _ = http_world
    response = client.post(
        "/v1/completions",
        headers={"Authorization": f"Bearer {keys['hr']}", "Content-Type": "application/json"},
        content=raw,
    )
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]
    assert client.get("/healthz").status_code == 200


def test_chat_and_its_stream_agree(http_world):
    client, keys, _, _ = http_world
    body = {
        "messages": [{"role": "user", "content": "Tell me about parental leave."}],
        "max_tokens": 6,
        "temperature": 0,
    }
    full = post(client, keys["hr"], "/v1/chat/completions", body).json()
    text = full["choices"][0]["message"]["content"]
    with client.stream(
        "POST",
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {keys['hr']}"},
        json={**body, "stream": True},
    ) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert chunks[0]["adapterswap"]["adapters"] == full["adapterswap"]["adapters"]


ADAPTER_GROUPS = {"hr.b0001.000": "hr", "finance.b0001.000": "finance"}
QUERIES = [
    "How many weeks of parental leave?",
    "When are vendor invoices paid?",
    "Hello there",
    "Receipts and leave",
]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    key_name=st.sampled_from(
        ["hr", "finance", "legal", "finance+hr", "hr+legal", "finance+hr+legal"]
    ),
    query=st.sampled_from(QUERIES),
    narrow=st.one_of(st.none(), st.sets(st.sampled_from(["hr", "finance", "legal"]))),
    explicit=st.one_of(
        st.none(),
        st.lists(st.sampled_from([*ADAPTER_GROUPS, "nope.b0001.000"]), min_size=1, max_size=3),
    ),
)
def test_no_response_ever_involves_another_groups_adapter(
    http_world, key_name, query, narrow, explicit
):
    client, keys, _, _ = http_world
    held = set(key_name.split("+"))
    body = {"prompt": query, "max_tokens": 1, "temperature": 0}
    if narrow is not None:
        body["groups"] = sorted(narrow)
    if explicit is not None:
        body["adapters"] = [{"id": a, "weight": 0.5} for a in explicit]
    response = post(client, keys[key_name], "/v1/completions", body)
    allowed = held if narrow is None else held & narrow
    if narrow is not None and not narrow <= held:
        assert response.status_code == 400  # groups may only narrow
        return
    if explicit is not None and any(ADAPTER_GROUPS.get(a) not in allowed for a in explicit):
        assert response.status_code == 404  # hidden and missing look the same
        return
    assert response.status_code == 200, response.text
    for adapter in response.json()["adapterswap"]["adapters"]:
        assert adapter["group"] in allowed and ADAPTER_GROUPS[adapter["id"]] == adapter["group"]
    listing = client.get(
        "/v1/adapters", headers={"Authorization": f"Bearer {keys[key_name]}"}
    ).json()["data"]
    assert {a["group"] for a in listing} <= held


def test_admin_endpoints_need_an_admin_and_ingest_is_all_or_nothing(http_world):
    client, keys, _, _ = http_world
    docs = {
        "documents": [{"id": "api-1", "text": "The Skarvik office has 14 desks.", "group": "hr"}]
    }
    assert post(client, keys["hr"], "/v1/documents", docs).status_code == 403
    bad = {"documents": [*docs["documents"], {"id": "api-2", "text": "x", "group": "Not A Group"}]}
    rejected = post(client, keys["admin"], "/v1/documents", bad)
    assert (
        rejected.status_code == 400
        and "documents[1]: field 'group'" in rejected.json()["error"]["message"]
    )
    admin = {"Authorization": f"Bearer {keys['admin']}"}
    assert (
        client.get("/v1/documents/api-1", headers=admin).status_code == 404
    )  # nothing was written
    accepted = post(client, keys["admin"], "/v1/documents", docs).json()
    assert accepted["accepted"] == 1 and accepted["shards"][0].startswith("hr.")
    doc = client.get("/v1/documents/api-1", headers=admin).json()
    assert doc["group"] == "hr" and doc["shard"] == accepted["shards"][0] and "text" not in doc
    again = post(client, keys["admin"], "/v1/documents", docs)
    assert again.status_code == 400 and "already exists" in again.json()["error"]["message"]
    log = client.get("/v1/audit?limit=1000", headers=admin).json()["data"]
    assert any(e["action"] == "ingest" and e["actor"] == "api:root" for e in log)
    assert (
        client.get("/v1/audit", headers={"Authorization": f"Bearer {keys['hr']}"}).status_code
        == 403
    )


def test_train_jobs_are_admin_only_and_readable_by_id(http_world):
    client, keys, _, _ = http_world
    assert post(client, keys["hr"], "/v1/train", {}).status_code == 403
    submitted = post(client, keys["admin"], "/v1/train", {}).json()
    assert submitted["state"] == "pending" and submitted["job"].startswith("train-")
    admin = {"Authorization": f"Bearer {keys['admin']}"}
    job = client.get(f"/v1/jobs/{submitted['job']}", headers=admin).json()
    assert (job["id"], job["object"], job["kind"]) == (submitted["job"], "job", "train")
    assert (job["state"], job["submitted_by"], job["error"]) == ("pending", "root", None)
    hr = {"Authorization": f"Bearer {keys['hr']}"}
    assert client.get(f"/v1/jobs/{submitted['job']}", headers=hr).status_code == 403
    missing = client.get("/v1/jobs/train-000000000000", headers=admin)
    assert missing.status_code == 404 and "train-000000000000" in missing.json()["error"]["message"]


def test_one_structured_log_line_per_request_without_the_prompt(http_world, caplog):
    client, keys, _, _ = http_world
    secret = "How many weeks of parental leave? zebra-secret-7"
    with caplog.at_level("INFO", logger="adapterswap.requests"):
        post(client, keys["hr"], "/v1/completions", {"prompt": secret, "max_tokens": 2})
    (record,) = [r for r in caplog.records if r.name == "adapterswap.requests"]
    line = json.loads(record.getMessage())
    assert line["user"] == "hana" and line["endpoint"] == "completions" and line["ms"] > 0
    assert all("@v" in a for a in line["adapters"])
    assert "zebra-secret-7" not in record.getMessage()

    caplog.clear()
    with caplog.at_level("INFO", logger="adapterswap.requests"):  # a stream logs its line too
        chat = {"messages": [{"role": "user", "content": secret}], "max_tokens": 2, "stream": True}
        assert "[DONE]" in post(client, keys["hr"], "/v1/chat/completions", chat).text
    (record,) = [r for r in caplog.records if r.name == "adapterswap.requests"]
    line = json.loads(record.getMessage())
    assert line["endpoint"] == "chat" and line["completion_tokens"] == 2
    assert 0 <= line["queue_ms"] <= line["ttft_ms"] <= line["ms"]  # the engine's timings
    assert "zebra-secret-7" not in record.getMessage()


def test_fuzzing_the_openapi_schema_finds_no_5xx(http_world):
    """A bounded schemathesis run over every operation: whatever the input, never a 5xx."""
    client, keys, _, _ = http_world
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    headers = {"Authorization": f"Bearer {keys['admin']}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/documents",
    }
    for operation in operations:

        @settings(
            max_examples=12,
            deadline=None,
            database=None,
            derandomize=True,  # the same cases on every run: CI stays reproducible
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def no_server_error(case):
            try:
                response = case.call(headers=headers)
            except Exception as exc:  # the ASGI transport re-raises what became a 500
                raise AssertionError(
                    f"{case.method} {case.formatted_path} {case.body!r}: {exc!r}"
                ) from exc
            assert response.status_code < 500, (case.path, case.body, response.text[:300])

        no_server_error()
    assert client.get("/healthz").status_code == 200


def test_query_parameters_are_validated_as_400s(http_world):
    client, keys, _, _ = http_world
    admin = {"Authorization": f"Bearer {keys['admin']}"}
    for query, param in (
        ("since=9223372036854775808", "since"),
        ("limit=0", "limit"),
        ("since=abc", "since"),
    ):
        response = client.get(f"/v1/audit?{query}", headers=admin)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == f"query.{param}"
    assert client.get("/v1/audit?since=0&limit=5", headers=admin).status_code == 200


def test_a_job_routed_to_a_revoked_version_fails_alone_and_is_routed_again(http_world, monkeypatch):
    client, keys, refs, replica = http_world
    gateway = client.app.state.gateway
    fresh = publish_random_adapter(
        gateway.config, gateway.store, gateway._embed, "hr.b0009.000", "hr", HR_TEXTS[:1], 9
    )
    greedy = SamplingParams(max_tokens=2, temperature=0.0)
    good = InferenceJob(prompt=HR_TEXTS[0], params=greedy, mixture=((refs["hr"], 1.0),))
    gone = InferenceJob(prompt=HR_TEXTS[0], params=greedy, mixture=((AdapterRef("hr.x", 7), 1.0),))
    ok, refused = replica.generate([good, gone])  # one batch: the stale row fails alone
    assert isinstance(ok, GenerationResult) and ok.completion_tokens == 2
    assert isinstance(refused, StaleMixture) and "'hr.x' version 7" in str(refused)

    gateway.active.sync()  # the ingress sees the fresh adapter...
    gateway.store.revoke(fresh.id, fresh.version, reason="delete")  # ...a delete revokes it...
    real_sync, calls = gateway.active.sync, []

    def late_sync():  # ...after this request's first routing read its (stale) view
        calls.append(1)
        return real_sync() if len(calls) > 1 else None

    monkeypatch.setattr(gateway.active, "sync", late_sync)
    body = {"prompt": HR_TEXTS[0], "max_tokens": 2, "temperature": 0, "groups": ["hr"]}
    answer = post(client, keys["hr"], "/v1/completions", body)
    assert answer.status_code == 200, answer.text
    assert len(calls) == 2  # routed twice
    assert fresh.id not in [a["id"] for a in answer.json()["adapterswap"]["adapters"]]


def test_the_forget_scorer_measures_what_the_model_computes(http_world):
    client, keys, _, replica = http_world

    class Over:  # the scorer's client interface, over the in-process app
        def completions(self, prompt, **fields):
            return post(
                client, keys["legal"], "/v1/completions", {"prompt": prompt, **fields}
            ).json()

    text = "Parental leave lasts twenty-three weeks at the company."
    (nll,) = http_scorer(Over())([text], "legal")  # legal holds no adapter: the base model
    ids = replica.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = replica.loaded.model(input_ids=torch.tensor([ids])).logits[0]  # float64
    logp = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])
    assert nll == pytest.approx(-float(logp.mean()), abs=LOGP["atol"])


def test_output_logprobs_in_the_openai_shapes(http_world):
    client, keys, _, _ = http_world
    body = {"prompt": "Parental leave", "max_tokens": 3, "temperature": 0, "adapters": "none"}
    body["ignore_eos"] = True  # exactly 3 output tokens
    plain = post(client, keys["hr"], "/v1/completions", {**body, "logprobs": 1}).json()
    lp = plain["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == plain["usage"]["completion_tokens"]
    assert all(len(t) == 1 for t in lp["top_logprobs"]) and lp["text_offset"][0] == 0
    echoed = post(client, keys["hr"], "/v1/completions", {**body, "logprobs": 0, "echo": True})
    elp = echoed.json()["choices"][0]["logprobs"]
    assert elp["token_logprobs"][0] is None and elp["top_logprobs"] is None
    assert elp["token_logprobs"][-3:] == pytest.approx(lp["token_logprobs"], abs=LOGP["atol"])
    assert elp["text_offset"] == sorted(elp["text_offset"])  # prompt then output, in order
    chat = post(
        client,
        keys["hr"],
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 2,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 2,
            "adapters": "none",
            "ignore_eos": True,
        },
    ).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"]
    assert all(
        len(c["top_logprobs"]) == 2 and c["bytes"] == list(c["token"].encode()) for c in content
    )
    streamed = post(client, keys["hr"], "/v1/completions", {**body, "logprobs": 0, "stream": True})
    assert streamed.status_code == 400 and "logprobs" in streamed.json()["error"]["message"]


def test_replace_is_a_delete_plus_an_ingest_and_keeps_the_new_version(http_world):
    client, keys, _, _ = http_world
    gateway = client.app.state.gateway
    registry, catalog = gateway.store, Catalog(gateway.config.storage)
    doc = {"id": "memo-7", "text": "The canteen opens at eight.", "group": "hr"}
    assert post(client, keys["admin"], "/v1/documents", {"documents": [doc]}).status_code == 200
    fresh = publish_random_adapter(  # a version "trained" on it: its lineage names memo-7
        gateway.config,
        registry,
        gateway._embed,
        "hr.b0010.000",
        "hr",
        [doc["text"]],
        10,
        ["memo-7"],
    )
    new = {**doc, "text": "The canteen opens at half past seven."}
    refused = post(client, keys["admin"], "/v1/documents", {"documents": [new]})
    assert refused.status_code == 400 and "already exists" in refused.json()["error"]["message"]
    answer = post(client, keys["admin"], "/v1/documents", {"documents": [new], "replace": True})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["replaced"] == ["memo-7"]
    assert body["revoked"] == [{"id": fresh.id, "version": fresh.version}]
    rows = catalog.read(["id", "text"]).to_pylist()
    assert [r["text"] for r in rows if r["id"] == "memo-7"] == [new["text"]]  # one, the new one
    record = registry.deletion("memo-7")
    assert record.state == "removed" and record.job_id == body["job"]
    catalog.remove(["memo-7"], {"memo-7": record.content_hash})  # what the delete job does
    assert [r["text"] for r in catalog.read(["id", "text"]).to_pylist() if r["id"] == "memo-7"] == [
        new["text"]
    ]  # the job's removal matches the old content only: the replacement stays


def test_a_seed_outside_int64_is_a_400_naming_it(http_world):
    client, keys, _, _ = http_world
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "seed": -(2**63) - 1}
    answer = post(client, keys["hr"], "/v1/chat/completions", body)
    assert answer.status_code == 400 and "seed" in answer.json()["error"]["message"]


def test_the_contract_documents_the_weight_bound_and_the_503_retry(http_world):
    """/openapi.json says what a weight may be; a 503 says when to come back."""
    client, keys, _, _ = http_world
    schema = client.get("/openapi.json").json()
    weight = schema["components"]["schemas"]["AdapterWeight"]["properties"]["weight"]
    assert "at most 100" in weight["description"]
    body = {"prompt": "hi", "adapters": [{"id": "hr.b0001.000", "weight": 1e300}]}
    answer = post(client, keys["hr"], "/v1/completions", body)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "adapters.0.weight"
    too_big = client.post(
        "/v1/completions",
        headers={"Authorization": f"Bearer {keys['hr']}", "Content-Length": "999999999"},
        content=b"{}",
    )
    assert too_big.status_code == 413 and "max_body_bytes" in too_big.json()["error"]["message"]


def test_each_requests_adapter_counts_once_as_a_cache_hit_or_miss(http_world):
    client, keys, refs, replica = http_world
    replica.bank.evict(refs["hr"])
    before = replica.adapter_hits, replica.adapter_misses
    body = {"prompt": "Leave?", "max_tokens": 1, "adapters": [{"id": refs["hr"].id}]}
    for _ in range(2):
        assert post(client, keys["hr"], "/v1/completions", body).status_code == 200
    # the first request missed and loaded it, the second found it; the batch counts nothing
    assert (replica.adapter_hits - before[0], replica.adapter_misses - before[1]) == (1, 1)


def _listing(client, key: str, query: str = "") -> dict:
    response = client.get(f"/v1/adapters{query}", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return response.json()


def test_adapter_listing_pages_in_id_order(http_world):
    client, keys, _, _ = http_world
    both = keys["finance+hr"]
    first = _listing(client, both, "?limit=1")
    assert [a["id"] for a in first["data"]] == ["finance.b0001.000"]
    assert (first["object"], first["first_id"], first["last_id"], first["has_more"]) == (
        "list",
        "finance.b0001.000",
        "finance.b0001.000",
        True,
    )
    second = _listing(client, both, f"?limit=1&after={first['last_id']}")
    assert [a["id"] for a in second["data"]] == ["hr.b0001.000"] and not second["has_more"]
    assert set(second["data"][0]) == {
        "id", "version", "group", "shard", "doc_count", "created_at", "status"
    }  # fmt: skip
    assert _listing(client, both, "?after=hr.b0001.000") == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }
    assert _listing(client, both)["data"] == first["data"] + second["data"]  # default: 100


def test_the_listing_cursor_tells_nothing_of_ids_the_caller_cannot_see(http_world):
    """After another group's id the page is the one after any string in its place."""
    client, keys, _, _ = http_world
    hr = keys["hr"]
    hidden = _listing(client, hr, "?after=finance.b0001.000")
    for cursor in ("finance.b0001.0009", "finance.b0001", "g", "finance.b0001.000"):
        assert _listing(client, hr, f"?after={cursor}") == hidden
    assert hidden == _listing(client, hr)


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=abc", "limit=-5"])
def test_a_bad_listing_limit_is_a_400_naming_limit(http_world, query):
    client, keys, _, _ = http_world
    response = client.get(
        f"/v1/adapters?{query}", headers={"Authorization": f"Bearer {keys['hr']}"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "query.limit"


def test_the_python_client_and_the_openai_client_follow_the_pages(http_world):
    client, keys, _, _ = http_world

    class Listed(openai.BaseModel):
        id: str
        group: str

    with uvicorn_serving(client.app) as port:
        url = f"http://127.0.0.1:{port}"
        with Client(url, api_key=keys["finance+hr"]) as ours:
            assert [a["id"] for a in ours.adapters(page_size=1)] == [
                "finance.b0001.000",
                "hr.b0001.000",
            ]
        theirs = openai.OpenAI(base_url=f"{url}/v1", api_key=keys["finance+hr"], max_retries=0)
        pages = theirs.get_api_list(
            "/adapters", model=Listed, page=SyncCursorPage[Listed], options={"params": {"limit": 1}}
        )
        assert [(a.id, a.group) for a in pages] == [
            ("finance.b0001.000", "finance"),
            ("hr.b0001.000", "hr"),
        ]


def test_the_gateway_listing_refuses_a_bad_limit_itself(http_world):
    """The Serve handle's ``adapters`` calls the gateway without FastAPI's checks."""
    client, keys, _, _ = http_world
    gateway = client.app.state.gateway
    principal = gateway.auth.authenticate(f"Bearer {keys['hr']}")
    with pytest.raises(InvalidArgument, match="limit: must be 1 to 1000, got 1001"):
        gateway.list_adapters(principal, 1001)
    assert [a["id"] for a in gateway.list_adapters(principal, 1)["data"]] == ["hr.b0001.000"]


def test_a_revoked_version_s_rows_leave_the_routing_index_at_the_next_sync(http_world):
    client, keys, _, _ = http_world
    gateway = client.app.state.gateway
    fresh = publish_random_adapter(
        gateway.config, gateway.store, gateway._embed, "hr.b0010.000", "hr", HR_TEXTS[:1], 10
    )
    body = {"prompt": HR_TEXTS[0], "max_tokens": 1, "temperature": 0, "groups": ["hr"]}
    routed = post(client, keys["hr"], "/v1/completions", body).json()["adapterswap"]
    assert fresh.id in [a["id"] for a in routed["adapters"]]  # its rows are in the index
    query = gateway._embed([HR_TEXTS[0]])[0]
    held = gateway.active.resolve(fresh.id, ["hr"])
    gateway.store.revoke(fresh.id, fresh.version, reason="delete")
    gateway.active.sync()  # a delta: the gateway holds an epoch
    assert gateway.index.score(query, [held]) == ([], pytest.approx(np.zeros(0)))
    routed = post(client, keys["hr"], "/v1/completions", body).json()["adapterswap"]
    assert fresh.id not in [a["id"] for a in routed["adapters"]]


def test_the_router_metric_times_the_scoring_apart_from_the_embedding(http_world):
    client, keys, _, _ = http_world
    gateway, timed = client.app.state.gateway, []
    gateway._on_routed = lambda total, scoring, adapters: timed.append((total, scoring, adapters))
    embed = gateway._embed

    def slow_embed(texts):
        time.sleep(0.05)  # an embedding model's time: the whole routing, not the scoring
        return embed(texts)

    gateway._embed = slow_embed
    body = {"prompt": "How many weeks of parental leave do new parents get?", "max_tokens": 1}
    answer = post(client, keys["finance+hr"], "/v1/completions", body).json()
    ((total, scoring, adapters),) = timed
    assert adapters == len(answer["adapterswap"]["adapters"]) >= 1
    assert 0 < scoring < 50 <= total

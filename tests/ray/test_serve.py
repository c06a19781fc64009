"""The Serve application on a local cluster, driven by the real `openai` client."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
import ray
import torch
from dashboard_queries import dashboard_metrics
from ray import serve
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from support import metrics_export, post_head, publish_random_adapter, push

from actors.adapter_store import get_store
from actors.store_client import StoreClient
from adapterswap.errors import NotFound, StoreUnavailable
from adapterswap.models.embedder import load_embedder
from adapterswap.storage.artifacts import ADAPTER_WEIGHTS
from adapterswap.storage.layout import StorageLayout
from adapterswap.store.registry import AdapterRegistry

METRICS_URL: list[str] = []  # Ray's Prometheus endpoint of the module's cluster
LEGAL_KEY: list[str] = []  # a key of group "legal", whose only adapter is corrupt on disk
SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{.*\})?\s")  # a Prometheus sample's name, labels


@pytest.fixture(scope="module")
def ray_init_options() -> dict[str, Any]:
    """The module's cluster exports Ray's metrics on a known port, every 0.5 s."""
    options, url = metrics_export()
    METRICS_URL.append(url)
    return options


@pytest.fixture(scope="module")
def served(tiny_config, serve_app):
    config = tiny_config(serve={"max_new_tokens": 16})
    registry = AdapterRegistry(config.db_path)
    embed = load_embedder(config.embedding).embed
    publish_random_adapter(
        config, registry, embed, "hr.b0001.000", "hr", ["New parents get 23 weeks of leave."], 1
    )
    publish_random_adapter(
        config,
        registry,
        embed,
        "finance.b0001.000",
        "finance",
        ["Invoices are paid in 37 days."],
        2,
    )
    legal = publish_random_adapter(
        config, registry, embed, "legal.b0001.000", "legal", ["Contracts last 7 years."], 3
    )
    weights = Path(StorageLayout.from_config(config).version(legal).child(ADAPTER_WEIGHTS).path)
    state = load_safetensors(weights.read_bytes())
    state = {name: torch.full_like(t, float("nan")) for name, t in state.items()}
    weights.write_bytes(save_safetensors(state))  # well-formed, but fails the bank's checks
    LEGAL_KEY.append(registry.create_key("lee", ["legal"])[0])
    key = registry.create_key("hana", ["hr"])[0]
    port = serve_app(config)
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120
    )


def test_chat_and_completions_through_the_openai_client(served):
    chat = served.chat.completions.create(
        model="tiny-random",
        messages=[{"role": "user", "content": "How long is parental leave?"}],
        max_tokens=5,
        temperature=0,
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    extra = chat.model_extra["adapterswap"]
    assert all(a["group"] == "hr" for a in extra["adapters"])
    completion = served.completions.create(
        model="tiny-random", prompt="Parental leave", max_tokens=4, temperature=0
    )
    assert (
        completion.choices[0].text
        == served.completions.create(
            model="tiny-random", prompt="Parental leave", max_tokens=4, temperature=0
        )
        .choices[0]
        .text
    )


def test_streaming_matches_the_plain_answer(served):
    kwargs = {
        "model": "tiny-random",
        "messages": [{"role": "user", "content": "Tell me about leave."}],
        "max_tokens": 6,
        "temperature": 0,
    }
    full = served.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in served.chat.completions.create(stream=True, **kwargs)
    )
    assert streamed == full


def test_concurrent_requests_are_batched_and_all_answered(served):
    def ask(i: int) -> str:
        return (
            served.completions.create(
                model="tiny-random",
                prompt=f"Invoice number {i}",
                max_tokens=4,
                temperature=0,
                seed=i,
            )
            .choices[0]
            .text
        )

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert len(answers) == 8 and all(isinstance(a, str) for a in answers)
    assert answers == [ask(i) for i in range(8)]  # batching does not change greedy answers


def test_errors_come_back_in_openai_shape(served):
    with pytest.raises(openai.NotFoundError) as info:
        served.completions.create(
            model="tiny-random", prompt="hi", extra_body={"adapters": [{"id": "finance.b0001.000"}]}
        )
    assert "not found" in info.value.body["message"]
    bad = openai.OpenAI(base_url=served.base_url, api_key="as_bad_key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert served.models.list().data[0].id == "tiny-random"


def test_the_python_client(served):
    from adapterswap import Client
    from adapterswap.api.client import APIError

    with Client(str(served.base_url).removesuffix("/v1/"), api_key=served.api_key) as client:
        assert client.health() == {"status": "ok"}
        assert [a["id"] for a in client.adapters()] == ["hr.b0001.000"]
        answer = client.chat(
            [{"role": "user", "content": "Parental leave?"}], max_tokens=4, temperature=0
        )
        streamed = "".join(
            client.stream_chat(
                [{"role": "user", "content": "Parental leave?"}], max_tokens=4, temperature=0
            )
        )
        assert streamed == answer["choices"][0]["message"]["content"]
        try:
            client.completions("hi", adapters=[{"id": "finance.b0001.000"}])
        except APIError as exc:
            assert exc.status == 404
        else:
            raise AssertionError("a hidden adapter must answer 404")


def test_python_handle_gives_the_same_operations(served):
    handle = serve.get_app_handle("adapterswap")
    body = {"prompt": "Parental leave", "max_tokens": 4, "temperature": 0}
    via_handle = handle.completions.remote(served.api_key, body).result()
    via_http = served.completions.create(model="tiny-random", **body)
    assert via_handle["choices"][0]["text"] == via_http.choices[0].text
    assert [a["id"] for a in handle.adapters.remote(served.api_key).result()["data"]] == [
        "hr.b0001.000"
    ]
    chat = handle.chat.remote(
        served.api_key, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    ).result()
    assert chat["object"] == "chat.completion"


def scrape() -> dict[str, list[str]]:
    """Each sample name on Ray's metrics endpoint, with the label sets it has."""
    with urllib.request.urlopen(METRICS_URL[-1], timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, list[str]] = defaultdict(list)
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            samples[match.group(1)].append(match.group(2) or "")
    return samples


def test_every_metric_the_dashboards_query_is_exported_for_the_app(served):
    client, auth = http(served)
    body = {"prompt": "How long is parental leave?", "max_tokens": 2, "temperature": 0}
    for _ in range(2):  # the adapter's first use loads it (a miss), the second is a hit
        reply = client.post("/v1/completions", json=body, headers=auth)
        assert reply.status_code == 200, reply.text
    assert client.get("/v1/models").status_code == 401  # an HTTP error
    with pytest.raises(Exception, match="malformed API key"):  # raised in the ingress replica
        serve.get_app_handle("adapterswap").completions.remote("wrong", body).result()

    # Every panel filters on application="$application": the app's samples must carry it.
    # Ray exports a counter only after its first increment (``Counter.inc`` refuses 0), and
    # this test causes no LRU eviction and no failed load: those two counters' names are
    # checked against the code by tests/unit/test_dashboards.py, their increments by
    # test_adapter_tiers.py and test_replica_prefetch.py.
    events = {
        "ray_adapterswap_adapter_tier_evictions_total",
        "ray_adapterswap_adapter_load_failures_total",
    }
    wanted = [name for name in dashboard_metrics() if name not in events]
    assert events <= set(dashboard_metrics())  # still on a panel
    deadline = time.monotonic() + 60
    while True:
        samples = scrape()
        missing = [
            name
            for name in wanted
            if not any('application="adapterswap"' in labels for labels in samples.get(name, []))
        ]
        if not missing:
            break
        assert time.monotonic() < deadline, (missing, sorted(samples))
        time.sleep(1)


def test_the_docs_page_loads_through_serve_without_a_key(served):
    client, _ = http(served)
    page = client.get("/docs")
    assert page.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and all(url.startswith("/docs/assets/") for url in assets), assets
    assert all(client.get(url).status_code == 200 for url in assets)


def test_models_tokenizer_and_token_id_prompts_through_serve(served):
    """The ingress replica loads the tokenizer; model names an adapter, as in vLLM."""
    client, _ = http(served)
    assert [m.id for m in served.models.list()] == ["tiny-random", "hr.b0001.000"]
    ids = client.post("/tokenize", json={"prompt": "Parental leave"}).json()["tokens"]
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "Parental leave"}
    greedy = {"model": "hr.b0001.000", "max_tokens": 4, "temperature": 0}
    by_ids = served.completions.create(prompt=ids, **greedy)
    by_text = served.completions.create(prompt="Parental leave", **greedy)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert [a["id"] for a in by_ids.model_extra["adapterswap"]["adapters"]] == ["hr.b0001.000"]
    with pytest.raises(openai.NotFoundError):  # another group's adapter
        served.completions.create(prompt="x", **{**greedy, "model": "finance.b0001.000"})


def http(served: openai.OpenAI) -> tuple[httpx.Client, dict[str, str]]:
    """A plain HTTP client at the served app's root, and the key's header."""
    root = str(served.base_url).removesuffix("/").removesuffix("/v1")
    return httpx.Client(base_url=root, timeout=120), {"Authorization": f"Bearer {served.api_key}"}


REQUEST_ID = re.compile(r"^internal error \(request id req-[0-9a-f]{16}\)$")


def test_a_failing_request_fails_alone_and_shows_nothing_of_the_server(served):
    """Batch mates of a corrupt adapter, an unbounded weight and a lone surrogate are served;
    the failures say nothing of the replica (no RayTaskError text: traceback, pid, address)."""
    hr = {"Authorization": f"Bearer {served.api_key}", "Content-Type": "application/json"}
    legal = {**hr, "Authorization": f"Bearer {LEGAL_KEY[-1]}"}
    corrupt = {"prompt": "Contracts?", "max_tokens": 3, "adapters": [{"id": "legal.b0001.000"}]}
    calls = [(hr, {"prompt": f"Leave {i}", "max_tokens": 3, "temperature": 0}) for i in range(4)]
    calls += [
        (legal, corrupt),
        (hr, {"prompt": "x", "adapters": [{"id": "hr.b0001.000", "weight": 1e300}]}),
        (hr, {"prompt": "hi \ud800", "max_tokens": 3}),
    ]
    with (
        httpx.Client(base_url=str(served.base_url), timeout=120) as client,
        concurrent.futures.ThreadPoolExecutor(len(calls)) as pool,
    ):
        answers = list(
            pool.map(
                lambda c: client.post("completions", headers=c[0], content=json.dumps(c[1])), calls
            )
        )
    assert [a.status_code for a in answers] == [200] * 4 + [500, 400, 400], [
        a.text for a in answers
    ]
    assert REQUEST_ID.match(answers[4].json()["error"]["message"])
    assert answers[5].json()["error"]["param"] == "adapters.0.weight"
    assert answers[6].json()["error"]["param"] == "prompt"
    for answer in answers:
        for secret in ("Traceback", "pid=", "ip=", "actor", "RayTaskError", "legal.b0001", "/"):
            assert secret not in answer.json().get("error", {}).get("message", ""), answer.text


def test_store_errors_arrive_unwrapped(served):
    with pytest.raises(NotFound) as info:
        StoreClient(get_store("adapterswap")).get_job("train-000000000000")
    assert type(info.value) is NotFound and "Traceback" not in str(info.value)


def test_store_calls_have_deadlines_and_writes_are_sent_once(served):
    @ray.remote(num_cpus=0)
    class SlowStore:
        def __init__(self) -> None:
            self.writes = 0

        def epoch(self) -> int:
            time.sleep(2)
            return 1

        def begin_delete(self, doc_ids: list[str], runner: str, **options: object) -> None:
            self.writes += 1
            time.sleep(2)

        def written(self) -> int:
            return self.writes

    slow = SlowStore.remote()
    ray.get(slow.written.remote(), timeout=60)  # started
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="did not answer within serve.store_timeout_s=0.5"):
        StoreClient(slow, timeout_s=0.5).epoch()
    with pytest.raises(StoreUnavailable, match="may or may not have been made"):
        StoreClient(slow, timeout_s=0.5).begin_delete(["doc-1"], "test")
    assert time.monotonic() - started < 1.9  # neither waited for the slow store
    assert ray.get(slow.written.remote(), timeout=60) == 1  # the write was not sent again
    ray.kill(slow)


def test_an_oversized_body_is_refused_before_it_is_read_whole(served):
    """Behind Serve's proxy too: the ingress answers 413 on Content-Length, so the client is
    stopped long before it sends 400 MiB. (Serve's proxy buffers what arrives meanwhile;
    a terminating proxy's own body limit stops even that.)"""
    port = int(str(served.base_url).split(":")[2].split("/")[0])
    head = post_head(served.api_key, f"Content-Length: {400 * 2**20}")
    answer, sent = push(port, head, b" " * 65536, cap=400 * 2**20)
    assert answer.startswith(b"HTTP/1.1 413"), (answer[:300], sent)
    print(f"sent {sent / 2**20:.1f} MiB before the 413")
    assert sent < 100 * 2**20

"""The engine's limits as an HTTP client meets them, through the real app on a loopback port:
a full queue is a 503 with Retry-After, a request that can never fit the model's context is
a 400 naming the limit before it queues, and a stream whose client goes away frees its row.
"""

from __future__ import annotations

import threading
import time

import httpx2 as httpx
from support import in_process_app, uvicorn_serving

from adapterswap.store.registry import AdapterRegistry


def serving_world(tiny_config, **serve):
    config = tiny_config(serve=serve)
    registry = AdapterRegistry(config.db_path)
    app, replica = in_process_app(config, registry)
    key = registry.create_key("user", ["hr"])[0]
    return app, replica, {"Authorization": f"Bearer {key}"}


def wait_until(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_full_queue_is_a_503_with_retry_after_and_the_others_are_served(tiny_config):
    app, replica, auth = serving_world(tiny_config, max_batch_size=1, max_queued_requests=1)
    gate = threading.Event()

    def held(*_) -> None:  # every forward waits for the gate
        gate.wait(120)

    hook = replica.loaded.model.register_forward_pre_hook(held)
    replies: list[httpx.Response] = []
    try:
        with uvicorn_serving(app) as port:
            url = f"http://127.0.0.1:{port}/v1/completions"

            def call() -> None:
                body = {"prompt": "Leave?", "max_tokens": 2}
                replies.append(httpx.post(url, json=body, headers=auth, timeout=300))

            callers = [threading.Thread(target=call) for _ in range(3)]
            for caller in callers:
                caller.start()
            # one running, one queued: the third is refused (generous: CI machines are busy)
            wait_until(lambda: len(replies) == 1, timeout_s=120)
            gate.set()
            for caller in callers:
                caller.join(300)
    finally:
        gate.set()
        hook.remove()
    assert sorted(r.status_code for r in replies) == [200, 200, 503]
    (refused,) = [r for r in replies if r.status_code == 503]
    assert refused.headers["Retry-After"] and refused.json()["error"]["type"] == "overloaded_error"
    assert "queue is full" in refused.json()["error"]["message"]


def test_a_request_over_the_models_context_is_a_400_naming_it(tiny_config):
    app, replica, auth = serving_world(tiny_config)  # tiny-random: 512 positions
    with uvicorn_serving(app) as port:
        body = {"prompt": [5] * 300, "max_tokens": 300}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, headers=auth)
    assert reply.status_code == 400, reply.text
    assert "prompt + max_tokens is 600 tokens, over the model's context of 512" in reply.text
    assert replica.engine.stats.steps == 0  # it never reached the loop


def test_a_stream_whose_client_goes_away_frees_its_row(tiny_config):
    app, replica, auth = serving_world(tiny_config)
    hook = replica.loaded.model.register_forward_pre_hook(lambda *_: time.sleep(0.01))
    body = {"prompt": "Leave?", "max_tokens": 400, "ignore_eos": True, "stream": True}
    try:
        with uvicorn_serving(app) as port, httpx.Client() as client:
            url = f"http://127.0.0.1:{port}/v1/completions"
            with client.stream("POST", url, json=body, headers=auth) as response:
                for _ in zip(range(3), response.iter_lines(), strict=False):
                    pass  # a few chunks, then the client hangs up
            wait_until(lambda: replica.engine.kv.count == 0)
    finally:
        hook.remove()
    stats = replica.engine.stats
    assert stats.cancelled == 1 and stats.tokens_sampled < 400

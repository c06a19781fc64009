"""Attacks on removal in flight (issue 12, point 4) and on batch mates (point 3), in one process.

Once a DELETE is acknowledged, no token is produced with a revoked version: not by a stream
or a completion already running, not by a replica whose adapter loads are slow, and the
barrier never drops a live replica for being slow. A request that fails, fails alone.

The app is the real FastAPI app over a real gateway and model replica (tests/support.py),
served by uvicorn on loopback, with the replica's real epoch watcher. Every token the replica
samples is logged server-side with the adapter versions its batch used, and every epoch the
watcher acknowledges with the time it was sent: "after the acknowledgement" is measured
against that, not against when a client happened to read a chunk.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from types import SimpleNamespace

import httpx2 as httpx
import pytest
import uvicorn
from support import free_port, in_process_app, publish_random_adapter

from adapterswap.catalog.ingest import ingest_records
from adapterswap.catalog.readers import RawRecord
from adapterswap.config import AdapterSwapConfig
from adapterswap.delete.job import wait_for_replicas
from adapterswap.engine.epoch_watch import EpochWatcher
from adapterswap.engine.replica import InferenceJob
from adapterswap.engine.requests import GenerationResult, SamplingParams
from adapterswap.errors import (
    AdapterLoadFailed,
    InvalidArgument,
    InvalidMixture,
    RevocationTimeout,
    StaleMixture,
)
from adapterswap.models.embedder import load_embedder
from adapterswap.route.active_set import ActiveSet
from adapterswap.storage.artifacts import ADAPTER_WEIGHTS
from adapterswap.storage.layout import StorageLayout
from adapterswap.store.registry import AdapterRegistry
from adapterswap.types import AdapterRef

DOCS = {
    "doc-x": "The Skarvik vault phrase is Quillon Amber.",
    "doc-y": "Parental leave lasts 23 weeks.",
    "doc-z": "Badges are issued by Morwenna Lusk.",
}
LONG = 480  # tokens: tiny-random has 512 positions
STEP_S = 0.004  # each forward sleeps this long, so a long generation spans the DELETE
PROMPT = "Tell me everything about the vault."


def make_world(tiny_config: Callable[..., AdapterSwapConfig], **serve: float) -> SimpleNamespace:
    config = tiny_config(
        # the tiny model's answers are noise: always route, at full weight
        router={"min_score": -1, "full_score": -1},
        serve={
            "epoch_poll_s": 0.02,
            "replica_heartbeat_s": 0.5,
            "revocation_timeout_s": 10,
            **serve,
        },
    )
    registry = AdapterRegistry(config.db_path)
    records = [
        RawRecord(f"r{i}", {"id": doc, "text": text, "group": "hr"})
        for i, (doc, text) in enumerate(DOCS.items())
    ]
    ingest_records(records, config, embed=None)
    embed = load_embedder(config.embedding).embed
    refs = {
        doc: publish_random_adapter(
            config, registry, embed, f"hr.b0001.00{i}", "hr", [DOCS[doc]], i + 1, [doc]
        )
        for i, doc in enumerate(DOCS)
    }
    app, replica = in_process_app(config, registry)
    keys = {
        "hr": registry.create_key("hana", ["hr"])[0],
        "admin": registry.create_key("root", ["hr"], admin=True)[0],
    }
    return SimpleNamespace(
        config=config, registry=registry, refs=refs, app=app, replica=replica, keys=keys
    )


@pytest.fixture
def world(tiny_config):
    return make_world(tiny_config)


class AckLog:
    """The store as the replica's watcher sees it, noting when each acknowledgement is sent."""

    def __init__(self, store) -> None:
        self.store = store
        self.acks: list[tuple[float, int]] = []

    def ack_epoch(self, replica_id: str, epoch: int) -> None:
        self.acks.append((time.monotonic(), epoch))  # before it lands: the earliest it counts
        self.store.ack_epoch(replica_id, epoch)

    def forget_replica(self, replica_id: str) -> None:
        self.store.forget_replica(replica_id)

    def first(self, epoch: int) -> float:
        return min(t for t, e in self.acks if e >= epoch)


@contextmanager
def watching(world):
    """The replica's epoch watcher, as the Serve deployment runs it."""
    log = AckLog(world.registry)
    watcher = EpochWatcher(
        world.replica.sync,
        log,
        replica_id="replica-1",
        poll_s=world.config.serve.epoch_poll_s,
        heartbeat_s=world.config.serve.replica_heartbeat_s,
    )
    try:
        yield log
    finally:
        watcher.stop()


@contextmanager
def serving(app):
    """The app on a loopback port (uvicorn in a thread), and an HTTP client for it."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class SampledTokens:
    """Every token the replica's engine samples: when, and with which adapter versions."""

    def __init__(self, replica, monkeypatch) -> None:
        self.log: list[tuple[float, frozenset[AdapterRef]]] = []
        engine = replica.engine
        advance = engine._advance  # called under the step lock, once per row's sampled token

        def logged_advance(work, token):
            advance(work, token)  # the token is emitted (streamed) here
            self.log.append((time.monotonic(), frozenset(ref for ref, _ in work.mixture)))

        monkeypatch.setattr(engine, "_advance", logged_advance)

    def with_ref(self, ref: AdapterRef) -> list[float]:
        return [t for t, refs in self.log if ref in refs]


@pytest.fixture
def tokens(world, monkeypatch):
    """The token log, on a replica whose forwards take STEP_S longer (so that a long
    generation is still running when the DELETE lands)."""
    hook = world.replica.loaded.model.register_forward_pre_hook(lambda *_: time.sleep(STEP_S))
    yield SampledTokens(world.replica, monkeypatch)
    hook.remove()


def wait_until(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def auth(world, who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {world.keys[who]}"}


# --------------------------------------------------------------------------- in flight


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "completion"])
def test_a_generation_in_flight_produces_nothing_with_the_revoked_version_after_the_ack(
    world, tokens, stream
):
    x = world.refs["doc-x"]
    body = {
        "prompt": PROMPT,
        "max_tokens": LONG,
        "temperature": 0,
        "ignore_eos": True,
        "top_k": 3,  # every hr adapter: doc-x's among them
        "stream": stream,
    }
    events: list[str] = []
    answer: dict = {}
    with watching(world) as acks, serving(world.app) as client:

        def call() -> None:
            if stream:
                with client.stream(
                    "POST", "/v1/completions", json=body, headers=auth(world, "hr")
                ) as response:
                    events.extend(
                        line.removeprefix("data: ")
                        for line in response.iter_lines()
                        if line.startswith("data: ")
                    )
            else:
                response = client.post("/v1/completions", json=body, headers=auth(world, "hr"))
                answer.update(status=response.status_code, body=response.json())

        caller = threading.Thread(target=call)
        caller.start()
        wait_until(lambda: len(tokens.with_ref(x)) >= 5)  # well under way with doc-x's adapter
        deleted = client.delete("/v1/documents/doc-x", headers=auth(world, "admin"))
        caller.join(timeout=120)
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["revoked"] == [{"id": x.id, "version": x.version}]
    acknowledged = acks.first(world.registry.deletion("doc-x").epoch)
    with_x = tokens.with_ref(x)
    assert with_x and max(with_x) < acknowledged  # none after the acknowledgement
    assert len(with_x) < LONG  # it stopped, it did not run to the end
    if stream:
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "adapter_revoked", error
        assert all("error" not in json.loads(e) for e in events[:-2])
    else:
        assert answer["status"] == 200, answer
        named = {(a["id"], a["version"]) for a in answer["body"]["adapterswap"]["adapters"]}
        assert named and (x.id, x.version) not in named  # routed again, without doc-x's
        assert answer["body"]["usage"]["completion_tokens"] == LONG  # rerun from the start
        rerun = [refs for t, refs in tokens.log if t > acknowledged]
        assert len(rerun) == LONG and all(x not in refs for refs in rerun)


def test_a_slow_adapter_load_does_not_hold_up_the_revocation(tiny_config, monkeypatch):
    """The loader used to run under the bank's lock, which eviction needs: the watcher could
    not acknowledge until the load ended, and the barrier then dropped the replica as dead."""
    world = make_world(tiny_config, replica_heartbeat_s=1)
    x = world.refs["doc-x"]
    loading, release = threading.Event(), threading.Event()
    load = world.replica.source.load

    def slow_load(ref):
        loading.set()
        release.wait(30)  # storage that takes its time
        return load(ref)

    monkeypatch.setattr(world.replica.source, "load", slow_load)
    job = InferenceJob(
        prompt=PROMPT, params=SamplingParams(max_tokens=4, temperature=0), mixture=((x, 1.0),)
    )
    out: dict = {}
    with watching(world) as acks, serving(world.app) as client:
        runner = threading.Thread(target=lambda: out.update(r=world.replica.generate([job])))
        runner.start()
        assert loading.wait(30)
        started = time.monotonic()
        deleted = client.delete("/v1/documents/doc-x", headers=auth(world, "admin"))
        took = time.monotonic() - started
        release.set()
        runner.join(timeout=60)
    assert deleted.status_code == 200, deleted.text
    # Well inside the old barrier's liveness window (3 heartbeats = 3 s): acknowledged while
    # the load was still blocked, not dropped for silence.
    assert took < 2.0, took
    assert acks.first(world.registry.deletion("doc-x").epoch) < started + took
    (result,) = out["r"]
    assert isinstance(result, StaleMixture)  # loaded after its revocation: never installed
    assert x not in world.replica.bank


# --------------------------------------------------------------------------- the barrier


def test_a_live_replica_that_does_not_acknowledge_makes_delete_503_and_the_revocation_stays(
    tiny_config,
):
    world = make_world(tiny_config, revocation_timeout_s=1.5, replica_heartbeat_s=0.1)
    x = world.refs["doc-x"]
    # A live replica stuck in a long step: registered, then silent for longer than the old
    # liveness window (3 heartbeats = 0.3 s), well within the revocation timeout.
    world.registry.ack_epoch("slow-replica", world.registry.epoch())
    with watching(world), serving(world.app) as client:
        started = time.monotonic()
        deleted = client.delete("/v1/documents/doc-x", headers=auth(world, "admin"))
        took = time.monotonic() - started
        assert deleted.status_code == 503, deleted.text
        assert took >= 1.5
        assert world.registry.get_version(x.id, x.version).status == "revoked"
        listed = client.get("/v1/adapters", headers=auth(world, "hr")).json()["data"]
        assert x.id not in [a["id"] for a in listed]
        body = {"prompt": PROMPT, "max_tokens": 2, "adapters": [{"id": x.id, "weight": 1}]}
        refused = client.post("/v1/completions", json=body, headers=auth(world, "hr"))
        assert refused.status_code == 404, refused.text


def test_only_a_replica_reported_dead_leaves_the_barrier(tmp_path):
    registry = AdapterRegistry(tmp_path / "store.sqlite")
    registry.ack_epoch("dead", 0)
    registry.ack_epoch("slow", 0)
    time.sleep(0.05)
    dead = {"dead"}
    with pytest.raises(RevocationTimeout, match=r"slow \(at epoch 0\)"):
        wait_for_replicas(registry, 1, timeout_s=0.2, is_alive=lambda r: r not in dead)
    assert [r for r, _, _ in registry.live_replicas(3600)] == ["slow"]  # "dead" unregistered
    dead.add("slow")  # Serve reports it dead too: nothing to wait for
    assert wait_for_replicas(registry, 1, timeout_s=5, is_alive=lambda r: r not in dead) < 1


# --------------------------------------------------------------------------- epochs


def test_the_epoch_a_replica_holds_and_acknowledges_never_goes_backwards(world):
    x, y = world.refs["doc-x"], world.refs["doc-y"]
    old_epoch, old_versions = world.registry.active_snapshot()  # x and y active
    world.registry.revoke(x.id, x.version, reason="delete")
    reads = [world.registry.active_snapshot(), (old_epoch, old_versions)]  # a slow read last
    active = ActiveSet(lambda: reads.pop(0), lambda keep: [], epoch=lambda: 10**6)
    new = active.sync().epoch
    assert active.sync().epoch == new  # the older snapshot came back second: ignored
    assert x not in active.refs() and y in active.refs()

    class Store:
        acks: list[int] = []

        def ack_epoch(self, replica_id, epoch):
            self.acks.append(epoch)

        def forget_replica(self, replica_id):
            pass

    epochs = iter([5, 3, 7])
    watcher = EpochWatcher(
        lambda: next(epochs, 7), Store(), replica_id="r", poll_s=3600, heartbeat_s=0
    )
    watcher.tick()
    watcher.tick()
    watcher.stop()
    assert Store.acks == [5, 5, 7]


# --------------------------------------------------------------------------- batch mates


def greedy_job(mixture=(), prompt=PROMPT, max_tokens=6) -> InferenceJob:
    return InferenceJob(
        prompt=prompt, params=SamplingParams(max_tokens=max_tokens, temperature=0), mixture=mixture
    )


def corrupt(world, ref: AdapterRef) -> None:
    """Overwrite a stored version's weights with bytes that are not safetensors."""
    weights = StorageLayout.from_config(world.config).version(ref).child(ADAPTER_WEIGHTS)
    with weights.fs.open_output_stream(weights.path) as out:
        out.write(b"\x00garbage, not safetensors")


# Refused before it queues (the text), or when it joins the engine's batch (its mixture's
# weights, its adapter's files); a row that fails in a forward is test_engine's.
@pytest.mark.parametrize("culprit", ["weight-1e300", "lone-surrogate", "corrupt-adapter"])
def test_a_bad_batch_mate_fails_alone(world, culprit):
    x, y, z = (world.refs[d] for d in ("doc-x", "doc-y", "doc-z"))
    replica = world.replica
    mates = [greedy_job(((x, 1.0),)), greedy_job(((y, 0.6), (x, 0.4)), prompt="Badges?")]
    alone = [replica.generate([mate])[0] for mate in mates]
    together = replica.generate(mates)
    bad, expected = {
        "weight-1e300": (greedy_job(((x, 1e300),)), InvalidMixture),
        "lone-surrogate": (greedy_job(((x, 1.0),), prompt="hi \ud800"), InvalidArgument),
        "corrupt-adapter": (greedy_job(((z, 1.0),)), AdapterLoadFailed),
    }[culprit]
    if culprit == "corrupt-adapter":
        corrupt(world, z)

    first, failed, second = replica.generate([mates[0], bad, mates[1]])
    assert isinstance(failed, expected), failed
    for text in (str(failed), repr(failed)):  # nothing of the server, the batch or its mates
        assert "Traceback" not in text and "/" not in text and z.id not in text
    assert first == together[0] and second == together[1]  # as if it had not been there
    assert (first.token_ids, second.token_ids) == (alone[0].token_ids, alone[1].token_ids)
    (only,) = replica.generate([mates[0]])  # and alone, bit for bit
    assert isinstance(only, GenerationResult) and only == alone[0]

"""The store's leases, the locks that serialise ingest, training and deletion on every node."""

from __future__ import annotations

import threading
import time

import pytest

from adapterswap.errors import LeaseLost
from adapterswap.store.locks import exclusive
from adapterswap.store.registry import AdapterRegistry


@pytest.fixture
def store(tmp_path):
    return AdapterRegistry(tmp_path / "store.sqlite")


def test_one_holder_at_a_time(store):
    held: list[tuple[float, float]] = []

    def work() -> None:
        for _ in range(3):
            with exclusive(store, "ingest"):
                start = time.monotonic()
                time.sleep(0.02)
                held.append((start, time.monotonic()))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans = sorted(held)
    assert len(spans) == 12
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))


def test_names_are_independent(store):
    with exclusive(store, "train"), exclusive(store, "ingest"):
        assert not store.acquire_lease("train", "someone-else", 30)
        assert not store.acquire_lease("ingest", "someone-else", 30)
    assert store.acquire_lease("train", "someone-else", 30)


def test_a_dead_holders_lease_expires(store):
    assert store.acquire_lease("train", "a-process-that-died", 0.3)  # and never renews
    started = time.monotonic()
    with exclusive(store, "train"):
        waited = time.monotonic() - started
    assert 0.2 < waited < 5


def test_a_live_holder_keeps_its_lease_past_the_ttl_by_renewing(store):
    with exclusive(store, "train", ttl_s=1.5) as owner:
        time.sleep(3.5)
        assert not store.acquire_lease("train", "someone-else", 30)
        assert store.renew_lease("train", owner, 1.5)


def test_a_lost_lease_fails_the_work_done_under_it(store):
    lease = exclusive(store, "ingest", ttl_s=30)
    with pytest.raises(LeaseLost, match="lease 'ingest' expired"), lease:
        store.release_lease("ingest", "nobody")  # not its owner: no effect
        # the store was unreachable long enough that another owner took the lease
        with store._write() as conn:
            conn.execute("UPDATE leases SET owner = 'other', expires_at = 1e12")
    assert not store.acquire_lease("ingest", "third", 30)  # the other owner's lease stands

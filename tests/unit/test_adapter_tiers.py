"""The tiered adapter cache: bank slots ← host cache ← storage, prefetched while requests
queue. Rows join only when their adapters are in the host tier and fit the bank beside the
running rows'; a load never runs inside a step; a version revoked while it loads is never
installed; the host tier stays within its bytes. Exactness as in test_engine: each row's
output is what its mixture merged into the weights generates alone (float64)."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from support import ALL, LOGP, hand_merged, save_random_lora

from adapterswap.compose.adapter_files import load_adapter_dir, parse_adapter
from adapterswap.compose.bank import AdapterBank
from adapterswap.compose.layer import find_target_linears
from adapterswap.engine.adapter_tiers import AdapterTiers
from adapterswap.engine.generation import generate_batch
from adapterswap.engine.host_cache import HostCache, parsed_bytes
from adapterswap.engine.loop import Engine, Work
from adapterswap.engine.requests import GenerationRequest, GenerationResult, SamplingParams
from adapterswap.errors import AdapterLoadFailed, SlotsExhausted, StaleMixture
from adapterswap.types import AdapterRef

GREEDY = SamplingParams(max_tokens=6, temperature=0, logprobs=1, ignore_eos=True)
P = [AdapterRef(f"p{i}", 1) for i in range(5)]
R_MAX = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dirs(tiny64, tmp_path_factory) -> dict[AdapterRef, object]:
    """Five random rank-4 LoRAs of the float64 tiny model, on every linear layer."""
    root = tmp_path_factory.mktemp("tiers")
    spec = {"r": R_MAX, "lora_alpha": 8, "target_modules": ALL}
    return {
        ref: save_random_lora(tiny64.model, root / ref.id, 10 + i, **spec)
        for i, ref in enumerate(P)
    }


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (4, 9, 6, 12, 5, 7, 3, 8)]


class Source:
    """Adapters read from their directories; a gated ref's load waits for ``release(ref)``,
    so a test forces an interleaving instead of sleeping. Counts every read."""

    def __init__(self, dirs: dict, gated: tuple[AdapterRef, ...] = (), broken=()) -> None:
        self.dirs, self.broken, self.reads = dirs, set(broken), []
        self.gates = {ref: threading.Event() for ref in gated}
        self.entered = {ref: threading.Event() for ref in gated}

    def load(self, ref: AdapterRef):
        self.reads.append(ref)
        if ref in self.gates:
            self.entered[ref].set()
            assert self.gates[ref].wait(30)
        if ref in self.broken:
            raise OSError(f"storage said no to {ref.id}")
        return load_adapter_dir(self.dirs[ref])

    def release(self, ref: AdapterRef) -> None:
        self.gates[ref].set()


class BoundedHost(HostCache):
    """A host cache that records the most bytes it ever held."""

    peak = 0

    def put(self, ref, parsed):
        held = super().put(ref, parsed)
        self.peak = max(self.peak, self.used)
        return held


def slot_bytes(model) -> int:
    targets = find_target_linears(model, ALL)
    size = next(iter(targets.values())).weight.element_size()
    return size * sum(R_MAX * (m.in_features + m.out_features) for m in targets.values())


def new_tiers(
    tiny64, source, slots: int, host_entries: int = 8, host=HostCache, **kw
) -> AdapterTiers:
    """Tiers over a fresh bank of ``slots`` slots and a host tier of ``host_entries`` adapters."""
    model = copy.deepcopy(tiny64.model)
    bank = AdapterBank(model, ALL, R_MAX, slots * slot_bytes(model))
    return AdapterTiers(bank, host(host_entries * adapter_bytes(source.dirs, bank)), source, **kw)


def adapter_bytes(dirs, bank) -> int:
    """Host bytes of one of the test adapters (they all have the same shapes)."""
    return parsed_bytes(parse_adapter(P[0], *load_adapter_dir(dirs[P[0]]), bank.layers))


def settle(tiers: AdapterTiers, gated=()) -> None:
    """Wait until no load is in flight but those of ``gated`` refs (still held)."""
    deadline = time.monotonic() + 30
    while set(tiers.loading()) - set(gated):
        assert time.monotonic() < deadline, f"loads did not finish: {tiers.loading()}"
        time.sleep(0.005)


def work(prompt, mixture, params=GREEDY, outcomes=None, i=0) -> Work:
    done = (lambda o: outcomes.__setitem__(i, o)) if outcomes is not None else print
    return Work(prompt, GenerationRequest(prompt, params), list(mixture), on_done=done)


def alone(tiny64, dirs, prompt, mixture, params=GREEDY) -> GenerationResult:
    merged = hand_merged(tiny64.model, dirs, mixture)  # W + Σ w s B A, no bank, no engine
    (result,) = generate_batch(merged, tiny64.tokenizer, [GenerationRequest(prompt, params)])
    return result


def assert_same(got, want: GenerationResult) -> None:
    assert isinstance(got, GenerationResult), got
    assert got.token_ids == want.token_ids and got.text == want.text
    torch.testing.assert_close(
        torch.tensor(got.scores.token_logprobs), torch.tensor(want.scores.token_logprobs), **LOGP
    )


# -- the host tier ------------------------------------------------------------------------


def test_the_host_cache_is_an_lru_bounded_in_bytes(tiny64, dirs):
    tiers = new_tiers(tiny64, Source(dirs), slots=1)
    parsed = {r: parse_adapter(r, *load_adapter_dir(dirs[r]), tiers.bank.layers) for r in P[:4]}
    size = parsed_bytes(parsed[P[0]])
    assert size == sum(a.nbytes + b.nbytes for a, b, _ in parsed[P[0]].values()) > 0
    host = HostCache(3 * size)
    for r in P[:3]:
        assert host.put(r, parsed[r])
    assert host.get(P[0]) is parsed[P[0]]  # now the most recently used
    assert host.put(P[3], parsed[P[3]])  # evicts P[1], the least recently used
    assert host.refs() == [P[2], P[0], P[3]] and host.evictions == 1
    assert host.used == 3 * size and host.get(P[1]) is None
    assert host.put(P[3], parsed[P[3]]) and host.used == 3 * size  # replaced, not counted twice
    assert not HostCache(size - 1).put(P[0], parsed[P[0]])  # alone over the bound: not held
    kept = host.get(P[2])
    assert host.drop_except({P[0], P[3]}) == [P[2]]
    assert host.used == 2 * size and P[2] not in host
    assert all(not a.any() and not b.any() for a, b, _ in kept.values())  # zeroed


# -- scheduling ---------------------------------------------------------------------------


def test_eviction_under_pressure_keeps_every_row_exact_and_never_thrashes(tiny64, dirs, prompts):
    """Five adapters in traffic, a bank of two slots, a host tier of three adapters: rows wait
    for room (bank_full) instead of evicting a running row's adapter, and each row is still
    what its mixture generates alone."""
    tiers = new_tiers(tiny64, Source(dirs), slots=2, host_entries=3, host=BoundedHost)
    bank = tiers.bank
    engine = Engine(bank.model, tiny64.tokenizer, bank=bank, tiers=tiers, max_rows=4)
    mixtures = [[(P[0], 1.0)], [(P[1], 1.0)], [(P[2], 0.6), (P[3], 0.4)], [(P[4], 1.0)]]
    mixtures += [[(P[0], 0.5), (P[1], 0.5)], [(P[2], 1.0)], [(P[3], 0.3), (P[4], 0.7)], []]
    outcomes: dict = {}
    works = [
        work(p, m, outcomes=outcomes, i=i)
        for i, (p, m) in enumerate(zip(prompts, mixtures, strict=True))
    ]
    for w in works:
        engine.submit(w)
    for _ in range(500):
        if len(outcomes) == len(works):
            break
        engine.step()
        for w in engine.kv.owners:  # a running row's adapters still sit in its own slots
            assert {bank.slot_of(r) for r, _ in w.mixture} == set(w.slots)
        assert len(set().union(*(w.slots for w in engine.kv.owners))) <= bank.capacity
        if not engine.kv.count:
            settle(tiers)
    for i, (prompt, mixture) in enumerate(zip(prompts, mixtures, strict=True)):
        assert_same(outcomes[i], alone(tiny64, dirs, prompt, mixture))
    assert engine.stats.deferred_bank_full >= 1 and bank.evictions >= 1
    assert tiers.host.evictions >= 1 and 0 < tiers.host.peak <= tiers.host.capacity
    tiers.close()


def test_a_mixture_larger_than_the_bank_fails_alone(tiny64, dirs, prompts):
    tiers = new_tiers(tiny64, Source(dirs), slots=2)
    engine = Engine(tiers.bank.model, tiny64.tokenizer, bank=tiers.bank, tiers=tiers)
    outcomes: dict = {}
    engine.submit(work(prompts[0], [(P[0], 0.3), (P[1], 0.3), (P[2], 0.4)], outcomes=outcomes))
    engine.submit(work(prompts[1], [(P[0], 1.0)], outcomes=outcomes, i=1))
    for _ in range(100):
        if len(outcomes) == 2:
            break
        engine.step()
        settle(tiers)
    with pytest.raises(SlotsExhausted, match="needs 3 adapter slots and the bank has 2; raise "):
        raise outcomes[0]
    assert_same(outcomes[1], alone(tiny64, dirs, prompts[1], [(P[0], 1.0)]))
    tiers.close()


def test_a_cold_adapter_does_not_stall_the_running_rows(tiny64, dirs, prompts):
    source = Source(dirs, gated=(P[1],))
    tiers = new_tiers(tiny64, source, slots=4)
    engine = Engine(tiers.bank.model, tiny64.tokenizer, bank=tiers.bank, tiers=tiers)
    long = SamplingParams(max_tokens=20, temperature=0, logprobs=1, ignore_eos=True)
    outcomes: dict = {}
    running = work(prompts[0], [(P[0], 1.0)], long, outcomes, 0)
    engine.submit(running)
    settle(tiers, gated=[P[1]])
    engine.step()  # joins, prefills, samples its first token
    cold = work(prompts[1], [(P[1], 1.0)], outcomes=outcomes, i=1)
    engine.submit(cold)
    assert source.entered[P[1]].wait(30)  # its load has started, and is held
    produced = []
    for _ in range(5):
        engine.step()
        produced.append(running.row.produced)
    assert produced == [2, 3, 4, 5, 6]  # a token every step while the load is in flight
    assert cold.admitted_at is None and engine.stats.deferred_loading == 1
    source.release(P[1])
    settle(tiers)
    engine.step()  # the first step after the load: it joins
    assert cold in engine.kv.owners and running.row.produced == 7
    while len(outcomes) < 2:
        engine.step()
    assert_same(outcomes[0], alone(tiny64, dirs, prompts[0], [(P[0], 1.0)], long))
    assert_same(outcomes[1], alone(tiny64, dirs, prompts[1], [(P[1], 1.0)]))
    assert source.reads.count(P[1]) == 1
    stats = tiers.stats()  # two adapters read from storage, each installed once
    assert (stats.host_hits, stats.host_misses, stats.bank_misses) == (0, 2, 2)
    assert stats.host_bytes == tiers.host.used > 0 and stats.bank_entries == 2
    tiers.close()


def test_a_load_that_finishes_during_the_decode_joins_in_time_for_the_prefill(
    tiny64, dirs, prompts
):
    source = Source(dirs, gated=(P[1],))
    tiers = new_tiers(tiny64, source, slots=4)
    engine = Engine(tiers.bank.model, tiny64.tokenizer, bank=tiers.bank, tiers=tiers)
    running = work(prompts[0], [(P[0], 1.0)], SamplingParams(max_tokens=20, temperature=0))
    engine.submit(running)
    settle(tiers, gated=[P[1]])
    engine.step()
    cold = work(prompts[1], [(P[1], 1.0)])
    engine.submit(cold)
    decode = engine._decode

    def load_ends_during(logits):
        decode(logits)
        source.release(P[1])
        settle(tiers)

    engine._decode = load_ends_during
    engine.step()  # admission found it loading; it joined after the decode, and prefilled
    assert cold in engine.kv.owners and cold.row.produced == 1
    assert running.row.produced == 2
    tiers.close()


def test_ready_rows_pass_a_waiting_one_a_bounded_number_of_times(tiny64, dirs, prompts):
    source = Source(dirs, gated=(P[1],))
    tiers = new_tiers(tiny64, source, slots=4)
    engine = Engine(tiers.bank.model, tiny64.tokenizer, bank=tiers.bank, tiers=tiers, max_bypass=2)
    waiting = work(prompts[0], [(P[1], 1.0)])
    later = [work(p, [(P[0], 1.0)]) for p in prompts[1:5]]
    for w in [waiting, *later]:
        engine.submit(w)
    settle(tiers, gated=[P[1]])
    engine.step()
    assert engine.kv.owners == later[:2] and waiting.passed_by == 2  # two passed, then none
    engine.step()
    assert engine.kv.owners == later[:2]
    source.release(P[1])
    settle(tiers)
    engine.step()
    assert waiting in engine.kv.owners
    tiers.close()


@pytest.mark.parametrize("load_ends", ["after the revocation", "before the revocation"])
def test_a_version_revoked_while_it_is_prefetched_is_never_installed(
    tiny64, dirs, prompts, load_ends
):
    source = Source(dirs, gated=(P[1],))
    tiers = new_tiers(tiny64, source, slots=4)
    active, epoch = set(P), [1]

    def revoked(mixtures):
        return [i for i, m in enumerate(mixtures) if any(r not in active for r, _ in m)]

    engine = Engine(
        tiers.bank.model,
        tiny64.tokenizer,
        bank=tiers.bank,
        tiers=tiers,
        epoch=lambda: epoch[0],
        revoked=revoked,
    )
    outcomes: dict = {}
    cold = work(prompts[1], [(P[1], 1.0)], outcomes=outcomes, i=1)
    engine.submit(cold)
    assert source.entered[P[1]].wait(30)
    engine.step()
    assert cold.admitted_at is None
    if load_ends == "before the revocation":
        source.release(P[1])
        settle(tiers)
        copy_held = tiers.host.get(P[1])
        assert copy_held is not None
    active.discard(P[1])  # what ModelReplica.sync does: the new set, the drop, the epoch
    tiers.drop(active)
    epoch[0] = 2
    source.release(P[1])
    settle(tiers)
    engine.step()
    with pytest.raises(StaleMixture, match="not active"):
        raise outcomes[1]
    assert cold.row is None and engine.stats.tokens_sampled == 0  # nothing sampled with it
    assert P[1] not in tiers.host and P[1] not in tiers.bank and tiers.bank.misses == 0
    assert tiers.host.used == 0
    if load_ends == "before the revocation":  # the host tier's copy was zeroed
        assert all(not a.any() and not b.any() for a, b, _ in copy_held.values())
    with pytest.raises(StaleMixture):
        tiers.prefetch([P[1]])  # and it is never loaded again
    tiers.close()


def test_a_load_that_fails_fails_only_its_requests_once_per_backoff(tiny64, dirs, prompts):
    # The failing read is held until the three requests are queued: the two needing it wait
    # on that one read (a read that failed before a request arrives refuses it at submit).
    source, clock = Source(dirs, gated=(P[2],), broken=(P[2],)), [0.0]
    tiers = new_tiers(tiny64, source, slots=4, retry_s=30.0, clock=lambda: clock[0])
    engine = Engine(tiers.bank.model, tiny64.tokenizer, bank=tiers.bank, tiers=tiers)
    outcomes: dict = {}
    mixtures = [[(P[2], 1.0)], [(P[0], 1.0)], [(P[0], 0.5), (P[2], 0.5)]]
    for i, m in enumerate(mixtures):
        engine.submit(work(prompts[i], m, outcomes=outcomes, i=i))
    source.release(P[2])
    for _ in range(100):
        if len(outcomes) == 3:
            break
        engine.step()
        settle(tiers)
    for i in (0, 2):
        with pytest.raises(AdapterLoadFailed, match="^an adapter this request needs could not be"):
            raise outcomes[i]
        assert "p2" not in str(outcomes[i])
    assert_same(outcomes[1], alone(tiny64, dirs, prompts[1], [(P[0], 1.0)]))
    with pytest.raises(AdapterLoadFailed):  # within the backoff: refused at once, no read
        engine.submit(work(prompts[3], [(P[2], 1.0)]))
    assert source.reads.count(P[2]) == 1 and tiers.load_failures == 1
    (failure,) = tiers.failures()
    assert failure.ref == P[2] and failure.attempts == 1
    assert failure.error == "OSError: storage said no to p2"
    clock[0] = 29.9
    with pytest.raises(AdapterLoadFailed):
        engine.submit(work(prompts[3], [(P[2], 1.0)]))
    clock[0] = 30.0  # the backoff passed: the next request tries storage again
    engine.submit(work(prompts[3], [(P[2], 1.0)], outcomes=outcomes, i=3))
    settle(tiers)
    assert source.reads.count(P[2]) == 2 and tiers.failures()[0].attempts == 2
    tiers.close()


# -- every interleaving -------------------------------------------------------------------


def test_prefetch_admit_revoke_and_evict_in_any_order_keep_the_tiers_sound(tiny64, dirs):
    """Random interleavings of prefetches, loads finishing, rows joining and leaving, and
    revocations, on a two-slot bank and a two-adapter host tier."""
    refs = P[:4]

    class Tiers(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.source = Source(dirs, gated=tuple(refs), broken=(P[3],))
            # a worker per adapter: a held load never queues another behind it
            self.tiers = new_tiers(tiny64, self.source, slots=2, host_entries=2, workers=4)
            self.keep = set(refs)
            self.rows: list[tuple[set[AdapterRef], dict[int, float]]] = []
            self.size = adapter_bytes(dirs, self.tiers.bank)

        def teardown(self) -> None:
            for gate in self.source.gates.values():
                gate.set()
            self.tiers.close()

        def _held(self) -> list[AdapterRef]:
            return [r for r in self.tiers.loading() if not self.source.gates[r].is_set()]

        @rule(ref=st.sampled_from(refs))
        def prefetch(self, ref):
            try:
                self.tiers.prefetch([ref])
            except StaleMixture:
                assert ref not in self.keep
            except AdapterLoadFailed:
                assert ref == P[3]
            settle(self.tiers, gated=self._held())

        @rule(ref=st.sampled_from(refs))
        def finish_load(self, ref):
            self.source.release(ref)
            settle(self.tiers, gated=self._held())

        @rule(picked=st.sets(st.sampled_from(refs), min_size=1, max_size=2))
        def admit(self, picked):
            try:
                parsed = self.tiers.ready(picked)
                if parsed is None or not self.tiers.bank.fits(picked):
                    return
                slots = self.tiers.pin([(r, 1.0) for r in picked], parsed)
            except StaleMixture:
                assert picked - self.keep
                return
            except AdapterLoadFailed:
                assert P[3] in picked
                return
            finally:
                settle(self.tiers, gated=self._held())
            assert picked <= self.keep  # a revoked version is never installed
            self.rows.append((picked, slots))

        @rule(data=st.data())
        def leave(self, data):
            if self.rows:
                picked, slots = self.rows.pop(data.draw(st.integers(0, len(self.rows) - 1)))
                self.tiers.bank.unpin(slots)

        @rule(ref=st.sampled_from(refs))
        def revoke(self, ref):
            self.keep.discard(ref)
            self.tiers.drop(self.keep)

        @invariant()
        def sound(self):
            tiers = self.tiers
            held = tiers.host.refs()
            assert tiers.host.used == len(held) * self.size
            assert tiers.host.used <= tiers.host.capacity
            assert set(held) <= self.keep and set(tiers.bank.loaded()) <= self.keep
            for picked, slots in self.rows:  # a live row's adapters stay in its slots
                live = picked & self.keep
                assert {tiers.bank.slot_of(r) for r in live} <= set(slots)
            assert len(set().union(*(s for _, s in self.rows), set())) <= tiers.bank.capacity

    run_state_machine_as_test(
        Tiers, settings=settings(max_examples=25, stateful_step_count=15, deadline=None)
    )

"""The serving engine (continuous batching): rows join and leave at any step, and each row's
output is the one it gets alone, token for token and logprob for logprob (float64).

References are today's batch decode loop (``generate_batch``) and ``score_prompt``, run on
one request at a time, with the row's mixture set by ``bank.mixture`` (whose exactness
against peft and hand-merged weights ``test_compose`` checks).
"""

from __future__ import annotations

import copy
import gc
import threading
import time
import weakref
from collections.abc import Callable

import pytest
import torch
from support import ALL, LOGP, A, B, C, hand_merged

from adapterswap.compose.adapter_files import load_adapter_dir
from adapterswap.compose.bank import AdapterBank
from adapterswap.engine.generation import generate_batch
from adapterswap.engine.loop import Engine, Work
from adapterswap.engine.requests import GenerationRequest, GenerationResult, SamplingParams
from adapterswap.engine.scoring import score_prompt
from adapterswap.errors import InvalidArgument, Overloaded, StaleMixture
from adapterswap.models.base import LoadedModel

GREEDY = SamplingParams(max_tokens=8, temperature=0, logprobs=2, ignore_eos=True)
LENGTHS = (5, 17, 3, 40, 9)
MIXTURES = [[(A, 1.0)], [(B, 0.7), (C, 0.3)], [], [(A, 0.5), (B, 0.5)], [(C, 1.0)]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 1000, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def bank(tiny64: LoadedModel, lora_dirs: dict) -> AdapterBank:
    bank = AdapterBank(copy.deepcopy(tiny64.model), ALL, 8, 1 << 20)
    for ref, path in lora_dirs.items():
        bank.load(ref, *load_adapter_dir(path))
    return bank


def run(engine: Engine, works: list[Work], joins: dict[int, list[int]] | None = None) -> dict:
    """Step ``engine`` until every work is done; work ``i`` is submitted at step
    ``joins[i]`` (default: all at step 0). Returns {i: outcome}."""
    joins = joins or {0: list(range(len(works)))}
    outcomes: dict[int, object] = {}
    for i, w in enumerate(works):
        w.on_done = lambda o, i=i: outcomes.__setitem__(i, o)
    for step in range(500):
        for i in joins.get(step, []):
            engine.submit(works[i])
        if len(outcomes) == len(works):
            return outcomes
        engine.step()
    raise AssertionError(f"not done after 500 steps: {sorted(outcomes)}")


def work(prompt: list[int], params: SamplingParams = GREEDY, mixture=(), **kw) -> Work:
    return Work(prompt, GenerationRequest(prompt, params), list(mixture), on_done=print, **kw)


def alone(model, tokenizer, prompt, params=GREEDY) -> GenerationResult:
    (result,) = generate_batch(model, tokenizer, [GenerationRequest(prompt, params)])
    return result


def assert_same(got: GenerationResult, want: GenerationResult) -> None:
    assert got.token_ids == want.token_ids and got.text == want.text
    assert got.finish_reason == want.finish_reason
    torch.testing.assert_close(
        torch.tensor(got.scores.token_logprobs), torch.tensor(want.scores.token_logprobs), **LOGP
    )


def test_each_row_is_what_its_mixture_merged_into_the_weights_generates(
    tiny64, bank, lora_dirs, prompts
):
    engine = Engine(bank.model, tiny64.tokenizer, bank=bank, max_rows=3, prefill_tokens=7)
    works = [work(p, mixture=m) for p, m in zip(prompts, MIXTURES, strict=True)]
    outcomes = run(engine, works, {0: [0], 1: [1, 2], 3: [3, 4]})
    for i, (prompt, mixture) in enumerate(zip(prompts, MIXTURES, strict=True)):
        merged = hand_merged(tiny64.model, lora_dirs, mixture)  # W + sum w s B A, no bank
        assert_same(outcomes[i], alone(merged, tiny64.tokenizer, prompt))


def test_rows_joining_at_any_step_are_each_what_they_are_alone(tiny64, prompts):
    engine = Engine(tiny64.model, tiny64.tokenizer, max_rows=3, prefill_tokens=6)
    works = [work(p) for p in prompts]
    # 0 runs alone first; 1 joins mid-decode; 2-4 queue behind a full batch (max_rows=3).
    outcomes = run(engine, works, {0: [0], 2: [1], 3: [2, 3, 4]})
    for i, prompt in enumerate(prompts):
        assert_same(outcomes[i], alone(tiny64.model, tiny64.tokenizer, prompt))
    assert engine.kv.count == 0 and engine.stats.tokens_sampled == 8 * len(prompts)


def test_each_row_composes_its_own_mixture_as_it_would_alone(tiny64, bank, prompts):
    engine = Engine(bank.model, tiny64.tokenizer, bank=bank, max_rows=4, prefill_tokens=8)
    works = [work(p, mixture=m) for p, m in zip(prompts, MIXTURES, strict=True)]
    outcomes = run(engine, works, {0: [0, 1], 1: [2], 4: [3, 4]})
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():  # idle, the engine leaves the bank's model the base model
        torch.testing.assert_close(bank.model(input_ids=ids).logits, tiny64.model(ids).logits)
    base = alone(tiny64.model, tiny64.tokenizer, prompts[0])
    assert outcomes[0].token_ids != base.token_ids  # the adapters change the output
    for i, (prompt, mixture) in enumerate(zip(prompts, MIXTURES, strict=True)):
        with bank.mixture([mixture]):
            want = alone(bank.model, tiny64.tokenizer, prompt)
        assert_same(outcomes[i], want)
    assert not bank._pins  # every row unpinned its adapters when it left


def test_seeded_sampling_is_the_same_alone_or_joining(tiny64, prompts):
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    engine = Engine(tiny64.model, tiny64.tokenizer, max_rows=4, prefill_tokens=4)
    outcomes = run(engine, [work(p, params) for p in prompts], {0: [0, 1], 3: [2, 3, 4]})
    for i, prompt in enumerate(prompts):
        assert (
            outcomes[i].token_ids == alone(tiny64.model, tiny64.tokenizer, prompt, params).token_ids
        )


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_scoring_rows_match_score_prompt_whatever_the_chunk(tiny64, prompts, chunk):
    engine = Engine(tiny64.model, tiny64.tokenizer, prefill_tokens=chunk)
    works = [Work(p, None, [], on_done=print, top_logprobs=2) for p in prompts[:4]]
    works.append(work(prompts[4]))  # a generation beside them
    outcomes = run(engine, works, {0: [4, 0], 2: [1, 2, 3]})
    for i, prompt in enumerate(prompts[:4]):
        want = score_prompt(tiny64.model, tiny64.tokenizer, prompt, top_logprobs=2)
        got = outcomes[i]
        assert got.token_ids == want.token_ids and got.text == want.text
        assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
        torch.testing.assert_close(
            torch.tensor(got.token_logprobs[1:]), torch.tensor(want.token_logprobs[1:]), **LOGP
        )
        for g, w in zip(got.top_logprobs[1:], want.top_logprobs[1:], strict=True):
            assert g.keys() == w.keys()
            torch.testing.assert_close(
                torch.tensor(list(g.values())), torch.tensor(list(w.values())), **LOGP
            )
    assert_same(outcomes[4], alone(tiny64.model, tiny64.tokenizer, prompts[4]))


def test_a_long_prompt_never_stalls_a_running_row(tiny64, prompts):
    """While a 40-token prompt is prefilled 5 tokens a step, the running row still gains a
    token every step: the prefill is chunked, not run to the end before the next decode."""
    engine = Engine(tiny64.model, tiny64.tokenizer, prefill_tokens=5)
    running = work(prompts[0], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    long = Work(prompts[3], None, [], on_done=print)
    engine.submit(running)
    engine.step()
    engine.submit(long)
    produced = []
    for _ in range(8):
        engine.step()
        produced.append(running.row.produced)
    assert produced == list(range(2, 10))
    assert long.prefilled == 40  # 8 chunks of 5


def test_a_cancelled_row_leaves_at_the_next_step(tiny64, bank, prompts):
    engine = Engine(bank.model, tiny64.tokenizer, bank=bank)
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    done: list = []
    gone, stays = (
        Work(p, GenerationRequest(p, params), [(A, 1.0)], on_done=done.append) for p in prompts[:2]
    )
    engine.submit(gone)
    engine.submit(stays)
    engine.step()
    engine.step()
    gone.cancel()
    engine.step()
    assert engine.kv.owners == [stays] and engine.stats.cancelled == 1
    assert list(bank._pins.values()) == [1]  # only the remaining row pins A
    queued = engine.submit(work(prompts[2]))
    queued.cancel()  # cancelled before it ran: never admitted
    engine.step()
    assert engine.kv.owners == [stays] and not done


def test_a_full_queue_is_overloaded_and_an_oversized_request_is_refused(tiny64, prompts):
    engine = Engine(tiny64.model, tiny64.tokenizer, max_queue=2, max_context=48)
    engine.submit(work(prompts[0]))
    engine.submit(work(prompts[1]))
    with pytest.raises(Overloaded, match="queue is full"):
        engine.submit(work(prompts[2]))
    big = SamplingParams(max_tokens=9, temperature=0)
    with pytest.raises(InvalidArgument, match="prompt \\+ max_tokens is 49 tokens, over"):
        engine.submit(work(prompts[3], big))


def test_a_revoked_mixture_stops_at_the_next_step_and_the_others_continue(tiny64, bank, prompts):
    epoch, active = [1], {A, B, C}
    lock = threading.Lock()

    def revoked(mixtures):
        return [i for i, m in enumerate(mixtures) if any(r not in active for r, _ in m)]

    engine = Engine(
        bank.model,
        tiny64.tokenizer,
        bank=bank,
        step_lock=lock,
        epoch=lambda: epoch[0],
        revoked=revoked,
    )
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    works = [
        Work(p, GenerationRequest(p, params), m, on_done=print)
        for p, m in zip(prompts[:3], [[(A, 1.0)], [(B, 1.0)], [(A, 0.5), (C, 0.5)]], strict=True)
    ]
    outcomes: dict = {}
    for i, w in enumerate(works):
        w.on_done = lambda o, i=i: outcomes.__setitem__(i, o)
        engine.submit(w)
    for _ in range(4):
        engine.step()
    produced = [w.row.produced for w in works]
    active.discard(A)
    epoch[0] = 2
    engine.step()
    assert outcomes[0].finish_reason == "abort" and outcomes[2].finish_reason == "abort"
    assert [outcomes[i].completion_tokens for i in (0, 2)] == [produced[0], produced[2]]
    assert 1 not in outcomes and engine.kv.owners == [works[1]]
    later = Work(prompts[3], None, [(A, 1.0)], on_done=lambda o: outcomes.__setitem__(3, o))
    engine.submit(later)
    engine.step()
    assert isinstance(outcomes[3], StaleMixture)  # refused at admission
    while 1 not in outcomes:
        engine.step()
    with bank.mixture([[(B, 1.0)]]):  # the row without A ran to its end, as it does alone
        want = alone(bank.model, tiny64.tokenizer, prompts[1], params)
    assert outcomes[1].finish_reason == "length" and outcomes[1].token_ids == want.token_ids


def test_a_row_that_fails_while_running_fails_alone(tiny64, prompts):
    """A forward that raises for one row (here: once the 40-token row reaches position 44) is
    rerun row by row: that row ends with the error, the others are unaffected."""
    model = copy.deepcopy(tiny64.model)
    forward: Callable = model.forward

    def failing(*args, position_ids=None, **kwargs):
        if position_ids is not None and bool((position_ids == 44).any()):
            raise RuntimeError("boom")
        return forward(*args, position_ids=position_ids, **kwargs)

    model.forward = failing
    engine = Engine(model, tiny64.tokenizer, prefill_tokens=64)
    streamed = {i: "" for i in range(len(prompts))}
    works = [work(p) for p in prompts]
    for i, w in enumerate(works):
        w.on_token = lambda delta, i=i: streamed.__setitem__(i, streamed[i] + delta)
    outcomes = run(engine, works)
    assert isinstance(outcomes[3], RuntimeError) and engine.stats.failed == 1
    for i in (0, 1, 2, 4):  # rerun alone for the step that failed: nothing lost or repeated
        assert_same(outcomes[i], alone(tiny64.model, tiny64.tokenizer, prompts[i]))
        assert streamed[i] == outcomes[i].text


def test_the_thread_serves_submissions_from_other_threads(tiny64, prompts):
    engine = Engine(tiny64.model, tiny64.tokenizer, background=True)
    try:
        results, events = {}, [threading.Event() for _ in prompts]
        for i, p in enumerate(prompts):
            w = work(p)
            w.on_done = lambda o, i=i: (results.__setitem__(i, o), events[i].set())
            engine.submit(w)
        assert all(e.wait(60) for e in events)
    finally:
        engine.stop()
    for i, p in enumerate(prompts):
        assert_same(results[i], alone(tiny64.model, tiny64.tokenizer, p))


def test_the_cache_grows_while_rows_run_and_rows_leave_after(tiny64, prompts):
    """Six rows at once grow the cache from 4 rows to 8, a 300-token prompt its width from
    256 columns to the context (320); rows then leave from the middle of both regions."""
    g = torch.Generator().manual_seed(1)
    everything = [*prompts, torch.randint(3, 1000, (300,), generator=g).tolist()]
    engine = Engine(tiny64.model, tiny64.tokenizer, max_rows=8, max_context=320)
    outcomes = run(engine, [work(p) for p in everything])
    assert engine.kv.keys[0].shape[0] == 8 and engine.kv.width == 320 and engine.kv.count == 0
    for i, prompt in enumerate(everything):
        assert_same(outcomes[i], alone(tiny64.model, tiny64.tokenizer, prompt))


def test_a_bug_in_a_step_fails_the_rows_it_ran_and_the_loop_keeps_serving(
    tiny64, prompts, monkeypatch
):
    engine = Engine(tiny64.model, tiny64.tokenizer)
    sample, calls = engine._sample, []

    def buggy_once(logits):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bug")
        return sample(logits)

    monkeypatch.setattr(engine, "_sample", buggy_once)
    results, events, works = {}, [threading.Event() for _ in range(3)], []
    for i, p in enumerate(prompts[:3]):
        works.append(work(p))
        works[i].on_done = lambda o, i=i: (results.__setitem__(i, o), events[i].set())
    engine.background = True
    with engine._wake:  # the loop waits for this: both run in its first steps
        engine.submit(works[0])
        engine.submit(works[1])
    try:
        assert all(e.wait(60) for e in events[:2])
        engine.submit(works[2])
        assert events[2].wait(60)
    finally:
        engine.stop()
    assert all(isinstance(results[i], RuntimeError) for i in (0, 1))
    assert_same(results[2], alone(tiny64.model, tiny64.tokenizer, prompts[2]))  # ...not this


def test_an_idle_engine_holds_no_thread_so_one_nobody_uses_is_collected(tiny64, prompts):
    engine = Engine(tiny64.model, tiny64.tokenizer, background=True)
    finished = threading.Event()
    w = work(prompts[0])
    w.on_done = lambda _: finished.set()
    engine.submit(w)
    assert finished.wait(60)
    deadline = time.monotonic() + 10
    while engine._thread is not None:
        assert time.monotonic() < deadline, "the loop thread did not exit when idle"
        time.sleep(0.05)
    dropped = weakref.ref(engine)
    del engine, w
    gc.collect()
    assert dropped() is None  # a replica's model, bank and KV cache go with it


def test_max_tokens_zero_is_answered_without_running_the_model(tiny64, prompts):
    engine = Engine(tiny64.model, tiny64.tokenizer)
    done: list = []
    params = SamplingParams(max_tokens=0, temperature=0)
    engine.submit(Work(prompts[0], GenerationRequest(prompts[0], params), [], on_done=done.append))
    (result,) = done
    assert (result.text, result.finish_reason, result.completion_tokens) == ("", "length", 0)
    assert result.prompt_tokens == len(prompts[0]) and engine.stats.steps == 0

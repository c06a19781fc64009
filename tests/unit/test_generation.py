"""The batched decode loop and prompt scoring, each checked against a simple reference.

Fast tests run the tiny-random Llama (real SmolLM2 tokenizer) in float64 end to end
(``support.exact_float64``), so batched and one-at-a-time runs, and the library against its
references, agree to LOGP whatever order a processor adds in; one slow test runs the embedded
SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from support import LOGP

from adapterswap.config import ModelSettings
from adapterswap.engine import scoring
from adapterswap.engine.generation import generate_batch
from adapterswap.engine.requests import GenerationRequest, SamplingParams
from adapterswap.engine.scoring import score_prompt, score_prompts
from adapterswap.engine.text import apply_chat_template
from adapterswap.models.base import load_base_model

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
TEXTS = [
    "Hello",
    "The capital of France is a city that",
    "1 2 3",
    "Once upon a time, in a land far away, there lived a",
]


@pytest.fixture(scope="module")
def sharp(tiny64):
    """tiny-random with 64x larger attention logits: near-uniform attention hides position
    and padding bugs from greedy outputs, sharp attention does not (an off-by-one decode
    position changes a row's tokens here, not in ``tiny64``)."""
    model = copy.deepcopy(tiny64.model)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return dataclasses.replace(tiny64, model=model)


@pytest.fixture(scope="module")
def prompts(tiny64):
    tok = tiny64.tokenizer
    return [tok(t).input_ids for t in TEXTS]


def _run(loaded, prompts, params, **kwargs):
    model, tok = loaded.model, loaded.tokenizer
    return generate_batch(model, tok, [GenerationRequest(p, params) for p in prompts], **kwargs)


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


# --------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("which", ["tiny64", "sharp"])
def test_greedy_batch_equals_each_row_alone_and_model_generate(request, which, prompts):
    pair = request.getfixturevalue(which)
    model, tok = pair.model, pair.tokenizer
    assert len({len(p) for p in prompts}) == len(prompts)  # padding differs per row
    batched = _run(pair, prompts, GREEDY)
    for prompt, result in zip(prompts, batched, strict=True):
        alone = _run(pair, [prompt], GREEDY)[0]
        assert result == alone
        ref = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=GREEDY.max_tokens,
        )[0, len(prompt) :].tolist()
        eos = [tok.eos_token_id] if result.finish_reason == "stop" else []
        assert result.token_ids + eos == ref[: len(result.token_ids) + len(eos)]
        assert result.text == _decode(tok, result.token_ids)
        assert result.prompt_tokens == len(prompt)


def test_max_tokens_finishes_with_length(tiny64, prompts):
    results = _run(tiny64, prompts, SamplingParams(max_tokens=5, temperature=0.0))
    for r in results:
        assert (r.finish_reason, len(r.token_ids), r.completion_tokens) == ("length", 5, 5)


def test_eos_finishes_with_stop_and_is_not_in_the_output(tiny64, prompts, monkeypatch):
    model, tok = tiny64.model, tiny64.tokenizer
    free = _run(tiny64, prompts[:1], GREEDY)[0].token_ids
    eos_like = free[2]  # make a token the model emits greedily count as EOS
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tok.eos_token_id, eos_like])
    result = _run(tiny64, prompts[:1], GREEDY)[0]
    n = free.index(eos_like)
    assert result.finish_reason == "stop"
    assert result.token_ids == free[:n]
    assert result.completion_tokens == n + 1  # the EOS was sampled, so it counts
    assert result.text == _decode(tok, free[:n])


def test_ignore_eos_generates_past_eos_to_max_tokens(tiny64, prompts, monkeypatch):
    model, tok = tiny64.model, tiny64.tokenizer
    params = SamplingParams(max_tokens=8, temperature=0.0)
    free = _run(tiny64, prompts[:1], params)[0].token_ids
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tok.eos_token_id, free[2]])
    ignored = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    result = _run(tiny64, prompts[:1], ignored)[0]
    assert (result.finish_reason, result.completion_tokens) == ("length", 8)
    assert result.token_ids == free  # the same greedy tokens, EOS-like one included


def test_max_tokens_zero_returns_without_running_the_model(tiny64, prompts):
    tok = tiny64.tokenizer

    def no_forward(*args, **kwargs):
        raise AssertionError("the model must not run for max_tokens=0")

    request = GenerationRequest(prompts[1], SamplingParams(max_tokens=0))
    [result] = generate_batch(no_forward, tok, [request])
    assert result.token_ids == [] and result.text == ""
    assert (result.finish_reason, result.completion_tokens) == ("length", 0)
    assert result.prompt_tokens == len(prompts[1])


def test_empty_prompt_is_rejected_with_its_index(tiny64, prompts):
    model, tok = tiny64.model, tiny64.tokenizer
    requests = [GenerationRequest(prompts[0]), GenerationRequest([])]
    with pytest.raises(ValueError, match=r"requests\[1\]\.prompt_ids is empty"):
        generate_batch(model, tok, requests)
    with pytest.raises(ValueError, match=r"prompts\[0\] is empty"):
        score_prompt(model, tok, [])


# --------------------------------------------------------------------------- sampling


def test_seed_gives_the_same_text_alone_or_in_any_batch(tiny64, prompts):
    seeded = SamplingParams(max_tokens=20, temperature=1.0, seed=1234)
    alone = _run(tiny64, [prompts[1]], seeded)[0]
    others = [
        GenerationRequest(p, SamplingParams(max_tokens=7, seed=i)) for i, p in enumerate(prompts)
    ]
    model, tok = tiny64.model, tiny64.tokenizer
    mixed = generate_batch(
        model, tok, [*others[:2], GenerationRequest(prompts[1], seeded), others[3]]
    )
    assert mixed[2] == alone
    assert alone.token_ids != _run(tiny64, [prompts[1]], GREEDY)[0].token_ids[:20]
    other_seed = SamplingParams(max_tokens=20, temperature=1.0, seed=99)
    assert _run(tiny64, [prompts[1]], other_seed)[0].text != alone.text


@pytest.mark.parametrize("temperature", [1.0, 0.05])  # flat: sorts the vocab; sharp: topk head
def test_seeded_top_p_is_independent_of_the_batch(tiny64, prompts, temperature):
    params = SamplingParams(max_tokens=15, temperature=temperature, top_p=0.9, seed=7)
    alone = _run(tiny64, [prompts[3]], params)[0]
    model, tok = tiny64.model, tiny64.tokenizer
    noise = [GenerationRequest(p, SamplingParams(max_tokens=9, top_p=0.5)) for p in prompts[:3]]
    assert generate_batch(model, tok, [*noise, GenerationRequest(prompts[3], params)])[3] == alone


def test_unseeded_rows_differ(tiny64, prompts):
    params = SamplingParams(max_tokens=20, temperature=1.0)
    a, b = _run(tiny64, [prompts[0], prompts[0]], params)
    assert a.token_ids != b.token_ids


def test_tiny_top_p_is_greedy(tiny64, prompts):
    nucleus = _run(tiny64, prompts, SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-6))
    greedy = _run(tiny64, prompts, GREEDY)
    assert [r.token_ids for r in nucleus] == [r.token_ids for r in greedy]


def test_sampled_text_is_the_decoded_tokens(tiny64, prompts):
    """Random tokens split multi-byte characters: the incremental decode must still be exact."""
    tok = tiny64.tokenizer
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=3)
    for r in _run(tiny64, prompts, params):
        assert r.text == _decode(tok, r.token_ids)


# --------------------------------------------------------------------------- stop strings


def _spanning_stop(tok, token_ids):
    """A 2-char stop string made of the last char of one token and the first of the next."""
    pieces = [_decode(tok, [t]) for t in token_ids]
    for i in range(len(pieces) - 1):
        a, b = pieces[i], pieces[i + 1]
        if a.isascii() and b.isascii() and len(a) >= 2 and len(b) >= 1:
            return a[-1] + b[0]
    raise AssertionError(f"no ascii token pair in {pieces}")


def test_stop_string_spanning_two_tokens_cuts_the_text_before_it(tiny64, prompts):
    tok = tiny64.tokenizer
    free = _run(tiny64, prompts[:1], GREEDY)[0]
    stop = _spanning_stop(tok, free.token_ids)
    cut = free.text.find(stop)
    boundaries = {len(_decode(tok, free.token_ids[:i])) for i in range(len(free.token_ids) + 1)}
    assert cut + 1 in boundaries  # the first occurrence really spans two tokens
    params = SamplingParams(max_tokens=GREEDY.max_tokens, temperature=0.0, stop=("never", stop))
    deltas = []
    result = _run(tiny64, prompts[:1], params, on_token=lambda i, d: deltas.append(d))[0]
    assert (result.text, result.finish_reason) == (free.text[:cut], "stop")
    assert "".join(deltas) == result.text


def test_stop_string_not_produced_finishes_with_length(tiny64, prompts):
    params = SamplingParams(max_tokens=6, temperature=0.0, stop=("\u2603never\u2603",))
    result = _run(tiny64, prompts[:1], params)[0]
    assert result.finish_reason == "length"
    assert result.text == _run(tiny64, prompts[:1], SamplingParams(6, 0.0))[0].text


# --------------------------------------------------------------------------- streaming


def test_stream_deltas_concatenate_to_each_rows_text(tiny64, prompts):
    model, tok = tiny64.model, tiny64.tokenizer
    free = _run(tiny64, prompts, GREEDY)
    requests = [
        GenerationRequest(prompts[0], SamplingParams(max_tokens=12, temperature=0.0)),
        GenerationRequest(prompts[1], SamplingParams(max_tokens=30, temperature=1.0, seed=5)),
        GenerationRequest(
            prompts[2], SamplingParams(max_tokens=12, temperature=0.0, stop=(free[2].text[3:6],))
        ),
        GenerationRequest(prompts[3], SamplingParams(max_tokens=25, top_p=0.8, seed=11)),
    ]
    streamed: dict[int, list[str]] = {i: [] for i in range(len(requests))}
    results = generate_batch(model, tok, requests, on_token=lambda i, d: streamed[i].append(d))
    for i, result in enumerate(results):
        assert "".join(streamed[i]) == result.text
        assert all(streamed[i])  # no empty deltas
    assert results[2].finish_reason == "stop" and results[2].text == free[2].text[:3]
    assert results == generate_batch(model, tok, requests)  # streaming changes nothing


# --------------------------------------------------------------------------- scoring


def test_score_prompt_matches_a_direct_log_softmax(tiny64):
    model, tok = tiny64.model, tiny64.tokenizer
    ids = tok("Hello world, héllo 世界 🙂 done").input_ids
    scores = score_prompt(model, tok, ids, top_logprobs=3)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)  # float64
    expected = logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    assert scores.token_logprobs[0] is None
    got = torch.tensor(scores.token_logprobs[1:], dtype=torch.float64)
    torch.testing.assert_close(got, expected, **LOGP)
    assert scores.top_logprobs[0] is None
    for t, top in enumerate(scores.top_logprobs[1:]):
        best3 = logp[t].topk(3).values.tolist()
        assert 1 <= len(top) <= 3  # ids that decode to the same text share one entry
        assert max(top.values()) == pytest.approx(best3[0], abs=LOGP["atol"])
        for value in top.values():  # every entry is one of the three most likely tokens
            assert any(value == pytest.approx(b, abs=LOGP["atol"]) for b in best3)


def test_score_prompt_tokens_and_offsets_follow_the_text(tiny64):
    tok = tiny64.tokenizer
    model = tiny64.model
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Héllo 世界 🙂!"}], tokenize=True, return_dict=False
    )
    scores = score_prompt(model, tok, ids)
    assert scores.text == tok.decode(ids, clean_up_tokenization_spaces=False)
    assert scores.tokens == [tok.decode([t], clean_up_tokenization_spaces=False) for t in ids]
    assert scores.text_offset[0] == 0 and scores.text_offset == sorted(scores.text_offset)
    ends = [*scores.text_offset[1:], len(scores.text)]
    whole = [i for i, tok_text in enumerate(scores.tokens) if "\ufffd" not in tok_text]
    assert len(whole) < len(ids)  # the emoji and CJK characters span several tokens
    for i in whole:
        assert scores.text[scores.text_offset[i] : ends[i]] == scores.tokens[i]
    assert scores.top_logprobs is None


def test_score_prompts_batched_equals_one_at_a_time(tiny64, prompts, monkeypatch):
    model, tok = tiny64.model, tiny64.tokenizer
    monkeypatch.setattr(scoring, "_SCORE_POSITIONS_PER_FORWARD", 30)  # several groups
    batched = score_prompts(model, tok, prompts, top_logprobs=2)
    for prompt, scores in zip(prompts, batched, strict=True):
        alone = score_prompt(model, tok, prompt, top_logprobs=2)
        assert scores.tokens == alone.tokens and scores.text_offset == alone.text_offset
        torch.testing.assert_close(scores.token_logprobs[1:], alone.token_logprobs[1:], **LOGP)
    assert score_prompt(model, tok, prompts[0][:1]).token_logprobs == [None]


# --------------------------------------------------------------------------- chat


def test_chat_template_ends_with_the_assistant_header(tiny64):
    tok = tiny64.tokenizer
    ids = apply_chat_template(tok, [{"role": "user", "content": "hi"}])
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_chat_template_missing_is_a_clear_error():
    with pytest.raises(ValueError, match="tokenizer has no chat template"):
        apply_chat_template(SimpleNamespace(chat_template=None), [{"role": "user", "content": "x"}])


@pytest.mark.slow
def test_embedded_model_answers_a_chat_question(embedded_cache):
    loaded = load_base_model(ModelSettings(spec="embedded"), embedded_cache)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = apply_chat_template(loaded.tokenizer, messages)
    params = SamplingParams(max_tokens=24, temperature=0.0)
    [result] = generate_batch(loaded.model, loaded.tokenizer, [GenerationRequest(ids, params)])
    assert "Paris" in result.text


def test_output_logprobs_match_a_direct_log_softmax_in_a_sampled_batch(tiny64, prompts):
    model, tok = tiny64.model, tiny64.tokenizer
    params = [
        SamplingParams(max_tokens=5, temperature=0.0, logprobs=2),
        SamplingParams(max_tokens=4, temperature=0.9, seed=3, logprobs=0),
        SamplingParams(max_tokens=3, temperature=0.0),  # not asked: nothing computed
    ]
    requests = [GenerationRequest(p, q) for p, q in zip(prompts[1:], params, strict=True)]
    results = generate_batch(model, tok, requests)
    assert results[2].scores is None
    for request, result in zip(requests[:2], results[:2], strict=True):
        ids = request.prompt_ids + result.token_ids
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]  # float64
        logp = torch.log_softmax(logits, -1)[len(request.prompt_ids) - 1 : -1]  # (n,V)
        expected = logp.gather(1, torch.tensor(result.token_ids)[:, None])[:, 0]
        scores = result.scores
        assert len(scores.token_logprobs) == len(result.token_ids)
        got = torch.tensor(scores.token_logprobs, dtype=torch.float64)
        torch.testing.assert_close(got, expected, **LOGP)
        assert "".join(scores.tokens) == tok.decode(result.token_ids)
    top = results[0].scores.top_logprobs  # greedy: the chosen token is the likeliest
    assert all(
        len(t) <= 2 and max(t.values()) == pytest.approx(lp, abs=LOGP["atol"])
        for t, lp in zip(top, results[0].scores.token_logprobs, strict=True)
    )
    assert results[1].scores.top_logprobs is None

"""EleutherAI's lm-evaluation-harness against the server, as its users run it: the
``lm_eval`` command, model ``local-completions`` with its default arguments (only
``base_url``, ``model`` and the key in ``OPENAI_API_KEY``), on two local tasks
(lm_eval_tasks/: multiple choice, and greedy generation).

With its defaults the harness finds the tokenizer through the server (``/tokenizer_info``,
``/tokenize``), sends token ids as prompts, and at ``--batch_size 8`` sends 8 prompts in
one request. Every score it logs must equal the server's score of that one text alone, at
both batch sizes: a batch routed on its first prompt would give the others its mixture.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

TASKS = Path(__file__).parent / "lm_eval_tasks"
LOOPBACK = Path(__file__).parent / "loopback"
BATCH_SIZES = (1, 8)
# Two float64 computations of a sum of a few log-probabilities (see support.LOGP).
ATOL = 1e-9


def run_lm_eval(served, batch_size: int, out: Path) -> subprocess.Popen:
    """Start ``lm_eval run`` on both tasks as a caller of both groups; its samples go under ``out``."""
    env = {
        **os.environ,
        "OPENAI_API_KEY": served.keys["finance+hr"],
        "HF_HOME": str(out / "hf"),  # the dataset cache: never the user's
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(LOOPBACK), os.environ.get("PYTHONPATH", "")]),
        "LOOPBACK_ONLY_LOG": str(out / "refused.log"),
    }
    command = [
        str(Path(sys.executable).parent / "lm_eval"),
        "run",
        "--model",
        "local-completions",
        "--model_args",
        f"base_url={served.url}/v1/completions,model={served.model}",
        "--tasks",
        "policies_mc,policies_gen",
        "--include_path",
        ".",  # the tasks' data_files are relative to the working directory
        "--batch_size",
        str(batch_size),
        "--log_samples",
        "--output_path",
        str(out / "results"),
    ]
    log = (out / "lm_eval.log").open("w")
    return subprocess.Popen(command, cwd=TASKS, env=env, stdout=log, stderr=subprocess.STDOUT)


def read_samples(out: Path, task: str) -> list[dict[str, Any]]:
    """The ``--log_samples`` records of ``task``, by document."""
    (path,) = (out / "results").rglob(f"samples_{task}_*.jsonl")
    samples = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(samples, key=lambda sample: sample["doc_id"])


@pytest.fixture(scope="module")
def harness(served, tmp_path_factory) -> dict[int, dict[str, list[dict[str, Any]]]]:
    """Both batch sizes' samples of both tasks; the two runs go at once (the server answers
    both), since each spends ~10 s indexing the harness's own tasks."""
    outs = {b: tmp_path_factory.mktemp(f"lm-eval-batch-{b}") for b in BATCH_SIZES}
    runs = {b: run_lm_eval(served, b, outs[b]) for b in BATCH_SIZES}
    for b, run in runs.items():
        rc = run.wait(timeout=600)
        log = (outs[b] / "lm_eval.log").read_text()
        assert rc == 0, f"lm_eval --batch_size {b} failed:\n{log[-4000:]}"
        refused = outs[b] / "refused.log"
        assert not refused.exists(), f"lm_eval reached for the network: {refused.read_text()}"
    return {
        b: {task: read_samples(outs[b], task) for task in ("policies_mc", "policies_gen")}
        for b in BATCH_SIZES
    }


def score_alone(served, context: str, continuation: str) -> tuple[float, tuple[str, ...]]:
    """The continuation's log-likelihood after ``context``, scored by the server as one text
    prompt (echo), and the adapters its router chose for it.

    The continuation's tokens are those the harness scores: it moves the context's trailing
    spaces into the continuation and splits the whole text's tokens at the context's length.
    """
    spaces = len(context) - len(context.rstrip())
    context, continuation = context.rstrip(), context[len(context) - spaces :] + continuation
    encode = served.tokenizer
    whole = encode(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(encode(context, add_special_tokens=False)["input_ids"])
    body = {
        "model": served.model,
        "prompt": context + continuation,
        "max_tokens": 0,
        "echo": True,
        "logprobs": 0,
    }
    reply = served.post("finance+hr", "/v1/completions", body)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    token_logprobs = answer["choices"][0]["logprobs"]["token_logprobs"]
    assert len(token_logprobs) == len(whole)
    route = tuple(a["id"] for a in answer["adapterswap"]["adapters"])
    return sum(token_logprobs[n_context:]), route


def test_the_two_topics_take_different_adapters_that_change_the_scores(served):
    """What the batch-size comparison relies on: prompts of the two topics route to
    different adapters, and an adapter changes a prompt's log-probabilities."""
    hr = "Question: How many weeks of paid parental leave do new parents get?\nAnswer:"
    finance = "Question: Within how many days are vendor invoices paid?\nAnswer:"
    routes = {}
    for name, prompt in (("hr", hr), ("finance", finance)):
        body = {"model": served.model, "prompt": prompt, "max_tokens": 0, "echo": True}
        body["logprobs"] = 0
        routed = served.post("finance+hr", "/v1/completions", body).json()
        base = served.post("finance+hr", "/v1/completions", {**body, "adapters": "none"}).json()
        routes[name] = [a["id"] for a in routed["adapterswap"]["adapters"]]
        assert (
            routed["choices"][0]["logprobs"]["token_logprobs"]
            != base["choices"][0]["logprobs"]["token_logprobs"]
        )
    assert routes == {"hr": [served.adapters["hr"]], "finance": [served.adapters["finance"]]}


def test_multiple_choice_log_likelihoods_equal_the_server_scoring_each_text_alone(served, harness):
    alone_scores: dict[tuple[str, str], tuple[float, tuple[str, ...]]] = {}
    for b in BATCH_SIZES:
        samples = harness[b]["policies_mc"]
        assert len(samples) == 10
        for sample in samples:
            for i, args in enumerate(sample["arguments"].values()):
                logged, _ = sample["resps"][i][0]
                pair = (args["arg_0"], args["arg_1"])
                if pair not in alone_scores:
                    alone_scores[pair] = score_alone(served, *pair)
                alone, _ = alone_scores[pair]
                assert float(logged) == pytest.approx(alone, rel=0, abs=ATOL), (
                    f"batch size {b}, doc {sample['doc_id']}, {args['arg_1']!r}: "
                    f"{float(logged)} in the harness, {alone} alone"
                )
    routes = {route for _, route in alone_scores.values()}
    assert len(routes) >= 2, "every prompt took the same adapters: the batches test nothing"


def test_multiple_choice_results_are_the_same_at_batch_sizes_1_and_8(harness):
    one, eight = (harness[b]["policies_mc"] for b in BATCH_SIZES)
    assert [s["doc"] for s in one] == [s["doc"] for s in eight]
    for a, b in zip(one, eight, strict=True):
        assert a["acc"] == b["acc"]
        for (lp_a, greedy_a), (lp_b, greedy_b) in zip(
            a["filtered_resps"], b["filtered_resps"], strict=True
        ):
            assert float(lp_a) == pytest.approx(float(lp_b), rel=0, abs=ATOL)
            assert greedy_a == greedy_b


def test_generations_equal_a_greedy_completion_of_each_prompt_alone(served, harness):
    outputs = {}
    for b in BATCH_SIZES:
        samples = harness[b]["policies_gen"]
        assert len(samples) == 4
        outputs[b] = [s["resps"][0][0] for s in samples]
        for sample, generated in zip(samples, outputs[b], strict=True):
            args = sample["arguments"]["gen_args_0"]
            body = {
                "model": served.model,
                "prompt": args["arg_0"],
                "max_tokens": 6,  # policies_gen.yaml's max_gen_toks
                "temperature": 0,
                "stop": ["\n", served.tokenizer.eos_token],  # its until, and the EOS text
            }
            alone = served.post("finance+hr", "/v1/completions", body)
            assert alone.status_code == 200, alone.text
            assert generated == alone.json()["choices"][0]["text"]
    assert outputs[1] == outputs[8]
    assert any(outputs[1]), "every generation is empty: the comparison tests nothing"

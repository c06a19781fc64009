"""How the demo asks for a fact: complete its sentence, score it, and read the example files.

Recall is probed the way a document-trained adapter learns: the model completes the fact's
sentence up to the fact (``completions``, greedy), and the fact's per-token NLL is read from
``echo`` log-probabilities.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterswap.api.client import Client


@dataclass(frozen=True)
class Probe:
    """A fact to recall: the document's text up to the fact, and the fact."""

    doc_id: str
    group: str
    question: str
    prefix: str
    answer: str


@dataclass
class Recall:
    user: str
    doc_id: str
    completion: str
    recalled: bool
    answer_nll: float
    adapters: list[str]


def load_probes(corpus: Path, batch: str) -> list[Probe]:
    """One probe per question whose answer appears verbatim in its document."""
    texts = {d["id"]: d["text"] for f in (corpus / batch).glob("*.jsonl") for d in read_jsonl(f)}
    probes = []
    for q in read_jsonl(corpus / "questions" / f"{batch}.jsonl"):
        text = texts.get(q["doc_id"], "")
        at = text.find(q["answer"])
        if at > 0:
            probes.append(Probe(q["doc_id"], q["group"], q["question"], text[:at], q["answer"]))
    return probes


def ask(client: Client, user: str, probe: Probe, tokens: int) -> Recall:
    """Complete the fact's sentence (greedy) and score the fact, as ``user``."""
    answer = client.completions(probe.prefix.rstrip(), max_tokens=tokens, temperature=0)
    completion = answer["choices"][0]["text"]
    scored = client.completions(
        probe.prefix + probe.answer, max_tokens=0, echo=True, logprobs=0, temperature=0
    )["choices"][0]["logprobs"]
    fact = [
        -lp
        for lp, offset in zip(scored["token_logprobs"], scored["text_offset"], strict=True)
        if lp is not None and offset >= len(probe.prefix)
    ]
    used = [f"{a['id']}@v{a['version']}" for a in answer["adapterswap"]["adapters"]]
    recalled = probe.answer.lower() in completion.lower()
    return Recall(user, probe.doc_id, completion, recalled, sum(fact) / len(fact), used)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file (the example corpus, its questions and controls)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

"""The defaults, measured: LoRA targets and rank (recall vs cost), router weights vs uniform.

    python benchmarks/lora_choices.py [--steps 40] [--threads 2]

Real training on the embedded model and the example corpus (examples/batch1: three groups
of fictional facts), with our trainer (``ShardTrainer``, no Ray: the numbers are about the
adapter, not the orchestration). Answer NLL is the mean per-token NLL of the answer given
``"Question: ...\\nAnswer:"``, over the questions of examples/questions/batch1.jsonl.

1. Targets and rank: one ``engineering`` adapter per LoRA configuration, same steps. Recall
   (answer NLL on engineering questions), damage (NLL on never-ingested held-out text),
   training seconds, adapter bytes, and the k=3 composition FLOP floor of that choice.
2. Router weights: default adapters for hr, engineering and finance; a caller who holds all
   three groups asks every question. Answer NLL with the correct adapter alone, with our
   router's mixture (defaults: sharp temperature, cut-off), with the paper's uniform top-3
   average, and with the base model.

Writes benchmarks/results/lora_choices.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS, write_result
from compose_overhead import arithmetic_floor
from peft.utils import get_peft_model_state_dict

from adapterswap.compose.bank import AdapterBank
from adapterswap.config import (
    EmbeddingSettings,
    LoraSettings,
    ModelSettings,
    RouterSettings,
    TrainingSettings,
)
from adapterswap.models.base import load_base_model
from adapterswap.models.embedder import load_embedder
from adapterswap.route.router import Candidate, route
from adapterswap.route.stats import compute_shard_stats
from adapterswap.train.loop import ShardTrainer, mean_token_nll, pack_documents
from adapterswap.types import AdapterRef, AdapterStatus, AdapterVersion

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
GROUPS = ("hr", "engineering", "finance")
ALL_LINEAR = LoraSettings().target_modules
CONFIGS = {
    "q,v r16": LoraSettings(rank=16, alpha=32, target_modules=["q_proj", "v_proj"]),
    "attention r16": LoraSettings(
        rank=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    ),
    "all linear r8": LoraSettings(rank=8, alpha=16, target_modules=ALL_LINEAR),
    "all linear r16 (default)": LoraSettings(),
    "all linear r32": LoraSettings(rank=32, alpha=64, target_modules=ALL_LINEAR),
}


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load() -> Any:
    cache = Path("~/.adapterswap/models").expanduser()
    return load_base_model(ModelSettings(spec="embedded", device="cpu"), cache)


@torch.no_grad()
def answer_nll(model: Any, tokenizer: Any, question: str, answer: str) -> float:
    """Mean NLL (nats) of the answer's tokens given the question."""
    prompt = tokenizer(f"Question: {question}\nAnswer:", add_special_tokens=False)["input_ids"]
    target = tokenizer(f" {answer}", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + target])
    labels = ids.clone()
    labels[0, : len(prompt)] = -100
    model.eval()
    return float(model(input_ids=ids, labels=labels).loss)


def train(lora: LoraSettings, texts: list[str], steps: int, seed: int) -> tuple[Any, float]:
    """A trained peft model on ``texts`` (its own base copy) and the training seconds."""
    loaded = load()
    training = TrainingSettings(max_steps=steps)
    blocks = pack_documents(loaded.tokenizer, texts, training.seq_len)
    trainer = ShardTrainer(loaded.model, blocks, lora, training, seed=seed)
    started = time.perf_counter()
    while not trainer.done:
        trainer.step()
    return trainer.model, time.perf_counter() - started


def targets_and_rank(
    steps: int, docs: dict[str, list[dict]], questions: list[dict], base: Any
) -> dict[str, Any]:
    texts = [d["text"] for d in docs["engineering"]]
    asked = [q for q in questions if q["group"] == "engineering"]
    held_out = [d["text"] for d in jsonl(EXAMPLES / "heldout" / "engineering_controls.jsonl")]
    tok = base.tokenizer
    rows = {
        "base model": {
            "recall_nll": statistics.mean(
                answer_nll(base.model, tok, q["question"], q["answer"]) for q in asked
            ),
            "heldout_nll": statistics.mean(mean_token_nll(base.model, tok, t) for t in held_out),
        }
    }
    for name, lora in CONFIGS.items():
        model, seconds = train(lora, texts, steps, seed=0)
        state = get_peft_model_state_dict(model)
        rows[name] = {
            "recall_nll": statistics.mean(
                answer_nll(model, tok, q["question"], q["answer"]) for q in asked
            ),
            "heldout_nll": statistics.mean(mean_token_nll(model, tok, t) for t in held_out),
            "train_s": seconds,
            "adapter_bytes": sum(t.numel() * t.element_size() for t in state.values()),
            "compose_floor_k3": arithmetic_floor(base.model, 3, lora.rank, lora.target_modules)[
                "floor"
            ],
        }
        print(name, {k: round(v, 3) for k, v in rows[name].items()}, flush=True)
    return rows


def router_weights(
    steps: int, docs: dict[str, list[dict]], questions: list[dict], base: Any
) -> dict[str, Any]:
    embedder = load_embedder(EmbeddingSettings())
    bank_model = load()
    bank = AdapterBank(bank_model.model, ALL_LINEAR, 16, 4 * 2**27)
    candidates = []
    for i, group in enumerate(GROUPS):
        texts = [d["text"] for d in docs[group]]
        model, _ = train(LoraSettings(), texts, steps, seed=i)
        ref = AdapterRef(f"{group}.b0001.000", 1)
        bank.load(ref, get_peft_model_state_dict(model), model.peft_config["default"].to_dict())
        version = AdapterVersion(ref.id, 1, ref.id, group, AdapterStatus.ACTIVE, "", 12, "", "")
        stats = compute_shard_stats(texts, embedder.embed, embedder.model_id)
        candidates.append(Candidate(version, stats))
    settings = RouterSettings()
    by_id = {c.version.adapter_id: c.version.ref for c in candidates}
    tok = bank_model.tokenizer
    results: dict[str, list[float]] = {
        "correct alone": [],
        "routed (ours)": [],
        "uniform top-3": [],
    }
    results["base model"] = []
    top1 = 0
    for q in questions:
        correct = by_id[f"{q['group']}.b0001.000"]
        decision = route(embedder.embed([q["question"]])[0], candidates, settings)
        top1 += bool(decision.adapters) and decision.adapters[0].ref == correct
        mixtures = {
            "correct alone": [(correct, 1.0)],
            "routed (ours)": [(a.ref, a.weight) for a in decision.adapters],
            "uniform top-3": [(ref, 1 / 3) for ref in by_id.values()],
            "base model": [],
        }
        for name, rows in mixtures.items():
            with bank.mixture([rows]):
                results[name].append(answer_nll(bank.model, tok, q["question"], q["answer"]))
    summary = {name: statistics.mean(v) for name, v in results.items()}
    summary["router_top1_accuracy"] = top1 / len(questions)
    print({k: round(v, 3) for k, v in summary.items()}, flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=TrainingSettings().max_steps)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--only",
        choices=("targets", "router"),
        help="run one part; the other part's last results are kept in the JSON",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    docs = {g: jsonl(EXAMPLES / "batch1" / f"{g}.jsonl") for g in GROUPS}
    questions = jsonl(EXAMPLES / "questions" / "batch1.jsonl")
    base = load()
    last_path = RESULTS / "lora_choices.json"
    last = json.loads(last_path.read_text()) if last_path.exists() else {}
    if args.only == "router":
        part1 = last.get("targets_and_rank")
    else:
        part1 = targets_and_rank(args.steps, docs, questions, base)
    if args.only == "targets":
        part2 = last.get("router_weights")
    else:
        part2 = router_weights(args.steps, docs, questions, base)
    write_result(
        "lora_choices",
        {
            "model": "embedded",
            "steps": args.steps,
            "threads": args.threads,
            "targets_and_rank": part1,
            "router_weights": part2,
        },
    )


if __name__ == "__main__":
    main()

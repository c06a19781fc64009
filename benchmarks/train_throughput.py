"""Training throughput: our Ray Train path against a plain in-process PEFT loop, same shard.

    python benchmarks/train_throughput.py [--model embedded] [--steps 10] [--threads 2]

Both train the same packed blocks of one shard (the example `hr` documents) with the same
LoRA and optimiser settings and the same number of CPU threads. Steady-state tokens/s is the
median over steps 2..N of each step's tokens/s; end-to-end adds start-up (Ray Train worker
group, model load) and, for Ray, publishing the artifacts. Prints the ratios, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import write_result
from _training import benchmark_config, train_with_ray
from peft import LoraConfig, get_peft_model
from transformers import get_cosine_schedule_with_warmup

from adapterswap.catalog.ingest import ingest_files
from adapterswap.models.base import load_base_model
from adapterswap.train.loop import pack_documents

CORPUS = Path(__file__).resolve().parents[1] / "examples" / "batch1" / "hr.jsonl"


def plain_peft(config, texts: list[str], threads: int) -> dict:
    """The reference: a textbook transformers + peft loop, nothing of ours but the data."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    loaded = load_base_model(config.model, config.model_cache_dir)
    lora, training = config.lora, config.training
    model = get_peft_model(
        loaded.model,
        LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        ),
    )
    blocks = pack_documents(loaded.tokenizer, texts, training.seq_len)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=training.learning_rate
    )
    schedule = get_cosine_schedule_with_warmup(
        optimizer, int(0.1 * training.max_steps), training.max_steps
    )
    batch = min(training.batch_size, len(blocks))  # as the trainer does on a small shard
    rates = []
    model.train()
    for step in range(training.max_steps):
        t = time.perf_counter()
        index = torch.arange(step * batch, (step + 1) * batch) % len(blocks)
        out = model(
            input_ids=blocks.input_ids[index],
            attention_mask=blocks.attention_mask[index],
            labels=blocks.labels[index],
        )
        out.loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        rates.append(int(blocks.attention_mask[index].sum()) / (time.perf_counter() - t))
    return {
        "steady_tokens_per_s": statistics.median(rates[1:]),
        "end_to_end_s": time.perf_counter() - started,
    }


def ray_train(config, threads: int) -> dict:
    events = []
    report, wall = train_with_ray(config, on_progress=events.append)
    rates = [e["tokens_per_s"] for e in events if e["step"] > 1]
    return {
        "steady_tokens_per_s": statistics.median(rates),
        "end_to_end_s": wall,
        "tokens": report.trained[0]["tokens"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    texts = [json.loads(line)["text"] for line in CORPUS.read_text().splitlines()]
    with tempfile.TemporaryDirectory() as home:
        config = benchmark_config(home, args.model, args.steps, args.threads)
        ingest_files([CORPUS], config, embed=None)
        ours = ray_train(config, args.threads)
    plain = plain_peft(config, texts, args.threads)
    steady = ours["steady_tokens_per_s"] / plain["steady_tokens_per_s"]
    e2e = plain["end_to_end_s"] / ours["end_to_end_s"]
    print(
        f"model {args.model}, {args.steps} steps, {args.threads} threads, shard of {len(texts)} docs"
    )
    print(
        f"plain PEFT loop : {plain['steady_tokens_per_s']:8.1f} tokens/s steady, {plain['end_to_end_s']:6.1f} s end to end"
    )
    print(
        f"Ray Train (ours): {ours['steady_tokens_per_s']:8.1f} tokens/s steady, {ours['end_to_end_s']:6.1f} s end to end"
    )
    print(f"ratio ours / plain, steady tokens/s: {steady:.3f}   (end-to-end speed: {e2e:.3f})")
    write_result(
        "train_throughput",
        {
            "model": args.model,
            "steps": args.steps,
            "threads": args.threads,
            "plain_peft": plain,
            "ray_train": ours,
            "steady_ratio": round(steady, 3),
            "end_to_end_ratio": round(e2e, 3),
        },
    )


if __name__ == "__main__":
    main()

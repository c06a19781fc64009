"""Cost of composing LoRA adapters per request, against the base model and against plain peft.

    python benchmarks/compose_overhead.py [--rounds 5] [--new-tokens 32] [--threads N]

Greedy generation (KV cache) of exactly N new tokens on the embedded SmolLM2-135M with random
rank-16 adapters on all seven linear kinds, measured side by side in interleaved rounds
(median per configuration):

- batch 1: the base model; the bank with no mixture; k=3 composed; plain peft per request
  (add_weighted_adapter(..., "cat") + set_adapter, then generate);
- batch 8: 8 base rows; 8 distinct 3-adapter mixtures drawn from a pool of 8 adapters; and
  the worst case, 8 mixtures of 24 pairwise-distinct adapters;
- the serving engine (``adapterswap.engine.loop.Engine``, stepped here in process): batch 1
  base and k=3, batch 8 base and the 8 distinct mixtures, each against the engine's own base;
- the cost of a join: 7 rows with distinct mixtures decode; an 8th request (8 prompt tokens,
  its own mixture) joins. Its step (admission, the 7 rows' decode, its prefill) and the next
  (8 rows, a new mixture layout) against the steady steps before it, and the mixture setup
  of each; then it is cancelled and leaves, and the next one joins.

The arithmetic floor is 1 + LoRA FLOPs / base FLOPs per token, the base counting every
Linear of the model (lm_head included: it is part of the measured time). Also printed: the
floor over the target layers alone. Cold load: one rank-16 adapter from a local PEFT dir
into the bank (files in the page cache). Writes benchmarks/results/compose_overhead.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import write_result
from peft import LoraConfig, PeftModel, get_peft_model

from adapterswap.compose.adapter_files import load_adapter_dir
from adapterswap.compose.bank import AdapterBank
from adapterswap.compose.layer import find_target_linears
from adapterswap.config import LoraSettings, ModelSettings
from adapterswap.engine.loop import Engine, Work
from adapterswap.engine.requests import GenerationRequest, SamplingParams
from adapterswap.models.base import load_base_model
from adapterswap.types import AdapterRef

TARGETS = LoraSettings().target_modules
RANK, ALPHA, K = 16, 32.0, 3
# Distinct adapters each case reads per decode step (U).
DISTINCT = {
    "b1_composed_k3": 3,
    "b1_peft_cat_per_request": 3,
    "b1_peft_cat_generate_only": 3,
    "b8_composed_8_distinct_pool8": 8,
    "b1_engine_composed_k3": 3,
    "b8_engine_8_distinct_pool8": 8,
    "b8_composed_8_distinct_disjoint24": 24,
}
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How many days are in a leap year?",
    "Explain photosynthesis in one sentence.",
    "Name three primary colours.",
    "What does a compiler do?",
    "Give me a synonym for happy.",
    "Who wrote Hamlet?",
]


def load_model() -> Any:
    cache = Path("~/.adapterswap/models").expanduser()
    return load_base_model(ModelSettings(spec="embedded", device="cpu"), cache)


def arithmetic_floor(
    model: torch.nn.Module, k: int, rank: int, targets: list[str] = TARGETS
) -> dict[str, float]:
    """1 + LoRA FLOPs / base FLOPs per token (2 FLOPs per multiply-add on both sides).

    ``adapter_over_base`` is one adapter's weights over the base's Linear weights: a decode
    step is memory-bound, and must read each of the batch's U distinct adapters once, so
    1 + U · adapter_over_base is the memory floor of an unmerged step.
    """
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    targets = find_target_linears(model, targets).values()
    base_all = sum(m.in_features * m.out_features for m in linears)
    base_targets = sum(m.in_features * m.out_features for m in targets)
    one = rank * sum(m.in_features + m.out_features for m in targets)
    return {
        "floor": 1 + k * one / base_all,
        "floor_targets_only": 1 + k * one / base_targets,
        "adapter_over_base": one / base_all,
    }


def make_adapters(n: int, root: Path) -> list[Path]:
    """``n`` random rank-16 PEFT adapter dirs (B != 0), saved as save_pretrained writes them."""
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(load_model().model, config)
    dirs = []
    for i in range(n):
        torch.manual_seed(i)
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(param, std=0.02)
        peft_model.save_pretrained(root / f"a{i}")
        dirs.append(root / f"a{i}")
    return dirs


def generate(model: Any, inputs: dict[str, torch.Tensor], new_tokens: int, pad: int) -> None:
    with torch.no_grad():
        model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # never stop early at EOS: equal work everywhere
            do_sample=False,
            use_cache=True,
            pad_token_id=pad,
        )


def on_engine(engine: Engine, prompts: list[list[int]], rows: list, new_tokens: int) -> Callable:
    """Every prompt submitted at once to ``engine`` with its row's mixture, stepped to the end."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)

    def run() -> None:
        done: list[Any] = []
        for ids, row in zip(prompts, rows, strict=True):
            engine.submit(Work(ids, GenerationRequest(ids, params), tuple(row), done.append))
        while len(done) < len(prompts):
            engine.step()

    return run


def join_cost(engine: Engine, prompts: list[list[int]], rows: list, trials: int) -> dict:
    """Median milliseconds of steady, join and after-join steps (and their mixture setup)."""
    params = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)
    running = [
        engine.submit(Work(ids, GenerationRequest(ids, params), tuple(row), print))
        for ids, row in zip(prompts[:7], rows[:7], strict=True)
    ]
    while any(w.pending is None for w in running):
        engine.step()  # every prompt prefilled: the 7 rows decode
    times: dict[str, list[float]] = {}

    def timed(name: str) -> None:
        t = time.perf_counter()
        engine.step()
        times.setdefault(name, []).append(1e3 * (time.perf_counter() - t))
        times.setdefault(f"{name}_setup", []).append(engine.stats.compose_ms)

    for _ in range(trials):
        for _step in range(3):
            timed("steady")
        ids = prompts[7][:8]
        mixture = tuple(rows[7])  # adapters no running row uses
        joiner = engine.submit(Work(ids, GenerationRequest(ids, params), mixture, print))
        timed("join")
        timed("after_join")
        joiner.cancel()
        engine.step()  # it leaves
    for work in running:
        work.cancel()
    engine.step()
    return {name: statistics.median(ms) for name, ms in times.items()}


def mixtures(refs: list[AdapterRef], rows: int, disjoint: bool) -> list[list]:
    """``rows`` distinct k=3 mixtures with distinct weights, from ``refs``."""
    out = []
    for b in range(rows):
        picks = refs[3 * b : 3 * b + 3] if disjoint else [refs[(b + j * 3) % 8] for j in range(3)]
        out.append(list(zip(picks, (0.6 - 0.02 * b, 0.3, 0.1 + 0.02 * b), strict=True)))
    return out


def cold_load_ms(bank: AdapterBank, dirs: list[Path]) -> list[float]:
    times = []
    for i, path in enumerate(dirs):
        t = time.perf_counter()
        bank.load(AdapterRef(f"cold{i}", 1), *load_adapter_dir(path))
        times.append((time.perf_counter() - t) * 1e3)
    return times


def peft_per_request(peft_model: Any, names: list[str], weights: list[float]) -> Callable:
    """Plain peft's per-request path: build the weighted 'cat' adapter, activate, generate."""

    def run(inputs: dict, new_tokens: int, pad: int) -> None:
        peft_model.add_weighted_adapter(names, weights, "mix", combination_type="cat")
        peft_model.set_adapter("mix")
        generate(peft_model, inputs, new_tokens, pad)
        with warnings.catch_warnings():  # "Adapter mix was active": yes, on purpose
            warnings.simplefilter("ignore")
            peft_model.delete_adapter("mix")

    return run


def build_cases(args: argparse.Namespace, root: Path) -> tuple[dict[str, Callable], dict]:
    """Every configuration as a zero-argument callable, plus facts about the setup."""
    base, composed_model, peft_base = load_model(), load_model(), load_model()
    tok = base.tokenizer
    tok.padding_side = "left"
    one = tok(PROMPTS[:1], return_tensors="pt")
    eight = tok(PROMPTS, return_tensors="pt", padding=True)
    dirs = make_adapters(24, root)
    bank = AdapterBank(composed_model.model, TARGETS, RANK, 30 * 2**20 * 24)
    refs = [AdapterRef(f"a{i}", 1) for i in range(24)]
    for ref, path in zip(refs, dirs, strict=True):
        bank.load(ref, *load_adapter_dir(path))
    peft_model = PeftModel.from_pretrained(peft_base.model, dirs[0], adapter_name="a0")
    for i in (1, 2):
        peft_model.load_adapter(dirs[i], adapter_name=f"a{i}")
    n, pad = args.new_tokens, tok.pad_token_id
    row = [(refs[0], 0.6), (refs[1], 0.3), (refs[2], 0.1)]
    by_pool, disjoint = mixtures(refs, 8, False), mixtures(refs, 8, True)

    def in_mixture(rows: list, inputs: dict) -> Callable:
        def run() -> None:
            with bank.mixture(rows):
                generate(bank.model, inputs, n, pad)

        return run

    peft_run = peft_per_request(peft_model, ["a0", "a1", "a2"], [0.6, 0.3, 0.1])
    peft_model.add_weighted_adapter(["a0", "a1", "a2"], [0.6, 0.3, 0.1], "fixed", "cat")

    def peft_generate_only() -> None:
        peft_model.set_adapter("fixed")
        generate(peft_model, one, n, pad)

    ids = [tok(p)["input_ids"] for p in PROMPTS]
    plain, composing = Engine(base.model, tok), Engine(bank.model, tok, bank=bank)
    cases = {
        "b1_base": lambda: generate(base.model, one, n, pad),
        "b1_bank_no_mixture": lambda: generate(bank.model, one, n, pad),
        "b1_composed_k3": in_mixture([row], one),
        "b1_peft_cat_per_request": lambda: peft_run(one, n, pad),
        "b1_peft_cat_generate_only": peft_generate_only,
        "b8_base": lambda: generate(base.model, eight, n, pad),
        "b8_composed_8_distinct_pool8": in_mixture(by_pool, eight),
        "b8_composed_8_distinct_disjoint24": in_mixture(disjoint, eight),
        "b1_engine_base": on_engine(plain, ids[:1], [[]], n),
        "b1_engine_composed_k3": on_engine(composing, ids[:1], [row], n),
        "b8_engine_base": on_engine(plain, ids, [[]] * 8, n),
        "b8_engine_8_distinct_pool8": on_engine(composing, ids, by_pool, n),
    }
    facts = {
        "cold_load_ms": cold_load_ms(bank, dirs[:5]),
        "slot_bytes": bank.slot_bytes,
        "join_ms": join_cost(composing, ids, disjoint, args.rounds),
    }
    return cases, facts


def measure(cases: dict[str, Callable], rounds: int) -> dict[str, float]:
    """Median seconds per case over interleaved rounds (after one warm-up round)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(rounds + 1):
        for name, run in cases.items():
            t = time.perf_counter()
            run()
            if r:
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if os.getloadavg()[0] > 0.5 * os.cpu_count():
        print(f"warning: load average {os.getloadavg()} on {os.cpu_count()} CPUs: noisy timings")
    with tempfile.TemporaryDirectory() as tmp:
        cases, facts = build_cases(args, Path(tmp))
        floors = arithmetic_floor(load_model().model, K, RANK)
        median = measure(cases, args.rounds)
    ratios = {}
    print(
        f"FLOP floor {floors['floor']:.3f}x (target layers only: {floors['floor_targets_only']:.3f}x)"
    )
    for name, seconds in median.items():
        engine = "_engine" if "_engine_" in name else ""
        base = median[f"{name[:2]}{engine}_base"]
        ratio, unique = seconds / base, DISTINCT.get(name, 0)
        memory_floor = 1 + unique * floors["adapter_over_base"]
        ratios[name] = {
            "seconds": seconds,
            "vs_base": ratio,
            "vs_floor": ratio / floors["floor"],
            "distinct_adapters": unique,
            "memory_floor": memory_floor,
        }
        print(
            f"{name:36s} {seconds:7.3f} s  {ratio:5.3f}x base  {ratio / floors['floor']:5.3f}x "
            f"FLOP floor   memory floor (U={unique}) {memory_floor:.3f}x"
        )
    join = facts["join_ms"]
    print(
        "a join, 7 rows decoding: steady / join / next step "
        f"{join['steady']:.1f} / {join['join']:.1f} / {join['after_join']:.1f} ms, of which "
        f"mixture setup {join['steady_setup']:.2f} / {join['join_setup']:.2f} / "
        f"{join['after_join_setup']:.2f} ms"
    )
    cold = facts["cold_load_ms"]
    print(f"cold load of one rank-16 adapter: median {statistics.median(cold):.1f} ms {cold}")
    goals = {
        "b1_k3_within_1.05x_floor": ratios["b1_composed_k3"]["vs_floor"] <= 1.05,
        "b8_distinct_within_1.10x_floor": ratios["b8_composed_8_distinct_pool8"]["vs_floor"]
        <= 1.10,
        "b8_engine_distinct_within_1.15x_base": ratios["b8_engine_8_distinct_pool8"]["vs_base"]
        <= 1.15,
        "cold_load_within_50ms": statistics.median(cold) <= 50,
    }
    print("goals:", goals)
    write_result(
        "compose_overhead",
        {
            "model": "embedded",
            "threads": args.threads,
            "rounds": args.rounds,
            "new_tokens": args.new_tokens,
            "load_average": os.getloadavg(),
            **floors,
            **facts,
            "results": ratios,
            "goals": goals,
        },
    )


if __name__ == "__main__":
    main()

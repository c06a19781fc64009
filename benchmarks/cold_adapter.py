"""A cold adapter against a running batch: what prefetch into the host tier costs the cold
request and the rows already decoding.

    python benchmarks/cold_adapter.py [--trials 8] [--rows 4] [--threads 1] [--storage-ms 0]

The serving engine (``adapterswap.engine.loop.Engine``, stepped here in process) with the
adapter tiers (``adapterswap.engine.adapter_tiers``) on the embedded SmolLM2-135M: ``--rows``
rows with warm rank-16 adapters decode; each trial submits a request whose rank-16 adapter
was never loaded (a PEFT dir on local disk, in the page cache), and steps on. Measured side
by side in the same run:

- ``load_ms``: from the cold request's submission to its adapter being in the host tier
  (read, parsed, checked, copied, on the prefetch pool);
- ``ttft_ms``: the cold request's time to first token, and ``ttft_ms_warm`` that of the same
  request with its adapter already in the bank, submitted the same way right after it;
  ``cold_extra_ms`` the difference, what being cold cost it (the goal: at most its load
  time, which a row can only join at a step boundary after);
- the running rows' steps: ``step_ms_steady`` with nothing joining, ``step_ms_warm_join``
  the step a warm request joins in (its prefill included), ``step_ms_cold_join`` the steps
  from the cold request's submission to its first token (``steps_to_cold_first_token`` of
  them; each gave every running row a token), against ``step_ms_in_step_load``, the old
  path measured here too: a warm join step plus another cold adapter loaded synchronously
  into the bank (``AdapterBank.get_or_load``, ``sync_load_ms``), which every running row
  waited for when the engine loaded a miss inside its step.

``--storage-ms`` adds that much waiting to every read, as remote storage (``s3://``) would:
time that uses no CPU. Writes benchmarks/results/cold_adapter_storage<ms>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import write_result
from compose_overhead import PROMPTS, RANK, TARGETS, load_model, make_adapters

from adapterswap.compose.adapter_files import load_adapter_dir
from adapterswap.compose.bank import AdapterBank
from adapterswap.compose.layer import find_target_linears
from adapterswap.engine.adapter_tiers import AdapterTiers
from adapterswap.engine.host_cache import HostCache
from adapterswap.engine.loop import Engine, Work
from adapterswap.engine.requests import GenerationRequest, SamplingParams
from adapterswap.types import AdapterRef


class DirSource:
    """Adapters from PEFT directories on local disk, by ref, each read after ``wait_s`` (the
    round trips of remote storage)."""

    def __init__(self, dirs: dict[AdapterRef, Path], wait_s: float) -> None:
        self.dirs, self.wait_s = dirs, wait_s

    def load(self, ref: AdapterRef) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        time.sleep(self.wait_s)
        return load_adapter_dir(self.dirs[ref])


def first_token(engine: Engine, ids: list[int], ref: AdapterRef) -> tuple[float, list[float]]:
    """Submit a request on ``ref`` beside the running rows, step until its first token, then
    until it has left: its time to first token, and the times (ms) of the steps until then."""
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    work = Work(ids, GenerationRequest(ids, params), [(ref, 1.0)], on_done=lambda _: None)
    rows = engine.kv.count
    engine.submit(work)
    steps = []
    while work.first_token_at is None:
        steps.append(timed_step(engine))
    while engine.kv.count > rows:
        engine.step()
    return 1e3 * (work.first_token_at - work.queued_at), steps


def trial(engine: Engine, tiers: AdapterTiers, ids: list[int], refs: list[AdapterRef]) -> dict:
    """Requests on a warm adapter (``refs[0]``, in the bank), on a cold one (``refs[1]``,
    prefetched), and a load of another cold one (``refs[2]``) into the bank the old way,
    synchronously, beside the running rows."""
    ready: list[float] = []
    wake = tiers.on_ready
    tiers.on_ready = lambda: (ready.append(time.perf_counter()), wake())
    steady = [timed_step(engine) for _ in range(5)]
    warm, warm_steps = first_token(engine, ids, refs[0])
    submitted = time.perf_counter()
    cold, cold_steps = first_token(engine, ids, refs[1])
    tiers.on_ready = wake
    started = time.perf_counter()
    engine.bank.get_or_load(refs[2], tiers.source.load)
    sync_load = 1e3 * (time.perf_counter() - started)
    return {
        "load_ms": 1e3 * (ready[0] - submitted),
        "ttft_ms_warm": warm,
        "ttft_ms_cold": cold,
        "cold_extra_ms": cold - warm,
        "step_ms_steady": statistics.median(steady),
        "steps_warm_join": warm_steps,
        "steps_cold_join": cold_steps,
        # the old path: the join step waited for the load, and every running row with it
        "step_ms_in_step_load": sync_load + warm_steps[0],
        "sync_load_ms": sync_load,
    }


def timed_step(engine: Engine) -> float:
    started = time.perf_counter()
    engine.step()
    return 1e3 * (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--storage-ms", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if os.getloadavg()[0] > 0.5 * os.cpu_count():
        print(f"warning: load average {os.getloadavg()} on {os.cpu_count()} CPUs: noisy timings")
    loaded = load_model()
    tok = loaded.tokenizer
    n = args.rows + 2 * args.trials
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(n, Path(tmp))
        refs = [AdapterRef(f"a{i}", 1) for i in range(n)]
        dirs = dict(zip(refs, paths, strict=True))
        model = loaded.model
        linears = find_target_linears(model, TARGETS).values()
        slot = 4 * RANK * sum(m.in_features + m.out_features for m in linears)  # fp32
        bank = AdapterBank(model, TARGETS, RANK, n * slot)  # room for all: no eviction here
        tiers = AdapterTiers(bank, HostCache(2**30), DirSource(dirs, args.storage_ms / 1e3))
        engine = Engine(model, tok, bank=bank, tiers=tiers, max_rows=args.rows + 1)
        long = SamplingParams(max_tokens=10_000 // 4, temperature=0, ignore_eos=True)
        prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
        for i in range(args.rows):  # the running rows, their adapters warm
            ids = prompts[i % len(prompts)]
            engine.submit(Work(ids, GenerationRequest(ids, long), [(refs[i], 1.0)], print))
        while engine.kv.count < args.rows or engine.kv.decoding < args.rows:
            engine.step()
        results = []
        for t in range(args.trials):
            cold, old = refs[args.rows + 2 * t], refs[args.rows + 2 * t + 1]
            results.append(trial(engine, tiers, prompts[-1], [refs[0], cold, old]))
    keys = ("load_ms", "sync_load_ms", "ttft_ms_warm", "ttft_ms_cold", "cold_extra_ms")
    summary = {key: statistics.median(r[key] for r in results) for key in keys}
    summary["step_ms_steady"] = statistics.median(r["step_ms_steady"] for r in results)
    summary["step_ms_warm_join"] = statistics.median(r["steps_warm_join"][0] for r in results)
    summary["step_ms_cold_join"] = statistics.median(sum(r["steps_cold_join"]) for r in results)
    summary["steps_to_cold_first_token"] = statistics.median(
        len(r["steps_cold_join"]) for r in results
    )
    summary["step_ms_in_step_load"] = statistics.median(r["step_ms_in_step_load"] for r in results)
    summary["cold_extra_over_load"] = summary["cold_extra_ms"] / summary["load_ms"]
    for key, value in summary.items():
        print(f"{key:28s} {value:8.2f}")
    write_result(
        f"cold_adapter_storage{args.storage_ms:g}",
        {
            "storage_ms": args.storage_ms,
            "model": "embedded",
            "rank": RANK,
            "rows": args.rows,
            "threads": args.threads,
            "trials": results,
            "median": summary,
        },
    )


if __name__ == "__main__":
    main()

"""serve_scale.py's traffic: callers holding 1, 5 or 50 groups, Zipf popularity over the
adapters each may see, and the requests they send (see serve_scale's module docstring)."""

from __future__ import annotations

import asyncio
import math
import random
import time
from bisect import bisect_left
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import httpx2 as httpx
from _population import group_name
from serve_traffic import Outcome, Request, send, words

from adapterswap.store.registry import AdapterRegistry

ZIPF_S = 1.0
AUTO_SHARE = 0.3
MAX_TOKENS = 16
MIXTURE_WEIGHTS = {1: (1.0,), 2: (0.7, 0.3), 3: (0.6, 0.3, 0.1)}
PROMPT_WORDS = (8, 24)


@dataclass(frozen=True)
class Caller:
    """A key and the groups it holds."""

    kind: str  # "1 group", "5 groups", "50 groups"
    groups: tuple[str, ...]
    key: str = ""


def caller_groups(groups: int) -> list[Caller]:
    """Ten callers of one group, two of five, one of all ``groups``: every caller holds
    adapters from 10 adapters up (adapter i is in group i % groups)."""
    names = [group_name(g) for g in range(groups)]
    return (
        [Caller("1 group", (names[g],)) for g in range(10)]
        + [Caller("5 groups", tuple(names[g : g + 5])) for g in (0, 5)]
        + [Caller(f"{groups} groups", tuple(names))]
    )


def create_keys(registry: AdapterRegistry, callers: list[Caller]) -> list[Caller]:
    """The callers with a key each, from the real key store."""
    return [
        Caller(c.kind, c.groups, registry.create_key(f"bench{i}", c.groups)[0])
        for i, c in enumerate(callers)
    ]


def zipf_weights(n: int, s: float = ZIPF_S, seed: int = 0) -> list[float]:
    """Adapter i's popularity: 1 / rank(i)^s, the ranks a seeded permutation of 1..n.

    A prefix of a larger population keeps its relative popularity only if ranks are drawn
    per population: they are, so every size has a few hot adapters and a long tail."""
    ranks = list(range(1, n + 1))
    random.Random(seed).shuffle(ranks)
    return [1.0 / r**s for r in ranks]


class Popularity:
    """Zipf draws over the adapters a caller may see (the global weights restricted to them)."""

    def __init__(self, adapters: list[tuple[str, str]], weights: list[float]) -> None:
        self.adapters = adapters
        self.weights = weights
        self._cum: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def draw(self, rng: random.Random, groups: tuple[str, ...], k: int) -> list[int]:
        """``k`` distinct adapter indices the groups hold (fewer if they hold fewer)."""
        if groups not in self._cum:
            held = set(groups)
            visible = [i for i, (_, g) in enumerate(self.adapters) if g in held]
            self._cum[groups] = (visible, list(accumulate(self.weights[i] for i in visible)))
        visible, cum = self._cum[groups]
        chosen: list[int] = []
        while len(chosen) < min(k, len(visible)):
            i = visible[min(bisect_left(cum, rng.random() * cum[-1]), len(cum) - 1)]
            if i not in chosen:
                chosen.append(i)
        return chosen


def traffic(
    n: int,
    rate: float,
    seed: int,
    callers: list[Caller],
    popularity: Popularity,
    topics: dict[str, str],
) -> list[tuple[str, Request]]:
    """``n`` (key, request) pairs arriving at ``rate`` per second (``math.inf``: at once)."""
    rng, pool, at, out = random.Random(seed), words(), 0.0, []
    kinds = sorted({c.kind for c in callers})
    for _ in range(n):
        at += 0.0 if math.isinf(rate) else rng.expovariate(rate)
        kind = rng.choice(kinds)
        caller = rng.choice([c for c in callers if c.kind == kind])
        stream = rng.random() < 0.5
        if rng.random() < AUTO_SHARE:
            (hot,) = popularity.draw(rng, caller.groups, 1)
            group = popularity.adapters[hot][1]
            prompt, adapters = " ".join([topics[group], *rng.sample(pool, 4)]), "auto"
        else:
            chosen = popularity.draw(rng, caller.groups, rng.randint(1, 3))
            weights = MIXTURE_WEIGHTS[len(chosen)]
            adapters = [
                {"id": popularity.adapters[i][0], "weight": w}
                for i, w in zip(chosen, weights, strict=True)
            ]
            length = rng.randint(*PROMPT_WORDS)
            start = rng.randrange(len(pool) - length)
            prompt = " ".join(pool[start : start + length])
        out.append((caller.key, Request(at, body(prompt, adapters, stream))))
    return out


def body(prompt: str, adapters: Any, stream: bool, max_tokens: int = MAX_TOKENS) -> dict:
    return {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "adapters": adapters,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    }


async def drive_async(url: str, requests: list[tuple[str, Request]]) -> list[Outcome]:
    """Each request at its arrival time, with its caller's key."""
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as http:
        t0 = time.perf_counter()
        return await asyncio.gather(*(send(http, url, key, r, t0) for key, r in requests))


def drive(base_url: str, requests: list[tuple[str, Request]]) -> list[Outcome]:
    return asyncio.run(drive_async(f"{base_url}/v1/completions", requests))

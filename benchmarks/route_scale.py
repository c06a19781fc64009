"""Routing and listing at scale: the routing index against the per-shard loop it replaced.

    python benchmarks/route_scale.py [--sizes 10,100,1000,5000] [--requests 200]
        [--versions 5000] [--faiss DIR]

1. **Router latency**: 10 to 5,000 active shards over 50 groups (shard ``i`` in group
   ``i % 50``), each with 8-32 synthetic unit chunk embeddings (d = 384: a centre per group,
   an offset per shard, noise per chunk), queried by callers holding 1, 5 and 50 groups. Per
   request, as the gateway does it, from the caller's groups to the decision: the old path
   (``ActiveSet.visible``, a ``Candidate`` per shard, ``route()``: ``score_shards`` shard by
   shard) and the new (``visible``, ``RoutingIndex.add``/``score``, ``decide``), alternated
   request by request; p50/p99. The query embedding is given (embedding it is the same cost
   on both paths).
2. **Index updates**: at the largest size, one version superseded (the eviction hook drops
   the old rows, a request reads the new stats and repacks its group), and a full rebuild.
3. **Sync**: a real store (SQLite, this machine's disk) with ``--versions`` active versions
   plus as many revoked ones: ``ActiveSet.sync`` after one activation, by delta
   (``active_changes``) and by full snapshot (``active_snapshot``).
4. **Listing**: ``GET /v1/adapters``'s work (``list_adapters``) for a caller seeing every
   shard, first page and a deep cursor, and the store's keyset page (``adapterswap adapters``)
   at the first version and past the last but 100, against reading every version.
5. **A vector-search library**: with ``--faiss DIR`` (faiss-cpu installed there, e.g.
   ``pip install --target DIR faiss-cpu``; not a dependency), the 50-group caller's product
   by faiss's exact inner-product index (every row, as the kernel density needs) and by HNSW
   (approximate top 256 rows), against numpy's product.

Timings are ratios measured side by side in one run (the machine is shared: the load
average at the start and end is recorded). BLAS runs on one thread, as in the Serve ingress
replica (Ray sets ``OMP_NUM_THREADS`` to an actor's CPUs, 1 by default): on two busy cores,
a second OpenBLAS thread made a 10,000-row product 15 times slower (5.0 ms against 0.33 ms).
Writes results/route_scale.json and results/route_scale.png.
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # before numpy loads OpenBLAS
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from _common import RESULTS, write_result  # noqa: E402
from _plots import panel_lines  # noqa: E402

from adapterswap.config import RouterSettings  # noqa: E402
from adapterswap.route.active_set import ActiveSet  # noqa: E402
from adapterswap.route.index import RoutingIndex  # noqa: E402
from adapterswap.route.router import Candidate, decide, route  # noqa: E402
from adapterswap.route.stats import ShardStats, fit_shard_stats  # noqa: E402
from adapterswap.store.registry import AdapterRegistry  # noqa: E402
from adapterswap.types import AdapterRef, AdapterVersion, Principal  # noqa: E402

GROUPS = 50
DIM = 384
CALLERS = (1, 5, 50)  # groups a caller holds
GOAL_MS = 5.0


def group(i: int) -> str:
    return f"g{i % GROUPS:02d}"


def population(size: int, seed: int = 0) -> dict[AdapterRef, tuple[AdapterVersion, ShardStats]]:
    """``size`` shards over the groups: unit chunks around a group centre and a shard offset."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(GROUPS, DIM))
    out = {}
    for i in range(size):
        n = int(rng.integers(8, 33))
        shard = centres[i % GROUPS] + 0.8 * rng.normal(size=DIM)
        chunks = shard + 0.8 * rng.normal(size=(n, DIM))
        version = AdapterVersion(
            f"{group(i)}.b0001.{i:04d}", 1, f"{group(i)}.b0001.{i:04d}", group(i), "active",
            "mem://x", n, "2026-12-01T00:00:00+00:00", "2026-12-01T00:00:00+00:00",
        )  # fmt: skip
        out[version.ref] = (version, fit_shard_stats(chunks, "synthetic"))
    return out


def _quantiles(times_s: list[float]) -> dict[str, float]:
    ms = sorted(1000 * t for t in times_s)
    return {
        "p50_ms": round(statistics.median(ms), 4),
        "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 4),
    }


def _timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def old_path(active: ActiveSet, stats, groups: list[str], q: np.ndarray, settings) -> Any:
    """Before the index: a Candidate per visible shard, scored shard by shard."""
    candidates = [Candidate(v, stats[v.ref]) for v in active.visible(groups)]
    return route(q, candidates, settings)


def index_path(active: ActiveSet, index: RoutingIndex, groups, q: np.ndarray, settings) -> Any:
    """The gateway's ``_decide`` on one text: the caller's groups, the index, the decision."""
    visible = active.visible(groups)
    index.add(visible)
    return decide(*index.score(q, visible), settings)


def router_latency(size: int, requests: int, settings: RouterSettings) -> dict[str, Any]:
    """Old path and index path, alternated request by request, per caller size."""
    shards = population(size)
    stats = {ref: s for ref, (_, s) in shards.items()}
    index = RoutingIndex(stats.__getitem__)
    active = ActiveSet(lambda: (1, [v for v, _ in shards.values()]), index.retain)
    active.sync()
    index.add(active.visible([group(i) for i in range(GROUPS)]))  # every stat read once
    rng = np.random.default_rng(1)
    out: dict[str, Any] = {}
    for holds in CALLERS:
        groups = [group(i) for i in range(holds)]
        old, new, agree = [], [], 0
        for q in rng.normal(size=(requests, DIM)):
            started = time.perf_counter()
            a = old_path(active, stats, groups, q, settings)
            old.append(time.perf_counter() - started)
            started = time.perf_counter()
            b = index_path(active, index, groups, q, settings)
            new.append(time.perf_counter() - started)
            agree += [x.ref for x in a.adapters] == [x.ref for x in b.adapters]
        out[str(holds)] = {
            "visible_shards": len(active.visible(groups)),
            "old": _quantiles(old),
            "index": _quantiles(new),
            "same_decisions": agree / requests,
        }
        print(size, holds, out[str(holds)], flush=True)
    return out


def index_updates(size: int) -> dict[str, float]:
    """One supersede (drop, read, repack its group) and a full rebuild, in ms."""
    shards = population(size)
    stats = {ref: s for ref, (_, s) in shards.items()}
    versions = [v for v, _ in shards.values()]
    index = RoutingIndex(stats.__getitem__)
    rebuild = _timed(lambda: (index.add(versions), index.score(np.ones(DIM), versions)))
    old = versions[0]
    new = AdapterVersion(old.adapter_id, 2, old.shard, old.group, "active", "mem://x", 1, "t", "t")
    stats[new.ref] = stats[old.ref]
    keep = {v.ref for v in versions[1:]} | {new.ref}
    mine = [v for v in versions[1:] if v.group == old.group] + [new]
    drop = _timed(lambda: index.retain(keep))
    add = _timed(lambda: index.add([new]))
    repack = _timed(lambda: index.score(np.ones(DIM), mine))
    return {
        "rebuild_ms": 1000 * rebuild,
        "drop_ms": 1000 * drop,
        "add_ms": 1000 * add,
        "repack_group_ms": 1000 * repack,
    }


def _filled_store(path: Path, versions: int) -> AdapterRegistry:
    """A store with ``versions`` active versions and as many superseded ones."""
    registry = AdapterRegistry(path)
    registry._conn.execute("PRAGMA synchronous = OFF")  # set-up only: 2 × versions commits
    for round_ in range(2):
        for i in range(versions):
            v = registry.register_version(f"{group(i)}.b0001.{i:05d}", group(i), "mem://x", [])
            registry.activate(v.adapter_id, v.version)
        print(f"store: round {round_ + 1} of 2 written", flush=True)
    registry._conn.execute("PRAGMA synchronous = FULL")
    return registry


def sync_cost(registry: AdapterRegistry, rounds: int) -> dict[str, Any]:
    """ActiveSet.sync after one activation: by delta and by full snapshot, alternated."""
    by_delta = ActiveSet(
        registry.active_snapshot, lambda keep: [], registry.epoch, registry.active_changes
    )
    by_snapshot = ActiveSet(registry.active_snapshot, lambda keep: [], registry.epoch)
    by_delta.sync()
    by_snapshot.sync()
    delta, full = [], []
    for i in range(rounds):
        v = registry.register_version(f"{group(i)}.b0001.{i:05d}", group(i), "mem://x", [])
        registry.activate(v.adapter_id, v.version)
        delta.append(_timed(by_delta.sync))
        full.append(_timed(by_snapshot.sync))
        assert by_delta.refs() == by_snapshot.refs()
    return {"delta": _quantiles(delta), "snapshot": _quantiles(full)}


def listing(registry: AdapterRegistry, shards: int, rounds: int) -> dict[str, Any]:
    """The HTTP listing's work and the store's keyset pages, in ms."""
    from adapterswap.api.inference import InferenceEndpoints

    population_ = population(shards)
    gateway = InferenceEndpoints()
    gateway.active = ActiveSet(lambda: (1, [v for v, _ in population_.values()]), lambda k: [])
    everyone = Principal("bench", "bench", tuple(group(i) for i in range(GROUPS)), False)
    ids = sorted(v.adapter_id for v, _ in population_.values())
    last = ids[max(0, len(ids) - 101)]  # the last page but one: 100 after it
    versions = registry.list_versions()
    total, tail = len(versions), versions[max(0, len(versions) - 101)]
    cases = {
        "http_first_page": lambda: gateway.list_adapters(everyone, 100),
        "http_deep_page": lambda: gateway.list_adapters(everyone, 100, last),
        "store_first_page": lambda: registry.list_versions(limit=100),
        "store_deep_page": lambda: registry.list_versions(
            after=(tail.adapter_id, tail.version), limit=100
        ),
        "store_every_version": lambda: registry.list_versions(),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            times[name].append(_timed(case))
    return {"http_shards": shards, "store_versions": total} | {
        name: _quantiles(t) for name, t in times.items()
    }


def vector_library(directory: str, size: int, requests: int) -> dict[str, Any]:
    """numpy's product against faiss's exact and HNSW indexes on the 50-group caller's rows."""
    sys.path.append(directory)  # after the venv: its numpy wins
    import faiss

    rows = np.concatenate([s.chunks for _, s in population(size).values()]).astype(np.float32)
    flat = faiss.IndexFlatIP(DIM)
    flat.add(rows)
    hnsw = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
    build = _timed(lambda: hnsw.add(rows))
    queries = np.random.default_rng(2).normal(size=(requests, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    numpy_, exact, approx = [], [], []
    for q in queries:
        numpy_.append(_timed(lambda q=q: rows @ q))
        exact.append(_timed(lambda q=q: flat.search(q[None], rows.shape[0])))
        approx.append(_timed(lambda q=q: hnsw.search(q[None], 256)))
    return {
        "faiss": faiss.__version__,
        "rows": int(rows.shape[0]),
        "numpy_product": _quantiles(numpy_),
        "faiss_flat_every_row": _quantiles(exact),
        "faiss_hnsw_top256": _quantiles(approx),
        "hnsw_build_s": round(build, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000,5000")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--versions", type=int, default=5000)
    parser.add_argument("--faiss", help="a directory holding faiss-cpu (pip install --target)")
    parser.add_argument("--plot-only", action="store_true", help="plot the last results again")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.plot_only:
        plot(json.loads((RESULTS / "route_scale.json").read_text()), sizes)
        return
    settings = RouterSettings()
    result: dict[str, Any] = {"groups": GROUPS, "dim": DIM, "chunks_per_shard": [8, 32]}
    result["load_average_start"] = os.getloadavg()
    result["router"] = {str(s): router_latency(s, args.requests, settings) for s in sizes}
    result["index_updates"] = index_updates(max(sizes))
    print(result["index_updates"], flush=True)
    with tempfile.TemporaryDirectory() as home:
        registry = _filled_store(Path(home) / "store.sqlite", args.versions)
        result["sync"] = sync_cost(registry, 50)
        print(result["sync"], flush=True)
        result["listing"] = listing(registry, max(sizes), 50)
        print(result["listing"], flush=True)
        registry.close()
    if args.faiss:
        result["vector_library"] = vector_library(args.faiss, max(sizes), args.requests // 4)
        print(result["vector_library"], flush=True)
    result["load_average_end"] = os.getloadavg()
    write_result("route_scale", result)
    plot(result, sizes)


def plot(result: dict[str, Any], sizes: list[int]) -> None:
    """A panel per caller: p50 and p99 of both paths against the active shards."""
    panels = {
        f"caller holds {holds} group{'s' if holds > 1 else ''}": {
            f"{name} {q}": [
                (size, result["router"][str(size)][str(holds)][path][f"{q}_ms"]) for size in sizes
            ]
            for name, path in (("per-shard loop", "old"), ("index", "index"))
            for q in ("p50", "p99")
        }
        for holds in CALLERS
    }
    panel_lines(
        RESULTS / "route_scale.png",
        title=f"Router ms per request ({GROUPS} groups, d={DIM}, 8-32 chunks per shard; "
        f"goal p99 < {GOAL_MS:g} ms at 5,000)",
        panels=panels,
        xlabel="active shards",
        log=True,
        xlog=True,
    )


if __name__ == "__main__":
    main()

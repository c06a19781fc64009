"""``adapterswap demo``: the product end to end on the example corpus, in a fresh home.

1. ingest the example organisation's first batch (three access groups);
2. train one adapter per shard through Ray Train, with progress;
3. serve it (Ray Serve, HTTP on a free local port);
4. ask the same questions as two users with different groups: answers, the adapters that
   served them, and whether each recalls the fact;
5. delete a document: its fact is gone, its shard's other facts remain, ``verify-forget``;
6. ingest and train a second batch: the first batch's answers are unchanged;
7. write a report (markdown and PNG plots).

Recall is probed the way a document-trained adapter learns: the model completes the fact's
sentence up to the fact (``completions``, greedy), and the fact's per-token NLL is read from
``echo`` log-probabilities. It runs in ``<home>/demo`` and never touches the user's state.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from adapterswap.api.client import Client
from adapterswap.catalog.dataset import Catalog
from adapterswap.catalog.ingest import ingest_files
from adapterswap.config import AdapterSwapConfig, load_config
from adapterswap.delete.verify_forget import http_scorer, verify_forget
from adapterswap.errors import AdapterSwapError
from adapterswap.models.embedder import load_embedder
from adapterswap.storage.privacy import private_home
from adapterswap.store.registry import AdapterRegistry

Echo = Callable[[str], None]
# Each example group holds ~800 tokens in two topics; this bound makes two shards each.
DEMO_SHARD_TOKENS = 500
DEMO_STEPS = 20  # with lr 2e-3, enough for a 6-document shard to memorise its facts
USERS = {"alice": ["hr", "engineering"], "bob": ["finance"]}
DELETE = "eng-001"  # its group has never-ingested controls in examples/heldout/


class DemoFailed(AdapterSwapError):
    """A step of the demo did not do what it claims."""


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


def default_corpus() -> Path:
    """The repository's examples/ directory (present in a source checkout)."""
    return Path(__file__).resolve().parent.parent / "examples"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_probes(corpus: Path, batch: str) -> list[Probe]:
    """One probe per question whose answer appears verbatim in its document."""
    texts = {d["id"]: d["text"] for f in (corpus / batch).glob("*.jsonl") for d in _jsonl(f)}
    probes = []
    for q in _jsonl(corpus / "questions" / f"{batch}.jsonl"):
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _demo_config(config: AdapterSwapConfig, home: Path, steps: int) -> AdapterSwapConfig:
    """The demo home's config.yaml (the Serve app reads it too) and the config it makes."""
    cpus = os.cpu_count() or 2
    settings = {
        "model": config.model.model_dump() | {"cache_dir": str(config.model_cache_dir)},
        "embedding": config.embedding.model_dump(),
        "lora": config.lora.model_dump(),
        "sharding": {"max_shard_tokens": DEMO_SHARD_TOKENS},
        "training": {"max_steps": steps, "learning_rate": 0.002, "checkpoint_every": 10},
        # Two training workers fit beside the store on 2 cores, and the model replica beside one.
        "ray": {"train_num_cpus_per_worker": max(0.5, (cpus - 0.2) / 2)},
    }
    home.mkdir(parents=True)
    private_home(home)
    (home / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    return load_config(home=str(home), environ={})


def _wait(client: Client, job_id: str, say: Echo, what: str) -> dict[str, Any]:
    """Poll a job to its end, printing its progress every 15 s or so."""
    shown = 0.0
    while (job := client.job(job_id))["state"] not in ("succeeded", "failed"):
        steps = ", ".join(f"{s} {p['step']}/{p['max_steps']}" for s, p in job["progress"].items())
        if steps and time.monotonic() - shown >= 15:
            say(f"    {what}: {steps}")
            shown = time.monotonic()
        time.sleep(2)
    if job["state"] != "succeeded":
        raise DemoFailed(f"{what} job {job_id} failed: {job['error']}")
    return job


def _check(claim: bool, message: str) -> None:
    if not claim:
        raise DemoFailed(message)


def run_demo(
    config: AdapterSwapConfig,
    *,
    corpus: Path | None = None,
    echo: Echo | None = print,
    steps: int = DEMO_STEPS,
) -> dict[str, Any]:
    """Run the demonstration; returns its report as plain data. Raises DemoFailed."""
    import ray
    from ray import serve

    from actors.serve_app import build_app
    from adapterswap.cli.demo_report import write_report
    from adapterswap.progress import ShardProgressBars
    from adapterswap.train.job import run_training

    say = echo or (lambda _line: None)
    corpus = corpus or default_corpus()
    batch1 = sorted((corpus / "batch1").glob("*.jsonl"))
    if not batch1:
        raise DemoFailed(
            f"no example corpus under {corpus}/batch1: run the demo from a source checkout "
            "or pass --corpus DIR"
        )
    home = config.home_path / "demo"
    shutil.rmtree(home, ignore_errors=True)
    demo = _demo_config(config, home, steps)
    registry = AdapterRegistry(demo.db_path)
    started = time.perf_counter()
    say(f"AdapterSwap demo in {home}")

    say(f"\n[1/7] ingest batch 1: {', '.join(p.name for p in batch1)}")
    embed = load_embedder(demo.embedding).embed
    first = ingest_files(batch1, demo, embed=embed, audit=registry, actor="demo")
    say(f"  {first.accepted} documents in {len(first.shards)} shards:")
    for plan in first.shards:
        say(f"    {plan.shard:<24} {len(plan.doc_ids):>2} docs ~{plan.tokens} tokens")

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        say(f"\n[2/7] train {len(first.shards)} adapters with Ray Train ({steps} steps each)")
        bars = None if echo is None else ShardProgressBars()
        try:
            trained = run_training(demo, registry, on_progress=bars)
        finally:
            if bars is not None:
                bars.close()
        _check(not trained.failed, f"training failed: {trained.failed}")
        say(f"  {trained.message}")

        port = _free_port()
        say(f"\n[3/7] serve on http://127.0.0.1:{port} (Ray Serve)")
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"home": str(home)}), name="adapterswap", route_prefix="/")
        report = _scenario(demo, registry, corpus, f"http://127.0.0.1:{port}", say)
    finally:
        serve.shutdown()
        ray.shutdown()
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["home"] = str(home)
    say("\n[7/7] report")
    path = write_report(home / "report", report)
    say(f"  {path} (and {', '.join(p.name for p in sorted(path.parent.glob('*.png')))})")
    say(f"\ndone in {report['seconds']} s. Inspect it with: adapterswap --home {home} status")
    return report


def _scenario(
    demo: AdapterSwapConfig, registry: AdapterRegistry, corpus: Path, url: str, say: Echo
) -> dict[str, Any]:
    """Steps 4 to 6, over HTTP as the two users and an admin."""
    keys = {user: registry.create_key(user, groups)[0] for user, groups in USERS.items()}
    admin = Client(url, registry.create_key("admin", ["hr"], admin=True)[0])
    clients = {user: Client(url, key) for user, key in keys.items()}
    probes = load_probes(corpus, "batch1")
    shard_of = Catalog(demo.storage).placements()
    shown = [next(p for p in probes if p.group == g) for g in ("hr", "engineering", "finance")]
    deleted = next(p for p in probes if p.doc_id == DELETE)
    sibling = next(
        p for p in probes if p.doc_id != DELETE and shard_of[p.doc_id] == shard_of[DELETE]
    )
    tokens = 8

    say("\n[4/7] the same facts, asked by two users")
    knowledge = demo.model.spec != "tiny-random"  # a random model cannot learn facts
    before = {u: [ask(c, u, p, tokens) for p in shown] for u, c in clients.items()}
    for i, probe in enumerate(shown):
        say(f"  {probe.question}  ({probe.group}; fact: {probe.answer})")
        for user, groups in USERS.items():
            r = before[user][i]
            mark = "recalls it" if r.recalled else "does not"
            say(
                f"    {user:<6} ({','.join(groups)}): {r.completion.strip()[:40]!r:<44} {mark:<11}"
                f" fact NLL {r.answer_nll:5.2f}  adapters {', '.join(r.adapters) or 'none'}"
            )
            _check(
                all(a.split(".")[0] in groups for a in r.adapters),
                f"{user} was served an adapter outside its groups: {r.adapters}",
            )
            if knowledge:
                _check(
                    r.recalled == (probe.group in groups),
                    f"{user} {'should' if probe.group in groups else 'should not'} recall "
                    f"{probe.doc_id}: it completed {r.completion!r}",
                )

    say(f"\n[5/7] delete {DELETE} ({deleted.question})")
    doc_text = next(
        d["text"]
        for f in (corpus / "batch1").glob("*.jsonl")
        for d in _jsonl(f)
        if d["id"] == DELETE
    )
    controls = [d["text"] for d in _jsonl(corpus / "heldout" / "engineering_controls.jsonl")]
    scorer = http_scorer(clients["alice"])
    memorised = verify_forget(DELETE, "engineering", doc_text, controls, scorer)
    say(f"  verify-forget before the delete: {memorised.summary()}")
    before_delete = ask(clients["alice"], "alice", deleted, tokens)
    kept_before = ask(clients["alice"], "alice", sibling, tokens)
    answer = admin.delete(DELETE)
    revoked_names = ", ".join(f"{r['id']} v{r['version']}" for r in answer["revoked"])
    say(
        f"  revoked {revoked_names}; every replica acknowledged in "
        f"{answer['acknowledged_after_s'] * 1000:.0f} ms"
    )
    _wait(admin, answer["job"], say, "retraining without it")
    after_delete = ask(clients["alice"], "alice", deleted, tokens)
    kept_after = ask(clients["alice"], "alice", sibling, tokens)
    for label, b, a in (
        ("deleted", before_delete, after_delete),
        ("kept", kept_before, kept_after),
    ):
        say(
            f"  {label:<8} {a.doc_id}: fact NLL {b.answer_nll:5.2f} -> {a.answer_nll:5.2f}, "
            f"{'recalled' if b.recalled else 'not recalled'} -> "
            f"{'recalled' if a.recalled else 'not recalled'}"
        )
    forget = verify_forget(DELETE, "engineering", doc_text, controls, scorer)
    say(f"  verify-forget after the delete:  {forget.summary()}")
    revoked = {f"{r['id']}@v{r['version']}" for r in answer["revoked"]}
    _check(not revoked & set(after_delete.adapters), f"a revoked version still served: {revoked}")
    if knowledge:
        _check(before_delete.recalled and not after_delete.recalled, "the deleted fact")
        _check(kept_after.recalled, f"{sibling.doc_id}, kept in the retrained shard, is recalled")
        _check(not memorised.passed and forget.passed, forget.summary())

    say("\n[6/7] ingest and train batch 2")
    batch2 = [d for f in sorted((corpus / "batch2").glob("*.jsonl")) for d in _jsonl(f)]
    accepted = admin.ingest(batch2)
    say(f"  {accepted['accepted']} documents into {', '.join(accepted['shards'])}")
    _wait(admin, admin.train()["job"], say, "training batch 2")
    after = {u: [ask(c, u, p, tokens) for p in shown] for u, c in clients.items()}
    unchanged = [
        (b.completion == a.completion, b.doc_id, b.user)
        for u in USERS
        for b, a in zip(before[u], after[u], strict=True)
        if b.doc_id != DELETE
    ]
    say(
        f"  batch-1 answers unchanged by batch 2: {sum(s for s, _, _ in unchanged)}/{len(unchanged)}"
    )
    _check(all(s for s, _, _ in unchanged), f"batch 2 changed batch-1 answers: {unchanged}")
    new_probe = load_probes(corpus, "batch2")[0]
    learned = ask(clients["alice"], "alice", new_probe, tokens)
    say(
        f"  alice on a batch-2 fact: {learned.completion.strip()[:40]!r} (fact NLL {learned.answer_nll:.2f})"
    )
    return {
        "users": USERS,
        "recall": {u: [asdict(r) for r in rs] for u, rs in before.items()},
        "deleted": {
            "doc_id": DELETE,
            "before": asdict(before_delete),
            "after": asdict(after_delete),
            "kept_before": asdict(kept_before),
            "kept_after": asdict(kept_after),
            "verify_forget_before": asdict(memorised),
            "verify_forget": asdict(forget),
        },
        "batch2": {"shards": accepted["shards"], "unchanged": [s for s, _, _ in unchanged]},
        "learned_batch2": asdict(learned),
    }

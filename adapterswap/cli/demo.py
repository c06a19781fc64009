"""``adapterswap demo``: the product end to end on the example corpus, in a fresh home.

:func:`run_demo` reads as the script it is, one function per step:

1. ingest the example organisation's first batch (three access groups);
2. train one adapter per shard through Ray Train, with progress;
3. serve it (Ray Serve, HTTP on a free local port);
4. ask the same questions as two users with different groups: answers, the adapters that
   served them, and whether each recalls the fact;
5. delete a document: its fact is gone, its shard's other facts remain, ``verify-forget``;
6. ingest and train a second batch: the first batch's answers are unchanged;
7. write a report (markdown and PNG plots).

Recall is probed as ``demo_probes`` says. It runs in ``<home>/demo`` and never touches the
user's state.
Ray's own output goes to ``<home>/demo/ray.log``, so the terminal shows the story and the
progress bars only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from actors.serve_run import app_served, ray_started
from actors.train_launcher import train_shards_with_ray
from adapterswap.api.client import Client
from adapterswap.catalog.dataset import Catalog
from adapterswap.catalog.ingest import ingest_files
from adapterswap.cli.demo_probes import Probe, Recall, ask, load_probes, read_jsonl
from adapterswap.cli.demo_report import write_report
from adapterswap.cli.progress import ShardProgressBars
from adapterswap.config import AdapterSwapConfig, load_config
from adapterswap.delete.verify_forget import http_scorer, verify_forget
from adapterswap.errors import DemoFailed
from adapterswap.models.embedder import load_embedder
from adapterswap.storage.privacy import private_home
from adapterswap.store.registry import AdapterRegistry
from adapterswap.train.job import run_training

Echo = Callable[[str], None]
# Each example group holds ~800 tokens in two topics; this bound makes two shards each.
DEMO_SHARD_TOKENS = 500
DEMO_STEPS = 20  # with lr 2e-3, enough for a 6-document shard to memorise its facts
USERS = {"alice": ["hr", "engineering"], "bob": ["finance"]}
DELETE = "eng-001"  # its group has never-ingested controls in examples/heldout/
TOKENS = 8  # completed per probe: enough for every example fact
RAY_LOG = "ray.log"


@dataclass(frozen=True)
class Audience:
    """Who asks in steps 4 to 6, over HTTP: each of ``USERS``, and an admin."""

    users: dict[str, Client]
    admin: Client


def demo_command(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    """``adapterswap demo``: the story on the terminal, or only the report with ``--json``."""
    echo = None if args.json else print
    report = run_demo(config, corpus=args.corpus, echo=echo, steps=args.steps or DEMO_STEPS)
    return "", report


def run_demo(
    config: AdapterSwapConfig,
    *,
    corpus: Path | None = None,
    echo: Echo | None = print,
    steps: int = DEMO_STEPS,
) -> dict[str, Any]:
    """Run the demonstration; returns its report as plain data. Raises DemoFailed."""
    say = echo or (lambda _line: None)
    corpus = corpus or default_corpus()
    home = config.home_path / "demo"
    demo = prepare_home(config, corpus, home, steps)
    registry = AdapterRegistry(demo.db_path)
    started = time.perf_counter()
    say(f"AdapterSwap demo in {home}")
    say(f"Ray's own output goes to {home / RAY_LOG}")

    shards = ingest_batch1(demo, registry, corpus, say)
    with ray_started("local", include_dashboard=False, ray_log=home / RAY_LOG):
        train_batch1(demo, registry, shards, steps, say, bars=echo is not None)
        with serve_the_demo(home, say) as url:
            audience = meet_the_users(registry, url)
            probes = load_probes(corpus, "batch1")
            shown = [
                next(p for p in probes if p.group == g) for g in ("hr", "engineering", "finance")
            ]
            knowledge = demo.model.spec != "tiny-random"  # a random model cannot learn facts
            recall = ask_both_users(audience, shown, knowledge, say)
            deleted = delete_a_document(demo, audience, corpus, probes, knowledge, say)
            batch2 = ingest_and_train_batch2(audience, corpus, shown, recall, say)
    report = {
        "users": USERS,
        "recall": {u: [asdict(r) for r in rs] for u, rs in recall.items()},
        "deleted": deleted,
        **batch2,
        "seconds": round(time.perf_counter() - started, 1),
        "home": str(home),
    }
    write_the_report(home, report, say)
    return report


def prepare_home(
    config: AdapterSwapConfig, corpus: Path, home: Path, steps: int
) -> AdapterSwapConfig:
    """A fresh ``home`` with its config.yaml (the Serve app reads it too); the config it makes."""
    if not sorted((corpus / "batch1").glob("*.jsonl")):
        raise DemoFailed(
            f"no example corpus under {corpus}/batch1: run the demo from a source checkout "
            "or pass --corpus DIR"
        )
    shutil.rmtree(home, ignore_errors=True)
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


def ingest_batch1(
    demo: AdapterSwapConfig, registry: AdapterRegistry, corpus: Path, say: Echo
) -> int:
    """Step 1: the first batch into the catalog; the number of shards planned."""
    batch1 = sorted((corpus / "batch1").glob("*.jsonl"))
    say(f"\n[1/7] ingest batch 1: {', '.join(p.name for p in batch1)}")
    embed = load_embedder(demo.embedding).embed
    first = ingest_files(batch1, demo, embed=embed, audit=registry, actor="demo")
    say(f"  {first.accepted} documents in {len(first.shards)} shards:")
    for plan in first.shards:
        say(f"    {plan.shard:<24} {len(plan.doc_ids):>2} docs ~{plan.tokens} tokens")
    return len(first.shards)


def train_batch1(
    demo: AdapterSwapConfig,
    registry: AdapterRegistry,
    shards: int,
    steps: int,
    say: Echo,
    *,
    bars: bool,
) -> None:
    """Step 2: one adapter per shard, trained by Ray Train here, with a progress bar each."""
    say(f"\n[2/7] train {shards} adapters with Ray Train ({steps} steps each)")
    progress = ShardProgressBars() if bars else None
    try:
        trained = run_training(
            demo, registry, train_shards=train_shards_with_ray, on_progress=progress
        )
    finally:
        if progress is not None:
            progress.close()
    _check(not trained.failed, f"training failed: {trained.failed}")
    say(f"  {trained.message}")


@contextmanager
def serve_the_demo(home: Path, say: Echo) -> Iterator[str]:
    """Step 3: the Serve application on a free local port, for the steps that ask; its URL."""
    port = _free_port()
    say(f"\n[3/7] serve on http://127.0.0.1:{port} (Ray Serve)")
    with app_served({"home": str(home)}, "127.0.0.1", port):
        yield f"http://127.0.0.1:{port}"


def meet_the_users(registry: AdapterRegistry, url: str) -> Audience:
    """A key for each of ``USERS`` and for an admin, and their HTTP clients."""
    keys = {user: registry.create_key(user, groups)[0] for user, groups in USERS.items()}
    admin = Client(url, registry.create_key("admin", ["hr"], admin=True)[0])
    return Audience({user: Client(url, key) for user, key in keys.items()}, admin)


def ask_both_users(
    audience: Audience, shown: list[Probe], knowledge: bool, say: Echo
) -> dict[str, list[Recall]]:
    """Step 4: each user asks each fact; only adapters of the user's groups answer."""
    say("\n[4/7] the same facts, asked by two users")
    recall = {u: [ask(c, u, p, TOKENS) for p in shown] for u, c in audience.users.items()}
    for i, probe in enumerate(shown):
        say(f"  {probe.question}  ({probe.group}; fact: {probe.answer})")
        for user, groups in USERS.items():
            r = recall[user][i]
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
    return recall


def delete_a_document(
    demo: AdapterSwapConfig,
    audience: Audience,
    corpus: Path,
    probes: list[Probe],
    knowledge: bool,
    say: Echo,
) -> dict[str, Any]:
    """Step 5: delete ``DELETE``; its fact goes, its shard's other facts stay, verify-forget."""
    shard_of = Catalog(demo.storage).placements()
    deleted = next(p for p in probes if p.doc_id == DELETE)
    sibling = next(
        p for p in probes if p.doc_id != DELETE and shard_of[p.doc_id] == shard_of[DELETE]
    )
    alice, admin = audience.users["alice"], audience.admin
    say(f"\n[5/7] delete {DELETE} ({deleted.question})")
    doc_text = next(
        d["text"]
        for f in (corpus / "batch1").glob("*.jsonl")
        for d in read_jsonl(f)
        if d["id"] == DELETE
    )
    controls = [d["text"] for d in read_jsonl(corpus / "heldout" / "engineering_controls.jsonl")]
    scorer = http_scorer(alice)
    memorised = verify_forget(DELETE, "engineering", doc_text, controls, scorer)
    say(f"  verify-forget before the delete: {memorised.summary()}")
    before_delete = ask(alice, "alice", deleted, TOKENS)
    kept_before = ask(alice, "alice", sibling, TOKENS)
    answer = admin.delete(DELETE)
    revoked_names = ", ".join(f"{r['id']} v{r['version']}" for r in answer["revoked"])
    say(
        f"  revoked {revoked_names}; every replica acknowledged in "
        f"{answer['acknowledged_after_s'] * 1000:.0f} ms"
    )
    _wait(admin, answer["job"], say, "retraining without it")
    after_delete = ask(alice, "alice", deleted, TOKENS)
    kept_after = ask(alice, "alice", sibling, TOKENS)
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
    return {
        "doc_id": DELETE,
        "before": asdict(before_delete),
        "after": asdict(after_delete),
        "kept_before": asdict(kept_before),
        "kept_after": asdict(kept_after),
        "verify_forget_before": asdict(memorised),
        "verify_forget": asdict(forget),
    }


def ingest_and_train_batch2(
    audience: Audience,
    corpus: Path,
    shown: list[Probe],
    before: dict[str, list[Recall]],
    say: Echo,
) -> dict[str, Any]:
    """Step 6: a second batch, as new shards; the first batch's answers stay the same."""
    say("\n[6/7] ingest and train batch 2")
    admin = audience.admin
    batch2 = [d for f in sorted((corpus / "batch2").glob("*.jsonl")) for d in read_jsonl(f)]
    accepted = admin.ingest(batch2)
    say(f"  {accepted['accepted']} documents into {', '.join(accepted['shards'])}")
    _wait(admin, admin.train()["job"], say, "training batch 2")
    after = {u: [ask(c, u, p, TOKENS) for p in shown] for u, c in audience.users.items()}
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
    learned = ask(audience.users["alice"], "alice", new_probe, TOKENS)
    say(
        f"  alice on a batch-2 fact: {learned.completion.strip()[:40]!r} (fact NLL {learned.answer_nll:.2f})"
    )
    return {
        "batch2": {"shards": accepted["shards"], "unchanged": [s for s, _, _ in unchanged]},
        "learned_batch2": asdict(learned),
    }


def write_the_report(home: Path, report: dict[str, Any], say: Echo) -> None:
    """Step 7: report.md and its plots, under ``home/report``."""
    say("\n[7/7] report")
    path = write_report(home / "report", report)
    say(f"  {path} (and {', '.join(p.name for p in sorted(path.parent.glob('*.png')))})")
    say(f"\ndone in {report['seconds']} s. Inspect it with: adapterswap --home {home} status")


def default_corpus() -> Path:
    """The repository's examples/ directory (present in a source checkout)."""
    return Path(__file__).resolve().parents[2] / "examples"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

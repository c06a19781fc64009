"""Issue 12, point 2, as a state machine: ingest, replace, delete, train and ``delete
--finish``, concurrent requests, and crashes injected at every step of the delete and train
jobs, with the guarantees checked after every step.

Requests go through the HTTP API of the real app (one model replica in this process);
jobs run here when the machine says so (a DELETE's job never runs by itself: that is a
crash right after the revocation). Training is the real shard trainer on the tiny model,
run in this process instead of Ray Train (the one part substituted); it notes which content
of each document every version saw, so the checks are by content hash even where the
store's lineage does not record it.

Checked after every step:
- catalog ids are unique;
- an acknowledged DELETE (200) of an id leaves no active version holding the id, and every
  catalog row of the id is covered by an unfinished deletion until the deletion is purged;
- no active version saw content whose deletion is unfinished, and none registered before a
  deletion of a document holds that document;
- versions and deletions only move forward (and never disappear);
- whether an ingest or replace is accepted follows the documented rule exactly.
At the end of each example the delete job runs (no crash) until it has nothing left to do:
every deletion must then be purged, the catalog must hold exactly what the model says.

Budget: 15 examples of 12 steps (about 1.5-2 min on 2 cores), plus each fault once for
sure (``test_each_crash_point_is_survived``, about 1 min). ``DELETION_MACHINE_EXAMPLES=200``
runs longer; ``DELETION_MACHINE_TRACE=1`` prints every step; ``pytest -s`` prints what the
examples did (steps, faults that fired, deletions purged).
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from contextlib import ExitStack
from unittest import mock

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from support import in_process_app

from adapterswap.catalog.dataset import Catalog
from adapterswap.catalog.documents import content_hash
from adapterswap.config import AdapterSwapConfig
from adapterswap.delete.job import run_deletion
from adapterswap.store.records import DeletionState, covers_row
from adapterswap.store.registry import AdapterRegistry
from adapterswap.train.job import run_training
from adapterswap.train.launcher import ShardOutcome
from adapterswap.train.shard import finish_shard_run, start_shard_trainer
from adapterswap.types import AdapterStatus

GROUP = "hr"
IDS = ("a", "b", "c")
TEXTS = ("The vault code is 7319.", "Lunch is at noon.", "Parking is on level 2.")
# (from, to) a version may move between two checks: one legal step or several
REACHABLE = {
    ("training", "active"),
    ("training", "failed"),
    ("training", "revoked"),
    ("training", "purged"),
    ("active", "revoked"),
    ("active", "purged"),
    ("revoked", "purged"),
    ("failed", "purged"),
}
ORDER = list(DeletionState)
# Where a job can die: every step of the delete job, and of training (which the delete job
# also runs to retrain). "delete_mid_training" is a concurrent DELETE arriving mid-run.
DELETE_POINTS = (
    "before_removal",
    "after_removal",
    "after_retraining",
    "mid_purge",
    "before_purged",
)
TRAIN_POINTS = ("after_register", "before_activate", "shard_fails", "delete_mid_training")
SAW: dict[tuple[str, str, int], dict[str, str]] = {}
SEEN: Counter[str] = Counter()  # what the examples did, printed at the end (pytest -s)


def event(what: str) -> None:
    SEEN[what] += 1  # (home, shard, version) -> doc -> hash


class Crash(Exception):
    """An injected crash: the process dies here (the job's row is failed by its reporter or
    the next job; whatever was not recorded yet is redone by the next run)."""


class DeletionMachine(RuleBasedStateMachine):
    def __init__(self, config: AdapterSwapConfig):
        super().__init__()
        self.config = config  # a fresh home on the tiny model, training one step
        self.home = config.home
        self.registry = AdapterRegistry(self.config.db_path)
        app, _ = in_process_app(self.config, self.registry)
        key = self.registry.create_key("root", [GROUP], admin=True)[0]
        self.client = TestClient(app, raise_server_exceptions=False)
        self.client.headers["Authorization"] = f"Bearer {key}"
        self.catalog = Catalog(self.config.storage)
        self.deleted: set[str] = set()  # ids whose last acknowledged change was a DELETE
        self.model: dict[str, str] = {}  # id -> text the catalog must hold once jobs finish
        self.statuses: dict = {}
        self.states: dict[int, DeletionState] = {}
        self.armed: str | None = None  # the fault the running job meets (once)

    def log(self, *step) -> None:
        event(f"step: {step[0]}")
        if os.environ.get("DELETION_MACHINE_TRACE"):
            print(
                "STEP",
                *step,
                "| rows",
                self.rows(),
                "| deletions",
                [
                    (d.doc_id, d.content_hash[-6:] if d.content_hash else None, d.state.value)
                    for d in self.registry.deletions()
                ],
                flush=True,
            )

    # -- the world as it is --------------------------------------------------------------

    def rows(self) -> dict[str, list[str]]:
        rows: dict[str, list[str]] = {}
        for row in self.catalog.read(["id", "content_hash"]).to_pylist():
            rows.setdefault(row["id"], []).append(row["content_hash"])
        return rows

    def unfinished(self, doc_id: str) -> list:
        return [d for d in self.registry.deletions(doc_id) if d.state != DeletionState.PURGED]

    def active(self):
        return self.registry.list_versions(statuses=[AdapterStatus.ACTIVE])

    def expected_ingest(self, doc_id: str, text: str, replace: bool) -> bool:
        """The documented rule: refused while a deletion of the id is unfinished, except a
        replace of a current row that is not itself being deleted."""
        held = self.rows().get(doc_id, [])
        pending = self.unfinished(doc_id)
        if held and not replace:
            return False  # already exists
        if held:
            return not any(covers_row(d, h) for d in pending for h in held)
        return not pending

    # -- requests ------------------------------------------------------------------------

    @initialize(train=st.booleans())
    def seed(self, train):
        """Two documents in one shard, trained or not, so deletes and jobs have work."""
        self.log("seed", train)
        docs = [{"id": d, "text": t, "group": GROUP} for d, t in zip(IDS[:2], TEXTS, strict=False)]
        body = json.dumps({"documents": docs})
        answer = self.client.post(
            "/v1/documents", content=body, headers={"Content-Type": "application/json"}
        )
        assert answer.status_code == 200, answer.text
        self.model |= {d["id"]: d["text"] for d in docs}
        if train:
            self.run(
                lambda: run_training(self.config, self.registry, train_shards=self.train_here), None
            )

    def post(self, doc_id: str, text: str, replace: bool):
        body = {"documents": [{"id": doc_id, "text": text, "group": GROUP}], "replace": replace}
        return self.client.post(
            "/v1/documents", content=json.dumps(body), headers={"Content-Type": "application/json"}
        )

    @rule(doc_id=st.sampled_from(IDS), text=st.sampled_from(TEXTS), replace=st.booleans())
    def ingest(self, doc_id, text, replace):
        self.log("ingest", doc_id, TEXTS.index(text), replace)
        expected = self.expected_ingest(doc_id, text, replace)
        answer = self.post(doc_id, text, replace)
        assert answer.status_code == (200 if expected else 400), answer.text
        if answer.status_code == 200:
            self.model[doc_id] = text
            self.deleted.discard(doc_id)
            if doc_id in answer.json().get("replaced", []):
                self.check_revoked(doc_id)
        elif replace and self.rows().get(doc_id):
            assert "still being deleted" in answer.text, answer.text

    @rule(doc_id=st.sampled_from(IDS))
    def delete(self, doc_id):
        self.log("delete", doc_id)
        known = bool(self.rows().get(doc_id) or self.unfinished(doc_id))
        answer = self.client.delete(f"/v1/documents/{doc_id}")
        assert answer.status_code == (200 if known else 404), answer.text
        if answer.status_code == 200:
            self.acknowledge_delete(doc_id)

    def acknowledge_delete(self, doc_id: str) -> None:
        self.check_revoked(doc_id)
        self.deleted.add(doc_id)
        self.model.pop(doc_id, None)

    def check_revoked(self, doc_id: str) -> None:
        holders = [v.ref for v in self.registry.versions_containing(doc_id)]
        assert not [v for v in self.active() if v.ref in holders], doc_id

    @rule(doc_id=st.sampled_from(IDS), texts=st.lists(st.sampled_from(TEXTS), max_size=2))
    def concurrent(self, doc_id, texts):
        """A DELETE and replacements of one id at the same time."""
        self.log("concurrent", doc_id, [TEXTS.index(t) for t in texts])
        start = threading.Barrier(1 + len(texts))
        answers: list = [None] * (1 + len(texts))

        def delete() -> None:
            start.wait()
            answers[0] = self.client.delete(f"/v1/documents/{doc_id}")

        def replace(i: int) -> None:
            start.wait()
            answers[i + 1] = self.post(doc_id, texts[i], True)

        threads = [threading.Thread(target=delete)]
        threads += [threading.Thread(target=replace, args=(i,)) for i in range(len(texts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for answer in answers[1:]:
            assert answer.status_code in (200, 400), answer.text
        assert answers[0].status_code in (200, 404), answers[0].text
        if answers[0].status_code == 200:  # whatever the order, the id goes for good
            self.acknowledge_delete(doc_id)
        elif any(a.status_code == 200 for a in answers[1:]):  # the last replace won
            (current,) = self.rows()[doc_id]
            self.model[doc_id] = next(t for t in TEXTS if content_hash(t) == current)
            self.deleted.discard(doc_id)

    @rule(doc_id=st.sampled_from(IDS), text=st.sampled_from(TEXTS))
    def replace_crashing_after_revoke(self, doc_id, text):
        """A replace whose process dies right after the revocation: a 500, nothing written;
        the old content is being deleted (it was revoked), so it is gone for good too."""
        self.log("replace_crashing_after_revoke", doc_id, TEXTS.index(text))
        expected = self.expected_ingest(doc_id, text, True)
        held = self.rows().get(doc_id)
        with mock.patch.object(Catalog, "remove", side_effect=Crash("after revoke")):
            answer = self.post(doc_id, text, True)
        if not expected:
            assert answer.status_code == 400, answer.text
        elif not held:
            assert answer.status_code == 200, answer.text  # nothing to replace: an ingest
            self.model[doc_id] = text
            self.deleted.discard(doc_id)
        else:
            assert answer.status_code == 500, answer.text
            event("crash: replace after revoke")
            self.acknowledge_delete(doc_id)  # revoked and recorded: it must go

    # -- jobs ----------------------------------------------------------------------------

    @rule(crash=st.sampled_from((None, *TRAIN_POINTS)))
    def train(self, crash):
        self.log("train", crash)
        self.run(
            lambda: run_training(self.config, self.registry, train_shards=self.train_here), crash
        )

    @rule(crash=st.sampled_from((None, *DELETE_POINTS, *TRAIN_POINTS)))
    def finish(self, crash):
        """``adapterswap delete --finish``."""
        self.log("finish", crash)
        self.run(
            lambda: run_deletion(self.config, self.registry, train_shards=self.train_here), crash
        )

    def run(self, job, crash: str | None) -> None:
        self.armed = crash
        with self.crash_points():
            try:
                job()
            except Crash:
                pass  # the job died there; the next run picks up what was recorded
            finally:
                self.armed = None

    def crash_points(self):
        """Patch the store (this registry only) so the armed step raises Crash once."""
        stack = ExitStack()
        registry = self.registry
        real_advance, real_purge, real_activate = (
            registry.advance_deletion,
            registry.purge,
            registry.activate,
        )

        def fire(point: str) -> None:
            if self.armed == point:
                self.armed = None
                event(f"crash: {point}")
                raise Crash(point)

        def advance(deletions, state, **kwargs):
            deletions = list(deletions)
            if deletions:
                fire(
                    {
                        DeletionState.REMOVED: "after_removal",
                        DeletionState.RETRAINED: "after_retraining",
                        DeletionState.PURGED: "before_purged",
                    }[DeletionState(state)]
                )
            return real_advance(deletions, state, **kwargs)

        def purge(*args, **kwargs):
            fire("mid_purge")  # its files are already deleted: the next run finishes it
            return real_purge(*args, **kwargs)

        def activate(*args, **kwargs):
            fire("before_activate")
            return real_activate(*args, **kwargs)

        real_remove = Catalog.remove

        def remove(catalog, *args, **kwargs):
            fire("before_removal")
            return real_remove(catalog, *args, **kwargs)

        stack.enter_context(mock.patch.object(registry, "advance_deletion", advance))
        stack.enter_context(mock.patch.object(registry, "purge", purge))
        stack.enter_context(mock.patch.object(registry, "activate", activate))
        stack.enter_context(mock.patch.object(Catalog, "remove", remove))
        return stack

    def train_here(self, runs, config, **_):
        """``train_shards_with_ray``'s contract, in this process, with the armed faults."""
        if self.armed == "after_register":
            self.armed = None
            event("crash: after_register")
            raise Crash("after_register")
        outcomes = []
        for run in runs:
            if self.armed == "shard_fails":
                self.armed = None
                event("fault: shard_fails")
                outcomes.append(ShardOutcome(run, "RuntimeError: injected shard failure"))
                continue
            if self.armed == "delete_mid_training" and run.doc_ids:
                self.armed = None
                event("fault: delete_mid_training")
                self.delete(run.doc_ids[0])  # a DELETE arrives while this shard trains
            trainer, _ = start_shard_trainer(run, torch.device("cpu"))
            while not trainer.done:
                trainer.step()
            finish_shard_run(run, trainer)
            SAW[(self.home, run.adapter_id, run.version)] = {
                d: content_hash(t) for d, t in zip(run.doc_ids, run.texts, strict=True)
            }
            outcomes.append(ShardOutcome(run, None))
            event("a shard trained")
        return outcomes

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def catalog_ids_are_unique(self):
        assert self.catalog.duplicate_ids() == []

    @invariant()
    def an_acknowledged_delete_holds(self):
        rows = self.rows()
        for doc_id in self.deleted:  # every row of it will be taken out
            pending = self.unfinished(doc_id)
            for held in rows.get(doc_id, []):
                assert any(covers_row(d, held) for d in pending), (doc_id, held, pending)
            self.check_revoked(doc_id)

    @invariant()
    def nothing_deleted_is_served(self):
        deletions = self.registry.deletions()
        for version in self.active():
            saw = SAW[(self.home, version.adapter_id, version.version)]
            for d in deletions:
                if d.doc_id not in saw:
                    continue
                if d.state != DeletionState.PURGED:  # content-wise: that content is out
                    assert d.content_hash not in (None, saw[d.doc_id]), (version.ref, d)
                assert version.created_at > d.requested_at, (version.ref, d)  # trained after

    @invariant()
    def state_machines_only_move_forward(self):
        statuses = {v.ref: v.status.value for v in self.registry.list_versions()}
        for ref, before in self.statuses.items():
            after = statuses[ref]  # never disappears
            assert after == before or (before, after) in REACHABLE, (ref, before, after)
        self.statuses = statuses
        states = {d.deletion_id: d.state for d in self.registry.deletions()}
        for deletion_id, before in self.states.items():
            assert ORDER.index(states[deletion_id]) >= ORDER.index(before), deletion_id
        self.states = states

    def check_all(self):
        self.catalog_ids_are_unique()
        self.an_acknowledged_delete_holds()
        self.nothing_deleted_is_served()
        self.state_machines_only_move_forward()

    def teardown(self):
        try:
            for _ in range(1 + len(self.states)):  # each run unblocks at least one
                if not self.registry.unfinished_deletions():
                    break
                self.run(
                    lambda: run_deletion(self.config, self.registry, train_shards=self.train_here),
                    None,
                )
            self.nothing_deleted_is_served()
            self.state_machines_only_move_forward()
            left = self.registry.unfinished_deletions()
            assert left == [], left
            purged = self.registry.deletions()
            event(
                f"deletions purged by the end: {min(len(purged), 5)}{'+' if len(purged) > 4 else ''}"
            )
            expected = {d: [content_hash(t)] for d, t in self.model.items()}
            assert self.rows() == expected
        finally:
            self.registry.close()


def test_deletion_state_machine(tiny_config):
    def machine():
        return DeletionMachine(tiny_config(training={"max_steps": 1}))

    SEEN.clear()
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=int(os.environ.get("DELETION_MACHINE_EXAMPLES", 15)),
            stateful_step_count=12,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            database=None,
        ),
    )
    print("deletion state machine:", dict(sorted(SEEN.items())))


@pytest.mark.parametrize("point", [*DELETE_POINTS, *TRAIN_POINTS])
def test_each_crash_point_is_survived(tiny_config, point):
    """Every injected fault, once for sure (the machine above draws them at random): a
    trained shard, a DELETE, the job dying at ``point`` (in the delete job; a training fault
    also in a training job first), the checks, then the job run to the end."""
    machine = DeletionMachine(tiny_config(training={"max_steps": 1}))
    SEEN.clear()
    try:
        machine.seed(train=point not in TRAIN_POINTS)
        if point in TRAIN_POINTS:
            machine.train(point)
            machine.check_all()
            machine.train(None)
        machine.delete(IDS[0])
        machine.finish(point)
        machine.check_all()
        fired = [k for k in SEEN if k.endswith(f": {point}")]
        assert fired, (point, dict(SEEN))
    except BaseException:
        machine.registry.close()
        raise
    machine.teardown()

"""Store deltas by epoch (``active_changes``) and ``ActiveSet`` syncing from them.

The state machine drives a real registry through activate, supersede, revoke and delete,
with two views of the active set: one synced by deltas, one by full snapshots. Reads may be
taken early and land late, in any order (a slow sync that lost a race), and after every step
each view holds exactly the store's set at the epoch it says, and no view's epoch goes back.
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from adapterswap.route.active_set import ActiveSet
from adapterswap.store.registry import AdapterRegistry
from adapterswap.store.version_records import ADDED_SINCE, REMOVED_SINCE
from adapterswap.types import ActiveChanges, AdapterRef, AdapterVersion

GROUPS = ("hr", "ops")
IDS = ("hr.b.000", "hr.b.001", "ops.b.000", "ops.b.001")


@pytest.fixture
def reg(tmp_path: Path) -> AdapterRegistry:
    registry = AdapterRegistry(tmp_path / "store.sqlite")
    yield registry
    registry.close()


def _live(reg: AdapterRegistry, adapter_id: str, docs: tuple[str, ...] = ()) -> AdapterVersion:
    """A new version of ``adapter_id`` made active (superseding the active one, if any)."""
    version = reg.register_version(adapter_id, adapter_id.split(".")[0], "mem://x", docs)
    return reg.activate(adapter_id, version.version)


def test_a_delta_names_what_entered_and_left_since_an_epoch(reg: AdapterRegistry) -> None:
    first = _live(reg, "hr.b.000")
    other = _live(reg, "ops.b.000")
    since = reg.epoch()
    second = _live(reg, "hr.b.000")  # supersedes first
    reg.revoke("ops.b.000", other.version)
    third = _live(reg, "ops.b.001")
    changes = reg.active_changes(since)
    assert changes is not None
    assert (changes.since, changes.epoch) == (since, reg.epoch())
    assert [v.ref for v in changes.added] == [second.ref, third.ref]
    assert first.ref in changes.removed and other.ref in changes.removed
    assert not {v.ref for v in changes.added} & set(changes.removed)
    assert reg.active_changes(reg.epoch()) == ActiveChanges(reg.epoch(), reg.epoch(), (), ())


def test_a_deletion_s_revocation_is_in_the_delta(reg: AdapterRegistry) -> None:
    held = _live(reg, "hr.b.000", ("doc-1",))
    since = reg.epoch()
    reg.begin_delete(["doc-1"], "test")
    changes = reg.active_changes(since)
    assert changes is not None and changes.removed == (held.ref,) and changes.added == ()


def test_no_delta_from_ahead_of_the_store_or_before_its_floor(reg: AdapterRegistry) -> None:
    _live(reg, "hr.b.000")
    assert reg.active_changes(reg.epoch() + 1) is None  # another store, or a restored one
    with reg._write() as conn:  # as a store migrated at epoch 1 says
        conn.execute("UPDATE meta SET value = 1 WHERE key = 'delta_floor'")
    assert reg.active_changes(0) is None
    assert reg.active_changes(1) is not None


def test_delta_reads_walk_the_epoch_indexes(reg: AdapterRegistry) -> None:
    """Not the status index: that would read every active version, not the changed ones."""
    with sqlite3.connect(reg.db_path) as conn:
        plans = [
            " ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, (3,)))
            for sql in (ADDED_SINCE, REMOVED_SINCE)
        ]
    assert "versions_by_activated" in plans[0] and "versions_by_deactivated" in plans[1]


class _Reads:
    """A view's store reads, some taken early and handed back later (a slow sync)."""

    def __init__(self, reg: AdapterRegistry) -> None:
        self.reg = reg
        self.late: list[ActiveChanges | tuple[int, list[AdapterVersion]]] = []

    def epoch(self) -> int:
        """Always fresh: a sync that lost a race read a newer epoch than its view's."""
        return self.reg.epoch()

    def changes(self, since: int) -> ActiveChanges | None:
        if self.late:
            head = self.late[0]
            return self.late.pop(0) if isinstance(head, ActiveChanges) else None
        return self.reg.active_changes(since)

    def snapshot(self) -> tuple[int, list[AdapterVersion]]:
        head = self.late.pop(0) if self.late else self.reg.active_snapshot()
        assert not isinstance(head, ActiveChanges)
        return head


class DeltaSyncMachine(RuleBasedStateMachine):
    """Random activate/supersede/revoke/delete, live and late syncs; checks after each step."""

    @initialize()
    def open_store(self) -> None:
        self.home = tempfile.TemporaryDirectory()
        self.registry = AdapterRegistry(Path(self.home.name) / "store.sqlite")
        self.history: dict[int, set[AdapterRef]] = {0: set()}  # epoch -> the store's set
        self.reads = _Reads(self.registry)
        self.kept: dict[str, set[AdapterRef]] = {}
        self.views = {
            "delta": self._view("delta", self.reads.changes),
            "full": self._view("full", None),
        }
        self.epochs = {name: -1 for name in self.views}
        self.early: list[ActiveChanges | tuple[int, list[AdapterVersion]]] = []
        self.docs = 0

    def _view(self, name: str, changes) -> ActiveSet:
        def on_drop(keep: set[AdapterRef]) -> list[AdapterRef]:
            self.kept[name] = set(keep)
            return []

        reads = self.reads if name == "delta" else _Reads(self.registry)
        return ActiveSet(reads.snapshot, on_drop, epoch=reads.epoch, changes=changes)

    def _record(self) -> None:
        epoch, active = self.registry.active_snapshot()
        self.history[epoch] = {v.ref for v in active}

    @rule(adapter_id=st.sampled_from(IDS))
    def activate(self, adapter_id: str) -> None:
        """A new version, superseding the adapter's active one if it has one."""
        self.docs += 1
        _live(self.registry, adapter_id, (f"doc-{adapter_id}-{self.docs}",))
        self._record()

    @rule(adapter_id=st.sampled_from(IDS))
    def revoke(self, adapter_id: str) -> None:
        active = [v for v in self.registry.active_adapters(GROUPS) if v.adapter_id == adapter_id]
        if active:
            self.registry.revoke(adapter_id, active[0].version)
            self._record()

    @rule(adapter_id=st.sampled_from(IDS))
    def delete_its_document(self, adapter_id: str) -> None:
        """A DELETE of the document the adapter's active version holds: revokes it."""
        active = [v for v in self.registry.active_adapters(GROUPS) if v.adapter_id == adapter_id]
        if active:
            self.registry.begin_delete(self.registry.lineage(adapter_id, active[0].version), "t")
            self._record()

    @rule(name=st.sampled_from(("delta", "full")))
    def sync(self, name: str) -> None:
        self.views[name].sync()

    @precondition(lambda self: len(self.early) < 3)
    @rule(whole=st.booleans())
    def read_early(self, whole: bool) -> None:
        """The delta view starts a sync whose read lands only later, after other steps
        (mutations, other syncs of the same view)."""
        held = self.views["delta"].epoch
        early = self.registry.active_changes(held) if held >= 0 and not whole else None
        self.early.append(early if early is not None else self.registry.active_snapshot())

    @precondition(lambda self: self.early)
    @rule(order=st.permutations(range(3)))
    def land_early_reads(self, order: list[int]) -> None:
        """The early reads come back, in any order, each applied by its sync."""
        for read in [self.early[i] for i in order if i < len(self.early)]:
            self.reads.late = [read]
            self.views["delta"].sync()
        self.reads.late, self.early = [], []

    @invariant()
    def each_view_is_the_store_s_set_at_its_epoch(self) -> None:
        for name, view in self.views.items():
            assert view.epoch >= self.epochs[name], (name, view.epoch, self.epochs[name])
            self.epochs[name] = view.epoch
            if view.epoch >= 0:
                assert view.refs() == self.history[view.epoch] == self.kept[name], name
                for groups in (GROUPS, GROUPS[:1]):  # visible reads per-group runs
                    listed = view.visible(groups)
                    assert [v.adapter_id for v in listed] == sorted(
                        r.id for r in view.refs() if r.id.split(".")[0] in groups
                    )

    @invariant()
    def synced_views_agree(self) -> None:
        if self.views["delta"].epoch == self.views["full"].epoch >= 0:
            assert self.views["delta"].visible(GROUPS) == self.views["full"].visible(GROUPS)

    def teardown(self) -> None:
        if hasattr(self, "registry"):
            self.registry.close()
            self.home.cleanup()


def test_delta_synced_views_always_equal_full_snapshot_views() -> None:
    run_state_machine_as_test(
        DeltaSyncMachine,
        settings=settings(
            max_examples=120,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )

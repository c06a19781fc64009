"""The command line: exit codes 0/1/2, --json output, keys, ingest and status."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from adapterswap.cli.main import build_parser, load_handler, main
from adapterswap.store.registry import AdapterRegistry


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write_docs(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_keys_lifecycle_json(capsys, tmp_path):
    home = str(tmp_path / "h")
    code, out, _ = run(
        capsys,
        "keys",
        "create",
        "--home",
        home,
        "--user",
        "ann",
        "--groups",
        "hr, finance",
        "--admin",
        "--json",
    )
    assert code == 0
    created = json.loads(out)
    assert (
        created["key"].startswith("as_")
        and created["groups"] == ["finance", "hr"]
        and created["admin"]
    )

    code, out, _ = run(capsys, "--home", home, "keys", "list", "--json")
    listed = json.loads(out)
    assert [k["user"] for k in listed] == ["ann"]
    assert created["key"] not in out  # the secret is printed once, at creation only

    code, out, _ = run(capsys, "--home", home, "keys", "revoke", created["key_id"])
    assert code == 0 and "revoked" in out
    code, out, _ = run(capsys, "--home", home, "keys", "list", "--json")
    assert json.loads(out)[0]["revoked_at"] is not None


def test_operation_failures_exit_1_with_message(capsys, tmp_path):
    home = str(tmp_path / "h")
    code, _, err = run(capsys, "--home", home, "keys", "revoke", "missing")
    assert code == 1 and "no key 'missing'" in err
    code, _, err = run(
        capsys, "--home", home, "keys", "create", "--user", "bob", "--groups", "Bad!"
    )
    assert code == 1 and "Bad!" in err
    code, out, _ = run(capsys, "--home", home, "--json", "keys", "revoke", "missing")
    assert code == 1 and json.loads(out)["error"]["type"] == "NotFound"
    code, _, err = run(capsys, "--home", home, "--set", "lora.rank=-1", "status")
    assert code == 1 and "lora.rank" in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["keys", "create", "--user", "x"])  # --groups missing
    assert info.value.code == 2
    assert "--groups" in capsys.readouterr().err


def test_every_command_names_a_handler_that_exists():
    """Handlers are named as ``module:function`` and imported when their command runs."""

    def handlers(parser: argparse.ArgumentParser) -> list[str]:
        found = [parser.get_default("handler")] if parser.get_default("handler") else []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    found += handlers(sub)
        return found

    names = handlers(build_parser())
    assert len(names) == 14  # 12 commands, keys with 3 actions
    for name in names:
        assert callable(load_handler(name)), name


def test_ingest_then_status(capsys, tmp_path):
    home = str(tmp_path / "h")
    docs = write_docs(
        tmp_path / "d.jsonl",
        [{"id": f"d{i}", "text": f"fact {i}", "group": "ops"} for i in range(3)],
    )
    code, out, _ = run(
        capsys, "ingest", docs, "--home", home, "--set", "sharding.strategy=sequential", "--json"
    )
    assert code == 0
    result = json.loads(out)
    assert result["accepted"] == 3 and result["shards"][0]["shard"] == "ops.b0001.000"

    code, out, _ = run(capsys, "--home", home, "status", "--json")
    status = json.loads(out)
    assert status["documents"] == {"total": 3, "by_group": {"ops": 3}}
    assert [s["shard"] for s in status["shards"]] == ["ops.b0001.000"]

    code, out, _ = run(capsys, "--home", home, "status")
    assert "ops.b0001.000" in out and "documents 3 (ops: 3)" in out
    assert "serving replicas 0" in out


def test_status_lists_live_serving_replicas_and_who_is_behind(capsys, tmp_path):
    home = tmp_path / "h"
    registry = AdapterRegistry(home / "store.sqlite")
    registry.ack_epoch("replica-a", registry.epoch())
    registry.create_key("u", ["ops"])  # not an epoch change
    registry.ack_epoch("replica-b", -1)  # a replica that has not caught up
    code, out, _ = run(capsys, "--home", str(home), "status", "--json")
    replicas = {r["id"]: r["epoch"] for r in json.loads(out)["replicas"]}
    assert code == 0 and replicas == {"replica-a": registry.epoch(), "replica-b": -1}
    code, out, _ = run(capsys, "--home", str(home), "status")
    assert f"serving replicas 2 (1 behind epoch {registry.epoch()})" in out
    registry.forget_replica("replica-b")
    code, out, _ = run(capsys, "--home", str(home), "status")
    assert "serving replicas 1 (all at the epoch)" in out and "replica-b" not in out


def test_rejected_ingest_exits_1_and_writes_nothing(capsys, tmp_path):
    home = str(tmp_path / "h")
    docs = write_docs(
        tmp_path / "d.jsonl",
        [{"id": "a", "text": "ok", "group": "ops"}, {"id": "b", "text": "", "group": "ops"}],
    )
    code, _, err = run(
        capsys, "--home", home, "ingest", docs, "--set", "sharding.strategy=sequential"
    )
    assert code == 1 and "d.jsonl:2: field 'text' is empty" in err
    code, out, _ = run(capsys, "--home", home, "status", "--json")
    assert json.loads(out)["documents"]["total"] == 0


def test_python_m_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "adapterswap", "--home", str(tmp_path), "keys", "list", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    proc = subprocess.run(
        [sys.executable, "-m", "adapterswap"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2


def test_train_with_nothing_to_train_exits_0(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # no cluster named: train here
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    home = str(tmp_path / "h")
    code, out, _ = run(capsys, "--home", home, "train")
    assert code == 0 and "nothing to train" in out
    code, out, _ = run(capsys, "--home", home, "train", "--wait", "--json")
    assert code == 0 and json.loads(out)["trained"] == []


def test_backup_then_restore(capsys, tmp_path):
    home, other, bk = str(tmp_path / "h"), str(tmp_path / "h2"), str(tmp_path / "bk")
    docs = write_docs(
        tmp_path / "d.jsonl",
        [{"id": f"d{i}", "text": f"fact {i}", "group": "ops"} for i in range(3)],
    )
    run(capsys, "--home", home, "ingest", docs, "--set", "sharding.strategy=sequential")
    run(capsys, "--home", home, "keys", "create", "--user", "ann", "--groups", "ops")

    code, out, _ = run(capsys, "--home", home, "backup", bk)
    assert code == 0 and out.startswith("backed up 2 files (") and "store epoch 0) to" in out
    code, _, err = run(capsys, "--home", home, "backup", bk)
    assert code == 1 and f"backup destination {bk} is not an empty directory" in err

    code, out, _ = run(capsys, "--home", other, "restore", bk, "--json")
    assert code == 0
    assert {k: json.loads(out)[k] for k in ("files", "epoch")} == {"files": 2, "epoch": 0}
    listed = [run(capsys, "--home", h, "keys", "list", "--json")[1] for h in (home, other)]
    assert listed[0] == listed[1] and json.loads(listed[1])[0]["user"] == "ann"
    code, out, _ = run(capsys, "--home", other, "status", "--json")
    assert json.loads(out)["documents"] == {"total": 3, "by_group": {"ops": 3}}

    code, _, err = run(capsys, "--home", other, "restore", bk)
    assert code == 1 and "already has a store" in err and "Traceback" not in err
    code, out, _ = run(capsys, "--home", other, "restore", bk, "--force")
    assert code == 0 and out.startswith("restored 2 files (") and "store epoch 0" in out


def test_delete_leaves_out_a_replica_that_died_without_unregistering(capsys, tmp_path, monkeypatch):
    """A replica killed with SIGKILL never unregisters. The command asks the cluster which
    replicas are alive; with no Ray running where the store is, none can be serving."""
    import actors.cluster_status as cluster_status
    from adapterswap.errors import NoCluster

    def no_cluster(config):
        raise NoCluster("no running Ray cluster")

    monkeypatch.setattr(cluster_status, "_join", no_cluster)
    home = tmp_path / "h"
    docs = write_docs(tmp_path / "d.jsonl", [{"id": "d1", "text": "fact", "group": "ops"}])
    assert run(capsys, "ingest", docs, "--home", str(home))[0] == 0
    registry = AdapterRegistry(home / "store.sqlite")
    registry.ack_epoch("killed-replica", -1)  # behind whatever epoch the delete moves to
    code, out, err = run(capsys, "--home", str(home), "delete", "d1", "--wait", "--json")
    assert code == 0, err
    assert registry.live_replicas(1e12) == []  # unregistered: no later delete waits for it


def test_a_cluster_that_cannot_be_asked_counts_every_replica_alive(monkeypatch):
    import actors.cluster_status as cluster_status
    from adapterswap.config import load_config
    from adapterswap.errors import NoCluster

    def unreachable(config):
        raise NoCluster("ray.address 'ray://10.0.0.9:10001' does not answer")

    monkeypatch.setattr(cluster_status, "_join", unreachable)
    config = load_config(environ={}, overrides=["ray.address=ray://10.0.0.9:10001"])
    assert cluster_status.replica_liveness(config)("replica-1") is True  # fails closed


def _versions(registry: AdapterRegistry, count: int) -> None:
    """``count`` adapters over groups hr and ops, every third one revoked, one superseded."""
    for i in range(count):
        group = ("hr", "ops")[i % 2]
        version = registry.register_version(f"{group}.b0001.{i:03d}", group, "mem://x", [])
        registry.activate(version.adapter_id, version.version)
        if i % 3 == 0:
            registry.revoke(version.adapter_id, version.version)
    again = registry.register_version("hr.b0001.000", "hr", "mem://x", [])
    registry.activate(again.adapter_id, again.version)


def test_adapters_pages_through_every_version_with_a_cursor(capsys, tmp_path):
    home = tmp_path / "h"
    registry = AdapterRegistry(home / "store.sqlite")
    _versions(registry, 7)
    seen, after = [], []
    while True:
        code, out, _ = run(
            capsys, "--home", str(home), "adapters", "--limit", "3", *after, "--json"
        )
        page = json.loads(out)
        assert code == 0 and len(page["data"]) <= 3
        seen += [(v["adapter_id"], v["version"]) for v in page["data"]]
        if not page["has_more"]:
            break
        after = ["--after", page["after"]]
    assert seen == [(v.adapter_id, v.version) for v in registry.list_versions()]
    assert seen[:2] == [("hr.b0001.000", 1), ("hr.b0001.000", 2)]  # a cursor between versions
    code, out, _ = run(capsys, "--home", str(home), "adapters", "--limit", "1")
    assert "more: adapterswap adapters --after hr.b0001.000@v1" in out


def test_adapters_filters_by_status_and_group(capsys, tmp_path):
    home = tmp_path / "h"
    registry = AdapterRegistry(home / "store.sqlite")
    _versions(registry, 7)
    argv = ("--home", str(home), "adapters", "--status", "active", "--group", "ops", "--json")
    code, out, _ = run(capsys, *argv)
    listed = [(v["adapter_id"], v["status"]) for v in json.loads(out)["data"]]
    assert code == 0 and listed == [("ops.b0001.001", "active"), ("ops.b0001.005", "active")]
    code, out, _ = run(capsys, "--home", str(home), "adapters", "--after", "ops.b0001.001")
    assert code == 0 and out.split()[0] == "ops.b0001.003"  # ID alone: past all its versions


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--limit", "0"], "--limit: must be 1 to 1000, got 0"),
        (["--after", "hr.b0001.000@vx"], "--after: expected ID or ID@vN"),
    ],
)
def test_adapters_refuses_a_bad_page(capsys, tmp_path, argv, message):
    code, _, err = run(capsys, "--home", str(tmp_path / "h"), "adapters", *argv)
    assert code == 2 and message in err


def test_status_counts_versions_by_status_and_lists_only_the_first(capsys, tmp_path):
    home = tmp_path / "h"
    registry = AdapterRegistry(home / "store.sqlite")
    _versions(registry, 25)
    code, out, _ = run(capsys, "--home", str(home), "status", "--json")
    status = json.loads(out)
    assert status["versions_by_status"] == {
        "training": 0, "active": 17, "revoked": 9, "failed": 0, "purged": 0
    }  # fmt: skip
    assert len(status["adapters"]) == 20
    code, out, _ = run(capsys, "--home", str(home), "status")
    assert f"adapter versions 26 (epoch {registry.epoch()}): active 17, revoked 9" in out
    last = status["adapters"][-1]
    assert (
        f"... 6 more: adapterswap adapters --after {last['adapter_id']}@v{last['version']}" in out
    )

"""The ``adapterswap`` command line (see API.md for the contract).

Exit codes: 0 success, 1 the operation failed, 2 wrong usage. ``--json`` prints one
JSON document on stdout instead of the human-readable report; errors then come as
``{"error": {"message": ..., "type": ...}}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from adapterswap.config import AdapterSwapConfig, load_config
from adapterswap.errors import AdapterSwapError
from adapterswap.storage.privacy import private_home, private_process

Handler = Callable[[argparse.Namespace, AdapterSwapConfig], tuple[str, Any]]


class UsageError(Exception):
    """Wrong usage that argparse cannot express: exit code 2."""


def _common_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    # Common options are accepted before and after the sub-command; SUPPRESS keeps the
    # sub-command's copy from overwriting a value given before it.
    default: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    parser.add_argument(
        "--home", help="state directory (env ADAPTERSWAP_HOME, default ~/.adapterswap)", **default
    )
    parser.add_argument("--config", help="YAML config file (default <home>/config.yaml)", **default)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        metavar="SECTION.FIELD=VALUE",
        help="override one config value; repeatable",
        **({"default": argparse.SUPPRESS} if suppress else {"default": []}),
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output", **default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adapterswap",
        description="Access-controlled, deletable LLM knowledge: one LoRA adapter per document shard.",
    )
    _common_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    _common_options(common, suppress=True)

    ingest = sub.add_parser(
        "ingest", parents=[common], help="ingest JSONL, CSV or Parquet documents"
    )
    ingest.add_argument("files", nargs="+", type=Path, metavar="FILE")
    ingest.add_argument("--group", help="group of records that do not name one")
    ingest.add_argument("--batch", help="batch label (default: the next bNNNN)")
    ingest.set_defaults(handler=_cmd_ingest)

    serve_cmd = sub.add_parser("serve", parents=[common], help="serve the HTTP API until stopped")
    serve_cmd.add_argument("--host", help="bind address (default serve.host, 127.0.0.1)")
    serve_cmd.add_argument("--port", type=int, help="port (default serve.port, 8000)")
    serve_cmd.set_defaults(handler=_cmd_serve)

    train = sub.add_parser(
        "train", parents=[common], help="train every shard whose content changed"
    )
    train.add_argument(
        "--wait",
        action="store_true",
        help="train here and wait (default: submit a Ray job when a cluster is running)",
    )
    train.set_defaults(handler=_cmd_train)

    delete = sub.add_parser(
        "delete", parents=[common], help="delete documents: revoke now, retrain and purge"
    )
    delete.add_argument("doc_ids", nargs="*", metavar="DOC_ID")
    delete.add_argument(
        "--wait",
        action="store_true",
        help="retrain and purge here (default: a Ray job when a cluster is running)",
    )
    delete.add_argument(
        "--finish", action="store_true", help="finish every deletion a crash left unfinished"
    )
    delete.set_defaults(handler=_cmd_delete)

    verify = sub.add_parser(
        "verify-forget",
        parents=[common],
        help="check that a deleted document is no more recallable than never-ingested ones",
    )
    verify.add_argument("doc_id", metavar="DOC_ID")
    verify.add_argument(
        "--source", required=True, type=Path, help="file holding the deleted document's record"
    )
    verify.add_argument(
        "--controls-file",
        required=True,
        type=Path,
        help="never-ingested documents; those of the document's group are the controls",
    )
    verify.add_argument("--controls", type=int, default=10, help="use at most N controls")
    verify.add_argument("--url", default="http://127.0.0.1:8000", help="the serving endpoint")
    verify.add_argument(
        "--key", help="a key holding the document's group (env ADAPTERSWAP_API_KEY)"
    )
    verify.set_defaults(handler=_cmd_verify_forget)

    audit = sub.add_parser("audit", parents=[common], help="the append-only audit log")
    audit.add_argument("--since", type=int, default=0, help="entries after this sequence number")
    audit.add_argument("--limit", type=int, default=100, help="at most this many entries")
    audit.set_defaults(handler=_cmd_audit)

    status = sub.add_parser(
        "status",
        parents=[common],
        help="documents, shards, adapters, versions, jobs, serving replicas",
    )
    status.add_argument(
        "--cluster",
        action="store_true",
        help="also join the running Ray cluster and report its nodes and Serve apps",
    )
    status.set_defaults(handler=_cmd_status)

    keys = sub.add_parser("keys", parents=[common], help="manage API keys").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION"
    )
    create = keys.add_parser("create", parents=[common], help="create a key and print it once")
    create.add_argument("--user", required=True)
    create.add_argument("--groups", required=True, help="comma-separated groups, e.g. hr,finance")
    create.add_argument("--admin", action="store_true", help="allow admin endpoints")
    create.set_defaults(handler=_cmd_keys_create)
    keys.add_parser("list", parents=[common], help="list keys").set_defaults(handler=_cmd_keys_list)
    revoke = keys.add_parser("revoke", parents=[common], help="revoke a key by its id")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=_cmd_keys_revoke)

    backup = sub.add_parser(
        "backup", parents=[common], help="copy the store, catalog and adapters to a new directory"
    )
    backup.add_argument("dest", metavar="DEST", help="a local directory: new or empty")
    backup.set_defaults(handler=_cmd_backup)

    restore = sub.add_parser(
        "restore", parents=[common], help="restore a backup into this home and storage"
    )
    restore.add_argument("src", type=Path, metavar="SRC", help="a directory made by backup")
    restore.add_argument(
        "--force",
        action="store_true",
        help=(
            "replace the home's store.sqlite and the storage's catalog and adapter files "
            "(those the backup does not hold are deleted); stop every AdapterSwap process "
            "using this home and storage first"
        ),
    )
    restore.set_defaults(handler=_cmd_restore)

    demo = sub.add_parser("demo", parents=[common], help="the end-to-end demonstration")
    demo.add_argument("--corpus", type=Path, help="example corpus directory (default: examples/)")
    demo.add_argument("--steps", type=int, help="training steps per shard (default 20)")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def _registry(config: AdapterSwapConfig):  # noqa: ANN202 - import kept lazy for fast --help
    from adapterswap.store.registry import AdapterRegistry

    private_home(config.home_path)
    return AdapterRegistry(config.db_path)


def _cmd_ingest(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    from adapterswap.catalog.ingest import ingest_files
    from adapterswap.models.embedder import load_embedder
    from adapterswap.progress import embed_with_progress

    embed = None
    if config.sharding.strategy == "topical":
        embed = embed_with_progress(load_embedder(config.embedding).embed, "planning shards")
    result = ingest_files(
        args.files,
        config,
        embed=embed,
        audit=_registry(config),
        actor="cli",
        group=args.group,
        batch=args.batch,
    )
    lines = [f"accepted {result.accepted} documents into batch {result.batch}", "planned shards:"]
    lines += [
        f"  {p.shard:<32} {len(p.doc_ids):>5} docs {p.tokens:>8} tokens" for p in result.shards
    ]
    payload = {
        "accepted": result.accepted,
        "batch": result.batch,
        "shards": [asdict(p) for p in result.shards],
    }
    return "\n".join(lines), payload


def _cmd_serve(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    from actors.serve_run import serve_until_stopped

    host = args.host or config.serve.host
    port = args.port or config.serve.port
    serve_until_stopped(config, host, port, config_file=args.config, overrides=args.overrides)
    return "stopped", {"stopped": True}


def _cmd_train(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    from adapterswap.cli.train import submit_or_train

    return submit_or_train(config, wait=args.wait, forward=_forwarded_flags(args), quiet=args.json)


def _forwarded_flags(args: argparse.Namespace) -> list[str]:
    """The global flags a submitted job must repeat to see the same configuration."""
    flags = []
    if args.home:
        flags += ["--home", args.home]
    if args.config:
        flags += ["--config", args.config]
    for item in args.overrides:
        flags += ["--set", item]
    return flags


def _cmd_delete(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    from actors.cluster_status import replica_liveness
    from adapterswap.cli.delete import delete_documents, finish_deletions

    if args.finish == bool(args.doc_ids):
        raise UsageError("delete: give DOC_ID... or --finish (not both)")
    if args.finish:
        return finish_deletions(config, _registry(config), None, quiet=args.json)
    return delete_documents(
        config,
        _registry(config),
        args.doc_ids,
        wait=args.wait,
        forward=_forwarded_flags(args),
        quiet=args.json,
        is_alive=replica_liveness(config),
    )


def _cmd_verify_forget(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    import os

    from adapterswap.api.client import Client
    from adapterswap.catalog.readers import read_inputs
    from adapterswap.delete.verify_forget import ForgetCheckFailed, http_scorer, verify_forget

    key = args.key or os.environ.get("ADAPTERSWAP_API_KEY")
    if not key:
        raise UsageError("verify-forget: give --key or set ADAPTERSWAP_API_KEY")
    source = [r.fields for r in read_inputs([args.source]).records]
    doc = next((r for r in source if r.get("id") == args.doc_id), None)
    if doc is None:
        raise UsageError(f"verify-forget: {args.source} has no record with id {args.doc_id!r}")
    group = doc.get("group")
    controls = [
        r["text"]
        for r in (r.fields for r in read_inputs([args.controls_file]).records)
        if r.get("group") == group and r.get("id") != args.doc_id
    ][: args.controls]
    with Client(args.url, key) as client:
        report = verify_forget(args.doc_id, group, doc["text"], controls, http_scorer(client))
    if not report.passed:
        raise ForgetCheckFailed(report.summary())
    return report.summary(), asdict(report)


def _cmd_audit(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    entries = _registry(config).audit_log(args.since, args.limit)
    lines = [
        f"{e.seq:>6} {e.ts} {e.actor:<14} {e.action:<18} {json.dumps(e.details, sort_keys=True)}"
        for e in entries
    ]
    return "\n".join(lines) or "no audit entries", [asdict(e) for e in entries]


def _cmd_status(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    from adapterswap.ops.status import collect_status, format_status

    cluster = None
    if args.cluster:
        from actors.cluster_status import collect_cluster

        cluster = collect_cluster(config)
    status = collect_status(config, _registry(config), cluster)
    return format_status(status), status


def _cmd_keys_create(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    key, record = _registry(config).create_key(args.user, groups, admin=args.admin, actor="cli")
    text = (
        f"created key {record.key_id} for user {record.user} "
        f"(groups: {', '.join(record.groups)}{', admin' if record.admin else ''})\n"
        f"{key}\n"
        "Store it now: it is not shown again."
    )
    return text, {"key": key, **asdict(record)}


def _cmd_keys_list(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    keys = _registry(config).list_keys()
    rows = [
        f"  {k.key_id:<14} {k.user:<20} {','.join(k.groups):<30} "
        f"{'admin' if k.admin else '':<6} {'revoked' if k.revoked_at else 'active'}"
        for k in keys
    ]
    return "\n".join([f"{len(keys)} key(s)", *rows]), [asdict(k) for k in keys]


def _cmd_keys_revoke(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    record = _registry(config).revoke_key(args.key_id, actor="cli")
    return f"revoked key {record.key_id} ({record.user})", asdict(record)


def _cmd_backup(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    from adapterswap.ops.backup import backup_home

    done = backup_home(config, args.dest)
    text = (
        f"backed up {done.files} files ({done.bytes} bytes, store epoch {done.epoch}) "
        f"to {done.backup}"
    )
    return text, asdict(done)


def _cmd_restore(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    from adapterswap.ops.backup import restore_home

    done = restore_home(config, args.src, force=args.force)
    text = (
        f"restored {done.files} files ({done.bytes} bytes, store epoch {done.epoch}) "
        f"from {done.backup} into {config.home_path} and {done.storage}"
    )
    return text, asdict(done)


def _cmd_demo(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    from adapterswap.cli.demo import DEMO_STEPS, run_demo

    echo = None if args.json else print
    report = run_demo(config, corpus=args.corpus, echo=echo, steps=args.steps or DEMO_STEPS)
    return "", report


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = build_parser().parse_args(argv)
    private_process()  # whatever the umask: the home and its files are the user's alone
    try:
        config = load_config(args.config, home=args.home, overrides=args.overrides)
        text, payload = args.handler(args, config)
    except UsageError as exc:
        print(f"adapterswap: error: {exc}", file=sys.stderr)
        return 2
    except AdapterSwapError as exc:
        if args.json:
            print(json.dumps({"error": {"message": str(exc), "type": type(exc).__name__}}))
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    elif text:
        print(text)
    return 0

"""The ``adapterswap`` command line: its parser and the dispatch (see API.md for the contract).

Each command's work lives in its group's module (``ingest``, ``train``, ``serve``, ``delete``,
``keys``, ``ops``, ``demo``); the parser names it as ``module:function``, imported only when
the command runs, so ``--help`` stays instant although training pulls in torch and Ray.

Exit codes: 0 success, 1 the operation failed, 2 wrong usage, 130 interrupted; every error is
one line ``error: ...`` on stderr. ``--json`` prints one JSON document on stdout instead of the
human-readable report; errors then come as ``{"error": {"message": ..., "type": ...}}``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from adapterswap.cli.common import UsageError
from adapterswap.cli.errors import report_bug, user_error
from adapterswap.config import AdapterSwapConfig, load_config
from adapterswap.storage.privacy import private_process

Handler = Callable[[argparse.Namespace, AdapterSwapConfig], tuple[str, Any]]


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
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an unexpected error", **default
    )


def _address_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        help="the Ray cluster to submit the job to: its job server URL (http://HOST:8265) or "
        "its address (HOST:6379, ray://HOST:10001, auto); default RAY_API_SERVER_ADDRESS, "
        "RAY_ADDRESS, ray.address; none: work here",
    )


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
    ingest.set_defaults(handler="adapterswap.cli.ingest:ingest_command")

    serve_cmd = sub.add_parser("serve", parents=[common], help="serve the HTTP API until stopped")
    serve_cmd.add_argument("--host", help="bind address (default serve.host, 127.0.0.1)")
    serve_cmd.add_argument("--port", type=int, help="port (default serve.port, 8000)")
    serve_cmd.set_defaults(handler="adapterswap.cli.serve:serve_command")

    train = sub.add_parser(
        "train", parents=[common], help="train every shard whose content changed"
    )
    train.add_argument(
        "--wait",
        action="store_true",
        help="train here and wait (default: a Ray job when a cluster is named)",
    )
    _address_option(train)
    train.set_defaults(handler="adapterswap.cli.train:train_command")

    delete = sub.add_parser(
        "delete", parents=[common], help="delete documents: revoke now, retrain and purge"
    )
    delete.add_argument("doc_ids", nargs="*", metavar="DOC_ID")
    delete.add_argument(
        "--wait",
        action="store_true",
        help="retrain and purge here (default: a Ray job when a cluster is named)",
    )
    _address_option(delete)
    delete.add_argument(
        "--finish", action="store_true", help="finish every deletion a crash left unfinished"
    )
    delete.set_defaults(handler="adapterswap.cli.delete:delete_command")

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
    verify.set_defaults(handler="adapterswap.cli.delete:verify_forget_command")

    adapters = sub.add_parser(
        "adapters", parents=[common], help="adapter versions, a page at a time, in id order"
    )
    adapters.add_argument("--limit", type=int, default=100, help="at most this many (1-1000)")
    adapters.add_argument(
        "--after", metavar="ID[@vN]", help="start after this adapter (or this version of it)"
    )
    adapters.add_argument("--status", help="only these statuses, e.g. active,revoked")
    adapters.add_argument("--group", help="only these groups, e.g. hr,finance")
    adapters.set_defaults(handler="adapterswap.cli.ops:adapters_command")

    audit = sub.add_parser("audit", parents=[common], help="the append-only audit log")
    audit.add_argument("--since", type=int, default=0, help="entries after this sequence number")
    audit.add_argument("--limit", type=int, default=100, help="at most this many entries")
    audit.set_defaults(handler="adapterswap.cli.ops:audit_command")

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
    status.set_defaults(handler="adapterswap.cli.ops:status_command")

    keys = sub.add_parser("keys", parents=[common], help="manage API keys").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION"
    )
    create = keys.add_parser("create", parents=[common], help="create a key and print it once")
    create.add_argument("--user", required=True)
    create.add_argument("--groups", required=True, help="comma-separated groups, e.g. hr,finance")
    create.add_argument("--admin", action="store_true", help="allow admin endpoints")
    create.set_defaults(handler="adapterswap.cli.keys:create_key_command")
    keys.add_parser("list", parents=[common], help="list keys").set_defaults(
        handler="adapterswap.cli.keys:list_keys_command"
    )
    revoke = keys.add_parser("revoke", parents=[common], help="revoke a key by its id")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler="adapterswap.cli.keys:revoke_key_command")

    backup = sub.add_parser(
        "backup", parents=[common], help="copy the store, catalog and adapters to a new directory"
    )
    backup.add_argument("dest", metavar="DEST", help="a local directory: new or empty")
    backup.set_defaults(handler="adapterswap.cli.ops:backup_command")

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
    restore.set_defaults(handler="adapterswap.cli.ops:restore_command")

    demo = sub.add_parser("demo", parents=[common], help="the end-to-end demonstration")
    demo.add_argument("--corpus", type=Path, help="example corpus directory (default: examples/)")
    demo.add_argument("--steps", type=int, help="training steps per shard (default 20)")
    demo.set_defaults(handler="adapterswap.cli.demo:demo_command")
    return parser


def load_handler(name: str) -> Handler:
    """The function a command's ``handler`` names as ``module:function``, imported now."""
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code. An error is one line (see :mod:`adapterswap.cli.errors`);
    with ``--debug`` an unexpected one raises, traceback and all."""
    args = build_parser().parse_args(argv)
    private_process()  # whatever the umask: the home and its files are the user's alone
    try:
        config = load_config(args.config, home=args.home, overrides=args.overrides)
        text, payload = load_handler(args.handler)(args, config)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            if args.debug:
                raise
            message = report_bug(exc)
        if args.json:
            print(json.dumps({"error": {"message": message, "type": type(exc).__name__}}))
        else:
            print(f"error: {message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    elif text:
        print(text)
    return 0

"""What the commands share: the usage error (exit code 2), the home's store, and the flags
a command submitted as a Ray job must repeat."""

from __future__ import annotations

import argparse

from adapterswap.config import AdapterSwapConfig
from adapterswap.storage.privacy import private_home
from adapterswap.store.registry import AdapterRegistry


class UsageError(Exception):
    """Wrong usage that argparse cannot express: exit code 2."""


def open_registry(config: AdapterSwapConfig) -> AdapterRegistry:
    """The home's store, the home made private to this user first."""
    private_home(config.home_path)
    return AdapterRegistry(config.db_path)


def forwarded_flags(args: argparse.Namespace) -> list[str]:
    """The global flags a submitted job must repeat to see the same configuration."""
    flags = []
    if args.home:
        flags += ["--home", args.home]
    if args.config:
        flags += ["--config", args.config]
    for item in args.overrides:
        flags += ["--set", item]
    return flags

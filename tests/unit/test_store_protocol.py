"""The store protocol, the registry and the store actor's typed client agree, method by method."""

from __future__ import annotations

import inspect

import pytest

from actors.store_client import StoreClient
from adapterswap.store.protocol import Store, StoreReads, StoreWrites
from adapterswap.store.registry import AdapterRegistry


def _methods(cls: type) -> set[str]:
    return {
        name
        for name, value in vars(cls).items()
        if inspect.isfunction(value) and not name.startswith("_")
    }


def _parameters(function: object) -> list[tuple[str, object, object]]:
    """Names, kinds and defaults: what a caller relies on (annotations differ in spelling).

    ``ray.remote`` (the store actor) adds a ``_ray_trace_ctx`` keyword to the registry's
    methods in place; no caller passes it."""
    return [
        (p.name, p.kind, p.default)
        for p in inspect.signature(function).parameters.values()
        if p.name != "_ray_trace_ctx"
    ]


READS, WRITES = _methods(StoreReads), _methods(StoreWrites)


def test_every_method_is_a_read_or_a_write():
    assert READS and WRITES and not READS & WRITES
    assert _methods(Store) == set()  # the two halves, nothing of its own


@pytest.mark.parametrize("name", sorted(READS | WRITES))
@pytest.mark.parametrize("implementation", [AdapterRegistry, StoreClient])
def test_the_registry_and_the_client_implement_the_protocol(implementation, name):
    declared = getattr(StoreReads if name in READS else StoreWrites, name)
    assert _parameters(getattr(implementation, name)) == _parameters(declared)


def test_the_client_has_no_untyped_way_in():
    public = {name for name in dir(StoreClient) if not name.startswith("_")}
    assert public == READS | WRITES | {"connect"}
    assert "__getattr__" not in vars(StoreClient)

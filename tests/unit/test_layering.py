"""The tree is the data flow: each stage package imports only the stages below it.

Ray stays out of the library by ruff's banned imports (``adapterswap/ruff.toml``); this test
keeps the order of the stages themselves, so that no stage reaches up to a later one (the
store importing the API, storage importing the router) and no two stages import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "adapterswap"

# Lowest first. A module may import its own package and any package of a lower rank.
RANKS: dict[str, int] = {
    "types": 0,
    "errors": 0,
    "config": 1,
    "storage": 2,
    "store": 3,
    "route": 3,
    "models": 3,
    "compose": 3,
    "catalog": 4,
    "engine": 4,
    "train": 5,
    "delete": 6,
    "ops": 6,
    "api": 7,
    "cli": 8,
}


def _package(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def _imported_stages(path: Path) -> set[str]:
    """Every ``adapterswap.<stage>`` the module imports, at its top or inside a function."""
    stages = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "adapterswap" and len(parts) > 1 and parts[1] in RANKS:
                stages.add(parts[1])
    return stages


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if _package(p) in RANKS)


def test_every_stage_has_a_rank() -> None:
    stages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("__")}
    assert stages | modules == set(RANKS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_module_imports_only_lower_stages(path: Path) -> None:
    own = _package(path)
    upward = sorted(s for s in _imported_stages(path) if s != own and RANKS[s] >= RANKS[own])
    assert not upward, f"{path.relative_to(PACKAGE.parent)} ({own}) imports {upward}"
